//! `egress-agent`: parse the command line, set up logging, run.
use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use egress_agent::{app, config, ebpf};
use tracing::info;

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
    Run(config::RunArgs),
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            let config = Arc::new(args.into_config()?);
            info!(
                pep = %config.pep,
                actors = ?config.actors.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                bpffs_dir = %config.bpffs_dir.display(),
                listen_port = config.listen_port,
                peek_timeout_ms = config.peek.timeout.as_millis() as u64,
                peek_max_bytes = config.peek.max_bytes,
                pep_timeout_ms = config.pep_timeout.as_millis() as u64,
                socket_mark = format!("{:#x}", config.socket_mark),
                relay_buffer_bytes = config.relay_buffer,
                max_connections = config.max_connections,
                "starting"
            );
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
    }
    Ok(())
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
