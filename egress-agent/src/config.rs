//! Configuration: command-line flags (each with an `EGRESS_*` environment variable) for the
//! one-actor case, a TOML file for many, validated once at start-up into a [`Config`].
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::pep::PepAddr;
use crate::{
    classify, discovery, ebpf,
    net::{nft::Inbound, veth::Pool},
    pep::{self, Pep, PepArgs, PepFile},
    relay,
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Errors that stop the agent before it starts, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PEP link settings are unusable.
    #[error(transparent)]
    Pep(#[from] pep::Error),
    /// An actor asks for a PEP that is not configured (a refusal: the actor is not served).
    #[error("actor {actor:?}: {problem}")]
    PepChoice {
        /// The actor.
        actor: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// `[pep_by_namespace]` names a PEP that is not configured.
    #[error("{0}")]
    PepSelection(String),
    /// Half the actor flags given.
    #[error("--actor-{0} needs --actor-id and --actor-cgroup too")]
    PartialActor(&'static str),
    /// The config file cannot be read.
    #[error("reading config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path}: {source}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: toml::de::Error,
    },
    /// An actor field is unusable.
    #[error("actor {actor:?}: {problem}")]
    Actor {
        /// The actor id (or its position when the id is the problem).
        actor: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The peek bound cannot hold a request line or a ClientHello header.
    #[error(
        "--peek-max-bytes {0} is too small to hold a request line or a ClientHello header; use at least 64"
    )]
    PeekTooSmall(usize),
    /// A setting that must be above zero is zero.
    #[error("--{0} must be above zero")]
    Zero(&'static str),
    /// A relay buffer so large that a few thousand busy tunnels would exhaust memory.
    #[error(
        "--relay-buffer-bytes {0} is above {max}: each tunnel may hold twice that while busy",
        max = relay::MAX_BUFFER
    )]
    RelayBufferTooLarge(usize),
    /// The two listener ports are equal.
    #[error(
        "--listen-port and --veth-listen-port are both {0}: a namespace with cgroup actors and \
         veth actors would need both listeners; give them different ports"
    )]
    SamePorts(u16),
    /// More connections than the agent can count.
    #[error("--max-connections {0} is above the most the agent supports ({max})", max = tokio::sync::Semaphore::MAX_PERMITS)]
    TooManyConnections(usize),
    /// `--discovery kubernetes` without the node to discover on.
    #[error(
        "--discovery kubernetes needs --node-name (env EGRESS_NODE_NAME): the node whose pods \
         to capture; in a DaemonSet set it from spec.nodeName with the downward API"
    )]
    NoNodeName,
    /// A node name that is not a Kubernetes node name.
    #[error(
        "--node-name {0:?} is not a node name (lowercase letters, digits, '-' and '.', at most \
         253): give the node's name as `kubectl get nodes` shows it"
    )]
    NodeName(String),
    /// The agent's own cgroup could not be found.
    #[error("finding the agent's own cgroup v2 directory: {0}")]
    OwnCgroup(String),
}

/// One captured actor: its identity and how its traffic is captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Actor id (`x-ate-actor-id`).
    pub id: String,
    /// Actor template (`x-ate-actor-template`).
    pub template: String,
    /// Namespace of the template (`x-ate-actor-template-namespace`).
    pub template_namespace: String,
    /// The capture front that serves it.
    pub capture: Capture,
    /// The PEP it asked for (its `pep`), as given.
    pub asked_pep: Option<String>,
    /// The PEP that serves it (actor > namespace > default), or none: the embedded policy.
    pub pep: crate::pep::Selection,
}

/// How an actor's connections reach the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Its processes run on this kernel in a cgroup: cgroup eBPF redirects their connects.
    Cgroup {
        /// The actor's cgroup v2 directory; its processes and their descendants are captured.
        cgroup: PathBuf,
        /// The cgroup's id (the directory's inode number), filled in by validation.
        cgroup_id: u64,
        /// The actor's network namespace file; `None` means the agent's own.
        netns: Option<PathBuf>,
    },
    /// Its traffic arrives as packets (gVisor, microVM) on a veth the agent owns: nftables
    /// redirects its TCP to the agent in the worker namespace.
    Veth(Veth),
}

/// A veth-mode actor's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    /// The actor's network namespace file (its end of the pair becomes `eth0` there).
    pub netns: PathBuf,
    /// The worker (pod) network namespace file; `None` means the agent's own.
    pub worker_netns: Option<PathBuf>,
    /// Ports of the worker's addresses forwarded to the actor.
    pub inbound: Vec<Inbound>,
    /// Masquerade the actor's UDP instead of dropping it.
    pub allow_udp: bool,
    /// (device, inode) of the actor's namespace: two paths naming one namespace compare equal.
    pub netns_identity: (u64, u64),
    /// (device, inode) of the worker's namespace.
    pub worker_identity: (u64, u64),
}

impl Actor {
    /// The cgroup id of a cgroup actor.
    pub fn cgroup_id(&self) -> Option<u64> {
        match &self.capture {
            Capture::Cgroup { cgroup_id, .. } => Some(*cgroup_id),
            Capture::Veth(_) => None,
        }
    }

    /// Why `self` cannot be captured alongside `other`, if it cannot: the same id, the same
    /// cgroup, or the same veth actor namespace (both would want its `eth0`).
    pub fn conflict(&self, other: &Actor) -> Option<String> {
        if self.id == other.id {
            return Some("the same id is configured twice".into());
        }
        match (&self.capture, &other.capture) {
            (
                Capture::Cgroup {
                    cgroup, cgroup_id, ..
                },
                Capture::Cgroup { cgroup_id: id, .. },
            ) if cgroup_id == id => Some(format!(
                "cgroup {} is already actor {:?}'s",
                cgroup.display(),
                other.id
            )),
            (Capture::Veth(a), Capture::Veth(b)) if a.netns_identity == b.netns_identity => {
                Some(format!(
                    "network namespace {} is already veth actor {:?}'s",
                    a.netns.display(),
                    other.id
                ))
            }
            _ => None,
        }
    }

