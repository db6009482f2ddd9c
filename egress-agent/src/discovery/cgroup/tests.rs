//! Fake kubelet layouts in a temporary directory, and a fake procfs whose `ns/net` entries
//! are either plain files (a namespace other than the test's) or links to the test's own.
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use proptest::prelude::*;

use super::*;

const UID: &str = "3f2a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5f";
const UID_: &str = "3f2a6c1e_9b7d_4e21_8c55_0a1b2c3d4e5f";
const SANDBOX: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const APP: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// A cgroup root and a procfs, both fake, in one temporary directory.
struct Fake {
    _dir: tempfile::TempDir,
    layout: Layout,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            cgroup_root: dir.path().join("cgroup"),
            proc_root: dir.path().join("proc"),
        };
        fs::create_dir_all(&layout.cgroup_root).unwrap();
        fs::create_dir_all(&layout.proc_root).unwrap();
        Fake { _dir: dir, layout }
    }

    /// Makes `rel` below the cgroup root (with its parents) and returns its path.
    fn mkdir(&self, rel: &str) -> PathBuf {
        let path = self.layout.cgroup_root.join(rel);
        fs::create_dir_all(&path).unwrap();
        path
    }

    /// Puts `pids` in the cgroup `dir`.
    fn procs(&self, dir: &Path, pids: &[u32]) {
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        fs::write(dir.join("cgroup.procs"), text).unwrap();
    }

    /// A process whose namespace is not the test's (a plain file has an inode of its own).
    fn foreign_process(&self, pid: u32) -> PathBuf {
        let ns = self.layout.proc_root.join(pid.to_string()).join("ns");
        fs::create_dir_all(&ns).unwrap();
        fs::write(ns.join("net"), "").unwrap();
        ns.join("net")
    }

    /// A process in the test's own namespace (like conmon, or a hostNetwork process).
    fn own_process(&self, pid: u32) {
        let ns = self.layout.proc_root.join(pid.to_string()).join("ns");
        fs::create_dir_all(&ns).unwrap();
        symlink("/proc/thread-self/ns/net", ns.join("net")).unwrap();
    }

    /// `<proc>/<pid>/cgroup` with `text`.
    fn cgroup_file(&self, pid: u32, text: &str) {
        let dir = self.layout.proc_root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup"), text).unwrap();
    }
}

fn containerd(id: &str) -> ContainerId {
    ContainerId::parse(&format!("containerd://{id}")).unwrap()
}

