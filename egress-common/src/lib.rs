//! Names and map types shared by the kernel programs (`egress-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers and has no implicit
//! padding, so the kernel and userspace see the same bytes. Addresses are stored as four
//! 32-bit words in network byte order, exactly as `bpf_sock_addr.user_ip6` holds them; IPv4
//! addresses use the v4-mapped form `::ffff:a.b.c.d`. Ports are in host byte order.
#![no_std]

#[cfg(feature = "user")]
mod user;

/// Original destination of each captured socket, keyed by socket cookie (`u64`).
///
/// Written by connect4/connect6 (TCP connects, connected UDP DNS sockets) and by
/// sendmsg4/sendmsg6 (unconnected DNS sends: the last destination asked wins); read by
/// getpeername4/6 and recvmsg4/6; removed when the socket closes (sockops for TCP,
/// sock_release for every socket).
pub const MAP_SOCKETS: &str = "EGRESS_SOCKETS";
/// Capture records keyed by what the agent sees on accept ([`ConnKey`]).
///
/// Copied from [`MAP_SOCKETS`] by sockops when the actor's connection is established; removed
/// by the agent when it accepts the connection, or by sockops when the socket closes first.
pub const MAP_CONNS: &str = "EGRESS_CONNS";
/// Captured actor cgroups (cgroup id, `u64`) and where their agent listener and DNS socket are
/// ([`ActorEntry`]).
pub const MAP_ACTORS: &str = "EGRESS_ACTORS";
/// One [`Settings`] at index 0: how the kernel side recognises the agent's own sockets.
pub const MAP_SETTINGS: &str = "EGRESS_SETTINGS";
/// Per-CPU event counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "EGRESS_COUNTERS";

/// Bound of [`MAP_SOCKETS`] (LRU: a backstop, cleanup is done on close).
pub const SOCKETS_MAX_ENTRIES: u32 = 65_536;
/// Bound of [`MAP_CONNS`] (LRU: a backstop, cleanup is done on accept and on close).
pub const CONNS_MAX_ENTRIES: u32 = 65_536;
/// Bound of [`MAP_ACTORS`]: the most actor cgroups one node can capture.
pub const ACTORS_MAX_ENTRIES: u32 = 4_096;

/// How many cgroup levels connect4/6 walk up from the caller's cgroup to find its actor.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Program (function) names in the eBPF object.
pub const PROG_CONNECT4: &str = "egress_connect4";
/// See [`PROG_CONNECT4`].
pub const PROG_CONNECT6: &str = "egress_connect6";
/// See [`PROG_CONNECT4`].
pub const PROG_GETPEERNAME4: &str = "egress_getpeername4";
/// See [`PROG_CONNECT4`].
pub const PROG_GETPEERNAME6: &str = "egress_getpeername6";
/// See [`PROG_CONNECT4`].
pub const PROG_SOCKOPS: &str = "egress_sockops";
/// See [`PROG_CONNECT4`].
pub const PROG_SOCK_RELEASE: &str = "egress_sock_release";
/// See [`PROG_CONNECT4`].
pub const PROG_SENDMSG4: &str = "egress_sendmsg4";
/// See [`PROG_CONNECT4`].
pub const PROG_SENDMSG6: &str = "egress_sendmsg6";
/// See [`PROG_CONNECT4`].
pub const PROG_RECVMSG4: &str = "egress_recvmsg4";
/// See [`PROG_CONNECT4`].
pub const PROG_RECVMSG6: &str = "egress_recvmsg6";

/// Every program the agent attaches to each actor cgroup, in attach order: the ones that
/// restore what the actor sees (getpeername, recvmsg) before the ones that redirect, so a
/// redirected socket never exists without them.
pub const PROGRAMS: [&str; 10] = [
    PROG_SOCKOPS,
    PROG_SOCK_RELEASE,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
];

/// The DNS port: UDP datagrams of an actor to it (any address) go to the actor's DNS socket.
pub const DNS_PORT: u16 = 53;

