//! Smoke tests of the rig itself: real namespaces, cgroups, squid, curl and upstream servers.
//! They need root; run with `cargo test -p egress-tests` as root (or `cargo xtask test`).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egress_tests::agent::{ActorSpec, Agent, AgentOptions};
use egress_tests::cgroup::Cgroup;
use egress_tests::client::{
    banner_exchange_command, connect_in, curl_command, http_connect, read_line,
};
use egress_tests::dns::{Dns, dig, dig_output};
use egress_tests::gvisor::Sandbox;
use egress_tests::netns::{Netns, veth};
use egress_tests::pki::TestCa;
use egress_tests::process::{ChildGuard, command_in, run};
use egress_tests::squid::{Squid, SquidConfig};
use egress_tests::topology::Topology;
use egress_tests::udp::{UDP_REFUSED_EXIT, UDP_TIMEOUT_EXIT, UdpEcho, udp_send, udp_send_args};
use egress_tests::upstream::{BANNER, Upstream, UpstreamSpec};
use egress_tests::{require_commands, require_root};

const WEB: &str = "web.egress.test";
const WEB6: &str = "web6.egress.test";
const DENIED: &str = "denied.egress.test";
const T: Duration = Duration::from_secs(20);

fn identity_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("x-ate-actor-id", "a1"),
        ("x-ate-actor-template", "tmpl-1"),
        ("x-ate-actor-template-namespace", "team-a"),
        ("x-ate-original-destination", "10.250.1.2:8443"),
        ("x-ate-connect-authority", "web.egress.test:8443"),
    ]
}

/// curl through squid from inside `netns`, with the identity headers as proxy headers.
fn curl_via_proxy(
    netns: &Netns,
    proxy: SocketAddr,
    ca: &TestCa,
    url: &str,
) -> egress_tests::process::Output {
    let mut cmd = netns.command("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "--proxy",
        &format!("http://{proxy}"),
    ]);
    for (k, v) in identity_headers() {
        cmd.arg("--proxy-header").arg(format!("{k}: {v}"));
    }
    cmd.arg("--cacert").arg(ca.cert_path()).arg(url);
    run(&mut cmd, T)
}

