//! Reading the pins under the bpffs directory without loading anything: map sizes (for
//! `egress-agent status` and the metrics), decoded map contents (`egress-agent maps`) and the
//! links attached to each actor cgroup. Works with no agent running: the pins outlive it.
//!
//! Every walk is bounded: entries are counted up to the map's capacity (a map that changes
//! while it is walked can make the kernel restart the walk; the count is then approximate,
//! never endless), and a dump shows at most `limit` entries per map.
use std::{
    fs, io,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray};
use egress_common::{
    ActorEntry, ConnKey, Counter, MAP_ACTORS, MAP_CONNS, MAP_COUNTERS, MAP_SETTINGS, MAP_SOCKETS,
    PROGRAMS, Record, Settings,
};
use serde::{Deserialize, Serialize};

use super::{Error, MAPS_DIR, link, link_dir, pinned_cgroups};

/// Default bound on the entries `egress-agent maps` shows per map.
pub const DEFAULT_LIMIT: usize = 1000;

/// Longest key walked generically; the agent's keys are 8 to 32 bytes.
const MAX_KEY_SIZE: usize = 512;

/// One pinned map's fill: how many entries it holds and how many it can.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSize {
    /// Map name (its pin's file name, e.g. `EGRESS_CONNS`).
    pub name: String,
    /// Entries present (arrays: every slot exists, so this is their capacity).
    pub entries: u32,
    /// `max_entries` of the map.
    pub capacity: u32,
}

/// The sizes of every map pinned under `dir` (`<dir>/maps/*`), in name order.
pub fn map_sizes(dir: &Path) -> Result<Vec<MapSize>, Error> {
    pinned_maps(dir)?
        .into_iter()
        .map(|(name, path)| {
            let (data, info) = open(&path)?;
            let entries = count_entries(&data, &info).map_err(|e| io_or_root(&path, e))?;
            Ok(MapSize {
                name,
                entries,
                capacity: info.max_entries(),
            })
        })
        .collect()
}

/// The pins under `<dir>/maps`, by name; an error when there are none or they cannot be read.
fn pinned_maps(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let maps = dir.join(MAPS_DIR);
    let entries = match fs::read_dir(&maps) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NoPins {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io_or_root(&maps, e)),
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    if found.is_empty() {
        return Err(Error::NoPins {
            dir: dir.to_path_buf(),
        });
    }
    found.sort();
    Ok(found)
}

/// Opens a pinned map and reads its description.
fn open(path: &Path) -> Result<(MapData, MapInfo), Error> {
    let data = MapData::from_pin(path).map_err(|e| map_open_err(path, e))?;
    let info = data.info().map_err(|e| map_open_err(path, e))?;
    Ok((data, info))
}

fn map_open_err(path: &Path, e: MapError) -> Error {
    if let MapError::SyscallError(s) = &e
        && matches!(
            s.io_error.kind(),
            io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
        )
    {
        return io_or_root(
            path,
            io::Error::new(s.io_error.kind(), s.io_error.to_string()),
        );
    }
    Error::PinnedMap {
        path: path.to_path_buf(),
        source: e,
    }
}

/// `NotRoot` for a permission error, else the I/O error with the path.
fn io_or_root(path: &Path, e: io::Error) -> Error {
    // EPERM and EACCES both: the pin's mode, or a missing CAP_BPF / CAP_SYS_ADMIN.
    if e.kind() == io::ErrorKind::PermissionDenied {
        return Error::NotRoot {
            path: path.to_path_buf(),
        };
    }
    Error::Io {
        context: format!("reading {}", path.display()),
        source: e,
    }
}

/// Counts the keys of the map, at most its capacity. Distinct keys are counted: when the key
/// a walk stands on is deleted meanwhile (a busy LRU map), the kernel starts again from the
/// first key, and counting the repeats would report a fuller map than there is. The walk
/// makes at most `capacity` steps.
fn count_entries(data: &MapData, info: &MapInfo) -> io::Result<u32> {
    let key_size = info.key_size() as usize;
    let capacity = info.max_entries();
    if key_size == 0 {
        // Not a keyed map (a ring buffer, say): nothing to count.
        return Ok(0);
    }
    if key_size > MAX_KEY_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("key size {key_size} is not one of a map this agent makes"),
        ));
    }
    let fd = data.fd().as_fd();
    let mut current: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..capacity {
        if !link::next_key(fd, current.as_deref(), &mut next)? {
            break;
        }
        seen.insert(next.clone());
        current = Some(next.clone());
    }
    Ok(u32::try_from(seen.len()).unwrap_or(u32::MAX))
}

