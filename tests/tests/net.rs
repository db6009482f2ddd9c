//! Tier 3: the packet capture front (`egress_agent::net`) on the real kernel: veth pairs made
//! with rtnetlink between a worker namespace and actor namespaces, and the `egress` nftables
//! table in the worker namespace, exercised with real TCP and UDP.
//!
//! Every namespace is made by the test; traffic only goes to addresses inside them. The
//! namespaces are the guards: deleting one deletes its veths and its nftables tables.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    time::Duration,
};

use egress_agent::net::{
    nft::{self, Actor, Inbound, Worker},
    veth::{self, Pair, Pool},
};
use egress_tests::netns::{Netns, veth as rig_veth};

const T: Duration = Duration::from_secs(5);
const LISTEN_PORT: u16 = 15001;
const DNS_PORT: u16 = 15053;

fn pair(slot: u32) -> Pair {
    Pool::default()
        .pair(slot)
        .expect("slot in the default pool")
}

/// Output of a command that must succeed.
fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `dev` exists in `ns`.
fn has_link(ns: &Netns, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns.name(), "link", "show", "dev", dev])
        .output()
        .expect("run ip")
        .status
        .success()
}

fn ipv4_addrs(ns: &Netns) -> String {
    ns.ip_output(&["-4", "-o", "addr", "show"])
}

fn assert_actor_configured(actor: &Netns, p: &Pair) {
    let addrs = actor.ip_output(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {}/30", p.actor)),
        "actor eth0: {addrs}"
    );
    let link = actor.ip_output(&["link", "show", "dev", "eth0"]);
    assert!(link.contains("UP"), "actor eth0 up: {link}");
    let lo = actor.ip_output(&["link", "show", "dev", "lo"]);
    assert!(lo.contains("UP"), "actor lo up: {lo}");
    let routes = actor.ip_output(&["-4", "route", "show", "default"]);
    assert!(
        routes.contains(&format!("default via {} dev eth0", p.worker)),
        "actor default route: {routes}"
    );
}

fn assert_worker_configured(worker: &Netns, p: &Pair) {
    let addrs = worker.ip_output(&["-4", "-o", "addr", "show", "dev", &p.worker_if]);
    assert!(
        addrs.contains(&format!("inet {}/30", p.worker)),
        "worker {}: {addrs}",
        p.worker_if
    );
}

/// A TCP listener bound inside `ns`.
fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(move || TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Connects from inside `ns` to `to`.
fn connect(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let s = TcpStream::connect_timeout(&to, T)?;
        s.set_read_timeout(Some(T))?;
        Ok(s)
    })
}

/// A UDP socket bound inside `ns`, with a read timeout.
fn udp(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns
        .run(move || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    s.set_read_timeout(Some(T)).expect("timeout");
    s
}

/// Accepts one connection on `l` within the timeout.
fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    l.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + T;
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(T)).expect("timeout");
                return (s, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no connection within {T:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One byte each way over an accepted pair of streams.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
    client.write_all(b"p").expect("client write");
    let mut b = [0u8; 1];
    server.read_exact(&mut b).expect("server read");
    server.write_all(b"q").expect("server write");
    client.read_exact(&mut b).expect("client read");
    assert_eq!(&b, b"q");
}

/// SO_ORIGINAL_DST of a redirected connection: where the actor meant to connect.
fn original_dst(s: &TcpStream) -> SocketAddrV4 {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_in is plain data; zero is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr and len are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    assert_eq!(
        ret,
        0,
        "SO_ORIGINAL_DST: {}",
        std::io::Error::last_os_error()
    );
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )
}

fn actor_of(id: &str, p: &Pair, inbound: &[&str], allow_udp: bool) -> Actor {
    Actor {
        id: id.into(),
        veth: p.worker_if.clone(),
        addr: p.actor,
        gateway: p.worker,
        inbound: inbound
            .iter()
            .map(|i| i.parse::<Inbound>().expect("inbound"))
            .collect(),
        allow_udp,
    }
}

fn nft_in(ns: &Netns, args: &[&str]) -> String {
    output(ns.command("nft").args(args))
}

fn dropped(worker: &Netns, veth: &str) -> u64 {
    nft::dropped(Some(&worker.path()), veth)
        .expect("read counter")
        .unwrap_or_else(|| panic!("no counter for {veth}"))
        .packets
}

