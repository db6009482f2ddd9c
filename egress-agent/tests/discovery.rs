//! Tier 2: the pod watch against a fake API server on loopback answering recorded API
//! responses (pod lists and streamed watch events, the fixtures under tests/fixtures/kube),
//! driving the reconciler into a fake registrar: the add and remove calls it makes, in order.
//! No root needed: the cgroup resolution is a fake too (the real one is tested on real cgroup
//! directories in its own module and by the privileged `tests/tests/discovery.rs`).
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_agent::{
    actors::{self, Source},
    config::ActorSpec,
    discovery::{
        self,
        cgroup::{Driver, Resolved},
        kube::{ErrorKind, EventKind, PodState, Reconciler, Registrar, Resolve},
        pod::PodActor,
    },
};
use serde_json::Value;

#[path = "support/fake_api.rs"]
mod fake_api;
use fake_api::{FakeApi, query_param};

const T: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture pod with another uid and name, and `annotations` set.
fn variant(name: &str, uid: &str, pod_name: &str, annotations: &[(&str, &str)]) -> Value {
    let mut pod = fixture(name);
    pod["metadata"]["uid"] = uid.into();
    pod["metadata"]["name"] = pod_name.into();
    for (k, v) in annotations {
        pod["metadata"]["annotations"][*k] = (*v).into();
    }
    pod
}

/// Records the calls; refuses what the manager refuses (a changed spec under an id, a cgroup
/// taken).
#[derive(Default)]
struct FakeRegistrar {
    actors: BTreeMap<String, (ActorSpec, Source)>,
    /// Blocked cgroups by their (fake) id.
    blocked: BTreeMap<u64, PathBuf>,
    log: Vec<String>,
}

impl Registrar for FakeRegistrar {
    fn add(&mut self, spec: &ActorSpec) -> Result<(), actors::Error> {
        if let Some((s, _)) = self.actors.get(&spec.id) {
            if s == spec {
                return Ok(());
            }
            return Err(actors::Error::Conflict {
                id: spec.id.clone(),
                problem: "is already registered with a different spec".into(),
            });
        }
        if spec.cgroup.is_some() && self.actors.values().any(|(s, _)| s.cgroup == spec.cgroup) {
            return Err(actors::Error::Conflict {
                id: spec.id.clone(),
                problem: "cgroup taken".into(),
            });
        }
        self.log.push(format!("add {} {}", spec.id, describe(spec)));
        self.actors
            .insert(spec.id.clone(), (spec.clone(), Source::Kubernetes));
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), actors::Error> {
        self.actors
            .remove(id)
            .ok_or_else(|| actors::Error::NotFound(id.into()))?;
        self.log.push(format!("remove {id}"));
        Ok(())
    }

    fn actors(&self) -> Vec<(ActorSpec, Source)> {
        self.actors.values().cloned().collect()
    }

    fn block(&mut self, cgroup: &Path) -> Result<u64, actors::Error> {
        if let Some((id, _)) = self.blocked.iter().find(|(_, c)| c.as_path() == cgroup) {
            return Ok(*id);
        }
        let id = 1000 + self.blocked.len() as u64;
        self.log.push(format!("block {}", cgroup.display()));
        self.blocked.insert(id, cgroup.to_path_buf());
        Ok(id)
    }

    fn unblock(&mut self, cgroup_id: u64) -> Result<(), actors::Error> {
        if let Some(cgroup) = self.blocked.remove(&cgroup_id) {
            self.log.push(format!("unblock {}", cgroup.display()));
        }
        Ok(())
    }
}

fn describe(spec: &ActorSpec) -> String {
    match (&spec.cgroup, &spec.veth) {
        (Some(c), _) => format!("cgroup={}", c.display()),
        (None, Some(_)) => format!(
            "veth={}",
            spec.netns.as_deref().unwrap_or(Path::new("")).display()
        ),
        (None, None) => "?".into(),
    }
}