/// One map's decoded contents, as `egress-agent maps` prints them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapDump {
    /// Map name.
    pub name: String,
    /// Kernel map type (`hash`, `lru_hash`, `array`, `percpu_array`, ...).
    pub map_type: String,
    /// `max_entries`.
    pub capacity: u32,
    /// Entries present (counted up to the capacity).
    pub entries: u32,
    /// Whether more entries exist than are shown (`--limit`).
    pub truncated: bool,
    /// Why the contents could not be decoded (an incompatible map, a read error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The entries, decoded with the shared types.
    #[serde(flatten)]
    pub content: Content,
}

/// The decoded entries of one map.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// `EGRESS_SOCKETS`: socket cookie -> original destination.
    Sockets(Vec<SocketEntry>),
    /// `EGRESS_CONNS`: accepted-connection key -> original destination.
    Conns(Vec<ConnEntry>),
    /// `EGRESS_ACTORS`: actor cgroup -> its listener and DNS socket.
    Actors(Vec<ActorView>),
    /// `EGRESS_SETTINGS`: how the kernel side recognises the agent.
    Settings(Vec<SettingsView>),
    /// `EGRESS_COUNTERS`: event counters summed over the CPUs.
    Counters(Vec<CounterView>),
    /// A map this build does not know (left by another version).
    Undecoded {
        /// Key size in bytes.
        key_size: u32,
        /// Value size in bytes.
        value_size: u32,
    },
}

/// A capture record: where a connect was going and who made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// The original destination.
    pub destination: SocketAddr,
    /// Process (thread-group) id of the caller, in the node's pid namespace.
    pub pid: u32,
    /// The actor cgroup (a key of `EGRESS_ACTORS`).
    pub actor_cgroup: u64,
    /// The caller's own cgroup (the actor's or a descendant).
    pub cgroup: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the connect.
    pub connect_ns: u64,
    /// Milliseconds since the connect, when the clock could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
}

impl RecordView {
    fn new(r: &Record, now_ns: Option<u64>) -> Self {
        RecordView {
            destination: r.destination(),
            pid: r.pid,
            actor_cgroup: r.actor_cgroup,
            cgroup: r.cgroup,
            connect_ns: r.connect_ns,
            age_ms: now_ns
                .filter(|_| r.connect_ns != 0)
                .map(|now| now.saturating_sub(r.connect_ns) / 1_000_000),
        }
    }
}

/// An `EGRESS_SOCKETS` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketEntry {
    /// The actor socket's cookie.
    pub cookie: u64,
    /// Its record.
    #[serde(flatten)]
    pub record: RecordView,
}

/// An `EGRESS_CONNS` entry: a connection established but not yet accepted by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnEntry {
    /// Cookie of the network namespace of the listener (and of the actor).
    pub netns_cookie: u64,
    /// The actor socket's local address (what the agent's accept sees as the client).
    pub client: SocketAddr,
    /// Its record.
    #[serde(flatten)]
    pub record: RecordView,
}

/// An `EGRESS_ACTORS` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorView {
    /// The actor cgroup's id.
    pub cgroup_id: u64,
    /// The listener port its connects go to.
    pub listen_port: u16,
    /// IPv4 listener, if open.
    pub listener_v4: Option<SocketAddr>,
    /// IPv6 listener, if open.
    pub listener_v6: Option<SocketAddr>,
    /// IPv4 DNS socket, if open.
    pub dns_v4: Option<SocketAddr>,
    /// IPv6 DNS socket, if open.
    pub dns_v6: Option<SocketAddr>,
    /// The raw flag bits.
    pub flags: u16,
}

