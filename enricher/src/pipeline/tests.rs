//! The pipeline without a broker: real decoder, attribution and ownership
//! stores; in-process sinks and dead-letter queue that record what they get.

use std::sync::Mutex;

use flowlog_schema::{fixtures, DecodeError, Flow};

use super::*;
use crate::sources::ownership::{Change, Event};

const S: i64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600 * S;

/// A flow message of `host` to `remote`, ending at `end_ns` (the local side,
/// the host's own 10.0.0.1, is always attributed; 127.0.0.1 is too).
fn flow(host: &str, seq: i64, remote: [u8; 4], end_ns: i64) -> Vec<u8> {
    let mut h = fixtures::host();
    h.host_id = host.into();
    let f = Flow {
        sequence: seq,
        remote_addr: remote.into(),
        start_time_ns: Some(end_ns - S),
        end_time_ns: end_ns,
        ..fixtures::flow()
    };
    fixtures::flow_message(&h, &f)
}

/// A FlowBatch of Flow messages of `host` (as [`flow`] writes them),
/// each item the message without its header and host block.
fn batch_of(host: &str, msgs: &[&[u8]]) -> Vec<u8> {
    let mut h = fixtures::host();
    h.host_id = host.into();
    let block = h.encode();
    let mut w = flowlog_schema::BatchWriter::new(block.clone());
    for m in msgs {
        assert_eq!(&m[10..10 + block.len()], &block[..]);
        w.push_raw(&m[10 + block.len()..]);
    }
    let mut batch = Vec::new();
    w.finish(&mut batch);
    batch
}

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];
const NOBODY: [u8; 4] = [10, 7, 7, 7];

/// Dead letters as (offset, reason); refuses them all when `down`.
#[derive(Default)]
struct Letters {
    got: Mutex<Vec<(i64, String)>>,
    /// The messages sent, in order.
    payloads: Mutex<Vec<Vec<u8>>>,
    down: bool,
}

impl DeadLetters for Letters {
    fn send(&self, m: &Message, reason: &DecodeError) -> anyhow::Result<()> {
        anyhow::ensure!(!self.down, "broker down");
        self.got
            .lock()
            .unwrap()
            .push((m.offset, reason.to_string()));
        self.payloads.lock().unwrap().push(m.payload.to_vec());
        Ok(())
    }
}

/// Batches written as (partition, first, last, records); fails when `broken`.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<(i32, i64, i64, usize)>>,
    broken: bool,
}

impl Sink for Recorder {
    fn write(&self, p: i32, b: &Batch) -> anyhow::Result<()> {
        anyhow::ensure!(!self.broken, "disk full");
        self.got
            .lock()
            .unwrap()
            .push((p, b.first, b.last, b.records.len()));
        Ok(())
    }
}

struct Rig {
    pipeline: Pipeline,
    sources: Sources,
    letters: Arc<Letters>,
    t0: Now,
}

impl Rig {
    fn new(max_records: usize, max_age_secs: u64, late_window_secs: u64) -> Rig {
        let settings = Settings {
            max_records,
            max_age: Duration::from_secs(max_age_secs),
            late_window: Duration::from_secs(late_window_secs),
            max_held_records: 1_000,
        };
        let sources = Sources::default();
        let letters = Arc::new(Letters::default());
        Rig {
            pipeline: Pipeline::new(settings, sources.clone(), letters.clone()),
            sources,
            letters,
            t0: Now {
                instant: Instant::now(),
                unix_ns: T0,
            },
        }
    }

    /// `secs` after the rig's start.
    fn at(&self, secs: u64) -> Now {
        Now {
            instant: self.t0.instant + Duration::from_secs(secs),
            unix_ns: self.t0.unix_ns + secs as i64 * S,
        }
    }

    fn consume(&mut self, p: i32, offset: i64, payload: &[u8], now: Now) {
        let m = Message {
            partition: p,
            offset,
            key: None,
            payload,
        };
        self.pipeline.consume(&m, now).unwrap();
    }

