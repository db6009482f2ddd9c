//! cgroup/recvmsg4: a reply the actor's DNS socket sent to one of its IPv4 UDP sockets shows
//! the resolver the actor asked as its source, not the agent: resolvers (glibc, dig) drop
//! answers from an address they did not ask.
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{ACTOR_DNS_V4, Counter, is_v4_mapped};

use crate::{
    actor::{port_from_user, port_to_user},
    maps::{ACTORS, SOCKETS, count},
};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    // recvmsg programs must return 1.
    1
}

fn restore(ctx: &SockAddrContext) {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the record is Copy and read at once.
    let Some(record) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
        return;
    };
    if !is_v4_mapped(&record.dst_ip) {
        return;
    }
    // The DNS socket of the actor the send was recorded for, not the caller's: only that
    // socket's replies are rewritten.
    // SAFETY: as above.
    let Some(entry) = (unsafe { ACTORS.get(&record.actor_cgroup) }).copied() else {
        return;
    };
    if entry.flags & ACTOR_DNS_V4 == 0 {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run.
    let (src_ip, src_port) = unsafe { ((*sa).user_ip4, port_from_user((*sa).user_port)) };
    if src_ip != entry.listen_ip4 || src_port != entry.dns_port {
        return;
    }
    // SAFETY: as above; user_ip4 and user_port are writable in recvmsg4.
    unsafe {
        (*sa).user_ip4 = record.dst_ip[3];
        (*sa).user_port = port_to_user(record.dst_port);
    }
    count(Counter::DnsRestored);
}
