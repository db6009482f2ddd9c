//! HTTP/2 CONNECT to the PEP over pooled connections: many tunnels share one TLS (or
//! plaintext) connection per (PEP, actor, certificate generation), each tunnel one CONNECT
//! stream. A new tunnel then costs one HEADERS round trip instead of TCP + TLS + CONNECT.
//!
//! - A connection takes new streams while it has seen no GOAWAY, its task runs, and its open
//!   streams are below both [`Settings::max_streams`] and the PEP's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`. When every connection of a key is full, another is
//!   dialed, up to [`MAX_CONNECTIONS_PER_KEY`]; past that, opens fail with
//!   [`Error::Overloaded`]. Dials of one key are serialized, so a burst of opens for a new
//!   actor shares one connection instead of dialing one each.
//! - A connection the PEP sent GOAWAY on takes no new streams: hyper learns of the GOAWAY when
//!   the next request is handed to it and answers that request "canceled"; the pool then
//!   retires the connection and retries the request once on another (a CONNECT the PEP never
//!   processed is safe to retry). The streams already open on it finish undisturbed. A
//!   stream the PEP refuses (REFUSED_STREAM) is retried once as well, without retiring its
//!   connection.
//! - The open that dials a connection keeps the key's dial turn until the PEP's SETTINGS
//!   are in force (h2 applies them as it writes our SETTINGS ACK, which the pool sees go
//!   out), or until its own CONNECT is answered or fails: a burst of opens then fills the
//!   connection up to the PEP's own stream limit, not past it, and a first CONNECT the PEP is
//!   slow to answer (a blackholed destination) holds up none of the actor's other opens.
//! - Dropping a [`Stream`] resets that stream (RST_STREAM CANCEL after END_STREAM), never the
//!   connection. Shutting a stream's write side down sends END_STREAM (a half-close).
//! - On a new TLS connection nothing is written after the handshake until the PEP has sent
//!   its SETTINGS (or an alert): a PEP refusing the client certificate (TLS 1.3 says so only
//!   after the handshake) is then reported as [`Error::Tls`] with its alert, not as a reset.
//!   A PEP silent for [`SPEAKS_FIRST_WAIT`] (HTTP/2 lets it wait for the client's preface)
//!   is remembered for [`SILENT_FOR`] and not waited for meanwhile.
//! - A connection without streams for [`IDLE_TIMEOUT`] is closed; every connection pings the
//!   PEP every [`KEEP_ALIVE_INTERVAL`], so a dead PEP is noticed even while idle.
use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Notify, OwnedMutexGuard},
};
use tracing::{debug, info};

use super::{Error, PepStream};

/// Most connections one key (PEP, actor, certificate generation) may have open at once.
pub const MAX_CONNECTIONS_PER_KEY: usize = 8;
/// A connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a connection pings the PEP (also while idle), so a dead PEP is noticed.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed as dead.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest [`Settings::max_streams`] accepted: beyond this one connection's failure takes too
/// many tunnels with it.
pub const MAX_STREAMS: usize = 1000;
/// Smallest flow-control window HTTP/2 allows to be announced (its initial value).
pub const MIN_WINDOW: u32 = 65_535;
/// Largest flow-control window HTTP/2 allows (2^31 - 1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// How long a new TLS connection waits for the PEP to speak first (see the module docs).
pub const SPEAKS_FIRST_WAIT: Duration = Duration::from_secs(1);
/// Bound on the PEPs remembered as not speaking first.
const MAX_SILENT_PEPS: usize = 64;
/// How long a PEP found not to speak first is remembered as such (one slow answer must not
/// label a PEP for the agent's lifetime).
pub const SILENT_FOR: Duration = Duration::from_secs(600);
/// The ALPN protocol id of HTTP/2 over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// How the pooled connections are sized (`[pep.http2]`, checked where the config is read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Most CONNECT streams on one connection (the PEP's own limit applies too).
    pub max_streams: usize,
    /// Flow-control window of each stream: how much the PEP may send on one tunnel before the
    /// agent's relay has read it (bounds per-tunnel buffering; limits a tunnel's throughput
    /// to window / round trip).
    pub stream_window: u32,
    /// Flow-control window of the whole connection, shared by its streams (bounds the memory
    /// one connection can make the agent hold).
    pub connection_window: u32,
}