/// Waits until the drop counter of `veth` is above `before`.
fn wait_dropped_above(worker: &Netns, veth: &str, before: u64) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let now = dropped(worker, veth);
        if now > before {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counter of {veth} stayed at {now}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn veth_up_is_addressed_routed_idempotent_and_connects() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    let p = pair(0);
    assert_eq!(p.worker, Ipv4Addr::new(10, 200, 0, 1));
    assert_eq!(p.actor, Ipv4Addr::new(10, 200, 0, 2));

    let up = veth::up(Some(&worker.path()), &actor.path(), &p).expect("veth up");
    assert!(up.created);
    assert_worker_configured(&worker, &p);
    assert_actor_configured(&actor, &p);
    assert_eq!(
        veth::list(Some(&worker.path())).expect("list"),
        vec!["egress0"]
    );

    // Before any nft table: plain TCP between the two ends.
    let l = listen(&worker, SocketAddr::from((p.worker, 0)));
    let to = l.local_addr().expect("addr");
    let mut c = connect(&actor, to).expect("connect from the actor to the worker end");
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip(), p.actor);
    exchange(&mut c, &mut s);

    let again = veth::up(Some(&worker.path()), &actor.path(), &p).expect("second up");
    assert!(!again.created, "the second up adopts");
    assert_worker_configured(&worker, &p);
    assert_actor_configured(&actor, &p);
    let links = worker.ip_output(&["-o", "link", "show"]);
    assert_eq!(links.matches("egress").count(), 1, "{links}");
}

#[test]
fn two_actors_get_slots_0_and_1() {
    egress_tests::require_root();
    let worker = Netns::new();
    let a0 = Netns::new();
    let a1 = Netns::new();
    let (p0, p1) = (pair(0), pair(1));
    assert_ne!(p0.actor, p1.actor);
    assert!(
        veth::up(Some(&worker.path()), &a0.path(), &p0)
            .expect("up 0")
            .created
    );
    assert!(
        veth::up(Some(&worker.path()), &a1.path(), &p1)
            .expect("up 1")
            .created
    );
    assert_actor_configured(&a0, &p0);
    assert_actor_configured(&a1, &p1);
    assert_worker_configured(&worker, &p0);
    assert_worker_configured(&worker, &p1);
    assert_eq!(p1.actor, Ipv4Addr::new(10, 200, 0, 6));
    assert_eq!(
        veth::list(Some(&worker.path())).expect("list"),
        vec!["egress0", "egress1"]
    );
    // Each actor reaches its own gateway.
    for (ns, p) in [(&a0, &p0), (&a1, &p1)] {
        let l = listen(&worker, SocketAddr::from((p.worker, 0)));
        let mut c = connect(ns, l.local_addr().unwrap()).expect("connect");
        let (mut s, peer) = accept(&l);
        assert_eq!(peer.ip(), p.actor);
        exchange(&mut c, &mut s);
    }
    // Slot 0 is actor 0's: up for actor 1 with it is refused and leaves actor 0's pair intact.
    let err = veth::up(Some(&worker.path()), &a1.path(), &p0).expect_err("slot 0 is taken");
    assert!(matches!(err, veth::Error::NotOurPeer { .. }), "{err}");
    assert_actor_configured(&a0, &p0);
}

#[test]
fn up_refuses_a_foreign_eth0_and_leaves_nothing() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    // Not dummy: that module may be missing; a veth pair inside the actor does as well.
    actor.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let err = veth::up(Some(&worker.path()), &actor.path(), &pair(0)).expect_err("eth0 is taken");
    assert!(matches!(err, veth::Error::ActorIfTaken { .. }), "{err}");
    assert!(err.to_string().contains("already has an eth0"), "{err}");
    assert!(!has_link(&worker, "egress0"), "nothing half-created");
    assert!(veth::list(Some(&worker.path())).expect("list").is_empty());
    let link = actor.ip_output(&["link", "show", "dev", "eth0"]);
    assert!(
        link.contains("eth0@eth0p"),
        "the foreign eth0 is untouched: {link}"
    );
}

