//! The agent binary under test (`EGRESS_AGENT_BIN`), run as a guarded child whose JSON log
//! lines are collected for assertions.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::cgroup::Cgroup;
use crate::netns::Netns;

/// The environment variable naming the agent binary; `cargo xtask test` sets it.
pub const AGENT_BIN_ENV: &str = "EGRESS_AGENT_BIN";

/// The agent binary's path from `EGRESS_AGENT_BIN`; panics if unset or missing.
pub fn agent_bin() -> PathBuf {
    let bin = std::env::var_os(AGENT_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("EGRESS_AGENT_BIN not set: run `cargo xtask test`"));
    if !bin.is_file() {
        panic!(
            "EGRESS_AGENT_BIN={} is not a file: run `cargo xtask test`",
            bin.display()
        );
    }
    bin
}

/// One actor the agent captures (`--actor-*` flags or an `[[actor]]` table).
#[derive(Debug, Clone)]
pub struct ActorSpec {
    /// `--actor-id`.
    pub id: String,
    /// `--actor-template`.
    pub template: String,
    /// `--actor-template-namespace`.
    pub template_namespace: String,
    /// `--actor-cgroup`: the cgroup v2 directory whose processes are captured.
    pub cgroup: PathBuf,
    /// `--actor-netns`: the actor's network namespace file, if not the agent's own.
    pub netns: Option<PathBuf>,
    /// The actor's `pep` (config file only): a `[peps.NAME]` name, `default` or `none`.
    pub pep: Option<String>,
}

impl ActorSpec {
    /// An actor captured in `cgroup`, in the agent's own namespace unless [`ActorSpec::netns`] is set.
    pub fn new(id: &str, template: &str, template_namespace: &str, cgroup: &Cgroup) -> Self {
        ActorSpec {
            id: id.to_string(),
            template: template.to_string(),
            template_namespace: template_namespace.to_string(),
            cgroup: cgroup.path().to_path_buf(),
            netns: None,
            pep: None,
        }
    }

    /// Sets the actor's `pep` (and so puts the actors in a config file).
    pub fn pep(mut self, pep: &str) -> Self {
        self.pep = Some(pep.to_string());
        self
    }

    /// Sets the actor's network namespace.
    pub fn netns(mut self, netns: &Netns) -> Self {
        self.netns = Some(netns.path());
        self
    }
}

/// A veth-mode actor (gVisor, microVM): an `[[actor]]` table with a `[actor.veth]` table.
#[derive(Debug, Clone)]
pub struct VethActorSpec {
    /// `id`.
    pub id: String,
    /// `template`.
    pub template: String,
    /// `template_namespace`.
    pub template_namespace: String,
    /// `netns`: the actor's namespace (its end of the pair becomes `eth0` there).
    pub netns: PathBuf,
    /// `veth.worker_netns`.
    pub worker_netns: PathBuf,
    /// `veth.inbound`, e.g. `tcp/8080`.
    pub inbound: Vec<String>,
    /// `veth.allow_udp`.
    pub allow_udp: bool,
}

impl VethActorSpec {
    /// A veth actor in `netns` whose worker namespace is `worker`.
    pub fn new(
        id: &str,
        template: &str,
        template_namespace: &str,
        netns: &Netns,
        worker: &Netns,
    ) -> Self {
        VethActorSpec {
            id: id.to_string(),
            template: template.to_string(),
            template_namespace: template_namespace.to_string(),
            netns: netns.path(),
            worker_netns: worker.path(),
            inbound: Vec::new(),
            allow_udp: false,
        }
    }

    /// Forwards `proto/port` (e.g. `tcp/8080`) from the worker to the actor.
    pub fn inbound(mut self, port: &str) -> Self {
        self.inbound.push(port.to_string());
        self
    }

