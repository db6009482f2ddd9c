//! The agent's listeners, one per capture front and network namespace, and the accept loops
//! that find where each connection was going: the record cgroup eBPF published (loopback
//! listeners in cgroup actors' namespaces), or `SO_ORIGINAL_DST` of an nftables redirect (the
//! 0.0.0.0 listener of each veth worker namespace).
//!
//! And the agent's DNS sockets with their receive loops: one per cgroup actor (loopback of its
//! namespace, a port of its own: the socket a datagram arrives on is the actor), and one per
//! worker namespace next to the NAT listener (the datagram's source address is the actor).
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener, UdpSocket as StdUdp},
    path::Path,
    sync::Arc,
    time::Duration,
};

use egress_common::{ActorEntry, ConnKey};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::{Semaphore, watch},
};
use tracing::{debug, info, warn};

use crate::{config::Actor, dns, ebpf, netns, proxy, socket};

/// Most queries of one DNS socket being answered at once; datagrams beyond it are dropped
/// (the actor's resolver retries).
pub const MAX_DNS_IN_FLIGHT: usize = 256;

/// Attempts at a port free on both 127.0.0.1 and ::1 for an actor's DNS socket.
const DNS_PORT_ATTEMPTS: usize = 8;

/// 127.0.0.1:port, and [::1]:port when `v6`.
fn loopback_addrs(port: u16, v6: bool) -> Vec<SocketAddr> {
    let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
    if v6 {
        addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }
    addrs
}

/// Pending-connection queue of each listener.
const BACKLOG: i32 = 4096;

/// Errors opening a listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be opened in the namespace.
    #[error("opening the agent listener on port {port} in {netns}: {source}")]
    Open {
        /// Namespace description.
        netns: String,
        /// Port.
        port: u16,
        /// The cause.
        source: io::Error,
    },
    /// An actor's DNS socket could not be opened in its namespace.
    #[error(
        "opening the actor's DNS socket (UDP on loopback) in {netns}: {source}; its DNS is \
         refused until it is added again"
    )]
    OpenDns {
        /// Namespace description.
        netns: String,
        /// The cause.
        source: io::Error,
    },
}

/// Which capture front a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Front {
    /// cgroup eBPF: 127.0.0.1 and ::1 in a cgroup actor's namespace; records in the map.
    Ebpf,
    /// nftables redirect: 0.0.0.0 in a veth worker namespace; `SO_ORIGINAL_DST`.
    Nat,
}

/// The agent's listeners of one front in one network namespace: 127.0.0.1:port and
/// [::1]:port (when the namespace has IPv6) for the eBPF front, 0.0.0.0:port for the NAT
/// front.
pub struct Listener {
    /// Its namespace's cookie: part of every record key of connections accepted here, and of
    /// the veth actor addresses.
    pub cookie: u64,
    front: Front,
    port: u16,
    v4: StdListener,
    v6: Option<StdListener>,
    /// NAT front: the worker namespace's DNS socket (0.0.0.0, UDP).
    dns: Option<StdUdp>,
}

impl Listener {
    /// Opens the listeners inside `netns` (bringing its loopback up if needed).
    pub fn open(netns: Option<&Path>, port: u16) -> Result<Self, Error> {
        let label = netns::label(netns);
        let err = |source| Error::Open {
            netns: label.clone(),
            port,
            source,
        };
        let (v4, v6, cookie, raised) = netns::run_in(netns, move || {
            let raised = netns::ensure_loopback_up()?;
            let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
            let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                Ok(l) => Some(l),
                // No IPv6 in this namespace: IPv6 connects of its actors are refused.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
            let cookie = netns::cookie(&v4)?;
            Ok((v4, v6, cookie, raised))
        })
        .map_err(err)?;
        if raised {
            info!(netns = %label, "loopback was down; brought it up");
        }
        if v6.is_none() {
            warn!(netns = %label, "no IPv6 loopback: IPv6 connects from its actors will be refused");
        }
        Ok(Listener {
            cookie,
            front: Front::Ebpf,
            port,
            v4,
            v6,
            dns: None,
        })
    }

