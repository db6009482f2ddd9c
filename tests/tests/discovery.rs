//! Tier 3: actor discovery end to end. The agent runs with `--discovery kubernetes` against a
//! fake API server on the node namespace's loopback, and `--cgroup-root` a test subtree of the
//! real cgroup2 mount laid out as kubelet's cgroupfs driver lays out a BestEffort pod
//! (`kubepods/besteffort/pod<uid>/<container id>`). The pod is listed before its cgroup
//! exists (the race discovery closes by waiting for it); then a "container" process appears
//! in the actor namespace, the agent registers the pod, a curl in the container's cgroup goes
//! through squid with the identity from the pod's annotations, and the pod's DELETED event
//! unregisters it.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces the test made.
use std::{net::IpAddr, path::Path};

use egress_tests::{
    agent::{Agent, AgentOptions},
    cgroup::Cgroup,
    client::curl_command,
    kube::FakeApi,
    pki::TestCa,
    process::{self, ChildGuard, command_in},
    squid::{Squid, SquidConfig},
    topology::Topology,
    upstream::{Upstream, UpstreamSpec},
    world::{NAME, T},
};
use serde_json::Value;

const NET: u8 = 121;
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

fn list(agent: &Agent) -> String {
    let out = agent.control(&["actor", "list"]);
    out.expect_success("actor list");
    out.stdout
}

#[test]
fn a_pod_on_the_node_is_discovered_captured_with_its_identity_and_released_when_deleted() {
    egress_tests::require_root();
    egress_tests::require_commands(&["squid", "curl", "openssl", "sleep", "ip"]);
    let actor_id = format!("kube-actor-{NET}");
    let topo = Topology::new(NET);
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
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake API server in the node")
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
    let mut agent = Agent::start(&topo.node, None, opts);
    agent.wait_ready(T);

    // Listed, but kubelet has not made its cgroup yet: pending, not registered, and the list
    // is complete (synced) all the same.
    agent.wait_for_message("discovery: synced with the API server", T);
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dtest-node")),
        "{requests:?}"
    );
    assert!(!list(&agent).contains(&actor_id), "not before its cgroup");

    // Kubelet makes the pod's cgroup, the runtime its container's, a process starts in it in
    // the pod's network namespace.
    let kubepods = root.child("kubepods");
    let besteffort = kubepods.child("besteffort");
    let pod_cgroup = besteffort.child(&format!("pod{UID}"));
    let container = pod_cgroup.child(CONTAINER);
    let _pause =
        ChildGuard::spawn(command_in("sleep", Some(&topo.actor), Some(&container)).arg("600"));

    let registered = agent.wait_for_message("discovery: pod registered", T);
    assert_eq!(
        registered.field_str("actor").as_deref(),
        Some(actor_id.as_str())
    );
    assert_eq!(registered.field_str("uid").as_deref(), Some(UID));
    assert_eq!(
        registered.field_str("cgroup").as_deref(),
        Some(pod_cgroup.path().display().to_string().as_str()),
        "the pod-level cgroup"
    );
    let listed = list(&agent);
    assert!(
        listed.contains(&actor_id)
            && listed.contains("source=kubernetes")
            && listed.contains("capture=cgroup"),
        "{listed}"
    );

    // The container's connections go through squid with the pod's identity.
    let url = format!("https://{NAME}:8443/");
    let curl = |what: &str| {
        process::run(
            &mut curl_command(
                Some(&topo.actor),
                Some(&container),
                &ca.cert_path(),
                &[(NAME, 8443, IpAddr::V4(topo.upstream_v4()))],
                &url,
            ),
            T,
        )
        .expect_success(what)
        .pid
    };
    curl("curl from the pod's container");
    let entry = squid.wait_for_request("CONNECT", &format!("{NAME}:8443"), T);
    assert_eq!(entry.actor_id.as_deref(), Some(actor_id.as_str()));
    assert_eq!(entry.actor_template.as_deref(), Some("coder"));
    assert_eq!(entry.actor_template_namespace.as_deref(), Some("team-a"));

    // Deleted: unregistered, capture released, the next curl goes straight out.
    api.push_event("DELETED", &pod(&actor_id));
    let unregistered = agent.wait_for_message("discovery: pod unregistered", T);
    assert_eq!(
        unregistered.field_str("actor").as_deref(),
        Some(actor_id.as_str())
    );
    assert!(!list(&agent).contains(&actor_id), "gone from the list");
    curl("curl after the pod's deletion");
    assert_eq!(
        squid.access_log_entries().len(),
        1,
        "no CONNECT after the deletion"
    );
    assert_eq!(
        upstream.seen_on(topo.upstream_addr(8443)).len(),
        2,
        "both curls reached the upstream"
    );
    drop(agent);
}
