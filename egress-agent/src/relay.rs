//! Relaying an open tunnel's bytes both ways, as cheaply as the two ends allow.
//!
//! Each direction (client -> upstream, upstream -> client) runs one of two engines:
//! - **splice**: when both ends are plain TCP sockets (a direct dial, a plain-TCP PEP link),
//!   bytes go socket -> pipe -> socket with `splice(2)` and never enter user space. The pipe is
//!   taken on the first readable event and given back (to a small pool) as soon as it is empty
//!   and the source has nothing more to read, so an idle connection holds no pipe.
//! - **copy**: a user-space buffer for any `AsyncRead + AsyncWrite` peer (a TLS PEP link). The
//!   buffer exists only while bytes are moving: it is allocated when a read is attempted and
//!   freed when the read finds nothing, so an idle connection holds no buffer. It starts at
//!   [`INITIAL_BUFFER`] and grows to [`LARGE_BUFFER`], then to the configured maximum, each
//!   time a read fills it (ztunnel's approach: small for chatty connections, large for bulk).
//!
//! Both keep what `copy_bidirectional` promised the pipeline: an EOF one way becomes a
//! `shutdown(SHUT_WR)` the other way while the other direction keeps going; the counts are the
//! bytes written to each side, exact even when the relay ends in an error; the first error of
//! either direction ends the relay and is returned, so the caller can reset both sockets.
use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, Interest},
    net::TcpStream,
};
use tracing::{debug, warn};

use crate::tunnel::PepStream;

/// Size of a copy buffer's first allocation: enough for a typical request or response head.
pub const INITIAL_BUFFER: usize = 1024;
/// Size a copy buffer grows to after a read filled [`INITIAL_BUFFER`] (a TLS record's size).
pub const LARGE_BUFFER: usize = 16 * 1024;
/// Default for the largest copy buffer and pipe of a direction (`--relay-buffer-bytes`).
pub const DEFAULT_MAX_BUFFER: usize = 256 * 1024;
/// Bound on `--relay-buffer-bytes`: a busy tunnel may hold twice it.
pub const MAX_BUFFER: usize = 16 * 1024 * 1024;
/// Largest pipe a splice relay asks for, whatever `--relay-buffer-bytes` says. A pipe holds up
/// to its size of the connection's data in kernel memory while the receiver is slow: with
/// thousands of bulk connections, a bound per direction is what keeps that memory bounded
/// (and pipes past `/proc/sys/fs/pipe-max-size`, 1 MiB by default, need privileges).
pub const MAX_PIPE: usize = 1024 * 1024;
/// Empty pipes kept for reuse. Taking a pipe from the pool costs a lock instead of three
/// system calls (pipe2, fcntl, and two closes later); the bound keeps the idle pool at
/// `2 x POOLED_PIPES` file descriptors.
pub const POOLED_PIPES: usize = 64;

/// Which relay engine a tunnel uses where both of its ends are plain TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A user-space buffer per direction, for every tunnel.
    Copy,
    /// `splice(2)` through a pipe per direction where both ends are plain TCP, a copy buffer
    /// otherwise (a TLS PEP link) or when no pipe can be had.
    #[default]
    Splice,
}

impl Mode {
    /// The name used by the flag, the config file and the logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::Splice => "splice",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How tunnels are relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The engine where both ends are plain TCP.
    pub mode: Mode,
    /// The most bytes a direction holds: the largest copy buffer, and the pipe size (at most
    /// [`MAX_PIPE`]).
    pub max_buffer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::default(),
            max_buffer: DEFAULT_MAX_BUFFER,
        }
    }
}

/// One end of a relay: any byte stream, and its TCP socket when the stream's bytes are the
/// socket's own (no TLS in between), which is what lets the splice engine skip user space.
pub trait Peer: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket carrying exactly this stream's bytes, if there is one.
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

impl Peer for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Peer for PepStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            PepStream::Plain(s) => Some(s),
            PepStream::Tls(_) => None,
        }
    }
}

