//! The agent's listeners, one per capture front and network namespace, and the accept loops
//! that find where each connection was going: the record cgroup eBPF published (loopback
//! listeners in cgroup actors' namespaces), or `SO_ORIGINAL_DST` of an nftables redirect (the
//! 0.0.0.0 listener of each veth worker namespace).
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

use crate::{ebpf, netns, proxy, socket};

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

/// Which capture front a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Front {
    /// cgroup eBPF: 127.0.0.1 and ::1 in a cgroup actor's namespace; records in the map.
    Ebpf,
    /// nftables redirect: 0.0.0.0 in a veth worker namespace; `SO_ORIGINAL_DST`.
    Nat,
}

/// The agent's listeners of one front in one network namespace: 127.0.0.1:port and
/// [::1]:port (when the namespace has IPv6) for the eBPF front, 0.0.0.0:port for the NAT
/// front.
pub struct Listener {
    /// Its namespace's cookie: part of every record key of connections accepted here, and of
    /// the veth actor addresses.
    pub cookie: u64,
    front: Front,
    port: u16,
    v4: StdListener,
    v6: Option<StdListener>,
}

impl Listener {
    /// Opens the listeners inside `netns` (bringing its loopback up if needed).
    pub fn open(netns: Option<&Path>, port: u16) -> Result<Self, Error> {
        let label = netns::label(netns);
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
            front: Front::Ebpf,
            port,
            v4,
            v6,
        })
    }

    /// Opens the NAT front's listener on 0.0.0.0:`port` inside the worker namespace `netns`:
    /// nftables `redirect` rewrites the destination to the address of the interface the packet
    /// came in on (the worker end of a veth), so a loopback listener would not see it.
    pub fn open_nat(netns: Option<&Path>, port: u16) -> Result<Self, Error> {
        let label = netns::label(netns);
        let (v4, cookie) = netns::run_in(netns, move || {
            let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            let cookie = netns::cookie(&v4)?;
            Ok((v4, cookie))
        })
        .map_err(|source| Error::Open {
            netns: label,
            port,
            source,
        })?;
        Ok(Listener {
            cookie,
            front: Front::Nat,
            port,
            v4,
            v6: None,
        })
    }

    /// Addresses listened on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        if self.front == Front::Nat {
            return vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.port))];
        }
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))];
        if self.v6.is_some() {
            addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, self.port)));
        }
        addrs
    }

    /// Serves the listeners from the current runtime until `shutdown` changes (or the tasks
    /// are aborted); each eBPF accept loop has its own handle on the pinned record map.
    pub fn spawn(
        self,
        bpffs_dir: &Path,
        ctx: Arc<proxy::Context>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::app::Error> {
        // Everything that can fail first: an error must not leave one loop running unowned.
        let mut ready = Vec::new();
        for std_listener in std::iter::once(self.v4).chain(self.v6) {
            let listener =
                TcpListener::from_std(std_listener).map_err(crate::app::Error::Runtime)?;
            let origin = match self.front {
                Front::Ebpf => Origin::Records(ebpf::Conns::open(bpffs_dir)?),
                Front::Nat => Origin::Nat,
            };
            ready.push((listener, origin));
        }
        let mut tasks = Vec::new();
        for (listener, origin) in ready {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                self.cookie,
                origin,
                ctx.clone(),
                shutdown.clone(),
            )));
        }
        Ok(tasks)
    }
}

/// The actor map entry pointing at an eBPF front's listeners on `port`: 127.0.0.1, and ::1
/// when the namespace has IPv6 (`v6`).
pub fn ebpf_entry(v6: bool, port: u16) -> ActorEntry {
    ActorEntry::new(
        Some(Ipv4Addr::LOCALHOST),
        v6.then_some(Ipv6Addr::LOCALHOST),
        port,
    )
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

/// Where an accept loop learns a connection's original destination.
enum Origin {
    /// The eBPF record map.
    Records(ebpf::Conns),
    /// conntrack, through `SO_ORIGINAL_DST`.
    Nat,
}

async fn accept_loop(
    listener: TcpListener,
    cookie: u64,
    mut origin: Origin,
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
        let captured = match &mut origin {
            Origin::Records(conns) => {
                proxy::Captured::Record(conns.take(&ConnKey::new(cookie, client)))
            }
            Origin::Nat => proxy::Captured::Nat {
                netns: cookie,
                original_dst: socket::original_dst(&stream),
            },
        };
        ctx.accept(stream, client, captured);
    }
}
