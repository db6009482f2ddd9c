//! nftables: the `egress` table of a worker namespace. (Interface stub; the real module
//! lands from the net branch.)
use std::{fmt, net::Ipv4Addr, path::Path, str::FromStr};

/// The table's name (family inet).
pub const TABLE: &str = "egress";

/// Transport protocol of an inbound port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A port forwarded from the worker to the actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Inbound {
    /// Protocol.
    pub proto: Proto,
    /// Port.
    pub port: u16,
}

impl FromStr for Inbound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, port) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected tcp/PORT or udp/PORT"))?;
        let proto = match p {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(format!("{s:?}: expected tcp/PORT or udp/PORT")),
        };
        let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        Ok(Inbound { proto, port })
    }
}
impl fmt::Display for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            match self.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            },
            self.port
        )
    }
}
impl serde::Serialize for Inbound {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> serde::Deserialize<'de> for Inbound {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One actor's rules.
#[derive(Clone, Debug)]
pub struct Actor {
    /// Actor id (rule comments).
    pub id: String,
    /// Worker-side interface.
    pub veth: String,
    /// Actor address.
    pub addr: Ipv4Addr,
    /// Worker-side address.
    pub gateway: Ipv4Addr,
    /// Inbound ports.
    pub inbound: Vec<Inbound>,
    /// Masquerade UDP instead of dropping it.
    pub allow_udp: bool,
}

/// A worker namespace's table.
#[derive(Clone, Debug)]
pub struct Worker {
    /// The agent's NAT listener port.
    pub listen_port: u16,
    /// Resolver for actor DNS.
    pub resolver: Option<Ipv4Addr>,
    /// Actors on this worker.
    pub actors: Vec<Actor>,
}

/// A counter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stub.
    #[error("nft: {0}")]
    Nft(String),
}

/// Replaces the table.
pub fn apply(_worker_netns: Option<&Path>, _w: &Worker) -> Result<(), Error> {
    Err(Error::Nft("not implemented".into()))
}
/// Removes the table.
pub fn remove(_worker_netns: Option<&Path>) -> Result<bool, Error> {
    Err(Error::Nft("not implemented".into()))
}
/// Drop counter.
pub fn dropped(_worker_netns: Option<&Path>, _veth: &str) -> Result<Option<Counter>, Error> {
    Err(Error::Nft("not implemented".into()))
}
