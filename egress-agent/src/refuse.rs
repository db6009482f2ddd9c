//! Refusals as the PEP contract says: a flow the agent refuses (its policy, the always-denied
//! addresses, or the PEP's 4xx answer) is answered in the protocol the actor spoke, so its
//! client reports a refusal instead of a broken connection: an HTTP/1 request gets
//! `403 Forbidden`, a TLS ClientHello a fatal `access_denied` alert, anything else a clean close
//! with no bytes (FIN, never RST). A PEP that could not be asked (unreachable, timed out, TLS
//! failed) is no refusal: those connections are still reset (fail closed).
//!
//! Answering is bounded ([`WRITE_TIMEOUT`], [`DRAIN_TIMEOUT`], [`DRAIN_MAX_BYTES`]): an actor
//! that does not read or does not close costs its connection slot for about two seconds.
use std::{io, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    classify::{self, Protocol},
    socket,
};

/// Longest wait for the actor's socket to take the answer; past it the connection is reset.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait, after the answer and our FIN, for the actor to close its side. Bytes it sends
/// meanwhile (a request body) are read and dropped: closing a socket with unread bytes makes
/// the kernel send a reset, which would cut the answer off at the client.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes read and dropped while waiting for the actor to close.
pub const DRAIN_MAX_BYTES: usize = 64 * 1024;

/// The body of the 403: what the actor's user sees, with no internal detail (no rule, no PEP).
pub const HTTP_403_BODY: &str = "Forbidden: the destination was refused by egress policy.\n";

/// TLS alert level `fatal` (RFC 8446 6).
const ALERT_FATAL: u8 = 2;
/// TLS alert `access_denied` (RFC 8446 6.2).
const ALERT_ACCESS_DENIED: u8 = 49;
/// TLS record content type `alert`.
const CONTENT_ALERT: u8 = 21;
/// Record versions an alert is sent in: TLS 1.0 to 1.2 (TLS 1.3 records say 1.2).
const MIN_RECORD_VERSION: u16 = 0x0301;
/// See [`MIN_RECORD_VERSION`].
const MAX_RECORD_VERSION: u16 = 0x0303;

/// Who refused the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The agent's policy: a deny rule, no allow rule, a pre-filter, a mismatched address.
    Policy,
    /// An always-denied address or name (cloud metadata, link-local, loopback, the node's own
    /// addresses, the actor's gateway).
    AlwaysDenied,
    /// The PEP answered the CONNECT with a 4xx status (a 5xx is reset).
    Pep,
}

impl Reason {
    /// Stable name for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Policy => "policy",
            Reason::AlwaysDenied => "always_denied",
            Reason::Pep => "pep",
        }
    }

    /// The reason of a denial by the agent, from the rule (or error) text it logs: the
    /// always-denied checks all say `always denied: ...`, which no policy rule's text can
    /// (rules are shown as `template ... allow[i] host=...`).
    pub fn of_rule(rule: &str) -> Reason {
        if rule.contains("always denied:") {
            Reason::AlwaysDenied
        } else {
            Reason::Policy
        }
    }
}

/// How a refused flow was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// `HTTP/1.1 403 Forbidden`, then a clean close: the actor sent an HTTP/1 request.
    Http403,
    /// A fatal `access_denied` TLS alert, then a clean close: the actor sent a ClientHello.
    TlsAlert,
    /// A clean close with no bytes: anything else (or nothing) was sent.
    Close,
}

impl Response {
    /// Stable name for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Response::Http403 => "http_403",
            Response::TlsAlert => "tls_alert",
            Response::Close => "close",
        }
    }
}

/// The answer to an actor whose first bytes were `peeked`, and its bytes.
pub fn answer(peeked: &[u8]) -> (Response, Vec<u8>) {
    match classify::protocol(peeked) {
        Protocol::Http => (Response::Http403, http_403()),
        Protocol::Tls { record_version } => (Response::TlsAlert, tls_alert(record_version).into()),
        Protocol::Other => (Response::Close, Vec::new()),
    }
}

/// The whole 403 response. `Connection: close` and the length let every client tell the end
/// of the body from a cut-off connection.
pub fn http_403() -> Vec<u8> {
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{HTTP_403_BODY}",
        HTTP_403_BODY.len()
    )
    .into_bytes()
}

/// A fatal `access_denied` alert record in the version the client's hello used (kept within
/// TLS 1.0 to 1.2, as record versions are). OpenSSL-based clients print it as
/// `tlsv1 alert access denied`.
pub fn tls_alert(record_version: u16) -> [u8; 7] {
    let [major, minor] = record_version
        .clamp(MIN_RECORD_VERSION, MAX_RECORD_VERSION)
        .to_be_bytes();
    [
        CONTENT_ALERT,
        major,
        minor,
        0,
        2,
        ALERT_FATAL,
        ALERT_ACCESS_DENIED,
    ]
}

