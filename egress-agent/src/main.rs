//! `egress-agent`: parse the command line, set up logging, run.
use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use egress_agent::{
    app,
    config::{self, ActorSpec},
    control::Request,
    ebpf,
    net::nft::Inbound,
};
use tracing::{info, warn};

/// Captures sandboxed actors' outbound TCP and tunnels it to a policy enforcement point.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "EGRESS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach capture to the configured actors and tunnel their connections to the PEP.
    Run(Box<config::RunArgs>),
    /// Remove capture: every pinned program, link and map (or one cgroup's links).
    Detach {
        /// bpffs directory of the pins.
        #[arg(long, env = "EGRESS_BPFFS_DIR", default_value = ebpf::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
        /// Release only this actor cgroup (its links and actor entry).
        #[arg(long, env = "EGRESS_DETACH_CGROUP", conflicts_with = "cgroup_id")]
        cgroup: Option<PathBuf>,
        /// Release only the cgroup with this id (the name of its directory under
        /// `<bpffs-dir>/links/`), e.g. one whose directory was already removed.
        #[arg(long, env = "EGRESS_DETACH_CGROUP_ID")]
        cgroup_id: Option<u64>,
    },
    /// Add, remove, list or re-apply actors of the running agent (over its control socket).
    Actor {
        #[command(flatten)]
        control: ControlArgs,
        #[command(subcommand)]
        command: ActorCommand,
    },
    /// What the running agent is doing: versions, uptime, PEP, policy, readiness, actors,
    /// listeners, attached programs and map sizes (over its control socket).
    Status {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Decoded contents of the pinned maps, read from bpffs directly (no agent needed).
    Maps {
        /// bpffs directory of the pins.
        #[arg(long, env = "EGRESS_BPFFS_DIR", default_value = ebpf::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
        /// Only this map (e.g. `EGRESS_ACTORS`).
        #[arg(long)]
        map: Option<String>,
        /// Most entries shown per map.
        #[arg(long, default_value_t = ebpf::dump::DEFAULT_LIMIT)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Veth mode (gVisor, microVM actors): `up` adds a veth actor, `down` removes it,
    /// `reapply` restores its side after the runtime cleared it. Same as `actor add|remove|reapply`.
    Veth {
        #[command(flatten)]
        control: ControlArgs,
        #[command(subcommand)]
        command: VethCommand,
    },
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The running agent's control socket.
    #[arg(long, env = "EGRESS_CONTROL_SOCKET", default_value = config::DEFAULT_CONTROL_SOCKET, global = true)]
    control_socket: PathBuf,
    /// Print the agent's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum ActorCommand {
    /// Capture a new actor: `--cgroup` for a process actor, `--veth` for a gVisor/microVM one.
    Add(AddArgs),
    /// Stop capturing an actor: release its cgroup, or delete its veth pair and rules.
    Remove {
        /// Actor id.
        id: String,
    },
    /// List the actors.
    List,
    /// Re-apply a veth actor's side (address, route, links up), e.g. after gVisor cleared it.
    Reapply {
        /// Actor id.
        id: String,
    },
}

#[derive(Subcommand)]
enum VethCommand {
    /// Add a veth actor (same as `actor add --veth`).
    Up(VethArgs),
    /// Remove a veth actor: its pair, its address and its rules.
    Down {
        /// Actor id.
        id: String,
    },
    /// Re-apply a veth actor's side.
    Reapply {
        /// Actor id.
        id: String,
    },
}

#[derive(clap::Args)]
struct Identity {
    /// Actor id (`x-ate-actor-id`).
    #[arg(long)]
    id: String,
    /// Actor template.
    #[arg(long, default_value = "")]
    template: String,
    /// Template namespace.
    #[arg(long, default_value = "")]
    template_namespace: String,
    /// The PEP for this actor: a `[peps.NAME]` name, `default` (the global one) or `none`
    /// (the embedded policy); omitted: its template namespace's, else the global one.
    #[arg(long)]
    pep: Option<String>,
}

#[derive(clap::Args)]
struct AddArgs {
    #[command(flatten)]
    identity: Identity,
    /// cgroup v2 directory of a process actor.
    #[arg(long, conflicts_with = "veth")]
    cgroup: Option<PathBuf>,
    /// A veth actor (gVisor, microVM): needs --netns, optionally --worker-netns.
    #[arg(long)]
    veth: bool,
    /// The actor's network namespace file (where a process actor's listener goes, or where a
    /// veth actor's `eth0` is made).
    #[arg(long)]
    netns: Option<PathBuf>,
    #[command(flatten)]
    veth_args: VethOptions,
}

#[derive(clap::Args)]
struct VethArgs {
    #[command(flatten)]
    identity: Identity,
    /// The actor's network namespace file (its end of the pair becomes `eth0` there).
    #[arg(long)]
    netns: PathBuf,
    #[command(flatten)]
    veth_args: VethOptions,
}

#[derive(clap::Args)]
struct VethOptions {
    /// The worker (pod) network namespace file; omitted: the agent's own.
    #[arg(long)]
    worker_netns: Option<PathBuf>,
    /// A port forwarded from the worker's addresses to the actor, `tcp/PORT` or `udp/PORT`;
    /// repeat for more.
    #[arg(long)]
    inbound: Vec<Inbound>,
    /// Masquerade the actor's UDP instead of dropping it.
    #[arg(long)]
    allow_udp: bool,
}

impl VethOptions {
    fn spec(self) -> config::VethSpec {
        config::VethSpec {
            worker_netns: self.worker_netns,
            inbound: self.inbound,
            allow_udp: self.allow_udp,
        }
    }

    fn given(&self) -> bool {
        self.worker_netns.is_some() || !self.inbound.is_empty() || self.allow_udp
    }
}

impl From<VethArgs> for AddArgs {
    /// `veth up` is `actor add --veth`.
    fn from(args: VethArgs) -> Self {
        AddArgs {
            identity: args.identity,
            cgroup: None,
            veth: true,
            netns: Some(args.netns),
            veth_args: args.veth_args,
        }
    }
}

impl AddArgs {
    fn spec(self) -> anyhow::Result<ActorSpec> {
        if !self.veth && self.veth_args.given() {
            anyhow::bail!(
                "--worker-netns, --inbound and --allow-udp are for veth actors: add --veth"
            );
        }
        Ok(ActorSpec {
            id: self.identity.id,
            template: self.identity.template,
            template_namespace: self.identity.template_namespace,
            cgroup: self.cgroup,
            netns: self.netns,
            veth: self.veth.then(|| self.veth_args.spec()),
            pep: self.identity.pep,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let config = Arc::new(args.into_config()?);
            info!(
                pep = %config.pep.as_ref().map_or("(none: the agent decides with the policy)".into(), |p| p.to_string()),
                policy = %config.policy.as_ref().map_or("(none: deny all where the agent decides)".into(), |p| p.display().to_string()),
                actors = ?config.actors.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                bpffs_dir = %config.bpffs_dir.display(),
                listen_port = config.listen_port,
                peek_timeout_ms = config.peek.timeout.as_millis() as u64,
                peek_max_bytes = config.peek.max_bytes,
                socket_mark = format!("{:#x}", config.socket_mark),
                relay_buffer_bytes = config.relay_buffer,
                relay = %config.relay,
                max_connections = config.max_connections,
                control_socket = %config.control_socket.display(),
                state_dir = %config.state_dir.display(),
                veth_pool = %config.veth_pool,
                dns_upstream = %config.dns_upstream.map_or("(none)".into(), |r| r.to_string()),
                veth_listen_port = config.veth_listen_port,
                veth_dns_port = config.veth_dns_port,
                "starting"
            );
            if let Some(pep) = &config.pep {
                info!(
                    pep = %pep,
                    pep_tls = pep.tls.is_some(),
                    pep_tls_server_name = pep.tls.as_ref().map_or(String::new(), |t| t.server_name.to_str().into_owned()),
                    pep_tls_client_cert = pep.tls.as_ref().is_some_and(|t| t.client_cert_file.is_some()),
                    pep_proxy_authorization = pep.authorization.is_some(),
                    pep_connect_timeout_ms = pep.connect_timeout.as_millis() as u64,
                    pep_timeout_ms = pep.response_timeout.as_millis() as u64,
                    pep_max_connecting = pep.max_connecting,
                    pep_max_waiting = pep.max_waiting,
                    "PEP link"
                );
            }
            raise_open_files_limit(config.max_connections);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(app::run(config, shutdown_signal()))?;
        }
        Command::Detach {
            bpffs_dir,
            cgroup,
            cgroup_id,
        } => {
            let id = match &cgroup {
                Some(path) => Some(config::cgroup_id(path).map_err(anyhow::Error::msg)?),
                None => cgroup_id,
            };
            let done = ebpf::detach(&bpffs_dir, id)?;
            println!(
                "detached: {} link(s) and {} map(s) removed under {}",
                done.links,
                done.maps,
                bpffs_dir.display()
            );
        }
        Command::Actor { control, command } => {
            let request = match command {
                ActorCommand::Add(args) => Request::Add(args.spec()?),
                ActorCommand::Remove { id } => Request::Remove { id },
                ActorCommand::List => Request::List,
                ActorCommand::Reapply { id } => Request::Reapply { id },
            };
            send(&control, &request)?;
        }
        Command::Status { control } => {
            let response =
                egress_agent::control::request(&control.control_socket, &Request::Status)?;
            let report = match (response.ok, response.status) {
                (true, Some(report)) => report,
                (true, None) => anyhow::bail!(
                    "the agent at {} does not know the `status` request: it is older than this \
                     binary; use `egress-agent actor list`",
                    control.control_socket.display()
                ),
                (false, _) => anyhow::bail!(
                    "{}",
                    response.error.unwrap_or_else(|| "the agent refused".into())
                ),
            };
            if control.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", egress_agent::status::render(&report));
            }
        }
        Command::Maps {
            bpffs_dir,
            map,
            limit,
            json,
        } => {
            let dumps = ebpf::dump::dump_maps(&bpffs_dir, map.as_deref(), limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dumps)?);
            } else {
                print!("{}", ebpf::dump::render(&dumps));
            }
        }
        Command::Veth { control, command } => {
            let request = match command {
                VethCommand::Up(args) => Request::Add(AddArgs::from(args).spec()?),
                VethCommand::Down { id } => Request::Remove { id },
                VethCommand::Reapply { id } => Request::Reapply { id },
            };
            send(&control, &request)?;
        }
    }
    Ok(())
}

