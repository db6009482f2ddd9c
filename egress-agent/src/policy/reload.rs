//! The live policy and its reloading: an atomic swap of an `Arc<Policy>`, on SIGHUP and when
//! the file changes. A connection decides once, on the policy current when it arrives, so a
//! reload never changes an established flow.
use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{Error, Policy, file};

/// How long the file must stay quiet after a change before it is read: editors and
/// ConfigMap updates touch it several times in a row.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The policy in force, shared by every connection and swapped whole on reload.
pub struct Shared {
    path: Option<PathBuf>,
    current: ArcSwap<Policy>,
    /// Hash of the text last loaded, so a file-system event that changed nothing (an
    /// unrelated file in the directory, a touch) does not log a reload.
    loaded: Mutex<Option<u64>>,
}

impl Shared {
    /// Loads the policy file at `path`, or [`Policy::deny_all`] when there is none.
    pub fn new(path: Option<PathBuf>) -> Result<Shared, Error> {
        let (policy, hash) = match &path {
            Some(p) => {
                let (policy, hash) = load(p)?;
                (policy, Some(hash))
            }
            None => (Policy::deny_all(), None),
        };
        Ok(Shared {
            path,
            current: ArcSwap::from_pointee(policy),
            loaded: Mutex::new(hash),
        })
    }

    /// The policy in force now; decide a connection with one call and keep the `Arc` for it.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Reads and parses the file again and puts it in force. A bad file keeps the policy in
    /// force and returns why. Without a file there is nothing to reload: `Ok`.
    pub fn reload(&self) -> Result<(), Error> {
        self.reload_inner(false).map(|_| ())
    }

    /// The policy file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reloads; with `only_if_changed`, skips a file whose text is what was loaded last.
    /// Returns whether a new policy was put in force.
    fn reload_inner(&self, only_if_changed: bool) -> Result<bool, Error> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let text = file::read(path)?;
        let hash = hash_text(&text);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if only_if_changed && *loaded == Some(hash) {
            return Ok(false);
        }
        let policy = Policy::parse(&text, path)?;
        self.current.store(Arc::new(policy));
        *loaded = Some(hash);
        Ok(true)
    }
}

fn load(path: &Path) -> Result<(Policy, u64), Error> {
    let text = file::read(path)?;
    let policy = Policy::parse(&text, path)?;
    Ok((policy, hash_text(&text)))
}

fn hash_text(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Runs until the process ends: reloads the policy on SIGHUP and when its file changes
/// (inotify on the file's directory, so a ConfigMap symlink swap or an editor's write and
/// rename is seen; changes are debounced by 200 ms). Logs `policy reloaded` (info, with the
/// summary) or `policy reload failed, keeping the previous policy` (warn, with the error).
/// Call it inside the runtime; the SIGHUP handler is in place when it returns.
pub fn spawn_reloader(shared: Arc<Shared>) -> JoinHandle<()> {
    let hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot handle SIGHUP; the policy reloads only when its file changes");
            None
        }
    };
    // One pending wake-up is enough: the reload reads the file as it is then.
    let (tx, rx) = mpsc::channel(1);
    let watcher = shared.path().and_then(|path| match watch(path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                path = %path.display(), error = %e,
                "cannot watch the policy file; it reloads on SIGHUP only"
            );
            None
        }
    });
    tokio::spawn(run(shared, hangup, watcher, rx))
}

async fn run(
    shared: Arc<Shared>,
    mut hangup: Option<Signal>,
    // Kept alive here: dropping it stops the watch.
    _watcher: Option<notify::RecommendedWatcher>,
    mut changes: mpsc::Receiver<()>,
) {
    loop {
        tokio::select! {
            Some(()) = next_hangup(&mut hangup) => {
                if shared.path().is_none() {
                    info!("SIGHUP: no policy file configured, nothing to reload");
                    continue;
                }
                reload(&shared, false).await;
            }
            Some(()) = changes.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while changes.try_recv().is_ok() {}
                reload(&shared, true).await;
            }
            else => std::future::pending::<()>().await,
        }
    }
}

