//! `cargo xtask bench`: every way an actor's connection can reach one upstream, set up side by
//! side on one machine and measured in one run with one load generator ([`crate::load`]).
//!
//! Paths, each with its own actor namespace, all to the same nginx in the upstream namespace:
//!
//! | path | how the actor's connection gets out | intermediaries (CPU, RSS counted) |
//! |---|---|---|
//! | `direct` | routed by the node, nothing in between | none |
//! | `egress` | cgroup eBPF capture -> agent (policy, no PEP) -> upstream | agent A |
//! | `egress+pep` | cgroup eBPF capture -> agent -> squid CONNECT -> upstream | agent B, squid |
//! | `squid-explicit` | the client speaks CONNECT to squid itself | squid |
//! | `squid-intercept` | nft REDIRECT in the node -> squid `intercept` / `ssl-bump` peek+splice | squid |
//! | `nft+agent` | veth + nft REDIRECT + `SO_ORIGINAL_DST` -> agent (no PEP) -> upstream | agent C |
//! | `egress+mtls` | eBPF -> agent -> squid `https_port` requiring the actor's certificate (`headers`, HTTP/1.1: TLS per tunnel) -> upstream | agent D, squid |
//! | `egress+h2` | eBPF -> agent -> nghttpx (mTLS, HTTP/2 CONNECT streams on one pooled connection) -> squid -> upstream | agent E, nghttpx, squid |
//! | `egress+nghttpx-h1` | eBPF -> agent -> nghttpx (mTLS, HTTP/1.1: TLS per tunnel) -> squid -> upstream | agent F, nghttpx, squid |
//!
//! The last three give the HTTP/2 pooling figure ([`pooling`]): what a new actor connection
//! costs when its tunnel is a stream on an open HTTP/2 connection (`egress+h2`) against a TLS
//! connection of its own (`egress+mtls`), and against the same per-tunnel TLS through the same
//! nghttpx (`egress+nghttpx-h1`), which separates the hop nghttpx adds from what pooling saves.
//!
//! Address plan (`N` = the bench's subnet): upstream `10.250.N.2` (node side `.1`); the actor of
//! path `i` (in [`Path::ALL`] order) on `10.{240+i}.N.2` (node side `.1`); the worker of the
//! `nft+agent` path on `10.252.N.2`, its actor on the agent's pool `10.200.0.0/24`. In the node
//! namespace: squid on :3128 (plain), :3129/:3130 (intercept), 127.0.0.1:3131 (mTLS); nghttpx
//! on 127.0.0.1:3443.
//!
//! Every figure is the median over repetitions; repetitions go round the paths in turn so
//! that drift on the machine spreads over all of them.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{
    agent::{ActorSpec, Agent, AgentOptions, VethActorSpec},
    cgroup::Cgroup,
    contract::{CertDir, Pki, client_cert, files_source, pep_toml},
    dns::Dns,
    netns::{Netns, Veth, named_veth},
    nghttpx::{Nghttpx, NghttpxConfig},
    nginx::{Nginx, NginxSpec},
    pki::TestCa,
    squid::{Squid, SquidConfig},
};

/// The upstream's name (SNI, `Host`, the policy's rule, squid's and the agent's DNS).
pub const NAME: &str = "web.egress.test";
/// The small file a rate or idle request fetches.
pub const SMALL: &str = "small";
/// Its size: a small API response.
pub const SMALL_LEN: u64 = 1024;
/// The file bulk streams fetch over and over.
pub const BULK: &str = "bulk";

const T: Duration = Duration::from_secs(30);

/// squid's `https_port` that requires the actors' certificates (the `egress+mtls` PEP).
const SQUID_MTLS: &str = "127.0.0.1:3131";
/// nghttpx's TLS frontend (the PEP of `egress+h2` and `egress+nghttpx-h1`).
const NGHTTPX: &str = "127.0.0.1:3443";

/// One way from an actor to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// Nothing in between.
    Direct,
    /// eBPF capture, the agent deciding with its policy and dialling itself.
    Egress,
    /// eBPF capture, the agent tunnelling to squid.
    EgressPep,
    /// The client using squid as its CONNECT proxy.
    SquidExplicit,
    /// nft REDIRECT to squid in intercept mode (ssl-bump peek + splice for TLS).
    SquidIntercept,
    /// nft REDIRECT + SO_ORIGINAL_DST to the agent (its veth mode), no PEP.
    NftAgent,
    /// eBPF capture, the agent tunnelling over mTLS (its actor's certificate) to squid's
    /// `https_port`: HTTP/1.1 CONNECT, one TLS connection per tunnel (`headers` profile).
    EgressMtls,
    /// eBPF capture, the agent tunnelling as HTTP/2 CONNECT streams on its actor's pooled mTLS
    /// connection to nghttpx, which hands each tunnel to squid.
    EgressH2,
    /// As [`Path::EgressH2`] but HTTP/1.1 CONNECT, one TLS connection per tunnel: the same
    /// nghttpx hop without pooling.
    EgressNghttpxH1,
}

impl Path {
    /// Every path, in table order.
    pub const ALL: [Path; 9] = [
        Path::Direct,
        Path::Egress,
        Path::EgressPep,
        Path::SquidExplicit,
        Path::SquidIntercept,
        Path::NftAgent,
        Path::EgressMtls,
        Path::EgressH2,
        Path::EgressNghttpxH1,
    ];

    /// The paths whose PEP link uses per-actor client certificates (the pooling figure's).
    pub const CONTRACT: [Path; 3] = [Path::EgressMtls, Path::EgressH2, Path::EgressNghttpxH1];

    /// The path's name in tables, JSON and `--paths`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Egress => "egress",
            Path::EgressPep => "egress+pep",
            Path::SquidExplicit => "squid-explicit",
            Path::SquidIntercept => "squid-intercept",
            Path::NftAgent => "nft+agent",
            Path::EgressMtls => "egress+mtls",
            Path::EgressH2 => "egress+h2",
            Path::EgressNghttpxH1 => "egress+nghttpx-h1",
        }
    }

    /// The path named `name`.
    pub fn from_name(name: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == name)
    }

    fn index(self) -> u8 {
        Path::ALL.iter().position(|&p| p == self).unwrap_or(0) as u8
    }
}

/// One measurement a path is put through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Keep-alive GETs of the bulk file on `streams` connections; Gbit/s of body.
    Bulk {
        /// TLS (port 443) or plain HTTP (port 80).
        tls: bool,
        /// Concurrent connections.
        streams: u32,
    },
    /// `Connection: close` GETs of the small file by `concurrency` workers; connections/s,
    /// and connect-to-first-byte latency.
    Rate {
        /// TLS (port 443) or plain HTTP (port 80).
        tls: bool,
        /// Concurrent workers.
        concurrency: u32,
    },
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 10] = [
        Metric::Bulk {
            tls: false,
            streams: 1,
        },
        Metric::Bulk {
            tls: false,
            streams: 8,
        },
        Metric::Bulk {
            tls: true,
            streams: 1,
        },
        Metric::Bulk {
            tls: true,
            streams: 8,
        },
        Metric::Rate {
            tls: false,
            concurrency: 1,
        },
        Metric::Rate {
            tls: false,
            concurrency: 4,
        },
        Metric::Rate {
            tls: false,
            concurrency: 64,
        },
        Metric::Rate {
            tls: true,
            concurrency: 1,
        },
        Metric::Rate {
            tls: true,
            concurrency: 4,
        },
        Metric::Rate {
            tls: true,
            concurrency: 64,
        },
    ];

    /// A short name: `bulk-plain-1`, `conn-tls-64`.
    pub fn name(self) -> String {
        match self {
            Metric::Bulk { tls, streams } => format!("bulk-{}-{streams}", proto(tls)),
            Metric::Rate { tls, concurrency } => format!("conn-{}-{concurrency}", proto(tls)),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Bulk { .. } => "Gbit/s",
            Metric::Rate { .. } => "conn/s",
        }
    }

    fn tls(self) -> bool {
        match self {
            Metric::Bulk { tls, .. } | Metric::Rate { tls, .. } => tls,
        }
    }
}

fn proto(tls: bool) -> &'static str {
    if tls { "tls" } else { "plain" }
}

/// How long and how much.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Seconds per measurement.
    pub seconds: f64,
    /// Repetitions of every measurement (the median is reported).
    pub reps: usize,
    /// Idle tunnelled connections held open for the memory figure (0: skip).
    pub idle: usize,
    /// Short connections for the map-entry and RSS-flatness figure (0: skip).
    pub short: u64,
    /// Check every body byte against the pattern (the short run in `cargo xtask test`).
    pub verify: bool,
    /// Size of the bulk file.
    pub bulk_len: u64,
    /// The paths to run (all by default; `direct` is always added: ratios need it).
    pub paths: Vec<Path>,
    /// The measurements to run.
    pub metrics: Vec<Metric>,
    /// Extra arguments for every agent (to compare agent settings run against run).
    pub agent_args: Vec<String>,
    /// The bench's subnet `N`.
    pub net: u8,
}

