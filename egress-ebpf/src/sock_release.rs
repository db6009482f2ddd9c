//! cgroup/sock_release: drop the record of a socket that is released without ever reaching
//! the TCP states sockops watches (for example a connect that failed before its SYN), and of
//! every UDP socket that sent DNS (sockops never sees those). It runs for every socket made
//! in an actor cgroup, whatever its type.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::maps::SOCKETS;

/// Entry point: see the module documentation.
#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let _ = SOCKETS.remove(&cookie);
    // sock_release programs must return 1.
    1
}
