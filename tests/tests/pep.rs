//! Tier 3: the hardened PEP link against a real squid (squid-openssl): TLS on squid's
//! listening port (`https_port`, CONNECT inside TLS), a CA that did not sign squid's
//! certificate, `Proxy-Authorization` checked by squid's `basic_ncsa_auth`, client
//! certificates squid requires (`clientca=`), and a secret file others can read.
//!
//! Subnets 60-69. Traffic only goes to addresses of the namespaces each test made.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use egress_tests::{
    agent::{Agent, AgentOptions, ConnectionLog},
    netns::Netns,
    pki::TestCa,
    process, refusal,
    squid::{AccessEntry, SquidConfig},
    world::{NAME, T, World},
};

/// The PEP's own CA and squid's certificate from it (SAN 127.0.0.1: the agent dials squid's
/// address, and an IP is verified against the IP SANs).
struct PepPki {
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
}

fn pep_pki() -> PepPki {
    let ca = TestCa::with_name("egress test PEP CA");
    let issued = ca.issue(&["127.0.0.1", "pep.egress.test"]);
    let (cert, key) = ca.write_issued("squid", &issued);
    PepPki { ca, cert, key }
}

/// A file holding `content` with permission bits `mode`, in `dir`.
fn file(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

/// `Basic base64(user:password)`, encoded by `openssl base64`.
fn basic(user: &str, password: &str) -> String {
    let out = process::run_with_input(
        std::process::Command::new("openssl").args(["base64", "-A"]),
        format!("{user}:{password}").as_bytes(),
        T,
    );
    out.expect_success("openssl base64");
    format!("Basic {}", out.stdout.trim())
}

/// Runs the actor's curl for `https://NAME:443/`.
fn curl_443(w: &World) -> process::Output {
    w.curl(NAME, w.v4(), 443, &format!("https://{NAME}:443/"))
}

fn connects(entries: &[AccessEntry]) -> Vec<&AccessEntry> {
    entries.iter().filter(|e| e.method == "CONNECT").collect()
}

fn error_of(conn: &ConnectionLog) -> String {
    conn.line.field_str("error").unwrap_or_default()
}

/// The actor's curl failed the way a reset tunnel fails (no HTTP answer at all): a PEP that
/// could not be asked is no refusal, so no access-denied alert either.
fn assert_curl_reset(out: &process::Output) {
    assert!(!out.success(), "curl must fail: {}", out.describe());
    assert!(
        matches!(out.code(), Some(35) | Some(56) | Some(52) | Some(7)),
        "curl exit code: {}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("alert access denied"),
        "a failure, not a refusal: {}",
        out.describe()
    );
}

#[test]
fn tls_to_squid_carries_the_identity() {
    let pki = pep_pki();
    let ca_file = pki.ca.cert_path();
    let mut w = World::new(
        60,
        "actor-60",
        SquidConfig::default().tls(&pki.cert, &pki.key),
        |mut o| {
            o.pep_link.tls_ca_file = Some(ca_file);
            o
        },
    );
    assert!(
        w.squid.cache_log().contains("Accepting HTTPS Socket"),
        "squid listens with TLS only:\n{}",
        w.squid.cache_log()
    );
    let out = curl_443(&w);
    out.expect_success("curl through the agent and squid over TLS");
    assert!(
        out.stdout.contains(&format!("sni={NAME}")),
        "{}",
        out.stdout
    );

    let original = w.topo.upstream_addr(443);
    let authority = format!("{NAME}:443");
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    entry.assert_identity(("actor-60", "coder", "team-a"), original, &authority);
    assert_eq!(entry.authority_source.as_deref(), Some("sni"));
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("tunneled"), "{:?}", conn.line);
    assert_eq!(conn.pep_status, Some(200));
    assert_eq!(
        conn.line.field_str("relay").as_deref(),
        Some("copy"),
        "a TLS PEP link is relayed with a copy buffer: {:?}",
        conn.line
    );
    assert_eq!(w.upstream.seen_on(original).len(), 1);
}

#[test]
fn tls_pep_signed_by_another_ca_fails_closed() {
    let pki = pep_pki();
    // The agent trusts a CA that did not sign squid's certificate.
    let other = TestCa::with_name("another CA");
    let other_file = other.cert_path();
    let mut w = World::new(
        61,
        "actor-61",
        SquidConfig::default().tls(&pki.cert, &pki.key),
        |mut o| {
            o.pep_link.tls_ca_file = Some(other_file);
            o
        },
    );
    let out = curl_443(&w);
    assert_curl_reset(&out);
    let original = w.topo.upstream_addr(443);
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("pep_tls"), "{:?}", conn.line);
    let error = error_of(&conn);
    assert!(
        error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
        "the agent logs rustls's reason: {error}"
    );
    // Squid logs a tunnel when it ends: give it time to log one if there were any.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        connects(&w.squid.access_log_entries()).is_empty(),
        "no CONNECT reached squid: {:#?}",
        w.squid.access_log_entries()
    );
    assert!(
        w.upstream.seen_on(original).is_empty(),
        "nothing reached the upstream"
    );
}

