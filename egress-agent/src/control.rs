//! The control socket: how runtimes and operators add, remove, list and re-apply actors on a
//! running agent (`egress-agent actor ...`).
//!
//! Protocol: a unix stream socket, root only (the directory is 0700, the socket 0600, and the
//! peer's uid is checked). The client writes one JSON request on one line; the agent answers
//! one JSON response on one line and closes. Requests:
//!
//! ```text
//! {"add":{"id":"a1","template":"t","template_namespace":"ns","cgroup":"/sys/fs/cgroup/x"}}
//! {"add":{"id":"a2","netns":"/var/run/netns/sbx","veth":{"worker_netns":"/var/run/netns/pod","inbound":["tcp/8080"]}}}
//! {"remove":{"id":"a1"}}
//! {"reapply":{"id":"a2"}}
//! "list"
//! "status"
//! ```
//!
//! Response: `{"ok":true,"actors":[STATUS...]}` (the actor concerned, or all for `list`) or
//! `{"ok":false,"error":"what went wrong and what to do"}`. `status` answers
//! `{"ok":true,"actors":[],"status":REPORT}`, REPORT being [`crate::status::Report`]:
//! `version` (`agent`, `git`, `kernel`), `uptime_seconds`, `bpffs_dir`, `pep`, `policy`,
//! `ready` (`ready`, `not_ready`), `actors`, `listeners` (`front`, `netns_cookie`,
//! `addresses`, `actors`), `attachments` (`cgroup_id`, `actor`, `cgroup_exists`, `programs`,
//! `missing`) and `maps` (`name`, `entries`, `capacity`).
use std::{
    io::{self, BufRead as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    actors::{Manager, Status},
    config::ActorSpec,
};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control connections served at once; more are answered "busy" at once.
pub const MAX_CLIENTS: usize = 16;
/// How long the client waits for an answer (a veth setup runs netlink and nft).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another agent is serving the socket.
    #[error(
        "control socket {0} is served by another running agent: stop it first, or give this \
         one another --control-socket (and --bpffs-dir, --state-dir)"
    )]
    InUse(PathBuf),
    /// The client could not reach the agent.
    #[error(
        "cannot reach the agent at {path}: {source} (is `egress-agent run` running, with this \
         --control-socket, and are you root?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The exchange failed half-way.
    #[error("talking to the agent at {path}: {source}")]
    Exchange {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// One request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Capture a new actor (the same spec again is a no-op).
    Add(ActorSpec),
    /// Stop capturing an actor and remove what the agent made for it.
    Remove {
        /// Actor id.
        id: String,
    },
    /// Re-apply a veth actor's side (address, route, links up).
    Reapply {
        /// Actor id.
        id: String,
    },
    /// Every actor.
    List,
    /// The agent's whole status ([`crate::status::Report`]).
    Status,
}

/// One answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The actor concerned, or every actor for `list`.
    #[serde(default)]
    pub actors: Vec<Status>,
    /// The answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<crate::status::Report>>,
}

impl Response {
    fn failed(error: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(error.to_string()),
            ..Response::default()
        }
    }
}

/// The agent's side: a bound socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path` (its directory made 0700, the socket 0600), replacing a stale socket file
    /// but never one another agent still serves.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let listener = UnixListener::from_std(listener).map_err(err)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves requests until `shutdown` changes, one at a time against the manager; the
    /// socket file goes when the server is dropped.
    pub async fn run(self, manager: Arc<Mutex<Manager>>, mut shutdown: watch::Receiver<bool>) {
        let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.changed() => break,
            };
            match accepted {
                Ok((mut stream, _)) => match clients.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let manager = manager.clone();
                        tokio::spawn(async move {
                            serve(stream, manager).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(async move {
                            let busy = Response::failed(format!(
                                "the agent is serving {MAX_CLIENTS} control requests already: retry"
                            ));
                            let _ = answer(&mut stream, &busy).await;
                        });
                    }
                },
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Also when the agent fails to start after binding: no stale socket file is left.
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(mut stream: UnixStream, manager: Arc<Mutex<Manager>>) {
    let response = match handle(&mut stream, manager).await {
        Ok(response) => response,
        Err(e) => Response::failed(e),
    };
    let _ = answer(&mut stream, &response).await;
}

/// Writes one answer line and closes; bounded, so a client that never reads does not hold its
/// slot.
async fn answer(stream: &mut UnixStream, response: &Response) -> Result<(), ()> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"encoding the answer: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(&line).await;
        let _ = stream.shutdown().await;
    })
    .await
    .map_err(|_| ())
}