/// The engines a relay ran, for the connection's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Copy buffers both ways.
    Copy,
    /// splice both ways.
    Splice,
    /// splice, until a direction could get no pipe and went on with a copy buffer.
    SpliceThenCopy,
}

impl Engine {
    /// Stable name for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Engine::Copy => "copy",
            Engine::Splice => "splice",
            Engine::SpliceThenCopy => "splice+copy",
        }
    }
}

/// What a relay holds in user space and in pipes right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Bytes allocated for copy buffers, both directions.
    pub buffer_bytes: usize,
    /// Pipes held, both directions.
    pub pipes: usize,
    /// Peeked and leftover bytes not yet written.
    pub first_bytes: usize,
}

/// How a relay ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes written to the upstream (the peeked bytes included).
    pub bytes_up: u64,
    /// Bytes written to the client (the leftover bytes included).
    pub bytes_down: u64,
    /// The engines it ran.
    pub engine: Engine,
    /// `Ok` when both directions ended with an EOF passed on; the first error otherwise.
    pub result: io::Result<()>,
}

/// Relays between `client` and `upstream` until both directions are done: first `peeked`
/// (client bytes read while classifying) to the upstream and `leftover` (upstream bytes read
/// with the PEP's answer) to the client, then everything else.
pub async fn relay<A, B>(
    client: &mut A,
    upstream: &mut B,
    peeked: Bytes,
    leftover: Bytes,
    settings: Settings,
) -> Relayed
where
    A: Peer + ?Sized,
    B: Peer + ?Sized,
{
    let mut relay = Relay::new(client, upstream, peeked, leftover, settings);
    let result = (&mut relay).await;
    Relayed {
        bytes_up: relay.bytes_up(),
        bytes_down: relay.bytes_down(),
        engine: relay.engine(),
        result,
    }
}

/// A relay in progress: a future that ends when both directions are done (or one failed),
/// with its counts and what it holds readable at any time.
pub struct Relay<'a, A: ?Sized, B: ?Sized> {
    client: &'a mut A,
    upstream: &'a mut B,
    up: Direction,
    down: Direction,
}

impl<'a, A: Peer + ?Sized, B: Peer + ?Sized> Relay<'a, A, B> {
    /// A relay that starts with `peeked` upstream and `leftover` to the client.
    pub fn new(
        client: &'a mut A,
        upstream: &'a mut B,
        peeked: Bytes,
        leftover: Bytes,
        settings: Settings,
    ) -> Self {
        let splice = settings.mode == Mode::Splice
            && client.plain_tcp().is_some()
            && upstream.plain_tcp().is_some();
        Relay {
            up: Direction::new(peeked, splice, settings.max_buffer),
            down: Direction::new(leftover, splice, settings.max_buffer),
            client,
            upstream,
        }
    }

    /// Bytes written to the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.up.progress.moved
    }

    /// Bytes written to the client so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.progress.moved
    }

    /// The engines run so far.
    pub fn engine(&self) -> Engine {
        match (self.up.spliced, self.up.fell_back || self.down.fell_back) {
            (false, _) => Engine::Copy,
            (true, false) => Engine::Splice,
            (true, true) => Engine::SpliceThenCopy,
        }
    }

    /// What the relay holds now: an idle relay holds nothing.
    pub fn held(&self) -> Held {
        let (a, b) = (self.up.held(), self.down.held());
        Held {
            buffer_bytes: a.buffer_bytes + b.buffer_bytes,
            pipes: a.pipes + b.pipes,
            first_bytes: a.first_bytes + b.first_bytes,
        }
    }

    /// Makes every direction take its pipes from `source` instead of the pool (tests).
    #[cfg(test)]
    fn with_pipes(mut self, source: fn(usize) -> io::Result<Pipe>) -> Self {
        for d in [&mut self.up, &mut self.down] {
            if let Way::Splice(s) = &mut d.way {
                s.source = source;
            }
        }
        self
    }
}