/// What answering a refused flow did.
#[derive(Debug)]
pub struct Refused {
    /// The answer chosen.
    pub response: Response,
    /// Why it could not be delivered (the connection was reset instead), if it could not.
    pub error: Option<io::Error>,
}

/// Answers the refused connection `stream`, whose first bytes were `peeked`, and closes it:
/// the answer ([`answer`]), a FIN, then up to [`DRAIN_TIMEOUT`] for the actor to close its
/// side (dropping what it still sends, at most [`DRAIN_MAX_BYTES`]). A write that fails or
/// takes longer than [`WRITE_TIMEOUT`] resets the connection.
pub async fn refuse(mut stream: TcpStream, peeked: &[u8]) -> Refused {
    let (response, bytes) = answer(peeked);
    let written = if bytes.is_empty() {
        Ok(())
    } else {
        match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the actor did not take the refusal within {WRITE_TIMEOUT:?}"),
            )),
        }
    };
    if let Err(e) = written {
        socket::reset(stream);
        return Refused {
            response,
            error: Some(e),
        };
    }
    socket::disarm_reset(&stream);
    if let Err(e) = stream.shutdown().await {
        socket::reset(stream);
        return Refused {
            response,
            error: Some(e),
        };
    }
    // Whatever ends the wait (EOF, an error, the bounds), the socket is closed normally: with
    // nothing left unread that is a FIN the actor already has.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain(&mut stream)).await;
    Refused {
        response,
        error: None,
    }
}