    /// The due batches, finalized as before a write (their end agreed).
    fn take_due(&mut self, now: Now) -> Vec<(i32, Batch)> {
        let mut due = self.pipeline.due(now);
        for (_, b) in &mut due {
            self.pipeline.finalize(b);
        }
        due
    }

    /// The due batches as (partition, first, last, records).
    fn due(&mut self, now: Now) -> Vec<(i32, i64, i64, usize)> {
        let mut d: Vec<_> = self
            .take_due(now)
            .into_iter()
            .map(|(p, b)| (p, b.first, b.last, b.records.len()))
            .collect();
        d.sort();
        d
    }
}

#[test]
fn batches_roll_at_max_records_or_max_age() {
    let mut r = Rig::new(3, 10, 0);
    let now = r.at(0);
    for off in 0..2 {
        r.consume(0, off, &flow("h", off, LOOPBACK, T0), now);
    }
    r.consume(1, 50, &flow("h", 2, LOOPBACK, T0), now);
    assert_eq!(r.due(r.at(1)), vec![]);
    r.consume(0, 2, &flow("h", 3, LOOPBACK, T0), r.at(1));
    // Partition 0 is full; partition 1 waits for its age.
    assert_eq!(r.due(r.at(1)), vec![(0, 0, 2, 3)]);
    assert_eq!(r.due(r.at(9)), vec![]);
    assert_eq!(r.due(r.at(10)), vec![(1, 50, 50, 1)]);
    // The next message opens a new batch, aged from then.
    r.consume(0, 3, &flow("h", 4, LOOPBACK, T0), r.at(11));
    assert_eq!(r.due(r.at(20)), vec![]);
    assert_eq!(r.due(r.at(21)), vec![(0, 3, 3, 1)]);
}

/// A young flow with an unattributed side holds its batch back until late
/// metadata could have arrived; when the batch rolls, it is attributed
/// again. An old one does not wait.
#[test]
fn young_unattributed_flows_are_held_back_and_settled() {
    let mut r = Rig::new(1, 1, 10);
    // Ended 2 s before: held until 8 s from now.
    r.consume(0, 0, &flow("h", 0, NOBODY, T0 - 2 * S), r.at(0));
    // Ended a minute before: not held.
    r.consume(1, 0, &flow("h", 1, NOBODY, T0 - 60 * S), r.at(0));
    assert_eq!(r.due(r.at(1)), vec![(1, 0, 0, 1)]);
    assert_eq!(r.due(r.at(7)), vec![]);
    // The owner's heartbeat arrives late, but says it held the IP all along.
    r.sources.identity.write().unwrap().apply(Event {
        key: "owner".into(),
        time_ns: T0 - 600 * S,
        change: Change::Holds {
            owner: Arc::new(crate::sources::Attrs {
                workload: Some("late-owner".into()),
                ..Default::default()
            }),
            ips: vec!["10.7.7.7".parse().unwrap()],
        },
    });
    let mut due = r.take_due(r.at(8));
    assert_eq!(due.len(), 1);
    let (p, b) = due.pop().unwrap();
    assert_eq!((p, b.records.len()), (0, 1));
    let remote = &b.records[0].remote;
    assert!(remote.attributed());
    let owner = remote.owner.as_ref().unwrap();
    assert_eq!(owner.workload.as_deref(), Some("late-owner"));
}

/// Young unattributed flows keep coming: the batch still rolls at max age +
/// the late window, attributed as well as it can be.
#[test]
fn held_batches_wait_no_longer_than_max_age_plus_the_late_window() {
    let mut r = Rig::new(1000, 5, 10);
    for s in 0..15 {
        r.consume(
            0,
            s as i64,
            &flow("h", s as i64, NOBODY, r.at(s).unix_ns),
            r.at(s),
        );
        assert_eq!(r.due(r.at(s)), vec![], "rolled at {s} s");
    }
    assert_eq!(r.due(r.at(15)), vec![(0, 0, 14, 15)]);
}

