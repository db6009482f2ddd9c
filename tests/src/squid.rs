//! A real squid as the policy proxy (PEP): a plain forward proxy that allows CONNECT to any
//! port and logs the identity headers the agent adds.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// The identity headers the agent sends on CONNECT, in the order [`AccessEntry`] holds them.
pub const IDENTITY_HEADERS: [&str; 5] = [
    "x-ate-actor-id",
    "x-ate-actor-template",
    "x-ate-actor-template-namespace",
    "x-ate-original-destination",
    "x-ate-connect-authority",
];

/// How to configure the squid under test.
#[derive(Debug, Clone)]
pub struct SquidConfig {
    /// Address squid listens on inside its namespace.
    pub listen: SocketAddr,
    /// Names squid resolves from its private hosts file (it asks no DNS server).
    pub hosts: Vec<(String, IpAddr)>,
    /// Domains (squid `dstdomain` syntax, e.g. `denied.egress.test` or `.denied.test`) that
    /// squid refuses with 403.
    pub deny_domains: Vec<String>,
    /// CONNECT target ports that squid refuses with 403.
    pub deny_ports: Vec<u16>,
    /// Raw squid.conf lines placed just before the final `http_access allow all`.
    pub extra: Vec<String>,
    /// TLS on the listening port (`https_port`: TLS to the proxy, CONNECT inside) instead of
    /// plain `http_port`.
    pub tls: Option<SquidTls>,
    /// Users of squid's basic auth (`basic_ncsa_auth` with a password file made by `openssl
    /// passwd -apr1`), as (user, password); non-empty: every request must authenticate.
    pub basic_auth: Vec<(String, String)>,
}

/// Squid's TLS listening port: its certificate, and the CA it requires client certificates
/// from, if any.
#[derive(Debug, Clone)]
pub struct SquidTls {
    /// Certificate (PEM), readable by user `proxy`.
    pub cert: PathBuf,
    /// Its key (PEM), readable by user `proxy`.
    pub key: PathBuf,
    /// `clientca=` (and `tls-cafile=`): squid requires a client certificate from this CA.
    pub client_ca: Option<PathBuf>,
}

impl Default for SquidConfig {
    fn default() -> Self {
        SquidConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            hosts: Vec::new(),
            deny_domains: Vec::new(),
            deny_ports: Vec::new(),
            extra: Vec::new(),
            tls: None,
            basic_auth: Vec::new(),
        }
    }
}

impl SquidConfig {
    /// Adds a hosts-file entry.
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_string(), ip));
        self
    }

    /// Makes squid answer 403 to CONNECT requests for `port`.
    pub fn deny_port(mut self, port: u16) -> Self {
        self.deny_ports.push(port);
        self
    }

    /// Makes squid answer 403 to requests for `domain`.
    pub fn deny_domain(mut self, domain: &str) -> Self {
        self.deny_domains.push(domain.to_string());
        self
    }

    /// Makes squid's listening port TLS with this certificate and key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some(SquidTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
        });
        self
    }

    /// Makes squid require a client certificate signed by `ca` (needs [`SquidConfig::tls`]).
    pub fn client_ca(mut self, ca: &Path) -> Self {
        match &mut self.tls {
            Some(tls) => tls.client_ca = Some(ca.to_path_buf()),
            None => panic!("SquidConfig::client_ca needs SquidConfig::tls first"),
        }
        self
    }

    /// Adds a basic-auth user: squid then answers 407 to requests without valid credentials.
    pub fn basic_auth_user(mut self, user: &str, password: &str) -> Self {
        self.basic_auth
            .push((user.to_string(), password.to_string()));
        self
    }
}

