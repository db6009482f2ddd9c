//! Every metric of the agent (prometheus-client), served as OpenMetrics text by [`admin`].
//!
//! Counters are incremented where the pipeline already knows the outcome: once per
//! connection end ([`Metrics::connection_closed`], [`Metrics::connection_rejected`]), once per
//! routing decision, once per DNS query; gauges follow the [`actors::Manager`] (listeners,
//! actors). The `actor` label's series are removed when the actor is removed, so their number
//! is bounded by the registered actors.
//!
//! More metrics (discovery, map sizes) are added to the same registry with
//! [`Metrics::register`] (a family updated by its owner) or [`Metrics::register_collector`]
//! (values computed at scrape time), at any time, also after the admin listener started.
//!
//! [`admin`]: crate::admin
//! [`actors::Manager`]: crate::actors::Manager
use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

use tracing::debug;

use crate::{
    classify,
    proxy::Outcome,
    refuse::{Reason, Response},
};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How the destination name of a connection was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Classification {
    /// TLS ClientHello SNI.
    Sni,
    /// HTTP `Host` header.
    Host,
    /// The actor's own DNS answer for the original destination address.
    Dns,
    /// No name: the original address only (or nothing was read).
    None,
}

impl Classification {
    /// Stable name for metrics and the access log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Classification::Sni => "sni",
            Classification::Host => "host",
            Classification::Dns => "dns",
            Classification::None => "none",
        }
    }

    /// Every value, for removing an actor's series.
    const ALL: [Classification; 4] = [
        Classification::Sni,
        Classification::Host,
        Classification::Dns,
        Classification::None,
    ];
}

impl From<Option<classify::Source>> for Classification {
    fn from(source: Option<classify::Source>) -> Self {
        match source {
            Some(classify::Source::Sni) => Classification::Sni,
            Some(classify::Source::Host) => Classification::Host,
            Some(classify::Source::Dns) => Classification::Dns,
            Some(classify::Source::Ip) | None => Classification::None,
        }
    }
}

/// Where a connection was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Tunnelled through the PEP.
    Pep,
    /// Dialled by the agent itself.
    Direct,
}

impl RouteKind {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteKind::Pep => "pep",
            RouteKind::Direct => "direct",
        }
    }
}

/// What the routing decision of a connection was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Handed to the PEP, which decides (after the local pre-filter allowed it, if any).
    Pep,
    /// Allowed by the agent's policy: dialled directly.
    Allow,
    /// Denied by the policy or the always-denied addresses.
    Deny,
}

impl Decision {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Pep => "pep",
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// A kind of agent listener or socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Front {
    /// The eBPF front's loopback listeners of one actor namespace (one per namespace).
    Cgroup,
    /// The NAT front's listener of one veth worker namespace.
    Veth,
    /// A DNS socket: a cgroup actor's own, or a veth worker namespace's.
    Dns,
}

impl Front {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Front::Cgroup => "cgroup",
            Front::Veth => "veth",
            Front::Dns => "dns",
        }
    }
}

/// What became of one DNS query of an actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsOutcome {
    /// Relayed to the resolver and its answer passed on (whatever its rcode).
    Answered,
    /// NXDOMAIN from the agent: the policy denies the name, or every answered address.
    Denied,
    /// Refused by the agent without asking (not a hostname, malformed, not QUERY).
    Refused,
    /// SERVFAIL: the resolver failed or did not answer in time.
    Servfail,
    /// No answer at all: not a query, over the size limit, too many in flight, no resolver.
    Dropped,
}

impl DnsOutcome {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DnsOutcome::Answered => "answered",
            DnsOutcome::Denied => "denied",
            DnsOutcome::Refused => "refused",
            DnsOutcome::Servfail => "servfail",
            DnsOutcome::Dropped => "dropped",
        }
    }
}

/// A kind of error counted in `egress_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A connection that ended in error (its outcome: `pep_refused`, `no_record`, ...).
    Connection(Outcome),
    /// `accept` on a capture listener failed (out of file descriptors or memory).
    Accept,
    /// A capture listener or DNS socket of an actor could not be opened.
    Listener,
    /// An access log line was dropped: the writer was behind.
    AccessLogDropped,
    /// Writing the access log failed.
    AccessLogWrite,
    /// Accepting or serving an admin connection failed.
    Admin,
}

