//! Tier 3: the actors' DNS on the real kernel. A cgroup actor's UDP to port 53 is sent to its
//! own DNS socket in its namespace (connect4/6 for connected sockets, sendmsg4/6 for
//! unconnected sends) and the reply shows the resolver it asked (recvmsg4/6); its other UDP is
//! refused. A veth actor's UDP 53 is redirected by nftables to the agent's DNS socket in the
//! worker. Either way the agent relays the query to `--dns-upstream`, here a dnsmasq the test
//! starts in the node namespace, which logs where each query came from.
//!
//! Subnets 10.251.50-59 (cgroup worlds) and 10.252.50-59 (veth worlds). Traffic only ever goes
//! to loopback or to addresses of the namespaces a test made.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use egress_tests::{
    agent::Agent,
    counter,
    dns::{Dns, dig, dig_in},
    process::{self, command_in},
    squid::SquidConfig,
    udp::{UdpEcho, udp_send_args},
    world::{NAME, T, VethWorld, World},
};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

/// The standard cgroup world on 10.251.NET with dnsmasq on the node's address, answering
/// [`NAME`] with the upstream's address, as the agent's `--dns-upstream`. (An answer with the
/// node's own address would be filtered out: the node is always denied as a destination.) The resolver drops
/// before the world (fields drop in order).
struct DnsWorld {
    dns: Dns,
    w: World,
}

impl DnsWorld {
    fn new(net: u8) -> DnsWorld {
        egress_tests::require_commands(&["dnsmasq", "dig"]);
        let node = Ipv4Addr::new(10, 251, net, 1);
        let w = World::new(
            net,
            &format!("actor-{net}"),
            SquidConfig::default(),
            |mut o| {
                o.dns_upstream = SocketAddr::from((node, 53));
                o
            },
        );
        let dns = Dns::start(
            &w.topo.node,
            IpAddr::V4(node),
            &[(NAME, IpAddr::V4(w.topo.upstream_v4()))],
        );
        DnsWorld { dns, w }
    }

    /// `dig @server NAME` as the actor (its cgroup and namespace).
    fn dig(&self, server: IpAddr, extra: &[&str]) -> process::Output {
        dig_in(
            &self.w.topo.actor,
            Some(&self.w.cgroup),
            server,
            NAME,
            extra,
        )
    }

