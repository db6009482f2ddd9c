//! Commands run inside a gVisor sandbox (`runsc`) whose network is a test's namespace, so
//! their packets leave through gVisor's own netstack and the namespace's veth, as an actor's
//! do on a gVisor node.
//!
//! Facts about Debian's runsc (2022-12-19 build) on this kernel that shape the code:
//! - only `--platform=ptrace` works (kvm hangs on the VM's paravirtual KVM);
//! - `runsc do` edits host iptables, so an OCI bundle with `--network=sandbox` and the spec's
//!   network namespace set to the test's namespace is used instead;
//! - it wrongly thinks it runs in the root netns on kernel 6.18 (it looks for
//!   /proc/sys/net/core/rmem_default) and refuses to start: a read-only tmpfs over that
//!   directory, in a private mount namespace, hides the file from it;
//! - at start it moves every address of the namespace's interfaces into its netstack, i.e.
//!   deletes them (and so their routes) from the namespace: re-add them before the next run;
//! - `--ignore-cgroups` stops it creating `/sys/fs/cgroup/*/<id>` directories, which a killed
//!   runsc would leave behind; the sandbox and gofer are started `--attached`, so they die
//!   with the `runsc run` process a timeout kills.
//!
//! ```no_run
//! use std::net::{IpAddr, Ipv4Addr};
//! use std::time::Duration;
//! use egress_tests::{gvisor::Sandbox, netns::{Netns, veth}};
//!
//! let (server, sbx) = (Netns::new(), Netns::new());
//! veth(&server, &sbx, &["10.253.1.1/24"], &["10.253.1.2/24"]);
//! let out = Sandbox::new(&sbx)
//!     .hosts(&[("web.egress.test", IpAddr::V4(Ipv4Addr::new(10, 253, 1, 1)))])
//!     .run(&["curl", "-sS", "http://web.egress.test:8080/"], Duration::from_secs(20));
//! out.expect_success("curl in gVisor");
//! // runsc took 10.253.1.2 from the namespace: `sbx.ip(&["addr", "add", ...])` before a next run.
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Output;

/// The runsc flags every run uses (before the subcommand), for reports and debugging.
pub const RUNSC_FLAGS: [&str; 3] = ["--platform=ptrace", "--network=sandbox", "--ignore-cgroups"];

/// Hides /proc/sys/net/core/rmem_default from runsc (see the module docs), then execs the
/// rest of the arguments. `$1` is the namespace path; the tmpfs lives only in the private
/// mount namespace `unshare -m` made, so nothing changes for the host.
const WORKAROUND: &str = r#"ns=$1; shift
nsenter --net="$ns" mount -t tmpfs -o ro,size=4k none /proc/sys/net/core || {
  echo "egress-tests: cannot hide /proc/sys/net/core from runsc" >&2; exit 125; }
exec "$@""#;

/// A gVisor sandbox configuration bound to one network namespace; each [`Sandbox::run`]
/// starts a fresh container.
#[derive(Debug)]
pub struct Sandbox {
    netns: PathBuf,
    netns_name: String,
    /// (host path, container path), mounted read-only.
    mounts: Vec<(PathBuf, PathBuf)>,
    env: Vec<String>,
    debug: bool,
    /// Generated hosts and resolv.conf files, kept until the sandbox config goes.
    files: tempfile::TempDir,
}

impl Sandbox {
    /// A sandbox whose network is `netns`; the root filesystem is the host's `/`, read-only
    /// (so the test's files, its CA and the probe binary are seen at their host paths).
    pub fn new(netns: &Netns) -> Sandbox {
        Sandbox {
            netns: netns.path(),
            netns_name: netns.name().to_string(),
            mounts: Vec::new(),
            env: Vec::new(),
            debug: false,
            files: tempfile::Builder::new()
                .prefix("egress-test-gvisor-files-")
                .tempdir()
                .expect("create temp dir"),
        }
    }

