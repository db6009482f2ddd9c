//! A small client the integration tests run *inside* an actor (its cgroup and netns) where
//! curl cannot show what is asserted:
//!
//! - `egress-probe peername ADDR`: connects, prints `peer=<getpeername()>`, closes;
//! - `egress-probe http-many ADDR HOST COUNT CONCURRENCY`: COUNT HTTP/1.1 requests with
//!   `Connection: close`, one connection each, COUNT/CONCURRENCY per thread; prints
//!   `ok=N failed=M first_error=...`; exits 1 unless every request got `HTTP/1.1 200`;
//! - `egress-probe send-close ADDR HOST COUNT CONCURRENCY`: COUNT connections that each write
//!   one `GET /send-close` request and close at once, without reading (fire and forget, as
//!   `echo ... > /dev/tcp/...` does); prints `ok=N failed=M first_error=...`;
//! - `egress-probe udp-echo ADDR [SECONDS]`: binds a UDP socket, prints `ready=<local addr>`,
//!   then echoes every datagram to its sender and prints `from=<peer> len=N` for each; runs
//!   until stdin reaches EOF or, with SECONDS, for that long (for runs whose stdin is
//!   /dev/null, e.g. inside a sandbox);
//! - `egress-probe udp-send ADDR MESSAGE TIMEOUT_MS`: sends MESSAGE in one datagram from a
//!   connected socket and waits for one reply; prints `reply=<text> from=<peer>` and exits 0,
//!   or exits 3 when no reply came in time and 4 when the peer refused (ICMP unreachable);
//!   `from` is the socket's peer as `getpeername()` shows it;
//! - `egress-probe dns-query SERVER NAME TIMEOUT_MS`: the same exchange with a DNS query for
//!   NAME's A records; prints `from=<peer> id_ok=<bool> rcode=N answers=N`.
//!
//! With `EGRESS_PROBE_MARK=N` every socket gets `SO_MARK` N before it connects (an actor
//! trying to pass for the agent). `EGRESS_PROBE_UDP=unconnected` makes the UDP modes send
//! with `sendto` from an unconnected socket and report the source `recvfrom` gives;
//! `EGRESS_PROBE_UDP=dual` does the same from a dual-stack `[::]` socket to the v4-mapped
//! form of an IPv4 address.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering},
    sync::{Arc, Mutex},
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["peername", addr] => peername(addr),
        [
            mode @ ("http-many" | "send-close"),
            addr,
            host,
            count,
            concurrency,
        ] => {
            let (Ok(count), Ok(concurrency)) = (count.parse(), concurrency.parse()) else {
                eprintln!("COUNT and CONCURRENCY must be numbers");
                return ExitCode::from(2);
            };
            many(addr, host, count, concurrency, *mode == "send-close")
        }
        ["udp-echo", addr] => udp_echo(addr, None),
        ["udp-echo", addr, seconds] => {
            let Ok(seconds) = seconds.parse() else {
                eprintln!("SECONDS must be a number");
                return ExitCode::from(2);
            };
            udp_echo(addr, Some(Duration::from_secs(seconds)))
        }
        ["udp-send", addr, message, timeout_ms] => {
            let Ok(ms) = timeout_ms.parse() else {
                eprintln!("TIMEOUT_MS must be a number");
                return ExitCode::from(2);
            };
            udp_send(addr, message, Duration::from_millis(ms))
        }
        ["dns-query", addr, name, timeout_ms] => {
            let Ok(ms) = timeout_ms.parse() else {
                eprintln!("TIMEOUT_MS must be a number");
                return ExitCode::from(2);
            };
            dns_query(addr, name, Duration::from_millis(ms))
        }
        _ => {
            eprintln!(
                "usage: egress-probe peername ADDR | (http-many|send-close) ADDR HOST COUNT CONCURRENCY \
                 | udp-echo ADDR [SECONDS] | udp-send ADDR MESSAGE TIMEOUT_MS \
                 | dns-query SERVER NAME TIMEOUT_MS"
            );
            ExitCode::from(2)
        }
    }
}

fn parse(addr: &str) -> Result<SocketAddr, ExitCode> {
    addr.parse().map_err(|e| {
        eprintln!("{addr}: {e}");
        ExitCode::from(2)
    })
}

