//! The benchmark's load client (`egress-load`): one HTTP/1.1 client used identically on every
//! path the bench measures (direct, the agent's capture, squid as a CONNECT proxy, squid
//! intercept, ...), so the ratios compare the paths and not the tools.
//!
//! Three modes: [`bulk`] (keep-alive streams: bytes per second), [`rate`] (one connection per
//! request: connections per second and connect-to-first-byte latency) and [`idle_open`] (many
//! held connections: the agent's memory per connection). Bodies can be checked against
//! [`pattern`], which the bench writes into the upstream's files with [`write_pattern_file`].
//!
//! The client dials IP addresses only (no DNS), optionally through an HTTP CONNECT proxy and
//! optionally with TLS (rustls with ring, trusting only the CA it is given, no session
//! resumption, so every connection pays a full handshake). Every I/O step has a timeout; an
//! operation that fails is counted and its message kept if it is the first, and the run goes on
//! (a run in which nothing succeeded stops after [`GIVE_UP_AFTER`] errors).

use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Timeout of each I/O step (connect, CONNECT exchange, handshake, each read and write) and, in
/// `rate` and `idle`, of a whole operation.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// Most headers accepted in a response head.
const MAX_HEADERS: usize = 64;

/// Read size of a bulk stream: large reads keep the client's per-byte cost low.
const BULK_BUF: usize = 256 * 1024;

/// Read size of `rate` and `idle` operations; must exceed [`MAX_HEAD`] so a head always fits.
const SMALL_BUF: usize = 32 * 1024;

/// Latency samples kept by one `rate` run (4 bytes each: 64 MiB at most); ops beyond it still
/// count but add no sample (the report says how many samples the percentiles are over).
pub const MAX_LATENCY_SAMPLES: usize = 16 << 20;

/// A run stops early once this many operations failed and none succeeded.
pub const GIVE_UP_AFTER: u64 = 64;

/// Pause of a bulk stream after a failed request, so a dead path does not spin a core.
const BULK_BACKOFF: Duration = Duration::from_millis(10);

/// Longest accepted `--host` (a DNS name's limit).
const MAX_HOST: usize = 253;

/// Longest accepted `--path`.
const MAX_PATH: usize = 2048;

/// Something wrong before any traffic: arguments, the CA file, the open-file limit. (Causes
/// are in the message, not `source()`, so an `{:#}` chain does not repeat them.)
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The host name cannot go into a request head.
    #[error(
        "host {0:?} is not a host name or IP literal (letters, digits, '.', '-', '_', ':', '[', ']'; at most {MAX_HOST} bytes)"
    )]
    BadHost(String),
    /// The path cannot go into a request line.
    #[error(
        "path {0:?} must start with '/' and hold only visible ASCII (no spaces), at most {MAX_PATH} bytes"
    )]
    BadPath(String),
    /// The CA file could not be read or parsed as PEM.
    #[error("cannot read the CA file {path}: {cause}")]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: rustls::pki_types::pem::Error,
    },
    /// The CA file holds no certificate.
    #[error("the CA file {0} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)")]
    NoCa(PathBuf),
    /// rustls refused a certificate of the CA file as a trust anchor.
    #[error("the CA file {path} holds a certificate rustls cannot use as a trust anchor: {cause}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: rustls::Error,
    },
    /// The host is not valid as a TLS server name (SNI).
    #[error("host {0:?} is not valid as a TLS server name")]
    ServerName(String),
    /// rustls could not build a client configuration.
    #[error("TLS client setup: {0}")]
    Tls(rustls::Error),
    /// The open-file limit is too low for the connections asked for and cannot be raised.
    #[error(
        "cannot raise the open-file limit (RLIMIT_NOFILE) to {needed} (now {soft}, hard limit {hard}): {cause}; run as root, raise `ulimit -n`, or ask for fewer connections"
    )]
    Nofile {
        /// File descriptors needed.
        needed: u64,
        /// The soft limit in force.
        soft: u64,
        /// The hard limit in force.
        hard: u64,
        /// Why raising failed.
        cause: nix::Error,
    },
}

/// Why one operation (a request, or opening a connection) failed; its text is `first_error`.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// An I/O step took longer than the timeout.
    #[error("timed out after {} s while {stage}", .after.as_secs_f64())]
    Timeout {
        /// The timeout.
        after: Duration,
        /// What was being done.
        stage: &'static str,
    },
    /// The TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled (the proxy's with `--proxy`).
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Any other I/O error.
    #[error("{stage}: {source}")]
    Io {
        /// What was being done.
        stage: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The peer closed the connection before a complete head.
    #[error("connection closed by the peer while {stage} (after {after} bytes)")]
    Closed {
        /// What was being done.
        stage: &'static str,
        /// Bytes of the head received.
        after: usize,
    },
    /// The proxy refused the CONNECT.
    #[error("proxy answered {0} to CONNECT, expected 200")]
    ProxyRefused(u16),
    /// The proxy sent bytes after its 200 before anything went through the tunnel.
    #[error("proxy sent {0} bytes after its 200 before the tunnel carried anything")]
    ProxyExtra(usize),
    /// A response head could not be parsed.
    #[error("{stage}: {source}")]
    Head {
        /// Which head.
        stage: &'static str,
        /// Why.
        source: HeadError,
    },
    /// The response status was not 200.
    #[error("status {0}, expected 200")]
    Status(u16),
    /// A response to be read on a kept-alive connection had no length.
    #[error("response has no Content-Length (needed on a kept-alive connection)")]
    NoLength,
    /// The body ended early.
    #[error("body ended at byte {got} of Content-Length {want}")]
    Short {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        want: u64,
    },
    /// The body went on past its Content-Length.
    #[error("body is longer than its Content-Length {0}")]
    Long(u64),
    /// With `--verify`: the body is not the pattern.
    #[error("body differs at byte {0}")]
    Differs(u64),
    /// The run's deadline passed during this operation: not an error, never counted.
    #[error("the run's deadline passed")]
    Deadline,
}

/// Stage names, shared so that retry decisions can match on them.
const SEND: &str = "sending the request";
const HEAD: &str = "reading the response head";
const BODY: &str = "reading the body";

impl OpError {
    /// A kept-alive connection the server had already closed (e.g. its keep-alive timeout):
    /// nothing of the response arrived, so the request is retried on a new connection.
    fn is_stale(&self) -> bool {
        match self {
            OpError::Closed { stage, after: 0 } => *stage == HEAD,
            OpError::Io { stage, source } => {
                *stage == SEND
                    || (*stage == HEAD && source.kind() == io::ErrorKind::ConnectionReset)
            }
            _ => false,
        }
    }
}

/// Why a response head is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x.
    #[error("malformed head: {0}")]
    Parse(httparse::Error),
    /// No end of head within [`MAX_HEAD`] bytes.
    #[error("head longer than {MAX_HEAD} bytes")]
    TooLarge,
    /// A Content-Length that is not a number.
    #[error("Content-Length {0:?} is not a number")]
    BadLength(String),
    /// Two Content-Length headers that disagree.
    #[error("conflicting Content-Length headers")]
    ConflictingLength,
    /// Chunked (or other) transfer coding, which this client does not decode.
    #[error("Transfer-Encoding is not supported (serve files with a Content-Length)")]
    TransferEncoding,
}