async fn handle(stream: &mut UnixStream, manager: Arc<Mutex<Manager>>) -> Result<Response, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    if cred.uid() != 0 {
        warn!(uid = cred.uid(), pid = ?cred.pid(), "control request from a non-root peer refused");
        return Err("only root may control the agent".into());
    }
    let mut reader = BufReader::new(&mut *stream);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut limited = tokio::io::AsyncReadExt::take(&mut reader, MAX_REQUEST as u64 + 1);
        limited.read_until(b'\n', &mut line).await
    })
    .await;
    match read {
        Err(_) => return Err(format!("no request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        Ok(Ok(_)) => {}
    }
    let request: Request =
        serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))?;
    info!(request = ?request, pid = ?cred.pid(), "control request");
    // Netlink and nft block: off the async threads, one request at a time.
    tokio::task::spawn_blocking(move || {
        let mut manager = manager.lock().unwrap_or_else(|e| e.into_inner());
        let result = match &request {
            Request::Add(spec) => manager.add(spec).map(|s| vec![s]),
            Request::Remove { id } => manager.remove(id).map(|s| vec![s]),
            Request::Reapply { id } => manager.reapply(id).map(|s| vec![s]),
            Request::List => Ok(manager.list()),
            Request::Status => {
                return Response {
                    ok: true,
                    status: Some(Box::new(manager.report())),
                    ..Response::default()
                };
            }
        };
        match result {
            Ok(actors) => Response {
                ok: true,
                actors,
                ..Response::default()
            },
            Err(e) => {
                warn!(request = ?request, error = %e, "control request failed");
                Response::failed(e)
            }
        }
    })
    .await
    .map_err(|e| format!("the request's task failed: {e}"))
}

/// The client's side: sends `request` to the agent at `path` and returns its answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, Error> {
    let exchange = |source| Error::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(exchange)?;
    let mut line = serde_json::to_vec(request).map_err(|e| exchange(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(exchange)?;
    let mut answer = Vec::new();
    io::BufReader::new(stream)
        .read_until(b'\n', &mut answer)
        .map_err(exchange)?;
    serde_json::from_slice(&answer).map_err(|e| {
        exchange(io::Error::other(format!(
            "malformed answer {:?}: {e}",
            String::from_utf8_lossy(&answer)
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let add: Request = serde_json::from_str(
            r#"{"add":{"id":"a2","netns":"/var/run/netns/sbx","veth":{"worker_netns":"/var/run/netns/pod","inbound":["tcp/8080","udp/4433"]}}}"#,
        )
        .unwrap();
        let Request::Add(spec) = add else {
            panic!("not an add")
        };
        let veth = spec.veth.unwrap();
        assert_eq!(veth.inbound.len(), 2);
        assert_eq!(veth.inbound[1].to_string(), "udp/4433");
        assert!(matches!(
            serde_json::from_str::<Request>(r#""list""#).unwrap(),
            Request::List
        ));
        assert!(matches!(
            serde_json::from_str::<Request>(r#""status""#).unwrap(),
            Request::Status
        ));
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"remove":{"id":"a1"}}"#).unwrap(),
            Request::Remove { id } if id == "a1"
        ));
        for bad in [
            r#"{"add":{"id":"a","cgroupp":"/x"}}"#,
            r#"{"drop":{"id":"a"}}"#,
            r#"{"add":{"id":"a","veth":{"inbound":["sctp/1"]}}}"#,
            "",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_agent_says_what_to_do() {
        let err = request(Path::new("/nonexistent/egress.sock"), &Request::List).unwrap_err();
        assert!(
            err.to_string().contains("is `egress-agent run` running"),
            "{err}"
        );
    }
}
