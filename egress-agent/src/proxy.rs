//! The one pipeline every captured connection goes through, whichever front captured it:
//! accept -> classify (SNI / Host / the actor's DNS answer / IP) -> decide ([`route`]: the
//! policy, always-denied addresses) -> CONNECT to the PEP with the actor's identity, or a
//! direct dial when no PEP decides -> relay. The actors' DNS (TCP here, UDP from the capture
//! fronts' DNS sockets) goes to the [`dns`] forwarder instead. A refusal (the policy, the
//! always-denied addresses, the PEP's 4xx answer) is answered in the actor's protocol
//! ([`refuse`]: 403, TLS alert or a clean close); any other failure resets the actor's
//! connection (fail closed). Either way the log says why.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use egress_common::Record;
use tokio::{net::TcpStream, sync::Semaphore};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    access_log::{self, AccessLog},
    actors::Registry,
    admin::Health,
    classify::{self, Authority, Host, Source},
    config::{Actor, Capture, Config},
    direct, dns, ebpf,
    metrics::{self, Classification, ConnectionEnd, Decision, Metrics, RouteKind},
    netns,
    policy::{self, RuleKind, TemplatePolicy},
    refuse, relay, resolve,
    route::{self, Route},
    socket::{self, SocketFactory},
    tunnel,
};

/// Bound on each connect attempt of a direct dial (no PEP).
pub const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one lookup of the agent's resolver (a direct dial of a name).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the node's own addresses (always denied as destinations) are read again.
pub const NODE_ADDRESSES_REFRESH: Duration = Duration::from_secs(10);

/// Records older than this are not trusted: no connection waits that long to be accepted.
pub const MAX_RECORD_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How a connection ended, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Tunnelled through the PEP and relayed to the end.
    Tunneled,
    /// Dialled by the agent itself (no PEP decides for this actor) and relayed to the end.
    Direct,
    /// Denied by the policy or the always-denied addresses: answered as a refusal
    /// ([`refuse`]).
    Denied,
    /// A direct dial's name did not resolve (or resolved only to denied addresses).
    ResolveFailed,
    /// A direct dial could not connect (refused, unreachable, timed out).
    UpstreamUnreachable,
    /// DNS over TCP, answered by the agent's forwarder.
    Dns,
    /// The PEP answered non-2xx: a 4xx (its decision) answered as a refusal, a 5xx reset
    /// ([`refuse`]).
    PepRefused,
    /// The PEP did not answer in time.
    PepTimeout,
    /// The PEP could not be reached (or its name resolved).
    PepUnreachable,
    /// TLS with the PEP failed (its certificate, its name, or it refused the agent's).
    PepTls,
    /// The HTTP exchange with the PEP failed.
    PepError,
    /// The actor had no valid client certificate for its PEP (none yet, expired, not yet
    /// valid): nothing was sent, the connection reset.
    NoCertificate,
    /// No capture record for the accepted connection.
    NoRecord,
    /// A record whose cgroup is no configured actor.
    UnknownActor,
    /// Too many connections at once (served, or waiting for a PEP connect slot).
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
            Outcome::Direct => "direct",
            Outcome::Denied => "denied",
            Outcome::ResolveFailed => "resolve_failed",
            Outcome::UpstreamUnreachable => "upstream_unreachable",
            Outcome::Dns => "dns",
            Outcome::PepRefused => "pep_refused",
            Outcome::PepTimeout => "pep_timeout",
            Outcome::PepUnreachable => "pep_unreachable",
            Outcome::PepTls => "pep_tls",
            Outcome::PepError => "pep_error",
            Outcome::NoCertificate => "no_certificate",
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

/// An actor's own always-denied addresses, with the registration they were read for.
type ActorAddresses = (Arc<Actor>, Arc<[IpAddr]>);

