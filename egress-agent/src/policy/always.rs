//! Destinations denied whatever the rules say: cloud metadata services, link-local, loopback,
//! unspecified, multicast, the node's own addresses and the actor's gateways. An allow rule
//! that names the exact address (or, for names, the exact name) is the only way through.
//!
//! Sources for each metadata address and name are in `docs/policy.md`.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia},
};

use super::{Name, classify_name};

/// Reason for a cloud metadata (or credentials) address.
pub const METADATA: &str = "cloud metadata address";
/// Reason for a known metadata service name.
pub const METADATA_NAME: &str = "cloud metadata name";
/// Reason for `localhost` and names under it.
pub const LOOPBACK_NAME: &str = "loopback name";
/// Reason for 127.0.0.0/8 and ::1.
pub const LOOPBACK: &str = "loopback";
/// Reason for 169.254.0.0/16 and fe80::/10.
pub const LINK_LOCAL: &str = "link-local";
/// Reason for 0.0.0.0/8 and ::.
pub const UNSPECIFIED: &str = "unspecified";
/// Reason for multicast and the limited broadcast address.
pub const MULTICAST: &str = "multicast or broadcast";
/// Reason for an address passed in `extra`: the node's own or the actor's gateway.
pub const NODE_OR_GATEWAY: &str = "node or gateway address";

/// Cloud metadata and credential endpoints reachable from a node (see docs/policy.md for the
/// source of each). The IPv4 ones inside 169.254.0.0/16 are link-local anyway; they are listed
/// so the log says what they are.
const METADATA_ADDRS: &[IpAddr] = &[
    // AWS EC2 IMDS; also GCP, Azure IMDS, OCI, OpenStack, DigitalOcean, Hetzner, …
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    // AWS EC2 IMDS over IPv6 (Nitro).
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    // AWS ECS task metadata and credentials endpoint.
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    // AWS EKS Pod Identity Agent (credentials), IPv4 and IPv6.
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    // GCP metadata server over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)),
    // Alibaba Cloud ECS metadata.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // Azure WireServer (host agent channel, certificates, extension settings).
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    // Oracle Cloud Classic / Cloud@Customer metadata.
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    // Tencent Cloud metadata (metadata.tencentyun.com).
    IpAddr::V4(Ipv4Addr::new(169, 254, 0, 23)),
    // Scaleway metadata, IPv4 and IPv6.
    IpAddr::V4(Ipv4Addr::new(169, 254, 42, 42)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42)),
];

/// Names of metadata services, canonical (lowercase, no trailing dot).
const METADATA_NAMES: &[&str] = &[
    // GCP: the documented name, the short name the guest's hosts file and search path give,
    // and the newer domain.
    "metadata.google.internal",
    "metadata",
    "metadata.goog",
    // AWS EC2: resolves to the IMDS inside EC2.
    "instance-data",
    "instance-data.ec2.internal",
    // Tencent Cloud.
    "metadata.tencentyun.com",
];

/// Most routes read from one namespace before giving up: a default route is found long
/// before this on any node; a full internet table is not a place this runs.
const MAX_ROUTES: usize = 1_000_000;

/// How long reading the routes of a namespace may take.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// Maps an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`, deprecated) IPv6
/// address to its IPv4 address; every other address is returned unchanged. Every check here
/// runs on the normalized address, so `::ffff:169.254.169.254` is 169.254.169.254.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    // `::` and `::1` are IPv6's own unspecified and loopback addresses, not IPv4-compatible.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return IpAddr::V4(embedded_v4(s));
    }
    ip
}