    /// The spec this actor was validated from (for the state file and `actor list`).
    pub fn spec(&self) -> ActorSpec {
        let mut spec = ActorSpec {
            id: self.id.clone(),
            template: self.template.clone(),
            template_namespace: self.template_namespace.clone(),
            pep: self.asked_pep.clone(),
            ..ActorSpec::default()
        };
        match &self.capture {
            Capture::Cgroup { cgroup, netns, .. } => {
                spec.cgroup = Some(cgroup.clone());
                spec.netns = netns.clone();
            }
            Capture::Veth(v) => {
                spec.netns = Some(v.netns.clone());
                spec.veth = Some(VethSpec {
                    worker_netns: v.worker_netns.clone(),
                    inbound: v.inbound.clone(),
                    allow_udp: v.allow_udp,
                });
            }
        }
        spec
    }
}

/// An actor as the config file, the control socket and the state file give it, before
/// validation: `cgroup` (and optionally `netns`) for a process actor, or `netns` and a `veth`
/// table for a packet-level actor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    /// Actor id.
    pub id: String,
    /// Actor template.
    #[serde(default)]
    pub template: String,
    /// Template namespace.
    #[serde(default)]
    pub template_namespace: String,
    /// cgroup v2 directory (process actors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Network namespace file: where a process actor's listener goes (omitted: the agent's
    /// own), or the namespace of a veth actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Veth mode (gVisor, microVM actors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<VethSpec>,
    /// The PEP for this actor: a `[peps.NAME]` name, `default` (the global `[pep]`) or `none`
    /// (the embedded policy); omitted: its template namespace's, else the global one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pep: Option<String>,
}

/// The `veth` table of an actor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VethSpec {
    /// Worker (pod) network namespace file; omitted: the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_netns: Option<PathBuf>,
    /// Ports forwarded from the worker's addresses to the actor: "tcp/8080", "udp/4433".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<Inbound>,
    /// Masquerade the actor's UDP (other than DNS) instead of dropping it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_udp: bool,
}

impl ActorSpec {
    /// The name an error about this actor uses.
    pub fn label(&self) -> String {
        if self.id.is_empty() {
            "(no id)".into()
        } else {
            self.id.clone()
        }
    }

    /// Checks the spec against this machine and resolves it into an [`Actor`], its PEP
    /// chosen by `peps`.
    pub fn validate(&self, peps: &crate::pep::Selector) -> Result<Actor, Error> {
        let problem = |p: String| Error::Actor {
            actor: self.label(),
            problem: p,
        };
        let pep = peps
            .select(self.pep.as_deref(), &self.template_namespace)
            .map_err(|problem| Error::PepChoice {
                actor: self.label(),
                problem,
            })?;
        if self.id.is_empty() {
            return Err(problem("id is empty".into()));
        }
        for (field, value) in [
            ("id", &self.id),
            ("template", &self.template),
            ("template_namespace", &self.template_namespace),
        ] {
            if !header_safe(value) {
                return Err(problem(format!(
                    "{field} {value:?} cannot be sent in an HTTP header: use printable ASCII \
                     without control characters, at most 253 bytes"
                )));
            }
        }
        let capture = match (&self.cgroup, &self.veth) {
            (Some(_), Some(_)) => {
                return Err(problem(
                    "give either `cgroup` (a process actor) or `veth` (a gVisor/microVM actor), \
                     not both"
                        .into(),
                ));
            }
            (None, None) => {
                return Err(problem(
                    "give `cgroup` (a process actor: its cgroup v2 directory) or `veth` (a \
                     gVisor/microVM actor: its network namespace and worker namespace)"
                        .into(),
                ));
            }
            (Some(cgroup), None) => {
                if let Some(netns) = &self.netns {
                    check_netns(netns).map_err(&problem)?;
                }
                Capture::Cgroup {
                    cgroup: cgroup.clone(),
                    cgroup_id: cgroup_id(cgroup).map_err(&problem)?,
                    netns: self.netns.clone(),
                }
            }
            (None, Some(veth)) => {
                let netns = self.netns.clone().ok_or_else(|| {
                    problem(
                        "a veth actor needs `netns`: its network namespace file, e.g. \
                         /var/run/netns/NAME"
                            .into(),
                    )
                })?;
                check_netns(&netns).map_err(&problem)?;
                if let Some(worker) = &veth.worker_netns {
                    check_netns(worker).map_err(&problem)?;
                }
                let actor_ns = crate::netns::identity(Some(&netns))
                    .map_err(|e| problem(format!("network namespace {}: {e}", netns.display())))?;
                let worker_ns = crate::netns::identity(veth.worker_netns.as_deref())
                    .map_err(|e| problem(format!("worker network namespace: {e}")))?;
                let own_ns = crate::netns::identity(None)
                    .map_err(|e| problem(format!("the agent's network namespace: {e}")))?;
                if actor_ns == worker_ns || actor_ns == own_ns {
                    return Err(problem(
                        "the actor's namespace is the worker's or the agent's: a veth actor \
                         needs a network namespace of its own (its eth0 and default route are \
                         set by the agent)"
                            .into(),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for inbound in &veth.inbound {
                    if inbound.port == 0 {
                        return Err(problem(format!("inbound {inbound}: port 0")));
                    }
                    if !seen.insert(*inbound) {
                        return Err(problem(format!("inbound {inbound} is listed twice")));
                    }
                }
                Capture::Veth(Veth {
                    netns,
                    worker_netns: veth.worker_netns.clone(),
                    inbound: veth.inbound.clone(),
                    allow_udp: veth.allow_udp,
                    netns_identity: actor_ns,
                    worker_identity: worker_ns,
                })
            }
        };
        Ok(Actor {
            id: self.id.clone(),
            template: self.template.clone(),
            template_namespace: self.template_namespace.clone(),
            capture,
            asked_pep: self.pep.clone(),
            pep,
        })
    }
}

/// The validated configuration of `egress-agent run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// The PEP connections are tunnelled to, and how; `None`: no PEP, the agent decides every
    /// connection with the policy and dials upstream itself.
    pub pep: Option<Pep>,
    /// The named PEPs (`[peps.NAME]`).
    pub peps: std::collections::BTreeMap<String, Pep>,
    /// Which PEP each actor gets (actor > namespace > default).
    pub pep_selector: crate::pep::Selector,
    /// The policy file (`--policy`); `None`: no rules (deny all where the agent decides).
    pub policy: Option<PathBuf>,
    /// Actors captured from the start (the config file and flags); more come and go over the
    /// control socket.
    pub actors: Vec<Actor>,
    /// The control socket (`egress-agent actor ...`).
    pub control_socket: PathBuf,
    /// Where actors added at run time and veth slots are remembered across restarts.
    pub state_dir: PathBuf,
    /// The /30s veth pairs are addressed from (per worker namespace).
    pub veth_pool: Pool,
    /// The resolver every actor's DNS is relayed to (both fronts), from the agent's own
    /// namespace; `None`: there is none, and actors' DNS queries go unanswered.
    pub dns_upstream: Option<SocketAddr>,
    /// Port of the agent's listener (0.0.0.0) in each worker namespace: the nftables redirect
    /// target.
    pub veth_listen_port: u16,
    /// Port of the agent's UDP DNS socket (0.0.0.0) in each worker namespace: where nftables
    /// redirects veth actors' DNS.
    pub veth_dns_port: u16,
    /// bpffs directory for pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// Port of the agent's listeners (127.0.0.1 and ::1 in each actor network namespace).
    pub listen_port: u16,
    /// Bounds of the first-bytes classification.
    pub peek: classify::Limits,
    /// `SO_MARK` of the agent's own sockets (exempt from capture).
    pub socket_mark: u32,
    /// The most bytes a tunnel's relay holds per direction: the size its copy buffer grows to
    /// with traffic (from 1 KiB), and its splice pipe's size (at most 1 MiB).
    pub relay_buffer: usize,
    /// The relay engine where both ends are plain TCP (`--relay`).
    pub relay: relay::Mode,
    /// Most connections served at once; more are reset.
    pub max_connections: usize,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: crate::admin::Listen,
    /// Where one JSON line per connection goes.
    pub access_log: crate::access_log::Target,
    /// Actor discovery from the Kubernetes API (`--discovery kubernetes`); `None`: off.
    pub discovery: Option<discovery::Options>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pep: Some(Pep::default()),
            peps: std::collections::BTreeMap::new(),
            pep_selector: crate::pep::Selector {
                has_default: true,
                ..Default::default()
            },
            policy: None,
            actors: Vec::new(),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            veth_pool: Pool::default(),
            dns_upstream: None,
            veth_listen_port: 15002,
            veth_dns_port: DEFAULT_VETH_DNS_PORT,
            bpffs_dir: PathBuf::from(ebpf::DEFAULT_DIR),
            listen_port: 15001,
            peek: classify::Limits::default(),
            socket_mark: DEFAULT_SOCKET_MARK,
            relay_buffer: relay::DEFAULT_MAX_BUFFER,
            relay: relay::Mode::default(),
            max_connections: 65_536,
            // Off in embedded use and tests (the flag's default is 127.0.0.1:15090): two
            // contexts in one process would race for the port.
            admin_listen: crate::admin::Listen::Off,
            access_log: crate::access_log::Target::Off,
            discovery: None,
        }
    }
}

