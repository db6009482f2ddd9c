//! The access log (`--access-log off|stdout|stderr|PATH`): one JSON line per connection,
//! with the fields of the agent's "connection closed" log line and an RFC 3339 timestamp.
//!
//! Lines go through a bounded queue to a writer thread: the async threads never wait for
//! the disk. When the queue is full the line is dropped and counted
//! (`egress_errors_total{kind="access_log_dropped"}`). A file is opened for appending, mode
//! 0600, and reopened on SIGHUP (after a rotation by rename).
use std::{
    fmt,
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::metrics::{ErrorKind, Metrics};

/// Lines waiting for the writer at most; more are dropped.
pub const QUEUE: usize = 4096;

/// Where the access log goes (`--access-log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// No access log.
    #[default]
    Off,
    /// The agent's standard output.
    Stdout,
    /// The agent's standard error.
    Stderr,
    /// A file, appended to (created 0600).
    File(PathBuf),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => Target::Off,
            "stdout" | "-" => Target::Stdout,
            "stderr" => Target::Stderr,
            "" => return Err("empty: give off, stdout, stderr or a file path".into()),
            path => Target::File(PathBuf::from(path)),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Off => f.write_str("off"),
            Target::Stdout => f.write_str("stdout"),
            Target::Stderr => f.write_str("stderr"),
            Target::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Errors opening the access log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened.
    #[error(
        "access log {path}: {source}; give a writable --access-log path, stdout, stderr or off"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("starting the access log writer thread: {0}")]
    Thread(io::Error),
}

/// One connection's line. Field names match the "connection closed" log line.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the connection ended (RFC 3339, UTC).
    pub time: &'a str,
    /// Connection number.
    pub id: u64,
    /// Actor id ("" when the connection was attributed to none).
    pub actor: &'a str,
    /// The actor's template.
    pub template: &'a str,
    /// The template's namespace.
    pub namespace: &'a str,
    /// The connecting process (0 when unknown).
    pub pid: u32,
    /// The actor socket's address.
    pub client: String,
    /// Where the actor connected to.
    pub original_dst: String,
    /// The destination name:port (or address) the connection was classified as.
    pub authority: &'a str,
    /// How the name was learned: sni, host, dns or none.
    pub classification: &'a str,
    /// pep, direct, deny, or "" (ended before the decision).
    pub route: &'a str,
    /// The PEP serving the actor (`default` or a `[peps.NAME]` name; "" when it has none).
    pub pep: &'a str,
    /// How a refusal was answered: http_403, tls_alert, close ("" when not refused).
    pub refusal: &'a str,
    /// The PEP's status (0: no answer, or no PEP).
    pub pep_status: u16,
    /// How the connection ended.
    pub outcome: &'a str,
    /// The policy rule that decided ("" when the PEP decided alone).
    pub rule: &'a str,
    /// The address a direct dial connected to.
    pub dialled: &'a str,
    /// The relay engines ("" when nothing was relayed).
    pub relay: &'a str,
    /// Bytes from the actor upstream.
    pub bytes_up: u64,
    /// Bytes from upstream to the actor.
    pub bytes_down: u64,
    /// From accept to the end.
    pub duration_ms: u64,
    /// From accept to the start of the relay (0: it never started).
    pub setup_us: u64,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// The current time in RFC 3339 (UTC, microseconds).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A handle on the access log writer; clones share it.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    reopen: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

/// An open output of the writer thread.
enum Sink {
    Stdout(io::Stdout),
    Stderr(io::Stderr),
    File(BufWriter<File>, PathBuf),
}

impl Sink {
    fn open(target: &Target) -> Result<Option<Sink>, Error> {
        Ok(Some(match target {
            Target::Off => return Ok(None),
            Target::Stdout => Sink::Stdout(io::stdout()),
            Target::Stderr => Sink::Stderr(io::stderr()),
            Target::File(path) => Sink::File(BufWriter::new(open_file(path)?), path.clone()),
        }))
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")
            }
            Sink::Stderr(out) => {
                let mut out = out.lock();
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")
            }
            Sink::File(file, _) => {
                file.write_all(line.as_bytes())?;
                file.write_all(b"\n")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.flush(),
            Sink::Stderr(out) => out.flush(),
            Sink::File(file, _) => file.flush(),
        }
    }
}

fn open_file(path: &Path) -> Result<File, Error> {
    let err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    // An existing file keeps its mode on open: the lines name actors and destinations.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(err)?;
    Ok(file)
}

impl AccessLog {
    /// Opens `target` and starts the writer thread; `None` for [`Target::Off`].
    pub fn open(target: &Target, metrics: Arc<Metrics>) -> Result<Option<Self>, Error> {
        let Some(sink) = Sink::open(target)? else {
            return Ok(None);
        };
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let (flag, counted) = (reopen.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, sink, flag, counted))
            .map_err(Error::Thread)?;
        info!(access_log = %target, "access log open");
        Ok(Some(AccessLog {
            tx,
            reopen,
            metrics,
        }))
    }

    /// Queues one line; drops it (counted) when the writer is behind.
    pub fn write(&self, entry: &Entry<'_>) {
        let line = match serde_json::to_string(entry) {
            Ok(line) => line,
            Err(_) => {
                self.metrics.error(ErrorKind::AccessLogWrite);
                return;
            }
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.error(ErrorKind::AccessLogDropped),
            Err(TrySendError::Disconnected(_)) => self.metrics.error(ErrorKind::AccessLogWrite),
        }
    }

    /// Makes the writer reopen its file before the next line (log rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Reopens the file on every SIGHUP, for as long as the runtime runs.
    pub fn reopen_on_sighup(&self) {
        let log = self.clone();
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            warn!("no SIGHUP handler: the access log is not reopened on SIGHUP");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                log.reopen();
            }
        });
    }
}

