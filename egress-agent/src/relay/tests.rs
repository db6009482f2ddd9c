//! The relay on real loopback TCP sockets (and a TLS link), both engines.
use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream},
    net::TcpListener,
};

use super::*;

/// A connected loopback pair: (the end the test drives, the end the relay holds).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// app <-> client (relay) upstream <-> server.
struct Rig {
    app: TcpStream,
    client: TcpStream,
    upstream: TcpStream,
    server: TcpStream,
}

async fn rig() -> Rig {
    let (app, client) = pair().await;
    let (upstream, server) = pair().await;
    Rig {
        app,
        client,
        upstream,
        server,
    }
}

fn settings(mode: Mode) -> Settings {
    Settings {
        mode,
        max_buffer: DEFAULT_MAX_BUFFER,
    }
}

/// `len` bytes of a counter that does not repeat within 64 MiB: any lost, doubled or
/// reordered chunk shows.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 4);
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(&(i ^ seed.rotate_left(16)).to_le_bytes());
        i = i.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// Panics with the first differing offset (not 64 MiB of bytes).
fn same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

const MODES: [Mode; 2] = [Mode::Copy, Mode::Splice];

fn engine_of(mode: Mode) -> Engine {
    match mode {
        Mode::Copy => Engine::Copy,
        Mode::Splice => Engine::Splice,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_after_the_first_bytes() {
    const N: usize = 64 << 20;
    let up_data = Arc::new(pattern(1, N));
    let down_data = Arc::new(pattern(2, N));
    for mode in MODES {
        let Rig {
            app,
            mut client,
            mut upstream,
            server,
        } = rig().await;
        let relay = tokio::spawn(async move {
            relay(
                &mut client,
                &mut upstream,
                Bytes::from_static(b"PEEKED "),
                Bytes::from_static(b"LEFTOVER "),
                settings(mode),
            )
            .await
        });
        let (mut app_r, mut app_w) = app.into_split();
        let (mut srv_r, mut srv_w) = server.into_split();
        let (up, down) = (up_data.clone(), down_data.clone());
        let app_send = tokio::spawn(async move {
            app_w.write_all(&up).await.unwrap();
            app_w.shutdown().await.unwrap();
        });
        let srv_send = tokio::spawn(async move {
            srv_w.write_all(&down).await.unwrap();
            srv_w.shutdown().await.unwrap();
        });
        let app_recv = tokio::spawn(async move {
            let mut got = Vec::with_capacity(N + 16);
            app_r.read_to_end(&mut got).await.unwrap();
            got
        });
        let srv_recv = tokio::spawn(async move {
            let mut got = Vec::with_capacity(N + 16);
            srv_r.read_to_end(&mut got).await.unwrap();
            got
        });
        let (at_server, at_app) = (srv_recv.await.unwrap(), app_recv.await.unwrap());
        app_send.await.unwrap();
        srv_send.await.unwrap();
        let relayed = relay.await.unwrap();
        relayed.result.expect("clean end");
        assert_eq!(relayed.engine, engine_of(mode));
        assert_eq!(
            at_server.get(..7),
            Some(&b"PEEKED "[..]),
            "{mode}: peeked first"
        );
        same(&format!("{mode} up"), &at_server[7..], &up_data);
        assert_eq!(
            at_app.get(..9),
            Some(&b"LEFTOVER "[..]),
            "{mode}: leftover first"
        );
        same(&format!("{mode} down"), &at_app[9..], &down_data);
        assert_eq!(relayed.bytes_up, (N + 7) as u64, "{mode}");
        assert_eq!(relayed.bytes_down, (N + 9) as u64, "{mode}");
    }
}

/// `first` half-closes after one message; the other side answers after seeing the EOF,
/// then half-closes too.
async fn half_close(mode: Mode, client_first: bool) {
    let Rig {
        app,
        mut client,
        mut upstream,
        server,
    } = rig().await;
    let relay = tokio::spawn(async move {
        relay(
            &mut client,
            &mut upstream,
            Bytes::new(),
            Bytes::new(),
            settings(mode),
        )
        .await
    });
    let (mut first, mut second) = if client_first {
        (app, server)
    } else {
        (server, app)
    };
    first.write_all(b"one way").await.unwrap();
    first.shutdown().await.unwrap();
    let mut got = Vec::new();
    second.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"one way", "{mode}: EOF passed on after the bytes");
    // The other direction still works after the half-close.
    second.write_all(b"and back").await.unwrap();
    second.shutdown().await.unwrap();
    let mut got = Vec::new();
    first.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"and back", "{mode}");
    let relayed = relay.await.unwrap();
    relayed.result.expect("clean end");
    let (up, down) = if client_first { (7, 8) } else { (8, 7) };
    assert_eq!((relayed.bytes_up, relayed.bytes_down), (up, down), "{mode}");
}

