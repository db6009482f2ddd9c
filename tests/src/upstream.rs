//! Local upstream servers (the actors' destinations) that record what reached them.
//!
//! All listeners of one [`Upstream`] are bound in `start` inside the given namespace (so a busy
//! port fails there) and served by one thread running a current-thread tokio runtime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::netns::Netns;
use crate::pki::TestCa;

/// The banner the server-first service writes as soon as a connection is accepted.
pub const BANNER: &str = "220 egress-test ready\r\n";

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TLS (certificate from the test CA for the configured names), then HTTP/1.1.
    Https,
    /// Plain HTTP/1.1.
    Http,
    /// Server-first: writes [`BANNER`] at once, then echoes every byte it receives.
    Banner,
}

/// One accepted connection as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The listener's label, e.g. `https:10.251.3.1:8443`.
    pub server: String,
    /// The listener's kind.
    pub kind: Kind,
    /// Local address the client reached.
    pub local: SocketAddr,
    /// The client's address (the agent's or squid's socket when proxied, the actor's when direct).
    pub peer: SocketAddr,
    /// TLS SNI from the ClientHello (HTTPS only; `None` if the client sent none).
    pub sni: Option<String>,
    /// ALPN protocols offered in the ClientHello (HTTPS only).
    pub alpn: Vec<String>,
    /// Host header of the first request (HTTP/HTTPS), if one arrived.
    pub host: Option<String>,
    /// Path of the first request (HTTP/HTTPS), if one arrived.
    pub path: Option<String>,
    /// Set if the TLS handshake or request parsing failed.
    pub error: Option<String>,
}

/// Which listeners to open and which names the certificate covers.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSpec {
    /// Listeners to bind, in order.
    pub listeners: Vec<(Kind, SocketAddr)>,
    /// DNS names (and IPs) for the HTTPS certificate's SANs.
    pub names: Vec<String>,
}

impl UpstreamSpec {
    /// An empty spec.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an HTTPS listener.
    pub fn https(mut self, addr: SocketAddr) -> Self {
        self.listeners.push((Kind::Https, addr));
        self
    }

    /// Adds a plain HTTP listener.
    pub fn http(mut self, addr: SocketAddr) -> Self {
        self.listeners.push((Kind::Http, addr));
        self
    }

    /// Adds a server-first banner/echo listener.
    pub fn banner(mut self, addr: SocketAddr) -> Self {
        self.listeners.push((Kind::Banner, addr));
        self
    }

    /// Adds names to the HTTPS certificate.
    pub fn names(mut self, names: &[&str]) -> Self {
        self.names.extend(names.iter().map(|s| s.to_string()));
        self
    }
}

