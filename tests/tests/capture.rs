//! Tier 3: the agent on the real kernel. Each test builds its own world (node, actor and
//! upstream network namespaces: the actor on 10.251.NET.0/24 and the upstream on
//! 10.250.NET.0/24, both linked to the node, which routes between them; a fresh actor cgroup;
//! upstream servers in the upstream namespace and a real squid in the node namespace), starts
//! the real agent binary and drives real curl / openssl / bash clients inside the actor's
//! cgroup and namespace.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces a test made.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use egress_tests::{
    agent::{ActorSpec, Agent, AgentOptions},
    cgroup::Cgroup,
    client::{banner_exchange_command, curl_command},
    counter,
    netns::{Netns, veth},
    pki::TestCa,
    process::{self, command_in},
    refusal,
    squid::{AccessEntry, Squid, SquidConfig},
    topology::Topology,
    upstream::{BANNER, Upstream, UpstreamSpec},
    world::{NAME, NAME6, T, World},
};

/// The standard world with actor `actor-NET`.
fn world(net: u8) -> World {
    World::new(net, &format!("actor-{net}"), SquidConfig::default(), |o| o)
}

fn assert_identity(entry: &AccessEntry, actor: &str, original: SocketAddr, authority: &str) {
    entry.assert_identity((actor, "coder", "team-a"), original, authority);
}

#[test]
fn https_on_443_and_8443_goes_through_squid_with_identity() {
    let mut w = world(11);
    for port in [443u16, 8443] {
        let url = format!("https://{NAME}:{port}/");
        let out = w.curl(NAME, w.v4(), port, &url);
        out.expect_success(&format!("curl {url} from the actor"));
        assert!(
            out.stdout.contains(&format!("sni={NAME}")),
            "upstream answer: {}",
            out.stdout
        );

        let original = w.topo.upstream_addr(port);
        let authority = format!("{NAME}:{port}");
        let entry = w.squid.wait_for_request("CONNECT", &authority, T);
        assert_identity(&entry, "actor-11", original, &authority);
        let conn = w.agent_line(original);
        assert_eq!(conn.authority.as_deref(), Some(authority.as_str()));
        assert_eq!(conn.source.as_deref(), Some("sni"));
        assert_eq!(conn.pep_status, Some(200));
        assert_eq!(conn.pid, Some(out.pid), "the record carries curl's pid");
        assert_eq!(conn.actor.as_deref(), Some("actor-11"));
        assert_eq!(conn.outcome.as_deref(), Some("tunneled"));
        assert!(conn.bytes_up.unwrap_or(0) > 0 && conn.bytes_down.unwrap_or(0) > 0);
        assert_eq!(
            conn.line.field_str("relay").as_deref(),
            Some("splice"),
            "a plain-TCP PEP link is spliced: {:?}",
            conn.line
        );
        let seen = w.upstream.seen_on(original);
        assert_eq!(
            seen.len(),
            1,
            "one connection reached the upstream on {port}"
        );
        assert_eq!(seen[0].sni.as_deref(), Some(NAME));
        assert_eq!(
            seen[0].peer.ip(),
            IpAddr::V4(w.topo.node_uplink_v4()),
            "it came from squid in the node namespace, not from the actor"
        );
    }
}

#[test]
fn http_host_on_a_non_80_port() {
    let mut w = world(12);
    let out = w.curl(NAME, w.v4(), 8080, &format!("http://{NAME}:8080/x"));
    out.expect_success("curl http from the actor");
    assert!(
        out.stdout.contains(&format!("host={NAME}:8080")),
        "{}",
        out.stdout
    );
    let original = w.topo.upstream_addr(8080);
    let authority = format!("{NAME}:8080");
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    assert_identity(&entry, "actor-12", original, &authority);
    let conn = w.agent_line(original);
    assert_eq!(conn.source.as_deref(), Some("host"));
    assert_eq!(conn.authority.as_deref(), Some(authority.as_str()));
}

#[test]
fn server_first_protocol_works_via_ip_port() {
    let mut w = world(13);
    let original = w.topo.upstream_addr(2222);
    let out = process::run(
        &mut banner_exchange_command(Some(&w.topo.actor), Some(&w.cgroup), original),
        T,
    );
    out.expect_success("server-first exchange from the actor");
    let banner = BANNER.trim_end();
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        vec![banner, "ping"],
        "banner then echo"
    );
    let authority = original.to_string();
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    assert_identity(&entry, "actor-13", original, &authority);
    let conn = w.agent_line(original);
    assert_eq!(conn.source.as_deref(), Some("ip"));
}