impl Profile {
    /// The full run of `cargo xtask bench`.
    pub fn full() -> Profile {
        Profile {
            seconds: 1.5,
            reps: 3,
            idle: 10_000,
            short: 1_000_000,
            verify: false,
            bulk_len: 256 << 20,
            paths: Path::ALL.to_vec(),
            metrics: Metric::ALL.to_vec(),
            agent_args: Vec::new(),
            net: 230,
        }
    }

    /// A few seconds per path, every byte checked: the run `cargo xtask test` includes so the
    /// bench cannot rot. It asserts nothing about timing.
    pub fn quick() -> Profile {
        Profile {
            seconds: 0.3,
            reps: 1,
            idle: 200,
            short: 2_000,
            verify: true,
            // Small enough that each of 8 streams finishes responses in 0.3 s in a debug build.
            bulk_len: 1 << 20,
            ..Profile::full()
        }
    }
}

/// Set (by `egress-bench` on SIGINT or SIGTERM) to stop the run: the next step panics, and
/// unwinding drops the [`Bench`], which stops every process and removes the namespaces, the
/// cgroups, the pins and the files.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn check_interrupted() {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        panic!("interrupted: cleaning up");
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The load generator (`egress-load`).
    pub load: PathBuf,
    /// The agent.
    pub agent: PathBuf,
}

/// One load-generator run, as measured.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Gbit/s (bulk) or connections/s (rate).
    pub value: f64,
    /// Body bytes (bulk) or completed connections (rate).
    pub units: f64,
    /// Connect-to-first-byte latency, µs (rate).
    pub p50_us: Option<f64>,
    /// The 99th percentile, µs (rate).
    pub p99_us: Option<f64>,
    /// CPU seconds the path's intermediaries spent during the run.
    pub cpu_s: f64,
    /// CPU seconds of the path's agent alone (0 on paths without one): splits a PEP path's
    /// cost between the agent and the PEP.
    pub agent_cpu_s: f64,
}

/// Idle connections held through a path.
#[derive(Debug, Clone)]
pub struct IdleResult {
    /// Connections held.
    pub open: u64,
    /// RSS of the path's main intermediary before, KiB.
    pub rss_before_kib: u64,
    /// RSS with the connections open, KiB.
    pub rss_open_kib: u64,
}

impl IdleResult {
    /// Bytes of RSS per idle connection.
    pub fn per_conn_bytes(&self) -> f64 {
        (self.rss_open_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0)
            / self.open.max(1) as f64
    }
}

/// The short-connection run through the eBPF path.
#[derive(Debug, Clone)]
pub struct ShortResult {
    /// Connections completed.
    pub ok: u64,
    /// Connections/s over the run.
    pub rate: f64,
    /// Socket-record entries left in the agent's maps afterwards.
    pub sockets_left: usize,
    /// Connection-record entries left afterwards.
    pub conns_left: usize,
    /// Agent RSS samples over the run, KiB (one per second).
    pub rss_kib: Vec<u64>,
}

/// The HTTP/2 pool of the `egress+h2` path's agent, as its `status` shows it after the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRun {
    /// HTTP/2 connections the agent opened to nghttpx since it started.
    pub connections_opened: u64,
    /// Tunnels (CONNECT streams) it opened on them.
    pub streams_opened: u64,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    /// Every sample, by path and metric.
    pub samples: BTreeMap<(Path, Metric), Vec<Sample>>,
    /// Idle memory by path.
    pub idle: BTreeMap<Path, IdleResult>,
    /// The 1M-connection run.
    pub short: Option<ShortResult>,
    /// The pooled path's pool over the whole run (checks and measurements).
    pub pool: Option<PoolRun>,
    /// How long the whole run took.
    pub elapsed: Duration,
}

impl Results {
    /// The median sample value for `path` and `metric`.
    pub fn median(&self, path: Path, metric: Metric) -> Option<f64> {
        median(self.samples.get(&(path, metric))?.iter().map(|s| s.value))
    }

    fn median_of(
        &self,
        path: Path,
        metric: Metric,
        f: impl Fn(&Sample) -> Option<f64>,
    ) -> Option<f64> {
        median(self.samples.get(&(path, metric))?.iter().filter_map(f))
    }

    /// Median p50 latency (µs) of the concurrency-1 rate run.
    pub fn p50(&self, path: Path, tls: bool) -> Option<f64> {
        self.median_of(
            path,
            Metric::Rate {
                tls,
                concurrency: 1,
            },
            |s| s.p50_us,
        )
    }

    /// Median p99 latency (µs) of the concurrency-1 rate run.
    pub fn p99(&self, path: Path, tls: bool) -> Option<f64> {
        self.median_of(
            path,
            Metric::Rate {
                tls,
                concurrency: 1,
            },
            |s| s.p99_us,
        )
    }

    /// CPU seconds of the path's intermediaries per GB (10^9 bytes) of bulk body.
    pub fn cpu_per_gb(&self, path: Path, tls: bool) -> Option<f64> {
        self.cpu_per(path, tls, true, 1e9)
    }

    /// CPU seconds of the path's intermediaries per 10,000 connections.
    pub fn cpu_per_10k(&self, path: Path, tls: bool) -> Option<f64> {
        self.cpu_per(path, tls, false, 1e4)
    }

    /// CPU seconds of the path's agent alone per 10,000 connections.
    pub fn agent_cpu_per_10k(&self, path: Path, tls: bool) -> Option<f64> {
        self.cpu_of(path, tls, false, 1e4, |s| s.agent_cpu_s)
    }

    fn cpu_per(&self, path: Path, tls: bool, bulk: bool, per: f64) -> Option<f64> {
        self.cpu_of(path, tls, bulk, per, |s| s.cpu_s)
    }