struct Listener {
    label: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

/// Running upstream servers; stopped on drop.
pub struct Upstream {
    listeners: Vec<Listener>,
    seen: Arc<Mutex<Vec<Seen>>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Binds every listener of `spec` inside `netns` and starts serving; the HTTPS certificate is
    /// issued by `ca` for `spec.names` plus every listener's IP address.
    pub fn start(netns: &Netns, ca: &TestCa, spec: UpstreamSpec) -> Upstream {
        let mut names: Vec<String> = spec.names.clone();
        for (_, addr) in &spec.listeners {
            let ip = addr.ip().to_string();
            if !names.contains(&ip) {
                names.push(ip);
            }
        }
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let issued = ca.issue(&name_refs);
        let tls = Arc::new(server_config(issued.cert_der, issued.key_der));

        let addrs: Vec<SocketAddr> = spec.listeners.iter().map(|(_, a)| *a).collect();
        let ns_name = netns.name().to_string();
        let bound: Vec<std::net::TcpListener> = netns.run(move || {
            addrs
                .iter()
                .map(|a| {
                    let l = std::net::TcpListener::bind(a).unwrap_or_else(|e| {
                        panic!("upstream: bind {a} in netns {ns_name}: {e} (port busy?)")
                    });
                    l.set_nonblocking(true).expect("set_nonblocking");
                    l
                })
                .collect()
        });

        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();
        for ((kind, addr), std_listener) in spec.listeners.iter().zip(bound) {
            let label = format!("{}:{}", kind_name(*kind), addr);
            let accepted = Arc::new(AtomicUsize::new(0));
            listeners.push(Listener {
                label: label.clone(),
                addr: *addr,
                accepted: accepted.clone(),
            });
            tasks.push(Server {
                label,
                kind: *kind,
                accepted,
                seen: seen.clone(),
                tls: tls.clone(),
                std_listener,
            });
        }

        let (tx, rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    for server in tasks {
                        tokio::spawn(server.run());
                    }
                    let _ = rx.await;
                });
                // Dropping the runtime cancels the accept loops and every open connection.
            })
            .expect("spawn upstream thread");
        Upstream {
            listeners,
            seen,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Every connection recorded so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connections recorded on the listener bound to `addr`.
    pub fn seen_on(&self, addr: SocketAddr) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.local == addr)
            .collect()
    }

    /// Waits until at least `n` connections are recorded; panics with what was seen on timeout.
    pub fn wait_for_seen(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        crate::process::poll(
            timeout,
            Duration::from_millis(20),
            || {
                let seen = self.seen();
                if seen.len() >= n { Ok(seen) } else { Err(seen) }
            },
            |seen| {
                format!(
                    "upstream: expected {n} connections within {timeout:?}, saw {}: {seen:#?}",
                    seen.len()
                )
            },
        )
    }

    /// Connections accepted so far by the listener bound to `addr` (counted at accept,
    /// before any byte is read, so it also counts connections that failed later).
    pub fn accepted(&self, addr: SocketAddr) -> usize {
        self.listener(addr).accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted so far by all listeners.
    pub fn total_accepted(&self) -> usize {
        self.listeners
            .iter()
            .map(|l| l.accepted.load(Ordering::SeqCst))
            .sum()
    }

    /// The label a listener puts in its responses (`https:ADDR`, `http:ADDR`, `banner:ADDR`).
    pub fn label(&self, addr: SocketAddr) -> String {
        self.listener(addr).label.clone()
    }

    fn listener(&self, addr: SocketAddr) -> &Listener {
        self.listeners
            .iter()
            .find(|l| l.addr == addr)
            .unwrap_or_else(|| panic!("upstream has no listener on {addr}"))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Https => "https",
        Kind::Http => "http",
        Kind::Banner => "banner",
    }
}

fn server_config(cert_der: Vec<u8>, key_der: Vec<u8>) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .expect("server certificate");
    // Only HTTP/1.1: the response parser in tests (and curl's choice) stay simple.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

struct Server {
    label: String,
    kind: Kind,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: Arc<rustls::ServerConfig>,
    std_listener: std::net::TcpListener,
}

impl Server {
    async fn run(self) {
        let listener =
            tokio::net::TcpListener::from_std(self.std_listener).expect("tokio listener");
        let shared = Arc::new(Shared {
            label: self.label,
            kind: self.kind,
            seen: self.seen,
            tls: self.tls,
        });
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                // E.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            self.accepted.fetch_add(1, Ordering::SeqCst);
            let shared = shared.clone();
            tokio::spawn(async move {
                let local = stream.local_addr().unwrap_or(peer);
                let seen = Seen {
                    server: shared.label.clone(),
                    kind: shared.kind,
                    local,
                    peer,
                    sni: None,
                    alpn: Vec::new(),
                    host: None,
                    path: None,
                    error: None,
                };
                shared.serve(stream, seen).await;
            });
        }
    }
}

struct Shared {
    label: String,
    kind: Kind,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: Arc<rustls::ServerConfig>,
}

