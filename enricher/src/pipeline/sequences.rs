//! Which per-host sequence numbers this process has accepted, to drop the
//! duplicates the sidecar's at-least-once delivery sends (a spool segment
//! replayed again after a crash) and to count the records missing between
//! them. The transport numbers each sidecar's records 0, 1, 2, ... per
//! `sequence_epoch`; the accepted ones are kept as disjoint ranges, so a
//! host whose records come in order costs one range, and memory grows with
//! the holes only, within bounds. A host is forgotten with the partition it
//! came in (revoked): a batch that could not be flushed then is read again
//! by its next owner, maybe this process, and must not look like repeats.
//!
//! Loss at the end of an epoch (records a sidecar produced just before it
//! was restarted, that never arrived) opens no hole between two numbers
//! seen. The sidecars' heartbeats say how far each epoch got
//! (`next_sequence`, [`Produced`]); when a host's records move to a new
//! epoch, the old one's numbers up to the last heartbeat's are expected:
//! those not seen are counted as gaps, and filled (late) if they still come.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use smallvec::SmallVec;

/// Hosts tracked at most; past it the least recently seen is forgotten.
pub const MAX_HOSTS: usize = 20_000;
/// Ranges kept per host (over its epochs); past it the oldest epoch's
/// lowest range is forgotten (a hole that old is not going to be filled).
pub const MAX_RANGES: usize = 64;
/// Epochs (sidecar runs) kept per host; past it the oldest is forgotten.
pub const MAX_EPOCHS: usize = 4;

/// What a record's sequence number says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not accepted before; `missing` numbers were skipped right before it
    /// (a hole opened, counted as a gap).
    New { missing: u64 },
    /// Not accepted before, and in a hole counted as a gap earlier: it came
    /// late (the sidecar replays failed deliveries after newer records).
    Late,
    /// Accepted before: not to be written again.
    Duplicate,
}

/// Running totals, published as the `flowlog_enricher_sequence_*` and
/// `duplicates` counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub gaps: u64,
    pub late: u64,
    pub duplicates: u64,
    /// Ranges forgotten to stay within bounds: repeats of their records are
    /// no longer recognised.
    pub evicted: u64,
}

/// The highest `next_sequence` each host's heartbeats announced, per epoch
/// (the newest few epochs): fed by the identity topic's reader, read when a
/// host's records move to a new epoch.
#[derive(Default)]
pub struct Produced {
    hosts: Mutex<HashMap<String, EpochsProduced>>,
}

/// (epoch, next_sequence) of one host, oldest epoch first.
type EpochsProduced = SmallVec<[(i64, i64); 2]>;

impl Produced {
    /// A heartbeat: `host`'s `epoch` has produced the numbers below `next`.
    pub fn note(&self, host: &str, epoch: i64, next: i64) {
        let mut hosts = self.hosts.lock().unwrap();
        if !hosts.contains_key(host) {
            if hosts.len() >= MAX_HOSTS {
                // Bounded like the sequence tracking: forget any one host.
                if let Some(k) = hosts.keys().next().cloned() {
                    hosts.remove(&k);
                }
            }
            hosts.insert(host.to_owned(), SmallVec::new());
        }
        let epochs = hosts.get_mut(host).expect("inserted");
        match epochs.iter_mut().find(|(e, _)| *e == epoch) {
            Some((_, n)) => *n = (*n).max(next),
            None => {
                epochs.push((epoch, next));
                epochs.sort_unstable();
                if epochs.len() > MAX_EPOCHS {
                    epochs.remove(0);
                }
            }
        }
    }

    /// How far `host`'s `epoch` got, as its heartbeats said.
    pub fn next(&self, host: &str, epoch: i64) -> Option<i64> {
        let hosts = self.hosts.lock().unwrap();
        hosts.get(host)?.iter().find(|(e, _)| *e == epoch).map(|(_, n)| *n)
    }
}

pub struct Sequences {
    hosts: HashMap<String, Host>,
    /// How far each host's epochs got (heartbeats).
    produced: Arc<Produced>,
    max_hosts: usize,
    max_ranges: usize,
    /// Advances at each record: the hosts' recency.
    tick: u64,
    pub counts: Counts,
}