    fn cpu_of(
        &self,
        path: Path,
        tls: bool,
        bulk: bool,
        per: f64,
        f: impl Fn(&Sample) -> f64,
    ) -> Option<f64> {
        let (mut cpu, mut units) = (0.0, 0.0);
        for ((p, m), samples) in &self.samples {
            if *p == path && m.tls() == tls && matches!(m, Metric::Bulk { .. }) == bulk {
                for s in samples {
                    cpu += f(s);
                    units += s.units;
                }
            }
        }
        (units > 0.0).then(|| cpu / units * per)
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Every path, up at once: namespaces, nginx, dnsmasq, squid, nghttpx, six agents. Fields
/// drop in declaration order: processes first, then cgroups and namespaces.
pub struct Bench {
    agent_egress: Agent,
    agent_pep: Agent,
    agent_nft: Agent,
    /// The agents of [`Path::CONTRACT`], each with one actor and its own certificate.
    contract_agents: BTreeMap<Path, Agent>,
    nghttpx: Nghttpx,
    squid: Squid,
    nginx: Nginx,
    _dns: Dns,
    ca: TestCa,
    _pki: Pki,
    _certs: CertDir,
    cgroup_egress: Cgroup,
    cgroup_pep: Cgroup,
    contract_cgroups: BTreeMap<Path, Cgroup>,
    _policy_dir: tempfile::TempDir,
    actors: BTreeMap<Path, (Netns, Veth)>,
    veth_actor: Netns,
    _worker: Netns,
    upstream: Netns,
    node: Netns,
    profile: Profile,
    bins: Bins,
}

impl Bench {
    /// Builds every path of `profile` and checks that each one delivers correct bytes through
    /// the intermediaries it should (panics, saying which path, otherwise).
    pub fn new(profile: Profile, bins: Bins) -> Bench {
        crate::require_root();
        crate::require_commands(&[
            "squid", "nginx", "nft", "ip", "dnsmasq", "dig", "nsenter", "nghttpx",
        ]);
        let nofile = raise_nofile();
        let mut profile = profile;
        if profile.idle > idle_capacity(nofile) {
            eprintln!(
                "bench: the open-file limit here is {nofile} (raising it needs CAP_SYS_RESOURCE): \
                 {} idle connections instead of {}",
                idle_capacity(nofile),
                profile.idle
            );
            profile.idle = idle_capacity(nofile);
        }
        let net = profile.net;
        let node = Netns::named("bnode");
        let upstream = Netns::named("bup");
        let upstream_link = named_veth(
            "bu",
            &node,
            &upstream,
            &[&format!("10.250.{net}.1/24")],
            &[&format!("10.250.{net}.2/24")],
        );
        upstream.ip(&["route", "add", "default", "via", &format!("10.250.{net}.1")]);
        node.sysctl("net/ipv4/ip_forward", "1");
        widen_ports(&node);
        let up = Ipv4Addr::new(10, 250, net, 2);

        let mut actors = BTreeMap::new();
        for path in Path::ALL {
            if path == Path::NftAgent {
                continue;
            }
            let i = 240 + path.index();
            let ns = Netns::named("bactor");
            let veth = named_veth(
                "ba",
                &node,
                &ns,
                &[&format!("10.{i}.{net}.1/24")],
                &[&format!("10.{i}.{net}.2/24")],
            );
            ns.ip(&["route", "add", "default", "via", &format!("10.{i}.{net}.1")]);
            widen_ports(&ns);
            actors.insert(path, (ns, veth));
        }
        // The nft+agent path: a worker namespace the agent gives a veth actor to.
        let worker = crate::world::worker_behind(&node, "bworker", "bw", net);
        let veth_actor = Netns::named("bvactor");
        widen_ports(&veth_actor);

        let ca = TestCa::new();
        let issued = ca.issue(&[NAME]);
        let (cert, key) = ca.write_issued("web", &issued);
        let nginx = Nginx::start(
            &upstream,
            NginxSpec {
                addr: IpAddr::V4(up),
                cert: &cert,
                key: &key,
                files: &[(SMALL, SMALL_LEN), (BULK, profile.bulk_len)],
                workers: 2,
            },
        );
        // A name in a zone with TTLs, as names out there are: with dnsmasq's defaults (TTL 0,
        // REFUSED for AAAA) the agent's resolver would ask twice for every connection.
        let uplink_if = upstream_link.b_name.clone();
        let dns = Dns::start_zone(
            &upstream,
            IpAddr::V4(up),
            &[(NAME, IpAddr::V4(up))],
            "egress.test",
            &uplink_if,
            300,
        );

        // One squid: the PEP of agent B (127.0.0.1:3128), the explicit proxy (the node's
        // address on that actor's link, :3128) and the intercepting proxy (3129 HTTP, 3130 TLS).
        let squid_issued = ca.issue(&["squid.egress.test"]);
        let (squid_cert, squid_key) = ca.write_issued("squid", &squid_issued);
        // The PEP's certificate (SAN 127.0.0.1) and the actors' CA, as the contract tests have
        // them: squid's mTLS port and nghttpx both require a certificate from that CA.
        let pki = crate::contract::pki();
        let actors_ca = pki.actors_ca.cert_path();
        let intercept_if = actors[&Path::SquidIntercept].1.a_name.clone();
        let mut squid_config = SquidConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 3128)),
            ..SquidConfig::default()
        }
        .host(NAME, IpAddr::V4(up));
        squid_config.extra = vec![
            "http_port 3129 intercept".into(),
            format!(
                "https_port 3130 intercept ssl-bump tls-cert={} tls-key={} generate-host-certificates=off",
                squid_cert.display(),
                squid_key.display()
            ),
            "acl step1 at_step SslBump1".into(),
            "ssl_bump peek step1".into(),
            "ssl_bump splice all".into(),
            "on_unsupported_protocol tunnel all".into(),
            "max_filedescriptors 65536".into(),
            // What `SquidConfig::tls(..).client_ca(..)` writes: clientca= makes squid require
            // and verify the client's certificate.
            format!(
                "https_port {SQUID_MTLS} tls-cert={} tls-key={} clientca={} tls-cafile={}",
                pki.pep_cert.display(),
                pki.pep_key.display(),
                actors_ca.display(),
                actors_ca.display()
            ),
        ];
        let squid = Squid::start(&node, squid_config);
        let nghttpx_addr: SocketAddr = NGHTTPX.parse().expect("nghttpx address");
        let squid_plain = SocketAddr::from(([127, 0, 0, 1], 3128));
        let nghttpx = Nghttpx::start(
            &node,
            NghttpxConfig::new(nghttpx_addr, squid_plain, &pki.pep_cert, &pki.pep_key)
                .client_ca(&actors_ca),
        );
        nft(
            &node,
            &format!(
                "table ip egress_bench {{
                    chain pre {{
                        type nat hook prerouting priority dstnat; policy accept;
                        iifname \"{intercept_if}\" tcp dport 80 redirect to :3129
                        iifname \"{intercept_if}\" tcp dport 443 redirect to :3130
                    }}
                }}
                table ip egress_bench_raw {{
                    chain pre {{
                        type filter hook prerouting priority raw; policy accept;
                        iifname != \"{intercept_if}\" notrack
                    }}
                    chain out {{
                        type filter hook output priority raw; policy accept;
                        oifname != \"{intercept_if}\" notrack
                    }}
                }}"
            ),
        );

        let policy_dir = tempfile::tempdir().expect("policy dir");
        let policy = policy_dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[template]]\nname = \"bench\"\nallow = [ {{ host = \"{NAME}\", ports = [80, 443] }} ]\n"
            ),
        )
        .expect("write policy");
        let dns_upstream = SocketAddr::new(IpAddr::V4(up), 53);
        let cgroup_egress = Cgroup::new();
        let cgroup_pep = Cgroup::new();
        let options = |pep: String| {
            let mut o = AgentOptions::new(pep);
            o.dns_upstream = dns_upstream;
            o.extra_args = profile.agent_args.clone();
            // Three agents share the node namespace: one admin port is not enough.
            o.env.push(("EGRESS_ADMIN_LISTEN".into(), "off".into()));
            o
        };
        let start = |opts: AgentOptions| {
            let mut a = Agent::start_with_bin(&bins.agent, &node, None, opts);
            a.wait_ready(T);
            a
        };
        let mut o = options(String::new()).actor(
            ActorSpec::new("bench-egress", "bench", "bench", &cgroup_egress)
                .netns(&actors[&Path::Egress].0),
        );
        o.policy = Some(policy.clone());
        let agent_egress = start(o);
        let o = options("127.0.0.1:3128".into()).actor(
            ActorSpec::new("bench-pep", "bench", "bench", &cgroup_pep)
                .netns(&actors[&Path::EgressPep].0),
        );
        let agent_pep = start(o);
        let mut o = options(String::new()).veth_actor(VethActorSpec::new(
            "bench-nft",
            "bench",
            "bench",
            &veth_actor,
            &worker,
        ));
        o.policy = Some(policy.clone());
        let agent_nft = start(o);

        // The contract paths: one actor each, its certificate written where the agent's
        // `files` source reads it, the `headers` profile over mTLS.
        let certs = CertDir::new();
        let mut contract_agents = BTreeMap::new();
        let mut contract_cgroups = BTreeMap::new();
        for path in Path::CONTRACT {
            let (pep, http) = match path {
                Path::EgressMtls => (SQUID_MTLS, "1.1"),
                Path::EgressH2 => (NGHTTPX, "2"),
                _ => (NGHTTPX, "1.1"),
            };
            let id = contract_actor(path);
            certs.write(&id, &client_cert(&pki.actors_ca, &id));
            let cgroup = Cgroup::new();
            let mut o = options(pep.into())
                .actor(ActorSpec::new(&id, "bench", "bench", &cgroup).netns(&actors[&path].0));
            o.config_extra = pep_toml(
                "headers",
                http,
                &pki.pep_ca.cert_path(),
                &files_source(certs.path()),
            );
            let agent = start(o);
            wait_for_certificate(&agent, &id);
            contract_agents.insert(path, agent);
            contract_cgroups.insert(path, cgroup);
        }

        let bench = Bench {
            agent_egress,
            agent_pep,
            agent_nft,
            contract_agents,
            nghttpx,
            squid,
            nginx,
            _dns: dns,
            ca,
            _pki: pki,
            _certs: certs,
            cgroup_egress,
            cgroup_pep,
            contract_cgroups,
            _policy_dir: policy_dir,
            actors,
            veth_actor,
            _worker: worker,
            upstream,
            node,
            profile,
            bins,
        };
        bench.check_paths();
        bench
    }

    fn paths(&self) -> Vec<Path> {
        Path::ALL
            .into_iter()
            .filter(|p| *p == Path::Direct || self.profile.paths.contains(p))
            .collect()
    }

    fn upstream_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.profile.net, 2)
    }

    /// Where the path's connections reach nginx from.
    fn expected_client(&self, path: Path) -> IpAddr {
        match path {
            Path::Direct => IpAddr::V4(Ipv4Addr::new(10, 240 + path.index(), self.profile.net, 2)),
            // The agents and squid dial from the node's uplink address.
            _ => IpAddr::V4(Ipv4Addr::new(10, 250, self.profile.net, 1)),
        }
    }

    /// Runs a little of everything through each path with every byte checked, and checks
    /// that the bytes came the way the path says: from the right address, through the
    /// intermediaries that should have seen them. A bench that measured a path other than the
    /// one it names would be worse than none.
    fn check_paths(&self) {
        for path in self.paths() {
            // nginx and squid log a request when it ends, and a bulk request cut at the
            // deadline ends when they see the close: wait for the previous path's lines.
            let (before_nginx, before_squid, before_nghttpx) = self.settled_logs();
            let before_agent = self.path_agent(path).map(|a| a.connection_lines().len());
            let mut requests = 0;
            for tls in [false, true] {
                let out = self.load(
                    path,
                    tls,
                    &[
                        "rate",
                        "--path",
                        "/small",
                        "--concurrency",
                        "2",
                        "--count",
                        "6",
                        "--verify",
                    ],
                );
                expect_clean(path, "check (rate)", &out);
                requests += 6;
                let out = self.load(
                    path,
                    tls,
                    &[
                        "bulk",
                        "--path",
                        "/bulk",
                        "--streams",
                        "1",
                        "--seconds",
                        "0.2",
                        "--verify",
                    ],
                );
                expect_clean(path, "check (bulk)", &out);
                requests += out["requests"].as_u64().unwrap_or(0) + 1;
            }
            let (after, squid_after, _) = self.settled_logs();
            let from = |m: &BTreeMap<IpAddr, u64>, ip| m.get(&ip).copied().unwrap_or(0);
            let client = self.expected_client(path);
            let got = from(&after, client) - from(&before_nginx, client);
            let total: u64 = after.values().sum::<u64>() - before_nginx.values().sum::<u64>();
            assert!(
                got >= 12 && got == total,
                "path {}: nginx saw {got} requests from {client} (expected the path's {requests} or so, \
                 and none from elsewhere, saw {total} in all): the path is not what it claims",
                path.name()
            );
            if let Some(before) = before_agent {
                let after = self
                    .path_agent(path)
                    .map(|a| a.connection_lines().len())
                    .unwrap_or(0);
                assert!(
                    after >= before + 12,
                    "path {}: the agent logged {} connections for 12+ made",
                    path.name(),
                    after - before
                );
            }
            let squid_seen = squid_after - before_squid;
            let via_squid = matches!(
                path,
                Path::EgressPep | Path::SquidExplicit | Path::SquidIntercept
            ) || Path::CONTRACT.contains(&path);
            assert!(
                if via_squid {
                    squid_seen >= 4
                } else {
                    squid_seen == 0
                },
                "path {}: squid logged {squid_seen} requests",
                path.name()
            );
            if Path::CONTRACT.contains(&path) {
                self.check_contract_path(path, before_squid, before_nghttpx);
            }
        }
    }

    /// The PEP of a contract path saw what the path names: every tunnel under the actor's
    /// certificate; through nghttpx, HTTP/2 streams sharing a connection (`egress+h2`) or
    /// HTTP/1.1 with a TLS connection per tunnel (`egress+nghttpx-h1`). Without this the
    /// pooling figure could compare two paths that both pooled, or neither.
    fn check_contract_path(&self, path: Path, squid_from: usize, nghttpx_from: usize) {
        let cn = format!("CN={}", contract_actor(path));
        if path == Path::EgressMtls {
            let entries: Vec<_> = self
                .squid
                .access_log_entries()
                .into_iter()
                .skip(squid_from)
                .filter(|e| e.method == "CONNECT")
                .collect();
            assert!(
                entries.len() >= 12
                    && entries.iter().all(|e| e
                        .client_cert_subject
                        .as_deref()
                        .is_some_and(|s| s.contains(&cn))),
                "path {}: squid's CONNECTs should all carry {cn}: {entries:#?}",
                path.name()
            );
            return;
        }
        let entries: Vec<_> = self
            .nghttpx
            .access_log_entries()
            .into_iter()
            .skip(nghttpx_from)
            .collect();
        let alpn = if path == Path::EgressH2 {
            "h2"
        } else {
            "http/1.1"
        };
        assert!(
            entries.len() >= 12
                && entries.iter().all(|e| e.method == "CONNECT"
                    && e.alpn.as_deref() == Some(alpn)
                    && e.client_subject.as_deref().is_some_and(|s| s.contains(&cn))),
            "path {}: nghttpx's tunnels should all be {alpn} CONNECTs under {cn}: {entries:#?}",
            path.name()
        );
        let ports: std::collections::BTreeSet<u16> =
            entries.iter().map(|e| e.remote_port).collect();
        let pooled = ports.len() <= egress_agent::tunnel::h2::MAX_CONNECTIONS_PER_KEY
            && ports.len() < entries.len();
        assert!(
            if path == Path::EgressH2 {
                pooled
            } else {
                ports.len() == entries.len()
            },
            "path {}: {} tunnels on {} connections to nghttpx (HTTP/2 pools them, HTTP/1.1 \
             opens one each): {entries:#?}",
            path.name(),
            entries.len(),
            ports.len()
        );
    }

    /// nginx's requests by client, squid's line count and nghttpx's entry count, once none has
    /// changed for half a second (at most 10 s): a polled wait, not a fixed sleep.
    fn settled_logs(&self) -> (BTreeMap<IpAddr, u64>, usize, usize) {
        let read = || {
            (
                self.nginx.requests_by_client(),
                squid_lines(&self.squid),
                self.nghttpx.access_log_entries().len(),
            )
        };
        let mut last = read();
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = read();
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        last
    }

    fn path_agent(&self, path: Path) -> Option<&Agent> {
        match path {
            Path::Egress => Some(&self.agent_egress),
            Path::EgressPep => Some(&self.agent_pep),
            Path::NftAgent => Some(&self.agent_nft),
            Path::EgressMtls | Path::EgressH2 | Path::EgressNghttpxH1 => {
                self.contract_agents.get(&path)
            }
            Path::Direct | Path::SquidExplicit | Path::SquidIntercept => None,
        }
    }

    /// The processes whose CPU counts for `path`.
    fn intermediaries(&self, path: Path) -> Vec<u32> {
        match path {
            Path::Direct => vec![],
            Path::Egress => vec![self.agent_egress.pid()],
            Path::EgressPep => vec![self.agent_pep.pid(), self.squid.pid()],
            Path::SquidExplicit | Path::SquidIntercept => vec![self.squid.pid()],
            Path::NftAgent => vec![self.agent_nft.pid()],
            Path::EgressMtls => vec![self.contract_agent(path).pid(), self.squid.pid()],
            Path::EgressH2 | Path::EgressNghttpxH1 => vec![
                self.contract_agent(path).pid(),
                self.nghttpx.pid(),
                self.squid.pid(),
            ],
        }
    }

    fn contract_agent(&self, path: Path) -> &Agent {
        self.contract_agents
            .get(&path)
            .unwrap_or_else(|| panic!("path {} has no agent", path.name()))
    }

    /// The `egress+h2` agent's pool counters, from `egress-agent status --json`.
    fn pool_run(&self) -> PoolRun {
        let s = agent_status(self.contract_agent(Path::EgressH2));
        let pool = &s["pools"][0];
        PoolRun {
            connections_opened: pool["connections_opened_total"].as_u64().unwrap_or(0),
            streams_opened: pool["streams_opened_total"].as_u64().unwrap_or(0),
        }
    }

    /// The load generator placed in `path`'s actor namespace (and cgroup), aimed at the
    /// upstream (or, for the explicit proxy, at squid).
    fn load_command(&self, path: Path, tls: bool, args: &[&str]) -> Command {
        let (netns, cgroup) = match path {
            Path::NftAgent => (&self.veth_actor, None),
            Path::Egress => (&self.actors[&path].0, Some(&self.cgroup_egress)),
            Path::EgressPep => (&self.actors[&path].0, Some(&self.cgroup_pep)),
            _ => (&self.actors[&path].0, self.contract_cgroups.get(&path)),
        };
        let mut cmd = crate::process::command_in(&self.bins.load, Some(netns), cgroup);
        let port = if tls { 443 } else { 80 };
        cmd.arg(args[0])
            .arg("--target")
            .arg(SocketAddr::new(IpAddr::V4(self.upstream_v4()), port).to_string())
            .arg("--host")
            .arg(NAME);
        if tls {
            cmd.arg("--tls").arg("--ca").arg(self.ca.cert_path());
        }
        if path == Path::SquidExplicit {
            let node_side = Ipv4Addr::new(10, 240 + path.index(), self.profile.net, 1);
            cmd.arg("--proxy").arg(format!("{node_side}:3128"));
        }
        cmd.args(&args[1..]);
        cmd
    }

    fn load(&self, path: Path, tls: bool, args: &[&str]) -> Value {
        check_interrupted();
        let mut cmd = self.load_command(path, tls, args);
        let out = crate::process::run(&mut cmd, Duration::from_secs(900));
        if !out.success() {
            panic!("egress-load on path {}: {}", path.name(), out.describe());
        }
        let line = out.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "egress-load on path {} printed no JSON ({e}): {}",
                path.name(),
                out.describe()
            )
        })
    }

    /// Runs the whole profile and returns what it measured; `progress` gets a line per step.
    pub fn run(&self, progress: &mut dyn FnMut(&str)) -> Results {
        let started = Instant::now();
        let mut results = Results::default();
        let paths = self.paths();
        let secs = format!("{}", self.profile.seconds);
        // Idle memory first, while every process is as fresh as a deployed one (only the
        // checks have run through it): after bulk runs, freed heap would be reused by the new
        // connections and hide their cost. Squid's path before `egress+pep`, which also
        // goes through squid.
        if self.profile.idle > 0 {
            for path in [
                Path::SquidIntercept,
                Path::Egress,
                Path::EgressPep,
                Path::NftAgent,
            ] {
                if !paths.contains(&path) {
                    continue;
                }
                let idle = self.idle(path);
                progress(&format!(
                    "idle {:<15} {} connections: RSS {} -> {} KiB, {:.0} B per connection",
                    path.name(),
                    idle.open,
                    idle.rss_before_kib,
                    idle.rss_open_kib,
                    idle.per_conn_bytes()
                ));
                results.idle.insert(path, idle);
            }
        }
        for rep in 0..self.profile.reps {
            for metric in &self.profile.metrics {
                // Start each repetition at another path, so no path always runs first.
                for k in 0..paths.len() {
                    let path = paths[(k + rep) % paths.len()];
                    let sample = self.measure(path, *metric, &secs);
                    progress(&format!(
                        "rep {}/{} {:<16} {:<15} {:>10.2} {}{}",
                        rep + 1,
                        self.profile.reps,
                        metric.name(),
                        path.name(),
                        sample.value,
                        metric.unit(),
                        sample
                            .p50_us
                            .map(|p| format!("  p50 {p:.0} µs"))
                            .unwrap_or_default()
                    ));
                    results
                        .samples
                        .entry((path, *metric))
                        .or_default()
                        .push(sample);
                }
            }
        }
        if self.profile.short > 0 && paths.contains(&Path::Egress) {
            let short = self.short(progress);
            progress(&format!(
                "short: {} connections at {:.0}/s; map entries left: sockets {} conns {}",
                short.ok, short.rate, short.sockets_left, short.conns_left
            ));
            results.short = Some(short);
        }
        if paths.contains(&Path::EgressH2) {
            let pool = self.pool_run();
            progress(&format!(
                "egress+h2: {} tunnels on {} pooled HTTP/2 connections",
                pool.streams_opened, pool.connections_opened
            ));
            results.pool = Some(pool);
        }
        results.elapsed = started.elapsed();
        results
    }

    fn measure(&self, path: Path, metric: Metric, secs: &str) -> Sample {
        let pids = self.intermediaries(path);
        let verify = self.profile.verify;
        let (tls, args): (bool, Vec<String>) = match metric {
            Metric::Bulk { tls, streams } => (
                tls,
                [
                    "bulk",
                    "--path",
                    "/bulk",
                    "--streams",
                    &streams.to_string(),
                    "--seconds",
                    secs,
                ]
                .map(String::from)
                .to_vec(),
            ),
            Metric::Rate { tls, concurrency } => (
                tls,
                [
                    "rate",
                    "--path",
                    "/small",
                    "--concurrency",
                    &concurrency.to_string(),
                    "--seconds",
                    secs,
                    "--threads",
                    if concurrency > 1 { "2" } else { "1" },
                ]
                .map(String::from)
                .to_vec(),
            ),
        };
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        if verify {
            args.push("--verify");
        }
        let agent: Vec<u32> = self.path_agent(path).map(Agent::pid).into_iter().collect();
        let (cpu_before, agent_before) = (cpu_seconds(&pids), cpu_seconds(&agent));
        let out = self.load(path, tls, &args);
        let cpu_s = cpu_seconds(&pids) - cpu_before;
        let agent_cpu_s = cpu_seconds(&agent) - agent_before;
        expect_clean(path, &metric.name(), &out);
        let seconds = out["seconds"].as_f64().unwrap_or(f64::NAN);
        match metric {
            Metric::Bulk { streams, .. } => {
                let bytes = out["bytes"].as_f64().unwrap_or(0.0);
                // A stream that stalls is cut by the deadline like one still busy: with every
                // byte checked (the short run), each stream must also have finished a response.
                let requests = out["requests"].as_u64().unwrap_or(0);
                if verify && requests < u64::from(streams) {
                    panic!(
                        "path {} {}: {requests} complete responses on {streams} streams: a stream \
                         stalled ({out})",
                        path.name(),
                        metric.name()
                    );
                }
                Sample {
                    value: bytes * 8.0 / seconds / 1e9,
                    units: bytes,
                    cpu_s,
                    agent_cpu_s,
                    ..Sample::default()
                }
            }
            Metric::Rate { .. } => Sample {
                value: out["ops_per_sec"].as_f64().unwrap_or(f64::NAN),
                units: out["ok"].as_f64().unwrap_or(0.0),
                p50_us: out["latency_us"]["p50"].as_f64(),
                p99_us: out["latency_us"]["p99"].as_f64(),
                cpu_s,
                agent_cpu_s,
            },
        }
    }

    /// Holds `profile.idle` keep-alive connections open through `path` (each after one small
    /// request) and reads the RSS of the path's main intermediary before and while they are open.
    fn idle(&self, path: Path) -> IdleResult {
        check_interrupted();
        let pid = self.intermediaries(path)[0];
        settle();
        let before = rss_kib(pid);
        let count = self.profile.idle.to_string();
        let mut cmd = self.load_command(
            path,
            false,
            &[
                "idle",
                "--path",
                "/small",
                "--count",
                &count,
                "--concurrency",
                "64",
            ],
        );
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn egress-load idle: {e}"));
        let stdout = child.stdout.take().expect("idle stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let out: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        if read.is_err() || out.is_null() {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "egress-load idle on path {} printed no JSON ({status:?}): {line}",
                path.name()
            );
        }
        expect_clean(path, "idle", &out);
        settle();
        let open_rss = rss_kib(pid);
        drop(child.stdin.take());
        if crate::process::wait_timeout(&mut child, Duration::from_secs(60)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        IdleResult {
            open: out["open"].as_u64().unwrap_or(0),
            rss_before_kib: before,
            rss_open_kib: open_rss,
        }
    }

    /// `profile.short` short plain-HTTP connections through the eBPF path at concurrency 64,
    /// the agent's RSS sampled each second; then the agent's maps are read.
    fn short(&self, progress: &mut dyn FnMut(&str)) -> ShortResult {
        let pid = self.agent_egress.pid();
        let count = self.profile.short.to_string();
        let mut args = vec![
            "rate",
            "--path",
            "/small",
            "--concurrency",
            "64",
            "--count",
            &count,
            "--threads",
            "2",
        ];
        if self.profile.verify {
            args.push("--verify");
        }
        let mut cmd = self.load_command(Path::Egress, false, &args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn egress-load short: {e}"));
        let stdout = child.stdout.take().expect("short stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
            s
        });
        let mut rss = vec![rss_kib(pid)];
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut last_report = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None)
                    if Instant::now() < deadline
                        && !INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => {}
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    check_interrupted();
                    panic!("egress-load short did not finish in time");
                }
            }
            std::thread::sleep(Duration::from_millis(1000));
            rss.push(rss_kib(pid));
            if last_report.elapsed() > Duration::from_secs(15) {
                progress(&format!(
                    "short: running, agent RSS {} KiB",
                    rss[rss.len() - 1]
                ));
                last_report = Instant::now();
            }
        }
        let stdout = reader.join().unwrap_or_default();
        let out: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("egress-load short printed no JSON ({e}): {stdout}"));
        expect_clean(Path::Egress, "short", &out);
        // The last closes reach the kernel's release hooks a moment after the client returns.
        let dir = self.agent_egress.bpffs_dir().to_path_buf();
        let mut stats = egress_agent::ebpf::map_stats(&dir).expect("read the agent's maps");
        for _ in 0..50 {
            if stats.sockets == 0 && stats.conns == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            stats = egress_agent::ebpf::map_stats(&dir).expect("read the agent's maps");
        }
        rss.push(rss_kib(pid));
        ShortResult {
            ok: out["ok"].as_u64().unwrap_or(0),
            rate: out["ops_per_sec"].as_f64().unwrap_or(f64::NAN),
            sockets_left: stats.sockets,
            conns_left: stats.conns,
            rss_kib: rss,
        }
    }

    /// Versions of the peers and the kernel, for the report.
    pub fn versions(&self) -> BTreeMap<&'static str, String> {
        let first_line = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .map(|o| {
                    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                    s.push_str(&String::from_utf8_lossy(&o.stderr));
                    s.lines().next().unwrap_or_default().trim().to_string()
                })
                .unwrap_or_default()
        };
        let mut v = BTreeMap::new();
        v.insert("kernel", first_line(Command::new("uname").arg("-r")));
        v.insert("squid", first_line(Command::new("squid").arg("-v")));
        v.insert("nginx", first_line(Command::new("nginx").arg("-v")));
        v.insert(
            "nghttpx",
            first_line(Command::new("nghttpx").arg("--version")),
        );
        v.insert(
            "agent",
            first_line(Command::new(&self.bins.agent).arg("--version")),
        );
        v.insert(
            "cpu",
            std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or_default()
                .trim()
                .to_string(),
        );
        v.insert(
            "cores",
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        );
        v
    }

    /// The namespaces and processes, for an operator looking at a run in progress.
    pub fn describe(&self) -> String {
        let contract: Vec<String> = self
            .contract_agents
            .values()
            .map(|a| a.pid().to_string())
            .collect();
        format!(
            "node {} upstream {} (nginx pid {}) squid pid {} nghttpx pid {} agents {} {} {} {}",
            self.node.name(),
            self.upstream.name(),
            self.nginx.pid(),
            self.squid.pid(),
            self.nghttpx.pid(),
            self.agent_egress.pid(),
            self.agent_pep.pid(),
            self.agent_nft.pid(),
            contract.join(" ")
        )
    }
}

