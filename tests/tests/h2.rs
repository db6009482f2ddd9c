//! Tier 3: the agent's pooled HTTP/2 CONNECT (`egress_agent::tunnel::h2`) against a real
//! HTTP/2 CONNECT proxy: nghttpx (HTTP/2 proxy mode, TLS frontend requiring client
//! certificates) in front of squid, both on the loopback of a namespace the test makes, with
//! a server-first echo service behind them.
//!
//! No subnet: everything is on the test namespace's own loopback.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
};

use egress_agent::{
    classify::{Authority, Host, Source},
    config::{Actor, Capture},
    pep::{Pep, PepAddr, Tls},
    tunnel::{
        self, PepStream,
        h2::{Key, Pool, Settings, Stats, with_alpn_h2},
    },
};
use egress_tests::{
    netns::Netns,
    nghttpx::{Nghttpx, NghttpxConfig},
    pki::TestCa,
    squid::{Squid, SquidConfig},
    upstream::{BANNER, Upstream, UpstreamSpec},
    world::T,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The echo service's name (squid resolves it from its hosts file) and address.
const ECHO: &str = "echo.egress.test";
const ECHO_PORT: u16 = 2222;
/// The name on nghttpx's certificate, verified by the agent.
const PEP_NAME: &str = "pep.egress.test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// squid (which resolves the echo service's name) and nghttpx in front of it, on `netns`'s
/// loopback: nghttpx's certificate from `pep_ca`, client certificates from `actors_ca` required.
fn squid_behind_nghttpx(netns: &Netns, pep_ca: &TestCa, actors_ca: &TestCa) -> (Squid, Nghttpx) {
    let squid = Squid::start(netns, SquidConfig::default().host(ECHO, LOOPBACK));
    let (cert, key) = pep_ca.write_issued("nghttpx", &pep_ca.issue(&[PEP_NAME, "127.0.0.1"]));
    let nghttpx = Nghttpx::start(
        netns,
        NghttpxConfig::new(SocketAddr::new(LOOPBACK, 3129), squid.addr(), &cert, &key)
            .client_ca(&actors_ca.cert_path()),
    );
    (squid, nghttpx)
}

/// An actor's client identity: its TLS configuration towards nghttpx (ALPN h2, its own
/// certificate from the actors' CA).
fn client_tls(pep_ca: &TestCa, actors_ca: &TestCa, actor: &str, pep: SocketAddr) -> Tls {
    let (cert, key) = actors_ca.write_issued(actor, &actors_ca.issue(&[&format!("actor-{actor}")]));
    // The agent refuses a key file others can read.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let addr = PepAddr {
        host: pep.ip().to_string(),
        port: pep.port(),
    };
    Tls::load(
        &addr,
        &pep_ca.cert_path(),
        Some(PEP_NAME),
        Some(&cert),
        Some(&key),
        None,
    )
    .unwrap_or_else(|e| panic!("client TLS for {actor}: {e}"))
}

type Dial = Pin<Box<dyn Future<Output = Result<PepStream, tunnel::Error>>>>;

/// TCP + TLS (offering only h2) to nghttpx with `tls`'s certificate.
fn dial(pep: SocketAddr, tls: &Tls) -> impl FnOnce() -> Dial + use<> {
    let config = with_alpn_h2(&tls.client_config());
    let name = tls.server_name.clone();
    move || {
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(pep)
                .await
                .map_err(|source| tunnel::Error::Unreachable { pep, source })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| tunnel::Error::Tls {
                    pep: pep.to_string(),
                    reason: e.to_string(),
                })?;
            Ok(PepStream::Tls(Box::new(tls)))
        })
    }
}

/// The agent's CONNECT request for `actor`, to the echo service by name.
fn request(actor: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let actor = Actor {
        id: actor.into(),
        template: "coder".into(),
        template_namespace: "team-a".into(),
        capture: Capture::Cgroup {
            cgroup: PathBuf::from("/unused"),
            cgroup_id: 1,
            netns: None,
        },
        asked_pep: None,
        pep: egress_agent::pep::Selection::nothing(),
    };
    let authority = Authority {
        host: Host::Name(ECHO.into()),
        port: ECHO_PORT,
        source: Source::Host,
    };
    tunnel::connect_request(
        &Pep::default(),
        &actor,
        SocketAddr::new(LOOPBACK, ECHO_PORT),
        &authority,
    )
    .expect("CONNECT request")
}

/// Opens `n` streams for each actor at once through `pep`, holds them all open together,
/// checks each one end to end (banner, then an echo of its own line), and returns the
/// connection each stream went on and the pool's counts while all were open.
async fn streams_at_once(
    pep: SocketAddr,
    actors: &[(&str, &Tls, usize)],
) -> (Vec<(String, u64)>, Stats) {
    let pool = Pool::new(Settings::default());
    let total: usize = actors.iter().map(|a| a.2).sum();
    let all_open = Arc::new(tokio::sync::Barrier::new(total + 1));
    let mut tasks = Vec::new();
    for &(actor, tls, n) in actors {
        for i in 0..n {
            let (pool, dial, all_open) = (pool.clone(), dial(pep, tls), all_open.clone());
            let actor = actor.to_string();
            tasks.push(tokio::task::spawn_local(async move {
                let key = Key {
                    pep: "nghttpx".into(),
                    actor: actor.clone(),
                    generation: 0,
                };
                let mut stream = pool
                    .open(&key, dial, request(&actor), T)
                    .await
                    .unwrap_or_else(|e| panic!("stream {i} of {actor}: {e}"));
                let mut banner = vec![0u8; BANNER.len()];
                stream.read_exact(&mut banner).await.expect("banner");
                assert_eq!(banner, BANNER.as_bytes());
                let line = format!("{actor} stream {i}\n");
                stream.write_all(line.as_bytes()).await.expect("write");
                let mut back = vec![0u8; line.len()];
                stream.read_exact(&mut back).await.expect("echo");
                assert_eq!(back, line.as_bytes());
                all_open.wait().await;
                // Held until every stream is open; then dropped (reset), which ends the
                // tunnel in nghttpx and squid (nghttpx passes no half-close on).
                all_open.wait().await;
                (actor, stream.connection())
            }));
        }
    }
    let run = async {
        all_open.wait().await;
        let stats = pool.stats();
        all_open.wait().await;
        let mut conns = Vec::new();
        for task in tasks {
            conns.push(task.await.expect("stream task"));
        }
        (conns, stats)
    };
    tokio::time::timeout(T, run)
        .await
        .expect("every stream open and echoed within the bound")
}