struct Host {
    last_seen: u64,
    /// The partitions its records came in (one, as sidecars key by host).
    partitions: SmallVec<[i32; 2]>,
    epochs: BTreeMap<i64, Ranges>,
}

/// One epoch's accepted numbers: start → end (inclusive), disjoint and not
/// adjacent (consecutive numbers merge), never empty.
struct Ranges {
    ranges: BTreeMap<i64, i64>,
    /// The highest number seen or known to exist (an ended epoch's last
    /// heartbeat): numbers above it open holes, below it fill them.
    high: i64,
    /// Holes from here up were counted as gaps (the first number seen, raised
    /// as low ranges are forgotten); a number below it is no gap filled.
    floor: i64,
}

impl Default for Sequences {
    fn default() -> Sequences {
        Sequences::new(MAX_HOSTS, MAX_RANGES)
    }
}

impl Sequences {
    pub fn new(max_hosts: usize, max_ranges: usize) -> Sequences {
        Sequences::with_produced(max_hosts, max_ranges, Arc::default())
    }

    pub fn with_produced(max_hosts: usize, max_ranges: usize, produced: Arc<Produced>) -> Sequences {
        Sequences {
            produced,
            hosts: HashMap::new(),
            max_hosts: max_hosts.max(1),
            max_ranges: max_ranges.max(1),
            tick: 0,
            counts: Counts::default(),
        }
    }

    /// Notes record `seq` of `host`'s `epoch`, read from partition `p`, and
    /// says whether it is new.
    pub fn observe(&mut self, p: i32, host: &str, epoch: i64, seq: i64) -> Seen {
        self.tick += 1;
        // (No String allocated for a host already known.)
        if !self.hosts.contains_key(host) {
            if self.hosts.len() >= self.max_hosts {
                self.evict_host();
            }
            let new = Host {
                last_seen: 0,
                partitions: SmallVec::new(),
                epochs: BTreeMap::new(),
            };
            self.hosts.insert(host.to_owned(), new);
        }
        let Some(h) = self.hosts.get_mut(host) else {
            return Seen::New { missing: 0 }; // just inserted: never
        };
        h.last_seen = self.tick;
        if !h.partitions.contains(&p) {
            h.partitions.push(p);
        }
        let full = h.epochs.len() >= MAX_EPOCHS;
        let oldest = h.epochs.first_key_value().map(|(&e, _)| e);
        let seen = if let Some(r) = h.epochs.get_mut(&epoch) {
            r.observe(seq)
        } else if full && oldest.is_some_and(|o| epoch < o) {
            // Older than every epoch kept, and no room: not tracked.
            Seen::New { missing: 0 }
        } else {
            if full {
                if let Some((_, old)) = h.epochs.pop_first() {
                    self.counts.evicted += old.ranges.len() as u64;
                }
            }
            // A newer epoch: the one before it is over; what its heartbeats
            // said it produced and did not arrive is missing.
            let newest = h.epochs.range(epoch..).next().is_none();
            let before = h.epochs.range_mut(..epoch).next_back().filter(|_| newest);
            if let Some((&prev, r)) = before {
                if let Some(next) = self.produced.next(host, prev) {
                    let missing = r.expect_through(next - 1);
                    self.counts.gaps = self.counts.gaps.saturating_add(missing);
                }
            }
            h.epochs.insert(epoch, Ranges::new(seq));
            Seen::New { missing: 0 }
        };
        self.counts.evicted += h.trim(self.max_ranges);
        match seen {
            Seen::New { missing } => self.counts.gaps = self.counts.gaps.saturating_add(missing),
            Seen::Late => self.counts.late += 1,
            Seen::Duplicate => self.counts.duplicates += 1,
        }
        seen
    }

    /// Forgets the hosts whose records came in partition `p` (taken away).
    pub fn forget_partition(&mut self, p: i32) {
        self.hosts.retain(|_, h| !h.partitions.contains(&p));
    }

    /// Forgets the least recently seen host.
    fn evict_host(&mut self) {
        let oldest = self.hosts.iter().min_by_key(|(_, h)| h.last_seen);
        if let Some(k) = oldest.map(|(k, _)| k.clone()) {
            if let Some(h) = self.hosts.remove(&k) {
                self.counts.evicted += h.ranges() as u64;
            }
        }
    }
}

