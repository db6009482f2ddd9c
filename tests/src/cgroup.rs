//! Child cgroups of the cgroup v2 hierarchy, one per test, removed on drop.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cgroup2 mount point, read from /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let info =
            std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
        find_cgroup2(&info)
            .unwrap_or_else(|| panic!("no cgroup2 filesystem mounted (see /proc/self/mountinfo)"))
    })
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(crate::parse_mountinfo_line)
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point)
}

/// A cgroup v2 directory made by the test; on drop its processes are killed and it is removed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/egress-test-<pid>-<n>`.
    pub fn new() -> Cgroup {
        Cgroup::create(cgroup2_root().join(crate::unique_name("egress-test")))
    }

    fn create(path: PathBuf) -> Cgroup {
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("mkdir cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    /// Creates a child cgroup `name` below this one (its own guard; dropping the parent removes it too).
    pub fn child(&self, name: &str) -> Cgroup {
        Cgroup::create(self.path.join(name))
    }

    /// The cgroup's directory, as given to the agent's `--actor-cgroup`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the directory's inode number, what `bpf_get_current_cgroup_id` returns.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// The path as it appears in `/proc/<pid>/cgroup` (`0::/egress-test-…`).
    pub fn relative_path(&self) -> PathBuf {
        Path::new("/").join(
            self.path
                .strip_prefix(cgroup2_root())
                .expect("cgroup below the cgroup2 root"),
        )
    }

    /// The pids currently in this cgroup (not its children).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Moves the process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("write {pid} to {}: {e}", procs.display()));
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Cgroup::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        // cgroup.kill SIGKILLs every process in the subtree; rmdir then fails with EBUSY until
        // the kernel has reaped them, so retry for a while.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match remove_tree(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!(
                        "warning: could not remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Removes a cgroup directory and its child cgroups, deepest first (cgroupfs only allows rmdir).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path())?;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n\
                    42 25 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }
}
