//! The veth pair between a worker network namespace and an actor network namespace.
//!
//! The worker end (`egressN`) stays in the worker namespace, the other end becomes the actor's
//! `eth0`; both get an address from one /30 of a [`Pool`] and the actor's default route points
//! at the worker end, so every packet the actor sends crosses the worker's nftables table.
//!
//! All functions block: each runs its netlink work on a short-lived thread inside the
//! namespace ([`crate::netns::run_in`]) with a current-thread runtime built there, because a
//! netlink socket talks to the namespace of the thread that created it. Call them from
//! `tokio::task::spawn_blocking`.
use std::{
    fmt,
    fs::File,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    str::FromStr,
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage},
        nsid::{NsidAttribute, NsidMessage},
    },
};

/// The name of the actor's end of the pair inside the actor namespace.
pub const ACTOR_IF: &str = "eth0";

/// Worker-end interface names are this prefix plus the slot number.
pub const WORKER_IF_PREFIX: &str = "egress";

/// Every pair is a point-to-point /30: network, worker, actor, broadcast.
const PAIR_PREFIX_LEN: u8 = 30;

/// A pool of /30s the pairs are addressed from, written as an aligned IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pool {
    base: Ipv4Addr,
    prefix_len: u8,
}

impl Pool {
    /// How many /30 pairs fit in the pool.
    pub fn capacity(&self) -> u32 {
        1 << (PAIR_PREFIX_LEN - self.prefix_len)
    }

    /// The pair of slot `slot`, `None` when the slot lies outside the pool.
    pub fn pair(&self, slot: u32) -> Option<Pair> {
        if slot >= self.capacity() {
            return None;
        }
        let net = u32::from(self.base) + slot * 4;
        Some(Pair {
            slot,
            worker_if: format!("{WORKER_IF_PREFIX}{slot}"),
            worker: Ipv4Addr::from(net + 1),
            actor: Ipv4Addr::from(net + 2),
            prefix_len: PAIR_PREFIX_LEN,
        })
    }

    /// The slot a worker-end interface name (`egressN`) stands for, if it is one of this pool's.
    pub fn slot_of(&self, worker_if: &str) -> Option<u32> {
        let slot = parse_worker_if(worker_if)?;
        (slot < self.capacity()).then_some(slot)
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            base: Ipv4Addr::new(10, 200, 0, 0),
            prefix_len: 24,
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl FromStr for Pool {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidPool {
            input: s.to_string(),
            reason,
        };
        let (addr, len) = s.split_once('/').ok_or(invalid("no /prefix length"))?;
        let base: Ipv4Addr = addr.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let prefix_len: u8 = len.parse().map_err(|_| invalid("bad prefix length"))?;
        if prefix_len > PAIR_PREFIX_LEN {
            return Err(invalid("prefix longer than /30 holds no pair"));
        }
        // Names are `egress` + slot and must fit IFNAMSIZ (15): at most 9 digits of slot.
        if prefix_len < 8 {
            return Err(invalid("prefix shorter than /8 is more slots than names"));
        }
        let host_bits = u32::MAX >> prefix_len;
        if u32::from(base) & host_bits != 0 {
            return Err(invalid("base address has host bits set"));
        }
        Ok(Pool { base, prefix_len })
    }
}

impl TryFrom<String> for Pool {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Pool> for String {
    fn from(pool: Pool) -> String {
        pool.to_string()
    }
}

/// One /30 of a pool: the worker end's name and both addresses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pair {
    /// The slot in the pool this pair was cut from.
    pub slot: u32,
    /// The worker end's interface name, `egress<slot>`.
    pub worker_if: String,
    /// The worker end's address: the actor's gateway.
    pub worker: Ipv4Addr,
    /// The actor's `eth0` address.
    pub actor: Ipv4Addr,
    /// The prefix length of both addresses (30).
    pub prefix_len: u8,
}

/// What [`up`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Up {
    /// The pair was created by this call (false: an existing, verified pair was adopted).
    pub created: bool,
}

