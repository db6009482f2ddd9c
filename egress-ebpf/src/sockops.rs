//! sockops: publish a captured connection's record for the agent once it is established, and
//! remove it when the socket closes with nothing left for the agent to accept.
//!
//! The client's ACTIVE_ESTABLISHED callback runs before it sends the final handshake ACK, so
//! the record is in `EGRESS_CONNS` before the agent's listener can accept the connection.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use egress_common::{ConnKey, Counter, v4_mapped};

use crate::maps::{CONNS, SOCKETS, count};

const AF_INET: u32 = 2;

/// Entry point: see the module documentation.
#[sock_ops]
pub fn egress_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Ask for state callbacks from the SYN on, so a refused or abandoned connect is
            // cleaned up too, not only an established one.
            // SAFETY: the record is only tested for presence.
            if unsafe { SOCKETS.get(&cookie) }.is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Copy, do not move: getpeername still needs the cookie entry.
            // SAFETY: the record is Copy and read at once.
            if let Some(record) = unsafe { SOCKETS.get(&cookie) } {
                let record = *record;
                match CONNS.insert(&conn_key(ctx), &record, 0) {
                    Ok(()) => count(Counter::Published),
                    Err(_) => count(Counter::PublishFailed),
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = SOCKETS.remove(&cookie);
                // A client that wrote and closed in an orderly way (FIN) goes to CLOSE as soon
                // as the agent's side ACKs the FIN, which the kernel does before accept(): its
                // data waits in the agent's queue, so its record must wait too. The agent
                // takes it on accept; the LRU bound and the agent's age check cover an agent
                // that never accepts. Any other way to CLOSE (refused, reset, aborted) means
                // nothing is left to accept.
                if !matches!(
                    ctx.arg(0),
                    BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING
                ) {
                    let _ = CONNS.remove(&conn_key(ctx));
                }
            }
        }
        _ => {}
    }
}

/// The key the agent computes on accept: netns cookie, client (local) address and port.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    // SAFETY: helper taking the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let ip = if ctx.family() == AF_INET {
        v4_mapped(ctx.local_ip4())
    } else {
        // Word by word: `ctx.local_ip6()` copies the array through a modified context pointer,
        // which the verifier rejects.
        // SAFETY: the context pointer is valid for the program's run.
        unsafe {
            [
                read_volatile(&(*ctx.ops).local_ip6[0]),
                read_volatile(&(*ctx.ops).local_ip6[1]),
                read_volatile(&(*ctx.ops).local_ip6[2]),
                read_volatile(&(*ctx.ops).local_ip6[3]),
            ]
        }
    };
    ConnKey {
        netns,
        ip,
        port: ctx.local_port() as u16,
        _pad: [0; 3],
    }
}