    /// Opens the NAT front's listener on 0.0.0.0:`port` and its DNS socket on UDP
    /// 0.0.0.0:`dns_port` inside the worker namespace `netns`: nftables `redirect` rewrites the
    /// destination to the address of the interface the packet came in on (the worker end of a
    /// veth), so loopback sockets would not see it.
    pub fn open_nat(netns: Option<&Path>, port: u16, dns_port: u16) -> Result<Self, Error> {
        let label = netns::label(netns);
        let (v4, dns, cookie) = netns::run_in(netns, move || {
            let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            let dns = socket::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, dns_port)), 0)
                .map_err(|e| io::Error::new(e.kind(), format!("DNS socket udp/{dns_port}: {e}")))?;
            let cookie = netns::cookie(&v4)?;
            Ok((v4, dns, cookie))
        })
        .map_err(|source| Error::Open {
            netns: label,
            port,
            source,
        })?;
        Ok(Listener {
            cookie,
            front: Front::Nat,
            port,
            v4,
            v6: None,
            dns: Some(dns),
        })
    }

    /// Addresses listened on (TCP).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        if self.front == Front::Nat {
            return vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.port))];
        }
        loopback_addrs(self.port, self.v6.is_some())
    }

    /// Serves the listeners from the current runtime until `shutdown` changes (or the tasks
    /// are aborted); each eBPF accept loop has its own handle on the pinned record map.
    pub fn spawn(
        self,
        bpffs_dir: &Path,
        ctx: Arc<proxy::Context>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::app::Error> {
        // Everything that can fail first: an error must not leave one loop running unowned.
        let mut ready = Vec::new();
        for std_listener in std::iter::once(self.v4).chain(self.v6) {
            let listener =
                TcpListener::from_std(std_listener).map_err(crate::app::Error::Runtime)?;
            let origin = match self.front {
                Front::Ebpf => Origin::Records(ebpf::Conns::open(bpffs_dir)?),
                Front::Nat => Origin::Nat,
            };
            ready.push((listener, origin));
        }
        let dns = match self.dns {
            Some(dns) => Some(UdpSocket::from_std(dns).map_err(crate::app::Error::Runtime)?),
            None => None,
        };
        let mut tasks = Vec::new();
        for (listener, origin) in ready {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                self.cookie,
                origin,
                ctx.clone(),
                shutdown.clone(),
            )));
        }
        if let Some(dns) = dns {
            tasks.push(tokio::spawn(dns_loop(
                dns,
                Asker::Nat { netns: self.cookie },
                ctx,
                shutdown,
            )));
        }
        Ok(tasks)
    }
}

/// A cgroup actor's own DNS socket: UDP 127.0.0.1:port and, when its namespace has IPv6,
/// [::1]:port, one port chosen by the kernel. connect4/6 and sendmsg4/6 send the actor's DNS
/// here (the port is in its actor entry), so whatever arrives is the actor's.
pub struct DnsSocket {
    port: u16,
    v4: StdUdp,
    v6: Option<StdUdp>,
}

impl DnsSocket {
    /// Opens the socket in `netns` (`None`: the agent's own), marked with `mark` so that an
    /// agent inside a captured cgroup can answer an actor of its own namespace.
    pub fn open(netns: Option<&Path>, mark: u32) -> Result<Self, Error> {
        let label = netns::label(netns);
        let (port, v4, v6) = netns::run_in(netns, move || {
            netns::ensure_loopback_up()?;
            let mut last = None;
            for _ in 0..DNS_PORT_ATTEMPTS {
                let v4 = socket::bind_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), mark)?;
                let port = v4.local_addr()?.port();
                match socket::bind_udp(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), mark) {
                    Ok(v6) => return Ok((port, v4, Some(v6))),
                    // No IPv6 in this namespace: IPv6 DNS of the actor is refused.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                        ) =>
                    {
                        return Ok((port, v4, None));
                    }
                    // Taken on ::1 by someone else: another port for both.
                    Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "no port free on both 127.0.0.1 and ::1 in {DNS_PORT_ATTEMPTS} attempts \
                     (last: {})",
                    last.map_or_else(String::new, |e| e.to_string())
                ),
            ))
        })
        .map_err(|source| Error::OpenDns {
            netns: label,
            source,
        })?;
        Ok(DnsSocket { port, v4, v6 })
    }

    /// The port, the same on both addresses.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the IPv6 socket is open.
    pub fn has_v6(&self) -> bool {
        self.v6.is_some()
    }

    /// Addresses bound.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        loopback_addrs(self.port, self.v6.is_some())
    }

    /// Serves the socket(s) for `actor` from the current runtime until `shutdown` changes or
    /// the tasks are aborted (which closes them).
    pub fn spawn(
        self,
        actor: Arc<Actor>,
        ctx: Arc<proxy::Context>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::app::Error> {
        let mut ready = Vec::new();
        for std_socket in std::iter::once(self.v4).chain(self.v6) {
            ready.push(UdpSocket::from_std(std_socket).map_err(crate::app::Error::Runtime)?);
        }
        Ok(ready
            .into_iter()
            .map(|socket| {
                tokio::spawn(dns_loop(
                    socket,
                    Asker::Actor(actor.clone()),
                    ctx.clone(),
                    shutdown.clone(),
                ))
            })
            .collect())
    }
}