/// Errors of the veth module; each names the namespace and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pool string that is not an aligned IPv4 CIDR of a usable size.
    #[error(
        "invalid veth pool {input:?}: {reason}; expected an aligned IPv4 CIDR with a prefix \
         length from 8 to 30, e.g. 10.200.0.0/24"
    )]
    InvalidPool {
        /// The string given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Entering a namespace (or spawning the thread for it) failed.
    #[error("entering network namespace {netns}: {source}; does the namespace still exist?")]
    Netns {
        /// The namespace.
        netns: String,
        /// The cause.
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("{op} in network namespace {netns}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The namespace.
        netns: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// The actor namespace has an `eth0` that is not this pair's peer.
    #[error(
        "actor network namespace {actor_netns} already has an {ACTOR_IF} that is not the peer \
         of {worker_if}; nothing was created. Give the actor a fresh namespace or remove that \
         interface"
    )]
    ActorIfTaken {
        /// The actor namespace.
        actor_netns: String,
        /// The worker end that was to be created.
        worker_if: String,
    },
    /// The worker end exists but is not paired with the actor's `eth0`.
    #[error(
        "{worker_if} exists in worker network namespace {worker_netns} but is not paired with \
         {ACTOR_IF} of {actor_netns} ({detail}); another actor may own this slot: pick another \
         slot, or delete the stale interface (`ip -n WORKER link del {worker_if}`)"
    )]
    NotOurPeer {
        /// The worker end.
        worker_if: String,
        /// The worker namespace.
        worker_netns: String,
        /// The actor namespace.
        actor_netns: String,
        /// Which check failed.
        detail: String,
    },
    /// An interface with our name that is not a veth: never ours to change or delete.
    #[error(
        "{name} in network namespace {netns} is not a veth; refusing to touch it. Rename it or \
         use another pool"
    )]
    NotVeth {
        /// The interface.
        name: String,
        /// The namespace.
        netns: String,
    },
    /// [`reapply`] on an actor namespace without `eth0`.
    #[error(
        "actor network namespace {actor_netns} has no {ACTOR_IF}: the pair is gone (was the namespace recreated?); remove the actor and add it again"
    )]
    ActorIfMissing {
        /// The actor namespace.
        actor_netns: String,
    },
    /// Reading or writing net.ipv4.ip_forward failed.
    #[error("setting net.ipv4.ip_forward in network namespace {netns}: {source}")]
    Forwarding {
        /// The namespace.
        netns: String,
        /// The cause.
        source: io::Error,
    },
}

/// Creates (or adopts, if it already exists exactly as `pair` says) the pair between the
/// worker namespace (`None`: the calling process's own) and `actor_netns`, addresses both ends,
/// brings them and the actor's `lo` up and routes the actor's default via the worker end.
///
/// The pair is created in one netlink request with the peer already named `eth0` inside the
/// actor namespace, so a taken `eth0` fails the request and nothing half-made is left; if a
/// later step fails, the pair this call created is deleted again.
///
/// Adoption checks that the existing worker end is a veth whose peer (IFLA_LINK, and
/// IFLA_LINK_NETNSID compared with the actor namespace's id as the worker namespace knows it)
/// is the actor's `eth0`, so another actor's pair is never adopted.
pub fn up(worker_netns: Option<&Path>, actor_netns: &Path, pair: &Pair) -> Result<Up, Error> {
    let actor_name = crate::netns::label(Some(actor_netns));
    let actor_path = actor_netns.to_path_buf();
    let actor_if = with_netlink(Some(actor_netns), |h, ns| async move {
        link_by_name(&h, &ns, ACTOR_IF).await
    })?;
    let actor_if_index = actor_if.as_ref().map(|l| l.header.index);

    let p = pair.clone();
    let actor_for_worker = actor_name.clone();
    let worker = with_netlink(worker_netns, move |h, ns| async move {
        worker_side(&h, &ns, &actor_path, &actor_for_worker, actor_if_index, &p).await
    })?;

    let p = pair.clone();
    let peer_index = worker.peer_index;
    let worker_name = crate::netns::label(worker_netns);
    let configured = with_netlink(Some(actor_netns), move |h, ns| async move {
        let link = link_by_name(&h, &ns, ACTOR_IF)
            .await?
            .ok_or(Error::ActorIfMissing {
                actor_netns: ns.clone(),
            })?;
        if link.header.index != peer_index {
            return Err(Error::NotOurPeer {
                worker_if: p.worker_if.clone(),
                worker_netns: worker_name,
                actor_netns: ns.clone(),
                detail: format!(
                    "{ACTOR_IF} has index {}, the peer has {}",
                    link.header.index, peer_index
                ),
            });
        }
        configure_actor(&h, &ns, link.header.index, &p).await
    });
    if let Err(e) = configured {
        if worker.created {
            // Leave nothing half-made: deleting the worker end deletes eth0 with it.
            if let Err(cleanup) = down(worker_netns, pair) {
                tracing::warn!(error = %cleanup, worker_if = %pair.worker_if, "removing the half-made pair");
            }
        }
        return Err(e);
    }
    Ok(Up {
        created: worker.created,
    })
}

