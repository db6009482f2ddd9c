//! The pool against in-process HTTP/2 CONNECT servers on 127.0.0.1 (hyper's server).
use std::{net::SocketAddr, path::PathBuf, sync::atomic::AtomicUsize};

use http::Method;
use hyper::{Response, body::Incoming, service::service_fn};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
};

use super::*;
use crate::{
    classify::{Authority, Host, Source},
    config::{Actor, Capture},
    pep::{Pep, PepAddr},
    socket::SocketFactory,
    tunnel::{Connector, connect_request},
};

/// Answered 403.
const DENIED: &str = "denied.test";
/// Answered only after 30 s.
const SLOW: &str = "slow.test";
/// Writes to the tunnel until a write fails (counted in [`TestPep::write_failures`]).
const FLOOD: &str = "flood.test";
/// Everything else is echoed until the client's END_STREAM, then the server half-closes.
const ECHO: &str = "echo.test";

/// What the test PEP saw and did.
#[derive(Default)]
struct Seen {
    /// TCP connections accepted.
    accepted: AtomicUsize,
    /// Connections whose HTTP/2 serving ended.
    ended: AtomicUsize,
    /// CONNECT requests: (authority, x-ate-actor-id, host header).
    requests: Mutex<Vec<(String, String, String)>>,
    /// Flood tunnels whose write failed (the client reset the stream).
    write_failures: AtomicUsize,
    /// Echo tunnels that saw the client's END_STREAM.
    echoed: AtomicUsize,
}

/// An HTTP/2 CONNECT server on 127.0.0.1: plain (prior knowledge), or TLS that speaks HTTP/2
/// or HTTP/1.1 by ALPN.
struct TestPep {
    addr: SocketAddr,
    seen: Arc<Seen>,
    /// Bumped to make every connection open now shut down gracefully (GOAWAY).
    goaway: watch::Sender<u32>,
}

#[derive(Clone, Copy, Default)]
struct ServerOptions {
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS.
    max_streams: Option<u32>,
    /// How long a new connection waits before the server speaks (its SETTINGS come late,
    /// as from a distant PEP).
    delay: Duration,
    /// Over TLS: says nothing until the client has sent something (HTTP/2 allows a server to
    /// wait for the client's preface).
    silent: bool,
}

impl TestPep {
    async fn start(options: ServerOptions, tls: Option<Arc<rustls::ServerConfig>>) -> TestPep {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (goaway, _) = watch::channel(0);
        let pep = TestPep {
            addr,
            seen: seen.clone(),
            goaway: goaway.clone(),
        };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                let seen = seen.clone();
                let goaway = goaway.subscribe();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(options.delay).await;
                    match acceptor {
                        None => serve_h2(tcp, options, seen.clone(), goaway).await,
                        Some(acceptor) => {
                            let Ok(mut tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let mut first = Vec::new();
                            if options.silent {
                                // Reads through TLS: rustls may hold the bytes already.
                                first = vec![0u8; 1024];
                                let Ok(n) = tls.read(&mut first).await else {
                                    return;
                                };
                                first.truncate(n);
                            }
                            let tls = Replay {
                                first: Bytes::from(first),
                                io: tls,
                            };
                            if tls.io.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                                serve_h2(tls, options, seen.clone(), goaway).await
                            } else {
                                serve_h1(tls).await
                            }
                        }
                    }
                    seen.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        pep
    }

    fn dial(&self, dials: &Arc<AtomicUsize>) -> impl FnOnce() -> DialFuture + use<> {
        let (addr, dials) = (self.addr, dials.clone());
        move || {
            Box::pin(async move {
                dials.fetch_add(1, Ordering::SeqCst);
                TcpStream::connect(addr)
                    .await
                    .map(PepStream::Plain)
                    .map_err(|source| Error::Unreachable { pep: addr, source })
            })
        }
    }

    fn authorities(&self) -> Vec<String> {
        lock(&self.seen.requests)
            .iter()
            .map(|r| r.0.clone())
            .collect()
    }
}

