//! The watch of the actor pods on this node (API server, kube-rs `watcher`: field selector
//! `spec.nodeName=<node>`, label selector `egress.dev/capture=true`) and its reconciliation
//! into the actors manager.
//!
//! The reconciler keeps one entry per pod UID. A selected pod is *pending* until its cgroup
//! directory and (for a cgroup actor) a network namespace are found: it is retried every
//! [`RETRY_FAST`] for [`FAST_FOR`], then every [`RETRY_SLOW`] for as long as the pod is there
//! (an error is logged once after [`LONG_PENDING`]). Retries run from the loop's own
//! timer, so a slow pod never holds up the events of the others. A relist (at start, and after
//! the watch expired) removes the discovered actors whose pods are gone, including ones a
//! previous agent left in the state file: until then they stay captured (fail closed).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ::kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use super::{
    Error, Options,
    cgroup::{Layout, Qos, Resolved},
    pod::{self, Mapping, PodActor, PodCapture},
};
use crate::{
    actors::{self, Manager, Source},
    config::{ActorSpec, VethSpec},
};

/// How often a pending pod is retried at first.
pub const RETRY_FAST: Duration = Duration::from_millis(100);
/// How long a pending pod is retried at [`RETRY_FAST`].
pub const FAST_FOR: Duration = Duration::from_secs(30);
/// How often a pending pod is retried after [`FAST_FOR`].
pub const RETRY_SLOW: Duration = Duration::from_secs(5);
/// After how long a pod still pending is logged as an error (it is still retried: giving up
/// could leave it uncaptured when its containers start later, e.g. after a slow volume).
pub const LONG_PENDING: Duration = Duration::from_secs(600);
/// Most pods tracked; beyond it new pods are refused (state `failed`), logged.
pub const MAX_PODS: usize = 10_000;

/// What the reconciler registers actors with: the actors manager, or a fake in tests. Calls
/// may block (netlink, nft): they run off the async threads.
pub trait Registrar: Send + 'static {
    /// Captures a discovered actor (source `kubernetes`); the same spec again is a no-op.
    fn add(&mut self, spec: &ActorSpec) -> Result<(), actors::Error>;
    /// Stops capturing an actor.
    fn remove(&mut self, id: &str) -> Result<(), actors::Error>;
    /// Every registered actor with its source.
    fn actors(&self) -> Vec<(ActorSpec, Source)>;
    /// Captures a cgroup with no actor (its connects refused); its id.
    fn block(&mut self, cgroup: &Path) -> Result<u64, actors::Error>;
    /// Releases a blocked cgroup (unless an actor serves it now).
    fn unblock(&mut self, cgroup_id: u64) -> Result<(), actors::Error>;
}

impl Registrar for Manager {
    fn add(&mut self, spec: &ActorSpec) -> Result<(), actors::Error> {
        self.add_from(spec, Source::Kubernetes).map(|_| ())
    }

    fn remove(&mut self, id: &str) -> Result<(), actors::Error> {
        Manager::remove(self, id).map(|_| ())
    }

    fn actors(&self) -> Vec<(ActorSpec, Source)> {
        self.specs()
    }

    fn block(&mut self, cgroup: &Path) -> Result<u64, actors::Error> {
        Manager::block(self, cgroup)
    }

    fn unblock(&mut self, cgroup_id: u64) -> Result<(), actors::Error> {
        Manager::unblock(self, cgroup_id)
    }
}

/// Finds a pod's cgroup and network namespace: the node's cgroup layout, or a fake in tests.
pub trait Resolve: Send + Sync + 'static {
    /// The pod-level cgroup and the pod's network namespace, or why not (yet).
    fn resolve(&self, pod: &PodActor) -> Result<Resolved, Error>;
    /// Whether `netns` is the namespace of a process in the pod's cgroup `resolved` (a veth
    /// namespace named by the pod's annotation is used only then).
    fn owns_netns(&self, resolved: &Resolved, netns: &Path) -> Result<bool, Error>;
}

impl Resolve for Layout {
    fn resolve(&self, pod: &PodActor) -> Result<Resolved, Error> {
        // The layout probes the other QoS classes when the given one has no directory, so
        // a pod whose status has no class yet is found too.
        Ok(Layout::resolve(
            self,
            &pod.uid,
            pod.qos.unwrap_or(Qos::BestEffort),
            &pod.containers,
        )?)
    }