/// The pod directory of every driver and class, relative to the cgroup root.
fn pod_rel(driver: Driver, qos: Qos) -> String {
    match (driver, qos) {
        (Driver::Systemd, Qos::Guaranteed) => format!("kubepods.slice/kubepods-pod{UID_}.slice"),
        (Driver::Systemd, Qos::Burstable) => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice")
        }
        (Driver::Systemd, Qos::BestEffort) => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice")
        }
        (Driver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{UID}"),
        (Driver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{UID}"),
        (Driver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{UID}"),
    }
}

#[test]
fn pod_uids() {
    assert!(is_pod_uid(UID));
    assert!(is_pod_uid("3F2A6C1E-9B7D-4E21-8C55-0A1B2C3D4E5F"));
    for bad in [
        "",
        "3f2a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5",
        "3f2a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5f0",
        "3f2a6c1e_9b7d_4e21_8c55_0a1b2c3d4e5f",
        "3f2a6c1e-9b7d-4e21-8c55/0a1b2c3d4e5f",
        "../a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5f",
        "3f2a6c1eX9b7d-4e21-8c55-0a1b2c3d4e5f",
        "3f2a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5g",
        "ééééééééé-9b7d-4e21-8c55-0a1b2c3d4e",
    ] {
        assert!(!is_pod_uid(bad), "{bad:?}");
    }
}

#[test]
fn container_ids() {
    let c = ContainerId::parse(&format!("containerd://{SANDBOX}")).unwrap();
    assert_eq!(c.runtime, Runtime::Containerd);
    assert_eq!(c.id, SANDBOX);
    let c = ContainerId::parse("cri-o://ABCDEF0123").unwrap();
    assert_eq!(c.runtime, Runtime::Crio);
    assert_eq!(c.id, "abcdef0123");
    let c = ContainerId::parse("docker://0123").unwrap();
    assert_eq!(c.runtime, Runtime::Other("docker".into()));
    for bad in [
        "",
        "containerd://",
        "://abc",
        "abc",
        "containerd://../etc",
        "containerd://ab/cd",
        "containerd://xyz",
        "Containerd://abc",
        "con tainerd://abc",
        &format!("containerd://{}", "a".repeat(129)),
        &format!("{}://abc", "r".repeat(33)),
    ] {
        assert_eq!(ContainerId::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn container_dirs() {
    use ContainerDir::*;
    assert_eq!(
        container_dir(&format!("cri-containerd-{APP}.scope")),
        Container(APP)
    );
    assert_eq!(container_dir(&format!("crio-{APP}.scope")), Container(APP));
    assert_eq!(container_dir(&format!("crio-{APP}")), Container(APP));
    assert_eq!(container_dir(APP), Container(APP));
    assert_eq!(container_dir(&format!("crio-conmon-{APP}.scope")), Conmon);
    assert_eq!(container_dir(&format!("crio-conmon-{APP}")), Conmon);
    assert_eq!(container_dir("container"), Unknown);
    assert_eq!(container_dir("crio-conmon-"), Unknown);
}

#[test]
fn pod_parts() {
    let systemd = Some(PodPart {
        driver: Driver::Systemd,
        uid: UID.into(),
    });
    assert_eq!(pod_part(&format!("kubepods-pod{UID_}.slice")), systemd);
    assert_eq!(
        pod_part(&format!("kubepods-besteffort-pod{UID_}.slice")),
        systemd
    );
    assert_eq!(
        pod_part(&format!("kubelet-kubepods-burstable-pod{UID_}.slice")),
        systemd
    );
    assert_eq!(
        pod_part(&format!("pod{UID}")),
        Some(PodPart {
            driver: Driver::Cgroupfs,
            uid: UID.into()
        })
    );
    for bad in [
        format!("kubepods-pod{UID}.slice"),
        format!("pod{UID_}"),
        format!("kubepods-podx{UID_}.slice"),
        "kubepods.slice".into(),
        "pod".into(),
        format!("cri-containerd-{APP}.scope"),
    ] {
        assert_eq!(pod_part(&bad), None, "{bad:?}");
    }
}

#[test]
fn slice_expansion() {
    assert_eq!(
        expand_slice("a-b-c.slice").unwrap(),
        ["a.slice", "a-b.slice", "a-b-c.slice"]
    );
    assert_eq!(expand_slice("kubepods.slice").unwrap(), ["kubepods.slice"]);
    for bad in ["a--b.slice", "-a.slice", "a-.slice", ".slice", "a-b.scope"] {
        assert_eq!(expand_slice(bad), None, "{bad}");
    }
}

#[test]
fn finds_every_driver_and_class() {
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        for qos in Qos::ALL {
            let fake = Fake::new();
            let pod = fake.mkdir(&pod_rel(driver, qos));
            let got = fake.layout.resolve(UID, qos, &[]).unwrap();
            assert_eq!(got.cgroup, pod, "{driver} {qos}");
            assert_eq!(got.driver, driver);
            assert_eq!(got.netns, None, "no process yet");
        }
    }
}

#[test]
fn other_classes_are_probed_when_the_given_one_is_absent() {
    let fake = Fake::new();
    let pod = fake.mkdir(&pod_rel(Driver::Systemd, Qos::BestEffort));
    // Another pod in the class asked for does not match.
    fake.mkdir("kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice");
    let got = fake.layout.resolve(UID, Qos::Guaranteed, &[]).unwrap();
    assert_eq!(got.cgroup, pod);
}

#[test]
fn kind_cgroup_root_layout() {
    // kind runs kubelet with --cgroup-root=/kubelet.
    let fake = Fake::new();
    let pod = fake.mkdir(&format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
         kubelet-kubepods-besteffort-pod{UID_}.slice"
    ));
    let got = fake.layout.resolve(UID, Qos::BestEffort, &[]).unwrap();
    assert_eq!((got.cgroup, got.driver), (pod, Driver::Systemd));

    let fake = Fake::new();
    let pod = fake.mkdir(&format!("kubelet/kubepods/burstable/pod{UID}"));
    let got = fake.layout.resolve(UID, Qos::Burstable, &[]).unwrap();
    assert_eq!((got.cgroup, got.driver), (pod, Driver::Cgroupfs));
}

#[test]
fn missing_pod_says_what_to_check() {
    let fake = Fake::new();
    fake.mkdir("kubepods.slice");
    let err = fake.layout.resolve(UID, Qos::Burstable, &[]).unwrap_err();
    assert!(matches!(err, Error::PodNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(UID) && msg.contains("--cgroup-root"), "{msg}");
}

#[test]
fn invalid_inputs_are_refused_before_any_path_is_built() {
    let fake = Fake::new();
    let err = fake
        .layout
        .resolve("../../etc", Qos::Burstable, &[])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPodUid(_)), "{err}");
    let bad = ContainerId {
        runtime: Runtime::Containerd,
        id: "../x".into(),
    };
    let err = fake
        .layout
        .resolve(UID, Qos::Burstable, &[bad])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidContainerId(_)), "{err}");
    let long = "x".repeat(10_000);
    let msg = fake
        .layout
        .resolve(&long, Qos::Burstable, &[])
        .unwrap_err()
        .to_string();
    assert!(msg.len() < 400, "the message repeats a bounded part: {msg}");
}