/// What [`parse_head`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet: read more.
    Incomplete,
    /// A complete head.
    Complete(Head),
}

/// The parts of a response head the client uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Length of the head in bytes; the body starts there.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// The Content-Length, if any.
    pub content_length: Option<u64>,
    /// The server closes the connection after this response.
    pub close: bool,
}

/// Parses an HTTP/1.x response head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Parsed, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Incomplete),
        Err(e) => return Err(HeadError::Parse(e)),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let status = response.code.unwrap_or(0);
    // HTTP/1.0 closes unless it says keep-alive; HTTP/1.1 keeps alive unless it says close.
    let mut close = response.version == Some(0);
    let mut content_length = None;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = value.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::BadLength(text.to_string()));
            }
            let n: u64 = text
                .parse()
                .map_err(|_| HeadError::BadLength(text.to_string()))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(HeadError::ConflictingLength);
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::TransferEncoding);
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    Ok(Parsed::Complete(Head {
        len,
        status,
        content_length,
        close,
    }))
}

/// One word of the pattern: a bijective mix of its index, so every 8-byte word differs from
/// every other and shifted, reordered or repeated data shows.
fn word(index: u64) -> u64 {
    // splitmix64's finalizer over an odd multiple of the index: both steps are bijections.
    let mut z = index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn byte_at(offset: u64) -> u8 {
    word(offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Bytes before the next 8-byte boundary at `offset`, at most `len`.
fn unaligned_head(offset: u64, len: usize) -> usize {
    (((8 - offset % 8) % 8) as usize).min(len)
}

/// Fills `buf` with the bytes at `offset..offset + buf.len()` of the benchmark's infinite
/// pattern: 8-byte little-endian words, word `i` a hash of `i`.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    let head = unaligned_head(offset, buf.len());
    let (first, rest) = buf.split_at_mut(head);
    for (i, b) in first.iter_mut().enumerate() {
        *b = byte_at(offset.wrapping_add(i as u64));
    }
    let mut pos = offset.wrapping_add(head as u64);
    let (words, tail) = rest.as_chunks_mut::<8>();
    for w in words {
        *w = word(pos / 8).to_le_bytes();
        pos = pos.wrapping_add(8);
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b = byte_at(pos.wrapping_add(i as u64));
    }
}

/// The offset of the first byte of `data` that differs from the pattern, `data` being the
/// pattern's bytes from `offset` on; `None` when it all matches.
pub fn pattern_mismatch(offset: u64, data: &[u8]) -> Option<u64> {
    let head = unaligned_head(offset, data.len());
    let (first, rest) = data.split_at(head);
    for (i, b) in first.iter().enumerate() {
        let at = offset.wrapping_add(i as u64);
        if *b != byte_at(at) {
            return Some(at);
        }
    }
    let mut pos = offset.wrapping_add(head as u64);
    let (words, tail) = rest.as_chunks::<8>();
    for w in words {
        let want = word(pos / 8);
        if u64::from_le_bytes(*w) != want {
            let want = want.to_le_bytes();
            let i = w.iter().zip(want).position(|(a, b)| *a != b).unwrap_or(0);
            return Some(pos.wrapping_add(i as u64));
        }
        pos = pos.wrapping_add(8);
    }
    for (i, b) in tail.iter().enumerate() {
        let at = pos.wrapping_add(i as u64);
        if *b != byte_at(at) {
            return Some(at);
        }
    }
    None
}

/// Writes the first `len` bytes of the pattern to `path` (created or truncated): the files the
/// bench's upstream serves.
pub fn write_pattern_file(path: &Path, len: u64) -> io::Result<()> {
    let mut file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(chunk.len() as u64) as usize;
        pattern(offset, &mut chunk[..n]);
        file.write_all(&chunk[..n])?;
        offset += n as u64;
    }
    file.flush()
}

/// Exact latency percentiles in microseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: u32,
    /// 90th percentile.
    pub p90: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Largest sample.
    pub max: u32,
}

/// Nearest-rank percentiles of `samples` (sorted in place); `None` without samples.
pub fn percentiles(samples: &mut [u32]) -> Option<Latency> {
    samples.sort_unstable();
    let n = samples.len() as u64;
    let at = |p: u64| -> Option<u32> {
        let rank = (p * n).div_ceil(100).max(1);
        samples.get(usize::try_from(rank - 1).ok()?).copied()
    };
    Some(Latency {
        p50: at(50)?,
        p90: at(90)?,
        p99: at(99)?,
        max: *samples.last()?,
    })
}

/// Where and how to send requests; shared by every mode.
#[derive(Clone)]
pub struct Target {
    addr: SocketAddr,
    host: String,
    proxy: Option<SocketAddr>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    io_timeout: Duration,
    get_keepalive: Arc<[u8]>,
    get_close: Arc<[u8]>,
    connect: Arc<[u8]>,
}

