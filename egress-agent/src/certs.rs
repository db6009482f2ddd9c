//! Per-actor client certificates for the link to the PEP: each actor's tunnels present a
//! short-lived certificate of its own, so the PEP learns who is connecting from the TLS
//! handshake rather than from unsigned headers.
//!
//! A [`Store`] (one per PEP that has `[pep.tls.actor_certs]`) keeps one certificate current
//! per registered actor, from one of two sources ([`SourceConfig`]):
//!
//! - **files**: the runtime writes `DIR/<dir name>/tls.crt` (PEM chain, leaf first) and
//!   `tls.key` (PEM PKCS#8, SEC1 or PKCS#1; mode 0600 or stricter), where the dir name is
//!   [`dir_name`] of the actor id. The store looks at both files every 500 ms and loads a pair
//!   once it has stayed unchanged for one look (so a runtime writing the certificate, then
//!   the key, is read once, whole): a change is in force within about 1 s, whether the files
//!   were renamed over or rewritten in place. A new pair that cannot be used (unreadable,
//!   mismatched, expired, not yet valid) keeps the previous one while that is still valid and
//!   says so once per change (warn); removed files likewise. See [`files`].
//! - **signer**: the agent makes the key itself, in memory, and asks a signer over HTTP for a
//!   certificate, renewing before it expires. The interface is in [`signer`].
//!
//! The private key never leaves memory: nothing here writes it to disk, and `Debug` of every
//! type here leaves it out. [`Store::current`] fails closed: with no certificate, an expired
//! one or one not yet valid it returns an error and the caller must not open the tunnel.
pub mod files;
pub mod signer;

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::task::AbortHandle;
use tracing::error;

use crate::{pep, socket::SocketFactory};

/// Most certificates accepted in one chain (leaf and intermediates).
const MAX_CHAIN: usize = 16;

/// Where actors' certificates come from: `[pep.tls.actor_certs]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Files the runtime writes: `DIR/<dir_name(actor id)>/tls.crt` and `tls.key`.
    Files {
        /// The directory holding one directory per actor.
        dir: PathBuf,
    },
    /// A signer the agent sends a CSR to for each actor (see [`signer`]).
    Signer {
        /// `https://...` (verified with `ca_file`) or `http://` to a loopback IP address.
        url: String,
        /// PEM bundle of the CAs trusted for the signer's certificate (https only).
        ca_file: Option<PathBuf>,
        /// A secret file (mode 0600) whose content is sent as `Authorization: Bearer ...`;
        /// read again for each request, so it can be rotated in place.
        token_file: Option<PathBuf>,
        /// Renew when this much of the certificate's lifetime is left (`renew_before_secs`
        /// in the file); default a third of the lifetime.
        #[serde(
            default,
            rename = "renew_before_secs",
            deserialize_with = "optional_secs"
        )]
        renew_before: Option<Duration>,
    },
}

impl SourceConfig {
    /// `files` or `signer`, as shown by `status`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Files { .. } => "files",
            SourceConfig::Signer { .. } => "signer",
        }
    }
}

fn optional_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let secs = u64::deserialize(d)?;
    if secs == 0 {
        return Err(serde::de::Error::custom(
            "renew_before_secs must be above zero (leave it out for a third of the lifetime)",
        ));
    }
    Ok(Some(Duration::from_secs(secs)))
}

