//! The kernel's own counters for the attached program, read from its
//! descriptor's /proc/self/fdinfo entry (aya's `ProgramInfo` has no
//! recursion misses, and finding the program by id walked every program
//! loaded on the host at each stats tick).
//!
//! - run time and run count: only while `kernel.bpf_stats_enabled=1`;
//! - recursion misses, always counted: runs the kernel skipped because the
//!   program was already running on that CPU (a softirq's transition that
//!   interrupted a run in process context). The transition is lost; when it
//!   was a close, so is its flow. Exported so that no such loss is silent.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::programs::ProgramFd;
use serde::Serialize;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
    pub recursion_misses: u64,
}

/// Two programs' counters together.
impl std::ops::Add for ProgramStats {
    type Output = ProgramStats;
    fn add(self, o: ProgramStats) -> ProgramStats {
        ProgramStats {
            run_time_ns: self.run_time_ns + o.run_time_ns,
            run_count: self.run_count + o.run_count,
            recursion_misses: self.recursion_misses + o.recursion_misses,
        }
    }
}

impl ProgramStats {
    /// The counters of `fd`'s program now.
    pub fn read(fd: &ProgramFd) -> io::Result<ProgramStats> {
        let fd = fd.as_fd().as_raw_fd();
        Ok(ProgramStats::parse(&std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?))
    }

    /// The counters in a program's fdinfo text (absent ones stay 0: a
    /// kernel before 5.12 has no recursion_misses line).
    pub fn parse(fdinfo: &str) -> ProgramStats {
        let mut s = ProgramStats::default();
        for line in fdinfo.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let Ok(value) = value.trim().parse::<u64>() else { continue };
            match key {
                "run_time_ns" => s.run_time_ns = value,
                "run_cnt" => s.run_count = value,
                "recursion_misses" => s.recursion_misses = value,
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fdinfo of a BPF program as Linux 6.18 writes it.
    #[test]
    fn parses_a_programs_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2075\nprog_type:\t26\nprog_jited:\t1\n\
                    prog_tag:\t59ef7d5dccfb1366\nmemlock:\t12288\nprog_id:\t551\nrun_time_ns:\t1234567\n\
                    run_cnt:\t890\nrecursion_misses:\t3\nverified_insns:\t4242\n";
        assert_eq!(ProgramStats::parse(text), ProgramStats { run_time_ns: 1_234_567, run_count: 890, recursion_misses: 3 });
        // Before 5.12: no recursion_misses line.
        assert_eq!(ProgramStats::parse("run_time_ns:\t5\nrun_cnt:\t2\n"), ProgramStats { run_time_ns: 5, run_count: 2, recursion_misses: 0 });
        assert_eq!(ProgramStats::parse("garbage\nrun_cnt: x\n"), ProgramStats::default());
    }
}