    fn owns_netns(&self, resolved: &Resolved, netns: &Path) -> Result<bool, Error> {
        Ok(self.netns_in_pod(&resolved.cgroup, netns)?)
    }
}

/// A selected pod's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// Registered: its connections are captured.
    Captured,
    /// Waiting for its cgroup or network namespace.
    Pending,
    /// It cannot be captured (hostNetwork, a sandbox runtime without its netns annotation).
    Unsupported,
    /// Refused (id clash).
    Failed,
}

impl PodState {
    /// Every state, in metric order.
    pub const ALL: [PodState; 4] = [
        PodState::Captured,
        PodState::Pending,
        PodState::Unsupported,
        PodState::Failed,
    ];

    /// Stable name (metric label, status).
    pub const fn as_str(self) -> &'static str {
        match self {
            PodState::Captured => "captured",
            PodState::Pending => "pending",
            PodState::Unsupported => "unsupported",
            PodState::Failed => "failed",
        }
    }
}

/// Kinds of watch events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A pod added or modified.
    Apply,
    /// A pod deleted (or no longer matching the selectors).
    Delete,
    /// A (re)list started.
    Init,
    /// A pod of a (re)list.
    InitApply,
    /// A (re)list completed.
    InitDone,
}

impl EventKind {
    /// Every kind, in metric order.
    pub const ALL: [EventKind; 5] = [
        EventKind::Apply,
        EventKind::Delete,
        EventKind::Init,
        EventKind::InitApply,
        EventKind::InitDone,
    ];

    /// Stable name (metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Apply => "apply",
            EventKind::Delete => "delete",
            EventKind::Init => "init",
            EventKind::InitApply => "init_apply",
            EventKind::InitDone => "init_done",
        }
    }
}

/// Kinds of discovery errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The watch failed (API server unreachable, refused, expired); it is retried with backoff.
    Watch,
    /// A pod's cgroup or network namespace is not found (yet).
    Resolve,
    /// Registering an actor failed.
    Register,
    /// Unregistering an actor failed.
    Unregister,
    /// A pod's actor id is another actor's.
    Conflict,
}

impl ErrorKind {
    /// Every kind, in metric order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Watch,
        ErrorKind::Resolve,
        ErrorKind::Register,
        ErrorKind::Unregister,
        ErrorKind::Conflict,
    ];

    /// Stable name (metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Watch => "watch",
            ErrorKind::Resolve => "resolve",
            ErrorKind::Register => "register",
            ErrorKind::Unregister => "unregister",
            ErrorKind::Conflict => "conflict",
        }
    }
}

/// Counters of discovery, for metrics: pods by state (a gauge), events and errors by kind.
#[derive(Debug, Default)]
pub struct Stats {
    pods: [AtomicU64; 4],
    events: [AtomicU64; 5],
    errors: [AtomicU64; 5],
}

impl Stats {
    /// Pods now in `state`.
    pub fn pods(&self, state: PodState) -> u64 {
        self.pods[state as usize].load(Ordering::Relaxed)
    }

    /// Watch events of `kind` so far.
    pub fn events(&self, kind: EventKind) -> u64 {
        self.events[kind as usize].load(Ordering::Relaxed)
    }