/// What every connection needs: configuration, actors, the policy, a connector per configured
/// PEP (by name), the resolver and DNS forwarder, the bound.
pub struct Context {
    config: Arc<Config>,
    actors: Arc<Registry>,
    policy: Arc<policy::Shared>,
    connectors: HashMap<String, tunnel::Connector>,
    sockets: SocketFactory,
    resolver: Option<resolve::Resolver>,
    dns: Option<dns::Forwarder>,
    /// The node's own addresses (the agent's namespace), refreshed by [`Context::spawn_refresh`];
    /// shared with the DNS forwarder's answer filter.
    node_addresses: Arc<Mutex<Arc<[IpAddr]>>>,
    /// Per actor: its gateways and, for a veth actor, its worker namespace's addresses.
    actor_addresses: Mutex<HashMap<String, ActorAddresses>>,
    limit: Arc<Semaphore>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    access_log: Option<AccessLog>,
}

impl Context {
    /// A context serving the actors of `actors` (which change at run time) with `policy`;
    /// fails when a PEP's per-actor certificate source is unusable.
    pub fn new(
        config: Arc<Config>,
        actors: Arc<Registry>,
        policy: Arc<policy::Shared>,
    ) -> Result<Self, crate::certs::Error> {
        let sockets = SocketFactory::new(config.socket_mark);
        let resolver = match resolve::Resolver::new(
            config.dns_upstream,
            config.socket_mark,
            RESOLVE_TIMEOUT,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "no resolver: direct dials of names (no PEP) will be refused");
                None
            }
        };
        let node_addresses: Arc<Mutex<Arc<[IpAddr]>>> = Arc::new(Mutex::new(
            policy::node_addresses().unwrap_or_default().into(),
        ));
        let dns = config.dns_upstream.map(|upstream| {
            let node = node_addresses.clone();
            dns::Forwarder::new(upstream, sockets.clone(), dns::Limits::default())
                .with_address_filter(move |ip| {
                    let node = node
                        .lock()
                        .map(|n| n.clone())
                        .unwrap_or_else(|_| Arc::from(Vec::new()));
                    policy::always_denied(ip, &node).map(|r| r.to_string())
                })
        });
        Ok(Context {
            connectors: config
                .pep
                .iter()
                .chain(config.peps.values())
                .map(|pep| {
                    tunnel::Connector::new(pep.clone(), sockets.clone())
                        .map(|c| (pep.name.clone(), c))
                })
                .collect::<Result<_, _>>()?,
            limit: Arc::new(Semaphore::new(config.max_connections)),
            node_addresses,
            actor_addresses: Mutex::new(HashMap::new()),
            sockets,
            resolver,
            dns,
            policy,
            actors,
            config,
            next_id: AtomicU64::new(1),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            access_log: None,
        })
    }

    /// The same context counting into `metrics` (its own, unserved ones otherwise).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.dns = self.dns.map(|d| d.with_metrics(metrics.clone()));
        self.metrics = metrics;
        self
    }

    /// The same context reporting readiness to `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// The same context writing one access log line per connection to `log`.
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }

    /// The metrics connections are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The readiness the actors' listeners are reported to.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Counts (and access-logs) a connection reset before it was served: no actor, or
    /// (`actor` given) too many connections.
    fn rejected(
        &self,
        id: u64,
        client: SocketAddr,
        actor: Option<&Flow>,
        original_dst: Option<SocketAddr>,
        outcome: Outcome,
        error: &str,
    ) {
        match actor {
            Some(flow) => self.metrics.connection_closed(
                &ConnectionEnd {
                    actor: &flow.actor.id,
                    outcome,
                    classification: Classification::None,
                    bytes_up: 0,
                    bytes_down: 0,
                    pep_status: None,
                    setup: None,
                    error: true,
                },
                &|| self.actors.contains(&flow.actor.id, &flow.actor),
            ),
            None => self.metrics.connection_rejected(outcome),
        }
        if let Some(log) = &self.access_log {
            let time = access_log::now_rfc3339();
            log.write(&access_log::Entry {
                time: &time,
                id,
                actor: actor.map_or("", |f| &f.actor.id),
                template: actor.map_or("", |f| &f.actor.template),
                namespace: actor.map_or("", |f| &f.actor.template_namespace),
                pid: actor.map_or(0, |f| f.pid),
                client: client.to_string(),
                original_dst: original_dst.map(|d| d.to_string()).unwrap_or_default(),
                authority: "",
                classification: Classification::None.as_str(),
                route: "",
                pep: actor.map_or("", |f| f.actor.pep.pep.as_deref().unwrap_or("")),
                refusal: "",
                pep_status: 0,
                outcome: outcome.as_str(),
                rule: "",
                dialled: "",
                relay: "",
                bytes_up: 0,
                bytes_down: 0,
                duration_ms: 0,
                setup_us: 0,
                error: Some(error),
            });
        }
    }

    /// Counts the end of a served connection and writes its access log line.
    fn record(&self, closed: &Closed, flow: &Flow, start: Instant) {
        if let Some((reason, response)) = closed.refusal {
            self.metrics.refusal(reason, response);
        }
        let classification = Classification::from(closed.authority.as_ref().map(|a| a.source));
        let setup = closed
            .relay_started
            .map(|t| t.saturating_duration_since(start));
        let route_kind = match closed.route {
            "direct" => RouteKind::Direct,
            _ => RouteKind::Pep,
        };
        self.metrics.connection_closed(
            &ConnectionEnd {
                actor: &flow.actor.id,
                outcome: closed.outcome,
                classification,
                bytes_up: closed.bytes_up,
                bytes_down: closed.bytes_down,
                pep_status: closed.pep_status,
                setup: setup.map(|s| (route_kind, s)),
                error: closed.error.is_some() && closed.outcome != Outcome::Denied,
            },
            &|| self.actors.contains(&flow.actor.id, &flow.actor),
        );
        if let Some(log) = &self.access_log {
            let time = access_log::now_rfc3339();
            let authority = closed
                .authority
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let dialled = closed.dialled.map(|d| d.to_string()).unwrap_or_default();
            log.write(&access_log::Entry {
                time: &time,
                id: flow.id,
                actor: &flow.actor.id,
                template: &flow.actor.template,
                namespace: &flow.actor.template_namespace,
                pid: flow.pid,
                client: flow.client.to_string(),
                original_dst: flow.original_dst.to_string(),
                authority: &authority,
                classification: classification.as_str(),
                route: closed.route,
                pep: flow.actor.pep.pep.as_deref().unwrap_or(""),
                refusal: closed.refusal.map_or("", |(_, response)| response.as_str()),
                pep_status: closed.pep_status.unwrap_or(0),
                outcome: closed.outcome.as_str(),
                rule: &closed.rule,
                dialled: &dialled,
                relay: closed.relay,
                bytes_up: closed.bytes_up,
                bytes_down: closed.bytes_down,
                duration_ms: start.elapsed().as_millis() as u64,
                setup_us: setup.map_or(0, |s| s.as_micros() as u64),
                error: closed.error.as_deref(),
            });
        }
    }

    /// Re-reads the node's own addresses every [`NODE_ADDRESSES_REFRESH`], for as long as
    /// the runtime runs.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let ctx = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(NODE_ADDRESSES_REFRESH).await;
                let Some(ctx) = ctx.upgrade() else { return };
                match tokio::task::spawn_blocking(policy::node_addresses).await {
                    Ok(Ok(addrs)) => {
                        if let Ok(mut node) = ctx.node_addresses.lock() {
                            *node = addrs.into();
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "reading the node's addresses"),
                    Err(_) => {}
                }
                // Actors removed since: their entries go.
                if let Ok(mut cache) = ctx.actor_addresses.lock() {
                    cache.retain(|id, (actor, _)| ctx.actors.contains(id, actor));
                }
            }
        });
    }

    /// The policy in force (and its file).
    pub fn policy(&self) -> &policy::Shared {
        &self.policy
    }

    /// An actor was registered: its PEP starts keeping its certificate current (if it takes
    /// per-actor certificates).
    pub fn actor_added(&self, actor: &Actor) {
        if let Some(connector) = self.connector(actor) {
            connector.actor_added(actor);
        }
    }

    /// Every PEP's per-actor certificates, as `(pep name, statuses)`, for `status` and metrics.
    pub fn actor_certs(&self) -> Vec<(String, Vec<crate::certs::CertStatus>)> {
        let mut all: Vec<_> = self
            .connectors
            .iter()
            .filter_map(|(name, c)| c.certs().map(|store| (name.clone(), store.status())))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Every HTTP/2 PEP's pool figures, as `(pep name, stats)`.
    pub fn pools(&self) -> Vec<(String, tunnel::h2::Stats)> {
        let mut all: Vec<_> = self
            .connectors
            .iter()
            .filter_map(|(name, c)| c.pool().map(|p| (name.clone(), p.stats())))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The connector of the PEP that serves `actor`, if it has one.
    fn connector(&self, actor: &Actor) -> Option<&tunnel::Connector> {
        actor
            .pep
            .pep
            .as_deref()
            .and_then(|name| self.connectors.get(name))
    }

    /// Drops what the agent learned about actor `id` (its DNS answers, its addresses): it was
    /// removed.
    pub fn forget_actor(&self, id: &str) {
        for connector in self.connectors.values() {
            connector.actor_removed(id);
        }
        if let Some(dns) = &self.dns {
            dns.answers().forget_actor(id);
        }
        // Its series go with it (bounded cardinality); the manager counted it out.
        if let Ok(mut cache) = self.actor_addresses.lock() {
            cache.remove(id);
        }
    }

    /// The addresses always denied as `actor`'s destinations besides the fixed ones: the
    /// node's own addresses, the actor's gateways and (veth actors) its worker's addresses.
    async fn denied_addresses(&self, actor: &Arc<Actor>) -> Vec<IpAddr> {
        let node = self
            .node_addresses
            .lock()
            .map(|n| n.clone())
            .unwrap_or_else(|_| Arc::from(Vec::new()));
        let cached = self.actor_addresses.lock().ok().and_then(|cache| {
            cache
                .get(&actor.id)
                .filter(|(a, _)| Arc::ptr_eq(a, actor))
                .map(|(_, addrs)| addrs.clone())
        });
        let own = match cached {
            Some(addrs) => addrs,
            None => {
                let actor2 = actor.clone();
                let (addrs, complete) =
                    tokio::task::spawn_blocking(move || actor_addresses(&actor2))
                        .await
                        .unwrap_or_default();
                let addrs: Arc<[IpAddr]> = addrs.into();
                // What could not be read is read again on the next connection, not forgotten.
                if complete && let Ok(mut cache) = self.actor_addresses.lock() {
                    cache.insert(actor.id.clone(), (actor.clone(), addrs.clone()));
                }
                addrs
            }
        };
        node.iter().chain(own.iter()).copied().collect()
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

    /// Answers one DNS query of `actor` with the forwarder; `None` leaves it unanswered (no
    /// `--dns-upstream`, or a datagram that is no query).
    pub async fn dns_query(&self, actor: Arc<Actor>, query: Vec<u8>) -> Option<Vec<u8>> {
        let Some(forwarder) = &self.dns else {
            debug!(actor = %actor.id, "DNS query dropped: no --dns-upstream");
            self.metrics.dns_query(metrics::DnsOutcome::Dropped);
            return None;
        };
        let policy = self.policy.current();
        let template = policy.template(&actor.template_namespace, &actor.template);
        let verdict = dns_verdict(template, actor.pep.pep.is_some());
        forwarder.answer(&actor.id, &query, &verdict).await
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
            self.rejected(
                id,
                client,
                Some(&flow),
                Some(flow.original_dst),
                Outcome::Overloaded,
                "too many connections (--max-connections)",
            );
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
                self.rejected(
                    id,
                    client,
                    None,
                    None,
                    Outcome::NoRecord,
                    "no capture record",
                );
                return None;
            }
            Err(e) => {
                warn!(id, client = %client, error = %e, outcome = Outcome::NoRecord.as_str(), "connection closed");
                self.rejected(id, client, None, None, Outcome::NoRecord, &e.to_string());
                return None;
            }
        };
        let age = monotonic_ns().saturating_sub(record.connect_ns);
        if age > MAX_RECORD_AGE.as_nanos() as u64 {
            // Left by a connection nobody accepted (agent down); its key was reused by a
            // connection that published nothing, e.g. one from outside the actor's cgroup.
            warn!(id, client = %client, age_ms = age / 1_000_000, original_dst = %record.destination(),
                outcome = Outcome::StaleRecord.as_str(), "connection closed");
            self.rejected(
                id,
                client,
                None,
                Some(record.destination()),
                Outcome::StaleRecord,
                "stale capture record",
            );
            return None;
        }
        let Some(actor) = self.actors.by_cgroup(record.actor_cgroup) else {
            warn!(id, client = %client, cgroup_id = record.actor_cgroup, pid = record.pid,
                original_dst = %record.destination(), outcome = Outcome::UnknownActor.as_str(),
                "connection closed");
            self.rejected(
                id,
                client,
                None,
                Some(record.destination()),
                Outcome::UnknownActor,
                "the record's cgroup is no registered actor",
            );
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
                self.rejected(id, client, None, None, Outcome::NoRecord, &e.to_string());
                return None;
            }
        };
        let Some(actor) = self.actors.by_addr(netns, client.ip()) else {
            warn!(id, client = %client, original_dst = %original_dst,
                outcome = Outcome::UnknownActor.as_str(), "connection closed");
            self.rejected(
                id,
                client,
                None,
                Some(original_dst),
                Outcome::UnknownActor,
                "the source address is no veth actor of this worker",
            );
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
            // Counted before the log line: whoever sees the line finds it counted.
            self.record(&closed, &flow, start);
            closed.log(&flow, start);
            closed.outcome
        }
        .instrument(span)
        .await
    }

    /// classify -> decide -> CONNECT or dial -> relay. Both sockets are armed to reset from
    /// the start and disarmed only when the relay ends cleanly or a refusal was answered, so
    /// every other early return (and any drop of the task) resets them.
    async fn pipeline(&self, mut stream: TcpStream, flow: &Flow) -> Closed {
        socket::arm_reset(&stream);
        let _ = stream.set_nodelay(true);
        if flow.original_dst.port() == 53 {
            return Box::pin(self.serve_dns_tcp(stream, flow)).await;
        }
        // The futures of the steps before the relay are boxed: they are freed when their step
        // ends, instead of sizing the task (which lives as long as the tunnel) for the largest
        // of them.
        let mut peeked = BytesMut::with_capacity(1024);
        let mut authority = match Box::pin(classify::classify(
            &mut stream,
            &mut peeked,
            flow.original_dst,
            &self.config.peek,
        ))
        .await
        {
            Ok(authority) => authority,
            Err(e) => return Closed::failed(Outcome::ClientError, None, None, &e),
        };
        if authority.source == Source::Ip
            && let Some(name) = self
                .dns
                .as_ref()
                .and_then(|d| d.answers().lookup(&flow.actor.id, flow.original_dst.ip()))
        {
            authority = Authority {
                host: Host::Name(name.to_string()),
                port: authority.port,
                source: Source::Dns,
            };
        }
        let denied = Box::pin(self.denied_addresses(&flow.actor)).await;
        let policy = self.policy.current();
        let template = policy.template(&flow.actor.template_namespace, &flow.actor.template);
        let route = route::route(
            template,
            flow.actor.pep.pep.is_some(),
            &authority,
            flow.original_dst,
            &denied,
        );
        self.metrics.policy_decision(match route {
            Route::Deny { .. } => Decision::Deny,
            Route::Pep { .. } => Decision::Pep,
            Route::Direct { .. } => Decision::Allow,
        });
        match route {
            Route::Deny { rule } => {
                // Not needed past the decision: not kept while the refusal is answered.
                drop(denied);
                drop(policy);
                let mut closed =
                    Closed::failed(Outcome::Denied, Some(authority), None, &"denied by policy");
                let refused = Box::pin(refuse::refuse(stream, &peeked)).await;
                closed.refused(refuse::Reason::of_rule(&rule), refused);
                closed.rule = rule;
                closed.route = "deny";
                closed
            }
            Route::Pep { rule } => {
                // Not needed past the decision: not kept for the tunnel's life.
                drop(denied);
                drop(policy);
                let mut closed = self.tunnel(stream, flow, authority, peeked.freeze()).await;
                closed.rule = rule.unwrap_or_default();
                closed.route = "pep";
                closed
            }
            Route::Direct { rule, dial } => {
                let dialled = Box::pin(self.dial(template, &dial, &authority, &denied)).await;
                // Not needed past the dial: neither the address list nor this policy version
                // is kept for the tunnel's life (a reload frees the old one).
                drop(denied);
                drop(policy);
                let mut closed = match dialled {
                    Ok((upstream, dialled)) => {
                        let mut closed = self
                            .relay(
                                stream,
                                upstream,
                                |u: &TcpStream| Some(u),
                                peeked.freeze(),
                                Bytes::new(),
                                Outcome::Direct,
                            )
                            .await;
                        closed.dialled = Some(dialled);
                        closed
                    }
                    Err(mut closed) => {
                        // Resolved only to denied addresses: refused like any denial.
                        if closed.outcome == Outcome::Denied {
                            let reason =
                                refuse::Reason::of_rule(closed.error.as_deref().unwrap_or(""));
                            let refused = Box::pin(refuse::refuse(stream, &peeked)).await;
                            closed.refused(reason, refused);
                        }
                        closed
                    }
                };
                closed.authority = Some(authority);
                closed.rule = rule;
                closed.route = "direct";
                closed
            }
        }
    }

    /// DNS over TCP (a connect to port 53): the forwarder answers it, nothing is tunnelled.
    async fn serve_dns_tcp(&self, mut stream: TcpStream, flow: &Flow) -> Closed {
        let Some(forwarder) = &self.dns else {
            return Closed::failed(
                Outcome::Dns,
                None,
                None,
                &"no --dns-upstream: DNS over TCP refused",
            );
        };
        let policy = self.policy.current();
        let template = policy.template(&flow.actor.template_namespace, &flow.actor.template);
        let verdict = dns_verdict(template, flow.actor.pep.pep.is_some());
        match forwarder
            .serve_tcp(&mut stream, &flow.actor.id, &verdict)
            .await
        {
            Ok(stats) => {
                socket::disarm_reset(&stream);
                let mut closed = Closed::failed(Outcome::Dns, None, None, &"");
                closed.error = None;
                closed.rule = format!("{} queries", stats.queries);
                closed
            }
            Err(e) => Closed::failed(Outcome::Dns, None, None, &e),
        }
    }

    /// The agent dials upstream itself: the name as its resolver answers it (or the address),
    /// every address checked against the always-denied and deny rules. A failure is the
    /// connection's end, as logged.
    async fn dial(
        &self,
        template: &TemplatePolicy,
        dial: &direct::Dial,
        authority: &Authority,
        denied: &[IpAddr],
    ) -> Result<(TcpStream, SocketAddr), Closed> {
        let Some(resolver) = &self.resolver else {
            return Err(Closed::failed(
                Outcome::ResolveFailed,
                Some(authority.clone()),
                None,
                &"the agent has no resolver: pass --dns-upstream",
            ));
        };
        // Each address the name resolves to: always-denied (unless an exact rule names it)
        // and the template's deny rules apply; allow rules are the name's business.
        let check = |ip: IpAddr, port: u16| {
            let d = template.decide_ip_with(ip, port, denied);
            (!d.allowed && matches!(d.rule.kind(), RuleKind::Deny | RuleKind::AlwaysDenied))
                .then(|| d.rule.to_string())
        };
        direct::connect(dial, resolver, &self.sockets, DIRECT_CONNECT_TIMEOUT, check)
            .await
            .map_err(|e| {
                let outcome = match &e {
                    direct::Error::Denied { .. } => Outcome::Denied,
                    direct::Error::Resolve(_) => Outcome::ResolveFailed,
                    direct::Error::Unreachable { .. } | direct::Error::Timeout { .. } => {
                        Outcome::UpstreamUnreachable
                    }
                };
                Closed::failed(outcome, Some(authority.clone()), None, &e)
            })
    }

    /// CONNECT through the PEP and relay.
    async fn tunnel(
        &self,
        stream: TcpStream,
        flow: &Flow,
        authority: Authority,
        peeked: Bytes,
    ) -> Closed {
        let Some(connector) = self.connector(&flow.actor) else {
            return Closed::failed(
                Outcome::PepError,
                Some(authority),
                None,
                &"no PEP configured",
            );
        };
        let request = match tunnel::connect_request(
            connector.pep(),
            &flow.actor,
            flow.original_dst,
            &authority,
        ) {
            Ok(r) => r,
            Err(e) => return Closed::failed(Outcome::PepError, Some(authority), None, &e),
        };
        let tunnel = match Box::pin(connector.open(request, &flow.actor.id)).await {
            Ok(t) => t,
            Err(e) => {
                let outcome = match &e {
                    tunnel::Error::Refused(_) => Outcome::PepRefused,
                    tunnel::Error::Timeout(_) | tunnel::Error::ConnectTimeout(_) => {
                        Outcome::PepTimeout
                    }
                    tunnel::Error::Unreachable { .. } | tunnel::Error::Resolve { .. } => {
                        Outcome::PepUnreachable
                    }
                    tunnel::Error::Tls { .. } => Outcome::PepTls,
                    tunnel::Error::Overloaded { .. } | tunnel::Error::SlotTimeout(_) => {
                        Outcome::Overloaded
                    }
                    tunnel::Error::Certificate(_) => Outcome::NoCertificate,
                    tunnel::Error::Http(_)
                    | tunnel::Error::Header(_)
                    | tunnel::Error::Request { .. } => Outcome::PepError,
                };
                let status = e.status().map(|s| s.as_u16());
                let mut closed = Closed::failed(outcome, Some(authority), status, &e);
                // The PEP said no (a 4xx: its decision): answered as a refusal. A 5xx is its
                // own or its upstream's failure, not a decision: it stays a reset, like every
                // other error.
                if let tunnel::Error::Refused(status) = e
                    && status.is_client_error()
                {
                    let refused = Box::pin(refuse::refuse(stream, &peeked)).await;
                    closed.refused(refuse::Reason::Pep, refused);
                }
                return closed;
            }
        };
        let mut closed = self
            .relay(
                stream,
                tunnel.stream,
                tunnel::TunnelIo::tcp,
                peeked,
                tunnel.leftover,
                Outcome::Tunneled,
            )
            .await;
        closed.authority = Some(authority);
        closed.pep_status = Some(tunnel.status.as_u16());
        closed
    }

    /// Relays between the actor and `upstream` (whose TCP socket `tcp` gives) until both are
    /// done: `done` when it ends cleanly, `relay_error` otherwise. Both sockets are armed to
    /// reset and disarmed only on a clean end: on a relay error one side failed mid-stream,
    /// and the other must see a reset, not a clean end it could mistake for complete data.
    /// `peeked` and `leftover` are owned so that their memory goes once they are written.
    async fn relay<U: relay::Peer>(
        &self,
        mut stream: TcpStream,
        mut upstream: U,
        tcp: impl Fn(&U) -> Option<&TcpStream>,
        peeked: Bytes,
        leftover: Bytes,
        done: Outcome,
    ) -> Closed {
        if let Some(tcp) = tcp(&upstream) {
            socket::arm_reset(tcp);
        }
        let relay_started = Some(Instant::now());
        let settings = relay::Settings {
            mode: self.config.relay,
            max_buffer: self.config.relay_buffer,
        };
        let relay::Relayed {
            bytes_up,
            bytes_down,
            engine,
            result,
        } = relay::relay(&mut stream, &mut upstream, peeked, leftover, settings).await;
        if result.is_ok() {
            socket::disarm_reset(&stream);
            if let Some(tcp) = tcp(&upstream) {
                socket::disarm_reset(tcp);
            }
        }
        Closed {
            outcome: if result.is_ok() {
                done
            } else {
                Outcome::RelayError
            },
            authority: None,
            pep_status: None,
            bytes_up,
            bytes_down,
            error: result.err().map(|e| e.to_string()),
            rule: String::new(),
            dialled: None,
            relay: engine.as_str(),
            route: "",
            relay_started,
            refusal: None,
        }
    }
}

