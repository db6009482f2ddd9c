//! The signer source: the agent makes each actor's key itself and has a signer certify it.
//!
//! # The signer interface
//!
//! For each registered actor the agent generates an ECDSA P-256 key pair in memory (it is
//! never written anywhere, sent anywhere or logged) and asks the signer to certify it:
//!
//! ```text
//! POST <path of url> HTTP/1.1
//! Host: <host[:port] of url>
//! Content-Type: application/pkcs10
//! Accept: application/pem-certificate-chain
//! Authorization: Bearer <content of token_file>          (only with token_file)
//! x-ate-actor-id: <actor id>
//! x-ate-actor-template: <actor's template>
//! x-ate-actor-template-namespace: <template's namespace>
//! Content-Length: <n>
//!
//! -----BEGIN CERTIFICATE REQUEST-----
//! <PKCS#10 CSR in PEM: subject CN=<actor id>, the new public key, no extensions>
//! -----END CERTIFICATE REQUEST-----
//! ```
//!
//! - **Answer.** `200 OK` with `Content-Type: application/pem-certificate-chain` (RFC 8555
//!   §9.1; parameters allowed) and a body of PEM certificates: the leaf for the CSR's public
//!   key first, then any intermediates (at most 16 certificates, 256 KiB). The signer decides
//!   the subject, extensions and lifetime (the agent asks for `CN=<actor id>`); it should
//!   authenticate the caller (the bearer token) and check that the actor exists. The agent
//!   checks only that the leaf certifies its key and is valid now; the PEP verifies the chain.
//!   A leaf whose notBefore is up to 5 minutes ahead (clock skew) is put in force at
//!   notBefore, the previous certificate staying in use until then.
//! - **Refusal or failure.** Any other status, content type or body is a failure. Put a short
//!   reason in a `text/plain` body: its first 200 printable characters are logged and shown
//!   in `status` as the actor's `last_error`.
//! - **Transport.** `https://` verified against `ca_file` for the URL's host (no client
//!   certificate; authenticate with the token), or `http://` to a loopback IP address only
//!   (a signer on the node). One request per connection. Bounded: connect 5 s, the whole
//!   exchange 15 s, answer body 256 KiB, token 8 KiB.
//! - **The token file** (mode 0600) is read again for each request: rotate it in place.
//!
//! # Renewal
//!
//! A certificate is renewed when `renew_before` (`renew_before_secs`; default a third of the
//! leaf's lifetime, notAfter − notBefore) is left, i.e. by default at two thirds of its life;
//! a `renew_before` not shorter than the lifetime renews at half of it instead (and says so).
//! Renewal waits at least 1 s after an issue. Every request, renewals and retries included,
//! uses a new key. Each new certificate gets a new generation, so pooled connections to the
//! PEP made with the old one are not reused for new tunnels.
//!
//! # Failures
//!
//! - **Signer down, timing out, or answering non-200** (or a body that is not a usable chain
//!   for the key: wrong content type, bad PEM, a leaf for another key, already expired or more
//!   than 5 minutes ahead): logged (warn, with the reason) and retried after 1 s, then 2, 4, 8,
//!   16 and 30 s between attempts (each shortened at random by up to a fifth so actors do not
//!   retry in step), for as long as the actor exists. The reason is the actor's `last_error`.
//! - **Meanwhile** the previous certificate stays in use while it is valid.
//! - **Expired before a renewal succeeded**: logged once (warn); the actor's tunnels are
//!   refused ([`Store::current`](super::Store::current) returns [`Error::Expired`] with the
//!   last failure: fail closed) until the signer answers; retries go on every 30 s at most.
//! - **Before the first certificate**: [`Error::NoCertificate`] with the last failure.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, StatusCode, Uri,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST},
};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinHandle,
};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{Current, Error, Identity, Slot, Validity, identity, parse_chain, rfc3339};
use crate::{pep, socket::SocketFactory};

/// Media type of the request body.
pub const REQUEST_TYPE: &str = "application/pkcs10";
/// Media type of the answer's body.
pub const RESPONSE_TYPE: &str = "application/pem-certificate-chain";
/// Header carrying the actor id.
pub const HEADER_ACTOR_ID: &str = "x-ate-actor-id";
/// Header carrying the actor's template.
pub const HEADER_ACTOR_TEMPLATE: &str = "x-ate-actor-template";
/// Header carrying the template's namespace.
pub const HEADER_ACTOR_TEMPLATE_NAMESPACE: &str = "x-ate-actor-template-namespace";

