//! Tier 3: `egress_agent::discovery::cgroup` on the real kernel. Each test makes a private
//! subtree of the cgroup2 hierarchy (removed at the end, even on failure) and lays pods out in
//! it exactly as kubelet and the runtime do, for both cgroup drivers, both runtimes and every
//! QoS class; real processes in network namespaces made by the test are moved into the
//! containers' cgroups. No traffic is sent.
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use egress_agent::discovery::cgroup::{ContainerId, Driver, Error, Layout, Qos, Resolved};
use egress_tests::{cgroup::Cgroup, netns::Netns, process::ChildGuard, process::command_in};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Containerd,
    Crio,
}

/// A pod UID unique to this process and call, lowercase as the API server makes them.
fn pod_uid() -> String {
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        std::process::id(),
        next(),
        u64::from(next()) << 20
    )
}

/// A container ID (64 hex digits) unique to this process and call.
fn container_id() -> String {
    format!("{:032x}{:032x}", std::process::id(), next())
}

fn next() -> u32 {
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

/// kubelet's pod directory, relative to the cgroup root.
fn pod_rel(driver: Driver, qos: Qos, uid: &str) -> String {
    let uid_ = uid.replace('-', "_");
    match (driver, qos) {
        (Driver::Systemd, Qos::Guaranteed) => format!("kubepods.slice/kubepods-pod{uid_}.slice"),
        (Driver::Systemd, Qos::Burstable) => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice")
        }
        (Driver::Systemd, Qos::BestEffort) => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice")
        }
        (Driver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{uid}"),
        (Driver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{uid}"),
        (Driver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{uid}"),
    }
}

/// The runtime's name for a container's cgroup below the pod's.
fn container_rel(driver: Driver, runtime: Runtime, id: &str) -> String {
    match (driver, runtime) {
        (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{id}.scope"),
        (Driver::Systemd, Runtime::Crio) => format!("crio-{id}.scope"),
        (Driver::Cgroupfs, Runtime::Containerd) => id.to_string(),
        (Driver::Cgroupfs, Runtime::Crio) => format!("crio-{id}"),
    }
}

/// CRI-O's cgroup for a container's conmon, beside the container's.
fn conmon_rel(driver: Driver, id: &str) -> String {
    match driver {
        Driver::Systemd => format!("crio-conmon-{id}.scope"),
        Driver::Cgroupfs => format!("crio-conmon-{id}"),
    }
}

/// Makes `dir` (and its parents) as cgroups.
fn mkdir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir.to_path_buf()
}

/// A `sleep` started in `netns` (the test's own if `None`) and then moved into the cgroup `dir`.
fn sleeper(netns: Option<&Netns>, dir: &Path) -> ChildGuard {
    let mut cmd = command_in("sleep", netns, None);
    cmd.arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = ChildGuard::spawn(&mut cmd);
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, child.pid().to_string())
        .unwrap_or_else(|e| panic!("move {} into {}: {e}", child.pid(), procs.display()));
    child
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// One pod of `driver` and `runtime` in each QoS class, with a sandbox and an app container
/// (and, for CRI-O, conmon in the test's own namespace), resolved and mapped back from pids.
fn pods(driver: Driver, runtime: Runtime) {
    egress_tests::require_root();
    egress_tests::require_commands(&["ip", "sleep"]);
    // Guards in dependency order: processes drop first, then namespaces, then the subtree.
    let root = Cgroup::new();
    let layout = Layout {
        cgroup_root: root.path().to_path_buf(),
        proc_root: PathBuf::from("/proc"),
    };
    for qos in Qos::ALL {
        let netns = Netns::named("pod");
        let uid = pod_uid();
        let (sandbox_id, app_id) = (container_id(), container_id());
        let pod = mkdir(&root.path().join(pod_rel(driver, qos, &uid)));
        let mut children = Vec::new();
        if runtime == Runtime::Crio {
            // conmon starts first (lowest pid) and runs in the node's namespace.
            for id in [&sandbox_id, &app_id] {
                let dir = mkdir(&pod.join(conmon_rel(driver, id)));
                children.push(sleeper(None, &dir));
            }
        }
        let app_dir = mkdir(&pod.join(container_rel(driver, runtime, &app_id)));
        let app = sleeper(Some(&netns), &app_dir);
        let sandbox_dir = mkdir(&pod.join(container_rel(driver, runtime, &sandbox_id)));
        let sandbox = sleeper(Some(&netns), &sandbox_dir);

        let scheme = match runtime {
            Runtime::Containerd => "containerd",
            Runtime::Crio => "cri-o",
        };
        let app_cid = ContainerId::parse(&format!("{scheme}://{app_id}")).expect("container id");
        let case = format!("{driver} {runtime:?} {qos}");
        let Resolved {
            cgroup,
            driver: found,
            netns: pod_netns,
        } = layout
            .resolve(&uid, qos, &[app_cid])
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(cgroup, pod, "{case}");
        assert_eq!(found, driver, "{case}");
        let pod_netns = pod_netns.unwrap_or_else(|| panic!("{case}: no netns"));
        assert_eq!(inode(&pod_netns), netns.inode(), "{case}");
        assert_eq!(
            pod_netns,
            PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid())),
            "{case}: the sandbox's process is preferred"
        );
        // A veth annotation's namespace is trusted only when a process of the pod is in it:
        // the pod's own is, the node's (where CRI-O's conmon of this pod lives) is not.
        assert!(
            layout.netns_in_pod(&cgroup, &netns.path()).unwrap(),
            "{case}: the pod's own namespace"
        );
        assert!(
            !layout
                .netns_in_pod(&cgroup, Path::new("/proc/self/ns/net"))
                .unwrap(),
            "{case}: the node's namespace is never the pod's"
        );

        for child in children.iter().chain([&app, &sandbox]) {
            assert_eq!(
                layout
                    .pod_cgroup_of_pid(child.pid())
                    .unwrap_or_else(|e| panic!("{case}: {e}")),
                Some(pod.clone()),
                "{case}: pod of pid {}",
                child.pid()
            );
        }
        drop((app, sandbox, children));
    }
    assert_eq!(
        layout.pod_cgroup_of_pid(std::process::id()).ok().flatten(),
        None,
        "the test itself is in no pod of its subtree"
    );
}

