//! The usual test world: a "node" namespace (agent, squid), an "actor" namespace and an
//! "upstream" namespace (the internet: the servers actors dial), each joined to the node by a
//! veth pair, on a per-test subnet.
//!
//! Address plan, one `NET` per test:
//!
//! | link | node side | other side |
//! |---|---|---|
//! | node ↔ actor (`ac…`) | `10.251.NET.1/24`, `fd7e:251:NET::1/64` | actor `.2`, `::2` |
//! | node ↔ upstream (`up…`) | `10.250.NET.1/24`, `fd7e:250:NET::1/64` | upstream `.2`, `::2` |
//!
//! The actor and the upstream have default routes via the node, and the node forwards (IPv4
//! and IPv6, in its own namespace only): a connection the capture misses reaches the upstream
//! directly, from the actor's own address, where a test sees it. Captured connections reach
//! the upstream from squid, i.e. from the node's `10.250.NET.1` / `fd7e:250:NET::1`. The
//! node's own addresses are never an actor's destination here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::{Netns, Veth, named_veth};

/// Node, actor and upstream namespaces joined by two veths (see the module's address plan).
///
/// Namespaces are private, so equal subnets in different tests cannot clash; still give each
/// test its own `net` so logs and captures are unambiguous.
pub struct Topology {
    /// The node's namespace: where the agent and squid run; it routes between the actor and
    /// the upstream.
    pub node: Netns,
    /// The actor's namespace.
    pub actor: Netns,
    /// The upstream's namespace, "the internet": where the servers actors dial run.
    pub upstream: Netns,
    /// The node–actor pair (`a_name` in the node, `b_name` in the actor).
    pub veth: Veth,
    /// The node–upstream pair (`a_name` in the node, `b_name` in the upstream).
    pub uplink: Veth,
    net: u8,
}

impl Topology {
    /// Creates the three namespaces, both veths, the default routes and forwarding in the
    /// node, on subnet `net`.
    pub fn new(net: u8) -> Topology {
        let node = Netns::named("node");
        let actor = Netns::named("actor");
        let upstream = Netns::named("upstream");
        let veth = named_veth(
            "ac",
            &node,
            &actor,
            &[
                &format!("10.251.{net}.1/24"),
                &format!("fd7e:251:{net:x}::1/64"),
            ],
            &[
                &format!("10.251.{net}.2/24"),
                &format!("fd7e:251:{net:x}::2/64"),
            ],
        );
        let uplink = named_veth(
            "up",
            &node,
            &upstream,
            &[
                &format!("10.250.{net}.1/24"),
                &format!("fd7e:250:{net:x}::1/64"),
            ],
            &[
                &format!("10.250.{net}.2/24"),
                &format!("fd7e:250:{net:x}::2/64"),
            ],
        );
        let topo = Topology {
            node,
            actor,
            upstream,
            veth,
            uplink,
            net,
        };
        // Default routes so that any destination the actor dials leaves through the veth
        // (and is captured or refused there), never "network unreachable" in the actor; and
        // so that the upstream answers the actor's own address when a connection goes direct.
        for (ns, v4, v6) in [
            (&topo.actor, topo.node_v4(), topo.node_v6()),
            (&topo.upstream, topo.node_uplink_v4(), topo.node_uplink_v6()),
        ] {
            ns.ip(&["route", "add", "default", "via", &v4.to_string()]);
            ns.ip(&["-6", "route", "add", "default", "via", &v6.to_string()]);
        }
        // The node routes between its links, like a real node: what the capture fails to
        // catch must reach the upstream, where tests asserting "nothing went direct" see it.
        // IPv6 forwarding makes the node ignore router advertisements (accept_ra=1), which
        // changes nothing here: its addresses and routes are static and nothing sends RAs.
        topo.node.sysctl("net/ipv4/ip_forward", "1");
        topo.node.sysctl("net/ipv6/conf/all/forwarding", "1");
        topo
    }

    /// The subnet number given to [`Topology::new`].
    pub fn net(&self) -> u8 {
        self.net
    }

    /// The node's IPv4 address on the actor's veth (`10.251.NET.1`).
    pub fn node_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.net, 1)
    }

    /// The actor's IPv4 address on the veth (`10.251.NET.2`).
    pub fn actor_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.net, 2)
    }

    /// The node's IPv6 address on the actor's veth (`fd7e:251:NET::1`).
    pub fn node_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x251, self.net as u16, 0, 0, 0, 0, 1)
    }

    /// The actor's IPv6 address on the veth (`fd7e:251:NET::2`).
    pub fn actor_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x251, self.net as u16, 0, 0, 0, 0, 2)
    }

    /// The node's IPv4 address on the upstream's veth (`10.250.NET.1`): where squid's (and
    /// any node process's) connections to the upstream come from.
    pub fn node_uplink_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.net, 1)
    }

    /// The node's IPv6 address on the upstream's veth (`fd7e:250:NET::1`).
    pub fn node_uplink_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x250, self.net as u16, 0, 0, 0, 0, 1)
    }

    /// The upstream's IPv4 address (`10.250.NET.2`), where its servers listen.
    pub fn upstream_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.net, 2)
    }

    /// The upstream's IPv6 address (`fd7e:250:NET::2`), where its servers listen.
    pub fn upstream_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x250, self.net as u16, 0, 0, 0, 0, 2)
    }

    /// `node_v4:port`.
    pub fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node_v4()), port)
    }

    /// `[node_v6]:port`.
    pub fn node_addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.node_v6()), port)
    }

    /// `upstream_v4:port`.
    pub fn upstream_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.upstream_v4()), port)
    }

    /// `[upstream_v6]:port`.
    pub fn upstream_addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.upstream_v6()), port)
    }
}