#[test]
fn openssl_s_client_sni_is_classified() {
    let mut w = world(14);
    let original = w.topo.upstream_addr(8443);
    let mut cmd = command_in("openssl", Some(&w.topo.actor), Some(&w.cgroup));
    cmd.args([
        "s_client",
        "-connect",
        &original.to_string(),
        "-servername",
        NAME,
        "-CAfile",
    ])
    .arg(w.ca.cert_path())
    .args(["-verify_return_error", "-brief", "-ign_eof"]);
    let out = process::run_with_input(
        &mut cmd,
        b"GET / HTTP/1.1\r\nHost: web.egress.test\r\nConnection: close\r\n\r\n",
        T,
    );
    out.expect_success("openssl s_client from the actor");
    assert!(
        out.stdout.contains(&format!("sni={NAME}")),
        "{}",
        out.describe()
    );
    let authority = format!("{NAME}:8443");
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    assert_identity(&entry, "actor-14", original, &authority);
    assert_eq!(w.agent_line(original).source.as_deref(), Some("sni"));
}

#[test]
fn ipv6_destination_is_captured() {
    let w = world(15);
    let original = w.topo.upstream_addr6(8443);
    let out = w.curl(
        NAME6,
        IpAddr::V6(w.topo.upstream_v6()),
        8443,
        &format!("https://{NAME6}:8443/"),
    );
    out.expect_success("curl over IPv6 from the actor");
    let authority = format!("{NAME6}:8443");
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    assert_identity(&entry, "actor-15", original, &authority);
    assert!(
        entry
            .original_destination
            .as_deref()
            .is_some_and(|d| d.starts_with('[')),
        "IPv6 in brackets"
    );
    let seen = w.upstream.seen_on(original);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some(NAME6));
}

/// Squid refuses (403 for a port, 403 for a domain): the actor's clients get the refusal in
/// their own protocol, never a reset.
#[test]
fn pep_refusals_as_the_actor_sees_them() {
    const DENIED: &str = "denied.egress.test";
    let mut w = World::new(
        16,
        "actor-16",
        SquidConfig::default()
            .deny_port(8443)
            .deny_port(2222)
            .deny_domain(DENIED),
        |o| o,
    );
    let refusal = |conn: &egress_tests::agent::ConnectionLog| {
        assert_eq!(
            conn.outcome.as_deref(),
            Some("pep_refused"),
            "{:?}",
            conn.line
        );
        assert_eq!(conn.pep_status, Some(403), "{:?}", conn.line);
        conn.line.field_str("refusal").unwrap_or_default()
    };

    // TLS: curl and openssl print the alert.
    let tls = w.topo.upstream_addr(8443);
    let out = w.curl(NAME, w.v4(), 8443, &format!("https://{NAME}:8443/"));
    refusal::assert_curl_tls_access_denied(&out);
    assert_eq!(refusal(&w.agent_line(tls)), "tls_alert");
    refusal::assert_s_client_access_denied(Some(&w.topo.actor), Some(&w.cgroup), tls, NAME);
    let conn = w.agent.wait_for_connection_to(tls, 1, T);
    assert_eq!(refusal(&conn), "tls_alert");

    // Plain HTTP to a denied domain: the agent's 403.
    let http = w.topo.upstream_addr(8080);
    let url = format!("http://{DENIED}:8080/");
    let out = process::run(
        &mut refusal::with_status(w.curl_command(true, DENIED, w.v4(), 8080, &url)),
        T,
    );
    refusal::assert_curl_got_403(&out);
    let conn = w.agent_line(http);
    assert_eq!(conn.authority.as_deref(), Some("denied.egress.test:8080"));
    assert_eq!(refusal(&conn), "http_403");

    // Any other TCP: a clean EOF with no bytes.
    let raw = w.topo.upstream_addr(2222);
    refusal::assert_raw_tcp_clean_eof(Some(&w.topo.actor), Some(&w.cgroup), raw, "PING\\r\\n");
    assert_eq!(refusal(&w.agent_line(raw)), "close");

    for addr in [tls, http, raw] {
        assert!(
            w.upstream.seen_on(addr).is_empty(),
            "nothing reached the upstream at {addr}"
        );
    }
}

