//! Tier 3: the admin listener of a real agent (`--admin-listen`, `--access-log`): `/readyz`
//! turns 200 once it serves, `/metrics` counts exactly the connections the test made
//! (tunnelled and refused through squid, dialled directly and denied by the policy), and the
//! access log has one JSON line per connection with the fields of its log line. An actor
//! whose listener cannot be opened keeps `/readyz` at 503, naming it.
//!
//! Subnets 93-95. Traffic only goes to addresses of the namespaces each test made; the admin
//! listener is on loopback of the test's own node namespace.
use std::{
    io::BufRead as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_tests::{
    agent::{ActorSpec, Agent, AgentOptions, ConnectionLog, admin_get, wait_admin_ready},
    cgroup::Cgroup,
    client::banner_exchange_command,
    process, refusal,
    squid::SquidConfig,
    topology::Topology,
    world::{NAME, T, World},
};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// The admin address inside each test's node namespace.
fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15090))
}

/// Adds `--admin-listen` and `--access-log FILE` to the agent's options.
fn with_admin(mut o: AgentOptions, access_log: &Path) -> AgentOptions {
    o.extra_args.extend([
        "--admin-listen".into(),
        admin_addr().to_string(),
        "--access-log".into(),
        access_log.display().to_string(),
    ]);
    o
}

/// A parsed scrape of `/metrics`.
struct Metrics {
    scrape: Scrape,
    text: String,
}

impl Metrics {
    fn fetch(netns: &egress_tests::netns::Netns) -> Metrics {
        let (status, text) = admin_get(netns, admin_addr(), "/metrics");
        assert_eq!(status, 200, "{text}");
        assert!(
            text.ends_with("# EOF\n"),
            "OpenMetrics ends with # EOF:\n{text}"
        );
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("parsing the scrape: {e}\n{text}"));
        Metrics { scrape, text }
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name}: not a single value: {other:?}"),
            })
    }

    /// Like [`Metrics::get`], the sample must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{}", self.text))
    }

    /// Every sample of `name` with label `key` = `value`.
    fn count_with(&self, name: &str, key: &str, value: &str) -> usize {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && s.labels.get(key) == Some(value))
            .count()
    }
}