/// Every proxy here dials the upstream from the node's one address, to one address and port:
/// the default ephemeral range (32768-60999) is 28,232 ports, and a run of 9,500 idle tunnels
/// that the client closes leaves 9,500 sockets in TIME_WAIT for a minute on the node, so the
/// third path's idle run would run out of ports. A wider range, and TIME_WAIT reuse for
/// outgoing connections, as a busy node would have.
fn widen_ports(netns: &Netns) {
    netns.sysctl("net/ipv4/ip_local_port_range", "1024 65000");
    netns.sysctl("net/ipv4/tcp_tw_reuse", "1");
}

fn expect_clean(path: Path, what: &str, out: &Value) {
    let errors = out["errors"].as_u64().unwrap_or(u64::MAX);
    if errors != 0 {
        panic!(
            "path {} {what}: {errors} errors, first: {} ({out})",
            path.name(),
            out["first_error"]
        );
    }
}

/// The actor of a contract path: its id and its certificate's CN.
fn contract_actor(path: Path) -> String {
    format!("bench-{}", path.name().trim_start_matches("egress+"))
}

/// `egress-agent status --json` of `agent`.
fn agent_status(agent: &Agent) -> Value {
    let out = agent.control(&["status", "--json"]);
    out.expect_success("egress-agent status --json");
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("egress-agent status printed no JSON ({e}): {}", out.stdout))
}