#[test]
fn sequence_gaps_are_counted_per_host_and_epoch() {
    let mut g = Sequences::default();
    let new = |missing| Seen::New { missing };
    assert_eq!(g.observe(0, "a", 1, 0), new(0));
    assert_eq!(g.observe(0, "a", 1, 1), new(0));
    assert_eq!(g.observe(0, "b", 7, 40), new(0), "a host's first record");
    assert_eq!(g.observe(0, "a", 1, 5), new(3));
    assert_eq!(g.observe(0, "b", 7, 42), new(1));
    // A repeat is a duplicate, and the high-water mark stays where it was.
    assert_eq!(g.observe(0, "a", 1, 5), Seen::Duplicate);
    assert_eq!(g.observe(0, "a", 1, 0), Seen::Duplicate);
    assert_eq!(g.observe(0, "a", 1, 6), new(0));
    // Reordered: 3 comes after 6; it fills its hole, and 7 opens none.
    assert_eq!(g.observe(0, "a", 1, 3), Seen::Late);
    assert_eq!(g.observe(0, "a", 1, 3), Seen::Duplicate);
    assert_eq!(g.observe(0, "a", 1, 7), new(0));
    // The sidecar restarted: a new epoch starts afresh; the old one is kept.
    assert_eq!(g.observe(0, "a", 2, 0), new(0));
    assert_eq!(g.observe(0, "a", 2, 2), new(1));
    assert_eq!(g.observe(0, "a", 1, 7), Seen::Duplicate);
    // Below the first number seen of an epoch: no hole was counted there.
    assert_eq!(g.observe(0, "b", 7, 39), new(0));
    assert_eq!(g.observe(0, "b", 7, 39), Seen::Duplicate);
    assert_eq!(
        g.counts,
        Counts {
            gaps: 3 + 1 + 1,
            late: 1,
            duplicates: 5,
            evicted: 0
        }
    );
    // Sequences at the ends of the range of i64 do not overflow.
    assert_eq!(g.observe(0, "c", 0, i64::MIN), new(0));
    assert_eq!(g.observe(0, "c", 0, i64::MAX), new(u64::MAX - 1));
    assert_eq!(g.observe(0, "c", 0, i64::MAX), Seen::Duplicate);
    assert_eq!(g.observe(0, "c", 0, i64::MIN), Seen::Duplicate);
}

/// Consecutive numbers merge into one range however they arrive, so the
/// holes only cost memory; past the bounds the oldest are forgotten and
/// counted (a repeat of a forgotten record is then written again).
#[test]
fn sequence_tracking_is_bounded() {
    let mut g = Sequences::new(2, 5);
    // 0..=9 in a scrambled order: one range in the end.
    for seq in [0, 2, 4, 6, 8, 9, 7, 5, 3, 1] {
        assert_ne!(g.observe(0, "a", 1, seq), Seen::Duplicate, "{seq}");
    }
    for seq in 0..=9 {
        assert_eq!(g.observe(0, "a", 1, seq), Seen::Duplicate, "{seq}");
    }
    assert_eq!((g.counts.gaps, g.counts.late, g.counts.evicted), (4, 4, 0));
    // Holes: ranges [0, 9], [20], [30], [40], [50], then [60] is one too
    // many: the lowest goes, and with it the knowledge of 0..=9.
    for seq in [20, 30, 40, 50, 60] {
        g.observe(0, "a", 1, seq);
    }
    assert_eq!(g.counts.evicted, 1);
    assert_eq!(g.observe(0, "a", 1, 5), Seen::New { missing: 0 }, "forgotten");
    assert_eq!(g.counts.evicted, 2, "5 went in and out again");
    assert_eq!(g.observe(0, "a", 1, 21), Seen::Late, "a hole still known");
    assert_eq!(g.observe(0, "a", 1, 30), Seen::Duplicate);
    // A third host: the least recently seen one is forgotten.
    g.observe(0, "b", 1, 0);
    g.observe(0, "a", 1, 41);
    g.observe(0, "c", 1, 0);
    assert_eq!(g.counts.evicted, 2 + 1, "b's one range");
    assert_eq!(g.observe(0, "a", 1, 41), Seen::Duplicate);
    assert_eq!(g.observe(0, "b", 1, 0), Seen::New { missing: 0 });
    // Epochs: at most MAX_EPOCHS per host, the oldest goes first.
    let mut g = Sequences::default();
    for epoch in 0..=sequences::MAX_EPOCHS as i64 {
        g.observe(0, "a", epoch, 0);
    }
    assert_eq!(g.counts.evicted, 1);
    assert_eq!(g.observe(0, "a", 0, 0), Seen::New { missing: 0 }, "not tracked");
    assert_eq!(g.observe(0, "a", 1, 0), Seen::Duplicate);
}