/// Bound on TCP connect + TLS handshake with the signer (per address tried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one whole exchange: resolve, connect, request, answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer body read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Largest token file read, and largest token sent.
const MAX_TOKEN_BYTES: u64 = 8 * 1024;
/// Most addresses of the signer's name tried.
const MAX_ADDRESSES: usize = 4;
/// First wait after a failed request; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait between failed requests.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Shortest wait between an issue and its renewal.
const MIN_RENEW_WAIT: Duration = Duration::from_secs(1);
/// How far ahead a leaf's notBefore may be (the signer's clock ahead of ours).
const MAX_SKEW: Duration = Duration::from_secs(300);
/// Longest single sleep before a renewal: the wall clock is looked at again after it (a
/// suspended node or a clock step must not delay the renewal).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Characters of a failure body shown.
const MAX_REASON_CHARS: usize = 200;

/// Asks one signer for certificates.
pub(super) struct Client {
    url: String,
    /// The request target in origin form (`/v1/sign?x`): what servers expect from a client.
    target: Uri,
    host: String,
    port: u16,
    authority: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    token_file: Option<PathBuf>,
    renew_before: Option<Duration>,
    sockets: SocketFactory,
    /// [`EXCHANGE_TIMEOUT`]; shorter in tests.
    exchange_timeout: Duration,
}

