//! The actors the agent captures, as they come and go: the [`Registry`] the pipeline reads
//! (an actor by its cgroup id, or by its veth address in a worker namespace) and the
//! [`Manager`] that adds and removes them (eBPF registration, listeners, veth pairs, the
//! nftables table) for the config file, the state file and the control socket.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    capture::{self, DnsSocket, Front, Listener},
    config::{Actor, ActorSpec, Capture, Config, Veth},
    ebpf,
    metrics::{ErrorKind, Front as MetricFront, Metrics},
    net::{nft, veth},
    proxy,
};

/// The state file under `--state-dir`.
pub const STATE_FILE: &str = "actors.json";

/// Errors of adding, removing or re-applying an actor; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec does not validate.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// No actor has this id.
    #[error("no actor {0:?} is registered (see `egress-agent actor list`)")]
    NotFound(String),
    /// The id is taken by a different spec, or the actor collides with another.
    #[error("actor {id:?}: {problem}")]
    Conflict {
        /// Actor id.
        id: String,
        /// What collides.
        problem: String,
    },
    /// A cgroup to block is unusable.
    #[error("blocking a cgroup: {0}")]
    Block(String),
    /// `reapply` of an actor that has no veth.
    #[error("actor {0:?} is a cgroup actor: only veth actors have an actor side to re-apply")]
    NotVeth(String),
    /// The veth pool of a worker namespace is used up.
    #[error(
        "the veth pool {pool} has no free /30 left in the worker namespace of actor {id:?}: \
         remove actors or give a larger --veth-pool"
    )]
    PoolExhausted {
        /// Actor id.
        id: String,
        /// The pool.
        pool: veth::Pool,
    },
    /// eBPF registration failed.
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    /// A listener could not be opened.
    #[error(transparent)]
    Listener(#[from] capture::Error),
    /// The veth pair could not be set up or removed.
    #[error("actor {id:?}: {source}")]
    Veth {
        /// Actor id.
        id: String,
        /// The cause.
        source: Box<veth::Error>,
    },
    /// The nftables table could not be written.
    #[error("actor {id:?}: {source}")]
    Nft {
        /// Actor id.
        id: String,
        /// The cause.
        source: Box<nft::Error>,
    },
    /// The async runtime refused a listener.
    #[error("registering a listener with the runtime: {0}")]
    Runtime(#[from] crate::app::Error),
    /// The state file could not be written: the actor was not added.
    #[error(
        "recording the actor in the state file {path}: {source}; it was not added (a restarted \
         agent would not know it): check --state-dir"
    )]
    State {
        /// The state file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl Error {
    fn veth(id: &str, source: veth::Error) -> Self {
        Error::Veth {
            id: id.into(),
            source: Box::new(source),
        }
    }

    fn nft(id: &str, source: nft::Error) -> Self {
        Error::Nft {
            id: id.into(),
            source: Box::new(source),
        }
    }
}

/// The actors the pipeline can attribute connections to; read on every accept, written only
/// by the [`Manager`].
#[derive(Default)]
pub struct Registry {
    index: RwLock<Index>,
}

#[derive(Default)]
struct Index {
    by_cgroup: HashMap<u64, Arc<Actor>>,
    by_addr: HashMap<(u64, Ipv4Addr), Arc<Actor>>,
}

impl Registry {
    /// A registry holding `actors` (cgroup actors only: veth actors need a worker namespace
    /// cookie and an address, which only the manager assigns). For tests and embedding.
    pub fn with_cgroup_actors(actors: impl IntoIterator<Item = Arc<Actor>>) -> Self {
        let registry = Registry::default();
        for actor in actors {
            if let Some(id) = actor.cgroup_id() {
                registry.write().by_cgroup.insert(id, actor);
            }
        }
        registry
    }

    /// The actor whose cgroup has id `cgroup_id`.
    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Actor>> {
        self.read().by_cgroup.get(&cgroup_id).cloned()
    }

    /// The veth actor with address `addr` in the worker namespace with cookie `netns`.
    pub fn by_addr(&self, netns: u64, addr: IpAddr) -> Option<Arc<Actor>> {
        let v4 = match addr {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
        };
        self.read().by_addr.get(&(netns, v4)).cloned()
    }