    /// The `egress-agent veth up` / `actor add --veth` arguments for this actor.
    pub fn add_args(&self) -> Vec<String> {
        let mut a = vec![
            "--id".to_string(),
            self.id.clone(),
            "--template".into(),
            self.template.clone(),
            "--template-namespace".into(),
            self.template_namespace.clone(),
            "--netns".into(),
            self.netns.display().to_string(),
            "--worker-netns".into(),
            self.worker_netns.display().to_string(),
        ];
        for port in &self.inbound {
            a.extend(["--inbound".into(), port.clone()]);
        }
        if self.allow_udp {
            a.push("--allow-udp".into());
        }
        a
    }
}

/// How to run the agent. Always run with `--log-format json`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--pep HOST:PORT`.
    pub pep: String,
    /// `--policy FILE`.
    pub policy: Option<PathBuf>,
    /// Actors; one is passed as flags, several (or `config_file`) as a TOML config file.
    pub actors: Vec<ActorSpec>,
    /// Veth actors (always in the config file).
    pub veth_actors: Vec<VethActorSpec>,
    /// `--dns-upstream`: where the agent relays actors' DNS. Defaults to 127.0.0.1:53 in the
    /// agent's namespace (nothing there unless a test starts a server), so the agent never
    /// falls back to the host's /etc/resolv.conf.
    pub dns_upstream: std::net::SocketAddr,
    /// Holds `--control-socket` and `--state-dir`: unique per options, shared by every agent
    /// started with them, so a restarted agent finds what the killed one left.
    pub run_dir: Arc<tempfile::TempDir>,
    /// Pass the actors in a `--config` file even if there is only one.
    pub config_file: bool,
    /// `--bpffs-dir`: unique per agent so parallel tests never share pins.
    pub bpffs_dir: PathBuf,
    /// `--listen-port`.
    pub listen_port: Option<u16>,
    /// `--peek-timeout-ms`.
    pub peek_timeout_ms: Option<u64>,
    /// `--pep-timeout-ms`.
    pub pep_timeout_ms: Option<u64>,
    /// The other `--pep-*` flags (TLS, authorization, bounds).
    pub pep_link: PepLinkOptions,
    /// TOML put at the top of the config file (e.g. a `[pep]` table or `[peps.NAME]`); forces
    /// a config file. Flags (`--pep`, `--pep-*`) still override what it says.
    pub config_extra: String,
    /// Extra arguments appended after the generated ones.
    pub extra_args: Vec<String>,
    /// Extra environment variables (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    /// Options for an agent that tunnels to the PEP at `pep` (`HOST:PORT`), with a fresh bpffs dir.
    pub fn new(pep: impl ToString) -> Self {
        AgentOptions {
            pep: pep.to_string(),
            actors: Vec::new(),
            veth_actors: Vec::new(),
            dns_upstream: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 53)),
            run_dir: Arc::new(
                tempfile::Builder::new()
                    .prefix("egress-test-run-")
                    .tempdir()
                    .expect("agent run dir"),
            ),
            config_file: false,
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(crate::unique_name("egress-test")),
            listen_port: None,
            peek_timeout_ms: None,
            pep_timeout_ms: None,
            pep_link: PepLinkOptions::default(),
            policy: None,
            config_extra: String::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Options for an agent with no PEP: it decides with its policy and dials itself.
    pub fn without_pep() -> Self {
        AgentOptions::new("")
    }

    /// Adds an actor.
    pub fn actor(mut self, actor: ActorSpec) -> Self {
        self.actors.push(actor);
        self
    }

    /// Adds a veth actor.
    pub fn veth_actor(mut self, actor: VethActorSpec) -> Self {
        self.veth_actors.push(actor);
        self
    }

    /// `--control-socket`.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.path().join("control.sock")
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.path().join("state")
    }

    /// The `run` command line; `config_path` is where the config file goes if one is used.
    pub fn args(&self, config_path: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into()];
        if !self.pep.is_empty() {
            a.extend(["--pep".into(), self.pep.clone()]);
        }
        if let Some(policy) = &self.policy {
            a.extend(["--policy".into(), policy.display().to_string()]);
        }
        if self.uses_config_file() {
            a.extend(["--config".into(), config_path.display().to_string()]);
        } else if let Some(actor) = self.actors.first() {
            a.extend([
                "--actor-id".into(),
                actor.id.clone(),
                "--actor-template".into(),
                actor.template.clone(),
                "--actor-template-namespace".into(),
                actor.template_namespace.clone(),
                "--actor-cgroup".into(),
                actor.cgroup.display().to_string(),
            ]);
            if let Some(ns) = &actor.netns {
                a.extend(["--actor-netns".into(), ns.display().to_string()]);
            }
        }
        a.extend(["--bpffs-dir".into(), self.bpffs_dir.display().to_string()]);
        a.extend([
            "--control-socket".into(),
            self.control_socket().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ]);
        a.extend(["--dns-upstream".into(), self.dns_upstream.to_string()]);
        if let Some(p) = self.listen_port {
            a.extend(["--listen-port".into(), p.to_string()]);
        }
        if let Some(ms) = self.peek_timeout_ms {
            a.extend(["--peek-timeout-ms".into(), ms.to_string()]);
        }
        if let Some(ms) = self.pep_timeout_ms {
            a.extend(["--pep-timeout-ms".into(), ms.to_string()]);
        }
        a.extend(self.pep_link.args());
        a.extend(["--log-format".into(), "json".into()]);
        a.extend(self.extra_args.iter().cloned());
        a
    }

    fn uses_config_file(&self) -> bool {
        self.config_file
            || self.actors.iter().any(|a| a.pep.is_some())
            || self.actors.len() > 1
            || !self.veth_actors.is_empty()
            || !self.config_extra.is_empty()
    }

    /// The `--config` file content: one `[[actor]]` table per actor.
    pub fn config_toml(&self) -> String {
        let mut s = self.config_extra.clone();
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        for a in &self.actors {
            s.push_str(&identity_toml(&a.id, &a.template, &a.template_namespace));
            s.push_str(&format!(
                "cgroup = {}\n",
                toml_str(&a.cgroup.display().to_string())
            ));
            if let Some(ns) = &a.netns {
                s.push_str(&format!(
                    "netns = {}\n",
                    toml_str(&ns.display().to_string())
                ));
            }
            if let Some(pep) = &a.pep {
                s.push_str(&format!("pep = {}\n", toml_str(pep)));
            }
            s.push('\n');
        }
        for a in &self.veth_actors {
            s.push_str(&identity_toml(&a.id, &a.template, &a.template_namespace));
            s.push_str(&format!(
                "netns = {}\n",
                toml_str(&a.netns.display().to_string())
            ));
            s.push_str("[actor.veth]\n");
            s.push_str(&format!(
                "worker_netns = {}\n",
                toml_str(&a.worker_netns.display().to_string())
            ));
            let inbound: Vec<String> = a.inbound.iter().map(|p| toml_str(p)).collect();
            s.push_str(&format!("inbound = [{}]\n", inbound.join(", ")));
            s.push_str(&format!("allow_udp = {}\n\n", a.allow_udp));
        }
        s
    }
}