    /// Errors of `kind` so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    fn event(&self, kind: EventKind) {
        self.events[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// One selected pod as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's UID.
    pub uid: String,
    /// The actor id it maps to (empty when unsupported).
    pub actor: String,
    /// Its state.
    pub state: PodState,
    /// Why it is pending, unsupported or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a running discovery shares with the rest of the agent.
#[derive(Clone)]
pub struct Shared {
    synced: watch::Receiver<bool>,
    stats: Arc<Stats>,
    pods: Arc<RwLock<BTreeMap<String, PodReport>>>,
}

impl Shared {
    /// Whether the first complete list of pods has been applied (readiness).
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// A receiver that changes when [`Shared::synced`] does.
    pub fn synced_watch(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Every selected pod, by UID order.
    pub fn pods(&self) -> Vec<PodReport> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A running discovery task.
pub struct Discovery {
    shared: Shared,
    task: JoinHandle<()>,
}

impl Discovery {
    /// Connects to the API server (`--kubeconfig`, else the in-cluster service account, else
    /// `$KUBECONFIG`) and starts watching this node's actor pods into `manager`, until
    /// `shutdown` changes.
    pub async fn start(
        options: &Options,
        manager: Arc<Mutex<Manager>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Discovery, Error> {
        let client = client(options.kubeconfig.as_deref()).await?;
        let reconciler = Reconciler::new(
            manager,
            Arc::new(options.layout.clone()),
            options.veth_runtime_classes.clone(),
        );
        let shared = reconciler.shared();
        let events = watch_pods(client, &options.node_name);
        info!(node = %options.node_name, selector = pod::LABEL_SELECTOR,
            cgroup_root = %options.layout.cgroup_root.display(), "discovery: watching pods");
        let task = tokio::spawn(reconciler.run(events, shutdown));
        Ok(Discovery { shared, task })
    }

    /// What the task shares: readiness, counters, pods.
    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    /// Waits for the task to end (after shutdown).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// A Kubernetes client from `kubeconfig`, else the in-cluster service account, else the
/// default kubeconfig (`$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?;
            ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => match ::kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => ::kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    Error::KubeConfig(format!(
                        "not in a cluster ({in_cluster}) and no usable kubeconfig ({e})"
                    ))
                })?,
        },
    };
    Ok(Client::try_from(config)?)
}

/// The watch of the selected pods on `node`, with kube-rs' default backoff on errors.
pub fn watch_pods(
    client: Client,
    node: &str,
) -> impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(pod::LABEL_SELECTOR);
    watcher(api, config).default_backoff()
}

/// One tracked pod.
struct Tracked {
    /// `namespace/name`.
    name: String,
    /// The actor it maps to; `None` when unsupported.
    actor: Option<PodActor>,
    state: PodState,
    /// The spec registered for it.
    registered: Option<ActorSpec>,
    /// When it became pending, and when it is tried next.
    since: Instant,
    next: Instant,
    /// Why it is not captured (logged when it changes).
    reason: Option<String>,
    /// Its cgroup, blocked (captured with no actor) while it is refused.
    blocked: Option<u64>,
}

/// What one registration attempt came to.
enum Outcome {
    /// Registered now (`false`), or found registered already (`true`: this pod's, or a
    /// previous agent's from the state file).
    Captured(ActorSpec, bool),
    /// Not yet; whether an earlier registration of the pod was removed on the way.
    Retry(ErrorKind, String, bool),
    /// Refused (its id is taken), and the cgroup blocked if that could be done.
    Refused(String, Option<u64>),
}

/// Reconciles watch events into a [`Registrar`].
pub struct Reconciler<R: Registrar> {
    registrar: Arc<Mutex<R>>,
    resolver: Arc<dyn Resolve>,
    veth_classes: Vec<String>,
    pods: HashMap<String, Tracked>,
    /// UIDs seen in the relist under way.
    listing: Option<HashSet<String>>,
    stats: Arc<Stats>,
    synced: watch::Sender<bool>,
    synced_rx: watch::Receiver<bool>,
    reports: Arc<RwLock<BTreeMap<String, PodReport>>>,
}

impl<R: Registrar> Reconciler<R> {
    /// A reconciler registering into `registrar`, resolving pods with `resolver`.
    pub fn new(
        registrar: Arc<Mutex<R>>,
        resolver: Arc<dyn Resolve>,
        veth_classes: Vec<String>,
    ) -> Self {
        let (synced, synced_rx) = watch::channel(false);
        Reconciler {
            registrar,
            resolver,
            veth_classes,
            pods: HashMap::new(),
            listing: None,
            stats: Arc::default(),
            synced,
            synced_rx,
            reports: Arc::default(),
        }
    }

    /// What the reconciler shares while it runs.
    pub fn shared(&self) -> Shared {
        Shared {
            synced: self.synced_rx.clone(),
            stats: self.stats.clone(),
            pods: self.reports.clone(),
        }
    }