#[test]
fn systemd_containerd() {
    pods(Driver::Systemd, Runtime::Containerd);
}

#[test]
fn systemd_crio() {
    pods(Driver::Systemd, Runtime::Crio);
}

#[test]
fn cgroupfs_containerd() {
    pods(Driver::Cgroupfs, Runtime::Containerd);
}

#[test]
fn cgroupfs_crio() {
    pods(Driver::Cgroupfs, Runtime::Crio);
}

#[test]
fn pod_without_a_process_has_no_netns_yet() {
    egress_tests::require_root();
    let root = Cgroup::new();
    let layout = Layout {
        cgroup_root: root.path().to_path_buf(),
        proc_root: PathBuf::from("/proc"),
    };
    let uid = pod_uid();
    let pod = mkdir(
        &root
            .path()
            .join(pod_rel(Driver::Systemd, Qos::Burstable, &uid)),
    );
    // kubelet made the pod's cgroup; the sandbox's is there, its process not yet.
    mkdir(&pod.join(container_rel(
        Driver::Systemd,
        Runtime::Containerd,
        &container_id(),
    )));
    let got = layout.resolve(&uid, Qos::Burstable, &[]).expect("resolve");
    assert_eq!(got.cgroup, pod);
    assert_eq!(got.netns, None);

    // A process in the agent's own namespace (a hostNetwork pod, or conmon) does not count.
    let own = sleeper(None, &pod);
    let got = layout.resolve(&uid, Qos::Burstable, &[]).expect("resolve");
    assert_eq!(
        got.netns,
        None,
        "process {} shares our namespace",
        own.pid()
    );
}

#[test]
fn missing_pod_is_a_clear_error() {
    egress_tests::require_root();
    let root = Cgroup::new();
    let layout = Layout {
        cgroup_root: root.path().to_path_buf(),
        proc_root: PathBuf::from("/proc"),
    };
    mkdir(&root.path().join("kubepods.slice/kubepods-burstable.slice"));
    let uid = pod_uid();
    let err = layout
        .resolve(&uid, Qos::Burstable, &[])
        .expect_err("no such pod");
    assert!(matches!(err, Error::PodNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&uid) && msg.contains(&root.path().display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("--cgroup-root"), "{msg}");
}

/// What `/proc/<pid>/cgroup` of `pid` reads in a cgroup namespace rooted at `ns_root` (as an
/// agent in a pod of its own, with a private cgroup namespace, sees other pods).
fn cgroup_file_seen_from(ns_root: &Path, pid: u32) -> String {
    let script = format!(
        "echo 0 > '{}' && exec unshare --cgroup cat /proc/{pid}/cgroup",
        ns_root.join("cgroup.procs").display()
    );
    let out = egress_tests::process::run(
        std::process::Command::new("sh").args(["-c", &script]),
        std::time::Duration::from_secs(10),
    );
    out.expect_success("unshare --cgroup cat");
    out.stdout
}

#[test]
fn pod_cgroup_of_pid_from_a_cgroup_namespace() {
    egress_tests::require_root();
    egress_tests::require_commands(&["ip", "sleep", "sh", "unshare", "cat"]);
    let root = Cgroup::new();
    let netns = Netns::named("pod");
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        let agent_pod = mkdir(
            &root
                .path()
                .join(pod_rel(driver, Qos::Burstable, &pod_uid())),
        );
        let agent_dir =
            mkdir(&agent_pod.join(container_rel(driver, Runtime::Containerd, &container_id())));
        for qos in Qos::ALL {
            let uid = pod_uid();
            let pod = mkdir(&root.path().join(pod_rel(driver, qos, &uid)));
            let dir = mkdir(&pod.join(container_rel(driver, Runtime::Containerd, &container_id())));
            let child = sleeper(Some(&netns), &dir);
            let text = cgroup_file_seen_from(&agent_dir, child.pid());
            let case = format!("{driver} {qos}: {}", text.trim());
            assert!(
                text.contains("0::/../"),
                "{case}: not a cgroup namespace view"
            );

            // The kernel's text, served from a procfs of the test's own.
            let proc_root = tempfile::tempdir().expect("tempdir");
            let pid_dir = mkdir(&proc_root.path().join(child.pid().to_string()));
            std::fs::write(pid_dir.join("cgroup"), &text).expect("write cgroup file");
            let layout = Layout {
                cgroup_root: root.path().to_path_buf(),
                proc_root: proc_root.path().to_path_buf(),
            };
            let got = layout
                .pod_cgroup_of_pid(child.pid())
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(got, Some(pod), "{case}");
        }
    }
}