/// Default path of the control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/egress-agent/control.sock";
/// Default state directory (tmpfs: veth pairs do not outlive a reboot either).
pub const DEFAULT_STATE_DIR: &str = "/run/egress-agent";

/// Default port of the agent's DNS socket in each worker namespace.
pub const DEFAULT_VETH_DNS_PORT: u16 = 15053;

/// Where the default DNS upstream is read from: its first `nameserver`, port 53.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Default `SO_MARK` of the agent's sockets ("eg" in the high half).
pub const DEFAULT_SOCKET_MARK: u32 = 0x6567_0000;

/// Flags of `egress-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The PEP link: --pep and the --pep-* flags.
    #[command(flatten)]
    pub pep: PepArgs,
    /// Policy file (TOML, docs/policy.md): per template allow/deny rules, used where no PEP
    /// decides (or to pre-filter). Reloaded on SIGHUP and when the file changes. Without it
    /// the agent has no rules: what it decides itself is denied.
    #[arg(long, env = "EGRESS_POLICY")]
    pub policy: Option<PathBuf>,
    /// TOML file with `pep` and [[actor]] tables (id, template, template_namespace, cgroup,
    /// netns). Flags for a single actor add one more.
    #[arg(long, env = "EGRESS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Id of the single actor given by flags.
    #[arg(long, env = "EGRESS_ACTOR_ID")]
    pub actor_id: Option<String>,
    /// Template of the single actor.
    #[arg(long, env = "EGRESS_ACTOR_TEMPLATE")]
    pub actor_template: Option<String>,
    /// Template namespace of the single actor.
    #[arg(long, env = "EGRESS_ACTOR_TEMPLATE_NAMESPACE")]
    pub actor_template_namespace: Option<String>,
    /// cgroup v2 directory of the single actor.
    #[arg(long, env = "EGRESS_ACTOR_CGROUP")]
    pub actor_cgroup: Option<PathBuf>,
    /// Network namespace file of the single actor (e.g. /var/run/netns/NAME or
    /// /proc/PID/ns/net); omitted: the agent's own.
    #[arg(long, env = "EGRESS_ACTOR_NETNS")]
    pub actor_netns: Option<PathBuf>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, env = "EGRESS_BPFFS_DIR", default_value = ebpf::DEFAULT_DIR)]
    pub bpffs_dir: PathBuf,
    /// Port of the agent's listeners on 127.0.0.1 and ::1 inside each actor network namespace.
    #[arg(long, env = "EGRESS_LISTEN_PORT", default_value_t = 15001)]
    pub listen_port: u16,
    /// How long to wait for the client's first bytes (TLS ClientHello, HTTP request) before
    /// using the original IP:port as the authority (server-first protocols).
    #[arg(long, env = "EGRESS_PEEK_TIMEOUT_MS", default_value_t = 200)]
    pub peek_timeout_ms: u64,
    /// Most bytes read from the client to find the SNI or Host.
    #[arg(long, env = "EGRESS_PEEK_MAX_BYTES", default_value_t = classify::Limits::default().max_bytes)]
    pub peek_max_bytes: usize,
    /// SO_MARK of the agent's own sockets, which capture leaves alone (decimal or 0x hex).
    #[arg(long, env = "EGRESS_SOCKET_MARK", default_value = "0x65670000", value_parser = parse_u32)]
    pub socket_mark: u32,
    /// The most bytes a tunnel's relay holds per direction: a copy buffer starts at 1 KiB and
    /// grows to this only as reads fill it (an idle tunnel holds none); a splice pipe is this
    /// size (at most 1 MiB).
    #[arg(long, env = "EGRESS_RELAY_BUFFER_BYTES", default_value_t = relay::DEFAULT_MAX_BUFFER)]
    pub relay_buffer_bytes: usize,
    /// How tunnels whose two ends are plain TCP (a direct dial, a plain-TCP PEP link) are
    /// relayed: `splice` (splice(2) through a pipe per direction, bytes never copied to user
    /// space) or `copy` (a user-space buffer). A TLS PEP link is always relayed with `copy`.
    /// Default: `relay` in the config file, else splice.
    #[arg(long, env = "EGRESS_RELAY", value_enum)]
    pub relay: Option<relay::Mode>,
    /// Most connections served at once; connections beyond it are reset.
    #[arg(long, env = "EGRESS_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,
    /// Unix socket (root only) where `egress-agent actor add|remove|list|reapply` reach the
    /// running agent.
    #[arg(long, env = "EGRESS_CONTROL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Directory where actors added at run time, and the veth slots of all veth actors, are
    /// kept so that a restarted agent adopts them.
    #[arg(long, env = "EGRESS_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Pool of /30s for veth pairs, in each worker namespace: slot 0 gives the worker end .1
    /// and the actor .2.
    #[arg(long, env = "EGRESS_VETH_POOL", default_value = "10.200.0.0/24")]
    pub veth_pool: Pool,
    /// Port of the agent's listener on 0.0.0.0 in each worker namespace, where nftables
    /// redirects veth actors' TCP.
    #[arg(long, env = "EGRESS_VETH_LISTEN_PORT", default_value_t = 15002)]
    pub veth_listen_port: u16,
    /// Port of the agent's UDP DNS socket on 0.0.0.0 in each worker namespace, where nftables
    /// redirects veth actors' DNS (UDP 53 to any address).
    #[arg(long, env = "EGRESS_VETH_DNS_PORT", default_value_t = DEFAULT_VETH_DNS_PORT)]
    pub veth_dns_port: u16,
    /// The resolver actors' DNS is relayed to, IP:PORT (a bare IP means port 53), reached from
    /// the agent's own network namespace. Default: the first `nameserver` of /etc/resolv.conf.
    #[arg(long, env = "EGRESS_DNS_UPSTREAM", value_parser = parse_dns_upstream)]
    pub dns_upstream: Option<SocketAddr>,
    /// Admin HTTP listener, IP:PORT or `off`: /metrics (OpenMetrics), /healthz, /readyz.
    /// Keep it on loopback: metrics name the actors.
    #[arg(long, env = "EGRESS_ADMIN_LISTEN", default_value = crate::admin::DEFAULT_LISTEN)]
    pub admin_listen: crate::admin::Listen,
    /// Access log: `off`, `stdout`, `stderr` or a file path (appended, created 0600, reopened
    /// on SIGHUP): one JSON line per connection.
    #[arg(long, env = "EGRESS_ACCESS_LOG", default_value = "off")]
    pub access_log: crate::access_log::Target,
    /// Where actors come from besides the config file and the control socket: `kubernetes`
    /// watches the API server for the pods on --node-name labelled egress.dev/capture=true
    /// (docs/kubernetes.md).
    #[arg(long, env = "EGRESS_DISCOVERY", value_enum, default_value = "none")]
    pub discovery: discovery::Mode,
    /// This node's name (`spec.nodeName` of the pods to capture); required with
    /// `--discovery kubernetes`.
    #[arg(long, env = "EGRESS_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig file for the API server; omitted: the in-cluster service account, then
    /// $KUBECONFIG.
    #[arg(long, env = "EGRESS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The node's cgroup v2 mount, where kubelet's pod cgroups are found.
    #[arg(long, env = "EGRESS_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The node's proc (the host's PID namespace), where pods' network namespaces are found.
    #[arg(long, env = "EGRESS_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Runtime classes (comma-separated) whose pods run in a sandbox with its own kernel
    /// (gVisor, Kata): captured in veth mode, never by cgroup.
    #[arg(long, env = "EGRESS_VETH_RUNTIME_CLASSES", default_value = discovery::DEFAULT_VETH_RUNTIME_CLASSES)]
    pub veth_runtime_classes: String,
}