/// The PEP link flags beyond `--pep` and `--pep-timeout-ms`; `None` leaves a flag out.
#[derive(Debug, Clone, Default)]
pub struct PepLinkOptions {
    /// `--pep-tls-ca-file`.
    pub tls_ca_file: Option<PathBuf>,
    /// `--pep-tls-server-name`.
    pub tls_server_name: Option<String>,
    /// `--pep-tls-client-cert-file`.
    pub tls_client_cert_file: Option<PathBuf>,
    /// `--pep-tls-client-key-file`.
    pub tls_client_key_file: Option<PathBuf>,
    /// `--pep-proxy-authorization-file`.
    pub proxy_authorization_file: Option<PathBuf>,
    /// `--pep-connect-timeout-ms`.
    pub connect_timeout_ms: Option<u64>,
    /// `--pep-max-connecting`.
    pub max_connecting: Option<usize>,
    /// `--pep-max-waiting`.
    pub max_waiting: Option<usize>,
}

impl PepLinkOptions {
    /// The flags for the options given.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let flags = [
            ("--pep-tls-ca-file", path(&self.tls_ca_file)),
            ("--pep-tls-server-name", self.tls_server_name.clone()),
            (
                "--pep-tls-client-cert-file",
                path(&self.tls_client_cert_file),
            ),
            ("--pep-tls-client-key-file", path(&self.tls_client_key_file)),
            (
                "--pep-proxy-authorization-file",
                path(&self.proxy_authorization_file),
            ),
            (
                "--pep-connect-timeout-ms",
                self.connect_timeout_ms.map(|v| v.to_string()),
            ),
            (
                "--pep-max-connecting",
                self.max_connecting.map(|v| v.to_string()),
            ),
            ("--pep-max-waiting", self.max_waiting.map(|v| v.to_string())),
        ];
        flags
            .into_iter()
            .filter_map(|(flag, value)| value.map(|v| [flag.to_string(), v]))
            .flatten()
            .collect()
    }
}