/// The UID of fixtures/kube/pod-gvisor.json.
const GVISOR_UID: &str = "c0ffee00-1234-4abc-9def-0123456789ab";

/// Resolves the pods whose UID it was given; the others' cgroups "do not exist yet".
#[derive(Default)]
struct FakeLayout(Mutex<HashMap<String, Resolved>>);

impl FakeLayout {
    fn appear(&self, uid: &str) {
        self.0.lock().unwrap().insert(uid.into(), resolved(uid));
    }
}

fn resolved(uid: &str) -> Resolved {
    Resolved {
        cgroup: PathBuf::from(format!("/fake/kubepods/pod{uid}")),
        driver: Driver::Cgroupfs,
        netns: Some(PathBuf::from(format!("/fake/proc/{uid}/ns/net"))),
    }
}

impl Resolve for FakeLayout {
    fn resolve(&self, pod: &PodActor) -> Result<Resolved, discovery::Error> {
        self.0
            .lock()
            .unwrap()
            .get(&pod.uid)
            .cloned()
            .ok_or_else(|| {
                discovery::Error::Cgroup(discovery::cgroup::Error::PodNotFound {
                    uid: pod.uid.clone(),
                    root: "/fake".into(),
                })
            })
    }

    fn owns_netns(&self, resolved: &Resolved, netns: &Path) -> Result<bool, discovery::Error> {
        // The fake pods own the namespace their resolution names, and the gVisor pod's
        // sandbox namespace is its own.
        Ok(resolved.netns.as_deref() == Some(netns)
            || (resolved.cgroup.ends_with(format!("pod{GVISOR_UID}"))
                && netns == Path::new("/run/netns/sbx-gv-1")))
    }
}