fn embedded_v4(s: [u16; 8]) -> Ipv4Addr {
    let [a, b] = s[6].to_be_bytes();
    let [c, d] = s[7].to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Why `ip` is denied whatever the rules say, or `None`. `extra` holds the node's own
/// addresses and the actor's gateways ([`node_addresses`], [`default_gateways`]). Reasons:
/// "cloud metadata address", "loopback", "link-local", "unspecified", "multicast or
/// broadcast", "node or gateway address".
pub fn always_denied(ip: IpAddr, extra: &[IpAddr]) -> Option<&'static str> {
    let ip = normalize(ip);
    if let Some(reason) = fixed_reason(ip) {
        return Some(reason);
    }
    // The NAT64 well-known prefix (RFC 6052) carries an IPv4 address a NAT64 gateway would
    // reach on the actor's behalf: check the address inside.
    if let IpAddr::V6(v6) = ip {
        let s = v6.segments();
        if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            && let Some(reason) = fixed_reason(IpAddr::V4(embedded_v4(s)))
        {
            return Some(reason);
        }
    }
    if extra.iter().any(|e| normalize(*e) == ip) {
        return Some(NODE_OR_GATEWAY);
    }
    None
}

fn fixed_reason(ip: IpAddr) -> Option<&'static str> {
    if METADATA_ADDRS.contains(&ip) {
        return Some(METADATA);
    }
    match ip {
        IpAddr::V4(a) => {
            if a.octets()[0] == 0 {
                // 0.0.0.0/8, "this network": 0.0.0.0 reaches the node itself.
                Some(UNSPECIFIED)
            } else if a.is_loopback() {
                Some(LOOPBACK)
            } else if a.is_link_local() {
                Some(LINK_LOCAL)
            } else if a.is_multicast() || a.is_broadcast() {
                Some(MULTICAST)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some(UNSPECIFIED)
            } else if a.is_loopback() {
                Some(LOOPBACK)
            } else if a.is_unicast_link_local() {
                Some(LINK_LOCAL)
            } else if a.is_multicast() {
                Some(MULTICAST)
            } else {
                None
            }
        }
    }
}

/// Why the name is denied whatever the rules say, or `None`: known cloud metadata names
/// ("cloud metadata name"), `localhost` and names under it ("loopback name"), and IP literals
/// that [`always_denied`] denies. Case and a trailing dot do not matter. Names that resolve
/// to an always-denied address are caught when the resolved addresses are checked.
pub fn always_denied_name(name: &str) -> Option<&'static str> {
    match classify_name(name) {
        Name::Valid(name) => denied_name(&name),
        Name::Ip(ip) => always_denied(ip, &[]),
        Name::Invalid(_) => None,
    }
}

/// [`always_denied_name`] for a canonical name.
pub(super) fn denied_name(name: &str) -> Option<&'static str> {
    if METADATA_NAMES.contains(&name) {
        return Some(METADATA_NAME);
    }
    // RFC 6761 §6.3: localhost and every name under it are loopback.
    if name == "localhost" || name.ends_with(".localhost") {
        return Some(LOOPBACK_NAME);
    }
    None
}

/// Every address on every interface of the calling thread's network namespace (the node's,
/// when called from the agent's main threads), deduplicated.
pub fn node_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(normalize(IpAddr::V6(v6.ip())));
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The gateways of the default routes (IPv4 and IPv6, every routing table, multipath hops
/// included) of the network namespace at `netns` (`None`: the agent's own). Blocks: it runs
/// on a short-lived thread inside the namespace; call it from `spawn_blocking`.
pub fn default_gateways(netns: Option<&Path>) -> io::Result<Vec<IpAddr>> {
    let label = crate::netns::label(netns);
    crate::netns::run_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        // Opened after setns, inside the runtime: the socket belongs to this namespace and
        // registers with this runtime's reactor.
        let (conn, handle, _) = {
            let _entered = rt.enter();
            rtnetlink::new_connection()?
        };
        rt.block_on(async move {
            let driver = tokio::spawn(conn);
            let dump = async {
                let mut out = Vec::new();
                let mut seen = 0usize;
                for request in [
                    RouteMessageBuilder::<Ipv4Addr>::new().build(),
                    RouteMessageBuilder::<Ipv6Addr>::new().build(),
                ] {
                    let mut routes = handle.route().get(request).execute();
                    while let Some(route) = routes.try_next().await.map_err(|e| {
                        io::Error::other(format!("reading the routes of netns {label}: {e}"))
                    })? {
                        seen += 1;
                        if seen > MAX_ROUTES {
                            return Err(io::Error::other(format!(
                                "netns {label} has more than {MAX_ROUTES} routes; not reading further"
                            )));
                        }
                        if route.header.destination_prefix_length == 0 {
                            gateways_of(&route, &mut out);
                        }
                    }
                }
                out.sort_unstable();
                out.dedup();
                Ok(out)
            };
            let result = tokio::time::timeout(ROUTE_TIMEOUT, dump).await;
            driver.abort();
            result.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("reading the routes of netns {label} took more than {ROUTE_TIMEOUT:?}"),
                )
            })?
        })
    })
}