impl Client {
    /// Checks the URL and files now: `http://` only to a loopback IP, `https://` only with a
    /// CA file; the CA and token files readable (the token private).
    pub(super) fn new(
        url: &str,
        ca_file: Option<&Path>,
        token_file: Option<PathBuf>,
        renew_before: Option<Duration>,
        sockets: SocketFactory,
    ) -> Result<Client, Error> {
        let bad = |problem: &str| Error::Url {
            url: url.to_string(),
            problem: problem.to_string(),
        };
        let uri: Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(bad(
                    "give an https:// URL (or http:// to a loopback address), e.g. \
                     https://signer.example:8443/v1/sign",
                ));
            }
        };
        let authority = uri.authority().ok_or_else(|| bad("no host in it"))?.clone();
        if authority.as_str().contains('@') {
            return Err(bad(
                "user information in the URL is not supported: give credentials with token_file",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("no host in it"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let ip = host.parse::<IpAddr>().ok();
        let tls = if https {
            let Some(ca_file) = ca_file else {
                return Err(Error::Setting(
                    "an https:// signer url needs ca_file: the PEM bundle of the CA that signed \
                     the signer's certificate",
                ));
            };
            let server_name = ServerName::try_from(host.clone())
                .map_err(|_| bad("its host is neither a DNS name nor an IP address"))?;
            Some((connector(ca_file)?, server_name))
        } else {
            if !ip.is_some_and(|ip| ip.is_loopback()) {
                return Err(bad(
                    "http:// is allowed only to a loopback IP address (127.0.0.1, [::1]): use \
                     https:// with ca_file for a signer elsewhere",
                ));
            }
            if ca_file.is_some() {
                return Err(Error::Setting(
                    "ca_file is for an https:// signer url; the url is http://",
                ));
            }
            None
        };
        if renew_before.is_some_and(|d| d.is_zero()) {
            return Err(Error::Setting(
                "renew_before_secs must be above zero (leave it out for a third of the \
                 lifetime)",
            ));
        }
        if let Some(path) = &token_file {
            read_token(path)?;
        }
        let target = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
            .map_err(|e| bad(&format!("its path: {e}")))?;
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|_| bad("its host is not a valid Host header"))?;
        Ok(Client {
            url: url.to_string(),
            target,
            host,
            port,
            authority,
            tls,
            token_file,
            renew_before,
            sockets,
            exchange_timeout: EXCHANGE_TIMEOUT,
        })
    }

    /// The URL, as configured.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    fn error(&self, problem: impl Into<String>) -> Error {
        Error::Signer {
            url: self.url.clone(),
            problem: problem.into(),
        }
    }

    /// One attempt: a new key, its CSR, the exchange, the answer checked.
    async fn request(&self, slot: &Slot) -> Result<Identity, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| self.error(format!("cannot generate a key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| self.error(format!("cannot build the CSR: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, slot.actor_id.as_str());
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| self.error(format!("cannot build the CSR: {e}")))?;
        let key_der = Zeroizing::new(key.serialize_der());
        drop(key);

        let value = |what: &str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                self.error(format!(
                    "the actor's {what} {v:?} cannot be sent as an HTTP header value"
                ))
            })
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.target.clone())
            .header(HOST, self.authority.clone())
            .header(CONTENT_TYPE, REQUEST_TYPE)
            .header(ACCEPT, RESPONSE_TYPE)
            .header(HEADER_ACTOR_ID, value("id", &slot.actor_id)?)
            .header(HEADER_ACTOR_TEMPLATE, value("template", &slot.template)?)
            .header(
                HEADER_ACTOR_TEMPLATE_NAMESPACE,
                value("template namespace", &slot.template_namespace)?,
            );
        if let Some(path) = &self.token_file {
            let token = tokio::task::spawn_blocking({
                let path = path.clone();
                move || read_token(&path)
            })
            .await
            .map_err(|e| self.error(format!("reading the token file failed: {e}")))??;
            builder = builder.header(AUTHORIZATION, token);
        }
        let request = builder
            .body(Full::new(Bytes::from(csr)))
            .map_err(|e| self.error(format!("cannot build the request: {e}")))?;

        let (status, content_type, body) =
            match tokio::time::timeout(self.exchange_timeout, self.exchange(request)).await {
                Ok(answer) => answer?,
                Err(_) => {
                    return Err(self.error(format!(
                        "no answer within {} s",
                        self.exchange_timeout.as_secs_f64()
                    )));
                }
            };
        if status != StatusCode::OK {
            return Err(self.error(format!("answered {status}: {}", reason(&body))));
        }
        let essence = content_type
            .as_deref()
            .and_then(|t| t.split(';').next())
            .map(str::trim);
        if !essence.is_some_and(|t| t.eq_ignore_ascii_case(RESPONSE_TYPE)) {
            return Err(self.error(format!(
                "answered 200 with Content-Type {:?}; the interface wants {RESPONSE_TYPE} (PEM \
                 certificates, leaf first)",
                content_type.as_deref().unwrap_or("(none)")
            )));
        }
        let chain = parse_chain(&body).map_err(|p| self.error(format!("its answer: {p}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
        let identity = identity(chain, key).map_err(|p| {
            self.error(format!(
                "its answer: {p} (the leaf must certify the public key of the CSR just sent)"
            ))
        })?;
        let now = SystemTime::now();
        match identity.validity(now) {
            Validity::Valid => {}
            Validity::Expired => {
                return Err(self.error(format!(
                    "it issued a certificate that expired at {}: check the signer's clock and \
                     lifetime",
                    rfc3339(identity.not_after)
                )));
            }
            Validity::NotYet => {
                if identity.not_before > now + MAX_SKEW {
                    return Err(self.error(format!(
                        "it issued a certificate not valid before {}, more than {} s ahead: \
                         check the clocks",
                        rfc3339(identity.not_before),
                        MAX_SKEW.as_secs()
                    )));
                }
            }
        }
        Ok(identity)
    }

    /// Connects (each address in turn), sends `request` and reads the answer (bounded).
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Option<String>, Bytes), Error> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| self.error(format!("cannot resolve {}: {e}", self.host)))?
                .take(MAX_ADDRESSES)
                .collect(),
        };
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(addr)).await {
                Ok(Ok(io)) => return self.send(io, request).await,
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(self.error(format!(
                        "no connection to {addr} within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| self.error(format!("{} has no address", self.host))))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Io, Error> {
        let stream = self
            .sockets
            .connect(addr)
            .await
            .map_err(|e| self.error(format!("cannot connect to {addr}: {e}")))?;
        let Some((connector, name)) = &self.tls else {
            return Ok(Io::Plain(stream));
        };
        connector
            .connect(name.clone(), stream)
            .await
            .map(|s| Io::Tls(Box::new(s)))
            .map_err(|e| self.error(format!("TLS with {addr}: {e}")))
    }

    async fn send(
        &self,
        io: Io,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Option<String>, Bytes), Error> {
        let http = |e: hyper::Error| self.error(format!("HTTP: {e}"));
        let (mut sender, conn) = match io {
            Io::Plain(s) => handshake(s).await,
            Io::Tls(s) => handshake(*s).await,
        }
        .map_err(http)?;
        // Driven beside the request; aborted with it (a signer that never finishes its
        // answer must not leave a task behind).
        let _conn = AbortOnDrop(conn);
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                self.error(format!(
                    "reading its answer: {e} (at most {MAX_ANSWER_BYTES} bytes are read)"
                ))
            })?
            .to_bytes();
        Ok((status, content_type, body))
    }

    /// How long to wait before renewing `current` at `now`, and whether `renew_before` had to
    /// be shortened to fit the lifetime.
    fn renew_at(&self, current: &Current) -> (SystemTime, bool) {
        let lifetime = current
            .not_after
            .duration_since(current.not_before)
            .unwrap_or_default();
        let (before, shortened) = match self.renew_before {
            Some(b) if b < lifetime => (b, false),
            Some(_) => (lifetime / 2, true),
            None => (lifetime / 3, false),
        };
        (
            current
                .not_after
                .checked_sub(before)
                .unwrap_or(current.not_after),
            shortened,
        )
    }
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn handshake<T>(io: T) -> Result<(Sender, JoinHandle<()>), hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let task = tokio::spawn(async move {
        // Its error also fails the request, which reports it.
        let _ = conn.await;
    });
    Ok((sender, task))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A rustls connector trusting only the certificates in `ca_file`.
fn connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, Error> {
    const WHAT: &str = "actor certificate signer CA file";
    let pem = pep::read_file(WHAT, ca_file, 1024 * 1024, false)?;
    let content = |problem: String| {
        Error::File(pep::Error::Content {
            what: WHAT,
            path: ca_file.to_path_buf(),
            problem,
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| content(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| content(format!("a certificate rustls cannot use: {e}")))?;
    }
    if roots.is_empty() {
        return Err(content(
            "no certificate in it: give the PEM bundle of the CA that signed the signer's \
             certificate"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| content(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `Bearer <token>` from the secret file `path` (trailing newline dropped).
fn read_token(path: &Path) -> Result<HeaderValue, Error> {
    const WHAT: &str = "actor certificate signer token file";
    let bytes = Zeroizing::new(pep::read_file(WHAT, path, MAX_TOKEN_BYTES, true)?);
    let problem = |problem: &str| {
        Error::File(pep::Error::Content {
            what: WHAT,
            path: path.to_path_buf(),
            problem: problem.to_string(),
        })
    };
    let token = bytes
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
        .unwrap_or(&bytes);
    if token.is_empty() {
        return Err(problem("empty: write the token the signer expects"));
    }
    // Visible ASCII only: a second line would smuggle a header into the request.
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(problem(
            "holds a space, a control character, a second line or non-ASCII bytes: write the \
             token alone on one line",
        ));
    }
    let mut value = Zeroizing::new(Vec::with_capacity(token.len() + 7));
    value.extend_from_slice(b"Bearer ");
    value.extend_from_slice(token);
    let mut value =
        HeaderValue::from_bytes(&value).map_err(|_| problem("not a valid HTTP header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The start of a failure body, printable characters only.
fn reason(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        "(no reason given)".to_string()
    } else {
        text.to_string()
    }
}

/// Keeps `slot`'s certificate current through `client` until aborted: asks at once, renews
/// before expiry, retries failures with backoff.
pub(super) async fn keep_current(
    client: Arc<Client>,
    slot: Arc<Slot>,
    generations: Arc<AtomicU64>,
) {
    let actor = slot.actor_id.clone();
    let mut backoff = BACKOFF_MIN;
    let mut expired_logged = None;
    loop {
        match client.request(&slot).await {
            Ok(identity) => {
                backoff = BACKOFF_MIN;
                if let Ok(ahead) = identity.not_before.duration_since(SystemTime::now())
                    && !ahead.is_zero()
                {
                    info!(
                        actor = %actor, not_before = %rfc3339(identity.not_before),
                        "the signer's certificate is not valid yet (clock skew); putting it in \
                         force when it is"
                    );
                    sleep_until(identity.not_before + Duration::from_secs(1)).await;
                }
                let renewal = slot.installed().is_some();
                let current = slot.install(identity, &generations);
                let (renew_at, shortened) = client.renew_at(&current);
                if shortened {
                    warn!(
                        actor = %actor,
                        "renew_before_secs is not shorter than the certificate's lifetime: \
                         renewing at half of it"
                    );
                }
                info!(
                    actor = %actor,
                    subject = %current.subject,
                    serial = %current.serial,
                    not_after = %rfc3339(current.not_after),
                    renew_at = %rfc3339(renew_at),
                    generation = current.generation,
                    "{}",
                    if renewal { "actor certificate renewed" } else { "actor certificate issued" }
                );
                let earliest = SystemTime::now() + MIN_RENEW_WAIT;
                sleep_until(renew_at.max(earliest)).await;
            }
            Err(e) => {
                let wait = backoff.mul_f64(0.8 + 0.2 * rand::random::<f64>());
                backoff = (backoff * 2).min(BACKOFF_MAX);
                warn!(
                    actor = %actor, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "actor certificate request failed; retrying"
                );
                slot.fail(e.to_string());
                if let Some(current) = slot.installed()
                    && super::validity(current.not_before, current.not_after, SystemTime::now())
                        == Validity::Expired
                    && expired_logged != Some(current.generation)
                {
                    expired_logged = Some(current.generation);
                    warn!(
                        actor = %actor,
                        subject = %current.subject,
                        not_after = %rfc3339(current.not_after),
                        "actor certificate expired before its renewal succeeded; the actor's \
                         tunnels are refused until the signer answers"
                    );
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Sleeps until the wall clock reaches `at`, looking at it at least every minute.
async fn sleep_until(at: SystemTime) {
    while let Ok(left) = at.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(MAX_SLEEP)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        fs,
        os::unix::fs::PermissionsExt as _,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Instant,
    };

    use http::{HeaderMap, Response};
    use hyper::{body::Incoming, service::service_fn};
    use tokio::net::TcpListener;

    use super::{
        super::{SourceConfig, Store, testing::Ca},
        *,
    };

    /// What the test signer answers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        Sign,
        Fail,
        WrongType,
        WrongKey,
        Hang,
    }

    /// An in-process signer on loopback that signs CSRs with its CA.
    struct TestSigner {
        addr: SocketAddr,
        state: Arc<SignerState>,
        task: JoinHandle<()>,
    }

    struct SignerState {
        mode: Mutex<Mode>,
        lifetime: Mutex<i64>,
        requests: AtomicUsize,
        headers: Mutex<Vec<HeaderMap>>,
        targets: Mutex<Vec<String>>,
    }

    impl Drop for TestSigner {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestSigner {
        async fn start(lifetime: i64) -> TestSigner {
            TestSigner::start_with(lifetime, None).await
        }

        async fn start_with(lifetime: i64, tls: Option<Arc<rustls::ServerConfig>>) -> TestSigner {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let ca = Arc::new(Ca::new());
            let state = Arc::new(SignerState {
                mode: Mutex::new(Mode::Sign),
                lifetime: Mutex::new(lifetime),
                requests: AtomicUsize::new(0),
                headers: Mutex::new(Vec::new()),
                targets: Mutex::new(Vec::new()),
            });
            let task = tokio::spawn({
                let (ca, state) = (Arc::clone(&ca), Arc::clone(&state));
                async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            return;
                        };
                        let (ca, state, tls) = (Arc::clone(&ca), Arc::clone(&state), tls.clone());
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let (ca, state) = (Arc::clone(&ca), Arc::clone(&state));
                                async move { Ok::<_, Infallible>(answer(&ca, &state, req).await) }
                            });
                            let http = hyper::server::conn::http1::Builder::new();
                            match tls {
                                Some(config) => {
                                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                                    if let Ok(s) = acceptor.accept(stream).await {
                                        let _ =
                                            http.serve_connection(TokioIo::new(s), service).await;
                                    }
                                }
                                None => {
                                    let _ =
                                        http.serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                        });
                    }
                }
            });
            TestSigner { addr, state, task }
        }

        fn url(&self) -> String {
            format!("http://{}/v1/sign", self.addr)
        }

        fn set_mode(&self, mode: Mode) {
            *self.state.mode.lock().unwrap() = mode;
        }

        fn requests(&self) -> usize {
            self.state.requests.load(Ordering::SeqCst)
        }
    }

    async fn answer(ca: &Ca, state: &SignerState, req: Request<Incoming>) -> Response<Full<Bytes>> {
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.headers.lock().unwrap().push(req.headers().clone());
        state.targets.lock().unwrap().push(req.uri().to_string());
        let mode = *state.mode.lock().unwrap();
        let lifetime = *state.lifetime.lock().unwrap();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let reply = |status: StatusCode, ty: &str, body: String| {
            Response::builder()
                .status(status)
                .header(CONTENT_TYPE, ty)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        match mode {
            Mode::Fail => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "signer down for the test\n".into(),
                );
            }
            Mode::Hang => {
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(std::str::from_utf8(&body).unwrap())
                .unwrap();
        let cert = if mode == Mode::WrongKey {
            let other = rcgen::KeyPair::generate().unwrap();
            ca.sign("wrong", &other, -5, lifetime)
        } else {
            let mut csr = csr;
            csr.params.not_before = super::super::testing::offset(-1);
            csr.params.not_after = super::super::testing::offset(lifetime);
            csr.signed_by(&ca.cert, &ca.key).unwrap()
        };
        let ty = if mode == Mode::WrongType {
            "text/plain"
        } else {
            "application/pem-certificate-chain; charset=utf-8"
        };
        reply(
            StatusCode::OK,
            ty,
            format!("{}{}", cert.pem(), ca.cert.pem()),
        )
    }

    fn store(url: &str, token_file: Option<PathBuf>, renew_before: Option<Duration>) -> Store {
        Store::new(SourceConfig::Signer {
            url: url.to_string(),
            ca_file: None,
            token_file,
            renew_before,
        })
        .unwrap()
    }

    async fn wait_for(what: &str, secs: u64, cond: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    fn last_error(store: &Store) -> String {
        store.status()[0].last_error.clone().unwrap_or_default()
    }

    fn token(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("token");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[tokio::test]
    async fn issues_with_the_interface_headers_and_renews_with_a_new_key() {
        let signer = TestSigner::start(3).await;
        let dir = tempfile::tempdir().unwrap();
        let token = token(dir.path(), "s3cret-token\n", 0o600);
        let store = store(&signer.url(), Some(token), None);
        store.register("team-a/pod-1", "coder", "team-a");
        wait_for("a certificate", 5, || store.current("team-a/pod-1").is_ok()).await;
        let first = store.current("team-a/pod-1").unwrap();
        assert_eq!(first.subject, "CN=team-a/pod-1");
        assert_eq!(first.key.cert.len(), 2);
        {
            let headers = signer.state.headers.lock().unwrap();
            let h = &headers[0];
            assert_eq!(h[CONTENT_TYPE], "application/pkcs10");
            assert_eq!(h[ACCEPT], RESPONSE_TYPE);
            assert_eq!(h[AUTHORIZATION], "Bearer s3cret-token");
            assert_eq!(h[HEADER_ACTOR_ID], "team-a/pod-1");
            assert_eq!(h[HEADER_ACTOR_TEMPLATE], "coder");
            assert_eq!(h[HEADER_ACTOR_TEMPLATE_NAMESPACE], "team-a");
            assert_eq!(h[HOST], signer.addr.to_string());
            assert_eq!(
                signer.state.targets.lock().unwrap()[0],
                "/v1/sign",
                "origin-form request target"
            );
        }
        // Lifetime 4 s (1 s back-dated): renewed at two thirds, about 1.7 s from now.
        wait_for("a renewal", 6, || {
            store
                .current("team-a/pod-1")
                .is_ok_and(|c| c.generation > first.generation)
        })
        .await;
        let second = store.current("team-a/pod-1").unwrap();
        assert_ne!(second.serial, first.serial);
        assert_ne!(
            second.key.key.public_key().unwrap().as_ref(),
            first.key.key.public_key().unwrap().as_ref(),
            "a renewal must use a new key"
        );
        let status = store.status();
        assert!(status[0].renewals >= 1, "{status:?}");
        assert_eq!(status[0].last_error, None);
        assert!(signer.requests() >= 2);

        // Removed: no more requests.
        store.remove("team-a/pod-1");
        let before = signer.requests();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(signer.requests(), before);
    }

    #[tokio::test]
    async fn failures_are_retried_with_backoff_and_reported() {
        let signer = TestSigner::start(3600).await;
        signer.set_mode(Mode::Fail);
        let store = store(&signer.url(), None, None);
        store.register("a1", "t", "ns");
        wait_for("the failure", 5, || last_error(&store).contains("503")).await;
        let err = store.current("a1").unwrap_err().to_string();
        assert!(err.contains("no client certificate yet"), "{err}");
        assert!(err.contains("signer down for the test"), "{err}");
        // 1 s, then 2 s: three requests within about 3 s, not more than four.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        let n = signer.requests();
        assert!((2..=4).contains(&n), "{n} requests in 3.2 s");

        signer.set_mode(Mode::Sign);
        wait_for("recovery", 8, || store.current("a1").is_ok()).await;
        assert_eq!(store.status()[0].last_error, None);
    }

    #[tokio::test]
    async fn bad_answers_are_refused() {
        let signer = TestSigner::start(3600).await;
        signer.set_mode(Mode::WrongType);
        let store = store(&signer.url(), None, None);
        store.register("a1", "t", "ns");
        wait_for("the type error", 5, || {
            last_error(&store).contains("Content-Type")
        })
        .await;
        assert!(store.current("a1").is_err());

        signer.set_mode(Mode::WrongKey);
        wait_for("the key error", 8, || {
            last_error(&store).contains("does not belong")
        })
        .await;
        assert!(store.current("a1").is_err());
    }

    #[tokio::test]
    async fn expired_before_renewal_fails_closed() {
        let signer = TestSigner::start(2).await;
        let store = store(&signer.url(), None, None);
        store.register("a1", "t", "ns");
        wait_for("a certificate", 5, || store.current("a1").is_ok()).await;
        signer.set_mode(Mode::Fail);
        wait_for("expiry", 8, || {
            matches!(store.current("a1"), Err(Error::Expired { .. }))
        })
        .await;
        let err = store.current("a1").unwrap_err().to_string();
        assert!(err.contains("503"), "the last failure is named: {err}");
    }

    #[tokio::test]
    async fn a_hanging_signer_times_out() {
        let signer = TestSigner::start(3600).await;
        signer.set_mode(Mode::Hang);
        let mut client =
            Client::new(&signer.url(), None, None, None, SocketFactory::default()).unwrap();
        assert_eq!(client.exchange_timeout, EXCHANGE_TIMEOUT);
        client.exchange_timeout = Duration::from_millis(300);
        let slot = Slot {
            actor_id: "a1".into(),
            template: "t".into(),
            template_namespace: "ns".into(),
            state: Mutex::new(Default::default()),
        };
        let start = Instant::now();
        let err = client.request(&slot).await.err().unwrap().to_string();
        assert!(err.contains("no answer within 0.3 s"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(signer.requests(), 1);
    }

    #[tokio::test]
    async fn https_is_verified_with_the_ca_file() {
        let server_ca = Ca::new();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.not_before = super::super::testing::offset(-10);
        params.not_after = super::super::testing::offset(3600);
        let server_cert = params
            .signed_by(&server_key, &server_ca.cert, &server_ca.key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
        let signer = TestSigner::start_with(3600, Some(Arc::new(config))).await;
        let dir = tempfile::tempdir().unwrap();
        let good_ca = dir.path().join("good.pem");
        fs::write(&good_ca, server_ca.cert.pem()).unwrap();
        let other_ca = dir.path().join("other.pem");
        fs::write(&other_ca, Ca::new().cert.pem()).unwrap();
        let url = format!("https://{}/v1/sign", signer.addr);

        let good = Store::new(SourceConfig::Signer {
            url: url.clone(),
            ca_file: Some(good_ca),
            token_file: None,
            renew_before: None,
        })
        .unwrap();
        good.register("a1", "t", "ns");
        wait_for("a certificate over https", 5, || good.current("a1").is_ok()).await;
        assert_eq!(signer.requests(), 1);

        let other = Store::new(SourceConfig::Signer {
            url,
            ca_file: Some(other_ca),
            token_file: None,
            renew_before: None,
        })
        .unwrap();
        other.register("a1", "t", "ns");
        wait_for("the TLS failure", 5, || last_error(&other).contains("TLS")).await;
        assert!(other.current("a1").is_err());
        assert_eq!(signer.requests(), 1, "an unverified signer got the CSR");
    }

    #[test]
    fn settings_are_checked_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        fs::write(&ca, Ca::new().cert.pem()).unwrap();
        let new = |url: &str, ca_file: Option<&Path>, token: Option<PathBuf>| {
            Client::new(url, ca_file, token, None, SocketFactory::default())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(new("http://10.0.0.1:8080/sign", None, None).contains("loopback"));
        assert!(new("http://signer.example/sign", None, None).contains("loopback"));
        assert!(new("http://localhost:1/sign", None, None).contains("loopback"));
        assert!(new("https://signer.example/sign", None, None).contains("needs ca_file"));
        assert!(new("ftp://127.0.0.1/", None, None).contains("https://"));
        assert!(new("/v1/sign", None, None).contains("https://"));
        assert!(new("http://u:p@127.0.0.1/", None, None).contains("user information"));
        assert!(new("http://127.0.0.1:1/", Some(&ca), None).contains("ca_file is for"));
        assert!(
            new(
                "https://signer.example/",
                Some(&dir.path().join("no")),
                None
            )
            .contains("No such file")
        );
        let open = token(dir.path(), "t\n", 0o644);
        assert!(new("http://127.0.0.1:1/", None, Some(open)).contains("chmod 600"));
        let two_lines = token(dir.path(), "t\nx-evil: 1\n", 0o600);
        assert!(new("http://127.0.0.1:1/", None, Some(two_lines)).contains("one line"));
        let empty = token(dir.path(), "\n", 0o600);
        assert!(new("http://127.0.0.1:1/", None, Some(empty)).contains("empty"));
        // Accepted.
        assert_eq!(new("http://127.0.0.1:1/v1/sign", None, None), "");
        assert_eq!(new("http://[::1]:1/v1/sign", None, None), "");
        assert_eq!(
            new("https://signer.example:8443/v1/sign", Some(&ca), None),
            ""
        );
        let ok = token(dir.path(), "t\n", 0o600);
        assert_eq!(new("http://127.0.0.1:1/", None, Some(ok)), "");
        assert!(
            Client::new(
                "http://127.0.0.1:1/",
                None,
                None,
                Some(Duration::ZERO),
                SocketFactory::default()
            )
            .is_err()
        );
    }

    #[test]
    fn renewal_time() {
        let client = |renew_before| {
            Client::new(
                "http://127.0.0.1:1/",
                None,
                None,
                renew_before,
                SocketFactory::default(),
            )
            .unwrap()
        };
        let ca = Ca::new();
        let (chain, key) = ca.leaf("a", 0, 900);
        let identity = identity(
            parse_chain(chain.as_bytes()).unwrap(),
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
        let current = Slot {
            actor_id: "a".into(),
            template: "t".into(),
            template_namespace: "n".into(),
            state: Mutex::new(Default::default()),
        }
        .install(identity, &AtomicU64::new(1));
        let left = |c: &Client| {
            let (at, shortened) = c.renew_at(&current);
            (
                current.not_after.duration_since(at).unwrap().as_secs(),
                shortened,
            )
        };
        assert_eq!(left(&client(None)), (300, false));
        assert_eq!(left(&client(Some(Duration::from_secs(60)))), (60, false));
        assert_eq!(left(&client(Some(Duration::from_secs(900)))), (450, true));
    }

    #[test]
    fn failure_reasons_are_short_and_printable() {
        assert_eq!(reason(b""), "(no reason given)");
        assert_eq!(reason(b"no such actor\r\n"), "no such actor");
        assert_eq!(reason(b"a\x1b[31mb"), "a [31mb");
        assert_eq!(reason(&[b'x'; 1000]).len(), MAX_REASON_CHARS);
    }
}