/// The start of an `[[actor]]` table: its identity.
fn identity_toml(id: &str, template: &str, template_namespace: &str) -> String {
    format!(
        "[[actor]]\nid = {}\ntemplate = {}\ntemplate_namespace = {}\n",
        toml_str(id),
        toml_str(template),
        toml_str(template_namespace)
    )
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One JSON log line of the agent (tracing-subscriber's json format).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// `level`, e.g. `INFO`.
    pub level: String,
    /// `fields.message`.
    pub message: Option<String>,
    /// Every entry of `fields` (including `message`).
    pub fields: Map<String, Value>,
    /// The whole object, for spans and targets.
    pub raw: Value,
}

impl LogLine {
    /// Parses a line; `None` if it is not a JSON object.
    pub fn parse(line: &str) -> Option<LogLine> {
        let raw: Value = serde_json::from_str(line.trim()).ok()?;
        let obj = raw.as_object()?;
        let fields = obj
            .get("fields")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        Some(LogLine {
            level: obj
                .get("level")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            message: fields
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string),
            fields,
            raw,
        })
    }

    /// A field as text: strings as they are, numbers and booleans rendered.
    pub fn field_str(&self, name: &str) -> Option<String> {
        value_str(self.fields.get(name)?)
    }

    /// A field as an unsigned number (also accepts a numeric string).
    pub fn field_u64(&self, name: &str) -> Option<u64> {
        value_u64(self.fields.get(name)?)
    }
}

fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The message of the agent's per-connection summary line.
pub const CONNECTION_CLOSED: &str = "connection closed";

/// One `connection closed` line, typed; any field the agent left out is `None`.
#[derive(Debug, Clone)]
pub struct ConnectionLog {
    /// `actor` (the actor id).
    pub actor: Option<String>,
    /// `pid` of the connecting process.
    pub pid: Option<u32>,
    /// `original_dst` (`IP:PORT` the actor connected to).
    pub original_dst: Option<String>,
    /// `authority` sent in CONNECT.
    pub authority: Option<String>,
    /// `source` of the authority: `sni`, `host` or `ip`.
    pub source: Option<String>,
    /// `pep_status`: the PEP's CONNECT status code, if one was received.
    pub pep_status: Option<u16>,
    /// `bytes_up` (actor to upstream).
    pub bytes_up: Option<u64>,
    /// `bytes_down` (upstream to actor).
    pub bytes_down: Option<u64>,
    /// `duration_ms`.
    pub duration_ms: Option<u64>,
    /// `outcome`.
    pub outcome: Option<String>,
    /// The whole line.
    pub line: LogLine,
}