fn gateways_of(route: &RouteMessage, out: &mut Vec<IpAddr>) {
    fn collect(attrs: &[RouteAttribute], out: &mut Vec<IpAddr>) {
        for attr in attrs {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => out.push(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                    out.push(normalize(IpAddr::V6(*a)))
                }
                RouteAttribute::Via(RouteVia::Inet(a)) => out.push(IpAddr::V4(*a)),
                RouteAttribute::Via(RouteVia::Inet6(a)) => out.push(normalize(IpAddr::V6(*a))),
                RouteAttribute::MultiPath(hops) => {
                    for hop in hops {
                        collect(&hop.attributes, out);
                    }
                }
                _ => {}
            }
        }
    }
    collect(&route.attributes, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn normalize_maps_v4_mapped_and_compatible() {
        assert_eq!(
            normalize(ip("::ffff:169.254.169.254")),
            ip("169.254.169.254")
        );
        assert_eq!(normalize(ip("::ffff:a9fe:a9fe")), ip("169.254.169.254"));
        assert_eq!(normalize(ip("::169.254.169.254")), ip("169.254.169.254"));
        assert_eq!(normalize(ip("::1")), ip("::1"));
        assert_eq!(normalize(ip("::")), ip("::"));
        assert_eq!(normalize(ip("fd00::1")), ip("fd00::1"));
        assert_eq!(normalize(ip("10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn fixed_categories() {
        assert_eq!(always_denied(ip("169.254.169.254"), &[]), Some(METADATA));
        assert_eq!(
            always_denied(ip("::ffff:169.254.169.254"), &[]),
            Some(METADATA)
        );
        assert_eq!(always_denied(ip("::169.254.169.254"), &[]), Some(METADATA));
        assert_eq!(
            always_denied(ip("64:ff9b::169.254.169.254"), &[]),
            Some(METADATA)
        );
        assert_eq!(always_denied(ip("fd00:ec2::254"), &[]), Some(METADATA));
        assert_eq!(always_denied(ip("fd20:ce::254"), &[]), Some(METADATA));
        assert_eq!(always_denied(ip("100.100.100.200"), &[]), Some(METADATA));
        assert_eq!(always_denied(ip("168.63.129.16"), &[]), Some(METADATA));
        assert_eq!(always_denied(ip("169.254.170.2"), &[]), Some(METADATA));
        assert_eq!(always_denied(ip("169.254.1.1"), &[]), Some(LINK_LOCAL));
        assert_eq!(always_denied(ip("fe80::1"), &[]), Some(LINK_LOCAL));
        assert_eq!(always_denied(ip("febf::1"), &[]), Some(LINK_LOCAL));
        assert_eq!(always_denied(ip("127.1.2.3"), &[]), Some(LOOPBACK));
        assert_eq!(always_denied(ip("::ffff:127.0.0.1"), &[]), Some(LOOPBACK));
        assert_eq!(always_denied(ip("::1"), &[]), Some(LOOPBACK));
        assert_eq!(always_denied(ip("0.0.0.0"), &[]), Some(UNSPECIFIED));
        assert_eq!(always_denied(ip("0.1.2.3"), &[]), Some(UNSPECIFIED));
        assert_eq!(always_denied(ip("::"), &[]), Some(UNSPECIFIED));
        assert_eq!(always_denied(ip("::ffff:0.0.0.0"), &[]), Some(UNSPECIFIED));
        assert_eq!(always_denied(ip("224.0.0.1"), &[]), Some(MULTICAST));
        assert_eq!(always_denied(ip("255.255.255.255"), &[]), Some(MULTICAST));
        assert_eq!(always_denied(ip("ff02::1"), &[]), Some(MULTICAST));
        // Near misses stay allowed.
        assert_eq!(always_denied(ip("169.255.0.1"), &[]), None);
        assert_eq!(always_denied(ip("168.63.129.17"), &[]), None);
        assert_eq!(always_denied(ip("fec0::1"), &[]), None);
        assert_eq!(always_denied(ip("10.0.0.1"), &[]), None);
        assert_eq!(always_denied(ip("2001:db8::1"), &[]), None);
        assert_eq!(always_denied(ip("64:ff9b::10.0.0.1"), &[]), None);
    }

    #[test]
    fn extra_addresses_match_in_any_form() {
        let extra = [ip("10.200.0.1"), ip("::ffff:192.0.2.9"), ip("2001:db8::1")];
        assert_eq!(
            always_denied(ip("10.200.0.1"), &extra),
            Some(NODE_OR_GATEWAY)
        );
        assert_eq!(
            always_denied(ip("::ffff:10.200.0.1"), &extra),
            Some(NODE_OR_GATEWAY)
        );
        assert_eq!(
            always_denied(ip("192.0.2.9"), &extra),
            Some(NODE_OR_GATEWAY)
        );
        assert_eq!(
            always_denied(ip("2001:db8::1"), &extra),
            Some(NODE_OR_GATEWAY)
        );
        assert_eq!(always_denied(ip("10.200.0.2"), &extra), None);
    }

    #[test]
    fn names() {
        assert_eq!(
            always_denied_name("metadata.google.internal"),
            Some(METADATA_NAME)
        );
        assert_eq!(
            always_denied_name("Metadata.Google.Internal."),
            Some(METADATA_NAME)
        );
        assert_eq!(always_denied_name("metadata"), Some(METADATA_NAME));
        assert_eq!(always_denied_name("metadata.goog"), Some(METADATA_NAME));
        assert_eq!(
            always_denied_name("metadata.tencentyun.com"),
            Some(METADATA_NAME)
        );
        assert_eq!(always_denied_name("localhost"), Some(LOOPBACK_NAME));
        assert_eq!(always_denied_name("foo.localhost."), Some(LOOPBACK_NAME));
        assert_eq!(always_denied_name("169.254.169.254"), Some(METADATA));
        assert_eq!(
            always_denied_name("[::ffff:169.254.169.254]"),
            Some(METADATA)
        );
        assert_eq!(
            always_denied_name("metadata.google.internal.example.com"),
            None
        );
        assert_eq!(always_denied_name("notlocalhost"), None);
        assert_eq!(always_denied_name("web.egress.test"), None);
    }

    #[test]
    fn node_addresses_include_loopback() {
        // Every namespace has `lo`; the test's namespace has it with 127.0.0.1 unless it is
        // down, which the agent's tests never leave it.
        let addrs = node_addresses().expect("getifaddrs");
        assert!(addrs.contains(&ip("127.0.0.1")), "{addrs:?}");
    }

    #[test]
    fn default_gateways_match_ip_route() {
        // The gateways depend on the machine: compare with what iproute2 reports.
        let mut expected = Vec::new();
        for family in ["-4", "-6"] {
            let out = std::process::Command::new("ip")
                .args([family, "route", "show", "default", "table", "all"])
                .output()
                .expect("running `ip route` (iproute2) to cross-check the gateways");
            let text = String::from_utf8_lossy(&out.stdout);
            let words: Vec<&str> = text.split_whitespace().collect();
            for pair in words.windows(2) {
                if pair[0] == "via" {
                    // `via inet6 ADDR` is a v4 route through an IPv6 gateway.
                    if let Ok(a) = pair[1].parse::<IpAddr>() {
                        expected.push(normalize(a));
                    }
                }
            }
        }
        expected.sort_unstable();
        expected.dedup();
        let got = default_gateways(None).expect("route dump");
        assert_eq!(got, expected);
    }
}
