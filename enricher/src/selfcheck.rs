//! The attribution self-check. When both ends of a connection run a
//! sidecar, each writes a record of it, and the two share `flow_id`: one
//! record's remote attribution should name what the other record's local
//! attribution names (and vice versa). Each written FINAL record is held
//! here until its other half comes; the two are then compared, both ways:
//!
//! - `agree`: the same workload (a pod, container or unit: its key from
//!   [`workload_key`] on the same host);
//! - `agree_host`: the same host, where at least one side is known only as
//!   a host (its own IPs, a host-network workload);
//! - `disagree`: different workloads or hosts;
//! - `unattributed`: one of the two sides is not attributed;
//! - `one_sided`: no other half within the window (counted when it expires,
//!   or when the process stops):
//!   the other end runs no sidecar, or its record went to another enricher
//!   instance (the check is per instance: halves on partitions another
//!   instance owns never meet here), or the two ends' start times fell in
//!   different 10 s buckets of flow_id, or Service traffic (the client's
//!   record has the ClusterIP, the server's the pod IP: different 5-tuples);
//! - `evicted`: dropped at capacity ([`MAX_PENDING`]) before the window ended.
//!
//! Each pair counts twice (once per direction), labelled with the source
//! of the remote attribution checked; a lone half once. Only FINAL records
//! take part (a connection has exactly one per end; INTERIM snapshots
//! would pair up arbitrarily).

use std::{
    collections::{BTreeMap, VecDeque},
    hash::{BuildHasher, Hash},
    time::{Duration, Instant},
};

use flowlog_schema::{Attribution, EnrichedFlow, RecordType, Source};
use foldhash::{fast::FixedState, HashMap};

use crate::{metrics, sources::heartbeats::workload_key};

/// Records waiting for their other half, at most: ~100 bytes each
/// (map entry and expiry queue), so about 25 MB.
pub const MAX_PENDING: usize = 250_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Agree,
    AgreeHost,
    Disagree,
    Unattributed,
    OneSided,
    Evicted,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Agree => "agree",
            Verdict::AgreeHost => "agree_host",
            Verdict::Disagree => "disagree",
            Verdict::Unattributed => "unattributed",
            Verdict::OneSided => "one_sided",
            Verdict::Evicted => "evicted",
        }
    }
}

/// Who an attribution names, as hashes (8 bytes, not the strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    /// A host (its host_id; without one, its workload name).
    Host(u64),
    /// A workload on a host.
    Workload { host: u64, workload: u64 },
}

fn hash(v: impl Hash) -> u64 {
    FixedState::with_seed(0).hash_one(v)
}

fn who(a: &Attribution) -> Who {
    let Some(o) = &a.owner else { return Who::Nobody };
    let host = hash(o.host_id.as_deref().or(o.workload.as_deref()));
    match &o.held_by {
        Some(w) => Who::Workload { host, workload: hash(workload_key(w)) },
        None => Who::Host(host),
    }
}

/// One record's remote side (`remote`) against the other record's local
/// side (`local`).
fn compare(remote: Who, local: Who) -> Verdict {
    let host = |w| match w {
        Who::Host(h) | Who::Workload { host: h, .. } => h,
        Who::Nobody => 0,
    };
    match (remote, local) {
        (Who::Nobody, _) | (_, Who::Nobody) => Verdict::Unattributed,
        (Who::Workload { host: h1, workload: a }, Who::Workload { host: h2, workload: b }) => {
            if (h1, a) == (h2, b) {
                Verdict::Agree
            } else {
                Verdict::Disagree
            }
        }
        _ if host(remote) == host(local) => Verdict::AgreeHost,
        _ => Verdict::Disagree,
    }
}

/// A record waiting for its other half.
#[derive(Debug, Clone, Copy)]
struct Half {
    /// Which end wrote it: its host and local address and port.
    end: u64,
    local: Who,
    remote: Who,
    remote_source: Source,
    /// Its entry in the expiry queue.
    seq: u64,
}

pub struct SelfCheck {
    window: Duration,
    capacity: usize,
    /// By flow_id.
    waiting: HashMap<u64, Half>,
    /// (deadline, flow_id, seq) in arrival order; entries whose half has
    /// been matched stay until they reach the front (or a compaction).
    queue: VecDeque<(Instant, u64, u64)>,
    seq: u64,
    /// Verdicts not yet published, by (verdict, source).
    tally: BTreeMap<(Verdict, &'static str), u64>,
}

impl SelfCheck {
    /// A half waits `window` for the other.
    pub fn new(window: Duration, capacity: usize) -> SelfCheck {
        SelfCheck {
            window,
            capacity,
            waiting: HashMap::default(),
            queue: VecDeque::new(),
            seq: 0,
            tally: BTreeMap::new(),
        }
    }

