//! UDP peers made from the rig's `egress-probe` binary, so the same program runs in a test's
//! namespace, in an actor's cgroup, or inside a gVisor sandbox. Integration tests pass the
//! binary's path (`env!("CARGO_BIN_EXE_egress-probe")`): only they know it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::{ChildGuard, Output};

/// Exit code of `egress-probe udp-send` when no reply arrived within its timeout.
pub const UDP_TIMEOUT_EXIT: i32 = 3;
/// Exit code of `egress-probe udp-send` when the destination answered ICMP unreachable.
pub const UDP_REFUSED_EXIT: i32 = 4;

/// A running `egress-probe udp-echo` inside a namespace; stopped on drop.
pub struct UdpEcho {
    // Declared before the guard: closing stdin first lets the probe exit on its own.
    stdin: Option<ChildStdin>,
    guard: ChildGuard,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl UdpEcho {
    /// Starts the echo server on `addr` (port 0 picks one) inside `netns` and waits until it
    /// has bound; [`UdpEcho::addr`] is the bound address.
    pub fn start(probe: &Path, netns: &Netns, addr: SocketAddr) -> UdpEcho {
        let mut cmd = crate::process::command_in(probe, Some(netns), None);
        cmd.arg("udp-echo")
            .arg(addr.to_string())
            // Kept open by us: the probe exits when it closes, even if we are SIGKILLed.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut guard = ChildGuard::spawn(&mut cmd);
        let stdin = guard.child_mut().stdin.take();
        let stdout = guard.child_mut().stdout.take().expect("probe stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let mut echo = UdpEcho {
            stdin,
            guard,
            addr,
            lines,
        };
        echo.addr = echo.wait_ready(Duration::from_secs(10));
        echo
    }

    fn wait_ready(&mut self, timeout: Duration) -> SocketAddr {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self
                .lines()
                .iter()
                .find_map(|l| l.strip_prefix("ready=").and_then(|a| a.parse().ok()));
            if let Some(a) = ready {
                return a;
            }
            if !self.guard.is_running() {
                panic!(
                    "egress-probe udp-echo {} exited during start-up (its stderr is above)",
                    self.addr
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "egress-probe udp-echo {} not ready within {timeout:?}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address the echo server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sender of every datagram echoed so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.lines()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("from=")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Waits until at least `n` datagrams were echoed; panics with what was seen on timeout.
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        crate::process::poll(
            timeout,
            Duration::from_millis(10),
            || {
                let peers = self.peers();
                if peers.len() >= n {
                    Ok(peers)
                } else {
                    Err(peers)
                }
            },
            |peers| {
                format!(
                    "udp echo {}: expected {n} datagrams within {timeout:?}, saw {peers:?}",
                    self.addr
                )
            },
        )
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        // EOF on stdin ends the probe; the guard's kill (next) covers a probe that hangs.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.guard.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The probe arguments (after the binary) for one `udp-send`, e.g. to run it in a sandbox.
pub fn udp_send_args(addr: SocketAddr, message: &str, timeout: Duration) -> Vec<String> {
    vec![
        "udp-send".to_string(),
        addr.to_string(),
        message.to_string(),
        timeout.as_millis().to_string(),
    ]
}

/// Sends `message` to `addr` from inside `netns` and waits up to `timeout` for the reply:
/// success prints `reply=<text> from=<addr>`; exit [`UDP_TIMEOUT_EXIT`] means no reply,
/// [`UDP_REFUSED_EXIT`] an ICMP unreachable.
pub fn udp_send(
    probe: &Path,
    netns: &Netns,
    addr: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Output {
    let mut cmd = crate::process::command_in(probe, Some(netns), None);
    cmd.args(udp_send_args(addr, message, timeout));
    crate::process::run(&mut cmd, timeout + Duration::from_secs(10))
}
