//! Tier 3: actor discovery end to end. The agent runs with `--discovery kubernetes` against a
//! fake API server on the node namespace's loopback, and `--cgroup-root` a test subtree of the
//! real cgroup2 mount laid out as kubelet's cgroupfs driver lays out a BestEffort pod
//! (`kubepods/besteffort/pod<uid>/<container id>`). The pod is listed before its cgroup
//! exists (the race discovery closes by waiting for it); then a "container" process appears
//! in the actor namespace, the agent registers the pod, a curl in the container's cgroup goes
//! through squid with the identity from the pod's annotations, and the pod's DELETED event
//! unregisters it. A restarted agent keeps the discovered actor (state file) and unregisters
//! it only when a complete list says the pod is gone.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces the test made.
use std::{net::IpAddr, path::Path};

use egress_tests::{
    agent::{Agent, AgentOptions, admin_get, wait_admin_ready},
    cgroup::Cgroup,
    client::curl_command,
    kube::FakeApi,
    pki::TestCa,
    process::{self, ChildGuard, Output, command_in},
    squid::{Squid, SquidConfig},
    topology::Topology,
    upstream::{Upstream, UpstreamSpec},
    world::{NAME, T},
};
use serde_json::Value;

const NODE: &str = "test-node";
const UID: &str = "5d0c6a4e-1b2f-4c3d-9e8f-7a6b5c4d3e21";
const CONTAINER: &str = "8e5d0a6f3c2b1a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e";

/// The recorded containerd pod, as this test's BestEffort pod on [`NODE`].
fn pod(actor_id: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../egress-agent/tests/fixtures/kube/pod-containerd.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut pod: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    pod["metadata"]["uid"] = UID.into();
    pod["metadata"]["annotations"]["egress.dev/actor-id"] = actor_id.into();
    pod["spec"]["nodeName"] = NODE.into();
    pod["status"]["qosClass"] = "BestEffort".into();
    pod["status"]["containerStatuses"][0]["containerID"] =
        format!("containerd://{CONTAINER}").into();
    pod
}

/// Everything of one discovery test; fields drop in declaration order: the agent and the
/// container process first, the cgroups innermost first, the namespaces last.
struct KubeWorld {
    /// The agent started again after [`KubeWorld::agent`] was killed (dropped first: the
    /// killed one's guard detaches the bpffs dir they share).
    restarted: Option<Agent>,
    agent: Agent,
    opts: AgentOptions,
    api: FakeApi,
    squid: Squid,
    upstream: Upstream,
    ca: TestCa,
    /// The container's cgroup and its process, once made ([`KubeWorld::start_pod`]).
    pod: Option<PodCgroups>,
    /// `--cgroup-root`.
    root: Cgroup,
    topo: Topology,
    actor_id: String,
}

/// Kubelet's directories for the pod and the container's "pause" process.
struct PodCgroups {
    _pause: ChildGuard,
    container: Cgroup,
    pod: Cgroup,
    _besteffort: Cgroup,
    _kubepods: Cgroup,
}

