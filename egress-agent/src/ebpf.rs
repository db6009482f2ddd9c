//! Loading, attaching and pinning the kernel programs, and the agent's view of their maps.
//!
//! Everything lives under one bpffs directory (default `/sys/fs/bpf/egress`):
//!
//! ```text
//! <dir>/maps/EGRESS_SOCKETS, EGRESS_CONNS, EGRESS_ACTORS, EGRESS_SETTINGS, EGRESS_COUNTERS
//! <dir>/links/<cgroup id>/<program name>      one bpf link per program and actor cgroup
//! ```
//!
//! The pins keep capture in force when the agent exits or crashes: the programs stay attached
//! and keep redirecting to the (now closed) listener, so actors' connects are refused instead
//! of going out directly. A restarted agent re-uses the pinned maps and swaps its freshly
//! loaded programs into the pinned links with `BPF_LINK_UPDATE`, without a gap.
//! `egress-agent detach` removes the pins, which detaches everything. [`dump`] reads the pins
//! without loading anything (`egress-agent maps`, the map sizes of `status` and the metrics).
pub mod dump;
mod link;

pub use dump::{MapSize, map_sizes};

use std::{
    borrow::BorrowMut,
    collections::BTreeSet,
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, Program, ProgramError,
        links::{FdLink, LinkError},
    },
};
use egress_common::{
    ACTORS_MAX_ENTRIES, ActorEntry, CONNS_MAX_ENTRIES, ConnKey, Counter, MAP_ACTORS, MAP_CONNS,
    MAP_COUNTERS, MAP_SETTINGS, MAP_SOCKETS, PROGRAMS, Record, SOCKETS_MAX_ENTRIES, Settings,
};
use tracing::{debug, info, warn};

/// The eBPF object built by build.rs (empty when the toolchain was missing at build time).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// Default bpffs directory for pins.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/egress";

