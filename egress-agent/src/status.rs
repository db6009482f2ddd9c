//! `egress-agent status`: what the running agent is doing, in one answer over the control
//! socket: versions, uptime, the PEP and the policy, readiness, actors, listeners, the
//! programs attached to each actor cgroup (read back from the pinned links) and the map sizes.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    actors,
    ebpf::{self, MapSize, dump::Attachment},
    pep::Pep,
};

/// The agent's whole status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Agent and kernel versions.
    pub version: Version,
    /// Seconds since the agent took over capture.
    pub uptime_seconds: u64,
    /// The bpffs directory of the pins.
    pub bpffs_dir: PathBuf,
    /// The global PEP (`[pep]`); `None`: actors without a PEP of their own decide with the
    /// embedded policy.
    pub pep: Option<PepSummary>,
    /// The named PEPs (`[peps.NAME]`), in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peps: Vec<PepSummary>,
    /// Each actor's client certificate, for PEPs with per-actor certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actor_certs: Vec<ActorCert>,
    /// Each HTTP/2 PEP's pooled connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSummary>,
    /// The policy in force.
    pub policy: PolicySummary,
    /// Whether every actor is served, and what is not.
    pub ready: Readiness,
    /// Every actor, in id order.
    pub actors: Vec<actors::Status>,
    /// Every listener, with the actors it serves.
    pub listeners: Vec<ListenerStatus>,
    /// Per cgroup with pinned links: the programs attached.
    pub attachments: Vec<Attachment>,
    /// Entries and capacity of each pinned map.
    pub maps: Vec<MapSize>,
    /// Why the map sizes could not be read, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maps_error: Option<String>,
    /// Kubernetes discovery (`--discovery kubernetes`), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,
}

/// What discovery knows: the node, whether its first list is applied, every selected pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    /// The node whose pods are watched.
    pub node: String,
    /// The first complete list of pods has been applied.
    pub synced: bool,
    /// Every selected pod on the node, with its state.
    pub pods: Vec<crate::discovery::kube::PodReport>,
}

/// Versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The agent's package version.
    pub agent: String,
    /// `git describe` of the source it was built from, when known at build time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
}

impl Version {
    /// This binary's versions and the running kernel's.
    pub fn current() -> Self {
        Version {
            agent: env!("CARGO_PKG_VERSION").into(),
            git: option_env!("EGRESS_GIT_DESCRIBE")
                .filter(|s| !s.is_empty())
                .map(Into::into),
            kernel: kernel_release(),
        }
    }
}

/// The running kernel's release, or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().chars().take(128).collect())
        .unwrap_or_else(|_| "unknown".into())
}

/// An actor's client certificate for its PEP (never the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorCert {
    /// The PEP's name.
    pub pep: String,
    /// The actor.
    pub actor: String,
    /// The current certificate's subject (none yet: `None`).
    pub subject: Option<String>,
    /// Its serial.
    pub serial: Option<String>,
    /// Its end of validity, RFC 3339.
    pub not_after: Option<String>,
    /// How many times a new certificate replaced the previous one.
    pub renewals: u64,
    /// The last failure to get or load one, cleared by the next success.
    pub last_error: Option<String>,
}

impl ActorCert {
    /// From the store's state of one actor of PEP `pep`.
    pub fn new(pep: &str, c: crate::certs::CertStatus) -> Self {
        ActorCert {
            pep: pep.to_string(),
            actor: c.actor,
            subject: c.subject,
            serial: c.serial,
            not_after: c.not_after.map(crate::certs::rfc3339),
            renewals: c.renewals,
            last_error: c.last_error,
        }
    }
}

/// One HTTP/2 PEP's pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// The PEP's name.
    pub pep: String,
    /// Connections open now.
    pub connections: usize,
    /// Tunnels (streams) open now.
    pub streams: usize,
    /// Connections opened since start.
    pub connections_opened_total: u64,
    /// Tunnels opened since start.
    pub streams_opened_total: u64,
    /// GOAWAYs received since start.
    pub goaways_total: u64,
}

impl PoolSummary {
    /// From the pool's figures.
    pub fn new(pep: &str, s: crate::tunnel::h2::Stats) -> Self {
        PoolSummary {
            pep: pep.to_string(),
            connections: s.connections,
            streams: s.streams,
            connections_opened_total: s.connections_opened_total,
            streams_opened_total: s.streams_opened_total,
            goaways_total: s.goaways_total,
        }
    }
}

