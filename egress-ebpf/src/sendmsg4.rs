//! cgroup/sendmsg4: the UDP policy (see `udp`) for an actor's unconnected IPv4 sends (sendto /
//! sendmsg with a destination): DNS goes to the actor's DNS socket, other UDP is refused.
//! Sends on a connected socket do not come here: connect4 decided for them.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use egress_common::Counter;

use crate::{actor::REFUSE, connect4::udp4, maps::count};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    match udp4(&ctx, false) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(Counter::Refused);
            warn!(&ctx, "egress: sendmsg4 refused: {}", reason);
            REFUSE
        }
    }
}
