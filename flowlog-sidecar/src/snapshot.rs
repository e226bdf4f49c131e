//! Interim records for long-lived connections.
//!
//! Every interim interval, user space lists the live sockets the kernel
//! tracks (the socket map) and, for each open longer than the interval, runs
//! the `flowlog_snapshot` program once through BPF_PROG_TEST_RUN with the
//! socket as its argument. The program reads the socket's counters exactly
//! like the close path and sends an INTERIM event through the same ring
//! buffer. No per-packet hook, no kprobes, and nothing at all for short flows.
//!
//! A pass is one syscall per socket (100 000 sockets: a fraction of a
//! second), so it runs on a blocking thread of its own ([`Passes`]) while
//! the capture loop keeps draining the ring. It is paced by the ring itself:
//! the program refuses ([`snapshot::BUSY`]) once the ring is half full, and
//! the pass then waits for the capture loop's next drain ([`Drains`]) and
//! asks again, so a pass never fills the ring and closes always find room.
//! It also waits while final events are parked (the ring was full at
//! close): the reader pops those once it has emptied the ring, which a pass
//! refilling it would otherwise put off for as long as passes run.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex, PoisonError,
    },
    time::Duration,
};

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{HashMap, IterableMap, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use flowlog_common::{snapshot, SockState, PROG_SNAPSHOT, SOCKS_MAP};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long a pass waits for a drain before giving up: the capture loop
/// drains every `drain_interval_ms` (at most 10 s), so only a stuck loop
/// takes this long.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// How many times the capture loop has drained the ring buffer: a pass that
/// found the ring half full waits for this to move.
#[derive(Default)]
pub struct Drains {
    count: Mutex<u64>,
    moved: Condvar,
    /// Sockets the running pass is about to snapshot, once it has listed
    /// them (0: none announced since the loop last looked).
    due: AtomicUsize,
}

impl Drains {
    /// Called by the capture loop after each drain.
    pub fn bump(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.moved.notify_all();
    }

    /// The running pass's socket count, once (see [`Passes::take_due`]).
    fn take_due(&self) -> Option<usize> {
        Some(self.due.swap(0, Ordering::Relaxed)).filter(|n| *n > 0)
    }

    fn current(&self) -> u64 {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a drain after `seen` has happened; false on timeout.
    fn wait_past(&self, seen: u64, timeout: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, waited) = self
            .moved
            .wait_timeout_while(count, timeout, |c| *c <= seen)
            .unwrap_or_else(PoisonError::into_inner);
        drop(count);
        !waited.timed_out()
    }
}

/// Runs snapshot passes: owns the socket map and shares the loaded program.
pub struct Snapshotter {
    socks: HashMap<MapData, u64, SockState>,
    /// Where the snapshot program lives (loaded, never attached).
    ebpf: Arc<Ebpf>,
    drains: Arc<Drains>,
    /// Interim records go to connections open at least this long.
    interval_ns: u64,
    /// A key-by-key listing stops after this many keys ([`Snapshotter::list_by_key`]).
    max_listed: usize,
}

/// CLOCK_MONOTONIC in ns (the kernel's bpf_ktime_get_ns clock).
fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make every socket look new.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// The BPF_MAP_*_BATCH part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every tracked socket and its start time, read some thousands at a time
/// with BPF_MAP_LOOKUP_BATCH (aya has no wrapper for it). Its cursor is a
/// bucket index, so sockets that close meanwhile do not restart the
/// listing, as they restart "next key" iteration.
fn list_batched(socks: &HashMap<MapData, u64, SockState>) -> std::io::Result<Vec<(u64, u64)>> {
    const CHUNK: usize = 4096;
    let fd = socks.map().fd().as_fd().as_raw_fd();
    let mut keys = vec![0u64; CHUNK];
    // SockState's bytes, as u64s: start_ns is the first.
    const WORDS: usize = std::mem::size_of::<SockState>() / 8;
    let mut values = vec![[0u64; WORDS]; CHUNK];
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut listed = Vec::new();
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &cursor_in as *const u32 as u64 },
            out_batch: &mut cursor_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: attr names buffers for CHUNK keys and CHUNK values of the
        // map's sizes (8 and 56 bytes) and two u32 cursors, all alive across
        // the call; the kernel writes at most `count` of each and the count.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(CHUNK);
        listed.extend(keys[..n].iter().zip(&values[..n]).map(|(&sk, v)| (sk, v[0])));
        match err {
            None => cursor_in = cursor_out,
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
        }
    }
    Ok(listed)
}

/// Loads the snapshot program (never attached) and takes the socket map;
/// [`Snapshotter::new`] gets them once `ebpf` is shared.
pub fn prepare(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<MapData, u64, SockState>> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(PROG_SNAPSHOT)
        .ok_or_else(|| anyhow::anyhow!("program {PROG_SNAPSHOT} missing"))?
        .try_into()?;
    prog.load()?;
    Ok(HashMap::try_from(ebpf.take_map(SOCKS_MAP).ok_or_else(|| anyhow::anyhow!("map {SOCKS_MAP} missing"))?)?)
}