/// One access.log line, parsed; `None` where squid logged `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// Client address as squid saw it (`%>a`).
    pub client: String,
    /// Request method (`%rm`), e.g. `CONNECT`.
    pub method: String,
    /// Request URI (`%ru`): the authority `host:port` for CONNECT, the URL otherwise.
    pub uri: String,
    /// Status code sent to the client (`%>Hs`).
    pub status: Option<u16>,
    /// Address of the server squid connected to (`%<a`).
    pub server: Option<String>,
    /// Value of `x-ate-actor-id`.
    pub actor_id: Option<String>,
    /// Value of `x-ate-actor-template`.
    pub actor_template: Option<String>,
    /// Value of `x-ate-actor-template-namespace`.
    pub actor_template_namespace: Option<String>,
    /// Value of `x-ate-original-destination`.
    pub original_destination: Option<String>,
    /// Value of `x-ate-connect-authority`.
    pub connect_authority: Option<String>,
    /// The user squid authenticated (`%un`), with basic auth.
    pub user: Option<String>,
    /// Value of `x-ate-authority-source`.
    pub authority_source: Option<String>,
    /// Subject of the client's TLS certificate (`%ssl::>cert_subject`).
    pub client_cert_subject: Option<String>,
}

impl AccessEntry {
    /// Asserts a CONNECT to `authority` carrying the identity `actor` / `template` /
    /// `template_namespace`, the original destination `original` and `authority` as
    /// `x-ate-connect-authority`.
    pub fn assert_identity(
        &self,
        (actor, template, template_namespace): (&str, &str, &str),
        original: std::net::SocketAddr,
        authority: &str,
    ) {
        assert_eq!(self.method, "CONNECT");
        assert_eq!(self.uri, authority, "CONNECT authority");
        assert_eq!(self.actor_id.as_deref(), Some(actor), "x-ate-actor-id");
        assert_eq!(
            self.actor_template.as_deref(),
            Some(template),
            "x-ate-actor-template"
        );
        assert_eq!(
            self.actor_template_namespace.as_deref(),
            Some(template_namespace),
            "x-ate-actor-template-namespace"
        );
        assert_eq!(
            self.original_destination.as_deref(),
            Some(original.to_string().as_str()),
            "x-ate-original-destination"
        );
        assert_eq!(
            self.connect_authority.as_deref(),
            Some(authority),
            "x-ate-connect-authority"
        );
    }
}

/// Fields in our logformat; the tab-separated line must have exactly this many.
const FIELDS: usize = 14;

// Squid writes the literal tab characters of the format string as they are.
const LOGFORMAT: &str = "%ts.%03tu\t%>a\t%rm\t%ru\t%>Hs\t%<a\t\
    %{x-ate-actor-id}>h\t%{x-ate-actor-template}>h\t%{x-ate-actor-template-namespace}>h\t\
    %{x-ate-original-destination}>h\t%{x-ate-connect-authority}>h\t\
    %un\t%{x-ate-authority-source}>h\t%ssl::>cert_subject";

impl AccessEntry {
    /// Parses one line of the access log written with our logformat.
    pub fn parse(line: &str) -> Option<AccessEntry> {
        let f: Vec<&str> = line.trim_end_matches(['\r', '\n']).split('\t').collect();
        if f.len() != FIELDS {
            return None;
        }
        let opt = |s: &str| (s != "-" && !s.is_empty()).then(|| s.to_string());
        let header = |s: &str| opt(s).map(|v| percent_decode(&v));
        Some(AccessEntry {
            client: f[1].to_string(),
            method: f[2].to_string(),
            uri: f[3].to_string(),
            status: f[4].parse().ok().filter(|&s| s != 0),
            server: opt(f[5]),
            actor_id: header(f[6]),
            actor_template: header(f[7]),
            actor_template_namespace: header(f[8]),
            original_destination: header(f[9]),
            connect_authority: header(f[10]),
            user: header(f[11]),
            authority_source: header(f[12]),
            client_cert_subject: header(f[13]),
        })
    }
}