impl ActorView {
    fn new(cgroup_id: u64, e: &ActorEntry) -> Self {
        ActorView {
            cgroup_id,
            listen_port: e.listen_port,
            listener_v4: e.listener_v4(),
            listener_v6: e.listener_v6(),
            dns_v4: e.dns_v4(),
            dns_v6: e.dns_v6(),
            flags: e.flags,
        }
    }
}

/// The `EGRESS_SETTINGS` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsView {
    /// Network namespace cookie of the agent.
    pub agent_netns: u64,
    /// cgroup id of the agent.
    pub agent_cgroup: u64,
    /// `SO_MARK` of the agent's own sockets.
    pub agent_mark: u32,
}

/// One counter of `EGRESS_COUNTERS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    /// Counter name (`redirected`, `refused`, ...).
    pub name: String,
    /// Sum over the CPUs.
    pub total: u64,
}

/// Dumps the maps pinned under `dir` (only `only`, if given), at most `limit` entries each.
pub fn dump_maps(dir: &Path, only: Option<&str>, limit: usize) -> Result<Vec<MapDump>, Error> {
    let mut pins = pinned_maps(dir)?;
    if let Some(name) = only {
        let known: Vec<String> = pins.iter().map(|(n, _)| n.clone()).collect();
        pins.retain(|(n, _)| n.eq_ignore_ascii_case(name));
        if pins.is_empty() {
            return Err(Error::NoSuchMap {
                name: name.into(),
                dir: dir.to_path_buf(),
                known: known.join(", "),
            });
        }
    }
    let now_ns = monotonic_ns();
    pins.into_iter()
        .map(|(name, path)| {
            let (data, info) = open(&path)?;
            let entries = count_entries(&data, &info).map_err(|e| io_or_root(&path, e))?;
            let (key_size, value_size) = (info.key_size(), info.value_size());
            let mut dump = MapDump {
                map_type: type_name(&info),
                capacity: info.max_entries(),
                entries,
                truncated: entries as usize > limit,
                error: None,
                content: Content::Undecoded {
                    key_size,
                    value_size,
                },
                name,
            };
            match decode(&dump.name, data, limit, now_ns) {
                Ok(Some(content)) => dump.content = content,
                Ok(None) => {}
                Err(e) => dump.error = Some(e.to_string()),
            }
            Ok(dump)
        })
        .collect()
}

/// Decodes a known map; `None` for a map this build does not know.
fn decode(
    name: &str,
    data: MapData,
    limit: usize,
    now_ns: Option<u64>,
) -> Result<Option<Content>, MapError> {
    let map = Map::from_map_data(data)?;
    let content = match name {
        MAP_SOCKETS => {
            let m: HashMap<_, u64, Record> = HashMap::try_from(map)?;
            Content::Sockets(
                m.iter()
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .map(|(cookie, r)| SocketEntry {
                        cookie,
                        record: RecordView::new(&r, now_ns),
                    })
                    .collect(),
            )
        }
        MAP_CONNS => {
            let m: HashMap<_, ConnKey, Record> = HashMap::try_from(map)?;
            Content::Conns(
                m.iter()
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .map(|(k, r)| ConnEntry {
                        netns_cookie: k.netns,
                        client: k.client(),
                        record: RecordView::new(&r, now_ns),
                    })
                    .collect(),
            )
        }
        MAP_ACTORS => {
            let m: HashMap<_, u64, ActorEntry> = HashMap::try_from(map)?;
            Content::Actors(
                m.iter()
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()?
                    .iter()
                    .map(|(id, e)| ActorView::new(*id, e))
                    .collect(),
            )
        }
        MAP_SETTINGS => {
            let m: Array<_, Settings> = Array::try_from(map)?;
            Content::Settings(
                m.iter()
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .map(|s| SettingsView {
                        agent_netns: s.agent_netns,
                        agent_cgroup: s.agent_cgroup,
                        agent_mark: s.agent_mark,
                    })
                    .collect(),
            )
        }
        MAP_COUNTERS => {
            let m: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
            let mut counters = Vec::new();
            for c in Counter::ALL.into_iter().take(limit) {
                let values = m.get(&(c as u32), 0)?;
                counters.push(CounterView {
                    name: c.name().into(),
                    total: values.iter().sum(),
                });
            }
            Content::Counters(counters)
        }
        _ => return Ok(None),
    };
    Ok(Some(content))
}