/// The sidecar sends records again (a replayed spool) and late (failed
/// deliveries replayed after newer records): each record is written once,
/// the repeats' offsets still move the batch on, and a late record is no
/// gap in the end.
#[test]
fn duplicates_are_dropped_and_late_records_written_once() {
    let mut r = Rig::new(100, 10, 0);
    let now = r.at(0);
    let sequences = [0, 1, 2, 5, 6, 3, 4, 5, 6, 7, 0, 1];
    for (off, seq) in sequences.into_iter().enumerate() {
        r.consume(0, off as i64, &flow("h", seq, LOOPBACK, T0), now);
    }
    let mut due = r.take_due(r.at(10));
    let (p, b) = due.pop().unwrap();
    assert_eq!((p, b.first, b.last), (0, 0, 11));
    let written: Vec<i64> = b.records.iter().map(|e| e.flow.sequence).collect();
    assert_eq!(written, vec![0, 1, 2, 5, 6, 3, 4, 7]);
    let c = r.pipeline.sequence_counts();
    assert_eq!((c.duplicates, c.gaps, c.late), (4, 2, 2));
    assert_eq!(c.gaps - c.late, 0, "no hole left open");
    // A batch of duplicates only still commits its offsets.
    r.consume(0, 12, &flow("h", 7, LOOPBACK, T0), r.at(11));
    assert_eq!(r.due(r.at(21)), vec![(0, 12, 12, 0)]);
    assert_eq!(r.pipeline.sequence_counts().duplicates, 5);
}

/// A partition taken away takes its hosts' sequence numbers with it: if its
/// batch could not be written then, reading it again (here this process
/// gets it back) writes the records rather than drop them as repeats.
#[test]
fn a_revoked_partition_forgets_its_hosts() {
    let mut r = Rig::new(100, 10, 0);
    r.pipeline.assign(0, -1);
    r.consume(0, 0, &flow("h", 0, LOOPBACK, T0), r.at(0));
    r.consume(1, 0, &flow("other", 0, LOOPBACK, T0), r.at(0));
    // Handed over, but its write fails: nothing committed.
    assert_eq!(r.pipeline.revoke(0).pop().unwrap().records.len(), 1);
    r.pipeline.assign(0, -1);
    r.consume(0, 0, &flow("h", 0, LOOPBACK, T0), r.at(1));
    r.consume(1, 1, &flow("other", 0, LOOPBACK, T0), r.at(1));
    assert_eq!(r.due(r.at(11)), vec![(0, 0, 0, 1), (1, 0, 1, 1)]);
    assert_eq!(r.pipeline.sequence_counts().duplicates, 1, "only partition 1's");
}