#[test]
fn reapply_restores_what_runsc_deletes() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    let p = pair(0);
    veth::up(Some(&worker.path()), &actor.path(), &p).expect("up");
    // What runsc does to the sandbox's interface.
    actor.ip(&["addr", "flush", "dev", "eth0"]);
    actor.ip(&["link", "set", "eth0", "down"]);
    assert!(!ipv4_addrs(&actor).contains("10.200.0.2"));
    assert!(
        actor
            .ip_output(&["-4", "route", "show", "default"])
            .is_empty()
    );

    veth::reapply(&actor.path(), &p).expect("reapply");
    assert_actor_configured(&actor, &p);
    veth::reapply(&actor.path(), &p).expect("reapply again");
    assert_actor_configured(&actor, &p);

    let l = listen(&worker, SocketAddr::from((p.worker, 0)));
    let mut c = connect(&actor, l.local_addr().unwrap()).expect("connect after reapply");
    let (mut s, _) = accept(&l);
    exchange(&mut c, &mut s);

    let other = Netns::new();
    let err = veth::reapply(&other.path(), &p).expect_err("no eth0 there");
    assert!(matches!(err, veth::Error::ActorIfMissing { .. }), "{err}");
}

#[test]
fn down_leaves_nothing_and_twice_is_false() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    let p = pair(0);
    veth::up(Some(&worker.path()), &actor.path(), &p).expect("up");
    assert!(veth::down(Some(&worker.path()), &p).expect("down"));
    assert!(!has_link(&worker, "egress0"));
    assert!(!has_link(&actor, "eth0"));
    assert!(!ipv4_addrs(&worker).contains("10.200.0."));
    assert!(!ipv4_addrs(&actor).contains("10.200.0."));
    assert!(
        !worker
            .ip_output(&["-4", "route", "show"])
            .contains("10.200.0.")
    );
    assert!(actor.ip_output(&["-4", "route", "show"]).is_empty());
    assert!(veth::list(Some(&worker.path())).expect("list").is_empty());
    assert!(!veth::down(Some(&worker.path()), &p).expect("second down"));
    // And up works again afterwards.
    assert!(
        veth::up(Some(&worker.path()), &actor.path(), &p)
            .expect("up again")
            .created
    );
}

#[test]
fn nft_redirects_tcp_counts_dropped_udp_and_replaces_only_its_table() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    let bystander = Netns::new();
    let wp = worker.path();
    let p = pair(0);
    veth::up(Some(&wp), &actor.path(), &p).expect("up");
    // Somebody else's table in the worker namespace must survive everything below.
    nft_in(&worker, &["add", "table", "ip", "other"]);
    nft_in(
        &worker,
        &[
            "add",
            "chain",
            "ip",
            "other",
            "c",
            "{ type filter hook input priority 10 ; }",
        ],
    );

    let w = Worker {
        listen_port: LISTEN_PORT,
        dns_port: DNS_PORT,
        actors: vec![actor_of("actor-a", &p, &[], false)],
    };
    assert!(!nft::exists(Some(&wp)).expect("exists"));
    nft::apply(Some(&wp), &w).expect("apply");
    assert!(nft::exists(Some(&wp)).expect("exists"));
    // The nft child ran in the worker namespace, not in ours or any other.
    assert!(!nft::exists(Some(&bystander.path())).expect("exists elsewhere"));
    let listed: serde_json::Value =
        serde_json::from_str(&nft_in(&worker, &["-j", "list", "table", "inet", "egress"]))
            .expect("nft json");
    let text = listed.to_string();
    assert!(text.contains("\"redirect\":{\"port\":15001}"), "{text}");
    assert!(text.contains("dropped_egress0"), "{text}");
    let printed = nft::list(Some(&wp)).expect("list").expect("table");
    println!("nft list table inet egress:\n{printed}");
    assert!(printed.contains("redirect to :15001"), "{printed}");
    assert!(printed.contains("comment \"actor-a\""), "{printed}");

    // TCP to anywhere goes to the capture listener, with the original destination kept.
    let capture = listen(&worker, SocketAddr::from(([0, 0, 0, 0], LISTEN_PORT)));
    for target in ["10.200.0.1:80", "10.252.77.9:443"] {
        let target: SocketAddr = target.parse().unwrap();
        let mut c = connect(&actor, target).unwrap_or_else(|e| panic!("connect {target}: {e}"));
        let (mut s, peer) = accept(&capture);
        assert_eq!(peer.ip(), p.actor);
        let SocketAddr::V4(t4) = target else {
            unreachable!()
        };
        assert_eq!(original_dst(&s), t4, "SO_ORIGINAL_DST");
        exchange(&mut c, &mut s);
    }

    // UDP from the actor is dropped and counted.
    let before = dropped(&worker, &p.worker_if);
    let catcher = udp(&worker, SocketAddr::from((p.worker, 5000)));
    let sender = udp(&actor, SocketAddr::from((p.actor, 0)));
    sender.send_to(b"x", (p.worker, 5000)).expect("send");
    let after = wait_dropped_above(&worker, &p.worker_if, before);
    let mut buf = [0u8; 8];
    catcher
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(catcher.recv_from(&mut buf).is_err(), "UDP got through");

    // Applying again is fine and keeps the counter.
    nft::apply(Some(&wp), &w).expect("apply again");
    assert!(
        dropped(&worker, &p.worker_if) >= after,
        "counter carried over"
    );

    // Fail closed: with the agent's listener gone, captured TCP is refused.
    drop(capture);
    let refused = connect(&actor, "10.200.0.1:80".parse().unwrap()).expect_err("nobody listens");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );

    // The capture port is closed to everyone but the actors and loopback.
    let outside = Netns::new();
    let link = rig_veth(&worker, &outside, &["10.252.8.1/24"], &["10.252.8.2/24"]);
    let _capture = listen(&worker, SocketAddr::from(([0, 0, 0, 0], LISTEN_PORT)));
    let res = outside.run(|| {
        TcpStream::connect_timeout(&"10.252.8.1:15001".parse().unwrap(), Duration::from_secs(1))
    });
    assert!(res.is_err(), "capture port reachable from {}", link.b_name);
    let from_lo = connect(&worker, "127.0.0.1:15001".parse().unwrap());
    assert!(from_lo.is_ok(), "loopback reaches the capture port");

    // With no actor the table keeps only the guards: the pair still there forwards nothing
    // and reaches nothing on the worker (not even the capture port).
    nft::apply(
        Some(&wp),
        &Worker {
            actors: vec![],
            ..w.clone()
        },
    )
    .expect("apply empty");
    let guards = nft_in(&worker, &["list", "table", "inet", "egress"]);
    assert!(
        guards.contains("egress veth of no registered actor") && !guards.contains("redirect"),
        "{guards}"
    );
    let res = actor.run(|| {
        TcpStream::connect_timeout(&"10.200.0.1:15001".parse().unwrap(), Duration::from_secs(1))
    });
    assert!(res.is_err(), "an unowned veth reaches the worker");

    // remove takes only our table.
    assert!(nft::remove(Some(&wp)).expect("remove"));
    assert!(!nft::exists(Some(&wp)).expect("exists"));
    assert!(!nft::remove(Some(&wp)).expect("remove twice"));
    assert_eq!(
        nft::dropped(Some(&wp), &p.worker_if).expect("dropped"),
        None
    );
    nft::apply(Some(&wp), &w).expect("apply after remove");
    assert!(nft::exists(Some(&wp)).expect("exists"));
    let others = nft_in(&worker, &["list", "tables"]);
    assert!(others.contains("table ip other"), "{others}");
}

