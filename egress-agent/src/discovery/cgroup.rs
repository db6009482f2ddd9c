//! Where a pod lives on a cgroup v2 node: its pod-level cgroup directory, as kubelet lays it
//! out, and its network namespace, found through a process in that cgroup.
//!
//! The layouts, as checked against the sources:
//! - kubelet (`pkg/kubelet/cm/cgroup_manager_linux.go`, `pod_container_manager_linux.go`,
//!   `qos_container_manager_linux.go`) names a pod's cgroup `{kubepods, [burstable|besteffort],
//!   pod<uid>}` below its `--cgroup-root` (kind uses `/kubelet`). Guaranteed pods sit directly
//!   below `kubepods`. The cgroupfs driver joins the parts with `/`
//!   (`kubepods/burstable/pod<uid>`); the systemd driver replaces `-` by `_` in each part, joins
//!   them with `-` into one slice name and expands it the systemd way (`ToSystemd`,
//!   `ExpandSlice`): `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`.
//! - containerd (`getCgroupsPath` in its CRI plugin) asks runc for `<slice>:cri-containerd:<id>`
//!   (a `cri-containerd-<id>.scope` below the pod slice) under systemd, `<pod dir>/<id>` under
//!   cgroupfs; the sandbox (pause) container is one of these too.
//! - CRI-O (`internal/config/cgmgr`) uses `crio-<id>.scope` (systemd) or `crio-<id>` (cgroupfs)
//!   and puts each container's monitor, conmon, beside it in `crio-conmon-<id>[.scope]`. Conmon
//!   runs in the node's network namespace, so it is never taken as the pod's process.
use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

/// Directories visited below a pod's cgroup when looking for a process: a pod has a handful.
const MAX_WALK_DIRS: usize = 256;
/// How deep below the pod's cgroup the walk goes (container, and runc's nested cgroups).
const MAX_WALK_DEPTH: usize = 4;
/// Processes whose network namespace is looked at, over the whole walk.
const MAX_PIDS_CHECKED: usize = 256;
/// Bytes read of one `cgroup.procs` or `/proc/<pid>/cgroup`.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Entries of the cgroup root looked at for a kubelet `--cgroup-root` (e.g. kind's `kubelet.slice`).
const MAX_ROOT_ENTRIES: usize = 512;
/// Longest container ID accepted (containerd and CRI-O use 64 hex digits).
const MAX_CONTAINER_ID_LEN: usize = 128;
/// Longest runtime name accepted in a `<runtime>://<id>` container ID.
const MAX_RUNTIME_LEN: usize = 32;
/// Characters of a rejected input repeated in an error message.
const SHOWN_CHARS: usize = 80;

/// A pod's QoS class (`status.qosClass`): which kubelet cgroup the pod's cgroup is below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Directly below `kubepods`.
    Guaranteed,
    /// Below `kubepods/burstable`.
    Burstable,
    /// Below `kubepods/besteffort`.
    BestEffort,
}

impl Qos {
    /// Every class, in the order they are probed when the given one does not match.
    pub const ALL: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];

    /// The class from `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`).
    pub fn parse(s: &str) -> Option<Qos> {
        match s {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    /// The name as in `status.qosClass`.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }

    /// kubelet's cgroup name part for the class (`strings.ToLower` of it); none for Guaranteed.
    fn part(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

impl std::fmt::Display for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// kubelet's cgroup driver (`cgroupDriver` in its configuration), told apart by the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/<qos>/pod<uid>`.
    Cgroupfs,
}

impl Driver {
    /// The name as in kubelet's configuration: `systemd` or `cgroupfs`.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Systemd => "systemd",
            Driver::Cgroupfs => "cgroupfs",
        }
    }
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The container runtime named by a pod status's `containerID`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `containerd://<id>`.
    Containerd,
    /// `cri-o://<id>`.
    Crio,
    /// Any other `<runtime>://<id>` (e.g. `docker`); its containers are still told apart by id.
    Other(String),
}

/// A container of a pod, from `status.containerStatuses[].containerID`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerId {
    /// The runtime that runs it.
    pub runtime: Runtime,
    /// The runtime's id: hex digits, lowercase.
    pub id: String,
}