/// A peer that sends urgent data (`MSG_OOB`): splice(2) stops at the urgent mark, so the
/// relay must step over it as recv(2) does (the urgent byte is not part of the stream) and
/// deliver everything after it, in both engines.
async fn urgent_data(mode: Mode) {
    let Rig {
        app,
        mut client,
        mut upstream,
        mut server,
    } = rig().await;
    let relay = tokio::spawn(async move {
        relay(
            &mut client,
            &mut upstream,
            Bytes::new(),
            Bytes::new(),
            settings(mode),
        )
        .await
    });
    let app = app.into_std().unwrap();
    app.set_nonblocking(false).unwrap();
    let send = |bytes: &[u8], flags| {
        // SAFETY: send(2) reads `bytes` for the call.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&app),
                bytes.as_ptr().cast(),
                bytes.len(),
                flags,
            )
        };
        assert_eq!(n, bytes.len() as isize, "{mode}: send");
    };
    send(b"abc", 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(b"X", libc::MSG_OOB);
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(b"def", 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
        .await
        .expect("the relay delivered up to the client's EOF")
        .unwrap();
    assert_eq!(got, b"abcdef", "{mode}: every byte after the urgent mark");
    server.shutdown().await.unwrap();
    let relayed = relay.await.unwrap();
    relayed.result.expect("clean end");
    assert_eq!(relayed.bytes_up, 6, "{mode}");
}

#[tokio::test]
async fn urgent_data_is_stepped_over_not_a_stall() {
    urgent_data(Mode::Copy).await;
    urgent_data(Mode::Splice).await;
}

#[tokio::test]
async fn half_close_from_the_client_is_passed_on() {
    for mode in MODES {
        half_close(mode, true).await;
    }
}

#[tokio::test]
async fn half_close_from_the_upstream_is_passed_on() {
    for mode in MODES {
        half_close(mode, false).await;
    }
}

/// A reset by one side while the other keeps sending ends the relay with an error.
async fn reset_ends_in_an_error(mode: Mode, upstream_resets: bool) {
    let Rig {
        mut app,
        mut client,
        mut upstream,
        mut server,
    } = rig().await;
    let relay = tokio::spawn(async move {
        relay(
            &mut client,
            &mut upstream,
            Bytes::new(),
            Bytes::new(),
            settings(mode),
        )
        .await
    });
    if !upstream_resets {
        std::mem::swap(&mut app, &mut server);
    }
    // `app` keeps sending, `server` reads a little and resets.
    let sender = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while app.write_all(&chunk).await.is_ok() {}
    });
    let mut buf = [0u8; 1024];
    server.read_exact(&mut buf).await.unwrap();
    crate::socket::reset(server);
    let relayed = relay.await.unwrap();
    assert!(
        relayed.result.is_err(),
        "{mode}: a reset must surface as an error, got {relayed:?}"
    );
    sender.await.unwrap();
}

#[tokio::test]
async fn a_reset_by_the_upstream_is_an_error() {
    for mode in MODES {
        reset_ends_in_an_error(mode, true).await;
    }
}