impl Default for Settings {
    /// 100 streams (nghttpx's and most servers' default), a 4 MiB stream window (a bulk
    /// tunnel at ~1 Gbit/s over a 30 ms round trip) and a 16 MiB connection window (four such
    /// tunnels at full speed at once).
    fn default() -> Self {
        Settings {
            max_streams: 100,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
        }
    }
}

impl Settings {
    /// The values brought into range (h2 asserts on windows above [`MAX_WINDOW`]).
    fn clamped(self) -> Settings {
        Settings {
            max_streams: self.max_streams.clamp(1, MAX_STREAMS),
            stream_window: self.stream_window.clamp(MIN_WINDOW, MAX_WINDOW),
            connection_window: self.connection_window.clamp(MIN_WINDOW, MAX_WINDOW),
        }
    }
}

/// Returns `config` offering HTTP/2 (ALPN `h2`) and nothing else: the TLS configuration a
/// dial for [`Pool::open`] uses.
pub fn with_alpn_h2(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// What a pooled connection belongs to: connections are never shared between PEPs, actors,
/// or two certificates of one actor.
#[derive(Clone, Debug, Hash, Eq, PartialEq)]
pub struct Key {
    /// The PEP (its name in the config, or its address).
    pub pep: String,
    /// The actor whose tunnels the connection carries.
    pub actor: String,
    /// The generation of the actor's client certificate the connection presented (0 without).
    pub generation: u64,
}

/// The pool's counts, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// HTTP/2 connections alive: taking streams, or draining after GOAWAY.
    pub connections: usize,
    /// CONNECT streams (tunnels) open.
    pub streams: usize,
    /// Connections dialed since start.
    pub connections_opened_total: u64,
    /// Streams opened (answered 2xx) since start.
    pub streams_opened_total: u64,
    /// Connections the PEP ended gracefully (GOAWAY without error, or a clean close).
    pub goaways_total: u64,
}

/// Bounds that are constants in production and shortened by the tests.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: usize,
    idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS_PER_KEY,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// HTTP/2 connections to PEPs, by [`Key`]; cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    limits: Limits,
    keys: Mutex<HashMap<Key, Entry>>,
    /// PEPs that send nothing before the client's preface (see [`Pool::hear_first`]).
    silent: Mutex<HashMap<String, Instant>>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    streams: AtomicUsize,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    goaways: AtomicU64,
}

/// One key's connections, and the lock its dials take turns on.
#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    dialing: Arc<tokio::sync::Mutex<()>>,
}

type Connection =
    hyper::client::conn::http2::Connection<TokioIo<Watched>, Empty<Bytes>, TokioExecutor>;

/// The connection to the PEP, remembering the first TLS error on it (a later alert, e.g.
/// the PEP rejecting an expired certificate, otherwise reaches the opens only as
/// "connection closed"), first serving the bytes read before hyper took over (see
/// [`Pool::hear_first`]), and telling when the PEP's SETTINGS are in force (see
/// [`AckWatch`]).
struct Watched {
    io: PepStream,
    prefix: Bytes,
    tls_failure: Arc<OnceLock<String>>,
    ack: AckWatch,
}

impl Watched {
    fn watch<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &poll
            && let Some(reason) = super::tls_reason(e)
        {
            let _ = self.tls_failure.set(reason);
        }
        poll
    }
}

/// Follows the frames the client writes, up to its first SETTINGS ACK. h2 applies the PEP's
/// SETTINGS (its `SETTINGS_MAX_CONCURRENT_STREAMS` among them) in the same step that queues
/// the ACK, so once the ACK has been written the stream limit the pool reads is the PEP's
/// own. Dropped with the connection, which also ends every wait (see [`Conn::settled`]).
struct AckWatch {
    /// Set once the ACK is out.
    settled: tokio::sync::watch::Sender<bool>,
    /// The ACK was seen: nothing more to follow.
    done: bool,
    /// Bytes still to pass before the next frame header: the client preface, then each
    /// frame's payload.
    skip: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
}

/// The client connection preface (`PRI * HTTP/2.0...`), RFC 9113 section 3.4.
const PREFACE_LEN: usize = 24;
/// An HTTP/2 frame header: length (24 bits), type, flags, stream id (RFC 9113 section 4.1).
const FRAME_HEADER: usize = 9;
const FRAME_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;