/// The DNS verdict for a template: its `decide_dns` when the agent decides (or pre-filters),
/// only the always-denied names when the PEP decides alone.
fn dns_verdict(
    template: &TemplatePolicy,
    has_pep: bool,
) -> impl Fn(&str) -> dns::NameVerdict + Sync + '_ {
    let pep_decides = has_pep && template.pep && !template.prefilter;
    move |name: &str| {
        if pep_decides {
            return match policy::always_denied_name(name) {
                Some(reason) => dns::NameVerdict::Deny {
                    reason: format!("always denied: {reason} {name}"),
                },
                None => dns::NameVerdict::Allow,
            };
        }
        let decision = template.decide_dns(name);
        if decision.allowed {
            dns::NameVerdict::Allow
        } else {
            dns::NameVerdict::Deny {
                reason: decision.rule.to_string(),
            }
        }
    }
}

/// An actor's own always-denied addresses: the default gateways of its namespace and, for a
/// veth actor, every address of its worker namespace (the worker is its "node"); and whether
/// all of them could be read. Blocking: enters namespaces.
fn actor_addresses(actor: &Actor) -> (Vec<IpAddr>, bool) {
    let mut addrs = Vec::new();
    let mut complete = true;
    let mut add = |found: std::io::Result<Vec<IpAddr>>, what: &str| match found {
        Ok(found) => addrs.extend(found),
        Err(e) => {
            complete = false;
            warn!(actor = %actor.id, error = %e, "reading the actor's {what}: retried on its next connection");
        }
    };
    match &actor.capture {
        Capture::Cgroup { netns, .. } => {
            add(policy::default_gateways(netns.as_deref()), "gateways");
        }
        Capture::Veth(v) => {
            add(policy::default_gateways(Some(&v.netns)), "gateways");
            add(
                netns::run_in(v.worker_netns.as_deref(), policy::node_addresses),
                "worker's addresses",
            );
        }
    }
    (addrs, complete)
}

