//! A real nghttpx (Debian `nghttp2-proxy`) as an HTTP/2 CONNECT PEP: HTTP/2 proxy mode with
//! a TLS frontend that requires client certificates, in front of a squid backend. It
//! multiplexes CONNECT streams over one TLS connection and passes the x-ate-* headers on to
//! squid; squid never sees the client certificate, so the identity it carried is read from
//! nghttpx's own access log ([`AccessEntry::client_subject`]).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// How to configure the nghttpx under test.
#[derive(Debug, Clone)]
pub struct NghttpxConfig {
    /// Address of the TLS frontend inside its namespace.
    pub listen: SocketAddr,
    /// The backend every CONNECT goes to (a squid's plain `http_port`).
    pub backend: SocketAddr,
    /// The frontend's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// With `verify-client`: the CA whose client certificates are required.
    pub client_ca: Option<PathBuf>,
    /// The frontend's SETTINGS_MAX_CONCURRENT_STREAMS (nghttpx's default: 100).
    pub max_streams: Option<u32>,
    /// Raw `key=value` lines appended to the configuration.
    pub extra: Vec<String>,
}

impl NghttpxConfig {
    /// A TLS frontend on `listen` with `cert`/`key`, proxying to `backend`.
    pub fn new(listen: SocketAddr, backend: SocketAddr, cert: &Path, key: &Path) -> Self {
        NghttpxConfig {
            listen,
            backend,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            max_streams: None,
            extra: Vec::new(),
        }
    }

    /// Requires a client certificate signed by `ca` (`verify-client`).
    pub fn client_ca(mut self, ca: &Path) -> Self {
        self.client_ca = Some(ca.to_path_buf());
        self
    }

    /// Sets the frontend's stream limit (`frontend-http2-max-concurrent-streams`).
    pub fn max_streams(mut self, n: u32) -> Self {
        self.max_streams = Some(n);
        self
    }

    /// Appends a raw configuration line (`key=value`).
    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }
}

/// The access-log format: tab-separated, one request (for CONNECT: one tunnel) a line.
const LOGFORMAT: &str = "$remote_addr\t$remote_port\t$alpn\t$tls_protocol\t\
    $tls_client_subject_name\t$tls_client_serial\t$method\t$path\t$status\t\
    $http_x_ate_actor_id";
/// Fields in [`LOGFORMAT`].
const FIELDS: usize = 10;

/// One access-log line, parsed; `None` where nghttpx logged `-` or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// The client's address.
    pub remote_addr: String,
    /// The client's port: one HTTP/2 connection, one port.
    pub remote_port: u16,
    /// The negotiated protocol (`h2`).
    pub alpn: Option<String>,
    /// The TLS version (e.g. `TLSv1.3`).
    pub tls_protocol: Option<String>,
    /// Subject of the client certificate (e.g. `CN=actor-a1`).
    pub client_subject: Option<String>,
    /// Serial of the client certificate.
    pub client_serial: Option<String>,
    /// The method (`CONNECT`).
    pub method: String,
    /// For CONNECT: the authority asked for.
    pub authority: String,
    /// The status nghttpx answered.
    pub status: Option<u16>,
    /// The `x-ate-actor-id` header.
    pub actor_id: Option<String>,
}

impl AccessEntry {
    /// Parses a line in [`LOGFORMAT`]; `None` for anything else.
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let f: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        if f.len() != FIELDS {
            return None;
        }
        let opt = |s: &str| (!s.is_empty() && s != "-").then(|| s.to_string());
        Some(AccessEntry {
            remote_addr: f[0].to_string(),
            remote_port: f[1].parse().ok()?,
            alpn: opt(f[2]),
            tls_protocol: opt(f[3]),
            client_subject: opt(f[4]),
            client_serial: opt(f[5]),
            method: f[6].to_string(),
            authority: f[7].to_string(),
            status: f[8].parse().ok(),
            actor_id: opt(f[9]),
        })
    }
}

/// A running nghttpx (single process) inside a test's namespace; SIGTERMed and awaited on
/// drop.
pub struct Nghttpx {
    dir: tempfile::TempDir,
    child: Child,
    listen: SocketAddr,
}