#[tokio::test]
async fn a_reset_by_the_client_is_an_error() {
    for mode in MODES {
        reset_ends_in_an_error(mode, false).await;
    }
}

/// Polls `relay` until `done` holds (at most about 10 s), asserting it is still running.
async fn drive_until<A: Peer + ?Sized, B: Peer + ?Sized>(
    relay: &mut Relay<'_, A, B>,
    what: &str,
    mut done: impl FnMut(&Relay<'_, A, B>) -> bool,
) {
    for _ in 0..1000 {
        if let Ok(ended) = tokio::time::timeout(Duration::from_millis(10), &mut *relay).await {
            panic!("{what}: the relay ended early: {ended:?}");
        }
        if done(relay) {
            return;
        }
    }
    panic!("{what}: not reached; the relay holds {:?}", relay.held());
}

/// One small request and response through a relay of `client` and `upstream`, then: the
/// idle relay holds nothing. With the server not reading, a large upload makes it hold
/// its buffer (or pipe) until the server reads again.
async fn idle_holds_nothing<C, U, S>(
    mode: Mode,
    mut client: C,
    mut upstream: U,
    mut app: TcpStream,
    mut server: S,
    want: Engine,
) where
    C: Peer,
    U: Peer,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut relay = Relay::new(
        &mut client,
        &mut upstream,
        Bytes::from(b"GET / HTTP/1.1\r\n".to_vec()),
        Bytes::new(),
        settings(mode),
    );
    assert_eq!(
        relay.held().first_bytes,
        16,
        "{mode}: the peeked bytes wait"
    );
    let server_task = tokio::spawn(async move {
        let mut head = [0u8; 32];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        server.flush().await.unwrap();
        server
    });
    app.write_all(b"Host: a.test\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 19];
    let read = app.read_exact(&mut answer);
    tokio::pin!(read);
    // Drive the relay and the app's read together until the answer is in.
    tokio::select! {
        r = &mut read => { r.unwrap(); }
        ended = &mut relay => panic!("{mode}: the relay ended early: {ended:?}"),
    }
    assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n\r\n");
    drive_until(&mut relay, "idle", |r| r.held() == Held::default()).await;
    assert_eq!(relay.engine(), want);
    assert_eq!((relay.bytes_up(), relay.bytes_down()), (32, 19));

    // Now a large upload the server does not read: the relay is stuck holding bytes.
    let mut server = server_task.await.unwrap();
    let upload = tokio::spawn(async move {
        app.write_all(&vec![1u8; 32 << 20]).await.unwrap();
        app
    });
    drive_until(&mut relay, "stuck", |r| {
        let held = r.held();
        held.buffer_bytes > 0 || held.pipes > 0
    })
    .await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while total < 32 << 20 {
            total += server.read(&mut buf).await.unwrap();
        }
        // Kept open: the relay must be seen idle, not ended.
        (total, server)
    });
    drive_until(&mut relay, "drained", |r| {
        r.bytes_up() == 32 + (32 << 20) && r.held() == Held::default()
    })
    .await;
    assert_eq!(reader.await.unwrap().0, 32 << 20);
    drop(upload.await.unwrap());
}

#[tokio::test]
async fn an_idle_relay_holds_no_buffer_and_no_pipe() {
    for (mode, engine) in [(Mode::Copy, Engine::Copy), (Mode::Splice, Engine::Splice)] {
        let Rig {
            app,
            client,
            upstream,
            server,
        } = rig().await;
        idle_holds_nothing(mode, client, upstream, app, server, engine).await;
    }
}

impl Peer for DuplexStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

#[tokio::test]
async fn any_byte_stream_is_relayed_with_a_copy_buffer() {
    let (app, client) = pair().await;
    let (upstream, server) = tokio::io::duplex(64 * 1024);
    idle_holds_nothing(Mode::Splice, client, upstream, app, server, Engine::Copy).await;
}