/// Resuming a partition: offsets the files already hold are skipped, a
/// rolled batch commits the offset after its last, and what was committed
/// is not read into a batch again.
#[test]
fn exactly_once_bookkeeping() {
    let mut r = Rig::new(3, 10, 0);
    // The state file says offsets up to 9 are in files.
    r.pipeline.assign(0, 9);
    for off in 8..=12 {
        r.consume(0, off, &flow("h", off, LOOPBACK, T0), r.at(0));
    }
    let mut due = r.take_due(r.at(0));
    let (p, b) = due.pop().unwrap();
    assert_eq!((p, b.first, b.last, b.records.len()), (0, 10, 12, 3));
    let sinks: Vec<Arc<dyn Sink>> =
        vec![Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let mut committed = None;
    write(&sinks, p, &b, |p, next| {
        committed = Some((p, next));
        Ok(())
    })
    .unwrap();
    assert_eq!(committed, Some((0, 13)));
    r.pipeline.written(p, b.last);
    assert_eq!(r.pipeline.done_through(0), Some(12));
    // Redelivered (the consumer went back to the last commit) and new.
    for off in 11..=13 {
        r.consume(0, off, &flow("h", off, LOOPBACK, T0), r.at(1));
    }
    let open = r.pipeline.drain();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].1.first, open[0].1.last, open[0].1.records.len()),
        (13, 13, 1)
    );

    // Revoked: the open batch is handed over and the partition forgotten.
    r.consume(0, 14, &flow("h", 14, LOOPBACK, T0), r.at(2));
    let b = r.pipeline.revoke(0).pop().unwrap();
    assert_eq!((b.first, b.last), (14, 14));
    assert_eq!(r.pipeline.done_through(0), None);
    assert!(r.pipeline.revoke(0).is_empty());
}

/// A batch some sink could not take is not committed, and later sinks do
/// not get it.
#[test]
fn a_failed_sink_commits_nothing() {
    let mut r = Rig::new(1, 10, 0);
    r.consume(0, 0, &flow("h", 0, LOOPBACK, T0), r.at(0));
    let (p, b) = r.take_due(r.at(0)).pop().unwrap();
    let (first, broken, last) = (
        Arc::new(Recorder::default()),
        Arc::new(Recorder {
            broken: true,
            ..Default::default()
        }),
        Arc::new(Recorder::default()),
    );
    let sinks: Vec<Arc<dyn Sink>> = vec![first.clone(), broken, last.clone()];
    let err = write(&sinks, p, &b, |_, _| panic!("committed")).unwrap_err();
    assert_eq!(err.to_string(), "disk full");
    assert_eq!(first.got.lock().unwrap().len(), 1);
    assert!(last.got.lock().unwrap().is_empty());
}

/// Messages that do not decode go to the dead-letter queue with the reason,
/// and still count in their batch's offsets (committed with it).
#[test]
fn rejects_go_to_the_dead_letter_queue_within_their_batch() {
    let mut r = Rig::new(10, 1, 0);
    let good = flow("h", 0, LOOPBACK, T0);
    r.consume(0, 0, b"garbage", r.at(0));
    r.consume(0, 1, &good, r.at(0));
    r.consume(0, 2, &good[..good.len() - 3], r.at(0));
    assert_eq!(
        *r.letters.got.lock().unwrap(),
        vec![
            (0, "not Avro single-object encoded".to_string()),
            (2, "truncated".to_string())
        ]
    );
    assert_eq!(r.due(r.at(1)), vec![(0, 0, 2, 1)]);
    // A batch of rejects only still moves the offsets on.
    r.consume(0, 3, b"garbage", r.at(2));
    assert_eq!(r.due(r.at(3)), vec![(0, 3, 3, 0)]);
}