#[test]
fn two_actors_in_two_namespaces_keep_their_identities() {
    egress_tests::require_root();
    let topo = Topology::new(17);
    // A second actor namespace, also wired to the node.
    let actor2 = Netns::new();
    let _veth2 = veth(
        &topo.node,
        &actor2,
        &["10.251.117.1/24"],
        &["10.251.117.2/24"],
    );
    actor2.ip(&["route", "add", "default", "via", "10.251.117.1"]);
    let (cg1, cg2) = (Cgroup::new(), Cgroup::new());
    let ca = TestCa::new();
    let web = topo.upstream_addr(8443);
    let upstream = Upstream::start(
        &topo.upstream,
        &ca,
        UpstreamSpec::new().names(&[NAME]).https(web),
    );
    let squid = Squid::start(
        &topo.node,
        SquidConfig::default().host(NAME, IpAddr::V4(topo.upstream_v4())),
    );
    let mut opts = AgentOptions::new(squid.addr())
        .actor(ActorSpec::new("alice", "coder", "team-a", &cg1).netns(&topo.actor))
        .actor(ActorSpec::new("bob", "coder", "team-a", &cg2).netns(&actor2));
    opts.config_file = true;
    let mut agent = Agent::start(&topo.node, None, opts);
    agent.wait_ready(T);

    // Both at the same time, with the same listener port in each namespace.
    let run = |netns: &Netns, cgroup: &Cgroup| {
        curl_command(
            Some(netns),
            Some(cgroup),
            &ca.cert_path(),
            &[(NAME, 8443, IpAddr::V4(topo.upstream_v4()))],
            &format!("https://{NAME}:8443/"),
        )
    };
    let (mut c1, mut c2) = (run(&topo.actor, &cg1), run(&actor2, &cg2));
    let h1 = std::thread::spawn(move || process::run(&mut c1, T));
    let h2 = std::thread::spawn(move || process::run(&mut c2, T));
    let (o1, o2) = (h1.join().unwrap(), h2.join().unwrap());
    o1.expect_success("alice's curl");
    o2.expect_success("bob's curl");

    let entries = squid.wait_for_entries(2, T);
    let mut ids: Vec<_> = entries.iter().filter_map(|e| e.actor_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);
    for e in &entries {
        assert_identity(
            e,
            e.actor_id.as_deref().unwrap(),
            web,
            &format!("{NAME}:8443"),
        );
    }
    let conns = agent.wait_for_connections(2, T);
    for (actor, out) in [("alice", &o1), ("bob", &o2)] {
        let c = conns
            .iter()
            .find(|c| c.actor.as_deref() == Some(actor))
            .expect("a line per actor");
        assert_eq!(
            c.pid,
            Some(out.pid),
            "{actor}'s record carries its own curl's pid"
        );
    }
    assert_eq!(upstream.seen_on(web).len(), 2);
}

#[test]
fn a_process_outside_the_cgroup_is_not_captured() {
    let mut w = world(18);
    // Same namespace, no cgroup: goes straight over the veth.
    let out = process::run(
        &mut w.curl_command(false, NAME, w.v4(), 8443, &format!("https://{NAME}:8443/")),
        T,
    );
    out.expect_success("uncaptured curl");
    let seen = w.upstream.seen_on(w.topo.upstream_addr(8443));
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].peer.ip(),
        IpAddr::V4(w.topo.actor_v4()),
        "came directly from the actor's address"
    );
    // Then a captured one, to show the world does capture.
    w.curl(NAME, w.v4(), 8443, &format!("https://{NAME}:8443/"))
        .expect_success("captured curl");
    let entries = w.squid.wait_for_entries(1, T);
    assert_eq!(
        entries.len(),
        1,
        "only the captured connection went through squid: {entries:?}"
    );
    let conns = w.agent.wait_for_connections(1, T);
    assert_eq!(conns.len(), 1, "only one connection reached the agent");
    let seen = w.upstream.seen_on(w.topo.upstream_addr(8443));
    assert_eq!(
        seen[1].peer.ip(),
        IpAddr::V4(w.topo.node_uplink_v4()),
        "the captured one came from squid"
    );
}