/// `IP:PORT`, or a bare IP for port 53.
fn parse_dns_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, egress_common::DNS_PORT))
        .map_err(|_| {
            format!(
                "{s:?} is not IP:PORT or IP, e.g. 10.96.0.10:53, [fd00::a]:53 or 10.96.0.10 \
                 (a name cannot be used: it would need a resolver to find the resolver)"
            )
        })
}

/// The first usable `nameserver` of a resolv.conf text, at port 53 (an IPv6 link-local
/// address needs a numeric scope id). Lines glibc would skip are skipped.
pub fn first_nameserver(text: &[u8]) -> Option<SocketAddr> {
    let (parsed, _ignored) = resolv_conf::Config::parse_with_errors(text);
    parsed.nameservers.iter().find_map(|ns| match ns {
        resolv_conf::ScopedIp::V4(ip) => Some(SocketAddr::new(IpAddr::V4(*ip), 53)),
        resolv_conf::ScopedIp::V6(ip, None) => Some(SocketAddr::new(IpAddr::V6(*ip), 53)),
        resolv_conf::ScopedIp::V6(ip, Some(scope)) => scope
            .parse()
            .ok()
            .map(|id| SocketAddr::V6(std::net::SocketAddrV6::new(*ip, 53, 0, id))),
    })
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

/// The config file's schema.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// The PEP: `pep = "HOST:PORT"` or a `[pep]` table (address, TLS, authorization, bounds,
    /// header names).
    #[serde(default, deserialize_with = "pep::string_or_table")]
    pub pep: Option<PepFile>,
    /// Named PEPs, `[peps.NAME]`: the same keys as `[pep]`; actors choose one with `pep`.
    #[serde(default)]
    pub peps: std::collections::BTreeMap<String, PepFile>,
    /// Template namespace -> PEP name (`default`, `none` or a `[peps]` name).
    #[serde(default)]
    pub pep_by_namespace: std::collections::BTreeMap<String, String>,
    /// The policy file (`--policy` wins).
    pub policy: Option<PathBuf>,
    /// The relay engine for plain TCP tunnels: "splice" or "copy" (`--relay` wins).
    pub relay: Option<relay::Mode>,
    /// Actors captured from the start.
    #[serde(default, rename = "actor")]
    pub actors: Vec<ActorSpec>,
}