/// A FlowBatch message: each record is its own. One that does not decode
/// goes to the dead-letter queue alone, with its batch message's offset;
/// the others are written, every one at that offset; a repeat of the whole
/// message (the sidecar sent it again) adds nothing. A batch whose framing
/// is broken goes to the dead-letter queue whole.
#[test]
fn the_records_of_a_batch_message_are_handled_one_by_one() {
    let mut r = Rig::new(100, 1, 0);
    let good: Vec<Vec<u8>> = (0..3).map(|seq| flow("h", seq, LOOPBACK, T0)).collect();
    let bad = good[1][..good[1].len() - 3].to_vec();
    let batch = batch_of("h", &[&good[0], &bad, &good[2]]);
    r.consume(0, 7, &batch, r.at(0));
    r.consume(0, 8, &batch, r.at(0));
    let mut torn = batch.clone();
    torn.pop();
    r.consume(0, 9, &torn, r.at(0));
    assert_eq!(
        *r.letters.got.lock().unwrap(),
        vec![(7, "truncated".to_string()), (8, "truncated".to_string()), (9, "truncated".to_string())]
    );
    // The bad record went alone, as the whole Flow message it was; the torn
    // batch whole.
    assert_eq!(*r.letters.payloads.lock().unwrap(), [bad.clone(), bad, torn]);
    let mut due = r.take_due(r.at(1));
    let (p, b) = due.pop().unwrap();
    assert_eq!((p, b.first, b.last), (0, 7, 9));
    assert_eq!(b.records.iter().map(|e| e.flow.sequence).collect::<Vec<_>>(), [0, 2]);
    assert_eq!(b.offsets, [7, 7]);
    assert_eq!(r.pipeline.sequence_counts().duplicates, 2);
}

/// The dead-letter queue refuses a message: consuming fails (the process
/// stops rather than commit past it).
#[test]
fn an_unavailable_dead_letter_queue_stops_the_pipeline() {
    let letters = Arc::new(Letters {
        down: true,
        ..Default::default()
    });
    let settings = Settings {
        max_records: 1,
        max_age: Duration::from_secs(1),
        late_window: Duration::ZERO,
        max_held_records: 1_000,
    };
    let mut p = Pipeline::new(settings, Sources::default(), letters);
    let m = Message {
        partition: 0,
        offset: 0,
        key: None,
        payload: b"garbage",
    };
    let err = p.consume(&m, Now::system()).unwrap_err();
    assert!(format!("{err:#}").contains("broker down"), "{err:#}");
}

/// A batch whose end an earlier attempt claimed elsewhere is split there
/// (the head is complete at once) or read on to it, whatever its age.
#[test]
fn an_agreed_end_splits_or_extends_a_batch() {
    let mut r = Rig::new(6, 10, 0);
    for off in 0..6 {
        r.consume(0, off, &flow("h", off, LOOPBACK, T0), r.at(0));
    }
    let (p, b) = r.pipeline.due(r.at(0)).pop().unwrap();
    assert_eq!((b.first, b.last), (0, 5));
    // Claimed before as 0..=2: the head is due now, 3..=5 stays open.
    r.pipeline.put_back(p, b, 2);
    assert_eq!(r.due(r.at(0)), vec![(0, 0, 2, 3)]);
    assert_eq!(r.due(r.at(1)), vec![]);
    let (p, b) = r.pipeline.due(r.at(10)).pop().unwrap();
    assert_eq!((b.first, b.last, b.offsets.clone()), (3, 5, vec![3, 4, 5]));
    // Claimed before as 3..=8: it waits for offset 8 past its age ...
    r.pipeline.put_back(p, b, 8);
    r.consume(0, 6, &flow("h", 6, LOOPBACK, T0), r.at(11));
    assert_eq!(r.due(r.at(30)), vec![]);
    // ... and offset 7 is missing (compacted): 9 completes it.
    r.consume(0, 9, &flow("h", 9, LOOPBACK, T0), r.at(31));
    let (p, b) = r.pipeline.due(r.at(31)).pop().unwrap();
    assert_eq!((b.first, b.last, b.records.len(), b.end), (3, 6, 4, Some(8)), "complete: offset 7 never comes");
    r.pipeline.put_back(p, b, 8);
    assert_eq!(r.due(r.at(31)), vec![(0, 3, 8, 4)]);
    assert_eq!(r.due(r.at(41)), vec![(0, 9, 9, 1)]);
}