impl Host {
    fn ranges(&self) -> usize {
        self.epochs.values().map(|r| r.ranges.len()).sum()
    }

    /// Forgets the oldest epoch's lowest ranges while there are more than
    /// `max`; returns how many.
    fn trim(&mut self, max: usize) -> u64 {
        let mut forgotten = 0;
        while self.ranges() > max {
            let Some(mut oldest) = self.epochs.first_entry() else {
                break;
            };
            if let Some((_, end)) = oldest.get_mut().ranges.pop_first() {
                oldest.get_mut().floor = end.saturating_add(1);
                forgotten += 1;
            }
            if oldest.get().ranges.is_empty() {
                oldest.remove();
            }
        }
        forgotten
    }
}

impl Ranges {
    fn new(seq: i64) -> Ranges {
        Ranges {
            ranges: BTreeMap::from([(seq, seq)]),
            high: seq,
            floor: seq,
        }
    }

    /// Numbers up to `last` exist (the epoch ended there): those above
    /// the highest seen are a hole; returns its size.
    fn expect_through(&mut self, last: i64) -> u64 {
        if last <= self.high {
            return 0;
        }
        let missing = last.abs_diff(self.high);
        self.high = last;
        missing
    }

    fn observe(&mut self, seq: i64) -> Seen {
        let below = self.ranges.range(..=seq).next_back().map(|(&s, &e)| (s, e));
        if below.is_some_and(|(_, end)| seq <= end) {
            return Seen::Duplicate;
        }
        let high = self.high;
        let seen = if seq > high {
            self.high = seq;
            Seen::New {
                missing: seq.abs_diff(high) - 1,
            }
        } else if seq >= self.floor {
            Seen::Late
        } else {
            Seen::New { missing: 0 }
        };
        // Insert, merging with the range ending right before and the one
        // starting right after.
        let after = seq
            .checked_add(1)
            .and_then(|next| self.ranges.remove(&next));
        let end = after.unwrap_or(seq);
        match below {
            Some((start, e)) if e.checked_add(1) == Some(seq) => self.ranges.insert(start, end),
            _ => self.ranges.insert(seq, end),
        };
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records lost at the end of an epoch (the sidecar produced 0..=9, the
    /// last three never arrived, then it restarted): counted as gaps when
    /// the host's records move to the new epoch, from the heartbeat's
    /// `next_sequence`; one of them arriving late (a spool replay) fills
    /// its hole, and a repeat is still a repeat.
    #[test]
    fn loss_at_the_end_of_an_epoch_is_a_gap() {
        let produced = Arc::new(Produced::default());
        let mut s = Sequences::with_produced(10, 64, produced.clone());
        for seq in 0..7 {
            assert_eq!(s.observe(0, "h", 1, seq), Seen::New { missing: 0 });
        }
        produced.note("h", 1, 4);
        produced.note("h", 1, 10);
        produced.note("h", 1, 8); // an older heartbeat read late: no step back
        assert_eq!(produced.next("h", 1), Some(10));
        assert_eq!(s.observe(0, "h", 2, 0), Seen::New { missing: 0 });
        assert_eq!(s.counts.gaps, 3, "7, 8 and 9 never came");
        assert_eq!(s.observe(0, "h", 1, 8), Seen::Late);
        assert_eq!(s.observe(0, "h", 1, 8), Seen::Duplicate);
        assert_eq!(s.observe(0, "h", 1, 10), Seen::New { missing: 0 }, "past the last heartbeat: no hole");
        assert_eq!((s.counts.gaps, s.counts.late), (3, 1));
        // Without a heartbeat for the old epoch nothing is assumed.
        assert_eq!(s.observe(0, "g", 1, 0), Seen::New { missing: 0 });
        assert_eq!(s.observe(0, "g", 2, 0), Seen::New { missing: 0 });
        assert_eq!(s.counts.gaps, 3);
        // An old epoch's records read after the new one began close nothing.
        produced.note("k", 1, 50);
        assert_eq!(s.observe(0, "k", 2, 0), Seen::New { missing: 0 });
        assert_eq!(s.observe(0, "k", 1, 5), Seen::New { missing: 0 });
        assert_eq!(s.counts.gaps, 3);
    }
}