/// The original destination of one captured connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Destination address, network byte order words (IPv4 as `::ffff:a.b.c.d`).
    pub dst_ip: [u32; 4],
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// Reserved, zero.
    pub _pad: u16,
    /// Thread-group id (the pid userspace sees, in the init pid namespace) of the caller.
    pub pid: u32,
    /// cgroup id of the captured actor cgroup (a key of [`MAP_ACTORS`]).
    pub actor_cgroup: u64,
    /// cgroup id of the calling process (the actor cgroup or one of its descendants).
    pub cgroup: u64,
    /// `CLOCK_MONOTONIC` time of the connect, in nanoseconds (`bpf_ktime_get_ns`): the agent
    /// refuses records older than it could legitimately see.
    pub connect_ns: u64,
}

/// What the agent can compute from an accepted connection: the listener's network namespace
/// cookie and the client's address and port (the actor socket's local end).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Network namespace cookie (`SO_NETNS_COOKIE` of the listener, `bpf_get_netns_cookie`).
    pub netns: u64,
    /// Client address, network byte order words (IPv4 as `::ffff:a.b.c.d`).
    pub ip: [u32; 4],
    /// Client port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub _pad: [u16; 3],
}

/// [`ActorEntry::flags`] bit: an IPv4 listener is open at `listen_ip4:listen_port`.
pub const ACTOR_LISTEN_V4: u16 = 1;
/// [`ActorEntry::flags`] bit: an IPv6 listener is open at `listen_ip6:listen_port`.
pub const ACTOR_LISTEN_V6: u16 = 2;
/// [`ActorEntry::flags`] bit: the actor's IPv4 DNS socket is open at `listen_ip4:dns_port`.
pub const ACTOR_DNS_V4: u16 = 4;
/// [`ActorEntry::flags`] bit: the actor's IPv6 DNS socket is open at `listen_ip6:dns_port`.
pub const ACTOR_DNS_V6: u16 = 8;

/// Where the connects and DNS datagrams of one actor cgroup are sent: the agent's TCP
/// listener and the actor's own UDP DNS socket, both on loopback in the actor's network
/// namespace. The listener is shared by the actors of a namespace; the DNS socket is the
/// actor's alone, so a datagram's arrival on it is the actor's identity. An actor without the
/// socket a connect or a DNS send needs has that call refused (`EPERM`): capture fails closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorEntry {
    /// IPv4 listener (and DNS socket) address, network byte order.
    pub listen_ip4: u32,
    /// IPv6 listener (and DNS socket) address, network byte order words.
    pub listen_ip6: [u32; 4],
    /// Listener port, host byte order.
    pub listen_port: u16,
    /// [`ACTOR_LISTEN_V4`] | [`ACTOR_LISTEN_V6`] | [`ACTOR_DNS_V4`] | [`ACTOR_DNS_V6`].
    pub flags: u16,
    /// Port of the actor's DNS socket, host byte order (chosen by the kernel, one per actor).
    pub dns_port: u16,
    /// Reserved, zero.
    pub _pad: u16,
}

/// How the kernel side tells the agent's own sockets from an actor's, and which namespace is
/// the node's.
///
/// A socket is the agent's when it carries `agent_mark` (`SO_MARK`), lives in the agent's
/// network namespace *and* is connected by a process of the agent's own cgroup. The mark alone
/// proves nothing (`CAP_NET_RAW` suffices to set it since Linux 5.17); an actor cannot move its
/// sockets into the agent's namespace nor itself into the agent's cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// Network namespace cookie of the agent's upstream sockets.
    pub agent_netns: u64,
    /// cgroup v2 id of the agent process.
    pub agent_cgroup: u64,
    /// `SO_MARK` of the agent's upstream sockets; zero disables the exemption.
    pub agent_mark: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// Indexes of [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A TCP connect was redirected to the agent.
    Redirected = 0,
    /// A connect or UDP send from an attached cgroup was refused: no actor entry, no listener
    /// or DNS socket for its address family, UDP other than DNS, or the record could not be
    /// stored.
    Refused = 1,
    /// A connect or UDP send of the agent's own (marked) socket was left alone.
    AgentSkipped = 2,
    /// A connect straight to the agent's listener (or a UDP send to the actor's DNS socket)
    /// was left alone.
    ListenerSkipped = 3,
    /// An established connection's record was published for the agent.
    Published = 4,
    /// A record could not be published (map full or error).
    PublishFailed = 5,
    /// A connect or UDP send to the actor's own loopback (inside its network namespace) was
    /// left alone.
    LocalSkipped = 6,
    /// A UDP connect or send to port 53 was redirected to the actor's DNS socket.
    DnsRedirected = 7,
    /// A reply from the actor's DNS socket was shown with the original resolver as source.
    DnsRestored = 8,
}

