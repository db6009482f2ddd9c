//! Tier 3: veth mode, for actors whose traffic arrives as packets (gVisor, microVMs). Each
//! test builds its own node, worker, upstream and actor namespaces (`VethWorld`:
//! 10.252.NET.0/24 for the worker's own link to the node, 10.249.NET.0/24 for the node's link
//! to the upstream servers and resolver, the agent's 10.200.0.0/24 pool inside the worker),
//! starts the real agent binary, and drives real curl, dig, gVisor (runsc) and UDP probes in
//! the actor's namespace.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces a test made.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use egress_tests::{
    agent::{Agent, VethActorSpec},
    dns::dig,
    gvisor::Sandbox,
    netns::Netns,
    process,
    squid::AccessEntry,
    udp::{UDP_TIMEOUT_EXIT, UdpEcho, udp_send},
    world::{NAME, T, VethWorld},
};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

fn probe() -> &'static Path {
    Path::new(PROBE)
}

fn assert_identity(entry: &AccessEntry, actor: &str, original: SocketAddr, authority: &str) {
    entry.assert_identity((actor, "sandbox", "team-b"), original, authority);
}

#[test]
fn veth_actor_reaches_a_named_https_upstream_through_squid_and_the_worker_is_untouched() {
    let mut w = VethWorld::new(40, "vactor-40", |o| o);
    let url = format!("https://{NAME}:8443/");

    // The agent gave the actor eth0 = 10.200.0.2/30 and a default route via 10.200.0.1.
    let addrs = w.actor.ip_output(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.200.0.2/30"), "{addrs}");
    let routes = w.actor.ip_output(&["-o", "route"]);
    assert!(routes.contains("default via 10.200.0.1"), "{routes}");

    w.curl(&w.actor, 8443, &url)
        .expect_success("curl from the veth actor");
    let entry = w
        .squid
        .wait_for_request("CONNECT", &format!("{NAME}:8443"), T);
    assert_identity(
        &entry,
        "vactor-40",
        w.upstream_addr(8443),
        &format!("{NAME}:8443"),
    );
    let seen = w.upstream.seen_on(w.upstream_addr(8443));
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some(NAME));
    let conn = w
        .agent
        .wait_for_connections(1, T)
        .into_iter()
        .next()
        .expect("a connection line");
    assert_eq!(conn.actor.as_deref(), Some("vactor-40"));
    assert_eq!(conn.source.as_deref(), Some("sni"));
    assert_eq!(conn.outcome.as_deref(), Some("tunneled"));
    assert!(
        conn.line
            .field_str("client")
            .is_some_and(|c| c.starts_with("10.200.0.2:")),
        "the client is the actor's veth address: {:?}",
        conn.line.raw
    );

    // The worker's own traffic is not captured: it reaches the upstream directly.
    w.curl(&w.worker, 8080, &format!("http://{NAME}:8080/"))
        .expect_success("curl from the worker itself");
    let direct = w.upstream.seen_on(w.upstream_addr(8080));
    assert_eq!(direct.len(), 1);
    assert_eq!(direct[0].peer.ip(), IpAddr::V4(w.worker_v4()));
    assert_eq!(
        w.squid.access_log_entries().len(),
        1,
        "squid saw only the actor"
    );
}

#[test]
fn veth_actor_dns_resolves_and_other_udp_is_dropped_and_counted() {
    let w = VethWorld::new(41, "vactor-41", |o| o);
    // DNS to the actor's gateway goes to the agent's DNS socket in the worker, which relays
    // it to --dns-upstream from the agent's own (the node's) namespace.
    let answer = dig(&w.actor, IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)), NAME);
    assert_eq!(answer, vec![IpAddr::V4(w.upstream_v4())]);
    let query = w.dns.wait_for_query(NAME, T);
    assert_eq!(
        query.source,
        IpAddr::V4(w.node_uplink_v4()),
        "asked by the agent, not forwarded from the worker"
    );

    // Other UDP never leaves the worker, and the drop is counted.
    let echo = UdpEcho::start(probe(), &w.upstream_netns, w.upstream_addr(9999));
    let out = udp_send(
        probe(),
        &w.actor,
        echo.addr(),
        "hello",
        Duration::from_millis(500),
    );
    assert_eq!(out.code(), Some(UDP_TIMEOUT_EXIT), "{}", out.describe());
    assert!(echo.peers().is_empty(), "nothing arrived at the upstream");
    let list = w.agent.control(&["actor", "list", "--json"]);
    list.expect_success("actor list");
    let v: serde_json::Value = serde_json::from_str(&list.stdout).expect("json");
    let dropped = v["actors"][0]["dropped_packets"].as_u64().unwrap_or(0);
    assert!(dropped >= 1, "dropped packets counted: {}", list.stdout);
}