/// The writer thread: writes lines as they come, flushes whenever the queue is empty, ends
/// when every handle is gone.
fn writer(rx: Receiver<String>, mut sink: Sink, reopen: Arc<AtomicBool>, metrics: Arc<Metrics>) {
    let mut failing = false;
    let mut next = rx.recv().ok();
    while let Some(line) = next {
        if reopen.swap(false, Ordering::Relaxed)
            && let Sink::File(file, path) = &mut sink
        {
            let _ = file.flush();
            match open_file(path) {
                Ok(new) => {
                    *file = BufWriter::new(new);
                    info!(access_log = %path.display(), "access log reopened");
                }
                Err(e) => {
                    error!(error = %e, "reopening the access log failed: still writing the old file")
                }
            }
        }
        let mut written = sink.write_line(&line);
        next = match rx.try_recv() {
            Ok(line) => Some(line),
            Err(TryRecvError::Empty) => {
                written = written.and_then(|()| sink.flush());
                rx.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
        match written {
            Ok(()) => failing = false,
            Err(e) => {
                metrics.error(ErrorKind::AccessLogWrite);
                if !failing {
                    error!(error = %e, "writing the access log failed; lines are lost until it works again");
                }
                failing = true;
            }
        }
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn entry(time: &str, id: u64) -> Entry<'_> {
        Entry {
            time,
            id,
            actor: "a1",
            template: "t",
            namespace: "ns",
            pid: 42,
            client: "127.0.0.1:5555".into(),
            original_dst: "10.0.0.1:443".into(),
            authority: "example.com:443",
            classification: "sni",
            route: "pep",
            pep: "default",
            refusal: "",
            pep_status: 200,
            outcome: "tunneled",
            rule: "",
            dialled: "",
            relay: "copy",
            bytes_up: 10,
            bytes_down: 20,
            duration_ms: 5,
            setup_us: 1200,
            error: None,
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!("off".parse::<Target>(), Ok(Target::Off));
        assert_eq!("stdout".parse::<Target>(), Ok(Target::Stdout));
        assert_eq!("stderr".parse::<Target>(), Ok(Target::Stderr));
        assert_eq!(
            "/var/log/x.json".parse::<Target>(),
            Ok(Target::File("/var/log/x.json".into()))
        );
        assert!("".parse::<Target>().is_err());
    }

    #[test]
    fn lines_have_the_fields_and_the_file_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.json");
        let metrics = Arc::new(Metrics::new());
        let log = AccessLog::open(&Target::File(path.clone()), metrics)
            .expect("open")
            .expect("on");
        let time = now_rfc3339();
        log.write(&entry(&time, 1));
        log.write(&Entry {
            error: Some("denied by policy"),
            outcome: "denied",
            ..entry(&time, 2)
        });
        drop(log);
        // The writer flushes when its queue is empty and ends when the handles are gone.
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).expect("read");
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        for (key, value) in [
            ("id", serde_json::json!(1)),
            ("actor", "a1".into()),
            ("template", "t".into()),
            ("namespace", "ns".into()),
            ("pid", 42.into()),
            ("client", "127.0.0.1:5555".into()),
            ("original_dst", "10.0.0.1:443".into()),
            ("authority", "example.com:443".into()),
            ("classification", "sni".into()),
            ("route", "pep".into()),
            ("pep_status", 200.into()),
            ("outcome", "tunneled".into()),
            ("bytes_up", 10.into()),
            ("bytes_down", 20.into()),
            ("duration_ms", 5.into()),
            ("setup_us", 1200.into()),
        ] {
            assert_eq!(first[key], value, "{key} in {first}");
        }
        assert!(first.get("error").is_none(), "{first}");
        let stamp = first["time"].as_str().expect("time");
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 time");
        assert_eq!(lines[1]["error"], "denied by policy");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = sync_channel(1);
        let log = AccessLog {
            tx,
            reopen: Arc::new(AtomicBool::new(false)),
            metrics: metrics.clone(),
        };
        let time = now_rfc3339();
        log.write(&entry(&time, 1));
        log.write(&entry(&time, 2));
        log.write(&entry(&time, 3));
        let mut text = String::new();
        metrics.encode(&mut text).expect("encode");
        assert!(
            text.lines()
                .any(|l| l == r#"egress_errors_total{kind="access_log_dropped"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn reopens_after_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.json");
        let rotated = dir.path().join("access.json.1");
        let log = AccessLog::open(&Target::File(path.clone()), Arc::new(Metrics::new()))
            .expect("open")
            .expect("on");
        let time = now_rfc3339();
        log.write(&entry(&time, 1));
        let wait_lines = |p: &Path, n: usize| {
            for _ in 0..200 {
                if std::fs::read_to_string(p).is_ok_and(|t| t.lines().count() == n) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("{} never had {n} lines", p.display());
        };
        wait_lines(&path, 1);
        std::fs::rename(&path, &rotated).expect("rotate");
        log.reopen();
        log.write(&entry(&time, 2));
        wait_lines(&path, 1);
        wait_lines(&rotated, 1);
    }

    #[test]
    fn an_existing_file_is_made_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        std::fs::write(&path, "old\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        drop(open_file(&path).expect("open"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old\n");
    }
}
