//! The files source: the runtime writes each actor's certificate and key, the agent loads
//! them and notices when they change.
//!
//! Layout: `DIR/<dir_name(actor id)>/tls.crt` (PEM chain, leaf first, at most 256 KiB) and
//! `tls.key` (PEM PKCS#8, SEC1 or PKCS#1, at most 64 KiB, mode without group or other bits:
//! `chmod 600`). Both may be symlinks (a Kubernetes Secret volume's `..data` swap works).
//!
//! Each actor's task looks at both files (inode, size, mtime, ctime) every 500 ms and reads
//! them once they have stayed unchanged for one look, so a change is in force within about
//! 1 s whether the files were renamed over or rewritten in place, and a runtime that writes
//! the certificate and then the key is read once, with both. A pair that cannot be used
//! (unreadable, a key that is not the leaf's, expired) leaves the previous certificate in
//! force while it is valid, and is logged once (warn) until the files change again. A pair
//! not valid yet waits beside the previous one and takes over when it becomes valid. Files
//! that disappear also leave the previous certificate in force until it expires.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{Error, Identity, Slot, Validity, identity, parse_chain, rfc3339, shown};
use crate::pep;

/// Name of the certificate chain file in an actor's directory.
pub const CERT_FILE: &str = "tls.crt";
/// Name of the private key file in an actor's directory.
pub const KEY_FILE: &str = "tls.key";

/// How often the files are looked at.
const POLL: Duration = Duration::from_millis(500);
/// Largest certificate chain file read.
const MAX_CHAIN_BYTES: u64 = 256 * 1024;
/// Largest key file read.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// Checks that `dir` is a directory (the runtime creates the actors' directories in it).
pub(super) fn check_dir(dir: &Path) -> Result<(), Error> {
    let problem = match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "not a directory".to_string(),
        Err(e) => e.to_string(),
    };
    Err(Error::Dir {
        path: dir.to_path_buf(),
        problem,
    })
}

/// Reads and checks the pair in the actor's directory `dir`.
pub(super) fn load(dir: &Path) -> Result<Identity, Error> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let chain_pem = pep::read_file("actor certificate file", &cert_path, MAX_CHAIN_BYTES, false)?;
    let chain = parse_chain(&chain_pem).map_err(|problem| Error::Certificate {
        source_name: shown(&cert_path),
        problem,
    })?;
    let key_pem = Zeroizing::new(pep::read_file(
        "actor key file",
        &key_path,
        MAX_KEY_BYTES,
        true,
    )?);
    // The parse error names the PEM section kind at most, never key bytes.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::Certificate {
        source_name: shown(&key_path),
        problem: format!(
            "no usable private key ({e}): give a PEM PKCS#8, SEC1 (EC) or PKCS#1 (RSA) key"
        ),
    })?;
    identity(chain, key).map_err(|problem| Error::Certificate {
        source_name: format!("{} and {}", shown(&cert_path), KEY_FILE),
        problem,
    })
}

/// What identifies a file's version without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Both files' stamps; `None`: missing or not readable as metadata.
type Stamps = (Option<Stamp>, Option<Stamp>);