/// The PEP link, without its secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepSummary {
    /// `default` or the `[peps.NAME]` name.
    #[serde(default)]
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// `headers` or `substrate`.
    #[serde(default)]
    pub profile: String,
    /// `1.1` or `2`.
    #[serde(default)]
    pub http: String,
    /// Whether each actor presents its own client certificate (and from where: `files`,
    /// `signer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_certs: Option<String>,
    /// Whether the link is TLS.
    pub tls: bool,
    /// The name verified in the PEP's certificate (TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Whether the agent presents a client certificate.
    pub client_cert: bool,
    /// Whether a `Proxy-Authorization` is sent.
    pub proxy_authorization: bool,
    /// Bound on connect + handshake, milliseconds.
    pub connect_timeout_ms: u64,
    /// Bound on the CONNECT answer, milliseconds.
    pub response_timeout_ms: u64,
}

impl PepSummary {
    /// The summary of `pep`.
    pub fn new(pep: &Pep) -> Self {
        PepSummary {
            name: pep.name.clone(),
            address: pep.addr.to_string(),
            profile: pep.profile.as_str().into(),
            http: pep.http.as_str().into(),
            actor_certs: pep
                .tls
                .as_ref()
                .and_then(|t| t.actor_certs.as_ref())
                .map(|c| c.kind().to_string()),
            tls: pep.tls.is_some(),
            tls_server_name: pep
                .tls
                .as_ref()
                .map(|t| t.server_name.to_str().into_owned()),
            client_cert: pep
                .tls
                .as_ref()
                .is_some_and(|t| t.client_cert_file.is_some()),
            proxy_authorization: pep.authorization.is_some(),
            connect_timeout_ms: millis(pep.connect_timeout),
            response_timeout_ms: millis(pep.response_timeout),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// The policy file; `None`: deny all where the agent decides.
    pub file: Option<PathBuf>,
    /// Its entries and defaults, as logged when loaded.
    pub summary: String,
}

/// Readiness: every actor served and captured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// True when `not_ready` is empty.
    pub ready: bool,
    /// What is not ready, one line each.
    pub not_ready: Vec<String>,
}

impl Readiness {
    /// Readiness from the list of problems.
    pub fn from_problems(not_ready: Vec<String>) -> Self {
        Readiness {
            ready: not_ready.is_empty(),
            not_ready,
        }
    }
}

/// One listener of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `ebpf` (cgroup actors) or `nat` (veth actors).
    pub front: String,
    /// Its network namespace's cookie (as the records' keys and `maps` show it).
    pub netns_cookie: u64,
    /// Its addresses.
    pub addresses: Vec<SocketAddr>,
    /// Ids of the actors it serves.
    pub actors: Vec<String>,
}

/// What readiness needs from each actor: a listener, and (cgroup actors) every program
/// attached to its live cgroup.
pub fn actor_problems(actors: &[actors::Status], attachments: &[Attachment]) -> Vec<String> {
    let mut problems = Vec::new();
    for a in actors {
        let id = &a.actor.id;
        if a.listeners.is_empty() {
            problems.push(format!(
                "actor {id}: no listener serves it (its connections are refused; see the log)"
            ));
        }
        if a.capture == "veth" && a.pair.is_none() {
            problems.push(format!("actor {id}: no veth pair"));
        }
        let Some(cgroup_id) = a.cgroup_id else {
            continue;
        };
        match attachments.iter().find(|t| t.cgroup_id == cgroup_id) {
            None => problems.push(format!(
                "actor {id}: no program is attached to its cgroup {cgroup_id}"
            )),
            Some(t) if t.cgroup_exists == Some(false) => {
                problems.push(format!("actor {id}: its cgroup {cgroup_id} is gone"))
            }
            Some(t) if !t.complete() => {
                let mut what: Vec<String> = t.missing.clone();
                what.extend(
                    t.programs
                        .iter()
                        .filter_map(|p| Some(format!("{} ({})", p.name, p.error.as_ref()?))),
                );
                problems.push(format!(
                    "actor {id}: not every program is attached to cgroup {cgroup_id}: {}",
                    what.join(", ")
                ));
            }
            Some(_) => {}
        }
    }
    problems
}

