//! The PEP link: an HTTP/1.1 CONNECT (hyper) carrying the actor's identity, then a plain
//! byte relay over the same TCP connection.
use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header::HOST};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncWriteExt as _, copy_bidirectional_with_sizes},
    net::TcpStream,
};

use crate::{
    classify::Authority,
    config::{Actor, PepAddr},
    socket::SocketFactory,
};

/// Header: the actor's id.
pub const HEADER_ACTOR_ID: &str = "x-ate-actor-id";
/// Header: the actor's template.
pub const HEADER_ACTOR_TEMPLATE: &str = "x-ate-actor-template";
/// Header: the namespace of the actor's template.
pub const HEADER_ACTOR_TEMPLATE_NAMESPACE: &str = "x-ate-actor-template-namespace";
/// Header: the destination the actor connected to, `ip:port` (IPv6 in brackets).
pub const HEADER_ORIGINAL_DESTINATION: &str = "x-ate-original-destination";
/// Header: the authority asked for in the CONNECT line (name from SNI/Host, or the IP).
pub const HEADER_CONNECT_AUTHORITY: &str = "x-ate-connect-authority";

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PEP's name did not resolve.
    #[error("resolving PEP {pep}: {source}")]
    Resolve {
        /// The PEP.
        pep: String,
        /// The cause.
        source: io::Error,
    },
    /// TCP connect to the PEP failed.
    #[error("PEP {pep} unreachable: {source}")]
    Unreachable {
        /// The PEP address tried.
        pep: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// No CONNECT answer within the bound.
    #[error("PEP gave no CONNECT answer within {0:?}")]
    Timeout(Duration),
    /// The PEP answered, but not 2xx (a policy deny, or the PEP's own upstream failure).
    #[error("PEP answered {0}")]
    Refused(StatusCode),
    /// The HTTP exchange failed.
    #[error("PEP HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// A header value could not be encoded (validated at start-up, so not expected).
    #[error("header {0} has a value HTTP cannot carry")]
    Header(&'static str),
    /// The request could not be built from the authority.
    #[error("CONNECT request to {authority}: {source}")]
    Request {
        /// The authority asked for.
        authority: String,
        /// The cause.
        source: http::Error,
    },
}

impl Error {
    /// The PEP's HTTP status when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Refused(status) => Some(*status),
            _ => None,
        }
    }
}

/// An open tunnel: the TCP connection to the PEP after its 2xx answer, and any bytes the PEP
/// already sent past that answer (a server-first upstream's banner can arrive with it).
pub struct Tunnel {
    /// The connection to the PEP, now a byte pipe to the upstream.
    pub stream: TcpStream,
    /// Upstream bytes read together with the CONNECT answer.
    pub leftover: Bytes,
    /// The PEP's answer.
    pub status: StatusCode,
}

/// Builds the CONNECT request for `actor`'s connection to `original_dst`, asking for
/// `authority`.
pub fn connect_request(
    actor: &Actor,
    original_dst: SocketAddr,
    authority: &Authority,
) -> Result<Request<Empty<Bytes>>, Error> {
    let target = authority.to_string();
    let value =
        |name: &'static str, v: &str| HeaderValue::from_str(v).map_err(|_| Error::Header(name));
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .header(HOST, value("host", &target)?)
        .header(HEADER_ACTOR_ID, value(HEADER_ACTOR_ID, &actor.id)?)
        .header(
            HEADER_ACTOR_TEMPLATE,
            value(HEADER_ACTOR_TEMPLATE, &actor.template)?,
        )
        .header(
            HEADER_ACTOR_TEMPLATE_NAMESPACE,
            value(HEADER_ACTOR_TEMPLATE_NAMESPACE, &actor.template_namespace)?,
        )
        .header(
            HEADER_ORIGINAL_DESTINATION,
            value(HEADER_ORIGINAL_DESTINATION, &original_dst.to_string())?,
        )
        .header(
            HEADER_CONNECT_AUTHORITY,
            value(HEADER_CONNECT_AUTHORITY, &target)?,
        )
        .body(Empty::new())
        .map_err(|source| Error::Request {
            authority: target.clone(),
            source,
        })
}