impl<A: Peer + ?Sized, B: Peer + ?Sized> Future for Relay<'_, A, B> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        let up = me.up.poll(cx, &mut *me.client, &mut *me.upstream)?;
        let down = me.down.poll(cx, &mut *me.upstream, &mut *me.client)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// Bytes written by a direction, and whether its writer may hold some unflushed.
#[derive(Default)]
struct Progress {
    moved: u64,
    need_flush: bool,
}

enum State {
    /// Moving bytes.
    Running,
    /// The reader is at EOF and everything is written: half-closing the writer.
    ShuttingDown,
    /// Half-closed.
    Done,
}

/// The engine of one direction.
enum Way {
    Copy(CopyBuf),
    Splice(Splicer),
}

/// One direction of a relay.
struct Direction {
    /// Bytes to write before any read (peeked or leftover); empty, and its memory released,
    /// once written.
    first: Bytes,
    progress: Progress,
    state: State,
    way: Way,
    max_buffer: usize,
    /// Started with splice.
    spliced: bool,
    /// Went on with a copy buffer for want of a pipe.
    fell_back: bool,
}

impl Direction {
    fn new(first: Bytes, splice: bool, max_buffer: usize) -> Self {
        Direction {
            first,
            progress: Progress::default(),
            state: State::Running,
            way: if splice {
                Way::Splice(Splicer::new(max_buffer))
            } else {
                Way::Copy(CopyBuf::new(max_buffer))
            },
            max_buffer,
            spliced: splice,
            fell_back: false,
        }
    }

    fn held(&self) -> Held {
        let (buffer_bytes, pipes) = match &self.way {
            Way::Copy(c) => (c.buf.capacity(), 0),
            Way::Splice(s) => (0, usize::from(s.pipe.is_some())),
        };
        Held {
            buffer_bytes,
            pipes,
            first_bytes: self.first.len(),
        }
    }