/// A TLS server on loopback with a fresh CA; returns its address and a client config that
/// trusts it (name `pep.test`).
async fn tls_server() -> (
    TcpListener,
    tokio_rustls::TlsAcceptor,
    Arc<rustls::ClientConfig>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["pep.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        Arc::new(client),
    )
}

#[tokio::test]
async fn a_tls_pep_link_is_relayed_with_a_copy_buffer() {
    let (listener, acceptor, client_config) = tls_server().await;
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config)
        .connect(
            rustls::pki_types::ServerName::try_from("pep.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let server = accept.await.unwrap();
    let (app, client) = pair().await;
    idle_holds_nothing(
        Mode::Splice,
        client,
        PepStream::Tls(Box::new(tls)),
        app,
        server,
        Engine::Copy,
    )
    .await;
}

#[tokio::test]
async fn no_pipe_means_a_copy_buffer_not_a_lost_connection() {
    for mode in MODES {
        let Rig {
            mut app,
            mut client,
            mut upstream,
            mut server,
        } = rig().await;
        let mut relay = Relay::new(
            &mut client,
            &mut upstream,
            Bytes::new(),
            Bytes::new(),
            settings(mode),
        )
        .with_pipes(|_| Err(io::Error::from_raw_os_error(libc::EMFILE)));
        let peers = async {
            app.write_all(b"hello").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            server.write_all(b"world").await.unwrap();
            server.shutdown().await.unwrap();
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"world");
        };
        let (result, ()) = tokio::join!(&mut relay, peers);
        result.expect("clean end");
        let want = match mode {
            Mode::Copy => Engine::Copy,
            Mode::Splice => Engine::SpliceThenCopy,
        };
        assert_eq!(relay.engine(), want);
        assert_eq!((relay.bytes_up(), relay.bytes_down()), (5, 5));
    }
}

#[test]
fn buffers_grow_in_steps_up_to_the_bound() {
    assert_eq!(grow(INITIAL_BUFFER, DEFAULT_MAX_BUFFER), LARGE_BUFFER);
    assert_eq!(grow(LARGE_BUFFER, DEFAULT_MAX_BUFFER), DEFAULT_MAX_BUFFER);
    assert_eq!(
        grow(DEFAULT_MAX_BUFFER, DEFAULT_MAX_BUFFER),
        DEFAULT_MAX_BUFFER
    );
    assert_eq!(grow(1024, 4096), 4096);
    assert_eq!(grow(512, 512), 512);
    assert_eq!(CopyBuf::new(512).size, 512);
    assert_eq!(CopyBuf::new(0).size, 1, "never a zero-sized read");
    assert_eq!(Splicer::new(64 << 20).pipe_bytes, MAX_PIPE);
}

#[test]
fn pipes_are_sized_and_know_what_they_hold() {
    let pipe = Pipe::new(MAX_PIPE).unwrap();
    // Unprivileged users may be held to /proc/sys/fs/pipe-max-size; the agent runs as root.
    assert!(pipe.size >= 64 * 1024, "{}", pipe.size);
    assert_eq!(pipe.bytes_in().unwrap(), 0);
    nix::unistd::write(&pipe.write, b"abc").unwrap();
    assert_eq!(
        pipe.bytes_in().unwrap(),
        3,
        "a pipe with bytes is never pooled"
    );
    let small = Pipe::new(3000).unwrap();
    assert_eq!(small.size, 4096, "rounded up to a page");
}

#[test]
fn mode_names() {
    #[derive(serde::Deserialize)]
    struct F {
        relay: Mode,
    }
    let f: F = toml::from_str("relay = \"copy\"").unwrap();
    assert_eq!(f.relay, Mode::Copy);
    assert!(toml::from_str::<F>("relay = \"zerocopy\"").is_err());
    assert_eq!(Mode::default().to_string(), "splice");
}

