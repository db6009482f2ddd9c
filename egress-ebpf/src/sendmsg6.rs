//! cgroup/sendmsg6: the UDP policy (see `udp`) for an actor's unconnected IPv6 sends, native
//! or v4-mapped: DNS goes to the actor's DNS socket, other UDP is refused.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use egress_common::Counter;

use crate::{actor::REFUSE, connect6::udp6, maps::count};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    match udp6(&ctx, false) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(Counter::Refused);
            warn!(&ctx, "egress: sendmsg6 refused: {}", reason);
            REFUSE
        }
    }
}