/// A connection whose first bytes were read already: they are read again first.
struct Replay<T> {
    first: Bytes,
    io: T,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Replay<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Replay<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type DialFuture = Pin<Box<dyn Future<Output = Result<PepStream, Error>> + Send>>;

async fn serve_h2<T>(
    io: T,
    options: ServerOptions,
    seen: Arc<Seen>,
    mut goaway: watch::Receiver<u32>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_concurrent_streams(options.max_streams);
    let service = service_fn(move |req| handle(req, seen.clone()));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        changed = goaway.changed() => if changed.is_ok() {
            conn.as_mut().graceful_shutdown();
        },
    }
    let _ = conn.await;
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<Empty<Bytes>>, std::convert::Infallible> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    lock(&seen.requests).push((authority.clone(), header("x-ate-actor-id"), header("host")));
    let answer = |status: StatusCode| {
        let mut response = Response::new(Empty::new());
        *response.status_mut() = status;
        Ok(response)
    };
    if req.method() != Method::CONNECT {
        return answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let host = authority.split(':').next().unwrap_or("");
    match host {
        DENIED => return answer(StatusCode::FORBIDDEN),
        SLOW => tokio::time::sleep(Duration::from_secs(30)).await,
        _ => {}
    }
    let flood = host == FLOOD;
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        if flood {
            let chunk = vec![b'x'; 16 * 1024];
            loop {
                if io.write_all(&chunk).await.is_err() {
                    seen.write_failures.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        // Echo: everything back as it comes; after the client's END_STREAM, a last line and
        // our own END_STREAM (so the client sees the half-close went through).
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        // Counted before the answer, so a client that read `|eof` is counted already.
        seen.echoed.fetch_add(1, Ordering::SeqCst);
        if io.write_all(b"|eof").await.is_ok() {
            let _ = io.shutdown().await;
        }
    });
    answer(StatusCode::OK)
}

/// HTTP/1.1 CONNECT over TLS (for the setup-time comparison): answer 200, then echo.
async fn serve_h1<T>(mut io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match io.read(&mut byte).await {
            Ok(1) if head.len() < 16 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    if io
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = io.read(&mut buf).await {
        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = io.shutdown().await;
}

fn actor(id: &str) -> Actor {
    Actor {
        id: id.into(),
        template: "coder".into(),
        template_namespace: "team-a".into(),
        capture: Capture::Cgroup {
            cgroup: PathBuf::from("/x"),
            cgroup_id: 7,
            netns: None,
        },
        asked_pep: None,
        pep: crate::pep::Selection::nothing(),
    }
}

/// The agent's real CONNECT request (identity headers, Host) for `host:443`.
fn request(actor_id: &str, host: &str) -> Request<Empty<Bytes>> {
    let authority = Authority {
        host: Host::Name(host.into()),
        port: 443,
        source: Source::Sni,
    };
    connect_request(
        &Pep::default(),
        &actor(actor_id),
        "10.0.0.1:443".parse().unwrap(),
        &authority,
    )
    .unwrap()
}

fn key(actor: &str) -> Key {
    Key {
        pep: "default".into(),
        actor: actor.into(),
        generation: 0,
    }
}

const T: Duration = Duration::from_secs(10);

/// Writes `data`, half-closes, and reads everything back: the echo plus its `|eof`.
async fn echo(stream: &mut Stream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut back))
        .await
        .expect("echo within the bound")
        .unwrap();
    back
}

#[test]
fn out_of_range_settings_are_clamped() {
    // The config refuses them (`pep::tests::named_peps_profiles_and_http2_settings_load`);
    // out-of-range values never reach h2 all the same (it asserts on them).
    let pool = Pool::new(Settings {
        max_streams: 0,
        stream_window: u32::MAX,
        connection_window: 1,
    });
    assert_eq!(
        pool.settings(),
        Settings {
            max_streams: 1,
            stream_window: MAX_WINDOW,
            connection_window: MIN_WINDOW
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_connection() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    // A burst of opens for a new key: one dial, the rest wait for it and share it.
    let opens = (0..50).map(|i| {
        let (pool, dial) = (pool.clone(), pep.dial(&dials));
        tokio::spawn(async move {
            let mut stream = pool
                .open(&key("a1"), dial, request("a1", ECHO), T)
                .await
                .expect("stream");
            assert_eq!(stream.status, StatusCode::OK);
            let data = format!("tunnel {i}");
            let back = echo(&mut stream, data.as_bytes()).await;
            assert_eq!(back, format!("{data}|eof").as_bytes());
            stream.connection()
        })
    });
    let mut conns = Vec::new();
    for open in opens.collect::<Vec<_>>() {
        conns.push(open.await.unwrap());
    }
    conns.dedup();
    assert_eq!(conns.len(), 1, "all streams on one connection");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        pep.seen.echoed.load(Ordering::SeqCst),
        50,
        "every half-close went through"
    );
    // The identity headers and Host travel as in HTTP/1.1; the authority is :authority.
    for (authority, actor, host) in lock(&pep.seen.requests).iter() {
        assert_eq!(authority, "echo.test:443");
        assert_eq!(actor, "a1");
        assert_eq!(host, "echo.test:443");
    }
    let stats = pool.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.streams, 0);
    assert_eq!(stats.connections_opened_total, 1);
    assert_eq!(stats.streams_opened_total, 50);
}

#[tokio::test]
async fn the_stream_bound_opens_a_second_connection() {
    // Our bound: 2 streams per connection.
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings {
        max_streams: 2,
        ..Settings::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            pool.open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
                .await
                .unwrap(),
        );
    }
    assert_eq!(held[0].connection(), held[1].connection());
    assert_ne!(held[1].connection(), held[2].connection());
    assert!(!held[0].reused() && held[1].reused() && !held[2].reused());
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().streams, 3);
    // A freed slot is used again before anything is dialed.
    drop(held.remove(0));
    let again = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    assert!(again.reused());
    assert_eq!(dials.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_peps_stream_limit_is_honoured() {
    // The PEP's bound: SETTINGS_MAX_CONCURRENT_STREAMS 1, below our 100.
    let pep = TestPep::start(
        ServerOptions {
            max_streams: Some(1),
            ..ServerOptions::default()
        },
        None,
    )
    .await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let first = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    // Had the second stream gone on the same connection, h2 would hold it until the first
    // ended, and the open would time out.
    let second = pool
        .open(
            &key("a1"),
            pep.dial(&dials),
            request("a1", ECHO),
            Duration::from_secs(3),
        )
        .await
        .expect("a second connection, not a wait on the first");
    assert_ne!(first.connection(), second.connection());
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_learns_the_peps_stream_limit_before_piling_on() {
    // 12 opens at once for a new key, all held open together, against a PEP that takes 5
    // streams a connection: 3 connections, nobody stuck behind the PEP's limit.
    let pep = TestPep::start(
        ServerOptions {
            max_streams: Some(5),
            delay: Duration::from_millis(300),
            ..ServerOptions::default()
        },
        None,
    )
    .await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let all_open = Arc::new(tokio::sync::Barrier::new(12));
    let opens: Vec<_> = (0..12)
        .map(|_| {
            let (pool, dial, all_open) = (pool.clone(), pep.dial(&dials), all_open.clone());
            tokio::spawn(async move {
                let stream = pool
                    .open(
                        &key("a1"),
                        dial,
                        request("a1", ECHO),
                        Duration::from_secs(3),
                    )
                    .await
                    .expect("no open waits behind the PEP's limit");
                all_open.wait().await;
                stream.connection()
            })
        })
        .collect();
    // Bounded: if one open fails, the others wait at the barrier for good.
    let mut conns = tokio::time::timeout(T, async {
        let mut conns = Vec::new();
        for open in opens {
            conns.push(open.await.unwrap());
        }
        conns
    })
    .await
    .expect("all 12 streams open at once within the bound");
    conns.sort();
    let mut per_conn: Vec<usize> = conns.chunk_by(|a, b| a == b).map(<[u64]>::len).collect();
    per_conn.sort();
    assert_eq!(per_conn, [2, 5, 5]);
    assert_eq!(dials.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connect_the_pep_is_slow_to_answer_holds_up_no_other_open() {
    // The first open of a new key dials (slowly, so the second arrives meanwhile and waits for
    // the dial turn) and then asks for a destination the PEP answers only after 30 s. The
    // second open must go on once the PEP's SETTINGS are in, on the same connection, well
    // before the first's answer (or its own 3 s bound).
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let (dialing, dial_started) = tokio::sync::oneshot::channel();
    let slow_dial = {
        let dial = pep.dial(&dials);
        move || -> DialFuture {
            // The first open holds the dial turn from here on.
            let _ = dialing.send(());
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                dial().await
            })
        }
    };
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.open(
                &key("a1"),
                slow_dial,
                request("a1", SLOW),
                Duration::from_secs(30),
            )
            .await
        })
    };
    dial_started.await.expect("the first open dials");
    let started = Instant::now();
    let mut second = pool
        .open(
            &key("a1"),
            pep.dial(&dials),
            request("a1", ECHO),
            Duration::from_secs(3),
        )
        .await
        .expect("the second open is not held up by the first's unanswered CONNECT");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the second open waited {waited:?}, as long as the first's answer"
    );
    assert_eq!(echo(&mut second, b"ping").await, b"ping|eof");
    assert_eq!(dials.load(Ordering::SeqCst), 1, "one connection for both");
    assert!(
        !first.is_finished(),
        "the first is still waiting for its answer"
    );
    first.abort();
}

