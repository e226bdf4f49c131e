//! Reads flow events from the ring buffer and hands records to the output.
//!
//! The kernel wakes the reader only when enough bytes are waiting (batched
//! wake-ups); otherwise the reader drains on a short timer. Both paths call
//! the same `drain`, which also pops the final events the kernel parked
//! while the ring buffer was full.

use std::{
    hash::BuildHasher,
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, MapError, PerCpuArray, Queue, RingBuf},
    programs::ProgramFd,
    Ebpf,
};
use flowlog_common::{stat, user::DecodeError, FlowEvent, EVENTS_MAP, FLOW_EVENT_SIZE, PARKED_MAP, STATS_MAP};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, error, warn};

use flowlog_schema::{Flow, RecordType};

use crate::{
    carry::Carry,
    flow::{flow_from_event, Clock, Comms},
    loader::Attached,
    program_stats::ProgramStats,
    metrics as m,
    sink::{Sink, Tick},
    snapshot::{Pass, Passes},
    stage::Stages,
    ticker::Ticker,
    workload::{self, addresses::Listing, FastMap, Resolver},
};

/// Events read from the ring buffer before they are sent (a quarter of the
/// default ring).
const DRAIN_BATCH: u64 = 8192;
/// Records are sent as soon as this many are read, while still in the
/// cache: converting a whole drain first (hundreds to thousands of ~300-byte
/// records) and sending it after read each back from memory, about 5% of
/// the capture's CPU and 6% with Kafka (alternating pairs). 16 and 64
/// measured the same.
const EMIT_CHUNK: usize = 16;

/// Periods of the main loop.
pub struct Timers {
    pub drain: Duration,
    pub stats: Duration,
    pub heartbeat: Duration,
    /// None: no interim records.
    pub interim: Option<Duration>,
}

/// A record as read from the kernel, before its counters become deltas:
/// continues an earlier run's connection, and goes to the carry file if it
/// holds a connection's running totals (or ends them). Apart from
/// [`Capture`] for the borrow of its decoded events.
fn carry_record(carry: &mut Option<Carry>, reported: &mut FastMap<i64, Counters>, flow: &mut Flow) {
    let Some(carry) = carry else { return };
    if let Some(gone) = carry.adopt(flow) {
        reported.remove(&gone);
    }
    // Between passes nothing is written: no lookup per flow.
    if !carry.in_round() {
        return;
    }
    if flow.record_type == RecordType::Interim || reported.contains_key(&flow.connection_id) {
        carry.note(flow);
    }
}

/// Counters kept by the eBPF program (summed over CPUs).
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct KernelCounters {
    pub events: u64,
    pub ringbuf_full: u64,
    pub sock_map_full: u64,
    pub listen_map_full: u64,
    pub read_errors: u64,
    /// Final events that waited in the parking queue (not lost).
    pub parked: u64,
    /// Closes the state-change program missed, reported at the socket's
    /// destroy instead (not lost).
    pub closed_at_destroy: u64,
    /// Entries of sockets whose close and destroy the kernel ran no program
    /// for (flows lost unseen), found when a new socket took the address.
    pub stale_sockets: u64,
}

/// Counters kept by the reader.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct UserCounters {
    pub events_read: u64,
    /// Events that came in a ring-buffer record with others (a CPU's
    /// staged finals, [`flowlog_common::Stage`]).
    pub batched_events: u64,
    pub decode_errors: u64,
    pub output_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct FinalStats {
    pub attach: &'static str,
    pub kernel: KernelCounters,
    pub user: UserCounters,
    /// From the kernel's program stats (only when kernel.bpf_stats_enabled=1).
    pub program_run_time_ns: u64,
    pub program_run_count: u64,
    /// Runs the kernel skipped: the program was already running on that
    /// CPU (always counted; see [`crate::program_stats`]).
    pub program_recursion_misses: u64,
    /// Local workload resolution (null when `workload.resolve = false`).
    pub workload: Option<workload::StatsReport>,
    /// Flows dropped as outside the capture scope (`[scope]`).
    pub out_of_scope: u64,
}