/// The kernel's map type, as bpftool names it.
fn type_name(info: &MapInfo) -> String {
    match info.map_type() {
        Ok(MapType::Hash) => "hash".into(),
        Ok(MapType::LruHash) => "lru_hash".into(),
        Ok(MapType::Array) => "array".into(),
        Ok(MapType::PerCpuArray) => "percpu_array".into(),
        Ok(MapType::RingBuf) => "ringbuf".into(),
        Ok(other) => format!("{other:?}").to_lowercase(),
        Err(_) => "unknown".into(),
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    u64::try_from(t.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(t.tv_nsec()).ok()?)
}

/// The programs attached to one cgroup through the links pinned under
/// `<dir>/links/<cgroup id>/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The cgroup's id (the directory's name).
    pub cgroup_id: u64,
    /// The actor registered on it, if the running agent has one (filled in by `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Whether the cgroup still exists, as the kernel sees it: its links report it. `None`
    /// when no link could be read.
    pub cgroup_exists: Option<bool>,
    /// One entry per pinned link.
    pub programs: Vec<AttachedProgram>,
    /// Programs the agent attaches that have no pinned link here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

impl Attachment {
    /// Whether every program is attached to the live cgroup.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
            && self.cgroup_exists == Some(true)
            && self.programs.iter().all(|p| p.error.is_none())
    }
}

/// One pinned link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    /// The pin's name: the program's name.
    pub name: String,
    /// The hook (`connect4`, `sock_ops`, ...), from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_type: Option<String>,
    /// Link id (`bpftool link show id N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
    /// Program id (`bpftool prog show id N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_id: Option<u32>,
    /// Why the link could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The attachments of every cgroup with pinned links under `dir`, in cgroup id order.
pub fn attachments(dir: &Path) -> Vec<Attachment> {
    pinned_cgroups(dir)
        .into_iter()
        .map(|id| attachment(dir, id))
        .collect()
}

/// The attachment of one cgroup.
pub fn attachment(dir: &Path, cgroup_id: u64) -> Attachment {
    let links = link_dir(dir, cgroup_id);
    let mut names: Vec<String> = fs::read_dir(&links)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut exists = None;
    let programs = names
        .iter()
        .map(|name| {
            let pin = links.join(name);
            let read = link::open_pinned(&pin).and_then(|fd| link::info(fd.as_fd()));
            match read {
                Ok(info) => {
                    let live =
                        info.link_type == link::LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id;
                    exists = Some(exists.unwrap_or(true) && live);
                    AttachedProgram {
                        name: name.clone(),
                        attach_type: Some(link::attach_type_name(info.attach_type)),
                        link_id: Some(info.id),
                        program_id: Some(info.prog_id),
                        error: (!live).then(|| {
                            if info.cgroup_id == 0 {
                                "detached: the cgroup is gone".to_string()
                            } else {
                                format!("attached to cgroup {} instead", info.cgroup_id)
                            }
                        }),
                    }
                }
                Err(e) => AttachedProgram {
                    name: name.clone(),
                    attach_type: None,
                    link_id: None,
                    program_id: None,
                    error: Some(format!("reading the link {}: {e}", pin.display())),
                },
            }
        })
        .collect();
    let missing = PROGRAMS
        .iter()
        .filter(|p| !names.iter().any(|n| n == *p))
        .map(|p| p.to_string())
        .collect();
    Attachment {
        cgroup_id,
        actor: None,
        cgroup_exists: exists,
        programs,
        missing,
    }
}