impl AckWatch {
    fn new() -> (AckWatch, tokio::sync::watch::Receiver<bool>) {
        let (settled, rx) = tokio::sync::watch::channel(false);
        let watch = AckWatch {
            settled,
            done: false,
            skip: PREFACE_LEN,
            header: [0; FRAME_HEADER],
            have: 0,
        };
        (watch, rx)
    }

    /// Takes in bytes the client has written (in order, each once).
    fn wrote(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.done {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let h = self.header;
                if h[3] == FRAME_SETTINGS && h[4] & FLAG_ACK != 0 {
                    self.done = true;
                    self.settled.send_replace(true);
                    return;
                }
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            }
        }
    }

    fn wrote_vectored(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(buf.len());
            self.wrote(&buf[..take]);
            n -= take;
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        this.watch(poll)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            this.ack.wrote(&buf[..*n]);
        }
        this.watch(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            this.ack.wrote_vectored(bufs, *n);
        }
        this.watch(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(poll)
    }
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    /// hyper's dispatch task, polled by the connection's driver; kept here so that the PEP's
    /// current stream limit can be read at any time (h2 updates it when SETTINGS arrive).
    task: Mutex<Option<Pin<Box<Connection>>>>,
    /// Streams reserved or open on this connection.
    streams: AtomicUsize,
    /// Set when the connection must take no new streams (GOAWAY, failure, removal, idle).
    closed: AtomicBool,
    /// When the stream count last fell to zero.
    idle_since: Mutex<Instant>,
    /// Wakes the driver: the connection was closed, or its last stream ended.
    wake: Notify,
    /// The first TLS error on the connection (see [`Watched`]).
    tls_failure: Arc<OnceLock<String>>,
    /// True once the PEP's SETTINGS are in force (see [`AckWatch`]).
    settled: tokio::sync::watch::Receiver<bool>,
    /// Counts the connection out of [`Stats::connections`] when the last reference goes.
    pool: Weak<Inner>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    /// Returns once the PEP's SETTINGS are in force, or the connection is gone.
    async fn settled(&self) {
        let mut settled = self.settled.clone();
        let _ = settled.wait_for(|s| *s).await;
    }

    /// The PEP's `SETTINGS_MAX_CONCURRENT_STREAMS` as last received (our own initial
    /// assumption until its SETTINGS arrive).
    fn peer_max_streams(&self) -> usize {
        lock(&self.task)
            .as_ref()
            .map_or(0, |task| task.current_max_send_streams())
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.sender.is_closed()
    }

    /// Takes no new streams from now on; the driver ends hyper's dispatch task, and the
    /// connection closes once its open streams have ended.
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }
}

/// A stream slot on a connection, given back when dropped.
struct Slot {
    conn: Arc<Conn>,
    pool: Arc<Inner>,
    /// The connection was dialed for this open (not reused).
    fresh: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.streams.fetch_sub(1, Ordering::AcqRel);
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
            self.conn.wake.notify_one();
        }
    }
}

impl Inner {
    /// A slot on a usable connection of `key` with room, if there is one; retired
    /// connections are dropped from the key on the way.
    fn reserve(self: &Arc<Self>, key: &Key) -> Option<Slot> {
        let mut keys = lock(&self.keys);
        let entry = keys.get_mut(key)?;
        entry.conns.retain(|c| c.usable());
        let max = self.settings.max_streams;
        // Fill the first connection first: the others then go idle and close.
        let conn = entry.conns.iter().find(|c| {
            let limit = max.min(c.peer_max_streams());
            c.streams.load(Ordering::Acquire) < limit
        })?;
        Some(self.slot(conn.clone(), false))
    }

    fn slot(self: &Arc<Self>, conn: Arc<Conn>, fresh: bool) -> Slot {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        self.streams.fetch_add(1, Ordering::AcqRel);
        Slot {
            conn,
            pool: self.clone(),
            fresh,
        }
    }

    fn dial_lock(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.keys)
            .entry(key.clone())
            .or_default()
            .dialing
            .clone()
    }

    /// Usable connections of `key`.
    fn count(&self, key: &Key) -> usize {
        lock(&self.keys)
            .get(key)
            .map_or(0, |e| e.conns.iter().filter(|c| c.usable()).count())
    }

    /// Takes `conn` out of `key`'s list (and the key out of the map when it was the last).
    fn forget(&self, key: &Key, id: u64) {
        let mut keys = lock(&self.keys);
        if let Some(entry) = keys.get_mut(key) {
            entry.conns.retain(|c| c.id != id);
        }
        Self::prune_locked(&mut keys, key);
    }

    /// Takes `key` out of the map if it has no connection and no open is dialing for it
    /// (failed dials would otherwise leave an entry per key behind).
    fn prune(&self, key: &Key) {
        Self::prune_locked(&mut lock(&self.keys), key);
    }

    fn prune_locked(keys: &mut HashMap<Key, Entry>, key: &Key) {
        if keys
            .get(key)
            .is_some_and(|e| e.conns.is_empty() && Arc::strong_count(&e.dialing) == 1)
        {
            keys.remove(key);
        }
    }
}