/// Re-adds the actor side's address, `eth0` and `lo` up state and default route (gVisor's
/// runsc deletes eth0's addresses and routes when a sandbox starts). Idempotent.
///
/// It does not re-verify the peer: only [`up`] creates the actor's `eth0`.
pub fn reapply(actor_netns: &Path, pair: &Pair) -> Result<(), Error> {
    let p = pair.clone();
    with_netlink(Some(actor_netns), move |h, ns| async move {
        let link = link_by_name(&h, &ns, ACTOR_IF)
            .await?
            .ok_or(Error::ActorIfMissing {
                actor_netns: ns.clone(),
            })?;
        configure_actor(&h, &ns, link.header.index, &p).await
    })
}

/// Deletes the worker end, which deletes the pair; `Ok(false)` when it did not exist.
pub fn down(worker_netns: Option<&Path>, pair: &Pair) -> Result<bool, Error> {
    let name = pair.worker_if.clone();
    with_netlink(worker_netns, move |h, ns| async move {
        let Some(link) = link_by_name(&h, &ns, &name).await? else {
            return Ok(false);
        };
        if !is_veth(&link) {
            return Err(Error::NotVeth { name, netns: ns });
        }
        match h.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between (its actor namespace was deleted): the outcome we wanted.
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(netlink_error(format!("deleting {name}"), &ns, e)),
        }
    })
}

/// Names of the interfaces in the worker namespace that look like ours (`egress` + digits),
/// for adoption on restart and slot allocation.
pub fn list(worker_netns: Option<&Path>) -> Result<Vec<String>, Error> {
    with_netlink(worker_netns, |h, ns| async move {
        let mut links = h.link().get().execute();
        let mut names = Vec::new();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| netlink_error("listing links", &ns, e))?
        {
            if let Some(name) = link_name(&link)
                && parse_worker_if(name).is_some()
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    })
}

/// Sets net.ipv4.ip_forward=1 in the worker namespace; returns whether it changed.
///
/// /proc/sys/net resolves to the network namespace of the thread that opens the file, so the
/// file is opened from a thread inside the worker namespace.
pub fn enable_forwarding(worker_netns: Option<&Path>) -> Result<bool, Error> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let netns = crate::netns::label(worker_netns);
    crate::netns::run_in(worker_netns, || {
        if std::fs::read_to_string(PATH)?.trim() == "1" {
            return Ok(false);
        }
        std::fs::write(PATH, "1\n")?;
        Ok(true)
    })
    .map_err(|source| Error::Forwarding { netns, source })
}

/// The worker end's indices once it exists.
struct WorkerEnd {
    created: bool,
    peer_index: u32,
}