    /// The A records of a successful dig as the actor; panics with dig's output otherwise.
    fn resolve(&self, server: IpAddr) -> Vec<IpAddr> {
        let out = self.dig(server, &[]);
        out.expect_success(&format!("dig @{server} {NAME} as the actor"));
        out.stdout
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// `egress-probe dns-query` as the actor, with `EGRESS_PROBE_UDP=mode`.
    fn probe_query(&self, server: SocketAddr, mode: &str) -> process::Output {
        let mut cmd = command_in(PROBE, Some(&self.w.topo.actor), Some(&self.w.cgroup));
        cmd.args(["dns-query", &server.to_string(), NAME, "3000"])
            .env("EGRESS_PROBE_UDP", mode);
        process::run(&mut cmd, T)
    }

    fn stats(&self) -> egress_agent::ebpf::MapStats {
        egress_agent::ebpf::map_stats(self.w.agent.bpffs_dir()).expect("map stats")
    }
}

#[test]
fn a_cgroup_actor_s_dns_is_answered_through_its_own_dns_socket() {
    let d = DnsWorld::new(50);
    let node = IpAddr::V4(d.w.topo.node_v4());
    let upstream = d.w.v4();
    assert_eq!(d.resolve(node), vec![upstream]);
    let q = d.dns.wait_for_query(NAME, T);
    assert_eq!(
        q.source,
        node,
        "asked by the agent from the node's namespace, not by the actor ({})",
        d.w.topo.actor_v4()
    );
    // The actor's entry names its DNS socket, opened in its namespace.
    let opened =
        d.w.agent
            .json_lines()
            .into_iter()
            .find(|l| l.message.as_deref() == Some("DNS socket open"))
            .expect("a DNS socket open line");
    assert_eq!(opened.field_str("actor").as_deref(), Some("actor-50"));
    let list = d.w.agent.control(&["actor", "list"]);
    list.expect_success("actor list");
    assert!(list.stdout.contains("dns=[127.0.0.1:"), "{}", list.stdout);

    // glibc-style connected socket (its peer as getpeername shows it), plain sendto/recvfrom,
    // and a dual-stack socket asking a v4-mapped address: all answered, each showing the
    // resolver asked, not the DNS socket.
    let server = SocketAddr::new(node, 53);
    for (mode, from) in [
        ("connected", server.to_string()),
        ("unconnected", server.to_string()),
        ("dual", format!("[::ffff:{node}]:53")),
    ] {
        let out = d.probe_query(server, mode);
        out.expect_success(&format!("dns-query ({mode}) as the actor"));
        assert!(
            out.stdout
                .contains(&format!("from={from} id_ok=true rcode=0 answers=1")),
            "{mode}: {}",
            out.describe()
        );
    }

    // IPv6 DNS goes to the [::1] side of the same socket (the upstream is the IPv4 dnsmasq).
    assert_eq!(d.resolve(IpAddr::V6(d.w.topo.node_v6())), vec![upstream]);

    let queries = d.dns.queries();
    assert!(
        queries.len() >= 5 && queries.iter().all(|q| q.source == node),
        "every query came from the agent: {queries:#?}"
    );
    let mut stats = d.stats();
    assert!(counter(&stats, "dns_redirected") >= 5, "{stats:?}");
    // recvfrom with an address: the unconnected and dual-stack probes at least.
    assert!(counter(&stats, "dns_restored") >= 2, "{stats:?}");
    assert_eq!(counter(&stats, "refused"), 0, "{stats:?}");
    assert_eq!(counter(&stats, "redirected"), 0, "no TCP: {stats:?}");
    // sock_release removed every UDP socket's record.
    for _ in 0..50 {
        if stats.sockets == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = d.stats();
    }
    assert_eq!(stats.sockets, 0, "records left behind: {stats:?}");
}

#[test]
fn glibc_s_resolver_resolves_through_the_agent() {
    let d = DnsWorld::new(51);
    egress_tests::require_commands(&["getent", "unshare", "mount"]);
    let node = d.w.topo.node_v4();
    // The actor's own resolv.conf, bind-mounted in a private mount namespace: glibc
    // connect()s a UDP socket to the nameserver and checks the source of the answer.
    let dir = tempfile::tempdir().expect("temp dir");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {node}\noptions timeout:2 attempts:1\n"),
    )
    .expect("write resolv.conf");
    let mut cmd = command_in("unshare", Some(&d.w.topo.actor), Some(&d.w.cgroup));
    cmd.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec getent ahostsv4 \"$1\"",
    ])
    .arg(&resolv)
    .arg(NAME);
    let out = process::run(&mut cmd, T);
    out.expect_success("getent ahostsv4 as the actor");
    assert!(
        out.stdout.starts_with(&format!("{} ", d.w.v4())),
        "{}",
        out.describe()
    );
    let q = d.dns.wait_for_query(NAME, T);
    assert_eq!(q.source, IpAddr::V4(node), "relayed by the agent");
    assert!(counter(&d.stats(), "dns_redirected") >= 1);
}

#[test]
fn other_udp_is_refused_and_the_actor_s_own_loopback_is_not() {
    let mut d = DnsWorld::new(52);
    let topo = &d.w.topo;
    let echo = UdpEcho::start(PROBE.as_ref(), &topo.node, topo.node_addr(9999));
    let send = |to: SocketAddr, mode: &str, captured: bool| {
        let cgroup = captured.then_some(&d.w.cgroup);
        let mut cmd = command_in(PROBE, Some(&topo.actor), cgroup);
        cmd.args(udp_send_args(to, "hello", Duration::from_millis(1000)))
            .env("EGRESS_PROBE_UDP", mode);
        process::run(&mut cmd, T)
    };
    for (to, mode) in [
        (echo.addr(), "connected"),
        (echo.addr(), "unconnected"),
        (topo.node_addr6(9999), "connected"),
    ] {
        let out = send(to, mode, true);
        assert!(
            !out.success() && out.stderr.contains("Operation not permitted"),
            "UDP to {to} ({mode}) must be refused with EPERM: {}",
            out.describe()
        );
    }
    assert!(echo.peers().is_empty(), "nothing reached the node");
    for refusal in [
        "egress: connect4 refused: UDP other than DNS (port 53) is refused",
        "egress: sendmsg4 refused: UDP other than DNS (port 53) is refused",
        "egress: connect6 refused: UDP other than DNS (port 53) is refused",
    ] {
        d.w.agent.wait_for_message(refusal, T);
    }

    // A local service of the actor on its own loopback is reached.
    let local = UdpEcho::start(
        PROBE.as_ref(),
        &topo.actor,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    );
    let out = send(local.addr(), "unconnected", true);
    out.expect_success("UDP to the actor's own loopback");
    assert!(out.stdout.contains("reply=hello"), "{}", out.describe());

    // A process of the namespace outside the actor's cgroup is not the actor's business.
    send(echo.addr(), "connected", false).expect_success("uncaptured UDP");
    assert_eq!(
        echo.wait_for_peers(1, T)[0].ip(),
        IpAddr::V4(topo.actor_v4())
    );

    let stats = d.stats();
    assert_eq!(counter(&stats, "refused"), 3, "{stats:?}");
    assert!(counter(&stats, "local_skipped") >= 1, "{stats:?}");
    assert_eq!(counter(&stats, "dns_redirected"), 0, "{stats:?}");
}