/// Whether a drain first flushes the CPUs' staged final events
/// ([`Stages::flush`], a program run on each CPU holding any). The timed
/// drains do, so a staged event waits at most one drain interval; a drain
/// woken by the ring's fill level, or continuing a full batch, need not:
/// about half the drains at ~14 000 connections/s here, each flush an
/// inter-processor call.
#[derive(Clone, Copy)]
enum Flush {
    Stages,
    No,
}

pub struct Capture {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Final events that found the ring buffer full, oldest first.
    parked: Queue<MapData, [u8; FLOW_EVENT_SIZE]>,
    stats: PerCpuArray<MapData, u64>,
    sink: Box<dyn Sink>,
    workloads: Resolver,
    pub clock: Clock,
    salt: u64,
    comms: Comms,
    pub user: UserCounters,
    last_reported: KernelCounters,
    /// Counters already reported in interim records, by connection id, so
    /// the next record carries only the delta. Looked up for every record:
    /// a fast hash (the ids are salted hashes already; SipHash was ~3% of
    /// the sidecar's CPU with Kafka).
    reported: FastMap<i64, Counters>,
    /// Records read and not sent yet (at most [`EMIT_CHUNK`], and those the
    /// workload resolver releases), kept between drains: growing it afresh
    /// each time copied every record once more (a Flow is ~300 bytes).
    pending: Vec<Flow>,
    /// The attached programs (the state-change one, and the one for the
    /// closes it missed if attached), for the kernel's counters of them.
    pub programs: Vec<ProgramFd>,
    /// The workloads' IPs: each change is announced at once (Kafka only).
    pub workload_ips: Option<watch::Receiver<Listing>>,
    /// Where `reported` survives a restart (see [`crate::carry`]).
    carry: Option<Carry>,
    /// The CPUs' staged final events, flushed before each timed drain.
    pub stages: Option<Stages>,
}

/// Hands records to the sink. Counters become deltas against what was
/// already reported for the connection (interim records). Apart from
/// [`Capture`] for the borrow of its decoded events, as [`carry_record`].
#[inline]
fn emit(sink: &mut dyn Sink, reported: &mut FastMap<i64, Counters>, user: &mut UserCounters, records: &mut [Flow]) {
    for record in records {
        let total = Counters::of(record);
        let prev = match record.record_type {
            // Most hosts have no interim records out: no lookup then.
            RecordType::Final if reported.is_empty() => None,
            RecordType::Final => reported.remove(&record.connection_id),
            RecordType::Interim => reported.insert(record.connection_id, total),
        };
        total.minus(&prev.unwrap_or_default()).set(record);
        if let Err(e) = sink.send(record) {
            user.output_errors += 1;
            error!("writing flow record failed: {e}");
        }
    }
}