    /// Whether `actor` (this very registration) is still registered under `id`.
    pub fn contains(&self, id: &str, actor: &Arc<Actor>) -> bool {
        let index = self.read();
        index
            .by_cgroup
            .values()
            .chain(index.by_addr.values())
            .any(|a| a.id == id && Arc::ptr_eq(a, actor))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // The index is replaced entry by entry and never left half-written: a panic elsewhere
        // while holding the lock does not make it wrong.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where an actor came from: the config file (or flags) or the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The config file or the `--actor-*` flags.
    Config,
    /// `egress-agent actor add` (kept in the state file across restarts).
    Runtime,
    /// Discovery (a Kubernetes pod); kept in the state file like `Runtime` until the first
    /// complete list of pods says the pod is gone.
    Kubernetes,
}

impl Source {
    /// Stable name for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Runtime => "runtime",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// One actor as `egress-agent actor list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The actor as configured.
    pub actor: ActorSpec,
    /// Where it came from.
    pub source: Source,
    /// `cgroup` or `veth`.
    pub capture: String,
    /// The PEP serving it and what chose it, e.g. `squid-a (actor)`, `default (default)`,
    /// `none (nothing)`: no PEP, the embedded policy decides.
    #[serde(default)]
    pub pep: String,
    /// The cgroup's id (cgroup actors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// The veth pair (veth actors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<veth::Pair>,
    /// The agent's listeners serving it (none: its connections are refused).
    #[serde(default)]
    pub listeners: Vec<SocketAddr>,
    /// A cgroup actor's own DNS socket (none: its DNS is refused). Veth actors' DNS goes to
    /// their worker's DNS socket on `--veth-dns-port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<SocketAddr>,
    /// Packets of the actor dropped by the nftables table (UDP other than DNS, ICMP, ...);
    /// in `list` answers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_packets: Option<u64>,
}

/// The state file's contents: every actor with its source and veth slot.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    actors: Vec<Saved>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    actor: ActorSpec,
    source: Source,
    #[serde(default)]
    slot: Option<u32>,
}

/// One network namespace's listener, shared by the actors it serves.
struct Served {
    cookie: u64,
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    users: usize,
}

type ListenerKey = (Front, (u64, u64));

struct Entry {
    actor: Arc<Actor>,
    source: Source,
    listener: Option<ListenerKey>,
    /// veth actors: the pair and the cookie of the worker namespace.
    pair: Option<(veth::Pair, u64)>,
    /// cgroup actors: their own DNS socket.
    dns: Option<ServedDns>,
}