    /// Reads from `r` and writes to `w` until `r` is at EOF and `w` is half-closed.
    fn poll<R: Peer + ?Sized, W: Peer + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.state {
                State::Running => {
                    while !self.first.is_empty() {
                        let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.first))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        self.first.advance(n);
                        self.progress.moved += n as u64;
                        self.progress.need_flush = true;
                    }
                    // Written: the peek buffer (or hyper's read buffer) is freed now, not at
                    // the end of the tunnel.
                    self.first = Bytes::new();
                    match &mut self.way {
                        Way::Copy(c) => {
                            ready!(c.poll(cx, r, w, &mut self.progress))?;
                            self.state = State::ShuttingDown;
                        }
                        Way::Splice(s) => {
                            let spliced = match (r.plain_tcp(), w.plain_tcp()) {
                                (Some(src), Some(dst)) => {
                                    ready!(s.poll(cx, src, dst, &mut self.progress))?
                                }
                                // Splice is only chosen for two plain TCP ends.
                                _ => Spliced::NoPipe(io::Error::other("not a plain TCP pair")),
                            };
                            match spliced {
                                Spliced::Eof => self.state = State::ShuttingDown,
                                Spliced::NoPipe(e) => {
                                    warn_fallback(&e);
                                    self.way = Way::Copy(CopyBuf::new(self.max_buffer));
                                    self.fell_back = true;
                                }
                                Spliced::Urgent => {
                                    debug!(
                                        "urgent data (MSG_OOB) in a spliced stream: relaying it with a copy buffer"
                                    );
                                    self.way = Way::Copy(CopyBuf::new(self.max_buffer));
                                    self.fell_back = true;
                                }
                            }
                        }
                    }
                }
                State::ShuttingDown => {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Logs (at most once a second) that a direction went on with a copy buffer.
fn warn_fallback(e: &io::Error) {
    static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_WARNED.swap(now, Ordering::Relaxed) != now {
        warn!(error = %e, "no pipe for a splice relay: relaying with a copy buffer instead \
            (if the error is EMFILE, raise the agent's open-files limit)");
    }
}

/// The copy engine's state for one direction.
struct CopyBuf {
    /// Bytes read and not yet written are `buf[pos..]`. No capacity while idle.
    buf: Vec<u8>,
    pos: usize,
    /// Size of the next allocation.
    size: usize,
    max: usize,
    read_done: bool,
}

impl CopyBuf {
    fn new(max: usize) -> Self {
        CopyBuf {
            buf: Vec::new(),
            pos: 0,
            size: INITIAL_BUFFER.min(max).max(1),
            max: max.max(1),
            read_done: false,
        }
    }

    /// Copies until `r` is at EOF and everything read is written and flushed.
    fn poll<R: AsyncRead + Unpin + ?Sized, W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        progress: &mut Progress,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos == self.buf.len() && !self.read_done {
                self.pos = 0;
                self.buf.clear();
                if self.buf.capacity() < self.size {
                    self.buf = Vec::with_capacity(self.size);
                }
                let read = std::pin::pin!(r.read_buf(&mut self.buf)).poll(cx);
                match read {
                    Poll::Pending => {
                        // Nothing to write, nothing to read: the buffer goes, so that an idle
                        // connection holds none. The next read allocates it again.
                        self.buf = Vec::new();
                        // A writer that buffers (TLS) must not sit on bytes while we wait.
                        if progress.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            progress.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(0)) => {
                        self.read_done = true;
                        self.buf = Vec::new();
                    }
                    Poll::Ready(Ok(n)) => {
                        if n >= self.size {
                            self.size = grow(self.size, self.max);
                        }
                    }
                }
            }
            while self.pos < self.buf.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                progress.moved += n as u64;
                progress.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                progress.need_flush = false;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The buffer size after a read filled one of `size`: [`LARGE_BUFFER`], then `max`.
fn grow(size: usize, max: usize) -> usize {
    let next = if size < LARGE_BUFFER {
        LARGE_BUFFER
    } else {
        max
    };
    next.clamp(size, max.max(size))
}

/// How a splice direction stopped splicing.
enum Spliced {
    /// The source is at EOF and the pipe is empty.
    Eof,
    /// No pipe could be had (or the socket cannot splice): go on with a copy buffer. Nothing
    /// is lost: this happens only with an empty pipe.
    NoPipe(io::Error),
    /// The source is at a TCP urgent mark (the peer sent `MSG_OOB`): splice(2) stops there
    /// for good, while recv(2) steps over the urgent byte, so the direction goes on with a
    /// copy buffer (the pipe is empty). Without this the direction would hang until the
    /// peer's FIN and then drop everything after the mark.
    Urgent,
}

/// The splice engine's state for one direction.
struct Splicer {
    /// Held only while bytes are in flight or being read.
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written to the destination.
    in_pipe: usize,
    read_done: bool,
    /// Anything spliced yet (an unsupported socket shows on the first splice).
    any: bool,
    pipe_bytes: usize,
    source: fn(usize) -> io::Result<Pipe>,
}

impl Splicer {
    fn new(max_buffer: usize) -> Self {
        Splicer {
            pipe: None,
            in_pipe: 0,
            read_done: false,
            any: false,
            pipe_bytes: max_buffer.clamp(1, MAX_PIPE),
            source: Pipe::take,
        }
    }

    /// Gives the pipe back to the pool (it is empty).
    fn release(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            pipe.give_back();
        }
    }

    /// Splices until `src` is at EOF and the pipe is drained into `dst`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        progress: &mut Progress,
    ) -> Poll<io::Result<Spliced>> {
        loop {
            if self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(io::Error::other(
                        "relay: bytes counted in a pipe the relay no longer holds",
                    )));
                };
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_io(Interest::WRITABLE, || splice(&pipe.read, dst, self.in_pipe)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.in_pipe = self.in_pipe.saturating_sub(n);
                        progress.moved += n as u64;
                    }
                    // Readiness was cleared: the next poll_write_ready waits.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.read_done {
                self.release();
                return Poll::Ready(Ok(Spliced::Eof));
            }
            match src.poll_read_ready(cx) {
                Poll::Pending => {
                    // Idle with an empty pipe: an idle connection holds no pipe.
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let pipe = match self.pipe.take() {
                Some(pipe) => pipe,
                None => match (self.source)(self.pipe_bytes) {
                    Ok(pipe) => pipe,
                    Err(e) => return Poll::Ready(Ok(Spliced::NoPipe(e))),
                },
            };
            let read = src.try_io(Interest::READABLE, || splice(src, &pipe.write, pipe.size));
            self.pipe = Some(pipe);
            // Nothing read although the socket was readable (or "EOF"): at an urgent mark
            // splice neither reads nor skips, and only recv(2) can go on.
            let stuck = matches!(&read, Ok(0))
                || matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            if stuck && at_urgent_mark(src) {
                self.release();
                return Poll::Ready(Ok(Spliced::Urgent));
            }
            match read {
                Ok(0) => self.read_done = true,
                Ok(n) => {
                    self.in_pipe = n;
                    self.any = true;
                }
                // Readiness was cleared: the next poll_read_ready waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e)
                    if !self.any
                        && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) =>
                {
                    self.release();
                    return Poll::Ready(Ok(Spliced::NoPipe(e)));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        // A pipe with bytes in it (a relay that failed) is closed, never pooled.
        if self.in_pipe == 0 {
            self.release();
        }
    }
}

/// Whether the next byte to read from `socket` is a TCP urgent mark (`SIOCATMARK`).
fn at_urgent_mark(socket: &TcpStream) -> bool {
    // SIOCATMARK from asm-generic/sockios.h (the libc crate does not export it).
    const SIOCATMARK: libc::c_ulong = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: the ioctl writes one int into `at`, which lives for the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            SIOCATMARK as _,
            &mut at,
        )
    };
    rc == 0 && at != 0
}

