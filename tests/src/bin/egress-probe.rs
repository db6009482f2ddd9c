//! A small client the integration tests run *inside* an actor (its cgroup and netns) where
//! curl cannot show what is asserted:
//!
//! - `egress-probe peername ADDR`: connects, prints `peer=<getpeername()>`, closes;
//! - `egress-probe http-many ADDR HOST COUNT CONCURRENCY`: COUNT HTTP/1.1 requests with
//!   `Connection: close`, one connection each, COUNT/CONCURRENCY per thread; prints
//!   `ok=N failed=M first_error=...`; exits 1 unless every request got `HTTP/1.1 200`;
//! - `egress-probe send-close ADDR HOST COUNT CONCURRENCY`: COUNT connections that each write
//!   one `GET /send-close` request and close at once, without reading (fire and forget, as
//!   `echo ... > /dev/tcp/...` does); prints `ok=N failed=M first_error=...`.
//!
//! With `EGRESS_PROBE_MARK=N` every socket gets `SO_MARK` N before it connects (an actor
//! trying to pass for the agent).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
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
        _ => {
            eprintln!(
                "usage: egress-probe peername ADDR | (http-many|send-close) ADDR HOST COUNT CONCURRENCY"
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
