//! Reads flow events from the ring buffer and hands records to the output.
//!
//! The kernel wakes the reader only when enough bytes are waiting (batched
//! wake-ups); otherwise the reader drains on a short timer. Both paths call
//! the same `drain`.

use std::{io::Write, time::Duration};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use flowlog_common::{stat, FlowEvent, EVENTS_MAP, STATS_MAP};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, warn};

use crate::{
    flow::{Clock, FlowRecord},
    loader::Attached,
    output::Printer,
};

/// Counters kept by the eBPF program (summed over CPUs).
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct KernelCounters {
    pub events: u64,
    pub ringbuf_full: u64,
    pub sock_map_full: u64,
    pub listen_map_full: u64,
    pub read_errors: u64,
}

/// Counters kept by the reader.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct UserCounters {
    pub events_read: u64,
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
}

pub struct Capture<W: Write> {
    ring: AsyncFd<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    printer: Printer<W>,
    clock: Clock,
    pub user: UserCounters,
    last_reported: KernelCounters,
}

impl<W: Write> Capture<W> {
    pub fn new(ebpf: &mut Ebpf, printer: Printer<W>) -> anyhow::Result<Self> {
        let ring = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).ok_or_else(|| anyhow::anyhow!("map {EVENTS_MAP} missing"))?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(STATS_MAP).ok_or_else(|| anyhow::anyhow!("map {STATS_MAP} missing"))?)?;
        Ok(Capture {
            // SAFETY: the AsyncFd owns the ring buffer, so the fd outlives the registration.
            ring: unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the ring buffer with the runtime: {e}"))?,
            stats,
            printer,
            clock: Clock::now(),
            user: UserCounters::default(),
            last_reported: KernelCounters::default(),
        })
    }

    /// Reads everything waiting in the ring buffer.
    pub fn drain(&mut self) {
        let ring = self.ring.get_mut();
        let mut n = 0u64;
        while let Some(item) = ring.next() {
            n += 1;
            match FlowEvent::decode(&item) {
                Ok(ev) => {
                    tracing::trace!(?ev, "raw event");
                    let record = FlowRecord::from_event(&ev, &self.clock);
                    if let Err(e) = self.printer.write(&record) {
                        self.user.output_errors += 1;
                        error!("writing flow record failed: {e}");
                    }
                }
                Err(e) => {
                    self.user.decode_errors += 1;
                    warn!("dropping malformed ring-buffer record: {e}");
                }
            }
        }
        self.user.events_read += n;
        if n > 0 {
            if let Err(e) = self.printer.flush() {
                self.user.output_errors += 1;
                error!("flushing output failed: {e}");
            }
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
        ] {
            if cur > old {
                warn!(count = cur - old, total = cur, "{name}");
            }
        }
        debug!(?now, user = ?self.user, "counters");
        self.last_reported = now;
    }

    /// Runs until `shutdown` resolves, then drains what is left.
    pub async fn run(&mut self, drain_every: Duration, stats_every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(drain_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats_tick = tokio::time::interval(stats_every);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    match guard {
                        Ok(mut g) => g.clear_ready(),
                        Err(e) => { error!("ring buffer poll failed: {e}"); }
                    }
                    self.drain();
                }
                _ = tick.tick() => self.drain(),
                _ = stats_tick.tick() => self.report_drops(),
                _ = &mut shutdown => break,
            }
        }
        self.drain();
        self.report_drops();
    }

    pub fn final_stats(&self, ebpf: &Ebpf, attached: Attached) -> FinalStats {
        let (run_time, run_count) = ebpf
            .program(attached.program_name())
            .and_then(|p| p.info().ok())
            .map(|i| (i.run_time().as_nanos() as u64, i.run_count()))
            .unwrap_or((0, 0));
        FinalStats {
            attach: match attached {
                Attached::TpBtf => "tp_btf",
                Attached::Tracepoint => "tracepoint",
            },
            kernel: self.kernel_counters(),
            user: self.user,
            program_run_time_ns: run_time,
            program_run_count: run_count,
        }
    }
}
