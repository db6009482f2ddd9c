//! Child processes placed in a test's network namespace and cgroup, with bounded run times.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::netns::Netns;

/// A command for `program` that will start inside `netns` and `cgroup` (either optional).
pub fn command_in(
    program: impl AsRef<OsStr>,
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
) -> Command {
    let mut cmd = Command::new(program);
    place(&mut cmd, netns, cgroup);
    cmd
}

/// Makes `cmd`'s child join `cgroup` and `netns` between fork and exec.
///
/// The child moves itself (writes "0" to `cgroup.procs`) before exec, so even its very first
/// connect happens inside the cgroup, which is what the cgroup eBPF programs key on.
pub fn place(cmd: &mut Command, netns: Option<&Netns>, cgroup: Option<&Cgroup>) {
    // Opened here, in the parent: between fork and exec only async-signal-safe calls are allowed.
    let procs: Option<File> = cgroup.map(|c| {
        let p = c.path().join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    });
    let ns: Option<File> = netns.map(|n| {
        File::open(n.path()).unwrap_or_else(|e| panic!("open {}: {e}", n.path().display()))
    });
    // SAFETY: the hook only calls write(2) and setns(2) on descriptors it owns; both are
    // async-signal-safe and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs
                && libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(f) = &ns
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a bounded run produced.
#[derive(Debug)]
pub struct Output {
    /// The child's pid (to match against the agent's `pid` field).
    pub pid: u32,
    /// Exit status; `None` if the run timed out and was killed.
    pub status: Option<ExitStatus>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Whether the timeout expired and the child was killed.
    pub timed_out: bool,
}

impl Output {
    /// True if the child exited with status 0 before the timeout.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code, if the child exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Panics with everything the child printed unless it succeeded; `what` names the run.
    pub fn expect_success(&self, what: &str) -> &Self {
        if !self.success() {
            panic!("{what} failed: {}", self.describe());
        }
        self
    }

    /// A one-paragraph description (status, stdout, stderr) for panic messages.
    pub fn describe(&self) -> String {
        let status = match (self.timed_out, self.status) {
            (true, _) => "timed out (killed)".to_string(),
            (false, Some(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("{s}"),
            },
            (false, None) => "no status".to_string(),
        };
        format!(
            "{status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with stdin closed, capturing output; kills it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_input(cmd, &[], timeout)
}

/// Like [`run`] but writes `input` to the child's stdin first, then closes it.
pub fn run_with_input(cmd: &mut Command, input: &[u8], timeout: Duration) -> Output {
    cmd.stdin(if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let stdin = child.stdin.take().map(|mut w| {
        let input = input.to_vec();
        // On its own thread: a child that does not read its stdin must not block us.
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        })
    });
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let (status, timed_out) = match wait_timeout(&mut child, timeout) {
        Some(s) => (Some(s), false),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            (None, true)
        }
    };
    if let Some(t) = stdin {
        let _ = t.join();
    }
    Output {
        pid,
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        timed_out,
    }
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
    }
}

/// Calls `attempt` every `every` until it returns `Ok`, and returns that. Once `timeout` has
/// passed, the next `Err` panics with `failed(that error)`: the last state seen, described.
pub fn poll<T, E>(
    timeout: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
    failed: impl FnOnce(E) -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(found) => return found,
            Err(last) if Instant::now() >= deadline => panic!("{}", failed(last)),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Stops `child` the graceful way: SIGTERM, up to `grace` to exit, then SIGKILL; reaps it.
pub fn stop(child: &mut Child, grace: Duration) {
    if terminate(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `child` SIGTERM and waits up to `timeout` for it to exit; `None` if it still runs.
pub fn terminate(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    wait_timeout(child, timeout)
}

/// A running child that is killed and reaped on drop (e.g. a long-lived actor process).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` (stdio as configured on it) and guards the child.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard {
            child: cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guarded child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, timeout)
    }

    /// Sends `signal` to the child (no-op if it is gone).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
