//! cgroup/connect6: redirect an actor's IPv6 TCP connect (native or v4-mapped on a dual-stack
//! socket) to the agent.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use egress_common::{
    ACTOR_LISTEN_V4, ACTOR_LISTEN_V6, Counter, is_local_v6, is_v4_mapped, v4_mapped,
};

use crate::{
    actor::{ALLOW, REFUSE, capture_target, local_verdict, port_from_user, port_to_user, record},
    maps::count,
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
    let sa = ctx.sock_addr;
    let Some((actor_cgroup, entry)) = capture_target(ctx)? else {
        return Ok(ALLOW);
    };
    // Word by word: the verifier accepts only 4-byte accesses to user_ip6.
    // SAFETY: the context pointer is valid for the program's run.
    let dst_ip = unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    };
    // SAFETY: as above.
    let dst_port = port_from_user(unsafe { (*sa).user_port });
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
    // SAFETY: as above; user_ip6 and user_port are writable in connect6.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], listener[0]);
        write_volatile(&mut (*sa).user_ip6[1], listener[1]);
        write_volatile(&mut (*sa).user_ip6[2], listener[2]);
        write_volatile(&mut (*sa).user_ip6[3], listener[3]);
        (*sa).user_port = port_to_user(entry.listen_port);
    }
    count(Counter::Redirected);
    Ok(ALLOW)
}