#[test]
fn worker_uplink_inbound_dnat_and_dns() {
    egress_tests::require_root();
    let worker = Netns::new();
    let actor = Netns::new();
    let outside = Netns::new();
    let wp = worker.path();
    // The worker pod's own interface to the rest of the world.
    let _uplink = rig_veth(&worker, &outside, &["10.252.9.1/24"], &["10.252.9.2/24"]);
    let worker_ip = Ipv4Addr::new(10, 252, 9, 1);
    let outside_ip = Ipv4Addr::new(10, 252, 9, 2);

    let root_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert!(veth::enable_forwarding(Some(&wp)).expect("forwarding"));
    assert!(!veth::enable_forwarding(Some(&wp)).expect("forwarding again"));
    let in_worker = output(worker.command("cat").arg("/proc/sys/net/ipv4/ip_forward"));
    assert_eq!(in_worker.trim(), "1");
    let in_outside = output(outside.command("cat").arg("/proc/sys/net/ipv4/ip_forward"));
    assert_eq!(in_outside.trim(), "0", "only the worker namespace changed");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_forwarding,
        "our own namespace is untouched"
    );

    let p = pair(3);
    veth::up(Some(&wp), &actor.path(), &p).expect("up");
    let w = Worker {
        listen_port: LISTEN_PORT,
        dns_port: DNS_PORT,
        actors: vec![actor_of("actor-x", &p, &["tcp/8080", "udp/4433"], false)],
    };
    nft::apply(Some(&wp), &w).expect("apply");
    println!(
        "nft list table inet egress:\n{}",
        nft::list(Some(&wp)).unwrap().unwrap()
    );

    // The worker's own traffic over its uplink is untouched.
    let l = listen(&outside, SocketAddr::from((outside_ip, 7000)));
    let mut c = connect(&worker, SocketAddr::from((outside_ip, 7000))).expect("worker -> outside");
    let (mut s, peer) = accept(&l);
    assert_eq!(peer.ip(), worker_ip);
    exchange(&mut c, &mut s);

    // The actor's TCP to the outside is captured, not forwarded.
    let capture = listen(&worker, SocketAddr::from(([0, 0, 0, 0], LISTEN_PORT)));
    let mut c = connect(&actor, SocketAddr::from((outside_ip, 7000))).expect("actor tcp");
    let (mut s, _) = accept(&capture);
    assert_eq!(original_dst(&s), SocketAddrV4::new(outside_ip, 7000));
    exchange(&mut c, &mut s);
    l.set_nonblocking(true).unwrap();
    assert!(
        l.accept().is_err(),
        "the actor's TCP reached the outside directly"
    );

    // Inbound TCP and UDP to the worker's IP arrive at the actor, from the real client.
    let actor_tcp = listen(&actor, SocketAddr::from(([0, 0, 0, 0], 8080)));
    let mut c = connect(&outside, SocketAddr::from((worker_ip, 8080))).expect("inbound tcp");
    let (mut s, peer) = accept(&actor_tcp);
    assert_eq!(peer.ip(), outside_ip, "inbound is not masqueraded");
    exchange(&mut c, &mut s);

    let actor_udp = udp(&actor, SocketAddr::from(([0, 0, 0, 0], 4433)));
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = actor_udp
            .recv_from(&mut buf)
            .expect("inbound udp at the actor");
        actor_udp.send_to(&buf[..n], from).expect("echo");
        from
    });
    let client = udp(&outside, SocketAddr::from((outside_ip, 0)));
    client.send_to(b"hello", (worker_ip, 4433)).expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = client.recv_from(&mut buf).expect("echo from the actor");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from, SocketAddr::from((worker_ip, 4433)));
    assert_eq!(echo.join().unwrap().ip(), outside_ip);

    // DNS to any address (the gateway, the outside) goes to the agent's DNS socket in the
    // worker, from the actor's own address; the reply shows the address the actor asked.
    let agent_dns = udp(&worker, SocketAddr::from(([0, 0, 0, 0], DNS_PORT)));
    let resolver_sink = udp(&outside, SocketAddr::from((outside_ip, 53)));
    let q = udp(&actor, SocketAddr::from((p.actor, 0)));
    for asked in [p.worker, outside_ip] {
        q.send_to(b"q", (asked, 53)).expect("query");
        let (n, from) = agent_dns
            .recv_from(&mut buf)
            .expect("query at the agent's DNS socket");
        assert_eq!(&buf[..n], b"q");
        assert_eq!(
            from.ip(),
            p.actor,
            "the actor's identity is its source address"
        );
        agent_dns.send_to(b"a", from).expect("answer");
        let (n, from) = q.recv_from(&mut buf).expect("DNS reply");
        assert_eq!(&buf[..n], b"a");
        assert_eq!(from, SocketAddr::from((asked, 53)), "reply un-NATed");
    }
    resolver_sink
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        resolver_sink.recv_from(&mut buf).is_err(),
        "DNS went to the outside directly"
    );

    // Other UDP to the outside is dropped and counted.
    let before = dropped(&worker, &p.worker_if);
    let sink = udp(&outside, SocketAddr::from((outside_ip, 9999)));
    q.send_to(b"nope", (outside_ip, 9999)).expect("send");
    wait_dropped_above(&worker, &p.worker_if, before);
    sink.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(sink.recv_from(&mut buf).is_err(), "UDP got out");

    // The agent's DNS socket is not reachable from the worker's own network.
    let stranger = udp(&outside, SocketAddr::from((outside_ip, 0)));
    stranger
        .send_to(b"x", (worker_ip, DNS_PORT))
        .expect("send to the DNS socket from outside");
    agent_dns
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        agent_dns.recv_from(&mut buf).is_err(),
        "the DNS socket answered the outside"
    );

    // A forged source address from the actor is dropped too, even its DNS: the agent would
    // take it for another actor's.
    let before = dropped(&worker, &p.worker_if);
    actor.ip(&["addr", "add", "10.200.0.99/32", "dev", "eth0"]);
    let spoof = udp(&actor, SocketAddr::from(([10, 200, 0, 99], 0)));
    spoof.send_to(b"s", (p.worker, 53)).expect("send spoofed");
    wait_dropped_above(&worker, &p.worker_if, before);
    assert!(agent_dns.recv_from(&mut buf).is_err(), "forged DNS arrived");
}
