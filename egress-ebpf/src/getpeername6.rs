//! cgroup/getpeername6: an actor's captured IPv6 socket (including v4-mapped destinations on a
//! dual-stack socket) reports its original destination as its peer.
use core::ptr::write_volatile;

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{actor::port_to_user, maps::SOCKETS};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is Copy and read at once.
    if let Some(record) = unsafe { SOCKETS.get(&cookie) } {
        let ip = record.dst_ip;
        let port = record.dst_port;
        // SAFETY: user_ip6 and user_port are writable in getpeername6, 4 bytes at a time.
        unsafe {
            let sa = ctx.sock_addr;
            write_volatile(&mut (*sa).user_ip6[0], ip[0]);
            write_volatile(&mut (*sa).user_ip6[1], ip[1]);
            write_volatile(&mut (*sa).user_ip6[2], ip[2]);
            write_volatile(&mut (*sa).user_ip6[3], ip[3]);
            (*sa).user_port = port_to_user(port);
        }
    }
    // getpeername programs must return 1.
    1
}
