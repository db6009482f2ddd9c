//! nginx as the benchmark's upstream: plain HTTP and HTTPS on one address inside a namespace,
//! serving files whose bytes the load generator can check ([`crate::load::pattern`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A running nginx (master + workers) in its own directory; stopped on drop.
pub struct Nginx {
    dir: tempfile::TempDir,
    child: Child,
}

/// What nginx serves and where.
pub struct NginxSpec<'a> {
    /// The address it listens on (ports 80 and 443).
    pub addr: IpAddr,
    /// Certificate and key (PEM) for 443.
    pub cert: &'a Path,
    /// The certificate's key.
    pub key: &'a Path,
    /// Files to serve: (URL path without the leading `/`, size in bytes), filled with the
    /// load generator's pattern. Bulk files go to /dev/shm so the disk is never the limit.
    pub files: &'a [(&'a str, u64)],
    /// Worker processes.
    pub workers: usize,
}

impl Nginx {
    /// Writes the files and the config, starts nginx in `netns` and waits until it answers.
    pub fn start(netns: &Netns, spec: NginxSpec<'_>) -> Nginx {
        crate::require_commands(&["nginx"]);
        // Workers drop to `nobody`: everything they read must be world-readable.
        let dir = tempfile::Builder::new()
            .prefix("egress-bench-nginx-")
            .tempdir_in("/dev/shm")
            .expect("create nginx dir in /dev/shm");
        let d = dir.path();
        set_mode(d, 0o755);
        let www = d.join("www");
        std::fs::create_dir(&www).expect("mkdir www");
        set_mode(&www, 0o755);
        for (name, len) in spec.files {
            let path = www.join(name);
            crate::load::write_pattern_file(&path, *len)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            set_mode(&path, 0o644);
        }
        let conf = render(d, &www, &spec);
        std::fs::write(d.join("nginx.conf"), &conf).expect("write nginx.conf");
        // `nginx -t` binds the listening addresses: test inside the namespace.
        let test = crate::process::run(
            netns
                .command("nginx")
                .arg("-t")
                .arg("-q")
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf")),
            Duration::from_secs(20),
        );
        if !test.success() {
            panic!("nginx -t rejected the config:\n{conf}\n{}", test.describe());
        }
        let mut cmd = netns.command("nginx");
        cmd.arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr")).expect("create nginx stderr"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn nginx: {e}"));
        let mut nginx = Nginx { dir, child };
        nginx.wait_ready(netns, spec.addr, Duration::from_secs(15));
        nginx
    }

    fn wait_ready(&mut self, netns: &Netns, addr: IpAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nginx exited during start-up ({status}):\n{}",
                    self.errors()
                );
            }
            let up = [80u16, 443].iter().all(|&port| {
                let to = std::net::SocketAddr::new(addr, port);
                netns
                    .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)))
                    .is_ok()
            });
            if up {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx did not listen on {addr}:80/443 within {timeout:?}:\n{}",
                    self.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many requests came from each client address, from the access log (unbuffered: a
    /// request is there once nginx has finished it).
    pub fn requests_by_client(&self) -> std::collections::BTreeMap<IpAddr, u64> {
        let mut by = std::collections::BTreeMap::new();
        let log = std::fs::read_to_string(self.access_log()).unwrap_or_default();
        for line in log.lines() {
            if let Some(ip) = line.split(' ').next().and_then(|s| s.parse().ok()) {
                *by.entry(ip).or_insert(0) += 1;
            }
        }
        by
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    fn errors(&self) -> String {
        let d = self.dir.path();
        format!(
            "--- stderr ---\n{}\n--- error.log ---\n{}",
            std::fs::read_to_string(d.join("stderr")).unwrap_or_default(),
            std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of the master and its workers.
        crate::process::stop(&mut self.child, Duration::from_secs(5));
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn render(dir: &Path, www: &Path, spec: &NginxSpec<'_>) -> String {
    let d = dir.display();
    let listen = match spec.addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!(
        "daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    log_format src '$remote_addr $server_port $status $body_bytes_sent';
    access_log {d}/access.log src;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    server {{
        listen {listen}:80 backlog=4096;
        listen {listen}:443 ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:10m;
        root {www};
    }}
}}
",
        workers = spec.workers,
        cert = spec.cert.display(),
        key = spec.key.display(),
        www = www.display(),
    )
}