#[test]
fn the_agent_inside_a_captured_cgroup_does_not_capture_itself() {
    egress_tests::require_root();
    let topo = Topology::new(19);
    let cgroup = Cgroup::new();
    // The agent runs in a child of the actor's cgroup: every connect it makes runs the
    // actor's programs. Without its exemption its CONNECT to squid would be redirected to a
    // listener that is not in its namespace and fail.
    let agent_cgroup = cgroup.child("agent");
    let ca = TestCa::new();
    let web = topo.upstream_addr(8443);
    let upstream = Upstream::start(
        &topo.upstream,
        &ca,
        UpstreamSpec::new().names(&[NAME]).https(web),
    );
    let squid = Squid::start(
        &topo.node,
        SquidConfig::default().host(NAME, IpAddr::V4(topo.upstream_v4())),
    );
    let opts = AgentOptions::new(squid.addr())
        .actor(ActorSpec::new("actor-19", "coder", "team-a", &cgroup).netns(&topo.actor));
    let mut agent = Agent::start(&topo.node, Some(&agent_cgroup), opts);
    agent.wait_ready(T);
    assert!(
        agent_cgroup.pids().contains(&(agent.pid() as i32)),
        "the agent runs in the captured subtree"
    );

    let out = process::run(
        &mut curl_command(
            Some(&topo.actor),
            Some(&cgroup),
            &ca.cert_path(),
            &[(NAME, 8443, IpAddr::V4(topo.upstream_v4()))],
            &format!("https://{NAME}:8443/"),
        ),
        T,
    );
    out.expect_success("curl from the actor");
    let entries = squid.wait_for_entries(1, T);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].actor_id.as_deref(), Some("actor-19"));
    assert_eq!(upstream.seen_on(web).len(), 1);
    let stats = egress_agent::ebpf::map_stats(agent.bpffs_dir()).expect("map stats");
    let count = |name: &str| counter(&stats, name);
    assert!(
        count("agent_skipped") >= 1,
        "the agent's own connect was seen and left alone: {stats:?}"
    );
    assert_eq!(
        count("redirected"),
        1,
        "only the actor's connect was redirected: {stats:?}"
    );
}

#[test]
fn getpeername_shows_the_original_destination() {
    let w = world(20);
    let probe = env!("CARGO_BIN_EXE_egress-probe");
    for original in [w.topo.upstream_addr(8080), w.topo.upstream_addr6(8443)] {
        let mut cmd = command_in(probe, Some(&w.topo.actor), Some(&w.cgroup));
        cmd.args(["peername", &original.to_string()]);
        let out = process::run(&mut cmd, T);
        out.expect_success("probe peername");
        assert_eq!(
            out.stdout.trim(),
            format!("peer={original}"),
            "not the agent's listener"
        );
    }
}

#[test]
fn ten_thousand_connections_leave_no_map_entries() {
    let w = world(21);
    let probe = env!("CARGO_BIN_EXE_egress-probe");
    let mut cmd = command_in(probe, Some(&w.topo.actor), Some(&w.cgroup));
    let count = 10_000;
    cmd.args([
        "http-many",
        &w.topo.upstream_addr(8080).to_string(),
        NAME,
        &count.to_string(),
        "8",
    ]);
    let out = process::run(&mut cmd, Duration::from_secs(600));
    out.expect_success("10,000 captured HTTP requests");
    assert!(
        out.stdout.contains(&format!("ok={count} failed=0")),
        "{}",
        out.stdout
    );
    // The last closes are processed by the kernel shortly after the client returns.
    let dir = w.agent.bpffs_dir().to_path_buf();
    let mut stats = egress_agent::ebpf::map_stats(&dir).expect("map stats");
    for _ in 0..50 {
        if stats.sockets == 0 && stats.conns == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = egress_agent::ebpf::map_stats(&dir).expect("map stats");
    }
    assert_eq!(
        (stats.sockets, stats.conns),
        (0, 0),
        "stale entries after {count} connections: {stats:?}"
    );
    assert_eq!(stats.actors, 1);
    assert_eq!(counter(&stats, "redirected"), count as u64);
    assert_eq!(counter(&stats, "published"), count as u64);
    assert_eq!(w.upstream.seen_on(w.topo.upstream_addr(8080)).len(), count);
}

