//! A pod as an actor: which pods are selected, what identity they get and how they are
//! captured, from the pod object alone (no file system access).
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use super::cgroup::{ContainerId, Qos};

/// Label selecting a pod for capture (value `"true"`).
pub const LABEL_CAPTURE: &str = "egress.dev/capture";
/// Label selector of the watch.
pub const LABEL_SELECTOR: &str = "egress.dev/capture=true";
/// Annotation: the actor id (`x-ate-actor-id`); default `namespace/name`.
pub const ANNOTATION_ACTOR_ID: &str = "egress.dev/actor-id";
/// Annotation: the actor template (`x-ate-actor-template`); default empty.
pub const ANNOTATION_TEMPLATE: &str = "egress.dev/template";
/// Annotation: the template's namespace (`x-ate-actor-template-namespace`); default empty.
pub const ANNOTATION_TEMPLATE_NAMESPACE: &str = "egress.dev/template-namespace";
/// Annotation: the PEP for the pod's actor: a `[peps.NAME]` name, `default` or `none` (else
/// its template namespace's, else the global one).
pub const ANNOTATION_PEP: &str = "egress.dev/pep";
/// Annotation of a veth-mode pod: its sandbox's network namespace file on the host.
pub const ANNOTATION_VETH_NETNS: &str = "egress.dev/veth-netns";
/// Annotation of a veth-mode pod: the worker network namespace file (default: the agent's).
pub const ANNOTATION_VETH_WORKER_NETNS: &str = "egress.dev/veth-worker-netns";
/// Directories a veth namespace annotation may name a file in: a pod's annotations must not
/// be able to point the agent at any file on the node.
pub const VETH_NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// What a pod is to discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
// One value at a time per pod event, moved once: boxing the actor would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Mapping {
    /// Not (or no longer) an actor: not labelled, or its phase is Succeeded or Failed.
    Ignored,
    /// An actor to capture.
    Actor(PodActor),
    /// Selected but cannot be captured; the reason says why and what to do.
    Unsupported(String),
}

/// A selected pod as an actor, before its cgroup is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodActor {
    /// The pod's UID.
    pub uid: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Actor id.
    pub id: String,
    /// Actor template.
    pub template: String,
    /// Template namespace.
    pub template_namespace: String,
    /// The PEP it asks for (annotation `egress.dev/pep`).
    pub pep: Option<String>,
    /// The pod's QoS class; `None` when the status does not say yet (every class is probed).
    pub qos: Option<Qos>,
    /// IDs of the pod's containers that have one (running or exited).
    pub containers: Vec<ContainerId>,
    /// How it is captured.
    pub capture: PodCapture,
}

/// How a pod's connections reach the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodCapture {
    /// Its processes run on the host kernel: its pod-level cgroup is captured.
    Cgroup,
    /// It runs in a sandbox (gVisor, Kata): a veth pair into its network namespace.
    Veth {
        /// The sandbox's network namespace file.
        netns: PathBuf,
        /// The worker network namespace file; `None`: the agent's own.
        worker_netns: Option<PathBuf>,
    },
}

