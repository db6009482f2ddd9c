//! Connection classifier: finds the name an actor's connection is meant for from the first
//! bytes the client sends (TLS SNI, HTTP/1.x `Host`), so the tunnel to the PEP can be opened to
//! `name:port` instead of a bare IP address.
//!
//! The classifier only looks; it never consumes. Every byte read stays in the caller's buffer
//! and is replayed upstream unchanged. Whatever cannot be classified (server-first protocols,
//! unknown protocols, malformed or oversized hellos, names that fail validation) falls back to
//! the original destination address, which is always safe: the PEP then decides on the IP.

pub mod http;
pub mod tls;

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::{BufMut as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Outcome of looking at the first bytes of a connection with one classifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet: more could still make this classifier match.
    Incomplete,
    /// These bytes cannot match this classifier, whatever follows.
    NotMatched,
    /// The announced host: validated, lowercased, no trailing dot, no port. From an HTTP `Host`
    /// (or request-target) holding an IP literal, it is the address's canonical text instead.
    Name(String),
}

/// Where the authority's host came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The TLS ClientHello's server_name extension.
    Sni,
    /// The HTTP/1.x `Host` header (or the absolute-form request-target).
    Host,
    /// No name in the first bytes, but the actor's own DNS lookup a moment earlier answered
    /// the original destination address for this name (the DNS forwarder's record).
    Dns,
    /// Nothing usable was found: the original destination address.
    Ip,
}

impl Source {
    /// Short lowercase label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Sni => "sni",
            Source::Host => "host",
            Source::Dns => "dns",
            Source::Ip => "ip",
        }
    }
}

/// Host part of an [`Authority`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A validated DNS name (lowercase, no trailing dot).
    Name(String),
    /// An IP address.
    Ip(IpAddr),
}

/// What the connection is opened to at the PEP: always host + the ORIGINAL destination port
/// (never a port taken from SNI/Host, never an assumed 443/80).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// Host the client named, or the original destination address.
    pub host: Host,
    /// Port of the original destination.
    pub port: u16,
    /// Where `host` came from.
    pub source: Source,
}

impl Authority {
    /// The original destination itself, for connections that could not be classified.
    fn fallback(original_dst: SocketAddr) -> Self {
        Authority {
            host: Host::Ip(original_dst.ip()),
            port: original_dst.port(),
            source: Source::Ip,
        }
    }

    /// `name` (from [`Sniff::Name`]) on the original destination's port.
    fn named(name: String, source: Source, port: u16) -> Self {
        // Only an HTTP Host can hold an IP literal (validated names never parse as one, see
        // `normalize_name`); it stays an address so the PEP does not treat it as a DNS name.
        let host = match name.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(name),
        };
        Authority { host, port, source }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Bounds on how much and how long [`classify`] reads before giving up on a name.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes buffered (counting what the buffer already held).
    pub max_bytes: usize,
    /// Longest wait, from the call, for the client's first bytes to name a host.
    pub timeout: Duration,
}

/// One full TLS record: a 5-byte header and 2^14 bytes of plaintext.
pub(crate) const DEFAULT_MAX_BYTES: usize = 16 * 1024 + 5;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            timeout: Duration::from_millis(200),
        }
    }
}

/// Tries TLS, then HTTP; `Incomplete` while either could still match. The source of a
/// non-name result is [`Source::Ip`].
pub fn sniff(buf: &[u8]) -> (Sniff, Source) {
    sniff_bounded(buf, DEFAULT_MAX_BYTES)
}

/// [`sniff`], with TLS handshakes that cannot fit in `max_bytes` rejected up front.
fn sniff_bounded(buf: &[u8], max_bytes: usize) -> (Sniff, Source) {
    match tls::sniff_bounded(buf, max_bytes) {
        Sniff::Name(name) => return (Sniff::Name(name), Source::Sni),
        // A TLS record starts with 0x16, which no HTTP method does: HTTP cannot match, except
        // on an empty buffer, which is Incomplete either way.
        Sniff::Incomplete => return (Sniff::Incomplete, Source::Ip),
        Sniff::NotMatched => {}
    }
    match http::sniff(buf) {
        Sniff::Name(name) => (Sniff::Name(name), Source::Host),
        other => (other, Source::Ip),
    }
}