fn wait_log(registrar: &Mutex<FakeRegistrar>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + T;
    loop {
        let log = registrar.lock().unwrap().log.clone();
        if log.len() >= n {
            return log;
        }
        if Instant::now() > deadline {
            panic!("{n} registrar calls not seen within {T:?}: {log:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const CONTAINERD_UID: &str = "3f2a9c1e-8b4d-4e6a-9c7b-1d2e3f4a5b6c";
const CRIO_UID: &str = "9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e";
const PENDING_UID: &str = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9";
const CLASH_UID: &str = "7a7a7a7a-0000-4000-8000-000000000001";
const LATE_UID: &str = "7a7a7a7a-0000-4000-8000-000000000002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_register_and_unregister_actors_in_order() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    // What the agent had before: a configured actor, and two discovered ones from the state
    // file: one whose pod is still there (adopted as is), one whose pod is gone.
    let mut fake = FakeRegistrar::default();
    let cfg = ActorSpec {
        id: "cfg-1".into(),
        cgroup: Some("/fake/cfg".into()),
        ..ActorSpec::default()
    };
    let stale = ActorSpec {
        id: "stale-1".into(),
        cgroup: Some("/fake/kubepods/podgone".into()),
        ..ActorSpec::default()
    };
    let r = resolved(CONTAINERD_UID);
    let adopted = ActorSpec {
        id: "actor-coder-1".into(),
        template: "coder".into(),
        template_namespace: "team-a".into(),
        cgroup: Some(r.cgroup),
        netns: r.netns,
        veth: None,
        pep: None,
    };
    fake.actors.insert(cfg.id.clone(), (cfg, Source::Config));
    fake.actors
        .insert(stale.id.clone(), (stale, Source::Kubernetes));
    fake.actors
        .insert(adopted.id.clone(), (adopted, Source::Kubernetes));
    let registrar = Arc::new(Mutex::new(fake));
    let layout = Arc::new(FakeLayout::default());
    for uid in [CONTAINERD_UID, CRIO_UID, CLASH_UID, LATE_UID, GVISOR_UID] {
        layout.appear(uid);
    }

    let containerd = fixture("pod-containerd.json");
    let crio = fixture("pod-crio.json");
    let pending = fixture("pod-pending.json");
    let host_network = fixture("pod-hostnetwork.json");
    let gvisor = fixture("pod-gvisor.json");
    // Claims the configured actor's id: refused, never replaces it.
    let clash = variant(
        "pod-crio.json",
        CLASH_UID,
        "clash",
        &[("egress.dev/actor-id", "cfg-1")],
    );
    api.push_list(
        &[
            containerd.clone(),
            crio.clone(),
            pending.clone(),
            host_network,
            clash.clone(),
        ],
        "100",
    );

    let client = discovery::kube::client(Some(&kubeconfig))
        .await
        .expect("a client from the kubeconfig");
    let reconciler = Reconciler::new(
        registrar.clone(),
        layout.clone(),
        discovery::parse_list(discovery::DEFAULT_VETH_RUNTIME_CLASSES),
    );
    let shared = reconciler.shared();
    assert!(!shared.synced());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task =
        tokio::spawn(reconciler.run(discovery::kube::watch_pods(client, "test-node"), stopped));

    // The first list: the CRI-O pod is added, the adopted actor left alone, the clash
    // refused and its cgroup blocked (connects refused, never uncaptured), the pending pod
    // waits, and the stale actor goes once the list is complete.
    let mut synced = shared.synced_watch();
    tokio::time::timeout(T, synced.wait_for(|s| *s))
        .await
        .expect("synced within the timeout")
        .expect("synced");
    let crio_cgroup = format!("cgroup=/fake/kubepods/pod{CRIO_UID}");
    let log = {
        let registrar = registrar.clone();
        tokio::task::spawn_blocking(move || wait_log(&registrar, 3))
            .await
            .unwrap()
    };
    assert_eq!(
        log,
        [
            format!("add team-b/coder-crio {crio_cgroup}"),
            format!("block /fake/kubepods/pod{CLASH_UID}"),
            "remove stale-1".into(),
        ]
    );
    let list = &api.wait_requests("/api/v1/pods", 1, T)[0];
    assert_eq!(query_param(list, "watch"), None, "{list}");
    assert_eq!(
        query_param(list, "fieldSelector").as_deref(),
        Some("spec.nodeName=test-node"),
        "{list}"
    );
    assert_eq!(
        query_param(list, "labelSelector").as_deref(),
        Some("egress.dev/capture=true"),
        "{list}"
    );
    let pods = shared.pods();
    let state_of = |uid: &str| pods.iter().find(|p| p.uid == uid).map(|p| p.state);
    assert_eq!(state_of(CONTAINERD_UID), Some(PodState::Captured));
    assert_eq!(state_of(PENDING_UID), Some(PodState::Pending));
    assert_eq!(state_of(CLASH_UID), Some(PodState::Failed));
    assert_eq!(
        state_of("aa11bb22-cc33-4d44-8e55-ff6677889900"),
        Some(PodState::Unsupported)
    );
    assert!(
        registrar.lock().unwrap().actors.contains_key("cfg-1"),
        "the configured actor is never replaced"
    );

    // The pending pod's cgroup appears: the retry registers it, no event needed.
    layout.appear(PENDING_UID);
    let log = {
        let registrar = registrar.clone();
        tokio::task::spawn_blocking(move || wait_log(&registrar, 4))
            .await
            .unwrap()
    };
    assert_eq!(
        log[3],
        format!("add actor-coder-2 cgroup=/fake/kubepods/pod{PENDING_UID}")
    );

    // The watch: a gVisor pod (veth), an identity change, a bookmark, a deletion, a pod
    // that finished, then 410 Gone: the watcher relists.
    api.push_event("ADDED", &gvisor);
    let mut renamed = containerd.clone();
    renamed["metadata"]["annotations"]["egress.dev/actor-id"] = "actor-coder-1b".into();
    api.push_event("MODIFIED", &renamed);
    api.push_bookmark("150");
    api.push_event("DELETED", &crio);
    let mut finished = pending.clone();
    finished["status"]["phase"] = "Succeeded".into();
    api.push_event("MODIFIED", &finished);
    api.push_gone();
    // The relist: the gVisor pod is gone (missed deletion), a new pod is there.
    let late = variant("pod-crio.json", LATE_UID, "late", &[]);
    let mut late = late;
    late["metadata"]["namespace"] = "team-a".into();
    api.push_list(&[renamed.clone(), late, clash], "200");

    let log = {
        let registrar = registrar.clone();
        tokio::task::spawn_blocking(move || wait_log(&registrar, 11))
            .await
            .unwrap()
    };
    assert_eq!(
        log[4..],
        [
            "add sbx-gv-1 veth=/run/netns/sbx-gv-1".to_string(),
            "remove actor-coder-1".into(),
            format!("add actor-coder-1b cgroup=/fake/kubepods/pod{CONTAINERD_UID}"),
            "remove team-b/coder-crio".into(),
            "remove actor-coder-2".into(),
            format!("add team-a/late cgroup=/fake/kubepods/pod{LATE_UID}"),
            "remove sbx-gv-1".into(),
        ]
    );
    let watches = api.wait_requests("watch=true", 1, T);
    for (k, v) in [
        ("fieldSelector", "spec.nodeName=test-node"),
        ("labelSelector", "egress.dev/capture=true"),
        ("allowWatchBookmarks", "true"),
    ] {
        assert_eq!(
            query_param(&watches[0], k).as_deref(),
            Some(v),
            "{}",
            watches[0]
        );
    }
    let lists: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| query_param(r, "watch").is_none())
        .collect();
    assert_eq!(lists.len(), 2, "one relist after 410 Gone: {lists:?}");

    // Counters for the metrics.
    let stats = shared.stats();
    assert_eq!(stats.events(EventKind::Init), 2);
    assert_eq!(stats.events(EventKind::InitDone), 2);
    assert_eq!(stats.events(EventKind::InitApply), 8);
    assert_eq!(stats.events(EventKind::Apply), 3);
    assert_eq!(stats.events(EventKind::Delete), 1);
    assert!(stats.errors(ErrorKind::Watch) >= 1, "the 410 counts");
    assert!(stats.errors(ErrorKind::Conflict) >= 1, "the clash counts");
    assert!(
        stats.errors(ErrorKind::Resolve) >= 1,
        "the pending pod's tries count"
    );
    assert_eq!(stats.pods(PodState::Captured), 2);
    assert_eq!(stats.pods(PodState::Failed), 1);
    assert_eq!(stats.pods(PodState::Pending), 0);
    assert_eq!(stats.pods(PodState::Unsupported), 0);
    let kinds: Vec<(String, Source)> = registrar
        .lock()
        .unwrap()
        .actors
        .values()
        .map(|(s, src)| (s.id.clone(), *src))
        .collect();
    assert_eq!(
        kinds,
        [
            ("actor-coder-1b".to_string(), Source::Kubernetes),
            ("cfg-1".into(), Source::Config),
            ("team-a/late".into(), Source::Kubernetes),
        ]
    );

    stop.send_replace(true);
    tokio::time::timeout(T, task)
        .await
        .expect("the reconciler stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_retried_and_never_synced() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let reconciler = Reconciler::new(
        Arc::new(Mutex::new(FakeRegistrar::default())),
        Arc::new(FakeLayout::default()),
        vec![],
    );
    let shared = reconciler.shared();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task =
        tokio::spawn(reconciler.run(discovery::kube::watch_pods(client, "test-node"), stopped));
    let deadline = Instant::now() + T;
    while shared.stats().errors(ErrorKind::Watch) < 2 {
        assert!(Instant::now() < deadline, "the watch is retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!shared.synced(), "never synced without a list");
    stop.send_replace(true);
    tokio::time::timeout(T, task).await.unwrap().unwrap();
}