impl ConnectionLog {
    /// Reads the fields of a `connection closed` line; `None` for any other line.
    pub fn from_line(line: &LogLine) -> Option<ConnectionLog> {
        if line.message.as_deref() != Some(CONNECTION_CLOSED) {
            return None;
        }
        Some(ConnectionLog {
            actor: line.field_str("actor"),
            pid: line.field_u64("pid").and_then(|p| u32::try_from(p).ok()),
            original_dst: line.field_str("original_dst"),
            authority: line.field_str("authority"),
            source: line.field_str("source"),
            pep_status: line
                .field_u64("pep_status")
                .and_then(|s| u16::try_from(s).ok()),
            bytes_up: line.field_u64("bytes_up"),
            bytes_down: line.field_u64("bytes_down"),
            duration_ms: line.field_u64("duration_ms"),
            outcome: line.field_str("outcome"),
            line: line.clone(),
        })
    }
}

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A running agent. Drop stops it, then runs `detach` for its bpffs dir and removes leftover
/// pins, so captured cgroups never stay attached after a test.
pub struct Agent {
    child: Child,
    bin: PathBuf,
    control_socket: PathBuf,
    /// Keeps the control socket's and state's directory until the agent is stopped (Drop
    /// stops it first; fields drop after).
    _run_dir: Arc<tempfile::TempDir>,
    bpffs_dir: PathBuf,
    lines: Lines,
    readers: Vec<std::thread::JoinHandle<()>>,
    _config_dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `EGRESS_AGENT_BIN` with `opts` inside `netns` (and `cgroup`, if given).
    /// Does not wait for readiness: see [`Agent::wait_ready`].
    pub fn start(netns: &Netns, cgroup: Option<&Cgroup>, opts: AgentOptions) -> Agent {
        Agent::start_with_bin(&agent_bin(), netns, cgroup, opts)
    }

    /// Like [`Agent::start`] with an explicit binary (the rig's own tests use a stand-in).
    pub fn start_with_bin(
        bin: &Path,
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        opts: AgentOptions,
    ) -> Agent {
        let bin = bin.to_path_buf();
        crate::ensure_bpffs();
        let config_dir = crate::pki::private_readable_dir("egress-test-agent-");
        let config_path = config_dir.path().join("agent.toml");
        std::fs::write(&config_path, opts.config_toml()).expect("write agent config");
        let mut cmd = Command::new(&bin);
        cmd.args(opts.args(&config_path))
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::process::place(&mut cmd, Some(netns), cgroup);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent {}: {e}", bin.display()));
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let pid = child.id();
        let readers = vec![
            collect(
                child.stderr.take().expect("agent stderr"),
                lines.clone(),
                format!("agent {pid}"),
            ),
            collect(
                child.stdout.take().expect("agent stdout"),
                lines.clone(),
                format!("agent {pid} stdout"),
            ),
        ];
        Agent {
            child,
            bin,
            control_socket: opts.control_socket(),
            _run_dir: opts.run_dir.clone(),
            bpffs_dir: opts.bpffs_dir,
            lines,
            readers,
            _config_dir: config_dir,
        }
    }