/// A cgroup actor's DNS socket: its addresses and the receive loops that own it (aborting
/// them closes it).
struct ServedDns {
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServedDns {
    fn close(self, metrics: &Metrics) {
        for task in self.tasks {
            task.abort();
        }
        metrics.listener_closed(MetricFront::Dns);
    }
}

/// Owns capture: the eBPF programs, the listeners, the veth pairs and nftables tables, the
/// registry and the state file. Calls block (netlink, nft): run them off the async threads.
pub struct Manager {
    config: Arc<Config>,
    capture: ebpf::Capture,
    registry: Arc<Registry>,
    ctx: Arc<proxy::Context>,
    runtime: Handle,
    shutdown: watch::Receiver<bool>,
    listeners: HashMap<ListenerKey, Served>,
    actors: BTreeMap<String, Entry>,
    /// Slots freed by removed veth actors, oldest first: reused last.
    freed: Vec<((u64, u64), u32)>,
    /// When the manager took over capture (the agent's uptime in `status`).
    started: std::time::Instant,
    /// Kubernetes discovery's node and shared state, for `status`.
    discovery: Option<(String, crate::discovery::kube::Shared)>,
}

/// Most freed slots remembered.
const MAX_FREED: usize = 4096;

impl Manager {
    /// Takes over capture and adds the configured actors, then the ones a previous agent
    /// added at run time (from the state file), adopting their veth pairs. A configured actor
    /// that cannot be captured is an error; a remembered one is logged and dropped.
    pub fn start(
        config: Arc<Config>,
        capture: ebpf::Capture,
        registry: Arc<Registry>,
        ctx: Arc<proxy::Context>,
        runtime: Handle,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, Error> {
        let mut manager = Manager {
            config: config.clone(),
            capture,
            registry,
            ctx,
            runtime,
            shutdown,
            listeners: HashMap::new(),
            actors: BTreeMap::new(),
            freed: Vec::new(),
            started: std::time::Instant::now(),
            discovery: None,
        };
        let state = manager.load_state();
        let slot_of = |id: &str| {
            state
                .actors
                .iter()
                .find(|s| s.actor.id == id)
                .and_then(|s| s.slot)
        };
        for actor in &config.actors {
            let slot = slot_of(&actor.id);
            manager.add_actor(actor.clone(), Source::Config, slot)?;
        }
        for saved in &state.actors {
            if saved.source == Source::Config {
                continue;
            }
            if manager.actors.contains_key(&saved.actor.id) {
                warn!(actor = %saved.actor.id, "an actor added at run time is now in the config file: the config file's wins");
                continue;
            }
            let added = saved
                .actor
                .validate(&manager.config.pep_selector)
                .map_err(Error::from)
                .and_then(|actor| manager.add_actor(actor, saved.source, saved.slot));
            match added {
                Ok(_) => {
                    info!(actor = %saved.actor.id, source = saved.source.as_str(),
                        "actor added at run time adopted from the state file")
                }
                Err(e) => error!(actor = %saved.actor.id, error = %e,
                    "an actor added at run time could not be captured again and is dropped \
                     (its sandbox is probably gone); add it again if it is not"),
            }
        }
        manager.forget_unconfigured(&state);
        let known: BTreeSet<u64> = manager
            .actors
            .values()
            .filter_map(|e| e.actor.cgroup_id())
            .collect();
        for stale in manager.capture.pinned_cgroups().difference(&known) {
            warn!(
                cgroup_id = stale,
                dir = %manager.capture.dir().display(),
                "a cgroup is still captured by an earlier agent but is not configured: its \
                 connects are refused or reset, never sent out, until it is configured again \
                 or released with `egress-agent detach --cgroup PATH` (or `--cgroup-id ID`)"
            );
        }
        manager.save_state();
        manager.ctx.health().set_actors_started();
        manager.update_health();
        Ok(manager)
    }

    /// Tells the readiness which registered actors are not served (no listener or no DNS
    /// socket: their connects or DNS are refused). Discovered actors are left out: one pod
    /// whose namespace cannot take a listener must not make every node's agent unready (a
    /// DaemonSet rollout would stall on it); `status` and the logs show it.
    fn update_health(&self) {
        let unserved = self
            .actors
            .iter()
            .filter(|(_, e)| e.source != Source::Kubernetes)
            .filter(|(_, e)| match e.actor.capture {
                Capture::Cgroup { .. } => e.listener.is_none() || e.dns.is_none(),
                Capture::Veth(_) => e.listener.is_none(),
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.ctx.health().set_unserved(unserved);
    }

    /// Veth actors the previous agent had from its config file that this one's config no longer
    /// lists: their pairs are deleted (the actor loses its network, it does not go out
    /// uncaptured) and their worker's table rewritten. A cgroup actor in that case stays
    /// captured with the stale-cgroup warning, as before.
    fn forget_unconfigured(&mut self, state: &State) {
        for saved in &state.actors {
            if saved.source != Source::Config || self.actors.contains_key(&saved.actor.id) {
                continue;
            }
            let (Ok(actor), Some(slot)) =
                (saved.actor.validate(&self.config.pep_selector), saved.slot)
            else {
                // Its namespaces are gone, and the pair with them.
                continue;
            };
            let (Capture::Veth(v), Some(pair)) = (&actor.capture, self.config.veth_pool.pair(slot))
            else {
                continue;
            };
            if self.slots_taken(v.worker_identity).contains(&slot) {
                // The worker namespace was replaced and the slot is another actor's now.
                continue;
            }
            let removed = veth::down(v.worker_netns.as_deref(), &pair)
                .map_err(|e| Error::veth(&actor.id, e))
                .and_then(|_| {
                    apply_or_remove(
                        &actor.id,
                        v.worker_netns.as_deref(),
                        &self.worker_table(v.worker_identity),
                    )
                });
            match removed {
                Ok(()) => warn!(actor = %actor.id, veth = %pair.worker_if,
                    "a veth actor is no longer in the config file: its pair is deleted"),
                Err(e) => error!(actor = %actor.id, error = %e,
                    "a veth actor is no longer in the config file and its pair could not be \
                     deleted: its traffic is dropped (no rules redirect it); delete the pair by hand"),
            }
        }
    }

    /// Adds an actor at run time; adding the same spec again is a no-op. An actor that cannot
    /// be recorded in the state file is removed again: a restarted agent would not know it.
    pub fn add(&mut self, spec: &ActorSpec) -> Result<Status, Error> {
        self.add_from(spec, Source::Runtime)
    }

    /// [`Manager::add`] with the source recorded for the actor (`Runtime` or `Kubernetes`).
    pub fn add_from(&mut self, spec: &ActorSpec, source: Source) -> Result<Status, Error> {
        let actor = spec.validate(&self.config.pep_selector)?;
        let known = self.actors.contains_key(&actor.id);
        let status = self.add_actor(actor, source, None)?;
        if let Err(e) = self.write_state() {
            if !known {
                let _ = self.remove(&spec.id);
            }
            return Err(Error::State {
                path: self.state_path(),
                source: e,
            });
        }
        Ok(status)
    }

    /// Captures a cgroup with no actor: the programs are attached and no actor entry is
    /// written, so its processes' connects are refused (and its DNS). For a discovered pod
    /// that cannot be served (its actor id is taken): refused, never uncaptured. Returns the
    /// cgroup's id; a cgroup that is an actor's already is left as it is.
    pub fn block(&mut self, cgroup: &Path) -> Result<u64, Error> {
        let cgroup_id = crate::config::cgroup_id(cgroup).map_err(Error::Block)?;
        let served = self
            .actors
            .values()
            .any(|e| e.actor.cgroup_id() == Some(cgroup_id));
        if !served {
            self.capture.register(cgroup, cgroup_id, None)?;
            info!(cgroup = %cgroup.display(), cgroup_id,
                "cgroup blocked: captured with no actor, its connects are refused");
        }
        Ok(cgroup_id)
    }

    /// Releases a cgroup [`block`](Manager::block)ed, unless an actor serves it now.
    pub fn unblock(&mut self, cgroup_id: u64) -> Result<(), Error> {
        if self
            .actors
            .values()
            .any(|e| e.actor.cgroup_id() == Some(cgroup_id))
        {
            return Ok(());
        }
        ebpf::detach(self.capture.dir(), Some(cgroup_id))?;
        info!(cgroup_id, "cgroup unblocked: released");
        Ok(())
    }

    /// Removes an actor: releases its cgroup, or deletes its veth pair and its rules.
    pub fn remove(&mut self, id: &str) -> Result<Status, Error> {
        let entry = self
            .actors
            .remove(id)
            .ok_or_else(|| Error::NotFound(id.into()))?;
        // Its recorded DNS answers and addresses go with it: a later actor under the same id
        // starts clean.
        self.ctx.forget_actor(id);
        let status = self.status(&entry);
        let released = match (&entry.actor.capture, &entry.pair) {
            (Capture::Cgroup { cgroup_id, .. }, _) => {
                ebpf::detach(self.capture.dir(), Some(*cgroup_id))
                    .map(|_| ())
                    .map_err(Error::from)
            }
            (Capture::Veth(v), Some(_))
                if !same_namespace(v.worker_netns.as_deref(), v.worker_identity) =>
            {
                // Never touch a namespace that replaced it at the same path: its egress0 is
                // someone else's. The pair and the rules went with the old namespace.
                warn!(actor = %id, "the actor's worker namespace is gone or was replaced: its \
                    pair and rules went with it; unregistering only");
                Ok(())
            }
            (Capture::Veth(v), Some((pair, _))) => self.release_veth(&entry.actor, v, pair),
            (Capture::Veth(_), None) => Ok(()),
        };
        if let Err(e) = released {
            // Keep it registered: half-removed capture must stay visible and in force.
            self.actors.insert(id.to_string(), entry);
            return Err(e);
        }
        {
            let mut index = self.registry.write();
            match (&entry.actor.capture, &entry.pair) {
                (Capture::Cgroup { cgroup_id, .. }, _) => {
                    index.by_cgroup.remove(cgroup_id);
                }
                (Capture::Veth(_), Some((pair, cookie))) => {
                    index.by_addr.remove(&(*cookie, pair.actor));
                }
                (Capture::Veth(_), None) => {}
            }
        }
        if let (Capture::Veth(v), Some((pair, _))) = (&entry.actor.capture, &entry.pair) {
            self.free_slot(v.worker_identity, pair.slot);
        }
        if let Some(key) = entry.listener {
            self.unuse_listener(key);
        }
        if let Some(dns) = entry.dns {
            dns.close(self.ctx.metrics());
        }
        info!(actor = %id, capture = %status.capture, "actor removed");
        self.ctx
            .metrics()
            .actor_removed(id, capture_name(&entry.actor), entry.source.as_str());
        self.update_health();
        self.save_state();
        Ok(status)
    }

    /// Re-applies a veth actor's side (address, routes, links up) after its runtime cleared
    /// them (gVisor does on run and restore).
    pub fn reapply(&mut self, id: &str) -> Result<Status, Error> {
        let entry = self
            .actors
            .get(id)
            .ok_or_else(|| Error::NotFound(id.into()))?;
        let (Capture::Veth(v), Some((pair, _))) = (&entry.actor.capture, &entry.pair) else {
            return Err(Error::NotVeth(id.into()));
        };
        if !same_namespace(Some(&v.netns), v.netns_identity)
            || !same_namespace(v.worker_netns.as_deref(), v.worker_identity)
        {
            return Err(Error::Conflict {
                id: id.into(),
                problem: format!(
                    "its network namespace {} (or its worker's) is gone or is not the one it was \
                     added with (recreated?): remove the actor and add it again",
                    v.netns.display()
                ),
            });
        }
        veth::reapply(&v.netns, pair).map_err(|source| Error::veth(id, source))?;
        info!(actor = %id, netns = %v.netns.display(), address = %pair.actor, "actor side re-applied");
        Ok(self.status(entry))
    }

    /// Every actor, in id order, veth actors with their drop counters (one `nft` run per
    /// worker namespace).
    pub fn list(&self) -> Vec<Status> {
        let mut counters: HashMap<(u64, u64), HashMap<String, nft::Counter>> = HashMap::new();
        self.actors
            .values()
            .map(|e| {
                let mut status = self.status(e);
                if let (Capture::Veth(v), Some((pair, _))) = (&e.actor.capture, &e.pair) {
                    let worker = counters.entry(v.worker_identity).or_insert_with(|| {
                        nft::counters(v.worker_netns.as_deref()).unwrap_or_default()
                    });
                    status.dropped_packets = worker
                        .get(&nft::counter_name(&pair.worker_if))
                        .map(|c| c.packets);
                }
                status
            })
            .collect()
    }

    /// The agent's status (`egress-agent status`): [`list`] plus the listeners, the
    /// attachments and map sizes read back from the pins, the PEP, the policy and readiness.
    ///
    /// [`list`]: Manager::list
    pub fn report(&self) -> crate::status::Report {
        use crate::status;
        let actors = self.list();
        let mut listeners: Vec<status::ListenerStatus> = self
            .listeners
            .iter()
            .map(|(key, served)| status::ListenerStatus {
                front: match key.0 {
                    Front::Ebpf => "ebpf",
                    Front::Nat => "nat",
                }
                .into(),
                netns_cookie: served.cookie,
                addresses: served.addrs.clone(),
                actors: self
                    .actors
                    .values()
                    .filter(|e| e.listener == Some(*key))
                    .map(|e| e.actor.id.clone())
                    .collect(),
            })
            .collect();
        listeners.sort_by(|a, b| (&a.front, a.netns_cookie).cmp(&(&b.front, b.netns_cookie)));
        let (attachments, maps, maps_error) = status::pins(self.capture.dir(), &actors);
        let policy = self.ctx.policy();
        let mut problems = status::actor_problems(&actors, &attachments);
        let discovery = self.discovery.as_ref().map(|(node, shared)| {
            let synced = shared.synced();
            if !synced {
                problems.push(format!(
                    "discovery: the first list of the pods on node {node} is not applied yet"
                ));
            }
            status::DiscoveryStatus {
                node: node.clone(),
                synced,
                pods: shared.pods(),
            }
        });
        status::Report {
            version: status::Version::current(),
            uptime_seconds: self.started.elapsed().as_secs(),
            bpffs_dir: self.capture.dir().to_path_buf(),
            pep: self.config.pep.as_ref().map(status::PepSummary::new),
            peps: self
                .config
                .peps
                .values()
                .map(status::PepSummary::new)
                .collect(),
            actor_certs: self
                .ctx
                .actor_certs()
                .into_iter()
                .flat_map(|(pep, certs)| {
                    certs
                        .into_iter()
                        .map(move |c| status::ActorCert::new(&pep, c))
                })
                .collect(),
            pools: self
                .ctx
                .pools()
                .into_iter()
                .map(|(pep, s)| status::PoolSummary::new(&pep, s))
                .collect(),
            policy: status::PolicySummary {
                file: policy.path().map(Path::to_path_buf),
                summary: policy.current().summary(),
            },
            ready: status::Readiness::from_problems(problems),
            actors,
            listeners,
            attachments,
            maps,
            maps_error,
            discovery,
        }
    }

    /// Shows discovery (on `node`) in [`report`](Manager::report) and counts its first list
    /// in readiness there.
    pub fn set_discovery(&mut self, node: String, shared: crate::discovery::kube::Shared) {
        self.discovery = Some((node, shared));
    }

    /// Every actor's spec and source, in id order (cheap: no `nft` run).
    pub fn specs(&self) -> Vec<(ActorSpec, Source)> {
        self.actors
            .values()
            .map(|e| (e.actor.spec(), e.source))
            .collect()
    }

    /// Stops every listener and DNS socket (capture itself stays in force).
    pub fn shutdown(&mut self) {
        for ((front, _), served) in &self.listeners {
            for task in &served.tasks {
                task.abort();
            }
            listener_gauge(self.ctx.metrics(), *front, false);
        }
        self.listeners.clear();
        for entry in self.actors.values_mut() {
            if let Some(dns) = entry.dns.take() {
                dns.close(self.ctx.metrics());
            }
        }
    }

    fn add_actor(
        &mut self,
        actor: Actor,
        source: Source,
        slot: Option<u32>,
    ) -> Result<Status, Error> {
        if let Some(existing) = self.actors.get(&actor.id) {
            if *existing.actor == actor {
                return Ok(self.status(existing));
            }
            return Err(Error::Conflict {
                id: actor.id.clone(),
                problem: "is already registered with a different spec: remove it first".into(),
            });
        }
        if let Some(problem) = self.actors.values().find_map(|e| actor.conflict(&e.actor)) {
            return Err(Error::Conflict {
                id: actor.id.clone(),
                problem,
            });
        }
        let actor = Arc::new(actor);
        // Its certificate (if its PEP takes per-actor ones) starts loading before its
        // connects are redirected, so its first connection finds it.
        self.ctx.actor_added(&actor);
        let entry = match &actor.capture {
            Capture::Cgroup {
                cgroup,
                cgroup_id,
                netns,
            } => self.add_cgroup(&actor, cgroup, *cgroup_id, netns.as_deref(), source),
            Capture::Veth(v) => self.add_veth(&actor, v, source, slot),
        };
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                self.ctx.forget_actor(&actor.id);
                return Err(e);
            }
        };
        let status = self.status(&entry);
        let listeners = format!("{:?}", status.listeners);
        match (&actor.capture, &status.pair) {
            (
                Capture::Cgroup {
                    cgroup,
                    cgroup_id,
                    netns,
                },
                _,
            ) => info!(
                actor = %actor.id,
                template = %actor.template,
                template_namespace = %actor.template_namespace,
                source = source.as_str(),
                pep = %actor.pep,
                capture = "cgroup",
                cgroup = %cgroup.display(),
                cgroup_id,
                netns = %crate::netns::label(netns.as_deref()),
                listeners,
                "actor captured"
            ),
            (Capture::Veth(v), pair) => info!(
                actor = %actor.id,
                template = %actor.template,
                template_namespace = %actor.template_namespace,
                source = source.as_str(),
                pep = %actor.pep,
                capture = "veth",
                netns = %v.netns.display(),
                worker_netns = %crate::netns::label(v.worker_netns.as_deref()),
                veth = pair.as_ref().map_or("", |p| p.worker_if.as_str()),
                address = %pair.as_ref().map_or(String::new(), |p| format!("{}/{}", p.actor, p.prefix_len)),
                gateway = %pair.as_ref().map_or(String::new(), |p| p.worker.to_string()),
                listeners,
                "actor captured"
            ),
        }
        self.ctx
            .metrics()
            .actor_added(&actor.id, capture_name(&actor), source.as_str());
        self.actors.insert(actor.id.clone(), entry);
        self.update_health();
        Ok(status)
    }

    fn add_cgroup(
        &mut self,
        actor: &Arc<Actor>,
        cgroup: &Path,
        cgroup_id: u64,
        netns: Option<&Path>,
        source: Source,
    ) -> Result<Entry, Error> {
        // One namespace whose listener cannot be opened (say, a process there holds the port)
        // must not take the other actors down: the actor stays captured with no listener, so
        // its connects are refused, and the error says why.
        let listener = match self.use_listener(Front::Ebpf, netns) {
            Ok(key) => Some(key),
            Err(e) => {
                error!(actor = %actor.id, error = %e, "the actor stays captured but unserved: its connects are refused");
                self.ctx.metrics().error(ErrorKind::Listener);
                None
            }
        };
        // The actor's own DNS socket, only when it is served at all. Without it the actor's
        // DNS is refused (its entry says so), its TCP still served.
        let dns = match listener {
            Some(_) => match self.open_dns(actor, netns) {
                Ok(dns) => Some(dns),
                Err(e) => {
                    error!(actor = %actor.id, error = %e, "the actor's DNS is refused");
                    self.ctx.metrics().error(ErrorKind::Listener);
                    None
                }
            },
            None => None,
        };
        let entry = listener.and_then(|key| self.listeners.get(&key)).map(|_| {
            let (port, v6) = dns
                .as_ref()
                .map_or((0, false), |(port, v6, _)| (*port, *v6));
            capture::ebpf_entry(self.listener_v6(listener), self.config.listen_port)
                .with_dns(port, true, v6)
        });
        let dns = dns.map(|(_, _, served)| served);
        // The registry first: a connect captured the moment the programs attach must find
        // its actor.
        self.registry
            .write()
            .by_cgroup
            .insert(cgroup_id, actor.clone());
        if let Err(e) = self.capture.register(cgroup, cgroup_id, entry) {
            self.registry.write().by_cgroup.remove(&cgroup_id);
            if let Some(key) = listener {
                self.unuse_listener(key);
            }
            if let Some(dns) = dns {
                dns.close(self.ctx.metrics());
            }
            return Err(e.into());
        }
        Ok(Entry {
            actor: actor.clone(),
            source,
            listener,
            pair: None,
            dns,
        })
    }

    /// Opens and serves a cgroup actor's DNS socket in `netns`: its port, whether it has
    /// IPv6, and the served socket.
    fn open_dns(
        &self,
        actor: &Arc<Actor>,
        netns: Option<&Path>,
    ) -> Result<(u16, bool, ServedDns), Error> {
        // The agent's own namespace is entered by no thread switch at all.
        let identity = crate::netns::identity(netns).ok();
        let netns = if identity.is_some() && identity == crate::netns::identity(None).ok() {
            None
        } else {
            netns
        };
        let socket = DnsSocket::open(netns, self.config.socket_mark)?;
        let (port, v6, addrs) = (socket.port(), socket.has_v6(), socket.addrs());
        let tasks = {
            let _runtime = self.runtime.enter();
            socket.spawn(actor.clone(), self.ctx.clone(), self.shutdown.clone())?
        };
        info!(actor = %actor.id, dns = ?addrs, "DNS socket open");
        self.ctx.metrics().listener_opened(MetricFront::Dns);
        Ok((port, v6, ServedDns { addrs, tasks }))
    }

    fn add_veth(
        &mut self,
        actor: &Arc<Actor>,
        v: &Veth,
        source: Source,
        slot: Option<u32>,
    ) -> Result<Entry, Error> {
        let id = actor.id.clone();
        let pair = self.choose_pair(&id, v, slot)?;
        let key = self.use_listener(Front::Nat, v.worker_netns.as_deref())?;
        let cookie = self.listeners.get(&key).map_or(0, |s| s.cookie);
        let entry = Entry {
            actor: actor.clone(),
            source,
            listener: Some(key),
            pair: Some((pair.clone(), cookie)),
            dns: None,
        };
        // Rules before the link: the moment the actor has a route, its TCP is redirected and
        // everything else dropped; never a window where forwarding passes it through.
        let mut table = self.worker_table(v.worker_identity);
        table.actors.push(nft_actor(actor, v, &pair));
        let setup = nft::apply(v.worker_netns.as_deref(), &table)
            .map_err(|source| Error::nft(&id, source))
            .and_then(|()| {
                veth::enable_forwarding(v.worker_netns.as_deref())
                    .map_err(|source| Error::veth(&id, source))
            })
            .and_then(|_| {
                veth::up(v.worker_netns.as_deref(), &v.netns, &pair)
                    .map_err(|source| Error::veth(&id, source))
            });
        let up = match setup {
            Ok(up) => up,
            Err(e) => {
                // Back to the rules of the other actors: this actor's rules go; a pair of it
                // that is left (one adopted, not made, by this call) is dropped by the guards.
                let table = self.worker_table(v.worker_identity);
                if let Err(undo) = apply_or_remove(&id, v.worker_netns.as_deref(), &table) {
                    error!(actor = %id, error = %undo, "undoing the nftables rules failed");
                }
                self.unuse_listener(key);
                return Err(e);
            }
        };
        self.registry
            .write()
            .by_addr
            .insert((cookie, pair.actor), actor.clone());
        info!(actor = %id, veth = %pair.worker_if, created = up.created,
            "veth pair {}", if up.created { "created" } else { "adopted" });
        Ok(entry)
    }

    /// Deletes a veth actor's pair, then rewrites its worker's table without it.
    fn release_veth(&self, actor: &Actor, v: &Veth, pair: &veth::Pair) -> Result<(), Error> {
        veth::down(v.worker_netns.as_deref(), pair)
            .map_err(|source| Error::veth(&actor.id, source))?;
        let mut table = self.worker_table(v.worker_identity);
        table.actors.retain(|a| a.id != actor.id);
        apply_or_remove(&actor.id, v.worker_netns.as_deref(), &table)
    }

    /// The table of one worker namespace for the veth actors registered there.
    fn worker_table(&self, worker: (u64, u64)) -> nft::Worker {
        nft::Worker {
            listen_port: self.config.veth_listen_port,
            dns_port: self.config.veth_dns_port,
            actors: self
                .veth_actors(worker)
                .map(|(actor, v, pair)| nft_actor(actor, v, pair))
                .collect(),
        }
    }

    /// Slots held by registered veth actors of one worker namespace.
    fn slots_taken(&self, worker: (u64, u64)) -> BTreeSet<u32> {
        self.veth_actors(worker)
            .map(|(_, _, pair)| pair.slot)
            .collect()
    }

    /// The registered veth actors of one worker namespace, with their pairs.
    fn veth_actors(
        &self,
        worker: (u64, u64),
    ) -> impl Iterator<Item = (&Actor, &Veth, &veth::Pair)> {
        self.actors
            .values()
            .filter_map(move |e| match (&e.actor.capture, &e.pair) {
                (Capture::Veth(v), Some((pair, _))) if v.worker_identity == worker => {
                    Some((&*e.actor, v, pair))
                }
                _ => None,
            })
    }

    /// The /30 for a new veth actor: the remembered slot if it is still free, else the lowest
    /// slot neither another actor of the worker nor a leftover interface holds, preferring slots
    /// never freed, then the longest-freed: a new actor does not inherit the address of one
    /// just removed (connections still queued, conntrack entries of the old one).
    fn choose_pair(&self, id: &str, v: &Veth, slot: Option<u32>) -> Result<veth::Pair, Error> {
        let taken = self.slots_taken(v.worker_identity);
        let pool = self.config.veth_pool;
        if let Some(slot) = slot.filter(|s| !taken.contains(s))
            && let Some(pair) = pool.pair(slot)
        {
            return Ok(pair);
        }
        let present: BTreeSet<String> = veth::list(v.worker_netns.as_deref())
            .map_err(|source| Error::veth(id, source))?
            .into_iter()
            .collect();
        let freed: Vec<u32> = self
            .freed
            .iter()
            .filter(|(worker, _)| *worker == v.worker_identity)
            .map(|(_, slot)| *slot)
            .collect();
        let usable = |s: &u32| !taken.contains(s);
        let fresh = (0..pool.capacity()).filter(|s| usable(s) && !freed.contains(s));
        fresh
            .chain(freed.iter().copied().filter(usable))
            .filter_map(|s| pool.pair(s))
            .find(|p| !present.contains(&p.worker_if))
            .ok_or_else(|| Error::PoolExhausted {
                id: id.into(),
                pool,
            })
    }

    /// Remembers a freed slot (oldest first, bounded).
    fn free_slot(&mut self, worker: (u64, u64), slot: u32) {
        self.freed.retain(|&(w, s)| (w, s) != (worker, slot));
        if self.freed.len() >= MAX_FREED {
            self.freed.remove(0);
        }
        self.freed.push((worker, slot));
    }

    /// The listener of `front` in `netns`, opened if this is its first actor.
    fn use_listener(&mut self, front: Front, netns: Option<&Path>) -> Result<ListenerKey, Error> {
        let port = match front {
            Front::Ebpf => self.config.listen_port,
            Front::Nat => self.config.veth_listen_port,
        };
        let identity = crate::netns::identity(netns).map_err(|source| capture::Error::Open {
            netns: crate::netns::label(netns),
            port,
            source,
        })?;
        let key = (front, identity);
        if let Some(served) = self.listeners.get_mut(&key) {
            served.users += 1;
            return Ok(key);
        }
        // The agent's own namespace is entered by no thread switch at all.
        let own = crate::netns::identity(None).ok() == Some(identity);
        let netns = if own { None } else { netns };
        let listener = match front {
            Front::Ebpf => Listener::open(netns, port)?,
            Front::Nat => Listener::open_nat(netns, port, self.config.veth_dns_port)?,
        };
        let cookie = listener.cookie;
        let addrs = listener.addrs();
        let tasks = {
            let _runtime = self.runtime.enter();
            listener.spawn(
                &self.config.bpffs_dir,
                self.ctx.clone(),
                self.shutdown.clone(),
            )?
        };
        info!(front = ?front, netns = %crate::netns::label(netns),
            listeners = ?addrs, "listening");
        listener_gauge(self.ctx.metrics(), front, true);
        self.listeners.insert(
            key,
            Served {
                cookie,
                addrs,
                tasks,
                users: 1,
            },
        );
        Ok(key)
    }

    fn unuse_listener(&mut self, key: ListenerKey) {
        let Some(served) = self.listeners.get_mut(&key) else {
            return;
        };
        served.users -= 1;
        if served.users == 0
            && let Some(served) = self.listeners.remove(&key)
        {
            for task in served.tasks {
                task.abort();
            }
            listener_gauge(self.ctx.metrics(), key.0, false);
            info!(front = ?key.0, listeners = ?served.addrs, "listener closed: no actor left in its namespace");
        }
    }

    fn listener_v6(&self, key: Option<ListenerKey>) -> bool {
        key.and_then(|k| self.listeners.get(&k))
            .is_some_and(|s| s.addrs.iter().any(SocketAddr::is_ipv6))
    }

    /// An actor's status, without its drop counter (that takes an `nft` run: see [`list`]).
    ///
    /// [`list`]: Manager::list
    fn status(&self, entry: &Entry) -> Status {
        Status {
            actor: entry.actor.spec(),
            source: entry.source,
            capture: match entry.actor.capture {
                Capture::Cgroup { .. } => "cgroup",
                Capture::Veth(_) => "veth",
            }
            .into(),
            cgroup_id: entry.actor.cgroup_id(),
            pep: entry.actor.pep.to_string(),
            pair: entry.pair.as_ref().map(|(p, _)| p.clone()),
            listeners: entry
                .listener
                .and_then(|k| self.listeners.get(&k))
                .map(|s| s.addrs.clone())
                .unwrap_or_default(),
            dns: entry
                .dns
                .as_ref()
                .map(|d| d.addrs.clone())
                .unwrap_or_default(),
            dropped_packets: None,
        }
    }

    fn state_path(&self) -> PathBuf {
        self.config.state_dir.join(STATE_FILE)
    }

    fn load_state(&self) -> State {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                Err(e) => {
                    error!(path = %path.display(), error = %e,
                        "the state file is unreadable: actors added at run time before this \
                         start are not adopted; add them again");
                    State::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                error!(path = %path.display(), error = %e, "reading the state file");
                State::default()
            }
        }
    }