#[test]
fn gvisor_actor_is_captured_and_reapply_restores_its_side() {
    egress_tests::require_commands(&["runsc"]);
    let w = VethWorld::new(42, "gvisor-42", |o| o);
    // The sandbox's root is the host's `/`: the CA file is seen at its own path.
    let sandbox = Sandbox::new(&w.actor).hosts(&[(NAME, IpAddr::V4(w.upstream_v4()))]);
    let ca = w.ca.cert_path().display().to_string();
    let curl = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        &ca,
        "https://web.egress.test:8443/",
    ];
    sandbox.run(&curl, T).expect_success("curl in gVisor");
    let entry = w
        .squid
        .wait_for_request("CONNECT", &format!("{NAME}:8443"), T);
    assert_identity(
        &entry,
        "gvisor-42",
        w.upstream_addr(8443),
        &format!("{NAME}:8443"),
    );

    // runsc took eth0's address into its netstack: a second sandbox has none...
    let addrs = w
        .actor
        .ip_output(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains("10.200.0.2"), "{addrs}");
    // ...until the actor side is re-applied, in one call.
    w.agent
        .control(&["veth", "reapply", "gvisor-42"])
        .expect_success("veth reapply");
    let addrs = w
        .actor
        .ip_output(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.200.0.2/30"), "{addrs}");
    sandbox
        .run(&curl, T)
        .expect_success("curl in a second gVisor sandbox");
    let entries = w.squid.wait_for_entries(2, T);
    assert_eq!(entries[1].actor_id.as_deref(), Some("gvisor-42"));
    assert_eq!(
        w.upstream.seen_on(w.upstream_addr(8443)).len(),
        2,
        "both went through squid"
    );
}

#[test]
fn two_veth_actors_on_one_worker_get_distinct_slots_and_identities() {
    // The first actor may send UDP out, but never to another actor (its rules come first).
    let w = VethWorld::new(43, "vactor-43a", |mut o| {
        o.veth_actors[0].allow_udp = true;
        o
    });
    let second = Netns::new();
    let spec = VethActorSpec::new("vactor-43b", "sandbox", "team-b", &second, &w.worker);
    let mut args = vec!["veth", "up"];
    let add = spec.add_args();
    args.extend(add.iter().map(String::as_str));
    let out = w.agent.control(&args);
    out.expect_success("veth up of the second actor");
    assert!(
        out.stdout.contains("address=10.200.0.6/30") && out.stdout.contains("veth=egress1"),
        "{}",
        out.describe()
    );
    assert!(
        second
            .ip_output(&["-o", "addr", "show", "dev", "eth0"])
            .contains("10.200.0.6/30")
    );

    let url = format!("https://{NAME}:443/");
    w.curl(&w.actor, 443, &url).expect_success("curl from a");
    w.curl(&second, 443, &url).expect_success("curl from b");
    let entries = w.squid.wait_for_entries(2, T);
    let mut ids: Vec<_> = entries.iter().filter_map(|e| e.actor_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["vactor-43a", "vactor-43b"]);
    let list = w.agent.control(&["actor", "list"]);
    list.expect_success("actor list");
    assert!(
        list.stdout.contains("address=10.200.0.2/30"),
        "{}",
        list.stdout
    );
    assert!(
        list.stdout.contains("address=10.200.0.6/30"),
        "{}",
        list.stdout
    );
    let echo = UdpEcho::start(
        probe(),
        &second,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9999)),
    );
    let out = udp_send(
        probe(),
        &w.actor,
        SocketAddr::from((Ipv4Addr::new(10, 200, 0, 6), 9999)),
        "neighbour?",
        Duration::from_millis(500),
    );
    assert!(!out.success(), "{}", out.describe());
    assert!(echo.peers().is_empty(), "no UDP between actors");
    // Remove the second before its namespace goes.
    w.agent
        .control(&["veth", "down", "vactor-43b"])
        .expect_success("veth down");
}