impl Capture {
    pub fn new(ebpf: &mut Ebpf, sink: Box<dyn Sink>, workloads: Resolver) -> anyhow::Result<Self> {
        let ring = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).ok_or_else(|| anyhow::anyhow!("map {EVENTS_MAP} missing"))?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(STATS_MAP).ok_or_else(|| anyhow::anyhow!("map {STATS_MAP} missing"))?)?;
        let parked = Queue::try_from(ebpf.take_map(PARKED_MAP).ok_or_else(|| anyhow::anyhow!("map {PARKED_MAP} missing"))?)?;
        Ok(Capture {
            // SAFETY: the AsyncFd owns the ring buffer, so the fd outlives the registration.
            ring: unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the ring buffer with the runtime: {e}"))?,
            parked,
            stats,
            sink,
            workloads,
            clock: Clock::now(),
            salt: std::collections::hash_map::RandomState::new().hash_one(std::process::id()),
            comms: Comms::default(),
            user: UserCounters::default(),
            last_reported: KernelCounters::default(),
            reported: FastMap::default(),
            pending: Vec::new(),
            programs: Vec::new(),
            workload_ips: None,
            carry: None,
            stages: None,
        })
    }

    /// Continues the connections an earlier run reported interim records for.
    pub fn carry_over(&mut self, carry: Carry) {
        for last in carry.baselines() {
            self.reported.insert(last.connection_id, Counters::of(last));
        }
        self.carry = Some(carry);
    }

    /// Reads everything waiting in the ring buffer. Records go out with
    /// their workload, except those of cgroups not known yet, which a later
    /// drain sends (in order) once they are.
    pub fn drain(&mut self) {
        while self.drain_batch(Flush::Stages) {}
    }

    /// Reads and sends up to [`DRAIN_BATCH`] events; true when it read that
    /// many (more may wait). In batches, each sent before the next is read:
    /// what is not processed yet stays in the ring, where the kernel sees it
    /// (a snapshot pass waits while the ring is half full), memory stays
    /// bounded however many events wait, and the loop serves its timers
    /// between batches.
    fn drain_batch(&mut self, flush: Flush) -> bool {
        if let (Flush::Stages, Some(stages)) = (flush, &mut self.stages) {
            stages.flush();
        }
        let mut n = 0u64;
        let mut batched = 0u64;
        let mut pending = std::mem::take(&mut self.pending);
        let mut sent = false;
        let now = Instant::now();
        // One event into `pending`. Borrows only the assembly's fields, so
        // the events of a ring-buffer record are read where they lie.
        let mut take = |decoded: Result<&FlowEvent, &DecodeError>| match decoded {
            Ok(ev) => {
                tracing::trace!(?ev, "raw event");
                // Built in its slot: a push built the ~300-byte record aside
                // and copied it in (~5% of the capture's CPU).
                pending.reserve(1);
                let at = pending.len();
                pending.spare_capacity_mut()[0].write(flow_from_event(ev, &self.clock, self.salt, &mut self.comms));
                // SAFETY: slot `at` was initialised just above, within capacity.
                unsafe { pending.set_len(at + 1) };
                carry_record(&mut self.carry, &mut self.reported, pending.last_mut().expect("just pushed"));
                self.workloads.admit(now, &mut pending);
                // Order is kept: the resolver holds back a cgroup's later
                // records with its earlier ones.
                if pending.len() >= EMIT_CHUNK {
                    emit(&mut *self.sink, &mut self.reported, &mut self.user, &mut pending);
                    pending.clear();
                    sent = true;
                }
            }
            Err(e) => {
                self.user.decode_errors += 1;
                m::dropped("decode_error", 1);
                warn!("dropping malformed ring-buffer record: {e}");
            }
        };
        while n < DRAIN_BATCH {
            match self.ring.get_mut().next() {
                Some(item) => {
                    let before = n;
                    for decoded in FlowEvent::decode_record(&item) {
                        n += 1;
                        take(decoded.as_deref());
                    }
                    if n - before > 1 {
                        batched += n - before;
                    }
                }
                // Parked finals only once the ring is empty: an earlier event
                // of the same connection (an interim) went into the ring
                // before its final was parked, so it is read first.
                None => match self.parked.pop(0) {
                    Ok(bytes) => {
                        n += 1;
                        take(FlowEvent::decode(&bytes).as_deref());
                    }
                    Err(MapError::ElementNotFound) => break,
                    Err(e) => {
                        warn!("reading the parking queue failed: {e}");
                        break;
                    }
                },
            };
        }
        self.user.batched_events += batched;
        self.workloads.poll(now, &mut pending);
        self.user.events_read += n;
        if n > 0 {
            metrics::counter!(m::EVENTS_READ).increment(n);
        }
        self.emit_all(&mut pending, sent);
        pending.clear();
        self.pending = pending;
        n >= DRAIN_BATCH
    }

    /// Sends `records`, then flushes the sink if it got any record: these
    /// or, `sent`, some sent since the last flush (a drain's chunks).
    fn emit_all(&mut self, records: &mut [Flow], sent: bool) {
        if records.is_empty() && !sent {
            return;
        }
        emit(&mut *self.sink, &mut self.reported, &mut self.user, records);
        if let Err(e) = self.sink.flush() {
            self.user.output_errors += 1;
            error!("flushing output failed: {e}");
        }
    }

    pub fn kernel_counters(&self) -> KernelCounters {
        let get = |i: u32| -> u64 {
            self.stats.get(&i, 0).map(|v| v.iter().copied().sum()).unwrap_or(0)
        };
        KernelCounters {
            events: get(stat::EVENTS),
            ringbuf_full: get(stat::RINGBUF_FULL),
            sock_map_full: get(stat::SOCK_MAP_FULL),
            listen_map_full: get(stat::LISTEN_MAP_FULL),
            read_errors: get(stat::READ_ERRORS),
            parked: get(stat::PARKED),
            closed_at_destroy: get(stat::CLOSED_AT_DESTROY),
            stale_sockets: get(stat::STALE_SOCKETS),
        }
    }

    /// Logs drops that happened since the last report.
    pub fn report_drops(&mut self) {
        let now = self.kernel_counters();
        let prev = self.last_reported;
        for (name, cur, old) in [
            ("ring buffer full (flows lost)", now.ringbuf_full, prev.ringbuf_full),
            ("socket map full (flows reported without start/owner)", now.sock_map_full, prev.sock_map_full),
            ("listener map full", now.listen_map_full, prev.listen_map_full),
            ("kernel read errors", now.read_errors, prev.read_errors),
            ("sockets whose close the kernel ran no program for (flows lost unseen)", now.stale_sockets, prev.stale_sockets),
        ] {
            if cur > old {
                warn!(count = cur - old, total = cur, "{name}");
            }
        }
        debug!(?now, user = ?self.user, "counters");
        m::dropped("ringbuf_full", now.ringbuf_full - prev.ringbuf_full);
        m::degraded("sock_map_full", now.sock_map_full - prev.sock_map_full);
        metrics::counter!(m::LISTEN_MAP_FULL).absolute(now.listen_map_full);
        metrics::counter!(m::KERNEL_READ_ERRORS).absolute(now.read_errors);
        metrics::counter!(m::FLOWS_PARKED).absolute(now.parked);
        metrics::counter!(m::CLOSES_AT_DESTROY).absolute(now.closed_at_destroy);
        metrics::counter!(m::STALE_SOCKETS).absolute(now.stale_sockets);
        m::record_process();
        m::record_workloads(&self.workloads);
        // Run time/count non-zero only with kernel.bpf_stats_enabled=1.
        if let Some(p) = self.program_stats() {
            metrics::gauge!(m::BPF_RUN_TIME).set(p.run_time_ns as f64 / 1e9);
            metrics::counter!(m::BPF_RUN_COUNT).absolute(p.run_count);
            metrics::counter!(m::BPF_RECURSION_MISSES).absolute(p.recursion_misses);
        }
        self.sink.tick(Tick::Stats);
        self.last_reported = now;
    }

    /// Runs until `shutdown` resolves, then drains what is left. Every
    /// interim interval a snapshot pass (interim events for connections open
    /// longer than it) runs beside the loop, which keeps draining meanwhile.
    pub async fn run(&mut self, t: Timers, mut passes: Passes, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = match Ticker::new(t.drain) {
            Ok(t) => t,
            Err(e) => {
                error!("cannot create the drain timer: {e}");
                return;
            }
        };
        let mut stats_tick = tokio::time::interval(t.stats);
        let mut heartbeat = tokio::time::interval(t.heartbeat);
        heartbeat.tick().await;
        // IP changes (a new ENI, a moved address) are announced at once.
        let mut ip_check = tokio::time::interval(Duration::from_secs(5));
        let mut interim = tokio::time::interval(t.interim.unwrap_or(Duration::from_secs(3600)));
        interim.tick().await;
        tokio::pin!(shutdown);
        // The last drain read a full batch: drain again as soon as the
        // other branches had their turn.
        let mut more = false;
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    match guard {
                        Ok(mut g) => g.clear_ready(),
                        Err(e) => { error!("ring buffer poll failed: {e}"); }
                    }
                    more = self.drain_batch(Flush::No);
                    self.drained(&passes);
                }
                _ = tick.tick() => {
                    more = self.drain_batch(Flush::Stages);
                    self.drained(&passes);
                }
                _ = std::future::ready(()), if more => {
                    more = self.drain_batch(Flush::No);
                    self.drained(&passes);
                }
                _ = stats_tick.tick() => self.report_drops(),
                _ = heartbeat.tick() => self.sink.tick(Tick::Heartbeat),
                _ = ip_check.tick() => self.sink.tick(Tick::IdentityCheck),
                changed = changed(&mut self.workload_ips) => {
                    if changed {
                        self.sink.tick(Tick::WorkloadIps);
                    } else {
                        self.workload_ips = None;
                    }
                }
                _ = interim.tick(), if t.interim.is_some() => {
                    if passes.start(false) {
                        self.begin_round();
                    }
                }
                pass = passes.finished() => {
                    metrics::counter!(m::INTERIM_RECORDS).increment(pass.sent);
                    debug!(n = pass.sent, "interim snapshots sent");
                    // Every event of the pass is in the ring by now.
                    self.drain();
                    self.end_round(pass.complete);
                }
                _ = &mut shutdown => break,
            }
        }
        // Connections still open at exit get a last interim record: a pass
        // still running ends first, then one over every socket; the loop
        // drains meanwhile, and the drain below takes the last events.
        if t.interim.is_some() {
            let pass = self.drain_until(&mut passes, &mut tick).await;
            metrics::counter!(m::INTERIM_RECORDS).increment(pass.sent);
            self.drain();
            self.end_round(pass.complete);
            if passes.start(true) {
                self.begin_round();
            }
            let pass = self.drain_until(&mut passes, &mut tick).await;
            metrics::counter!(m::INTERIM_RECORDS).increment(pass.sent);
            self.drain();
            self.end_round(pass.complete);
        }
        self.drain();
        // Records still waiting for their cgroup's lookup get a last chance.
        let mut rest = Vec::new();
        self.workloads.finish(Duration::from_secs(1), &mut rest);
        self.emit_all(&mut rest, false);
        self.report_drops();
    }

    /// After each drain: a waiting pass may go on, and a pass that has
    /// listed its sockets gets their baselines' room reserved at once.
    fn drained(&mut self, passes: &Passes) {
        passes.drained();
        if let Some(n) = passes.take_due() {
            self.reported.reserve(n.saturating_sub(self.reported.len()));
        }
    }

    /// A snapshot pass starts: its interim records make the next carry file.
    fn begin_round(&mut self) {
        if let Some(c) = &mut self.carry {
            c.begin();
        }
    }

    /// Once every interim event of the pass has been read: the carry file is
    /// replaced only by a pass that covered every socket.
    fn end_round(&mut self, complete: bool) {
        if let Some(c) = &mut self.carry {
            if complete {
                c.commit();
            } else {
                c.abort();
            }
        }
    }

    /// Drains (on wake-ups, and at each of the loop's drain ticks) until the
    /// running snapshot pass ends; returns what it did (nothing when none
    /// runs).
    async fn drain_until(&mut self, passes: &mut Passes, tick: &mut Ticker) -> Pass {
        let mut more = true;
        while passes.is_running() {
            let flush = tokio::select! {
                guard = self.ring.readable_mut() => {
                    if let Ok(mut g) = guard {
                        g.clear_ready();
                    }
                    Flush::No
                }
                _ = tick.tick() => Flush::Stages,
                _ = std::future::ready(()), if more => Flush::No,
                n = passes.finished() => return n,
            };
            more = self.drain_batch(flush);
            self.drained(passes);
        }
        Pass::default()
    }

    /// The sink, for closing it once capture is over.
    pub fn into_sink(self) -> Box<dyn Sink> {
        self.sink
    }

    /// The kernel's counters of the attached programs, summed, if they can
    /// be read (if not, the metrics keep their last values).
    fn program_stats(&self) -> Option<ProgramStats> {
        if self.programs.is_empty() {
            return None;
        }
        self.programs.iter().try_fold(ProgramStats::default(), |sum, fd| Some(sum + ProgramStats::read(fd).ok()?))
    }

    pub fn final_stats(&self, attached: Attached) -> FinalStats {
        let program = self.program_stats().unwrap_or_default();
        FinalStats {
            attach: match attached {
                Attached::TpBtf => "tp_btf",
                Attached::Tracepoint => "tracepoint",
            },
            kernel: self.kernel_counters(),
            user: self.user,
            program_run_time_ns: program.run_time_ns,
            program_run_count: program.run_count,
            program_recursion_misses: program.recursion_misses,
            workload: self.workloads.enabled().then(|| self.workloads.report()),
            out_of_scope: self.workloads.stats().out_of_scope,
        }
    }
}