/// Renders dumps as text: per map a header line, then a table of its entries.
pub fn render(dumps: &[MapDump]) -> String {
    let mut out = String::new();
    for d in dumps {
        out.push_str(&format!(
            "{} ({}, {}/{} entries{})\n",
            d.name,
            d.map_type,
            d.entries,
            d.capacity,
            if d.truncated { ", truncated" } else { "" }
        ));
        if let Some(e) = &d.error {
            out.push_str(&format!("  not decoded: {e}\n\n"));
            continue;
        }
        let record = |r: &RecordView| {
            vec![
                r.destination.to_string(),
                r.pid.to_string(),
                r.actor_cgroup.to_string(),
                r.cgroup.to_string(),
                r.age_ms.map_or("-".into(), |a| format!("{a} ms")),
            ]
        };
        let opt = |a: Option<SocketAddr>| a.map_or("-".into(), |a| a.to_string());
        let (headers, rows): (&[&str], Vec<Vec<String>>) = match &d.content {
            Content::Sockets(e) => (
                &[
                    "COOKIE",
                    "DESTINATION",
                    "PID",
                    "ACTOR CGROUP",
                    "CGROUP",
                    "AGE",
                ],
                e.iter()
                    .map(|s| {
                        let mut row = vec![s.cookie.to_string()];
                        row.extend(record(&s.record));
                        row
                    })
                    .collect(),
            ),
            Content::Conns(e) => (
                &[
                    "NETNS",
                    "CLIENT",
                    "DESTINATION",
                    "PID",
                    "ACTOR CGROUP",
                    "CGROUP",
                    "AGE",
                ],
                e.iter()
                    .map(|c| {
                        let mut row = vec![c.netns_cookie.to_string(), c.client.to_string()];
                        row.extend(record(&c.record));
                        row
                    })
                    .collect(),
            ),
            Content::Actors(e) => (
                &["CGROUP", "LISTENER V4", "LISTENER V6", "DNS V4", "DNS V6"],
                e.iter()
                    .map(|a| {
                        vec![
                            a.cgroup_id.to_string(),
                            opt(a.listener_v4),
                            opt(a.listener_v6),
                            opt(a.dns_v4),
                            opt(a.dns_v6),
                        ]
                    })
                    .collect(),
            ),
            Content::Settings(e) => (
                &["AGENT NETNS", "AGENT CGROUP", "AGENT MARK"],
                e.iter()
                    .map(|s| {
                        vec![
                            s.agent_netns.to_string(),
                            s.agent_cgroup.to_string(),
                            format!("{:#x}", s.agent_mark),
                        ]
                    })
                    .collect(),
            ),
            Content::Counters(e) => (
                &["COUNTER", "TOTAL"],
                e.iter()
                    .map(|c| vec![c.name.clone(), c.total.to_string()])
                    .collect(),
            ),
            Content::Undecoded {
                key_size,
                value_size,
            } => {
                out.push_str(&format!(
                    "  not decoded by this build (key {key_size} bytes, value {value_size} \
                     bytes): see `bpftool map dump pinned`\n\n"
                ));
                continue;
            }
        };
        out.push_str(&crate::status::table(headers, &rows, "  "));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::ebpf::LINKS_DIR;

    fn record() -> Record {
        Record {
            dst_ip: ConnKey::new(0, "10.9.8.7:1".parse().unwrap()).ip,
            dst_port: 8443,
            _pad: 0,
            pid: 4242,
            actor_cgroup: 77,
            cgroup: 78,
            connect_ns: 5_000_000_000,
        }
    }

    #[test]
    fn records_decode_with_their_age() {
        let v = RecordView::new(&record(), Some(7_500_000_000));
        assert_eq!(v.destination.to_string(), "10.9.8.7:8443");
        assert_eq!((v.pid, v.actor_cgroup, v.cgroup), (4242, 77, 78));
        assert_eq!(v.age_ms, Some(2500));
        // A clock behind the record (never in practice) is age zero, not a wrap.
        assert_eq!(RecordView::new(&record(), Some(1)).age_ms, Some(0));
        assert_eq!(RecordView::new(&record(), None).age_ms, None);
    }

    #[test]
    fn actor_entries_decode_to_their_sockets() {
        let e =
            ActorEntry::new(Some(Ipv4Addr::LOCALHOST), None, 15001).with_dns(40000, true, false);
        let v = ActorView::new(99, &e);
        assert_eq!(v.cgroup_id, 99);
        assert_eq!(v.listen_port, 15001);
        assert_eq!(v.listener_v4.unwrap().to_string(), "127.0.0.1:15001");
        assert_eq!(v.dns_v4.unwrap().to_string(), "127.0.0.1:40000");
        assert!(v.listener_v6.is_none() && v.dns_v6.is_none());
    }

    #[test]
    fn dumps_serialize_with_the_content_named_by_the_map() {
        let dump = MapDump {
            name: MAP_ACTORS.into(),
            map_type: "hash".into(),
            capacity: 4096,
            entries: 1,
            truncated: false,
            error: None,
            content: Content::Actors(vec![ActorView::new(
                99,
                &ActorEntry::new(Some(Ipv4Addr::LOCALHOST), None, 15001),
            )]),
        };
        let json = serde_json::to_value(&dump).unwrap();
        assert_eq!(json["name"], "EGRESS_ACTORS");
        assert_eq!(json["actors"][0]["cgroup_id"], 99);
        assert_eq!(json["actors"][0]["listener_v4"], "127.0.0.1:15001");
        let back: MapDump = serde_json::from_value(json).unwrap();
        assert!(matches!(back.content, Content::Actors(a) if a.len() == 1));
    }

    #[test]
    fn text_shows_a_table_per_map() {
        let dumps = vec![
            MapDump {
                name: MAP_SOCKETS.into(),
                map_type: "lru_hash".into(),
                capacity: 65536,
                entries: 3,
                truncated: true,
                error: None,
                content: Content::Sockets(vec![SocketEntry {
                    cookie: 12345,
                    record: RecordView::new(&record(), Some(6_000_000_000)),
                }]),
            },
            MapDump {
                name: "OTHER".into(),
                map_type: "hash".into(),
                capacity: 8,
                entries: 0,
                truncated: false,
                error: None,
                content: Content::Undecoded {
                    key_size: 4,
                    value_size: 8,
                },
            },
        ];
        let text = render(&dumps);
        assert!(
            text.contains("EGRESS_SOCKETS (lru_hash, 3/65536 entries, truncated)"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.contains("12345"))
            .expect("the entry's row");
        for cell in ["10.9.8.7:8443", "4242", "77", "78", "1000 ms"] {
            assert!(row.contains(cell), "{row}");
        }
        let header = text.lines().find(|l| l.contains("COOKIE")).unwrap();
        assert_eq!(
            header.find("DESTINATION"),
            row.find("10.9.8.7"),
            "columns line up:\n{text}"
        );
        assert!(text.contains("OTHER (hash, 0/8 entries)\n  not decoded by this build (key 4 bytes, value 8 bytes)"), "{text}");
    }

    #[test]
    fn a_missing_directory_says_how_to_point_at_the_pins() {
        let dir = tempfile::tempdir().unwrap();
        let err = map_sizes(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("no pinned maps under") && err.contains("running with this --bpffs-dir"),
            "{err}"
        );
        fs::create_dir(dir.path().join(MAPS_DIR)).unwrap();
        let err = dump_maps(dir.path(), None, 10).unwrap_err().to_string();
        assert!(err.contains("no pinned maps under"), "{err}");
    }

    #[test]
    fn permission_errors_say_to_run_as_root() {
        for errno in [libc::EPERM, libc::EACCES] {
            let err = io_or_root(
                Path::new("/sys/fs/bpf/x"),
                io::Error::from_raw_os_error(errno),
            );
            assert!(
                matches!(err, Error::NotRoot { .. }) && err.to_string().contains("run as root"),
                "{err}"
            );
        }
        let err = io_or_root(Path::new("/x"), io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn a_directory_without_links_has_no_attachments() {
        let dir = tempfile::tempdir().unwrap();
        assert!(attachments(dir.path()).is_empty());
        fs::create_dir_all(dir.path().join(LINKS_DIR).join("42")).unwrap();
        let a = attachments(dir.path());
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].cgroup_id, 42);
        assert_eq!(a[0].cgroup_exists, None);
        assert_eq!(a[0].missing.len(), PROGRAMS.len());
        assert!(!a[0].complete());
    }
}