/// Throughput of both engines between loopback socket pairs, 1 and 8 streams, and of the
/// same streams with no relay at all; and the CPU time of the relay's own thread per GB (less
/// sensitive than MB/s to other load on the machine). Medians of 5 interleaved runs. A
/// measurement, it asserts nothing about time:
/// `cargo test --release -p egress-agent --lib relay::tests::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by hand, in release"]
async fn throughput() {
    const BYTES: usize = 1 << 30;
    const RUNS: usize = 5;
    let configs: [(&str, Option<Settings>); 6] = [
        ("direct", None),
        ("copy 256K", Some(settings(Mode::Copy))),
        ("splice 256K", Some(settings(Mode::Splice))),
        (
            "copy 16K",
            Some(Settings {
                mode: Mode::Copy,
                max_buffer: LARGE_BUFFER,
            }),
        ),
        (
            "splice 64K",
            Some(Settings {
                mode: Mode::Splice,
                max_buffer: 64 * 1024,
            }),
        ),
        (
            "splice 1M",
            Some(Settings {
                mode: Mode::Splice,
                max_buffer: MAX_PIPE,
            }),
        ),
    ];
    println!(
        "{:>12} {:>8} {:>10} {:>10} {:>14}",
        "relay", "streams", "MB/s", "vs direct", "relay CPU s/GB"
    );
    for streams in [1usize, 8] {
        let mut results = vec![(Vec::new(), Vec::new()); configs.len()];
        for _ in 0..RUNS {
            for (i, (_, s)) in configs.iter().enumerate() {
                let (mbs, cpu) = measure(*s, streams, BYTES / streams).await;
                results[i].0.push(mbs);
                results[i].1.push(cpu);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let direct = median(&mut results[0].0.clone());
        for ((name, _), (mbs, cpu)) in configs.iter().zip(&mut results) {
            let (mbs, cpu) = (median(mbs), median(cpu));
            println!(
                "{name:>12} {streams:>8} {mbs:>10.0} {:>10.2} {cpu:>14.3}",
                mbs / direct
            );
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// (MB/s, relay CPU seconds per GB) of `streams` one-way transfers of `each` bytes, through
/// relays with `settings` on a thread of their own, or straight from sender to receiver.
async fn measure(settings: Option<Settings>, streams: usize, each: usize) -> (f64, f64) {
    const CHUNK: usize = 256 * 1024;
    let mut ends = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..streams {
        let (sender, client) = pair().await;
        if settings.is_some() {
            let (upstream, receiver) = pair().await;
            ends.push((sender, receiver));
            relayed.push((client.into_std().unwrap(), upstream.into_std().unwrap()));
        } else {
            ends.push((sender, client));
        }
    }
    let start = std::time::Instant::now();
    let relays = settings.map(|s| {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let cpu = thread_cpu();
                let mut tasks = Vec::new();
                for (client, upstream) in relayed {
                    tasks.push(tokio::spawn(async move {
                        let mut client = TcpStream::from_std(client).unwrap();
                        let mut upstream = TcpStream::from_std(upstream).unwrap();
                        let r =
                            relay(&mut client, &mut upstream, Bytes::new(), Bytes::new(), s).await;
                        r.result.unwrap();
                        assert_eq!(r.bytes_up, each as u64);
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                thread_cpu() - cpu
            })
        })
    });
    let mut tasks = Vec::new();
    for (mut sender, mut receiver) in ends {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0u8; CHUNK];
            let mut left = each;
            while left > 0 {
                let n = left.min(CHUNK);
                sender.write_all(&chunk[..n]).await.unwrap();
                left -= n;
            }
            sender.shutdown().await.unwrap();
        }));
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0;
            loop {
                let n = receiver.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, each);
            receiver.shutdown().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = relays.map_or(Duration::ZERO, |t| t.join().unwrap());
    let bytes = (streams * each) as f64;
    (bytes / elapsed / 1e6, cpu.as_secs_f64() / (bytes / 1e9))
}