impl Snapshotter {
    pub fn new(socks: HashMap<MapData, u64, SockState>, ebpf: Arc<Ebpf>, interval_ns: u64, max_sockets: u32) -> Snapshotter {
        Snapshotter {
            socks,
            ebpf,
            drains: Arc::default(),
            interval_ns,
            max_listed: 4 * max_sockets as usize,
        }
    }

    /// Tracked sockets open at least `min_age_ns` (unknown start: always).
    fn due(&self, min_age_ns: u64) -> Vec<u64> {
        let now = monotonic_ns();
        let listed = list_batched(&self.socks).unwrap_or_else(|e| {
            debug!("batched listing unavailable ({e}): listing key by key");
            self.list_by_key()
        });
        let mut due: Vec<u64> = listed
            .into_iter()
            .filter(|&(_, start_ns)| start_ns == 0 || now.saturating_sub(start_ns) >= min_age_ns)
            .map(|(sk, _)| sk)
            .collect();
        due.sort_unstable();
        due.dedup();
        due
    }

    /// The fallback (kernels before 5.6): "next key" restarts from the first
    /// bucket whenever the key it is given was deleted meanwhile (a short
    /// connection closing), so under churn it may repeat keys and never get
    /// far: bounded, deduplicated by the caller.
    fn list_by_key(&self) -> Vec<(u64, u64)> {
        self.socks.iter().take(self.max_listed).filter_map(|kv| kv.ok()).map(|(sk, st)| (sk, st.start_ns)).collect()
    }

    /// One pass: an interim event for every socket open longer than the
    /// interval (every socket when `all`). Blocks: run it off the capture
    /// loop, which must keep draining meanwhile. Returns the events sent.
    pub fn pass(&self, all: bool) -> Pass {
        let prog: &RawTracePoint = match self.ebpf.program(PROG_SNAPSHOT).map(TryInto::try_into) {
            Some(Ok(p)) => p,
            _ => {
                warn!("program {PROG_SNAPSHOT} missing: no interim records");
                return Pass::default();
            }
        };
        let due = self.due(if all { 0 } else { self.interval_ns });
        self.drains.due.store(due.len(), Ordering::Relaxed);
        let (mut sent, mut waits) = (0, 0u64);
        for sk in due {
            loop {
                // Read before the run: a drain that ends after the ring was
                // found busy moves the count past this.
                let seen = self.drains.current();
                let mut opts = RawTracePointRunOptions::new();
                opts.args[0] = sk;
                match prog.test_run(opts).map(|r| r.return_value) {
                    Ok(snapshot::SENT) => sent += 1,
                    Ok(snapshot::BUSY) => {
                        waits += 1;
                        if self.drains.wait_past(seen, DRAIN_WAIT) {
                            continue;
                        }
                        warn!(sent, "interim pass stopped: the ring buffer was not drained for {DRAIN_WAIT:?}");
                        return Pass { sent, complete: false };
                    }
                    Ok(_) => {} // closed meanwhile: its final record tells all
                    Err(e) => {
                        warn!(sent, "interim pass stopped: snapshot of a live socket failed: {e}");
                        return Pass { sent, complete: false };
                    }
                }
                break;
            }
        }
        debug!(sent, waits, all, "interim pass done");
        Pass { sent, complete: true }
    }
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pass {
    /// Interim events sent.
    pub sent: u64,
    /// Every due socket was snapshotted (a pass can stop early: the ring not
    /// drained in time, a failed run).
    pub complete: bool,
}

/// The snapshot passes as the capture loop drives them: at most one at a
/// time, each on a blocking thread.
pub struct Passes {
    idle: Option<Snapshotter>,
    running: Option<JoinHandle<(Snapshotter, Pass)>>,
    drains: Arc<Drains>,
}

impl Passes {
    pub fn new(snapshotter: Snapshotter) -> Passes {
        Passes { drains: snapshotter.drains.clone(), idle: Some(snapshotter), running: None }
    }

    /// Starts a pass (every socket when `all`), unless one is running;
    /// true when it started.
    pub fn start(&mut self, all: bool) -> bool {
        let Some(s) = self.idle.take() else {
            debug!("interim pass still running: this tick is skipped");
            return false;
        };
        self.running = Some(tokio::task::spawn_blocking(move || {
            let n = s.pass(all);
            (s, n)
        }));
        true
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Tells a waiting pass that the ring was drained.
    pub fn drained(&self) {
        self.drains.bump();
    }

    /// How many sockets the running pass is about to snapshot, once it has
    /// listed them: the capture loop sizes its interim baselines for them
    /// in one step before their records come (growing step by step held
    /// the old and new table at once: ~5 MB more at 200 000 sockets).
    pub fn take_due(&self) -> Option<usize> {
        self.drains.take_due()
    }

    /// What the running pass did, once it ends; never while none runs.
    pub async fn finished(&mut self) -> Pass {
        let Some(running) = self.running.as_mut() else { return std::future::pending().await };
        let done = running.await;
        self.running = None;
        match done {
            Ok((s, n)) => {
                self.idle = Some(s);
                n
            }
            Err(e) => {
                // The snapshotter is lost with its thread: no more passes.
                warn!("interim pass failed: {e}; no more interim records");
                Pass::default()
            }
        }
    }
}
