//! Tier 3: the Agent Substrate contract against real PEPs (docs/pep-contract.md): squid on an
//! `https_port` that requires client certificates (`clientca=`), with the `substrate` profile
//! (CONNECT to the original ip:port, the name as a hint) and `headers` over TLS, each tunnel
//! carrying its actor's own certificate; a certificate from another CA, an expired one, one
//! rotated while a tunnel is open, one issued by a CSR signer; and nghttpx as an HTTP/2
//! CONNECT PEP in front of squid, two actors each on their own pooled connection.
//!
//! Subnets 130-139. Traffic only goes to addresses of the namespaces each test made.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use egress_tests::{
    agent::{ActorSpec, Agent, AgentOptions, admin_get},
    cgroup::Cgroup,
    client::{bash_tcp_command, curl_command},
    contract::{CertDir, Pki, client_cert, files_source, pep_toml, pki},
    nghttpx::{Nghttpx, NghttpxConfig},
    pki::TestCa,
    process::{self, ChildGuard},
    signer::Signer,
    squid::{Squid, SquidConfig},
    topology::Topology,
    upstream::{Upstream, UpstreamSpec},
    world::{NAME, T, World},
};

/// A world whose squid requires client certificates from the actors' CA, the agent's PEP
/// link configured by `pep` (TOML), its actor `actor-NET` with certificates from `certs`.
fn mtls_world(net: u8, pki: &Pki, pep: String) -> World {
    World::new(
        net,
        &format!("actor-{net}"),
        SquidConfig::default()
            .tls(&pki.pep_cert, &pki.pep_key)
            .client_ca(&pki.actors_ca.cert_path()),
        |mut o| {
            o.config_extra = pep;
            o
        },
    )
}

/// [`mtls_world`] with `profile` over HTTP/1.1 and the actors' certificates from `certs`.
fn files_world(net: u8, pki: &Pki, profile: &str, certs: &CertDir) -> World {
    mtls_world(
        net,
        pki,
        pep_toml(
            profile,
            "1.1",
            &pki.pep_ca.cert_path(),
            &files_source(certs.path()),
        ),
    )
}

fn curl_443(w: &World) -> process::Output {
    w.curl(NAME, w.v4(), 443, &format!("https://{NAME}:443/"))
}

/// The agent's `/metrics` (the admin listener's default address, in the node namespace).
fn metrics(node: &egress_tests::netns::Netns) -> String {
    let (code, body) = admin_get(node, "127.0.0.1:15090".parse().expect("addr"), "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// `egress-agent status --json` of the world's agent.
fn status(agent: &Agent) -> serde_json::Value {
    let out = agent.control(&["status", "--json"]);
    out.expect_success("egress-agent status --json");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}\n{}", out.stdout))
}

/// Waits until `status` shows `actor`'s certificate subject containing `cn`.
fn wait_for_subject(agent: &Agent, actor: &str, cn: &str) -> serde_json::Value {
    process::poll(
        T,
        Duration::from_millis(100),
        || {
            let s = status(agent);
            s["actor_certs"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["actor"] == actor))
                .filter(|c| c["subject"].as_str().is_some_and(|s| s.contains(cn)))
                .cloned()
                .ok_or(s)
        },
        |s| format!("status never showed {actor}'s certificate {cn}: {s:#}"),
    )
}

