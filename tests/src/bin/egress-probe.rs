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
//!   or exits 3 when no reply came in time and 4 when the peer refused (ICMP unreachable).
//!
//! With `EGRESS_PROBE_MARK=N` every socket gets `SO_MARK` N before it connects (an actor
//! trying to pass for the agent).
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
        _ => {
            eprintln!(
                "usage: egress-probe peername ADDR | (http-many|send-close) ADDR HOST COUNT CONCURRENCY \
                 | udp-echo ADDR [SECONDS] | udp-send ADDR MESSAGE TIMEOUT_MS"
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
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Connected, so an ICMP port-unreachable shows as ECONNREFUSED instead of a silent timeout.
    let socket = match UdpSocket::bind(any).and_then(|s| s.connect(addr).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("udp socket to {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = socket
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .and_then(|()| socket.send(message.as_bytes()).map(drop))
    {
        eprintln!("send to {addr}: {e}");
        return ExitCode::FAILURE;
    }
    let mut buf = vec![0u8; 65536];
    match socket.recv(&mut buf) {
        Ok(n) => {
            println!("reply={} from={addr}", String::from_utf8_lossy(&buf[..n]));
            ExitCode::SUCCESS
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            eprintln!("no reply from {addr} within {timeout:?}");
            ExitCode::from(UDP_TIMEOUT)
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            eprintln!("{addr} refused: {e}");
            ExitCode::from(UDP_REFUSED)
        }
        Err(e) => {
            eprintln!("recv from {addr}: {e}");
            ExitCode::FAILURE
        }
    }
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