    /// Records finalized (their attribution will not change again).
    pub fn observe(&mut self, records: &[EnrichedFlow], now: Instant) {
        for r in records.iter().filter(|r| r.flow.record_type == RecordType::Final) {
            self.observe_one(r, now);
        }
    }

    fn observe_one(&mut self, r: &EnrichedFlow, now: Instant) {
        let f = &r.flow;
        let end = hash((&r.host.identity.host_id, f.local_addr, f.local_port));
        let (local, remote) = (who(&r.local), who(&r.remote));
        if let Some(other) = self.waiting.get(&r.flow_id) {
            if other.end == end {
                return; // the same end again (a redelivered record)
            }
            let other = self.waiting.remove(&r.flow_id).expect("just seen");
            self.count(compare(other.remote, local), other.remote_source);
            self.count(compare(remote, other.local), r.remote.source);
            return;
        }
        if self.queue.len() >= 2 * self.capacity {
            let waiting = &self.waiting;
            self.queue.retain(|(_, id, seq)| waiting.get(id).is_some_and(|h| h.seq == *seq));
        }
        while self.waiting.len() >= self.capacity {
            let Some((_, id, seq)) = self.queue.pop_front() else { break };
            self.drop_waiting(id, seq, Verdict::Evicted);
        }
        self.seq += 1;
        let half = Half { end, local, remote, remote_source: r.remote.source, seq: self.seq };
        self.waiting.insert(r.flow_id, half);
        self.queue.push_back((now + self.window, r.flow_id, self.seq));
    }

    /// Removes the half queued as (`id`, `seq`) if it still waits, counted as `verdict`.
    fn drop_waiting(&mut self, id: u64, seq: u64, verdict: Verdict) {
        if self.waiting.get(&id).is_some_and(|h| h.seq == seq) {
            let h = self.waiting.remove(&id).expect("just seen");
            self.count(verdict, h.remote_source);
        }
    }

    fn count(&mut self, verdict: Verdict, source: Source) {
        *self.tally.entry((verdict, source.symbol())).or_default() += 1;
    }

