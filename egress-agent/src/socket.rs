//! The one place the agent creates its upstream sockets. Each carries the agent's mark so the
//! kernel programs leave its connects alone, even when the agent itself runs inside a captured
//! cgroup (no capture loop).
use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Creates the agent's outbound sockets.
#[derive(Clone, Debug, Default)]
pub struct SocketFactory {
    mark: u32,
}

impl SocketFactory {
    /// Sockets marked with `mark` (`SO_MARK`; 0 leaves them unmarked).
    pub fn new(mark: u32) -> Self {
        SocketFactory { mark }
    }

    /// A non-blocking socket of `ty`/`protocol` for `addr`'s family, carrying the mark: every
    /// socket the agent opens starts here.
    pub fn socket(&self, addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    /// Connects a marked TCP socket to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(addr, Type::STREAM, Protocol::TCP)?;
        socket.set_tcp_nodelay(true)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await
    }

    /// A marked UDP socket connected to `addr`: it receives only `addr`'s datagrams.
    pub fn udp_connect(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let socket = self.socket(addr, Type::DGRAM, Protocol::UDP)?;
        socket.connect(&addr.into())?;
        UdpSocket::from_std(socket.into())
    }
}

/// A UDP socket bound to `addr` (IPv6 only for an IPv6 address), marked with `mark` (0:
/// unmarked), non-blocking: the agent's DNS sockets in actors' and workers' namespaces.
pub fn bind_udp(addr: SocketAddr, mark: u32) -> io::Result<std::net::UdpSocket> {
    let socket = SocketFactory::new(mark).socket(addr, Type::DGRAM, Protocol::UDP)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Closes `stream` with a TCP reset instead of a FIN: the peer sees the connection fail
/// rather than end normally.
pub fn reset(stream: TcpStream) {
    arm_reset(&stream);
    drop(stream);
}

/// Makes every close of `stream` a reset (`SO_LINGER` 0) until [`disarm_reset`]: a tunnel
/// dropped half-way for any reason (an error, the agent shutting down) must not look like a
/// complete one to either side.
pub fn arm_reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Restores the normal close (FIN) once a relay has ended cleanly on both sides.
pub fn disarm_reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(None);
}

/// `SO_ORIGINAL_DST` (netfilter, `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`): both 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where a connection that nftables redirected to the agent was going: conntrack's original
/// destination (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6). A connection made to
/// the listener directly (not redirected) is an error: conntrack then answers the listener's
/// own address, and no destination can be vouched for.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    let local = stream.local_addr()?;
    let v6 = local.is_ipv6();
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: storage and len are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote a sockaddr_in or sockaddr_in6 of `len` bytes.
    let addr = unsafe { socket2::SockAddr::new(std::mem::transmute_copy(&storage), len) };
    let original = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned no IP address"))?;
    if original == local {
        return Err(io::Error::other(
            "not redirected: the connection was made to the agent's listener itself",
        ));
    }
    Ok(original)
}
