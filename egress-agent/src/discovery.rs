//! Actor discovery: the agent finds the actor pods scheduled on its node from the Kubernetes
//! API server ([`kube`]), maps each to an actor ([`pod`]), finds its cgroup and network
//! namespace ([`cgroup`]) and registers it with the actors manager, and unregisters it when
//! the pod goes. See docs/kubernetes.md (Discovery).
use std::path::PathBuf;

pub mod cgroup;
pub mod kube;
pub mod pod;

/// Errors of discovery, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pod's cgroup could not be found or read.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// The pod's cgroup has no process yet, so its network namespace is unknown.
    #[error("pod {uid}: no process in cgroup {cgroup} yet, so its network namespace is unknown")]
    NoNetns {
        /// The pod's UID.
        uid: String,
        /// The pod's cgroup.
        cgroup: PathBuf,
    },
    /// The kubeconfig could not be read or used.
    #[error(
        "Kubernetes client configuration: {0}; give --kubeconfig FILE, or run in a pod with a \
         service account"
    )]
    KubeConfig(String),
    /// The Kubernetes client could not be built.
    #[error("Kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
}

/// How the agent finds actors besides its config file and control socket (`--discovery`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// None: actors come from the config file and the control socket only.
    #[default]
    None,
    /// The pods on this node labelled `egress.dev/capture=true`, watched on the API server.
    Kubernetes,
}

/// Default `--veth-runtime-classes`: the runtime classes whose pods do not run on the host
/// kernel (gVisor, Kata), captured in veth mode.
pub const DEFAULT_VETH_RUNTIME_CLASSES: &str = "gvisor,runsc,kata,kata-qemu,kata-clh,kata-fc";

/// Discovery settings, from the run flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// This node's name (`spec.nodeName` of the pods to capture).
    pub node_name: String,
    /// The kubeconfig file; `None`: the in-cluster service account, then `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the node's cgroup hierarchy and proc are.
    pub layout: cgroup::Layout,
    /// Runtime classes captured in veth mode.
    pub veth_runtime_classes: Vec<String>,
}

/// Splits a comma-separated list, dropping blanks.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}