/// Waits until `agent` shows a certificate for `actor` (its `files` source has read it): until
/// then the actor's connections are reset (`no_certificate`), and the checks would fail.
fn wait_for_certificate(agent: &Agent, actor: &str) {
    let cn = format!("CN={actor}");
    let deadline = Instant::now() + T;
    loop {
        let s = agent_status(agent);
        let found = s["actor_certs"].as_array().is_some_and(|certs| {
            certs.iter().any(|c| {
                c["actor"] == actor && c["subject"].as_str().is_some_and(|s| s.contains(&cn))
            })
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never loaded {actor}'s certificate ({cn}): {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn squid_lines(squid: &Squid) -> usize {
    std::fs::read_to_string(squid.access_log_path())
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn nft(netns: &Netns, ruleset: &str) {
    let out = crate::process::run_with_input(
        netns.command("nft").arg("-f").arg("-"),
        ruleset.as_bytes(),
        T,
    );
    out.expect_success("nft -f in the bench's node namespace");
}

/// Lets freed memory and closing sockets settle before a reading.
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// utime + stime of `pids`, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces) start at the last ')'.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // rest starts at field 3 (state): utime is field 14, stime 15.
            let at = |i: usize| {
                f.get(i - 3)
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (at(14) + at(15)) / ticks
        })
        .sum()
}

/// VmRSS of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft open-file limit to the hard one (children inherit it) and
/// returns it: 10,000 idle connections through a proxy are 20,000 descriptors in the proxy.
/// Raising the hard limit itself needs CAP_SYS_RESOURCE, which some machines (containers,
/// this project's CI VM) do not give root.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    // The kernel's usual ceiling first (hard limit included); then as far as the hard limit.
    const WANT: u64 = 1 << 20;
    if crate::load::raise_nofile(WANT).is_ok() {
        return WANT;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    match crate::load::raise_nofile(hard) {
        Ok(()) => hard,
        Err(_) => soft,
    }
}

/// How many idle connections fit in `nofile` descriptors when a proxy holds two per
/// connection, with room for everything else it has open.
pub fn idle_capacity(nofile: u64) -> usize {
    (nofile.saturating_sub(1_000) / 2) as usize
}

/// The ratio `a / b`, if both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// One target of issue 6 and how this run did against it.
#[derive(Debug, Clone)]
pub struct Target {
    /// What is asked.
    pub what: String,
    /// The measured figure.
    pub measured: Option<f64>,
    /// The bound.
    pub bound: f64,
    /// `true`: measured must be >= bound; `false`: <=.
    pub at_least: bool,
}

impl Target {
    /// Met, not met, or not measured.
    pub fn verdict(&self) -> &'static str {
        match self.measured {
            None => "not measured",
            Some(m)
                if (self.at_least && m >= self.bound) || (!self.at_least && m <= self.bound) =>
            {
                "met"
            }
            Some(_) => "NOT met",
        }
    }
}

/// The performance targets, evaluated on `r`.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let mut push = |what: String, measured: Option<f64>, bound: f64, at_least: bool| {
        t.push(Target {
            what,
            measured,
            bound,
            at_least,
        })
    };
    for metric in Metric::ALL {
        let Metric::Bulk { .. } = metric else {
            continue;
        };
        let e = r.median(Path::Egress, metric);
        push(
            format!("egress {} x direct >= 0.90", metric.name()),
            ratio(e, r.median(Path::Direct, metric)),
            0.90,
            true,
        );
        push(
            format!("egress {} x squid-intercept >= 2", metric.name()),
            ratio(e, r.median(Path::SquidIntercept, metric)),
            2.0,
            true,
        );
    }
    push(
        "egress added p50 connect-to-first-byte, plain HTTP (µs) <= 100".into(),
        match (r.p50(Path::Egress, false), r.p50(Path::Direct, false)) {
            (Some(e), Some(d)) => Some(e - d),
            _ => None,
        },
        100.0,
        false,
    );
    for tls in [true, false] {
        for concurrency in [4, 64] {
            let metric = Metric::Rate { tls, concurrency };
            let e = r.median(Path::Egress, metric);
            let bound = if tls { 0.80 } else { 0.50 };
            push(
                format!("egress {} x direct >= {bound:.2}", metric.name()),
                ratio(e, r.median(Path::Direct, metric)),
                bound,
                true,
            );
            push(
                format!("egress {} x squid-intercept >= 1.5", metric.name()),
                ratio(e, r.median(Path::SquidIntercept, metric)),
                1.5,
                true,
            );
        }
    }
    push(
        "egress RSS per idle tunnelled connection (KiB) <= 16".into(),
        r.idle
            .get(&Path::Egress)
            .map(|i| i.per_conn_bytes() / 1024.0),
        16.0,
        false,
    );
    if let Some(s) = &r.short {
        push(
            format!("map entries left after {} connections == 0", s.ok),
            Some((s.sockets_left + s.conns_left) as f64),
            0.0,
            false,
        );
        let settled = s.rss_kib.get(s.rss_kib.len() / 10).copied().unwrap_or(0);
        let end = s.rss_kib.last().copied().unwrap_or(0);
        push(
            "agent RSS end / RSS at 10% of the short run <= 1.10 (flat)".into(),
            ratio(Some(end as f64), Some(settled as f64)),
            1.10,
            false,
        );
    }
    t
}