impl Target {
    /// `GET path` with `Host: host`, sent to `addr` (an address: there is no DNS).
    pub fn new(addr: SocketAddr, host: &str, path: &str) -> Result<Target, SetupError> {
        let host_ok = !host.is_empty()
            && host.len() <= MAX_HOST
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
        if !host_ok {
            return Err(SetupError::BadHost(host.to_string()));
        }
        let path_ok = path.starts_with('/')
            && path.len() <= MAX_PATH
            && path.bytes().all(|b| b.is_ascii_graphic());
        if !path_ok {
            return Err(SetupError::BadPath(path.to_string()));
        }
        let get = |close: &str| -> Arc<[u8]> {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: egress-load\r\n{close}\r\n")
                .into_bytes()
                .into()
        };
        // An IPv6 literal needs brackets before the port.
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", addr.port())
        } else {
            format!("{host}:{}", addr.port())
        };
        Ok(Target {
            addr,
            host: host.to_string(),
            proxy: None,
            tls: None,
            io_timeout: DEFAULT_IO_TIMEOUT,
            get_keepalive: get(""),
            get_close: get("Connection: close\r\n"),
            connect: format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
                .into_bytes()
                .into(),
        })
    }

    /// Connects to `proxy` and asks it for `CONNECT host:port` (port = the target's) first.
    pub fn via_proxy(mut self, proxy: SocketAddr) -> Target {
        self.proxy = Some(proxy);
        self
    }

    /// Speaks TLS to the target (inside the tunnel with a proxy), SNI = the host, trusting only
    /// the certificates in the PEM file `ca`.
    pub fn with_tls_ca_file(self, ca: &Path) -> Result<Target, SetupError> {
        let read_err = |cause| SetupError::ReadCa {
            path: ca.to_path_buf(),
            cause,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(read_err)? {
            roots
                .add(cert.map_err(read_err)?)
                .map_err(|cause| SetupError::BadCa {
                    path: ca.to_path_buf(),
                    cause,
                })?;
        }
        if roots.is_empty() {
            return Err(SetupError::NoCa(ca.to_path_buf()));
        }
        self.with_tls_roots(roots)
    }

    /// Speaks TLS to the target, SNI = the host, trusting only `roots`.
    pub fn with_tls_roots(mut self, roots: rustls::RootCertStore) -> Result<Target, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(SetupError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection pays a full handshake, as a fresh client (curl) does.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| SetupError::ServerName(self.host.clone()))?;
        self.tls = Some((Arc::new(config), name));
        Ok(self)
    }

    /// Sets the timeout of each I/O step (and of a whole `rate`/`idle` operation).
    pub fn io_timeout(mut self, timeout: Duration) -> Target {
        self.io_timeout = timeout;
        self
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("host", &self.host)
            .field("proxy", &self.proxy)
            .field("tls", &self.tls.is_some())
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

/// A connection to the target: plain, or TLS (in either case possibly through a tunnel). The
/// agent's own stream type for its PEP link, which is the same thing: TCP, or a rustls client
/// over TCP.
use egress_agent::tunnel::PepStream as Conn;

/// A fixed read buffer with the unconsumed bytes at `start..end`.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        Buf {
            data: vec![0; len.max(MAX_HEAD + 1)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// How long each step of an operation may take.
#[derive(Clone, Copy)]
struct Budget {
    io_timeout: Duration,
    /// The whole operation must end by then (`rate`, `idle`); a timeout error.
    op_deadline: Option<Instant>,
    /// The run ends then (`bulk`): the step stops with [`OpError::Deadline`], not an error.
    run_deadline: Option<Instant>,
}

impl Budget {
    async fn run<T>(
        &self,
        stage: &'static str,
        step: impl Future<Output = io::Result<T>>,
    ) -> Result<T, OpError> {
        self.bound(stage, step)
            .await?
            .map_err(|source| OpError::Io { stage, source })
    }

    async fn bound<T>(
        &self,
        stage: &'static str,
        step: impl Future<Output = T>,
    ) -> Result<T, OpError> {
        let now = Instant::now();
        // timeout_at polls the step before its timer: a path that always has data ready
        // would otherwise run past the run's end.
        if self.run_deadline.is_some_and(|r| now >= r) {
            return Err(OpError::Deadline);
        }
        let mut deadline = now + self.io_timeout;
        if let Some(op) = self.op_deadline {
            deadline = deadline.min(op);
        }
        let run_ends = self.run_deadline.filter(|r| *r <= deadline);
        if let Some(r) = run_ends {
            deadline = r;
        }
        match tokio::time::timeout_at(deadline, step).await {
            Ok(v) => Ok(v),
            Err(_) if run_ends.is_some() => Err(OpError::Deadline),
            Err(_) => Err(OpError::Timeout {
                after: self.io_timeout,
                stage,
            }),
        }
    }
}

/// Reads a complete response head into `buf` (which must hold no unconsumed bytes) and leaves
/// `buf.start` at the body; also returns when its first byte arrived.
async fn read_head<R: AsyncRead + Unpin>(
    conn: &mut R,
    buf: &mut Buf,
    budget: &Budget,
    stage: &'static str,
) -> Result<(Head, Instant), OpError> {
    buf.clear();
    let mut first = None;
    loop {
        if buf.end > 0 {
            let parsed = parse_head(&buf.data[..buf.end])
                .map_err(|source| OpError::Head { stage, source })?;
            if let Parsed::Complete(head) = parsed {
                buf.start = head.len;
                return Ok((head, first.unwrap_or_else(Instant::now)));
            }
        }
        // parse_head fails past MAX_HEAD and the buffer is larger, so the slice is not empty.
        let n = budget
            .run(stage, conn.read(&mut buf.data[buf.end..]))
            .await?;
        if n == 0 {
            return Err(OpError::Closed {
                stage,
                after: buf.end,
            });
        }
        first.get_or_insert_with(Instant::now);
        buf.end += n;
    }
}

/// Dials the target (or the proxy and CONNECTs through it) and does the TLS handshake.
async fn open(target: &Target, budget: &Budget, buf: &mut Buf) -> Result<Conn, OpError> {
    let dial = target.proxy.unwrap_or(target.addr);
    let mut tcp = budget
        .bound("connecting", TcpStream::connect(dial))
        .await?
        .map_err(|source| OpError::Connect { addr: dial, source })?;
    tcp.set_nodelay(true).map_err(|source| OpError::Io {
        stage: "setting TCP_NODELAY",
        source,
    })?;
    if target.proxy.is_some() {
        budget
            .run(
                "sending the CONNECT request",
                tcp.write_all(&target.connect),
            )
            .await?;
        let (head, _) =
            read_head(&mut tcp, buf, budget, "reading the proxy's CONNECT reply").await?;
        if head.status != 200 {
            return Err(OpError::ProxyRefused(head.status));
        }
        if !buf.pending().is_empty() {
            return Err(OpError::ProxyExtra(buf.pending().len()));
        }
        buf.clear();
    }
    match &target.tls {
        None => Ok(Conn::Plain(tcp)),
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = budget
                .run("in the TLS handshake", connector.connect(name.clone(), tcp))
                .await?;
            Ok(Conn::Tls(Box::new(tls)))
        }
    }
}

async fn send(conn: &mut Conn, budget: &Budget, request: &[u8]) -> Result<(), OpError> {
    budget.run(SEND, conn.write_all(request)).await?;
    budget.run(SEND, conn.flush()).await
}

fn check(verify: bool, offset: u64, data: &[u8]) -> Result<(), OpError> {
    match verify.then(|| pattern_mismatch(offset, data)).flatten() {
        Some(at) => Err(OpError::Differs(at)),
        None => Ok(()),
    }
}

/// Counts shared by a run's workers.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: OnceLock<String>,
}

impl Tally {
    fn ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, e: &OpError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.get_or_init(|| e.to_string());
    }

    fn hopeless(&self) -> bool {
        self.ok.load(Ordering::Relaxed) == 0 && self.errors.load(Ordering::Relaxed) >= GIVE_UP_AFTER
    }

    fn counts(&self) -> (u64, u64, Option<String>) {
        (
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.first_error.get().cloned(),
        )
    }
}

/// Runs `n` copies of `worker` (given their index) and collects their results; a worker that
/// panicked is left out (it cannot: the workers do not panic).
async fn run_workers<T, F, Fut>(n: u32, worker: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(worker(i));
    }
    let mut out = Vec::with_capacity(n as usize);
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out
}

/// Settings of a `bulk` run.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Connections, each doing keep-alive GETs back to back.
    pub streams: u32,
    /// How long to run.
    pub duration: Duration,
    /// Check every body against the pattern.
    pub verify: bool,
}

/// The outcome of a `bulk` run.
#[derive(Debug, Clone)]
pub struct BulkReport {
    /// Streams run.
    pub streams: u32,
    /// Wall time from start to the last stream's end.
    pub seconds: f64,
    /// Body bytes received before the deadline (partial bodies included).
    pub bytes: u64,
    /// Responses received completely.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
}

impl BulkReport {
    /// The report as the CLI prints it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "mode": "bulk",
            "streams": self.streams,
            "seconds": round3(self.seconds),
            "bytes": self.bytes,
            "bytes_per_sec": rate_per_sec(self.bytes, self.seconds),
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
        })
    }
}

/// `streams` connections doing keep-alive GETs back to back for `duration`, counting body bytes
/// up to the deadline (a body in flight at the deadline counts as far as it got).
pub async fn bulk(target: &Target, opts: &BulkOptions) -> BulkReport {
    let start = Instant::now();
    let deadline = start + opts.duration;
    let tally = Arc::new(Tally::default());
    let target = Arc::new(target.clone());
    let verify = opts.verify;
    let bytes = run_workers(opts.streams, |_| {
        bulk_stream(target.clone(), deadline, verify, tally.clone())
    })
    .await;
    let (requests, errors, first_error) = tally.counts();
    BulkReport {
        streams: opts.streams,
        seconds: start.elapsed().as_secs_f64(),
        bytes: bytes.iter().sum(),
        requests,
        errors,
        first_error,
    }
}