#[test]
fn the_settings_ack_is_found_however_the_writes_are_cut() {
    // The client preface, SETTINGS (12 bytes of payload), WINDOW_UPDATE, then the ACK.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend([0, 0, 12, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
    // A payload that looks like an ACK header must be skipped as payload.
    bytes.extend([0, 0, 0, FRAME_SETTINGS, FLAG_ACK, 0, 0, 0, 0, 0, 0, 0]);
    bytes.extend([0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    let before_ack = bytes.len();
    bytes.extend([0, 0, 0, FRAME_SETTINGS, FLAG_ACK, 0, 0, 0, 0]);
    for cut in 1..=bytes.len() {
        let (mut watch, settled) = AckWatch::new();
        for chunk in bytes[..before_ack].chunks(cut) {
            watch.wrote(chunk);
        }
        assert!(!*settled.borrow(), "no ACK yet (writes of {cut})");
        let (mut watch, settled) = AckWatch::new();
        for chunk in bytes.chunks(cut) {
            watch.wrote(chunk);
        }
        assert!(*settled.borrow(), "the ACK, in writes of {cut}");
    }
    // Vectored: only the n bytes written count.
    let (mut watch, settled) = AckWatch::new();
    let slices = [
        io::IoSlice::new(&bytes[..30]),
        io::IoSlice::new(&bytes[30..]),
    ];
    watch.wrote_vectored(&slices, bytes.len() - 1);
    assert!(!*settled.borrow());
    watch.wrote(&bytes[bytes.len() - 1..]);
    assert!(*settled.borrow());
}

#[tokio::test]
async fn connections_per_key_are_bounded() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::with_limits(
        Settings {
            max_streams: 1,
            ..Settings::default()
        },
        Limits {
            max_connections: 2,
            idle_timeout: IDLE_TIMEOUT,
        },
    );
    let dials = Arc::new(AtomicUsize::new(0));
    let a = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    let _b = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    let err = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .expect_err("both connections full");
    assert!(
        matches!(
            err,
            Error::Overloaded {
                connecting: 2,
                waiting: 1
            }
        ),
        "{err}"
    );
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    // Another actor has its own connections.
    pool.open(&key("a2"), pep.dial(&dials), request("a2", ECHO), T)
        .await
        .expect("another key is not affected");
    // A slot that comes free is taken again.
    drop(a);
    pool.open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .expect("a free slot again");
}

#[tokio::test]
async fn goaway_sends_new_streams_to_a_new_connection_and_old_streams_finish() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut old = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    old.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    old.read_exact(&mut buf).await.unwrap();
    // The PEP says GOAWAY on the connection.
    pep.goaway.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut new = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .expect("a stream on a fresh connection");
    assert_ne!(new.connection(), old.connection());
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 2);
    // The stream opened before the GOAWAY keeps going to its end.
    assert_eq!(echo(&mut old, b" and after").await, b" and after|eof");
    assert_eq!(echo(&mut new, b"new").await, b"new|eof");
    let stats = pool.stats();
    assert_eq!(stats.goaways_total, 1);
    assert_eq!(stats.connections_opened_total, 2);
    drop(old);
    // The old connection closes once its last stream is gone.
    let deadline = Instant::now() + T;
    while pep.seen.ended.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "old connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pool.stats().connections, 1);
}

