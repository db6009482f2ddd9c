//! A private DNS server (dnsmasq) inside a test's namespace, answering only from its own
//! hosts file, and `dig` to ask it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::Output;

/// A running dnsmasq bound to one address inside a namespace; killed on drop.
pub struct Dns {
    dir: tempfile::TempDir,
    child: Child,
    listen: IpAddr,
    netns_name: String,
}

/// One query from dnsmasq's log (`query[A] NAME from SOURCE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The record type asked for, e.g. `A` or `AAAA`.
    pub qtype: String,
    /// The name asked for.
    pub name: String,
    /// The address the query came from.
    pub source: IpAddr,
}

impl Dns {
    /// Starts dnsmasq in `netns` on `listen`:53, answering `hosts` and refusing everything
    /// else (no upstream servers, no /etc/hosts, no /etc/resolv.conf), and waits until it
    /// answers. `listen` must already be configured on an interface in `netns`.
    pub fn start(netns: &Netns, listen: IpAddr, hosts: &[(&str, IpAddr)]) -> Dns {
        Dns::start_with(netns, listen, hosts, &[])
    }

    /// Like [`Dns::start`], but as the authoritative server of `zone` for queries arriving on
    /// `interface`, answering with a TTL of `ttl` seconds, the way a real zone answers: a
    /// type it has no record of (AAAA for an IPv4-only name) gets an empty answer with the
    /// zone's SOA, which resolvers cache, rather than REFUSED, which they ask again for
    /// every lookup.
    pub fn start_zone(
        netns: &Netns,
        listen: IpAddr,
        hosts: &[(&str, IpAddr)],
        zone: &str,
        interface: &str,
        ttl: u32,
    ) -> Dns {
        Dns::start_with(
            netns,
            listen,
            hosts,
            &[
                format!("--auth-zone={zone}"),
                format!("--auth-server=ns.{zone},{interface}"),
                format!("--auth-ttl={ttl}"),
                format!("--local-ttl={ttl}"),
            ],
        )
    }

    fn start_with(
        netns: &Netns,
        listen: IpAddr,
        hosts: &[(&str, IpAddr)],
        extra: &[String],
    ) -> Dns {
        crate::require_commands(&["dnsmasq", "dig", "nsenter"]);
        // dnsmasq drops to `nobody` before reading the hosts file and writing its log.
        let dir = crate::pki::private_readable_dir("egress-test-dns-");
        let hosts_text: String = hosts.iter().map(|(n, ip)| format!("{ip} {n}\n")).collect();
        std::fs::write(dir.path().join("hosts"), hosts_text).expect("write dnsmasq hosts file");
        let mut cmd = netns.command("dnsmasq");
        cmd.arg("--keep-in-foreground")
            // No /etc/dnsmasq.conf, whatever the host has.
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg(format!(
                "--addn-hosts={}",
                dir.path().join("hosts").display()
            ))
            .arg(format!("--listen-address={listen}"))
            // Only the given address: not the namespace's loopback or other interfaces.
            .arg("--bind-interfaces")
            .arg("--port=53")
            .arg("--log-queries")
            .args(extra)
            .arg(format!(
                "--log-facility={}",
                dir.path().join("log").display()
            ))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("stderr"))
                    .expect("create dnsmasq stderr file"),
            );
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn dnsmasq: {e}"));
        let mut dns = Dns {
            dir,
            child,
            listen,
            netns_name: netns.name().to_string(),
        };
        dns.wait_ready(netns, Duration::from_secs(10));
        dns
    }

    fn wait_ready(&mut self, netns: &Netns, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "dnsmasq exited during start-up ({status}):\n{}",
                    self.diagnostics()
                );
            }
            // Any answer, even REFUSED for this name it does not know, means it is serving.
            let out = dig_output(netns, self.listen, "ready.invalid", &[]);
            if out.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "dnsmasq did not answer on {} in netns {} within {timeout:?}: {}\n{}",
                    self.listen,
                    self.netns_name,
                    out.describe(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address dnsmasq answers on (port 53).
    pub fn addr(&self) -> IpAddr {
        self.listen
    }

    /// dnsmasq's log file (start-up messages and one `query[...]` line per query).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Every query logged so far, in order; the rig's own readiness queries are left out.
    pub fn queries(&self) -> Vec<Query> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(parse_query)
            .filter(|q| q.name != "ready.invalid")
            .collect()
    }

    /// Waits until a query for `name` is logged and returns it; panics with the log on timeout.
    pub fn wait_for_query(&self, name: &str, timeout: Duration) -> Query {
        crate::process::poll(
            timeout,
            Duration::from_millis(20),
            || {
                self.queries()
                    .into_iter()
                    .find(|q| q.name == name)
                    .ok_or(())
            },
            |()| {
                format!(
                    "dnsmasq: no query for {name} within {timeout:?}\n{}",
                    self.diagnostics()
                )
            },
        )
    }

    fn diagnostics(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- dnsmasq stderr ---\n{}\n--- dnsmasq log ---\n{}",
            read("stderr"),
            read("log")
        )
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        // SIGKILL is enough: dnsmasq keeps no state worth a clean shutdown here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `... dnsmasq[PID]: query[A] NAME from SOURCE`.
fn parse_query(line: &str) -> Option<Query> {
    let rest = &line[line.find("query[")? + "query[".len()..];
    let (qtype, rest) = rest.split_once("] ")?;
    let (name, source) = rest.split_once(" from ")?;
    Some(Query {
        qtype: qtype.to_string(),
        name: name.to_string(),
        source: source.trim().parse().ok()?,
    })
}