async fn worker_side(
    h: &Handle,
    ns: &str,
    actor_path: &Path,
    actor_name: &str,
    actor_if_index: Option<u32>,
    pair: &Pair,
) -> Result<WorkerEnd, Error> {
    let name = &pair.worker_if;
    let mismatch = |detail: String| Error::NotOurPeer {
        worker_if: name.clone(),
        worker_netns: ns.to_string(),
        actor_netns: actor_name.to_string(),
        detail,
    };
    let actor_file = File::open(actor_path).map_err(|source| Error::Netns {
        netns: actor_name.to_string(),
        source,
    })?;
    let (created, link) = match link_by_name(h, ns, name).await? {
        Some(link) => {
            if !is_veth(&link) {
                return Err(Error::NotVeth {
                    name: name.clone(),
                    netns: ns.to_string(),
                });
            }
            let Some(actor_index) = actor_if_index else {
                return Err(mismatch(format!("the actor has no {ACTOR_IF}")));
            };
            let peer = peer_index(&link);
            if peer != Some(actor_index) {
                return Err(mismatch(format!(
                    "its peer has index {peer:?}, {ACTOR_IF} has {actor_index}"
                )));
            }
            // Same index in another namespace is possible; the namespace id settles it.
            let link_nsid = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkNetNsId(id) => Some(*id),
                _ => None,
            });
            let actor_nsid = nsid_of(h, ns, &actor_file).await?;
            if link_nsid.is_none() || link_nsid != actor_nsid {
                return Err(mismatch(format!(
                    "its peer is in namespace id {link_nsid:?}, the actor's is {actor_nsid:?}"
                )));
            }
            (false, link)
        }
        None => {
            if actor_if_index.is_some() {
                return Err(Error::ActorIfTaken {
                    actor_netns: actor_name.to_string(),
                    worker_if: name.clone(),
                });
            }
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(ACTOR_IF)
                .setns_by_fd(actor_file.as_raw_fd())
                .build();
            let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(name.clone())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            match h.link().add(msg).execute().await {
                Ok(()) => {}
                // Both names were free a moment ago; eth0 appeared in the actor meanwhile.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    return Err(Error::ActorIfTaken {
                        actor_netns: actor_name.to_string(),
                        worker_if: name.clone(),
                    });
                }
                Err(e) => return Err(netlink_error(format!("creating veth {name}"), ns, e)),
            }
            let link = link_by_name(h, ns, name).await?.ok_or_else(|| {
                netlink_error(
                    format!("finding {name} after creating it"),
                    ns,
                    rtnetlink::Error::RequestFailed,
                )
            })?;
            (true, link)
        }
    };
    let index = link.header.index;
    let configured = address_up(h, ns, index, name, pair.worker, pair.prefix_len).await;
    if let Err(e) = configured {
        if created {
            let _ = h.link().del(index).execute().await;
        }
        return Err(e);
    }
    let peer_index = peer_index(&link).ok_or_else(|| mismatch("it has no peer index".into()))?;
    Ok(WorkerEnd {
        created,
        peer_index,
    })
}

/// Gives link `index` (`name`) the address `addr/prefix_len` (replacing, so repeating it is
/// harmless) and sets it up.
async fn address_up(
    h: &Handle,
    ns: &str,
    index: u32,
    name: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), Error> {
    h.address()
        .add(index, IpAddr::V4(addr), prefix_len)
        .replace()
        .execute()
        .await
        .map_err(|e| netlink_error(format!("adding {addr}/{prefix_len} to {name}"), ns, e))?;
    set_up(h, ns, index, name).await
}

/// Address, up state and default route of the actor's `eth0`, plus `lo` up; each step
/// replaces rather than adds, so repeating it is harmless.
async fn configure_actor(h: &Handle, ns: &str, index: u32, pair: &Pair) -> Result<(), Error> {
    address_up(h, ns, index, ACTOR_IF, pair.actor, pair.prefix_len).await?;
    if let Some(lo) = link_by_name(h, ns, "lo").await? {
        set_up(h, ns, lo.header.index, "lo").await?;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(pair.worker)
        .output_interface(index)
        .build();
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| netlink_error(format!("adding default route via {}", pair.worker), ns, e))
}

async fn set_up(h: &Handle, ns: &str, index: u32, name: &str) -> Result<(), Error> {
    h.link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink_error(format!("setting {name} up"), ns, e))
}

/// The link named `name`, `None` if there is none.
async fn link_by_name(h: &Handle, ns: &str, name: &str) -> Result<Option<LinkMessage>, Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink_error(format!("looking up {name}"), ns, e)),
    }
}

