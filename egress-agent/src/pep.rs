//! The PEP link's settings: where the PEP listens, how the agent checks it (TLS with a
//! configured CA only) and proves itself (client certificate, `Proxy-Authorization`), the
//! link's timeouts and bounds, and the names of the identity headers. Everything comes from
//! flags and the config file's `pep` (a string or a table), and every file is read once at
//! start-up. Secrets come only from files whose mode keeps them private, never from flags,
//! and are never printed: `Debug` redacts them.
use std::{
    fmt,
    fs::{self, File as FsFile},
    io::Read as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use http::{HeaderName, HeaderValue};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde::Deserialize;

use crate::tunnel::h2;

/// Default bound on TCP connect + TLS handshake with the PEP.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on the PEP's answer to CONNECT.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default most PEP connects (TCP + TLS) in progress at once.
pub const DEFAULT_MAX_CONNECTING: usize = 256;
/// Default most connections waiting for a connect slot; beyond it they are reset at once.
pub const DEFAULT_MAX_WAITING: usize = 1024;

/// Largest secret file read (authorization value, client key).
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// Largest certificate file read (CA bundle, client chain).
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Largest `Proxy-Authorization` value sent.
const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;

/// Why the PEP settings are unusable; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PEP address does not parse.
    #[error(
        "PEP address {0:?} is malformed: expected HOST:PORT, e.g. 127.0.0.1:3128, [fd00::1]:3128 \
         or squid.egress.svc:3128 (no scheme, no path)"
    )]
    BadAddress(String),
    /// Settings for the link but no address to use them with.
    #[error(
        "{0} given without a PEP address: pass --pep HOST:PORT (env EGRESS_PEP) or set \
         `pep.address` in the config file"
    )]
    NoAddress(&'static str),
    /// A setting that only makes sense with another one.
    #[error("{setting} needs {needs}")]
    Needs {
        /// The setting given.
        setting: &'static str,
        /// What it needs, and where to give it.
        needs: &'static str,
    },
    /// A setting that must be above zero is zero.
    #[error("{0} must be above zero")]
    Zero(&'static str),
    /// A bound above what the agent can count.
    #[error("{setting} {value} is above the most the agent supports ({max})")]
    TooLarge {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: usize,
        /// The largest accepted.
        max: usize,
    },
    /// A file cannot be opened or read.
    #[error("{what} {path}: {source}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not a regular file.
    #[error("{what} {path} is not a regular file")]
    NotRegular {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file is larger than anything it should hold.
    #[error("{what} {path} is larger than {max} bytes: is it the right file?")]
    TooBig {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// A secret file others can read or write.
    #[error(
        "{what} {path} has mode {mode:04o}: a secret file must be readable by its owner only; \
         run `chmod 600 {path}`",
        path = path.display()
    )]
    SecretMode {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file's content is unusable (what is wrong; never the content of a secret).
    #[error("{what} {path}: {problem}")]
    Content {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The TLS server name is neither a DNS name nor an IP address.
    #[error(
        "PEP TLS server name {0:?} is neither a DNS name nor an IP address: set \
         --pep-tls-server-name (or `pep.tls.server_name`) to the name in the PEP's certificate"
    )]
    ServerName(String),
    /// rustls refused the TLS settings (e.g. a client key that does not match its certificate).
    #[error("PEP TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// A `[peps.NAME]` name that cannot be used.
    #[error(
        "PEP name {0:?} cannot be used: use lowercase letters, digits and `-` (at most 63), \
         and not `default` or `none`, which mean the global `[pep]` and no PEP"
    )]
    Name(String),
    /// `[pep.tls.actor_certs]` is unusable.
    #[error("pep.tls.actor_certs: {0}")]
    ActorCerts(String),
    /// A named PEP without an address.
    #[error("[peps.{0}] has no address: set `address = \"HOST:PORT\"` in it")]
    NoNamedAddress(String),
    /// An HTTP/2 window outside what HTTP/2 allows.
    #[error("pep.http2.{setting} = {value}: {problem}")]
    Http2 {
        /// The key under `[pep.http2]`.
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The allowed range.
        problem: &'static str,
    },
    /// A configured header name is unusable.
    #[error("pep.headers.{key} = {name:?}: {problem}")]
    Header {
        /// The key under `[pep.headers]`.
        key: &'static str,
        /// The name given.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Where the PEP listens: `host:port`, the host a name or an IP literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PepAddr {
    /// Name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl PepAddr {
    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl FromStr for PepAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadAddress(s.to_string());
        if s.contains("://") || s.contains('/') {
            return Err(bad());
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(PepAddr {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if port == 0 || !valid_name {
            return Err(bad());
        }
        Ok(PepAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for PepAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.socket_addr() {
            Some(addr) => addr.fmt(f),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// The PEP and everything about the link to it.
#[derive(Clone, Debug)]
pub struct Pep {
    /// Its name: [`DEFAULT_PEP`] for `[pep]` (and the `--pep*` flags), the key for `[peps.NAME]`.
    pub name: String,
    /// Where it listens.
    pub addr: PepAddr,
    /// What the CONNECT request carries: the derived name and the identity headers
    /// (`headers`), or the original `IP:port` with the name as a hint (`substrate`).
    pub profile: Profile,
    /// HTTP/1.1 (a connection per tunnel) or HTTP/2 (tunnels multiplexed on pooled
    /// connections, one pool per actor).
    pub http: HttpVersion,
    /// `substrate`: the header carrying the derived name (SNI, Host, DNS) as a hint.
    pub hint_header: HeaderName,
    /// HTTP/2 windows and bounds (with `http = "2"`).
    pub http2: h2::Settings,
    /// TLS to the PEP; `None`: plain TCP (a PEP on the same host or a trusted network only).
    pub tls: Option<Tls>,
    /// `Proxy-Authorization` sent on every CONNECT.
    pub authorization: Option<Authorization>,
    /// Bound on TCP connect + TLS handshake (and, separately, on waiting for a connect slot).
    pub connect_timeout: Duration,
    /// Bound on the PEP's CONNECT answer once connected.
    pub response_timeout: Duration,
    /// Most connects (TCP + TLS) in progress at once.
    pub max_connecting: usize,
    /// Most connections waiting for a connect slot; beyond it they are reset at once.
    pub max_waiting: usize,
    /// Names of the identity headers.
    pub headers: Headers,
}

impl Pep {
    /// A plain-TCP PEP at `addr` with the default timeouts, bounds and header names.
    pub fn new(addr: PepAddr) -> Self {
        Pep {
            name: DEFAULT_PEP.to_string(),
            addr,
            profile: Profile::Headers,
            http: HttpVersion::Http1,
            hint_header: HeaderName::from_static(HEADER_CONNECT_AUTHORITY),
            http2: h2::Settings::default(),
            tls: None,
            authorization: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_connecting: DEFAULT_MAX_CONNECTING,
            max_waiting: DEFAULT_MAX_WAITING,
            headers: Headers::default(),
        }
    }

    /// Merges the flags over the config file's `pep` and checks and loads everything (reads
    /// the CA, certificate, key and authorization files). `Ok(None)`: no PEP address anywhere
    /// and no PEP setting either.
    pub fn load(args: &PepArgs, file: Option<&PepFile>) -> Result<Option<Pep>, Error> {
        Pep::load_as(DEFAULT_PEP, args, file)
    }

    /// Checks and loads the config file's `[peps.NAME]` (no flags apply to named PEPs).
    pub fn load_named(name: &str, file: &PepFile) -> Result<Pep, Error> {
        if !pep_name_ok(name) || name == DEFAULT_PEP || name == NO_PEP {
            return Err(Error::Name(name.to_string()));
        }
        if file.address.is_none() {
            return Err(Error::NoNamedAddress(name.to_string()));
        }
        Pep::load_as(name, &PepArgs::default(), Some(file))?
            .ok_or_else(|| Error::NoNamedAddress(name.to_string()))
    }

    fn load_as(name: &str, args: &PepArgs, file: Option<&PepFile>) -> Result<Option<Pep>, Error> {
        let empty = PepFile::default();
        let file = file.unwrap_or(&empty);
        let tls_file = file.tls.as_ref();
        let address = args.pep.as_deref().or(file.address.as_deref());
        let ca_file = args
            .pep_tls_ca_file
            .as_ref()
            .or(tls_file.and_then(|t| t.ca_file.as_ref()));
        let server_name = args
            .pep_tls_server_name
            .as_deref()
            .or(tls_file.and_then(|t| t.server_name.as_deref()));
        let client_cert = args
            .pep_tls_client_cert_file
            .as_ref()
            .or(tls_file.and_then(|t| t.client_cert_file.as_ref()));
        let client_key = args
            .pep_tls_client_key_file
            .as_ref()
            .or(tls_file.and_then(|t| t.client_key_file.as_ref()));
        let authorization_file = args
            .pep_proxy_authorization_file
            .as_ref()
            .or(file.proxy_authorization_file.as_ref());
        let connect_timeout_ms = args.pep_connect_timeout_ms.or(file.connect_timeout_ms);
        let response_timeout_ms = args.pep_timeout_ms.or(file.response_timeout_ms);
        let max_connecting = args.pep_max_connecting.or(file.max_connecting);
        let max_waiting = args.pep_max_waiting.or(file.max_waiting);
        let profile = args.pep_profile.or(file.profile);
        let http = args.pep_http.or(file.http);

        let Some(address) = address else {
            let given = [
                ("--pep-tls-ca-file / pep.tls.ca_file", ca_file.is_some()),
                (
                    "--pep-tls-server-name / pep.tls.server_name",
                    server_name.is_some(),
                ),
                (
                    "--pep-tls-client-cert-file / pep.tls.client_cert_file",
                    client_cert.is_some(),
                ),
                (
                    "--pep-tls-client-key-file / pep.tls.client_key_file",
                    client_key.is_some(),
                ),
                (
                    "--pep-proxy-authorization-file / pep.proxy_authorization_file",
                    authorization_file.is_some(),
                ),
                (
                    "--pep-connect-timeout-ms / pep.connect_timeout_ms",
                    connect_timeout_ms.is_some(),
                ),
                (
                    "--pep-timeout-ms / pep.response_timeout_ms",
                    response_timeout_ms.is_some(),
                ),
                (
                    "--pep-max-connecting / pep.max_connecting",
                    max_connecting.is_some(),
                ),
                ("--pep-max-waiting / pep.max_waiting", max_waiting.is_some()),
                ("--pep-profile / pep.profile", profile.is_some()),
                ("--pep-http / pep.http", http.is_some()),
                ("pep.hint_header", file.hint_header.is_some()),
                ("[pep.http2]", file.http2.is_some()),
                ("[pep.tls]", tls_file.is_some()),
                ("[pep.headers]", file.headers.is_some()),
            ];
            return match given.iter().find(|(_, g)| *g) {
                Some((setting, _)) => Err(Error::NoAddress(setting)),
                None => Ok(None),
            };
        };
        let addr: PepAddr = address.parse()?;

        let mut pep = Pep::new(addr);
        pep.name = name.to_string();
        pep.profile = profile.unwrap_or_default();
        pep.http = http.unwrap_or_default();
        if let Some(hint) = &file.hint_header {
            pep.hint_header = Headers::check_name("hint_header", hint)?;
        }
        if let Some(http2) = &file.http2 {
            pep.http2 = http2_from_file(http2)?;
        }
        if let Some(ms) = connect_timeout_ms {
            pep.connect_timeout = nonzero_ms("--pep-connect-timeout-ms", ms)?;
        }
        if let Some(ms) = response_timeout_ms {
            pep.response_timeout = nonzero_ms("--pep-timeout-ms", ms)?;
        }
        if let Some(n) = max_connecting {
            if n == 0 {
                return Err(Error::Zero("--pep-max-connecting"));
            }
            if n > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(Error::TooLarge {
                    setting: "--pep-max-connecting",
                    value: n,
                    max: tokio::sync::Semaphore::MAX_PERMITS,
                });
            }
            pep.max_connecting = n;
        }
        if let Some(n) = max_waiting {
            // Zero is allowed: no waiting at all, a connection finding every slot busy is reset.
            if n > isize::MAX as usize {
                return Err(Error::TooLarge {
                    setting: "--pep-max-waiting",
                    value: n,
                    max: isize::MAX as usize,
                });
            }
            pep.max_waiting = n;
        }
        if let Some(headers) = &file.headers {
            pep.headers = Headers::from_file(headers)?;
        }
        if let Some(path) = authorization_file {
            pep.authorization = Some(Authorization::read(path)?);
        }
        match ca_file {
            Some(ca_file) => {
                pep.tls = Some(Tls::load(
                    &pep.addr,
                    ca_file,
                    server_name,
                    client_cert.map(PathBuf::as_path),
                    client_key.map(PathBuf::as_path),
                    tls_file.and_then(|t| t.actor_certs.as_ref()),
                )?);
            }
            None => {
                let needs = "a CA file to verify the PEP with: --pep-tls-ca-file (or \
                             pep.tls.ca_file)";
                for (setting, given) in [
                    ("--pep-tls-server-name", server_name.is_some()),
                    ("--pep-tls-client-cert-file", client_cert.is_some()),
                    ("--pep-tls-client-key-file", client_key.is_some()),
                    (
                        "pep.tls.actor_certs",
                        tls_file.is_some_and(|t| t.actor_certs.is_some()),
                    ),
                ] {
                    if given {
                        return Err(Error::Needs { setting, needs });
                    }
                }
            }
        }
        if pep.profile == Profile::Substrate {
            // The actor is proven by its certificate alone (no identity headers): one
            // agent-wide certificate would make every actor the same to the PEP.
            let mtls = pep.tls.as_ref().is_some_and(|t| t.actor_certs.is_some());
            if !mtls {
                return Err(Error::Needs {
                    setting: "profile \"substrate\"",
                    needs: "mTLS with per-actor certificates: a CA to verify the PEP \
                            (pep.tls.ca_file) and [pep.tls.actor_certs] (an agent-wide \
                            client_cert_file would not tell the PEP which actor connects)",
                });
            }
        }
        Ok(Some(pep))
    }
}

impl Default for Pep {
    fn default() -> Self {
        Pep::new(PepAddr {
            host: "127.0.0.1".into(),
            port: 3128,
        })
    }
}

/// The address only: what logs show as `pep`.
impl fmt::Display for Pep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// The name of the global PEP (`[pep]`, the `--pep*` flags) in listings and selections.
pub const DEFAULT_PEP: &str = "default";
/// An actor's `pep = "none"`: no PEP, the embedded policy decides (even if a default exists).
pub const NO_PEP: &str = "none";

/// A `[peps.NAME]` name: lowercase letters, digits and `-`, like a DNS label.
pub fn pep_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Which PEP serves an actor, and why: the actor's own choice, its template namespace's, or
/// the global default; none at all means the embedded policy decides and the agent dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The PEP's name ([`DEFAULT_PEP`] for `[pep]`); `None`: no PEP, the embedded policy.
    pub pep: Option<String>,
    /// Where the choice came from.
    pub by: SelectedBy,
}

/// Where an actor's [`Selection`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectedBy {
    /// The actor's `pep` (or the pod's `egress.dev/pep` annotation).
    Actor,
    /// `[pep_by_namespace]` for the actor's template namespace.
    Namespace,
    /// The global `[pep]` (or `--pep`).
    Default,
    /// Nothing chose a PEP: no global one is configured.
    Nothing,
}

impl SelectedBy {
    /// As shown in `actor list` and `status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SelectedBy::Actor => "actor",
            SelectedBy::Namespace => "namespace",
            SelectedBy::Default => "default",
            SelectedBy::Nothing => "nothing",
        }
    }
}

impl Selection {
    /// No PEP because none is configured anywhere.
    pub fn nothing() -> Self {
        Selection {
            pep: None,
            by: SelectedBy::Nothing,
        }
    }
}

/// `squid-a (actor)`, `default (default)`, `none (namespace)`.
impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.pep.as_deref().unwrap_or(NO_PEP),
            self.by.as_str()
        )
    }
}

