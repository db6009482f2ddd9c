//! PLACEHOLDER: replaced by branch cgroups. A minimal resolution of a pod to its cgroup v2
//! directory and network namespace: kubelet's cgroupfs driver only (`kubepods/pod<uid>`,
//! `kubepods/burstable/pod<uid>`, `kubepods/besteffort/pod<uid>`), the network namespace from
//! the first process found in the pod's directory or below it.
use std::{
    fs,
    path::{Path, PathBuf},
};

use super::Error;

/// Most directories walked below a pod's cgroup when looking for a process.
const MAX_WALK: usize = 256;

/// A pod's QoS class (`status.qosClass`): where kubelet puts its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    /// Requests equal limits for every container: directly under `kubepods`.
    Guaranteed,
    /// Some requests or limits: under `kubepods/burstable`.
    Burstable,
    /// No requests or limits: under `kubepods/besteffort`.
    BestEffort,
}

/// Kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`.
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// The container runtime named by a container ID's scheme.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `containerd://`.
    Containerd,
    /// `cri-o://`.
    Crio,
    /// Any other scheme.
    Other(String),
}

/// A container's ID as `status.containerStatuses[].containerID` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerId {
    /// The runtime (the scheme).
    pub runtime: Runtime,
    /// The ID (64 hex digits for containerd and CRI-O).
    pub id: String,
}

impl ContainerId {
    /// Parses `containerd://<64 hex>` or `cri-o://<64 hex>` (other schemes: any
    /// alphanumeric ID); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (scheme, id) = s.split_once("://")?;
        let runtime = match scheme {
            "containerd" => Runtime::Containerd,
            "cri-o" => Runtime::Crio,
            "" => return None,
            other => Runtime::Other(other.into()),
        };
        let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let plain =
            !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric());
        match runtime {
            Runtime::Containerd | Runtime::Crio if !hex => None,
            Runtime::Other(_) if !plain => None,
            _ => Some(ContainerId {
                runtime,
                id: id.into(),
            }),
        }
    }
}

/// Where the node's cgroup hierarchy and proc are mounted (in the agent's container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup v2 mount (`--cgroup-root`).
    pub cgroup_root: PathBuf,
    /// The host's proc (`--proc-root`).
    pub proc_root: PathBuf,
}

/// A pod's cgroup and network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The pod-level cgroup directory.
    pub cgroup: PathBuf,
    /// The driver whose layout it was found in.
    pub driver: Driver,
    /// `<proc_root>/<pid>/ns/net` of a process of the pod; `None` while it has none.
    pub netns: Option<PathBuf>,
}

impl Layout {
    /// The pod-level cgroup directory (kubelet's layout, either driver, found by probing),
    /// and the pod's network namespace (`<proc_root>/<pid>/ns/net` of a process in it).
    pub fn resolve(
        &self,
        pod_uid: &str,
        qos: Qos,
        _containers: &[ContainerId],
    ) -> Result<Resolved, Error> {
        if pod_uid.is_empty()
            || pod_uid.len() > 64
            || !pod_uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            return Err(Error::PodUid(pod_uid.into()));
        }
        let kubepods = self.cgroup_root.join("kubepods");
        let parent = match qos {
            Qos::Guaranteed => kubepods,
            Qos::Burstable => kubepods.join("burstable"),
            Qos::BestEffort => kubepods.join("besteffort"),
        };
        let cgroup = parent.join(format!("pod{pod_uid}"));
        if !cgroup.is_dir() {
            return Err(Error::NoPodCgroup {
                uid: pod_uid.into(),
                tried: vec![cgroup],
            });
        }
        let netns =
            first_pid(&cgroup)?.map(|pid| self.proc_root.join(pid.to_string()).join("ns/net"));
        Ok(Resolved {
            cgroup,
            driver: Driver::Cgroupfs,
            netns,
        })
    }

    /// The pod-level cgroup of a process (from `<proc_root>/<pid>/cgroup`).
    pub fn pod_cgroup_of_pid(&self, pid: u32) -> Result<Option<PathBuf>, Error> {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = fs::read_to_string(&path).map_err(|source| Error::Io { path, source })?;
        let Some(relative) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            return Ok(None);
        };
        let mut pod = None;
        let mut dir = PathBuf::new();
        for part in Path::new(relative.trim_start_matches('/')).components() {
            dir.push(part);
            if part.as_os_str().to_string_lossy().starts_with("pod") {
                pod = Some(self.cgroup_root.join(&dir));
                break;
            }
        }
        Ok(pod)
    }
}

/// The first process in `dir`'s `cgroup.procs` or a descendant's (breadth first, bounded).
fn first_pid(dir: &Path) -> Result<Option<u32>, Error> {
    let mut queue = std::collections::VecDeque::from([dir.to_path_buf()]);
    let mut walked = 0;
    while let Some(dir) = queue.pop_front() {
        walked += 1;
        if walked > MAX_WALK {
            break;
        }
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => {
                if let Some(pid) = text.lines().find_map(|l| l.trim().parse().ok()) {
                    return Ok(Some(pid));
                }
            }
            // The directory went away between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::Io {
                    path: procs,
                    source,
                });
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_parse() {
        let hex = "a".repeat(64);
        let c = ContainerId::parse(&format!("containerd://{hex}")).unwrap();
        assert_eq!(c.runtime, Runtime::Containerd);
        assert_eq!(c.id, hex);
        assert_eq!(
            ContainerId::parse(&format!("cri-o://{hex}"))
                .unwrap()
                .runtime,
            Runtime::Crio
        );
        for bad in [
            "",
            "containerd://",
            "containerd://xyz",
            "nothing",
            "://abc",
            "docker://a/b",
        ] {
            assert!(ContainerId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cgroupfs_pod_dirs_and_first_pid() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout {
            cgroup_root: root.path().into(),
            proc_root: "/proc".into(),
        };
        let uid = "0b4c1f2e-3d5a-4e6f-8a9b-0c1d2e3f4a5b";
        assert!(matches!(
            layout.resolve(uid, Qos::Burstable, &[]),
            Err(Error::NoPodCgroup { .. })
        ));
        let pod = root.path().join(format!("kubepods/burstable/pod{uid}"));
        fs::create_dir_all(pod.join("c1")).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        fs::write(pod.join("c1/cgroup.procs"), "4242\n").unwrap();
        let r = layout.resolve(uid, Qos::Burstable, &[]).unwrap();
        assert_eq!(r.cgroup, pod);
        assert_eq!(r.netns, Some(PathBuf::from("/proc/4242/ns/net")));
        assert!(matches!(
            layout.resolve("../../etc", Qos::Burstable, &[]),
            Err(Error::PodUid(_))
        ));
    }
}
