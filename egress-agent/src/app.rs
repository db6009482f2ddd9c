//! `egress-agent run`: load and attach capture, open the listeners, serve until shutdown.
use std::{collections::BTreeMap, future::Future, io, path::PathBuf, sync::Arc};

use egress_common::Settings;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    capture,
    config::{self, Config},
    ebpf, netns, proxy,
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
}

/// Runs the agent until `shutdown` resolves. Capture stays attached afterwards (pinned): the
/// actors' connects fail until an agent serves them again or `egress-agent detach` runs.
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
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

    // One listener per distinct network namespace; actors sharing one share it.
    let own_identity = netns::identity(None).map_err(|source| Error::Netns {
        path: "/proc/thread-self/ns/net".into(),
        source,
    })?;
    let mut by_netns: BTreeMap<(u64, u64), (Option<PathBuf>, Vec<usize>)> = BTreeMap::new();
    for (i, actor) in config.actors.iter().enumerate() {
        let identity = netns::identity(actor.netns.as_deref()).map_err(|source| Error::Netns {
            path: actor
                .netns
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            source,
        })?;
        let netns = if identity == own_identity {
            None
        } else {
            actor.netns.clone()
        };
        by_netns
            .entry(identity)
            .or_insert_with(|| (netns, Vec::new()))
            .1
            .push(i);
    }
    let mut listeners = Vec::new();
    for (netns, actors) in by_netns.into_values() {
        // One namespace whose listener cannot be opened (say, a process there holds the port)
        // must not take the other actors down: its actors stay captured with no listener, so
        // their connects are refused, and the error says why.
        let listener = match capture::Listener::open(netns.as_deref(), config.listen_port) {
            Ok(listener) => Some(listener),
            Err(e) => {
                error!(error = %e, "actors in this namespace stay captured but unserved: their connects are refused");
                None
            }
        };
        let entry = listener.as_ref().map(capture::Listener::entry);
        for i in actors {
            let actor = &config.actors[i];
            capture.register(&actor.cgroup, actor.cgroup_id, entry)?;
            info!(
                actor = %actor.id,
                template = %actor.template,
                template_namespace = %actor.template_namespace,
                cgroup = %actor.cgroup.display(),
                cgroup_id = actor.cgroup_id,
                netns = %netns.as_ref().map_or("(agent's)".into(), |p| p.display().to_string()),
                listeners = ?listener.as_ref().map(capture::Listener::addrs).unwrap_or_default(),
                "actor captured"
            );
        }
        listeners.extend(listener);
    }
    let configured: std::collections::BTreeSet<u64> =
        config.actors.iter().map(|a| a.cgroup_id).collect();
    for stale in capture.pinned_cgroups().difference(&configured) {
        warn!(
            cgroup_id = stale,
            dir = %capture.dir().display(),
            "a cgroup is still captured by an earlier agent but is not configured: its connects \
             are refused or reset, never sent out, until it is configured again or released \
             with `egress-agent detach --cgroup PATH` (or `--cgroup-id ID`)"
        );
    }

    let ctx = Arc::new(proxy::Context::new(config.clone()));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    for listener in listeners {
        tasks.extend(listener.spawn(&config.bpffs_dir, ctx.clone(), stopped.clone())?);
    }
    if let Some(logger) = logger {
        tasks.push(tokio::spawn(kernel_logs(logger, stopped.clone())));
    }
    info!(
        actors = config.actors.len(),
        pep = %config.pep,
        bpffs_dir = %config.bpffs_dir.display(),
        listen_port = config.listen_port,
        "ready"
    );
    shutdown.await;
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    info!(
        bpffs_dir = %config.bpffs_dir.display(),
        "stopped; capture stays attached (actors' connects are refused until an agent serves \
         them again; `egress-agent detach` removes it)"
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