impl Shared {
    fn record(&self, seen: Seen) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seen);
    }

    async fn serve(&self, mut stream: tokio::net::TcpStream, mut seen: Seen) {
        match self.kind {
            Kind::Banner => {
                // Recorded before the banner goes out, so a client that has read it can rely on it.
                self.record(seen);
                if stream.write_all(BANNER.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
            Kind::Http => self.serve_http(stream, seen).await,
            Kind::Https => {
                let start = match tokio_rustls::LazyConfigAcceptor::new(
                    rustls::server::Acceptor::default(),
                    stream,
                )
                .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        seen.error = Some(format!("reading ClientHello: {e}"));
                        return self.record(seen);
                    }
                };
                let hello = start.client_hello();
                seen.sni = hello.server_name().map(str::to_string);
                seen.alpn = hello
                    .alpn()
                    .map(|it| {
                        it.map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                match start.into_stream(self.tls.clone()).await {
                    Ok(tls) => self.serve_http(tls, seen).await,
                    Err(e) => {
                        seen.error = Some(format!("TLS handshake: {e}"));
                        self.record(seen);
                    }
                }
            }
        }
    }

    /// Serves HTTP/1.1 requests (keep-alive) and answers each with a text body naming this
    /// server and the SNI/Host/path it saw; `GET /bytes/N` answers N bytes instead, and a
    /// request body is read and its length reported.
    async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S, mut seen: Seen) {
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let req = match read_request(&mut s, &mut buf).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if first {
                        self.record(seen);
                    }
                    return;
                }
                Err(e) => {
                    if first {
                        seen.error = Some(e);
                        self.record(seen);
                    }
                    return;
                }
            };
            if first {
                seen.host = req.host.clone();
                seen.path = Some(req.path.clone());
                // Recorded before the response is written, so a client holding the response
                // can rely on it.
                self.record(seen.clone());
                first = false;
            }
            let body: Vec<u8> = match req
                .path
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => (0..n).map(|i| b"0123456789abcdef"[i % 16]).collect(),
                None => format!(
                    "upstream={} sni={} host={} path={} received={}\n",
                    self.label,
                    seen.sni.as_deref().unwrap_or("-"),
                    req.host.as_deref().unwrap_or("-"),
                    req.path,
                    req.body_len,
                )
                .into_bytes(),
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Upstream: {}\r\n{}\r\n",
                body.len(),
                self.label,
                if req.close {
                    "Connection: close\r\n"
                } else {
                    ""
                },
            );
            // Flushed: a TLS stream may keep the last record buffered after write_all, and a
            // keep-alive client would then wait for it forever.
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(&body).await.is_err()
                || s.flush().await.is_err()
            {
                return;
            }
            if req.close {
                let _ = s.shutdown().await;
                return;
            }
        }
    }
}

struct Request {
    path: String,
    host: Option<String>,
    body_len: usize,
    close: bool,
}

/// Reads one request (head and Content-Length body); `Ok(None)` on a clean EOF before any byte.
async fn read_request<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<Request>, String> {
    let (head_len, path, host, content_length, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let content_length = header("content-length")
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    || req.version == Some(0);
                break (
                    n,
                    req.path.unwrap_or("/").to_string(),
                    header("host"),
                    content_length,
                    close,
                );
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(format!("bad request: {e}")),
        }
        if buf.len() > 64 * 1024 {
            return Err("request head over 64 KiB".into());
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("EOF inside request head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    buf.drain(..head_len);
    // Discard the body, counting it.
    let mut remaining = content_length;
    let take = remaining.min(buf.len());
    buf.drain(..take);
    remaining -= take;
    let mut chunk = vec![0u8; 64 * 1024];
    while remaining > 0 {
        match s.read(&mut chunk[..remaining.min(64 * 1024)]).await {
            Ok(0) => return Err("EOF inside request body".into()),
            Ok(n) => remaining -= n,
            Err(e) => return Err(format!("read body: {e}")),
        }
    }
    Ok(Some(Request {
        path,
        host,
        body_len: content_length,
        close,
    }))
}