/// The id the calling thread's namespace gives the namespace of `file` (RTM_GETNSID).
async fn nsid_of(h: &Handle, ns: &str, file: &File) -> Result<Option<i32>, Error> {
    let mut msg = NsidMessage::default();
    msg.attributes = vec![NsidAttribute::Fd(file.as_raw_fd() as u32)];
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut responses = h
        .clone()
        .request(req)
        .map_err(|e| netlink_error("asking for a namespace id", ns, e))?;
    while let Some(resp) = responses.next().await {
        match resp.payload {
            NetlinkPayload::Error(e) => {
                return Err(netlink_error(
                    "asking for a namespace id",
                    ns,
                    rtnetlink::Error::NetlinkError(e),
                ));
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                return Ok(m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                }));
            }
            _ => {}
        }
    }
    Ok(None)
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

/// `egress<digits>` -> the digits as a slot.
fn parse_worker_if(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(WORKER_IF_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // `egress01` would be a second name for slot 1.
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn netlink_error(op: impl Into<String>, ns: &str, source: rtnetlink::Error) -> Error {
    Error::Netlink {
        op: op.into(),
        netns: ns.to_string(),
        source,
    }
}

/// Runs `f` with a netlink handle bound to the namespace at `netns`, on a thread inside it.
fn with_netlink<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(Handle, String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Error>>,
{
    let name = crate::netns::label(netns);
    let thread_name = name.clone();
    let path: Option<PathBuf> = netns.map(Path::to_path_buf);
    crate::netns::run_in(path.as_deref(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        // Opened here, after setns: the socket belongs to this namespace from now on. The
        // runtime must be entered because the socket registers with its reactor.
        let (conn, handle, _) = {
            let _entered = rt.enter();
            rtnetlink::new_connection()?
        };
        Ok(rt.block_on(async move {
            let driver = tokio::spawn(conn);
            let out = f(handle, thread_name).await;
            driver.abort();
            out
        }))
    })
    .map_err(|source| Error::Netns {
        netns: name,
        source,
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pool_slot_zero_and_one() {
        let pool = Pool::default();
        assert_eq!(pool.to_string(), "10.200.0.0/24");
        assert_eq!(pool.capacity(), 64);
        let p0 = pool.pair(0).unwrap();
        assert_eq!(
            p0,
            Pair {
                slot: 0,
                worker_if: "egress0".into(),
                worker: Ipv4Addr::new(10, 200, 0, 1),
                actor: Ipv4Addr::new(10, 200, 0, 2),
                prefix_len: 30,
            }
        );
        let p1 = pool.pair(1).unwrap();
        assert_eq!(p1.worker, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(p1.actor, Ipv4Addr::new(10, 200, 0, 6));
        let last = pool.pair(63).unwrap();
        assert_eq!(last.actor, Ipv4Addr::new(10, 200, 0, 254));
        assert!(pool.pair(64).is_none());
    }

    #[test]
    fn pool_parse_validates() {
        assert_eq!("10.200.0.0/24".parse::<Pool>().unwrap(), Pool::default());
        assert_eq!("10.1.2.4/30".parse::<Pool>().unwrap().capacity(), 1);
        for bad in [
            "10.200.0.0",
            "10.200.0.1/24",
            "10.200.0.0/31",
            "fd00::/64",
            "10.0.0.0/7",
            "x/24",
        ] {
            let err = bad.parse::<Pool>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn pool_serde_is_the_cidr_string() {
        let json = serde_json::to_string(&Pool::default()).unwrap();
        assert_eq!(json, "\"10.200.0.0/24\"");
        let back: Pool = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Pool::default());
        assert!(serde_json::from_str::<Pool>("\"10.200.0.3/24\"").is_err());
    }

    #[test]
    fn worker_if_names() {
        let pool = Pool::default();
        assert_eq!(pool.slot_of("egress0"), Some(0));
        assert_eq!(pool.slot_of("egress63"), Some(63));
        assert_eq!(pool.slot_of("egress64"), None);
        assert_eq!(pool.slot_of("egress01"), None);
        assert_eq!(pool.slot_of("egress"), None);
        assert_eq!(pool.slot_of("eth0"), None);
        assert_eq!(pool.slot_of("egress1p"), None);
        // The longest name a /8 pool produces still fits IFNAMSIZ.
        let big: Pool = "10.0.0.0/8".parse().unwrap();
        let last = big.pair(big.capacity() - 1).unwrap();
        assert!(last.worker_if.len() <= 15, "{}", last.worker_if);
    }
}
