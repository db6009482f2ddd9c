//! The agent's own resolver (hickory-resolver). When an actor's connection names its server
//! (TLS SNI, HTTP Host) and the agent dials upstream itself, it dials what *this* resolver
//! answers for that name, not the address the actor chose: an actor cannot send an allowed
//! SNI to a forbidden address (SNI spoofing, domain fronting).
//!
//! Its sockets carry the agent's mark like every other agent socket, so the kernel programs
//! leave them alone even when the agent runs inside a captured cgroup.
use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    time::Duration,
};

use hickory_resolver::{
    Resolver as HickoryResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::{RuntimeProvider, TokioRuntimeProvider, TokioTime, iocompat::AsyncIoTokioAsStd},
};
use socket2::{Protocol, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::socket::SocketFactory;

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resolver could not be set up (no usable /etc/resolv.conf and no upstream given).
    #[error(
        "setting up the agent's resolver: {0}; pass --dns-upstream IP:PORT (env EGRESS_DNS_UPSTREAM)"
    )]
    Setup(String),
    /// The name is not a DNS name.
    #[error("{0:?} is not a DNS name")]
    Name(String),
    /// The lookup failed (NXDOMAIN, no records, upstream unreachable).
    #[error("resolving {name}: {reason}")]
    Lookup {
        /// The name.
        name: String,
        /// The resolver's answer.
        reason: String,
    },
    /// No answer within the bound.
    #[error("resolving {name}: no answer within {timeout:?}")]
    Timeout {
        /// The name.
        name: String,
        /// The bound.
        timeout: Duration,
    },
}

/// Resolves names for the agent's direct dials.
pub struct Resolver {
    inner: HickoryResolver<MarkedRuntime>,
    timeout: Duration,
}

impl Resolver {
    /// A resolver asking `upstream` (UDP, then TCP on truncation), or the servers of
    /// /etc/resolv.conf when `None`; every lookup bounded by `timeout`.
    pub fn new(upstream: Option<SocketAddr>, mark: u32, timeout: Duration) -> Result<Self, Error> {
        let runtime = MarkedRuntime {
            inner: TokioRuntimeProvider::default(),
            sockets: SocketFactory::new(mark),
        };
        let (config, mut opts) = match upstream {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                (
                    ResolverConfig::from_name_servers(vec![server]),
                    ResolverOpts::default(),
                )
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| Error::Setup(format!("reading /etc/resolv.conf: {e}")))?,
        };
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = 1024;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let inner = HickoryResolver::builder_with_config(config, runtime)
            .with_options(opts)
            .build()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(Resolver { inner, timeout })
    }

    /// The addresses `name` resolves to (A and AAAA), as a fully qualified name: no search
    /// domains are tried, so an actor's name never picks up the node's search list.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, Error> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let parsed = hickory_resolver::proto::rr::Name::from_ascii(&fqdn)
            .map_err(|_| Error::Name(name.to_string()))?;
        let bound = self.timeout.saturating_mul(3);
        let found = tokio::time::timeout(bound, self.inner.lookup_ip(parsed))
            .await
            .map_err(|_| Error::Timeout {
                name: name.to_string(),
                timeout: bound,
            })?
            .map_err(|e| Error::Lookup {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        let addrs: Vec<IpAddr> = found.iter().collect();
        if addrs.is_empty() {
            return Err(Error::Lookup {
                name: name.to_string(),
                reason: "no A or AAAA records".into(),
            });
        }
        Ok(addrs)
    }
}

/// hickory's tokio runtime with the agent's `SO_MARK` on every socket it opens (made by the
/// agent's [`SocketFactory`]).
#[derive(Clone)]
struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    sockets: SocketFactory,
}

type BoxIo<T> = Pin<Box<dyn Send + Future<Output = io::Result<T>>>>;

impl RuntimeProvider for MarkedRuntime {
    type Handle = <TokioRuntimeProvider as RuntimeProvider>::Handle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> BoxIo<Self::Tcp> {
        let socket = self
            .sockets
            .socket(server_addr, Type::STREAM, Protocol::TCP);
        Box::pin(async move {
            let socket = socket?;
            if let Some(bind) = bind_addr {
                socket.bind(&bind.into())?;
            }
            socket.set_tcp_nodelay(true)?;
            let socket = TcpSocket::from_std_stream(socket.into());
            let wait = timeout.unwrap_or(Duration::from_secs(5));
            match tokio::time::timeout(wait, socket.connect(server_addr)).await {
                Ok(stream) => stream.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect to the DNS server timed out",
                )),
            }
        })
    }

    fn bind_udp(&self, local_addr: SocketAddr, _server_addr: SocketAddr) -> BoxIo<Self::Udp> {
        let socket = self.sockets.socket(local_addr, Type::DGRAM, Protocol::UDP);
        Box::pin(async move {
            let socket = socket?;
            socket.bind(&local_addr.into())?;
            UdpSocket::from_std(socket.into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot DNS server on loopback answering every A query with `answer`.
    async fn fake_server(answer: std::net::Ipv4Addr) -> SocketAddr {
        use hickory_resolver::proto::{
            op::{Message, MessageType, ResponseCode},
            rr::{RData, Record, RecordType, rdata::A},
        };
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new(
                    query.metadata.id,
                    MessageType::Response,
                    query.metadata.op_code,
                );
                reply.metadata.recursion_desired = true;
                reply.metadata.recursion_available = true;
                reply.metadata.response_code = ResponseCode::NoError;
                for q in query.queries.iter() {
                    reply.add_query(q.clone());
                    if q.query_type() == RecordType::A {
                        reply.add_answer(Record::from_rdata(
                            q.name().clone(),
                            60,
                            RData::A(A(answer)),
                        ));
                    }
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn resolves_through_the_given_upstream() {
        let upstream = fake_server("10.9.8.7".parse().unwrap()).await;
        let resolver = Resolver::new(Some(upstream), 0, Duration::from_secs(2)).unwrap();
        let addrs = resolver.lookup("web.egress.test").await.unwrap();
        assert_eq!(addrs, vec!["10.9.8.7".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn silent_upstream_is_a_bounded_error() {
        // A bound UDP socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let resolver = Resolver::new(
            Some(silent.local_addr().unwrap()),
            0,
            Duration::from_millis(200),
        )
        .unwrap();
        let start = std::time::Instant::now();
        assert!(resolver.lookup("web.egress.test").await.is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn non_names_are_refused() {
        let resolver = Resolver::new(
            Some("127.0.0.1:9".parse().unwrap()),
            0,
            Duration::from_millis(100),
        )
        .unwrap();
        assert!(matches!(
            resolver.lookup("a b").await,
            Err(Error::Name(_) | Error::Lookup { .. })
        ));
    }
}