#[test]
fn inbound_tcp_and_udp_reach_the_actor_on_configured_ports() {
    let w = VethWorld::new(44, "vactor-44", |mut o| {
        o.veth_actors[0] = o.veth_actors[0]
            .clone()
            .inbound("tcp/9090")
            .inbound("udp/9091");
        o
    });
    let server = w
        .actor
        .run(|| TcpListener::bind("0.0.0.0:9090").expect("bind in the actor"));
    let echo = UdpEcho::start(
        probe(),
        &w.actor,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9091)),
    );
    let worker_ip = w.worker_v4();
    let client = w.node.spawn(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((worker_ip, 9090)), T)
            .expect("connect to the worker's address from the node");
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    let (mut conn, peer) = server.accept().expect("accept in the actor");
    assert_eq!(
        peer.ip(),
        IpAddr::V4(w.node_v4()),
        "inbound keeps the client's address"
    );
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"pong").unwrap();
    assert_eq!(&client.join().expect("client"), b"pong");

    let out = udp_send(
        probe(),
        &w.node,
        SocketAddr::from((worker_ip, 9091)),
        "quic?",
        Duration::from_secs(5),
    );
    out.expect_success("UDP to the worker's address reaches the actor");
    assert!(out.stdout.contains("reply=quic?"), "{}", out.describe());
    assert_eq!(echo.wait_for_peers(1, T)[0].ip(), IpAddr::V4(w.node_v4()));
    // A port not configured is not forwarded.
    let out = udp_send(
        probe(),
        &w.node,
        SocketAddr::from((worker_ip, 9092)),
        "no",
        Duration::from_millis(500),
    );
    assert!(!out.success(), "{}", out.describe());
    assert_eq!(
        w.squid.access_log_entries().len(),
        0,
        "inbound is not egress"
    );
}

#[test]
fn down_removes_everything_up_is_idempotent_and_a_restarted_agent_adopts_the_pair() {
    let mut w = VethWorld::new(45, "unused", |mut o| {
        o.veth_actors.clear();
        o
    });
    let spec = VethActorSpec::new("vactor-45", "sandbox", "team-b", &w.actor, &w.worker);
    let mut up = vec!["veth", "up"];
    let add = spec.add_args();
    up.extend(add.iter().map(String::as_str));
    w.agent.control(&up).expect_success("veth up");
    let before = w.worker.ip_output(&["-o", "addr"]);
    w.agent.control(&up).expect_success("veth up again");
    assert_eq!(
        w.worker.ip_output(&["-o", "addr"]),
        before,
        "up twice changes nothing"
    );
    let url = format!("https://{NAME}:8443/");
    w.curl(&w.actor, 8443, &url).expect_success("curl");
    w.squid.wait_for_entries(1, T);

    // Killed: the pair and the rules stay, so the actor's TCP is refused, never sent out.
    let opts = w.agent_options.clone();
    w.agent.kill9();
    let out = w.curl(&w.actor, 8443, &url);
    assert_eq!(out.code(), Some(7), "refused: {}", out.describe());
    assert_eq!(
        w.upstream.seen_on(w.upstream_addr(8443)).len(),
        1,
        "nothing went direct"
    );
    assert!(w.worker_tables().contains("table inet egress"));

    // Restarted: adopts the pair (same address, same interface) and serves it again.
    let mut again = Agent::start(&w.node, None, opts);
    again.wait_ready(T);
    again.wait_for_message("actor added at run time adopted from the state file", T);
    let adopted = again.wait_for_message("veth pair adopted", T);
    assert_eq!(adopted.field_str("veth").as_deref(), Some("egress0"));
    w.curl(&w.actor, 8443, &url)
        .expect_success("curl after the restart");
    let entries = w.squid.wait_for_entries(2, T);
    assert_eq!(entries[1].actor_id.as_deref(), Some("vactor-45"));

    // Down removes exactly what up made: interfaces, address, route, table.
    again
        .control(&["veth", "down", "vactor-45"])
        .expect_success("veth down");
    assert!(!w.worker.ip_output(&["-o", "link"]).contains("egress0"));
    assert!(!w.worker.ip_output(&["-o", "addr"]).contains("10.200.0."));
    assert!(!w.worker.ip_output(&["-o", "route"]).contains("10.200.0."));
    assert!(!w.actor.ip_output(&["-o", "link"]).contains("eth0"));
    assert!(
        !w.worker_tables().contains("egress"),
        "{}",
        w.worker_tables()
    );
    // The worker's own link is untouched.
    assert!(
        w.worker
            .ip_output(&["-o", "addr"])
            .contains(&format!("{}/24", w.worker_v4()))
    );
    let out = again.control(&["veth", "down", "vactor-45"]);
    assert!(!out.success(), "a second down says there is nothing");
    w.agent = again;
}

