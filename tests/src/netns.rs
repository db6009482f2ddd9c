//! Network namespaces made by a test, veth pairs between them, and running code inside one.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

/// A named network namespace (`ip netns add egt-<pid>-<n>`, or `egt-<role>-<pid>-<n>`) with
/// `lo` up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a uniquely named namespace and brings its loopback up.
    pub fn new() -> Netns {
        Netns::create(crate::unique_name("egt"))
    }

    /// Like [`Netns::new`], with the namespace's role in its name (`egt-node-<pid>-<n>`), so
    /// that `ip netns list` and logs show which namespace of a test is which.
    pub fn named(role: &str) -> Netns {
        Netns::create(crate::unique_name(&format!("egt-{role}")))
    }

    fn create(name: String) -> Netns {
        let netns = Netns { name };
        ip(&["netns", "add", &netns.name]);
        // From here on Drop deletes it, even if bringing lo up fails.
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `nsenter --net=`, `setns` and the agent's `--actor-netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// The namespace's inode number, equal to the one behind `/proc/<pid>/ns/net` of its members.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path().display()))
            .ino()
    }

    /// Runs `ip ARGS` inside this namespace (`ip -n NAME ARGS`) and panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        self.ip_output(args);
    }

    /// Like [`Netns::ip`], returning what it printed (`ip -n NAME ARGS`, e.g. `addr show`).
    pub fn ip_output(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Writes `value` to `/proc/sys/<key>` as seen from inside this namespace (e.g.
    /// `net/ipv4/ip_forward`), and panics if that fails. Only per-namespace settings
    /// (`net/...`) belong here: others would change the whole machine.
    pub fn sysctl(&self, key: &str, value: &str) {
        assert!(
            key.starts_with("net/"),
            "{key} is not a per-namespace sysctl"
        );
        let path = PathBuf::from("/proc/sys").join(key);
        let value = format!("{value}\n");
        let name = self.name.clone();
        self.run(move || {
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("write {} in netns {name}: {e}", path.display()))
        });
    }

    /// The value of `/proc/sys/<key>` as seen from inside this namespace, trimmed.
    pub fn sysctl_value(&self, key: &str) -> String {
        let path = PathBuf::from("/proc/sys").join(key);
        let name = self.name.clone();
        self.run(move || {
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {} in netns {name}: {e}", path.display()))
                .trim()
                .to_string()
        })
    }

    /// A command that runs `program` inside this namespace via `nsenter --net=PATH`.
    ///
    /// Not `ip netns exec`: that remounts /sys and hides the cgroup2 mount from the program.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a fresh std thread that has joined this namespace and returns its result.
    ///
    /// A network namespace belongs to a thread, so this never touches the caller's thread.
    /// Sockets created inside `f` stay in this namespace after it returns, which is how
    /// listeners and clients in the namespace are made from a test.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`Netns::run`] but returns the thread's handle instead of waiting for it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                drop(file);
                f()
            })
            .expect("spawn netns thread")
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive but it loses its name; a leftover
        // process is the owner's bug, not a reason to panic here.
        for _ in 0..20 {
            match Command::new("ip")
                .args(["netns", "delete", &self.name])
                .output()
            {
                Ok(out) if out.status.success() => return,
                Ok(_) if !self.path().exists() => return,
                Ok(_) | Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        eprintln!("warning: could not delete netns {}", self.name);
    }
}

/// The two ends of a veth pair created by [`veth`]; they vanish with their namespaces.
#[derive(Debug, Clone)]
pub struct Veth {
    /// Interface name in the first namespace.
    pub a_name: String,
    /// Interface name in the second namespace.
    pub b_name: String,
}

/// Creates a veth pair with one end in `a` and one in `b`, assigns the addresses (CIDR
/// strings, e.g. `10.251.3.1/24`, `fd7e:251:3::1/64`) and brings both ends up.
///
/// IPv6 addresses get `nodad` so they are usable at once rather than tentative.
/// The pair is created inside the test's namespaces, never in the root namespace.
pub fn veth(a: &Netns, b: &Netns, a_addrs: &[&str], b_addrs: &[&str]) -> Veth {
    named_veth("v", a, b, a_addrs, b_addrs)
}

/// Like [`veth`], with the ends named `<tag><pid>x<n>a` and `...b`, so a link's role shows in
/// `ip link` (e.g. `up` for the node's link to the upstream namespace). `tag` is at most two
/// bytes: interface names have at most 15.
pub fn named_veth(tag: &str, a: &Netns, b: &Netns, a_addrs: &[&str], b_addrs: &[&str]) -> Veth {
    assert!(tag.len() <= 2, "veth tag {tag:?} longer than two bytes");
    let n = crate::next_id();
    // Interface names are at most 15 bytes; pid (<= 7 digits) + counter keeps them unique.
    let a_name = format!("{tag}{}x{}a", std::process::id(), n);
    let b_name = format!("{tag}{}x{}b", std::process::id(), n);
    assert!(a_name.len() <= 15, "interface name {a_name} too long");
    a.ip(&[
        "link",
        "add",
        &a_name,
        "type",
        "veth",
        "peer",
        "name",
        &b_name,
        "netns",
        b.name(),
    ]);
    for (ns, dev, addrs) in [(a, &a_name, a_addrs), (b, &b_name, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", dev]);
            }
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
    Veth { a_name, b_name }
}

/// Runs `ip ARGS` and panics with its stderr if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    if !out.status.success() {
        panic!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}