/// The attachments and map sizes under `dir`, with the actor of each cgroup filled in.
pub fn pins(
    dir: &Path,
    actors: &[actors::Status],
) -> (Vec<Attachment>, Vec<MapSize>, Option<String>) {
    let mut attachments = ebpf::dump::attachments(dir);
    for t in &mut attachments {
        t.actor = actors
            .iter()
            .find(|a| a.cgroup_id == Some(t.cgroup_id))
            .map(|a| a.actor.id.clone());
    }
    let (maps, maps_error) = match ebpf::map_sizes(dir) {
        Ok(maps) => (maps, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    (attachments, maps, maps_error)
}

/// Lays `rows` out in columns under `headers`, each line starting with `indent`.
pub fn table(headers: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::from(indent);
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0);
            out.extend(std::iter::repeat_n(
                ' ',
                pad.saturating_sub(cell.chars().count()),
            ));
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Renders the report as text: a few summary lines, then one table per section.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let v = &r.version;
    out.push_str(&format!(
        "agent     {}{}\nkernel    {}\nuptime    {}\nbpffs     {}\n",
        v.agent,
        v.git.as_ref().map_or(String::new(), |g| format!(" ({g})")),
        v.kernel,
        uptime(r.uptime_seconds),
        r.bpffs_dir.display()
    ));
    let pep_line = |p: &PepSummary| {
        format!(
            "{} {} ({}, HTTP/{}, {}{}{}{})",
            p.name,
            p.address,
            if p.profile.is_empty() {
                "headers"
            } else {
                &p.profile
            },
            if p.http.is_empty() { "1.1" } else { &p.http },
            if p.tls { "tls" } else { "plain tcp" },
            if p.client_cert {
                ", client certificate"
            } else {
                ""
            },
            match &p.actor_certs {
                Some(source) => format!(", per-actor certificates from {source}"),
                None => String::new(),
            },
            if p.proxy_authorization {
                ", proxy-authorization"
            } else {
                ""
            }
        )
    };
    out.push_str(&match &r.pep {
        Some(p) => format!("pep       {}\n", pep_line(p)),
        None => "pep       none global: actors without a PEP decide with the embedded policy \
                 and the agent dials\n"
            .into(),
    });
    for p in &r.peps {
        out.push_str(&format!("          {}\n", pep_line(p)));
    }
    for p in &r.pools {
        out.push_str(&format!(
            "          {} HTTP/2: {} connections, {} tunnels open; {} connections and {} tunnels \
             opened, {} GOAWAY\n",
            p.pep,
            p.connections,
            p.streams,
            p.connections_opened_total,
            p.streams_opened_total,
            p.goaways_total
        ));
    }
    out.push_str(&format!("policy    {}\n", r.policy.summary));
    if r.ready.ready {
        out.push_str("ready     yes\n");
    } else {
        out.push_str("ready     no\n");
        for p in &r.ready.not_ready {
            out.push_str(&format!("          - {p}\n"));
        }
    }

    out.push_str(&format!("\nACTORS ({})\n", r.actors.len()));
    let rows: Vec<Vec<String>> = r
        .actors
        .iter()
        .map(|a| {
            let target = match (&a.actor.cgroup, a.cgroup_id, &a.pair) {
                (Some(path), id, _) => {
                    format!("cgroup {} ({})", id.unwrap_or(0), path.display())
                }
                (None, _, Some(p)) => format!("veth {} {}/{}", p.worker_if, p.actor, p.prefix_len),
                _ => "-".into(),
            };
            vec![
                a.actor.id.clone(),
                a.source.as_str().into(),
                a.capture.clone(),
                a.pep.clone(),
                target,
                join(&a.listeners),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID",
            "SOURCE",
            "CAPTURE",
            "PEP",
            "CGROUP / VETH",
            "LISTENERS",
        ],
        &rows,
        "  ",
    ));

    if !r.actor_certs.is_empty() {
        out.push_str(&format!("\nCERTIFICATES ({})\n", r.actor_certs.len()));
        let rows: Vec<Vec<String>> = r
            .actor_certs
            .iter()
            .map(|c| {
                vec![
                    c.actor.clone(),
                    c.pep.clone(),
                    c.subject.clone().unwrap_or_else(|| "-".into()),
                    c.not_after.clone().unwrap_or_else(|| "-".into()),
                    c.renewals.to_string(),
                    c.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ACTOR",
                "PEP",
                "SUBJECT",
                "NOT AFTER",
                "RENEWALS",
                "LAST ERROR",
            ],
            &rows,
            "  ",
        ));
    }

    if let Some(d) = &r.discovery {
        out.push_str(&format!(
            "\nDISCOVERY (node {}, {}; {} pods)\n",
            d.node,
            if d.synced { "synced" } else { "not synced yet" },
            d.pods.len()
        ));
        let rows: Vec<Vec<String>> = d
            .pods
            .iter()
            .map(|p| {
                vec![
                    p.pod.clone(),
                    p.uid.clone(),
                    p.actor.clone(),
                    p.state.as_str().into(),
                    p.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["POD", "UID", "ACTOR", "STATE", "REASON"],
            &rows,
            "  ",
        ));
    }

    out.push_str(&format!("\nLISTENERS ({})\n", r.listeners.len()));
    let rows: Vec<Vec<String>> = r
        .listeners
        .iter()
        .map(|l| {
            vec![
                join(&l.addresses),
                l.netns_cookie.to_string(),
                l.front.clone(),
                l.actors.join(","),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ADDRESSES", "NETNS COOKIE", "FRONT", "ACTORS"],
        &rows,
        "  ",
    ));

    out.push_str(&format!(
        "\nATTACHMENTS ({} cgroups)\n",
        r.attachments.len()
    ));
    let rows: Vec<Vec<String>> = r
        .attachments
        .iter()
        .map(|t| {
            let attached: Vec<&str> = t
                .programs
                .iter()
                .filter(|p| p.error.is_none())
                .filter_map(|p| p.attach_type.as_deref())
                .collect();
            let mut problems: Vec<String> =
                t.missing.iter().map(|m| format!("{m} missing")).collect();
            problems.extend(
                t.programs
                    .iter()
                    .filter_map(|p| Some(format!("{}: {}", p.name, p.error.as_ref()?))),
            );
            vec![
                t.cgroup_id.to_string(),
                t.actor.clone().unwrap_or_else(|| "(none: stale)".into()),
                match t.cgroup_exists {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "?".into(),
                },
                format!("{}/{}", attached.len(), egress_common::PROGRAMS.len()),
                attached.join(","),
                problems.join("; "),
            ]
        })
        .collect();
    out.push_str(&table(
        &["CGROUP", "ACTOR", "EXISTS", "LINKS", "PROGRAMS", "PROBLEMS"],
        &rows,
        "  ",
    ));

    out.push_str(&format!("\nMAPS ({})\n", r.maps.len()));
    if let Some(e) = &r.maps_error {
        out.push_str(&format!("  unreadable: {e}\n"));
    }
    let rows: Vec<Vec<String>> = r
        .maps
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.entries.to_string(),
                m.capacity.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["NAME", "ENTRIES", "CAPACITY"], &rows, "  "));
    out
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `3d 4h 5m 6s`, leading zero units left out.
fn uptime(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m")] {
        if n > 0 || !out.is_empty() {
            out.push_str(&format!("{n}{unit} "));
        }
    }
    out.push_str(&format!("{s}s"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        actors::{Source, Status},
        config::ActorSpec,
        ebpf::dump::AttachedProgram,
    };

    fn status(id: &str, cgroup_id: u64, listeners: &[&str]) -> Status {
        Status {
            actor: ActorSpec {
                id: id.into(),
                template: "coder".into(),
                template_namespace: "team-a".into(),
                cgroup: Some(PathBuf::from(format!("/sys/fs/cgroup/{id}"))),
                netns: None,
                veth: None,
                pep: None,
            },
            source: Source::Config,
            capture: "cgroup".into(),
            pep: "default (default)".into(),
            cgroup_id: Some(cgroup_id),
            pair: None,
            listeners: listeners.iter().map(|l| l.parse().unwrap()).collect(),
            dns: Vec::new(),
            dropped_packets: None,
        }
    }

    fn attached(cgroup_id: u64, exists: bool) -> Attachment {
        Attachment {
            cgroup_id,
            actor: None,
            cgroup_exists: Some(exists),
            programs: egress_common::PROGRAMS
                .iter()
                .enumerate()
                .map(|(i, name)| AttachedProgram {
                    name: name.to_string(),
                    attach_type: Some(format!("hook{i}")),
                    link_id: Some(i as u32),
                    program_id: Some(100 + i as u32),
                    error: (!exists).then(|| "detached: the cgroup is gone".into()),
                })
                .collect(),
            missing: Vec::new(),
        }
    }

    fn report(actors: Vec<Status>, attachments: Vec<Attachment>) -> Report {
        let ready = Readiness::from_problems(actor_problems(&actors, &attachments));
        Report {
            version: Version {
                agent: "0.1.0".into(),
                git: Some("v0.1.0-3-gabc".into()),
                kernel: "6.18.0".into(),
            },
            uptime_seconds: 3725,
            bpffs_dir: "/sys/fs/bpf/egress".into(),
            peps: Vec::new(),
            actor_certs: Vec::new(),
            pools: Vec::new(),
            pep: None,
            policy: PolicySummary {
                file: None,
                summary: "deny all".into(),
            },
            ready,
            listeners: vec![ListenerStatus {
                front: "ebpf".into(),
                netns_cookie: 4097,
                addresses: vec!["127.0.0.1:15001".parse().unwrap()],
                actors: actors.iter().map(|a| a.actor.id.clone()).collect(),
            }],
            actors,
            attachments,
            maps: vec![MapSize {
                name: "EGRESS_ACTORS".into(),
                entries: 1,
                capacity: 4096,
            }],
            maps_error: None,
            discovery: None,
        }
    }

    #[test]
    fn a_served_and_attached_actor_is_ready() {
        let r = report(
            vec![status("a1", 7, &["127.0.0.1:15001"])],
            vec![attached(7, true)],
        );
        assert!(r.ready.ready, "{:?}", r.ready);
        let text = render(&r);
        assert!(text.contains("agent     0.1.0 (v0.1.0-3-gabc)"), "{text}");
        assert!(text.contains("uptime    1h 2m 5s"), "{text}");
        assert!(text.contains("ready     yes"), "{text}");
        let actor = text.lines().find(|l| l.starts_with("  a1 ")).unwrap();
        assert!(
            actor.contains("cgroup 7 (/sys/fs/cgroup/a1)") && actor.contains("127.0.0.1:15001"),
            "{actor}"
        );
        let listener = text.lines().find(|l| l.contains("4097")).unwrap();
        assert!(
            listener.contains("ebpf") && listener.ends_with("a1"),
            "{listener}"
        );
        let maps = text.lines().find(|l| l.contains("EGRESS_ACTORS")).unwrap();
        assert_eq!(
            maps.split_whitespace().collect::<Vec<_>>(),
            ["EGRESS_ACTORS", "1", "4096"]
        );
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.actors[0].cgroup_id, Some(7));
        assert_eq!(back.attachments, r.attachments);
    }

    #[test]
    fn each_missing_piece_is_named() {
        let mut partial = attached(8, true);
        partial.programs.truncate(2);
        partial.missing = vec!["egress_connect4".into()];
        let r = report(
            vec![
                status("unserved", 7, &[]),
                status("partial", 8, &["127.0.0.1:15001"]),
                status("gone", 9, &["127.0.0.1:15001"]),
                status("bare", 10, &["127.0.0.1:15001"]),
            ],
            vec![attached(7, true), partial, attached(9, false)],
        );
        assert!(!r.ready.ready);
        let problems = r.ready.not_ready.join("\n");
        for want in [
            "actor unserved: no listener serves it",
            "actor partial: not every program is attached to cgroup 8: egress_connect4",
            "actor gone: its cgroup 9 is gone",
            "actor bare: no program is attached to its cgroup 10",
        ] {
            assert!(problems.contains(want), "{want:?} in:\n{problems}");
        }
        assert_eq!(r.ready.not_ready.len(), 4, "{problems}");
        let text = render(&r);
        assert!(
            text.contains("ready     no\n          - actor unserved"),
            "{text}"
        );
    }

    #[test]
    fn tables_align_and_uptime_reads_naturally() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["wide cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
            "",
        );
        assert_eq!(t, "A          LONGER\nwide cell  x\ny          z\n");
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(61), "1m 1s");
        assert_eq!(uptime(86_400 + 5), "1d 0h 0m 5s");
    }
}