/// Sends one control request and prints the answer: a line per actor, or JSON.
fn send(control: &ControlArgs, request: &Request) -> anyhow::Result<()> {
    let response = egress_agent::control::request(&control.control_socket, request)?;
    if control.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    }
    if !response.ok {
        anyhow::bail!(
            "{}",
            response.error.unwrap_or_else(|| "the agent refused".into())
        );
    }
    if !control.json {
        for status in &response.actors {
            println!("{}", status_line(status));
        }
    }
    Ok(())
}

fn status_line(s: &egress_agent::actors::Status) -> String {
    let a = &s.actor;
    let mut line = format!(
        "{} template={:?} template_namespace={:?} source={} capture={} pep={:?}",
        a.id,
        a.template,
        a.template_namespace,
        s.source.as_str(),
        s.capture,
        s.pep
    );
    if let Some(cgroup) = &a.cgroup {
        line += &format!(
            " cgroup={} cgroup_id={}",
            cgroup.display(),
            s.cgroup_id.unwrap_or(0)
        );
    }
    if let Some(netns) = &a.netns {
        line += &format!(" netns={}", netns.display());
    }
    if let Some(v) = &a.veth {
        if let Some(w) = &v.worker_netns {
            line += &format!(" worker_netns={}", w.display());
        }
        let inbound: Vec<String> = v.inbound.iter().map(ToString::to_string).collect();
        line += &format!(" inbound=[{}] allow_udp={}", inbound.join(","), v.allow_udp);
    }
    if let Some(p) = &s.pair {
        line += &format!(
            " veth={} address={}/{} gateway={}",
            p.worker_if, p.actor, p.prefix_len, p.worker
        );
    }
    if let Some(d) = s.dropped_packets {
        line += &format!(" dropped_packets={d}");
    }
    let listeners: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
    line += &format!(" listeners=[{}]", listeners.join(","));
    if !s.dns.is_empty() {
        let dns: Vec<String> = s.dns.iter().map(ToString::to_string).collect();
        line += &format!(" dns=[{}]", dns.join(","));
    }
    line
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(false).init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers only a kill ends the agent; capture stays pinned either way.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// Most open files the agent asks for when its hard limit is unlimited (Linux's default
/// `fs.nr_open`).
const MAX_OPEN_FILES: u64 = 1 << 20;

/// Raises the soft open-files limit to the hard one: each tunnel holds two sockets (and a pipe
/// per direction while splicing), so the usual soft limit of 1,024 would cap the agent at a
/// few hundred connections. Warns when even the hard limit is short of `--max-connections`.
fn raise_open_files_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(MAX_OPEN_FILES);
            if soft >= want {
                soft
            } else {
                match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                    Ok(()) => {
                        info!(from = soft, to = want, "open-files limit raised");
                        want
                    }
                    Err(e) => {
                        warn!(soft, hard, error = %e,
                            "could not raise the open-files limit: connections beyond it are refused \
                             (raise LimitNOFILE / ulimit -n)");
                        soft
                    }
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "reading the open-files limit");
            return;
        }
    };
    // Two sockets per tunnel, plus listeners, DNS sockets, pipes and the eBPF maps and links.
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(1024);
    if limit < needed {
        warn!(
            open_files = limit,
            needed,
            "the open-files limit is below 2 x --max-connections: past it, connections are \
             refused; raise the hard limit (LimitNOFILE=, the container runtime's ulimit) or \
             lower --max-connections"
        );
    }
}