/// `splice(2)` of up to `len` bytes, moving pages where it can and never blocking. Into a
/// socket whose peer is gone it fails with `EPIPE` (the kernel also raises `SIGPIPE`, which
/// Rust programs ignore).
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    loop {
        match nix::fcntl::splice(
            &from,
            None,
            &to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Err(Errno::EINTR) => continue,
            result => return result.map_err(io::Error::from),
        }
    }
}

/// The pipes no direction holds: empty, of `asked` size.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A pipe between the two splices of a direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What was asked for (the pool hands out only pipes asked with the same size).
    asked: usize,
    /// What the kernel gave (it rounds to pages, and may refuse to grow the pipe).
    size: usize,
}

impl Pipe {
    /// A pipe of `bytes` from the pool, or a new one.
    fn take(bytes: usize) -> io::Result<Pipe> {
        let pooled = POOL.lock().ok().and_then(|mut pool| {
            pool.iter()
                .rposition(|p| p.asked == bytes)
                .map(|i| pool.swap_remove(i))
        });
        match pooled {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(bytes),
        }
    }

    /// A new pipe of about `bytes` (its default size if the kernel refuses to resize it).
    fn new(bytes: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        let size = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(want))
            .or_else(|_| nix::fcntl::fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_err(io::Error::from)?;
        Ok(Pipe {
            read,
            write,
            asked: bytes,
            size: usize::try_from(size).unwrap_or(0).max(1),
        })
    }

    /// Back to the pool if it is empty and the pool has room; closed otherwise.
    fn give_back(self) {
        // The relay's count says it is empty; the kernel confirms, so that no byte of one
        // connection can ever reach another through a reused pipe.
        if self.bytes_in().ok() != Some(0) {
            return;
        }
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOLED_PIPES
        {
            pool.push(self);
        }
    }

    /// Bytes in the pipe (`FIONREAD`).
    fn bytes_in(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int to the pointer, which is valid for that write.
        let ret = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests;
