//! The one pipeline every captured connection goes through, whichever front captured it:
//! accept -> classify (SNI / Host / IP) -> CONNECT to the PEP with the actor's identity ->
//! relay. Any failure resets the actor's connection (fail closed) and says why in the log.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::BytesMut;
use egress_common::Record;
use tokio::{net::TcpStream, sync::Semaphore};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    actors::Registry,
    classify::{self, Authority},
    config::{Actor, Config},
    ebpf,
    socket::{self, SocketFactory},
    tunnel,
};

/// Records older than this are not trusted: no connection waits that long to be accepted.
pub const MAX_RECORD_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Largest DNS datagram taken from an actor or relayed back to it; larger ones are dropped
/// (a resolver truncates what does not fit the size its client advertised, at most this in
/// practice, and the client retries over TCP).
pub const MAX_DNS_DATAGRAM: usize = 4096;

/// How long the relay waits for the upstream resolver's answer to one query.
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How a connection ended, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Tunnelled through the PEP and relayed to the end.
    Tunneled,
    /// The PEP answered non-2xx (policy deny or its upstream failed).
    PepRefused,
    /// The PEP did not answer in time.
    PepTimeout,
    /// The PEP could not be reached (or its name resolved).
    PepUnreachable,
    /// The HTTP exchange with the PEP failed.
    PepError,
    /// No capture record for the accepted connection.
    NoRecord,
    /// A record whose cgroup is no configured actor.
    UnknownActor,
    /// Too many connections at once.
    Overloaded,
    /// A record older than any connection the agent could still be accepting.
    StaleRecord,
    /// Reading the client's first bytes failed.
    ClientError,
    /// The relay ended with an I/O error (reset passed on).
    RelayError,
}

impl Outcome {
    /// Stable name for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Tunneled => "tunneled",
            Outcome::PepRefused => "pep_refused",
            Outcome::PepTimeout => "pep_timeout",
            Outcome::PepUnreachable => "pep_unreachable",
            Outcome::PepError => "pep_error",
            Outcome::NoRecord => "no_record",
            Outcome::UnknownActor => "unknown_actor",
            Outcome::Overloaded => "overloaded",
            Outcome::StaleRecord => "stale_record",
            Outcome::ClientError => "client_error",
            Outcome::RelayError => "relay_error",
        }
    }
}

/// One captured connection: who made it and where it was going.
#[derive(Clone, Debug)]
pub struct Flow {
    /// Connection number, for logs.
    pub id: u64,
    /// The actor that made it.
    pub actor: Arc<Actor>,
    /// Where the actor connected to.
    pub original_dst: SocketAddr,
    /// The actor socket's address (as seen by the agent's listener), for logs.
    pub client: SocketAddr,
    /// pid of the connecting process (0 when unknown).
    pub pid: u32,
}

/// What a capture front knows of an accepted connection.
#[derive(Debug)]
pub enum Captured {
    /// cgroup eBPF: the record sockops published for it, if any.
    Record(Result<Option<Record>, ebpf::Error>),
    /// nftables redirect in the worker namespace with cookie `netns`: conntrack's original
    /// destination; the actor is found by the connection's source address.
    Nat {
        /// Cookie of the worker namespace the listener is in.
        netns: u64,
        /// `SO_ORIGINAL_DST` of the connection.
        original_dst: std::io::Result<SocketAddr>,
    },
}

/// What every connection needs: configuration, actors, the socket factory, the bound.
pub struct Context {
    config: Arc<Config>,
    actors: Arc<Registry>,
    sockets: SocketFactory,
    limit: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Context {
    /// A context serving the actors of `actors` (which change at run time).
    pub fn new(config: Arc<Config>, actors: Arc<Registry>) -> Self {
        Context {
            sockets: SocketFactory::new(config.socket_mark),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            actors,
            config,
            next_id: AtomicU64::new(1),
        }
    }

    /// Connection ids, in accept order.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The veth actor with address `addr` in the worker namespace with cookie `netns` (the
    /// identity of a datagram on a worker's DNS socket).
    pub fn actor_by_addr(&self, netns: u64, addr: std::net::IpAddr) -> Option<Arc<Actor>> {
        self.actors.by_addr(netns, addr)
    }

    /// Answers one DNS query of `actor`; `None` leaves it unanswered (the actor's resolver
    /// times out and retries). For now a plain bounded relay of the bytes to
    /// `--dns-upstream`, from a fresh marked socket in the agent's namespace.
    pub async fn dns_query(&self, actor: Arc<Actor>, query: Vec<u8>) -> Option<Vec<u8>> {
        let Some(upstream) = self.config.dns_upstream else {
            debug!(actor = %actor.id, "DNS query dropped: no --dns-upstream");
            return None;
        };
        match relay_dns(&self.sockets, upstream, &query).await {
            Ok(answer) => {
                debug!(actor = %actor.id, upstream = %upstream, query_bytes = query.len(),
                    answer_bytes = answer.len(), "DNS query answered");
                Some(answer)
            }
            Err(e) => {
                debug!(actor = %actor.id, upstream = %upstream, error = %e, "DNS query unanswered");
                None
            }
        }
    }

    /// Takes an accepted connection and what its front knows of it and serves it on a task
    /// of its own, or resets it at once when it cannot be served.
    pub fn accept(self: &Arc<Self>, stream: TcpStream, client: SocketAddr, captured: Captured) {
        let id = self.next_id();
        let flow = match captured {
            Captured::Record(record) => self.record_flow(id, client, record),
            Captured::Nat {
                netns,
                original_dst,
            } => self.nat_flow(id, client, netns, original_dst),
        };
        let Some(flow) = flow else {
            return socket::reset(stream);
        };
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            warn!(id, actor = %flow.actor.id, pid = flow.pid, original_dst = %flow.original_dst,
                limit = self.config.max_connections, outcome = Outcome::Overloaded.as_str(),
                "connection closed");
            return socket::reset(stream);
        };
        let ctx = self.clone();
        tokio::spawn(async move {
            ctx.serve(stream, flow).await;
            drop(permit);
        });
    }