    /// Applies `events` until they end or `shutdown` changes, retrying pending pods on its
    /// own timer.
    pub async fn run<S>(mut self, events: S, mut shutdown: watch::Receiver<bool>)
    where
        S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send,
    {
        let events = std::pin::pin!(events);
        let mut events = events.fuse();
        let mut tick = tokio::time::interval(RETRY_FAST);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => self.handle(event).await,
                    Some(Err(e)) => {
                        self.stats.error(ErrorKind::Watch);
                        warn!(error = %e, "discovery: the pod watch failed; retrying with backoff \
                            (captured pods stay captured meanwhile)");
                    }
                    None => break,
                },
                _ = tick.tick() => self.retry_due().await,
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Applies one watch event.
    pub async fn handle(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => {
                self.stats.event(EventKind::Init);
                self.listing = Some(HashSet::new());
            }
            watcher::Event::InitApply(pod) => {
                self.stats.event(EventKind::InitApply);
                if let (Some(listing), Some(uid)) = (&mut self.listing, &pod.metadata.uid) {
                    listing.insert(uid.clone());
                }
                self.apply(&pod).await;
            }
            watcher::Event::InitDone => {
                self.stats.event(EventKind::InitDone);
                self.init_done().await;
            }
            watcher::Event::Apply(pod) => {
                self.stats.event(EventKind::Apply);
                self.apply(&pod).await;
            }
            watcher::Event::Delete(pod) => {
                self.stats.event(EventKind::Delete);
                if let Some(uid) = &pod.metadata.uid {
                    self.forget(uid).await;
                }
            }
        }
        self.publish();
    }

    async fn apply(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        match pod::map(pod, &self.veth_classes) {
            Mapping::Ignored => self.forget(&uid).await,
            Mapping::Unsupported(why) => {
                if !self.pods.contains_key(&uid) && self.pods.len() >= MAX_PODS {
                    self.stats.error(ErrorKind::Register);
                    error!(pod = %name, uid = %uid, max = MAX_PODS,
                        "discovery: too many selected pods on this node; this one is not tracked");
                    return;
                }
                self.unregister(&uid).await;
                if self.pods.get(&uid).and_then(|t| t.reason.as_ref()) != Some(&why) {
                    warn!(pod = %name, uid = %uid, reason = %why,
                        "discovery: pod selected for capture but unsupported; not captured");
                }
                let now = Instant::now();
                // A cgroup blocked while the pod was refused stays blocked: fail closed.
                let blocked = self.pods.get(&uid).and_then(|t| t.blocked);
                self.pods.insert(
                    uid,
                    Tracked {
                        name,
                        actor: None,
                        state: PodState::Unsupported,
                        registered: None,
                        since: now,
                        next: now,
                        reason: Some(why),
                        blocked,
                    },
                );
            }
            Mapping::Actor(actor) => self.apply_actor(uid, name, actor).await,
        }
    }

    async fn apply_actor(&mut self, uid: String, name: String, actor: PodActor) {
        if !self.pods.contains_key(&uid) && self.pods.len() >= MAX_PODS {
            self.stats.error(ErrorKind::Register);
            error!(pod = %name, uid = %uid, max = MAX_PODS,
                "discovery: too many selected pods on this node; this one is not captured");
            return;
        }
        let now = Instant::now();
        let mut still_registered = false;
        if let Some(t) = self.pods.get(&uid) {
            let same = t
                .actor
                .as_ref()
                .is_some_and(|old| same_identity(old, &actor));
            match (&t.registered, same) {
                (Some(spec), true) => {
                    // Unchanged, and still registered (not removed by hand): nothing to do,
                    // unless every container was replaced (a new sandbox: re-resolved).
                    let containers_kept = t.actor.as_ref().is_some_and(|old| {
                        old.containers.is_empty()
                            || actor.containers.is_empty()
                            || old.containers.iter().any(|c| actor.containers.contains(c))
                    });
                    still_registered = containers_kept
                        && self
                            .with_registrar({
                                let id = spec.id.clone();
                                move |r| {
                                    r.actors()
                                        .iter()
                                        .any(|(s, src)| s.id == id && *src == Source::Kubernetes)
                                }
                            })
                            .await
                            .unwrap_or(false);
                }
                (Some(_), false) => self.unregister(&uid).await,
                (None, _) if same && t.state == PodState::Pending => {
                    // Already waiting; the new containers help the next attempt.
                    if let Some(t) = self.pods.get_mut(&uid) {
                        t.actor = Some(actor);
                    }
                    return;
                }
                (None, _) => {}
            }
        }
        if still_registered {
            if let Some(t) = self.pods.get_mut(&uid) {
                t.actor = Some(actor);
            }
            return;
        }
        let registered = self.pods.get(&uid).and_then(|t| t.registered.clone());
        let blocked = self.pods.get(&uid).and_then(|t| t.blocked);
        self.pods.insert(
            uid.clone(),
            Tracked {
                name,
                actor: Some(actor),
                state: PodState::Pending,
                registered,
                since: now,
                next: now,
                reason: None,
                blocked,
            },
        );
        self.attempt(&uid).await;
    }

    /// Tries to register a pending pod now.
    async fn attempt(&mut self, uid: &str) {
        let Some(t) = self.pods.get(uid) else { return };
        let Some(actor) = t.actor.clone() else { return };
        // Ids registered for other pods: never taken over.
        let others: HashSet<String> = self
            .pods
            .iter()
            .filter(|(u, _)| u.as_str() != uid)
            .filter_map(|(_, t)| t.registered.as_ref().map(|s| s.id.clone()))
            .collect();
        let resolver = self.resolver.clone();
        let registrar = self.registrar.clone();
        // The file system first, without the manager's lock (control requests wait on it).
        let outcome = tokio::task::spawn_blocking(move || match spec_for(&*resolver, &actor) {
            Ok(spec) => {
                let mut r = registrar.lock().unwrap_or_else(|e| e.into_inner());
                register(&mut *r, spec, &others)
            }
            Err(why) => Outcome::Retry(ErrorKind::Resolve, why, false),
        })
        .await
        .unwrap_or_else(|e| {
            Outcome::Retry(
                ErrorKind::Register,
                format!("the registration task failed: {e}"),
                false,
            )
        });
        let Some(t) = self.pods.get_mut(uid) else {
            return;
        };
        let now = Instant::now();
        match outcome {
            Outcome::Captured(spec, true) => {
                if t.registered.as_ref() != Some(&spec) {
                    info!(pod = %t.name, uid = %uid, actor = %spec.id,
                        cgroup = %spec.cgroup.as_deref().map_or(String::new(), |c| c.display().to_string()),
                        "discovery: pod's actor was registered already (adopted)");
                }
                t.state = PodState::Captured;
                t.registered = Some(spec);
                t.reason = None;
            }
            Outcome::Captured(spec, false) => {
                if t.registered.as_ref() != Some(&spec) {
                    info!(pod = %t.name, uid = %uid, actor = %spec.id,
                        cgroup = %spec.cgroup.as_deref().map_or(String::new(), |c| c.display().to_string()),
                        netns = %spec.netns.as_deref().map_or(String::new(), |n| n.display().to_string()),
                        capture = if spec.veth.is_some() { "veth" } else { "cgroup" },
                        "discovery: pod registered");
                }
                t.state = PodState::Captured;
                t.registered = Some(spec);
                t.reason = None;
            }
            Outcome::Refused(why, blocked) => {
                self.stats.error(ErrorKind::Conflict);
                if t.reason.as_ref() != Some(&why) {
                    if blocked.is_some() {
                        warn!(pod = %t.name, uid = %uid, reason = %why,
                            "discovery: pod refused; its cgroup is blocked (connects refused)");
                    } else {
                        error!(pod = %t.name, uid = %uid, reason = %why,
                            "discovery: pod refused; not captured");
                    }
                }
                t.state = PodState::Failed;
                t.registered = None;
                t.blocked = t.blocked.or(blocked);
                t.reason = Some(why);
            }
            Outcome::Retry(kind, why, removed) => {
                self.stats.error(kind);
                let waited = now.saturating_duration_since(t.since);
                if removed {
                    t.registered = None;
                }
                if waited >= LONG_PENDING
                    && t.next.saturating_duration_since(t.since) < LONG_PENDING
                {
                    error!(pod = %t.name, uid = %uid, reason = %why, waited = ?waited,
                        "discovery: pod still not captured; retrying every {RETRY_SLOW:?}");
                } else if waited >= FAST_FOR && t.next.saturating_duration_since(t.since) < FAST_FOR
                {
                    warn!(pod = %t.name, uid = %uid, reason = %why, waited = ?waited,
                        "discovery: pod still pending; retrying every {RETRY_SLOW:?}");
                }
                t.state = PodState::Pending;
                t.next = now
                    + if waited < FAST_FOR {
                        RETRY_FAST
                    } else {
                        RETRY_SLOW
                    };
                t.reason = Some(why);
            }
        }
        // Served now: a cgroup blocked while it was refused is released (a no-op when its
        // actor took the same cgroup over).
        if self
            .pods
            .get(uid)
            .is_some_and(|t| t.state == PodState::Captured && t.blocked.is_some())
        {
            self.unblock(uid).await;
        }
    }

    /// Retries the pending pods whose time has come.
    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, t)| t.state == PodState::Pending && t.next <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        for uid in due {
            self.attempt(&uid).await;
        }
        self.publish();
    }

    /// Removes the pods the completed relist did not list, and the discovered actors no
    /// tracked pod claims (a previous agent's, from the state file); then marks synced.
    async fn init_done(&mut self) {
        if let Some(listed) = self.listing.take() {
            let gone: Vec<String> = self
                .pods
                .keys()
                .filter(|uid| !listed.contains(*uid))
                .cloned()
                .collect();
            for uid in gone {
                self.forget(&uid).await;
            }
        }
        let claimed: HashSet<String> = self
            .pods
            .values()
            .filter(|t| {
                t.registered.is_some() || matches!(t.state, PodState::Captured | PodState::Pending)
            })
            .filter_map(|t| t.actor.as_ref().map(|a| a.id.clone()))
            .collect();
        let stats = self.stats.clone();
        let _ = self
            .with_registrar(move |r| {
                let stale: Vec<String> = r
                    .actors()
                    .into_iter()
                    .filter(|(s, src)| *src == Source::Kubernetes && !claimed.contains(&s.id))
                    .map(|(s, _)| s.id)
                    .collect();
                for id in stale {
                    match r.remove(&id) {
                        Ok(()) => info!(actor = %id,
                            "discovery: actor unregistered: its pod is gone (found by a relist)"),
                        Err(e) => {
                            stats.error(ErrorKind::Unregister);
                            error!(actor = %id, error = %e,
                                "discovery: unregistering an actor whose pod is gone failed; it \
                                 stays captured");
                        }
                    }
                }
            })
            .await;
        if !*self.synced.borrow() {
            info!(
                pods = self.pods.len(),
                "discovery: synced with the API server"
            );
        }
        self.synced.send_replace(true);
    }

    /// Stops tracking a pod, unregistering its actor.
    async fn forget(&mut self, uid: &str) {
        self.unregister(uid).await;
        self.unblock(uid).await;
        self.pods.remove(uid);
    }

    /// Releases the pod's blocked cgroup, if it has one (a no-op if an actor serves it now).
    async fn unblock(&mut self, uid: &str) {
        let Some(cgroup_id) = self.pods.get_mut(uid).and_then(|t| t.blocked.take()) else {
            return;
        };
        let result = self
            .with_registrar(move |r| r.unblock(cgroup_id).map_err(|e| e.to_string()))
            .await
            .and_then(|r| r);
        if let Err(e) = result {
            self.stats.error(ErrorKind::Unregister);
            error!(uid = %uid, cgroup_id, error = %e,
                "discovery: releasing a blocked cgroup failed; `egress-agent detach --cgroup-id` \
                 releases it");
        }
    }

    /// Unregisters a pod's actor, if it has one.
    async fn unregister(&mut self, uid: &str) {
        let Some(t) = self.pods.get_mut(uid) else {
            return;
        };
        let Some(spec) = t.registered.take() else {
            return;
        };
        t.state = PodState::Pending;
        let name = t.name.clone();
        let id = spec.id.clone();
        let result = self
            .with_registrar(move |r| match r.remove(&id) {
                Err(actors::Error::NotFound(_)) => Ok(()),
                other => other.map_err(|e| e.to_string()),
            })
            .await
            .and_then(|r| r);
        match result {
            Ok(()) => info!(pod = %name, uid = %uid, actor = %spec.id,
                cgroup = %spec.cgroup.as_deref().map_or(String::new(), |c| c.display().to_string()),
                "discovery: pod unregistered"),
            Err(e) => {
                self.stats.error(ErrorKind::Unregister);
                error!(pod = %name, uid = %uid, actor = %spec.id, error = %e,
                    "discovery: unregistering failed; the actor stays captured until the next \
                     relist removes it");
            }
        }
    }

    /// Runs `f` on the registrar off the async threads.
    async fn with_registrar<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut R) -> T + Send + 'static,
    ) -> Result<T, String> {
        let registrar = self.registrar.clone();
        tokio::task::spawn_blocking(move || {
            let mut r = registrar.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut r)
        })
        .await
        .map_err(|e| format!("the registration task failed: {e}"))
    }

    /// Publishes the pod gauges and reports.
    fn publish(&self) {
        let mut counts = [0u64; 4];
        let mut reports = BTreeMap::new();
        for (uid, t) in &self.pods {
            counts[t.state as usize] += 1;
            reports.insert(
                uid.clone(),
                PodReport {
                    pod: t.name.clone(),
                    uid: uid.clone(),
                    actor: t.actor.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
                    state: t.state,
                    reason: t.reason.clone(),
                },
            );
        }
        for state in PodState::ALL {
            self.stats.pods[state as usize].store(counts[state as usize], Ordering::Relaxed);
        }
        *self.reports.write().unwrap_or_else(|e| e.into_inner()) = reports;
    }
}

