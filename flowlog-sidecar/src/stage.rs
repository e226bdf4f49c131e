//! Final events the kernel staged per CPU (`FLOWLOG_STAGE`): a CPU sends
//! its stage to the ring buffer itself once it holds
//! [`flowlog_common::STAGE_EVENTS`] events, and the reader flushes the rest
//! before each timed drain, so staging delays a record by at most one drain
//! interval. A flush is the snapshot program run with
//! [`snapshot::FLUSH`] on the CPU (BPF_PROG_TEST_RUN pinned to it), only
//! for CPUs whose stage holds anything: one map read per timed drain at rest.
//! Closes stage nothing until [`Stages::enable`] has flushed every CPU once:
//! a kernel that cannot run a program on a chosen CPU (before 5.10) keeps
//! sending each close to the ring buffer alone.

use std::sync::Arc;

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use flowlog_common::{snapshot, StageHead, PROG_SNAPSHOT, STAGE_HEAD_MAP};
use tracing::{info, warn};

pub struct Stages {
    heads: PerCpuArray<MapData, StageHead>,
    ebpf: Arc<Ebpf>,
    /// A flush that failed was logged once.
    warned: bool,
}

/// Takes the stage counts' map (before `ebpf` is shared).
pub fn take_heads(ebpf: &mut Ebpf) -> anyhow::Result<PerCpuArray<MapData, StageHead>> {
    let map = ebpf.take_map(STAGE_HEAD_MAP).ok_or_else(|| anyhow::anyhow!("map {STAGE_HEAD_MAP} missing"))?;
    Ok(PerCpuArray::try_from(map)?)
}

impl Stages {
    /// `ebpf` holds the loaded snapshot program ([`crate::snapshot::prepare`]).
    pub fn new(heads: PerCpuArray<MapData, StageHead>, ebpf: Arc<Ebpf>) -> Stages {
        Stages { heads, ebpf, warned: false }
    }

    /// Lets closes stage their events, once a flush has run on every CPU
    /// (there is nothing to flush yet: this checks that flushes work).
    pub fn enable(&mut self) {
        let cpus = match self.heads.get(&0, 0) {
            Ok(heads) => heads.len(),
            Err(e) => return warn!("final events not staged: reading the stage counts failed: {e}"),
        };
        // Online CPUs: one that comes online later flushes like the others.
        let online = match aya::util::online_cpus() {
            Ok(online) => online,
            Err((what, e)) => return warn!("final events not staged: reading {what} failed: {e}"),
        };
        let prog = match program(&self.ebpf) {
            Ok(prog) => prog,
            Err(e) => return warn!("final events not staged: {e}"),
        };
        for cpu in online {
            if let Err(e) = flush_cpu(prog, cpu) {
                // An offline CPU, or a kernel without BPF_F_TEST_RUN_ON_CPU.
                return info!(cpu, "final events go to the ring buffer one by one: flushing a CPU's stage failed: {e}");
            }
        }
        let on = StageHead { enabled: 1, ..StageHead::default() };
        let set = PerCpuValues::try_from(vec![on; cpus])
            .map_err(anyhow::Error::from)
            .and_then(|values| Ok(self.heads.set(0, values, 0)?));
        if let Err(e) = set {
            warn!("final events not staged: enabling the stages failed: {e}");
        }
    }

    /// Sends every CPU's staged events to the ring buffer. A CPU whose stage
    /// was in use, or that found the ring full, keeps its events for the
    /// next flush (or sends them itself once its stage fills).
    pub fn flush(&mut self) {
        let Ok(heads) = self.heads.get(&0, 0) else { return };
        let Ok(prog) = program(&self.ebpf) else { return };
        for (cpu, head) in heads.iter().enumerate() {
            if head.count == 0 {
                continue;
            }
            if let Err(e) = flush_cpu(prog, cpu as u32) {
                // An offline CPU keeps its events until it comes back.
                if !self.warned {
                    self.warned = true;
                    warn!(cpu, staged = head.count, "flushing a CPU's staged flow events failed (logged once): {e}");
                }
            }
        }
    }
}

/// The program a flush runs (the snapshot program, loaded by
/// [`crate::snapshot::prepare`]).
fn program(ebpf: &Ebpf) -> anyhow::Result<&RawTracePoint> {
    Ok(ebpf.program(PROG_SNAPSHOT).ok_or_else(|| anyhow::anyhow!("program {PROG_SNAPSHOT} missing"))?.try_into()?)
}

/// Runs the flush on `cpu`; its return value (SENT, or BUSY: try again at
/// the next drain) needs no action.
fn flush_cpu(prog: &RawTracePoint, cpu: u32) -> anyhow::Result<()> {
    let mut opts = RawTracePointRunOptions::new();
    opts.args[0] = snapshot::FLUSH;
    opts.cpu = Some(cpu);
    prog.test_run(opts)?;
    Ok(())
}
