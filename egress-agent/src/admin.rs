//! The admin listener (`--admin-listen`, default 127.0.0.1:15090): `/metrics` (OpenMetrics
//! text of [`Metrics`]), `/healthz` (200 while the process serves) and `/readyz` (200 when
//! every [`Health`] check passes, else 503 with the list of what is not ready). GET only,
//! HTTP/1.1 without keep-alive, a bounded number of connections, each bounded in time.
use std::{
    collections::BTreeSet,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, sync::watch};
use tracing::{debug, info, warn};

use crate::metrics::{CONTENT_TYPE, ErrorKind, Metrics};

/// Default `--admin-listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15090";
/// Admin connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin connection may last in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// `--admin-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// No admin listener.
    Off,
    /// Listen on this address.
    Addr(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Listen::Off);
        }
        s.parse().map(Listen::Addr).map_err(|_| {
            format!("{s:?} is not IP:PORT or `off`, e.g. 127.0.0.1:15090 or [::1]:15090")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// Errors of the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error(
        "admin listener {addr}: {source}; give another --admin-listen ADDR:PORT or `off` \
         (env EGRESS_ADMIN_LISTEN)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
}

/// A named readiness check the owner of a component adds (e.g. discovery's first sync).
enum Check {
    /// Ready while the watched value is `true`.
    Watch(watch::Receiver<bool>),
    /// Ready while the function returns `true` (it must not block).
    Fn(Box<dyn Fn() -> bool + Send + Sync>),
}

impl Check {
    fn ready(&self) -> bool {
        match self {
            Check::Watch(rx) => *rx.borrow(),
            Check::Fn(f) => f(),
        }
    }
}

#[derive(Default)]
struct HealthState {
    programs_attached: bool,
    /// Set once the configured actors were taken over (before that, "listeners up" says
    /// nothing).
    actors_started: bool,
    /// Actors whose listener (or DNS socket) could not be opened: their connects are refused.
    unserved: BTreeSet<String>,
    checks: Vec<(String, Check)>,
}

/// What `/readyz` reports: the agent is ready when its programs are attached, every actor's
/// listeners are up, and every named check passes.
#[derive(Default)]
pub struct Health {
    state: Mutex<HealthState>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("unmet", &self.unmet())
            .finish()
    }
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // Every field is replaced whole: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eBPF programs are loaded and attached (or no longer are).
    pub fn set_programs_attached(&self, attached: bool) {
        self.state().programs_attached = attached;
    }

    /// The configured (and remembered) actors were taken over: from now on, "listeners up"
    /// is judged by [`Health::set_unserved`].
    pub fn set_actors_started(&self) {
        self.state().actors_started = true;
    }

    /// The actors that are registered but whose listener (or DNS socket) is not open.
    pub fn set_unserved(&self, actors: BTreeSet<String>) {
        self.state().unserved = actors;
    }

    /// Adds a readiness check named `name`: ready while `ready` holds `true` (e.g.
    /// `health.add_check("discovery", synced_rx)`).
    pub fn add_check(&self, name: impl Into<String>, ready: watch::Receiver<bool>) {
        self.state().checks.push((name.into(), Check::Watch(ready)));
    }

    /// Adds a readiness check named `name` that calls `ready` on each probe (it must be
    /// cheap and must not block).
    pub fn add_check_fn(
        &self,
        name: impl Into<String>,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        self.state()
            .checks
            .push((name.into(), Check::Fn(Box::new(ready))));
    }

    /// What is not ready, one line each; empty when ready.
    pub fn unmet(&self) -> Vec<String> {
        let state = self.state();
        let mut unmet = Vec::new();
        if !state.programs_attached {
            unmet.push("programs: the eBPF programs are not loaded and attached yet".into());
        }
        if !state.actors_started {
            unmet.push("listeners: the configured actors are not taken over yet".into());
        }
        for actor in &state.unserved {
            unmet.push(format!(
                "listeners: actor {actor:?} has no listener or DNS socket (its connects are \
                 refused; see the agent's log)"
            ));
        }
        for (name, check) in &state.checks {
            if !check.ready() {
                unmet.push(format!("{name}: not ready"));
            }
        }
        unmet
    }

    /// Whether every check passes.
    pub fn ready(&self) -> bool {
        self.unmet().is_empty()
    }
}

/// The admin listener, bound.
pub struct Server {
    listener: TcpListener,
}