    /// Bind-mounts `host` read-only over `container`, which must exist on the host: for a
    /// mount point missing from the read-only root, runsc creates an empty file *on the host*
    /// (seen here under /etc, /usr/local/bin and /tmp).
    pub fn mount(mut self, host: impl AsRef<Path>, container: impl AsRef<Path>) -> Self {
        let target = container.as_ref();
        assert!(
            target.exists(),
            "gVisor mount point {} is not present on the host: runsc would create it there",
            target.display()
        );
        self.mounts.push((
            host.as_ref().to_path_buf(),
            container.as_ref().to_path_buf(),
        ));
        self
    }

    /// Mounts a generated hosts file (localhost plus `entries`) over /etc/hosts, so names
    /// resolve inside the sandbox without touching the host's file.
    pub fn hosts(self, entries: &[(&str, IpAddr)]) -> Self {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let path = self.files.path().join("hosts");
        std::fs::write(&path, text).expect("write sandbox hosts file");
        self.mount(path, "/etc/hosts")
    }

    /// Mounts a generated resolv.conf naming `server` over /etc/resolv.conf; one try with a
    /// one-second timeout, so a lost query fails fast instead of after the 5 s x 2 default.
    pub fn resolver(self, server: IpAddr) -> Self {
        let path = self.files.path().join("resolv.conf");
        std::fs::write(
            &path,
            format!("nameserver {server}\noptions timeout:1 attempts:1\n"),
        )
        .expect("write sandbox resolv.conf");
        self.mount(path, "/etc/resolv.conf")
    }

    /// Adds `KEY=VALUE` to the sandboxed process's environment (PATH is always set).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Runs runsc with `--debug`: its logs (printed when a run fails) then show every syscall
    /// gate and netstack decision; the default logs only show start-up and errors.
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = on;
        self
    }

    /// Runs `argv` in a new container (stdin closed) and waits up to `timeout`.
    ///
    /// The exit status is the sandboxed program's; `pid` is runsc's. On failure or timeout
    /// runsc's logs are printed to stderr (shown with the failing test's output). The
    /// container, its state and any cgroup directories are removed before this returns.
    pub fn run(&self, argv: &[&str], timeout: Duration) -> Output {
        crate::require_commands(&["runsc", "unshare", "nsenter", "mount", "sh"]);
        assert!(!argv.is_empty(), "Sandbox::run needs a program");
        assert!(
            self.netns.exists(),
            "netns {} is gone: the Netns must outlive its sandbox runs",
            self.netns_name
        );
        let container = Container::new();
        let bundle = container.dir.path().join("bundle");
        std::fs::create_dir(&bundle).expect("create bundle dir");
        let config = self.spec(argv);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).expect("serialize OCI spec"),
        )
        .expect("write config.json");

        let mut cmd = Command::new("unshare");
        cmd.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            WORKAROUND,
            "sh",
        ])
        .arg(&self.netns)
        .arg("runsc")
        .args(container.global_flags())
        .args(RUNSC_FLAGS);
        if self.debug {
            cmd.arg("--debug");
        }
        cmd.arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&container.id);
        let out = crate::process::run(&mut cmd, timeout);
        if !out.success() {
            eprintln!(
                "gvisor: container {} in netns {} failed: {}\n{}",
                container.id,
                self.netns_name,
                out.describe(),
                container.logs()
            );
        }
        out
    }

    /// The OCI runtime spec for one run of `argv`.
    fn spec(&self, argv: &[&str]) -> serde_json::Value {
        use serde_json::json;
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "HOME=/".to_string(),
        ];
        env.extend(self.env.iter().cloned());
        // runsc spec's defaults: enough for curl and plain sockets, nothing that reaches the host.
        let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ];
        for (host, container) in &self.mounts {
            mounts.push(json!({
                "destination": container, "type": "bind", "source": host,
                "options": ["rbind", "ro"],
            }));
        }
        json!({
            "ociVersion": "1.0.0",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": argv,
                "env": env,
                "cwd": "/",
                "capabilities": {
                    "bounding": caps, "effective": caps, "inheritable": caps, "permitted": caps,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            },
            "root": {"path": "/", "readonly": true},
            "hostname": "egress-sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": self.netns},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                ],
            },
        })
    }
}