#[test]
fn squid_forwards_connect_and_http_and_logs_identity() {
    require_root();
    require_commands(&["squid", "curl", "ip", "nsenter"]);
    let topo = Topology::new(1);
    let ca = TestCa::new();
    let https = topo.upstream_addr(8443);
    let https6 = topo.upstream_addr6(8443);
    let http = topo.upstream_addr(8080);
    let banner = topo.upstream_addr(2525);
    let https443 = topo.upstream_addr(443);
    let upstream = Upstream::start(
        &topo.upstream,
        &ca,
        UpstreamSpec::new()
            .names(&[WEB, WEB6])
            .https(https443)
            .https(https)
            .https(https6)
            .http(http)
            .banner(banner),
    );
    let squid = Squid::start(
        &topo.node,
        SquidConfig::default()
            .host(WEB, IpAddr::V4(topo.upstream_v4()))
            .host(WEB6, IpAddr::V6(topo.upstream_v6()))
            .host(DENIED, IpAddr::V4(topo.upstream_v4()))
            .deny_domain(DENIED)
            .deny_port(2526),
    );

    // HTTPS through CONNECT: the upstream sees the SNI, squid logs authority and headers.
    let out = curl_via_proxy(
        &topo.node,
        squid.addr(),
        &ca,
        &format!("https://{WEB}:8443/hello"),
    );
    out.expect_success("curl https via squid");
    assert!(
        out.stdout.contains(&format!(
            "upstream=https:{https} sni={WEB} host={WEB}:8443 path=/hello"
        )),
        "{}",
        out.stdout
    );
    let seen = upstream.seen_on(https);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].sni.as_deref(), Some(WEB));

    let e = squid.wait_for_request("CONNECT", &format!("{WEB}:8443"), T);
    assert_eq!(e.status, Some(200));
    assert_eq!(
        e.server.as_deref(),
        Some(topo.upstream_v4().to_string().as_str())
    );
    assert_eq!(e.actor_id.as_deref(), Some("a1"));
    assert_eq!(e.actor_template.as_deref(), Some("tmpl-1"));
    assert_eq!(e.actor_template_namespace.as_deref(), Some("team-a"));
    assert_eq!(e.original_destination.as_deref(), Some("10.250.1.2:8443"));
    assert_eq!(e.connect_authority.as_deref(), Some("web.egress.test:8443"));

    // IPv6 upstream, resolved from squid's hosts file.
    let out = curl_via_proxy(
        &topo.node,
        squid.addr(),
        &ca,
        &format!("https://{WEB6}:8443/"),
    );
    out.expect_success("curl https (IPv6 upstream) via squid");
    assert_eq!(upstream.seen_on(https6).len(), 1);
    assert_eq!(upstream.seen_on(https6)[0].sni.as_deref(), Some(WEB6));

    // Plain HTTP: squid forwards the GET itself; the upstream sees the Host header.
    let out = curl_via_proxy(
        &topo.node,
        squid.addr(),
        &ca,
        &format!("http://{WEB}:8080/plain"),
    );
    out.expect_success("curl http via squid");
    assert!(
        out.stdout.contains(&format!(
            "upstream=http:{http} sni=- host={WEB}:8080 path=/plain"
        )),
        "{}",
        out.stdout
    );
    assert_eq!(
        upstream.seen_on(http)[0].host.as_deref(),
        Some(format!("{WEB}:8080").as_str())
    );
    let e = squid.wait_for_request("GET", &format!("http://{WEB}:8080/plain"), T);
    assert_eq!(e.status, Some(200));
    assert_eq!(e.actor_id.as_deref(), Some("a1"));

    // Server-first service through a hand-made CONNECT: the banner arrives before we send.
    let mut s = connect_in(&topo.node, squid.addr(), T).expect("connect to squid");
    let status = http_connect(&mut s, &format!("{WEB}:2525"), &identity_headers())
        .expect("CONNECT to banner");
    assert_eq!(status, 200);
    assert_eq!(
        read_line(&mut s).expect("read banner"),
        BANNER.trim_end_matches('\n').to_string() + "\n"
    );
    s.write_all(b"ping\r\n").expect("write to banner service");
    assert_eq!(read_line(&mut s).expect("read echo"), "ping\r\n");
    drop(s);
    squid.wait_for_request("CONNECT", &format!("{WEB}:2525"), T);
    assert_eq!(upstream.accepted(banner), 1);

    // A denied authority: squid answers 403 and the upstream never sees a connection.
    let mut s = connect_in(&topo.node, squid.addr(), T).expect("connect to squid");
    let status = http_connect(&mut s, &format!("{DENIED}:443"), &identity_headers())
        .expect("CONNECT to denied");
    assert_eq!(status, 403);
    // Squid keeps the client connection open after a 403 (keep-alive): close it ourselves.
    drop(s);
    assert_eq!(
        squid
            .wait_for_request("CONNECT", &format!("{DENIED}:443"), T)
            .status,
        Some(403)
    );
    assert_eq!(upstream.accepted(https443), 0);

    // A denied port, by IP authority.
    let mut s = connect_in(&topo.node, squid.addr(), T).expect("connect to squid");
    let authority = format!("{}:2526", topo.upstream_v4());
    assert_eq!(
        http_connect(&mut s, &authority, &[]).expect("CONNECT to denied port"),
        403
    );
    drop(s);
    let e = squid.wait_for_request("CONNECT", &authority, T);
    assert_eq!((e.status, e.actor_id), (Some(403), None));

    // Every request above left exactly one entry (no probe or error entries).
    assert_eq!(
        squid.access_log_entries().len(),
        6,
        "{:#?}",
        squid.access_log_entries()
    );
}