/// Why a certificate source is unusable or an actor has no certificate to present; each says
/// what to do. Never holds key bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be used (unreadable, too big, a secret file others can read, bad content).
    #[error(transparent)]
    File(#[from] pep::Error),
    /// The files source's directory is unusable.
    #[error(
        "actor certificate directory {path}: {problem}; create it (the runtime writes \
         <dir>/<actor dir name>/tls.crt and tls.key into it) or fix pep.tls.actor_certs.dir",
        path = path.display()
    )]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The signer URL is unusable.
    #[error("actor certificate signer url {url:?}: {problem}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A setting that only makes sense with another one (or not at all with it).
    #[error("pep.tls.actor_certs: {0}")]
    Setting(&'static str),
    /// The signer could not be asked or gave an unusable answer (retried with backoff).
    #[error("actor certificate signer {url}: {problem}")]
    Signer {
        /// The signer's URL.
        url: String,
        /// What went wrong.
        problem: String,
    },
    /// A certificate and key that cannot be presented (bad chain, key mismatch, ...).
    #[error("{source_name}: {problem}")]
    Certificate {
        /// Where they came from (a path or the signer's URL).
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// The actor is not registered with this store.
    #[error(
        "actor {0:?} has no client certificate source: it is not registered with the PEP's \
         certificate store"
    )]
    NotRegistered(String),
    /// No certificate obtained yet.
    #[error("actor {actor:?} has no client certificate yet: {why}")]
    NoCertificate {
        /// The actor.
        actor: String,
        /// The last failure, or what is awaited.
        why: String,
    },
    /// The certificate in hand has expired (and no new one arrived in time).
    #[error(
        "actor {actor:?}'s client certificate {subject} (serial {serial}) expired at \
         {not_after}: {why}",
        not_after = rfc3339(*not_after)
    )]
    Expired {
        /// The actor.
        actor: String,
        /// The certificate's subject.
        subject: String,
        /// Its serial.
        serial: String,
        /// When it expired.
        not_after: SystemTime,
        /// Why no new one is there (the last failure), or what to do.
        why: String,
    },
    /// The certificate in hand is not valid yet (a clock ahead where it was made?).
    #[error(
        "actor {actor:?}'s client certificate {subject} (serial {serial}) is not valid before \
         {not_before}: check the clocks of this node and of the certificate's issuer",
        not_before = rfc3339(*not_before)
    )]
    NotYetValid {
        /// The actor.
        actor: String,
        /// The certificate's subject.
        subject: String,
        /// Its serial.
        serial: String,
        /// When it becomes valid.
        not_before: SystemTime,
    },
}

/// The certificate an actor presents now, with what logs and the connection pool need.
#[derive(Clone)]
pub struct Current {
    /// Chain and signing key (ring provider); hand it to rustls (e.g. as the
    /// [`ResolvesClientCert`] this type implements).
    pub key: Arc<CertifiedKey>,
    /// Bumps on every new certificate, unique across the store: pooled connections are keyed
    /// by it, so a new certificate never rides an old connection.
    pub generation: u64,
    /// The leaf's subject, e.g. `CN=actor-a, O=team`.
    pub subject: String,
    /// The leaf's serial number in hex, e.g. `01:9a:...`.
    pub serial: String,
    /// The leaf is not valid before this.
    pub not_before: SystemTime,
    /// The leaf is not valid after this.
    pub not_after: SystemTime,
}

/// Never shows the key: only what identifies the certificate.
impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current")
            .field("generation", &self.generation)
            .field("subject", &self.subject)
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Always presents this certificate: a connection carries one actor, so there is no choice to
/// make (a PEP that does not trust it refuses the handshake, which fails closed).
impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// One actor's certificate state, for `status`, `actor list` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertStatus {
    /// The actor id.
    pub actor: String,
    /// The current certificate's subject.
    pub subject: Option<String>,
    /// Its serial.
    pub serial: Option<String>,
    /// Its end of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339_opt")]
    pub not_after: Option<SystemTime>,
    /// Its generation.
    pub generation: Option<u64>,
    /// The last failure to get or load a certificate, cleared by the next success; else, for
    /// a certificate in place but unusable now (expired, not yet valid), why.
    pub last_error: Option<String>,
    /// How many times a new certificate replaced the previous one.
    pub renewals: u64,
    /// Whether a tunnel of the actor could present a valid certificate this moment.
    pub usable: bool,
}

fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// `t` as RFC 3339 UTC (certificate times are whole seconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t}"))
}

/// The directory name of `actor_id` under the files source's directory: every byte outside
/// `[A-Za-z0-9._-]` written `%XX` (upper-case hex), and a leading `.` written `%2E`, so
/// `team-a/pod-1` is `team-a%2Fpod-1`, no name is `.` or `..` or hidden, and two ids never
/// share a directory.
pub fn dir_name(actor_id: &str) -> String {
    let mut out = String::with_capacity(actor_id.len());
    for (i, b) in actor_id.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Keeps each registered actor's client certificate current; cheap to clone (one shared
/// state). Dropping the last clone stops every actor's task.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    /// The runtime current when the store was made, for `register` calls from outside one.
    runtime: Option<tokio::runtime::Handle>,
    actors: Mutex<HashMap<String, Entry>>,
    generations: Arc<AtomicU64>,
}