fn peername(addr: &str) -> ExitCode {
    let addr = match parse(addr) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match connect(addr).and_then(|s| s.peer_addr()) {
        Ok(peer) => {
            println!("peer={peer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("connect {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn many(addr: &str, host: &str, count: usize, concurrency: usize, send_close: bool) -> ExitCode {
    let addr = match parse(addr) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let path = if send_close { "/send-close" } else { "/" };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let threads: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, ok, first_error, request) = (
                next.clone(),
                ok.clone(),
                first_error.clone(),
                request.clone(),
            );
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let result = if send_close {
                        send_and_close(addr, &request)
                    } else {
                        one_request(addr, &request)
                    };
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let ok = ok.load(Ordering::Relaxed);
    let error = first_error.lock().unwrap().clone().unwrap_or_default();
    println!("ok={ok} failed={} first_error={error}", count - ok);
    if ok == count {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn one_request(addr: SocketAddr, request: &str) -> Result<(), String> {
    let mut stream = connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "answer: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(64)])
        ))
    }
}

fn send_and_close(addr: SocketAddr, request: &str) -> Result<(), String> {
    let mut stream = connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // Dropped here: close(2) right after the write, nothing read.
    Ok(())
}

fn udp_echo(addr: &str, lifetime: Option<Duration>) -> ExitCode {
    let addr = match parse(addr) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let socket = match UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = socket.local_addr().unwrap_or(addr);
    println!("ready={local}");
    let _ = std::io::stdout().flush();
    match lifetime {
        Some(d) => {
            std::thread::spawn(move || {
                std::thread::sleep(d);
                std::process::exit(0);
            });
        }
        None => {
            // The parent holds our stdin open for as long as we should run.
            std::thread::spawn(|| {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                std::process::exit(0);
            });
        }
    }
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer) {
                    eprintln!("send to {peer}: {e}");
                }
                println!("from={peer} len={n}");
                let _ = std::io::stdout().flush();
            }
            // E.g. ECONNREFUSED left by an earlier echo to a peer that was gone.
            Err(e) => eprintln!("recv: {e}"),
        }
    }
}

/// Exit code of `udp-send` when no reply arrived in time.
const UDP_TIMEOUT: u8 = 3;
/// Exit code of `udp-send` when the peer answered with ICMP unreachable.
const UDP_REFUSED: u8 = 4;

fn udp_send(addr: &str, message: &str, timeout: Duration) -> ExitCode {
    let addr = match parse(addr) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match udp_exchange(addr, message.as_bytes(), timeout) {
        Ok((reply, from)) => {
            println!("reply={} from={from}", String::from_utf8_lossy(&reply));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Sends `payload` to `addr` and waits for one reply: the reply and its source (for a
/// connected socket, the address connected to), or the exit code (see `udp-send`).
fn udp_exchange(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, SocketAddr), ExitCode> {
    let mode = std::env::var("EGRESS_PROBE_UDP").unwrap_or_default();
    let (any, target): (SocketAddr, SocketAddr) = match (mode.as_str(), addr) {
        ("dual", SocketAddr::V4(v4)) => (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            (v4.ip().to_ipv6_mapped(), v4.port()).into(),
        ),
        (_, SocketAddr::V4(_)) => ((std::net::Ipv4Addr::UNSPECIFIED, 0).into(), addr),
        (_, SocketAddr::V6(_)) => ((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), addr),
    };
    let connected = mode != "unconnected" && mode != "dual";
    let socket = match udp_socket(any) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("udp socket to {target}: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    // Connected, so an ICMP port-unreachable shows as ECONNREFUSED instead of a silent timeout.
    let sent = socket
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .and_then(|()| {
            if connected {
                socket.connect(target)?;
                socket.send(payload)
            } else {
                socket.send_to(payload, target)
            }
        });
    if let Err(e) = sent {
        eprintln!("send to {target}: {e}");
        return Err(ExitCode::FAILURE);
    }
    let mut buf = vec![0u8; 65536];
    // A connected socket reports its peer as getpeername() shows it.
    let received = if connected {
        socket
            .recv(&mut buf)
            .and_then(|n| Ok((n, socket.peer_addr()?)))
    } else {
        socket.recv_from(&mut buf)
    };
    match received {
        Ok((n, from)) => Ok((buf[..n].to_vec(), from)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            eprintln!("no reply from {target} within {timeout:?}");
            Err(ExitCode::from(UDP_TIMEOUT))
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            eprintln!("{target} refused: {e}");
            Err(ExitCode::from(UDP_REFUSED))
        }
        Err(e) => {
            eprintln!("recv from {target}: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// A UDP socket bound to `any`; `[::]` is dual-stack (v4-mapped destinations allowed).
fn udp_socket(any: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(any),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if any.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&any.into())?;
    Ok(socket.into())
}

fn dns_query(addr: &str, name: &str, timeout: Duration) -> ExitCode {
    let addr = match parse(addr) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let Some(query) = a_query(id, name) else {
        eprintln!("{name:?} is not a DNS name");
        return ExitCode::from(2);
    };
    match udp_exchange(addr, &query, timeout) {
        Ok((reply, from)) if reply.len() >= 12 => {
            let reply_id = u16::from_be_bytes([reply[0], reply[1]]);
            println!(
                "from={from} id_ok={} rcode={} answers={}",
                reply_id == id,
                reply[3] & 0x0f,
                u16::from_be_bytes([reply[6], reply[7]])
            );
            ExitCode::SUCCESS
        }
        Ok((reply, from)) => {
            eprintln!("a {}-byte reply from {from} is no DNS message", reply.len());
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// A recursive query for `name`'s A records (RFC 1035 4.1), `None` for a bad name.
fn a_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    // RD set; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    // Root, QTYPE A, QCLASS IN.
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    Some(q)
}

/// Connects, with `SO_MARK` from `EGRESS_PROBE_MARK` when set.
fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(mark) = std::env::var("EGRESS_PROBE_MARK")
        .ok()
        .and_then(|m| parse_mark(&m))
    {
        socket.set_mark(mark)?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}

fn parse_mark(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}