impl ErrorKind {
    /// Stable name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection(outcome) => outcome.as_str(),
            ErrorKind::Accept => "accept",
            ErrorKind::Listener => "listener",
            ErrorKind::AccessLogDropped => "access_log_dropped",
            ErrorKind::AccessLogWrite => "access_log_write",
            ErrorKind::Admin => "admin",
        }
    }
}

/// Label values that are stable names.
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value!(
    Classification,
    RouteKind,
    Decision,
    Front,
    DnsOutcome,
    ErrorKind,
    Outcome,
    Reason,
    Response
);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabels {
    actor: Arc<str>,
    outcome: Outcome,
    classification: Classification,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    Up,
    Down,
}

impl Direction {
    const fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}
label_value!(Direction);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    actor: Arc<str>,
    direction: Direction,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: RouteKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    decision: Decision,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FrontLabels {
    front: Front,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ActorsLabels {
    capture: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DnsLabels {
    outcome: DnsOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: Reason,
    response: Response,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Every outcome, for removing an actor's series.
const OUTCOMES: [Outcome; 17] = [
    Outcome::Tunneled,
    Outcome::Direct,
    Outcome::Denied,
    Outcome::ResolveFailed,
    Outcome::UpstreamUnreachable,
    Outcome::Dns,
    Outcome::PepRefused,
    Outcome::PepTimeout,
    Outcome::PepUnreachable,
    Outcome::PepTls,
    Outcome::PepError,
    Outcome::NoRecord,
    Outcome::UnknownActor,
    Outcome::Overloaded,
    Outcome::StaleRecord,
    Outcome::ClientError,
    Outcome::RelayError,
];

/// The end of one connection of an actor, as counted.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionEnd<'a> {
    /// The actor's id.
    pub actor: &'a str,
    /// How it ended.
    pub outcome: Outcome,
    /// How its destination name was learned.
    pub classification: Classification,
    /// Bytes from the actor to upstream.
    pub bytes_up: u64,
    /// Bytes from upstream to the actor.
    pub bytes_down: u64,
    /// The PEP's answer to the CONNECT, if one came.
    pub pep_status: Option<u16>,
    /// From accept to the start of the relay, and where it went, if the relay started.
    pub setup: Option<(RouteKind, Duration)>,
    /// Whether it ended in error (a denial is no error).
    pub error: bool,
}

/// Buckets of `egress_tunnel_setup_seconds`: 0.5 ms to about 16 s, doubling.
fn setup_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// The agent's metrics and the registry they are served from.
pub struct Metrics {
    registry: RwLock<Registry>,
    /// The `actor` label value of each registered actor, shared by its series (no allocation
    /// per connection). Held for reading while an actor's series are incremented, for writing
    /// while they are removed: a connection ending at the moment its actor is removed cannot
    /// bring the series back.
    actors_seen: RwLock<HashMap<String, Arc<str>>>,
    connections: Family<ConnectionLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    pep_responses: Family<StatusLabels, Counter>,
    tunnel_setup: Family<RouteLabels, Histogram>,
    policy_decisions: Family<DecisionLabels, Counter>,
    listeners: Family<FrontLabels, Gauge>,
    actors: Family<ActorsLabels, Gauge>,
    errors: Family<ErrorLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    ready: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric of the agent registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let pep_responses = Family::<StatusLabels, Counter>::default();
        let tunnel_setup = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(setup_buckets())) as fn() -> Histogram,
        );
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        let listeners = Family::<FrontLabels, Gauge>::default();
        let actors = Family::<ActorsLabels, Gauge>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let dns_queries = Family::<DnsLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let build_info = Family::<VersionLabels, Gauge>::default();
        let ready = Gauge::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "egress_connections",
            "Captured connections by actor, how they ended and how their destination name was learned",
            connections.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes relayed by actor and direction (up: actor to upstream)",
            bytes.clone(),
        );
        registry.register(
            "egress_pep_responses",
            "The PEP's answers to CONNECT by HTTP status",
            pep_responses.clone(),
        );
        registry.register(
            "egress_tunnel_setup_seconds",
            "From accept to the start of the relay (classify, decide, CONNECT or dial), by route",
            tunnel_setup.clone(),
        );
        registry.register(
            "egress_policy_decisions",
            "Routing decisions of connections: pep (the PEP decides), allow (dialled directly), deny",
            policy_decisions.clone(),
        );
        registry.register(
            "egress_listeners",
            "Open agent listeners and DNS sockets by front",
            listeners.clone(),
        );
        registry.register(
            "egress_actors",
            "Registered actors by capture front and source",
            actors.clone(),
        );
        registry.register(
            "egress_errors",
            "Errors by kind: connections that ended in error (by outcome) and internal failures",
            errors.clone(),
        );
        registry.register(
            "egress_dns_queries",
            "Actors' DNS queries by outcome",
            dns_queries.clone(),
        );
        registry.register(
            "egress_refusals",
            "Flows the agent refused and answered: by reason (policy, always_denied, pep) and \
             answer (http_403, tls_alert, close)",
            refusals.clone(),
        );
        registry.register(
            "egress_build_info",
            "The agent's version (always 1)",
            build_info,
        );
        registry.register(
            "egress_ready",
            "1 when /readyz answers 200 (programs attached, listeners up, named checks passed)",
            ready.clone(),
        );
        Metrics {
            registry: RwLock::new(registry),
            actors_seen: RwLock::new(HashMap::new()),
            connections,
            bytes,
            pep_responses,
            tunnel_setup,
            policy_decisions,
            listeners,
            actors,
            errors,
            dns_queries,
            refusals,
            ready,
        }
    }

    /// Registers one more metric (e.g. a [`Family`] its owner keeps a clone of and updates).
    /// A counter's `name` must not end in `_total`: the encoder appends it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry_mut().register(name, help, metric);
    }

    /// Registers a collector: its metrics are computed on each scrape (e.g. map sizes read
    /// from the kernel).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry_mut().register_collector(collector);
    }

    /// Appends the OpenMetrics text of every registered metric (with the final `# EOF`).
    pub fn encode(&self, out: &mut String) -> fmt::Result {
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(out, &registry)
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the end of one connection of an actor: `egress_connections_total`, its bytes,
    /// the PEP's status, the setup latency and, when it ended in error, `egress_errors_total`.
    /// `registered` says whether the actor is still registered; it is asked only for an actor
    /// not seen yet (one not added through [`Metrics::actor_added`]): a connection that ends
    /// after its actor was removed must not bring the actor's series back.
    pub fn connection_closed(&self, end: &ConnectionEnd<'_>, registered: &dyn Fn() -> bool) {
        if let Some(status) = end.pep_status {
            self.pep_responses
                .get_or_create(&StatusLabels { status })
                .inc();
        }
        if let Some((route, setup)) = end.setup {
            self.tunnel_setup
                .get_or_create(&RouteLabels { route })
                .observe(setup.as_secs_f64());
        }
        if end.error {
            self.error(ErrorKind::Connection(end.outcome));
        }
        self.with_actor(end.actor, registered, |actor| {
            self.connections
                .get_or_create(&ConnectionLabels {
                    actor: actor.clone(),
                    outcome: end.outcome,
                    classification: end.classification,
                })
                .inc();
            for (direction, n) in [
                (Direction::Up, end.bytes_up),
                (Direction::Down, end.bytes_down),
            ] {
                if n > 0 {
                    self.bytes
                        .get_or_create(&BytesLabels {
                            actor: actor.clone(),
                            direction,
                        })
                        .inc_by(n);
                }
            }
        });
    }

    /// Counts a connection that was reset before it was attributed to an actor (no record,
    /// unknown actor, stale record): `actor=""` and `egress_errors_total`.
    pub fn connection_rejected(&self, outcome: Outcome) {
        self.error(ErrorKind::Connection(outcome));
        self.connections
            .get_or_create(&ConnectionLabels {
                actor: Arc::from(""),
                outcome,
                classification: Classification::None,
            })
            .inc();
    }

    /// Runs `f` with the shared label value of actor `id`, holding the lock (see
    /// `actors_seen`). An id not seen yet is added first if `registered()` (asked under the
    /// write lock, so a removal cannot slip between the check and the increment); else `f`
    /// does not run.
    fn with_actor(&self, id: &str, registered: &dyn Fn() -> bool, f: impl FnOnce(&Arc<str>)) {
        {
            let seen = self.actors_seen.read().unwrap_or_else(|e| e.into_inner());
            if let Some(actor) = seen.get(id) {
                return f(actor);
            }
        }
        let mut seen = self.actors_seen.write().unwrap_or_else(|e| e.into_inner());
        if let Some(actor) = seen.get(id) {
            return f(actor);
        }
        if !registered() {
            return;
        }
        let actor: Arc<str> = Arc::from(id);
        seen.insert(id.to_string(), actor.clone());
        f(&actor);
    }

    /// Counts one routing decision.
    pub fn policy_decision(&self, decision: Decision) {
        self.policy_decisions
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    /// Counts one DNS query.
    pub fn dns_query(&self, outcome: DnsOutcome) {
        self.dns_queries.get_or_create(&DnsLabels { outcome }).inc();
    }

    /// Counts one refused flow: who refused it and how the actor was answered.
    pub fn refusal(&self, reason: Reason, response: Response) {
        self.refusals
            .get_or_create(&RefusalLabels { reason, response })
            .inc();
    }

    /// Counts one error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// A listener (or DNS socket) of `front` was opened.
    pub fn listener_opened(&self, front: Front) {
        self.listeners.get_or_create(&FrontLabels { front }).inc();
    }

    /// A listener (or DNS socket) of `front` was closed.
    pub fn listener_closed(&self, front: Front) {
        self.listeners.get_or_create(&FrontLabels { front }).dec();
    }

    /// An actor was registered; `capture` is `cgroup` or `veth`, `source` where it came from
    /// ([`crate::actors::Source::as_str`]).
    pub fn actor_added(&self, id: &str, capture: &'static str, source: &'static str) {
        self.actors
            .get_or_create(&ActorsLabels { capture, source })
            .inc();
        let mut seen = self.actors_seen.write().unwrap_or_else(|e| e.into_inner());
        seen.entry(id.to_string()).or_insert_with(|| Arc::from(id));
    }

    /// An actor was removed: its gauge goes down and every series with its `actor` label
    /// goes.
    pub fn actor_removed(&self, id: &str, capture: &'static str, source: &'static str) {
        self.actors
            .get_or_create(&ActorsLabels { capture, source })
            .dec();
        let mut seen = self.actors_seen.write().unwrap_or_else(|e| e.into_inner());
        let Some(actor) = seen.remove(id) else {
            return;
        };
        for outcome in OUTCOMES {
            for classification in Classification::ALL {
                self.connections.remove(&ConnectionLabels {
                    actor: actor.clone(),
                    outcome,
                    classification,
                });
            }
        }
        for direction in [Direction::Up, Direction::Down] {
            self.bytes.remove(&BytesLabels {
                actor: actor.clone(),
                direction,
            });
        }
    }

    /// Sets `egress_ready`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }
}

/// `egress_map_entries{map}` and `egress_map_capacity{map}`: the pinned maps' sizes, read
/// from the kernel at each scrape (bounded by each map's capacity).
#[derive(Debug)]
pub struct MapSizes {
    dir: PathBuf,
}

impl MapSizes {
    /// The maps pinned under `dir` (`--bpffs-dir`).
    pub fn new(dir: PathBuf) -> Self {
        MapSizes { dir }
    }
}

impl Collector for MapSizes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let sizes = match crate::ebpf::map_sizes(&self.dir) {
            Ok(sizes) => sizes,
            Err(e) => {
                // The scrape goes on without them; `egress-agent maps` says the same error.
                debug!(error = %e, "map sizes for metrics");
                return Ok(());
            }
        };
        for (name, help, value) in [
            (
                "egress_map_entries",
                "Entries in each pinned map (arrays: every slot)",
                (|s: &crate::ebpf::MapSize| s.entries) as fn(&crate::ebpf::MapSize) -> u32,
            ),
            (
                "egress_map_capacity",
                "max_entries of each pinned map",
                |s: &crate::ebpf::MapSize| s.capacity,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for size in &sizes {
                let labels = [("map", size.name.as_str())];
                ConstGauge::new(i64::from(value(size))).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// `egress_discovery_pods{state}`, `egress_discovery_events_total{kind}` and
/// `egress_discovery_errors_total{kind}`, from discovery's counters at each scrape.
#[derive(Debug)]
pub struct DiscoveryStats {
    stats: Arc<crate::discovery::kube::Stats>,
}

impl DiscoveryStats {
    /// Discovery's counters.
    pub fn new(stats: Arc<crate::discovery::kube::Stats>) -> Self {
        DiscoveryStats { stats }
    }
}

impl Collector for DiscoveryStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        use crate::discovery::kube::{ErrorKind, EventKind, PodState};
        let mut family = encoder.encode_descriptor(
            "egress_discovery_pods",
            "Selected pods on this node by state (captured, pending, unsupported, failed)",
            None,
            MetricType::Gauge,
        )?;
        for state in PodState::ALL {
            let labels = [("state", state.as_str())];
            let value = i64::try_from(self.stats.pods(state)).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "egress_discovery_events",
            "Pod watch events by kind",
            None,
            MetricType::Counter,
        )?;
        for kind in EventKind::ALL {
            let labels = [("kind", kind.as_str())];
            ConstCounter::new(self.stats.events(kind)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "egress_discovery_errors",
            "Discovery errors by kind (watch, resolve attempts, register, unregister, id conflict)",
            None,
            MetricType::Counter,
        )?;
        for kind in ErrorKind::ALL {
            let labels = [("kind", kind.as_str())];
            ConstCounter::new(self.stats.errors(kind)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The PEP links at scrape time: each actor's certificate end (PEPs with per-actor
/// certificates) and each HTTP/2 pool's connections and tunnels.
pub struct PepLinks {
    ctx: std::sync::Weak<crate::proxy::Context>,
}

impl PepLinks {
    /// Reads `ctx`'s connectors at each scrape (nothing once it is gone).
    pub fn new(ctx: &Arc<crate::proxy::Context>) -> Self {
        PepLinks {
            ctx: Arc::downgrade(ctx),
        }
    }
}

impl fmt::Debug for PepLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PepLinks").finish_non_exhaustive()
    }
}

impl Collector for PepLinks {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(ctx) = self.ctx.upgrade() else {
            return Ok(());
        };
        let certs = ctx.actor_certs();
        if !certs.is_empty() {
            let mut family = encoder.encode_descriptor(
                "egress_actor_cert_expiry_timestamp_seconds",
                "End of validity (Unix time) of each actor's current client certificate",
                None,
                MetricType::Gauge,
            )?;
            for (pep, all) in &certs {
                for cert in all {
                    let Some(end) = cert.not_after else { continue };
                    let secs = end
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                    let labels = [("pep", pep.as_str()), ("actor", cert.actor.as_str())];
                    ConstGauge::new(secs).encode(family.encode_family(&labels)?)?;
                }
            }
            let mut family = encoder.encode_descriptor(
                "egress_actor_cert_renewals",
                "Times an actor's client certificate was replaced by a new one",
                None,
                MetricType::Counter,
            )?;
            for (pep, all) in &certs {
                for cert in all {
                    let labels = [("pep", pep.as_str()), ("actor", cert.actor.as_str())];
                    ConstCounter::new(cert.renewals).encode(family.encode_family(&labels)?)?;
                }
            }
            let mut family = encoder.encode_descriptor(
                "egress_actor_cert_usable",
                "1 when an actor has a certificate valid now (its tunnels can open), else 0",
                None,
                MetricType::Gauge,
            )?;
            for (pep, all) in &certs {
                for cert in all {
                    let labels = [("pep", pep.as_str()), ("actor", cert.actor.as_str())];
                    ConstGauge::new(i64::from(cert.usable))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let pools = ctx.pools();
        if pools.is_empty() {
            return Ok(());
        }
        for (name, help, kind, value) in [
            (
                "egress_pep_h2_connections",
                "HTTP/2 connections to the PEP open now",
                MetricType::Gauge,
                (|s: &crate::tunnel::h2::Stats| s.connections as u64) as fn(&_) -> u64,
            ),
            (
                "egress_pep_h2_streams",
                "Tunnels (HTTP/2 streams) open now",
                MetricType::Gauge,
                |s| s.streams as u64,
            ),
            (
                "egress_pep_h2_connections_opened",
                "HTTP/2 connections opened to the PEP",
                MetricType::Counter,
                |s| s.connections_opened_total,
            ),
            (
                "egress_pep_h2_streams_opened",
                "Tunnels opened as HTTP/2 streams",
                MetricType::Counter,
                |s| s.streams_opened_total,
            ),
            (
                "egress_pep_h2_goaways",
                "GOAWAY frames received from the PEP",
                MetricType::Counter,
                |s| s.goaways_total,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (pep, stats) in &pools {
                let labels = [("pep", pep.as_str())];
                let v = value(stats);
                match kind {
                    MetricType::Counter => {
                        ConstCounter::new(v).encode(family.encode_family(&labels)?)?
                    }
                    _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                        .encode(family.encode_family(&labels)?)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &Metrics) -> String {
        let mut out = String::new();
        m.encode(&mut out).expect("encode");
        out
    }

    fn connection_series(m: &Metrics) -> usize {
        encoded(m)
            .lines()
            .filter(|l| l.starts_with("egress_connections_total{"))
            .count()
    }

    fn end(actor: &str, outcome: Outcome) -> ConnectionEnd<'_> {
        ConnectionEnd {
            actor,
            outcome,
            classification: Classification::Sni,
            bytes_up: 10,
            bytes_down: 200,
            pep_status: Some(200),
            setup: Some((RouteKind::Pep, Duration::from_millis(3))),
            error: false,
        }
    }

    #[test]
    fn encodes_the_expected_series() {
        let m = Metrics::new();
        m.actor_added("a1", "cgroup", "config");
        m.connection_closed(&end("a1", Outcome::Tunneled), &|| true);
        m.connection_closed(&end("a1", Outcome::Tunneled), &|| true);
        m.connection_closed(
            &ConnectionEnd {
                pep_status: Some(403),
                setup: None,
                bytes_up: 0,
                bytes_down: 0,
                error: true,
                classification: Classification::Host,
                ..end("a1", Outcome::PepRefused)
            },
            &|| true,
        );
        m.connection_rejected(Outcome::NoRecord);
        m.policy_decision(Decision::Pep);
        m.dns_query(DnsOutcome::Denied);
        m.listener_opened(Front::Cgroup);
        m.listener_opened(Front::Dns);
        m.listener_opened(Front::Dns);
        m.listener_closed(Front::Dns);
        m.error(ErrorKind::AccessLogDropped);
        m.refusal(Reason::Pep, Response::TlsAlert);
        m.refusal(Reason::AlwaysDenied, Response::Close);
        m.refusal(Reason::AlwaysDenied, Response::Close);
        m.set_ready(true);
        let text = encoded(&m);
        for line in [
            r#"egress_connections_total{actor="a1",outcome="tunneled",classification="sni"} 2"#,
            r#"egress_connections_total{actor="a1",outcome="pep_refused",classification="host"} 1"#,
            r#"egress_connections_total{actor="",outcome="no_record",classification="none"} 1"#,
            r#"egress_bytes_total{actor="a1",direction="up"} 20"#,
            r#"egress_bytes_total{actor="a1",direction="down"} 400"#,
            r#"egress_pep_responses_total{status="200"} 2"#,
            r#"egress_pep_responses_total{status="403"} 1"#,
            r#"egress_tunnel_setup_seconds_count{route="pep"} 2"#,
            r#"egress_tunnel_setup_seconds_bucket{le="0.004",route="pep"} 2"#,
            r#"egress_policy_decisions_total{decision="pep"} 1"#,
            r#"egress_dns_queries_total{outcome="denied"} 1"#,
            r#"egress_listeners{front="cgroup"} 1"#,
            r#"egress_listeners{front="dns"} 1"#,
            r#"egress_actors{capture="cgroup",source="config"} 1"#,
            r#"egress_errors_total{kind="pep_refused"} 1"#,
            r#"egress_errors_total{kind="no_record"} 1"#,
            r#"egress_errors_total{kind="access_log_dropped"} 1"#,
            r#"egress_refusals_total{reason="pep",response="tls_alert"} 1"#,
            r#"egress_refusals_total{reason="always_denied",response="close"} 2"#,
            &format!(
                r#"egress_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
            "egress_ready 1",
            "# TYPE egress_tunnel_setup_seconds histogram",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn removing_an_actor_removes_its_series() {
        let m = Metrics::new();
        m.actor_added("a1", "veth", "runtime");
        m.actor_added("a2", "veth", "runtime");
        for outcome in OUTCOMES {
            m.connection_closed(&end("a1", outcome), &|| true);
        }
        m.connection_closed(
            &ConnectionEnd {
                classification: Classification::Dns,
                ..end("a1", Outcome::Direct)
            },
            &|| true,
        );
        m.connection_closed(&end("a2", Outcome::Tunneled), &|| true);
        assert_eq!(connection_series(&m), OUTCOMES.len() + 2);
        m.actor_removed("a1", "veth", "runtime");
        assert_eq!(connection_series(&m), 1);
        // A connection of the removed actor that ends now does not bring its series back;
        // one of an actor registered some other way than `actor_added` is counted.
        m.connection_closed(&end("a1", Outcome::Tunneled), &|| false);
        m.connection_closed(&end("a3", Outcome::Tunneled), &|| true);
        assert_eq!(connection_series(&m), 2);
        let text = encoded(&m);
        assert!(!text.contains(r#"actor="a1""#), "{text}");
        assert!(text.contains(r#"actor="a3""#), "{text}");
        assert!(text.contains(r#"actor="a2""#), "{text}");
        assert!(
            text.lines()
                .any(|l| l == r#"egress_actors{capture="veth",source="runtime"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn metrics_registered_later_are_served() {
        #[derive(Debug)]
        struct Maps;
        impl Collector for Maps {
            fn encode(
                &self,
                mut encoder: prometheus_client::encoding::DescriptorEncoder,
            ) -> Result<(), fmt::Error> {
                let gauge = prometheus_client::metrics::gauge::ConstGauge::new(7i64);
                let metric = encoder.encode_descriptor(
                    "egress_map_entries",
                    "entries",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                prometheus_client::encoding::EncodeMetric::encode(&gauge, metric)
            }
        }
        let m = Metrics::new();
        let events = Family::<Vec<(String, String)>, Counter>::default();
        m.register("egress_discovery_events", "events", events.clone());
        m.register_collector(Box::new(Maps));
        events
            .get_or_create(&vec![("kind".into(), "added".into())])
            .inc();
        let text = encoded(&m);
        assert!(
            text.contains(r#"egress_discovery_events_total{kind="added"} 1"#),
            "{text}"
        );
        assert!(text.contains("egress_map_entries 7"), "{text}");
    }

    #[test]
    fn every_metric_is_documented_in_operations_md() {
        // Every metric name this module registers or collects (its string literals: a family
        // with no series yet is not in an encoding) is a row of the docs' metrics table.
        let docs = include_str!("../../docs/operations.md");
        let source = include_str!("metrics.rs");
        let tests = source.find("#[cfg(test)]").unwrap_or(source.len());
        let mut names: Vec<&str> = source[..tests]
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| {
                s.starts_with("egress_") && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 16, "{names:?}");
        for name in names {
            assert!(
                docs.contains(&format!("| `{name}` |"))
                    || docs.contains(&format!("| `{name}_total` |")),
                "{name} is not in docs/operations.md's metrics table"
            );
        }
    }
}