const MAPS_DIR: &str = "maps";
const LINKS_DIR: &str = "links";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of loading, attaching and detaching.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary carries no eBPF object.
    #[error(
        "this egress-agent binary was built without its eBPF object (bpf-linker or an eBPF \
         toolchain was missing when it was built); build it with `cargo xtask build-ebpf` \
         after `cargo xtask setup`"
    )]
    NotBuilt,
    /// The pin directory is not on bpffs.
    #[error(
        "{dir} is not on a bpf filesystem; mount one with `mkdir -p /sys/fs/bpf && mount -t bpf \
         bpf /sys/fs/bpf` (in Kubernetes: a hostPath volume for /sys/fs/bpf), or pass \
         --bpffs-dir on an existing bpffs"
    )]
    NoBpffs {
        /// The directory asked for.
        dir: PathBuf,
    },
    /// A file operation on the pin directory or a cgroup failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: io::Error,
    },
    /// The object could not be loaded.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The cause.
        source: ProgramError,
    },
    /// A pinned link could not be used.
    #[error("link {path}: {source}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// The cause.
        source: LinkError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The cause.
        source: MapError,
    },
    /// Nothing is pinned under the directory.
    #[error(
        "no pinned maps under {}: is the agent (or a previous one) running with this \
         --bpffs-dir?",
        dir.display()
    )]
    NoPins {
        /// The directory asked for.
        dir: PathBuf,
    },
    /// The pins cannot be read without privileges.
    #[error(
        "permission denied reading {}: the pins are root's (bpffs is mode 0700 and opening a \
         map needs CAP_BPF and CAP_SYS_ADMIN); run as root, e.g. with sudo",
        path.display()
    )]
    NotRoot {
        /// What could not be read.
        path: PathBuf,
    },
    /// `--map` named no pinned map.
    #[error("no map {name:?} is pinned under {}; there are: {known}", dir.display())]
    NoSuchMap {
        /// The name asked for.
        name: String,
        /// The directory.
        dir: PathBuf,
        /// The pinned maps' names.
        known: String,
    },
    /// A pinned map could not be opened or read.
    #[error("pinned map {}: {source}", path.display())]
    PinnedMap {
        /// Pin path.
        path: PathBuf,
        /// The cause.
        source: MapError,
    },
    /// A pinned map was made by an incompatible build.
    #[error(
        "pinned map {path} has {found}, this agent needs {expected}: it was left by an \
         incompatible egress version; run `egress-agent detach --bpffs-dir {dir}` first",
        dir = .path.parent().and_then(Path::parent).unwrap_or(Path::new("?")).display(),
        path = .path.display()
    )]
    IncompatibleMap {
        /// Pin path.
        path: PathBuf,
        /// What the pinned map has.
        found: String,
        /// What this build needs.
        expected: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

/// Fails unless `dir` (or its nearest existing ancestor) is on bpffs.
pub fn check_bpffs(dir: &Path) -> Result<(), Error> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let stat = nix::sys::statfs::statfs(probe).map_err(|e| Error::Io {
        context: format!("statfs {}", probe.display()),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(Error::NoBpffs {
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Loaded programs and pinned maps; attaches actor cgroups.
pub struct Capture {
    ebpf: Ebpf,
    dir: PathBuf,
}

impl Capture {
    /// Loads the programs, re-using (or creating) the maps pinned under `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotBuilt);
        }
        check_bpffs(dir)?;
        let maps_dir = dir.join(MAPS_DIR);
        for d in [&maps_dir, &dir.join(LINKS_DIR)] {
            fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        check_pinned_maps(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        for name in PROGRAMS {
            match program(&mut ebpf, name)? {
                Program::CgroupSockAddr(p) => p.load(),
                Program::SockOps(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            }
            .map_err(prog_err(name))?;
        }
        Ok(Capture {
            ebpf,
            dir: dir.to_path_buf(),
        })
    }

    /// Takes the aya-log ring buffer for the kernel programs' log lines (refused connects).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!(error = %e, "kernel program logs unavailable");
                None
            }
        }
    }

    /// Tells the kernel side how to recognise the agent's own sockets.
    pub fn set_settings(&mut self, settings: Settings) -> Result<(), Error> {
        let mut array: Array<&mut MapData, Settings> =
            Array::try_from(map(&mut self.ebpf, MAP_SETTINGS)?).map_err(map_err(MAP_SETTINGS))?;
        array.set(0, settings, 0).map_err(map_err(MAP_SETTINGS))
    }

    /// Registers an actor cgroup and attaches (or re-attaches) every program to it. The actor
    /// entry is written first, so an attached program never runs without it; with no entry
    /// (no listener for it) the cgroup is attached all the same and its connects are refused.
    pub fn register(
        &mut self,
        cgroup: &Path,
        cgroup_id: u64,
        entry: Option<ActorEntry>,
    ) -> Result<(), Error> {
        {
            let mut actors: HashMap<&mut MapData, u64, ActorEntry> =
                HashMap::try_from(map(&mut self.ebpf, MAP_ACTORS)?).map_err(map_err(MAP_ACTORS))?;
            match entry {
                Some(entry) => actors.insert(cgroup_id, entry, 0),
                None => remove_present(&mut actors, &cgroup_id),
            }
            .map_err(map_err(MAP_ACTORS))?;
        }
        let links = link_dir(&self.dir, cgroup_id);
        fs::create_dir_all(&links).map_err(io_err(format!("creating {}", links.display())))?;
        let cgroup_file = fs::File::open(cgroup)
            .map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
        for name in PROGRAMS {
            let pin = links.join(name);
            let program = program(&mut self.ebpf, name)?;
            if pin.exists() {
                // Swap the new program into the existing link: no gap in capture.
                let link_fd = link::open_pinned(&pin)
                    .map_err(io_err(format!("opening pinned link {}", pin.display())))?;
                let prog_fd = program.fd().map_err(prog_err(name))?;
                link::update(link_fd.as_fd(), prog_fd.as_fd())
                    .map_err(io_err(format!("updating link {}", pin.display())))?;
                debug!(program = name, cgroup = %cgroup.display(), "pinned link updated");
                continue;
            }
            // The three program types attach the same way but share no trait for it.
            macro_rules! attach {
                ($p:expr) => {{
                    let id = $p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    let link = $p.take_link(id).map_err(prog_err(name))?;
                    FdLink::try_from(link).map_err(|source| Error::Link {
                        path: pin.clone(),
                        source,
                    })?
                }};
            }
            let link: FdLink = match program {
                Program::CgroupSockAddr(p) => attach!(p),
                Program::SockOps(p) => attach!(p),
                Program::CgroupSock(p) => attach!(p),
                _ => return Err(prog_err(name)(ProgramError::UnexpectedProgramType)),
            };
            link.pin(&pin).map_err(|e| Error::Io {
                context: format!("pinning link {}", pin.display()),
                source: io::Error::other(e),
            })?;
            debug!(program = name, cgroup = %cgroup.display(), "attached and pinned");
        }
        Ok(())
    }

    /// cgroup ids with pinned links (attached by this or an earlier agent).
    pub fn pinned_cgroups(&self) -> BTreeSet<u64> {
        pinned_cgroups(&self.dir)
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A program of the object, by name.
fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, Error> {
    ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: ProgramError::NotLoaded,
    })
}

/// A map of the object, by name.
fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, Error> {
    ebpf.map_mut(name).ok_or(Error::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })
}

/// The map `name` pinned under `dir`.
fn pinned(dir: &Path, name: &'static str) -> Result<MapData, Error> {
    MapData::from_pin(dir.join(MAPS_DIR).join(name)).map_err(map_err(name))
}

/// Removes `key` from `map`; a key that is already gone is fine.
fn remove_present<T: BorrowMut<MapData>, K: Pod, V: Pod>(
    map: &mut HashMap<T, K, V>,
    key: &K,
) -> Result<(), MapError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        // aya 0.14 reports a missing key as the syscall's ENOENT.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

fn link_dir(dir: &Path, cgroup_id: u64) -> PathBuf {
    dir.join(LINKS_DIR).join(cgroup_id.to_string())
}

fn pinned_cgroups(dir: &Path) -> BTreeSet<u64> {
    let Ok(entries) = fs::read_dir(dir.join(LINKS_DIR)) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Refuses pinned maps whose layout differs from this build's (left by another version).
fn check_pinned_maps(maps_dir: &Path) -> Result<(), Error> {
    use std::mem::size_of;
    let expected: [(&str, usize, usize, u32); 5] = [
        (
            MAP_SOCKETS,
            size_of::<u64>(),
            size_of::<Record>(),
            SOCKETS_MAX_ENTRIES,
        ),
        (
            MAP_CONNS,
            size_of::<ConnKey>(),
            size_of::<Record>(),
            CONNS_MAX_ENTRIES,
        ),
        (
            MAP_ACTORS,
            size_of::<u64>(),
            size_of::<ActorEntry>(),
            ACTORS_MAX_ENTRIES,
        ),
        (MAP_SETTINGS, size_of::<u32>(), size_of::<Settings>(), 1),
        (
            MAP_COUNTERS,
            size_of::<u32>(),
            size_of::<u64>(),
            egress_common::COUNTERS_LEN,
        ),
    ];
    for (name, key, value, max) in expected {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, max) {
            return Err(Error::IncompatibleMap {
                path,
                found: format!(
                    "key {} / value {} bytes / {} entries",
                    found.0, found.1, found.2
                ),
                expected: format!("key {key} / value {value} bytes / {max} entries"),
            });
        }
    }
    Ok(())
}

/// The agent's handle on `EGRESS_CONNS`: one per accept loop, opened from the pin, so loops
/// never share a lock.
pub struct Conns {
    map: HashMap<MapData, ConnKey, Record>,
}

impl Conns {
    /// Opens the pinned `EGRESS_CONNS` under `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let map = HashMap::try_from(Map::LruHashMap(pinned(dir, MAP_CONNS)?))
            .map_err(map_err(MAP_CONNS))?;
        Ok(Conns { map })
    }

    /// Takes (reads and deletes) the record of an accepted connection.
    pub fn take(&mut self, key: &ConnKey) -> Result<Option<Record>, Error> {
        match self.map.get(key, 0) {
            Ok(record) => {
                // A missing key here means sockops removed it because the client closed: the
                // record is still right for this connection.
                remove_present(&mut self.map, key).map_err(map_err(MAP_CONNS))?;
                Ok(Some(record))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_CONNS)(e)),
        }
    }
}