#[test]
fn process_runs_in_actor_netns_and_cgroup_and_reaches_upstream_directly() {
    require_root();
    require_commands(&["curl", "ip", "sleep"]);
    let topo = Topology::new(2);
    let cgroup = Cgroup::new();
    let ca = TestCa::new();
    let https = topo.upstream_addr(8443);
    let https6 = topo.upstream_addr6(8443);
    let banner6 = topo.upstream_addr6(2525);
    let upstream = Upstream::start(
        &topo.upstream,
        &ca,
        UpstreamSpec::new()
            .names(&[WEB])
            .https(https)
            .https(https6)
            .banner(banner6),
    );

    // A long-lived process: check its cgroup and netns from outside.
    let mut cmd = command_in("sleep", Some(&topo.actor), Some(&cgroup));
    cmd.arg("30");
    let sleeper = ChildGuard::spawn(&mut cmd);
    let pid = sleeper.pid();
    let proc_cgroup =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    let want = format!("0::{}", cgroup.relative_path().display());
    assert!(
        proc_cgroup.lines().any(|l| l == want),
        "{pid} not in {want}: {proc_cgroup}"
    );
    assert!(
        cgroup.pids().contains(&(pid as i32)),
        "cgroup.procs lacks {pid}"
    );
    let ns_ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("stat ns"),
    );
    assert_eq!(ns_ino, topo.actor.inode(), "process not in the actor netns");
    assert_ne!(topo.actor.inode(), topo.node.inode());
    assert!(cgroup.id() > 1);

    // The same from inside: what the program itself sees.
    let out = run(
        command_in("sh", Some(&topo.actor), Some(&cgroup))
            .args(["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"]),
        T,
    );
    out.expect_success("sh in actor");
    assert!(out.stdout.contains(&want), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("net:[{}]", topo.actor.inode())),
        "{}",
        out.stdout
    );

    // The node forwards, and only the node: direct (uncaptured) traffic from the actor
    // reaches the upstream through it, from the actor's own address.
    for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
        assert_eq!(topo.node.sysctl_value(key), "1", "{key} in the node");
        assert_eq!(topo.actor.sysctl_value(key), "0", "{key} in the actor");
        assert_eq!(
            topo.upstream.sysctl_value(key),
            "0",
            "{key} in the upstream"
        );
    }
    assert_ne!(topo.upstream.inode(), topo.node.inode());
    assert_eq!(upstream.accepted(https), 0);
    let curl = |ip: IpAddr, path: &str| {
        let url = format!("https://{WEB}:8443{path}");
        let mut cmd = curl_command(
            Some(&topo.actor),
            Some(&cgroup),
            &ca.cert_path(),
            &[(WEB, 8443, ip)],
            &url,
        );
        run(&mut cmd, T)
    };
    let out = curl(IpAddr::V4(topo.upstream_v4()), "/direct");
    out.expect_success("curl from actor to upstream");
    assert!(out.stdout.contains(&format!("sni={WEB}")), "{}", out.stdout);
    assert_eq!(upstream.accepted(https), 1);
    assert_eq!(
        upstream.seen_on(https)[0].peer.ip(),
        IpAddr::V4(topo.actor_v4())
    );

    let out = curl(IpAddr::V6(topo.upstream_v6()), "/direct6");
    out.expect_success("curl from actor to upstream over IPv6");
    assert_eq!(upstream.accepted(https6), 1);
    assert_eq!(
        upstream.seen_on(https6)[0].peer.ip(),
        IpAddr::V6(topo.actor_v6())
    );

    // A server-first exchange from the actor: the client sends nothing until the banner came.
    let out = run(
        &mut banner_exchange_command(Some(&topo.actor), Some(&cgroup), banner6),
        T,
    );
    out.expect_success("banner exchange from actor");
    assert_eq!(out.stdout, format!("{}\nping\n", BANNER.trim_end()));
    assert_eq!(upstream.accepted(banner6), 1);
}

/// A stand-in for the agent binary: logs like the real one (JSON on stderr), pins nothing,
/// and records `detach` calls, so the guard's mechanics are tested before the agent exists.
const FAKE_AGENT: &str = r#"#!/bin/sh
cmd=$1; shift
bpffs=""; actor=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bpffs-dir) bpffs=$2; shift ;;
    --actor-id) actor=$2; shift ;;
  esac
  shift
done
case "$cmd" in
  run)
    mkdir -p "$bpffs" || exit 2
    echo "fake agent starting (not JSON)" >&2
    if [ "$actor" = crash ]; then
      printf '{"level":"ERROR","fields":{"message":"cannot attach","error":"fake failure"}}\n' >&2
      exit 3
    fi
    printf '{"level":"INFO","fields":{"message":"ready","netns":"%s"}}\n' "$(readlink /proc/self/ns/net)" >&2
    printf '{"level":"INFO","fields":{"message":"connection closed","actor":"%s","pid":%s,"original_dst":"10.250.4.2:443","authority":"web.egress.test:443","source":"sni","pep_status":200,"bytes_up":517,"bytes_down":1024,"duration_ms":5,"outcome":"ok"}}\n' "$actor" "$$" >&2
    exec sleep 60
    ;;
  detach)
    rmdir "$bpffs" && touch "$(dirname "$0")/detached"
    ;;
esac
"#;