/// What the first bytes of a connection are, whatever name they gave (or did not): a flow the
/// agent refuses is answered in its own protocol ([`crate::refuse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A whole TLS ClientHello, with or without SNI.
    Tls {
        /// The legacy version of its first record (0x0301 for most clients, TLS 1.3 too).
        record_version: u16,
    },
    /// A whole HTTP/1.x request head, with or without a usable `Host`.
    Http,
    /// Anything else: no bytes, a server-first or unknown protocol, a partial hello or head.
    Other,
}

/// What the bytes [`classify`] left in its buffer are.
pub fn protocol(buf: &[u8]) -> Protocol {
    if let Some(record_version) = tls::client_hello_version(buf) {
        return Protocol::Tls { record_version };
    }
    if http::is_request(buf) {
        return Protocol::Http;
    }
    Protocol::Other
}

/// Why [`classify`] fell back to the original destination (for the trace only).
#[derive(Clone, Copy, Debug)]
enum Fallback {
    NotMatched,
    Full,
    Timeout,
    Eof,
}

impl Fallback {
    const fn as_str(self) -> &'static str {
        match self {
            Fallback::NotMatched => "not matched",
            Fallback::Full => "max bytes buffered",
            Fallback::Timeout => "timeout",
            Fallback::Eof => "eof",
        }
    }
}

/// Most bytes reserved in `buf` for one read: a ClientHello (even a post-quantum one) fits.
const READ_CHUNK: usize = 4096;

/// Reads from `reader` into `buf` (appending) until a name is found, neither protocol can
/// match, `limits.max_bytes` are buffered, `limits.timeout` has passed since the call, or EOF.
/// Returns the authority: the name with `original_dst.port()`, or `original_dst` itself
/// (Source::Ip). The bytes read stay in `buf` (the caller replays them unchanged upstream).
/// Errors only on an I/O error of the reader. Never panics, on any input.
pub async fn classify<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    original_dst: SocketAddr,
    limits: &Limits,
) -> io::Result<Authority> {
    // One deadline for the whole call, not per read: a client trickling bytes cannot hold the
    // connection longer than `timeout`. A timeout too large to add is no deadline at all.
    let deadline = tokio::time::Instant::now().checked_add(limits.timeout);
    let why = loop {
        // Bytes the caller buffered beyond max_bytes are replayed but not looked at.
        let seen = buf.get(..limits.max_bytes).unwrap_or(buf);
        match sniff_bounded(seen, limits.max_bytes) {
            (Sniff::Name(name), source) => {
                let authority = Authority::named(name, source, original_dst.port());
                tracing::trace!(%original_dst, %authority, source = source.as_str(), "classified");
                return Ok(authority);
            }
            (Sniff::NotMatched, _) => break Fallback::NotMatched,
            (Sniff::Incomplete, _) => {}
        }
        let room = limits.max_bytes.saturating_sub(buf.len());
        if room == 0 {
            break Fallback::Full;
        }
        buf.reserve(room.min(READ_CHUNK));
        // `limit` keeps the read itself within max_bytes, whatever capacity `buf` has.
        let mut window = (&mut *buf).limit(room);
        let read = reader.read_buf(&mut window);
        let n = match deadline {
            // read_buf is cancel safe: a read cut short by the deadline loses no bytes.
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(n) => n?,
                Err(_) => break Fallback::Timeout,
            },
            None => read.await?,
        };
        if n == 0 {
            break Fallback::Eof;
        }
    };
    tracing::trace!(%original_dst, reason = why.as_str(), buffered = buf.len(), "unclassified");
    Ok(Authority::fallback(original_dst))
}

/// Longest DNS name in text form, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Validates a host name from the wire and returns it lowercased without one trailing dot.
///
/// Strict on purpose: the name goes to the PEP for policy and resolution, so anything a
/// resolver could read differently from what policy sees is refused (the caller then falls
/// back to the IP). Besides the character set and the length rules, a name whose last label
/// is numeric (`10.0.0.1`, `127.1`, `0x7f000001`) is refused: no TLD is numeric, and
/// `inet_aton`-style resolvers would turn it into an address.
pub(crate) fn normalize_name(raw: &[u8]) -> Option<String> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let mut last: &[u8] = &[];
    for label in name.split(|&b| b == b'.') {
        let valid = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return None;
        }
        last = label;
    }
    if looks_numeric(last) {
        return None;
    }
    String::from_utf8(name.to_ascii_lowercase()).ok()
}

