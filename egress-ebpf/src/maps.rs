//! The maps, named by the constants in egress-common and pinned by name under the agent's
//! bpffs directory so they outlive the agent.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use egress_common::{
    ACTORS_MAX_ENTRIES, ActorEntry, CONNS_MAX_ENTRIES, COUNTERS_LEN, ConnKey, Counter, Record,
    SOCKETS_MAX_ENTRIES, Settings,
};

/// Socket cookie -> original destination.
#[map(name = "EGRESS_SOCKETS")]
pub static SOCKETS: LruHashMap<u64, Record> = LruHashMap::pinned(SOCKETS_MAX_ENTRIES, 0);

/// (netns cookie, client address, client port) -> original destination, for the agent.
#[map(name = "EGRESS_CONNS")]
pub static CONNS: LruHashMap<ConnKey, Record> = LruHashMap::pinned(CONNS_MAX_ENTRIES, 0);

/// Actor cgroup id -> its agent listener.
#[map(name = "EGRESS_ACTORS")]
pub static ACTORS: HashMap<u64, ActorEntry> = HashMap::pinned(ACTORS_MAX_ENTRIES, 0);

/// Index 0: how to recognise the agent's own sockets.
#[map(name = "EGRESS_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Event counters, per CPU.
#[map(name = "EGRESS_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by programs running on this CPU.
        unsafe { *slot += 1 };
    }
}
