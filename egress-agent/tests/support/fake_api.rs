//! A fake Kubernetes API server on loopback for the discovery tests: it answers the pod list
//! (`GET /api/v1/pods`) from queued `PodList`s and the pod watch (`watch=true`) with a
//! streamed, newline-delimited sequence of queued `WatchEvent`s, and records every request.
//! Plain HTTP/1.1 (the client is pointed at `http://127.0.0.1:PORT`), one thread per
//! connection, each response closes its connection.
//!
//! Shared by the agent's watch tests (`egress-agent/tests/discovery.rs`) and the privileged
//! end-to-end test (`tests/src/kube.rs` includes this file).
use std::{
    collections::VecDeque,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Longest request head read.
const MAX_HEAD: usize = 64 * 1024;

/// One step of a watch response.
#[derive(Clone, Debug)]
pub enum Step {
    /// A `WatchEvent` line.
    Event(Value),
    /// End the watch response (the client watches again, or relists after an error).
    Close,
}

#[derive(Default)]
struct State {
    lists: VecDeque<Value>,
    last_list: Option<Value>,
    watch: VecDeque<Step>,
    requests: Vec<String>,
    stopped: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeApi {
    /// Serves on 127.0.0.1 (an ephemeral port) in the calling thread's network namespace.
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        FakeApi::serve(listener)
    }

    /// Serves on `listener` (bound by the caller, e.g. inside a test's network namespace).
    pub fn serve(listener: TcpListener) -> FakeApi {
        let addr = listener.local_addr().expect("fake API server address");
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.lock().stopped {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let shared = accepting.clone();
                thread::spawn(move || handle(stream, &shared));
            }
        });
        FakeApi { addr, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues the next list answer: a `PodList` of `pods` at `resource_version`. The last one
    /// is repeated when none is queued.
    pub fn push_list(&self, pods: &[Value], resource_version: &str) {
        let items: Vec<Value> = pods
            .iter()
            .map(|p| {
                // The API server leaves kind and apiVersion out of list items.
                let mut p = p.clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                p
            })
            .collect();
        let list = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": resource_version},
            "items": items,
        });
        self.shared.lock().lists.push_back(list);
        self.shared.changed.notify_all();
    }

    /// Queues a watch event: `ADDED`, `MODIFIED` or `DELETED` with a pod.
    pub fn push_event(&self, kind: &str, pod: &Value) {
        self.push_step(Step::Event(json!({"type": kind, "object": pod})));
    }

    /// Queues a `BOOKMARK` at `resource_version`.
    pub fn push_bookmark(&self, resource_version: &str) {
        self.push_step(Step::Event(json!({
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"resourceVersion": resource_version}},
        })));
    }

    /// Queues an `ERROR` 410 Gone (the resource version expired) and the end of the watch
    /// response: the client relists.
    pub fn push_gone(&self) {
        self.push_step(Step::Event(json!({
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure",
                       "message": "too old resource version: 100 (200)",
                       "reason": "Expired", "code": 410},
        })));
        self.push_step(Step::Close);
    }

    /// Queues a step of the watch responses.
    pub fn push_step(&self, step: Step) {
        self.shared.lock().watch.push_back(step);
        self.shared.changed.notify_all();
    }

    /// Every request target (`/api/v1/pods?...`) so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Waits until `n` requests have come whose target contains `part`; their targets.
    pub fn wait_requests(&self, part: &str, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let seen: Vec<String> = state
                .requests
                .iter()
                .filter(|r| r.contains(part))
                .cloned()
                .collect();
            if seen.len() >= n {
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "fake API: {n} requests containing {part:?} not seen within {timeout:?}: {:?}",
                    state.requests
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Writes a kubeconfig pointing at this server (no credentials) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Percent-decodes a query component (`+` is a space).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded query parameter `name` of a request target.
pub fn query_param(target: &str, name: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn handle(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            return;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = request.parse(&head) else {
        return;
    };
    let target = request.path.unwrap_or_default().to_string();
    {
        shared.lock().requests.push(target.clone());
        shared.changed.notify_all();
    }
    let path = target.split('?').next().unwrap_or_default();
    if request.method != Some("GET") || path != "/api/v1/pods" {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("fake API: no route for {target}"),
            "reason": "NotFound", "code": 404});
        let _ = respond(&mut stream, "404 Not Found", &body.to_string());
        return;
    }
    if query_param(&target, "watch").as_deref() == Some("true") {
        watch(stream, shared);
        return;
    }
    let list = {
        let mut state = shared.lock();
        match state.lists.pop_front() {
            Some(list) => {
                state.last_list = Some(list.clone());
                Some(list)
            }
            None => state.last_list.clone(),
        }
    };
    let list = list.unwrap_or_else(|| {
        json!({"kind": "PodList", "apiVersion": "v1",
               "metadata": {"resourceVersion": "1"}, "items": []})
    });
    let _ = respond(&mut stream, "200 OK", &list.to_string());
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Whether the client closed its end (a killed agent's watch must not take the events
/// queued for the next agent's).
fn gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let closed = match stream.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    closed || stream.set_nonblocking(false).is_err()
}

/// Streams queued watch steps as chunks until a `Close` step, the server stops or the
/// client goes.
fn watch(mut stream: TcpStream, shared: &Shared) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let _ = stream.flush();
    loop {
        let step = {
            let mut state = shared.lock();
            loop {
                if state.stopped || gone(&stream) {
                    return;
                }
                if let Some(step) = state.watch.pop_front() {
                    break step;
                }
                state = shared
                    .changed
                    .wait_timeout(state, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        match step {
            Step::Event(event) => {
                let line = format!("{event}\n");
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if stream.write_all(chunk.as_bytes()).is_err() || stream.flush().is_err() {
                    return;
                }
            }
            Step::Close => {
                let _ = stream.write_all(b"0\r\n\r\n");
                let _ = stream.flush();
                return;
            }
        }
    }
}