/// One container's private runsc root (state), bundle and logs; Drop deletes whatever runsc
/// left and never panics.
struct Container {
    id: String,
    dir: tempfile::TempDir,
}

impl Container {
    fn new() -> Container {
        let dir = tempfile::Builder::new()
            .prefix("egress-test-gvisor-")
            .tempdir()
            .expect("create temp dir");
        for sub in ["state", "logs"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create runsc dir");
        }
        Container {
            id: crate::unique_name("egt-sbx"),
            dir,
        }
    }

    /// Global flags naming this container's private state and log directories.
    fn global_flags(&self) -> [String; 2] {
        [
            format!("--root={}", self.state().display()),
            // A trailing slash makes runsc write one file per process (run, gofer, boot).
            format!("--debug-log={}/", self.dir.path().join("logs").display()),
        ]
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Every runsc log file of this container, concatenated with headers.
    fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("logs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| {
                format!(
                    "--- {} ---\n{}",
                    p.file_name().unwrap_or_default().to_string_lossy(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Whether runsc still knows the container (it deletes it itself after a clean exit).
    fn listed(&self) -> bool {
        Command::new("runsc")
            .arg(format!("--root={}", self.state().display()))
            .args(["list", "-quiet"])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == self.id)
            })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.listed() {
            // Left after a timeout kill: stops a still-running sandbox and removes the state
            // (and the cgroups, were they not ignored).
            eprintln!(
                "gvisor: deleting container {} left by a killed runsc",
                self.id
            );
            let status = status_within(
                Command::new("runsc")
                    .arg(format!("--root={}", self.state().display()))
                    .args(["delete", "-force", &self.id]),
                Duration::from_secs(10),
            );
            if status != Some(true) || self.listed() {
                eprintln!(
                    "warning: runsc delete -force {} failed (success: {status:?}); see {}",
                    self.id,
                    self.dir.path().display()
                );
            }
        }
        // With --ignore-cgroups there should be none; a runsc without it that was killed
        // leaves one directory per v1 hierarchy, named after the container id.
        for dir in leftover_cgroups(&self.id) {
            if std::fs::remove_dir(&dir).is_err() {
                eprintln!("warning: could not remove cgroup {}", dir.display());
            }
        }
    }
}

/// Runs `cmd` with output discarded; `Some(success)`, or `None` if it could not start or was
/// killed after `timeout`. Never panics: it runs from Drop.
fn status_within(cmd: &mut Command, timeout: Duration) -> Option<bool> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s.success()),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// `/sys/fs/cgroup/*/ID` directories (runsc's default cgroup path is `/ID`).
fn leftover_cgroups(id: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join(id))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_netns_and_mounts() {
        let sbx = Sandbox {
            netns: PathBuf::from("/var/run/netns/egt-1-2"),
            netns_name: "egt-1-2".into(),
            mounts: vec![(PathBuf::from("/tmp/h"), PathBuf::from("/etc/hosts"))],
            env: vec!["A=b".into()],
            debug: false,
            files: tempfile::tempdir().unwrap(),
        };
        let spec = sbx.spec(&["curl", "-sS"]);
        assert_eq!(spec["process"]["args"], serde_json::json!(["curl", "-sS"]));
        assert_eq!(spec["root"]["path"], "/");
        assert_eq!(spec["root"]["readonly"], true);
        let ns = spec["linux"]["namespaces"].as_array().unwrap();
        assert!(
            ns.iter()
                .any(|n| n["type"] == "network" && n["path"] == "/var/run/netns/egt-1-2")
        );
        let mounts = spec["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/etc/hosts"
            && m["source"] == "/tmp/h"
            && m["options"] == serde_json::json!(["rbind", "ro"])));
        assert!(!mounts.iter().any(|m| m["destination"] == "/tmp"));
        assert!(
            spec["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "A=b")
        );
    }
}
