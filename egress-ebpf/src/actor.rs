//! What the connect and sendmsg programs share: finding the caller's actor, recognising the
//! agent's own sockets, and storing the record.
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    programs::SockAddrContext,
};
use egress_common::{ActorEntry, Counter, MAX_CGROUP_DEPTH, Record};

use crate::maps::{ACTORS, SETTINGS, SOCKETS, count};

/// `SOCK_STREAM`.
const SOCK_STREAM: u32 = 1;
/// `SOCK_DGRAM`.
const SOCK_DGRAM: u32 = 2;
/// `IPPROTO_UDP`.
const IPPROTO_UDP: u32 = 17;
/// `IPPROTO_UDPLITE`: sends through the same `udp_sendmsg`, so the same policy.
const IPPROTO_UDPLITE: u32 = 136;
/// `SOCK_SEQPACKET` (SCTP one-to-one style).
const SOCK_SEQPACKET: u32 = 5;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u32 = 6;
/// Verdict of a cgroup sock_addr program: let the call proceed.
pub const ALLOW: i32 = 1;
/// Verdict of a cgroup sock_addr program: fail the call with `EPERM`.
pub const REFUSE: i32 = 0;

/// The actor a TCP connect is captured for; `None` for the agent's own socket. A connect
/// without an actor is an error (refused).
#[inline(always)]
pub fn capture_target(ctx: &SockAddrContext) -> Result<Option<(u64, ActorEntry)>, &'static str> {
    if is_agent_socket(ctx) {
        count(Counter::AgentSkipped);
        return Ok(None);
    }
    find_actor()
        .map(Some)
        .ok_or("no actor registered for this cgroup")
}

/// The actor cgroup the caller belongs to: its own cgroup, or the deepest of its ancestors
/// that the agent registered. Only cgroups with attached programs reach here, so `None`
/// means the agent does not (or no longer) serve that cgroup.
#[inline(always)]
pub fn find_actor() -> Option<(u64, ActorEntry)> {
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is Copy and read at once.
    if let Some(entry) = unsafe { ACTORS.get(&own) } {
        return Some((own, *entry));
    }
    let mut found = None;
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: helper with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        // SAFETY: as above.
        if let Some(entry) = unsafe { ACTORS.get(&id) } {
            found = Some((id, *entry));
        }
        level += 1;
    }
    found
}

/// What to do with a connect, by socket type: TCP is captured, UDP goes through the DNS
/// policy (port 53 to the actor's DNS socket, loopback of its own namespace allowed, the rest
/// refused), connection-oriented protocols the agent cannot carry (MPTCP, SCTP) are refused
/// rather than let out, and the remaining datagram sockets (ICMP ping) are left alone: the
/// kernel has no sendmsg hook for them, so refusing their connect would close nothing.
pub enum Kind {
    /// A TCP connect: capture it.
    Tcp,
    /// A UDP (or UDP-Lite) connect: the DNS policy.
    Udp,
    /// Neither: let it through untouched.
    Other,
    /// Connection-oriented but not TCP: refuse it.
    Refused,
}

/// The [`Kind`] of the connecting socket.
#[inline(always)]
pub fn kind(ctx: &SockAddrContext) -> Kind {
    // SAFETY: the context pointer is valid for the program's run.
    let (ty, protocol) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
    match ty {
        SOCK_STREAM if protocol == IPPROTO_TCP => Kind::Tcp,
        SOCK_STREAM | SOCK_SEQPACKET => Kind::Refused,
        SOCK_DGRAM if protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE => Kind::Udp,
        _ => Kind::Other,
    }
}

/// The reason a connect of a socket type the agent cannot carry is refused.
pub const REFUSED_KIND: &str = "only TCP is captured: MPTCP and SCTP connects are refused";

/// Whether the connecting socket is one of the agent's own upstream sockets: it carries the
/// agent's mark, lives in the agent's network namespace and the caller is in the agent's
/// cgroup.
#[inline(always)]
pub fn is_agent_socket(ctx: &SockAddrContext) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    if settings.agent_mark == 0 {
        return false;
    }
    // SAFETY: the kernel always sets `sk` for sock_addr programs.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if mark != settings.agent_mark {
        return false;
    }
    // SAFETY: helpers taking the program's context or nothing.
    let (netns, cgroup) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    netns == settings.agent_netns && cgroup == settings.agent_cgroup
}

/// Verdict for a connect to a local address (loopback or unspecified): inside an actor's own
/// network namespace it stays in the actor (sidecars, local services) and is not egress; in
/// the agent's (node's) namespace it would reach the node's own services, so it is refused.
#[inline(always)]
pub fn local_verdict(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    // SAFETY: helper taking the program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match SETTINGS.get(0) {
        Some(settings) if settings.agent_netns == netns => {
            Err("a connect to the node's loopback from an actor in the node's network namespace")
        }
        _ => {
            count(Counter::LocalSkipped);
            Ok(ALLOW)
        }
    }
}

/// Removes the record of the calling socket, if any.
#[inline(always)]
pub fn forget(ctx: &SockAddrContext) {
    // SAFETY: helper taking the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCKETS.remove(&cookie);
}

/// Stores the original destination of the connecting socket under its cookie.
#[inline(always)]
pub fn record(
    ctx: &SockAddrContext,
    dst_ip: [u32; 4],
    dst_port: u16,
    actor_cgroup: u64,
) -> Result<(), ()> {
    // SAFETY: helpers taking the program's context or nothing.
    let (cookie, pid_tgid, cgroup, now) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_cgroup_id(),
            bpf_ktime_get_ns(),
        )
    };
    let record = Record {
        dst_ip,
        dst_port,
        _pad: 0,
        pid: (pid_tgid >> 32) as u32,
        actor_cgroup,
        cgroup,
        connect_ns: now,
    };
    SOCKETS.insert(&cookie, &record, 0).map_err(|_| ())
}

/// Host-order port from `user_port` (network order in the low 16 bits).
#[inline(always)]
pub fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// `user_port` value for a host-order port.
#[inline(always)]
pub fn port_to_user(port: u16) -> u32 {
    u32::from(port.to_be())
}
