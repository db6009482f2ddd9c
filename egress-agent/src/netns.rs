//! Network namespaces: the agent stays in the node's namespaces and opens sockets inside an
//! actor's namespace from a short-lived thread that joined it (a socket stays in the namespace
//! it was created in), as ztunnel's in-pod mode does.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a fresh thread that has joined the network namespace at `netns` (`None`: the
/// agent's own). Only that thread changes namespace; it exits when `f` returns.
pub fn run_in<T, F>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    std::thread::Builder::new()
        .name("egress-netns".into())
        .spawn(move || {
            if let Some(path) = netns {
                let file = File::open(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("opening netns {}: {e}", path.display()))
                })?;
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("setns into {}: {e}", path.display())))?;
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A namespace for messages and logs: its path, or "(the agent's own)" for `None`.
pub fn label(netns: Option<&Path>) -> String {
    netns.map_or_else(
        || "(the agent's own)".to_string(),
        |p| p.display().to_string(),
    )
}

/// The network namespace cookie of the namespace `sock` lives in.
pub fn cookie(sock: &impl AsFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The cookie of the calling thread's network namespace.
pub fn own_cookie() -> io::Result<u64> {
    // Unbound: a namespace whose loopback is down (or has no IPv4) still has a cookie.
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    cookie(&sock)
}

/// Identity of a namespace file (device, inode): two paths naming one namespace compare equal.
pub fn identity(netns: Option<&Path>) -> io::Result<(u64, u64)> {
    let path = netns.unwrap_or(Path::new("/proc/thread-self/ns/net"));
    let meta = std::fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok((meta.dev(), meta.ino()))
}

/// Brings the loopback interface of the calling thread's namespace up if it is down: the
/// agent's listener is on loopback, and a fresh namespace starts with `lo` down.
pub fn ensure_loopback_up() -> io::Result<bool> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    set_up(sock.as_raw_fd())
}

fn set_up(fd: libc::c_int) -> io::Result<bool> {
    // SAFETY: ifreq is plain data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a socket and req a valid ifreq.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(false);
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cookie_is_stable_and_matches_a_socket() {
        let a = own_cookie().expect("cookie");
        let sock = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(a, cookie(&sock).expect("cookie"));
        assert_ne!(a, 0);
    }

    #[test]
    fn run_in_own_namespace_keeps_the_cookie() {
        let here = own_cookie().unwrap();
        let there = run_in(None, own_cookie).unwrap();
        assert_eq!(here, there);
    }
}