impl ContainerId {
    /// Parses `<runtime>://<hex id>` (`containerd://<64 hex>`, `cri-o://<64 hex>`); `None` for
    /// anything else, including an empty `containerID` (container not created yet).
    pub fn parse(s: &str) -> Option<Self> {
        let (runtime, id) = s.split_once("://")?;
        if runtime.is_empty()
            || runtime.len() > MAX_RUNTIME_LEN
            || !runtime
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
            || !is_container_id(id)
        {
            return None;
        }
        let runtime = match runtime {
            "containerd" => Runtime::Containerd,
            "cri-o" | "crio" => Runtime::Crio,
            other => Runtime::Other(other.to_string()),
        };
        Some(ContainerId {
            runtime,
            id: id.to_ascii_lowercase(),
        })
    }
}

/// Where the node's cgroup2 hierarchy and its processes are seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The host's cgroup2 mount (`--cgroup-root`, `/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The host's procfs (`--proc-root`, `/proc`; the agent runs with hostPID).
    pub proc_root: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// What [`Layout::resolve`] found for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The pod-level cgroup directory: the actor is registered on it, so every container of the
    /// pod, including ones started later, is captured.
    pub cgroup: PathBuf,
    /// The driver whose layout it was found in.
    pub driver: Driver,
    /// `<proc_root>/<pid>/ns/net` of a process of the pod in a namespace other than the
    /// agent's; `None` while the pod has no such process yet (the caller tries again).
    pub netns: Option<PathBuf>,
}

/// Errors finding a pod's cgroup or namespace; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod UID is not of the form kubelet builds paths from.
    #[error(
        "pod UID {0:?} is not a Kubernetes UID (36 characters: hex digits and dashes, \
         8-4-4-4-12): pass the pod's metadata.uid unchanged"
    )]
    InvalidPodUid(String),
    /// A container ID is not a runtime's hex id.
    #[error(
        "container ID {0:?} is not a runtime container ID (1 to 128 hex digits): pass the id \
         part of the pod status's containerID (\"containerd://<id>\"), see ContainerId::parse"
    )]
    InvalidContainerId(String),
    /// No kubelet layout under the cgroup root has the pod.
    #[error(
        "no cgroup for pod {uid} under {root}: is --cgroup-root the host's cgroup2 mount? \
         kubelet's cgroup driver (systemd: kubepods.slice/..., cgroupfs: kubepods/...) needs \
         --cgroups-per-qos (the default); or the pod has not started on this node yet, or is gone"
    )]
    PodNotFound {
        /// The pod's UID.
        uid: String,
        /// The cgroup root searched.
        root: PathBuf,
    },
    /// `<proc_root>/<pid>` does not exist.
    #[error(
        "no process {pid} under {proc_root}: it has exited, or --proc-root is not the host's \
         /proc (the agent needs hostPID)"
    )]
    NoSuchProcess {
        /// The process asked about.
        pid: u32,
        /// The procfs looked in.
        proc_root: PathBuf,
    },
    /// A file below the proc root could not be read.
    #[error("read {path}: {source}: is --proc-root the host's /proc, and the agent root?")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The process has no cgroup v2 membership line.
    #[error(
        "{path} has no cgroup v2 line (\"0::/...\"): the node runs cgroup v1 only, which pod \
         discovery does not support (boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoUnifiedCgroup {
        /// The `cgroup` file read.
        path: PathBuf,
    },
    /// The agent's own network namespace could not be looked at.
    #[error("the agent's own network namespace: {0}: is /proc mounted?")]
    OwnNetns(io::Error),
}

impl Layout {
    /// The pod-level cgroup directory (kubelet's layout, either driver, found by probing),
    /// and the pod's network namespace (`<proc_root>/<pid>/ns/net` of a process in it).
    ///
    /// `qos` is probed first; the other classes after it, since a status read before kubelet
    /// set `qosClass` may have been guessed. `containers` are the pod's app containers: a
    /// process of the sandbox (the pause container, the one container not listed) is
    /// preferred, as it lives as long as the pod's network namespace.
    ///
    /// Blocking (bounded file system reads): from async code, call it in `spawn_blocking`.
    pub fn resolve(
        &self,
        pod_uid: &str,
        qos: Qos,
        containers: &[ContainerId],
    ) -> Result<Resolved, Error> {
        check_pod_uid(pod_uid)?;
        for c in containers {
            if !is_container_id(&c.id) {
                return Err(Error::InvalidContainerId(shown(&c.id)));
            }
        }
        let (cgroup, driver) =
            self.find_pod_dir(pod_uid, Some(qos))
                .ok_or_else(|| Error::PodNotFound {
                    uid: pod_uid.to_string(),
                    root: self.cgroup_root.clone(),
                })?;
        let netns = self.pod_netns(&cgroup, containers)?;
        Ok(Resolved {
            cgroup,
            driver,
            netns,
        })
    }

