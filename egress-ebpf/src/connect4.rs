//! cgroup/connect4: redirect an actor's IPv4 TCP connect to the agent, and apply the UDP
//! policy (see `udp`) to its IPv4 UDP connects.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use egress_common::{ACTOR_LISTEN_V4, Counter, is_local_v4, v4_mapped};

use crate::{
    actor::{
        ALLOW, Kind, REFUSE, REFUSED_KIND, capture_target, kind, local_verdict, port_from_user,
        port_to_user, record,
    },
    maps::count,
    udp,
};

/// Entry point: see the module documentation.
#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(Counter::Refused);
            warn!(&ctx, "egress: connect4 refused: {}", reason);
            REFUSE
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    match kind(ctx) {
        Kind::Tcp => tcp(ctx),
        Kind::Udp => udp4(ctx, true),
        Kind::Other => Ok(ALLOW),
        Kind::Refused => Err(REFUSED_KIND),
    }
}

fn tcp(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    let sa = ctx.sock_addr;
    let Some((actor_cgroup, entry)) = capture_target(ctx)? else {
        return Ok(ALLOW);
    };
    if entry.flags & ACTOR_LISTEN_V4 == 0 {
        return Err("the actor has no IPv4 listener");
    }
    // SAFETY: the context pointer is valid for the program's run.
    let (dst_ip, dst_port) = unsafe { ((*sa).user_ip4, port_from_user((*sa).user_port)) };
    if dst_ip == entry.listen_ip4 && dst_port == entry.listen_port {
        count(Counter::ListenerSkipped);
        return Ok(ALLOW);
    }
    if is_local_v4(dst_ip) {
        return local_verdict(ctx);
    }
    record(ctx, v4_mapped(dst_ip), dst_port, actor_cgroup).map_err(|()| "record not stored")?;
    // SAFETY: as above; user_ip4 and user_port are writable in connect4.
    unsafe {
        (*sa).user_ip4 = entry.listen_ip4;
        (*sa).user_port = port_to_user(entry.listen_port);
    }
    count(Counter::Redirected);
    Ok(ALLOW)
}

/// The UDP policy for an IPv4 destination, at connect (`connect`) or at an unconnected send:
/// shared with sendmsg4, whose context has the same fields.
#[inline(always)]
pub fn udp4(ctx: &SockAddrContext, connect: bool) -> Result<i32, &'static str> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run.
    let (dst_ip, dst_port) = unsafe { ((*sa).user_ip4, port_from_user((*sa).user_port)) };
    match udp::verdict(ctx, v4_mapped(dst_ip), dst_port, connect)? {
        udp::Verdict::Allow => {}
        udp::Verdict::Redirect(ip, port) => {
            // SAFETY: as above; user_ip4 and user_port are writable in connect4 and sendmsg4.
            unsafe {
                (*sa).user_ip4 = ip[3];
                (*sa).user_port = port_to_user(port);
            }
        }
    }
    Ok(ALLOW)
}