async fn bulk_stream(
    target: Arc<Target>,
    deadline: Instant,
    verify: bool,
    tally: Arc<Tally>,
) -> u64 {
    let budget = Budget {
        io_timeout: target.io_timeout,
        op_deadline: None,
        run_deadline: Some(deadline),
    };
    let mut buf = Buf::new(BULK_BUF);
    let mut conn: Option<Conn> = None;
    let mut reused = false;
    let mut bytes = 0u64;
    while Instant::now() < deadline && !tally.hopeless() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match open(&target, &budget, &mut buf).await {
                Ok(c) => {
                    reused = false;
                    conn.insert(c)
                }
                Err(OpError::Deadline) => break,
                Err(e) => {
                    tally.error(&e);
                    backoff(deadline).await;
                    continue;
                }
            },
        };
        match bulk_request(c, &mut buf, &target, &budget, verify, &mut bytes).await {
            Ok(close) => {
                tally.ok();
                reused = true;
                if close {
                    conn = None;
                }
            }
            Err(OpError::Deadline) => break,
            Err(e) if reused && e.is_stale() => conn = None,
            Err(e) => {
                conn = None;
                tally.error(&e);
                backoff(deadline).await;
            }
        }
    }
    bytes
}

async fn backoff(deadline: Instant) {
    tokio::time::sleep_until((Instant::now() + BULK_BACKOFF).min(deadline)).await;
}

/// One keep-alive GET; adds body bytes to `bytes` as they arrive; returns whether the server
/// closes the connection after it.
async fn bulk_request(
    conn: &mut Conn,
    buf: &mut Buf,
    target: &Target,
    budget: &Budget,
    verify: bool,
    bytes: &mut u64,
) -> Result<bool, OpError> {
    send(conn, budget, &target.get_keepalive).await?;
    let (head, _) = read_head(conn, buf, budget, HEAD).await?;
    if head.status != 200 {
        return Err(OpError::Status(head.status));
    }
    let want = head.content_length.ok_or(OpError::NoLength)?;
    let early = buf.pending();
    if early.len() as u64 > want {
        return Err(OpError::Long(want));
    }
    check(verify, 0, early)?;
    let mut got = early.len() as u64;
    *bytes += got;
    buf.clear();
    while got < want {
        // Never read past the body: the next response's head is read by read_head.
        let room = (want - got).min(buf.data.len() as u64) as usize;
        let n = budget.run(BODY, conn.read(&mut buf.data[..room])).await?;
        if n == 0 {
            return Err(OpError::Short { got, want });
        }
        check(verify, got, &buf.data[..n])?;
        got += n as u64;
        *bytes += n as u64;
    }
    Ok(head.close)
}

/// When a `rate` run ends.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Start no operation after this long.
    Duration(Duration),
    /// Start this many operations in total.
    Count(u64),
}

/// Settings of a `rate` run.
#[derive(Debug, Clone)]
pub struct RateOptions {
    /// Workers, each doing one operation after another.
    pub concurrency: u32,
    /// When to stop.
    pub limit: Limit,
    /// Check every body against the pattern.
    pub verify: bool,
}

/// The outcome of a `rate` run.
#[derive(Debug, Clone)]
pub struct RateReport {
    /// Workers run.
    pub concurrency: u32,
    /// Wall time from start to the last operation's end.
    pub seconds: f64,
    /// Operations that got a complete 200 response.
    pub ok: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Connect-to-first-response-byte latency of the successful operations.
    pub latency_us: Option<Latency>,
    /// Samples the percentiles are over (all successful operations up to
    /// [`MAX_LATENCY_SAMPLES`]).
    pub samples: usize,
}

impl RateReport {
    /// Successful operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        rate_per_sec(self.ok, self.seconds)
    }

    /// The report as the CLI prints it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "mode": "rate",
            "concurrency": self.concurrency,
            "seconds": round3(self.seconds),
            "ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "ops_per_sec": self.ops_per_sec(),
            "latency_us": self.latency_us.map(|l| json!({
                "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max,
            })),
            "latency_samples": self.samples,
        })
    }
}

/// `concurrency` workers, each repeating: connect [+ CONNECT + TLS handshake], `GET` with
/// `Connection: close`, read the response to EOF (status 200, the body's length and, with
/// `verify`, its bytes checked). Latency is from before the connect to the first response byte.
pub async fn rate(target: &Target, opts: &RateOptions) -> RateReport {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let target = Arc::new(target.clone());
    let claimed = Arc::new(AtomicU64::new(0));
    let recorded = Arc::new(AtomicUsize::new(0));
    let (verify, limit) = (opts.verify, opts.limit);
    let mut samples: Vec<u32> = run_workers(opts.concurrency, |_| {
        rate_worker(
            target.clone(),
            tally.clone(),
            claimed.clone(),
            recorded.clone(),
            start,
            limit,
            verify,
        )
    })
    .await
    .into_iter()
    .flatten()
    .collect();
    let seconds = start.elapsed().as_secs_f64();
    let (ok, errors, first_error) = tally.counts();
    RateReport {
        concurrency: opts.concurrency,
        seconds,
        ok,
        errors,
        first_error,
        samples: samples.len(),
        latency_us: percentiles(&mut samples),
    }
}