/// The access log's lines once it has `n` (the writer flushes when its queue runs empty).
fn access_lines(path: &Path, n: usize) -> Vec<Json> {
    let deadline = Instant::now() + T;
    loop {
        let lines: Vec<String> = std::fs::File::open(path)
            .map(|f| {
                std::io::BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .collect()
            })
            .unwrap_or_default();
        if lines.len() >= n || Instant::now() >= deadline {
            assert_eq!(lines.len(), n, "access log lines: {lines:#?}");
            return lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks the access log line of `conn` against its log line.
fn assert_access_line(lines: &[Json], conn: &ConnectionLog, expect: &[(&str, Json)]) {
    let id = conn.line.field_u64("id").expect("connection id");
    let line = lines
        .iter()
        .find(|l| l["id"] == id)
        .unwrap_or_else(|| panic!("no access log line with id {id}: {lines:#?}"));
    let same = [
        ("actor", Json::from(conn.actor.clone().expect("actor"))),
        (
            "original_dst",
            conn.original_dst.clone().expect("dst").into(),
        ),
        (
            "authority",
            conn.authority.clone().unwrap_or_default().into(),
        ),
        ("outcome", conn.outcome.clone().expect("outcome").into()),
        ("pep_status", conn.pep_status.unwrap_or(0).into()),
        ("bytes_up", conn.bytes_up.expect("bytes_up").into()),
        ("bytes_down", conn.bytes_down.expect("bytes_down").into()),
        ("pid", conn.pid.expect("pid").into()),
        (
            "client",
            conn.line.field_str("client").expect("client").into(),
        ),
        ("template", "coder".into()),
        ("namespace", "team-a".into()),
    ];
    for (key, value) in same.iter().chain(expect) {
        assert_eq!(
            &line[key], value,
            "{key} in {line} (log line {:?})",
            conn.line
        );
    }
    let time = line["time"].as_str().expect("time");
    assert!(
        time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
        "RFC 3339 UTC time: {time}"
    );
    assert!(line["duration_ms"].is_u64(), "{line}");
}

fn access_log_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("access.json")
}

#[test]
fn scrape_counts_tunnels_and_pep_denials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = access_log_path(&dir);
    let mut w = World::new(
        93,
        "actor-93",
        SquidConfig::default().deny_port(8443),
        |o| with_admin(o, &log),
    );
    wait_admin_ready(&w.topo.node, admin_addr(), T);
    assert_eq!(
        admin_get(&w.topo.node, admin_addr(), "/healthz"),
        (200, "ok\n".to_string())
    );
    assert_eq!(admin_get(&w.topo.node, admin_addr(), "/nope").0, 404);

    let ok = w.curl(NAME, w.v4(), 443, &format!("https://{NAME}:443/"));
    ok.expect_success("curl through the agent and squid");
    let tunneled = w.agent_line(w.topo.upstream_addr(443));
    assert_eq!(tunneled.outcome.as_deref(), Some("tunneled"));
    let refused = w.curl(NAME, w.v4(), 8443, &format!("https://{NAME}:8443/"));
    refusal::assert_curl_tls_access_denied(&refused);
    let refused = w.agent_line(w.topo.upstream_addr(8443));
    assert_eq!(refused.outcome.as_deref(), Some("pep_refused"));
    assert_eq!(refused.pep_status, Some(403));

    let m = Metrics::fetch(&w.topo.node);
    let actor = ("actor", "actor-93");
    let conns = "egress_connections_total";
    assert_eq!(
        m.value(
            conns,
            &[actor, ("outcome", "tunneled"), ("classification", "sni")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            conns,
            &[actor, ("outcome", "pep_refused"), ("classification", "sni")]
        ),
        1.0
    );
    assert_eq!(m.count_with(conns, "actor", "actor-93"), 2, "{}", m.text);
    let up = tunneled.bytes_up.expect("bytes_up");
    let down = tunneled.bytes_down.expect("bytes_down");
    assert!(up > 0 && down > 0, "{:?}", tunneled.line);
    assert_eq!(
        refused.bytes_up.unwrap_or(0) + refused.bytes_down.unwrap_or(0),
        0
    );
    assert_eq!(
        m.value("egress_bytes_total", &[actor, ("direction", "up")]),
        up as f64
    );
    assert_eq!(
        m.value("egress_bytes_total", &[actor, ("direction", "down")]),
        down as f64
    );
    assert_eq!(
        m.value("egress_pep_responses_total", &[("status", "200")]),
        1.0
    );
    assert_eq!(
        m.value("egress_pep_responses_total", &[("status", "403")]),
        1.0
    );
    assert_eq!(
        m.value("egress_tunnel_setup_seconds_count", &[("route", "pep")]),
        1.0
    );
    assert_eq!(
        m.get("egress_tunnel_setup_seconds_count", &[("route", "direct")]),
        None
    );
    assert_eq!(
        m.value("egress_policy_decisions_total", &[("decision", "pep")]),
        2.0
    );
    assert_eq!(
        m.value("egress_errors_total", &[("kind", "pep_refused")]),
        1.0
    );
    assert_eq!(
        m.value(
            "egress_refusals_total",
            &[("reason", "pep"), ("response", "tls_alert")]
        ),
        1.0
    );
    assert_eq!(
        m.count_with("egress_refusals_total", "reason", "pep"),
        1,
        "{}",
        m.text
    );
    assert_eq!(m.value("egress_listeners", &[("front", "cgroup")]), 1.0);
    assert_eq!(m.value("egress_listeners", &[("front", "dns")]), 1.0);
    assert_eq!(
        m.value(
            "egress_actors",
            &[("capture", "cgroup"), ("source", "config")]
        ),
        1.0
    );
    assert_eq!(m.value("egress_ready", &[]), 1.0);
    assert_eq!(
        m.value(
            "egress_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    let lines = access_lines(&log, 2);
    assert_access_line(
        &lines,
        &tunneled,
        &[("classification", "sni".into()), ("route", "pep".into())],
    );
    assert!(
        lines
            .iter()
            .any(|l| l["outcome"] == "tunneled" && l["setup_us"].as_u64() > Some(0))
    );
    assert_access_line(
        &lines,
        &refused,
        &[
            ("classification", "sni".into()),
            ("route", "pep".into()),
            ("setup_us", 0.into()),
        ],
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&log).expect("access log").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn scrape_counts_direct_dials_and_policy_denials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = access_log_path(&dir);
    let policy = dir.path().join("policy.toml");
    // The banner server only, by address: the agent dials it itself (no PEP).
    std::fs::write(
        &policy,
        "[[template]]\nname = \"coder\"\nallow = [ { cidr = \"10.250.94.2\", ports = [2222] } ]\n",
    )
    .expect("policy");
    let policy2 = policy.clone();
    let mut w = World::new(94, "actor-94", SquidConfig::default(), |mut o| {
        o.pep = String::new();
        o.policy = Some(policy2);
        with_admin(o, &log)
    });
    assert_eq!(
        w.v4(),
        IpAddr::from([10, 250, 94, 2]),
        "the policy names it"
    );
    wait_admin_ready(&w.topo.node, admin_addr(), T);

    let banner = w.topo.upstream_addr(2222);
    let out = process::run(
        &mut banner_exchange_command(Some(&w.topo.actor), Some(&w.cgroup), banner),
        T,
    );
    out.expect_success("the server-first exchange, dialled directly");
    let direct = w.agent_line(banner);
    assert_eq!(
        direct.outcome.as_deref(),
        Some("direct"),
        "{:?}",
        direct.line
    );
    // No rule allows 8080: the agent answers the request 403 itself.
    let url = format!("http://{NAME}:8080/");
    let denied = process::run(
        &mut refusal::with_status(w.curl_command(true, NAME, w.v4(), 8080, &url)),
        T,
    );
    refusal::assert_curl_got_403(&denied);
    let denied = w.agent_line(w.topo.upstream_addr(8080));
    assert_eq!(
        denied.outcome.as_deref(),
        Some("denied"),
        "{:?}",
        denied.line
    );

    let m = Metrics::fetch(&w.topo.node);
    let actor = ("actor", "actor-94");
    let conns = "egress_connections_total";
    assert_eq!(
        m.value(
            conns,
            &[actor, ("outcome", "direct"), ("classification", "none")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            conns,
            &[actor, ("outcome", "denied"), ("classification", "host")]
        ),
        1.0
    );
    assert_eq!(m.count_with(conns, "actor", "actor-94"), 2, "{}", m.text);
    assert_eq!(
        m.value("egress_bytes_total", &[actor, ("direction", "up")]),
        direct.bytes_up.expect("bytes_up") as f64
    );
    assert_eq!(
        m.value("egress_bytes_total", &[actor, ("direction", "down")]),
        direct.bytes_down.expect("bytes_down") as f64
    );
    assert_eq!(
        m.value("egress_tunnel_setup_seconds_count", &[("route", "direct")]),
        1.0
    );
    assert_eq!(
        m.value("egress_policy_decisions_total", &[("decision", "allow")]),
        1.0
    );
    assert_eq!(
        m.value("egress_policy_decisions_total", &[("decision", "deny")]),
        1.0
    );
    assert_eq!(
        m.value(
            "egress_refusals_total",
            &[("reason", "policy"), ("response", "http_403")]
        ),
        1.0
    );
    // A denial is a decision, not an error; no PEP answered anything.
    assert_eq!(
        m.count_with("egress_errors_total", "kind", "denied"),
        0,
        "{}",
        m.text
    );
    assert_eq!(
        m.count_with("egress_pep_responses_total", "status", "200"),
        0
    );
    assert_eq!(m.value("egress_listeners", &[("front", "cgroup")]), 1.0);

    let lines = access_lines(&log, 2);
    assert_access_line(
        &lines,
        &direct,
        &[
            ("classification", "none".into()),
            ("route", "direct".into()),
            ("dialled", banner.to_string().into()),
        ],
    );
    assert_access_line(
        &lines,
        &denied,
        &[
            ("classification", "host".into()),
            ("route", "deny".into()),
            ("setup_us", 0.into()),
            ("error", "denied by policy".into()),
        ],
    );
}

#[test]
fn an_unserved_actor_keeps_readyz_at_503() {
    egress_tests::require_root();
    let topo = Topology::new(95);
    let cgroup = Cgroup::new();
    // Something in the actor's namespace holds the agent's listen port: the actor stays
    // captured (its connects are refused) but unserved, and the agent is not ready.
    let opts = AgentOptions::new("127.0.0.1:3128")
        .actor(ActorSpec::new("actor-95", "coder", "team-a", &cgroup).netns(&topo.actor));
    let port = opts.listen_port.unwrap_or(15001);
    let _squatter = topo.actor.run(move || {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the listen port")
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(&topo.node, None, with_admin(opts, &access_log_path(&dir)));
    // Everything the readiness depends on is settled before the agent logs `ready`.
    agent.wait_ready(T);
    let (status, body) = admin_get(&topo.node, admin_addr(), "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"actor-95\""), "{body}");
    assert!(
        !body.contains("programs:"),
        "the programs are attached: {body}"
    );
    assert_eq!(admin_get(&topo.node, admin_addr(), "/healthz").0, 200);
    let m = Metrics::fetch(&topo.node);
    assert_eq!(m.value("egress_ready", &[]), 0.0);
    assert_eq!(m.value("egress_errors_total", &[("kind", "listener")]), 1.0);
    assert_eq!(
        m.get("egress_listeners", &[("front", "cgroup")]),
        None,
        "{}",
        m.text
    );
}