/// Undoes squid's URL-encoding of logged header values (space, quotes, tab, non-ASCII,
/// brackets become `%XX`). Squid leaves a literal `%` as it is, so a value that itself
/// contains `%XX` cannot be told apart: keep test header values free of `%`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running squid (`squid -N`) inside a test's namespace; SIGTERMed and awaited on drop.
pub struct Squid {
    dir: tempfile::TempDir,
    child: Child,
    listen: SocketAddr,
}

impl Squid {
    /// Writes the config, checks it with `squid -k parse`, starts squid inside `netns` and
    /// waits until it accepts connections.
    pub fn start(netns: &Netns, config: SquidConfig) -> Squid {
        let listen = config.listen;
        // Each test has its own namespace, so a busy port here is a rig bug: say so plainly.
        netns
            .run(move || std::net::TcpListener::bind(listen).map(drop))
            .unwrap_or_else(|e| panic!("squid: {listen} is busy in netns {}: {e}", netns.name()));

        let dir = crate::pki::private_readable_dir("egress-test-squid-");
        let d = dir.path();
        let hosts: String = config
            .hosts
            .iter()
            .map(|(n, ip)| format!("{ip} {n}\n"))
            .collect();
        std::fs::write(d.join("hosts"), hosts).expect("write squid hosts file");
        if !config.basic_auth.is_empty() {
            write_passwords(&d.join("passwd"), &config.basic_auth);
        }
        let conf = render_config(d, &config);
        std::fs::write(d.join("squid.conf"), &conf).expect("write squid.conf");
        // Squid drops to user `proxy` and must write its logs and pid file here.
        chown_to_proxy(d);

        let conf_path = d.join("squid.conf");
        let parse = crate::process::run(
            std::process::Command::new("squid")
                .arg("-k")
                .arg("parse")
                .arg("-f")
                .arg(&conf_path),
            Duration::from_secs(20),
        );
        if !parse.success() {
            panic!(
                "squid -k parse rejected the generated config:\n{conf}\n{}",
                parse.describe()
            );
        }

        // A private service name keeps squid's shared-memory and IPC names apart from other squids.
        let service = format!("egt{}x{}", std::process::id(), crate::next_id());
        let out = std::fs::File::create(d.join("squid.out")).expect("create squid.out");
        let mut cmd = crate::process::command_in("squid", Some(netns), None);
        cmd.arg("-N")
            .arg("-n")
            .arg(&service)
            .arg("-f")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup squid.out"))
            .stderr(out)
            // Its own process group: a Ctrl-C to the test run must not race our SIGTERM.
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn squid: {e}"));
        let mut squid = Squid { dir, child, listen };
        squid.wait_ready(Duration::from_secs(15));
        squid
    }

