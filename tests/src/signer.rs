//! A certificate signer for the agent's `signer` source of per-actor client certificates
//! (`egress_agent::certs::signer` documents the interface): plain HTTP on a loopback port
//! (in a test's namespace or the caller's), signing each CSR with a [`TestCa`] for a lifetime
//! the test chooses, counting requests, and failing on demand.
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use egress_tests::{pki::TestCa, signer::Signer};
//! let ca = Arc::new(TestCa::with_name("actor CA"));
//! let signer = Signer::start(None, Arc::clone(&ca), Duration::from_secs(30));
//! // [pep.tls.actor_certs] source = "signer", url = signer.url(); squid: clientca = ca.cert_path()
//! signer.set_failing(true); // 503 from now on, until set_failing(false)
//! assert!(signer.issued() >= 1);
//! ```

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::Netns;
use crate::pki::TestCa;

/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// Bound on reading one request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request as the signer saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `x-ate-actor-id`.
    pub actor_id: Option<String>,
    /// `x-ate-actor-template`.
    pub template: Option<String>,
    /// `x-ate-actor-template-namespace`.
    pub template_namespace: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// The status answered.
    pub status: u16,
}

struct State {
    ca: Arc<TestCa>,
    lifetime: Mutex<Duration>,
    failing: AtomicBool,
    token: Mutex<Option<String>>,
    requests: Mutex<Vec<Request>>,
    issued: AtomicUsize,
}

