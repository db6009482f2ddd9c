//! Privileged integration-test rig: network namespaces, cgroups, squid as the PEP, local
//! upstream servers, and a guard for the agent binary under test.
//!
//! Every guard cleans up in `Drop` and never panics there; everything else panics with
//! context, because a test that cannot set itself up must fail loudly, never pass.
//! Declare guards in dependency order (topology first): locals drop in reverse, so processes
//! stop before their namespaces and cgroups go.
//!
//! ```no_run
//! use std::net::IpAddr;
//! use std::time::Duration;
//! use egress_tests::{agent::*, cgroup::Cgroup, client::curl_command, pki::TestCa, process::run};
//! use egress_tests::{squid::*, topology::Topology, upstream::*};
//!
//! egress_tests::require_root();
//! // Actor on 10.251.7.0/24 + fd7e:251:7::/64, upstream on 10.250.7.0/24 + fd7e:250:7::/64,
//! // both linked to the node; unique per test.
//! let topo = Topology::new(7);
//! let cgroup = Cgroup::new();
//! let ca = TestCa::new();
//! let web = topo.upstream_addr(443);
//! let upstream = Upstream::start(&topo.upstream, &ca, UpstreamSpec::new().names(&["web.egress.test"]).https(web));
//! let squid = Squid::start(
//!     &topo.node,
//!     SquidConfig::default().host("web.egress.test", IpAddr::V4(topo.upstream_v4())),
//! );
//! let opts = AgentOptions::new(squid.addr())
//!     .actor(ActorSpec::new("a1", "tmpl", "team", &cgroup).netns(&topo.actor));
//! let mut agent = Agent::start(&topo.node, None, opts);
//! agent.wait_ready(Duration::from_secs(20));
//! let out = run(
//!     &mut curl_command(Some(&topo.actor), Some(&cgroup), &ca.cert_path(),
//!         &[("web.egress.test", 443, IpAddr::V4(topo.upstream_v4()))], "https://web.egress.test/"),
//!     Duration::from_secs(20),
//! );
//! out.expect_success("curl from the actor");
//! let conn = &agent.wait_for_connections(1, Duration::from_secs(20))[0];
//! assert_eq!(conn.pid, Some(out.pid));
//! let entry = squid.wait_for_request("CONNECT", "web.egress.test:443", Duration::from_secs(20));
//! assert_eq!(entry.actor_id.as_deref(), Some("a1"));
//! assert_eq!(upstream.seen_on(web)[0].sni.as_deref(), Some("web.egress.test"));
//! ```

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod client;
pub mod contract;
pub mod dns;
pub mod gvisor;
pub mod kube;
pub mod load;
pub mod netns;
pub mod nghttpx;
pub mod nginx;
pub mod pki;
pub mod process;
pub mod refusal;
pub mod signer;
pub mod squid;
pub mod topology;
pub mod udp;
pub mod upstream;
pub mod world;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Panics unless the test runs as root: the rig creates namespaces, cgroups and bpffs pins.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (network namespaces, cgroups, eBPF): run `cargo xtask test` \
             or `sudo -E cargo test -p egress-tests`"
        );
    }
}

/// Panics unless every named program is on PATH, saying which ones are missing.
pub fn require_commands(names: &[&str]) {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !on_path(n)).collect();
    if !missing.is_empty() {
        panic!(
            "this test needs {missing:?} on PATH; install them (Debian: squid-openssl, curl, \
             openssl, iproute2, util-linux, runsc, dnsmasq-base, bind9-dnsutils, \
             nghttp2-proxy), e.g. with \
             `cargo xtask setup`"
        );
    }
}

fn on_path(name: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Mounts bpffs at /sys/fs/bpf unless something of type bpf is already mounted there.
pub fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("read /proc/self/mountinfo")
        .lines()
        .filter_map(parse_mountinfo_line)
        .any(|m| m.fstype == "bpf" && m.mount_point == Path::new("/sys/fs/bpf"));
    if mounted {
        return;
    }
    std::fs::create_dir_all("/sys/fs/bpf").expect("mkdir /sys/fs/bpf");
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()
        .expect("run mount -t bpf");
    // Another test may have mounted it between the check and here: only fail if still absent.
    if !out.status.success() && !is_bpffs("/sys/fs/bpf") {
        panic!(
            "mount -t bpf bpf /sys/fs/bpf failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn is_bpffs(path: &str) -> bool {
    // BPF_FS_MAGIC from linux/magic.h.
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as u64 == 0xcafe4a11)
}

/// A name unique to this process and call: `PREFIX-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), next_id())
}

/// A process-wide counter, so names and subnets made by parallel tests never collide.
pub(crate) fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One line of /proc/self/mountinfo, the fields the rig needs.
pub(crate) struct MountInfo {
    pub mount_point: std::path::PathBuf,
    pub fstype: String,
}

/// Parses a mountinfo line: `id parent maj:min root mount_point opts [optional...] - fstype src super`.
pub(crate) fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (pre, post) = line.split_once(" - ")?;
    let mount_point = pre.split(' ').nth(4)?;
    let fstype = post.split(' ').next()?;
    Some(MountInfo {
        mount_point: unescape_mountinfo(mount_point).into(),
        fstype: fstype.to_string(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the kernel counter `name` (summed over CPUs) in the agent's map stats.
pub fn counter(stats: &egress_agent::ebpf::MapStats, name: &str) -> u64 {
    stats
        .counters
        .iter()
        .find(|(c, _)| c.name() == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_cgroup2_line() {
        let m = parse_mountinfo_line(
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(m.fstype, "cgroup2");
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn mountinfo_escaped_space() {
        let m = parse_mountinfo_line("1 2 0:1 / /mnt/a\\040b rw - tmpfs none rw").unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt/a b"));
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("x"), unique_name("x"));
    }
}