async fn rate_worker(
    target: Arc<Target>,
    tally: Arc<Tally>,
    claimed: Arc<AtomicU64>,
    recorded: Arc<AtomicUsize>,
    start: Instant,
    limit: Limit,
    verify: bool,
) -> Vec<u32> {
    let mut buf = Buf::new(SMALL_BUF);
    let mut samples = Vec::new();
    loop {
        if tally.hopeless() {
            break;
        }
        let more = match limit {
            Limit::Duration(d) => start.elapsed() < d,
            Limit::Count(n) => claimed.fetch_add(1, Ordering::Relaxed) < n,
        };
        if !more {
            break;
        }
        let t0 = Instant::now();
        let budget = Budget {
            io_timeout: target.io_timeout,
            op_deadline: Some(t0 + target.io_timeout),
            run_deadline: None,
        };
        match rate_op(&target, &budget, &mut buf, verify).await {
            Ok(first_byte) => {
                tally.ok();
                if recorded.fetch_add(1, Ordering::Relaxed) < MAX_LATENCY_SAMPLES {
                    let us = first_byte.saturating_duration_since(t0).as_micros();
                    samples.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Err(e) => tally.error(&e),
        }
    }
    samples
}

async fn rate_op(
    target: &Target,
    budget: &Budget,
    buf: &mut Buf,
    verify: bool,
) -> Result<Instant, OpError> {
    let mut conn = open(target, budget, buf).await?;
    send(&mut conn, budget, &target.get_close).await?;
    let (head, first_byte) = read_head(&mut conn, buf, budget, HEAD).await?;
    if head.status != 200 {
        return Err(OpError::Status(head.status));
    }
    let early = buf.pending();
    check(verify, 0, early)?;
    let mut got = early.len() as u64;
    loop {
        if let Some(want) = head.content_length
            && got > want
        {
            return Err(OpError::Long(want));
        }
        let n = match budget.run(BODY, conn.read(&mut buf.data[..])).await {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the length check below decides.
            Err(OpError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        check(verify, got, &buf.data[..n])?;
        got += n as u64;
    }
    match head.content_length {
        Some(want) if got < want => Err(OpError::Short { got, want }),
        _ => Ok(first_byte),
    }
}

/// Settings of an `idle` run.
#[derive(Debug, Clone)]
pub struct IdleOptions {
    /// Connections to open and hold.
    pub count: u64,
    /// Connections being opened at once.
    pub concurrency: u32,
}

/// The outcome of opening an `idle` run's connections.
#[derive(Debug, Clone)]
pub struct IdleReport {
    /// Connections asked for.
    pub requested: u64,
    /// Connections open (each with one complete response read).
    pub open: u64,
    /// Connections that failed.
    pub errors: u64,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Time taken to open them.
    pub seconds: f64,
}

impl IdleReport {
    /// The report as the CLI prints it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "mode": "idle",
            "requested": self.requested,
            "open": self.open,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": round3(self.seconds),
        })
    }
}

/// The held connections of an `idle` run: dropping it closes them all.
pub struct Idle {
    conns: Vec<Conn>,
    /// How opening them went.
    pub report: IdleReport,
}

impl Idle {
    /// Connections held.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// No connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Opens `count` connections (at most `concurrency` opening at once), each doing one
/// keep-alive GET whose whole response is read, and returns them open.
pub async fn idle_open(target: &Target, opts: &IdleOptions) -> Idle {
    let start = Instant::now();
    let tally = Arc::new(Tally::default());
    let target = Arc::new(target.clone());
    let claimed = Arc::new(AtomicU64::new(0));
    let count = opts.count;
    let conns: Vec<Conn> = run_workers(opts.concurrency, |_| {
        idle_worker(target.clone(), tally.clone(), claimed.clone(), count)
    })
    .await
    .into_iter()
    .flatten()
    .collect();
    let (open, errors, first_error) = tally.counts();
    Idle {
        conns,
        report: IdleReport {
            requested: count,
            open,
            errors,
            first_error,
            seconds: start.elapsed().as_secs_f64(),
        },
    }
}

async fn idle_worker(
    target: Arc<Target>,
    tally: Arc<Tally>,
    claimed: Arc<AtomicU64>,
    count: u64,
) -> Vec<Conn> {
    let mut conns = Vec::new();
    // Freed when the worker ends, so held connections cost the client no buffer.
    let mut buf = Buf::new(SMALL_BUF);
    while !tally.hopeless() && claimed.fetch_add(1, Ordering::Relaxed) < count {
        let budget = Budget {
            io_timeout: target.io_timeout,
            op_deadline: Some(Instant::now() + target.io_timeout),
            run_deadline: None,
        };
        match idle_op(&target, &budget, &mut buf).await {
            Ok(conn) => {
                tally.ok();
                conns.push(conn);
            }
            Err(e) => tally.error(&e),
        }
    }
    conns
}

async fn idle_op(target: &Target, budget: &Budget, buf: &mut Buf) -> Result<Conn, OpError> {
    let mut conn = open(target, budget, buf).await?;
    send(&mut conn, budget, &target.get_keepalive).await?;
    let (head, _) = read_head(&mut conn, buf, budget, HEAD).await?;
    if head.status != 200 {
        return Err(OpError::Status(head.status));
    }
    let want = head.content_length.ok_or(OpError::NoLength)?;
    let mut got = buf.pending().len() as u64;
    buf.clear();
    while got < want {
        let room = (want - got).min(buf.data.len() as u64) as usize;
        let n = budget.run(BODY, conn.read(&mut buf.data[..room])).await?;
        if n == 0 {
            return Err(OpError::Short { got, want });
        }
        got += n as u64;
    }
    if got > want {
        return Err(OpError::Long(want));
    }
    if head.close {
        return Err(OpError::Io {
            stage: HEAD,
            source: io::Error::other("the server closes the connection (Connection: close)"),
        });
    }
    Ok(conn)
}

/// Raises the soft open-file limit to at least `needed` (and the hard one, which root may).
pub fn raise_nofile(needed: u64) -> Result<(), SetupError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|cause| SetupError::Nofile {
        needed,
        soft: 0,
        hard: 0,
        cause,
    })?;
    if soft >= needed {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard.max(needed)).map_err(|cause| {
        SetupError::Nofile {
            needed,
            soft,
            hard,
            cause,
        }
    })
}

