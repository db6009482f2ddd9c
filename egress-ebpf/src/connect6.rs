//! cgroup/connect6: redirect an actor's IPv6 TCP connect (native or v4-mapped on a dual-stack
//! socket) to the agent, and apply the UDP policy (see `udp`) to its IPv6 UDP connects.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use egress_common::{
    ACTOR_LISTEN_V4, ACTOR_LISTEN_V6, Counter, is_local_v6, is_v4_mapped, v4_mapped,
};

use crate::{
    actor::{
        ALLOW, Kind, REFUSE, REFUSED_KIND, capture_target, kind, local_verdict, port_from_user,
        port_to_user, record,
    },
    maps::count,
    udp,
};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(Counter::Refused);
            warn!(&ctx, "egress: connect6 refused: {}", reason);
            REFUSE
        }
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    match kind(ctx) {
        Kind::Tcp => tcp(ctx),
        Kind::Udp => udp6(ctx, true),
        Kind::Other => Ok(ALLOW),
        Kind::Refused => Err(REFUSED_KIND),
    }
}

/// The destination of the call, word by word: the verifier accepts only 4-byte accesses to
/// user_ip6.
#[inline(always)]
pub fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run.
    unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Rewrites the destination of the call (user_ip6 and user_port, writable in connect6,
/// sendmsg6, recvmsg6 and getpeername6).
#[inline(always)]
pub fn set_user_ip6(ctx: &SockAddrContext, ip: [u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; 4-byte writes.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], ip[3]);
        (*sa).user_port = port_to_user(port);
    }
}

fn tcp(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    let Some((actor_cgroup, entry)) = capture_target(ctx)? else {
        return Ok(ALLOW);
    };
    let dst_ip = user_ip6(ctx);
    // SAFETY: the context pointer is valid for the program's run.
    let dst_port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    let listener = if is_v4_mapped(&dst_ip) {
        if entry.flags & ACTOR_LISTEN_V4 == 0 {
            return Err("the actor has no IPv4 listener");
        }
        v4_mapped(entry.listen_ip4)
    } else {
        if entry.flags & ACTOR_LISTEN_V6 == 0 {
            return Err("the actor has no IPv6 listener");
        }
        entry.listen_ip6
    };
    if dst_ip == listener && dst_port == entry.listen_port {
        count(Counter::ListenerSkipped);
        return Ok(ALLOW);
    }
    if is_local_v6(&dst_ip) {
        return local_verdict(ctx);
    }
    record(ctx, dst_ip, dst_port, actor_cgroup).map_err(|()| "record not stored")?;
    set_user_ip6(ctx, listener, entry.listen_port);
    count(Counter::Redirected);
    Ok(ALLOW)
}

/// The UDP policy for an IPv6 destination (native or v4-mapped), at connect (`connect`) or at
/// an unconnected send: shared with sendmsg6, whose context has the same fields.
#[inline(always)]
pub fn udp6(ctx: &SockAddrContext, connect: bool) -> Result<i32, &'static str> {
    let dst_ip = user_ip6(ctx);
    // SAFETY: the context pointer is valid for the program's run.
    let dst_port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    match udp::verdict(ctx, dst_ip, dst_port, connect)? {
        udp::Verdict::Allow => {}
        udp::Verdict::Redirect(ip, port) => set_user_ip6(ctx, ip, port),
    }
    Ok(ALLOW)
}
