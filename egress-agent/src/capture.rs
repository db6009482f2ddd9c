//! The capture front for cgroup actors: the agent's listeners inside each actor network
//! namespace, and the accept loops that find each connection's record.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    path::Path,
    sync::Arc,
    time::Duration,
};

use egress_common::{ActorEntry, ConnKey};
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use crate::{ebpf, netns, proxy};

/// Pending-connection queue of each listener.
const BACKLOG: i32 = 4096;

/// Errors opening a listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be opened in the namespace.
    #[error("opening the agent listener on port {port} in {netns}: {source}")]
    Open {
        /// Namespace description.
        netns: String,
        /// Port.
        port: u16,
        /// The cause.
        source: io::Error,
    },
}

/// The agent's listeners in one network namespace: 127.0.0.1:port, and [::1]:port when the
/// namespace has IPv6.
pub struct Listener {
    /// Its cookie: part of every record key of connections accepted here.
    pub cookie: u64,
    port: u16,
    v4: StdListener,
    v6: Option<StdListener>,
}

impl Listener {
    /// Opens the listeners inside `netns` (bringing its loopback up if needed).
    pub fn open(netns: Option<&Path>, port: u16) -> Result<Self, Error> {
        let label = netns.map_or_else(
            || "the agent's network namespace".to_string(),
            |p| p.display().to_string(),
        );
        let err = |source| Error::Open {
            netns: label.clone(),
            port,
            source,
        };
        let (v4, v6, cookie, raised) = netns::run_in(netns, move || {
            let raised = netns::ensure_loopback_up()?;
            let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
            let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                Ok(l) => Some(l),
                // No IPv6 in this namespace: IPv6 connects of its actors are refused.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
            let cookie = netns::cookie(&v4)?;
            Ok((v4, v6, cookie, raised))
        })
        .map_err(err)?;
        if raised {
            info!(netns = %label, "loopback was down; brought it up");
        }
        if v6.is_none() {
            warn!(netns = %label, "no IPv6 loopback: IPv6 connects from its actors will be refused");
        }
        Ok(Listener {
            cookie,
            port,
            v4,
            v6,
        })
    }

    /// The actor map entry pointing at these listeners.
    pub fn entry(&self) -> ActorEntry {
        ActorEntry::new(
            Some(Ipv4Addr::LOCALHOST),
            self.v6.as_ref().map(|_| Ipv6Addr::LOCALHOST),
            self.port,
        )
    }

    /// Addresses listened on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))];
        if self.v6.is_some() {
            addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, self.port)));
        }
        addrs
    }

    /// Serves the listeners from the current runtime until `shutdown` changes; each accept
    /// loop has its own handle on the pinned record map.
    pub fn spawn(
        self,
        bpffs_dir: &Path,
        ctx: Arc<proxy::Context>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::app::Error> {
        let mut tasks = Vec::new();
        for std_listener in std::iter::once(self.v4).chain(self.v6) {
            let listener =
                TcpListener::from_std(std_listener).map_err(crate::app::Error::Runtime)?;
            let conns = ebpf::Conns::open(bpffs_dir)?;
            tasks.push(tokio::spawn(accept_loop(
                listener,
                self.cookie,
                conns,
                ctx.clone(),
                shutdown.clone(),
            )));
        }
        Ok(tasks)
    }
}

fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    cookie: u64,
    mut conns: ebpf::Conns,
    ctx: Arc<proxy::Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, client) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let record = conns.take(&ConnKey::new(cookie, client));
        ctx.accept(stream, client, record);
    }
}