/// The paths of the HTTP/2 pooling figure, in its columns' order: (a) HTTP/1.1 over mTLS to
/// squid, (b) HTTP/2 pooled through nghttpx, (c) HTTP/1.1 over mTLS through the same nghttpx,
/// and plain TCP to squid for scale.
pub const POOLING_PATHS: [Path; 4] = [
    Path::EgressMtls,
    Path::EgressH2,
    Path::EgressNghttpxH1,
    Path::EgressPep,
];

/// One row of the HTTP/2 pooling figure: one figure on each of [`POOLING_PATHS`].
#[derive(Debug, Clone)]
pub struct PoolingRow {
    /// What the row measures, with its unit.
    pub what: String,
    /// The figure on each of [`POOLING_PATHS`], in that order.
    pub values: [Option<f64>; 4],
}

impl PoolingRow {
    /// (b) / (a): HTTP/2 pooled against HTTP/1.1 mTLS to squid (the figure issue 8 asks for).
    pub fn h2_vs_mtls(&self) -> Option<f64> {
        ratio(self.values[1], self.values[0])
    }

    /// (b) / (c): pooled against a TLS connection per tunnel through the same nghttpx.
    pub fn h2_vs_nghttpx_h1(&self) -> Option<f64> {
        ratio(self.values[1], self.values[2])
    }