    /// The pod-level cgroup of a process (from `<proc_root>/<pid>/cgroup`).
    ///
    /// `Ok(None)` when the process is not in a pod. The agent may run in a cgroup namespace of
    /// its own, where other pods' paths read `/../../kubepods-besteffort.slice/...`: such a path
    /// is mapped back below the cgroup root through the pod's part of it (the systemd slice
    /// name spells out its ancestors; a cgroupfs `pod<uid>` is probed for). Blocking, like
    /// [`Layout::resolve`].
    pub fn pod_cgroup_of_pid(&self, pid: u32) -> Result<Option<PathBuf>, Error> {
        let dir = self.proc_root.join(pid.to_string());
        let path = dir.join("cgroup");
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoSuchProcess {
                    pid,
                    proc_root: self.proc_root.clone(),
                });
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        let cgroup = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or(Error::NoUnifiedCgroup { path })?;
        self.pod_dir_of_cgroup_path(cgroup)
    }

    /// The pod directory for a cgroup path as `/proc/<pid>/cgroup` shows it.
    fn pod_dir_of_cgroup_path(&self, cgroup: &str) -> Result<Option<PathBuf>, Error> {
        let parts: Vec<&str> = cgroup
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        let Some((i, pod)) = parts
            .iter()
            .enumerate()
            .find_map(|(i, p)| pod_part(p).map(|pod| (i, pod)))
        else {
            return Ok(None);
        };
        let under_root = |parts: &[&str]| -> Option<PathBuf> {
            if parts.contains(&"..") {
                return None;
            }
            let path = parts
                .iter()
                .fold(self.cgroup_root.clone(), |p, part| p.join(part));
            is_dir(&path).then_some(path)
        };
        // As written: the agent sees the whole hierarchy.
        if let Some(path) = under_root(&parts[..=i]) {
            return Ok(Some(path));
        }
        // From the kubepods part on: the agent's view starts elsewhere.
        let from_kubepods = match pod.driver {
            Driver::Systemd => expand_slice(parts[i]).and_then(|p| {
                let expanded: Vec<&str> = p.iter().map(String::as_str).collect();
                under_root(&expanded)
            }),
            Driver::Cgroupfs => parts[..i]
                .iter()
                .rposition(|p| *p == "kubepods")
                .and_then(|k| under_root(&parts[k..=i])),
        };
        if let Some(path) = from_kubepods {
            return Ok(Some(path));
        }
        // Only the pod's own part is left to go by (a cgroup namespace below kubepods).
        match self.find_pod_dir(&pod.uid, None) {
            Some((path, _)) => Ok(Some(path)),
            None => Err(Error::PodNotFound {
                uid: pod.uid,
                root: self.cgroup_root.clone(),
            }),
        }
    }

    /// The first existing pod directory, trying `qos` (if any) first, then every class, in each
    /// kubelet layout present under the cgroup root. `uid` is already checked.
    fn find_pod_dir(&self, uid: &str, qos: Option<Qos>) -> Option<(PathBuf, Driver)> {
        let bases = self.bases();
        let classes = qos
            .into_iter()
            .chain(Qos::ALL.into_iter().filter(|c| Some(*c) != qos));
        for class in classes {
            for base in &bases {
                let dir = base.pod_dir(uid, class);
                if is_dir(&dir) {
                    return Some((dir, base.driver));
                }
            }
        }
        None
    }

    /// kubelet's `kubepods` cgroups under the root: at the top, or below one top-level cgroup
    /// for a kubelet `--cgroup-root` (kind's `/kubelet`: `kubelet.slice/kubelet-kubepods.slice`).
    fn bases(&self) -> Vec<Base> {
        let root = &self.cgroup_root;
        let mut bases = Vec::new();
        let top = root.join("kubepods.slice");
        if is_dir(&top) {
            bases.push(Base::systemd(top, "kubepods".to_string()));
        }
        let top = root.join("kubepods");
        if is_dir(&top) {
            bases.push(Base::cgroupfs(top));
        }
        let Ok(entries) = fs::read_dir(root) else {
            return bases;
        };
        for entry in entries.take(MAX_ROOT_ENTRIES).flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if let Some(stem) = name.strip_suffix(".slice") {
                if stem == "kubepods" {
                    continue;
                }
                let stem = format!("{stem}-kubepods");
                let dir = entry.path().join(format!("{stem}.slice"));
                if is_dir(&dir) {
                    bases.push(Base::systemd(dir, stem));
                }
            } else if name != "kubepods" {
                let dir = entry.path().join("kubepods");
                if is_dir(&dir) {
                    bases.push(Base::cgroupfs(dir));
                }
            }
        }
        bases
    }

    /// Whether the network namespace file `netns` is the namespace of some process in the
    /// pod's cgroup tree `pod_dir` (bounded walk, like [`Layout::resolve`]'s). A pod's
    /// annotation naming a namespace is trusted only when it is: otherwise any pod could
    /// point the agent at another pod's namespace.
    pub fn netns_in_pod(&self, pod_dir: &Path, netns: &Path) -> Result<bool, Error> {
        let wanted = crate::netns::identity(Some(netns)).map_err(|source| Error::Read {
            path: netns.to_path_buf(),
            source,
        })?;
        // Never the agent's own (the node's): CRI-O's conmon, in the pod's cgroup, lives there.
        if wanted == crate::netns::identity(None).map_err(Error::OwnNetns)? {
            return Ok(false);
        }
        Ok(self
            .pod_namespaces(pod_dir, &[])
            .any(|ns| crate::netns::identity(Some(&ns)).is_ok_and(|id| id == wanted)))
    }

    /// A network namespace of the pod other than the agent's own, through its processes:
    /// the sandbox's first, then the app containers', then any other.
    fn pod_netns(
        &self,
        pod_dir: &Path,
        containers: &[ContainerId],
    ) -> Result<Option<PathBuf>, Error> {
        let own = crate::netns::identity(None).map_err(Error::OwnNetns)?;
        // A process gone meanwhile is skipped like one in the agent's namespace.
        Ok(self
            .pod_namespaces(pod_dir, containers)
            .find(|ns| crate::netns::identity(Some(ns)).is_ok_and(|id| id != own)))
    }

    /// `<proc_root>/<pid>/ns/net` of the processes in the pod's cgroup tree: the sandbox's
    /// first, then the app containers', then any other; CRI-O's conmon directories skipped.
    /// Bounded: [`MAX_WALK_DEPTH`] levels, [`MAX_WALK_DIRS`] directories, [`MAX_PIDS_CHECKED`]
    /// processes.
    fn pod_namespaces<'a>(
        &'a self,
        pod_dir: &Path,
        containers: &[ContainerId],
    ) -> impl Iterator<Item = PathBuf> + 'a {
        let listed: HashSet<String> = containers
            .iter()
            .map(|c| c.id.to_ascii_lowercase())
            .collect();
        let (mut sandbox, mut app, mut other) = (Vec::new(), Vec::new(), Vec::new());
        let mut queue = VecDeque::from([(pod_dir.to_path_buf(), 0, Role::Other)]);
        let mut seen = 1;
        while let Some((dir, depth, role)) = queue.pop_front() {
            if depth < MAX_WALK_DEPTH
                && let Ok(entries) = fs::read_dir(&dir)
            {
                for entry in entries.flatten() {
                    if seen >= MAX_WALK_DIRS {
                        break;
                    }
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let role = if depth > 0 {
                        role
                    } else {
                        match entry.file_name().to_str().map(container_dir) {
                            Some(ContainerDir::Conmon) => continue,
                            Some(ContainerDir::Container(id))
                                if listed.contains(&id.to_ascii_lowercase()) =>
                            {
                                Role::App
                            }
                            Some(ContainerDir::Container(_)) => Role::Sandbox,
                            Some(ContainerDir::Unknown) | None => Role::Other,
                        }
                    };
                    seen += 1;
                    queue.push_back((entry.path(), depth + 1, role));
                }
            }
            match role {
                Role::Sandbox => sandbox.push(dir),
                Role::App => app.push(dir),
                Role::Other => other.push(dir),
            }
        }
        sandbox
            .into_iter()
            .chain(app)
            .chain(other)
            .flat_map(|dir| procs(&dir))
            .take(MAX_PIDS_CHECKED)
            .map(|pid| self.proc_root.join(pid.to_string()).join("ns").join("net"))
    }
}