/// The PEPs an actor can be given: precedence actor > namespace > global default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// Whether a global `[pep]` exists.
    pub has_default: bool,
    /// The `[peps.NAME]` names.
    pub named: std::collections::BTreeSet<String>,
    /// `[pep_by_namespace]`: template namespace -> PEP name (or `default` / `none`).
    pub by_namespace: std::collections::BTreeMap<String, String>,
}

impl Selector {
    /// Checks that every `[pep_by_namespace]` entry names a PEP that exists.
    pub fn check(&self) -> Result<(), String> {
        for (namespace, name) in &self.by_namespace {
            self.resolve(name).map_err(|problem| {
                format!("pep_by_namespace.{namespace:?} = {name:?}: {problem}")
            })?;
        }
        Ok(())
    }

    /// The PEP for an actor that asks for `asked` (its `pep`) in template namespace
    /// `namespace`; an error when it names a PEP that is not configured.
    pub fn select(&self, asked: Option<&str>, namespace: &str) -> Result<Selection, String> {
        if let Some(name) = asked {
            return Ok(Selection {
                pep: self.resolve(name)?,
                by: SelectedBy::Actor,
            });
        }
        if let Some(name) = self.by_namespace.get(namespace) {
            return Ok(Selection {
                pep: self.resolve(name)?,
                by: SelectedBy::Namespace,
            });
        }
        Ok(match self.has_default {
            true => Selection {
                pep: Some(DEFAULT_PEP.to_string()),
                by: SelectedBy::Default,
            },
            false => Selection::nothing(),
        })
    }