    fn wait_ready(&mut self, timeout: Duration) {
        // Readiness comes from cache.log, not from a probe connection: squid logs every
        // connection, and a probe would add an `error:transaction-end-before-headers` entry.
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "squid exited during start-up ({status}):\n{}",
                    self.diagnostics()
                );
            }
            // "Accepting HTTP Socket connections" or, for https_port, "... HTTPS Socket ...".
            if self.cache_log().contains("Accepting HTTP") {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "squid did not start listening on {} within {timeout:?}:\n{}",
                    self.listen,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address squid listens on (inside its namespace), for `--pep`.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Squid's private directory (config, hosts file, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the access log.
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Squid's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every access-log entry written so far (squid logs a CONNECT when its tunnel closes).
    pub fn access_log_entries(&self) -> Vec<AccessEntry> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        // A line squid is still writing has no newline yet: leave it for the next read.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                AccessEntry::parse(l)
                    .unwrap_or_else(|| panic!("squid access.log line not in our format: {l:?}"))
            })
            .collect()
    }

    /// Waits until the access log has at least `n` entries; panics with diagnostics on timeout.
    pub fn wait_for_entries(&self, n: usize, timeout: Duration) -> Vec<AccessEntry> {
        crate::process::poll(
            timeout,
            Duration::from_millis(50),
            || {
                let entries = self.access_log_entries();
                if entries.len() >= n {
                    Ok(entries)
                } else {
                    Err(entries)
                }
            },
            |entries| {
                format!(
                    "squid: expected {n} access-log entries within {timeout:?}, have {}: {entries:#?}\n{}",
                    entries.len(),
                    self.diagnostics()
                )
            },
        )
    }

    /// Waits for the first access-log entry that satisfies `pred` (e.g. method and URI);
    /// panics with the whole log on timeout. Squid logs a CONNECT only when its tunnel closes.
    pub fn wait_for_entry(
        &self,
        timeout: Duration,
        pred: impl Fn(&AccessEntry) -> bool,
    ) -> AccessEntry {
        crate::process::poll(
            timeout,
            Duration::from_millis(50),
            || {
                let entries = self.access_log_entries();
                entries.iter().find(|e| pred(e)).cloned().ok_or(entries)
            },
            |entries| {
                format!(
                    "squid: no matching access-log entry within {timeout:?}: {entries:#?}\n{}",
                    self.diagnostics()
                )
            },
        )
    }

    /// Waits for the entry with this method and URI (`%ru`, the authority for CONNECT).
    pub fn wait_for_request(&self, method: &str, uri: &str, timeout: Duration) -> AccessEntry {
        self.wait_for_entry(timeout, |e| e.method == method && e.uri == uri)
    }

    /// The cache log (squid's own diagnostics).
    pub fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let out = std::fs::read_to_string(self.dir.path().join("squid.out")).unwrap_or_default();
        format!(
            "--- squid output ---\n{out}\n--- cache.log ---\n{}",
            self.cache_log()
        )
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        // shutdown_lifetime is 1 s; give it a little more before SIGKILL.
        crate::process::stop(&mut self.child, Duration::from_secs(3));
    }
}

fn render_config(dir: &Path, config: &SquidConfig) -> String {
    let d = dir.display();
    let mut c = String::new();
    let mut line = |s: &str| {
        c.push_str(s);
        c.push('\n');
    };
    match &config.tls {
        None => line(&format!("http_port {}", config.listen)),
        Some(tls) => {
            let mut port = format!(
                "https_port {} tls-cert={} tls-key={}",
                config.listen,
                tls.cert.display(),
                tls.key.display()
            );
            if let Some(ca) = &tls.client_ca {
                // clientca= makes squid require and verify a client certificate.
                port += &format!(" clientca={} tls-cafile={}", ca.display(), ca.display());
            }
            line(&port);
        }
    }
    line("visible_hostname egress-test-squid");
    line(&format!("pid_filename {d}/squid.pid"));
    line(&format!("coredump_dir {d}"));
    line(&format!("cache_log {d}/cache.log"));
    line("netdb_filename none");
    line(&format!("logformat egress {LOGFORMAT}"));
    line(&format!("access_log stdio:{d}/access.log logformat=egress"));
    line("buffered_logs off");
    line("cache_store_log none");
    line("logfile_rotate 0");
    line(&format!("hosts_file {d}/hosts"));
    // Names not in the hosts file go to a resolver that is not there: nothing leaves the namespace.
    line("dns_nameservers 127.0.0.1");
    line("dns_timeout 1 seconds");
    line("dns_retransmit_interval 1 seconds");
    line("pinger_enable off");
    line("shutdown_lifetime 1 second");
    line("cache deny all");
    line("cache_mem 8 MB");
    line("via off");
    line("forwarded_for transparent");
    if !config.basic_auth.is_empty() {
        line(&format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd"
        ));
        line("auth_param basic realm egress-test");
        line("auth_param basic children 2");
        line("acl egress_authed proxy_auth REQUIRED");
        line("http_access deny !egress_authed");
    }
    if !config.deny_domains.is_empty() {
        line(&format!(
            "acl egress_denied dstdomain {}",
            config.deny_domains.join(" ")
        ));
        line("http_access deny egress_denied");
    }
    if !config.deny_ports.is_empty() {
        let ports: Vec<String> = config.deny_ports.iter().map(u16::to_string).collect();
        line(&format!("acl egress_denied_ports port {}", ports.join(" ")));
        line("http_access deny CONNECT egress_denied_ports");
    }
    for l in &config.extra {
        line(l);
    }
    // No Safe_ports / SSL_ports rules: CONNECT to any port is allowed; policy is not squid's job here.
    line("http_access allow all");
    c
}