#[test]
fn tcp_53_of_a_cgroup_actor_arrives_at_the_agent() {
    let mut d = DnsWorld::new(53);
    let node = d.w.topo.node_v4();
    // dig over TCP: captured like any TCP connect, then answered by the forwarder (not
    // tunnelled to the PEP).
    let out = d.dig(IpAddr::V4(node), &["+tcp"]);
    out.expect_success("dig +tcp as the actor");
    assert_eq!(
        out.stdout.trim(),
        d.w.v4().to_string(),
        "{}",
        out.describe()
    );
    let line = d.w.agent_line(SocketAddr::from((node, 53)));
    assert_eq!(line.actor.as_deref(), Some("actor-53"));
    assert_eq!(line.outcome.as_deref(), Some("dns"), "{:?}", line.line);
    assert!(
        d.w.squid.access_log_entries().is_empty(),
        "DNS went to the PEP"
    );
    assert_eq!(counter(&d.stats(), "redirected"), 1);
}

#[test]
fn a_veth_actor_s_dns_to_any_address_is_answered_by_the_agent() {
    let w = VethWorld::new(54, "vactor-54", |o| o);
    let node = IpAddr::V4(w.node_v4());
    // Its gateway, the worker's own address (no DNS server there) and the resolver itself:
    // UDP 53 to any address is redirected to the agent's DNS socket in the worker.
    let asked = [
        IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
        IpAddr::V4(w.worker_v4()),
        node,
    ];
    let upstream = IpAddr::V4(w.upstream_v4());
    for server in asked {
        assert_eq!(dig(&w.actor, server, NAME), vec![upstream], "dig @{server}");
    }
    let queries = w.dns.queries();
    assert_eq!(queries.len(), asked.len(), "{queries:#?}");
    let agent = IpAddr::V4(w.node_uplink_v4());
    assert!(
        queries.iter().all(|q| q.source == agent),
        "every query relayed by the agent from the node's namespace, none forwarded from \
         the worker ({}): {queries:#?}",
        w.worker_v4()
    );
}

#[test]
fn a_killed_agent_leaves_the_actor_s_dns_refused_and_a_restarted_one_serves_it() {
    let mut d = DnsWorld::new(55);
    let node = IpAddr::V4(d.w.topo.node_v4());
    let upstream = d.w.v4();
    assert_eq!(d.resolve(node), vec![upstream]);
    let before = d.dns.queries().len();
    let opts = d.w.agent_options.clone();
    d.w.agent.kill9();

    // Still redirected to the dead agent's socket: no answer, and nothing went direct.
    let out = d.dig(node, &[]);
    assert!(!out.success(), "DNS without the agent: {}", out.describe());
    let out = d.probe_query(SocketAddr::new(node, 53), "unconnected");
    assert!(!out.success(), "{}", out.describe());
    assert_eq!(d.dns.queries().len(), before, "no query bypassed the agent");

    // The restarted agent opens a new DNS socket and writes its port to the actor's entry.
    let mut again = Agent::start(&d.w.topo.node, None, opts);
    again.wait_ready(T);
    let opened = again.wait_for_message("DNS socket open", T);
    assert_eq!(opened.field_str("actor").as_deref(), Some("actor-55"));
    // The killed agent's guard detaches everything when dropped: keep it to the end.
    let _killed = std::mem::replace(&mut d.w.agent, again);
    assert_eq!(d.resolve(node), vec![upstream]);
    let queries = d.dns.queries();
    assert!(
        queries.len() > before && queries.iter().all(|q| q.source == node),
        "answered through the restarted agent: {queries:#?}"
    );
}