    /// (b) / `egress+pep`: against plain TCP to squid, for scale.
    pub fn h2_vs_plain(&self) -> Option<f64> {
        ratio(self.values[1], self.values[3])
    }
}

/// The HTTP/2 pooling figure: what a new actor connection costs on each of
/// [`POOLING_PATHS`]. The first two rows are the setup time the path adds to a new
/// connection (p50 connect-to-first-byte over `direct`'s), plain HTTP then TLS; then the
/// latencies themselves, the connection rates and the CPU per connection. Empty when the run
/// measured neither (a) nor (b).
pub fn pooling(r: &Results) -> Vec<PoolingRow> {
    if !POOLING_PATHS[..2]
        .iter()
        .any(|p| r.samples.keys().any(|(q, _)| q == p))
    {
        return Vec::new();
    }
    let row = |what: String, f: &dyn Fn(Path) -> Option<f64>| PoolingRow {
        what,
        values: POOLING_PATHS.map(f),
    };
    let mut rows = Vec::new();
    for tls in [false, true] {
        let kind = if tls { "TLS" } else { "plain HTTP" };
        rows.push(row(
            format!("setup time per new connection, {kind} (added p50 over direct, µs)"),
            &|p| match (r.p50(p, tls), r.p50(Path::Direct, tls)) {
                (Some(a), Some(d)) => Some(a - d),
                _ => None,
            },
        ));
    }
    for tls in [false, true] {
        let kind = if tls { "TLS" } else { "plain HTTP" };
        rows.push(row(
            format!("connect-to-first-byte p50, {kind} (µs)"),
            &|p| r.p50(p, tls),
        ));
        rows.push(row(
            format!("connect-to-first-byte p99, {kind} (µs)"),
            &|p| r.p99(p, tls),
        ));
    }
    for metric in Metric::ALL {
        if matches!(metric, Metric::Rate { .. }) && r.samples.keys().any(|(_, m)| *m == metric) {
            rows.push(row(format!("{} (conn/s)", metric.name()), &|p| {
                r.median(p, metric)
            }));
        }
    }
    for tls in [false, true] {
        let kind = if tls { "TLS" } else { "plain HTTP" };
        rows.push(row(
            format!("CPU of agent + PEP per 10,000 connections, {kind} (s)"),
            &|p| r.cpu_per_10k(p, tls),
        ));
        rows.push(row(
            format!("CPU of the agent alone per 10,000 connections, {kind} (s)"),
            &|p| r.agent_cpu_per_10k(p, tls),
        ));
    }
    rows
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The results as Markdown tables (printed by the bench and kept in docs/benchmarks.md).
pub fn markdown(r: &Results) -> String {
    let paths: Vec<Path> = Path::ALL
        .into_iter()
        .filter(|p| r.samples.keys().any(|(q, _)| q == p))
        .collect();
    let metrics: Vec<Metric> = Metric::ALL
        .into_iter()
        .filter(|m| r.samples.keys().any(|(_, n)| n == m))
        .collect();
    let mut s = String::new();
    let cell = |path: Path, metric: Metric| {
        let v = r.median(path, metric);
        format!(
            "{} ({} / {})",
            fmt(
                v,
                if matches!(metric, Metric::Bulk { .. }) {
                    2
                } else {
                    0
                }
            ),
            fmt(ratio(v, r.median(Path::Direct, metric)), 2),
            fmt(ratio(v, r.median(Path::SquidIntercept, metric)), 2)
        )
    };
    for (title, bulk) in [
        (
            "Bulk throughput, Gbit/s (× direct / × squid-intercept)",
            true,
        ),
        (
            "New connections per second, `Connection: close` (× direct / × squid-intercept)",
            false,
        ),
    ] {
        let cols: Vec<Metric> = metrics
            .iter()
            .copied()
            .filter(|m| matches!(m, Metric::Bulk { .. }) == bulk)
            .collect();
        if cols.is_empty() {
            continue;
        }
        s.push_str(&format!("**{title}**\n\n| path |"));
        for m in &cols {
            s.push_str(&format!(" {} |", m.name()));
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(cols.len()));
        s.push('\n');
        for &p in &paths {
            s.push_str(&format!("| {} |", p.name()));
            for &m in &cols {
                s.push_str(&format!(" {} |", cell(p, m)));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s.push_str(
        "**Connect-to-first-byte latency at concurrency 1, µs (p50 / p99; added p50 over direct)**\n\n\
         | path | plain HTTP | added | TLS (handshake included) | added |\n|---|---|---|---|---|\n",
    );
    for &p in &paths {
        let added = |tls| match (r.p50(p, tls), r.p50(Path::Direct, tls)) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        s.push_str(&format!(
            "| {} | {} / {} | {} | {} / {} | {} |\n",
            p.name(),
            fmt(r.p50(p, false), 0),
            fmt(r.p99(p, false), 0),
            fmt(added(false), 0),
            fmt(r.p50(p, true), 0),
            fmt(r.p99(p, true), 0),
            fmt(added(true), 0),
        ));
    }
    s.push_str(
        "\n**CPU of the path's intermediaries (agent, squid, nghttpx), seconds per GB and per 10,000 connections**\n\n\
         | path | per GB plain | per GB TLS | per 10k conns plain | per 10k conns TLS |\n|---|---|---|---|---|\n",
    );
    for &p in paths.iter().filter(|p| **p != Path::Direct) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            p.name(),
            fmt(r.cpu_per_gb(p, false), 2),
            fmt(r.cpu_per_gb(p, true), 2),
            fmt(r.cpu_per_10k(p, false), 2),
            fmt(r.cpu_per_10k(p, true), 2),
        ));
    }
    if !r.idle.is_empty() {
        s.push_str(
            "\n**Memory with idle tunnelled connections (RSS of the agent, or of squid)**\n\n\
             | path | connections | RSS before, KiB | RSS with them open, KiB | per connection |\n|---|---|---|---|---|\n",
        );
        for (p, i) in &r.idle {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} KiB |\n",
                p.name(),
                i.open,
                i.rss_before_kib,
                i.rss_open_kib,
                i.per_conn_bytes() / 1024.0
            ));
        }
    }
    if let Some(sh) = &r.short {
        let max = sh.rss_kib.iter().max().copied().unwrap_or(0);
        s.push_str(&format!(
            "\n**{} short connections through the eBPF path** (plain HTTP, concurrency 64): {:.0} conn/s; \
             map entries left: sockets {}, conns {}; agent RSS start {} KiB, at 10% {} KiB, max {} KiB, end {} KiB\n",
            sh.ok,
            sh.rate,
            sh.sockets_left,
            sh.conns_left,
            sh.rss_kib.first().copied().unwrap_or(0),
            sh.rss_kib.get(sh.rss_kib.len() / 10).copied().unwrap_or(0),
            max,
            sh.rss_kib.last().copied().unwrap_or(0),
        ));
    }
    let rows = pooling(r);
    if !rows.is_empty() {
        let digits = |what: &str| if what.starts_with("CPU") { 2 } else { 0 };
        s.push_str(
            "\n**HTTP/2 pooling: setup time per new connection vs HTTP/1.1 mTLS** (`headers` \
             profile, the actor's certificate on every PEP connection). (a) `egress+mtls`: a TLS \
             connection to squid's `https_port` per tunnel; (b) `egress+h2`: a CONNECT stream on \
             the actor's pooled HTTP/2 connection to nghttpx, which opens a plain connection to \
             squid per tunnel; (c) `egress+nghttpx-h1`: a TLS connection per tunnel to the same \
             nghttpx. nghttpx is a hop (a) does not have: (b)/(c) is pooling alone, (b)/(a) \
             includes the hop.\n\n\
             | figure | (a) egress+mtls | (b) egress+h2 | (c) egress+nghttpx-h1 | egress+pep (plain TCP) | (b)/(a) | (b)/(c) | (b)/egress+pep |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for row in &rows {
            let d = digits(&row.what);
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.what,
                fmt(row.values[0], d),
                fmt(row.values[1], d),
                fmt(row.values[2], d),
                fmt(row.values[3], d),
                fmt(row.h2_vs_mtls(), 2),
                fmt(row.h2_vs_nghttpx_h1(), 2),
                fmt(row.h2_vs_plain(), 2),
            ));
        }
        if let Some(pool) = &r.pool {
            s.push_str(&format!(
                "\n`egress+h2`'s agent opened {} HTTP/2 connection(s) to nghttpx for {} tunnels \
                 over the run.\n",
                pool.connections_opened, pool.streams_opened
            ));
        }
    }
    let t = targets(r);
    if !t.is_empty() {
        s.push_str("\n**Targets (issue 6)**\n\n| target | measured | verdict |\n|---|---|---|\n");
        for t in t {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                t.what,
                fmt(t.measured, 2),
                t.verdict()
            ));
        }
    }
    s
}