impl File {
    /// Reads and parses a config file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| Error::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl RunArgs {
    /// Merges flags and file and validates everything against this machine.
    pub fn into_config(self) -> Result<Config, Error> {
        let file = match &self.config {
            Some(path) => File::read(path)?,
            None => File::default(),
        };
        let pep = Pep::load(&self.pep, file.pep.as_ref())?;
        let mut peps = std::collections::BTreeMap::new();
        for (name, pep_file) in &file.peps {
            peps.insert(name.clone(), Pep::load_named(name, pep_file)?);
        }
        let pep_selector = crate::pep::Selector {
            has_default: pep.is_some(),
            named: peps.keys().cloned().collect(),
            by_namespace: file.pep_by_namespace.clone(),
        };
        pep_selector.check().map_err(Error::PepSelection)?;
        let policy = self.policy.or(file.policy);
        let mut specs = file.actors;
        match (self.actor_id, self.actor_cgroup) {
            (Some(id), Some(cgroup)) => specs.push(ActorSpec {
                id,
                template: self.actor_template.unwrap_or_default(),
                template_namespace: self.actor_template_namespace.unwrap_or_default(),
                cgroup: Some(cgroup),
                netns: self.actor_netns,
                veth: None,
                pep: None,
            }),
            (None, None) => {
                for (flag, given) in [
                    ("template", self.actor_template.is_some()),
                    (
                        "template-namespace",
                        self.actor_template_namespace.is_some(),
                    ),
                    ("netns", self.actor_netns.is_some()),
                ] {
                    if given {
                        return Err(Error::PartialActor(flag));
                    }
                }
            }
            (Some(_), None) => return Err(Error::PartialActor("id")),
            (None, Some(_)) => return Err(Error::PartialActor("cgroup")),
        }
        if self.peek_max_bytes < 64 {
            return Err(Error::PeekTooSmall(self.peek_max_bytes));
        }
        for (flag, value) in [
            ("relay-buffer-bytes", self.relay_buffer_bytes),
            ("max-connections", self.max_connections),
            ("listen-port", usize::from(self.listen_port)),
            ("veth-listen-port", usize::from(self.veth_listen_port)),
            ("veth-dns-port", usize::from(self.veth_dns_port)),
            // Zero would disable the agent's exemption: inside a captured cgroup it would then
            // capture its own connections.
            ("socket-mark", self.socket_mark as usize),
        ] {
            if value == 0 {
                return Err(Error::Zero(flag));
            }
        }
        if self.relay_buffer_bytes > relay::MAX_BUFFER {
            return Err(Error::RelayBufferTooLarge(self.relay_buffer_bytes));
        }
        if self.listen_port == self.veth_listen_port {
            return Err(Error::SamePorts(self.listen_port));
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(Error::TooManyConnections(self.max_connections));
        }
        let discovery = match self.discovery {
            discovery::Mode::None => None,
            discovery::Mode::Kubernetes => {
                let node_name = self.node_name.ok_or(Error::NoNodeName)?;
                if !node_name_ok(&node_name) {
                    return Err(Error::NodeName(node_name));
                }
                Some(discovery::Options {
                    node_name,
                    kubeconfig: self.kubeconfig,
                    layout: discovery::cgroup::Layout {
                        cgroup_root: self.cgroup_root,
                        proc_root: self.proc_root,
                    },
                    veth_runtime_classes: discovery::parse_list(&self.veth_runtime_classes),
                })
            }
        };
        let mut actors: Vec<Actor> = Vec::with_capacity(specs.len());
        for spec in &specs {
            let actor = spec.validate(&pep_selector)?;
            if let Some(problem) = actors.iter().find_map(|other| actor.conflict(other)) {
                return Err(Error::Actor {
                    actor: actor.id,
                    problem,
                });
            }
            actors.push(actor);
        }
        Ok(Config {
            pep,
            peps,
            pep_selector,
            policy,
            actors,
            control_socket: self.control_socket,
            state_dir: self.state_dir,
            veth_pool: self.veth_pool,
            dns_upstream: self.dns_upstream.or_else(|| {
                fs::read(RESOLV_CONF)
                    .ok()
                    .and_then(|text| first_nameserver(&text))
            }),
            veth_listen_port: self.veth_listen_port,
            veth_dns_port: self.veth_dns_port,
            bpffs_dir: self.bpffs_dir,
            listen_port: self.listen_port,
            peek: classify::Limits {
                max_bytes: self.peek_max_bytes,
                timeout: Duration::from_millis(self.peek_timeout_ms),
            },
            socket_mark: self.socket_mark,
            relay_buffer: self.relay_buffer_bytes,
            relay: self.relay.or(file.relay).unwrap_or_default(),
            max_connections: self.max_connections,
            admin_listen: self.admin_listen,
            access_log: self.access_log,
            discovery,
        })
    }
}