/// Writes an htpasswd-style file (`user:$apr1$...`) with `openssl passwd -apr1`.
fn write_passwords(path: &Path, users: &[(String, String)]) {
    let mut text = String::new();
    for (user, password) in users {
        let out = crate::process::run_with_input(
            std::process::Command::new("openssl").args(["passwd", "-apr1", "-stdin"]),
            format!("{password}\n").as_bytes(),
            Duration::from_secs(20),
        );
        out.expect_success("openssl passwd -apr1");
        text.push_str(&format!("{user}:{}\n", out.stdout.trim()));
    }
    std::fs::write(path, text).expect("write squid passwd file");
}

fn chown_to_proxy(dir: &Path) {
    let user = nix::unistd::User::from_name("proxy")
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("user `proxy` does not exist: install squid-openssl"));
    for entry in std::fs::read_dir(dir).expect("read squid dir").flatten() {
        let _ = nix::unistd::chown(&entry.path(), Some(user.uid), Some(user.gid));
    }
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).expect("chown squid dir to proxy");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_entry() {
        let e = AccessEntry::parse(
            "1700000000.123\t127.0.0.1\tCONNECT\tweb.egress.test:8443\t200\t10.251.3.1\ta1\tt1\tns1\t10.251.3.1:8443\tweb.egress.test:8443\tagent\tsni\t/CN=agent.test\n",
        )
        .unwrap();
        assert_eq!(e.method, "CONNECT");
        assert_eq!(e.uri, "web.egress.test:8443");
        assert_eq!(e.status, Some(200));
        assert_eq!(e.actor_id.as_deref(), Some("a1"));
        assert_eq!(e.original_destination.as_deref(), Some("10.251.3.1:8443"));
        assert_eq!(e.connect_authority.as_deref(), Some("web.egress.test:8443"));
        assert_eq!(e.user.as_deref(), Some("agent"));
        assert_eq!(e.authority_source.as_deref(), Some("sni"));
        assert_eq!(e.client_cert_subject.as_deref(), Some("/CN=agent.test"));
    }

    #[test]
    fn header_values_are_url_decoded() {
        // As squid 5.7 logged the values "a b", "q\"uote", "tab\there" and "ünï".
        for (logged, want) in [
            ("a%20b", "a b"),
            ("q%22uote", "q\"uote"),
            ("tab%09here", "tab\there"),
            ("%C3%BCn%C3%AF", "ünï"),
        ] {
            let line =
                format!("1.000\t127.0.0.1\tCONNECT\tx:1\t200\t-\t{logged}\t-\t-\t-\t-\t-\t-\t-");
            assert_eq!(
                AccessEntry::parse(&line).unwrap().actor_id.as_deref(),
                Some(want)
            );
        }
    }

    #[test]
    fn dash_means_missing() {
        let e =
            AccessEntry::parse("1.000\t127.0.0.1\tCONNECT\tx:1\t403\t-\t-\t-\t-\t-\t-\t-\t-\t-")
                .unwrap();
        assert_eq!(e.status, Some(403));
        assert_eq!(e.server, None);
        assert_eq!(e.actor_id, None);
    }

    #[test]
    fn rejects_other_formats() {
        assert_eq!(
            AccessEntry::parse(
                "1700000000.123 5 127.0.0.1 TCP_TUNNEL/200 39 CONNECT x:443 - HIER_DIRECT/1.2.3.4 -"
            ),
            None
        );
    }
}