    fn resolve(&self, name: &str) -> Result<Option<String>, String> {
        match name {
            NO_PEP => Ok(None),
            DEFAULT_PEP if self.has_default => Ok(Some(name.to_string())),
            DEFAULT_PEP => Err(
                "`default` names the global [pep], and none is configured: set [pep] or name \
                 one of [peps]"
                    .into(),
            ),
            _ if self.named.contains(name) => Ok(Some(name.to_string())),
            _ => Err(format!(
                "no PEP is named {name:?}: configured are {}",
                self.names().join(", ")
            )),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.named.iter().cloned().collect();
        if self.has_default {
            names.insert(0, DEFAULT_PEP.to_string());
        }
        names.push(format!("{NO_PEP} (the embedded policy)"));
        names
    }
}

/// What the CONNECT request carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// `CONNECT name:port` (the name from SNI, Host or the actor's DNS; the address when none)
    /// with the `x-ate-*` identity headers: squid and PEPs that read headers.
    #[default]
    Headers,
    /// Agent Substrate's contract: `CONNECT ip:port` (the original destination) over mTLS, the
    /// actor proven by its client certificate; the derived name only as a hint header.
    Substrate,
}

impl Profile {
    /// As written in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Profile::Headers => "headers",
            Profile::Substrate => "substrate",
        }
    }
}

/// The HTTP version spoken to the PEP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum HttpVersion {
    /// HTTP/1.1: one connection per tunnel.
    #[default]
    #[serde(rename = "1.1")]
    #[value(name = "1.1")]
    Http1,
    /// HTTP/2: tunnels are streams on pooled connections, one pool per actor (TLS with ALPN
    /// `h2`, or prior knowledge over plain TCP).
    #[serde(rename = "2")]
    #[value(name = "2")]
    Http2,
}