/// Whether a label reads as a number to `inet_aton`: decimal/octal digits or `0x` hex.
fn looks_numeric(label: &[u8]) -> bool {
    let hex = label
        .strip_prefix(b"0x")
        .or_else(|| label.strip_prefix(b"0X"));
    match hex {
        Some(digits) => digits.iter().all(u8::is_ascii_hexdigit),
        None => label.iter().all(u8::is_ascii_digit),
    }
}

/// The fixture files (see tests/fixtures/README.md), for the classifiers' unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    /// curl 7.88.1's ClientHello, SNI `curl.fixture.egress.test`.
    pub const CURL_HELLO: &[u8] = include_bytes!("../tests/fixtures/curl_client_hello.bin");
    /// `openssl s_client`'s ClientHello, SNI `OpenSSL.Fixture.Egress.Test`.
    pub const OPENSSL_HELLO: &[u8] = include_bytes!("../tests/fixtures/openssl_client_hello.bin");
    /// Python 3.11 `ssl`'s ClientHello, SNI `python.fixture.egress.test`.
    pub const PYTHON_HELLO: &[u8] = include_bytes!("../tests/fixtures/python_client_hello.bin");
    /// `openssl s_client -noservername`: no SNI.
    pub const NO_SNI_HELLO: &[u8] =
        include_bytes!("../tests/fixtures/openssl_no_sni_client_hello.bin");
    /// Built X25519MLKEM768 ClientHello in one record, SNI `pq.fixture.egress.test`.
    pub const MLKEM_HELLO: &[u8] = include_bytes!("../tests/fixtures/mlkem_client_hello.bin");
    /// The same in two records.
    pub const MLKEM_HELLO_2: &[u8] =
        include_bytes!("../tests/fixtures/mlkem_client_hello_2records.bin");
    /// The same in three records.
    pub const MLKEM_HELLO_3: &[u8] =
        include_bytes!("../tests/fixtures/mlkem_client_hello_3records.bin");
    /// curl's plain HTTP request, `Host: curl.fixture.egress.test:18080`.
    pub const CURL_HTTP: &[u8] = include_bytes!("../tests/fixtures/curl_http_request.bin");
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        pin::Pin,
        task::{Context, Poll},
    };

    use proptest::prelude::*;
    use tokio::{
        io::{AsyncWriteExt as _, ReadBuf},
        net::{TcpListener, TcpStream},
        time::{Instant, timeout},
    };

    use super::*;

    use fixtures::{
        CURL_HELLO, CURL_HTTP, MLKEM_HELLO_3, NO_SNI_HELLO, OPENSSL_HELLO, PYTHON_HELLO,
    };

    /// Every real or built fixture that carries a name, with that name and its source.
    const NAMED: &[(&[u8], &str, Source)] = &[
        (CURL_HELLO, "curl.fixture.egress.test", Source::Sni),
        (OPENSSL_HELLO, "openssl.fixture.egress.test", Source::Sni),
        (PYTHON_HELLO, "python.fixture.egress.test", Source::Sni),
        (MLKEM_HELLO_3, "pq.fixture.egress.test", Source::Sni),
        (CURL_HTTP, "curl.fixture.egress.test", Source::Host),
    ];

    const DST4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8443);
    /// A generous outer bound: tests only check that calls return, never tight timings.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn name(s: &str) -> Sniff {
        Sniff::Name(s.to_string())
    }

    fn lim(max_bytes: usize, timeout: Duration) -> Limits {
        Limits { max_bytes, timeout }
    }

    #[test]
    fn protocol_of_what_the_peek_saw() {
        for hello in [
            CURL_HELLO,
            OPENSSL_HELLO,
            PYTHON_HELLO,
            NO_SNI_HELLO,
            MLKEM_HELLO_3,
        ] {
            assert_eq!(
                protocol(hello),
                Protocol::Tls {
                    record_version: u16::from_be_bytes([hello[1], hello[2]])
                }
            );
        }
        assert_eq!(protocol(CURL_HTTP), Protocol::Http);
        assert_eq!(protocol(b"GET / HTTP/1.0\r\n\r\n"), Protocol::Http);
        for other in [
            &b""[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            &CURL_HELLO[..100],
            &CURL_HTTP[..10],
        ] {
            assert_eq!(protocol(other), Protocol::Other, "{other:?}");
        }
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            normalize_name(b"Example.COM").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_name(b"example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_name(b"localhost").as_deref(), Some("localhost"));
        assert_eq!(
            normalize_name(b"_dmarc.a-b.example").as_deref(),
            Some("_dmarc.a-b.example")
        );
        assert_eq!(normalize_name(b"1.example").as_deref(), Some("1.example"));
        assert_eq!(
            normalize_name(b"0xcafe.example").as_deref(),
            Some("0xcafe.example")
        );
        assert_eq!(normalize_name(b"x.0xcafe").as_deref(), None);
        let label63 = "a".repeat(63);
        assert_eq!(
            normalize_name(label63.as_bytes()).as_deref(),
            Some(label63.as_str())
        );
        // 4 labels of 63 = 255 characters with the dots; 3 of 63 + one of 61 = 253.
        let long = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        assert_eq!(long.len(), 253);
        assert_eq!(
            normalize_name(long.as_bytes()).as_deref(),
            Some(long.as_str())
        );
        assert_eq!(
            normalize_name(format!("{long}.").as_bytes()).as_deref(),
            Some(long.as_str())
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let label64 = "a".repeat(64);
        let long = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(62));
        assert_eq!(long.len(), 254);
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"example.com..",
            b".example.com",
            b"a..b",
            b"exa mple.com",
            b"example.com:443",
            b"user@example.com",
            b"ex*ample.com",
            b"example.com\0",
            b"ex\xc3\xa4mple.com",
            b"10.0.0.1",
            b"127.1",
            b"0x7f000001",
            b"123",
            b"::1",
            label64.as_bytes(),
            long.as_bytes(),
        ] {
            assert_eq!(
                normalize_name(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn source_labels() {
        assert_eq!(Source::Sni.as_str(), "sni");
        assert_eq!(Source::Host.as_str(), "host");
        assert_eq!(Source::Ip.as_str(), "ip");
    }

    #[test]
    fn authority_display() {
        let named = Authority::named("example.com".into(), Source::Sni, 8443);
        assert_eq!(named.to_string(), "example.com:8443");
        let v4 = Authority::fallback(DST4);
        assert_eq!(v4.to_string(), "10.0.0.1:8443");
        let v6 = Authority::fallback("[fd00::1]:22".parse().unwrap());
        assert_eq!(v6.to_string(), "[fd00::1]:22");
        let literal = Authority::named("fd00::2".into(), Source::Host, 80);
        assert_eq!(literal.host, Host::Ip("fd00::2".parse().unwrap()));
        assert_eq!(literal.to_string(), "[fd00::2]:80");
    }

    #[test]
    fn default_limits() {
        let limits = Limits::default();
        assert_eq!(limits.max_bytes, 16 * 1024 + 5);
        assert_eq!(limits.timeout, Duration::from_millis(200));
    }

    #[test]
    fn sniff_tries_tls_then_http() {
        for (bytes, host, source) in NAMED {
            assert_eq!(sniff(bytes), (name(host), *source));
        }
        assert_eq!(sniff(NO_SNI_HELLO), (Sniff::NotMatched, Source::Ip));
        assert_eq!(sniff(b""), (Sniff::Incomplete, Source::Ip));
        assert_eq!(sniff(b"\x16"), (Sniff::Incomplete, Source::Ip));
        assert_eq!(sniff(b"GE"), (Sniff::Incomplete, Source::Ip));
        assert_eq!(
            sniff(b"SSH-2.0-OpenSSH_9.2\r\n"),
            (Sniff::NotMatched, Source::Ip)
        );
        assert_eq!(sniff(b"\0\0\0\x0a"), (Sniff::NotMatched, Source::Ip));
    }

    /// An HTTP request whose Host names `host`.
    fn request(host: &str) -> Vec<u8> {
        format!("GET /x HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n").into_bytes()
    }

    /// Writes `bytes` into one end of a duplex pipe (kept open) and classifies the other end.
    async fn classify_bytes(
        bytes: &[u8],
        dst: SocketAddr,
        limits: &Limits,
    ) -> (Authority, BytesMut) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        let mut buf = BytesMut::new();
        let authority = timeout(PATIENCE, classify(&mut server, &mut buf, dst, limits))
            .await
            .expect("classify returned")
            .unwrap();
        drop(client);
        (authority, buf)
    }

    #[tokio::test]
    async fn classify_fixtures_keep_the_original_port_and_bytes() {
        // A long timeout: a name must be found from the bytes, not by waiting.
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        for (bytes, host, source) in NAMED {
            let (authority, buf) = classify_bytes(bytes, DST4, &limits).await;
            assert_eq!(
                authority,
                Authority {
                    host: Host::Name(host.to_string()),
                    port: 8443,
                    source: *source
                }
            );
            assert_eq!(&buf[..], *bytes);
        }
    }

    #[tokio::test]
    async fn classify_host_port_is_ignored() {
        let (authority, buf) =
            classify_bytes(&request("example.com:8080"), DST4, &Limits::default()).await;
        assert_eq!(authority.to_string(), "example.com:8443");
        assert_eq!(authority.source, Source::Host);
        assert_eq!(&buf[..], &request("example.com:8080")[..]);
    }

    #[tokio::test]
    async fn classify_host_ip_literals() {
        let dst: SocketAddr = "[fd00::9]:3000".parse().unwrap();
        let (authority, _) = classify_bytes(&request("[::1]:8080"), dst, &Limits::default()).await;
        assert_eq!(
            authority,
            Authority {
                host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 3000,
                source: Source::Host
            }
        );
        let (authority, _) = classify_bytes(&request("192.0.2.7"), dst, &Limits::default()).await;
        assert_eq!(
            authority,
            Authority {
                host: Host::Ip("192.0.2.7".parse().unwrap()),
                port: 3000,
                source: Source::Host
            }
        );
    }

    #[tokio::test]
    async fn classify_unmatched_is_ip_at_once() {
        // The pipe stays open and the timeout is long: only NotMatched can end these quickly.
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        for bytes in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            NO_SNI_HELLO,
            &request("bad_host!.example"),
            b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
        ] {
            let (authority, buf) = classify_bytes(bytes, DST4, &limits).await;
            assert_eq!(authority, Authority::fallback(DST4));
            assert_eq!(&buf[..], bytes);
        }
    }

    #[tokio::test]
    async fn classify_oversized_tls_claim_is_ip_at_once() {
        // A ClientHello claiming 20,000 bytes cannot fit in max_bytes: no point waiting for it.
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        let start = b"\x16\x03\x01\x40\x00\x01\x00\x4e\x20\x03\x03";
        let (authority, buf) = classify_bytes(start, DST4, &limits).await;
        assert_eq!(authority, Authority::fallback(DST4));
        assert_eq!(&buf[..], start);
    }

    #[tokio::test]
    async fn classify_server_first_times_out_to_ip() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_millis(50));
        let started = Instant::now();
        let authority = timeout(PATIENCE, classify(&mut server, &mut buf, DST4, &limits))
            .await
            .expect("classify returned")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(authority, Authority::fallback(DST4));
        assert!(buf.is_empty());
        drop(client);
    }

    #[tokio::test]
    async fn classify_partial_then_silence_times_out_with_bytes_kept() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let part = &CURL_HELLO[..200];
        client.write_all(part).await.unwrap();
        let mut buf = BytesMut::new();
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_millis(50));
        let authority = timeout(PATIENCE, classify(&mut server, &mut buf, DST4, &limits))
            .await
            .expect("classify returned")
            .unwrap();
        assert_eq!(authority, Authority::fallback(DST4));
        assert_eq!(&buf[..], part);
    }

    #[tokio::test]
    async fn classify_eof_after_partial_data_is_ip() {
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        let part = &CURL_HTTP[..CURL_HTTP.len() - 2];
        let mut reader = part;
        let mut buf = BytesMut::new();
        let authority = timeout(PATIENCE, classify(&mut reader, &mut buf, DST4, &limits))
            .await
            .expect("classify returned")
            .unwrap();
        assert_eq!(authority, Authority::fallback(DST4));
        assert_eq!(&buf[..], part);
    }

    #[tokio::test]
    async fn classify_respects_max_bytes() {
        // Headers that never end: classify must stop at max_bytes, not read all 64 KiB.
        let mut endless = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        endless.resize(64 * 1024, b'a');
        for max_bytes in [0, 1, 10, 1000, 4097, DEFAULT_MAX_BYTES] {
            let limits = lim(max_bytes, Duration::from_secs(30));
            let mut reader = &endless[..];
            let mut buf = BytesMut::new();
            let authority = timeout(PATIENCE, classify(&mut reader, &mut buf, DST4, &limits))
                .await
                .expect("classify returned")
                .unwrap();
            assert_eq!(authority, Authority::fallback(DST4));
            assert_eq!(buf.len(), max_bytes);
            assert_eq!(&buf[..], &endless[..max_bytes]);
        }
    }

    #[tokio::test]
    async fn classify_appends_to_what_the_buffer_holds() {
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        let (head, tail) = CURL_HELLO.split_at(100);
        let mut buf = BytesMut::from(head);
        let mut reader = tail;
        let authority = classify(&mut reader, &mut buf, DST4, &limits)
            .await
            .unwrap();
        assert_eq!(
            authority.host,
            Host::Name("curl.fixture.egress.test".into())
        );
        assert_eq!(&buf[..], CURL_HELLO);
    }

    #[tokio::test]
    async fn classify_reader_errors_are_returned() {
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
            }
        }
        let err = classify(&mut Failing, &mut BytesMut::new(), DST4, &Limits::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn classify_huge_timeout_does_not_panic() {
        let limits = lim(DEFAULT_MAX_BYTES, Duration::MAX);
        let mut reader = CURL_HELLO;
        let authority = classify(&mut reader, &mut BytesMut::new(), DST4, &limits)
            .await
            .unwrap();
        assert_eq!(authority.source, Source::Sni);
    }

    #[tokio::test]
    async fn classify_over_loopback_tcp() {
        // Real sockets on 127.0.0.1 only: a TLS client writing its hello in small pieces.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            for piece in PYTHON_HELLO.chunks(100) {
                stream.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stream
        });
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
        let authority = timeout(PATIENCE, classify(&mut accepted, &mut buf, addr, &limits))
            .await
            .expect("classify returned")
            .unwrap();
        assert_eq!(
            authority.to_string(),
            format!("python.fixture.egress.test:{}", addr.port())
        );
        assert_eq!(authority.source, Source::Sni);
        assert_eq!(&buf[..], PYTHON_HELLO);
        drop(client.await.unwrap());

        // And a server-first protocol on a real socket: the client sends nothing.
        let silent = tokio::spawn(TcpStream::connect(addr));
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        let limits = lim(DEFAULT_MAX_BYTES, Duration::from_millis(50));
        let authority = timeout(PATIENCE, classify(&mut accepted, &mut buf, addr, &limits))
            .await
            .expect("classify returned")
            .unwrap();
        assert_eq!(authority, Authority::fallback(addr));
        assert!(buf.is_empty());
        drop(silent.await.unwrap());
    }

    /// Yields `chunks` one per read, then EOF.
    struct Chunked {
        chunks: Vec<Vec<u8>>,
        next: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            if let Some(chunk) = this.chunks.get_mut(this.next) {
                let n = chunk.len().min(out.remaining());
                out.put_slice(&chunk[..n]);
                chunk.drain(..n);
                if chunk.is_empty() {
                    this.next += 1;
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// `bytes` cut at `cuts` (taken modulo the length, in any order, duplicates allowed).
    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut start = 0;
        let mut chunks = Vec::new();
        for cut in cuts {
            // An empty read means EOF: equal cuts make no chunk.
            if cut > start {
                chunks.push(bytes[start..cut].to_vec());
            }
            start = cut;
        }
        chunks
    }

    proptest! {
        #[test]
        fn sniff_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (result, source) = sniff(&bytes);
            if let Sniff::Name(name) = result {
                prop_assert_ne!(source, Source::Ip);
                prop_assert!(normalize_name(name.as_bytes()).is_some() || name.parse::<IpAddr>().is_ok());
            }
        }

        #[test]
        fn fixtures_classify_at_any_split(
            which in 0..NAMED.len(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let (bytes, host, source) = NAMED[which];
            let mut reader = Chunked { chunks: split(bytes, &cuts), next: 0 };
            let mut buf = BytesMut::new();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let limits = lim(DEFAULT_MAX_BYTES, Duration::from_secs(30));
            let authority = rt.block_on(classify(&mut reader, &mut buf, DST4, &limits)).unwrap();
            prop_assert_eq!(authority, Authority { host: Host::Name(host.to_string()), port: 8443, source });
            prop_assert_eq!(&buf[..], bytes);
        }
    }
}