    /// The flow of an eBPF-captured connection, or `None` (logged) when it has no usable
    /// record or no actor.
    fn record_flow(
        &self,
        id: u64,
        client: SocketAddr,
        record: Result<Option<Record>, ebpf::Error>,
    ) -> Option<Flow> {
        let record = match record {
            Ok(Some(record)) => record,
            Ok(None) => {
                // A process that connected to the listener directly, or a record lost to the
                // LRU bound: there is no identity to vouch for, so it does not go out.
                warn!(id, client = %client, outcome = Outcome::NoRecord.as_str(), "connection closed");
                return None;
            }
            Err(e) => {
                warn!(id, client = %client, error = %e, outcome = Outcome::NoRecord.as_str(), "connection closed");
                return None;
            }
        };
        let age = monotonic_ns().saturating_sub(record.connect_ns);
        if age > MAX_RECORD_AGE.as_nanos() as u64 {
            // Left by a connection nobody accepted (agent down); its key was reused by a
            // connection that published nothing, e.g. one from outside the actor's cgroup.
            warn!(id, client = %client, age_ms = age / 1_000_000, original_dst = %record.destination(),
                outcome = Outcome::StaleRecord.as_str(), "connection closed");
            return None;
        }
        let Some(actor) = self.actors.by_cgroup(record.actor_cgroup) else {
            warn!(id, client = %client, cgroup_id = record.actor_cgroup, pid = record.pid,
                original_dst = %record.destination(), outcome = Outcome::UnknownActor.as_str(),
                "connection closed");
            return None;
        };
        Some(Flow {
            id,
            actor,
            original_dst: record.destination(),
            client,
            pid: record.pid,
        })
    }

    /// The flow of a connection nftables redirected, or `None` (logged) when it was not
    /// redirected or its source is no veth actor of that worker namespace.
    fn nat_flow(
        &self,
        id: u64,
        client: SocketAddr,
        netns: u64,
        original_dst: std::io::Result<SocketAddr>,
    ) -> Option<Flow> {
        let original_dst = match original_dst {
            Ok(dst) => dst,
            Err(e) => {
                // Made to the listener directly, not redirected: no destination to vouch for.
                warn!(id, client = %client, error = %e, outcome = Outcome::NoRecord.as_str(), "connection closed");
                return None;
            }
        };
        let Some(actor) = self.actors.by_addr(netns, client.ip()) else {
            warn!(id, client = %client, original_dst = %original_dst,
                outcome = Outcome::UnknownActor.as_str(), "connection closed");
            return None;
        };
        Some(Flow {
            id,
            actor,
            original_dst,
            client,
            pid: 0,
        })
    }

    /// Serves one connection to the end: classify, tunnel, relay, log.
    pub async fn serve(&self, stream: TcpStream, flow: Flow) -> Outcome {
        let span = info_span!("conn", id = flow.id, actor = %flow.actor.id, original_dst = %flow.original_dst);
        async move {
            let start = Instant::now();
            let closed = self.pipeline(stream, &flow).await;
            closed.log(&flow, start);
            closed.outcome
        }
        .instrument(span)
        .await
    }