/// How one connection ended: what its log line says.
struct Closed {
    outcome: Outcome,
    authority: Option<Authority>,
    pep_status: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    error: Option<String>,
    /// The policy rule that decided ("" when the PEP decided alone).
    rule: String,
    /// The address a direct dial connected to.
    dialled: Option<SocketAddr>,
    /// The relay engines that moved the bytes ("" when nothing was relayed).
    relay: &'static str,
    /// pep, direct or deny ("" when it ended before the decision).
    route: &'static str,
    /// When the relay started (`None`: it never did).
    relay_started: Option<Instant>,
    /// Who refused the flow and how the actor was answered, if it was refused.
    refusal: Option<(refuse::Reason, refuse::Response)>,
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
            rule: String::new(),
            dialled: None,
            relay: "",
            route: "",
            relay_started: None,
            refusal: None,
        }
    }

    /// Records the refusal answered to the actor; an answer that could not be delivered (the
    /// connection was reset instead) is added to the error.
    fn refused(&mut self, reason: refuse::Reason, refused: refuse::Refused) {
        self.refusal = Some((reason, refused.response));
        if let Some(e) = refused.error {
            let error = self.error.get_or_insert_with(String::new);
            if !error.is_empty() {
                error.push_str("; ");
            }
            error.push_str(&format!(
                "answering the refusal ({}) failed, reset instead: {e}",
                refused.response.as_str()
            ));
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
        let rule = self.rule.as_str();
        let dialled = self.dialled.map(|d| d.to_string()).unwrap_or_default();
        let refusal = self.refusal.map_or("", |(_, response)| response.as_str());
        let pep = flow.actor.pep.pep.as_deref().unwrap_or("");
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
                    pep,
                    pep_status,
                    rule,
                    dialled = %dialled,
                    relay = self.relay,
                    bytes_up = self.bytes_up,
                    bytes_down = self.bytes_down,
                    duration_ms,
                    outcome = self.outcome.as_str(),
                    refusal,
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