    /// Waits for the `ready` line (programs attached, listeners open).
    pub fn wait_ready(&mut self, timeout: Duration) -> LogLine {
        self.wait_for_message("ready", timeout)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's bpffs directory.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Every output line so far (stderr and stdout interleaved as read).
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every line that parsed as a JSON log object.
    pub fn json_lines(&self) -> Vec<LogLine> {
        self.lines()
            .iter()
            .filter_map(|l| LogLine::parse(l))
            .collect()
    }

    /// The `connection closed` lines so far.
    pub fn connection_lines(&self) -> Vec<ConnectionLog> {
        self.json_lines()
            .iter()
            .filter_map(ConnectionLog::from_line)
            .collect()
    }

    /// Waits for the first line whose message is `message`; panics with the whole log if it
    /// does not come within `timeout` or the agent exits first.
    pub fn wait_for_message(&mut self, message: &str, timeout: Duration) -> LogLine {
        self.wait_until(timeout, &format!("a {message:?} line"), |lines| {
            lines
                .iter()
                .filter_map(|l| LogLine::parse(l))
                .find(|l| l.message.as_deref() == Some(message))
        })
    }

    /// Waits until at least `n` `connection closed` lines were logged and returns them all.
    pub fn wait_for_connections(&mut self, n: usize, timeout: Duration) -> Vec<ConnectionLog> {
        self.wait_until(
            timeout,
            &format!("{n} {CONNECTION_CLOSED:?} lines"),
            |lines| {
                let conns: Vec<ConnectionLog> = lines
                    .iter()
                    .filter_map(|l| LogLine::parse(l))
                    .filter_map(|l| ConnectionLog::from_line(&l))
                    .collect();
                (conns.len() >= n).then_some(conns)
            },
        )
    }

    /// Waits for the `n`th (from 0) connection line whose original destination is `dst`.
    pub fn wait_for_connection_to(
        &mut self,
        dst: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> ConnectionLog {
        let want = dst.to_string();
        self.wait_until(
            timeout,
            &format!("connection line {n} for {want}"),
            |lines| {
                lines
                    .iter()
                    .filter_map(|l| LogLine::parse(l))
                    .filter_map(|l| ConnectionLog::from_line(&l))
                    .filter(|c| c.original_dst.as_deref() == Some(want.as_str()))
                    .nth(n)
            },
        )
    }

    /// Waits until `check` finds something in the lines; panics with the log on timeout or exit.
    pub fn wait_until<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&[String]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.lines;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(found) = check(&guard) {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                let log = guard.join("\n");
                drop(guard);
                panic!("agent: no {what} within {timeout:?}; log:\n{log}");
            }
            // Wake at least every 100 ms to notice an exited agent.
            let wait = (deadline - now).min(Duration::from_millis(100));
            guard = cvar
                .wait_timeout(guard, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if let Ok(Some(status)) = self.child.try_wait() {
                drop(guard);
                // Let the readers drain what the agent wrote before it died.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                let lines = self.lines();
                if let Some(found) = check(&lines) {
                    return found;
                }
                panic!(
                    "agent exited ({status}) before {what}; log:\n{}",
                    lines.join("\n")
                );
            }
        }
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::process::wait_timeout(&mut self.child, timeout)
    }

    /// SIGKILLs the agent and reaps it, leaving its pins (and so the capture) in place.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::process::terminate(&mut self.child, timeout)
    }

    /// Runs `egress-agent ARGS --control-socket SOCKET` (e.g. `actor list`, `veth up ...`)
    /// against this agent and returns what it printed.
    pub fn control(&self, args: &[&str]) -> crate::process::Output {
        crate::process::run(
            Command::new(&self.bin)
                .args(args)
                .arg("--control-socket")
                .arg(&self.control_socket),
            Duration::from_secs(60),
        )
    }

    /// Runs `egress-agent detach --bpffs-dir DIR` and returns what it printed.
    pub fn detach(&self) -> crate::process::Output {
        crate::process::run(
            Command::new(&self.bin)
                .arg("detach")
                .arg("--bpffs-dir")
                .arg(&self.bpffs_dir),
            Duration::from_secs(10),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None))
            && self.terminate(Duration::from_secs(2)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.bpffs_dir.exists() {
            let out = self.detach();
            if !out.success() {
                eprintln!("warning: agent detach failed: {}", out.describe());
            }
            // Unlinking a pinned link detaches its program: the fallback if detach left any.
            if self.bpffs_dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&self.bpffs_dir)
            {
                eprintln!(
                    "warning: could not remove {}: {e}",
                    self.bpffs_dir.display()
                );
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Reads `pipe` line by line into `lines` (waking waiters), echoing each line to the test's
/// captured output so a failing test shows the agent's log.
fn collect(
    pipe: impl Read + Send + 'static,
    lines: Lines,
    tag: String,
) -> std::thread::JoinHandle<()> {
    // The waits print the whole log when they fail; echoing every line as well is opt-in
    // (a 10,000-connection test would print 10,000 lines).
    let echo = std::env::var_os("EGRESS_TEST_AGENT_LOG").is_some_and(|v| v == "1");
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[{tag}] {line}");
            }
            let (lock, cvar) = &*lines;
            lock.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            cvar.notify_all();
        }
    })
}

