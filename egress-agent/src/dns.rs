//! The agent's DNS forwarder: actors' captured DNS queries (UDP and TCP port 53) come here,
//! names the policy denies are answered NXDOMAIN on the spot, the rest are relayed to the
//! node's resolver, and each answer's addresses are recorded per actor ([`Answers`]) so a
//! connection to a bare IP can still be classified by the name the actor looked up.
//!
//! Messages are parsed and built with hickory-proto. What goes upstream is the query as parsed
//! and re-encoded (with a fresh random id), so the resolver is asked exactly the question the
//! policy saw; what comes back is checked against that id and question before it is used.

mod answers;
mod message;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    ProtoError,
    op::{Header, Message, MessageType, OpCode, Query, ResponseCode},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::Semaphore,
    time::{Instant, timeout_at},
};
use tracing::{debug, info, warn};

pub use answers::Answers;

use crate::{
    metrics::{DnsOutcome, Metrics},
    socket::SocketFactory,
};

/// Bounds on the forwarder's work; the defaults suit a node resolver and ordinary clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest UDP query accepted (larger: FORMERR). 4,096 is the usual EDNS buffer size.
    pub max_udp_query: usize,
    /// Largest DNS-over-TCP message accepted from an actor; a longer one ends the connection.
    pub max_tcp_message: usize,
    /// How long the upstream resolver has to answer one query, over UDP and TCP together;
    /// past it the actor gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// Queries relayed upstream at once, all actors together. Past it a query is answered
    /// SERVFAIL at once (not dropped): the client learns immediately rather than after its
    /// own timeout, and no upstream socket is opened for it.
    pub max_in_flight: usize,
    /// Addresses remembered per actor; past it the oldest entry is evicted.
    pub max_answers_per_actor: usize,
    /// Shortest time an address is remembered, whatever the answer's TTL: the connect that
    /// follows a lookup, and clients' own DNS caches (browsers keep 60 s), must still find it.
    pub min_ttl: Duration,
    /// Longest time an address is remembered, whatever the answer's TTL, so that an address
    /// re-used by another name is not attributed to the old one for days.
    pub max_ttl: Duration,
    /// How long a DNS-over-TCP connection may stay silent (between or within messages, or
    /// while its answer is not read) before it is closed.
    pub tcp_idle_timeout: Duration,
}

/// Largest DNS datagram taken from an actor (the default of [`Limits::max_udp_query`]); the
/// capture fronts drop larger ones before they reach the forwarder.
pub const MAX_UDP_QUERY: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_udp_query: MAX_UDP_QUERY,
            max_tcp_message: 65535,
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 1024,
            max_answers_per_actor: 4096,
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// `ttl` seconds, clamped to `[min_ttl, max_ttl]` (never panics, even if min > max).
    fn clamp_ttl(&self, ttl: u32) -> Duration {
        let ttl = Duration::from_secs(u64::from(ttl));
        if ttl < self.min_ttl {
            self.min_ttl
        } else if ttl > self.max_ttl {
            self.max_ttl
        } else {
            ttl
        }
    }
}

/// What the policy says about a queried name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Relay the query to the resolver.
    Allow,
    /// Answer NXDOMAIN without asking the resolver.
    Deny {
        /// Why, for the log.
        reason: String,
    },
}

/// Why a relayed query got SERVFAIL instead of the resolver's answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening, sending to or reading from the upstream resolver failed.
    #[error("upstream resolver {upstream}: {source}")]
    Io {
        /// The resolver.
        upstream: SocketAddr,
        /// What failed.
        source: io::Error,
    },
    /// No matching answer in time.
    #[error(
        "upstream resolver {0} did not answer within {1:?}; check that it is up and reachable from the agent's namespace"
    )]
    Timeout(SocketAddr, Duration),
    /// Answers came, but none for this query (other id or question), or one that does not parse.
    #[error(
        "upstream resolver {0} sent only answers that do not match the query (id or question) or do not parse"
    )]
    Mismatch(SocketAddr),
    /// Too many queries in flight.
    #[error("more than {0} DNS queries in flight; a client may be flooding, or raise the limit")]
    Busy(usize),
    /// A message could not be encoded.
    #[error("cannot encode a DNS message: {0}")]
    Encode(#[from] ProtoError),
}