#[test]
fn substrate_connects_to_the_address_and_the_actor_is_its_certificate() {
    let pki = pki();
    let certs = CertDir::new();
    certs.write("actor-130", &client_cert(&pki.actors_ca, "actor-130"));
    let mut w = files_world(130, &pki, "substrate", &certs);
    wait_for_subject(&w.agent, "actor-130", "CN=actor-130");
    curl_443(&w).expect_success("curl through the substrate profile");
    let original = w.topo.upstream_addr(443);
    // The target is the address the actor dialled; the name only a hint.
    let entry = w
        .squid
        .wait_for_request("CONNECT", &original.to_string(), T);
    assert_eq!(
        entry.connect_authority.as_deref(),
        Some(format!("{NAME}:443").as_str()),
        "the hint header: {entry:?}"
    );
    assert_eq!(entry.actor_id, None, "no identity headers: {entry:?}");
    assert_eq!(entry.original_destination, None, "{entry:?}");
    let subject = entry.client_cert_subject.clone().unwrap_or_default();
    assert!(
        subject.contains("CN=actor-130"),
        "squid verified the actor's own certificate: {entry:?}"
    );
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("tunneled"), "{:?}", conn.line);
    assert_eq!(conn.line.field_str("pep").as_deref(), Some("default"));

    // `actor list` and `status` say which PEP the actor uses and why.
    let list = w.agent.control(&["actor", "list"]);
    list.expect_success("actor list");
    assert!(
        list.stdout.contains("pep=\"default (default)\""),
        "{}",
        list.stdout
    );
    let s = status(&w.agent);
    assert_eq!(s["pep"]["profile"], "substrate", "{s:#}");
    assert_eq!(s["pep"]["actor_certs"], "files", "{s:#}");
    assert_eq!(s["actors"][0]["pep"], "default (default)", "{s:#}");
    let text = w.agent.control(&["status"]);
    text.expect_success("status");
    println!("{}", text.stdout);
    let m = metrics(&w.topo.node);
    assert!(
        m.contains(r#"egress_actor_cert_usable{pep="default",actor="actor-130"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"egress_actor_cert_expiry_timestamp_seconds{pep="default",actor="actor-130"}"#
        ),
        "{m}"
    );
    for want in [
        "(substrate, HTTP/1.1, tls, per-actor certificates from files)",
        "CERTIFICATES (1)",
        "CN=actor-130",
    ] {
        assert!(text.stdout.contains(want), "{want}: {}", text.stdout);
    }
}

#[test]
fn headers_over_tls_carry_the_headers_and_the_actor_certificate() {
    let pki = pki();
    let certs = CertDir::new();
    certs.write("actor-131", &client_cert(&pki.actors_ca, "actor-131"));
    let mut w = files_world(131, &pki, "headers", &certs);
    wait_for_subject(&w.agent, "actor-131", "CN=actor-131");
    curl_443(&w).expect_success("curl through headers over mTLS");
    let original = w.topo.upstream_addr(443);
    let entry = w
        .squid
        .wait_for_request("CONNECT", &format!("{NAME}:443"), T);
    entry.assert_identity(
        ("actor-131", "coder", "team-a"),
        original,
        &format!("{NAME}:443"),
    );
    assert!(
        entry
            .client_cert_subject
            .as_deref()
            .is_some_and(|s| s.contains("CN=actor-131")),
        "{entry:?}"
    );
    assert_eq!(w.agent_line(original).outcome.as_deref(), Some("tunneled"));
}

/// `openssl s_client` against the PEP with `cert`/`key` (or none), sending a CONNECT: what it
/// printed.
fn s_client_to_pep(w: &World, pki: &Pki, cert: Option<(&Path, &Path)>) -> process::Output {
    let mut cmd = process::command_in("openssl", Some(&w.topo.node), None);
    cmd.args(["s_client", "-quiet", "-connect"])
        .arg(w.squid.addr().to_string())
        .arg("-CAfile")
        .arg(pki.pep_ca.cert_path());
    if let Some((cert, key)) = cert {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    process::run_with_input(
        &mut cmd,
        format!("CONNECT {NAME}:443 HTTP/1.1\r\nHost: {NAME}:443\r\n\r\n").as_bytes(),
        T,
    )
}

#[test]
fn the_pep_refuses_no_certificate_and_another_ca_and_the_agent_fails_closed() {
    let pki = pki();
    let certs = CertDir::new();
    let other_ca = TestCa::with_name("egress test other CA");
    certs.write("actor-132", &client_cert(&other_ca, "actor-132"));
    let mut w = files_world(132, &pki, "substrate", &certs);
    // squid itself, as openssl sees it.
    let none = s_client_to_pep(&w, &pki, None);
    assert!(
        none.stderr.contains("alert certificate required")
            || none.stdout.contains("alert certificate required"),
        "no certificate: {}",
        none.describe()
    );
    let other = other_ca.issue_client(
        "actor-132",
        time::Duration::hours(-1),
        time::Duration::days(1),
    );
    let (cert, key) = other_ca.write_issued("other", &other);
    let refused = s_client_to_pep(&w, &pki, Some((&cert, &key)));
    assert!(
        refused.stderr.contains("alert unknown ca") || refused.stdout.contains("alert unknown ca"),
        "another CA: {}",
        refused.describe()
    );

    // Through the agent: the actor's connection is reset, nothing reaches the upstream.
    wait_for_subject(&w.agent, "actor-132", "CN=actor-132");
    let out = curl_443(&w);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        !out.stderr.contains("access denied"),
        "a failure, not a refusal: {}",
        out.describe()
    );
    let original = w.topo.upstream_addr(443);
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("pep_tls"), "{:?}", conn.line);
    assert!(w.upstream.seen_on(original).is_empty());
    assert!(
        w.squid
            .access_log_entries()
            .iter()
            .all(|e| e.method != "CONNECT" || e.status != Some(200)),
        "squid opened no tunnel"
    );
}

