//! Small blocking clients for tests: TCP connects from inside a namespace and HTTP CONNECT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use std::process::Command;

use crate::cgroup::Cgroup;
use crate::netns::Netns;

/// Connects to `addr` from inside `netns` (the socket stays in that namespace), with
/// read/write timeouts of `timeout` set on the stream.
pub fn connect_in(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    netns.run(move || {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    })
}

/// Sends `CONNECT authority` with `headers` on `stream` and returns the proxy's status code.
///
/// Reads the response head byte by byte so no tunnelled byte is consumed.
pub fn http_connect(
    stream: &mut TcpStream,
    authority: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<u16> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "proxy closed during CONNECT response",
            ));
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("CONNECT response head too long"));
        }
    }
    parse_status(&head).ok_or_else(|| {
        std::io::Error::other(format!(
            "bad CONNECT response: {:?}",
            String::from_utf8_lossy(&head)
        ))
    })
}

/// Parses the status code from an HTTP/1.x response head.
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Reads one `\n`-terminated line from `stream` (byte by byte, nothing beyond it is consumed).
pub fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::with_capacity(1, stream).read_line(&mut line)?;
    Ok(line)
}

/// A command that runs bash `body` inside `netns`/`cgroup` with fd 3 connected to `addr`
/// (bash's `/dev/tcp`): a client whose first byte and timing the test controls, e.g. one that
/// waits for a server-first banner without sending anything. Exits 7 if the connect fails.
pub fn bash_tcp_command(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
    body: &str,
) -> Command {
    let mut cmd = crate::process::command_in("bash", netns, cgroup);
    let script = format!("exec 3<>\"/dev/tcp/$0/$1\" || exit 7\n{body}");
    cmd.arg("-c")
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string());
    cmd
}

/// A server-first exchange: reads the banner, sends `ping`, reads the echo, and prints both
/// lines (CR stripped) on stdout; exits 8/9 if a line does not arrive within 10 s.
pub fn banner_exchange_command(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
) -> Command {
    bash_tcp_command(
        netns,
        cgroup,
        addr,
        "IFS= read -r -t 10 l <&3 || exit 8; printf '%s\\n' \"${l%$'\\r'}\"\n\
         printf 'ping\\r\\n' >&3\n\
         IFS= read -r -t 10 l <&3 || exit 9; printf '%s\\n' \"${l%$'\\r'}\"\n",
    )
}

/// A `curl -sS --max-time 10` command inside `netns`/`cgroup` that trusts `ca` and resolves
/// each `(name, port, ip)` locally (`--resolve`), so no DNS is ever asked.
pub fn curl_command(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    ca: &Path,
    resolve: &[(&str, u16, IpAddr)],
    url: &str,
) -> Command {
    let mut cmd = crate::process::command_in("curl", netns, cgroup);
    cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(ca);
    for (name, port, ip) in resolve {
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        cmd.arg("--resolve").arg(format!("{name}:{port}:{ip}"));
    }
    cmd.arg(url);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_connect_response() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 403 Forbidden\r\nServer: squid\r\n\r\n"),
            Some(403)
        );
        assert_eq!(parse_status(b"SSH-2.0-x\r\n"), None);
    }
}
