//! PLACEHOLDER (replaced by the classify branch): API only.
use std::{fmt, net::{IpAddr, SocketAddr}, time::Duration};

/// Outcome of one classifier.
pub enum Sniff { Incomplete, NotMatched, Name(String) }
/// Where the authority's host came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source { Sni, Host, Ip }
impl Source {
    /// Name for logs.
    pub const fn as_str(self) -> &'static str { match self { Source::Sni => "sni", Source::Host => "host", Source::Ip => "ip" } }
}
/// Host part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host { Name(String), Ip(IpAddr) }
/// Authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority { pub host: Host, pub port: u16, pub source: Source }
impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host { Host::Name(n) => write!(f, "{n}:{}", self.port), Host::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f) }
    }
}
/// Limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits { pub max_bytes: usize, pub timeout: Duration }
impl Default for Limits { fn default() -> Self { Limits { max_bytes: 16 * 1024 + 5, timeout: Duration::from_millis(200) } } }
/// Classify.
pub async fn classify<R: tokio::io::AsyncRead + Unpin>(_reader: &mut R, _buf: &mut bytes::BytesMut, original_dst: SocketAddr, _limits: &Limits) -> std::io::Result<Authority> {
    Ok(Authority { host: Host::Ip(original_dst.ip()), port: original_dst.port(), source: Source::Ip })
}