impl KubeWorld {
    /// The agent watching the fake API server, which lists the pod; no cgroup for it yet.
    fn new(net: u8) -> KubeWorld {
        egress_tests::require_root();
        egress_tests::require_commands(&["squid", "curl", "openssl", "sleep", "ip"]);
        let actor_id = format!("kube-actor-{net}");
        let topo = Topology::new(net);
        // `--cgroup-root`: kubelet's tree is made below it once the agent is watching.
        let root = Cgroup::new();
        let ca = TestCa::new();
        let upstream = Upstream::start(
            &topo.upstream,
            &ca,
            UpstreamSpec::new()
                .names(&[NAME])
                .https(topo.upstream_addr(8443)),
        );
        let squid = Squid::start(
            &topo.node,
            SquidConfig::default().host(NAME, IpAddr::V4(topo.upstream_v4())),
        );
        // The API server, on the loopback of the namespace the agent runs in.
        let listener = topo.node.run(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind the fake API server in the node")
        });
        let api = FakeApi::serve(listener);
        api.push_list(&[pod(&actor_id)], "100");
        let mut opts = AgentOptions::new(squid.addr());
        let kubeconfig = opts.run_dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        opts.extra_args.extend(
            [
                "--discovery",
                "kubernetes",
                "--node-name",
                NODE,
                "--kubeconfig",
                &kubeconfig.display().to_string(),
                "--cgroup-root",
                &root.path().display().to_string(),
                "--proc-root",
                "/proc",
            ]
            .map(String::from),
        );
        let mut agent = Agent::start(&topo.node, None, opts.clone());
        agent.wait_ready(T);
        KubeWorld {
            restarted: None,
            agent,
            opts,
            api,
            squid,
            upstream,
            ca,
            pod: None,
            root,
            topo,
            actor_id,
        }
    }

    /// Kubelet makes the pod's cgroup, the runtime its container's, and a process starts in
    /// it in the pod's network namespace.
    fn start_pod(&mut self) {
        let kubepods = self.root.child("kubepods");
        let besteffort = kubepods.child("besteffort");
        let pod = besteffort.child(&format!("pod{UID}"));
        let container = pod.child(CONTAINER);
        let pause = ChildGuard::spawn(
            command_in("sleep", Some(&self.topo.actor), Some(&container)).arg("600"),
        );
        self.pod = Some(PodCgroups {
            _pause: pause,
            container,
            pod,
            _besteffort: besteffort,
            _kubepods: kubepods,
        });
    }

    /// The running agent.
    fn live(&mut self) -> &mut Agent {
        self.restarted.as_mut().unwrap_or(&mut self.agent)
    }

    fn pod_cgroups(&self) -> &PodCgroups {
        self.pod.as_ref().expect("start_pod first")
    }

    /// `actor list` of the running agent.
    fn list(&self) -> String {
        let agent = self.restarted.as_ref().unwrap_or(&self.agent);
        let out = agent.control(&["actor", "list"]);
        out.expect_success("actor list");
        out.stdout
    }

    /// A curl from the pod's container.
    fn curl(&self) -> Output {
        self.curl_in(&self.pod_cgroups().container)
    }

    /// A curl from a process in `cgroup`, in the actor namespace.
    fn curl_in(&self, cgroup: &Cgroup) -> Output {
        process::run(
            &mut curl_command(
                Some(&self.topo.actor),
                Some(cgroup),
                &self.ca.cert_path(),
                &[(NAME, 8443, IpAddr::V4(self.topo.upstream_v4()))],
                &format!("https://{NAME}:8443/"),
            ),
            T,
        )
    }

    /// Waits for the registration of the pod and checks what it says.
    fn expect_registered(&mut self) {
        let registered = self.live().wait_for_message("discovery: pod registered", T);
        assert_eq!(
            registered.field_str("actor").as_deref(),
            Some(self.actor_id.as_str())
        );
        assert_eq!(registered.field_str("uid").as_deref(), Some(UID));
        assert_eq!(
            registered.field_str("cgroup").as_deref(),
            Some(self.pod_cgroups().pod.path().display().to_string().as_str()),
            "the pod-level cgroup"
        );
    }

    /// The `n`th CONNECT squid saw carries the pod's identity.
    fn expect_connect_with_identity(&self, n: usize) {
        let entries = self.squid.wait_for_entries(n, T);
        let entry = &entries[n - 1];
        assert_eq!(entry.uri, format!("{NAME}:8443"));
        assert_eq!(entry.actor_id.as_deref(), Some(self.actor_id.as_str()));
        assert_eq!(entry.actor_template.as_deref(), Some("coder"));
        assert_eq!(entry.actor_template_namespace.as_deref(), Some("team-a"));
    }
}