/// Connects to the PEP and asks it for a tunnel; all of it bounded by `timeout`.
pub async fn open(
    pep: &PepAddr,
    sockets: &SocketFactory,
    timeout: Duration,
    request: Request<Empty<Bytes>>,
) -> Result<Tunnel, Error> {
    tokio::time::timeout(timeout, open_unbounded(pep, sockets, request))
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

async fn open_unbounded(
    pep: &PepAddr,
    sockets: &SocketFactory,
    request: Request<Empty<Bytes>>,
) -> Result<Tunnel, Error> {
    let addr = match pep.socket_addr() {
        Some(addr) => addr,
        None => tokio::net::lookup_host((pep.host.as_str(), pep.port))
            .await
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
            })
            .map_err(|source| Error::Resolve {
                pep: pep.to_string(),
                source,
            })?,
    };
    let stream = sockets
        .connect(addr)
        .await
        .map_err(|source| Error::Unreachable { pep: addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    // `without_shutdown` resolves once hyper has seen a 2xx CONNECT answer and stopped at the
    // end of its head, handing back the connection untouched with what it read past the head.
    let mut conn = std::pin::pin!(conn.without_shutdown());
    let mut send = std::pin::pin!(sender.send_request(request));
    let mut parts = None;
    let response = tokio::select! {
        biased;
        response = &mut send => response?,
        done = &mut conn => {
            // The connection finished first: either it upgraded (the answer is already
            // queued for `send`) or it closed (then `send` fails).
            parts = Some(done?);
            send.await?
        }
    };
    let status = response.status();
    if !status.is_success() {
        return Err(Error::Refused(status));
    }
    let parts = match parts {
        Some(parts) => parts,
        None => conn.await?,
    };
    Ok(Tunnel {
        stream: parts.io.into_inner(),
        leftover: parts.read_buf,
        status,
    })
}

/// Relays bytes both ways until both directions are done: first the `peeked` client bytes to
/// the PEP and the `leftover` PEP bytes to the client, then everything else through two
/// buffers of `buffer` bytes. A half-close on one side is passed on to the other.
/// Returns (bytes client -> PEP, bytes PEP -> client).
pub async fn relay(
    client: &mut TcpStream,
    pep: &mut TcpStream,
    peeked: &[u8],
    leftover: &[u8],
    buffer: usize,
) -> (u64, u64, io::Result<()>) {
    let mut up = 0u64;
    let mut down = 0u64;
    if !peeked.is_empty() {
        if let Err(e) = pep.write_all(peeked).await {
            return (up, down, Err(e));
        }
        up += peeked.len() as u64;
    }
    if !leftover.is_empty() {
        if let Err(e) = client.write_all(leftover).await {
            return (up, down, Err(e));
        }
        down += leftover.len() as u64;
    }
    match copy_bidirectional_with_sizes(client, pep, buffer, buffer).await {
        Ok((a, b)) => (up + a, down + b, Ok(())),
        Err(e) => (up, down, Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{
        classify::{Host, Source},
        config::Capture,
    };

    fn actor() -> Actor {
        Actor {
            id: "actor-1".into(),
            template: "coder".into(),
            template_namespace: "team-a".into(),
            capture: Capture::Cgroup {
                cgroup: PathBuf::from("/x"),
                cgroup_id: 7,
                netns: None,
            },
        }
    }

    #[test]
    fn request_carries_all_five_headers() {
        let authority = Authority {
            host: Host::Name("web.egress.test".into()),
            port: 8443,
            source: Source::Sni,
        };
        let req = connect_request(&actor(), "[fd00::2]:8443".parse().unwrap(), &authority).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "web.egress.test:8443");
        let h = req.headers();
        assert_eq!(h[HOST], "web.egress.test:8443");
        assert_eq!(h[HEADER_ACTOR_ID], "actor-1");
        assert_eq!(h[HEADER_ACTOR_TEMPLATE], "coder");
        assert_eq!(h[HEADER_ACTOR_TEMPLATE_NAMESPACE], "team-a");
        assert_eq!(h[HEADER_ORIGINAL_DESTINATION], "[fd00::2]:8443");
        assert_eq!(h[HEADER_CONNECT_AUTHORITY], "web.egress.test:8443");
    }

    #[test]
    fn ip_authority_uses_brackets_for_ipv6() {
        let authority = Authority {
            host: Host::Ip("fd00::2".parse().unwrap()),
            port: 22,
            source: Source::Ip,
        };
        let req = connect_request(&actor(), "[fd00::2]:22".parse().unwrap(), &authority).unwrap();
        assert_eq!(req.uri().to_string(), "[fd00::2]:22");
        assert_eq!(req.headers()[HEADER_CONNECT_AUTHORITY], "[fd00::2]:22");
    }

    #[test]
    fn unsafe_identity_is_an_error_not_a_panic() {
        let mut a = actor();
        a.id = "x\r\ny".into();
        let authority = Authority {
            host: Host::Ip("10.0.0.1".parse().unwrap()),
            port: 1,
            source: Source::Ip,
        };
        assert!(matches!(
            connect_request(&a, "10.0.0.1:1".parse().unwrap(), &authority),
            Err(Error::Header(HEADER_ACTOR_ID))
        ));
    }
}