impl HttpVersion {
    /// As written in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// `[pep.http2]` checked against what HTTP/2 and the pool allow ([`h2::MAX_STREAMS`],
/// [`h2::MIN_WINDOW`], [`h2::MAX_WINDOW`]); what is not given keeps the pool's default.
fn http2_from_file(file: &Http2File) -> Result<h2::Settings, Error> {
    fn check(
        setting: &'static str,
        value: Option<u64>,
        (min, max): (u64, u64),
        problem: &'static str,
    ) -> Result<Option<u64>, Error> {
        match value {
            Some(value) if !(min..=max).contains(&value) => Err(Error::Http2 {
                setting,
                value,
                problem,
            }),
            value => Ok(value),
        }
    }
    const WINDOW: &str = "give 65535 (HTTP/2's initial window) to 2147483647";
    let windows = (u64::from(h2::MIN_WINDOW), u64::from(h2::MAX_WINDOW));
    let default = h2::Settings::default();
    // The casts cannot truncate: each value was checked against its type's range.
    Ok(h2::Settings {
        max_streams: check(
            "max_streams",
            file.max_streams,
            (1, h2::MAX_STREAMS as u64),
            "give 1 to 1000",
        )?
        .map_or(default.max_streams, |v| v as usize),
        stream_window: check("stream_window", file.stream_window, windows, WINDOW)?
            .map_or(default.stream_window, |v| v as u32),
        connection_window: check("connection_window", file.connection_window, windows, WINDOW)?
            .map_or(default.connection_window, |v| v as u32),
    })
}

fn nonzero_ms(setting: &'static str, ms: u64) -> Result<Duration, Error> {
    if ms == 0 {
        return Err(Error::Zero(setting));
    }
    Ok(Duration::from_millis(ms))
}

/// TLS to the PEP: the CA that must have signed its certificate, the name it must carry, and
/// the agent's own certificate if the PEP asks for one.
#[derive(Clone)]
pub struct Tls {
    /// PEM bundle of the CA certificates trusted for the PEP (nothing else is trusted).
    pub ca_file: PathBuf,
    /// The name (or IP address, checked against the certificate's IP SANs) verified.
    pub server_name: ServerName<'static>,
    /// The agent's certificate chain (PEM), when it authenticates itself.
    pub client_cert_file: Option<PathBuf>,
    /// The key of that certificate (PEM; a secret file).
    pub client_key_file: Option<PathBuf>,
    /// Where each actor's own client certificate comes from (then no agent-wide one).
    pub actor_certs: Option<crate::certs::SourceConfig>,
    config: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// Reads the files and builds the rustls client configuration (ring provider).
    pub fn load(
        addr: &PepAddr,
        ca_file: &Path,
        server_name: Option<&str>,
        client_cert_file: Option<&Path>,
        client_key_file: Option<&Path>,
        actor_certs: Option<&crate::certs::SourceConfig>,
    ) -> Result<Tls, Error> {
        if let Some(source) = actor_certs {
            // Checked now, so that a missing directory or an unreadable token stops the
            // agent before it takes over capture; the connector makes the store it uses.
            crate::certs::Store::new(source.clone())
                .map_err(|e| Error::ActorCerts(e.to_string()))?;
        }
        if actor_certs.is_some() && (client_cert_file.is_some() || client_key_file.is_some()) {
            return Err(Error::Needs {
                setting: "pep.tls.actor_certs",
                needs: "no agent-wide client certificate: remove client_cert_file and \
                        client_key_file (each actor presents its own)",
            });
        }
        let name = server_name.unwrap_or(&addr.host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| Error::ServerName(name.to_string()))?;

        const CA: &str = "PEP CA file";
        let pem = read_file(CA, ca_file, MAX_PEM_BYTES, false)?;
        let content = |problem: String| Error::Content {
            what: CA,
            path: ca_file.to_path_buf(),
            problem,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| content(format!("not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| content(format!("a certificate rustls cannot use: {e}")))?;
        }
        if roots.is_empty() {
            return Err(content(
                "no certificate in it: give the PEM bundle (-----BEGIN CERTIFICATE-----) of the \
                 CA that signed the PEP's certificate"
                    .into(),
            ));
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match (client_cert_file, client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let (chain, key) = read_client_identity(cert, key)?;
                builder.with_client_auth_cert(chain, key)?
            }
            (Some(_), None) => {
                return Err(Error::Needs {
                    setting: "--pep-tls-client-cert-file",
                    needs: "its key: --pep-tls-client-key-file (or pep.tls.client_key_file)",
                });
            }
            (None, Some(_)) => {
                return Err(Error::Needs {
                    setting: "--pep-tls-client-key-file",
                    needs: "its certificate: --pep-tls-client-cert-file (or \
                            pep.tls.client_cert_file)",
                });
            }
        };
        Ok(Tls {
            ca_file: ca_file.to_path_buf(),
            server_name,
            client_cert_file: client_cert_file.map(Path::to_path_buf),
            client_key_file: client_key_file.map(Path::to_path_buf),
            actor_certs: actor_certs.cloned(),
            config: Arc::new(config),
        })
    }

    /// The rustls client configuration (for the connector).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// A connector for handshakes with the PEP.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// Never prints key material: only the files and the name.
impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name.to_str())
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("actor_certs", &self.actor_certs)
            .finish_non_exhaustive()
    }
}

fn read_client_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    const CERT: &str = "PEP client certificate file";
    const KEY: &str = "PEP client key file";
    let pem = read_file(CERT, cert_file, MAX_PEM_BYTES, false)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Content {
            what: CERT,
            path: cert_file.to_path_buf(),
            problem: format!("not valid PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(Error::Content {
            what: CERT,
            path: cert_file.to_path_buf(),
            problem: "no certificate in it: give the agent's certificate (then its \
                      intermediates) in PEM"
                .into(),
        });
    }
    let pem = read_file(KEY, key_file, MAX_SECRET_BYTES, true)?;
    // The parse error names the PEM section kind at most, never key bytes.
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Content {
        what: KEY,
        path: key_file.to_path_buf(),
        problem: format!(
            "no usable private key ({e}): give a PEM PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key"
        ),
    })?;
    Ok((chain, key))
}

/// The `Proxy-Authorization` value, read from a secret file; `Debug` shows only the file.
#[derive(Clone)]
pub struct Authorization {
    file: PathBuf,
    value: HeaderValue,
}

