//! Tier 3: `egress-agent status` (over the control socket) and `egress-agent maps` (the
//! pinned maps, read directly) while an actor's captured connection is held open, and after
//! the agent stopped; `bpftool` reads the same pins. Same world as `capture.rs`.
//!
//! Traffic only ever goes to loopback or to addresses of the namespaces a test made.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use egress_agent::{
    ebpf::dump::{Content, MapDump},
    status::Report,
};
use egress_tests::{
    agent::agent_bin,
    client::bash_tcp_command,
    process::{self, ChildGuard, Output},
    squid::SquidConfig,
    upstream::BANNER,
    world::{T, World},
};

/// The actor's listener port (the agent's default `--listen-port`).
const LISTEN_PORT: u16 = 15001;

/// Each program the agent attaches, with the hook the kernel reports for its link.
const HOOKS: [(&str, &str); 10] = [
    ("egress_connect4", "connect4"),
    ("egress_connect6", "connect6"),
    ("egress_getpeername4", "getpeername4"),
    ("egress_getpeername6", "getpeername6"),
    ("egress_recvmsg4", "recvmsg4"),
    ("egress_recvmsg6", "recvmsg6"),
    ("egress_sendmsg4", "sendmsg4"),
    ("egress_sendmsg6", "sendmsg6"),
    ("egress_sock_release", "sock_release"),
    ("egress_sockops", "sock_ops"),
];

fn maps_command(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("maps").arg("--bpffs-dir").arg(dir).args(extra);
    cmd
}

fn maps(dir: &Path, extra: &[&str]) -> Output {
    process::run(&mut maps_command(dir, extra), T)
}

fn maps_json(dir: &Path) -> BTreeMap<String, MapDump> {
    let out = maps(dir, &["--json"]);
    out.expect_success("maps --json");
    let dumps: Vec<MapDump> = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "maps --json is not a list of dumps: {e}\n{}",
            out.describe()
        )
    });
    dumps.into_iter().map(|d| (d.name.clone(), d)).collect()
}