#[test]
fn agent_guard_collects_logs_places_and_detaches() {
    require_root();
    require_commands(&["sh", "sleep", "ip"]);
    let topo = Topology::new(4);
    let cgroup = Cgroup::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("fake-agent");
    std::fs::write(&bin, FAKE_AGENT).expect("write fake agent");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");

    let opts = AgentOptions::new("127.0.0.1:3128")
        .actor(ActorSpec::new("a1", "t", "ns", &cgroup).netns(&topo.actor));
    let bpffs = opts.bpffs_dir.clone();
    {
        let mut agent = Agent::start_with_bin(&bin, &topo.node, Some(&cgroup), opts);
        let ready = agent.wait_ready(T);
        assert_eq!(
            ready.field_str("netns"),
            Some(format!("net:[{}]", topo.node.inode()))
        );
        assert!(
            bpffs.is_dir(),
            "fake agent did not create {}",
            bpffs.display()
        );
        let conns = agent.wait_for_connections(1, T);
        assert_eq!(conns[0].actor.as_deref(), Some("a1"));
        assert_eq!(conns[0].pid, Some(agent.pid()));
        assert_eq!(conns[0].pep_status, Some(200));
        assert!(agent.lines().iter().any(|l| l.contains("not JSON")));
        assert_eq!(agent.json_lines().len(), 2);
        assert!(
            cgroup.pids().contains(&(agent.pid() as i32)),
            "agent not in its cgroup"
        );
        assert!(agent.is_running());
    }
    assert!(
        dir.path().join("detached").exists(),
        "Drop did not run `detach`"
    );
    assert!(!bpffs.exists(), "{} left behind", bpffs.display());

    // An agent that dies before `ready`: the wait fails at once with the agent's own log.
    let opts =
        AgentOptions::new("127.0.0.1:3128").actor(ActorSpec::new("crash", "t", "ns", &cgroup));
    let mut agent = Agent::start_with_bin(&bin, &topo.node, None, opts);
    let started = std::time::Instant::now();
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.wait_ready(T)))
        .expect_err("wait_ready must panic when the agent exits");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("agent exited") && msg.contains("fake failure"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit noticed only after {:?}",
        started.elapsed()
    );
}

#[test]
fn guards_clean_up_on_drop() {
    require_root();
    require_commands(&["squid", "ip", "sleep"]);
    let (names, cgroup_paths, squid_pid, squid_dir) = {
        let topo = Topology::new(3);
        let cgroup = Cgroup::new();
        let child = cgroup.child("inner");
        // A process left behind in the child cgroup: Drop must kill it to remove the cgroup.
        let mut cmd = command_in("sleep", Some(&topo.actor), Some(&child));
        cmd.arg("60");
        let orphan = cmd.spawn().expect("spawn sleep");
        let squid = Squid::start(&topo.node, SquidConfig::default());
        let names = vec![
            topo.node.name().to_string(),
            topo.actor.name().to_string(),
            topo.upstream.name().to_string(),
        ];
        for n in &names {
            assert!(PathBuf::from("/var/run/netns").join(n).exists());
        }
        let paths = vec![cgroup.path().to_path_buf(), child.path().to_path_buf()];
        let out = (names, paths, squid.pid(), squid.dir().to_path_buf());
        // The orphan is reaped by nobody but must still be killed by the cgroup guard.
        std::mem::forget(orphan);
        out
    };
    for n in &names {
        assert!(
            !PathBuf::from("/var/run/netns").join(n).exists(),
            "netns {n} left behind"
        );
    }
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in &names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "ip netns list still has {n}"
        );
    }
    for p in &cgroup_paths {
        assert!(!p.exists(), "cgroup {} left behind", p.display());
    }
    assert!(
        !squid_dir.exists(),
        "squid dir {} left behind",
        squid_dir.display()
    );
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(squid_pid as i32), None).is_ok();
    assert!(!alive, "squid {squid_pid} still running");
}

/// The rig's probe binary (UDP peers; also run inside gVisor, whose root is the host's `/`).
fn probe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_egress-probe"))
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// `ip -n NETNS ARGS` output; panics if ip fails.
fn ip_show(netns: &Netns, args: &[&str]) -> String {
    let out = run(
        std::process::Command::new("ip")
            .args(["-n", netns.name()])
            .args(args),
        T,
    );
    out.expect_success(&format!("ip {}", args.join(" ")));
    out.stdout
}