impl Authorization {
    /// Reads `file` (a secret file: regular, mode without group/other bits). Its whole
    /// content without the trailing newline is the value, e.g. `Basic dXNlcjpwYXNz`.
    pub fn read(file: &Path) -> Result<Authorization, Error> {
        const WHAT: &str = "PEP proxy-authorization file";
        let bytes = read_file(WHAT, file, MAX_SECRET_BYTES, true)?;
        let problem = |problem: &str| Error::Content {
            what: WHAT,
            path: file.to_path_buf(),
            problem: problem.to_string(),
        };
        let trimmed = bytes
            .strip_suffix(b"\n")
            .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
            .unwrap_or(&bytes);
        if trimmed.is_empty() {
            return Err(problem(
                "empty: write the whole header value, e.g. `Basic ` and base64 of user:password",
            ));
        }
        if trimmed.len() > MAX_AUTHORIZATION_BYTES {
            return Err(problem("longer than 8 KiB: is it the right file?"));
        }
        // Visible ASCII and spaces only: a second line or a control character would let the
        // file smuggle another header into the CONNECT request.
        if !trimmed.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
            return Err(problem(
                "holds a control character, a second line or non-ASCII bytes: write the \
                 header value on one line",
            ));
        }
        let mut value = HeaderValue::from_bytes(trimmed)
            .map_err(|_| problem("not a valid HTTP header value"))?;
        value.set_sensitive(true);
        Ok(Authorization {
            file: file.to_path_buf(),
            value,
        })
    }

    /// The header value (marked sensitive).
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// The file it was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorization")
            .field("file", &self.file)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Reads a file of at most `max` bytes. The file is opened first and then checked (no race
/// between the check and the read), and opened non-blocking so a FIFO cannot stall start-up.
/// A `secret` file must have no group or other permission bits.
pub(crate) fn read_file(
    what: &'static str,
    path: &Path,
    max: u64,
    secret: bool,
) -> Result<Vec<u8>, Error> {
    let read_err = |source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(Error::NotRegular {
            what,
            path: path.to_path_buf(),
        });
    }
    if secret && meta.mode() & 0o077 != 0 {
        return Err(Error::SecretMode {
            what,
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    let too_big = || Error::TooBig {
        what,
        path: path.to_path_buf(),
        max,
    };
    if meta.len() > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    FsFile::take(file, max + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Default name of the actor id header.
pub const HEADER_ACTOR_ID: &str = "x-ate-actor-id";
/// Default name of the actor template header.
pub const HEADER_ACTOR_TEMPLATE: &str = "x-ate-actor-template";
/// Default name of the template namespace header.
pub const HEADER_ACTOR_TEMPLATE_NAMESPACE: &str = "x-ate-actor-template-namespace";
/// Default name of the original destination header (`ip:port`, IPv6 in brackets).
pub const HEADER_ORIGINAL_DESTINATION: &str = "x-ate-original-destination";
/// Default name of the header repeating the CONNECT authority.
pub const HEADER_CONNECT_AUTHORITY: &str = "x-ate-connect-authority";
/// Default name of the header saying where the authority came from (`sni`, `host`, `dns`, `ip`).
pub const HEADER_AUTHORITY_SOURCE: &str = "x-ate-authority-source";

/// Headers the identity must not take the name of: they carry the request itself.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "proxy-authorization",
    "proxy-connection",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "keep-alive",
];

/// The names of the identity headers sent on every CONNECT (each PEP may want its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Headers {
    /// The actor's id.
    pub actor_id: HeaderName,
    /// The actor's template.
    pub actor_template: HeaderName,
    /// The namespace of the actor's template.
    pub actor_template_namespace: HeaderName,
    /// The destination the actor connected to.
    pub original_destination: HeaderName,
    /// The authority asked for in the CONNECT line.
    pub connect_authority: HeaderName,
    /// Where the authority came from: `sni`, `host`, `ip` (…).
    pub authority_source: HeaderName,
}

impl Default for Headers {
    fn default() -> Self {
        Headers {
            actor_id: HeaderName::from_static(HEADER_ACTOR_ID),
            actor_template: HeaderName::from_static(HEADER_ACTOR_TEMPLATE),
            actor_template_namespace: HeaderName::from_static(HEADER_ACTOR_TEMPLATE_NAMESPACE),
            original_destination: HeaderName::from_static(HEADER_ORIGINAL_DESTINATION),
            connect_authority: HeaderName::from_static(HEADER_CONNECT_AUTHORITY),
            authority_source: HeaderName::from_static(HEADER_AUTHORITY_SOURCE),
        }
    }
}

impl Headers {
    /// The names from `[pep.headers]`, defaults for those left out; checked as HTTP header
    /// names, none reserved, no two alike.
    pub fn from_file(file: &HeadersFile) -> Result<Headers, Error> {
        let mut headers = Headers::default();
        for (key, given, slot) in [
            ("actor_id", &file.actor_id, &mut headers.actor_id),
            (
                "actor_template",
                &file.actor_template,
                &mut headers.actor_template,
            ),
            (
                "actor_template_namespace",
                &file.actor_template_namespace,
                &mut headers.actor_template_namespace,
            ),
            (
                "original_destination",
                &file.original_destination,
                &mut headers.original_destination,
            ),
            (
                "connect_authority",
                &file.connect_authority,
                &mut headers.connect_authority,
            ),
            (
                "authority_source",
                &file.authority_source,
                &mut headers.authority_source,
            ),
        ] {
            let Some(name) = given else { continue };
            *slot = Headers::check_name(key, name)?;
        }
        let all = headers.all();
        for (i, &(key, name)) in all.iter().enumerate() {
            if all[..i].iter().any(|(_, other)| other == name) {
                return Err(Error::Header {
                    key,
                    name: name.to_string(),
                    problem: "the same name is used for another identity header: give each its own",
                });
            }
        }
        Ok(headers)
    }

    /// `name` as a header name for `key`: a valid HTTP name (lowercased), not one that
    /// carries the request itself.
    pub fn check_name(key: &'static str, name: &str) -> Result<HeaderName, Error> {
        let bad = |problem| Error::Header {
            key,
            name: name.to_string(),
            problem,
        };
        // from_bytes lowercases; HTTP names are case-insensitive anyway.
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            bad("not an HTTP header name: use letters, digits and `-`, e.g. x-pep-actor-id")
        })?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(bad(
                "that header carries the request itself: choose another name",
            ));
        }
        Ok(parsed)
    }

    /// Each header's `[pep.headers]` key and name.
    pub fn all(&self) -> [(&'static str, &HeaderName); 6] {
        [
            ("actor_id", &self.actor_id),
            ("actor_template", &self.actor_template),
            ("actor_template_namespace", &self.actor_template_namespace),
            ("original_destination", &self.original_destination),
            ("connect_authority", &self.connect_authority),
            ("authority_source", &self.authority_source),
        ]
    }
}

/// Flags of the PEP link (part of `egress-agent run`). Secrets are given as files only.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PepArgs {
    /// PEP (HTTP CONNECT proxy) address, HOST:PORT. Overrides `pep` / `pep.address` in the
    /// config file.
    #[arg(long, env = "EGRESS_PEP")]
    pub pep: Option<String>,
    /// PEM bundle of the CA(s) that signed the PEP's certificate: turns on TLS to the PEP.
    /// Only these CAs are trusted (no system roots).
    #[arg(long, env = "EGRESS_PEP_TLS_CA_FILE")]
    pub pep_tls_ca_file: Option<PathBuf>,
    /// Name verified in the PEP's certificate; default: the host of --pep (an IP address is
    /// checked against the certificate's IP SANs).
    #[arg(long, env = "EGRESS_PEP_TLS_SERVER_NAME")]
    pub pep_tls_server_name: Option<String>,
    /// The agent's certificate chain (PEM) for PEPs that require client certificates.
    #[arg(long, env = "EGRESS_PEP_TLS_CLIENT_CERT_FILE")]
    pub pep_tls_client_cert_file: Option<PathBuf>,
    /// The key of --pep-tls-client-cert-file (PEM; mode 0600 or 0400).
    #[arg(long, env = "EGRESS_PEP_TLS_CLIENT_KEY_FILE")]
    pub pep_tls_client_key_file: Option<PathBuf>,
    /// File whose content (one line) is sent as `Proxy-Authorization` on every CONNECT, e.g.
    /// `Basic dXNlcjpwYXNz` (mode 0600 or 0400).
    #[arg(long, env = "EGRESS_PEP_PROXY_AUTHORIZATION_FILE")]
    pub pep_proxy_authorization_file: Option<PathBuf>,
    /// Bound on TCP connect + TLS handshake with the PEP, and on waiting for a connect slot
    /// [default: 2000].
    #[arg(long, env = "EGRESS_PEP_CONNECT_TIMEOUT_MS")]
    pub pep_connect_timeout_ms: Option<u64>,
    /// Bound on the PEP's CONNECT answer once connected; past it the actor's connection is
    /// reset [default: 5000].
    #[arg(long, env = "EGRESS_PEP_TIMEOUT_MS")]
    pub pep_timeout_ms: Option<u64>,
    /// Most PEP connects (TCP + TLS) in progress at once [default: 256].
    #[arg(long, env = "EGRESS_PEP_MAX_CONNECTING")]
    pub pep_max_connecting: Option<usize>,
    /// Most connections waiting for a PEP connect slot; beyond it they are reset at once
    /// [default: 1024].
    #[arg(long, env = "EGRESS_PEP_MAX_WAITING")]
    pub pep_max_waiting: Option<usize>,
    /// What the CONNECT carries: `headers` (name:port and the x-ate-* identity headers) or
    /// `substrate` (the original ip:port over mTLS, the actor proven by its certificate)
    /// [default: headers].
    #[arg(long, env = "EGRESS_PEP_PROFILE", value_enum)]
    pub pep_profile: Option<Profile>,
    /// HTTP version to the PEP: `1.1` (a connection per tunnel) or `2` (tunnels multiplexed
    /// on pooled connections, one pool per actor) [default: 1.1].
    #[arg(long, env = "EGRESS_PEP_HTTP", value_enum)]
    pub pep_http: Option<HttpVersion>,
}