#[test]
fn sandbox_process_is_preferred() {
    let fake = Fake::new();
    let pod = fake.mkdir(&pod_rel(Driver::Systemd, Qos::Burstable));
    let app = fake.mkdir(&format!(
        "{}/cri-containerd-{APP}.scope",
        pod_rel(Driver::Systemd, Qos::Burstable)
    ));
    let sandbox = fake.mkdir(&format!(
        "{}/cri-containerd-{SANDBOX}.scope",
        pod_rel(Driver::Systemd, Qos::Burstable)
    ));
    fake.procs(&app, &[100]);
    fake.procs(&sandbox, &[200]);
    fake.foreign_process(100);
    let want = fake.foreign_process(200);
    let got = fake
        .layout
        .resolve(UID, Qos::Burstable, &[containerd(APP)])
        .unwrap();
    assert_eq!(got.cgroup, pod);
    assert_eq!(got.netns, Some(want));
}

#[test]
fn app_process_when_the_sandbox_has_none() {
    let fake = Fake::new();
    let rel = pod_rel(Driver::Cgroupfs, Qos::Guaranteed);
    let app = fake.mkdir(&format!("{rel}/{APP}"));
    let sandbox = fake.mkdir(&format!("{rel}/{SANDBOX}"));
    fake.procs(&sandbox, &[]);
    fake.procs(&app, &[300, 301]);
    // 300 exited: no proc entry.
    let want = fake.foreign_process(301);
    let got = fake
        .layout
        .resolve(UID, Qos::Guaranteed, &[containerd(APP)])
        .unwrap();
    assert_eq!(got.netns, Some(want));
}

#[test]
fn conmon_and_own_namespace_are_skipped() {
    let fake = Fake::new();
    let rel = pod_rel(Driver::Systemd, Qos::BestEffort);
    let conmon = fake.mkdir(&format!("{rel}/crio-conmon-{APP}.scope"));
    let app = fake.mkdir(&format!("{rel}/crio-{APP}.scope"));
    // runc's nested cgroup below the container's scope.
    let nested = fake.mkdir(&format!("{rel}/crio-{APP}.scope/container"));
    // conmon would be taken though its namespace differs, were it not skipped by name.
    fake.procs(&conmon, &[400]);
    fake.foreign_process(400);
    fake.procs(&app, &[401]);
    fake.own_process(401);
    fake.procs(&nested, &[402]);
    let want = fake.foreign_process(402);
    let got = fake
        .layout
        .resolve(
            UID,
            Qos::BestEffort,
            &[ContainerId::parse(&format!("cri-o://{APP}")).unwrap()],
        )
        .unwrap();
    assert_eq!(got.netns, Some(want));
}