impl Pool {
    /// An empty pool; `settings` out of range are brought into range (the config refuses
    /// them: `[pep.http2]` in [`crate::pep`]).
    pub fn new(settings: Settings) -> Pool {
        Pool::with_limits(settings, Limits::default())
    }

    fn with_limits(settings: Settings, limits: Limits) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                settings: settings.clamped(),
                limits,
                keys: Mutex::new(HashMap::new()),
                silent: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                connections: AtomicUsize::new(0),
                streams: AtomicUsize::new(0),
                connections_opened: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
                goaways: AtomicU64::new(0),
            }),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> Settings {
        self.inner.settings
    }

    /// A CONNECT stream for `key`: reuses a live connection with a free stream slot (no
    /// GOAWAY seen, stream count below min(max_streams, the PEP's
    /// SETTINGS_MAX_CONCURRENT_STREAMS)), or dials a new one with `dial` (which returns the
    /// TLS-or-plain connection, ALPN `h2` already negotiated: see [`with_alpn_h2`]) and
    /// handshakes HTTP/2. `response_timeout` bounds waiting for another open's dial of the
    /// same key, and separately the handshake, request and answer; `dial` bounds itself.
    ///
    /// A request that a reused connection could not carry (GOAWAY, connection gone) is
    /// retried once, on another connection.
    pub async fn open<F, Fut>(
        &self,
        key: &Key,
        dial: F,
        request: Request<Empty<Bytes>>,
        response_timeout: Duration,
    ) -> Result<Stream, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PepStream, Error>>,
    {
        let mut dial = Some(dial);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (slot, turn) = match self.inner.reserve(key) {
                Some(slot) => (slot, None),
                None => self.dial(key, &mut dial, response_timeout).await?,
            };
            let attempt = tokio::time::timeout(response_timeout, async {
                let connect = connect(&slot, &request);
                let Some(turn) = turn else {
                    return connect.await;
                };
                // The opens waiting for this dial go on once the PEP's stream limit is known
                // (or this CONNECT is answered, which comes after the PEP's SETTINGS).
                tokio::pin!(connect);
                tokio::select! {
                    attempt = &mut connect => attempt,
                    () = slot.conn.settled() => {
                        drop(turn);
                        connect.await
                    }
                }
            })
            .await;
            let error = match attempt {
                Err(_) => return Err(Error::Timeout(response_timeout)),
                Ok(Ok((io, status))) => {
                    self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(Stream {
                        io: TokioIo::new(io),
                        status,
                        slot,
                    });
                }
                Ok(Err(Attempt::Refused(status))) => return Err(Error::Refused(status)),
                Ok(Err(Attempt::Http(e))) => e,
            };
            if let Some(reason) = slot.conn.tls_failure.get() {
                // TLS failed under HTTP/2: the PEP refused us; no other connection would fare
                // better.
                slot.conn.close();
                return Err(Error::Tls {
                    pep: key.pep.clone(),
                    reason: reason.clone(),
                });
            }
            match unprocessed(&error) {
                None => return Err(http_error(key, error)),
                // The PEP refused the stream (over its limit): the connection is fine.
                Some(Unprocessed::Stream) => {}
                Some(Unprocessed::Connection) => {
                    slot.conn.close();
                    debug!(
                        pep = %key.pep, actor = %key.actor, conn = slot.conn.id, error = %error,
                        "HTTP/2 connection to the PEP cannot take streams: retired"
                    );
                }
            }
            if slot.fresh || attempts >= 2 {
                return Err(http_error(key, error));
            }
        }
    }

    /// Waits for the key's dial turn, then reserves on a connection another open dialed
    /// meanwhile, or dials one (if `dial` is still unused and the key has room). After a
    /// dial, the turn is handed back still held: it is released once the PEP's SETTINGS are
    /// in force (or the first CONNECT on the new connection is answered), so that a burst of
    /// opens does not pile onto the connection before the PEP says how many streams it takes.
    async fn dial<F, Fut>(
        &self,
        key: &Key,
        dial: &mut Option<F>,
        response_timeout: Duration,
    ) -> Result<(Slot, Option<OwnedMutexGuard<()>>), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PepStream, Error>>,
    {
        let dialing = self.inner.dial_lock(key);
        let result = self
            .dial_in_turn(key, dial, dialing, response_timeout)
            .await;
        if result.is_err() {
            self.inner.prune(key);
        }
        result
    }

    async fn dial_in_turn<F, Fut>(
        &self,
        key: &Key,
        dial: &mut Option<F>,
        dialing: Arc<tokio::sync::Mutex<()>>,
        response_timeout: Duration,
    ) -> Result<(Slot, Option<OwnedMutexGuard<()>>), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PepStream, Error>>,
    {
        let turn = tokio::time::timeout(response_timeout, dialing.lock_owned())
            .await
            .map_err(|_| Error::Timeout(response_timeout))?;
        if let Some(slot) = self.inner.reserve(key) {
            return Ok((slot, None));
        }
        let limit = self.inner.limits.max_connections;
        if self.inner.count(key) >= limit {
            // Fields reused: `connecting` = connections of this key, `waiting` = streams each.
            return Err(Error::Overloaded {
                connecting: limit,
                waiting: self.inner.settings.max_streams,
            });
        }
        let Some(dial) = dial.take() else {
            // Only a retry after a reused connection failed gets here, and that never
            // follows a dial of its own.
            return Err(Error::Overloaded {
                connecting: limit,
                waiting: self.inner.settings.max_streams,
            });
        };
        let mut stream = dial().await?;
        if let PepStream::Tls(tls) = &stream
            && tls.get_ref().1.alpn_protocol() != Some(ALPN_H2)
        {
            return Err(Error::Tls {
                pep: key.pep.clone(),
                reason: "the PEP did not agree to HTTP/2 (ALPN h2): use HTTP/1.1 for this PEP, \
                         or enable HTTP/2 on its TLS port"
                    .into(),
            });
        }
        let prefix = self.hear_first(key, &mut stream, response_timeout).await?;
        let conn = tokio::time::timeout(response_timeout, self.handshake(key, stream, prefix))
            .await
            .map_err(|_| Error::Timeout(response_timeout))?
            .map_err(|e| http_error(key, e))?;
        let slot = self.inner.slot(conn.clone(), true);
        lock(&self.inner.keys)
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn);
        Ok((slot, Some(turn)))
    }

    /// Over TLS, waits for the PEP to speak first (its SETTINGS) before anything is written
    /// after the handshake, and returns what it sent. In TLS 1.3 the PEP judges the client
    /// certificate after the client's handshake is done; when it refuses, it sends an alert
    /// and closes. Had we written meanwhile (the HTTP/2 preface), its close would turn into a
    /// reset that discards the alert before we read it, and the refusal would be reported as
    /// an anonymous connection failure. Costs one round trip under TLS 1.3 (servers send
    /// their first data once they have the client's Finished), on new connections only.
    ///
    /// HTTP/2 lets a server wait for the client's preface before sending its own: a PEP that
    /// says nothing within [`SPEAKS_FIRST_WAIT`] is remembered as one that waits, and is not
    /// waited for again for [`SILENT_FOR`].
    async fn hear_first(
        &self,
        key: &Key,
        stream: &mut PepStream,
        response_timeout: Duration,
    ) -> Result<Bytes, Error> {
        if matches!(stream, PepStream::Plain(_))
            || lock(&self.inner.silent)
                .get(&key.pep)
                .is_some_and(|since| since.elapsed() < SILENT_FOR)
        {
            return Ok(Bytes::new());
        }
        let wait = SPEAKS_FIRST_WAIT.min(response_timeout);
        let mut buf = vec![0u8; 16 * 1024];
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            // n == 0: the PEP closed; hyper's handshake and request report it.
            Ok(Ok(n)) => Ok(Bytes::copy_from_slice(&buf[..n])),
            Ok(Err(e)) => match super::tls_reason(&e) {
                Some(reason) => Err(Error::Tls {
                    pep: key.pep.clone(),
                    reason,
                }),
                // Not TLS (a reset, an EOF without close_notify): the connection's failure,
                // reported by the handshake and request as any other.
                None => {
                    debug!(pep = %key.pep, error = %e, "the PEP's connection failed right after the TLS handshake");
                    Ok(Bytes::new())
                }
            },
            Err(_) => {
                // Cancel-safe: rustls keeps whatever part of a record it has read.
                let mut silent = lock(&self.inner.silent);
                silent.retain(|_, since| since.elapsed() < SILENT_FOR);
                if silent.len() < MAX_SILENT_PEPS {
                    silent.insert(key.pep.clone(), Instant::now());
                    info!(pep = %key.pep, waited = ?wait, remembered = ?SILENT_FOR,
                        "the PEP sends nothing before the client's HTTP/2 preface: not waiting for it meanwhile");
                } else {
                    info!(pep = %key.pep, waited = ?wait,
                        "the PEP sends nothing before the client's HTTP/2 preface (too many such PEPs to remember it)");
                }
                Ok(Bytes::new())
            }
        }
    }

    async fn handshake(
        &self,
        key: &Key,
        stream: PepStream,
        prefix: Bytes,
    ) -> Result<Arc<Conn>, hyper::Error> {
        // Many streams' small frames share this socket: Nagle would hold one stream's HEADERS
        // behind another's unacknowledged bytes (a delayed-ACK stall of ~40 ms).
        let _ = stream.tcp().set_nodelay(true);
        let tls_failure = Arc::new(OnceLock::new());
        let (ack, settled) = AckWatch::new();
        let s = self.inner.settings;
        let (sender, task) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_max_send_streams(s.max_streams)
            .initial_stream_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(Watched {
                io: stream,
                prefix,
                tls_failure: tls_failure.clone(),
                ack,
            }))
            .await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            sender,
            task: Mutex::new(Some(Box::pin(task))),
            streams: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            wake: Notify::new(),
            tls_failure,
            settled,
            pool: Arc::downgrade(&self.inner),
        });
        self.inner.connections.fetch_add(1, Ordering::AcqRel);
        self.inner
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        debug!(pep = %key.pep, actor = %key.actor, generation = key.generation, conn = id,
            "HTTP/2 connection to the PEP open");
        tokio::spawn(drive(
            conn.clone(),
            Arc::downgrade(&self.inner),
            key.clone(),
        ));
        Ok(conn)
    }

    /// The actor is gone: its connections take no new streams and close once the streams
    /// still open on them have ended.
    pub fn remove(&self, actor_id: &str) {
        let removed: Vec<Arc<Conn>> = {
            let mut keys = lock(&self.inner.keys);
            let gone: Vec<Key> = keys
                .keys()
                .filter(|k| k.actor == actor_id)
                .cloned()
                .collect();
            gone.iter()
                .filter_map(|k| keys.remove(k))
                .flat_map(|e| e.conns)
                .collect()
        };
        for conn in removed {
            conn.close();
        }
    }

    /// Connections and streams now, and the totals since start.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        Stats {
            connections: i.connections.load(Ordering::Acquire),
            streams: i.streams.load(Ordering::Acquire),
            connections_opened_total: i.connections_opened.load(Ordering::Relaxed),
            streams_opened_total: i.streams_opened.load(Ordering::Relaxed),
            goaways_total: i.goaways.load(Ordering::Relaxed),
        }
    }
}