/// A kubelet `kubepods` cgroup and the driver that named it.
#[derive(Debug)]
struct Base {
    driver: Driver,
    dir: PathBuf,
    /// The systemd slice name without `.slice` (`kubepods`, `kubelet-kubepods`).
    stem: String,
}

impl Base {
    fn systemd(dir: PathBuf, stem: String) -> Base {
        Base {
            driver: Driver::Systemd,
            dir,
            stem,
        }
    }

    fn cgroupfs(dir: PathBuf) -> Base {
        Base {
            driver: Driver::Cgroupfs,
            dir,
            stem: String::new(),
        }
    }

    /// The pod's directory in this layout; `uid` is checked (hex and dashes only).
    fn pod_dir(&self, uid: &str, qos: Qos) -> PathBuf {
        match (self.driver, qos.part()) {
            (Driver::Systemd, part) => {
                let uid = uid.replace('-', "_");
                let stem = &self.stem;
                match part {
                    None => self.dir.join(format!("{stem}-pod{uid}.slice")),
                    Some(q) => self
                        .dir
                        .join(format!("{stem}-{q}.slice"))
                        .join(format!("{stem}-{q}-pod{uid}.slice")),
                }
            }
            (Driver::Cgroupfs, None) => self.dir.join(format!("pod{uid}")),
            (Driver::Cgroupfs, Some(q)) => self.dir.join(q).join(format!("pod{uid}")),
        }
    }
}