/// Who asks on a DNS socket.
enum Asker {
    /// A cgroup actor's own socket: every datagram is that actor's.
    Actor(Arc<Actor>),
    /// A worker namespace's socket (cookie `netns`): the veth actor with the datagram's
    /// source address there.
    Nat {
        /// Cookie of the worker namespace.
        netns: u64,
    },
}

/// Receives queries on `socket`, answers each on a task of its own (at most
/// [`MAX_DNS_IN_FLIGHT`] at once) with [`proxy::Context::dns_query`], and sends the answer
/// back to the query's source.
async fn dns_loop(
    socket: UdpSocket,
    asker: Asker,
    ctx: Arc<proxy::Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT));
    // One byte more than allowed: a datagram that fills it was larger (recv truncates).
    let mut buf = vec![0u8; dns::MAX_UDP_QUERY + 1];
    let mut dropped: u64 = 0;
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            _ = shutdown.changed() => return,
        };
        let (n, from) = match received {
            Ok(x) => x,
            Err(e) => {
                // ECONNREFUSED left by an answer to a client that was gone, or out of memory:
                // back off a little instead of spinning on a persistent error.
                debug!(error = %e, "DNS socket receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let actor = match &asker {
            Asker::Actor(actor) => actor.clone(),
            Asker::Nat { netns } => match ctx.actor_by_addr(*netns, from.ip()) {
                Some(actor) => actor,
                None => {
                    debug!(client = %from, "DNS query from no veth actor of this worker dropped");
                    continue;
                }
            },
        };
        if n > dns::MAX_UDP_QUERY {
            debug!(actor = %actor.id, client = %from, limit = dns::MAX_UDP_QUERY,
                "DNS query larger than the limit dropped");
            ctx.metrics().dns_query(crate::metrics::DnsOutcome::Dropped);
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            dropped += 1;
            debug!(actor = %actor.id, client = %from, limit = MAX_DNS_IN_FLIGHT, dropped,
                "DNS query dropped: too many in flight on this socket");
            ctx.metrics().dns_query(crate::metrics::DnsOutcome::Dropped);
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, ctx) = (socket.clone(), ctx.clone());
        tokio::spawn(async move {
            let id = actor.id.clone();
            if let Some(answer) = ctx.dns_query(actor, query).await
                && let Err(e) = socket.send_to(&answer, from).await
            {
                debug!(actor = %id, client = %from, error = %e, "DNS answer not sent");
            }
            drop(permit);
        });
    }
}

/// The actor map entry pointing at an eBPF front's listeners on `port`: 127.0.0.1, and ::1
/// when the namespace has IPv6 (`v6`).
pub fn ebpf_entry(v6: bool, port: u16) -> ActorEntry {
    ActorEntry::new(
        Some(Ipv4Addr::LOCALHOST),
        v6.then_some(Ipv6Addr::LOCALHOST),
        port,
    )
}

fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Where an accept loop learns a connection's original destination.
enum Origin {
    /// The eBPF record map.
    Records(ebpf::Conns),
    /// conntrack, through `SO_ORIGINAL_DST`.
    Nat,
}

async fn accept_loop(
    listener: TcpListener,
    cookie: u64,
    mut origin: Origin,
    ctx: Arc<proxy::Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, client) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                ctx.metrics().error(crate::metrics::ErrorKind::Accept);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let captured = match &mut origin {
            Origin::Records(conns) => {
                proxy::Captured::Record(conns.take(&ConnKey::new(cookie, client)))
            }
            Origin::Nat => proxy::Captured::Nat {
                netns: cookie,
                original_dst: socket::original_dst(&stream),
            },
        };
        ctx.accept(stream, client, captured);
    }
}