/// Whether two mappings of a pod give the same actor (identity and capture).
fn same_identity(a: &PodActor, b: &PodActor) -> bool {
    a.id == b.id
        && a.template == b.template
        && a.template_namespace == b.template_namespace
        && a.capture == b.capture
}

/// Resolves and registers one pod (blocking).
/// The actor spec of a pod: its cgroup and netns resolved (blocking), or why not yet.
fn spec_for(resolver: &dyn Resolve, actor: &PodActor) -> Result<ActorSpec, String> {
    Ok(match &actor.capture {
        PodCapture::Veth {
            netns,
            worker_netns,
        } => {
            // The namespaces come from the pod's annotations: each must be one a process of
            // the pod itself is in, or any pod could point the agent at another pod's.
            let resolved = resolver.resolve(actor).map_err(|e| e.to_string())?;
            let worker = match worker_netns {
                Some(w) => w.clone(),
                // The worker is the pod itself.
                None => resolved.netns.clone().ok_or_else(|| {
                    Error::NoNetns {
                        uid: actor.uid.clone(),
                        cgroup: resolved.cgroup.clone(),
                    }
                    .to_string()
                })?,
            };
            for (annotation, path) in [
                (pod::ANNOTATION_VETH_NETNS, Some(netns)),
                (pod::ANNOTATION_VETH_WORKER_NETNS, worker_netns.as_ref()),
            ] {
                let Some(path) = path else { continue };
                if !resolver
                    .owns_netns(&resolved, path)
                    .map_err(|e| e.to_string())?
                {
                    return Err(format!(
                        "annotation {annotation} names {}, which no process of the pod is in \
                         (yet): only the pod's own namespaces are used",
                        path.display()
                    ));
                }
            }
            ActorSpec {
                id: actor.id.clone(),
                template: actor.template.clone(),
                template_namespace: actor.template_namespace.clone(),
                cgroup: None,
                netns: Some(netns.clone()),
                veth: Some(VethSpec {
                    worker_netns: Some(worker),
                    ..VethSpec::default()
                }),
                pep: actor.pep.clone(),
            }
        }
        PodCapture::Cgroup => {
            let resolved = match resolver.resolve(actor) {
                Ok(r) => r,
                Err(e) => return Err(e.to_string()),
            };
            let Some(netns) = resolved.netns else {
                return Err(Error::NoNetns {
                    uid: actor.uid.clone(),
                    cgroup: resolved.cgroup,
                }
                .to_string());
            };
            ActorSpec {
                id: actor.id.clone(),
                template: actor.template.clone(),
                template_namespace: actor.template_namespace.clone(),
                cgroup: Some(resolved.cgroup),
                netns: Some(netns),
                veth: None,
                pep: actor.pep.clone(),
            }
        }
    })
}