/// The results as JSON (every sample, the medians, the targets, `meta` as given).
pub fn to_json(r: &Results, meta: Value) -> Value {
    let mut samples = Vec::new();
    for ((p, m), v) in &r.samples {
        samples.push(json!({
            "path": p.name(),
            "metric": m.name(),
            "unit": m.unit(),
            "median": r.median(*p, *m),
            "ratio_direct": ratio(r.median(*p, *m), r.median(Path::Direct, *m)),
            "ratio_squid_intercept": ratio(r.median(*p, *m), r.median(Path::SquidIntercept, *m)),
            "reps": v.iter().map(|s| json!({
                "value": s.value, "units": s.units, "p50_us": s.p50_us, "p99_us": s.p99_us, "cpu_s": s.cpu_s,
                "agent_cpu_s": s.agent_cpu_s,
            })).collect::<Vec<_>>(),
        }));
    }
    let mut paths = serde_json::Map::new();
    for p in Path::ALL {
        if !r.samples.keys().any(|(q, _)| *q == p) {
            continue;
        }
        paths.insert(
            p.name().into(),
            json!({
                "p50_us_plain": r.p50(p, false), "p99_us_plain": r.p99(p, false),
                "p50_us_tls": r.p50(p, true), "p99_us_tls": r.p99(p, true),
                "cpu_s_per_gb_plain": r.cpu_per_gb(p, false), "cpu_s_per_gb_tls": r.cpu_per_gb(p, true),
                "cpu_s_per_10k_conns_plain": r.cpu_per_10k(p, false), "cpu_s_per_10k_conns_tls": r.cpu_per_10k(p, true),
                "idle": r.idle.get(&p).map(|i| json!({
                    "open": i.open, "rss_before_kib": i.rss_before_kib, "rss_open_kib": i.rss_open_kib,
                    "bytes_per_conn": i.per_conn_bytes(),
                })),
            }),
        );
    }
    json!({
        "meta": meta,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "samples": samples,
        "paths": paths,
        "short": r.short.as_ref().map(|s| json!({
            "ok": s.ok, "rate": s.rate, "sockets_left": s.sockets_left, "conns_left": s.conns_left,
            "rss_kib": s.rss_kib,
        })),
        "pooling": {
            "paths": POOLING_PATHS.map(Path::name),
            "rows": pooling(r).iter().map(|row| json!({
                "figure": row.what, "values": row.values,
                "h2_vs_mtls": row.h2_vs_mtls(), "h2_vs_nghttpx_h1": row.h2_vs_nghttpx_h1(),
                "h2_vs_plain_tcp": row.h2_vs_plain(),
            })).collect::<Vec<_>>(),
            "pool": r.pool.as_ref().map(|p| json!({
                "connections_opened": p.connections_opened, "streams_opened": p.streams_opened,
            })),
        },
        "targets": targets(r).iter().map(|t| json!({
            "target": t.what, "measured": t.measured, "bound": t.bound, "verdict": t.verdict(),
        })).collect::<Vec<_>>(),
    })
}

/// Where `cargo xtask bench` keeps its results.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from("target/bench")
}

/// Writes `text` to `path`, creating its directory.
pub fn write_file(path: &FsPath, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_empty() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), Some(2.5));
        assert_eq!(median([f64::NAN].into_iter()), None);
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn names_round_trip() {
        for p in Path::ALL {
            assert_eq!(Path::from_name(p.name()), Some(p));
        }
        assert_eq!(Metric::ALL[0].name(), "bulk-plain-1");
        assert_eq!(Metric::ALL[9].name(), "conn-tls-64");
    }

    #[test]
    fn targets_and_tables_from_samples() {
        let mut r = Results::default();
        let bulk = Metric::Bulk {
            tls: false,
            streams: 1,
        };
        let rate = Metric::Rate {
            tls: false,
            concurrency: 1,
        };
        let s = |value, p50| Sample {
            value,
            units: 1e9,
            p50_us: p50,
            p99_us: p50,
            cpu_s: 0.5,
            agent_cpu_s: 0.25,
        };
        r.samples.insert((Path::Direct, bulk), vec![s(10.0, None)]);
        r.samples.insert(
            (Path::Egress, bulk),
            vec![s(9.5, None), s(9.0, None), s(9.2, None)],
        );
        r.samples
            .insert((Path::SquidIntercept, bulk), vec![s(4.0, None)]);
        r.samples
            .insert((Path::Direct, rate), vec![s(5000.0, Some(100.0))]);
        r.samples
            .insert((Path::Egress, rate), vec![s(4000.0, Some(180.0))]);
        let t = targets(&r);
        let find = |w: &str| t.iter().find(|t| t.what.starts_with(w)).unwrap();
        let direct = find("egress bulk-plain-1 x direct");
        assert!((direct.measured.unwrap() - 0.92).abs() < 1e-9);
        assert_eq!(direct.verdict(), "met");
        assert_eq!(find("egress bulk-plain-1 x squid").verdict(), "met");
        let added = find("egress added p50");
        assert_eq!(added.measured, Some(80.0));
        assert_eq!(added.verdict(), "met");
        assert_eq!(find("egress conn-tls-4 x direct").verdict(), "not measured");
        assert_eq!(r.cpu_per_gb(Path::Egress, false), Some(0.5));
        let md = markdown(&r);
        assert!(md.contains("| egress | 9.20 (0.92 / 2.30) |"), "{md}");
        let j = to_json(&r, json!({}));
        assert_eq!(j["paths"]["egress"]["p50_us_plain"], json!(180.0));
        // No contract path measured: no pooling figure.
        assert!(pooling(&r).is_empty());
        assert!(!md.contains("HTTP/2 pooling"), "{md}");
    }

    #[test]
    fn pooling_figure_is_the_ratio_of_setup_times() {
        let mut r = Results::default();
        let rate = |tls| Metric::Rate {
            tls,
            concurrency: 1,
        };
        let s = |value, p50: f64| Sample {
            value,
            units: 1e4,
            p50_us: Some(p50),
            p99_us: Some(p50 * 2.0),
            cpu_s: 2.0,
            agent_cpu_s: 0.5,
        };
        for (path, plain, tls) in [
            (Path::Direct, 100.0, 1000.0),
            (Path::EgressMtls, 2100.0, 3000.0),
            (Path::EgressH2, 600.0, 1800.0),
            (Path::EgressNghttpxH1, 2600.0, 3400.0),
        ] {
            r.samples
                .insert((path, rate(false)), vec![s(1e6 / plain, plain)]);
            r.samples
                .insert((path, rate(true)), vec![s(1e6 / tls, tls)]);
        }
        r.pool = Some(PoolRun {
            connections_opened: 2,
            streams_opened: 40,
        });
        let rows = pooling(&r);
        // Added over direct: (600 - 100) / (2100 - 100) plain, (1800 - 1000) / (3000 - 1000) TLS.
        assert!(rows[0].what.contains("setup time") && rows[0].what.contains("plain"));
        assert_eq!(rows[0].h2_vs_mtls(), Some(0.25));
        assert_eq!(rows[0].h2_vs_nghttpx_h1(), Some(0.2));
        assert_eq!(rows[0].h2_vs_plain(), None, "egress+pep was not measured");
        assert_eq!(rows[1].h2_vs_mtls(), Some(0.4));
        let agent_cpu = rows
            .iter()
            .find(|r| r.what.starts_with("CPU of the agent alone"))
            .unwrap();
        // 0.5 s over 10,000 connections: 0.5 s per 10k.
        assert_eq!(agent_cpu.values[1], Some(0.5));
        let conn = rows
            .iter()
            .find(|r| r.what.starts_with("conn-plain-1"))
            .unwrap();
        assert!((conn.h2_vs_mtls().unwrap() - 3.5).abs() < 1e-9);
        let md = markdown(&r);
        assert!(
            md.contains("| setup time per new connection, plain HTTP (added p50 over direct, µs) | 2000 | 500 | 2500 | – | 0.25 | 0.20 | – |"),
            "{md}"
        );
        assert!(md.contains("opened 2 HTTP/2 connection(s) to nghttpx for 40 tunnels"));
        let j = to_json(&r, json!({}));
        assert_eq!(j["pooling"]["rows"][0]["h2_vs_mtls"], json!(0.25));
        assert_eq!(j["pooling"]["pool"]["streams_opened"], json!(40));
    }
}