fn rate_per_sec(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        round3(n as f64 / seconds)
    } else {
        0.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Small in-process peers for the load client's own tests: an HTTP/1.1 server of pattern
/// bodies and a CONNECT proxy. Not for measuring anything.
pub mod stand_in {
    use std::io;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::pattern;

    /// Longest request head the stand-ins read.
    const MAX_REQUEST: usize = 16 * 1024;

    /// A path served with the first `len` bytes of the pattern.
    #[derive(Debug, Clone)]
    pub struct Route {
        /// The request path.
        pub path: String,
        /// Body length.
        pub len: u64,
        /// Flip the bits of the body byte at this offset (a corrupted file).
        pub corrupt_at: Option<u64>,
    }

    impl Route {
        /// `path` serving `len` pattern bytes.
        pub fn new(path: &str, len: u64) -> Route {
            Route {
                path: path.to_string(),
                len,
                corrupt_at: None,
            }
        }

        /// The same with the byte at `offset` corrupted.
        pub fn corrupt(mut self, offset: u64) -> Route {
            self.corrupt_at = Some(offset);
            self
        }
    }

    /// Counts connections; decrements on drop.
    struct OpenGuard(Arc<AtomicUsize>);

    impl Drop for OpenGuard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// An HTTP/1.1 server on 127.0.0.1 serving [`Route`]s (404 for other paths), plain or TLS;
    /// stops when dropped.
    pub struct PatternServer {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl PatternServer {
        /// Starts serving on the current runtime; after `keepalive_requests` responses on one
        /// connection it says `Connection: close` and closes it (as nginx's
        /// `keepalive_requests` does).
        pub async fn start(
            routes: Vec<Route>,
            tls: Option<Arc<rustls::ServerConfig>>,
            keepalive_requests: u32,
        ) -> io::Result<PatternServer> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let accepted = Arc::new(AtomicUsize::new(0));
            let open = Arc::new(AtomicUsize::new(0));
            let routes: Arc<[Route]> = routes.into();
            let (acc, op) = (accepted.clone(), open.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    acc.fetch_add(1, Ordering::Relaxed);
                    op.fetch_add(1, Ordering::Relaxed);
                    let guard = OpenGuard(op.clone());
                    let routes = routes.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _ = stream.set_nodelay(true);
                        match tls {
                            None => {
                                let _ = serve(stream, &routes, keepalive_requests).await;
                            }
                            Some(config) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                                if let Ok(s) = acceptor.accept(stream).await {
                                    let _ = serve(s, &routes, keepalive_requests).await;
                                }
                            }
                        }
                    });
                }
            });
            Ok(PatternServer {
                addr,
                accepted,
                open,
                task,
            })
        }

        /// The listening address.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// Connections accepted so far.
        pub fn accepted(&self) -> usize {
            self.accepted.load(Ordering::Relaxed)
        }

        /// Connections open now.
        pub fn open(&self) -> usize {
            self.open.load(Ordering::Relaxed)
        }
    }

    impl Drop for PatternServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads one request head; `None` at a clean EOF before any byte.
    async fn read_request<S: AsyncRead + Unpin>(
        s: &mut S,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<usize>> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => return Ok(Some(n)),
                Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {}
                Ok(httparse::Status::Partial) => return Err(io::Error::other("head too long")),
                Err(e) => return Err(io::Error::other(e)),
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return if buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        routes: &[Route],
        keepalive_requests: u32,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut served = 0u32;
        let mut body = vec![0u8; 64 * 1024];
        while let Some(n) = read_request(&mut s, &mut buf).await? {
            let (path, client_close) = {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                req.parse(&buf[..n]).map_err(io::Error::other)?;
                let close = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close")
                });
                (req.path.unwrap_or("").to_string(), close)
            };
            buf.drain(..n);
            served += 1;
            let close = client_close || served >= keepalive_requests;
            let conn = if close { "Connection: close\r\n" } else { "" };
            match routes.iter().find(|r| r.path == path) {
                None => {
                    let head = format!("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n{conn}\r\n");
                    s.write_all(head.as_bytes()).await?;
                }
                Some(route) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{conn}\r\n",
                        route.len
                    );
                    s.write_all(head.as_bytes()).await?;
                    let mut offset = 0u64;
                    while offset < route.len {
                        let n = (route.len - offset).min(body.len() as u64) as usize;
                        let chunk = &mut body[..n];
                        pattern(offset, chunk);
                        if let Some(at) = route.corrupt_at
                            && (offset..offset + n as u64).contains(&at)
                        {
                            chunk[(at - offset) as usize] ^= 0xff;
                        }
                        s.write_all(chunk).await?;
                        offset += n as u64;
                    }
                }
            }
            s.flush().await?;
            if close {
                return s.shutdown().await;
            }
        }
        Ok(())
    }

    /// A TLS server configuration (ring, HTTP/1.1) for an issued certificate.
    pub fn tls_server_config(
        issued: &crate::pki::Issued,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(issued.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_der.clone())),
            )?;
        Ok(Arc::new(config))
    }

    /// An HTTP CONNECT proxy on 127.0.0.1 that tunnels every CONNECT to one fixed upstream
    /// (whatever the authority) or refuses all with a given status; records each request head.
    pub struct ConnectProxy {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl ConnectProxy {
        /// Starts on the current runtime; `status` 200 tunnels, anything else refuses.
        pub async fn start(upstream: SocketAddr, status: u16) -> io::Result<ConnectProxy> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let heads = Arc::new(Mutex::new(Vec::new()));
            let seen = heads.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let _ = tunnel(stream, upstream, status, &seen).await;
                    });
                }
            });
            Ok(ConnectProxy { addr, heads, task })
        }

        /// The listening address.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// The request heads received so far.
        pub fn heads(&self) -> Vec<String> {
            self.heads.lock().map(|h| h.clone()).unwrap_or_default()
        }
    }

    impl Drop for ConnectProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn tunnel(
        mut client: TcpStream,
        upstream: SocketAddr,
        status: u16,
        seen: &Mutex<Vec<String>>,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let Some(n) = read_request(&mut client, &mut buf).await? else {
            return Ok(());
        };
        if let Ok(mut heads) = seen.lock() {
            heads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if status != 200 || !buf.starts_with(b"CONNECT ") {
            let reply = format!("HTTP/1.1 {status} Refused\r\nContent-Length: 0\r\n\r\n");
            return client.write_all(reply.as_bytes()).await;
        }
        let mut server = TcpStream::connect(upstream).await?;
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        server.write_all(&buf[n..]).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::stand_in::{ConnectProxy, PatternServer, Route, tls_server_config};
    use super::*;
    use crate::pki::TestCa;

    #[test]
    fn pattern_is_the_same_however_it_is_split() {
        let mut whole = vec![0u8; 1000];
        pattern(5, &mut whole);
        for split in [0, 1, 3, 8, 11, 500, 999, 1000] {
            let mut parts = vec![0u8; 1000];
            let (a, b) = parts.split_at_mut(split);
            pattern(5, a);
            pattern(5 + split as u64, b);
            assert_eq!(parts, whole, "split at {split}");
        }
        assert_eq!(pattern_mismatch(5, &whole), None);
        assert_eq!(pattern_mismatch(5 + 100, &whole[100..]), None);
    }

    #[test]
    fn pattern_words_all_differ() {
        let mut buf = vec![0u8; 8 * 4096];
        pattern(0, &mut buf);
        let mut words: Vec<&[u8]> = buf.chunks(8).collect();
        words.sort();
        words.dedup();
        assert_eq!(words.len(), 4096);
    }

    #[test]
    fn mismatch_finds_the_first_differing_byte() {
        let mut buf = vec![0u8; 4096];
        pattern(0, &mut buf);
        for at in [0usize, 1, 7, 8, 9, 2047, 4095] {
            let mut bad = buf.clone();
            bad[at] ^= 1;
            assert_eq!(pattern_mismatch(0, &bad), Some(at as u64));
            // From an unaligned offset, too.
            if at >= 3 {
                assert_eq!(pattern_mismatch(3, &bad[3..]), Some(at as u64));
            }
        }
    }

    #[test]
    fn mismatch_catches_shifted_and_reordered_data() {
        let mut buf = vec![0u8; 4096];
        pattern(0, &mut buf);
        for shift in 1..=16u64 {
            // Data that starts `shift` bytes later than claimed.
            assert_eq!(
                pattern_mismatch(0, &buf[shift as usize..]),
                Some(0),
                "shift {shift}"
            );
        }
        let mut swapped = buf.clone();
        swapped[..1024].copy_from_slice(&buf[1024..2048]);
        swapped[1024..2048].copy_from_slice(&buf[..1024]);
        assert_eq!(pattern_mismatch(0, &swapped), Some(0));
        // The same 8 bytes repeated (a stuck buffer).
        let mut repeated = buf.clone();
        let (head, rest) = repeated.split_at_mut(8);
        rest[..8].copy_from_slice(head);
        assert!(pattern_mismatch(0, &repeated).is_some_and(|at| (8..16).contains(&at)));
    }

    #[test]
    fn pattern_at_the_end_of_the_offsets_does_not_panic() {
        let mut buf = [0u8; 32];
        pattern(u64::MAX - 10, &mut buf);
        assert_eq!(pattern_mismatch(u64::MAX - 10, &buf), None);
        assert_eq!(pattern_mismatch(0, &[]), None);
        pattern(3, &mut []);
    }

    #[test]
    fn pattern_file_holds_the_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulk");
        let len = (3 << 20) + 5;
        write_pattern_file(&path, len).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, len);
        assert_eq!(pattern_mismatch(0, &data), None);
        write_pattern_file(&path, 0).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    fn complete(head: &[u8]) -> Head {
        match parse_head(head) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn head_parsing() {
        let h = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\nbody");
        assert_eq!(
            h,
            Head {
                len: 39,
                status: 200,
                content_length: Some(42),
                close: false
            }
        );
        let h = complete(b"HTTP/1.1 404 Not Found\r\nconnection: Close\r\n\r\n");
        assert_eq!((h.status, h.content_length, h.close), (404, None, true));
        let h = complete(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(h.close);
        let h = complete(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n");
        assert!(!h.close);
        // Squid's CONNECT reply.
        let h = complete(b"HTTP/1.1 200 Connection established\r\n\r\n");
        assert_eq!((h.status, h.content_length), (200, None));
        let h = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(h.content_length, Some(7));
    }

    #[test]
    fn head_parsing_incomplete_and_bad() {
        assert_eq!(parse_head(b""), Ok(Parsed::Incomplete));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le"),
            Ok(Parsed::Incomplete)
        );
        assert!(matches!(
            parse_head(b"SSH-2.0-x\r\n\r\n"),
            Err(HeadError::Parse(_))
        ));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::BadLength("-1".into()))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(HeadError::BadLength("99999999999999999999999".into()))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::ConflictingLength)
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::TransferEncoding)
        );
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        while long.len() < MAX_HEAD {
            long.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(
            parse_head(&long),
            Err(HeadError::TooLarge | HeadError::Parse(_))
        ));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..MAX_HEADERS + 1 {
            many.extend_from_slice(b"X: y\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_head(&many),
            Err(HeadError::Parse(httparse::Error::TooManyHeaders))
        );
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut s: Vec<u32> = (1..=100).rev().collect();
        let l = percentiles(&mut s).unwrap();
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50, 90, 99, 100));
        let mut s: Vec<u32> = (1..=1000).collect();
        let l = percentiles(&mut s).unwrap();
        assert_eq!((l.p50, l.p90, l.p99, l.max), (500, 900, 990, 1000));
        let mut s = vec![7];
        let l = percentiles(&mut s).unwrap();
        assert_eq!((l.p50, l.p90, l.p99, l.max), (7, 7, 7, 7));
        let mut s = vec![10, 1, 1000];
        let l = percentiles(&mut s).unwrap();
        assert_eq!((l.p50, l.p90, l.p99, l.max), (10, 1000, 1000, 1000));
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn target_refuses_what_cannot_go_into_a_request() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(Target::new(a, "web.test", "/x?y=1").is_ok());
        assert!(matches!(
            Target::new(a, "", "/"),
            Err(SetupError::BadHost(_))
        ));
        assert!(matches!(
            Target::new(a, "a\r\nX: y", "/"),
            Err(SetupError::BadHost(_))
        ));
        assert!(matches!(
            Target::new(a, "web.test", "x"),
            Err(SetupError::BadPath(_))
        ));
        assert!(matches!(
            Target::new(a, "web.test", "/a b"),
            Err(SetupError::BadPath(_))
        ));
        let t = Target::new(a, "::1", "/").unwrap();
        assert!(
            t.connect
                .starts_with(b"CONNECT [::1]:80 HTTP/1.1\r\nHost: [::1]:80\r\n")
        );
    }

    #[test]
    fn ca_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let t = Target::new(a, "web.test", "/").unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(
            t.clone().with_tls_ca_file(&empty),
            Err(SetupError::NoCa(_))
        ));
        let missing = dir.path().join("missing.pem");
        let e = t.clone().with_tls_ca_file(&missing).err().unwrap();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let ca = TestCa::new();
        assert!(t.with_tls_ca_file(&ca.cert_path()).is_ok());
    }

    #[test]
    fn nofile_already_enough() {
        raise_nofile(16).unwrap();
    }

    #[test]
    fn nofile_beyond_the_kernel_maximum_says_so() {
        // Above fs.nr_open (at most 2^30): refused even to root.
        let e = raise_nofile(1 << 40).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("cannot raise the open-file limit (RLIMIT_NOFILE) to 1099511627776"),
            "{text}"
        );
    }

    const SMALL: u64 = 1000;
    const BULK: u64 = 3 << 20;

    fn routes() -> Vec<Route> {
        vec![
            Route::new("/small", SMALL),
            Route::new("/bulk", BULK),
            Route::new("/empty", 0),
            Route::new("/corrupt", 100_000).corrupt(77_777),
        ]
    }

    struct Tls {
        ca: TestCa,
        config: Arc<rustls::ServerConfig>,
    }

    fn tls() -> Tls {
        let ca = TestCa::new();
        let config = tls_server_config(&ca.issue(&["web.test"])).unwrap();
        Tls { ca, config }
    }

    fn bulk_opts(streams: u32, ms: u64) -> BulkOptions {
        BulkOptions {
            streams,
            duration: Duration::from_millis(ms),
            verify: true,
        }
    }

    fn count(concurrency: u32, n: u64) -> RateOptions {
        RateOptions {
            concurrency,
            limit: Limit::Count(n),
            verify: true,
        }
    }

    #[tokio::test]
    async fn bulk_plain_reconnects_when_the_server_closes() {
        // The server closes after 2 responses per connection, as nginx does after
        // keepalive_requests: the streams reconnect without counting errors.
        let server = PatternServer::start(routes(), None, 2).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/bulk").unwrap();
        let r = bulk(&target, &bulk_opts(3, 2000)).await;
        assert_eq!((r.errors, &r.first_error), (0, &None), "{r:?}");
        assert!(r.requests >= 3, "{r:?}");
        assert!(r.bytes >= r.requests * BULK, "{r:?}");
        assert!(server.accepted() as u64 >= r.requests / 2, "{r:?}");
        // Ended by the run's deadline, not by an I/O timeout (10 s).
        assert!(r.seconds >= 2.0 && r.seconds < 9.0, "{r:?}");
    }

    #[tokio::test]
    async fn bulk_tls_through_a_proxy_verifies() {
        let tls = tls();
        let server = PatternServer::start(routes(), Some(tls.config.clone()), 1000)
            .await
            .unwrap();
        let proxy = ConnectProxy::start(server.addr(), 200).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/bulk")
            .unwrap()
            .via_proxy(proxy.addr())
            .with_tls_ca_file(&tls.ca.cert_path())
            .unwrap();
        let r = bulk(&target, &bulk_opts(2, 500)).await;
        assert_eq!((r.errors, &r.first_error), (0, &None), "{r:?}");
        assert!(r.bytes > BULK, "{r:?}");
        let heads = proxy.heads();
        assert_eq!(heads.len(), 2, "one tunnel per stream: {heads:?}");
        let port = server.addr().port();
        assert_eq!(
            heads[0],
            format!("CONNECT web.test:{port} HTTP/1.1\r\nHost: web.test:{port}\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn bulk_verify_catches_a_corrupted_body() {
        let server = PatternServer::start(routes(), None, 1000).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/corrupt").unwrap();
        let r = bulk(&target, &bulk_opts(1, 300)).await;
        assert!(r.errors >= 1, "{r:?}");
        assert_eq!(r.requests, 0, "{r:?}");
        assert_eq!(r.first_error.as_deref(), Some("body differs at byte 77777"));
        // Without --verify the same body passes.
        let r = bulk(
            &target,
            &BulkOptions {
                verify: false,
                ..bulk_opts(1, 200)
            },
        )
        .await;
        assert_eq!((r.errors, r.requests > 0), (0, true), "{r:?}");
    }

    #[tokio::test]
    async fn bulk_stops_mid_body_at_the_deadline() {
        // A body far larger than what a short run can read: bytes still count.
        let server = PatternServer::start(vec![Route::new("/huge", 1 << 40)], None, 1000)
            .await
            .unwrap();
        let target = Target::new(server.addr(), "web.test", "/huge").unwrap();
        let r = bulk(&target, &bulk_opts(1, 300)).await;
        assert_eq!((r.errors, r.requests), (0, 0), "{r:?}");
        assert!(r.bytes > 0, "{r:?}");
        // Stopped mid-body at the deadline, not by an I/O timeout (10 s).
        assert!(r.seconds < 9.0, "{r:?}");
    }

    #[tokio::test]
    async fn rate_plain_counts_every_op() {
        let server = PatternServer::start(routes(), None, 1000).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/small").unwrap();
        let r = rate(&target, &count(4, 50)).await;
        assert_eq!((r.ok, r.errors, &r.first_error), (50, 0, &None), "{r:?}");
        assert_eq!(server.accepted(), 50);
        assert_eq!(r.samples, 50);
        let l = r.latency_us.unwrap();
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
        assert!(r.ops_per_sec() > 0.0);
        let v = r.to_json();
        assert_eq!(v["ok"], 50);
        assert_eq!(v["latency_us"]["max"], l.max);

        let empty = Target::new(server.addr(), "web.test", "/empty").unwrap();
        let r = rate(&empty, &count(1, 3)).await;
        assert_eq!((r.ok, r.errors), (3, 0), "{r:?}");
    }

    #[tokio::test]
    async fn rate_for_a_duration() {
        let server = PatternServer::start(routes(), None, 1000).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/small").unwrap();
        let opts = RateOptions {
            concurrency: 2,
            limit: Limit::Duration(Duration::from_millis(1000)),
            verify: false,
        };
        let r = rate(&target, &opts).await;
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.ok > 2, "{r:?}");
        // Ended by the run's deadline, not by an I/O timeout (10 s).
        assert!(r.seconds >= 1.0 && r.seconds < 9.0, "{r:?}");
    }

    #[tokio::test]
    async fn rate_tls_through_a_proxy() {
        let tls = tls();
        let server = PatternServer::start(routes(), Some(tls.config.clone()), 1000)
            .await
            .unwrap();
        let proxy = ConnectProxy::start(server.addr(), 200).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/small")
            .unwrap()
            .via_proxy(proxy.addr())
            .with_tls_ca_file(&tls.ca.cert_path())
            .unwrap();
        let r = rate(&target, &count(3, 12)).await;
        assert_eq!((r.ok, r.errors, &r.first_error), (12, 0, &None), "{r:?}");
        assert_eq!(proxy.heads().len(), 12);
        assert_eq!(server.accepted(), 12);
    }

    #[tokio::test]
    async fn rate_errors_are_counted_with_the_first_message() {
        let tls = tls();
        let server = PatternServer::start(routes(), Some(tls.config.clone()), 1000)
            .await
            .unwrap();
        let plain = PatternServer::start(routes(), None, 1000).await.unwrap();

        // Verify catches a corrupted body.
        let t = Target::new(plain.addr(), "web.test", "/corrupt").unwrap();
        let r = rate(&t, &count(2, 5)).await;
        assert_eq!((r.ok, r.errors), (0, 5), "{r:?}");
        assert_eq!(r.first_error.as_deref(), Some("body differs at byte 77777"));
        assert_eq!(r.latency_us, None);

        // A missing file.
        let t = Target::new(plain.addr(), "web.test", "/missing").unwrap();
        let r = rate(&t, &count(1, 2)).await;
        assert_eq!(r.first_error.as_deref(), Some("status 404, expected 200"));

        // A CA that did not issue the server's certificate.
        let other = TestCa::with_name("another CA");
        let t = Target::new(server.addr(), "web.test", "/small")
            .unwrap()
            .with_tls_ca_file(&other.cert_path())
            .unwrap();
        let r = rate(&t, &count(1, 2)).await;
        assert_eq!(r.errors, 2, "{r:?}");
        let e = r.first_error.unwrap();
        assert!(
            e.starts_with("in the TLS handshake: invalid peer certificate"),
            "{e}"
        );

        // A proxy that refuses.
        let refusing = ConnectProxy::start(plain.addr(), 403).await.unwrap();
        let t = Target::new(plain.addr(), "web.test", "/small")
            .unwrap()
            .via_proxy(refusing.addr());
        let r = rate(&t, &count(1, 2)).await;
        assert_eq!(
            r.first_error.as_deref(),
            Some("proxy answered 403 to CONNECT, expected 200")
        );
    }

    #[tokio::test]
    async fn a_run_where_everything_fails_stops_early() {
        // A port nothing listens on: bind, note the port, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let t = Target::new(addr, "web.test", "/small").unwrap();
        let r = rate(&t, &count(4, 1_000_000)).await;
        assert_eq!(r.ok, 0);
        assert!(r.errors >= GIVE_UP_AFTER && r.errors < 1000, "{r:?}");
        let e = r.first_error.unwrap();
        assert!(e.starts_with(&format!("connect to {addr}: ")), "{e}");

        let r = bulk(&t, &bulk_opts(2, 60_000)).await;
        assert_eq!(r.requests, 0);
        assert!(r.errors >= GIVE_UP_AFTER, "{r:?}");
        assert!(r.seconds < 30.0, "{r:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts (the kernel does) but never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Target::new(silent.local_addr().unwrap(), "web.test", "/small")
            .unwrap()
            .io_timeout(Duration::from_millis(200));
        let r = rate(&t, &count(1, 1)).await;
        assert_eq!(r.errors, 1, "{r:?}");
        assert_eq!(
            r.first_error.as_deref(),
            Some("timed out after 0.2 s while reading the response head")
        );
        let r = bulk(&t, &bulk_opts(1, 300)).await;
        assert!(r.errors >= 1, "{r:?}");
        assert_eq!(
            r.first_error.as_deref(),
            Some("timed out after 0.2 s while reading the response head")
        );
    }

    #[tokio::test]
    async fn idle_holds_connections_until_dropped() {
        let tls = tls();
        let server = PatternServer::start(routes(), Some(tls.config.clone()), 1000)
            .await
            .unwrap();
        let proxy = ConnectProxy::start(server.addr(), 200).await.unwrap();
        let target = Target::new(server.addr(), "web.test", "/small")
            .unwrap()
            .via_proxy(proxy.addr())
            .with_tls_ca_file(&tls.ca.cert_path())
            .unwrap();
        let idle = idle_open(
            &target,
            &IdleOptions {
                count: 30,
                concurrency: 4,
            },
        )
        .await;
        assert_eq!(
            (idle.report.open, idle.report.errors),
            (30, 0),
            "{:?}",
            idle.report
        );
        assert_eq!(idle.len(), 30);
        assert_eq!(idle.report.to_json()["open"], 30);
        assert_eq!(server.open(), 30);
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.open() > 0 {
            assert!(Instant::now() < deadline, "{} still open", server.open());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn idle_counts_failures() {
        let server = PatternServer::start(routes(), None, 1).await.unwrap();
        // The server closes after each response: nothing can be held.
        let target = Target::new(server.addr(), "web.test", "/small").unwrap();
        let idle = idle_open(
            &target,
            &IdleOptions {
                count: 3,
                concurrency: 2,
            },
        )
        .await;
        assert_eq!(
            (idle.report.open, idle.report.errors),
            (0, 3),
            "{:?}",
            idle.report
        );
        assert!(idle.is_empty());
    }
}