/// Registers a pod's actor unless its id is another's (blocking, under the manager's lock).
/// A refused cgroup pod is blocked instead: its cgroup is captured with no actor, so its
/// connects are refused, never sent out uncaptured.
fn register<R: Registrar>(registrar: &mut R, spec: ActorSpec, others: &HashSet<String>) -> Outcome {
    let cgroup = spec.cgroup.clone();
    match register_actor(registrar, spec, others) {
        Outcome::Refused(why, None) => {
            let blocked = cgroup.and_then(|c| match registrar.block(&c) {
                Ok(id) => Some(id),
                Err(e) => {
                    error!(cgroup = %c.display(), error = %e,
                        "discovery: blocking a refused pod's cgroup failed: not captured");
                    None
                }
            });
            Outcome::Refused(why, blocked)
        }
        other => other,
    }
}

fn register_actor<R: Registrar>(
    registrar: &mut R,
    spec: ActorSpec,
    others: &HashSet<String>,
) -> Outcome {
    if others.contains(&spec.id) {
        return Outcome::Refused(
            format!(
                "actor id {:?} is already another pod's: give this pod its own {} annotation",
                spec.id,
                pod::ANNOTATION_ACTOR_ID
            ),
            None,
        );
    }
    let existing = registrar
        .actors()
        .into_iter()
        .find(|(s, _)| s.id == spec.id);
    if let Some((existing, source)) = existing {
        if source != Source::Kubernetes {
            return Outcome::Refused(
                format!(
                    "actor id {:?} is already a {} actor's (not discovered): give this pod \
                     another {} annotation, or remove that actor",
                    spec.id,
                    source.as_str(),
                    pod::ANNOTATION_ACTOR_ID
                ),
                None,
            );
        }
        if same_capture(&existing, &spec) {
            // Ours already (a previous agent's, adopted from the state file, or this pod's).
            return Outcome::Captured(existing, true);
        }
        // This pod's, or a previous agent's for this pod, capturing something else now (a
        // new sandbox): replaced.
        if let Err(e) = registrar.remove(&spec.id)
            && !matches!(e, actors::Error::NotFound(_))
        {
            return Outcome::Retry(ErrorKind::Unregister, e.to_string(), false);
        }
    }
    match registrar.add(&spec) {
        Ok(()) => Outcome::Captured(spec, false),
        // Taken id, or a PEP (annotation egress.dev/pep) that is not configured: refused, and
        // a cgroup pod's cgroup blocked, never left uncaptured while retried.
        Err(
            e @ (actors::Error::Conflict { .. }
            | actors::Error::Config(crate::config::Error::PepChoice { .. })),
        ) => Outcome::Refused(e.to_string(), None),
        Err(e) => Outcome::Retry(ErrorKind::Register, e.to_string(), true),
    }
}