/// The config file's `pep`: `pep = "HOST:PORT"` or a `[pep]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PepFile {
    /// HOST:PORT.
    pub address: Option<String>,
    /// See `--pep-proxy-authorization-file`.
    pub proxy_authorization_file: Option<PathBuf>,
    /// See `--pep-connect-timeout-ms`.
    pub connect_timeout_ms: Option<u64>,
    /// See `--pep-timeout-ms`.
    pub response_timeout_ms: Option<u64>,
    /// See `--pep-max-connecting`.
    pub max_connecting: Option<usize>,
    /// See `--pep-max-waiting`.
    pub max_waiting: Option<usize>,
    /// `[pep.tls]`.
    pub tls: Option<TlsFile>,
    /// `[pep.headers]`.
    pub headers: Option<HeadersFile>,
    /// See `--pep-profile`.
    pub profile: Option<Profile>,
    /// See `--pep-http`.
    pub http: Option<HttpVersion>,
    /// `substrate`: the name of the hint header (default `x-ate-connect-authority`).
    pub hint_header: Option<String>,
    /// `[pep.http2]`.
    pub http2: Option<Http2File>,
}

/// `[pep.http2]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2File {
    /// Most tunnels on one connection (1-1000, default 100).
    pub max_streams: Option<u64>,
    /// Receive window of a stream in bytes (default 4 MiB).
    pub stream_window: Option<u64>,
    /// Receive window of a connection in bytes (default 16 MiB).
    pub connection_window: Option<u64>,
}

/// `[pep.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// See `--pep-tls-ca-file`.
    pub ca_file: Option<PathBuf>,
    /// See `--pep-tls-server-name`.
    pub server_name: Option<String>,
    /// See `--pep-tls-client-cert-file`.
    pub client_cert_file: Option<PathBuf>,
    /// See `--pep-tls-client-key-file`.
    pub client_key_file: Option<PathBuf>,
    /// `[pep.tls.actor_certs]`: each actor presents its own client certificate.
    pub actor_certs: Option<crate::certs::SourceConfig>,
}

/// `[pep.headers]`: header names; the `x-ate-*` defaults for those left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersFile {
    /// Default `x-ate-actor-id`.
    pub actor_id: Option<String>,
    /// Default `x-ate-actor-template`.
    pub actor_template: Option<String>,
    /// Default `x-ate-actor-template-namespace`.
    pub actor_template_namespace: Option<String>,
    /// Default `x-ate-original-destination`.
    pub original_destination: Option<String>,
    /// Default `x-ate-connect-authority`.
    pub connect_authority: Option<String>,
    /// Default `x-ate-authority-source`.
    pub authority_source: Option<String>,
}