#[test]
fn a_worker_veth_that_no_actor_owns_forwards_nothing() {
    let w = VethWorld::new(46, "vactor-46", |o| o);
    // A pair named like the agent's, made by hand (as if an agent had lost its state file).
    let stray = Netns::new();
    w.worker.ip(&[
        "link",
        "add",
        "egress9",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        stray.name(),
    ]);
    w.worker
        .ip(&["addr", "add", "10.200.0.37/30", "dev", "egress9"]);
    w.worker.ip(&["link", "set", "egress9", "up"]);
    stray.ip(&["addr", "add", "10.200.0.38/30", "dev", "eth0"]);
    stray.ip(&["link", "set", "eth0", "up"]);
    stray.ip(&["route", "add", "default", "via", "10.200.0.37"]);
    let echo = UdpEcho::start(probe(), &w.upstream_netns, w.upstream_addr(9999));
    let out = udp_send(
        probe(),
        &stray,
        echo.addr(),
        "leak?",
        Duration::from_millis(500),
    );
    assert_eq!(out.code(), Some(UDP_TIMEOUT_EXIT), "{}", out.describe());
    assert!(
        echo.peers().is_empty(),
        "nothing was forwarded to the upstream"
    );
    // The registered actor's UDP is dropped as well; its TCP is still captured.
    w.curl(&w.actor, 8080, &format!("http://{NAME}:8080/"))
        .expect_success("curl from the registered actor");
    w.squid.wait_for_entries(1, T);
}

#[test]
fn a_veth_actor_dropped_from_the_config_loses_its_pair_on_restart() {
    let mut w = VethWorld::new(47, "vactor-47", |o| o);
    assert!(w.worker.ip_output(&["-o", "link"]).contains("egress0"));
    let mut opts = w.agent_options.clone();
    opts.veth_actors.clear();
    w.agent.terminate(T);
    let mut again = Agent::start(&w.node, None, opts);
    again.wait_ready(T);
    again.wait_for_message(
        "a veth actor is no longer in the config file: its pair is deleted",
        T,
    );
    assert!(!w.worker.ip_output(&["-o", "link"]).contains("egress0"));
    assert!(!w.actor.ip_output(&["-o", "link"]).contains("eth0"));
    assert!(
        !w.worker_tables().contains("egress"),
        "{}",
        w.worker_tables()
    );
    w.agent = again;
}

#[test]
fn without_the_table_a_veth_actor_would_go_direct_and_be_seen() {
    // The world itself, not the agent: "nothing went direct" checks above can only fail if
    // a connection the capture misses does reach the upstream. Take the capture away (agent
    // killed, table deleted) and the actor's curl must arrive there from its own address.
    let mut w = VethWorld::new(48, "vactor-48", |o| o);
    let url = format!("https://{NAME}:8443/");
    w.curl(&w.actor, 8443, &url).expect_success("captured curl");
    w.agent.kill9();
    let out = process::run(
        w.worker
            .command("nft")
            .args(["delete", "table", "inet", "egress"]),
        T,
    );
    out.expect_success("nft delete table inet egress in the worker");
    w.curl(&w.actor, 8443, &url)
        .expect_success("curl without capture");
    let seen = w.upstream.seen_on(w.upstream_addr(8443));
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        seen[0].peer.ip(),
        IpAddr::V4(w.node_uplink_v4()),
        "the captured one came from squid on the node"
    );
    assert_eq!(
        seen[1].peer.ip(),
        IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
        "the uncaptured one came from the actor itself"
    );
    assert_eq!(w.squid.access_log_entries().len(), 1);
}