/// The running signer; stops (and joins its thread) on drop.
pub struct Signer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Signer {
    /// Listens on `127.0.0.1:<free port>` inside `netns` (the caller's namespace with `None`)
    /// and signs with `ca` for `lifetime`.
    pub fn start(netns: Option<&Netns>, ca: Arc<TestCa>, lifetime: Duration) -> Signer {
        let bind = || {
            let l = TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("signer: bind 127.0.0.1:0: {e}"));
            l.set_nonblocking(true).expect("signer: set_nonblocking");
            l
        };
        let listener = match netns {
            Some(ns) => ns.run(bind),
            None => bind(),
        };
        let addr = listener.local_addr().expect("signer: local_addr");
        let state = Arc::new(State {
            ca,
            lifetime: Mutex::new(lifetime),
            failing: AtomicBool::new(false),
            token: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            issued: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("test-signer".into())
            .spawn({
                let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
                move || serve(listener, &state, &stop)
            })
            .expect("spawn signer thread");
        Signer {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL for `[pep.tls.actor_certs] url`.
    pub fn url(&self) -> String {
        format!("http://{}/v1/sign", self.addr)
    }

    /// Lifetime of the certificates issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        *lock(&self.state.lifetime) = lifetime;
    }

    /// While `true`, every request is answered `503 Service Unavailable`.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// From now on, requests without `Authorization: Bearer <token>` are answered `401`.
    pub fn require_token(&self, token: &str) {
        *lock(&self.state.token) = Some(token.to_string());
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state.requests).clone()
    }

    /// How many certificates were issued.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until at least `n` certificates were issued; panics otherwise.
    pub fn wait_for_issued(&self, n: usize, timeout: Duration) {
        crate::process::poll(
            timeout,
            Duration::from_millis(20),
            || {
                let issued = self.issued();
                if issued >= n { Ok(()) } else { Err(issued) }
            },
            |issued| {
                format!(
                    "signer: {issued} certificates issued within {timeout:?}, wanted {n}; requests: {:?}",
                    self.requests()
                )
            },
        )
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts until stopped; one request per connection, answered in turn.
fn serve(listener: TcpListener, state: &State, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = handle(stream, state);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn handle(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, mut seen, content_length) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let seen = Request {
                    actor_id: header("x-ate-actor-id"),
                    template: header("x-ate-actor-template"),
                    template_namespace: header("x-ate-actor-template-namespace"),
                    authorization: header("authorization"),
                    content_type: header("content-type"),
                    status: 0,
                };
                let length = header("content-length").and_then(|v| v.trim().parse().ok());
                break (len, seen, length);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return respond(&mut stream, 400, "text/plain", "bad request head\n"),
        }
    };
    let Some(length) = content_length.filter(|&l: &usize| l <= MAX_BODY) else {
        return respond(
            &mut stream,
            411,
            "text/plain",
            "Content-Length (<= 64 KiB) needed\n",
        );
    };
    while buf.len() < head_len + length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + length]).into_owned();

    let token = lock(&state.token).clone();
    let (status, content_type, answer) = if state.failing.load(Ordering::SeqCst) {
        (
            503,
            "text/plain",
            "signer failing on demand (test)\n".to_string(),
        )
    } else if token.is_some_and(|t| seen.authorization.as_deref() != Some(&format!("Bearer {t}"))) {
        (
            401,
            "text/plain",
            "bad or missing bearer token\n".to_string(),
        )
    } else if seen.content_type.as_deref() != Some("application/pkcs10") {
        (
            415,
            "text/plain",
            "Content-Type must be application/pkcs10\n".to_string(),
        )
    } else {
        let lifetime = *lock(&state.lifetime);
        match state.ca.sign_csr(&body, lifetime) {
            Ok(pem) => {
                state.issued.fetch_add(1, Ordering::SeqCst);
                (200, "application/pem-certificate-chain", pem)
            }
            Err(e) => (400, "text/plain", format!("{e}\n")),
        }
    };
    seen.status = status;
    lock(&state.requests).push(seen);
    respond(&mut stream, status, content_type, &answer)
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        411 => "Length Required",
        415 => "Unsupported Media Type",
        503 => "Service Unavailable",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use egress_agent::certs::{SourceConfig, Store};

    use super::*;

    /// The agent's signer source against this signer: issue, headers, token, failure on
    /// demand, renewal with the chosen lifetime. No root needed (loopback of the caller).
    #[test]
    fn the_agent_gets_certificates_from_it() {
        let ca = Arc::new(TestCa::with_name("signer test CA"));
        let signer = Signer::start(None, Arc::clone(&ca), Duration::from_secs(3600));
        signer.require_token("tok");
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").expect("write token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod token");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let store = Store::new(SourceConfig::Signer {
                url: signer.url(),
                ca_file: None,
                token_file: Some(token),
                renew_before: None,
            })
            .expect("store");
            store.register("team-a/pod-1", "coder", "team-a");
            let current = wait(&store, "team-a/pod-1", |c| c.is_ok())
                .await
                .expect("a certificate");
            assert_eq!(current.subject, "CN=team-a/pod-1");
            let seen = &signer.requests()[0];
            assert_eq!(seen.actor_id.as_deref(), Some("team-a/pod-1"));
            assert_eq!(seen.template.as_deref(), Some("coder"));
            assert_eq!(seen.template_namespace.as_deref(), Some("team-a"));
            assert_eq!(seen.authorization.as_deref(), Some("Bearer tok"));
            assert_eq!(seen.status, 200);

            // Failing on demand: a new actor gets none, with the reason.
            signer.set_failing(true);
            store.register("a2", "coder", "team-a");
            let err = wait(&store, "a2", |c| {
                c.as_ref().is_err_and(|e| e.to_string().contains("503"))
            })
            .await
            .unwrap_err()
            .to_string();
            assert!(err.contains("signer failing on demand"), "{err}");
            signer.set_failing(false);
            wait(&store, "a2", |c| c.is_ok()).await.expect("recovered");

            // A short lifetime is renewed.
            signer.set_lifetime(Duration::from_secs(2));
            store.register("a3", "coder", "team-a");
            let first = wait(&store, "a3", |c| c.is_ok()).await.expect("a3");
            wait(&store, "a3", |c| {
                c.as_ref().is_ok_and(|c| c.generation > first.generation)
            })
            .await
            .expect("renewed");
        });
        assert!(signer.issued() >= 4, "{:?}", signer.requests());
    }

    #[test]
    fn wrong_token_and_type_are_refused() {
        let ca = Arc::new(TestCa::new());
        let signer = Signer::start(None, ca, Duration::from_secs(60));
        signer.require_token("right");
        let post = |headers: &str| {
            let mut s = TcpStream::connect(signer.addr()).expect("connect");
            write!(
                s,
                "POST /v1/sign HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 3\r\n\r\nabc"
            )
            .expect("write");
            let mut answer = String::new();
            s.read_to_string(&mut answer).expect("read");
            answer
        };
        assert!(post("Authorization: Bearer wrong\r\n").starts_with("HTTP/1.1 401"));
        assert!(post("Authorization: Bearer right\r\n").starts_with("HTTP/1.1 415"));
        let bad_csr = post("Authorization: Bearer right\r\nContent-Type: application/pkcs10\r\n");
        assert!(bad_csr.starts_with("HTTP/1.1 400"), "{bad_csr}");
        assert_eq!(signer.issued(), 0);
        assert_eq!(signer.requests().len(), 3);
    }

    /// Polls `store.current(actor)` up to 20 s until `done` holds; returns that result.
    async fn wait(
        store: &Store,
        actor: &str,
        done: impl Fn(&Result<egress_agent::certs::Current, egress_agent::certs::Error>) -> bool,
    ) -> Result<egress_agent::certs::Current, egress_agent::certs::Error> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let current = store.current(actor);
            if done(&current) {
                return current;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {actor}'s certificate: {current:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
