//! Direct dials: with no PEP deciding, the agent connects upstream itself, to the address the
//! policy allowed. A name is resolved by the agent's own resolver, and every address it
//! answers is checked again (a name must not lead to the metadata service or the node).
use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::TcpStream;

use crate::{resolve, socket::SocketFactory};

/// What a direct connection dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dial {
    /// The name the actor's TLS SNI or HTTP Host named, resolved by the agent's resolver, at
    /// the original port: never the address the actor chose (SNI spoofing).
    Name {
        /// The name.
        name: String,
        /// The original destination port.
        port: u16,
    },
    /// The original destination: IP-only flows, and names the actor's own DNS answer tied
    /// to that very address.
    Addr(SocketAddr),
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dial::Name { name, port } => write!(f, "{name}:{port}"),
            Dial::Addr(addr) => addr.fmt(f),
        }
    }
}

/// Why a direct dial failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name did not resolve.
    #[error(transparent)]
    Resolve(#[from] resolve::Error),
    /// Every address the name resolved to is always denied.
    #[error("{name} resolves only to denied addresses: {reasons}")]
    Denied {
        /// The name.
        name: String,
        /// Each address with the reason it is denied.
        reasons: String,
    },
    /// No address could be connected to.
    #[error("upstream {target} unreachable: {reason}")]
    Unreachable {
        /// What was dialled.
        target: String,
        /// The last error.
        reason: io::Error,
    },
    /// The connect did not complete within the bound.
    #[error("connecting to {target} took longer than {timeout:?}")]
    Timeout {
        /// What was dialled.
        target: String,
        /// The bound.
        timeout: Duration,
    },
}

/// Connects to what `dial` names. `denied` says why an address must not be dialled (the
/// always-denied check, with the policy's exact-address override applied by the caller).
/// Each connect attempt is bounded by `timeout`; at most 4 addresses are tried.
pub async fn connect(
    dial: &Dial,
    resolver: &resolve::Resolver,
    sockets: &SocketFactory,
    timeout: Duration,
    denied: impl Fn(IpAddr, u16) -> Option<String>,
) -> Result<(TcpStream, SocketAddr), Error> {
    let (target, candidates) = match dial {
        Dial::Addr(addr) => (addr.to_string(), vec![*addr]),
        Dial::Name { name, port } => {
            let addrs = resolver.lookup(name).await?;
            let mut allowed = Vec::new();
            let mut reasons = Vec::new();
            for ip in addrs {
                match denied(ip, *port) {
                    Some(reason) => reasons.push(format!("{ip} ({reason})")),
                    None => allowed.push(SocketAddr::new(ip, *port)),
                }
            }
            if allowed.is_empty() {
                return Err(Error::Denied {
                    name: name.clone(),
                    reasons: reasons.join(", "),
                });
            }
            (dial.to_string(), allowed)
        }
    };
    let mut last = None;
    for addr in candidates.into_iter().take(4) {
        match tokio::time::timeout(timeout, sockets.connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, addr)),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                ))
            }
        }
    }
    match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => Err(Error::Timeout { target, timeout }),
        Some(reason) => Err(Error::Unreachable { target, reason }),
        None => Err(Error::Unreachable {
            target,
            reason: io::Error::new(io::ErrorKind::NotFound, "no address to dial"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> resolve::Resolver {
        resolve::Resolver::new(
            Some("127.0.0.1:9".parse().unwrap()),
            0,
            Duration::from_millis(100),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn dials_the_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, dialled) = connect(
            &Dial::Addr(addr),
            &resolver(),
            &SocketFactory::default(),
            Duration::from_secs(1),
            |_, _| None,
        )
        .await
        .unwrap();
        assert_eq!(dialled, addr);
    }

    #[tokio::test]
    async fn refused_connect_is_unreachable() {
        // Bind then drop: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = connect(
            &Dial::Addr(addr),
            &resolver(),
            &SocketFactory::default(),
            Duration::from_secs(1),
            |_, _| None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    }
}