enum Source {
    Files { dir: PathBuf },
    Signer(Arc<signer::Client>),
}

struct Entry {
    slot: Arc<Slot>,
    task: Option<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let actors = self.actors.get_mut().unwrap_or_else(|e| e.into_inner());
        for entry in actors.values() {
            if let Some(task) = &entry.task {
                task.abort();
            }
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Store");
        match &self.inner.source {
            Source::Files { dir } => d.field("files", dir),
            Source::Signer(client) => d.field("signer", &client.url()),
        };
        d.field("actors", &lock(&self.inner.actors).len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for `config`, checked now: the directory exists (files), the URL is usable and
    /// the CA and token files are readable and private enough (signer). Its sockets carry no
    /// mark; see [`Store::with_sockets`].
    pub fn new(config: SourceConfig) -> Result<Store, Error> {
        Store::with_sockets(config, SocketFactory::default())
    }

    /// As [`Store::new`], the signer's connections made by `sockets` (so they carry the
    /// agent's mark and are never captured).
    pub fn with_sockets(config: SourceConfig, sockets: SocketFactory) -> Result<Store, Error> {
        let source = match config {
            SourceConfig::Files { dir } => {
                files::check_dir(&dir)?;
                Source::Files { dir }
            }
            SourceConfig::Signer {
                url,
                ca_file,
                token_file,
                renew_before,
            } => Source::Signer(Arc::new(signer::Client::new(
                &url,
                ca_file.as_deref(),
                token_file,
                renew_before,
                sockets,
            )?)),
        };
        Ok(Store {
            inner: Arc::new(Inner {
                source,
                runtime: tokio::runtime::Handle::try_current().ok(),
                actors: Mutex::new(HashMap::new()),
                generations: Arc::new(AtomicU64::new(1)),
            }),
        })
    }

    /// Starts keeping `actor_id`'s certificate current (files: load now and watch; signer: a
    /// key and CSR now, renewal before expiry). Idempotent; registering again with another
    /// template or namespace starts over (the signer is told the new ones). Its task runs on
    /// the current tokio runtime, else on the one current when the store was made; with
    /// neither, the actor stays without a certificate and the error says so.
    pub fn register(&self, actor_id: &str, template: &str, template_namespace: &str) {
        let mut actors = lock(&self.inner.actors);
        if let Some(entry) = actors.get(actor_id)
            && entry.slot.template == template
            && entry.slot.template_namespace == template_namespace
        {
            return;
        }
        if let Some(old) = actors.remove(actor_id)
            && let Some(task) = old.task
        {
            task.abort();
        }
        let slot = Arc::new(Slot {
            actor_id: actor_id.to_string(),
            template: template.to_string(),
            template_namespace: template_namespace.to_string(),
            state: Mutex::new(State::default()),
        });
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| e.to_string())
            .or_else(|e| self.inner.runtime.clone().ok_or(e));
        let task = match runtime {
            Ok(runtime) => {
                let generations = Arc::clone(&self.inner.generations);
                let handle = match &self.inner.source {
                    Source::Files { dir } => runtime.spawn(files::watch(
                        Arc::clone(&slot),
                        dir.join(dir_name(actor_id)),
                        generations,
                    )),
                    Source::Signer(client) => runtime.spawn(signer::keep_current(
                        Arc::clone(client),
                        Arc::clone(&slot),
                        generations,
                    )),
                };
                Some(handle.abort_handle())
            }
            Err(e) => {
                error!(actor = %actor_id, error = %e, "actor certificate source not started");
                slot.fail(format!(
                    "the certificate source was not started (registered outside the agent's \
                     runtime: {e}); this is a bug, please report it"
                ));
                None
            }
        };
        actors.insert(actor_id.to_string(), Entry { slot, task });
    }

    /// Stops keeping `actor_id`'s certificate (its task ends, its key is dropped once no
    /// connection holds it). Unknown ids are ignored.
    pub fn remove(&self, actor_id: &str) {
        let entry = lock(&self.inner.actors).remove(actor_id);
        if let Some(Entry {
            task: Some(task), ..
        }) = entry
        {
            task.abort();
        }
    }

    /// The certificate to present now. `Err` when there is none yet, or it has expired or is
    /// not yet valid: fail closed, reset the actor's connection and log the error.
    pub fn current(&self, actor_id: &str) -> Result<Current, Error> {
        let slot = lock(&self.inner.actors)
            .get(actor_id)
            .map(|e| Arc::clone(&e.slot))
            .ok_or_else(|| Error::NotRegistered(actor_id.to_string()))?;
        slot.current(SystemTime::now())
    }

    /// Every registered actor's certificate state, sorted by actor id.
    pub fn status(&self) -> Vec<CertStatus> {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.actors)
            .values()
            .map(|e| Arc::clone(&e.slot))
            .collect();
        let mut all: Vec<CertStatus> = slots.iter().map(|s| s.status()).collect();
        all.sort_by(|a, b| a.actor.cmp(&b.actor));
        all
    }

