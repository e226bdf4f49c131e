//! Interim records for long-lived connections.
//!
//! Every interim interval, user space lists the live sockets the kernel
//! tracks (the socket map) and, for each open longer than the interval, runs
//! the `flowlog_snapshot` program once through BPF_PROG_TEST_RUN with the
//! socket as its argument. The program reads the socket's counters exactly
//! like the close path and sends an INTERIM event through the same ring
//! buffer. No per-packet hook, no kprobes, and nothing at all for short flows.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::{
    maps::{HashMap, MapData},
    programs::RawTracePoint,
    Ebpf,
};
use flowlog_common::{SockState, PROG_SNAPSHOT, SOCKS_MAP};
use tracing::warn;

pub struct Snapshotter {
    socks: HashMap<MapData, u64, SockState>,
    prog_fd: RawFd,
    clock_now: fn() -> u64,
}

/// CLOCK_MONOTONIC in ns (the kernel's bpf_ktime_get_ns clock).
fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make every socket look new.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// The BPF_PROG_TEST_RUN part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl Snapshotter {
    /// Loads the snapshot program (never attached) and takes the socket map.
    /// The program fd stays owned by `ebpf`, which outlives this.
    pub fn new(ebpf: &mut Ebpf) -> anyhow::Result<Snapshotter> {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(PROG_SNAPSHOT)
            .ok_or_else(|| anyhow::anyhow!("program {PROG_SNAPSHOT} missing"))?
            .try_into()?;
        prog.load()?;
        let prog_fd = prog.fd()?.as_fd().as_raw_fd();
        let socks = HashMap::try_from(ebpf.take_map(SOCKS_MAP).ok_or_else(|| anyhow::anyhow!("map {SOCKS_MAP} missing"))?)?;
        Ok(Snapshotter { socks, prog_fd, clock_now: monotonic_ns })
    }

    /// Snapshots every tracked socket open at least `min_age_ns` (0: all).
    /// Returns how many interim events were requested.
    pub fn run(&mut self, min_age_ns: u64) -> u64 {
        let now = (self.clock_now)();
        let due: Vec<u64> = self
            .socks
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(_, st)| st.start_ns == 0 || now.saturating_sub(st.start_ns) >= min_age_ns)
            .map(|(sk, _)| sk)
            .collect();
        let mut n = 0;
        for sk in due {
            let ctx = [sk];
            let attr = TestRunAttr {
                prog_fd: self.prog_fd as u32,
                ctx_size_in: std::mem::size_of_val(&ctx) as u32,
                ctx_in: ctx.as_ptr() as u64,
                ..Default::default()
            };
            // SAFETY: attr is a valid BPF_PROG_TEST_RUN argument that lives across the call.
            let rc = unsafe {
                libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &attr as *const TestRunAttr, std::mem::size_of::<TestRunAttr>())
            };
            if rc < 0 {
                warn!("snapshot of a live socket failed: {}", std::io::Error::last_os_error());
                break;
            }
            // retval 0: an event was sent; 1: the socket closed meanwhile.
            if attr.retval == 0 {
                n += 1;
            }
        }
        n
    }
}