impl Server {
    /// Binds `addr` (from the runtime); a non-loopback address is allowed, with a warning.
    pub async fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        if !addr.ip().is_loopback() {
            warn!(admin = %addr, "the admin listener is not on loopback: metrics (with actor ids) \
                and readiness are reachable from the network; bind 127.0.0.1 unless that is meant");
        }
        Ok(Server { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: impl Future<Output = ()>,
    ) {
        serve(self.listener, metrics, health, shutdown).await
    }
}

/// Serves admin requests on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(admin = %addr, "admin listener: /metrics /healthz /readyz");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                metrics.error(ErrorKind::Admin);
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(client = %peer, limit = MAX_CONNECTIONS, "admin connection closed: too many");
            drop(stream);
            continue;
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                // /metrics reads the pinned maps' sizes (syscalls bounded by their capacity):
                // off the async threads where the runtime has others.
                let response = match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => {
                        respond(&req, &metrics, &health)
                    }
                    _ => tokio::task::block_in_place(|| respond(&req, &metrics, &health)),
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(client = %peer, error = %e, "admin connection failed"),
                Err(_) => debug!(client = %peer, "admin connection timed out"),
            }
            drop(permit);
        });
    }
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return response;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let unmet = health.unmet();
            if unmet.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                let mut body = String::from("not ready:\n");
                for line in unmet {
                    body.push_str(&line);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        "/metrics" => {
            metrics.set_ready(health.ready());
            let mut body = String::new();
            match metrics.encode(&mut body) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(CONTENT_TYPE),
                    );
                    response
                }
                Err(_) => {
                    metrics.error(ErrorKind::Admin);
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding the metrics failed\n".into(),
                    )
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn listen_parses() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!(
            DEFAULT_LISTEN.parse::<Listen>(),
            Ok(Listen::Addr("127.0.0.1:15090".parse().expect("addr")))
        );
        assert!("localhost:1".parse::<Listen>().is_err());
    }

    #[test]
    fn health_logic() {
        let health = Health::default();
        assert_eq!(health.unmet().len(), 2, "{:?}", health.unmet());
        health.set_programs_attached(true);
        assert!(!health.ready());
        health.set_actors_started();
        assert!(health.ready(), "{:?}", health.unmet());
        health.set_unserved(["a1".to_string()].into());
        let unmet = health.unmet();
        assert_eq!(unmet.len(), 1);
        assert!(unmet[0].contains("\"a1\""), "{unmet:?}");
        health.set_unserved(BTreeSet::new());
        let (tx, rx) = watch::channel(false);
        health.add_check("discovery", rx);
        assert_eq!(health.unmet(), vec!["discovery: not ready".to_string()]);
        tx.send_replace(true);
        assert!(health.ready());
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        health.add_check_fn("other", move || {
            f.load(std::sync::atomic::Ordering::Relaxed)
        });
        assert_eq!(health.unmet(), vec!["other: not ready".to_string()]);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(health.ready());
        health.set_programs_attached(false);
        assert!(!health.ready());
    }

    /// One raw HTTP/1.1 exchange: the status code, the headers and the body.
    async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("answer in time")
            .expect("read");
        let text = String::from_utf8(raw).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")
    }

    #[tokio::test]
    async fn routes() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let server = Server::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(metrics.clone(), health.clone(), async {
            let _ = stopped.await;
        }));

        let (status, _, body) = exchange(addr, &get("/healthz")).await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));

        let (status, _, body) = exchange(addr, &get("/readyz")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("programs:"), "{body}");

        let (status, head, body) = exchange(addr, &get("/metrics")).await;
        assert_eq!(status, 200);
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        assert!(body.lines().any(|l| l == "egress_ready 0"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        health.set_programs_attached(true);
        health.set_actors_started();
        let (status, _, body) = exchange(addr, &get("/readyz")).await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        let (_, _, body) = exchange(addr, &get("/metrics")).await;
        assert!(body.lines().any(|l| l == "egress_ready 1"), "{body}");

        let (status, _, _) = exchange(addr, &get("/nope")).await;
        assert_eq!(status, 404);
        let (status, head, _) = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get"), "{head}");

        let _ = stop.send(());
        task.await.expect("server task");
    }

    #[tokio::test]
    async fn bounded_connections() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let server = Server::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(server.run(metrics, health, std::future::pending()));
        // MAX_CONNECTIONS clients that send nothing hold every slot...
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // ...so one more (accepted after them: the accept queue is in order) is closed
        // without an answer.
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = extra.write_all(get("/healthz").as_bytes()).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        assert!(read.is_err() || buf.is_empty(), "answered: {buf:?}");
        // Freed slots serve again (once the server saw the clients go).
        drop(idle);
        let mut answered = false;
        for _ in 0..100 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream.write_all(get("/healthz").as_bytes()).await;
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answered, "no slot was freed");
    }
}
