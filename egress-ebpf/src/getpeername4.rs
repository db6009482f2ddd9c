//! cgroup/getpeername4: an actor's captured IPv4 socket reports its original destination as
//! its peer, not the agent's listener.
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::is_v4_mapped;

use crate::{actor::port_to_user, maps::SOCKETS};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is Copy and read at once.
    if let Some(record) = unsafe { SOCKETS.get(&cookie) } {
        if is_v4_mapped(&record.dst_ip) {
            // SAFETY: user_ip4 and user_port are writable in getpeername4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = record.dst_ip[3];
                (*ctx.sock_addr).user_port = port_to_user(record.dst_port);
            }
        }
    }
    // getpeername programs must return 1.
    1
}