/// Deserializes the config file's `pep`, a string (the address) or a table; for
/// `#[serde(default, deserialize_with = "...")]` on an `Option<PepFile>`.
pub fn string_or_table<'de, D>(deserializer: D) -> Result<Option<PepFile>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<PepFile>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("\"HOST:PORT\" or a [pep] table")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(Some(PepFile {
                address: Some(s.to_string()),
                ..PepFile::default()
            }))
        }

        fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
            PepFile::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[derive(Debug, Default, Deserialize)]
    struct File {
        #[serde(default, deserialize_with = "string_or_table")]
        pep: Option<PepFile>,
    }

    fn parse(toml: &str) -> File {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"))
    }

    fn write(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn args(list: &[&str]) -> PepArgs {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            pep: PepArgs,
        }
        let mut argv = vec!["t"];
        argv.extend_from_slice(list);
        T::try_parse_from(argv).unwrap().pep
    }

    #[test]
    fn addresses_parse() {
        let p: PepAddr = "127.0.0.1:3128".parse().unwrap();
        assert_eq!(p.socket_addr(), Some("127.0.0.1:3128".parse().unwrap()));
        let p: PepAddr = "[fd00::1]:3128".parse().unwrap();
        assert_eq!(p.to_string(), "[fd00::1]:3128");
        let p: PepAddr = "Squid.egress.svc:3128".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("squid.egress.svc", 3128));
        assert_eq!(p.to_string(), "squid.egress.svc:3128");
        for bad in [
            "",
            "127.0.0.1",
            "http://squid:3128",
            "squid:0",
            "squid:99999",
            "squid/x:1",
            ":3128",
            "a..b:1",
        ] {
            assert!(bad.parse::<PepAddr>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn string_form_gives_the_defaults() {
        let f = parse("pep = \"squid.egress.svc:3129\"");
        let pep = Pep::load(&PepArgs::default(), f.pep.as_ref())
            .unwrap()
            .unwrap();
        assert_eq!(pep.addr.to_string(), "squid.egress.svc:3129");
        assert!(pep.tls.is_none() && pep.authorization.is_none());
        assert_eq!(pep.connect_timeout, Duration::from_secs(2));
        assert_eq!(pep.response_timeout, Duration::from_secs(5));
        assert_eq!((pep.max_connecting, pep.max_waiting), (256, 1024));
        assert_eq!(pep.headers, Headers::default());
        assert_eq!(pep.headers.authority_source, "x-ate-authority-source");
    }

    #[test]
    fn nothing_anywhere_is_no_pep() {
        assert!(Pep::load(&PepArgs::default(), None).unwrap().is_none());
        assert!(
            Pep::load(&PepArgs::default(), parse("").pep.as_ref())
                .unwrap()
                .is_none()
        );
        let err = Pep::load(&args(&["--pep-max-waiting", "3"]), None).unwrap_err();
        assert!(matches!(err, Error::NoAddress(_)), "{err}");
        assert!(err.to_string().contains("--pep HOST:PORT"), "{err}");
        let f = parse("[pep.tls]\nca_file = \"/x\"\n");
        assert!(matches!(
            Pep::load(&PepArgs::default(), f.pep.as_ref()),
            Err(Error::NoAddress(_))
        ));
    }

    #[test]
    fn table_form_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let auth = write(dir.path(), "auth", b"Basic dXNlcjpwYXNz\n", 0o600);
        let toml = format!(
            r#"
            [pep]
            address = "squid.egress.svc:3129"
            proxy_authorization_file = "{}"
            connect_timeout_ms = 1500
            response_timeout_ms = 7000
            max_connecting = 8
            max_waiting = 16
            [pep.headers]
            actor_id = "X-Pep-Actor"
            authority_source = "x-pep-source"
            "#,
            auth.display()
        );
        let f = parse(&toml);
        let pep = Pep::load(&PepArgs::default(), f.pep.as_ref())
            .unwrap()
            .unwrap();
        assert_eq!(pep.addr.to_string(), "squid.egress.svc:3129");
        assert_eq!(pep.connect_timeout, Duration::from_millis(1500));
        assert_eq!(pep.response_timeout, Duration::from_millis(7000));
        assert_eq!((pep.max_connecting, pep.max_waiting), (8, 16));
        assert_eq!(
            pep.authorization.as_ref().unwrap().value(),
            "Basic dXNlcjpwYXNz"
        );
        assert_eq!(pep.headers.actor_id, "x-pep-actor");
        assert_eq!(pep.headers.authority_source, "x-pep-source");
        assert_eq!(pep.headers.actor_template, HEADER_ACTOR_TEMPLATE);

        let flags = args(&[
            "--pep",
            "10.0.0.1:3128",
            "--pep-connect-timeout-ms",
            "100",
            "--pep-timeout-ms",
            "200",
            "--pep-max-connecting",
            "1",
            "--pep-max-waiting",
            "0",
        ]);
        let pep = Pep::load(&flags, f.pep.as_ref()).unwrap().unwrap();
        assert_eq!(pep.addr.to_string(), "10.0.0.1:3128");
        assert_eq!(pep.connect_timeout, Duration::from_millis(100));
        assert_eq!(pep.response_timeout, Duration::from_millis(200));
        assert_eq!((pep.max_connecting, pep.max_waiting), (1, 0));
        // What the flags leave alone still comes from the file.
        assert!(pep.authorization.is_some());
        assert_eq!(pep.headers.actor_id, "x-pep-actor");
    }

    #[test]
    fn table_schema_is_strict() {
        for bad in [
            "[pep]\naddres = \"a:1\"\n",
            "[pep]\naddress = \"a:1\"\n[pep.tls]\nca = \"/x\"\n",
            "[pep]\naddress = \"a:1\"\n[pep.headers]\nactor = \"x\"\n",
            "pep = 3128\n",
        ] {
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bounds_are_checked() {
        for (flag, value) in [
            ("--pep-connect-timeout-ms", "0"),
            ("--pep-timeout-ms", "0"),
            ("--pep-max-connecting", "0"),
        ] {
            let err = Pep::load(&args(&["--pep", "127.0.0.1:1", flag, value]), None).unwrap_err();
            assert!(matches!(err, Error::Zero(f) if f == flag), "{err}");
        }
        let err = Pep::load(
            &args(&[
                "--pep",
                "127.0.0.1:1",
                "--pep-max-connecting",
                &usize::MAX.to_string(),
            ]),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        assert!(matches!(
            Pep::load(&args(&["--pep", "http://x:1"]), None),
            Err(Error::BadAddress(_))
        ));
    }

    #[test]
    fn secret_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let open = write(dir.path(), "open", b"Basic abc\n", 0o644);
        let err = Authorization::read(&open).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", open.display())),
            "{msg}"
        );
        assert!(msg.contains("0644"), "{msg}");
        assert!(
            !msg.contains("abc"),
            "the error must not show the secret: {msg}"
        );
        for mode in [0o640, 0o604, 0o660] {
            let p = write(dir.path(), &format!("m{mode:o}"), b"Basic abc", mode);
            assert!(
                matches!(Authorization::read(&p), Err(Error::SecretMode { .. })),
                "{mode:o}"
            );
        }
        for mode in [0o600, 0o400] {
            let p = write(dir.path(), &format!("ok{mode:o}"), b"Basic abc\r\n", mode);
            assert_eq!(Authorization::read(&p).unwrap().value(), "Basic abc");
        }
        // A directory, a missing file, an empty file, a second line.
        assert!(matches!(
            Authorization::read(dir.path()),
            Err(Error::NotRegular { .. })
        ));
        assert!(matches!(
            Authorization::read(&dir.path().join("missing")),
            Err(Error::Read { .. })
        ));
        let empty = write(dir.path(), "empty", b"\n", 0o600);
        assert!(matches!(
            Authorization::read(&empty),
            Err(Error::Content { .. })
        ));
        let two = write(dir.path(), "two", b"Basic abc\nx-evil: 1\n", 0o600);
        let msg = Authorization::read(&two).unwrap_err().to_string();
        assert!(msg.contains("one line") && !msg.contains("abc"), "{msg}");
        let big = write(dir.path(), "big", &vec![b'a'; 70_000], 0o600);
        assert!(matches!(
            Authorization::read(&big),
            Err(Error::TooBig { .. })
        ));
    }

    #[test]
    fn the_client_key_is_a_secret_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["pep.test".into()]).unwrap();
        let ca_file = write(dir.path(), "ca.pem", ca.cert.pem().as_bytes(), 0o644);
        let cert = write(dir.path(), "c.pem", ca.cert.pem().as_bytes(), 0o644);
        let key = write(
            dir.path(),
            "k.pem",
            ca.key_pair.serialize_pem().as_bytes(),
            0o644,
        );
        let addr: PepAddr = "pep.test:1".parse().unwrap();
        let err = Tls::load(&addr, &ca_file, None, Some(&cert), Some(&key), None).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let tls = Tls::load(&addr, &ca_file, None, Some(&cert), Some(&key), None).unwrap();
        assert!(tls.client_config().client_auth_cert_resolver.has_certs());
        let err = Tls::load(&addr, &ca_file, None, Some(&cert), None, None).unwrap_err();
        assert!(matches!(err, Error::Needs { .. }), "{err}");
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        let wrong = write(
            dir.path(),
            "wrong.pem",
            other.serialize_pem().as_bytes(),
            0o600,
        );
        assert!(Tls::load(&addr, &ca_file, None, Some(&cert), Some(&wrong), None).is_err());
    }

    #[test]
    fn tls_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.pem", b"", 0o644);
        let addr: PepAddr = "10.0.0.1:3129".parse().unwrap();
        let err = Tls::load(&addr, &empty, None, None, None, None).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let ca = rcgen::generate_simple_self_signed(vec!["pep.test".into()]).unwrap();
        let ca_file = write(dir.path(), "ca.pem", ca.cert.pem().as_bytes(), 0o644);
        // An IP host is verified as an IP SAN; a name given explicitly wins.
        let tls = Tls::load(&addr, &ca_file, None, None, None, None).unwrap();
        assert!(matches!(tls.server_name, ServerName::IpAddress(_)));
        let tls = Tls::load(&addr, &ca_file, Some("pep.test"), None, None, None).unwrap();
        assert_eq!(tls.server_name.to_str(), "pep.test");
        assert!(matches!(
            Tls::load(&addr, &ca_file, Some("bad name!"), None, None, None),
            Err(Error::ServerName(_))
        ));
        // TLS settings without a CA file say what is missing.
        let err = Pep::load(
            &args(&["--pep", "a:1", "--pep-tls-server-name", "pep.test"]),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--pep-tls-ca-file"), "{err}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let auth = write(dir.path(), "auth", b"Basic c2VjcmV0LXZhbHVl\n", 0o600);
        let ca = rcgen::generate_simple_self_signed(vec!["pep.test".into()]).unwrap();
        let ca_file = write(dir.path(), "ca.pem", ca.cert.pem().as_bytes(), 0o644);
        let cert = write(dir.path(), "c.pem", ca.cert.pem().as_bytes(), 0o644);
        let key_pem = ca.key_pair.serialize_pem();
        let key = write(dir.path(), "k.pem", key_pem.as_bytes(), 0o600);
        let pep = Pep::load(
            &args(&[
                "--pep",
                "pep.test:3129",
                "--pep-proxy-authorization-file",
                auth.to_str().unwrap(),
                "--pep-tls-ca-file",
                ca_file.to_str().unwrap(),
                "--pep-tls-client-cert-file",
                cert.to_str().unwrap(),
                "--pep-tls-client-key-file",
                key.to_str().unwrap(),
            ]),
            None,
        )
        .unwrap()
        .unwrap();
        let shown = format!("{pep:?} {pep:#?} {pep}");
        assert!(!shown.contains("c2VjcmV0LXZhbHVl"), "{shown}");
        assert!(!shown.contains("Basic"), "{shown}");
        let key_body: String = key_pem.lines().nth(1).unwrap().chars().take(24).collect();
        assert!(!shown.contains(&key_body), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains(&auth.display().to_string()), "{shown}");
        assert!(pep.authorization.unwrap().value().is_sensitive());
    }

    #[test]
    fn selection_goes_actor_then_namespace_then_default() {
        let selector = Selector {
            has_default: true,
            named: ["squid-a".to_string(), "substrate".to_string()].into(),
            by_namespace: [
                ("team-a".to_string(), "substrate".to_string()),
                ("team-off".to_string(), "none".to_string()),
            ]
            .into(),
        };
        selector.check().unwrap();
        let pick = |asked: Option<&str>, ns: &str| selector.select(asked, ns).unwrap().to_string();
        assert_eq!(pick(Some("squid-a"), "team-a"), "squid-a (actor)");
        assert_eq!(pick(Some("none"), "team-a"), "none (actor)");
        assert_eq!(pick(Some("default"), "team-a"), "default (actor)");
        assert_eq!(pick(None, "team-a"), "substrate (namespace)");
        assert_eq!(pick(None, "team-off"), "none (namespace)");
        assert_eq!(pick(None, "team-b"), "default (default)");
        let err = selector.select(Some("squid-b"), "").unwrap_err();
        assert!(err.contains("no PEP is named \"squid-b\""), "{err}");
        assert!(err.contains("default, squid-a, substrate, none"), "{err}");

        // No global PEP: nothing chosen is no PEP, and `default` is an error.
        let bare = Selector::default();
        assert_eq!(bare.select(None, "x").unwrap(), Selection::nothing());
        assert!(bare.select(Some("default"), "x").is_err());
        let bad = Selector {
            by_namespace: [("team-a".to_string(), "gone".to_string())].into(),
            ..Selector::default()
        };
        assert!(
            bad.check()
                .unwrap_err()
                .contains("pep_by_namespace.\"team-a\"")
        );
    }

    #[test]
    fn named_peps_profiles_and_http2_settings_load() {
        let file: PepFile = toml::from_str(
            "address = \"pep.test:3129\"\nprofile = \"substrate\"\nhttp = \"2\"\n\
             hint_header = \"X-Hint\"\n[http2]\nmax_streams = 8\nstream_window = 1048576\n",
        )
        .unwrap();
        // substrate without mTLS is refused, saying what it needs.
        let err = Pep::load_named("sub", &file).unwrap_err().to_string();
        assert!(err.contains("mTLS"), "{err}");
        let plain: PepFile =
            toml::from_str("address = \"pep.test:3129\"\nhttp = \"2\"\n[http2]\nmax_streams = 8\n")
                .unwrap();
        let pep = Pep::load_named("h2-pep", &plain).unwrap();
        assert_eq!(pep.name, "h2-pep");
        assert_eq!(
            (pep.profile, pep.http),
            (Profile::Headers, HttpVersion::Http2)
        );
        assert_eq!(pep.http2.max_streams, 8);
        assert_eq!(
            pep.http2.stream_window,
            h2::Settings::default().stream_window
        );
        for bad in ["default", "none", "Squid", "a_b", ""] {
            assert!(
                matches!(Pep::load_named(bad, &plain), Err(Error::Name(_))),
                "{bad:?}"
            );
        }
        let no_address: PepFile = toml::from_str("http = \"2\"").unwrap();
        assert!(matches!(
            Pep::load_named("x", &no_address),
            Err(Error::NoNamedAddress(_))
        ));
        for (key, value) in [
            ("max_streams", "0"),
            ("max_streams", "1001"),
            ("stream_window", "100"),
            ("stream_window", "4294967295"),
            ("connection_window", "1"),
            ("connection_window", "4294967295"),
        ] {
            let f: PepFile =
                toml::from_str(&format!("address = \"p:1\"\n[http2]\n{key} = {value}\n")).unwrap();
            let err = Pep::load_named("x", &f).unwrap_err();
            assert!(
                matches!(&err, Error::Http2 { setting, value: v, .. }
                    if *setting == key && v.to_string() == value),
                "{err}"
            );
        }
        // The bounds themselves are taken.
        let f: PepFile = toml::from_str(
            "address = \"p:1\"\n[http2]\nmax_streams = 1000\nstream_window = 65535\n\
             connection_window = 2147483647\n",
        )
        .unwrap();
        let h2 = Pep::load_named("x", &f).unwrap().http2;
        assert_eq!(
            (h2.max_streams, h2.stream_window, h2.connection_window),
            (1000, 65_535, 2_147_483_647)
        );
        assert!(toml::from_str::<PepFile>("http = \"3\"").is_err());
        assert!(toml::from_str::<PepFile>("profile = \"envoy\"").is_err());
    }

    #[test]
    fn header_names_are_checked() {
        let headers = |toml: &str| {
            let f: HeadersFile = toml::from_str(toml).unwrap();
            Headers::from_file(&f)
        };
        let h = headers("actor_id = \"X-My-Actor\"").unwrap();
        assert_eq!(h.actor_id, "x-my-actor");
        for (toml, want) in [
            ("actor_id = \"bad name\"", "not an HTTP header name"),
            ("actor_id = \"\"", "not an HTTP header name"),
            ("actor_id = \"x:y\"", "not an HTTP header name"),
            ("connect_authority = \"Host\"", "carries the request"),
            (
                "actor_template = \"Proxy-Authorization\"",
                "carries the request",
            ),
            ("actor_template = \"x-ate-actor-id\"", "same name"),
            (
                "actor_id = \"x-a\"\nauthority_source = \"X-A\"",
                "same name",
            ),
        ] {
            let err = headers(toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml}: {err}");
        }
    }
}