#[test]
fn a_pod_on_the_node_is_discovered_captured_with_its_identity_and_released_when_deleted() {
    let mut w = KubeWorld::new(121);
    // Listed, but kubelet has not made its cgroup yet: pending, not registered, and the list
    // is complete (synced) all the same.
    w.agent
        .wait_for_message("discovery: synced with the API server", T);
    let requests = w.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dtest-node")),
        "{requests:?}"
    );
    assert!(!w.list().contains(&w.actor_id), "not before its cgroup");

    w.start_pod();
    w.expect_registered();
    let listed = w.list();
    assert!(
        listed.contains(&w.actor_id)
            && listed.contains("source=kubernetes")
            && listed.contains("capture=cgroup"),
        "{listed}"
    );

    // The container's connections go through squid with the pod's identity.
    w.curl().expect_success("curl from the pod's container");
    w.expect_connect_with_identity(1);

    // The operator's view: ready (the first list applied), the pod captured in the metrics
    // and in `status`, the map sizes read from the pins.
    let admin = "127.0.0.1:15090".parse().unwrap();
    wait_admin_ready(&w.topo.node, admin, T);
    let (code, metrics) = admin_get(&w.topo.node, admin, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    for line in [
        r#"egress_discovery_pods{state="captured"} 1"#,
        r#"egress_discovery_pods{state="pending"} 0"#,
        r#"egress_map_entries{map="EGRESS_ACTORS"} 1"#,
        r#"egress_map_capacity{map="EGRESS_ACTORS"} 4096"#,
        r#"egress_actors{capture="cgroup",source="kubernetes"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    let status = w.live().control(&["status", "--json"]);
    status.expect_success("status");
    let status: Value = serde_json::from_str(&status.stdout).expect("status --json");
    let discovery = &status["discovery"];
    assert_eq!(discovery["node"], NODE, "{status}");
    assert_eq!(discovery["synced"], true, "{status}");
    assert_eq!(discovery["pods"][0]["uid"], UID, "{status}");
    assert_eq!(discovery["pods"][0]["state"], "captured", "{status}");
    assert_eq!(
        discovery["pods"][0]["actor"],
        w.actor_id.as_str(),
        "{status}"
    );
    assert_eq!(status["ready"]["ready"], true, "{status}");

    // Deleted: unregistered, capture released, the next curl goes straight out.
    w.api.push_event("DELETED", &pod(&w.actor_id));
    let unregistered = w.agent.wait_for_message("discovery: pod unregistered", T);
    assert_eq!(
        unregistered.field_str("actor").as_deref(),
        Some(w.actor_id.as_str())
    );
    assert!(!w.list().contains(&w.actor_id), "gone from the list");
    w.curl().expect_success("curl after the pod's deletion");
    assert_eq!(
        w.squid.access_log_entries().len(),
        1,
        "no CONNECT after the deletion"
    );
    assert_eq!(
        w.upstream.seen_on(w.topo.upstream_addr(8443)).len(),
        2,
        "both curls reached the upstream"
    );
}

#[test]
fn a_restarted_agent_keeps_a_discovered_actor_until_a_complete_list_says_its_pod_is_gone() {
    let mut w = KubeWorld::new(122);
    w.start_pod();
    w.expect_registered();
    w.curl().expect_success("curl before the restart");
    w.expect_connect_with_identity(1);

    // Killed (no clean-up at all) and started again: the actor comes back from the state
    // file at once, and the list (the pod is still there) leaves it as it is.
    w.agent.kill9();
    let mut again = Agent::start(&w.topo.node, None, w.opts.clone());
    again.wait_ready(T);
    again.wait_for_message("actor added at run time adopted from the state file", T);
    let adopted =
        again.wait_for_message("discovery: pod's actor was registered already (adopted)", T);
    assert_eq!(adopted.field_str("uid").as_deref(), Some(UID));
    again.wait_for_message("discovery: synced with the API server", T);
    w.restarted = Some(again);
    assert!(w.list().contains("source=kubernetes"), "{}", w.list());
    w.curl().expect_success("curl after the restart");
    w.expect_connect_with_identity(2);
    let lines = w.live().lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("discovery: pod registered") || l.contains("actor removed")),
        "the adopted actor is neither removed nor added again: {lines:#?}"
    );

    // The watch expires and the relist no longer has the pod (its deletion was missed):
    // unregistered.
    w.api.push_list(&[], "300");
    w.api.push_gone();
    let unregistered = w.live().wait_for_message("discovery: pod unregistered", T);
    assert_eq!(unregistered.field_str("uid").as_deref(), Some(UID));
    assert!(!w.list().contains(&w.actor_id), "{}", w.list());
    w.curl().expect_success("curl after the relist");
    assert_eq!(
        w.squid.access_log_entries().len(),
        2,
        "no CONNECT once unregistered"
    );
}

/// A second pod claiming the first one's actor id is refused, and its cgroup is blocked:
/// its connects are refused, never sent out uncaptured; its deletion releases the cgroup.
#[test]
fn a_second_pod_with_a_taken_actor_id_is_blocked_not_left_uncaptured() {
    const UID2: &str = "6e1d7b5f-2c30-4d4e-8f90-8b7c6d5e4f32";
    const CONTAINER2: &str = "9f6e1b7a4d3c2b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a";
    let mut w = KubeWorld::new(123);
    w.start_pod();
    w.expect_registered();
    w.curl().expect_success("curl from the first pod");
    w.expect_connect_with_identity(1);

    // The second pod: its own kubelet directories and process, the same annotation.
    let pod2 = w.pod_cgroups()._besteffort.child(&format!("pod{UID2}"));
    let container2 = pod2.child(CONTAINER2);
    let _pause2 =
        ChildGuard::spawn(command_in("sleep", Some(&w.topo.actor), Some(&container2)).arg("600"));
    let mut second = pod(&w.actor_id);
    second["metadata"]["uid"] = UID2.into();
    second["metadata"]["name"] = "coder-2".into();
    second["status"]["containerStatuses"][0]["containerID"] =
        format!("containerd://{CONTAINER2}").into();
    w.api.push_event("ADDED", &second);
    let refused = w.agent.wait_for_message(
        "discovery: pod refused; its cgroup is blocked (connects refused)",
        T,
    );
    assert_eq!(refused.field_str("uid").as_deref(), Some(UID2));

    let out = w.curl_in(&container2);
    assert!(
        !out.success(),
        "the blocked pod's curl must fail: {}",
        out.describe()
    );
    assert_eq!(
        w.squid.access_log_entries().len(),
        1,
        "nothing of the blocked pod reached squid"
    );
    assert_eq!(
        w.upstream.seen_on(w.topo.upstream_addr(8443)).len(),
        1,
        "nothing of the blocked pod went out directly"
    );

    w.api.push_event("DELETED", &second);
    w.agent.wait_for_message("cgroup unblocked: released", T);
    drop(_pause2);
    drop(container2);
    drop(pod2);
}
