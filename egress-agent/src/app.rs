//! `egress-agent run`: load capture, take over the actors (config file, state file), serve the
//! control socket and the listeners until shutdown.
use std::{
    future::Future,
    io,
    sync::{Arc, Mutex},
};

use egress_common::Settings;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    access_log::{self, AccessLog},
    actors,
    admin::{self, Health},
    capture,
    config::{self, Config},
    control, ebpf,
    metrics::Metrics,
    netns, proxy,
};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading, attaching or pinning failed.
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    /// A listener could not be opened.
    #[error(transparent)]
    Capture(#[from] capture::Error),
    /// A namespace could not be inspected.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The agent's own cgroup is unknown.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The async runtime refused a socket.
    #[error("registering a listener with the runtime: {0}")]
    Runtime(io::Error),
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] control::Error),
    /// A configured actor could not be captured.
    #[error(transparent)]
    Actors(Box<actors::Error>),
    /// Discovery could not start (no usable Kubernetes client configuration).
    #[error(transparent)]
    Discovery(#[from] crate::discovery::Error),
    /// The policy file is unusable.
    #[error("{0}; fix the file (docs/policy.md) or leave --policy out (deny all)")]
    Policy(#[from] crate::policy::Error),
    /// The admin listener could not be opened.
    #[error(transparent)]
    Admin(#[from] admin::Error),
    /// A PEP's per-actor certificate source is unusable.
    #[error("pep.tls.actor_certs: {0}")]
    Certs(#[from] crate::certs::Error),
    /// The access log could not be opened.
    #[error(transparent)]
    AccessLog(#[from] access_log::Error),
}

impl From<actors::Error> for Error {
    fn from(e: actors::Error) -> Self {
        Error::Actors(Box::new(e))
    }
}

/// Runs the agent until `shutdown` resolves. Capture stays in force afterwards (pinned
/// programs, veth pairs and nftables tables): the actors' connections are refused until an
/// agent serves them again, or `egress-agent detach` / `actor remove` releases them.
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // The control socket first: a second agent on the same socket stops here, before it
    // touches anything the first one owns.
    let control = control::Server::bind(&config.control_socket)?;
    // The admin listener next, before capture is loaded: /healthz answers and /readyz says
    // what is not ready yet while the agent starts.
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    if let admin::Listen::Addr(addr) = config.admin_listen {
        let server = admin::Server::bind(addr).await?;
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(server.run(
            metrics.clone(),
            health.clone(),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )));
    }
    let access_log = AccessLog::open(&config.access_log, metrics.clone())?;
    if let Some(log) = &access_log {
        log.reopen_on_sighup();
    }
    let own_cookie = netns::own_cookie().map_err(|source| Error::Netns {
        path: "(the agent's own)".into(),
        source,
    })?;
    let mut capture = ebpf::Capture::load(&config.bpffs_dir)?;
    let logger = capture.take_logger();
    capture.set_settings(Settings {
        agent_netns: own_cookie,
        agent_cgroup: config::own_cgroup_id()?,
        agent_mark: config.socket_mark,
        _pad: 0,
    })?;
    health.set_programs_attached(true);
    // Discovery's check from the start, so /readyz never says ready before its first list.
    let discovery_synced = config.discovery.as_ref().map(|_| {
        let (tx, rx) = watch::channel(false);
        health.add_check("discovery", rx);
        tx
    });
    metrics.register_collector(Box::new(crate::metrics::MapSizes::new(
        config.bpffs_dir.clone(),
    )));

    if config.dns_upstream.is_none() {
        warn!(
            "no DNS upstream: actors' DNS queries will go unanswered; pass --dns-upstream IP:PORT \
             (env EGRESS_DNS_UPSTREAM) or give the node a `nameserver` in /etc/resolv.conf"
        );
    }
    let policy = Arc::new(crate::policy::Shared::new(config.policy.clone())?);
    info!(policy = %policy.current().summary(), "policy loaded");
    crate::policy::spawn_reloader(policy.clone());
    let registry = Arc::new(actors::Registry::default());
    let ctx = Arc::new(
        proxy::Context::new(config.clone(), registry.clone(), policy)?
            .with_metrics(metrics.clone())
            .with_health(health.clone())
            .with_access_log(access_log),
    );
    ctx.spawn_refresh();
    metrics.register_collector(Box::new(crate::metrics::PepLinks::new(&ctx)));
    // Netlink and nft block while the configured actors are set up.
    let manager = tokio::task::block_in_place(|| {
        actors::Manager::start(
            config.clone(),
            capture,
            registry,
            ctx,
            tokio::runtime::Handle::current(),
            stopped.clone(),
        )
    })?;
    let actors = manager.list().len();
    let manager = Arc::new(Mutex::new(manager));

    tasks.push(tokio::spawn(control.run(manager.clone(), stopped.clone())));
    let discovery = match &config.discovery {
        Some(options) => Some(
            crate::discovery::kube::Discovery::start(options, manager.clone(), stopped.clone())
                .await?,
        ),
        None => None,
    };
    if let (Some(discovery), Some(options)) = (&discovery, &config.discovery) {
        let shared = discovery.shared();
        if let Some(tx) = discovery_synced {
            let mut synced = shared.synced_watch();
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tx.send_replace(*synced.borrow_and_update());
                    tokio::select! {
                        changed = synced.changed() => if changed.is_err() { return },
                        _ = stopped.wait_for(|stop| *stop) => return,
                    }
                }
            }));
        }
        metrics.register_collector(Box::new(crate::metrics::DiscoveryStats::new(
            shared.stats().clone(),
        )));
        manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_discovery(options.node_name.clone(), shared);
    }
    if let Some(logger) = logger {
        tasks.push(tokio::spawn(kernel_logs(logger, stopped.clone())));
    }
    info!(
        actors,
        pep = %config.pep.as_ref().map_or("(none)".into(), |p| p.to_string()),
        bpffs_dir = %config.bpffs_dir.display(),
        listen_port = config.listen_port,
        veth_listen_port = config.veth_listen_port,
        veth_dns_port = config.veth_dns_port,
        dns_upstream = %config.dns_upstream.map_or("(none)".into(), |r| r.to_string()),
        control_socket = %config.control_socket.display(),
        admin = %config.admin_listen,
        access_log = %config.access_log,
        "ready"
    );
    shutdown.await;
    let _ = stop.send(true);
    // Discovery first: no registration may start after the manager has shut down.
    if let Some(discovery) = discovery {
        discovery.stopped().await;
    }
    manager.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    for task in tasks {
        let _ = task.await;
    }
    info!(
        bpffs_dir = %config.bpffs_dir.display(),
        "stopped; capture stays in force (actors' connections are refused until an agent \
         serves them again; `egress-agent detach` and `egress-agent actor remove` release it)"
    );
    Ok(())
}

/// Forwards the kernel programs' aya-log lines (refused connects) to the agent's log.
async fn kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    mut stopped: watch::Receiver<bool>,
) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open while the AsyncFd owns
    // the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        warn!("kernel program logs unavailable");
        return;
    };
    loop {
        tokio::select! {
            guard = logger.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = stopped.changed() => return,
        }
    }
}