/// What one DNS-over-TCP connection did, for the caller's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsTcpStats {
    /// Messages read from the actor.
    pub queries: u64,
    /// Answers written back.
    pub answers: u64,
    /// Whether the connection ended because it stayed idle too long (else: the actor closed).
    pub idle_timeout: bool,
}

/// How a query reached the forwarder: decides its size bound and whether a truncated UDP
/// answer is retried over TCP (only worth it when the actor itself came over TCP; a UDP
/// client gets the TC bit and retries over TCP itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// A filter on answered addresses: `Some(reason)` removes the address from answers.
type AddressFilter = dyn Fn(IpAddr) -> Option<String> + Send + Sync;

/// Relays actors' DNS queries to the node's resolver under the policy, and remembers the
/// answers per actor.
pub struct Forwarder {
    upstream: SocketAddr,
    sockets: SocketFactory,
    limits: Limits,
    in_flight: Semaphore,
    answers: Answers,
    address_filter: Option<Box<AddressFilter>>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream", &self.upstream)
            .field("limits", &self.limits)
            .field("address_filter", &self.address_filter.is_some())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder to `upstream` (the node's resolver), whose sockets come from `sockets` (the
    /// agent's marked, capture-exempt sockets).
    pub fn new(upstream: SocketAddr, sockets: SocketFactory, limits: Limits) -> Self {
        Forwarder {
            upstream,
            sockets,
            limits,
            in_flight: Semaphore::new(limits.max_in_flight.min(Semaphore::MAX_PERMITS)),
            answers: Answers::new(limits.max_answers_per_actor),
            address_filter: None,
            metrics: None,
        }
    }

    /// The same forwarder counting each query's outcome in `egress_dns_queries_total`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, outcome: DnsOutcome) {
        if let Some(metrics) = &self.metrics {
            metrics.dns_query(outcome);
        }
    }

    /// Checks every A/AAAA address the resolver answers with: `filter(ip)` returning
    /// `Some(reason)` removes that address from the answer (the message is rebuilt without
    /// it). An answer left with no address for the queried name becomes NXDOMAIN; either
    /// way the reason is logged and filtered addresses are never recorded. Meant for the
    /// addresses no actor may reach whatever its policy (e.g. `policy::always_denied`); a
    /// filter per actor would go with the name verdict instead.
    pub fn with_address_filter(
        mut self,
        filter: impl Fn(IpAddr) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.address_filter = Some(Box::new(filter));
        self
    }

    /// What the actors resolved.
    pub fn answers(&self) -> &Answers {
        &self.answers
    }

    /// Answers one query (wire bytes) that `actor_id` sent over UDP. `None` when there is
    /// nothing to answer: fewer than 12 bytes, or a response rather than a query (answering
    /// those could loop). A query that does not parse gets FORMERR; another opcode than QUERY,
    /// NOTIMP; a name that is not a hostname, REFUSED; a name `verdict` denies, NXDOMAIN,
    /// built here and logged; the resolver's failure or silence, SERVFAIL. Otherwise the
    /// resolver's answer, whose addresses for the queried name (CNAMEs followed) are recorded
    /// for `actor_id`. Never panics, whatever the bytes.
    pub async fn answer(
        &self,
        actor_id: &str,
        query: &[u8],
        verdict: &(dyn Fn(&str) -> NameVerdict + Sync),
    ) -> Option<Vec<u8>> {
        self.answer_over(actor_id, query, verdict, Transport::Udp)
            .await
    }

