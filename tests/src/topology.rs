//! The usual test world: a "node" namespace (agent, squid, upstreams) and an "actor"
//! namespace joined by a veth pair, on a per-test subnet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::{Netns, Veth, veth};

/// Node and actor namespaces joined by a veth: `10.251.NET.1/24` + `fd7e:251:NET::1/64` on the
/// node side, `.2` / `::2` on the actor side, and default routes from the actor to the node.
///
/// Namespaces are private, so equal subnets in different tests cannot clash; still give each
/// test its own `net` so logs and captures are unambiguous.
pub struct Topology {
    /// The node's namespace: where the agent, squid and the upstream servers run.
    pub node: Netns,
    /// The actor's namespace.
    pub actor: Netns,
    /// The veth pair (`a_name` in the node, `b_name` in the actor).
    pub veth: Veth,
    net: u8,
}

impl Topology {
    /// Creates both namespaces, the veth and the actor's default routes, on subnet `net`.
    pub fn new(net: u8) -> Topology {
        let node = Netns::new();
        let actor = Netns::new();
        let n4 = format!("10.251.{net}.1/24");
        let a4 = format!("10.251.{net}.2/24");
        let n6 = format!("fd7e:251:{net:x}::1/64");
        let a6 = format!("fd7e:251:{net:x}::2/64");
        let veth = veth(&node, &actor, &[&n4, &n6], &[&a4, &a6]);
        let topo = Topology {
            node,
            actor,
            veth,
            net,
        };
        // Default routes so that any destination the actor dials leaves through the veth
        // (and is captured or refused there), never "network unreachable" in the actor.
        topo.actor.ip(&[
            "route",
            "add",
            "default",
            "via",
            &topo.node_v4().to_string(),
        ]);
        topo.actor.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &topo.node_v6().to_string(),
        ]);
        topo
    }

    /// The subnet number given to [`Topology::new`].
    pub fn net(&self) -> u8 {
        self.net
    }

    /// The node's IPv4 address on the veth (`10.251.NET.1`).
    pub fn node_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.net, 1)
    }

    /// The actor's IPv4 address on the veth (`10.251.NET.2`).
    pub fn actor_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.net, 2)
    }

    /// The node's IPv6 address on the veth (`fd7e:251:NET::1`).
    pub fn node_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x251, self.net as u16, 0, 0, 0, 0, 1)
    }

    /// The actor's IPv6 address on the veth (`fd7e:251:NET::2`).
    pub fn actor_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd7e, 0x251, self.net as u16, 0, 0, 0, 0, 2)
    }

    /// `node_v4:port`.
    pub fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node_v4()), port)
    }

    /// `[node_v6]:port`.
    pub fn node_addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.node_v6()), port)
    }
}
