//! The sidecar with receive packet steering on `lo`: in a test binary of
//! its own, because the setting is the whole host's loopback, and cargo
//! runs test binaries one after another (the capture tests assert exact
//! counts that steering can break, see README "Known limitations").

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Receive packet steering on `lo` (every CPU) while held; restores the
/// mask it found when dropped, also when the test fails.
struct LoopbackRps(String);

const LO_RPS: &str = "/sys/class/net/lo/queues/rx-0/rps_cpus";

impl LoopbackRps {
    fn on(cpus: usize) -> LoopbackRps {
        let old = std::fs::read_to_string(LO_RPS).expect("lo's rps_cpus");
        let mask = (1u64 << cpus.min(63)) - 1;
        std::fs::write(LO_RPS, format!("{mask:x}")).expect("setting lo's rps_cpus");
        LoopbackRps(old.trim().to_string())
    }
}

impl Drop for LoopbackRps {
    fn drop(&mut self) {
        let _ = std::fs::write(LO_RPS, &self.0);
    }
}

/// With packets steered between CPUs (RPS, here on `lo`), a softirq often
/// interrupts the program's run in process context on the other CPU, and
/// the kernel does not run the program for the state changes it makes
/// (recursion misses; ~1 in 200 connections here). The closes among them
/// are reported when their sockets are destroyed, with their exact bytes,
/// and none is reported twice.
///
/// Not asserted: that every connection is reported. On the development
/// VMs a few flows (0-11 in 8 000) are lost with no recursion miss
/// counted: the kernel runs no program while the VM agent's threads are
/// the current task, and steered packets often close sockets in softirqs
/// on top of them (README, "Known limitations"); the count is printed. The
/// sockets those losses leave in the table, and whose addresses new
/// sockets take, are counted as stale and not inherited (the per-record
/// checks below would catch a record that inherited one).
#[test]
fn closes_the_program_missed_are_reported_at_destroy() {
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as usize;
    if !have_root() || cpus < 2 {
        return;
    }
    let rps = LoopbackRps::on(cpus);
    let metrics = format!("127.0.0.1:{}", flowlog_runtime::testkit::free_port());
    let sc = Sidecar::start(&["--attach", "tp-btf", "--metrics-listen", &metrics, "--stats-interval-secs", "1"]);
    // Misses are rare and random (0 to 50 in 8 000 connections here, once 3
    // in 28 000), so batches go on until the sidecar has reported a close at
    // destroy (its counter, published every second): at least 8 batches, and
    // for at most two minutes (one run here took a minute for 28 batches).
    let at_destroy_so_far = || flowlog_runtime::testkit::sample_at(&metrics, "flowlog_sidecar_closes_at_destroy_total");
    let mut runs: Vec<(u16, Vec<u16>)> = Vec::new();
    let t0 = std::time::Instant::now();
    while runs.len() < 8 || (at_destroy_so_far() < 1.0 && t0.elapsed() < Duration::from_secs(120)) {
        runs.push(short_connections(500));
    }
    drop(rps);
    let servers: Vec<u16> = runs.iter().map(|(s, _)| *s).collect();
    let want = 2 * runs.iter().map(|(_, c)| c.len()).sum::<usize>();
    let ns = inode("/proc/self/ns/net");
    let mine = move |r: &Value| r["netns_ino"] == ns && servers.iter().any(|s| r["local_port"] == *s || r["remote_port"] == *s);
    // Every record due, or, for those a miss not reported at destroy lost,
    // until no more come for 2 s (steered packets can arrive late).
    let (t0, mut last, mut since) = (std::time::Instant::now(), 0, std::time::Instant::now());
    loop {
        let now = sc.records(|r| r.iter().filter(|x| mine(x)).count());
        if now >= want || since.elapsed() > Duration::from_secs(2) || t0.elapsed() > WAIT {
            break;
        }
        if now > last {
            (last, since) = (now, std::time::Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (records, stats) = sc.stop();
    let records: Vec<Value> = records.into_iter().filter(|x| mine(x)).collect();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (misses, at_destroy) = (n(&stats["program_recursion_misses"]), n(&stats["kernel"]["closed_at_destroy"]));
    assert!(at_destroy >= 1, "no close was reported at destroy ({misses} recursion misses): {stats:#}");
    assert!(misses >= at_destroy, "{stats:#}");
    assert!(records.len() <= want, "duplicates: {} records for {want}", records.len());
    for (server_port, clients) in &runs {
        check_short_records(&records, *server_port, clients, PerSide::AtMost, "with RPS");
    }
    let stale = n(&stats["kernel"]["stale_sockets"]);
    eprintln!("{} of {want} records ({} batches); {misses} recursion misses, {at_destroy} closes reported at destroy; {stale} stale sockets found", records.len(), runs.len());
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);
}