    /// Halves whose window has passed are one-sided.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id, seq)) = self.queue.front() {
            if deadline > now {
                break;
            }
            self.queue.pop_front();
            self.drop_waiting(id, seq, Verdict::OneSided);
        }
    }

    /// Every waiting half is one-sided (the process stops).
    pub fn expire_all(&mut self) {
        while let Some((_, id, seq)) = self.queue.pop_front() {
            self.drop_waiting(id, seq, Verdict::OneSided);
        }
    }

    /// The verdicts since the last call.
    pub fn take(&mut self) -> BTreeMap<(Verdict, &'static str), u64> {
        std::mem::take(&mut self.tally)
    }

    /// Adds the verdicts since the last call to the metrics.
    pub fn publish(&mut self) {
        for ((verdict, source), n) in self.take() {
            ::metrics::counter!(metrics::SELFCHECK, "result" => verdict.label(), "source" => source).increment(n);
        }
        ::metrics::gauge!(metrics::SELFCHECK_PENDING).set(self.waiting.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flowlog_schema::{fixtures, Attrs, Direction, Flow, Host, Unattributed, Workload};

    use super::*;
    use crate::attribute::flow_id;

    fn pod(uid: &str) -> Arc<Workload> {
        Arc::new(Workload { pod_uid: Some(uid.into()), ..fixtures::pod_workload() })
    }

    fn host_attr(host: &str) -> Attribution {
        Attribution::of(&Arc::new(Attrs { host_id: Some(host.into()), ..Attrs::default() }), Source::Sidecar)
    }

    fn pod_attr(host: &str, uid: &str, source: Source) -> Attribution {
        let a = Attrs { host_id: Some(host.into()), held_by: Some(pod(uid)), ..Attrs::default() };
        Attribution::of(&Arc::new(a), source)
    }

    /// The record of one end of the connection 10.1.0.5:40000 -> 10.1.0.6:443:
    /// the client's (on host "a") or the server's (on host "b").
    fn record(client: bool, local: Attribution, remote: Attribution) -> EnrichedFlow {
        let c = fixtures::flow();
        let (ca, sa) = ([10, 1, 0, 5].into(), [10, 1, 0, 6].into());
        let flow = if client {
            Flow { local_addr: ca, remote_addr: sa, ..c }
        } else {
            Flow {
                direction: Direction::Server,
                local_addr: sa,
                local_port: c.remote_port,
                remote_addr: ca,
                remote_port: c.local_port,
                ..c
            }
        };
        let h = fixtures::host_with(if client { "a" } else { "b" }, "w", &[]);
        EnrichedFlow { flow_id: flow_id(&flow), host: Arc::new(Host::new(h)), flow, local, remote }
    }

    fn check(pairs: &[EnrichedFlow]) -> BTreeMap<(Verdict, &'static str), u64> {
        let mut c = SelfCheck::new(Duration::from_secs(10), 100);
        c.observe(pairs, Instant::now());
        c.take()
    }

    #[test]
    fn both_halves_are_compared_both_ways() {
        use Source::Sidecar;
        let (client_pod, server_pod) = (pod_attr("a", "uid-c", Sidecar), pod_attr("b", "uid-s", Sidecar));
        let agree = check(&[
            record(true, client_pod.clone(), server_pod.clone()),
            record(false, server_pod.clone(), client_pod.clone()),
        ]);
        assert_eq!(agree, BTreeMap::from([((Verdict::Agree, Sidecar.symbol()), 2)]));

        // The client thinks the server is another pod on the server's host.
        let wrong = check(&[
            record(true, client_pod.clone(), pod_attr("b", "uid-other", Sidecar)),
            record(false, server_pod.clone(), client_pod.clone()),
        ]);
        assert_eq!(wrong, BTreeMap::from([((Verdict::Agree, Sidecar.symbol()), 1), ((Verdict::Disagree, Sidecar.symbol()), 1)]));

        // Host-level on one end: agree_host when it is the same host.
        let host_level = check(&[
            record(true, host_attr("a"), server_pod.clone()),
            record(false, host_attr("b"), pod_attr("a", "uid-c", Sidecar)),
        ]);
        assert_eq!(host_level, BTreeMap::from([((Verdict::AgreeHost, Sidecar.symbol()), 2)]));

        // An unattributed remote side, labelled with its source (NONE).
        let none = check(&[
            record(true, client_pod.clone(), Attribution::none(Unattributed::UnknownIp)),
            record(false, server_pod.clone(), host_attr("x")),
        ]);
        assert_eq!(none, BTreeMap::from([((Verdict::Disagree, Sidecar.symbol()), 1), ((Verdict::Unattributed, Source::None.symbol()), 1)]));
    }

    /// A lone half is one-sided once its window has passed; the same end's
    /// record again (a redelivery) is not a second half; INTERIM records do
    /// not take part.
    #[test]
    fn lone_halves_expire_as_one_sided() {
        let mut c = SelfCheck::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let lone = record(true, host_attr("a"), pod_attr("b", "uid-s", Source::Sidecar));
        c.observe(&[lone.clone(), lone.clone()], t0);
        let interim = EnrichedFlow { flow: Flow { record_type: RecordType::Interim, ..record(false, host_attr("b"), host_attr("a")).flow }, ..lone.clone() };
        c.observe(&[interim], t0);
        c.expire(t0 + Duration::from_secs(9));
        assert!(c.take().is_empty());
        c.expire(t0 + Duration::from_secs(10));
        assert_eq!(c.take(), BTreeMap::from([((Verdict::OneSided, Source::Sidecar.symbol()), 1)]));
        // The other half after the window: a lone half itself.
        c.observe(&[record(false, host_attr("b"), host_attr("a"))], t0 + Duration::from_secs(11));
        assert!(c.take().is_empty());
        assert_eq!(c.waiting.len(), 1);
        // Stopping: what still waits is one-sided.
        c.expire_all();
        assert_eq!(c.take(), BTreeMap::from([((Verdict::OneSided, Source::Sidecar.symbol()), 1)]));
        assert!(c.waiting.is_empty() && c.queue.is_empty());
    }

    /// At capacity the oldest waiting half is dropped (evicted); the queue
    /// of matched halves is compacted, so memory stays bounded.
    #[test]
    fn memory_is_bounded() {
        let mut c = SelfCheck::new(Duration::from_secs(1000), 4);
        let t0 = Instant::now();
        let halves: Vec<EnrichedFlow> = (0..6u16)
            .map(|i| {
                let mut r = record(true, host_attr("a"), host_attr("b"));
                r.flow.local_port = 1000 + i;
                r.flow_id = flow_id(&r.flow);
                r
            })
            .collect();
        c.observe(&halves, t0);
        assert_eq!(c.waiting.len(), 4);
        assert_eq!(c.take(), BTreeMap::from([((Verdict::Evicted, Source::Sidecar.symbol()), 2)]));
        for round in 0..100u16 {
            let mut a = record(true, host_attr("a"), host_attr("b"));
            a.flow.local_port = 2000 + round;
            a.flow_id = flow_id(&a.flow);
            let host = Arc::new(Host::new(fixtures::host_with("b", "w", &[])));
            let b = EnrichedFlow { host, local: host_attr("b"), remote: host_attr("a"), ..a.clone() };
            c.observe(&[a, b], t0);
        }
        assert!(c.queue.len() <= 8, "{}", c.queue.len());
        // (The first pair's half made room for itself.)
        let want = [((Verdict::AgreeHost, Source::Sidecar.symbol()), 200), ((Verdict::Evicted, Source::Sidecar.symbol()), 1)];
        assert_eq!(c.take(), BTreeMap::from(want));
    }
}