#[tokio::test]
async fn a_non_2xx_answer_is_refused_and_the_connection_stays() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let err = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", DENIED), T)
        .await
        .expect_err("403");
    assert!(
        matches!(err, Error::Refused(StatusCode::FORBIDDEN)),
        "{err}"
    );
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
    let mut ok = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    assert!(ok.reused());
    assert_eq!(echo(&mut ok, b"x").await, b"x|eof");
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().streams, 1);
}

#[tokio::test]
async fn no_answer_times_out() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let bound = Duration::from_millis(300);
    let start = Instant::now();
    let err = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", SLOW), bound)
        .await
        .expect_err("no answer");
    assert!(matches!(err, Error::Timeout(d) if d == bound), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(pool.stats().streams, 0, "the slot is given back");
    // The connection is still good.
    let mut ok = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    assert!(ok.reused());
    assert_eq!(echo(&mut ok, b"y").await, b"y|eof");
}

#[tokio::test]
async fn an_unreachable_pep_is_the_dials_error() {
    // A port nothing listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pep = TestPep {
        addr,
        seen: Arc::default(),
        goaway: watch::channel(0).0,
    };
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let err = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(lock(&pool.inner.keys).is_empty(), "no entry left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_resets_it_and_not_the_connection() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut flood = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", FLOOD), T)
        .await
        .unwrap();
    let mut other = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    let mut buf = vec![0u8; 100_000];
    flood.read_exact(&mut buf).await.unwrap();
    drop(flood);
    // The PEP's writes on the dropped stream fail: it was reset, not just half-closed.
    let deadline = Instant::now() + T;
    while pep.seen.write_failures.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped stream was never reset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(echo(&mut other, b"still here").await, b"still here|eof");
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pep.seen.ended.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_through_one_stream() {
    const SIZE: usize = 64 * 1024 * 1024;
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let stream = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..SIZE / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = 0usize;
    let mut pos = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut tail = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .expect("no stall")
            .unwrap();
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if got < SIZE {
                assert_eq!(b, ((pos % (64 * 1024)) % 251) as u8, "byte {got}");
                pos += 1;
            } else {
                tail.push(b);
            }
            got += 1;
        }
    }
    writer.await.unwrap();
    assert_eq!(got, SIZE + 4);
    assert_eq!(tail, b"|eof");
    eprintln!(
        "64 MiB each way through one stream in {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn idle_connections_close() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::with_limits(
        Settings::default(),
        Limits {
            max_connections: MAX_CONNECTIONS_PER_KEY,
            idle_timeout: Duration::from_millis(300),
        },
    );
    let dials = Arc::new(AtomicUsize::new(0));
    let mut stream = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    // Busy for longer than the idle timeout: stays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(echo(&mut stream, b"z").await, b"z|eof");
    assert_eq!(pool.stats().connections, 1);
    drop(stream);
    let deadline = Instant::now() + T;
    while pep.seen.ended.load(Ordering::SeqCst) < 1 || pool.stats().connections > 0 {
        assert!(Instant::now() < deadline, "idle connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lock(&pool.inner.keys).is_empty());
    // The next open dials anew.
    pool.open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    assert_eq!(dials.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn actors_and_generations_never_share_and_remove_closes() {
    let pep = TestPep::start(ServerOptions::default(), None).await;
    let pool = Pool::new(Settings::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let a1 = pool
        .open(&key("a1"), pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    let mut a2 = pool
        .open(&key("a2"), pep.dial(&dials), request("a2", ECHO), T)
        .await
        .unwrap();
    let rotated = Key {
        generation: 1,
        ..key("a1")
    };
    let a1_new = pool
        .open(&rotated, pep.dial(&dials), request("a1", ECHO), T)
        .await
        .unwrap();
    assert_eq!(pep.seen.accepted.load(Ordering::SeqCst), 3);
    assert_ne!(a1.connection(), a1_new.connection());
    drop((a1, a1_new));
    pool.remove("a1");
    let deadline = Instant::now() + T;
    while pep.seen.ended.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "a1's connections never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(echo(&mut a2, b"a2").await, b"a2|eof");
    assert_eq!(pool.stats().connections, 1);
}

/// A CA and a server certificate for 127.0.0.1, the CA's PEM in a file, and a server
/// config offering HTTP/2 and HTTP/1.1 by ALPN.
struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    pki_with(false)
}

/// `require_client`: the server demands a client certificate from its CA (and the client
/// config from [`tls_pep`] has none).
fn pki_with(require_client: bool) -> Pki {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = if require_client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut server = builder
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    server.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Pki {
        _dir: dir,
        ca_file,
        server: Arc::new(server),
    }
}

/// A PEP on `addr` over TLS verified with `pki`'s CA (no ALPN: HTTP/1.1).
fn tls_pep(addr: SocketAddr, pki: &Pki) -> Pep {
    let pep_addr = PepAddr {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let tls = crate::pep::Tls::load(&pep_addr, &pki.ca_file, None, None, None, None).unwrap();
    Pep {
        tls: Some(tls),
        connect_timeout: T,
        response_timeout: T,
        ..Pep::new(pep_addr)
    }
}

/// A TLS dial to `pep` offering `alpn`.
fn tls_dial(pep: &Pep, config: Arc<rustls::ClientConfig>) -> impl FnOnce() -> DialFuture + use<> {
    let addr = pep.addr.socket_addr().unwrap();
    let name = pep.tls.as_ref().unwrap().server_name.clone();
    move || {
        Box::pin(async move {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| Error::Unreachable { pep: addr, source })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Tls {
                    pep: addr.to_string(),
                    reason: e.to_string(),
                })?;
            Ok(PepStream::Tls(Box::new(tls)))
        })
    }
}

#[tokio::test]
async fn over_tls_with_alpn_h2_and_refused_without() {
    let pki = pki();
    let server = TestPep::start(ServerOptions::default(), Some(pki.server.clone())).await;
    let pep = tls_pep(server.addr, &pki);
    let base = pep.tls.as_ref().unwrap().client_config();
    let pool = Pool::new(Settings::default());
    let mut stream = pool
        .open(
            &key("a1"),
            tls_dial(&pep, with_alpn_h2(&base)),
            request("a1", ECHO),
            T,
        )
        .await
        .expect("HTTP/2 over TLS");
    assert_eq!(echo(&mut stream, b"tls").await, b"tls|eof");
    // A dial that did not negotiate h2 is refused before any HTTP/2 is spoken.
    let err = pool
        .open(&key("a2"), tls_dial(&pep, base), request("a2", ECHO), T)
        .await
        .expect_err("no ALPN h2");
    assert!(
        matches!(&err, Error::Tls { reason, .. } if reason.contains("ALPN h2")),
        "{err}"
    );
    assert_eq!(server.authorities(), ["echo.test:443"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pep_refusing_the_client_certificate_is_a_tls_error() {
    // TLS 1.3: the client's handshake is done before the PEP judges its certificate; the
    // alert comes after. It must surface as TLS every time, not as a lost "connection closed".
    let pki = pki_with(true);
    let server = TestPep::start(ServerOptions::default(), Some(pki.server.clone())).await;
    let pep = tls_pep(server.addr, &pki);
    let config = with_alpn_h2(&pep.tls.as_ref().unwrap().client_config());
    let pool = Pool::new(Settings::default());
    for _ in 0..20 {
        let err = pool
            .open(
                &key("a1"),
                tls_dial(&pep, config.clone()),
                request("a1", ECHO),
                T,
            )
            .await
            .expect_err("no client certificate");
        assert!(
            matches!(&err, Error::Tls { reason, .. } if reason.contains("alert")),
            "{err:?}"
        );
    }
    assert!(server.authorities().is_empty());
    assert!(lock(&pool.inner.keys).is_empty(), "nothing pooled");
}

#[tokio::test]
async fn a_pep_that_waits_for_the_clients_preface_is_waited_for_once() {
    let pki = pki();
    let options = ServerOptions {
        silent: true,
        ..ServerOptions::default()
    };
    let server = TestPep::start(options, Some(pki.server.clone())).await;
    let pep = tls_pep(server.addr, &pki);
    let config = with_alpn_h2(&pep.tls.as_ref().unwrap().client_config());
    let pool = Pool::new(Settings::default());
    let start = Instant::now();
    let mut first = pool
        .open(
            &key("a1"),
            tls_dial(&pep, config.clone()),
            request("a1", ECHO),
            T,
        )
        .await
        .expect("works, after the wait");
    assert!(
        start.elapsed() >= SPEAKS_FIRST_WAIT,
        "{:?}",
        start.elapsed()
    );
    assert_eq!(echo(&mut first, b"1").await, b"1|eof");
    // Another connection (another actor) to the same PEP does not wait again.
    let start = Instant::now();
    let mut second = pool
        .open(&key("a2"), tls_dial(&pep, config), request("a2", ECHO), T)
        .await
        .unwrap();
    assert!(
        lock(&pool.inner.silent).contains_key(&key("a2").pep),
        "the PEP is remembered as one that waits for the preface"
    );
    assert!(start.elapsed() < SPEAKS_FIRST_WAIT, "{:?}", start.elapsed());
    assert_eq!(echo(&mut second, b"2").await, b"2|eof");
}

/// The setup cost of one new tunnel: (a) TCP + TLS 1.3 + HTTP/1.1 CONNECT on a new
/// connection (what the `headers` profile pays), (b) one CONNECT stream on an HTTP/2
/// connection already open. Loopback, in-process server, debug or release as built:
/// `cargo test -p egress-agent --release --lib tunnel::h2::tests::setup_cost -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run by hand"]
async fn setup_cost() {
    const N: usize = 500;
    let pki = pki();
    let server = TestPep::start(ServerOptions::default(), Some(pki.server.clone())).await;
    let pep = tls_pep(server.addr, &pki);
    let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
    let summary = |mut times: Vec<Duration>| {
        times.sort();
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        format!(
            "mean {mean:?}, median {:?}, p90 {:?}",
            times[times.len() / 2],
            times[times.len() * 9 / 10]
        )
    };
    // Warm up both paths (first TLS handshake, allocations).
    for _ in 0..20 {
        connector.open(request("a1", ECHO), "a1").await.unwrap();
    }
    let mut h1 = Vec::new();
    for _ in 0..N {
        let start = Instant::now();
        let tunnel = connector.open(request("a1", ECHO), "a1").await.unwrap();
        h1.push(start.elapsed());
        drop(tunnel);
    }
    let pool = Pool::new(Settings::default());
    let config = with_alpn_h2(&pep.tls.as_ref().unwrap().client_config());
    let dial = || tls_dial(&pep, config.clone());
    let start = Instant::now();
    let first = pool
        .open(&key("a1"), dial(), request("a1", ECHO), T)
        .await
        .unwrap();
    let fresh_h2 = start.elapsed();
    for _ in 0..20 {
        pool.open(&key("a1"), dial(), request("a1", ECHO), T)
            .await
            .unwrap();
    }
    let mut h2 = Vec::new();
    for _ in 0..N {
        let start = Instant::now();
        let stream = pool
            .open(&key("a1"), dial(), request("a1", ECHO), T)
            .await
            .unwrap();
        h2.push(start.elapsed());
        assert!(stream.reused());
        drop(stream);
    }
    drop(first);
    eprintln!(
        "(a) new TCP + TLS 1.3 + HTTP/1.1 CONNECT: {} (n={N})",
        summary(h1)
    );
    eprintln!(
        "(b) new CONNECT stream on an open HTTP/2 TLS connection: {} (n={N})",
        summary(h2)
    );
    eprintln!("    (first HTTP/2 stream, with TCP + TLS + HTTP/2 handshake: {fresh_h2:?})");
    assert_eq!(pool.stats().connections_opened_total, 1);
}