    /// What the source is, for the start-up log: `files DIR` or `signer URL`.
    pub fn describe(&self) -> String {
        match &self.inner.source {
            Source::Files { dir } => format!("files {}", dir.display()),
            Source::Signer(client) => format!("signer {}", client.url()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One actor's certificate, shared between the store and the actor's task.
struct Slot {
    actor_id: String,
    template: String,
    template_namespace: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    last_error: Option<String>,
    renewals: u64,
}

impl Slot {
    /// Puts `identity` in force with a fresh generation; returns it.
    fn install(&self, identity: Identity, generations: &AtomicU64) -> Current {
        let current = Current {
            key: Arc::new(identity.key),
            generation: generations.fetch_add(1, Ordering::Relaxed),
            subject: identity.subject,
            serial: identity.serial,
            not_before: identity.not_before,
            not_after: identity.not_after,
        };
        let mut state = lock(&self.state);
        if state.current.is_some() {
            state.renewals += 1;
        }
        state.current = Some(current.clone());
        state.last_error = None;
        current
    }

    /// Records why the last attempt failed (what `current` and `status` report).
    fn fail(&self, error: String) {
        lock(&self.state).last_error = Some(error);
    }

    /// The certificate in force, if any (valid or not).
    fn installed(&self) -> Option<Current> {
        lock(&self.state).current.clone()
    }

    fn current(&self, now: SystemTime) -> Result<Current, Error> {
        let state = lock(&self.state);
        let why = || {
            state
                .last_error
                .clone()
                .unwrap_or_else(|| "no certificate obtained yet".to_string())
        };
        let Some(current) = &state.current else {
            return Err(Error::NoCertificate {
                actor: self.actor_id.clone(),
                why: why(),
            });
        };
        match validity(current.not_before, current.not_after, now) {
            Validity::Valid => Ok(current.clone()),
            Validity::NotYet => Err(Error::NotYetValid {
                actor: self.actor_id.clone(),
                subject: current.subject.clone(),
                serial: current.serial.clone(),
                not_before: current.not_before,
            }),
            Validity::Expired => Err(Error::Expired {
                actor: self.actor_id.clone(),
                subject: current.subject.clone(),
                serial: current.serial.clone(),
                not_after: current.not_after,
                why: state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no new certificate arrived".to_string()),
            }),
        }
    }

    fn status(&self) -> CertStatus {
        // Before the state's lock is taken below: `current` takes it too.
        let now = self.current(SystemTime::now());
        let state = lock(&self.state);
        let current = state.current.as_ref();
        CertStatus {
            actor: self.actor_id.clone(),
            subject: current.map(|c| c.subject.clone()),
            serial: current.map(|c| c.serial.clone()),
            not_after: current.map(|c| c.not_after),
            generation: current.map(|c| c.generation),
            last_error: state
                .last_error
                .clone()
                .or_else(|| now.as_ref().err().map(ToString::to_string)),
            renewals: state.renewals,
            usable: now.is_ok(),
        }
    }
}

/// Where `now` is in a certificate's validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Validity {
    NotYet,
    Valid,
    Expired,
}

/// X.509 validity is inclusive at both ends; seconds precision, so the last second counts as
/// expired (never presents a certificate in the second it lapses).
fn validity(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Validity {
    if now < not_before {
        Validity::NotYet
    } else if now >= not_after {
        Validity::Expired
    } else {
        Validity::Valid
    }
}

/// A checked certificate chain and key, ready to present.
struct Identity {
    key: CertifiedKey,
    subject: String,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Identity {
    fn validity(&self, now: SystemTime) -> Validity {
        validity(self.not_before, self.not_after, now)
    }
}

/// Parses a PEM chain (leaf first) into DER certificates; a problem in words.
fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a valid PEM certificate chain: {e}"))?;
        if chain.len() == MAX_CHAIN {
            return Err(format!(
                "more than {MAX_CHAIN} certificates in the chain: give the leaf and its \
                 intermediates only"
            ));
        }
        chain.push(cert);
    }
    if chain.is_empty() {
        return Err("no certificate in it (-----BEGIN CERTIFICATE-----), leaf first".into());
    }
    Ok(chain)
}

/// Checks that `key` belongs to the chain's leaf and reads the leaf's subject, serial and
/// validity; a problem in words (never key bytes).
fn identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Identity, String> {
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the chain".into());
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the leaf certificate does not parse as X.509: {e}"))?;
    let validity = cert.validity();
    let not_before =
        unix_time(validity.not_before.timestamp()).ok_or("the leaf's notBefore is out of range")?;
    let not_after =
        unix_time(validity.not_after.timestamp()).ok_or("the leaf's notAfter is out of range")?;
    if not_after <= not_before {
        return Err("the leaf's notAfter is not after its notBefore".into());
    }
    let subject = cert.subject().to_string();
    let serial = cert.raw_serial_as_string();
    // The error names the key kind at most.
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("the private key is unusable: {e}"))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not belong to the leaf certificate (the first in the chain): \
             give the matching pair"
                .to_string()
        }
        e => format!("cannot check that the key belongs to the leaf certificate: {e}"),
    })?;
    Ok(Identity {
        key,
        subject,
        serial,
        not_before,
        not_after,
    })
}