/// A bash client in the actor that reads the upstream's banner, prints it and then holds the
/// connection open (waiting for a line that never comes) until it is killed.
fn hold_open(w: &World, dst: SocketAddr) -> (ChildGuard, String) {
    let mut cmd = bash_tcp_command(
        Some(&w.topo.actor),
        Some(&w.cgroup),
        dst,
        "IFS= read -r -t 20 l <&3 || exit 8; printf '%s\\n' \"$l\"\nread -r -t 120 x <&3\n",
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child
        .child_mut()
        .stdout
        .take()
        .expect("the client's stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(T)
        .expect("the held client printed the banner within the timeout");
    (child, line)
}

#[test]
fn status_and_maps_show_a_held_connection_and_the_pins_outlive_the_agent() {
    let mut w = World::new(90, "status-90", SquidConfig::default(), |o| o);
    let dir = w.agent.bpffs_dir().to_path_buf();
    let cgroup_id = w.cgroup.id();
    let dst = w.topo.upstream_addr(2222);
    let actor_cookie = w
        .topo
        .actor
        .run(egress_agent::netns::own_cookie)
        .expect("the actor namespace's cookie");

    let (mut client, banner) = hold_open(&w, dst);
    assert_eq!(
        banner.trim_end(),
        BANNER.trim_end(),
        "the banner came through"
    );
    let client_pid = client.pid();

    // status --json: the structured answer.
    let out = w.agent.control(&["status", "--json"]);
    out.expect_success("status --json");
    let r: Report = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not a report: {e}\n{}", out.describe()));
    assert_eq!(r.version.agent, env!("CARGO_PKG_VERSION"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r.version.kernel, kernel.trim());
    assert_eq!(r.bpffs_dir, dir);
    assert_eq!(
        r.pep.as_ref().map(|p| p.address.as_str()),
        Some(w.squid.addr().to_string().as_str())
    );
    assert!(r.ready.ready, "ready: {:?}", r.ready);
    assert!(r.ready.not_ready.is_empty());

    assert_eq!(r.actors.len(), 1, "{:?}", r.actors);
    let actor = &r.actors[0];
    assert_eq!(actor.actor.id, "status-90");
    assert_eq!(actor.capture, "cgroup");
    assert_eq!(actor.source.as_str(), "config");
    assert_eq!(actor.cgroup_id, Some(cgroup_id));
    let v4: SocketAddr = format!("127.0.0.1:{LISTEN_PORT}").parse().unwrap();
    assert!(
        actor.listeners.contains(&v4),
        "listeners: {:?}",
        actor.listeners
    );

    assert_eq!(r.listeners.len(), 1, "{:?}", r.listeners);
    let listener = &r.listeners[0];
    assert_eq!(listener.front, "ebpf");
    assert_eq!(listener.netns_cookie, actor_cookie);
    assert_eq!(listener.addresses, actor.listeners);
    assert_eq!(listener.actors, ["status-90"]);

    assert_eq!(r.attachments.len(), 1, "{:?}", r.attachments);
    let att = &r.attachments[0];
    assert_eq!(att.cgroup_id, cgroup_id);
    assert_eq!(att.actor.as_deref(), Some("status-90"));
    assert_eq!(att.cgroup_exists, Some(true));
    assert!(att.missing.is_empty(), "{att:?}");
    let hooks: Vec<(&str, &str)> = att
        .programs
        .iter()
        .map(|p| {
            assert!(p.error.is_none(), "{p:?}");
            assert!(p.link_id.is_some_and(|id| id > 0) && p.program_id.is_some_and(|id| id > 0));
            (p.name.as_str(), p.attach_type.as_deref().unwrap_or("?"))
        })
        .collect();
    assert_eq!(hooks, HOOKS);

    // What the maps hold while the connection is open: the actor's entry, the settings, the
    // counters, and the held socket's record under its cookie. Its EGRESS_CONNS record was
    // taken by the agent when it accepted the connection.
    let sizes: Vec<(&str, u32, u32)> = r
        .maps
        .iter()
        .map(|m| (m.name.as_str(), m.entries, m.capacity))
        .collect();
    assert_eq!(
        sizes,
        [
            ("EGRESS_ACTORS", 1, 4096),
            ("EGRESS_CONNS", 0, 65536),
            ("EGRESS_COUNTERS", 9, 9),
            ("EGRESS_SETTINGS", 1, 1),
            ("EGRESS_SOCKETS", 1, 65536),
        ],
        "maps_error: {:?}",
        r.maps_error
    );

    // The text form says the same in tables.
    let out = w.agent.control(&["status"]);
    out.expect_success("status");
    assert!(out.stdout.contains("ready     yes"), "{}", out.stdout);
    let row = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("status-90"))
        .unwrap_or_else(|| panic!("no actor row:\n{}", out.stdout));
    assert!(
        row.contains(&format!("cgroup {cgroup_id} (")) && row.contains(&v4.to_string()),
        "{row}"
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&cgroup_id.to_string()))
        .unwrap_or_else(|| panic!("no attachment row:\n{}", out.stdout));
    assert!(row.contains("status-90") && row.contains("10/10"), "{row}");

    // maps --json: decoded with the shared types.
    let dumps = maps_json(&dir);
    let Content::Actors(actors) = &dumps["EGRESS_ACTORS"].content else {
        panic!("EGRESS_ACTORS not decoded: {:?}", dumps["EGRESS_ACTORS"]);
    };
    assert_eq!(actors.len(), 1);
    assert_eq!(actors[0].cgroup_id, cgroup_id);
    assert_eq!(actors[0].listen_port, LISTEN_PORT);
    assert_eq!(actors[0].listener_v4, Some(v4));
    assert!(
        actors[0]
            .dns_v4
            .is_some_and(|d| d.ip() == v4.ip() && d.port() != 0)
    );
    let Content::Sockets(sockets) = &dumps["EGRESS_SOCKETS"].content else {
        panic!("EGRESS_SOCKETS not decoded");
    };
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let s = &sockets[0].record;
    assert_eq!(s.destination, dst);
    assert_eq!(s.pid, client_pid, "the record names the held client");
    assert_eq!((s.actor_cgroup, s.cgroup), (cgroup_id, cgroup_id));
    assert!(
        s.age_ms.is_some_and(|a| a < T.as_millis() as u64 * 3),
        "{s:?}"
    );
    assert!(matches!(&dumps["EGRESS_CONNS"].content, Content::Conns(c) if c.is_empty()));
    let Content::Settings(settings) = &dumps["EGRESS_SETTINGS"].content else {
        panic!("EGRESS_SETTINGS not decoded");
    };
    assert_eq!(settings.len(), 1);
    assert_eq!(
        settings[0].agent_mark, 0x6567_0000,
        "the default --socket-mark"
    );
    let Content::Counters(counters) = &dumps["EGRESS_COUNTERS"].content else {
        panic!("EGRESS_COUNTERS not decoded");
    };
    let counter = |name: &str| {
        counters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.total)
            .unwrap_or_else(|| panic!("no counter {name}"))
    };
    assert_eq!(counter("redirected"), 1, "{counters:?}");
    assert_eq!(counter("published"), 1, "{counters:?}");
    assert_eq!(counter("refused"), 0, "{counters:?}");
    let out = maps(&dir, &["--map", "EGRESS_ACTORS"]);
    out.expect_success("maps --map EGRESS_ACTORS");
    assert!(
        out.stdout
            .starts_with("EGRESS_ACTORS (hash, 1/4096 entries)\n"),
        "{}",
        out.stdout
    );
    let row: Vec<&str> = out
        .stdout
        .lines()
        .nth(2)
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        row.get(..2),
        Some(&[cgroup_id.to_string().as_str(), v4.to_string().as_str()][..]),
        "{}",
        out.stdout
    );
    let out = maps(&dir, &["--map", "NOPE"]);
    assert!(
        !out.success() && out.stderr.contains("no map \"NOPE\" is pinned"),
        "{}",
        out.describe()
    );

    // bpftool reads the same pins (the documented commands).
    let programs: Vec<(String, u32)> = att
        .programs
        .iter()
        .map(|p| (p.name.clone(), p.program_id.unwrap_or(0)))
        .collect();
    bpftool_sees_the_pins(
        &dir,
        cgroup_id,
        &w.cgroup.path().display().to_string(),
        &programs,
    );

    // The client goes: its socket's record goes with it.
    client.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(client.wait_timeout(T).is_some());
    let deadline = std::time::Instant::now() + T;
    loop {
        let dumps = maps_json(&dir);
        if dumps["EGRESS_SOCKETS"].entries == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed socket's record stayed: {:?}",
            dumps["EGRESS_SOCKETS"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The agent stops: maps still reads the pins, status says the agent is unreachable.
    assert!(
        w.agent.terminate(T).is_some_and(|s| s.success()),
        "the agent exits cleanly"
    );
    let dumps = maps_json(&dir);
    let Content::Actors(actors) = &dumps["EGRESS_ACTORS"].content else {
        panic!("EGRESS_ACTORS not decoded after the agent stopped");
    };
    assert_eq!(actors.len(), 1);
    assert_eq!(actors[0].cgroup_id, cgroup_id);
    let out = w.agent.control(&["status"]);
    assert!(!out.success(), "status without an agent must fail");
    assert!(
        out.stderr.contains("cannot reach the agent at")
            && out.stderr.contains("is `egress-agent run` running"),
        "{}",
        out.describe()
    );

    // Without root the pins cannot be read, and maps says so.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(agent_bin())
        .arg("maps")
        .arg("--bpffs-dir")
        .arg(&dir);
    let out = process::run(&mut cmd, T);
    assert!(
        !out.success() && out.stderr.contains("run as root"),
        "{}",
        out.describe()
    );
}

/// `bpftool map dump pinned` and `bpftool cgroup show` on the agent's pins and cgroup: the
/// actor's key, and the programs `status` reported (name and program id), on their hooks.
fn bpftool_sees_the_pins(dir: &Path, cgroup_id: u64, cgroup: &str, programs: &[(String, u32)]) {
    egress_tests::require_commands(&["bpftool"]);
    let actors = dir.join("maps").join("EGRESS_ACTORS");
    let out = process::run(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&actors),
        T,
    );
    out.expect_success("bpftool map dump pinned");
    let entries: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool -j output: {e}\n{}", out.describe()));
    let entries = entries.as_array().expect("a list of entries");
    assert_eq!(entries.len(), 1, "{}", out.stdout);
    let key: Vec<u8> = entries[0]["key"]
        .as_array()
        .expect("key bytes")
        .iter()
        .map(|b| {
            let b = b.as_str().expect("a hex byte");
            u8::from_str_radix(b.trim_start_matches("0x"), 16).expect("hex")
        })
        .collect();
    assert_eq!(key, cgroup_id.to_ne_bytes(), "the key is the cgroup id");

    let out = process::run(
        Command::new("bpftool").args(["-j", "cgroup", "show", cgroup]),
        T,
    );
    out.expect_success("bpftool cgroup show");
    let attached: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool -j output: {e}\n{}", out.describe()));
    let mut seen: Vec<(String, u32, String)> = attached
        .as_array()
        .expect("a list of programs")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                p["id"].as_u64().unwrap_or(0) as u32,
                p["attach_type"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    seen.sort();
    let hook = |name: &str| {
        HOOKS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, hook)| match *hook {
                "sock_ops" => "cgroup_sock_ops".to_string(),
                "sock_release" => "cgroup_inet_sock_release".to_string(),
                h => {
                    let (verb, family) = h.split_at(h.len() - 1);
                    let proto = if verb.ends_with("msg") { "udp" } else { "inet" };
                    format!("cgroup_{proto}{family}_{verb}")
                }
            })
            .unwrap_or_default()
    };
    let mut expected: Vec<(String, u32, String)> = programs
        .iter()
        .map(|(name, id)| (name.clone(), *id, hook(name)))
        .collect();
    expected.sort();
    assert_eq!(seen, expected, "{}", out.stdout);
}