#[test]
fn kill_9_fails_closed_and_a_restarted_agent_serves_again() {
    let mut w = world(22);
    let url = format!("https://{NAME}:8443/");
    w.curl(NAME, w.v4(), 8443, &url)
        .expect_success("curl before the kill");
    let dir = w.agent.bpffs_dir().to_path_buf();
    w.agent.kill9();

    // Capture outlives the agent: the connect is refused, and nothing goes direct.
    let out = w.curl(NAME, w.v4(), 8443, &url);
    assert_eq!(
        out.code(),
        Some(7),
        "curl must fail to connect: {}",
        out.describe()
    );
    assert_eq!(
        w.upstream.seen_on(w.topo.upstream_addr(8443)).len(),
        1,
        "no direct connection to the upstream"
    );
    assert!(
        Path::new(&dir).join("links").exists(),
        "pins survive the agent"
    );

    let mut opts = AgentOptions::new(w.squid.addr())
        .actor(ActorSpec::new("actor-22", "coder", "team-a", &w.cgroup).netns(&w.topo.actor));
    opts.bpffs_dir = dir.clone();
    let mut again = Agent::start(&w.topo.node, None, opts);
    again.wait_ready(T);
    let out = w.curl(NAME, w.v4(), 8443, &url);
    out.expect_success("curl after the restart");
    assert_eq!(again.wait_for_connections(1, T).len(), 1);
    let entries = w.squid.wait_for_entries(2, T);
    assert!(
        entries
            .iter()
            .all(|e| e.actor_id.as_deref() == Some("actor-22"))
    );

    // An explicit detach releases the cgroup: connects are no longer redirected.
    again.detach().expect_success("egress-agent detach");
    assert!(!dir.exists(), "detach removed the pin directory");
    let out = w.curl(NAME, w.v4(), 8443, &url);
    out.expect_success("curl after detach goes direct");
    let seen = w.upstream.seen_on(w.topo.upstream_addr(8443));
    assert_eq!(
        seen.last().unwrap().peer.ip(),
        IpAddr::V4(w.topo.actor_v4())
    );
}

#[test]
fn ipv6_connect_without_an_ipv6_listener_is_refused_not_sent() {
    egress_tests::require_root();
    let topo = Topology::new(23);
    // No IPv6 in the actor's namespace at all: the agent can open no [::1] listener there.
    let out = process::run(
        topo.actor.command("sysctl").args([
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.lo.disable_ipv6=1",
        ]),
        T,
    );
    out.expect_success("disable IPv6 in the actor namespace");
    let cgroup = Cgroup::new();
    let squid = Squid::start(&topo.node, SquidConfig::default());
    let opts = AgentOptions::new(squid.addr())
        .actor(ActorSpec::new("actor-23", "coder", "team-a", &cgroup).netns(&topo.actor));
    let mut agent = Agent::start(&topo.node, None, opts);
    agent.wait_ready(T);

    // A dual-stack socket dialling an IPv6 destination: connect6 has nowhere to send it and
    // must refuse it (EPERM) rather than let it through.
    let probe = env!("CARGO_BIN_EXE_egress-probe");
    let mut cmd = command_in(probe, Some(&topo.actor), Some(&cgroup));
    cmd.args(["peername", &topo.upstream_addr6(8443).to_string()]);
    let out = process::run(&mut cmd, T);
    assert!(
        !out.success(),
        "an IPv6 connect must fail: {}",
        out.describe()
    );
    assert!(
        out.stderr.contains("Operation not permitted"),
        "refused by the program (EPERM): {}",
        out.describe()
    );
    agent.wait_for_message(
        "egress: connect6 refused: the actor has no IPv6 listener",
        T,
    );
    let stats = egress_agent::ebpf::map_stats(agent.bpffs_dir()).expect("map stats");
    assert_eq!(counter(&stats, "refused"), 1, "{stats:?}");
    assert_eq!(
        counter(&stats, "redirected"),
        0,
        "nothing was redirected: {stats:?}"
    );
}