#[test]
fn only_own_namespace_means_none() {
    let fake = Fake::new();
    let rel = pod_rel(Driver::Cgroupfs, Qos::Burstable);
    let ctr = fake.mkdir(&format!("{rel}/crio-{APP}"));
    fake.procs(&ctr, &[500]);
    fake.own_process(500);
    let got = fake.layout.resolve(UID, Qos::Burstable, &[]).unwrap();
    assert_eq!(got.netns, None);
}

#[test]
fn walk_is_bounded_in_depth() {
    let fake = Fake::new();
    let rel = pod_rel(Driver::Cgroupfs, Qos::Burstable);
    let deep = fake.mkdir(&format!("{rel}/{APP}/a/b/c/d"));
    fake.procs(&deep, &[600]);
    fake.foreign_process(600);
    let got = fake.layout.resolve(UID, Qos::Burstable, &[]).unwrap();
    assert_eq!(got.netns, None, "depth 5 is beyond the walk");
    let shallower = deep.parent().unwrap();
    fake.procs(shallower, &[600]);
    let got = fake.layout.resolve(UID, Qos::Burstable, &[]).unwrap();
    assert!(got.netns.is_some(), "depth 4 is within it");
}

#[test]
fn pod_cgroup_of_pid_absolute_paths() {
    let fake = Fake::new();
    let rel = pod_rel(Driver::Systemd, Qos::Burstable);
    let pod = fake.mkdir(&format!("{rel}/cri-containerd-{APP}.scope"));
    let pod = pod.parent().unwrap().to_path_buf();
    fake.cgroup_file(
        1,
        &format!("12:pids:/whatever\n0::/{rel}/cri-containerd-{APP}.scope\n"),
    );
    assert_eq!(fake.layout.pod_cgroup_of_pid(1).unwrap(), Some(pod));

    let rel = pod_rel(Driver::Cgroupfs, Qos::BestEffort);
    let pod = fake.mkdir(&rel);
    fake.cgroup_file(2, &format!("0::/{rel}/{APP}\n"));
    assert_eq!(fake.layout.pod_cgroup_of_pid(2).unwrap(), Some(pod));

    fake.cgroup_file(3, "0::/system.slice/sshd.service\n");
    assert_eq!(fake.layout.pod_cgroup_of_pid(3).unwrap(), None);
}

#[test]
fn pod_cgroup_of_pid_in_a_cgroup_namespace() {
    let fake = Fake::new();
    // The agent's cgroup namespace is rooted at its own container's cgroup.
    let rel = pod_rel(Driver::Systemd, Qos::BestEffort);
    let pod = fake.mkdir(&rel);
    fake.cgroup_file(
        1,
        &format!("0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{APP}.scope\n"),
    );
    assert_eq!(fake.layout.pod_cgroup_of_pid(1).unwrap(), Some(pod.clone()));
    // Same QoS class as the agent: only the pod's part is left.
    fake.cgroup_file(
        2,
        &format!("0::/../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{APP}.scope\n"),
    );
    assert_eq!(fake.layout.pod_cgroup_of_pid(2).unwrap(), Some(pod));

    let rel = pod_rel(Driver::Cgroupfs, Qos::Burstable);
    let fake = Fake::new();
    let pod = fake.mkdir(&rel);
    fake.cgroup_file(3, &format!("0::/../../../burstable/pod{UID}/{APP}\n"));
    assert_eq!(fake.layout.pod_cgroup_of_pid(3).unwrap(), Some(pod.clone()));
    fake.cgroup_file(4, &format!("0::/../../kubepods/burstable/pod{UID}/{APP}\n"));
    assert_eq!(fake.layout.pod_cgroup_of_pid(4).unwrap(), Some(pod));
    // A pod this root does not have.
    fake.cgroup_file(5, "0::/../pod11111111-2222-3333-4444-555555555555/x\n");
    let err = fake.layout.pod_cgroup_of_pid(5).unwrap_err();
    assert!(matches!(err, Error::PodNotFound { .. }), "{err}");
}