fn stamp(path: &Path) -> Option<Stamp> {
    // Follows symlinks: a swapped link target is a new inode.
    let m = fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn stamps(dir: &Path) -> Stamps {
    (stamp(&dir.join(CERT_FILE)), stamp(&dir.join(KEY_FILE)))
}

/// Keeps `slot`'s certificate in step with the files in `dir` until aborted.
pub(super) async fn watch(slot: Arc<Slot>, dir: PathBuf, generations: Arc<AtomicU64>) {
    let mut watcher = Watcher {
        slot,
        dir,
        generations,
        tried: None,
        previous: None,
        pending: None,
        waiting_logged: false,
        expired_logged: None,
    };
    loop {
        watcher.tick().await;
        tokio::time::sleep(POLL).await;
    }
}

struct Watcher {
    slot: Arc<Slot>,
    dir: PathBuf,
    generations: Arc<AtomicU64>,
    /// The files as they were when last read (successfully or not).
    tried: Option<Stamps>,
    /// The files at the previous look.
    previous: Option<Stamps>,
    /// A new pair that is not valid yet, kept while the previous one is.
    pending: Option<Identity>,
    /// "Waiting for the files" was said.
    waiting_logged: bool,
    /// The generation whose expiry was logged.
    expired_logged: Option<u64>,
}

impl Watcher {
    async fn tick(&mut self) {
        let dir = self.dir.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || stamps(&dir)).await else {
            return;
        };
        // The first look reads at once; later changes once they have settled for a look.
        let settled = self.tried.is_none() || self.previous == Some(now);
        if self.tried != Some(now) && settled {
            self.tried = Some(now);
            let dir = self.dir.clone();
            if let Ok(result) = tokio::task::spawn_blocking(move || load(&dir)).await {
                self.loaded(result, now);
            }
        }
        self.previous = Some(now);
        self.promote_pending();
        self.check_expiry();
    }

    fn loaded(&mut self, result: Result<Identity, Error>, now: Stamps) {
        self.pending = None;
        let at = SystemTime::now();
        let old = self.slot.installed();
        let old_valid = old
            .as_ref()
            .is_some_and(|c| super::validity(c.not_before, c.not_after, at) == Validity::Valid);
        let actor = &self.slot.actor_id;
        match result {
            Ok(new) => match new.validity(at) {
                Validity::Valid => self.install(new, old.is_some()),
                validity if old_valid => {
                    let problem = match validity {
                        Validity::NotYet => format!(
                            "the new certificate in {} is not valid before {}",
                            self.dir.display(),
                            rfc3339(new.not_before)
                        ),
                        _ => format!(
                            "the new certificate in {} expired at {}",
                            self.dir.display(),
                            rfc3339(new.not_after)
                        ),
                    };
                    warn!(
                        actor = %actor, error = %problem,
                        "actor certificate files not used; keeping the previous certificate \
                         while it is valid"
                    );
                    self.slot.fail(problem);
                    if validity == Validity::NotYet {
                        self.pending = Some(new);
                    }
                }
                // Nothing valid to keep: put it in force so `current` names the problem.
                _ => self.install(new, old.is_some()),
            },
            Err(e) => {
                let missing = now == (None, None);
                if missing && old.is_none() {
                    if !self.waiting_logged {
                        info!(
                            actor = %actor, dir = %self.dir.display(),
                            "waiting for the actor's certificate files"
                        );
                        self.waiting_logged = true;
                    }
                    self.slot.fail(format!(
                        "waiting for {} and {} in {}",
                        CERT_FILE,
                        KEY_FILE,
                        self.dir.display()
                    ));
                    return;
                }
                if old_valid {
                    warn!(
                        actor = %actor, error = %e,
                        "actor certificate files unusable; keeping the previous certificate \
                         while it is valid"
                    );
                } else {
                    warn!(actor = %actor, error = %e, "actor certificate files unusable");
                }
                self.slot.fail(e.to_string());
            }
        }
    }

    fn install(&mut self, new: Identity, replaces: bool) {
        let current = self.slot.install(new, &self.generations);
        info!(
            actor = %self.slot.actor_id,
            subject = %current.subject,
            serial = %current.serial,
            not_after = %rfc3339(current.not_after),
            generation = current.generation,
            "{}",
            if replaces { "actor certificate reloaded" } else { "actor certificate loaded" }
        );
    }

    fn promote_pending(&mut self) {
        let ready = self
            .pending
            .as_ref()
            .is_some_and(|p| p.validity(SystemTime::now()) == Validity::Valid);
        if ready && let Some(new) = self.pending.take() {
            self.install(new, true);
        }
    }

    fn check_expiry(&mut self) {
        let Some(current) = self.slot.installed() else {
            return;
        };
        let expired = super::validity(current.not_before, current.not_after, SystemTime::now())
            == Validity::Expired;
        if expired && self.expired_logged != Some(current.generation) {
            self.expired_logged = Some(current.generation);
            warn!(
                actor = %self.slot.actor_id,
                subject = %current.subject,
                serial = %current.serial,
                not_after = %rfc3339(current.not_after),
                "actor certificate expired and no new files arrived; the actor's tunnels are \
                 refused until the runtime writes a valid pair to {}",
                self.dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::PermissionsExt as _,
        time::{Duration, Instant},
    };

    use super::{
        super::{SourceConfig, Store, dir_name, testing::Ca},
        *,
    };

    /// Writes `text` to `path` with `mode`, through a temporary file renamed over it.
    fn rename_over(path: &Path, text: &str, mode: u32) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// Rewrites `path` in place (same inode).
    fn rewrite(path: &Path, text: &str) {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn write_pair(dir: &Path, chain: &str, key: &str) {
        fs::create_dir_all(dir).unwrap();
        rename_over(&dir.join(CERT_FILE), chain, 0o644);
        rename_over(&dir.join(KEY_FILE), key, 0o600);
    }

    struct Rig {
        _root: tempfile::TempDir,
        store: Store,
        actor_dir: PathBuf,
        ca: Ca,
    }

    fn rig(actor: &str) -> Rig {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(SourceConfig::Files {
            dir: root.path().into(),
        })
        .unwrap();
        let actor_dir = root.path().join(dir_name(actor));
        Rig {
            _root: root,
            store,
            actor_dir,
            ca: Ca::new(),
        }
    }

    /// Waits up to `secs` for `cond`, polling; returns how long it took.
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

    fn serial_of(store: &Store, actor: &str) -> Option<String> {
        store.current(actor).ok().map(|c| c.serial)
    }

    #[test]
    fn missing_dir_is_refused_up_front() {
        let err = Store::new(SourceConfig::Files {
            dir: "/nonexistent/egress-certs".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/egress-certs"), "{err}");
        assert!(err.contains("create it"), "{err}");
    }

    #[tokio::test]
    async fn loads_and_reloads_on_rename_and_rewrite() {
        let r = rig("team-a/pod-1");
        assert!(r.actor_dir.ends_with("team-a%2Fpod-1"));
        r.store.register("team-a/pod-1", "t", "ns");
        // No files yet: an error that says what is awaited.
        wait_for("the waiting error", 5, || {
            r.store
                .current("team-a/pod-1")
                .is_err_and(|e| e.to_string().contains("waiting for tls.crt"))
        })
        .await;

        let (chain, key) = r.ca.leaf("pod-1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        let took = wait_for("the first pair", 5, || {
            r.store.current("team-a/pod-1").is_ok()
        })
        .await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let first = r.store.current("team-a/pod-1").unwrap();
        assert_eq!(first.subject, "CN=pod-1");

        // Renamed over.
        let (chain, key) = r.ca.leaf("pod-1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        let took = wait_for("the renamed pair", 5, || {
            serial_of(&r.store, "team-a/pod-1").as_deref() != Some(&first.serial)
        })
        .await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let second = r.store.current("team-a/pod-1").unwrap();
        assert!(second.generation > first.generation);

        // Rewritten in place.
        let (chain, key) = r.ca.leaf("pod-1", -10, 3600);
        rewrite(&r.actor_dir.join(CERT_FILE), &chain);
        rewrite(&r.actor_dir.join(KEY_FILE), &key);
        let took = wait_for("the rewritten pair", 5, || {
            serial_of(&r.store, "team-a/pod-1").as_deref() != Some(&second.serial)
        })
        .await;
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let third = r.store.current("team-a/pod-1").unwrap();
        assert!(third.generation > second.generation);
        let status = r.store.status();
        assert_eq!(status[0].renewals, 2);
        assert_eq!(status[0].last_error, None);
        assert_eq!(status[0].serial.as_deref(), Some(third.serial.as_str()));

        // Removed: the store forgets it.
        r.store.remove("team-a/pod-1");
        assert!(matches!(
            r.store.current("team-a/pod-1"),
            Err(Error::NotRegistered(_))
        ));
    }

    #[tokio::test]
    async fn bad_new_pair_keeps_the_old_one() {
        let r = rig("a1");
        let (chain, key) = r.ca.leaf("a1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a1", "t", "ns");
        wait_for("the first pair", 5, || r.store.current("a1").is_ok()).await;
        let good = r.store.current("a1").unwrap();

        // A key that is not the leaf's.
        let (_, other_key) = r.ca.leaf("a1", -10, 3600);
        rename_over(&r.actor_dir.join(KEY_FILE), &other_key, 0o600);
        wait_for("the mismatch to be seen", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("does not belong"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);

        // A key others can read.
        rename_over(&r.actor_dir.join(KEY_FILE), &key, 0o644);
        wait_for("the mode to be refused", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("chmod 600"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);

        // Garbage.
        rename_over(&r.actor_dir.join(KEY_FILE), &key, 0o600);
        rename_over(&r.actor_dir.join(CERT_FILE), "not a certificate", 0o644);
        wait_for("garbage to be refused", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("no certificate in it"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);

        // An expired pair.
        let (chain, key) = r.ca.leaf("a1", -100, -10);
        write_pair(&r.actor_dir, &chain, &key);
        wait_for("the expired pair to be refused", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("expired at"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);

        // Files removed.
        fs::remove_file(r.actor_dir.join(CERT_FILE)).unwrap();
        fs::remove_file(r.actor_dir.join(KEY_FILE)).unwrap();
        wait_for("the removal to be seen", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("No such file"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);

        // A good pair again: in force, error cleared.
        let (chain, key) = r.ca.leaf("a1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        wait_for("the good pair", 5, || {
            serial_of(&r.store, "a1").as_deref() != Some(&good.serial)
        })
        .await;
        assert_eq!(r.store.status()[0].last_error, None);
    }

    #[tokio::test]
    async fn not_yet_valid_pair_waits_beside_the_old_one() {
        let r = rig("a1");
        let (chain, key) = r.ca.leaf("a1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a1", "t", "ns");
        wait_for("the first pair", 5, || r.store.current("a1").is_ok()).await;
        let good = r.store.current("a1").unwrap();

        let (chain, key) = r.ca.leaf("a1", 2, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        wait_for("the early pair to be seen", 5, || {
            r.store.status()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not valid before"))
        })
        .await;
        assert_eq!(r.store.current("a1").unwrap().serial, good.serial);
        wait_for("the early pair to take over", 6, || {
            serial_of(&r.store, "a1").as_deref() != Some(&good.serial)
        })
        .await;
    }

    #[tokio::test]
    async fn expired_not_yet_valid_and_mismatched_are_errors() {
        // Expired, with nothing to keep.
        let r = rig("a1");
        let (chain, key) = r.ca.leaf("a1", -100, -10);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a1", "t", "ns");
        wait_for("expired", 5, || {
            matches!(r.store.current("a1"), Err(Error::Expired { .. }))
        })
        .await;

        // Not yet valid.
        let r = rig("a2");
        let (chain, key) = r.ca.leaf("a2", 3600, 7200);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a2", "t", "ns");
        wait_for("not yet valid", 5, || {
            matches!(r.store.current("a2"), Err(Error::NotYetValid { .. }))
        })
        .await;

        // Mismatched.
        let r = rig("a3");
        let (chain, _) = r.ca.leaf("a3", -10, 3600);
        let (_, key) = r.ca.leaf("a3", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a3", "t", "ns");
        wait_for("mismatch", 5, || {
            r.store
                .current("a3")
                .is_err_and(|e| e.to_string().contains("does not belong"))
        })
        .await;
    }

    #[tokio::test]
    async fn expiry_while_in_force_fails_closed() {
        let r = rig("a1");
        let (chain, key) = r.ca.leaf("a1", -10, 2);
        write_pair(&r.actor_dir, &chain, &key);
        r.store.register("a1", "t", "ns");
        wait_for("the pair", 5, || r.store.current("a1").is_ok()).await;
        wait_for("expiry", 6, || {
            matches!(r.store.current("a1"), Err(Error::Expired { .. }))
        })
        .await;
    }

    #[tokio::test]
    async fn register_from_outside_the_runtime_uses_the_stores() {
        let r = rig("a1");
        let (chain, key) = r.ca.leaf("a1", -10, 3600);
        write_pair(&r.actor_dir, &chain, &key);
        let store = r.store.clone();
        std::thread::spawn(move || store.register("a1", "t", "ns"))
            .join()
            .unwrap();
        wait_for("the pair", 5, || r.store.current("a1").is_ok()).await;
    }

    #[test]
    fn load_names_the_key_problem_without_key_bytes() {
        let root = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let (chain, _) = ca.leaf("a", -10, 3600);
        let bogus = "-----BEGIN PRIVATE KEY-----\nAAAAsecretsecret\n-----END PRIVATE KEY-----\n";
        write_pair(root.path(), &chain, bogus);
        let err = load(root.path()).err().unwrap().to_string();
        assert!(err.contains(KEY_FILE), "{err}");
        assert!(!err.contains("secretsecret"), "{err}");
    }
}