/// Polls hyper's dispatch task of `conn` until it ends (GOAWAY, connection failure), the
/// connection is closed by the pool, or it has been idle for the idle timeout; then takes it
/// out of the pool. Ending the dispatch task makes h2 close the connection gracefully once
/// its open streams have ended.
async fn drive(conn: Arc<Conn>, pool: Weak<Inner>, key: Key) {
    let idle_timeout = match pool.upgrade() {
        Some(p) => p.limits.idle_timeout,
        None => return,
    };
    let mut task = std::pin::pin!(std::future::poll_fn(|cx| {
        match lock(&conn.task).as_mut() {
            Some(task) => task.as_mut().poll(cx).map(Some),
            None => Poll::Ready(None),
        }
    }));
    let ended = loop {
        let idle_for = lock(&conn.idle_since).elapsed();
        let busy = conn.streams.load(Ordering::Acquire) > 0;
        if conn.closed.load(Ordering::Acquire) {
            break "closed by the pool";
        }
        if !busy && idle_for >= idle_timeout {
            break "idle";
        }
        let check = if busy {
            idle_timeout
        } else {
            idle_timeout - idle_for
        };
        tokio::select! {
            result = &mut task => break match result {
                Some(Ok(())) => {
                    if let Some(p) = pool.upgrade() {
                        p.goaways.fetch_add(1, Ordering::Relaxed);
                    }
                    "ended by the PEP (GOAWAY or close)"
                }
                Some(Err(e)) => {
                    info!(pep = %key.pep, actor = %key.actor, conn = conn.id, error = %e,
                        "HTTP/2 connection to the PEP failed");
                    "failed"
                }
                None => "closed by the pool",
            },
            _ = conn.wake.notified() => {}
            _ = tokio::time::sleep(check) => {}
        }
    };
    conn.closed.store(true, Ordering::Release);
    // Dropping hyper's dispatch task is what lets h2 send GOAWAY and close.
    drop(lock(&conn.task).take());
    if let Some(p) = pool.upgrade() {
        p.forget(&key, conn.id);
    }
    debug!(pep = %key.pep, actor = %key.actor, conn = conn.id, streams = conn.streams.load(Ordering::Acquire),
        reason = ended, "HTTP/2 connection to the PEP retired");
}