    /// Writes the state file, logging a failure.
    fn save_state(&self) {
        if let Err(e) = self.write_state() {
            error!(path = %self.state_path().display(), error = %e,
                "writing the state file failed: a restarted agent will not adopt the actors \
                 added at run time");
        }
    }

    /// Writes the state file (write a temporary file, then rename: never half-written).
    fn write_state(&self) -> io::Result<()> {
        let state = State {
            actors: self
                .actors
                .values()
                .map(|e| Saved {
                    actor: e.actor.spec(),
                    source: e.source,
                    slot: e.pair.as_ref().map(|(p, _)| p.slot),
                })
                .collect(),
        };
        let path = self.state_path();
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.config.state_dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut file, &serde_json::to_vec_pretty(&state)?)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `cgroup` or `veth`: the `capture` label of `egress_actors`.
fn capture_name(actor: &Actor) -> &'static str {
    match actor.capture {
        Capture::Cgroup { .. } => "cgroup",
        Capture::Veth(_) => "veth",
    }
}

/// Counts a listener of `front` opened (`up`) or closed; a NAT listener comes with its
/// worker namespace's DNS socket.
fn listener_gauge(metrics: &Metrics, front: Front, up: bool) {
    let fronts: &[MetricFront] = match front {
        Front::Ebpf => &[MetricFront::Cgroup],
        Front::Nat => &[MetricFront::Veth, MetricFront::Dns],
    };
    for &f in fronts {
        if up {
            metrics.listener_opened(f);
        } else {
            metrics.listener_closed(f);
        }
    }
}

/// Whether the namespace at `path` (`None`: the agent's own) is still the one with `identity`.
fn same_namespace(path: Option<&Path>, identity: (u64, u64)) -> bool {
    crate::netns::identity(path).is_ok_and(|id| id == identity)
}

fn nft_actor(actor: &Actor, v: &Veth, pair: &veth::Pair) -> nft::Actor {
    nft::Actor {
        id: actor.id.clone(),
        veth: pair.worker_if.clone(),
        addr: pair.actor,
        gateway: pair.worker,
        inbound: v.inbound.clone(),
        allow_udp: v.allow_udp,
    }
}

/// Writes the table; removes it only when no actor is left *and* no `egress*` interface is
/// left in the worker namespace. A pair whose deletion failed, or one no actor owns any more,
/// keeps the guards that drop its traffic: it is never left forwarding unfiltered.
fn apply_or_remove(
    id: &str,
    worker_netns: Option<&Path>,
    table: &nft::Worker,
) -> Result<(), Error> {
    if table.actors.is_empty() {
        let left = veth::list(worker_netns).map_err(|e| Error::veth(id, e))?;
        if left.is_empty() {
            return nft::remove(worker_netns)
                .map(|_| ())
                .map_err(|e| Error::nft(id, e));
        }
        warn!(actor = %id, interfaces = ?left,
            "no actor left in this worker namespace but veths of ours are: the table stays and \
             drops their traffic; delete them (`ip link del NAME` in the worker namespace)");
    }
    nft::apply(worker_netns, table).map_err(|e| Error::nft(id, e))
}