/// Entry counts and counters of the pinned maps under `dir`, for tests and operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Entries in `EGRESS_SOCKETS`.
    pub sockets: usize,
    /// Entries in `EGRESS_CONNS`.
    pub conns: usize,
    /// Entries in `EGRESS_ACTORS`.
    pub actors: usize,
    /// Counter totals over all CPUs, in [`Counter::ALL`] order.
    pub counters: Vec<(Counter, u64)>,
}

/// Reads [`MapStats`] from the maps pinned under `dir`.
pub fn map_stats(dir: &Path) -> Result<MapStats, Error> {
    let open = |name| pinned(dir, name);
    let sockets: HashMap<_, u64, Record> =
        HashMap::try_from(Map::LruHashMap(open(MAP_SOCKETS)?)).map_err(map_err(MAP_SOCKETS))?;
    let conns: HashMap<_, ConnKey, Record> =
        HashMap::try_from(Map::LruHashMap(open(MAP_CONNS)?)).map_err(map_err(MAP_CONNS))?;
    let actors: HashMap<_, u64, ActorEntry> =
        HashMap::try_from(Map::HashMap(open(MAP_ACTORS)?)).map_err(map_err(MAP_ACTORS))?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(MAP_COUNTERS)?))
            .map_err(map_err(MAP_COUNTERS))?;
    let mut totals = Vec::new();
    for c in Counter::ALL {
        let values = counters
            .get(&(c as u32), 0)
            .map_err(map_err(MAP_COUNTERS))?;
        totals.push((c, values.iter().sum()));
    }
    Ok(MapStats {
        sockets: sockets.keys().filter(Result::is_ok).count(),
        conns: conns.keys().filter(Result::is_ok).count(),
        actors: actors.keys().filter(Result::is_ok).count(),
        counters: totals,
    })
}

