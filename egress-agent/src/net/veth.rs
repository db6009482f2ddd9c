//! The veth pair between a worker namespace and an actor namespace. (Interface stub; the
//! real module lands from the net branch.)
use std::{fmt, net::Ipv4Addr, path::Path, str::FromStr};

/// The actor end's name.
pub const ACTOR_IF: &str = "eth0";

/// A pool of /30s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    base: Ipv4Addr,
    prefix_len: u8,
}
impl Default for Pool {
    fn default() -> Self {
        Pool {
            base: Ipv4Addr::new(10, 200, 0, 0),
            prefix_len: 24,
        }
    }
}
impl FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or("expected A.B.C.D/N")?;
        Ok(Pool {
            base: a.parse().map_err(|_| "bad address")?,
            prefix_len: p.parse().map_err(|_| "bad prefix")?,
        })
    }
}
impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}
impl Pool {
    /// Pairs in the pool.
    pub fn capacity(&self) -> u32 {
        1 << ((30 - self.prefix_len) as u32)
    }
    /// Pair of a slot.
    pub fn pair(&self, slot: u32) -> Option<Pair> {
        if slot >= self.capacity() {
            return None;
        }
        let net = u32::from(self.base) + slot * 4;
        Some(Pair {
            slot,
            worker_if: format!("egress{slot}"),
            worker: Ipv4Addr::from(net + 1),
            actor: Ipv4Addr::from(net + 2),
            prefix_len: 30,
        })
    }
}

/// One /30.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pair {
    /// Slot in the pool.
    pub slot: u32,
    /// Worker-side interface name.
    pub worker_if: String,
    /// Worker-side address.
    pub worker: Ipv4Addr,
    /// Actor-side address.
    pub actor: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

/// What up did.
pub struct Up {
    /// Created (not adopted).
    pub created: bool,
}

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stub.
    #[error("veth: {0}")]
    Netlink(String),
}

/// Creates or adopts the pair.
pub fn up(_w: Option<&Path>, _a: &Path, _p: &Pair) -> Result<Up, Error> {
    Err(Error::Netlink("not implemented".into()))
}
/// Re-applies the actor side.
pub fn reapply(_a: &Path, _p: &Pair) -> Result<(), Error> {
    Err(Error::Netlink("not implemented".into()))
}
/// Deletes the pair.
pub fn down(_w: Option<&Path>, _p: &Pair) -> Result<bool, Error> {
    Err(Error::Netlink("not implemented".into()))
}
/// Our interfaces.
pub fn list(_w: Option<&Path>) -> Result<Vec<String>, Error> {
    Err(Error::Netlink("not implemented".into()))
}
/// ip_forward.
pub fn enable_forwarding(_w: Option<&Path>) -> Result<bool, Error> {
    Err(Error::Netlink("not implemented".into()))
}
