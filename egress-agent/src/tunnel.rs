//! The PEP link: an HTTP/1.1 CONNECT (hyper) carrying the actor's identity, over plain TCP
//! or TLS, then a byte relay ([`crate::relay`]) over the same connection. Connects are bounded: at most
//! `max_connecting` in progress, at most `max_waiting` waiting for one of those slots.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header::HOST, header::PROXY_AUTHORIZATION};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Semaphore, SemaphorePermit},
};

use crate::{
    classify::Authority,
    config::Actor,
    pep::{self, Pep},
    socket::SocketFactory,
};

pub mod h2;

pub use crate::pep::{
    HEADER_ACTOR_ID, HEADER_ACTOR_TEMPLATE, HEADER_ACTOR_TEMPLATE_NAMESPACE,
    HEADER_AUTHORITY_SOURCE, HEADER_CONNECT_AUTHORITY, HEADER_ORIGINAL_DESTINATION,
};

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
    /// TLS with the PEP failed: the handshake (a certificate the configured CA did not sign,
    /// another name), or the PEP's TLS layer refused the agent afterwards (e.g. no client
    /// certificate).
    #[error("TLS with PEP {pep}: {reason}")]
    Tls {
        /// The PEP.
        pep: String,
        /// rustls's (or the socket's) error.
        reason: String,
    },
    /// Every connect slot was busy and `max_waiting` connections were already waiting.
    #[error(
        "{connecting} PEP connects in progress and {waiting} waiting already          (--pep-max-connecting, --pep-max-waiting)"
    )]
    Overloaded {
        /// The connect bound.
        connecting: usize,
        /// The waiting bound.
        waiting: usize,
    },
    /// No connect slot came free within the connect timeout.
    #[error("no PEP connect slot came free within {0:?} (--pep-max-connecting)")]
    SlotTimeout(Duration),
    /// TCP connect + TLS handshake took longer than the connect timeout.
    #[error("PEP connect (TCP and TLS) did not finish within {0:?}")]
    ConnectTimeout(Duration),
    /// No CONNECT answer within the bound.
    #[error("PEP gave no CONNECT answer within {0:?}")]
    Timeout(Duration),
    /// The PEP answered, but not 2xx (a policy deny, its own upstream failure, or 407 when
    /// the `Proxy-Authorization` is missing or wrong).
    #[error("PEP answered {0}")]
    Refused(StatusCode),
    /// The HTTP exchange failed.
    #[error("PEP HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// A header value could not be encoded (validated at start-up, so not expected).
    #[error("header {0} has a value HTTP cannot carry")]
    Header(http::HeaderName),
    /// The actor has no certificate to present (none yet, expired, not yet valid): nothing
    /// is sent to the PEP.
    #[error("no client certificate for the actor: {0}")]
    Certificate(#[from] crate::certs::Error),
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

/// `AsyncRead` and `AsyncWrite` for an enum whose every variant holds one `Unpin` byte stream
/// (boxed or not): each call goes to the variant's stream.
macro_rules! delegate_io {
    ($name:ident { $($variant:ident),+ $(,)? }) => {
        impl AsyncRead for $name {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl AsyncWrite for $name {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($name::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($name::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $($name::$variant(s) => s.is_write_vectored(),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($name::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

/// The connection to the PEP: plain TCP or TLS over TCP.
pub enum PepStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (boxed: the rustls state is large).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PepStream {
    /// The TCP connection underneath (for socket options such as the reset on close).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PepStream::Plain(s) => s,
            PepStream::Tls(s) => s.get_ref().0,
        }
    }
}

// For TLS, shutting down sends close_notify, then the TCP half-close.
delegate_io!(PepStream { Plain, Tls });

/// A tunnel's byte pipe: an HTTP/1.1 connection of its own, or a stream on a pooled HTTP/2
/// connection.
pub enum TunnelIo {
    /// The connection to the PEP itself (HTTP/1.1).
    Http1(PepStream),
    /// A CONNECT stream on a shared HTTP/2 connection (boxed: it holds the pool's slot).
    Http2(Box<h2::Stream>),
}

impl TunnelIo {
    /// The TCP connection that carries only this tunnel (HTTP/1.1): armed to reset when the
    /// tunnel fails. `None` for an HTTP/2 stream, whose early end resets the stream only.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            TunnelIo::Http1(s) => Some(s.tcp()),
            TunnelIo::Http2(_) => None,
        }
    }
}

impl crate::relay::Peer for TunnelIo {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            TunnelIo::Http1(s) => s.plain_tcp(),
            TunnelIo::Http2(_) => None,
        }
    }
}

delegate_io!(TunnelIo { Http1, Http2 });

/// An open tunnel: the connection to the PEP after its 2xx answer, and any bytes the PEP
/// already sent past that answer (a server-first upstream's banner can arrive with it).
pub struct Tunnel {
    /// The connection to the PEP, now a byte pipe to the upstream.
    pub stream: TunnelIo,
    /// Upstream bytes read together with the CONNECT answer.
    pub leftover: Bytes,
    /// The PEP's answer.
    pub status: StatusCode,
}

/// Builds the CONNECT request for `actor`'s connection to `original_dst`, asking for
/// `authority`, as `pep`'s profile says:
/// - `headers`: `CONNECT authority` with the identity headers under `pep`'s names;
/// - `substrate`: `CONNECT original_dst` (the address the actor dialled, never a name it sent),
///   the derived name only as the hint header, no identity headers (the actor is proven by its
///   client certificate);
///
/// and `pep`'s `Proxy-Authorization`, if any, in both.
pub fn connect_request(
    pep: &Pep,
    actor: &Actor,
    original_dst: SocketAddr,
    authority: &Authority,
) -> Result<Request<Empty<Bytes>>, Error> {
    let value = |name: &http::HeaderName, v: &str| {
        http::HeaderValue::from_str(v).map_err(|_| Error::Header(name.clone()))
    };
    if pep.profile == pep::Profile::Substrate {
        let dst = SocketAddr::new(
            crate::policy::normalize(original_dst.ip()),
            original_dst.port(),
        );
        let target = dst.to_string();
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(target.as_str())
            .header(HOST, value(&HOST, &target)?);
        if authority.source != crate::classify::Source::Ip {
            builder = builder.header(
                &pep.hint_header,
                value(&pep.hint_header, &authority.to_string())?,
            );
        }
        if let Some(authorization) = &pep.authorization {
            builder = builder.header(PROXY_AUTHORIZATION, authorization.value().clone());
        }
        return builder.body(Empty::new()).map_err(|source| Error::Request {
            authority: target.clone(),
            source,
        });
    }
    let target = authority.to_string();
    let h = &pep.headers;
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .header(HOST, value(&HOST, &target)?)
        .header(&h.actor_id, value(&h.actor_id, &actor.id)?)
        .header(
            &h.actor_template,
            value(&h.actor_template, &actor.template)?,
        )
        .header(
            &h.actor_template_namespace,
            value(&h.actor_template_namespace, &actor.template_namespace)?,
        )
        .header(
            &h.original_destination,
            value(&h.original_destination, &original_dst.to_string())?,
        )
        .header(&h.connect_authority, value(&h.connect_authority, &target)?)
        .header(
            &h.authority_source,
            value(&h.authority_source, authority.source.as_str())?,
        );
    if let Some(authorization) = &pep.authorization {
        builder = builder.header(PROXY_AUTHORIZATION, authorization.value().clone());
    }
    builder.body(Empty::new()).map_err(|source| Error::Request {
        authority: target.clone(),
        source,
    })
}

/// Opens tunnels through one PEP, with at most `max_connecting` connects in progress and at
/// most `max_waiting` connections waiting for one of those slots. With per-actor
/// certificates each connection presents the certificate of the actor it carries; with
/// HTTP/2 tunnels are streams on connections pooled per actor (and certificate).
pub struct Connector {
    pep: Pep,
    sockets: SocketFactory,
    /// The TLS configuration without per-actor certificates (with the agent-wide one, if any).
    tls: Option<Arc<rustls::ClientConfig>>,
    certs: Option<crate::certs::Store>,
    h2: Option<h2::Pool>,
    connecting: Semaphore,
    waiting: AtomicUsize,
}

impl Connector {
    /// A connector for `pep` whose sockets come from `sockets`; its actors' certificate
    /// source (if any) is checked now.
    pub fn new(pep: Pep, sockets: SocketFactory) -> Result<Self, crate::certs::Error> {
        let certs = match pep.tls.as_ref().and_then(|t| t.actor_certs.clone()) {
            Some(source) => Some(crate::certs::Store::with_sockets(source, sockets.clone())?),
            None => None,
        };
        let h2 = (pep.http == pep::HttpVersion::Http2).then(|| h2::Pool::new(pep.http2));
        let tls = pep.tls.as_ref().map(|t| match h2 {
            Some(_) => h2::with_alpn_h2(&t.client_config()),
            None => t.client_config(),
        });
        Ok(Connector {
            tls,
            certs,
            h2,
            connecting: Semaphore::new(pep.max_connecting.min(Semaphore::MAX_PERMITS)),
            waiting: AtomicUsize::new(0),
            sockets,
            pep,
        })
    }

    /// Starts keeping `actor`'s certificate current, if this PEP takes per-actor ones.
    pub fn actor_added(&self, actor: &Actor) {
        if let Some(certs) = &self.certs {
            certs.register(&actor.id, &actor.template, &actor.template_namespace);
        }
    }

    /// Drops `actor_id`'s certificate and pooled connections.
    pub fn actor_removed(&self, actor_id: &str) {
        if let Some(certs) = &self.certs {
            certs.remove(actor_id);
        }
        if let Some(h2) = &self.h2 {
            h2.remove(actor_id);
        }
    }

    /// The per-actor certificate store, if this PEP takes per-actor certificates.
    pub fn certs(&self) -> Option<&crate::certs::Store> {
        self.certs.as_ref()
    }

    /// The HTTP/2 pool, if this PEP speaks HTTP/2.
    pub fn pool(&self) -> Option<&h2::Pool> {
        self.h2.as_ref()
    }

    /// The PEP this connector opens tunnels through.
    pub fn pep(&self) -> &Pep {
        &self.pep
    }

    /// Connections waiting for a connect slot right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Opens a tunnel for `actor_id`'s connection: connects (bounded by the connect timeout)
    /// with the actor's certificate when this PEP takes per-actor ones, and asks the PEP for
    /// a tunnel (bounded by the response timeout). HTTP/2: a stream on the actor's pooled
    /// connection, or a new connection when none has room.
    pub async fn open(
        &self,
        request: Request<Empty<Bytes>>,
        actor_id: &str,
    ) -> Result<Tunnel, Error> {
        let cert = self.actor_cert(actor_id)?;
        let timeout = self.pep.response_timeout;
        if let Some(pool) = &self.h2 {
            let key = h2::Key {
                pep: self.pep.name.clone(),
                actor: actor_id.to_string(),
                generation: cert.as_ref().map_or(0, |c| c.generation),
            };
            // The TLS configuration is made only if the pool has to dial.
            let dial = || self.connect_with(self.tls_with(cert));
            let stream = pool
                .open(&key, dial, request, timeout)
                .await
                .map_err(|e| match e {
                    Error::Http(e) if self.tls.is_some() => self.tls_error(e),
                    e => e,
                })?;
            let status = stream.status;
            return Ok(Tunnel {
                stream: TunnelIo::Http2(Box::new(stream)),
                leftover: Bytes::new(),
                status,
            });
        }
        let stream = self.connect_with(self.tls_with(cert)).await?;
        match tokio::time::timeout(timeout, exchange(stream, request)).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(Error::Http(e))) if self.tls.is_some() => Err(self.tls_error(e)),
            Ok(result) => result,
        }
    }

    /// `actor_id`'s certificate valid now, when this PEP takes per-actor certificates over
    /// TLS (`None` otherwise): fails when the actor has no valid certificate now.
    fn actor_cert(&self, actor_id: &str) -> Result<Option<crate::certs::Current>, Error> {
        match (&self.tls, &self.certs) {
            (Some(_), Some(certs)) => Ok(Some(certs.current(actor_id)?)),
            _ => Ok(None),
        }
    }

    /// The TLS configuration of a new connection: presenting `cert` (an actor's), or as
    /// configured (the agent-wide certificate, if any) without one.
    fn tls_with(&self, cert: Option<crate::certs::Current>) -> Option<Arc<rustls::ClientConfig>> {
        let (Some(base), Some(cert)) = (&self.tls, cert) else {
            return self.tls.clone();
        };
        let mut config = (**base).clone();
        config.client_auth_cert_resolver = Arc::new(cert);
        // A resumed session would carry another handshake's (another certificate's)
        // authentication: every connection does a full handshake with its actor's certificate.
        config.resumption = rustls::client::Resumption::disabled();
        Some(Arc::new(config))
    }

    /// A connection to the PEP, TLS done if configured (with the agent-wide certificate if
    /// any, never a per-actor one): waits for a connect slot (at most the connect timeout,
    /// and only if fewer than `max_waiting` already wait), then connects within the connect
    /// timeout.
    pub async fn connect(&self) -> Result<PepStream, Error> {
        self.connect_with(self.tls.clone()).await
    }

    async fn connect_with(
        &self,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<PepStream, Error> {
        let _slot = self.slot().await?;
        let timeout = self.pep.connect_timeout;
        tokio::time::timeout(timeout, self.connect_unbounded(tls))
            .await
            .map_err(|_| Error::ConnectTimeout(timeout))?
    }

    async fn slot(&self) -> Result<SemaphorePermit<'_>, Error> {
        if let Ok(permit) = self.connecting.try_acquire() {
            return Ok(permit);
        }
        let overloaded = || Error::Overloaded {
            connecting: self.pep.max_connecting,
            waiting: self.pep.max_waiting,
        };
        // Count ourselves in before checking, so that concurrent callers cannot all see room.
        let _waiter = Waiter::enter(&self.waiting);
        if _waiter.before >= self.pep.max_waiting {
            return Err(overloaded());
        }
        let timeout = self.pep.connect_timeout;
        match tokio::time::timeout(timeout, self.connecting.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; if it were, nothing could connect.
            Ok(Err(_)) => Err(overloaded()),
            Err(_) => Err(Error::SlotTimeout(timeout)),
        }
    }

    async fn connect_unbounded(
        &self,
        tls_config: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<PepStream, Error> {
        let pep = &self.pep.addr;
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
        let stream = self
            .sockets
            .connect(addr)
            .await
            .map_err(|source| Error::Unreachable { pep: addr, source })?;
        let (Some(config), Some(tls)) = (tls_config, &self.pep.tls) else {
            return Ok(PepStream::Plain(stream));
        };
        // A failed handshake drops the socket: arm it so the PEP sees a reset, not a close.
        crate::socket::arm_reset(&stream);
        let connector = tokio_rustls::TlsConnector::from(config);
        match connector.connect(tls.server_name.clone(), stream).await {
            Ok(stream) => {
                crate::socket::disarm_reset(stream.get_ref().0);
                Ok(PepStream::Tls(Box::new(stream)))
            }
            Err(e) => Err(Error::Tls {
                pep: self.pep.addr.to_string(),
                reason: tls_reason(&e).unwrap_or_else(|| e.to_string()),
            }),
        }
    }

    /// An HTTP failure over TLS whose cause is TLS (e.g. the PEP's alert that it wants a
    /// client certificate, which TLS 1.3 delivers after the handshake) becomes [`Error::Tls`].
    fn tls_error(&self, e: hyper::Error) -> Error {
        let reason = {
            let mut cause: Option<&(dyn std::error::Error + 'static)> =
                std::error::Error::source(&e);
            let mut found = None;
            while let Some(c) = cause {
                if let Some(io) = c.downcast_ref::<io::Error>()
                    && let Some(r) = tls_reason(io)
                {
                    found = Some(r);
                    break;
                }
                cause = c.source();
            }
            found
        };
        match reason {
            Some(reason) => Error::Tls {
                pep: self.pep.addr.to_string(),
                reason,
            },
            None => Error::Http(e),
        }
    }
}

/// rustls's error inside an I/O error, as text.
pub(crate) fn tls_reason(e: &io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(ToString::to_string)
}

/// One connection counted among those waiting for a connect slot, until dropped.
struct Waiter<'a> {
    count: &'a AtomicUsize,
    before: usize,
}

impl<'a> Waiter<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::AcqRel);
        Waiter { count, before }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The CONNECT exchange on an open connection: send the request, read the answer head, and
/// on 2xx hand back the connection with whatever was read past the head.
async fn exchange(stream: PepStream, request: Request<Empty<Bytes>>) -> Result<Tunnel, Error> {
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
        stream: TunnelIo::Http1(parts.io.into_inner()),
        leftover: parts.read_buf,
        status,
    })
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        classify::{Host, Source},
        config::Capture,
        pep::{Headers, HeadersFile, PepAddr},
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
            asked_pep: None,
            pep: crate::pep::Selection {
                pep: Some(crate::pep::DEFAULT_PEP.into()),
                by: crate::pep::SelectedBy::Default,
            },
        }
    }

    fn sni(name: &str, port: u16) -> Authority {
        Authority {
            host: Host::Name(name.into()),
            port,
            source: Source::Sni,
        }
    }

    #[test]
    fn request_carries_all_identity_headers() {
        let req = connect_request(
            &Pep::default(),
            &actor(),
            "[fd00::2]:8443".parse().unwrap(),
            &sni("web.egress.test", 8443),
        )
        .unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "web.egress.test:8443");
        let h = req.headers();
        assert_eq!(h[HOST], "web.egress.test:8443");
        assert_eq!(h[HEADER_ACTOR_ID], "actor-1");
        assert_eq!(h[HEADER_ACTOR_TEMPLATE], "coder");
        assert_eq!(h[HEADER_ACTOR_TEMPLATE_NAMESPACE], "team-a");
        assert_eq!(h[HEADER_ORIGINAL_DESTINATION], "[fd00::2]:8443");
        assert_eq!(h[HEADER_CONNECT_AUTHORITY], "web.egress.test:8443");
        assert_eq!(h[HEADER_AUTHORITY_SOURCE], "sni");
        assert!(h.get(PROXY_AUTHORIZATION).is_none());
        assert_eq!(h.len(), 7);
    }

    #[test]
    fn substrate_asks_for_the_address_with_the_name_as_a_hint() {
        let pep = Pep {
            profile: crate::pep::Profile::Substrate,
            ..Pep::default()
        };
        let req = connect_request(
            &pep,
            &actor(),
            "[::ffff:10.9.0.2]:8443".parse().unwrap(),
            &sni("web.egress.test", 8443),
        )
        .unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        // The address dialled (IPv4-mapped read as IPv4), never the name the actor sent.
        assert_eq!(req.uri().to_string(), "10.9.0.2:8443");
        let h = req.headers();
        assert_eq!(h[HOST], "10.9.0.2:8443");
        assert_eq!(h[HEADER_CONNECT_AUTHORITY], "web.egress.test:8443");
        // The actor is its certificate: no identity headers.
        assert_eq!(h.len(), 2, "{h:?}");

        // No name learned: no hint.
        let ip = Authority {
            host: Host::Ip("fd00::2".parse().unwrap()),
            port: 22,
            source: Source::Ip,
        };
        let pep = Pep {
            hint_header: http::HeaderName::from_static("x-hint"),
            ..pep
        };
        let req = connect_request(&pep, &actor(), "[fd00::2]:22".parse().unwrap(), &ip).unwrap();
        assert_eq!(req.uri().to_string(), "[fd00::2]:22");
        assert_eq!(req.headers().len(), 1);
    }

    #[test]
    fn request_uses_the_configured_names_and_authorization() {
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth");
        std::fs::write(&auth, "Basic dXNlcjpwYXNz\n").unwrap();
        std::fs::set_permissions(&auth, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let headers: HeadersFile = toml::from_str(
            "actor_id = \"x-pep-actor\"\noriginal_destination = \"x-pep-dst\"\n\
             authority_source = \"x-pep-source\"",
        )
        .unwrap();
        let pep = Pep {
            headers: Headers::from_file(&headers).unwrap(),
            authorization: Some(crate::pep::Authorization::read(&auth).unwrap()),
            ..Pep::default()
        };
        let authority = Authority {
            host: Host::Name("web.egress.test".into()),
            port: 80,
            source: Source::Host,
        };
        let req =
            connect_request(&pep, &actor(), "10.0.0.1:80".parse().unwrap(), &authority).unwrap();
        let h = req.headers();
        assert_eq!(h["x-pep-actor"], "actor-1");
        assert_eq!(h["x-pep-dst"], "10.0.0.1:80");
        assert_eq!(h["x-pep-source"], "host");
        assert_eq!(h[HEADER_ACTOR_TEMPLATE], "coder");
        assert!(h.get(HEADER_ACTOR_ID).is_none());
        assert!(h.get(HEADER_ORIGINAL_DESTINATION).is_none());
        assert_eq!(h[PROXY_AUTHORIZATION], "Basic dXNlcjpwYXNz");
        assert!(h[PROXY_AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn ip_authority_uses_brackets_for_ipv6() {
        let authority = Authority {
            host: Host::Ip("fd00::2".parse().unwrap()),
            port: 22,
            source: Source::Ip,
        };
        let req = connect_request(
            &Pep::default(),
            &actor(),
            "[fd00::2]:22".parse().unwrap(),
            &authority,
        )
        .unwrap();
        assert_eq!(req.uri().to_string(), "[fd00::2]:22");
        assert_eq!(req.headers()[HEADER_CONNECT_AUTHORITY], "[fd00::2]:22");
        assert_eq!(req.headers()[HEADER_AUTHORITY_SOURCE], "ip");
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
            connect_request(&Pep::default(), &a, "10.0.0.1:1".parse().unwrap(), &authority),
            Err(Error::Header(name)) if name == HEADER_ACTOR_ID
        ));
    }

    /// A CA, a server certificate for `127.0.0.1` and `pep.test`, and a client certificate,
    /// with the CA's PEM in a file.
    struct Pki {
        dir: tempfile::TempDir,
        ca_file: PathBuf,
        server: Arc<rustls::ServerConfig>,
    }

    fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    }

    fn leaf(
        names: &[&str],
        (ca, ca_key): &(rcgen::Certificate, KeyPair),
    ) -> (rcgen::Certificate, KeyPair) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, ca, ca_key).unwrap(), key)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// `require_client`: the server demands a certificate from this CA.
    fn pki(require_client: bool) -> Pki {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("egress test PEP CA");
        let (cert, key) = leaf(&["127.0.0.1", "pep.test"], &ca);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.0.pem()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.0.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let server = builder
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        // The client's certificate, from the same CA.
        let (client, client_key) = leaf(&["agent.test"], &ca);
        std::fs::write(dir.path().join("agent.pem"), client.pem()).unwrap();
        let key_file = dir.path().join("agent-key.pem");
        std::fs::write(&key_file, client_key.serialize_pem()).unwrap();
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Pki {
            dir,
            ca_file,
            server: Arc::new(server),
        }
    }

    /// A TLS CONNECT proxy on 127.0.0.1 answering every CONNECT with `answer` and then `tail`
    /// through the tunnel; returns its address and the heads it saw.
    async fn tls_proxy(
        server: Arc<rustls::ServerConfig>,
        answer: &'static str,
    ) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let _ = tls.write_all(answer.as_bytes()).await;
                    // Echo the tunnel until the agent half-closes, then close (close_notify).
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, heads)
    }

    fn tls_pep(addr: SocketAddr, pki: &Pki, ca_file: &std::path::Path, client: bool) -> Pep {
        let pep_addr = PepAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
        };
        let (cert, key) = (
            pki.dir.path().join("agent.pem"),
            pki.dir.path().join("agent-key.pem"),
        );
        let tls = crate::pep::Tls::load(
            &pep_addr,
            ca_file,
            None,
            client.then_some(cert.as_path()),
            client.then_some(key.as_path()),
            None,
        )
        .unwrap();
        Pep {
            tls: Some(tls),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            ..Pep::new(pep_addr)
        }
    }

    fn request(pep: &Pep) -> Request<Empty<Bytes>> {
        connect_request(
            pep,
            &actor(),
            "10.0.0.1:443".parse().unwrap(),
            &sni("web.egress.test", 443),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn tls_tunnel_to_a_pep_signed_by_the_configured_ca() {
        let pki = pki(false);
        let (addr, heads) = tls_proxy(
            pki.server.clone(),
            "HTTP/1.1 200 Connection established\r\n\r\nbanner",
        )
        .await;
        let pep = tls_pep(addr, &pki, &pki.ca_file, false);
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        let mut tunnel = connector
            .open(request(&pep), "actor-1")
            .await
            .expect("TLS tunnel");
        assert_eq!(tunnel.status, StatusCode::OK);
        assert_eq!(&tunnel.leftover[..], b"banner");
        assert!(matches!(tunnel.stream, TunnelIo::Http1(PepStream::Tls(_))));
        assert!(tunnel.stream.tcp().unwrap().peer_addr().is_ok());
        // Through the tunnel and back (the proxy echoes), with a clean half-close.
        tunnel.stream.write_all(b"ping").await.unwrap();
        tunnel.stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tunnel.stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ping");
        let head = heads.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("CONNECT web.egress.test:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("x-ate-actor-id: actor-1\r\n"), "{head}");
    }

    #[tokio::test]
    async fn wrong_ca_or_name_fails_closed() {
        let pki = pki(false);
        let (addr, heads) = tls_proxy(
            pki.server.clone(),
            "HTTP/1.1 200 Connection established\r\n\r\n",
        )
        .await;
        // Another CA entirely.
        let other = pki_ca_file(&pki);
        let pep = tls_pep(addr, &pki, &other, false);
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        let err = connector
            .open(request(&pep), "actor-1")
            .await
            .err()
            .expect("must fail");
        assert!(
            matches!(&err, Error::Tls { reason, .. } if reason.contains("UnknownIssuer")),
            "{err}"
        );
        // The right CA but a name the certificate does not carry.
        let mut pep = tls_pep(addr, &pki, &pki.ca_file, false);
        pep.tls = Some(
            crate::pep::Tls::load(
                &pep.addr,
                &pki.ca_file,
                Some("other.test"),
                None,
                None,
                None,
            )
            .unwrap(),
        );
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        let err = connector
            .open(request(&pep), "actor-1")
            .await
            .err()
            .expect("must fail");
        assert!(
            matches!(&err, Error::Tls { reason, .. } if reason.contains("not valid for name \"other.test\"")),
            "{err}"
        );
        // And the name it does carry works.
        pep.tls = Some(
            crate::pep::Tls::load(&pep.addr, &pki.ca_file, Some("pep.test"), None, None, None)
                .unwrap(),
        );
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        assert!(connector.open(request(&pep), "actor-1").await.is_ok());
        assert_eq!(
            heads.lock().unwrap().len(),
            1,
            "only the good one got a CONNECT through"
        );
    }

    /// The CA file of a CA unrelated to `pki`'s.
    fn pki_ca_file(pki: &Pki) -> PathBuf {
        let path = pki.dir.path().join("other-ca.pem");
        std::fs::write(&path, ca("another CA").0.pem()).unwrap();
        path
    }

    #[tokio::test]
    async fn client_certificate_when_the_pep_requires_one() {
        let pki = pki(true);
        let (addr, heads) = tls_proxy(
            pki.server.clone(),
            "HTTP/1.1 200 Connection established\r\n\r\n",
        )
        .await;
        let pep = tls_pep(addr, &pki, &pki.ca_file, true);
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        connector
            .open(request(&pep), "actor-1")
            .await
            .expect("mTLS tunnel");
        let pep = tls_pep(addr, &pki, &pki.ca_file, false);
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        let err = connector
            .open(request(&pep), "actor-1")
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, Error::Tls { .. }), "{err}");
        assert_eq!(heads.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_pep_answer_over_tls_is_checked() {
        let pki = pki(false);
        let (addr, _) = tls_proxy(
            pki.server.clone(),
            "HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let pep = tls_pep(addr, &pki, &pki.ca_file, false);
        let connector = Connector::new(pep.clone(), SocketFactory::new(0)).unwrap();
        let err = connector
            .open(request(&pep), "actor-1")
            .await
            .err()
            .expect("must fail");
        assert_eq!(
            err.status(),
            Some(StatusCode::PROXY_AUTHENTICATION_REQUIRED)
        );
    }

    #[tokio::test]
    async fn waiting_for_a_connect_slot_is_bounded() {
        let pki = pki(false);
        // Accepts TCP and never speaks TLS: every handshake holds its slot until the timeout.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let mut pep = tls_pep(addr, &pki, &pki.ca_file, false);
        pep.max_connecting = 1;
        pep.max_waiting = 1;
        pep.connect_timeout = Duration::from_millis(400);
        let connector = Arc::new(Connector::new(pep, SocketFactory::new(0)).unwrap());
        let spawn = |c: Arc<Connector>| tokio::spawn(async move { c.connect().await });
        let first = spawn(connector.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = spawn(connector.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(connector.waiting(), 1);
        let start = std::time::Instant::now();
        let third = connector.connect().await;
        assert!(
            matches!(
                third,
                Err(Error::Overloaded {
                    connecting: 1,
                    waiting: 1
                })
            ),
            "{:?}",
            third.err()
        );
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "refused at once"
        );
        assert!(matches!(
            first.await.unwrap(),
            Err(Error::ConnectTimeout(_))
        ));
        // The second waited for the first's slot, then timed out waiting or connecting.
        assert!(matches!(
            second.await.unwrap(),
            Err(Error::SlotTimeout(_) | Error::ConnectTimeout(_))
        ));
        assert_eq!(connector.waiting(), 0, "waiters are counted out again");
        assert_eq!(connector.connecting.available_permits(), 1);
    }
}