#[test]
fn a_client_that_writes_and_closes_at_once_is_still_delivered() {
    let w = world(24);
    let probe = env!("CARGO_BIN_EXE_egress-probe");
    let count = 2000;
    let mut cmd = command_in(probe, Some(&w.topo.actor), Some(&w.cgroup));
    // Many at once, so some connections wait in the listener's queue after their client has
    // already closed: their records must still be there when the agent accepts them.
    cmd.args([
        "send-close",
        &w.topo.upstream_addr(8080).to_string(),
        NAME,
        &count.to_string(),
        "32",
    ]);
    process::run(&mut cmd, Duration::from_secs(120)).expect_success("fire-and-forget clients");
    let mut delivered = 0;
    for _ in 0..200 {
        delivered = w
            .upstream
            .seen_on(w.topo.upstream_addr(8080))
            .iter()
            .filter(|s| s.path.as_deref() == Some("/send-close"))
            .count();
        if delivered == count {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost: Vec<_> = w
        .agent
        .connection_lines()
        .into_iter()
        .filter(|c| c.outcome.as_deref() != Some("tunneled"))
        .map(|c| c.line.raw.to_string())
        .take(3)
        .collect();
    assert_eq!(delivered, count, "requests lost; first failures: {lost:?}");
}

#[test]
fn loopback_inside_the_actor_namespace_stays_local() {
    let w = world(25);
    // A local service of the actor (a sidecar, say) on its own loopback.
    let listener = w
        .topo
        .actor
        .run(|| std::net::TcpListener::bind("127.0.0.1:9000").expect("bind in the actor"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        std::io::Write::write_all(&mut s, b"local\n").ok();
    });
    let probe = env!("CARGO_BIN_EXE_egress-probe");
    let mut cmd = command_in(probe, Some(&w.topo.actor), Some(&w.cgroup));
    cmd.args(["peername", "127.0.0.1:9000"]);
    let out = process::run(&mut cmd, T);
    out.expect_success("connect to the actor's own loopback");
    assert_eq!(out.stdout.trim(), "peer=127.0.0.1:9000");
    server.join().expect("the local service was reached");
    let stats = egress_agent::ebpf::map_stats(w.agent.bpffs_dir()).expect("map stats");
    let count = |name: &str| counter(&stats, name);
    assert_eq!(count("local_skipped"), 1, "{stats:?}");
    assert_eq!(count("redirected"), 0, "{stats:?}");
    assert!(w.agent.connection_lines().is_empty() && w.squid.access_log_entries().is_empty());
}

#[test]
fn an_actor_in_the_node_namespace_cannot_pass_for_the_agent_or_reach_node_loopback() {
    // No namespace of its own: the actor shares the agent's (the node's).
    let w = World::new(26, "actor-26", SquidConfig::default(), |mut o| {
        o.actors[0].netns = None;
        o
    });
    let (topo, cgroup, squid, upstream, agent) =
        (&w.topo, &w.cgroup, &w.squid, &w.upstream, &w.agent);
    let web = topo.upstream_addr(8080);
    let probe = env!("CARGO_BIN_EXE_egress-probe");

    // The agent's mark on an actor socket (root in the test, so it may set SO_MARK) in the
    // agent's own namespace: still captured, because the caller is not in the agent's cgroup.
    let mut cmd = command_in(probe, Some(&topo.node), Some(cgroup));
    cmd.args(["http-many", &web.to_string(), NAME, "1", "1"])
        .env("EGRESS_PROBE_MARK", "0x65670000");
    process::run(&mut cmd, T).expect_success("a marked request from the actor");
    let entry = squid.wait_for_request("CONNECT", &format!("{NAME}:8080"), T);
    assert_eq!(
        entry.actor_id.as_deref(),
        Some("actor-26"),
        "it went through squid as the actor"
    );
    assert_eq!(
        upstream.seen_on(web)[0].peer.ip(),
        IpAddr::V4(topo.node_uplink_v4()),
        "it came from squid, not from the actor"
    );

    // The node's loopback (squid itself listens there) is not reachable from the actor.
    let mut cmd = command_in(probe, Some(&topo.node), Some(cgroup));
    cmd.args(["peername", &squid.addr().to_string()]);
    let out = process::run(&mut cmd, T);
    assert!(
        out.stderr.contains("Operation not permitted"),
        "refused with EPERM: {}",
        out.describe()
    );

    let stats = egress_agent::ebpf::map_stats(agent.bpffs_dir()).expect("map stats");
    let count = |name: &str| counter(&stats, name);
    assert_eq!(
        count("agent_skipped"),
        0,
        "the marked actor socket was not exempted: {stats:?}"
    );
    assert_eq!(count("redirected"), 1, "{stats:?}");
    assert_eq!(count("refused"), 1, "{stats:?}");
}
