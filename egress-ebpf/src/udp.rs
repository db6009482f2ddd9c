//! The UDP policy connect4/6 and sendmsg4/6 share: an actor's DNS (any address, port 53) goes
//! to its own DNS socket in its network namespace, loopback inside its own namespace stays
//! local, and every other datagram is refused. glibc's resolver connect()s its UDP socket and
//! a connected socket's sends never reach the sendmsg hooks, so the same decision is made at
//! connect and at each unconnected send.
use aya_ebpf::programs::SockAddrContext;
use egress_common::{
    ACTOR_DNS_V4, ACTOR_DNS_V6, Counter, DNS_PORT, is_local_v6, is_v4_mapped, v4_mapped,
};

use crate::{
    actor::{find_actor, forget, is_agent_socket, local_verdict, record},
    maps::count,
};

/// What to do with a UDP destination that is not refused.
pub enum Verdict {
    /// Let the call proceed unchanged.
    Allow,
    /// Rewrite the destination to this address (IPv6 words; IPv4 v4-mapped) and port.
    Redirect([u32; 4], u16),
}

/// The verdict for a UDP connect (`connect`: true) or send to `dst` (IPv6 words, IPv4
/// v4-mapped) and `dst_port` (host order). Refusals are errors, with the reason.
///
/// A DNS destination is recorded under the socket's cookie before the rewrite, so recvmsg can
/// show the reply as coming from it; an unconnected socket that asks several resolvers keeps
/// only the last one asked (its replies all show that resolver as their source). A connect
/// elsewhere forgets an earlier DNS record of the socket: it can no longer receive from the
/// DNS socket.
#[inline(always)]
pub fn verdict(
    ctx: &SockAddrContext,
    dst: [u32; 4],
    dst_port: u16,
    connect: bool,
) -> Result<Verdict, &'static str> {
    if is_agent_socket(ctx) {
        count(Counter::AgentSkipped);
        return Ok(Verdict::Allow);
    }
    let (actor_cgroup, entry) = find_actor().ok_or("no actor registered for this cgroup")?;
    let (dns_ip, dns_open) = if is_v4_mapped(&dst) {
        (v4_mapped(entry.listen_ip4), entry.flags & ACTOR_DNS_V4 != 0)
    } else {
        (entry.listen_ip6, entry.flags & ACTOR_DNS_V6 != 0)
    };
    // The DNS socket itself: what an inner actor's program already redirected to, when actor
    // cgroups are nested (every level finds the same, deepest, actor).
    if dns_open && dst == dns_ip && dst_port == entry.dns_port {
        count(Counter::ListenerSkipped);
        return Ok(Verdict::Allow);
    }
    if dst_port == DNS_PORT {
        if !dns_open {
            return Err("the actor has no DNS socket for this address family");
        }
        record(ctx, dst, dst_port, actor_cgroup).map_err(|()| "record not stored")?;
        count(Counter::DnsRedirected);
        return Ok(Verdict::Redirect(dns_ip, entry.dns_port));
    }
    if connect {
        forget(ctx);
    }
    if is_local_v6(&dst) {
        return local_verdict(ctx).map(|_| Verdict::Allow);
    }
    Err("UDP other than DNS (port 53) is refused")
}
