//! The one place the agent creates its upstream sockets. Each carries the agent's mark so the
//! kernel programs leave its connects alone, even when the agent itself runs inside a captured
//! cgroup (no capture loop).
use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

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

    /// Connects a marked TCP socket to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await
    }
}

/// Closes `stream` with a TCP reset instead of a FIN: the actor sees the connection fail
/// rather than end normally.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