#[test]
fn gvisor_sandbox_reaches_a_server_through_its_veth_and_takes_the_addresses() {
    require_root();
    require_commands(&[
        "runsc", "curl", "ip", "nsenter", "unshare", "dnsmasq", "dig",
    ]);
    let server = Netns::new();
    let sbx = Netns::new();
    let veth = veth(&server, &sbx, &["10.253.1.1/24"], &["10.253.1.2/24"]);
    let dev = veth.b_name.as_str();
    // What runsc takes from the namespace at every start, put back before each run.
    let restore = || {
        sbx.ip(&["addr", "add", "10.253.1.2/24", "dev", dev]);
        sbx.ip(&["route", "add", "default", "via", "10.253.1.1"]);
    };
    sbx.ip(&["route", "add", "default", "via", "10.253.1.1"]);
    let ca = TestCa::new();
    let http: SocketAddr = "10.253.1.1:8080".parse().unwrap();
    let upstream = Upstream::start(&server, &ca, UpstreamSpec::new().http(http));
    let dns = Dns::start(
        &server,
        v4(10, 253, 1, 1),
        &[("dns.egress.test", v4(10, 253, 1, 1))],
    );
    let echo = UdpEcho::start(probe(), &server, "10.253.1.1:0".parse().unwrap());
    let sandbox = Sandbox::new(&sbx)
        .hosts(&[(WEB, v4(10, 253, 1, 1))])
        .resolver(dns.addr());
    let curl = |url: &str| sandbox.run(&["curl", "-sS", "--max-time", "10", url], T);

    // By address: gVisor's netstack sends from the address it took over.
    let started = Instant::now();
    let out = curl("http://10.253.1.1:8080/by-ip");
    let took = started.elapsed();
    out.expect_success("curl by IP in gVisor");
    eprintln!("gvisor: one sandbox run of curl took {took:?}");
    assert!(
        out.stdout
            .contains("upstream=http:10.253.1.1:8080 sni=- host=10.253.1.1:8080 path=/by-ip"),
        "{}",
        out.stdout
    );
    let seen = upstream.seen_on(http);
    assert_eq!(seen[0].peer.ip(), v4(10, 253, 1, 2), "{seen:#?}");

    // runsc moved the address into its netstack: the namespace's end has none left, and the
    // default route went with it; the link itself stays up.
    let addrs = ip_show(&sbx, &["-4", "-o", "addr", "show", "dev", dev]);
    assert_eq!(addrs.trim(), "", "runsc left IPv4 addresses on {dev}");
    let routes = ip_show(&sbx, &["-4", "route", "show"]);
    assert_eq!(routes.trim(), "", "routes left in the sandbox netns");
    assert!(
        ip_show(&sbx, &["link", "show", "dev", dev]).contains("state UP"),
        "{dev} went down"
    );

    // So a second sandbox in the same namespace has no address and cannot reach the server.
    let out = curl("http://10.253.1.1:8080/no-address");
    assert!(
        !out.success(),
        "curl without an address succeeded: {}",
        out.describe()
    );
    eprintln!("gvisor: without addresses: {}", out.describe());
    assert_eq!(upstream.accepted(http), 1);

    // With the address and route re-added it works again: a name from the mounted hosts file,
    restore();
    let out = curl(&format!("http://{WEB}:8080/by-name"));
    out.expect_success("curl by hosts-file name in gVisor");
    assert!(
        out.stdout
            .contains(&format!("host={WEB}:8080 path=/by-name")),
        "{}",
        out.stdout
    );
    // a name from the private DNS server named in the mounted resolv.conf (UDP from gVisor),
    restore();
    let out = curl("http://dns.egress.test:8080/by-dns");
    out.expect_success("curl by DNS name in gVisor");
    assert!(out.stdout.contains("path=/by-dns"), "{}", out.stdout);
    let q = dns.wait_for_query("dns.egress.test", T);
    assert_eq!(q.source, v4(10, 253, 1, 2));
    // and a UDP round trip of the probe itself.
    restore();
    let mut argv = vec![probe().to_str().expect("utf-8 probe path").to_string()];
    argv.extend(udp_send_args(
        echo.addr(),
        "from-gvisor",
        Duration::from_secs(5),
    ));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = sandbox.run(&argv, T);
    out.expect_success("udp-send in gVisor");
    assert_eq!(
        out.stdout.trim(),
        format!("reply=from-gvisor from={}", echo.addr())
    );
    assert_eq!(echo.wait_for_peers(1, T)[0].ip(), v4(10, 253, 1, 2));
}