/// One `GET path` on the agent's admin listener at `addr` inside `netns` (raw HTTP/1.1; the
/// agent closes after each answer): the status code and the body. Panics with the cause if the
/// exchange fails.
pub fn admin_get(netns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    try_admin_get(netns, addr, path).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// Like [`admin_get`], the failure returned.
pub fn try_admin_get(
    netns: &Netns,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::Write as _;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    netns.run(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no head: {text:?}"),
            )
        })?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("no status: {head:?}"),
                )
            })?;
        Ok((status, body.to_string()))
    })
}

/// Polls `GET /readyz` until it answers 200; panics with the last answer after `timeout`.
pub fn wait_admin_ready(netns: &Netns, addr: SocketAddr, timeout: Duration) {
    crate::process::poll(
        timeout,
        Duration::from_millis(50),
        || match try_admin_get(netns, addr, "/readyz") {
            Ok((200, _)) => Ok(()),
            last => Err(last),
        },
        |last| format!("/readyz on {addr} not 200 within {timeout:?}: {last:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: &str = r#"{"timestamp":"2026-05-01T10:00:00.000000Z","level":"INFO","fields":{"message":"ready","listen_port":15001,"actors":1},"target":"egress_agent::app"}"#;
    const CLOSED: &str = r#"{"timestamp":"2026-05-01T10:00:01.000000Z","level":"INFO","fields":{"message":"connection closed","actor":"a1","pid":4242,"original_dst":"10.251.3.1:8443","authority":"web.egress.test:8443","source":"sni","pep_status":200,"bytes_up":517,"bytes_down":2048,"duration_ms":12,"outcome":"ok"},"target":"egress_agent::tunnel","span":{"conn":7,"name":"conn"},"spans":[{"conn":7,"name":"conn"}]}"#;
    const DENIED: &str = r#"{"timestamp":"2026-05-01T10:00:02Z","level":"WARN","fields":{"message":"connection closed","actor":"a1","pid":"4243","original_dst":"10.251.3.1:443","authority":"denied.egress.test:443","source":"sni","pep_status":"403","bytes_up":0,"bytes_down":0,"duration_ms":3,"outcome":"pep_denied"},"target":"egress_agent::tunnel"}"#;

    #[test]
    fn parses_ready_line() {
        let l = LogLine::parse(READY).unwrap();
        assert_eq!(l.level, "INFO");
        assert_eq!(l.message.as_deref(), Some("ready"));
        assert_eq!(l.field_u64("listen_port"), Some(15001));
        assert!(ConnectionLog::from_line(&l).is_none());
    }

    #[test]
    fn parses_connection_line() {
        let c = ConnectionLog::from_line(&LogLine::parse(CLOSED).unwrap()).unwrap();
        assert_eq!(c.actor.as_deref(), Some("a1"));
        assert_eq!(c.pid, Some(4242));
        assert_eq!(c.original_dst.as_deref(), Some("10.251.3.1:8443"));
        assert_eq!(c.authority.as_deref(), Some("web.egress.test:8443"));
        assert_eq!(c.source.as_deref(), Some("sni"));
        assert_eq!(c.pep_status, Some(200));
        assert_eq!(
            (c.bytes_up, c.bytes_down, c.duration_ms),
            (Some(517), Some(2048), Some(12))
        );
        assert_eq!(c.outcome.as_deref(), Some("ok"));
        assert_eq!(c.line.raw["span"]["conn"], 7);
    }

    #[test]
    fn numbers_logged_as_strings_still_parse() {
        let c = ConnectionLog::from_line(&LogLine::parse(DENIED).unwrap()).unwrap();
        assert_eq!(c.pid, Some(4243));
        assert_eq!(c.pep_status, Some(403));
        assert_eq!(c.outcome.as_deref(), Some("pep_denied"));
        assert_eq!(LogLine::parse(DENIED).unwrap().level, "WARN");
    }

    #[test]
    fn non_json_lines_are_skipped() {
        assert!(LogLine::parse("thread 'main' panicked at src/main.rs:1:1").is_none());
        assert!(LogLine::parse("[1,2]").is_none());
    }

    #[test]
    fn single_actor_goes_on_the_command_line() {
        let opts = AgentOptions {
            bpffs_dir: "/sys/fs/bpf/egress-test-x".into(),
            listen_port: Some(15001),
            ..AgentOptions::new("127.0.0.1:3128")
        }
        .actor(ActorSpec {
            id: "a1".into(),
            template: "t".into(),
            template_namespace: "ns".into(),
            cgroup: "/sys/fs/cgroup/unified/egress-test-1".into(),
            netns: Some("/var/run/netns/egt-1-2".into()),
            pep: None,
        });
        let args = opts.args(Path::new("/tmp/agent.toml")).join(" ");
        assert_eq!(
            args,
            format!(
                "run --pep 127.0.0.1:3128 --actor-id a1 --actor-template t --actor-template-namespace ns \
                 --actor-cgroup /sys/fs/cgroup/unified/egress-test-1 --actor-netns /var/run/netns/egt-1-2 \
                 --bpffs-dir /sys/fs/bpf/egress-test-x --control-socket {control} --state-dir {state} \
                 --dns-upstream 127.0.0.1:53 --listen-port 15001 --log-format json",
                control = opts.control_socket().display(),
                state = opts.state_dir().display(),
            )
        );
    }

    #[test]
    fn pep_link_flags_are_passed_when_given() {
        let mut opts = AgentOptions::new("127.0.0.1:3128");
        assert!(
            !opts
                .args(Path::new("/x"))
                .iter()
                .any(|a| a.starts_with("--pep-"))
        );
        opts.pep_link = PepLinkOptions {
            tls_ca_file: Some("/pki/ca.pem".into()),
            proxy_authorization_file: Some("/pki/auth".into()),
            max_waiting: Some(0),
            ..PepLinkOptions::default()
        };
        let args = opts.args(Path::new("/x")).join(" ");
        assert!(
            args.contains(
                "--pep-tls-ca-file /pki/ca.pem --pep-proxy-authorization-file /pki/auth \
                 --pep-max-waiting 0"
            ),
            "{args}"
        );
    }

    #[test]
    fn several_actors_go_in_a_config_file() {
        let actor = |id: &str| ActorSpec {
            id: id.into(),
            template: "t\"q".into(),
            template_namespace: "ns".into(),
            cgroup: format!("/cg/{id}").into(),
            netns: None,
            pep: None,
        };
        let opts = AgentOptions::new("127.0.0.1:3128")
            .actor(actor("a1"))
            .actor(actor("a2"));
        let args = opts.args(Path::new("/tmp/agent.toml"));
        assert!(
            args.windows(2)
                .any(|w| w == ["--config", "/tmp/agent.toml"])
        );
        assert!(!args.iter().any(|a| a == "--actor-id"));
        let toml = opts.config_toml();
        assert_eq!(toml.matches("[[actor]]").count(), 2);
        assert!(toml.contains("template = \"t\\\"q\"\n"));
        assert!(toml.contains("cgroup = \"/cg/a2\"\n"));
    }
}