/// What [`detach`] removed.
#[derive(Debug, Default)]
pub struct Detached {
    /// Link pins removed (each one detached a program from a cgroup).
    pub links: usize,
    /// Map pins removed.
    pub maps: usize,
}

/// Detaches capture: removes the link pins of one actor cgroup (and its actor entry), or of
/// every cgroup together with the maps and the directory itself.
pub fn detach(dir: &Path, cgroup_id: Option<u64>) -> Result<Detached, Error> {
    check_bpffs(dir)?;
    let mut done = Detached::default();
    let cgroups: Vec<u64> = match cgroup_id {
        Some(id) => vec![id],
        None => pinned_cgroups(dir).into_iter().collect(),
    };
    for id in cgroups {
        let links = link_dir(dir, id);
        if let Ok(entries) = fs::read_dir(&links) {
            for entry in entries.filter_map(Result::ok) {
                fs::remove_file(entry.path())
                    .map_err(io_err(format!("removing {}", entry.path().display())))?;
                done.links += 1;
            }
        }
        if links.exists() {
            fs::remove_dir(&links).map_err(io_err(format!("removing {}", links.display())))?;
        }
        if cgroup_id.is_some() {
            // No pinned actor map: nothing to remove.
            if let Ok(data) = pinned(dir, MAP_ACTORS) {
                let mut actors: HashMap<_, u64, ActorEntry> =
                    HashMap::try_from(Map::HashMap(data)).map_err(map_err(MAP_ACTORS))?;
                remove_present(&mut actors, &id).map_err(map_err(MAP_ACTORS))?;
            }
        }
    }
    if cgroup_id.is_none() {
        let maps = dir.join(MAPS_DIR);
        if let Ok(entries) = fs::read_dir(&maps) {
            for entry in entries.filter_map(Result::ok) {
                fs::remove_file(entry.path())
                    .map_err(io_err(format!("removing {}", entry.path().display())))?;
                done.maps += 1;
            }
        }
        for d in [dir.join(LINKS_DIR), maps, dir.to_path_buf()] {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", d.display()))(e)),
            }
        }
    }
    info!(dir = %dir.display(), links = done.links, maps = done.maps, "capture detached");
    Ok(done)
}