/// Which of a pod's containers a directory below its cgroup belongs to.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// A container not among the pod's app containers: the sandbox (pause).
    Sandbox,
    /// One of the pod's app containers.
    App,
    /// The pod directory itself, or a child no runtime names.
    Other,
}

/// A child directory of a pod's cgroup, by its name.
#[derive(Debug, PartialEq, Eq)]
enum ContainerDir<'a> {
    /// CRI-O's `crio-conmon-<id>[.scope]`: the monitor, in the node's namespaces.
    Conmon,
    /// A container's cgroup, with its id.
    Container(&'a str),
    /// Anything else.
    Unknown,
}

/// Names the child `name` of a pod's cgroup: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `crio-conmon-<id>.scope`, `docker-<id>.scope` (systemd), `<id>`, `crio-<id>`,
/// `crio-conmon-<id>` (cgroupfs).
fn container_dir(name: &str) -> ContainerDir<'_> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    if name
        .strip_prefix("crio-conmon-")
        .is_some_and(is_container_id)
    {
        return ContainerDir::Conmon;
    }
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    if is_container_id(id) {
        ContainerDir::Container(id)
    } else {
        ContainerDir::Unknown
    }
}

/// A pod's part of a cgroup path: its driver and UID (with dashes).
#[derive(Debug, PartialEq, Eq)]
struct PodPart {
    driver: Driver,
    uid: String,
}

/// Recognises `pod<uid>` (cgroupfs) and `[<prefix>-]pod<uid with _>.slice` (systemd).
fn pod_part(part: &str) -> Option<PodPart> {
    if let Some(stem) = part.strip_suffix(".slice") {
        let last = stem.rsplit_once('-').map_or(stem, |(_, last)| last);
        let escaped = last.strip_prefix("pod")?;
        // systemd's escaping maps every '-' of the UID to '_'; a '-' here split the name.
        if escaped.contains('-') {
            return None;
        }
        let uid = escaped.replace('_', "-");
        return is_pod_uid(&uid).then_some(PodPart {
            driver: Driver::Systemd,
            uid,
        });
    }
    let uid = part.strip_prefix("pod")?;
    is_pod_uid(uid).then(|| PodPart {
        driver: Driver::Cgroupfs,
        uid: uid.to_string(),
    })
}

/// systemd's expansion of a slice name into its path (`a-b.slice` → `a.slice/a-b.slice`);
/// `None` for a name systemd would reject.
fn expand_slice(name: &str) -> Option<Vec<String>> {
    let stem = name.strip_suffix(".slice")?;
    if stem.is_empty()
        || stem.starts_with('-')
        || stem.ends_with('-')
        || stem.contains("--")
        || stem.contains('/')
        || stem == ".."
    {
        return None;
    }
    Some(
        stem.match_indices('-')
            .map(|(i, _)| format!("{}.slice", &stem[..i]))
            .chain(std::iter::once(name.to_string()))
            .collect(),
    )
}

/// Whether `uid` is a UID kubelet would build a path from: 8-4-4-4-12 hex digits.
fn is_pod_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn check_pod_uid(uid: &str) -> Result<(), Error> {
    if is_pod_uid(uid) {
        Ok(())
    } else {
        Err(Error::InvalidPodUid(shown(uid)))
    }
}

/// Whether `id` is a runtime's container id: 1 to 128 hex digits.
fn is_container_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CONTAINER_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// At most [`SHOWN_CHARS`] characters of a rejected input, for an error message.
fn shown(s: &str) -> String {
    s.chars().take(SHOWN_CHARS).collect()
}

/// Whether `path` is a directory, not following a symbolic link.
fn is_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// At most [`MAX_FILE_BYTES`] of the file at `path`.
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The processes in the cgroup `dir` (not its children); none if it cannot be read (gone).
fn procs(dir: &Path) -> Vec<u32> {
    read_bounded(&dir.join("cgroup.procs"))
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