    /// Serves DNS over TCP (RFC 7766: messages prefixed by their 2-byte length) on a captured
    /// stream, one message at a time, each through the same path as [`Forwarder::answer`],
    /// until the actor closes or stays idle for `tcp_idle_timeout`. An error for a message
    /// over `max_tcp_message`, a message cut short, one that gets no answer (not a query) or
    /// an I/O error; the caller just closes the stream then.
    pub async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        actor_id: &str,
        verdict: &(dyn Fn(&str) -> NameVerdict + Sync),
    ) -> io::Result<DnsTcpStats> {
        let idle = self.limits.tcp_idle_timeout;
        let mut stats = DnsTcpStats::default();
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 2];
            match timeout_at(Instant::now() + idle, stream.read(&mut len[..1])).await {
                Err(_) => {
                    stats.idle_timeout = true;
                    return Ok(stats);
                }
                Ok(Ok(0)) => return Ok(stats),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
            let deadline = Instant::now() + idle;
            timed(deadline, stream.read_exact(&mut len[1..])).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len == 0 || len > self.limits.max_tcp_message {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "DNS-over-TCP message of {len} bytes from actor {actor_id}: allowed 1 to {} (max_tcp_message)",
                        self.limits.max_tcp_message
                    ),
                ));
            }
            buf.resize(len, 0);
            timed(deadline, stream.read_exact(&mut buf)).await?;
            stats.queries += 1;
            let Some(reply) = self
                .answer_over(actor_id, &buf, verdict, Transport::Tcp)
                .await
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("DNS-over-TCP message from actor {actor_id} is not a DNS query"),
                ));
            };
            let Ok(reply_len) = u16::try_from(reply.len()) else {
                return Err(io::Error::other(format!(
                    "DNS answer of {} bytes does not fit a DNS-over-TCP message",
                    reply.len()
                )));
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&reply_len.to_be_bytes());
            framed.extend_from_slice(&reply);
            timed(Instant::now() + idle, stream.write_all(&framed)).await?;
            stats.answers += 1;
        }
    }

    async fn answer_over(
        &self,
        actor_id: &str,
        query: &[u8],
        verdict: &(dyn Fn(&str) -> NameVerdict + Sync),
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let Some(header) = message::header(query) else {
            debug!(actor = %actor_id, bytes = query.len(), transport = transport.as_str(), "dns: not a DNS message, dropped");
            self.count(DnsOutcome::Dropped);
            return None;
        };
        if header.metadata.message_type != MessageType::Query {
            debug!(actor = %actor_id, transport = transport.as_str(), "dns: a response sent to the forwarder, dropped");
            self.count(DnsOutcome::Dropped);
            return None;
        }
        let max = match transport {
            Transport::Udp => self.limits.max_udp_query,
            Transport::Tcp => self.limits.max_tcp_message,
        };
        if query.len() > max {
            return self.refuse(
                actor_id,
                &header,
                ResponseCode::FormErr,
                "query over the size limit",
                transport,
            );
        }
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(_) => {
                return self.refuse(
                    actor_id,
                    &header,
                    ResponseCode::FormErr,
                    "query does not parse",
                    transport,
                );
            }
        };
        if request.metadata.op_code != OpCode::Query {
            return self.refuse(
                actor_id,
                &header,
                ResponseCode::NotImp,
                "opcode is not QUERY",
                transport,
            );
        }
        let [question] = request.queries.as_slice() else {
            return self.refuse(
                actor_id,
                &header,
                ResponseCode::FormErr,
                "not exactly one question",
                transport,
            );
        };
        let qtype = question.query_type();
        let Some(name) = message::hostname(question.name()) else {
            info!(actor = %actor_id, name = %question.name(), qtype = %qtype, "dns refused: the name is not a hostname");
            self.count(DnsOutcome::Refused);
            let reply = message::reply_to(&request, ResponseCode::Refused);
            return self.finish(actor_id, "-", question, reply, 0, started, transport);
        };
        if let NameVerdict::Deny { reason } = verdict(&name) {
            info!(actor = %actor_id, name = %name, qtype = %qtype, reason = %reason, "dns denied");
            self.count(DnsOutcome::Denied);
            let reply = message::reply_to(&request, ResponseCode::NXDomain);
            return self.finish(actor_id, &name, question, reply, 0, started, transport);
        }
        match self
            .relay(actor_id, &name, &request, question, transport)
            .await
        {
            Ok((reply, recorded)) => self.finish(
                actor_id, &name, question, reply, recorded, started, transport,
            ),
            Err(e) => {
                warn!(actor = %actor_id, name = %name, qtype = %qtype, error = %e, "dns: answering SERVFAIL");
                self.count(DnsOutcome::Servfail);
                let reply = message::reply_to(&request, ResponseCode::ServFail);
                self.finish(actor_id, &name, question, reply, 0, started, transport)
            }
        }
    }

    /// Relays `request` upstream and returns the answer for the actor (its id restored,
    /// filtered addresses removed) and how many addresses were recorded.
    async fn relay(
        &self,
        actor_id: &str,
        name: &str,
        request: &Message,
        question: &Query,
        transport: Transport,
    ) -> Result<(Reply, usize), Error> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| Error::Busy(self.limits.max_in_flight))?;
        let deadline = Instant::now() + self.limits.upstream_timeout;
        let id: u16 = rand::random();
        let mut upstream_request = request.clone();
        upstream_request.metadata.id = id;
        let bytes = upstream_request.to_vec()?;
        // Room for what the client said it can take, and at least the usual EDNS size: a
        // larger datagram would be cut and then fail to parse.
        let recv_size = usize::from(request.max_payload()).max(4096);
        let (mut reply, mut raw) = self
            .relay_udp(&bytes, id, question, deadline, recv_size)
            .await?;
        if reply.metadata.truncation && transport == Transport::Tcp {
            (reply, raw) = self.relay_tcp(&bytes, id, question, deadline).await?;
        }

        let mut addresses = message::chain_addresses(&reply, question.name());
        let mut rebuilt = false;
        if let Some(filter) = &self.address_filter {
            let removed = message::remove_addresses(&mut reply, filter.as_ref());
            if !removed.is_empty() {
                let before = addresses.len();
                addresses = message::chain_addresses(&reply, question.name());
                let reasons: Vec<String> = removed
                    .iter()
                    .map(|(ip, why)| format!("{ip}: {why}"))
                    .collect();
                if before > 0 && addresses.is_empty() {
                    info!(actor = %actor_id, name = %name, qtype = %question.query_type(), reasons = ?reasons, "dns answer denied: every address is filtered");
                    self.count(DnsOutcome::Denied);
                    return Ok((
                        Reply::Built(message::reply_to(request, ResponseCode::NXDomain)),
                        0,
                    ));
                }
                info!(actor = %actor_id, name = %name, qtype = %question.query_type(), reasons = ?reasons, "dns answer: filtered addresses removed");
                rebuilt = true;
            }
        }
        if reply.metadata.response_code != ResponseCode::NoError {
            addresses.clear();
        }
        self.answers.record(
            actor_id,
            name,
            addresses
                .iter()
                .map(|&(ip, ttl)| (ip, self.limits.clamp_ttl(ttl))),
        );
        let recorded = addresses.len();
        self.count(DnsOutcome::Answered);
        if rebuilt {
            reply.metadata.id = request.metadata.id;
            return Ok((Reply::Built(reply), recorded));
        }
        // Unchanged: the resolver's own bytes, only the id put back.
        let [hi, lo] = request.metadata.id.to_be_bytes();
        if let Some(id) = raw.get_mut(..2) {
            id.copy_from_slice(&[hi, lo]);
        }
        Ok((Reply::Raw(reply, raw), recorded))
    }

    /// Sends the query over UDP and waits for the matching answer; datagrams that do not
    /// match (another id or question, or not parsing) are ignored until the deadline.
    async fn relay_udp(
        &self,
        bytes: &[u8],
        id: u16,
        question: &Query,
        deadline: Instant,
        recv_size: usize,
    ) -> Result<(Message, Vec<u8>), Error> {
        let upstream = self.upstream;
        let io = |source| Error::Io { upstream, source };
        let socket = self.sockets.udp_connect(upstream).map_err(io)?;
        timed(deadline, socket.send(bytes)).await.map_err(io)?;
        let mut buf = vec![0u8; recv_size];
        let mut mismatched = false;
        loop {
            let n = match timeout_at(deadline, socket.recv(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(io(e)),
                Err(_) if mismatched => return Err(Error::Mismatch(upstream)),
                Err(_) => return Err(Error::Timeout(upstream, self.limits.upstream_timeout)),
            };
            let raw = buf.get(..n).unwrap_or_default();
            match Message::from_vec(raw) {
                Ok(reply) if message::answers_query(&reply, id, question) => {
                    return Ok((reply, raw.to_vec()));
                }
                _ => {
                    debug!(upstream = %upstream, bytes = n, "dns: ignored an upstream datagram that does not answer the query");
                    mismatched = true;
                }
            }
        }
    }

    /// Sends the query over TCP and reads one answer, which must match.
    async fn relay_tcp(
        &self,
        bytes: &[u8],
        id: u16,
        question: &Query,
        deadline: Instant,
    ) -> Result<(Message, Vec<u8>), Error> {
        let upstream = self.upstream;
        let io = |source| Error::Io { upstream, source };
        let len = u16::try_from(bytes.len())
            .map_err(|_| io(io::Error::other("query too long for DNS over TCP")))?;
        let exchange = async {
            let mut stream = self.sockets.connect(upstream).await?;
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(bytes);
            stream.write_all(&framed).await?;
            let len = stream.read_u16().await?;
            let mut raw = vec![0u8; usize::from(len)];
            stream.read_exact(&mut raw).await?;
            Ok::<_, io::Error>(raw)
        };
        let raw = match timeout_at(deadline, exchange).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => return Err(Error::Timeout(upstream, self.limits.upstream_timeout)),
        };
        match Message::from_vec(&raw) {
            Ok(reply) if message::answers_query(&reply, id, question) => Ok((reply, raw)),
            _ => Err(Error::Mismatch(upstream)),
        }
    }

    /// FORMERR, NOTIMP and the like for a query that got no further than its header.
    fn refuse(
        &self,
        actor_id: &str,
        header: &Header,
        rcode: ResponseCode,
        why: &str,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        debug!(actor = %actor_id, rcode = %rcode, reason = why, transport = transport.as_str(), "dns query refused");
        self.count(DnsOutcome::Refused);
        encode(&message::reply_to_header(header, rcode))
    }

    /// Logs the query's one line and encodes the answer.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        actor_id: &str,
        name: &str,
        question: &Query,
        reply: impl Into<Reply>,
        recorded: usize,
        started: Instant,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let reply = reply.into();
        let message = reply.message();
        debug!(
            actor = %actor_id,
            name = %name,
            qtype = %question.query_type(),
            rcode = %message.metadata.response_code,
            answers = message.answers.len(),
            recorded,
            truncated = message.metadata.truncation,
            transport = transport.as_str(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "dns query"
        );
        match reply {
            Reply::Raw(_, raw) => Some(raw),
            Reply::Built(message) => encode(&message),
        }
    }
}

/// An answer for the actor: the resolver's bytes as they came (with the parsed message for the
/// log), or a message to encode.
enum Reply {
    Raw(Message, Vec<u8>),
    Built(Message),
}

impl Reply {
    fn message(&self) -> &Message {
        match self {
            Reply::Raw(message, _) | Reply::Built(message) => message,
        }
    }
}

impl From<Message> for Reply {
    fn from(message: Message) -> Self {
        Reply::Built(message)
    }
}

/// Encodes an answer the agent built; `None` (no answer, the client times out) only if
/// hickory-proto cannot encode it, which a well-formed message never hits.
fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            warn!(error = %e, "dns: cannot encode an answer; the client will time out");
            None
        }
    }
}

/// `fut` with a deadline, a miss as an `io::ErrorKind::TimedOut` error.
async fn timed<T>(deadline: Instant, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    timeout_at(deadline, fut)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
}