#[test]
fn an_expired_certificate_fails_closed_before_anything_is_sent() {
    let pki = pki();
    let certs = CertDir::new();
    certs.write(
        "actor-133",
        &pki.actors_ca.issue_client(
            "actor-133",
            time::Duration::days(-2),
            time::Duration::hours(-1),
        ),
    );
    let mut w = files_world(133, &pki, "substrate", &certs);
    let out = curl_443(&w);
    assert!(!out.success(), "{}", out.describe());
    let original = w.topo.upstream_addr(443);
    let conn = w.agent_line(original);
    assert_eq!(
        conn.outcome.as_deref(),
        Some("no_certificate"),
        "{:?}",
        conn.line
    );
    let error = conn.line.field_str("error").unwrap_or_default();
    assert!(error.contains("expired"), "the error says why: {error}");
    assert!(
        w.squid.access_log_entries().is_empty(),
        "nothing was sent to the PEP: {:?}",
        w.squid.access_log_entries()
    );
    assert!(w.upstream.seen_on(original).is_empty());
    let s = status(&w.agent);
    let last_error = s["actor_certs"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(last_error.contains("expired"), "{s:#}");
    let m = metrics(&w.topo.node);
    assert!(
        m.contains(r#"egress_actor_cert_usable{pep="default",actor="actor-133"} 0"#),
        "{m}"
    );
}

/// A client in the actor holding a tunnel to the banner server open: it printed the banner,
/// and on each line written to its stdin it sends that line and prints the echo.
fn held_echo(w: &World, dst: SocketAddr) -> (ChildGuard, std::sync::mpsc::Receiver<String>) {
    let mut cmd = bash_tcp_command(
        Some(&w.topo.actor),
        Some(&w.cgroup),
        dst,
        "IFS= read -r -t 20 l <&3 || exit 8; printf '%s\\n' \"${l%$'\\r'}\"\n\
         while IFS= read -r line; do printf '%s\\r\\n' \"$line\" >&3; \
         IFS= read -r -t 10 l <&3 || exit 9; printf '%s\\n' \"${l%$'\\r'}\"; done\n",
    );
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stdout = child.child_mut().stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn rotation_keeps_the_open_tunnel_and_new_tunnels_use_the_new_certificate() {
    let pki = pki();
    let certs = CertDir::new();
    certs.write("actor-134", &client_cert(&pki.actors_ca, "actor-134-first"));
    let w = files_world(134, &pki, "substrate", &certs);
    wait_for_subject(&w.agent, "actor-134", "CN=actor-134-first");
    let banner = w.topo.upstream_addr(2222);
    let (mut held, lines) = held_echo(&w, banner);
    let first = lines
        .recv_timeout(T)
        .expect("the banner through the first tunnel");
    assert_eq!(
        first,
        egress_tests::upstream::BANNER.trim_end(),
        "the banner through the first tunnel"
    );

    // The runtime rotates the pair while the tunnel is open.
    certs.write(
        "actor-134",
        &client_cert(&pki.actors_ca, "actor-134-second"),
    );
    let renewed = wait_for_subject(&w.agent, "actor-134", "CN=actor-134-second");
    assert_eq!(renewed["renewals"], 1, "{renewed:#}");

    // A new tunnel presents the new certificate.
    curl_443(&w).expect_success("curl after the rotation");
    let original = w.topo.upstream_addr(443);
    let entry = w
        .squid
        .wait_for_request("CONNECT", &original.to_string(), T);
    assert!(
        entry
            .client_cert_subject
            .as_deref()
            .is_some_and(|s| s.contains("CN=actor-134-second")),
        "{entry:?}"
    );

    // The tunnel opened before still carries bytes both ways.
    let stdin = held.child_mut().stdin.as_mut().expect("stdin");
    writeln!(stdin, "still-here").expect("write to the held client");
    stdin.flush().expect("flush");
    let echo = lines
        .recv_timeout(T)
        .expect("the echo through the first tunnel");
    assert_eq!(echo, "still-here");
    drop(held);
    // Its CONNECT, logged when it closed, was made with the first certificate.
    let entry = w.squid.wait_for_request("CONNECT", &banner.to_string(), T);
    assert!(
        entry
            .client_cert_subject
            .as_deref()
            .is_some_and(|s| s.contains("CN=actor-134-first")),
        "{entry:?}"
    );
}

#[test]
fn a_signer_issues_the_actor_certificate_from_a_key_the_agent_made() {
    let pki = pki();
    let certs = CertDir::new();
    let mut w = files_world(135, &pki, "substrate", &certs);
    // The signer listens on the loopback of the node namespace, where the agent runs; the
    // agent is started again with it as its certificate source.
    let signer = Signer::start(
        Some(&w.topo.node),
        pki.actors_ca.clone(),
        Duration::from_secs(3600),
    );
    w.agent.terminate(T);
    let mut opts = w.agent_options.clone();
    opts.config_extra = pep_toml(
        "substrate",
        "1.1",
        &pki.pep_ca.cert_path(),
        &format!("source = \"signer\"\nurl = \"{}\"", signer.url()),
    );
    // A new agent takes over the pins (the first one, stopped, stays in the world until the
    // end: dropping it detaches what is pinned).
    let mut again = Agent::start(&w.topo.node, None, opts);
    again.wait_ready(T);
    signer.wait_for_issued(1, T);
    wait_for_subject(&again, "actor-135", "CN=actor-135");
    let request = &signer.requests()[0];
    assert_eq!(
        request.actor_id.as_deref(),
        Some("actor-135"),
        "{request:?}"
    );
    assert_eq!(request.template.as_deref(), Some("coder"), "{request:?}");
    assert_eq!(request.status, 200, "{request:?}");

    curl_443(&w).expect_success("curl with the signer's certificate");
    let original = w.topo.upstream_addr(443);
    let entry = w
        .squid
        .wait_for_request("CONNECT", &original.to_string(), T);
    assert!(
        entry
            .client_cert_subject
            .as_deref()
            .is_some_and(|s| s.contains("CN=actor-135")),
        "{entry:?}"
    );
    assert_eq!(
        again
            .wait_for_connection_to(original, 0, T)
            .outcome
            .as_deref(),
        Some("tunneled")
    );
}

/// Two actors' tunnels through nghttpx (HTTP/2 CONNECT, client certificates required) in front
/// of squid: each actor on its own pooled connection carrying many tunnels.
#[test]
fn http2_pools_each_actor_on_its_own_connection_with_many_tunnels() {
    egress_tests::require_root();
    egress_tests::require_commands(&["squid", "curl", "nghttpx"]);
    let pki = pki();
    let topo = Topology::new(136);
    let web_ca = TestCa::new();
    let upstream = Upstream::start(
        &topo.upstream,
        &web_ca,
        UpstreamSpec::new()
            .names(&[NAME])
            .https(topo.upstream_addr(443)),
    );
    let squid = Squid::start(
        &topo.node,
        SquidConfig::default().host(NAME, IpAddr::V4(topo.upstream_v4())),
    );
    let nghttpx_addr: SocketAddr = "127.0.0.1:3443".parse().expect("addr");
    let nghttpx = Nghttpx::start(
        &topo.node,
        NghttpxConfig::new(nghttpx_addr, squid.addr(), &pki.pep_cert, &pki.pep_key)
            .client_ca(&pki.actors_ca.cert_path())
            .extra("backend-connections-per-host=256"),
    );
    let certs = CertDir::new();
    let cgroups = [Cgroup::new(), Cgroup::new()];
    let ids = ["actor-136a", "actor-136b"];
    let mut opts = AgentOptions::new(nghttpx_addr);
    opts.config_extra = pep_toml(
        "headers",
        "2",
        &pki.pep_ca.cert_path(),
        &files_source(certs.path()),
    );
    for (id, cgroup) in ids.iter().zip(&cgroups) {
        certs.write(id, &client_cert(&pki.actors_ca, id));
        opts = opts.actor(ActorSpec::new(id, "coder", "team-a", cgroup).netns(&topo.actor));
    }
    let mut agent = Agent::start(&topo.node, None, opts);
    agent.wait_ready(T);
    for id in ids {
        wait_for_subject(&agent, id, &format!("CN={id}"));
    }

    // Ten tunnels per actor, five at a time, both actors at once.
    const PER_ACTOR: usize = 10;
    let curl = |cgroup: &Cgroup| {
        curl_command(
            Some(&topo.actor),
            Some(cgroup),
            &web_ca.cert_path(),
            &[(NAME, 443, IpAddr::V4(topo.upstream_v4()))],
            &format!("https://{NAME}:443/"),
        )
    };
    for _round in 0..PER_ACTOR / 5 {
        let mut running = Vec::new();
        for cgroup in &cgroups {
            for _ in 0..5 {
                let mut cmd = curl(cgroup);
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
                running.push(cmd.spawn().expect("spawn curl"));
            }
        }
        for child in running {
            let out = child.wait_with_output().expect("curl");
            assert!(
                out.status.success(),
                "a curl through HTTP/2 failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let entries = nghttpx.wait_for_entries(2 * PER_ACTOR, T);
    for id in ids {
        let mine: Vec<_> = entries
            .iter()
            .filter(|e| {
                e.client_subject
                    .as_deref()
                    .is_some_and(|s| s.contains(&format!("CN={id}")))
            })
            .collect();
        assert_eq!(mine.len(), PER_ACTOR, "{id}'s tunnels: {entries:#?}");
        assert!(
            mine.iter()
                .all(|e| e.method == "CONNECT" && e.alpn.as_deref() == Some("h2")),
            "{mine:#?}"
        );
        assert!(
            mine.iter().all(|e| e.actor_id.as_deref() == Some(id)),
            "each tunnel carries its own actor's headers under its own certificate: {mine:#?}"
        );
        // One connection (one client port) carried all of this actor's tunnels.
        let ports: std::collections::BTreeSet<u16> = mine.iter().map(|e| e.remote_port).collect();
        assert_eq!(
            ports.len(),
            1,
            "{id}'s tunnels on one connection: {mine:#?}"
        );
    }
    let s = status(&agent);
    let pool = &s["pools"][0];
    assert_eq!(pool["connections_opened_total"], 2, "{s:#}");
    assert_eq!(pool["streams_opened_total"], 2 * PER_ACTOR as u64, "{s:#}");
    let m = metrics(&topo.node);
    assert!(
        m.contains(r#"egress_pep_h2_connections_opened_total{pep="default"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"egress_pep_h2_streams_opened_total{{pep="default"}} {}"#,
            2 * PER_ACTOR
        )),
        "{m}"
    );
    // squid logs a tunnel when it closes, and nghttpx closes its side a moment after the
    // stream ends: wait until all are logged.
    process::poll(
        T,
        Duration::from_millis(100),
        || {
            let connects = squid
                .access_log_entries()
                .iter()
                .filter(|e| e.method == "CONNECT" && e.uri == format!("{NAME}:443"))
                .count();
            if connects == 2 * PER_ACTOR {
                Ok(())
            } else {
                Err(connects)
            }
        },
        |connects| format!("squid logged {connects} CONNECTs, not {}", 2 * PER_ACTOR),
    );
    assert_eq!(
        upstream.seen_on(topo.upstream_addr(443)).len(),
        2 * PER_ACTOR
    );
}

/// Three actors, three choices: the global PEP (by default), a named PEP chosen by the
/// template namespace, and no PEP (the actor's own `pep = "none"`: the embedded policy, empty,
/// denies everything and the actor gets the refusal).
#[test]
fn each_actor_uses_the_pep_it_selects() {
    egress_tests::require_root();
    let by_namespace = Cgroup::new();
    let no_pep = Cgroup::new();
    let mut w = World::new(137, "actor-137", SquidConfig::default(), |mut o| {
        // The named PEP is the same squid under other header names: squid's log shows
        // which connector opened each tunnel.
        o.config_extra = format!(
            "[peps.second]\naddress = \"{}\"\n[peps.second.headers]\nactor_id = \"x-second-actor\"\n\
             [pep_by_namespace]\n\"team-b\" = \"second\"\n",
            o.pep
        );
        let netns = o.actors[0].netns.clone();
        let mut b = ActorSpec::new("actor-137b", "coder", "team-b", &by_namespace);
        b.netns = netns.clone();
        let mut c = ActorSpec::new("actor-137c", "coder", "team-a", &no_pep).pep("none");
        c.netns = netns;
        o.actor(b).actor(c)
    });
    let list = w.agent.control(&["actor", "list"]);
    list.expect_success("actor list");
    for want in [
        "actor-137 template=\"coder\" template_namespace=\"team-a\" source=config capture=cgroup pep=\"default (default)\"",
        "actor-137b template=\"coder\" template_namespace=\"team-b\" source=config capture=cgroup pep=\"second (namespace)\"",
        "actor-137c template=\"coder\" template_namespace=\"team-a\" source=config capture=cgroup pep=\"none (actor)\"",
    ] {
        assert!(list.stdout.contains(want), "{want}\n{}", list.stdout);
    }
    let ip = w.v4();
    let curl = |cgroup: &Cgroup| {
        process::run(
            &mut curl_command(
                Some(&w.topo.actor),
                Some(cgroup),
                &w.ca.cert_path(),
                &[(NAME, 443, ip)],
                &format!("https://{NAME}:443/"),
            ),
            T,
        )
    };
    curl(&w.cgroup).expect_success("the default PEP's actor");
    curl(&by_namespace).expect_success("the namespace's PEP's actor");
    let refused = curl(&no_pep);
    egress_tests::refusal::assert_curl_tls_access_denied(&refused);

    let original = w.topo.upstream_addr(443);
    let lines = w.agent.wait_for_connections(3, T);
    let by_actor = |id: &str| {
        lines
            .iter()
            .find(|c| c.actor.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };
    let a = by_actor("actor-137");
    assert_eq!(a.line.field_str("pep").as_deref(), Some("default"));
    assert_eq!(a.outcome.as_deref(), Some("tunneled"));
    let b = by_actor("actor-137b");
    assert_eq!(b.line.field_str("pep").as_deref(), Some("second"));
    assert_eq!(b.outcome.as_deref(), Some("tunneled"));
    let c = by_actor("actor-137c");
    assert_eq!(c.line.field_str("pep").as_deref(), Some(""), "{:?}", c.line);
    assert_eq!(c.outcome.as_deref(), Some("denied"), "{:?}", c.line);
    let connects = w.squid.wait_for_entries(2, T);
    assert_eq!(
        connects.len(),
        2,
        "the actor without a PEP never reached squid: {connects:?}"
    );
    let of = |ns: &str| {
        connects
            .iter()
            .find(|e| e.actor_template_namespace.as_deref() == Some(ns))
            .unwrap_or_else(|| panic!("no CONNECT of namespace {ns}: {connects:?}"))
    };
    // The default PEP sends x-ate-actor-id; `second` sends it as x-second-actor.
    assert_eq!(of("team-a").actor_id.as_deref(), Some("actor-137"));
    assert_eq!(of("team-b").actor_id, None, "{connects:?}");
    assert_eq!(w.upstream.seen_on(original).len(), 2);
}