impl PodActor {
    /// `namespace/name`, for logs.
    pub fn pod_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Maps a pod to what it is for discovery; `veth_runtime_classes` are the runtime classes
/// captured in veth mode.
pub fn map(pod: &Pod, veth_runtime_classes: &[String]) -> Mapping {
    let meta = &pod.metadata;
    let selected = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CAPTURE))
        .is_some_and(|v| v == "true");
    if !selected {
        return Mapping::Ignored;
    }
    let status = pod.status.as_ref();
    if let Some("Succeeded" | "Failed") = status.and_then(|s| s.phase.as_deref()) {
        // Its containers are gone; its cgroup with them.
        return Mapping::Ignored;
    }
    let (Some(uid), Some(namespace), Some(name)) = (&meta.uid, &meta.namespace, &meta.name) else {
        return Mapping::Unsupported("the pod has no uid, namespace or name".into());
    };
    let annotation = |key: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Mapping::Unsupported(
            "hostNetwork pods share the node's network namespace: capturing them would \
             capture the node's; run the actor without hostNetwork"
                .into(),
        );
    }
    let runtime_class = spec.and_then(|s| s.runtime_class_name.as_deref());
    let capture = match runtime_class {
        Some(class) if veth_runtime_classes.iter().any(|c| c == class) => {
            let Some(netns) = annotation(ANNOTATION_VETH_NETNS) else {
                return Mapping::Unsupported(format!(
                    "runtime class {class:?} runs the pod in a sandbox whose connects do not \
                     pass through the host kernel (a cgroup attach would capture nothing): \
                     give the sandbox's network namespace in annotation \
                     {ANNOTATION_VETH_NETNS} (a file under /run/netns) for veth mode"
                ));
            };
            let netns = match netns_path(ANNOTATION_VETH_NETNS, netns) {
                Ok(p) => p,
                Err(e) => return Mapping::Unsupported(e),
            };
            let worker_netns = match annotation(ANNOTATION_VETH_WORKER_NETNS) {
                Some(w) => match netns_path(ANNOTATION_VETH_WORKER_NETNS, w) {
                    Ok(p) => Some(p),
                    Err(e) => return Mapping::Unsupported(e),
                },
                None => None,
            };
            PodCapture::Veth {
                netns,
                worker_netns,
            }
        }
        _ => PodCapture::Cgroup,
    };
    let qos = status
        .and_then(|s| s.qos_class.as_deref())
        .and_then(|q| match q {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        });
    let containers = status
        .into_iter()
        .flat_map(|s| {
            [
                &s.init_container_statuses,
                &s.container_statuses,
                &s.ephemeral_container_statuses,
            ]
        })
        .flatten()
        .flatten()
        .filter_map(|c| c.container_id.as_deref())
        .filter_map(ContainerId::parse)
        .collect();
    let id = annotation(ANNOTATION_ACTOR_ID)
        .map(String::from)
        .unwrap_or_else(|| format!("{namespace}/{name}"));
    let template = annotation(ANNOTATION_TEMPLATE).unwrap_or_default();
    let template_namespace = annotation(ANNOTATION_TEMPLATE_NAMESPACE).unwrap_or_default();
    for (what, value) in [
        (ANNOTATION_ACTOR_ID, id.as_str()),
        (ANNOTATION_TEMPLATE, template),
        (ANNOTATION_TEMPLATE_NAMESPACE, template_namespace),
    ] {
        if value.len() > 253
            || !value.bytes().all(|b| (0x20..0x7f).contains(&b))
            || (what == ANNOTATION_ACTOR_ID && value.is_empty())
        {
            return Mapping::Unsupported(format!(
                "{what} {value:?} cannot be sent in an HTTP header: use printable ASCII, at \
                 most 253 bytes (and a non-empty actor id)"
            ));
        }
    }
    Mapping::Actor(PodActor {
        uid: uid.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        id,
        template: template.into(),
        template_namespace: template_namespace.into(),
        pep: annotation(ANNOTATION_PEP).map(String::from),
        qos,
        containers,
        capture,
    })
}