/// Waits for the next change of the workloads' IPs: false when no more
/// will come (the discovery thread is gone); never with none.
async fn changed(ips: &mut Option<watch::Receiver<Listing>>) -> bool {
    match ips {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Counters of one record: bytes sent/received; segments in/out and
/// retransmits, which the kernel counts in 32 bits. One is kept per
/// connection with an interim record (200 000 at once at scale), so it is
/// 32 bytes, not 40.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    bytes: [i64; 2],
    segs: [u32; 3],
}

impl Counters {
    fn of(f: &Flow) -> Counters {
        let small = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        Counters {
            bytes: [f.bytes_sent, f.bytes_received],
            segs: [small(f.segs_in), small(f.segs_out), small(f.retransmits)],
        }
    }
    fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            bytes: std::array::from_fn(|i| (self.bytes[i] - earlier.bytes[i]).max(0)),
            segs: std::array::from_fn(|i| self.segs[i].saturating_sub(earlier.segs[i])),
        }
    }
    fn set(&self, f: &mut Flow) {
        [f.bytes_sent, f.bytes_received] = self.bytes;
        [f.segs_in, f.segs_out, f.retransmits] = self.segs.map(i64::from);
    }
}
const _: () = assert!(std::mem::size_of::<Counters>() == 32);

#[cfg(test)]
mod tests {
    use super::*;