impl Nghttpx {
    /// Writes the configuration, starts nghttpx inside `netns` with it, and waits until the
    /// frontend accepts connections.
    pub fn start(netns: &Netns, config: NghttpxConfig) -> Nghttpx {
        crate::require_commands(&["nghttpx"]);
        let listen = config.listen;
        netns
            .run(move || std::net::TcpListener::bind(listen).map(drop))
            .unwrap_or_else(|e| panic!("nghttpx: {listen} is busy in netns {}: {e}", netns.name()));
        let dir = crate::pki::private_readable_dir("egress-test-nghttpx-");
        let conf = render_config(dir.path(), &config);
        let conf_path = dir.path().join("nghttpx.conf");
        std::fs::write(&conf_path, &conf).expect("write nghttpx.conf");
        let out =
            std::fs::File::create(dir.path().join("nghttpx.out")).expect("create nghttpx.out");
        let mut cmd = crate::process::command_in("nghttpx", Some(netns), None);
        // --conf: otherwise it reads /etc/nghttpx/nghttpx.conf.
        cmd.arg(format!("--conf={}", conf_path.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup nghttpx.out"))
            .stderr(out)
            // Its own process group: a Ctrl-C to the test run must not race our SIGTERM.
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn nghttpx: {e}"));
        let mut nghttpx = Nghttpx { dir, child, listen };
        nghttpx.wait_ready(netns, Duration::from_secs(15));
        nghttpx
    }

    fn wait_ready(&mut self, netns: &Netns, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let listen = self.listen;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nghttpx exited during start-up ({status}):\n{}",
                    self.diagnostics()
                );
            }
            // "Listening on ADDR, tls" comes before the worker is up: also connect (a bare TCP
            // connect; nghttpx logs nothing to the access log for it).
            if self.error_log().contains("Listening on")
                && netns.run(move || {
                    std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200))
                        .is_ok()
                })
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nghttpx did not start listening on {listen} within {timeout:?}:\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The frontend's address (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// nghttpx's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// nghttpx's private directory (configuration, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every access-log entry written so far (nghttpx logs a CONNECT when its tunnel ends).
    pub fn access_log_entries(&self) -> Vec<AccessEntry> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        // A line still being written has no newline yet: leave it for the next read.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                AccessEntry::parse(l)
                    .unwrap_or_else(|| panic!("nghttpx access log line not in our format: {l:?}"))
            })
            .collect()
    }

    /// Waits until the access log has at least `n` entries; panics with diagnostics on
    /// timeout.
    pub fn wait_for_entries(&self, n: usize, timeout: Duration) -> Vec<AccessEntry> {
        crate::process::poll(
            timeout,
            Duration::from_millis(50),
            || {
                let entries = self.access_log_entries();
                if entries.len() >= n {
                    Ok(entries)
                } else {
                    Err(entries)
                }
            },
            |entries| {
                format!(
                    "nghttpx: expected {n} access-log entries within {timeout:?}, have {}: \
                     {entries:#?}\n{}",
                    entries.len(),
                    self.diagnostics()
                )
            },
        )
    }

    /// The error log (nghttpx's own diagnostics).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let out = std::fs::read_to_string(self.dir.path().join("nghttpx.out")).unwrap_or_default();
        format!(
            "--- nghttpx output ---\n{out}\n--- error.log ---\n{}",
            self.error_log()
        )
    }
}

impl Drop for Nghttpx {
    fn drop(&mut self) {
        crate::process::stop(&mut self.child, Duration::from_secs(3));
    }
}

fn render_config(dir: &Path, config: &NghttpxConfig) -> String {
    let d = dir.display();
    let mut c = String::new();
    let mut line = |s: &str| {
        c.push_str(s);
        c.push('\n');
    };
    let (l, b) = (config.listen, config.backend);
    line(&format!("frontend={},{}", host(l), l.port()));
    line(&format!("backend={},{}", host(b), b.port()));
    line("http2-proxy=yes");
    line(&format!("private-key-file={}", config.key.display()));
    line(&format!("certificate-file={}", config.cert.display()));
    if let Some(ca) = &config.client_ca {
        line("verify-client=yes");
        line(&format!("verify-client-cacert={}", ca.display()));
    }
    if let Some(n) = config.max_streams {
        line(&format!("frontend-http2-max-concurrent-streams={n}"));
    }
    // Only 8 concurrent CONNECTs per authority get through otherwise (0 is rejected).
    line("backend-connections-per-host=256");
    line("single-process=yes");
    line("workers=1");
    line("no-ocsp=yes");
    line(&format!("pid-file={d}/nghttpx.pid"));
    line(&format!("errorlog-file={d}/error.log"));
    line(&format!("accesslog-file={d}/access.log"));
    line(&format!("accesslog-format={LOGFORMAT}"));
    for l in &config.extra {
        line(l);
    }
    c
}

/// nghttpx's `HOST,PORT` host: IPv6 addresses in brackets are not accepted there.
fn host(addr: SocketAddr) -> String {
    addr.ip().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_connect_line() {
        let e = AccessEntry::parse(
            "127.0.0.1\t41234\th2\tTLSv1.3\tCN=actor-a1\t0A:1B\tCONNECT\techo.egress.test:2222\t200\ta1\n",
        )
        .unwrap();
        assert_eq!(e.remote_port, 41234);
        assert_eq!(e.alpn.as_deref(), Some("h2"));
        assert_eq!(e.client_subject.as_deref(), Some("CN=actor-a1"));
        assert_eq!(e.method, "CONNECT");
        assert_eq!(e.authority, "echo.egress.test:2222");
        assert_eq!(e.status, Some(200));
        assert_eq!(e.actor_id.as_deref(), Some("a1"));
    }

    #[test]
    fn dash_and_empty_mean_missing() {
        let e = AccessEntry::parse("127.0.0.1\t1\th2\tTLSv1.3\t-\t\tCONNECT\tx:1\t403\t-").unwrap();
        assert_eq!(e.client_subject, None);
        assert_eq!(e.client_serial, None);
        assert_eq!(e.actor_id, None);
        assert_eq!(e.status, Some(403));
    }

    #[test]
    fn rejects_other_formats() {
        assert_eq!(
            AccessEntry::parse("127.0.0.1 - - [x] \"CONNECT x:1 HTTP/2\" 200 0"),
            None
        );
    }

    #[test]
    fn config_has_the_proxy_mode_and_client_verification() {
        let conf = render_config(
            Path::new("/d"),
            &NghttpxConfig::new(
                "127.0.0.1:3129".parse().unwrap(),
                "127.0.0.1:3128".parse().unwrap(),
                Path::new("/c.pem"),
                Path::new("/k.pem"),
            )
            .client_ca(Path::new("/ca.pem"))
            .max_streams(50),
        );
        for want in [
            "frontend=127.0.0.1,3129\n",
            "backend=127.0.0.1,3128\n",
            "http2-proxy=yes\n",
            "verify-client=yes\n",
            "verify-client-cacert=/ca.pem\n",
            "frontend-http2-max-concurrent-streams=50\n",
            "accesslog-file=/d/access.log\n",
        ] {
            assert!(conf.contains(want), "{want:?} missing from:\n{conf}");
        }
    }
}