/// A Kubernetes node name (a DNS subdomain): it goes into the watch's field selector.
fn node_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Printable ASCII (space included), no control characters, bounded.
fn header_safe(s: &str) -> bool {
    s.len() <= 253 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The id of a cgroup v2 directory (its inode number), or what is wrong with it.
pub fn cgroup_id(path: &Path) -> Result<u64, String> {
    let meta = fs::metadata(path).map_err(|e| {
        format!(
            "cgroup {}: {e}; give the actor's cgroup v2 directory (find the cgroup2 mount with \
             `findmnt -t cgroup2`)",
            path.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!("cgroup {} is not a directory", path.display()));
    }
    let fs_type = nix::sys::statfs::statfs(path)
        .map_err(|e| format!("statfs {}: {e}", path.display()))?
        .filesystem_type()
        .0 as i64;
    if fs_type != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "{} is not on cgroup v2 (filesystem magic {fs_type:#x}); capture needs a cgroup v2 \
             directory: find the cgroup2 mount with `findmnt -t cgroup2` (on hybrid hosts often \
             /sys/fs/cgroup/unified)",
            path.display()
        ));
    }
    // The root of a cgroup v2 hierarchy is inode 1: capturing it would capture every process
    // on the node (kubelet, sshd, ...), and with the agent gone they would all lose TCP.
    if meta.ino() == 1 {
        return Err(format!(
            "{} is the root of the cgroup v2 hierarchy: refusing to capture every process on \
             the node; give the actor's own cgroup directory",
            path.display()
        ));
    }
    Ok(meta.ino())
}

/// Where the cgroup v2 hierarchy is mounted (from /proc/self/mountinfo), if anywhere.
pub fn cgroup2_mount() -> std::io::Result<Option<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    // mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER".
    Ok(mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from))
}

/// The cgroup v2 id of the calling process (from /proc/self/cgroup and a cgroup2 mount of
/// the agent's own cgroup namespace root).
///
/// `/proc/self/cgroup` gives the path relative to the caller's cgroup namespace, so it can only
/// be joined to a mount whose root is that namespace's root (`/` in mountinfo's root field) and
/// that is not covered by a later mount. In a container with a private cgroup namespace, a
/// hostPath mount of the host's hierarchy over `/sys/fs/cgroup` is neither: joining `/` to it
/// would name the host's root cgroup.
pub fn own_cgroup_id() -> Result<u64, Error> {
    let err = |e: String| Error::OwnCgroup(e);
    let cgroups = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| err(format!("/proc/self/cgroup: {e}")))?;
    let relative = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| err("no cgroup v2 entry (0::) in /proc/self/cgroup".into()))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(format!("/proc/self/mountinfo: {e}")))?;
    let path = namespace_root_mount(&mountinfo)
        .ok_or_else(|| {
            err(
                "no visible cgroup2 mount of this cgroup namespace's root in \
                 /proc/self/mountinfo; in a container, keep the runtime's own /sys/fs/cgroup and \
                 mount the host's hierarchy elsewhere (e.g. /host/sys/fs/cgroup, with \
                 --cgroup-root)"
                    .into(),
            )
        })?
        .join(relative.trim_start_matches('/'));
    let meta = fs::metadata(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    Ok(meta.ino())
}

/// The mount point of the last cgroup2 mount in `mountinfo` whose root is the cgroup
/// namespace's root and that no later mount covers at the same mount point.
fn namespace_root_mount(mountinfo: &str) -> Option<PathBuf> {
    // mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER".
    let mounts: Vec<(&str, &str, bool)> = mountinfo
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let root = fields.nth(3)?;
            let point = fields.next()?;
            let cgroup2 = l
                .split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "));
            Some((root, point, cgroup2))
        })
        .collect();
    mounts
        .iter()
        .enumerate()
        .rev()
        .find(|(i, (root, point, cgroup2))| {
            *cgroup2 && *root == "/" && !mounts[i + 1..].iter().any(|(_, p, _)| p == point)
        })
        .map(|(_, (_, point, _))| PathBuf::from(point))
}