#[test]
fn pod_cgroup_of_pid_errors() {
    let fake = Fake::new();
    let err = fake.layout.pod_cgroup_of_pid(77).unwrap_err();
    assert!(matches!(err, Error::NoSuchProcess { pid: 77, .. }), "{err}");
    assert!(err.to_string().contains("--proc-root"), "{err}");
    fake.cgroup_file(78, "12:pids:/kubepods/pod\n");
    let err = fake.layout.pod_cgroup_of_pid(78).unwrap_err();
    assert!(matches!(err, Error::NoUnifiedCgroup { .. }), "{err}");
}

#[test]
fn own_process_is_not_in_a_pod() {
    // The real /proc: the test runs in no pod's cgroup (or, in CI inside Kubernetes, in one
    // that a root of its own does not show).
    let layout = Layout {
        cgroup_root: tempfile::tempdir().unwrap().path().to_path_buf(),
        proc_root: PathBuf::from("/proc"),
    };
    match layout.pod_cgroup_of_pid(std::process::id()) {
        Ok(None) | Err(Error::PodNotFound { .. }) | Err(Error::NoUnifiedCgroup { .. }) => {}
        other => panic!("unexpected: {other:?}"),
    }
}

/// Whether `path` is below `root` with no `..` on the way.
fn stays_below(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
        && path
            .strip_prefix(root)
            .is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
}

/// UID-like strings: the alphabet of UIDs, path separators and dots.
fn uid_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-f_./-]{30,40}",
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f./]{4}-[0-9a-f]{12}",
    ]
}

proptest! {
    #[test]
    fn arbitrary_uids_never_escape(uid in uid_like(), qos in 0usize..3) {
        let fake = Fake::new();
        fake.mkdir("kubepods.slice/kubepods-burstable.slice");
        fake.mkdir("kubepods/besteffort");
        match fake.layout.resolve(&uid, Qos::ALL[qos], &[]) {
            Ok(r) => prop_assert!(stays_below(&r.cgroup, &fake.layout.cgroup_root)),
            Err(Error::InvalidPodUid(_) | Error::PodNotFound { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn arbitrary_container_ids_parse_to_hex(s in prop_oneof![any::<String>(), "[a-z-]{0,12}://[0-9a-fA-F./]{0,70}"]) {
        if let Some(c) = ContainerId::parse(&s) {
            prop_assert!(is_container_id(&c.id));
            prop_assert!(!c.id.contains('/'));
        }
    }

    #[test]
    fn arbitrary_cgroup_files_never_escape(
        path in prop_oneof![
            any::<String>(),
            "(/(\\.\\.|kubepods|kubepods\\.slice|burstable|pod3f2a6c1e-9b7d-4e21-8c55-0a1b2c3d4e5f|kubepods-pod3f2a6c1e_9b7d_4e21_8c55_0a1b2c3d4e5f\\.slice|[a-z.-]{1,8})){0,8}",
        ],
    ) {
        let fake = Fake::new();
        fake.mkdir(&pod_rel(Driver::Systemd, Qos::Guaranteed));
        fake.mkdir(&pod_rel(Driver::Cgroupfs, Qos::Burstable));
        fake.cgroup_file(9, &format!("0::{path}\n"));
        match fake.layout.pod_cgroup_of_pid(9) {
            Ok(Some(p)) => prop_assert!(stays_below(&p, &fake.layout.cgroup_root), "{}", p.display()),
            Ok(None) | Err(Error::PodNotFound { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
