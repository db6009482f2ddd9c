//! Tier 3: actors added and removed at run time over the control socket
//! (`egress-agent actor add|list|remove`), and adopted again by a restarted agent from its
//! state file. Same world as `capture.rs` (node, actor and upstream namespaces),
//! but the agent starts with no actor at all.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces a test made.
use egress_tests::{
    agent::Agent,
    squid::SquidConfig,
    world::{NAME, T, World},
};

/// The standard world, with the agent started without actors.
fn empty_world(net: u8) -> World {
    World::new(net, "unused", SquidConfig::default(), |mut o| {
        o.actors.clear();
        o
    })
}

/// `actor add --cgroup` args for the world's actor cgroup and namespace.
fn add_args(w: &World, id: &str) -> Vec<String> {
    [
        "actor",
        "add",
        "--id",
        id,
        "--template",
        "coder",
        "--template-namespace",
        "team-a",
        "--cgroup",
        &w.cgroup.path().display().to_string(),
        "--netns",
        &w.topo.actor.path().display().to_string(),
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn control(agent: &Agent, args: &[String]) -> egress_tests::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.control(&args)
}

#[test]
fn cgroup_actor_added_at_run_time_is_captured_adopted_after_a_restart_and_removed() {
    let mut w = empty_world(30);
    let url = format!("https://{NAME}:8443/");

    // Before any actor: nothing is captured, the curl goes straight to the upstream.
    w.curl(NAME, w.v4(), 8443, &url)
        .expect_success("uncaptured curl");
    assert_eq!(w.upstream.seen_on(w.topo.upstream_addr(8443)).len(), 1);
    assert!(
        w.squid.access_log_entries().is_empty(),
        "squid saw nothing yet"
    );

    let out = control(&w.agent, &add_args(&w, "rt-30"));
    out.expect_success("actor add");
    assert!(out.stdout.contains("rt-30"), "{}", out.describe());
    // The same spec again is a no-op; a different one under the same id is refused.
    control(&w.agent, &add_args(&w, "rt-30")).expect_success("actor add again");
    let mut other = add_args(&w, "rt-30");
    other[5] = "other-template".into();
    let out = control(&w.agent, &other);
    assert!(!out.success(), "a changed spec must be refused");
    assert!(
        out.stderr.contains("different spec"),
        "says why: {}",
        out.describe()
    );

    w.curl(NAME, w.v4(), 8443, &url)
        .expect_success("curl of the added actor");
    let entry = w
        .squid
        .wait_for_request("CONNECT", &format!("{NAME}:8443"), T);
    assert_eq!(entry.actor_id.as_deref(), Some("rt-30"));

    let list = control(&w.agent, &["actor".into(), "list".into()]);
    list.expect_success("actor list");
    assert!(
        list.stdout.contains("rt-30") && list.stdout.contains("capture=cgroup"),
        "{}",
        list.describe()
    );

    // A restarted agent (killed: no clean-up at all) adopts the actor from its state file.
    let dir = w.agent.bpffs_dir().to_path_buf();
    let opts = w.agent_options.clone();
    w.agent.kill9();
    let mut again = Agent::start(&w.topo.node, None, opts);
    again.wait_ready(T);
    again.wait_for_message("actor added at run time adopted from the state file", T);
    assert_eq!(again.bpffs_dir(), dir);
    w.curl(NAME, w.v4(), 8443, &url)
        .expect_success("curl after the restart");
    let entries = w.squid.wait_for_entries(2, T);
    assert_eq!(entries[1].actor_id.as_deref(), Some("rt-30"));

    // Removed: capture released, the listener closed, connects go direct again.
    let out = control(&again, &["actor".into(), "remove".into(), "rt-30".into()]);
    out.expect_success("actor remove");
    again.wait_for_message("listener closed: no actor left in its namespace", T);
    let list = control(&again, &["actor".into(), "list".into()]);
    list.expect_success("actor list");
    assert!(list.stdout.trim().is_empty(), "{}", list.describe());
    assert!(
        !dir.join("links").join(w.cgroup.id().to_string()).exists(),
        "the cgroup's links are unpinned"
    );
    w.curl(NAME, w.v4(), 8443, &url)
        .expect_success("curl after the removal");
    assert_eq!(w.upstream.seen_on(w.topo.upstream_addr(8443)).len(), 4);
    assert_eq!(
        w.squid.access_log_entries().len(),
        2,
        "no new CONNECT after removal"
    );
    let out = control(&again, &["actor".into(), "remove".into(), "rt-30".into()]);
    assert!(
        !out.success() && out.stderr.contains("no actor \"rt-30\""),
        "{}",
        out.describe()
    );
    w.agent = again;
}

#[test]
fn bad_control_requests_are_refused_with_the_reason() {
    let w = empty_world(31);
    let out = w.agent.control(&[
        "actor",
        "add",
        "--id",
        "bad",
        "--cgroup",
        "/nonexistent/egress-test",
    ]);
    assert!(!out.success());
    assert!(
        out.stderr.contains("cgroup v2 directory"),
        "{}",
        out.describe()
    );
    let out = w.agent.control(&["actor", "reapply", "nobody"]);
    assert!(!out.success());
    assert!(out.stderr.contains("no actor"), "{}", out.describe());
    let out = w.agent.control(&[
        "actor",
        "add",
        "--id",
        "half",
        "--veth",
        "--worker-netns",
        "/var/run/netns/none",
    ]);
    assert!(!out.success());
    assert!(out.stderr.contains("needs `netns`"), "{}", out.describe());
    // A second agent on the same control socket refuses to start (with pins of its own, so
    // that its clean-up cannot touch the first agent's).
    let mut opts = w.agent_options.clone();
    opts.bpffs_dir =
        std::path::PathBuf::from("/sys/fs/bpf").join(egress_tests::unique_name("egress-test"));
    let mut second = Agent::start(&w.topo.node, None, opts);
    second.wait_until(T, "the in-use error", |lines| {
        lines
            .iter()
            .find(|l| l.contains("is served by another running agent"))
            .cloned()
    });
    assert!(
        second.wait_exit(T).is_some_and(|s| !s.success()),
        "the second agent exits with an error"
    );
    w.agent
        .control(&["actor", "list"])
        .expect_success("the first agent still answers");
}