fn check_netns(path: &Path) -> Result<(), String> {
    let fs_type = nix::sys::statfs::statfs(path)
        .map_err(|e| {
            format!(
                "network namespace {}: {e}; give a namespace file such as /var/run/netns/NAME \
                 or /proc/PID/ns/net",
                path.display()
            )
        })?
        .filesystem_type()
        .0 as i64;
    if fs_type != NSFS_MAGIC {
        return Err(format!(
            "{} is not a namespace file (e.g. /var/run/netns/NAME or /proc/PID/ns/net)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_schema_is_strict() {
        let f: File = toml::from_str(
            r#"
            pep = "127.0.0.1:3128"
            [[actor]]
            id = "a1"
            template = "t"
            template_namespace = "ns"
            cgroup = "/sys/fs/cgroup/unified/x"
            netns = "/var/run/netns/x"
            "#,
        )
        .unwrap();
        assert_eq!(f.actors.len(), 1);
        assert_eq!(
            f.actors[0].netns.as_deref(),
            Some(Path::new("/var/run/netns/x"))
        );
        let err = toml::from_str::<File>("[[actor]]\nid = \"a\"\ncgroup = \"/x\"\ncgroupp = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cgroupp"), "{err}");
    }

    #[test]
    fn veth_actors_parse_from_the_file() {
        let f: File = toml::from_str(
            r#"
            pep = "127.0.0.1:3128"
            [[actor]]
            id = "sbx-1"
            netns = "/var/run/netns/sbx-1"
            [actor.veth]
            worker_netns = "/var/run/netns/pod-1"
            inbound = ["tcp/8080", "udp/4433"]
            allow_udp = true
            "#,
        )
        .unwrap();
        let veth = f.actors[0].veth.as_ref().unwrap();
        assert_eq!(
            veth.worker_netns.as_deref(),
            Some(Path::new("/var/run/netns/pod-1"))
        );
        assert_eq!(veth.inbound[0].to_string(), "tcp/8080");
        assert!(veth.allow_udp);
        for bad in [
            "[[actor]]\nid = \"a\"\n[actor.veth]\nworkr_netns = \"/x\"\n",
            "[[actor]]\nid = \"a\"\n[actor.veth]\ninbound = [\"icmp/1\"]\n",
        ] {
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn actor_specs_say_what_is_wrong() {
        let problem = |spec: ActorSpec| match spec.validate(&crate::pep::Selector::default()) {
            Err(Error::Actor { problem, .. }) => problem,
            other => panic!("expected an actor error, got {other:?}"),
        };
        let own = PathBuf::from("/proc/self/ns/net");
        let veth = |inbound: Vec<&str>| VethSpec {
            worker_netns: None,
            inbound: inbound.into_iter().map(|i| i.parse().unwrap()).collect(),
            allow_udp: false,
        };
        let base = ActorSpec {
            id: "a".into(),
            ..ActorSpec::default()
        };
        assert!(problem(base.clone()).contains("give `cgroup`"));
        assert!(
            problem(ActorSpec {
                cgroup: Some("/x".into()),
                veth: Some(veth(vec![])),
                ..base.clone()
            })
            .contains("not both")
        );
        assert!(
            problem(ActorSpec {
                veth: Some(veth(vec![])),
                ..base.clone()
            })
            .contains("needs `netns`")
        );
        // The agent's own namespace as both actor and worker.
        assert!(
            problem(ActorSpec {
                netns: Some(own.clone()),
                veth: Some(veth(vec![])),
                ..base.clone()
            })
            .contains("namespace of its own")
        );
        assert!(
            problem(ActorSpec {
                netns: Some("/tmp".into()),
                veth: Some(veth(vec![])),
                ..base.clone()
            })
            .contains("not a namespace file")
        );
        let mut dup = veth(vec!["tcp/80", "tcp/80"]);
        dup.worker_netns = Some("/proc/1/ns/net".into());
        // Validation stops at the namespace check or the duplicate, never passes.
        assert!(
            ActorSpec {
                netns: Some(own),
                veth: Some(dup),
                ..base
            }
            .validate(&crate::pep::Selector::default())
            .is_err()
        );
    }

    #[test]
    fn header_values_are_checked() {
        assert!(header_safe("actor-1 / team"));
        assert!(!header_safe("a\r\nx-evil: 1"));
        assert!(!header_safe("é"));
    }

    #[test]
    fn missing_cgroup_says_what_to_do() {
        let err = cgroup_id(Path::new("/nonexistent/egress")).unwrap_err();
        assert!(err.contains("cgroup v2 directory"), "{err}");
    }

    #[test]
    fn non_cgroup2_directory_is_refused() {
        let err = cgroup_id(Path::new("/tmp")).unwrap_err();
        assert!(err.contains("not on cgroup v2"), "{err}");
    }

    #[test]
    fn the_cgroup_root_is_refused() {
        let Some(root) = cgroup2_mount().unwrap() else {
            panic!("no cgroup2 mount on this machine: this test needs cgroup v2");
        };
        let err = cgroup_id(&root).unwrap_err();
        assert!(err.contains("root of the cgroup v2 hierarchy"), "{err}");
    }

    #[test]
    fn actor_flags_must_come_together() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = T::try_parse_from(["t", "--pep", "127.0.0.1:3128", "--actor-id", "a"]).unwrap();
        assert!(matches!(
            t.run.into_config(),
            Err(Error::PartialActor("id"))
        ));
        // No PEP is fine: the agent decides with the policy.
        let t = T::try_parse_from(["t"]).unwrap();
        assert!(t.run.into_config().unwrap().pep.is_none());
        // No actor at start is fine: they come over the control socket.
        let t = T::try_parse_from(["t", "--pep", "127.0.0.1:3128"]).unwrap();
        assert!(t.run.into_config().unwrap().actors.is_empty());
        let t = T::try_parse_from([
            "t",
            "--pep",
            "127.0.0.1:3128",
            "--veth-listen-port",
            "15001",
        ])
        .unwrap();
        assert!(matches!(t.run.into_config(), Err(Error::SamePorts(15001))));
        let t = T::try_parse_from(["t", "--pep", "127.0.0.1:3128", "--socket-mark", "0"]).unwrap();
        assert!(matches!(
            t.run.into_config(),
            Err(Error::Zero("socket-mark"))
        ));
        let t = T::try_parse_from([
            "t",
            "--pep",
            "127.0.0.1:3128",
            "--max-connections",
            &usize::MAX.to_string(),
        ])
        .unwrap();
        assert!(matches!(
            t.run.into_config(),
            Err(Error::TooManyConnections(_))
        ));
    }

    #[test]
    fn pep_comes_as_a_string_or_a_table_and_flags_win() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("egress.toml");
        let config = |toml: &str, flags: &[&str]| {
            fs::write(&file, toml).unwrap();
            let mut argv = vec!["t", "--config", file.to_str().unwrap()];
            argv.extend_from_slice(flags);
            T::try_parse_from(argv).unwrap().run.into_config()
        };
        let c = config("pep = \"squid.egress.svc:3129\"\n", &[]).unwrap();
        assert_eq!(
            c.pep.as_ref().unwrap().addr.to_string(),
            "squid.egress.svc:3129"
        );
        assert_eq!(
            c.pep.as_ref().unwrap().response_timeout,
            Duration::from_secs(5)
        );
        let table = "[pep]\naddress = \"squid.egress.svc:3129\"\nresponse_timeout_ms = 700\n\
                     max_waiting = 3\n[pep.headers]\nactor_id = \"x-pep-actor\"\n";
        let c = config(table, &[]).unwrap();
        assert_eq!(
            c.pep.as_ref().unwrap().response_timeout,
            Duration::from_millis(700)
        );
        assert_eq!(c.pep.as_ref().unwrap().max_waiting, 3);
        assert_eq!(c.pep.as_ref().unwrap().headers.actor_id, "x-pep-actor");
        let c = config(
            table,
            &["--pep", "127.0.0.1:3128", "--pep-timeout-ms", "90"],
        )
        .unwrap();
        assert_eq!(c.pep.as_ref().unwrap().addr.to_string(), "127.0.0.1:3128");
        assert_eq!(
            c.pep.as_ref().unwrap().response_timeout,
            Duration::from_millis(90)
        );
        assert_eq!(
            c.pep.as_ref().unwrap().max_waiting,
            3,
            "the rest of the table still applies"
        );
        let err = config("[pep]\naddress = \"a:1\"\ntimeout = 1\n", &[]).unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        let err = config("[pep.tls]\nca_file = \"/x\"\n", &[]).unwrap_err();
        assert!(matches!(err, Error::Pep(pep::Error::NoAddress(_))), "{err}");
    }

    #[test]
    fn dns_upstream_flag_and_resolv_conf() {
        assert_eq!(
            parse_dns_upstream("10.96.0.10:5353"),
            Ok("10.96.0.10:5353".parse().unwrap())
        );
        assert_eq!(
            parse_dns_upstream("10.96.0.10"),
            Ok("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(
            parse_dns_upstream("fd00::a"),
            Ok("[fd00::a]:53".parse().unwrap())
        );
        for bad in ["kube-dns:53", "10.0.0.1:0", "", "10.0.0.1:x"] {
            assert!(parse_dns_upstream(bad).is_err(), "{bad:?}");
        }
        let text = b"# generated\nsearch svc.cluster.local\nnameserver bogus\n\
            nameserver fe80::1%eth0\nnameserver 10.96.0.10\nnameserver 10.96.0.11\n";
        assert_eq!(
            first_nameserver(text),
            Some("10.96.0.10:53".parse().unwrap()),
            "the first usable one"
        );
        assert_eq!(
            first_nameserver(b"nameserver fe80::1%2\n"),
            Some("[fe80::1%2]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver(b"search x\n"), None);
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = T::try_parse_from([
            "t",
            "--pep",
            "127.0.0.1:3128",
            "--dns-upstream",
            "127.0.0.1:5300",
        ])
        .unwrap();
        let config = t.run.into_config().unwrap();
        assert_eq!(config.dns_upstream, Some("127.0.0.1:5300".parse().unwrap()));
        assert_eq!(config.veth_dns_port, DEFAULT_VETH_DNS_PORT);
        let t =
            T::try_parse_from(["t", "--pep", "127.0.0.1:3128", "--veth-dns-port", "0"]).unwrap();
        assert!(matches!(
            t.run.into_config(),
            Err(Error::Zero("veth-dns-port"))
        ));
    }

    #[test]
    fn relay_engine_from_flag_or_file() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("egress.toml");
        fs::write(&file, "relay = \"copy\"\n").unwrap();
        let config = |flags: &[&str]| {
            let mut argv = vec!["t", "--config", file.to_str().unwrap()];
            argv.extend_from_slice(flags);
            T::try_parse_from(argv).unwrap().run.into_config()
        };
        assert_eq!(config(&[]).unwrap().relay, relay::Mode::Copy);
        assert_eq!(
            config(&["--relay", "splice"]).unwrap().relay,
            relay::Mode::Splice,
            "the flag wins"
        );
        let defaults = T::try_parse_from(["t"]).unwrap().run.into_config().unwrap();
        assert_eq!(defaults.relay, relay::Mode::Splice);
        assert_eq!(defaults.relay_buffer, relay::DEFAULT_MAX_BUFFER);
        assert!(T::try_parse_from(["t", "--relay", "sendfile"]).is_err());
        assert!(matches!(
            config(&["--relay-buffer-bytes", "1073741824"]),
            Err(Error::RelayBufferTooLarge(_))
        ));
    }

    #[test]
    fn own_cgroup_mount_is_the_namespace_root_and_visible() {
        // A container: the runtime's cgroup2 at /sys/fs/cgroup (root `/` of its namespace),
        // then the host's hierarchy bind-mounted over it (root outside the namespace).
        let covered = "\
30 20 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
31 20 0:26 /../../.. /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
32 20 0:26 /../../.. /host/sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
";
        assert_eq!(namespace_root_mount(covered), None);
        let kept = "\
22 1 0:21 / /sys rw - sysfs sysfs rw
30 20 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
32 20 0:26 /../../.. /host/sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw
";
        assert_eq!(
            namespace_root_mount(kept),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A hybrid host: cgroup v1 controllers and the unified hierarchy.
        let hybrid = "\
25 22 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        assert_eq!(
            namespace_root_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(namespace_root_mount("garbage\n\n1 2"), None);
    }

    #[test]
    fn kubernetes_discovery_needs_a_node_name() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let parse = |flags: &[&str]| {
            let mut argv = vec!["t"];
            argv.extend_from_slice(flags);
            T::try_parse_from(argv).unwrap().run.into_config()
        };
        assert!(parse(&[]).unwrap().discovery.is_none());
        let err = parse(&["--discovery", "kubernetes"]).unwrap_err();
        assert!(matches!(err, Error::NoNodeName), "{err}");
        assert!(err.to_string().contains("--node-name"), "{err}");
        for bad in ["", "Node_1", "n,spec.nodeName!=x"] {
            assert!(
                matches!(
                    parse(&["--discovery", "kubernetes", "--node-name", bad]),
                    Err(Error::NodeName(_))
                ),
                "{bad:?}"
            );
        }
        let d = parse(&[
            "--discovery",
            "kubernetes",
            "--node-name",
            "worker-1.example",
            "--cgroup-root",
            "/host/cgroup",
            "--veth-runtime-classes",
            "gvisor, kata ,",
        ])
        .unwrap()
        .discovery
        .unwrap();
        assert_eq!(d.node_name, "worker-1.example");
        assert_eq!(d.layout.cgroup_root, PathBuf::from("/host/cgroup"));
        assert_eq!(d.layout.proc_root, PathBuf::from("/proc"));
        assert_eq!(d.veth_runtime_classes, ["gvisor", "kata"]);
        assert!(T::try_parse_from(["t", "--discovery", "nri"]).is_err());
    }

    #[test]
    fn own_cgroup_is_found() {
        let id = own_cgroup_id().expect("the test runs in a cgroup v2 hierarchy");
        assert_ne!(id, 0);
    }
}
