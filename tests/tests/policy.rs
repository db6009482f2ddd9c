//! The embedded policy (no PEP): the agent decides each captured connection of a cgroup actor
//! from the policy file and dials upstream itself, and its DNS forwarder answers the actor's
//! lookups. Every destination is inside the test's own namespaces: the "metadata" address
//! 169.254.169.254 is an address of the test's upstream namespace, so a bug that let it
//! through would be seen there, not sent anywhere.
//!
//! Subnets 70-79.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use egress_tests::{
    agent::ConnectionLog,
    client::{banner_exchange_command, bash_tcp_command, curl_command},
    dns::dig_in,
    process, refusal,
    upstream::BANNER,
    world::{BANNER_NAME, DENIED, METADATA, METADATA_ALIAS, NAME, OTHER, PolicyWorld, T},
};

/// A captured `dig @server name` in the actor: the addresses answered.
fn dig(w: &PolicyWorld, server: IpAddr, name: &str) -> Vec<IpAddr> {
    let out = dig_in(&w.topo.actor, Some(&w.cgroup), server, name, &[]);
    assert!(out.success(), "dig {name}: {}", out.describe());
    out.stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn field(c: &ConnectionLog, name: &str) -> String {
    c.line.field_str(name).unwrap_or_default()
}

const ALLOW_WEB_8443: &str = r#"
[[template]]
name = "coder"
allow = [ { host = "web.egress.test", ports = [8443] } ]
"#;

#[test]
fn empty_policy_denies_everything() {
    let mut w = PolicyWorld::new(70, "");
    let out = w.curl(NAME, IpAddr::V4(w.topo.upstream_v4()), 8443, "/");
    refusal::assert_curl_tls_access_denied(&out);
    let line = w.line(w.web(8443), 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert!(
        field(&line, "rule").contains("no allow rule"),
        "{:?}",
        line.line
    );
    assert_eq!(field(&line, "refusal"), "tls_alert");
    // Each refusal as the actor's client sees it: openssl's alert, curl's 403 for plain HTTP,
    // a clean EOF with no bytes for a client that sends nothing (server-first).
    refusal::assert_s_client_access_denied(Some(&w.topo.actor), Some(&w.cgroup), w.web(8443), NAME);
    assert_eq!(field(&w.line(w.web(8443), 1), "refusal"), "tls_alert");
    let http = process::run(
        &mut refusal::with_status(curl_command(
            Some(&w.topo.actor),
            Some(&w.cgroup),
            &w.ca.cert_path(),
            &[(NAME, 8080, w.web(8080).ip())],
            &format!("http://{NAME}:8080/"),
        )),
        T,
    );
    refusal::assert_curl_got_403(&http);
    assert_eq!(field(&w.line(w.web(8080), 0), "refusal"), "http_403");
    refusal::assert_raw_tcp_clean_eof(Some(&w.topo.actor), Some(&w.cgroup), w.web(2222), "");
    let line = w.line(w.web(2222), 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert_eq!(field(&line, "refusal"), "close");
    assert_eq!(
        w.upstream.total_accepted(),
        0,
        "something reached the upstream"
    );
}

#[test]
fn wildcard_and_port_rules() {
    let mut w = PolicyWorld::new(
        71,
        r#"
[[template]]
name = "coder"
allow = [ { host = "*.egress.test", ports = ["8000-8999"] } ]
"#,
    );
    let ip = IpAddr::V4(w.topo.upstream_v4());
    let ok = w.curl(NAME, ip, 8443, "/hello");
    ok.expect_success("an allowed request");
    assert!(ok.stdout.contains("/hello"));
    let line = w.line(w.web(8443), 0);
    assert_eq!(line.outcome.as_deref(), Some("direct"), "{:?}", line.line);
    assert!(
        field(&line, "rule").contains("*.egress.test"),
        "{:?}",
        line.line
    );
    assert_eq!(field(&line, "dialled"), w.web(8443).to_string());
    assert_eq!(field(&line, "relay"), "splice", "{:?}", line.line);

    let denied = w.curl(NAME, ip, 443, "/");
    assert!(!denied.success(), "port 443 is outside the rule's range");
    let line = w.line(w.web(443), 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert_eq!(w.upstream.accepted(w.web(443)), 0);
}

#[test]
fn metadata_address_is_denied_even_when_everything_is_allowed() {
    let mut w = PolicyWorld::new(
        72,
        r#"
[[template]]
name = "coder"
allow = [ { host = "*" }, { cidr = "0.0.0.0/0" }, { cidr = "::/0" } ]
"#,
    );
    let meta = SocketAddr::new(IpAddr::V4(METADATA), 80);
    let out = process::run(
        &mut bash_tcp_command(
            Some(&w.topo.actor),
            Some(&w.cgroup),
            meta,
            "printf 'GET / HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\n\\r\\n' >&3; cat <&3",
        ),
        T,
    );
    assert!(
        !out.stdout.contains("HTTP/1.1 200"),
        "the metadata address answered: {}",
        out.describe()
    );
    // The agent's own 403, read to a clean end.
    out.expect_success("the 403 and a clean close");
    assert!(
        out.stdout.starts_with("HTTP/1.1 403 Forbidden\r\n")
            && out.stdout.contains(refusal::HTTP_403_BODY),
        "{}",
        out.describe()
    );
    let line = w.line(meta, 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert!(
        field(&line, "rule").contains("always denied"),
        "{:?}",
        line.line
    );
    assert_eq!(field(&line, "refusal"), "http_403");
    // A name that resolves there is denied too (the agent resolves it, then refuses).
    let alias = w.curl(METADATA_ALIAS, IpAddr::V4(w.topo.upstream_v4()), 8443, "/");
    refusal::assert_curl_tls_access_denied(&alias);
    let line = w.line(w.web(8443), 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert_eq!(field(&line, "refusal"), "tls_alert");
    // The node's own address is always denied as well.
    let node = SocketAddr::new(IpAddr::V4(w.topo.node_uplink_v4()), 8443);
    let out = w.curl(NAME, node.ip(), 8443, "/");
    assert!(!out.success());
    let line = w.line(node, 0);
    assert!(
        field(&line, "rule").contains("always denied"),
        "{:?}",
        line.line
    );
    assert_eq!(
        w.upstream.accepted(meta),
        0,
        "the metadata listener was reached"
    );
}

#[test]
fn sni_spoofing_dials_the_names_real_address() {
    // Only web.egress.test is allowed; the actor sends that SNI to other.egress.test's
    // address. The agent must dial web.egress.test's address (from its own resolver).
    let mut w = PolicyWorld::new(73, ALLOW_WEB_8443);
    let spoof = w.other(8443);
    let out = w.curl(NAME, spoof.ip(), 8443, "/spoof");
    out.expect_success("the spoofed request, answered by the real server");
    let body = out.stdout.clone();
    let real = w.upstream.label(w.web(8443));
    assert!(body.contains(&real), "answered by {body:?}, not {real}");
    assert_eq!(
        w.upstream.accepted(spoof),
        0,
        "the spoofed address was dialled"
    );
    let line = w.line(spoof, 0);
    assert_eq!(line.outcome.as_deref(), Some("direct"), "{:?}", line.line);
    assert_eq!(field(&line, "dialled"), w.web(8443).to_string());
    assert_eq!(line.source.as_deref(), Some("sni"));
}

#[test]
fn hot_reload_changes_new_connections_and_keeps_old_ones() {
    let mut w = PolicyWorld::new(
        74,
        r#"
[[template]]
name = "coder"
allow = [ { host = "web.egress.test", ports = [8443] }, { cidr = "10.250.0.0/16", ports = [2222] } ]
"#,
    );
    let banner = w.web(2222);
    // A long-lived server-first connection: reads the banner, waits for the reload, then
    // exchanges a line through the same connection.
    let flag = w.dir.path().join("go");
    let script = format!(
        "IFS= read -r -t 10 l <&3 || exit 8; printf '%s\\n' \"${{l%$'\\r'}}\"\n\
         for i in $(seq 200); do [ -e {flag} ] && break; sleep 0.1; done\n\
         printf 'after-reload\\r\\n' >&3\n\
         IFS= read -r -t 10 l <&3 || exit 9; printf '%s\\n' \"${{l%$'\\r'}}\"\n",
        flag = flag.display()
    );
    let mut cmd = bash_tcp_command(Some(&w.topo.actor), Some(&w.cgroup), banner, &script);
    let old = std::thread::spawn(move || process::run(&mut cmd, Duration::from_secs(40)));
    w.upstream.wait_for_seen(1, T);
    w.replace_policy(
        r#"
[[template]]
name = "coder"
allow = [ { host = "other.egress.test", ports = [8443] } ]
"#,
    );
    std::fs::write(&flag, "").unwrap();
    let old = old.join().unwrap();
    old.expect_success("the connection opened before the reload");
    let text = old.stdout.clone();
    assert!(
        text.contains(BANNER.trim()) && text.contains("after-reload"),
        "{text}"
    );
    // New connections follow the new policy.
    let web = w.curl(NAME, IpAddr::V4(w.topo.upstream_v4()), 8443, "/");
    assert!(!web.success(), "web.egress.test is no longer allowed");
    let other = w.curl(OTHER, w.other(8443).ip(), 8443, "/");
    other.expect_success("other.egress.test is allowed now");
    // A broken file keeps the policy in force and says why.
    let before = w.reloads();
    std::fs::write(
        &w.policy_file,
        "[[template]]\nname = \"coder\"\nallow = [ { cidr = \"not-a-cidr\" } ]\n",
    )
    .unwrap();
    w.agent.wait_until(T, "the failed reload", |lines| {
        lines
            .iter()
            .filter(|l| l.contains("policy reload"))
            .nth(before)
            .filter(|l| l.contains("keeping the previous policy"))
            .cloned()
    });
    w.curl(OTHER, w.other(8443).ip(), 8443, "/")
        .expect_success("the previous policy still in force");
}

#[test]
fn server_first_flow_gets_the_name_the_actor_resolved() {
    let mut w = PolicyWorld::new(
        75,
        r#"
[[template]]
name = "coder"
allow = [ { host = "banner.egress.test", ports = [2222] } ]
"#,
    );
    // The actor resolves the name (through the agent's forwarder), then connects to the
    // address and sends nothing first: only DNS can name this flow.
    let resolved = dig(&w, IpAddr::V4(w.topo.upstream_v4()), BANNER_NAME);
    assert_eq!(resolved, vec![IpAddr::V4(w.topo.upstream_v4())]);
    let banner = w.web(2222);
    let out = process::run(
        &mut banner_exchange_command(Some(&w.topo.actor), Some(&w.cgroup), banner),
        T,
    );
    out.expect_success("the server-first exchange");
    let line = w.line(banner, 0);
    assert_eq!(line.source.as_deref(), Some("dns"), "{:?}", line.line);
    assert_eq!(
        line.authority.as_deref(),
        Some("banner.egress.test:2222"),
        "{:?}",
        line.line
    );
    assert_eq!(line.outcome.as_deref(), Some("direct"));
}

#[test]
fn denied_name_gets_nxdomain_from_the_agent() {
    let w = PolicyWorld::new(76, ALLOW_WEB_8443);
    let server = IpAddr::V4(w.topo.upstream_v4());
    let out = dig_in(
        &w.topo.actor,
        Some(&w.cgroup),
        server,
        DENIED,
        &["+noshort", "+comments"],
    );
    assert!(
        out.stdout.contains("status: NXDOMAIN"),
        "{}",
        out.describe()
    );
    // The allowed name is answered, and only it reached dnsmasq.
    let ok = dig(&w, server, NAME);
    assert_eq!(ok, vec![server]);
    let queries = w.dns.queries();
    assert!(queries.iter().any(|q| q.name == NAME), "{queries:?}");
    assert!(
        queries.iter().all(|q| q.name != DENIED),
        "the denied name went upstream: {queries:?}"
    );
    // The agent's queries come from the node, not the actor.
    assert!(
        queries
            .iter()
            .all(|q| q.source == IpAddr::V4(w.topo.node_uplink_v4())),
        "{queries:?}"
    );
}

#[test]
fn with_a_pep_the_policy_prefilters_and_dns_names_reach_the_pep() {
    // The template pre-filters: only web.egress.test:8443 and banner.egress.test go to squid.
    let mut w = PolicyWorld::with_pep(
        77,
        r#"
[[template]]
name = "coder"
prefilter = true
allow = [ { host = "web.egress.test", ports = [8443] }, { host = "banner.egress.test", ports = [2222] } ]
"#,
    );
    let ip = IpAddr::V4(w.topo.upstream_v4());
    w.curl(NAME, ip, 8443, "/")
        .expect_success("allowed, through squid");
    let line = w.line(w.web(8443), 0);
    assert_eq!(line.outcome.as_deref(), Some("tunneled"), "{:?}", line.line);
    assert!(
        field(&line, "rule").contains("web.egress.test"),
        "{:?}",
        line.line
    );
    assert!(!w.curl(NAME, ip, 443, "/").success(), "443 is not allowed");
    let line = w.line(w.web(443), 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    // A server-first flow named by the actor's DNS lookup reaches squid with that name.
    assert_eq!(dig(&w, ip, BANNER_NAME), vec![ip]);
    let banner = w.web(2222);
    process::run(
        &mut banner_exchange_command(Some(&w.topo.actor), Some(&w.cgroup), banner),
        T,
    )
    .expect_success("the server-first exchange through squid");
    let squid = w.squid.as_ref().expect("the world has a PEP");
    let entries = squid.access_log_entries();
    let e = entries
        .iter()
        .find(|e| e.uri == "banner.egress.test:2222")
        .unwrap_or_else(|| panic!("no CONNECT banner.egress.test:2222 at squid: {entries:?}"));
    assert_eq!(e.authority_source.as_deref(), Some("dns"), "{e:?}");
    assert_eq!(
        e.connect_authority.as_deref(),
        Some("banner.egress.test:2222")
    );
    assert_eq!(
        e.original_destination.as_deref(),
        Some(banner.to_string().as_str())
    );
    // Nothing denied reached squid; the always-denied node address neither.
    assert!(
        entries.iter().all(|e| !e.uri.ends_with(":443")),
        "{entries:?}"
    );
    let node = SocketAddr::new(IpAddr::V4(w.topo.node_uplink_v4()), 8443);
    assert!(!w.curl(NAME, node.ip(), 8443, "/").success());
    let line = w.line(node, 0);
    assert!(
        field(&line, "rule").contains("always denied"),
        "{:?}",
        line.line
    );
}

/// Substrate's EgressPolicy documents as the policy file: ordered allow rules by hostname and
/// by the dialled address, the other namespace's document not applying, and a hot reload.
#[test]
fn substrate_egress_policy_yaml() {
    let mut w = PolicyWorld::yaml(
        78,
        r#"
apiVersion: substrate.agent/v1alpha1
kind: EgressPolicy
metadata: { name: coder, namespace: team-a }
spec:
  rules:
    - hostnames: ["web.egress.test"]
      ports: [8443]
    - cidrs: ["10.250.78.2"]
      ports: [2222, 8080]
---
apiVersion: substrate.agent/v1alpha1
kind: EgressPolicy
metadata: { name: coder, namespace: team-b }
spec:
  rules:
    - all: {}
"#,
    );
    let loaded = w.agent.wait_for_message("policy loaded", T);
    let summary = loaded.field_str("policy").unwrap_or_default();
    assert!(
        summary.contains("policy.yaml: 2 template entries")
            && summary
                .contains("EgressPolicy team-a/coder (pep=true, prefilter=false, 0 deny, 2 allow)"),
        "{summary}"
    );
    let ip = IpAddr::V4(w.topo.upstream_v4());
    w.curl(NAME, ip, 8443, "/yaml")
        .expect_success("allowed by hostnames");
    let line = w.line(w.web(8443), 0);
    assert_eq!(line.outcome.as_deref(), Some("direct"), "{:?}", line.line);
    assert_eq!(
        field(&line, "rule"),
        "EgressPolicy team-a/coder rules[0] hostnames web.egress.test ports=8443"
    );
    // A server-first flow with no name: decided by the cidr on the address dialled.
    let banner = w.web(2222);
    process::run(
        &mut banner_exchange_command(Some(&w.topo.actor), Some(&w.cgroup), banner),
        T,
    )
    .expect_success("allowed by cidrs");
    let line = w.line(banner, 0);
    assert_eq!(line.outcome.as_deref(), Some("direct"), "{:?}", line.line);
    assert_eq!(line.source.as_deref(), Some("ip"));
    assert_eq!(
        field(&line, "rule"),
        "EgressPolicy team-a/coder rules[1] cidrs 10.250.78.2 ports=2222,8080"
    );
    // A Host header naming the allowed address does not open another address.
    let other = w.other(8080);
    let out = process::run(
        &mut bash_tcp_command(
            Some(&w.topo.actor),
            Some(&w.cgroup),
            other,
            "printf 'GET / HTTP/1.1\\r\\nHost: 10.250.78.2:8080\\r\\n\\r\\n' >&3; cat <&3",
        ),
        T,
    );
    out.expect_success("the agent's 403 and a clean close");
    assert!(
        out.stdout.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{}",
        out.describe()
    );
    let line = w.line(other, 0);
    assert_eq!(line.outcome.as_deref(), Some("denied"), "{:?}", line.line);
    assert_eq!(field(&line, "refusal"), "http_403");
    // team-b's `all` is not this actor's: nothing else is allowed.
    let denied = w.curl(OTHER, w.other(8443).ip(), 8443, "/");
    refusal::assert_curl_tls_access_denied(&denied);
    let line = w.line(w.other(8443), 0);
    assert_eq!(
        field(&line, "rule"),
        "EgressPolicy team-a/coder: no allow rule matched (deny by default)"
    );
    assert_eq!(w.upstream.accepted(w.other(8443)), 0);

    // Hot reload, as for TOML.
    w.replace_policy(
        r#"
kind: EgressPolicy
metadata: { name: coder }
spec:
  rules:
    - hostnames: ["other.egress.test"]
"#,
    );
    w.curl(OTHER, w.other(8443).ip(), 8443, "/")
        .expect_success("other.egress.test is allowed now");
    let line = w.line(w.other(8443), 1);
    assert_eq!(
        field(&line, "rule"),
        "EgressPolicy coder rules[0] hostnames other.egress.test"
    );
    refusal::assert_curl_tls_access_denied(&w.curl(NAME, ip, 8443, "/"));
}