/// Runs `dig @SERVER NAME +short` (A records, one 1-second try) inside `netns` with `extra`
/// options; exit 0 means the server answered (possibly with no records).
pub fn dig_output(netns: &Netns, server: IpAddr, name: &str, extra: &[&str]) -> Output {
    let mut cmd: Command = netns.command("dig");
    cmd.arg(format!("@{server}"))
        .arg(name)
        .args(["+short", "+time=1", "+tries=1"])
        .args(extra);
    crate::process::run(&mut cmd, Duration::from_secs(10))
}

/// Like [`dig_output`], run inside `netns` *and* `cgroup` (a captured actor) when given.
pub fn dig_in(
    netns: &Netns,
    cgroup: Option<&crate::cgroup::Cgroup>,
    server: IpAddr,
    name: &str,
    extra: &[&str],
) -> Output {
    let mut cmd = crate::process::command_in("dig", Some(netns), cgroup);
    cmd.arg(format!("@{server}"))
        .arg(name)
        .args(["+short", "+time=1", "+tries=1"])
        .args(extra);
    crate::process::run(&mut cmd, Duration::from_secs(10))
}

/// Asks `server` for `name`'s A records from inside `netns`; panics if dig gets no answer at
/// all (timeout, refused port), returns the addresses (empty for an unknown name).
pub fn dig(netns: &Netns, server: IpAddr, name: &str) -> Vec<IpAddr> {
    let out = dig_output(netns, server, name, &[]);
    if !out.success() {
        panic!(
            "dig @{server} {name} in netns {}: {}",
            netns.name(),
            out.describe()
        );
    }
    out.stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_lines() {
        assert_eq!(
            parse_query("Nov 27 21:28:22 dnsmasq[8427]: query[A] web.test from 10.253.9.2"),
            Some(Query {
                qtype: "A".into(),
                name: "web.test".into(),
                source: "10.253.9.2".parse().unwrap(),
            })
        );
        assert_eq!(
            parse_query("Nov 27 21:28:22 dnsmasq[1]: config error is REFUSED"),
            None
        );
        assert_eq!(
            parse_query("Nov 27 21:28:22 dnsmasq[1]: query[AAAA] x.test from fd00::2")
                .map(|q| q.qtype),
            Some("AAAA".into())
        );
    }
}