/// Reads and drops what the actor sends until it closes (or errs), at most
/// [`DRAIN_MAX_BYTES`].
async fn drain(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    while total < DRAIN_MAX_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        path::Path,
        sync::Arc,
        time::Instant,
    };

    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        classify::{
            Authority, Host, Source,
            fixtures::{CURL_HELLO, CURL_HTTP, NO_SNI_HELLO, OPENSSL_HELLO},
        },
        policy::Policy,
        route::{Route, route},
    };

    #[test]
    fn the_403_is_a_whole_response() {
        let bytes = http_403();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(&bytes).expect("parses") else {
            panic!("partial");
        };
        assert_eq!(response.code, Some(403));
        assert_eq!(response.reason, Some("Forbidden"));
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        assert_eq!(header("connection").as_deref(), Some("close"));
        assert!(header("content-type").is_some_and(|t| t.starts_with("text/plain")));
        let body = &bytes[head..];
        assert_eq!(body, HTTP_403_BODY.as_bytes());
        assert_eq!(
            header("content-length").as_deref(),
            Some(body.len().to_string().as_str())
        );
    }

    #[test]
    fn alerts_use_the_client_s_record_version_within_tls_1_0_to_1_2() {
        assert_eq!(tls_alert(0x0301), [21, 3, 1, 0, 2, 2, 49]);
        assert_eq!(tls_alert(0x0303), [21, 3, 3, 0, 2, 2, 49]);
        assert_eq!(tls_alert(0x0300), [21, 3, 1, 0, 2, 2, 49]);
        assert_eq!(tls_alert(0x0304), [21, 3, 3, 0, 2, 2, 49]);
    }

    #[test]
    fn the_answer_follows_what_the_actor_sent() {
        for hello in [CURL_HELLO, OPENSSL_HELLO, NO_SNI_HELLO] {
            let (response, bytes) = answer(hello);
            assert_eq!(response, Response::TlsAlert);
            assert_eq!(bytes, tls_alert(u16::from_be_bytes([hello[1], hello[2]])));
        }
        assert_eq!(answer(CURL_HTTP), (Response::Http403, http_403()));
        for other in [&b""[..], b"SSH-2.0-x\r\n", &CURL_HELLO[..50], b"GET / HT"] {
            assert_eq!(answer(other), (Response::Close, Vec::new()), "{other:?}");
        }
    }

    #[test]
    fn reasons_follow_the_rules_the_agent_logs() {
        let policy = Policy::parse(
            "[[template]]\nname = \"coder\"\nallow = [ { host = \"*\" }, { cidr = \"0.0.0.0/0\" } ]\n\
             deny = [ { host = \"bad.example\" } ]\n",
            Path::new("test.toml"),
        )
        .expect("policy");
        let coder = policy.template("team-a", "coder");
        let other = policy.template("team-a", "other");
        let metadata = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);
        let web = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 443);
        let named = |name: &str| Authority {
            host: Host::Name(name.into()),
            port: 443,
            source: Source::Sni,
        };
        let ip = |dst: SocketAddr| Authority {
            host: Host::Ip(dst.ip()),
            port: dst.port(),
            source: Source::Ip,
        };
        let reason = |route: Route| match route {
            Route::Deny { rule } => Reason::of_rule(&rule),
            other => panic!("not denied: {other:?}"),
        };
        assert_eq!(
            reason(route(coder, false, &ip(metadata), metadata, &[])),
            Reason::AlwaysDenied
        );
        assert_eq!(
            reason(route(
                coder,
                true,
                &named("metadata.google.internal"),
                web,
                &[]
            )),
            Reason::AlwaysDenied
        );
        assert_eq!(
            reason(route(coder, false, &ip(web), web, &[web.ip()])),
            Reason::AlwaysDenied
        );
        assert_eq!(
            reason(route(coder, false, &named("bad.example"), web, &[])),
            Reason::Policy
        );
        assert_eq!(
            reason(route(other, false, &named("web.example"), web, &[])),
            Reason::Policy
        );
        // A direct dial whose name resolves only to always-denied addresses.
        let dial = crate::direct::Error::Denied {
            name: "meta.example".into(),
            reasons: format!(
                "169.254.169.254 ({})",
                coder.decide_ip(metadata.ip(), 80).rule
            ),
        };
        assert_eq!(Reason::of_rule(&dial.to_string()), Reason::AlwaysDenied);
    }

    /// A loopback connection: the agent's side (armed to reset, as the pipeline arms it, and
    /// with the client's first `peek` bytes read) and the client's.
    async fn pair(first: &[u8], peek: usize) -> (TcpStream, Vec<u8>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        client.write_all(first).await.expect("client write");
        let (mut agent, _) = listener.accept().await.expect("accept");
        socket::arm_reset(&agent);
        let mut peeked = vec![0; peek];
        agent.read_exact(&mut peeked).await.expect("peek");
        (agent, peeked, client)
    }

    /// Everything the client reads until EOF; an error (a reset) fails the test.
    async fn read_to_eof(client: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the agent closed in time")
            .expect("a clean EOF, not a reset");
        got
    }

    #[tokio::test]
    async fn each_answer_arrives_whole_and_ends_with_a_clean_eof() {
        for (first, expected) in [
            (CURL_HTTP, http_403()),
            (CURL_HELLO, tls_alert(0x0301).to_vec()),
            (NO_SNI_HELLO, tls_alert(0x0301).to_vec()),
            (&b"SSH-2.0-OpenSSH_9.2\r\n"[..], Vec::new()),
            (&b""[..], Vec::new()),
        ] {
            let (agent, peeked, mut client) = pair(first, first.len()).await;
            let refusing = tokio::spawn(async move { refuse(agent, &peeked).await });
            assert_eq!(read_to_eof(&mut client).await, expected, "{first:?}");
            drop(client);
            let refused = refusing.await.expect("refuse task");
            assert!(refused.error.is_none(), "{refused:?}");
        }
    }

    #[tokio::test]
    async fn bytes_the_actor_sent_past_the_peek_do_not_turn_the_close_into_a_reset() {
        // A POST whose body the peek never read: closing with it unread would reset.
        let body = vec![b'x'; 32 * 1024];
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: web.example\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let first = [head.as_bytes(), &body].concat();
        let (agent, peeked, mut client) = pair(&first, head.len()).await;
        let refusing = tokio::spawn(async move { refuse(agent, &peeked).await });
        assert_eq!(read_to_eof(&mut client).await, http_403());
        refusing.await.expect("refuse task");
    }

    #[tokio::test]
    async fn an_actor_that_never_closes_costs_at_most_the_drain_bound() {
        let (agent, peeked, mut client) = pair(b"\x00\x01", 2).await;
        let start = Instant::now();
        let refused = refuse(agent, &peeked).await;
        assert!(refused.error.is_none(), "{refused:?}");
        assert!(
            start.elapsed() < DRAIN_TIMEOUT + Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(read_to_eof(&mut client).await, Vec::<u8>::new());
    }

    #[tokio::test]
    async fn a_tls_client_sees_access_denied() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let agent = tokio::spawn(async move {
            let (mut agent, _) = listener.accept().await.expect("accept");
            socket::arm_reset(&agent);
            let mut peeked = bytes::BytesMut::new();
            let authority =
                classify::classify(&mut agent, &mut peeked, addr, &classify::Limits::default())
                    .await
                    .expect("classify");
            assert_eq!(authority.source, Source::Sni);
            refuse(agent, &peeked).await
        });
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("web.example").expect("name");
        let err = connector
            .connect(name, tcp)
            .await
            .expect_err("the handshake is refused");
        let tls = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
        assert_eq!(
            tls,
            &rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied)
        );
        let refused = agent.await.expect("agent task");
        assert_eq!(refused.response, Response::TlsAlert);
        assert!(refused.error.is_none(), "{refused:?}");
    }
}