async fn next_hangup(hangup: &mut Option<Signal>) -> Option<()> {
    match hangup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn reload(shared: &Arc<Shared>, only_if_changed: bool) {
    let worker = Arc::clone(shared);
    let result = tokio::task::spawn_blocking(move || worker.reload_inner(only_if_changed)).await;
    match result {
        Ok(Ok(true)) => info!(summary = %shared.current().summary(), "policy reloaded"),
        Ok(Ok(false)) => debug!("policy file event, text unchanged"),
        Ok(Err(e)) => warn!(error = %e, "policy reload failed, keeping the previous policy"),
        Err(e) => warn!(error = %e, "policy reload failed, keeping the previous policy"),
    }
}

/// Watches the directory of `path` (and of the file it links to, if elsewhere) and wakes the
/// reloader on any change there except reads.
fn watch(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(event) => match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                // Opening and reading the file, ours included, changes nothing.
                EventKind::Access(_) => false,
                _ => true,
            },
            // Overflowed queue and the like: the file may have changed.
            Err(_) => true,
        };
        if relevant {
            // Full means a wake-up is already pending.
            let _ = tx.try_send(());
        }
    })?;
    let dir = parent_dir(path);
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    // A symlink to a file elsewhere that is edited in place changes only there.
    if let Ok(target) = std::fs::canonicalize(path) {
        let target_dir = parent_dir(&target);
        if std::fs::canonicalize(&dir).ok().as_deref() != Some(target_dir.as_path())
            && let Err(e) = watcher.watch(&target_dir, RecursiveMode::NonRecursive)
        {
            debug!(
                dir = %target_dir.display(), error = %e,
                "not watching the policy file's target directory"
            );
        }
    }
    Ok(watcher)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::symlink,
        time::{Duration, Instant},
    };

    use super::*;

    const V1: &str = "[default]\nallow = [{ host = \"one.test\" }]\n";
    const V2: &str = "[default]\nallow = [{ host = \"two.test\" }]\n";

    fn allows(shared: &Shared, host: &str) -> bool {
        shared
            .current()
            .template("ns", "t")
            .decide_name(host, 443)
            .allowed
    }

    /// Waits up to 10 s for `cond`, polling.
    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `text` to a temporary file beside `path` and renames it over `path`.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn no_file_is_deny_all_and_reload_is_a_no_op() {
        let shared = Shared::new(None).unwrap();
        assert!(shared.path().is_none());
        assert!(!allows(&shared, "one.test"));
        assert!(shared.current().template("ns", "t").pep);
        shared.reload().unwrap();
    }

    #[test]
    fn reload_swaps_and_a_bad_file_keeps_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, V1).unwrap();
        let shared = Shared::new(Some(path.clone())).unwrap();
        assert!(allows(&shared, "one.test"));
        let before = shared.current();

        fs::write(
            &path,
            "[default]\nallow = [{ host = \"two.test\", bogus = 1 }]\n",
        )
        .unwrap();
        let err = shared.reload().unwrap_err().to_string();
        assert!(err.contains("policy.toml:2:"), "{err}");
        assert!(Arc::ptr_eq(&before, &shared.current()));
        assert!(allows(&shared, "one.test"));

        fs::remove_file(&path).unwrap();
        assert!(matches!(shared.reload(), Err(Error::Read { .. })));
        assert!(allows(&shared, "one.test"));

        fs::write(&path, V2).unwrap();
        shared.reload().unwrap();
        assert!(allows(&shared, "two.test"));
        assert!(!allows(&shared, "one.test"));
        // The old Arc, held by a connection, is untouched.
        assert!(
            before
                .template("ns", "t")
                .decide_name("one.test", 443)
                .allowed
        );
    }

    #[test]
    fn new_fails_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, "[default\n").unwrap();
        let err = Shared::new(Some(path.clone())).err().expect("an error");
        assert!(
            err.to_string()
                .starts_with(&format!("{}:1:", path.display())),
            "{err}"
        );
        assert!(matches!(
            Shared::new(Some(dir.path().join("missing.toml"))),
            Err(Error::Read { .. })
        ));
        assert!(matches!(
            Shared::new(Some(dir.path().to_path_buf())),
            Err(Error::NotAFile { .. })
        ));
    }

    #[tokio::test]
    async fn file_changes_reload_without_sighup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, V1).unwrap();
        let shared = Arc::new(Shared::new(Some(path.clone())).unwrap());
        let task = spawn_reloader(Arc::clone(&shared));

        // Write and rename, as editors do.
        replace(&path, V2);
        wait_for("the renamed file", || allows(&shared, "two.test")).await;

        // A bad file keeps the policy in force.
        fs::write(&path, "[default]\nallow = [{ cidr = \"10.0.0.0/33\" }]\n").unwrap();
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert!(allows(&shared, "two.test"));

        // Written in place.
        fs::write(&path, V1).unwrap();
        wait_for("the file written in place", || allows(&shared, "one.test")).await;
        task.abort();
    }

    #[tokio::test]
    async fn configmap_symlink_swap_reloads() {
        // The layout kubelet gives a ConfigMap volume: policy.toml -> ..data/policy.toml,
        // ..data -> ..<timestamp>; an update makes a new directory and renames a new ..data
        // symlink over the old one.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..v1")).unwrap();
        fs::write(root.join("..v1/policy.toml"), V1).unwrap();
        symlink("..v1", root.join("..data")).unwrap();
        symlink("..data/policy.toml", root.join("policy.toml")).unwrap();
        let shared = Arc::new(Shared::new(Some(root.join("policy.toml"))).unwrap());
        assert!(allows(&shared, "one.test"));
        let task = spawn_reloader(Arc::clone(&shared));

        fs::create_dir(root.join("..v2")).unwrap();
        fs::write(root.join("..v2/policy.toml"), V2).unwrap();
        symlink("..v2", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        fs::remove_dir_all(root.join("..v1")).unwrap();
        wait_for("the swapped ConfigMap", || allows(&shared, "two.test")).await;
        task.abort();
    }

    #[tokio::test]
    async fn sighup_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        fs::write(&path, V1).unwrap();
        let shared = Arc::new(Shared::new(Some(path.clone())).unwrap());
        // No watcher: only the signal can make the change seen.
        let hangup = signal(SignalKind::hangup()).unwrap();
        let (_tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(run(Arc::clone(&shared), Some(hangup), None, rx));
        fs::write(&path, V2).unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
        wait_for("the SIGHUP reload", || allows(&shared, "two.test")).await;
        task.abort();
    }
}
