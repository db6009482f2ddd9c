//! cgroup/recvmsg6: a reply the actor's DNS socket sent to one of its IPv6 UDP sockets
//! (native, or v4-mapped on a dual-stack socket) shows the resolver the actor asked as its
//! source, not the agent.
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{ACTOR_DNS_V4, ACTOR_DNS_V6, Counter, is_v4_mapped, v4_mapped};

use crate::{
    actor::port_from_user,
    connect6::{set_user_ip6, user_ip6},
    maps::{ACTORS, SOCKETS, count},
};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
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
    // SAFETY: as above.
    let Some(entry) = (unsafe { ACTORS.get(&record.actor_cgroup) }).copied() else {
        return;
    };
    let src_ip = user_ip6(ctx);
    // SAFETY: the context pointer is valid for the program's run.
    let src_port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    let v4 = is_v4_mapped(&src_ip);
    if v4 != is_v4_mapped(&record.dst_ip) {
        return;
    }
    let (dns_ip, dns_open) = if v4 {
        (v4_mapped(entry.listen_ip4), entry.flags & ACTOR_DNS_V4 != 0)
    } else {
        (entry.listen_ip6, entry.flags & ACTOR_DNS_V6 != 0)
    };
    if !dns_open || src_ip != dns_ip || src_port != entry.dns_port {
        return;
    }
    set_user_ip6(ctx, record.dst_ip, record.dst_port);
    count(Counter::DnsRestored);
}