/// Whether a registered spec captures what `wanted` would: the same identity and cgroup, and
/// the same network namespace even if named by another path (`/proc/<pid>/ns/net` of another
/// process of the pod).
fn same_capture(registered: &ActorSpec, wanted: &ActorSpec) -> bool {
    let same_netns = match (&registered.netns, &wanted.netns) {
        (Some(a), Some(b)) if a != b => {
            match (
                crate::netns::identity(Some(a)),
                crate::netns::identity(Some(b)),
            ) {
                (Ok(x), Ok(y)) => x == y,
                _ => false,
            }
        }
        (a, b) => a == b,
    };
    same_netns
        && registered.id == wanted.id
        && registered.template == wanted.template
        && registered.template_namespace == wanted.template_namespace
        && registered.cgroup == wanted.cgroup
        && registered.veth == wanted.veth
        && registered.pep == wanted.pep
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Refuses every spec as the manager refuses a PEP that is not configured.
    #[derive(Default)]
    struct NoSuchPep {
        blocked: Vec<PathBuf>,
    }

    impl Registrar for NoSuchPep {
        fn add(&mut self, spec: &ActorSpec) -> Result<(), actors::Error> {
            Err(actors::Error::Config(crate::config::Error::PepChoice {
                actor: spec.id.clone(),
                problem: "no PEP is named \"nosuch\"".into(),
            }))
        }
        fn remove(&mut self, id: &str) -> Result<(), actors::Error> {
            Err(actors::Error::NotFound(id.into()))
        }
        fn actors(&self) -> Vec<(ActorSpec, Source)> {
            Vec::new()
        }
        fn block(&mut self, cgroup: &Path) -> Result<u64, actors::Error> {
            self.blocked.push(cgroup.to_path_buf());
            Ok(7)
        }
        fn unblock(&mut self, _: u64) -> Result<(), actors::Error> {
            Ok(())
        }
    }

    #[test]
    fn a_pod_naming_an_unconfigured_pep_is_refused_and_blocked_not_retried() {
        let mut registrar = NoSuchPep::default();
        let spec = ActorSpec {
            id: "team-a/coder-1".into(),
            cgroup: Some("/fake/kubepods/pod1".into()),
            pep: Some("nosuch".into()),
            ..ActorSpec::default()
        };
        match register(&mut registrar, spec, &HashSet::new()) {
            Outcome::Refused(why, Some(id)) => {
                assert_eq!(id, 7);
                assert!(why.contains("nosuch"), "{why}");
            }
            Outcome::Refused(why, None) => panic!("refused but not blocked: {why}"),
            Outcome::Captured(..) => panic!("captured"),
            Outcome::Retry(_, why, _) => panic!("retried (uncaptured meanwhile): {why}"),
        }
        assert_eq!(registrar.blocked, [PathBuf::from("/fake/kubepods/pod1")]);
    }
}