    /// classify -> CONNECT -> relay. Both sockets are armed to reset from the start and
    /// disarmed only when the relay ends cleanly, so every early return (and any drop of the
    /// task) resets them.
    async fn pipeline(&self, mut stream: TcpStream, flow: &Flow) -> Closed {
        socket::arm_reset(&stream);
        let _ = stream.set_nodelay(true);
        let mut peeked = BytesMut::with_capacity(1024);
        let authority = match classify::classify(
            &mut stream,
            &mut peeked,
            flow.original_dst,
            &self.config.peek,
        )
        .await
        {
            Ok(authority) => authority,
            Err(e) => return Closed::failed(Outcome::ClientError, None, None, &e),
        };
        let request = match tunnel::connect_request(&flow.actor, flow.original_dst, &authority) {
            Ok(r) => r,
            Err(e) => return Closed::failed(Outcome::PepError, Some(authority), None, &e),
        };
        let tunnel = match tunnel::open(
            &self.config.pep,
            &self.sockets,
            self.config.pep_timeout,
            request,
        )
        .await
        {
            Ok(t) => t,
            Err(e) => {
                let outcome = match &e {
                    tunnel::Error::Refused(_) => Outcome::PepRefused,
                    tunnel::Error::Timeout(_) => Outcome::PepTimeout,
                    tunnel::Error::Unreachable { .. } | tunnel::Error::Resolve { .. } => {
                        Outcome::PepUnreachable
                    }
                    tunnel::Error::Http(_)
                    | tunnel::Error::Header(_)
                    | tunnel::Error::Request { .. } => Outcome::PepError,
                };
                let status = e.status().map(|s| s.as_u16());
                return Closed::failed(outcome, Some(authority), status, &e);
            }
        };
        let mut pep = tunnel.stream;
        socket::arm_reset(&pep);
        let (bytes_up, bytes_down, result) = tunnel::relay(
            &mut stream,
            &mut pep,
            &peeked,
            &tunnel.leftover,
            self.config.relay_buffer,
        )
        .await;
        if result.is_ok() {
            socket::disarm_reset(&stream);
            socket::disarm_reset(&pep);
        }
        // On a relay error the sockets stay armed: one side failed mid-stream, and the other
        // must see a reset, not a clean end it could mistake for complete data.
        Closed {
            outcome: if result.is_ok() {
                Outcome::Tunneled
            } else {
                Outcome::RelayError
            },
            authority: Some(authority),
            pep_status: Some(tunnel.status.as_u16()),
            bytes_up,
            bytes_down,
            error: result.err().map(|e| e.to_string()),
        }
    }
}

/// Relays one query's bytes to `upstream` and returns its answer: one fresh socket per query
/// (a random source port each), connected so only `upstream` can answer, bounded by
/// [`DNS_TIMEOUT`] and [`MAX_DNS_DATAGRAM`].
async fn relay_dns(
    sockets: &SocketFactory,
    upstream: SocketAddr,
    query: &[u8],
) -> std::io::Result<Vec<u8>> {
    let socket = sockets.udp_connect(upstream)?;
    socket.send(query).await?;
    // One byte more than allowed: a datagram that fills it was larger (recv truncates).
    let mut buf = vec![0u8; MAX_DNS_DATAGRAM + 1];
    let n = tokio::time::timeout(DNS_TIMEOUT, socket.recv(&mut buf))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {DNS_TIMEOUT:?}"),
            )
        })??;
    if n > MAX_DNS_DATAGRAM {
        return Err(std::io::Error::other(format!(
            "answer larger than {MAX_DNS_DATAGRAM} bytes"
        )));
    }
    buf.truncate(n);
    Ok(buf)
}

/// How one connection ended: what its log line says.
struct Closed {
    outcome: Outcome,
    authority: Option<Authority>,
    pep_status: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    error: Option<String>,
}

impl Closed {
    /// A connection that ended before any byte was relayed.
    fn failed(
        outcome: Outcome,
        authority: Option<Authority>,
        pep_status: Option<u16>,
        error: &dyn std::fmt::Display,
    ) -> Self {
        Closed {
            outcome,
            authority,
            pep_status,
            bytes_up: 0,
            bytes_down: 0,
            error: Some(error.to_string()),
        }
    }

    /// The connection's one log line: `info` when tunnelled, `warn` with the error otherwise.
    fn log(&self, flow: &Flow, start: Instant) {
        let authority = self
            .authority
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let source = self.authority.as_ref().map_or("", |a| a.source.as_str());
        let duration_ms = start.elapsed().as_millis() as u64;
        let pep_status = self.pep_status.unwrap_or(0);
        macro_rules! closed {
            ($level:ident $(, $($extra:tt)+)?) => {
                $level!(
                    id = flow.id,
                    actor = %flow.actor.id,
                    pid = flow.pid,
                    client = %flow.client,
                    original_dst = %flow.original_dst,
                    authority = %authority,
                    source,
                    pep_status,
                    bytes_up = self.bytes_up,
                    bytes_down = self.bytes_down,
                    duration_ms,
                    outcome = self.outcome.as_str(),
                    $($($extra)+)?
                    "connection closed"
                )
            };
        }
        match &self.error {
            None => closed!(info),
            Some(error) => closed!(warn, error = %error,),
        }
    }
}