    /// Interim deltas: what the kernel counted since the last record, and
    /// the totals come back unchanged through the compact form.
    #[test]
    fn counters_give_deltas_and_keep_totals() {
        let flow = |b: [i64; 2], s: [i64; 3]| Flow {
            bytes_sent: b[0],
            bytes_received: b[1],
            segs_in: s[0],
            segs_out: s[1],
            retransmits: s[2],
            ..flowlog_schema::fixtures::flow()
        };
        let first = flow([5_000_000_000, 7], [u32::MAX as i64, 3, 0]);
        let later = flow([5_000_000_100, 9], [u32::MAX as i64, 10, 2]);
        let mut out = later.clone();
        Counters::of(&later).minus(&Counters::of(&first)).set(&mut out);
        assert_eq!(
            [out.bytes_sent, out.bytes_received, out.segs_in, out.segs_out, out.retransmits],
            [100, 2, 0, 7, 2]
        );
        let mut back = flow([0; 2], [0; 3]);
        Counters::of(&later).set(&mut back);
        assert_eq!(back, later);
        // Nothing goes below zero (a carry file from another boot).
        let mut none = first.clone();
        Counters::of(&first).minus(&Counters::of(&later)).set(&mut none);
        assert_eq!([none.bytes_sent, none.segs_out, none.retransmits], [0, 0, 0]);
    }
}