/// A namespace file named by an annotation: a plain file name directly under one of
/// [`VETH_NETNS_DIRS`].
fn netns_path(annotation: &str, value: &str) -> Result<PathBuf, String> {
    let path = Path::new(value);
    let ok = path
        .parent()
        .is_some_and(|dir| VETH_NETNS_DIRS.iter().any(|d| dir == Path::new(d)))
        && matches!(path.components().next_back(), Some(Component::Normal(_)))
        && value.len() <= 4096;
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "annotation {annotation} {value:?} must name a network namespace file directly \
             under {}",
            VETH_NETNS_DIRS.join(" or ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::cgroup::Runtime;

    fn fixture(name: &str) -> Pod {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kube")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn classes() -> Vec<String> {
        crate::discovery::parse_list(crate::discovery::DEFAULT_VETH_RUNTIME_CLASSES)
    }

    fn actor(name: &str) -> PodActor {
        match map(&fixture(name), &classes()) {
            Mapping::Actor(a) => a,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn containerd_pod_takes_its_identity_from_annotations() {
        let a = actor("pod-containerd.json");
        assert_eq!(a.uid, "3f2a9c1e-8b4d-4e6a-9c7b-1d2e3f4a5b6c");
        assert_eq!(a.pod_name(), "team-a/coder-7f9c");
        assert_eq!(
            (
                a.id.as_str(),
                a.template.as_str(),
                a.template_namespace.as_str()
            ),
            ("actor-coder-1", "coder", "team-a")
        );
        assert_eq!(a.qos, Some(Qos::Burstable));
        assert_eq!(a.capture, PodCapture::Cgroup);
        assert_eq!(a.containers.len(), 1);
        assert_eq!(a.containers[0].runtime, Runtime::Containerd);
        assert!(a.containers[0].id.starts_with("8e5d0a6f"));
    }

    #[test]
    fn crio_pod_falls_back_to_namespace_and_name() {
        let a = actor("pod-crio.json");
        assert_eq!(a.id, "team-b/coder-crio");
        assert_eq!(a.template, "analyst");
        assert_eq!(a.template_namespace, "");
        assert_eq!(a.qos, Some(Qos::Guaranteed));
        assert_eq!(a.containers[0].runtime, Runtime::Crio);
    }

    #[test]
    fn gvisor_pod_is_a_veth_actor_only_with_its_netns() {
        let a = actor("pod-gvisor.json");
        assert_eq!(a.id, "sbx-gv-1");
        assert_eq!(
            a.capture,
            PodCapture::Veth {
                netns: "/run/netns/sbx-gv-1".into(),
                worker_netns: None
            }
        );
        let Mapping::Unsupported(why) = map(&fixture("pod-gvisor-no-netns.json"), &classes())
        else {
            panic!("a sandboxed pod without its netns is unsupported");
        };
        assert!(
            why.contains("runsc") && why.contains(ANNOTATION_VETH_NETNS),
            "{why}"
        );
        // Not in the veth classes: captured as a cgroup actor.
        assert_eq!(
            match map(&fixture("pod-gvisor-no-netns.json"), &[]) {
                Mapping::Actor(a) => a.capture,
                other => panic!("{other:?}"),
            },
            PodCapture::Cgroup
        );
    }

    #[test]
    fn veth_netns_annotations_must_stay_in_the_netns_dirs() {
        let mut pod = fixture("pod-gvisor.json");
        for bad in [
            "/etc/passwd",
            "/run/netns/../../etc/x",
            "run/netns/x",
            "/run/netns/",
            "/run/netns/a/b",
        ] {
            pod.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(ANNOTATION_VETH_NETNS.into(), bad.into());
            assert!(
                matches!(map(&pod, &classes()), Mapping::Unsupported(_)),
                "{bad}"
            );
        }
        let annotations = pod.metadata.annotations.as_mut().unwrap();
        annotations.insert(ANNOTATION_VETH_NETNS.into(), "/var/run/netns/sbx".into());
        annotations.insert(
            ANNOTATION_VETH_WORKER_NETNS.into(),
            "/run/netns/worker".into(),
        );
        let Mapping::Actor(a) = map(&pod, &classes()) else {
            panic!("valid annotations");
        };
        assert_eq!(
            a.capture,
            PodCapture::Veth {
                netns: "/var/run/netns/sbx".into(),
                worker_netns: Some("/run/netns/worker".into())
            }
        );
    }

    #[test]
    fn host_network_pod_is_unsupported() {
        let Mapping::Unsupported(why) = map(&fixture("pod-hostnetwork.json"), &classes()) else {
            panic!("hostNetwork must be unsupported");
        };
        assert!(why.contains("hostNetwork"), "{why}");
    }

    #[test]
    fn pending_pod_is_an_actor_without_containers() {
        let a = actor("pod-pending.json");
        assert_eq!(a.id, "actor-coder-2");
        assert_eq!(a.qos, Some(Qos::BestEffort));
        assert!(a.containers.is_empty());
    }

    #[test]
    fn the_pep_annotation_is_the_actor_s_choice() {
        assert_eq!(actor("pod-containerd.json").pep, None);
        let mut pod = fixture("pod-containerd.json");
        pod.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANNOTATION_PEP.into(), "squid-a".into());
        match map(&pod, &classes()) {
            Mapping::Actor(a) => assert_eq!(a.pep.as_deref(), Some("squid-a")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finished_and_unlabelled_pods_are_ignored() {
        assert_eq!(
            map(&fixture("pod-succeeded.json"), &classes()),
            Mapping::Ignored
        );
        let mut pod = fixture("pod-containerd.json");
        pod.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_CAPTURE.into(), "false".into());
        assert_eq!(map(&pod, &classes()), Mapping::Ignored);
        let mut pod = fixture("pod-containerd.json");
        pod.status.as_mut().unwrap().phase = Some("Failed".into());
        assert_eq!(map(&pod, &classes()), Mapping::Ignored);
        let mut pod = fixture("pod-containerd.json");
        pod.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANNOTATION_TEMPLATE.into(), "a\r\nx-evil: 1".into());
        assert!(matches!(map(&pod, &classes()), Mapping::Unsupported(_)));
        let mut pod = fixture("pod-containerd.json");
        pod.metadata.uid = None;
        assert!(matches!(map(&pod, &classes()), Mapping::Unsupported(_)));
    }
}