fn unix_time(secs: i64) -> Option<SystemTime> {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// `path` for messages.
fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Certificates for the tests of this module and its submodules.
    use std::time::{Duration, SystemTime};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    /// A throw-away CA.
    pub struct Ca {
        pub cert: rcgen::Certificate,
        pub key: KeyPair,
    }

    impl Ca {
        pub fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "certs test CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        /// A leaf for `cn` valid from `from` to `until` (seconds from now, may be negative):
        /// (chain PEM = leaf then CA, key PEM).
        pub fn leaf(&self, cn: &str, from: i64, until: i64) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let cert = self.sign(cn, &key, from, until);
            (
                format!("{}{}", cert.pem(), self.cert.pem()),
                key.serialize_pem(),
            )
        }

        pub fn sign(&self, cn: &str, key: &KeyPair, from: i64, until: i64) -> rcgen::Certificate {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.not_before = offset(from);
            params.not_after = offset(until);
            params.signed_by(key, &self.cert, &self.key).unwrap()
        }
    }

    pub fn offset(secs: i64) -> time::OffsetDateTime {
        let now = SystemTime::now();
        let t = if secs >= 0 {
            now + Duration::from_secs(secs as u64)
        } else {
            now - Duration::from_secs(secs.unsigned_abs())
        };
        time::OffsetDateTime::from(t)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rustls::pki_types::pem::PemObject as _;

    use super::{testing::Ca, *};

    fn parse(chain: &str, key: &str) -> Result<Identity, String> {
        identity(
            parse_chain(chain.as_bytes())?,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn dir_name_escapes_and_is_injective() {
        assert_eq!(dir_name("team-a/pod-1"), "team-a%2Fpod-1");
        assert_eq!(dir_name("a1"), "a1");
        assert_eq!(dir_name("a.b_c-d"), "a.b_c-d");
        assert_eq!(dir_name(".."), "%2E.");
        assert_eq!(dir_name("."), "%2E");
        assert_eq!(dir_name(".hidden"), "%2Ehidden");
        assert_eq!(dir_name(""), "");
        assert_eq!(dir_name("a b"), "a%20b");
        assert_eq!(dir_name("%2F"), "%252F");
        assert_eq!(dir_name("é"), "%C3%A9");
        let ids = [
            "team-a/pod-1",
            "team-a%2Fpod-1",
            "team-a%2fpod-1",
            ".x",
            "%2Ex",
            "x/",
            "x%2F",
            "a:b",
            "a%3Ab",
            "A",
            "a",
            "é",
            "%C3%A9",
            "..",
            "%2E.",
            "../etc",
        ];
        let names: HashSet<String> = ids.iter().map(|id| dir_name(id)).collect();
        assert_eq!(
            names.len(),
            ids.len(),
            "two ids share a directory: {names:?}"
        );
        for id in ids {
            let name = dir_name(id);
            assert!(!name.contains('/') && name != "." && name != ".." && !name.starts_with('.'));
        }
    }

    #[test]
    fn dir_name_injective_on_random_ids() {
        use proptest::prelude::*;
        proptest!(|(a in ".{0,12}", b in ".{0,12}")| {
            prop_assume!(a != b);
            prop_assert_ne!(dir_name(&a), dir_name(&b));
        });
    }

    #[test]
    fn identity_reads_the_leaf() {
        let ca = Ca::new();
        let (chain, key) = ca.leaf("actor-a", -10, 3600);
        let id = parse(&chain, &key).unwrap();
        assert_eq!(id.subject, "CN=actor-a");
        assert!(!id.serial.is_empty());
        assert_eq!(id.key.cert.len(), 2);
        assert_eq!(id.validity(SystemTime::now()), Validity::Valid);
        let lifetime = id.not_after.duration_since(id.not_before).unwrap();
        assert!((3605..=3615).contains(&lifetime.as_secs()), "{lifetime:?}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = Ca::new();
        let (chain, _) = ca.leaf("actor-a", -10, 3600);
        let (_, other_key) = ca.leaf("actor-b", -10, 3600);
        let err = parse(&chain, &other_key).err().unwrap();
        assert!(err.contains("does not belong"), "{err}");
    }

    #[test]
    fn chain_problems_are_named() {
        assert!(parse_chain(b"").unwrap_err().contains("no certificate"));
        assert!(
            parse_chain(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        let ca = Ca::new();
        let one = ca.cert.pem();
        let many = one.repeat(MAX_CHAIN + 1);
        assert!(
            parse_chain(many.as_bytes())
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn validity_bounds() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            validity(t0, t1, t0 - Duration::from_secs(1)),
            Validity::NotYet
        );
        assert_eq!(validity(t0, t1, t0), Validity::Valid);
        assert_eq!(
            validity(t0, t1, t1 - Duration::from_millis(1)),
            Validity::Valid
        );
        assert_eq!(validity(t0, t1, t1), Validity::Expired);
    }

    #[test]
    fn source_config_from_toml() {
        let files: SourceConfig = toml::from_str("source = \"files\"\ndir = \"/run/c\"\n").unwrap();
        assert_eq!(
            files,
            SourceConfig::Files {
                dir: "/run/c".into()
            }
        );
        let signer: SourceConfig = toml::from_str(
            "source = \"signer\"\nurl = \"https://s:8443/v1/sign\"\nca_file = \"/ca.pem\"\n\
             token_file = \"/t\"\nrenew_before_secs = 60\n",
        )
        .unwrap();
        assert_eq!(
            signer,
            SourceConfig::Signer {
                url: "https://s:8443/v1/sign".into(),
                ca_file: Some("/ca.pem".into()),
                token_file: Some("/t".into()),
                renew_before: Some(Duration::from_secs(60)),
            }
        );
        let minimal: SourceConfig =
            toml::from_str("source = \"signer\"\nurl = \"http://127.0.0.1:1/\"\n").unwrap();
        assert!(matches!(
            minimal,
            SourceConfig::Signer {
                renew_before: None,
                ..
            }
        ));
        for (bad, want) in [
            (
                "source = \"files\"\ndir = \"/x\"\nurl = \"u\"\n",
                "unknown field",
            ),
            (
                "source = \"signer\"\nurl = \"u\"\ndir = \"/x\"\n",
                "unknown field",
            ),
            ("source = \"vault\"\n", "unknown variant"),
            ("dir = \"/x\"\n", "source"),
            (
                "source = \"signer\"\nurl = \"u\"\nrenew_before_secs = 0\n",
                "above zero",
            ),
        ] {
            let err = toml::from_str::<SourceConfig>(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn not_registered_and_pending_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(SourceConfig::Files {
            dir: dir.path().into(),
        })
        .unwrap();
        let err = store.current("nobody").unwrap_err();
        assert!(matches!(err, Error::NotRegistered(_)), "{err}");
        // Outside a runtime: registered, but nothing can run; the error says so.
        store.register("a1", "t", "ns");
        let err = store.current("a1").unwrap_err().to_string();
        assert!(err.contains("no client certificate yet"), "{err}");
        assert!(err.contains("runtime"), "{err}");
        assert_eq!(store.status().len(), 1);
        store.remove("a1");
        assert!(store.status().is_empty());
    }

    #[test]
    fn slot_reports_expired_and_not_yet_valid() {
        let ca = Ca::new();
        let generations = AtomicU64::new(1);
        let slot = Slot {
            actor_id: "a1".into(),
            template: "t".into(),
            template_namespace: "ns".into(),
            state: Mutex::new(State::default()),
        };
        let (chain, key) = ca.leaf("a1", -100, -10);
        let first = slot.install(parse(&chain, &key).unwrap(), &generations);
        assert_eq!(first.generation, 1);
        let err = slot.current(SystemTime::now()).unwrap_err();
        assert!(matches!(err, Error::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at"), "{err}");

        let (chain, key) = ca.leaf("a1", 100, 1000);
        let second = slot.install(parse(&chain, &key).unwrap(), &generations);
        assert_eq!(second.generation, 2);
        let err = slot.current(SystemTime::now()).unwrap_err();
        assert!(matches!(err, Error::NotYetValid { .. }), "{err}");
        assert!(
            slot.current(SystemTime::now() + Duration::from_secs(200))
                .is_ok()
        );
        assert_eq!(slot.status().renewals, 1);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let ca = Ca::new();
        let (chain, key_pem) = ca.leaf("actor-a", -10, 3600);
        let generations = AtomicU64::new(1);
        let slot = Slot {
            actor_id: "a1".into(),
            template: "t".into(),
            template_namespace: "ns".into(),
            state: Mutex::new(State::default()),
        };
        let current = slot.install(parse(&chain, &key_pem).unwrap(), &generations);
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let shown = format!("{current:?} {:?} {:?}", slot.status(), current.key);
        // Any 12 consecutive base64 characters of the key's PEM body.
        let body: String = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for window in body.as_bytes().windows(12).step_by(6) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!shown.contains(w), "key bytes in Debug output: {shown}");
        }
        // The private scalar itself (the DER also holds the public key, which the chain
        // shows rightly): SEC1's `INTEGER 1, OCTET STRING (32)` inside the PKCS#8.
        let der = key_der.secret_der();
        let at = der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .expect("a P-256 PKCS#8 key")
            + 5;
        let scalar = &der[at..at + 32];
        let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
        let lower = shown.to_lowercase();
        for window in hex.as_bytes().windows(16).step_by(2) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!lower.contains(w), "key bytes in Debug output: {shown}");
        }
        // Decimal byte lists, as a derived Debug of a Vec<u8> would print.
        let bytes = format!("{:?}", &scalar[..6]);
        assert!(
            !shown.contains(bytes.trim_matches(['[', ']'])),
            "key bytes in Debug output: {shown}"
        );
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("CN=actor-a"));
    }

    #[test]
    fn current_resolves_its_own_key() {
        let ca = Ca::new();
        let (chain, key) = ca.leaf("actor-a", -10, 3600);
        let current = Slot {
            actor_id: "a".into(),
            template: "t".into(),
            template_namespace: "n".into(),
            state: Mutex::new(State::default()),
        }
        .install(parse(&chain, &key).unwrap(), &AtomicU64::new(1));
        let resolved = current.resolve(&[], &[]).unwrap();
        assert!(Arc::ptr_eq(&resolved, &current.key));
    }
}