#[test]
fn many_streams_per_connection_through_nghttpx_to_squid() {
    egress_tests::require_root();
    egress_tests::require_commands(&["squid", "nghttpx"]);
    let netns = Netns::named("h2");
    let upstream_ca = TestCa::new();
    let pep_ca = TestCa::with_name("egress test PEP CA");
    let actors_ca = TestCa::with_name("egress test actors CA");
    let echo = SocketAddr::new(LOOPBACK, ECHO_PORT);
    let _upstream = Upstream::start(&netns, &upstream_ca, UpstreamSpec::new().banner(echo));
    let (squid, nghttpx) = squid_behind_nghttpx(&netns, &pep_ca, &actors_ca);
    let pep = nghttpx.addr();
    let a1 = client_tls(&pep_ca, &actors_ca, "a1", pep);
    let a2 = client_tls(&pep_ca, &actors_ca, "a2", pep);

    // The pool runs on a current-thread runtime on a thread inside the namespace.
    let (conns, stats) = netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        tokio::task::LocalSet::new().block_on(
            &rt,
            streams_at_once(pep, &[("a1", &a1, 40), ("a2", &a2, 10)]),
        )
    });

    // One connection per actor, carrying all of that actor's streams at once.
    assert_eq!(stats.streams, 50, "{stats:?}");
    assert_eq!(stats.connections, 2, "{stats:?}");
    assert_eq!(stats.connections_opened_total, 2, "{stats:?}");
    let conn_of = |actor: &str| {
        let mut ids: Vec<u64> = conns.iter().filter(|c| c.0 == actor).map(|c| c.1).collect();
        ids.dedup();
        ids
    };
    assert_eq!(conn_of("a1").len(), 1);
    assert_eq!(conn_of("a2").len(), 1);
    assert_ne!(conn_of("a1"), conn_of("a2"));

    // nghttpx: 50 CONNECTs over HTTP/2, each actor's from one client port (one connection)
    // with that actor's certificate.
    let entries = nghttpx.wait_for_entries(50, T);
    for actor in ["a1", "a2"] {
        let mine: Vec<_> = entries
            .iter()
            .filter(|e| e.actor_id.as_deref() == Some(actor))
            .collect();
        assert_eq!(
            mine.len(),
            if actor == "a1" { 40 } else { 10 },
            "{entries:#?}"
        );
        for e in &mine {
            assert_eq!(e.method, "CONNECT");
            assert_eq!(e.authority, format!("{ECHO}:{ECHO_PORT}"));
            assert_eq!(e.alpn.as_deref(), Some("h2"));
            assert_eq!(
                e.remote_port, mine[0].remote_port,
                "one connection per actor"
            );
            let subject = e.client_subject.as_deref().unwrap_or("");
            assert!(subject.contains(&format!("actor-{actor}")), "{e:?}");
        }
    }
    // squid: every tunnel, with the identity headers nghttpx passed on.
    let squid_entries = squid.wait_for_entries(50, T);
    for actor in ["a1", "a2"] {
        let n = squid_entries
            .iter()
            .filter(|e| {
                e.method == "CONNECT"
                    && e.uri == format!("{ECHO}:{ECHO_PORT}")
                    && e.actor_id.as_deref() == Some(actor)
                    && e.actor_template.as_deref() == Some("coder")
            })
            .count();
        assert_eq!(n, if actor == "a1" { 40 } else { 10 }, "{squid_entries:#?}");
    }
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_as_tls() {
    egress_tests::require_root();
    egress_tests::require_commands(&["squid", "nghttpx"]);
    let netns = Netns::named("h2");
    let pep_ca = TestCa::with_name("egress test PEP CA");
    let actors_ca = TestCa::with_name("egress test actors CA");
    let other_ca = TestCa::with_name("another CA");
    let (_squid, nghttpx) = squid_behind_nghttpx(&netns, &pep_ca, &actors_ca);
    let pep = nghttpx.addr();
    let stranger = client_tls(&pep_ca, &other_ca, "a1", pep);
    let err = netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            let key = Key {
                pep: "nghttpx".into(),
                actor: "a1".into(),
                generation: 0,
            };
            Pool::new(Settings::default())
                .open(&key, dial(pep, &stranger), request("a1"), T)
                .await
                .map(|s| s.status)
                .expect_err("nghttpx must refuse a certificate it cannot verify")
                .to_string()
        })
    });
    // TLS 1.3: the refusal (an alert) comes after the handshake, on the first read; the pool
    // reports it as TLS, not as an HTTP failure.
    assert!(
        err.starts_with("TLS with PEP nghttpx: received fatal alert"),
        "{err}"
    );
    assert!(nghttpx.access_log_entries().is_empty());
}