#[test]
fn proxy_authorization_reaches_squid() {
    let pki = pep_pki();
    let secrets = tempfile::tempdir().expect("tempdir");
    let auth = file(
        secrets.path(),
        "pep-authorization",
        &format!("{}\n", basic("agent-60", "s3cret-pw")),
        0o600,
    );
    let ca_file = pki.ca.cert_path();
    let mut w = World::new(
        62,
        "actor-62",
        SquidConfig::default()
            .tls(&pki.cert, &pki.key)
            .basic_auth_user("agent-60", "s3cret-pw"),
        |mut o| {
            o.pep_link.tls_ca_file = Some(ca_file);
            o.pep_link.proxy_authorization_file = Some(auth);
            o
        },
    );
    let out = curl_443(&w);
    out.expect_success("curl through squid with basic auth");
    let authority = format!("{NAME}:443");
    let entry = w.squid.wait_for_request("CONNECT", &authority, T);
    assert_eq!(entry.user.as_deref(), Some("agent-60"), "squid's %un");
    assert_eq!(entry.status, Some(200));
    assert_eq!(entry.actor_id.as_deref(), Some("actor-62"));
    let conn = w.agent_line(w.topo.upstream_addr(443));
    assert_eq!(conn.outcome.as_deref(), Some("tunneled"));
    let log = w.agent.lines().join("\n");
    assert!(
        !log.contains("s3cret") && !log.contains(basic("agent-60", "s3cret-pw").as_str()),
        "the authorization value must never be logged"
    );
}

#[test]
fn wrong_proxy_authorization_gets_407_and_a_refusal() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let auth = file(
        secrets.path(),
        "pep-authorization",
        &basic("agent-63", "wrong-pw"),
        0o400,
    );
    let mut w = World::new(
        63,
        "actor-63",
        SquidConfig::default().basic_auth_user("agent-63", "right-pw"),
        |mut o| {
            o.pep_link.proxy_authorization_file = Some(auth);
            o
        },
    );
    let out = curl_443(&w);
    // A non-2xx answer is a refusal: the actor's TLS client gets the access-denied alert.
    refusal::assert_curl_tls_access_denied(&out);
    let original = w.topo.upstream_addr(443);
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("pep_refused"));
    assert_eq!(conn.pep_status, Some(407));
    assert_eq!(conn.line.field_str("refusal").as_deref(), Some("tls_alert"));
    assert!(w.upstream.seen_on(original).is_empty());
}

/// squid with `clientca=`: the agent's client certificate is required and verified.
fn mtls_world(net: u8, with_client_cert: bool) -> (World, PepPki) {
    let pki = pep_pki();
    let client = pki.ca.issue(&["egress-agent.test"]);
    let (cert, key) = pki.ca.write_issued("agent", &client);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let ca_file = pki.ca.cert_path();
    let w = World::new(
        net,
        &format!("actor-{net}"),
        SquidConfig::default()
            .tls(&pki.cert, &pki.key)
            .client_ca(&pki.ca.cert_path()),
        |mut o| {
            o.pep_link.tls_ca_file = Some(ca_file);
            if with_client_cert {
                o.pep_link.tls_client_cert_file = Some(cert);
                o.pep_link.tls_client_key_file = Some(key);
            }
            o
        },
    );
    (w, pki)
}

#[test]
fn mtls_with_the_agent_certificate() {
    let (mut w, _pki) = mtls_world(64, true);
    let out = curl_443(&w);
    out.expect_success("curl through squid requiring a client certificate");
    let entry = w
        .squid
        .wait_for_request("CONNECT", &format!("{NAME}:443"), T);
    let subject = entry.client_cert_subject.clone().unwrap_or_default();
    assert!(
        subject.contains("egress-agent.test"),
        "squid saw the agent's certificate: {entry:?}"
    );
    let conn = w.agent_line(w.topo.upstream_addr(443));
    assert_eq!(conn.outcome.as_deref(), Some("tunneled"));
}

#[test]
fn mtls_without_a_client_certificate_fails_closed() {
    let (mut w, _pki) = mtls_world(65, false);
    let out = curl_443(&w);
    assert_curl_reset(&out);
    let original = w.topo.upstream_addr(443);
    let conn = w.agent_line(original);
    assert_eq!(conn.outcome.as_deref(), Some("pep_tls"), "{:?}", conn.line);
    let error = error_of(&conn);
    assert!(
        error.to_ascii_lowercase().contains("certificate"),
        "the agent says the PEP wanted a certificate: {error}"
    );
    assert!(w.upstream.seen_on(original).is_empty());
}

#[test]
fn world_readable_authorization_file_stops_the_agent() {
    egress_tests::require_root();
    let ns = Netns::new();
    let secrets = tempfile::tempdir().expect("tempdir");
    let auth = file(
        secrets.path(),
        "pep-authorization",
        "Basic bm90LXNob3du\n",
        0o644,
    );
    let mut opts = AgentOptions::new("127.0.0.1:3128");
    opts.pep_link.proxy_authorization_file = Some(auth.clone());
    let mut agent = Agent::start(&ns, None, opts);
    let status = agent
        .wait_exit(T)
        .unwrap_or_else(|| panic!("the agent must refuse to start: {:?}", agent.lines()));
    assert!(!status.success());
    let log = agent.lines().join("\n");
    assert!(
        log.contains(&format!("chmod 600 {}", auth.display())),
        "the agent says what to do: {log}"
    );
    assert!(!log.contains("bm90LXNob3du"), "and never shows the secret");
}