/// Why one CONNECT attempt failed.
enum Attempt {
    Refused(StatusCode),
    Http(hyper::Error),
}

/// Sends the CONNECT on `slot`'s connection; on 2xx, the stream as a byte pipe.
async fn connect(
    slot: &Slot,
    request: &Request<Empty<Bytes>>,
) -> Result<(Upgraded, StatusCode), Attempt> {
    let mut sender = slot.conn.sender.clone();
    let response = sender
        .send_request(copy(request))
        .await
        .map_err(Attempt::Http)?;
    let status = response.status();
    if !status.is_success() {
        // Dropping the answer resets the stream if the PEP left it open.
        return Err(Attempt::Refused(status));
    }
    let io = hyper::upgrade::on(response).await.map_err(Attempt::Http)?;
    Ok((io, status))
}

/// The request again (a retry needs a second one; the body is empty).
fn copy(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// A CONNECT the PEP did not process, so it may be sent again.
enum Unprocessed {
    /// The PEP refused the stream (REFUSED_STREAM); its connection is fine.
    Stream,
    /// The connection failed or is going away (GOAWAY, closed, broken).
    Connection,
}

/// Whether the error says the request was never processed, and why.
fn unprocessed(e: &hyper::Error) -> Option<Unprocessed> {
    if e.is_canceled() || e.is_closed() {
        return Some(Unprocessed::Connection);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<::h2::Error>() {
            return if h2.is_go_away() || h2.is_io() {
                Some(Unprocessed::Connection)
            } else if h2.reason() == Some(::h2::Reason::REFUSED_STREAM) {
                Some(Unprocessed::Stream)
            } else {
                None
            };
        }
        if c.is::<io::Error>() {
            return Some(Unprocessed::Connection);
        }
        cause = c.source();
    }
    None
}

/// An HTTP failure whose cause is TLS (the PEP's alert, e.g. it refused the client
/// certificate, which TLS 1.3 delivers after the handshake) becomes [`Error::Tls`].
fn http_error(key: &Key, e: hyper::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>()
            && let Some(reason) = super::tls_reason(io)
        {
            return Error::Tls {
                pep: key.pep.clone(),
                reason,
            };
        }
        cause = c.source();
    }
    Error::Http(e)
}

/// An open tunnel: one CONNECT stream on a pooled HTTP/2 connection. Dropping it resets the
/// stream; shutting its write side down half-closes it (END_STREAM).
pub struct Stream {
    /// The stream's bytes (declared first: dropped, and so reset, before the slot is freed).
    pub io: TokioIo<Upgraded>,
    /// The PEP's answer.
    pub status: StatusCode,
    slot: Slot,
}

impl Stream {
    /// The pool's id of the connection carrying this stream (for logs).
    pub fn connection(&self) -> u64 {
        self.slot.conn.id
    }

    /// Whether the stream went on a connection that was already open.
    pub fn reused(&self) -> bool {
        !self.slot.fresh
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("status", &self.status)
            .field("connection", &self.connection())
            .field("reused", &self.reused())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
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

    /// Sends END_STREAM once the bytes written so far are out.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl crate::relay::Peer for Stream {
    /// Never plain TCP: the stream's bytes are HTTP/2 frames on the wire.
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

#[cfg(test)]
mod tests;