#[test]
fn gvisor_run_that_times_out_is_killed_and_cleaned_up() {
    require_root();
    require_commands(&["runsc", "sleep", "ip", "nsenter", "unshare"]);
    let sbx = Netns::new();
    let started = Instant::now();
    let out = Sandbox::new(&sbx).run(&["sleep", "30"], Duration::from_secs(2));
    assert!(out.timed_out, "{}", out.describe());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing of the container survives: every runsc process (run, gofer, sandbox) names its
    // private --root, which the run removed; and runsc made no cgroup directory.
    let ps = run(std::process::Command::new("ps").args(["-eo", "args"]), T).stdout;
    let orphans: Vec<&str> = ps
        .lines()
        .filter(|l| l.contains("runsc"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|a| a.strip_prefix("--root="))
                .is_some_and(|root| !Path::new(root).exists())
        })
        .collect();
    assert!(orphans.is_empty(), "runsc processes left: {orphans:#?}");
    let prefix = format!("egt-sbx-{}-", std::process::id());
    let cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .expect("read /sys/fs/cgroup")
        .flatten()
        .filter_map(|h| std::fs::read_dir(h.path()).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    assert!(cgroups.is_empty(), "runsc cgroups left: {cgroups:#?}");
}

#[test]
fn dnsmasq_answers_its_hosts_only_on_its_address() {
    require_root();
    require_commands(&["dnsmasq", "dig", "ip", "nsenter"]);
    let dns_ns = Netns::new();
    let client = Netns::new();
    veth(&dns_ns, &client, &["10.253.2.1/24"], &["10.253.2.2/24"]);
    let dns = Dns::start(
        &dns_ns,
        v4(10, 253, 2, 1),
        &[
            (WEB, v4(10, 253, 2, 80)),
            ("two.egress.test", v4(10, 253, 2, 81)),
            ("two.egress.test", v4(10, 253, 2, 82)),
        ],
    );
    assert_eq!(dig(&client, dns.addr(), WEB), vec![v4(10, 253, 2, 80)]);
    let mut two = dig(&client, dns.addr(), "two.egress.test");
    two.sort();
    assert_eq!(two, vec![v4(10, 253, 2, 81), v4(10, 253, 2, 82)]);
    // Unknown names get an answer without records (REFUSED: there is no upstream to ask).
    assert_eq!(
        dig(&client, dns.addr(), "unknown.egress.test"),
        Vec::<IpAddr>::new()
    );
    let q = dns.wait_for_query(WEB, T);
    assert_eq!((q.qtype.as_str(), q.source), ("A", v4(10, 253, 2, 2)));
    assert_eq!(dns.queries().len(), 3, "{:#?}", dns.queries());
    // Bound to its address only: the namespace's loopback has no DNS server.
    let out = dig_output(&dns_ns, v4(127, 0, 0, 1), WEB, &[]);
    assert!(
        !out.success(),
        "dnsmasq answered on 127.0.0.1: {}",
        out.describe()
    );
}

#[test]
fn udp_echo_round_trip_between_namespaces() {
    require_root();
    require_commands(&["ip", "nsenter"]);
    let a = Netns::new();
    let b = Netns::new();
    veth(&a, &b, &["10.253.3.1/24"], &["10.253.3.2/24"]);
    let echo = UdpEcho::start(probe(), &a, "10.253.3.1:0".parse().unwrap());
    assert_ne!(echo.addr().port(), 0);
    let out = udp_send(
        probe(),
        &b,
        echo.addr(),
        "hello udp",
        Duration::from_secs(5),
    );
    out.expect_success("udp-send");
    assert_eq!(
        out.stdout.trim(),
        format!("reply=hello udp from={}", echo.addr())
    );
    let peers = echo.wait_for_peers(1, T);
    assert_eq!(peers[0].ip(), v4(10, 253, 3, 2));
    // A closed port answers ICMP port unreachable: a distinct exit code, not a timeout.
    let closed: SocketAddr = "10.253.3.1:9".parse().unwrap();
    let out = udp_send(probe(), &b, closed, "x", Duration::from_secs(5));
    assert_eq!(out.code(), Some(UDP_REFUSED_EXIT), "{}", out.describe());
    // An address nobody holds stays silent.
    let silent: SocketAddr = "10.253.3.9:7".parse().unwrap();
    let out = udp_send(probe(), &b, silent, "x", Duration::from_millis(300));
    assert_eq!(out.code(), Some(UDP_TIMEOUT_EXIT), "{}", out.describe());
    assert_eq!(echo.peers().len(), 1);
}