#[test]
fn maps_without_pins_says_where_it_looked() {
    egress_tests::require_root();
    egress_tests::ensure_bpffs();
    let dir = Path::new("/sys/fs/bpf").join(egress_tests::unique_name("egress-test-none"));
    let out = maps(&dir, &[]);
    assert!(!out.success());
    assert!(
        out.stderr
            .contains(&format!("no pinned maps under {}", dir.display()))
            && out.stderr.contains("running with this --bpffs-dir"),
        "{}",
        out.describe()
    );
}

#[test]
fn a_removed_actor_cgroup_shows_as_gone_and_the_agent_not_ready() {
    let w = World::new(91, "status-91", SquidConfig::default(), |o| o);
    let cgroup = egress_tests::cgroup::Cgroup::new();
    let id = cgroup.id();
    let path = cgroup.path().display().to_string();
    let netns = w.topo.actor.path().display().to_string();
    w.agent
        .control(&[
            "actor", "add", "--id", "gone-91", "--cgroup", &path, "--netns", &netns,
        ])
        .expect_success("actor add");
    let report = |what: &str| -> Report {
        let out = w.agent.control(&["status", "--json"]);
        out.expect_success(what);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not a report: {e}\n{}", out.describe()))
    };
    let r = report("status with two actors");
    assert!(r.ready.ready, "{:?}", r.ready);
    let ids: Vec<(u64, Option<&str>, Option<bool>)> = r
        .attachments
        .iter()
        .map(|a| (a.cgroup_id, a.actor.as_deref(), a.cgroup_exists))
        .collect();
    let mut expected = vec![
        (w.cgroup.id(), Some("status-91"), Some(true)),
        (id, Some("gone-91"), Some(true)),
    ];
    expected.sort();
    assert_eq!(ids, expected);

    // The cgroup is removed behind the agent's back: the kernel detaches its links once the
    // cgroup is released, and status says so.
    drop(cgroup);
    let deadline = std::time::Instant::now() + T;
    let r = loop {
        let r = report("status after the cgroup went");
        let gone = r
            .attachments
            .iter()
            .find(|a| a.cgroup_id == id)
            .is_some_and(|a| a.cgroup_exists == Some(false));
        if gone {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed cgroup still shows as existing: {:?}",
            r.attachments
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!r.ready.ready);
    assert_eq!(
        r.ready.not_ready,
        [format!("actor gone-91: its cgroup {id} is gone")]
    );
    let gone = r.attachments.iter().find(|a| a.cgroup_id == id).unwrap();
    assert_eq!(gone.programs.len(), 10);
    assert!(
        gone.programs
            .iter()
            .all(|p| p.error.as_deref() == Some("detached: the cgroup is gone")),
        "{gone:?}"
    );
    let out = w.agent.control(&["status"]);
    out.expect_success("status");
    assert!(
        out.stdout.contains(&format!(
            "ready     no\n          - actor gone-91: its cgroup {id} is gone\n"
        )),
        "{}",
        out.stdout
    );
}