/// Number of [`Counter`] values (size of [`MAP_COUNTERS`]).
pub const COUNTERS_LEN: u32 = 9;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTERS_LEN as usize] = [
        Counter::Redirected,
        Counter::Refused,
        Counter::AgentSkipped,
        Counter::ListenerSkipped,
        Counter::Published,
        Counter::PublishFailed,
        Counter::LocalSkipped,
        Counter::DnsRedirected,
        Counter::DnsRestored,
    ];

    /// Stable snake_case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Refused => "refused",
            Counter::AgentSkipped => "agent_skipped",
            Counter::ListenerSkipped => "listener_skipped",
            Counter::Published => "published",
            Counter::PublishFailed => "publish_failed",
            Counter::LocalSkipped => "local_skipped",
            Counter::DnsRedirected => "dns_redirected",
            Counter::DnsRestored => "dns_restored",
        }
    }
}

/// The word that makes an IPv6 address v4-mapped (`::ffff:0:0/96`), in network byte order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether an IPv4 address (network byte order) reaches the local host: 127.0.0.0/8 or
/// 0.0.0.0.
#[inline(always)]
pub const fn is_local_v4(ip4: u32) -> bool {
    ip4 == 0 || ip4.to_ne_bytes()[0] == 127
}

/// Whether IPv6 words reach the local host: `::1`, `::`, or a v4-mapped local IPv4 address.
#[inline(always)]
pub const fn is_local_v6(ip6: &[u32; 4]) -> bool {
    if is_v4_mapped(ip6) {
        return is_local_v4(ip6[3]);
    }
    ip6[0] == 0
        && ip6[1] == 0
        && ip6[2] == 0
        && (ip6[3] == 0 || ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

/// IPv4 address (network byte order) as v4-mapped IPv6 words.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether IPv6 words are a v4-mapped IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Record>(), 16 + 2 + 2 + 4 + 8 + 8 + 8);
        assert_eq!(core::mem::size_of::<ConnKey>(), 8 + 16 + 2 + 6);
        assert_eq!(core::mem::size_of::<ActorEntry>(), 4 + 16 + 2 + 2 + 2 + 2);
        assert_eq!(core::mem::size_of::<Settings>(), 8 + 8 + 4 + 4);
    }

    #[test]
    fn local_addresses() {
        let v4 = |a: [u8; 4]| u32::from_ne_bytes(a);
        assert!(is_local_v4(v4([127, 0, 0, 1])));
        assert!(is_local_v4(v4([127, 1, 2, 3])));
        assert!(is_local_v4(0));
        assert!(!is_local_v4(v4([10, 0, 0, 127])));
        assert!(!is_local_v4(v4([128, 0, 0, 1])));
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        assert!(is_local_v6(&[0, 0, 0, one]));
        assert!(is_local_v6(&[0, 0, 0, 0]));
        assert!(is_local_v6(&v4_mapped(v4([127, 0, 0, 1]))));
        assert!(!is_local_v6(&v4_mapped(v4([10, 0, 0, 1]))));
        assert!(!is_local_v6(&[
            u32::from_ne_bytes([0xfd, 0, 0, 0]),
            0,
            0,
            one
        ]));
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
