//! Userspace-only conversions between the shared map types and `std` types.
extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    ACTOR_DNS_V4, ACTOR_DNS_V6, ACTOR_LISTEN_V4, ACTOR_LISTEN_V6, ActorEntry, ConnKey, Record,
    Settings, is_v4_mapped,
};

// SAFETY: each type is #[repr(C)], Copy, made of integers, with no implicit padding (checked by
// the size tests in lib.rs), so every bit pattern is valid.
unsafe impl aya::Pod for Record {}
// SAFETY: as above.
unsafe impl aya::Pod for ConnKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ActorEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for Settings {}

/// IP address as network byte order words; IPv4 becomes `::ffff:a.b.c.d`.
pub fn ip_to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut words = [0u32; 4];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    words
}

/// Network byte order words as an IP address; v4-mapped becomes IPv4.
pub fn words_to_ip(words: [u32; 4]) -> IpAddr {
    if is_v4_mapped(&words) {
        return IpAddr::V4(Ipv4Addr::from(words[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

impl Record {
    /// The original destination the actor connected to.
    pub fn destination(&self) -> SocketAddr {
        SocketAddr::new(words_to_ip(self.dst_ip), self.dst_port)
    }
}

impl ConnKey {
    /// The key of the connection accepted from `client` on a listener in network namespace
    /// `netns` (its cookie).
    pub fn new(netns: u64, client: SocketAddr) -> Self {
        ConnKey {
            netns,
            ip: ip_to_words(client.ip()),
            port: client.port(),
            _pad: [0; 3],
        }
    }

    /// The client address the key was made from.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(words_to_ip(self.ip), self.port)
    }
}

impl ActorEntry {
    /// An entry for listeners on `port` at `v4` and/or `v6`.
    pub fn new(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>, port: u16) -> Self {
        let mut flags = 0;
        let mut listen_ip4 = 0;
        let mut listen_ip6 = [0; 4];
        if let Some(v4) = v4 {
            flags |= ACTOR_LISTEN_V4;
            listen_ip4 = u32::from_ne_bytes(v4.octets());
        }
        if let Some(v6) = v6 {
            flags |= ACTOR_LISTEN_V6;
            listen_ip6 = ip_to_words(IpAddr::V6(v6));
        }
        ActorEntry {
            listen_ip4,
            listen_ip6,
            listen_port: port,
            flags,
            dns_port: 0,
            _pad: 0,
        }
    }

    /// The same entry with the actor's DNS socket on `port` for IPv4 (`v4`) and/or IPv6
    /// (`v6`). The DNS socket shares the listener's addresses, so a family without a listener
    /// gets no DNS either (its DNS sends are refused).
    pub fn with_dns(mut self, port: u16, v4: bool, v6: bool) -> Self {
        self.flags &= !(ACTOR_DNS_V4 | ACTOR_DNS_V6);
        self.dns_port = port;
        if port == 0 {
            return self;
        }
        if v4 && self.flags & ACTOR_LISTEN_V4 != 0 {
            self.flags |= ACTOR_DNS_V4;
        }
        if v6 && self.flags & ACTOR_LISTEN_V6 != 0 {
            self.flags |= ACTOR_DNS_V6;
        }
        self
    }

    /// The IPv4 listener, if any.
    pub fn listener_v4(&self) -> Option<SocketAddr> {
        (self.flags & ACTOR_LISTEN_V4 != 0).then(|| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(self.listen_ip4.to_ne_bytes())),
                self.listen_port,
            )
        })
    }

    /// The IPv6 listener, if any.
    pub fn listener_v6(&self) -> Option<SocketAddr> {
        (self.flags & ACTOR_LISTEN_V6 != 0)
            .then(|| SocketAddr::new(words_to_ip(self.listen_ip6), self.listen_port))
    }

    /// The IPv4 DNS socket, if any.
    pub fn dns_v4(&self) -> Option<SocketAddr> {
        (self.flags & ACTOR_DNS_V4 != 0).then(|| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(self.listen_ip4.to_ne_bytes())),
                self.dns_port,
            )
        })
    }

    /// The IPv6 DNS socket, if any.
    pub fn dns_v6(&self) -> Option<SocketAddr> {
        (self.flags & ACTOR_DNS_V6 != 0)
            .then(|| SocketAddr::new(words_to_ip(self.listen_ip6), self.dns_port))
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString as _;

    use super::*;

    #[test]
    fn words_round_trip() {
        for ip in [
            "10.1.2.3".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
        ] {
            assert_eq!(words_to_ip(ip_to_words(ip)), ip);
        }
    }

    #[test]
    fn ipv4_is_stored_v4_mapped_in_network_order() {
        let w = ip_to_words("10.1.2.3".parse().unwrap());
        assert!(is_v4_mapped(&w));
        assert_eq!(w[3].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn record_destination_brackets_ipv6() {
        let r = Record {
            dst_ip: ip_to_words("fd00::2".parse().unwrap()),
            dst_port: 8443,
            _pad: 0,
            pid: 1,
            actor_cgroup: 2,
            cgroup: 2,
            connect_ns: 0,
        };
        assert_eq!(r.destination().to_string(), "[fd00::2]:8443");
    }

    #[test]
    fn conn_key_gives_back_its_client() {
        for client in ["10.1.2.3:40000", "[fd00::2]:443"] {
            let client: SocketAddr = client.parse().unwrap();
            assert_eq!(ConnKey::new(7, client).client(), client);
        }
    }

    #[test]
    fn actor_entry_listeners() {
        let e = ActorEntry::new(Some(Ipv4Addr::LOCALHOST), None, 15001);
        assert_eq!(e.listener_v4().unwrap().to_string(), "127.0.0.1:15001");
        assert!(e.listener_v6().is_none());
        assert!(e.dns_v4().is_none());
    }

    #[test]
    fn dns_only_where_there_is_a_listener() {
        let e = ActorEntry::new(Some(Ipv4Addr::LOCALHOST), None, 15001).with_dns(40000, true, true);
        assert_eq!(e.dns_v4().unwrap().to_string(), "127.0.0.1:40000");
        assert!(
            e.dns_v6().is_none(),
            "no IPv6 listener address: no IPv6 DNS"
        );
        let e = ActorEntry::new(Some(Ipv4Addr::LOCALHOST), Some(Ipv6Addr::LOCALHOST), 15001)
            .with_dns(40000, true, true);
        assert_eq!(e.dns_v6().unwrap().to_string(), "[::1]:40000");
        assert_eq!(e.listener_v6().unwrap().to_string(), "[::1]:15001");
        let none = e.with_dns(0, true, true);
        assert!(none.dns_v4().is_none() && none.dns_v6().is_none());
        assert_eq!(none.flags, ACTOR_LISTEN_V4 | ACTOR_LISTEN_V6);
    }
}