/// Batches are cut between messages: the records of a FlowBatch message
/// stay in one, even past `max_records`, and an agreed end splits there.
#[test]
fn batches_are_cut_between_messages() {
    let mut r = Rig::new(2, 10, 0);
    let message = |seqs: std::ops::Range<i64>| {
        let msgs: Vec<Vec<u8>> = seqs.map(|seq| flow("h", seq, LOOPBACK, T0)).collect();
        batch_of("h", &msgs.iter().map(|m| &m[..]).collect::<Vec<_>>())
    };
    r.consume(0, 0, &message(0..3), r.at(0));
    r.consume(0, 1, &message(3..6), r.at(0));
    let (p, b) = r.take_due(r.at(0)).pop().unwrap();
    assert_eq!((b.first, b.last, b.records.len()), (0, 0, 3));
    // Claimed before as 0..=0: the rest, one message of 3, is not cut.
    r.pipeline.put_back(p, b, 0);
    assert_eq!(r.due(r.at(0)), vec![(0, 0, 0, 3)]);
    assert_eq!(r.due(r.at(0)), vec![(0, 1, 1, 3)]);
}

/// A batch that could not be written is tried again when its time comes,
/// before any later batch of its partition; other partitions go on.
#[test]
fn a_failed_batch_is_retried_before_later_ones() {
    let mut r = Rig::new(2, 10, 0);
    for off in 0..4 {
        r.consume(0, off, &flow("h", off, LOOPBACK, T0), r.at(0));
    }
    r.consume(1, 0, &flow("g", 0, LOOPBACK, T0), r.at(0));
    r.consume(1, 1, &flow("g", 1, LOOPBACK, T0), r.at(0));
    let mut due = r.take_due(r.at(0));
    due.sort_by_key(|(p, _)| *p);
    assert_eq!(due.iter().map(|(p, b)| (*p, b.first, b.last)).collect::<Vec<_>>(), [(0, 0, 1), (1, 0, 1)]);
    let (p, failed) = due.remove(0);
    r.pipeline.retry_later(p, failed, r.at(5).instant);
    assert!(r.pipeline.stalled(0));
    r.consume(0, 4, &flow("h", 4, LOOPBACK, T0), r.at(1));
    r.consume(0, 5, &flow("h", 5, LOOPBACK, T0), r.at(1));
    r.consume(1, 2, &flow("g", 2, LOOPBACK, T0), r.at(1));
    r.consume(1, 3, &flow("g", 3, LOOPBACK, T0), r.at(1));
    assert_eq!(r.due(r.at(2)), vec![(1, 2, 3, 2)], "partition 0 waits for its failed batch");
    assert_eq!(r.due(r.at(5)), vec![(0, 0, 1, 2)]);
    // Full batches are complete at once (at most max_records each) and
    // come one per partition per call, in order.
    assert_eq!(r.due(r.at(5)), vec![(0, 2, 3, 2)]);
    assert_eq!(r.due(r.at(5)), vec![(0, 4, 5, 2)]);
    // Finalized once: retried batches are not self-checked twice.
    let mut b = Batch::new(0, r.at(0).instant);
    r.pipeline.finalize(&mut b);
    assert!(b.finalized);
}

/// Young unattributed flows in more records than `max_held_records`: the
/// held batches are written now instead of waiting (memory stays bounded).
#[test]
fn held_batches_are_cut_short_past_the_memory_bound() {
    let mut r = Rig::new(10, 10, 60);
    r.pipeline.settings.max_held_records = 25;
    let young = r.at(0).unix_ns;
    for off in 0..20 {
        r.consume(0, off, &flow("h", off, NOBODY, young), r.at(0));
    }
    assert_eq!(r.due(r.at(11)), vec![], "under the bound: held (two full batches)");
    for off in 20..30 {
        r.consume(0, off, &flow("h", off, NOBODY, young), r.at(11));
    }
    assert_eq!(r.due(r.at(12)), vec![(0, 0, 9, 10)], "over it: the oldest held batch is written");
    assert_eq!(r.due(r.at(12)), vec![], "20 records: under the bound again, held");
    assert_eq!(r.due(r.at(60)), vec![(0, 10, 19, 10)], "until their wait is over");
}
