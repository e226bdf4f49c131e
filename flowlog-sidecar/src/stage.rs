//! Final events the kernel staged per CPU (`FLOWLOG_STAGE`): a CPU sends
//! its stage to the ring buffer itself once it holds
//! [`flowlog_common::STAGE_EVENTS`] events, and the reader flushes the rest
//! before each drain, so staging delays a record by at most one drain
//! interval. A flush is the snapshot program run with
//! [`snapshot::FLUSH`] on the CPU (BPF_PROG_TEST_RUN pinned to it), only
//! for CPUs whose stage holds anything: one map read per drain at rest.

use std::sync::Arc;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use flowlog_common::{snapshot, StageHead, PROG_SNAPSHOT, STAGE_HEAD_MAP};
use tracing::warn;

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

    /// Sends every CPU's staged events to the ring buffer. A CPU whose stage
    /// was in use, or that found the ring full, keeps its events for the
    /// next flush (or sends them itself once its stage fills).
    pub fn flush(&mut self) {
        let Ok(heads) = self.heads.get(&0, 0) else { return };
        let Some(Ok(prog)) = self.ebpf.program(PROG_SNAPSHOT).map(TryInto::<&RawTracePoint>::try_into) else { return };
        for (cpu, head) in heads.iter().enumerate() {
            if head.count == 0 {
                continue;
            }
            let mut opts = RawTracePointRunOptions::new();
            opts.args[0] = snapshot::FLUSH;
            opts.cpu = Some(cpu as u32);
            match prog.test_run(opts).map(|r| r.return_value) {
                Ok(_) => {}
                // An offline CPU keeps its events until it comes back.
                Err(e) if !self.warned => {
                    self.warned = true;
                    warn!(cpu, staged = head.count, "flushing a CPU's staged flow events failed (logged once): {e}");
                }
                Err(_) => {}
            }
        }
    }
}
