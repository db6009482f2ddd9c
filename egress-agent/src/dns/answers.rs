//! Which names each actor recently resolved to which addresses: the classifier's third source,
//! after SNI and Host, for connections that name nothing themselves.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Per actor, address -> the name it was most recently resolved from, until the answer's
/// (clamped) TTL runs out. Bounded per actor: past the bound the oldest entry goes.
#[derive(Debug)]
pub struct Answers {
    actors: Mutex<HashMap<Arc<str>, ActorAnswers>>,
    max_per_actor: usize,
}

/// One actor's entries, with their insertion order for eviction.
#[derive(Debug, Default)]
struct ActorAnswers {
    by_ip: HashMap<IpAddr, Entry>,
    /// Insertion sequence -> address; the first is the oldest.
    order: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    expires: Instant,
    seq: u64,
}

impl Answers {
    /// An empty cache keeping at most `max_per_actor` addresses per actor.
    pub fn new(max_per_actor: usize) -> Self {
        Answers {
            actors: Mutex::new(HashMap::new()),
            max_per_actor,
        }
    }

    /// Records that `actor_id` resolved `name` to each address for its duration, replacing
    /// what the address was recorded under before. `name` must already be normalised
    /// (lowercase, no trailing dot); addresses are stored v4-mapped-as-IPv4.
    pub fn record(
        &self,
        actor_id: &str,
        name: &str,
        addresses: impl IntoIterator<Item = (IpAddr, Duration)>,
    ) {
        if self.max_per_actor == 0 {
            return;
        }
        let name: Arc<str> = Arc::from(name);
        let now = Instant::now();
        let mut actors = self.lock();
        let actor = match actors.get_mut(actor_id) {
            Some(actor) => actor,
            None => actors.entry(Arc::from(actor_id)).or_default(),
        };
        for (ip, ttl) in addresses {
            // An unrepresentable expiry (a TTL of centuries) cannot come from a clamped TTL;
            // such an entry is simply not kept.
            let Some(expires) = now.checked_add(ttl) else {
                continue;
            };
            actor.insert(ip.to_canonical(), name.clone(), expires, self.max_per_actor);
        }
    }

    /// The name `actor_id` most recently resolved to `ip` (`::ffff:a.b.c.d` is `a.b.c.d`), if
    /// that answer's clamped TTL has not run out.
    pub fn lookup(&self, actor_id: &str, ip: IpAddr) -> Option<Arc<str>> {
        let ip = ip.to_canonical();
        let mut actors = self.lock();
        let actor = actors.get_mut(actor_id)?;
        let entry = actor.by_ip.get(&ip)?;
        if entry.expires > Instant::now() {
            return Some(entry.name.clone());
        }
        actor.remove(ip);
        None
    }

    /// Drops everything recorded for `actor_id` (the actor was removed).
    pub fn forget_actor(&self, actor_id: &str) {
        self.lock().remove(actor_id);
    }

    /// Entries held for all actors, expired ones not yet evicted included.
    pub fn len(&self) -> usize {
        self.lock().values().map(|a| a.by_ip.len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, ActorAnswers>> {
        // Nothing here panics while holding the lock; if something ever did, the map is still
        // consistent enough to serve (at worst an entry too many), so keep going.
        self.actors.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ActorAnswers {
    fn insert(&mut self, ip: IpAddr, name: Arc<str>, expires: Instant, max: usize) {
        self.remove(ip);
        while self.by_ip.len() >= max {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_ip.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.order.insert(seq, ip);
        self.by_ip.insert(ip, Entry { name, expires, seq });
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(old) = self.by_ip.remove(&ip) {
            self.order.remove(&old.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lookup_finds_the_latest_name_and_maps_v4_in_v6() {
        let answers = Answers::new(16);
        answers.record("a", "one.test", [(ip("10.0.0.1"), LONG)]);
        answers.record("a", "two.test", [(ip("::ffff:10.0.0.1"), LONG)]);
        assert_eq!(
            answers.lookup("a", ip("10.0.0.1")).as_deref(),
            Some("two.test")
        );
        assert_eq!(
            answers.lookup("a", ip("::ffff:10.0.0.1")).as_deref(),
            Some("two.test")
        );
        assert_eq!(answers.len(), 1);
    }

    #[test]
    fn actors_are_isolated_and_forgotten() {
        let answers = Answers::new(16);
        answers.record("a", "one.test", [(ip("10.0.0.1"), LONG)]);
        assert_eq!(answers.lookup("b", ip("10.0.0.1")), None);
        answers.forget_actor("a");
        assert_eq!(answers.lookup("a", ip("10.0.0.1")), None);
        assert!(answers.is_empty());
    }

    #[test]
    fn expired_entries_are_not_returned() {
        let answers = Answers::new(16);
        answers.record("a", "one.test", [(ip("10.0.0.1"), Duration::ZERO)]);
        assert_eq!(answers.lookup("a", ip("10.0.0.1")), None);
        assert!(answers.is_empty(), "the expired entry is dropped on lookup");
    }

    #[test]
    fn the_oldest_entry_goes_past_the_bound() {
        let answers = Answers::new(3);
        for i in 1..=5u8 {
            answers.record(
                "a",
                &format!("n{i}.test"),
                [(IpAddr::from([10, 0, 0, i]), LONG)],
            );
        }
        // Re-recording an address makes it the newest.
        answers.record("a", "n3.test", [(ip("10.0.0.3"), LONG)]);
        answers.record("a", "n6.test", [(ip("10.0.0.6"), LONG)]);
        assert_eq!(answers.len(), 3);
        let held: Vec<_> = (1..=6u8)
            .filter(|&i| answers.lookup("a", IpAddr::from([10, 0, 0, i])).is_some())
            .collect();
        assert_eq!(held, vec![3, 5, 6]);
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        let answers = Answers::new(0);
        answers.record("a", "one.test", [(ip("10.0.0.1"), LONG)]);
        assert!(answers.is_empty());
    }
}
