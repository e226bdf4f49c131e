//! The sidecar on the real kernel: exact records for real connections.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::{workloads::Netns, *};
use flowlog_runtime::testkit::long_lived::{LongLived, Totals};
use serde_json::Value;

const CLIENT_BYTES: usize = 12_345;
const SERVER_BYTES: usize = 1_000_003;
const WAIT: Duration = Duration::from_secs(15);

fn read_to_end(s: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match s.read(&mut buf).expect("read") {
            0 => return n,
            k => n += k,
        }
    }
}

fn read_exact_n(s: &mut TcpStream, want: usize) {
    let mut buf = vec![0u8; want];
    s.read_exact(&mut buf).expect("read_exact");
}

/// What one exchange looked like from the test's side.
struct Exchange {
    server_addr: SocketAddr,
    client_addr: SocketAddr,
    server_tid: u32,
    client_tid: u32,
    client_closes_first: bool,
}

/// Client sends CLIENT_BYTES, server replies SERVER_BYTES. With
/// `client_closes_first` the client half-closes first (client ends in
/// FIN_WAIT2, server in LAST_ACK); otherwise the server closes first.
fn exchange(bind: &str, client_closes_first: bool, name: &str) -> Exchange {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv_name = format!("fl-srv-{name}");
    let bind = bind.to_string();
    let server = thread::Builder::new()
        .name(srv_name)
        .spawn(move || {
            let l = TcpListener::bind(bind).expect("bind");
            tx.send(l.local_addr().unwrap()).unwrap();
            let (mut c, _) = l.accept().expect("accept");
            if client_closes_first {
                assert_eq!(read_to_end(&mut c), CLIENT_BYTES);
            } else {
                read_exact_n(&mut c, CLIENT_BYTES);
            }
            c.write_all(&vec![b's'; SERVER_BYTES]).unwrap();
            drop(c);
            gettid()
        })
        .unwrap();
    let server_addr = rx.recv().unwrap();
    let client = thread::Builder::new()
        .name(format!("fl-cli-{name}"))
        .spawn(move || {
            let mut c = TcpStream::connect(server_addr).expect("connect");
            let me = c.local_addr().unwrap();
            c.write_all(&vec![b'c'; CLIENT_BYTES]).unwrap();
            if client_closes_first {
                c.shutdown(Shutdown::Write).unwrap();
            }
            assert_eq!(read_to_end(&mut c), SERVER_BYTES);
            drop(c);
            (me, gettid())
        })
        .unwrap();
    let (client_addr, client_tid) = client.join().unwrap();
    let server_tid = server.join().unwrap();
    Exchange { server_addr, client_addr, server_tid, client_tid, client_closes_first }
}

fn wait_pair(sc: &Sidecar, ex: &Exchange) {
    let (sp, cp) = (ex.server_addr.port(), ex.client_addr.port());
    sc.wait_for("client and server records", WAIT, |r| {
        !by_ports(r, cp, sp).is_empty() && !by_ports(r, sp, cp).is_empty()
    });
}

/// Checks both records of one exchange field by field.
fn check_pair(records: &[Value], ex: &Exchange, name: &str, netns: u64) {
    let (sp, cp) = (ex.server_addr.port(), ex.client_addr.port());
    let client = by_ports(records, cp, sp);
    let server = by_ports(records, sp, cp);
    assert_eq!(client.len(), 1, "client records: {client:#?}");
    assert_eq!(server.len(), 1, "server records: {server:#?}");
    let (c, s) = (&client[0], &server[0]);
    let pid = std::process::id();
    let family = if ex.server_addr.is_ipv6() { "ipv6" } else { "ipv4" };
    let cgroup = own_cgroup_id();

    assert_eq!(c["direction"], "client");
    assert_eq!(c["bytes_sent"], CLIENT_BYTES as u64);
    assert_eq!(c["bytes_received"], SERVER_BYTES as u64);
    assert_eq!(c["local_addr"], ex.client_addr.ip().to_string());
    assert_eq!(c["remote_addr"], ex.server_addr.ip().to_string());
    assert_eq!(c["pid"], pid);
    assert_eq!(c["tid"], ex.client_tid);
    assert_eq!(c["comm"], format!("fl-cli-{name}"));

    assert_eq!(s["direction"], "server");
    assert_eq!(s["bytes_sent"], SERVER_BYTES as u64);
    assert_eq!(s["bytes_received"], CLIENT_BYTES as u64);
    assert_eq!(s["local_addr"], ex.server_addr.ip().to_string());
    assert_eq!(s["remote_addr"], ex.client_addr.ip().to_string());
    // The server side names the process that listened, not the client that
    // happened to run the softirq on loopback.
    assert_eq!(s["pid"], pid);
    assert_eq!(s["tid"], ex.server_tid);
    assert_eq!(s["comm"], format!("fl-srv-{name}"));

    for r in [c, s] {
        assert_eq!(r["family"], family);
        assert_eq!(r["end_reason"], "normal", "{r:#}");
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["owner_source"], "open");
        assert_eq!(r["netns_ino"], netns);
        assert_eq!(r["cgroup_id"], cgroup);
        let start = r["start_time_ns"].as_u64().expect("start time");
        let end = r["end_time_ns"].as_u64().unwrap();
        assert!(end >= start);
        assert_eq!(r["duration_ns"].as_u64().unwrap(), end - start);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        assert!(now >= end && now - end < 120_000_000_000, "wall clock end {end} vs now {now}");
        assert!(r["segs_in"].as_u64().unwrap() > 0 && r["segs_out"].as_u64().unwrap() > 0);
        assert!(r["srtt_us"].as_u64().unwrap() > 0);
        assert_eq!(r["retransmits"], 0);
    }
    let path = |r: &Value| -> Vec<String> {
        r["state_path"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    // Whole paths: the transitions the program skips are filled in exactly.
    let (active, passive) = (["FIN_WAIT1", "FIN_WAIT2", "CLOSE"], ["CLOSE_WAIT", "LAST_ACK", "CLOSE"]);
    let (client_end, server_end) = if ex.client_closes_first { (active, passive) } else { (passive, active) };
    assert_eq!(path(c), [&["CLOSE", "SYN_SENT", "ESTABLISHED"][..], &client_end].concat(), "{c:#}");
    assert_eq!(path(s), [&["LISTEN", "SYN_RECV", "ESTABLISHED"][..], &server_end].concat(), "{s:#}");
}

fn netns_self() -> u64 {
    inode("/proc/self/ns/net")
}

/// These tests assert exact counts with no retransmission. Loopback beside
/// a loaded test run (two thousand parallel connections in this binary) can
/// fire a tail-loss probe, a real retransmit (seen: retransmits 1). So each
/// exchange runs in a network namespace of the test's own, where TLP and
/// early retransmit are off (/proc/sys/net is the calling thread's
/// namespace's); its records are told apart by the namespace's inode.
fn in_quiet_namespace<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    // Held until the exchange is over (the records are read after).
    let _quiet = LOOPBACK_BURSTS.read().unwrap_or_else(|e| e.into_inner());
    let want = inode(&ns.path());
    ns.run(move || {
        assert_eq!(inode("/proc/thread-self/ns/net"), want);
        std::fs::write("/proc/sys/net/ipv4/tcp_early_retrans", "0").expect("tcp_early_retrans in the test's namespace");
        f()
    })
}

/// Held shared by the exchanges whose records must show no retransmit
/// ([`in_quiet_namespace`]), and alone by the tests that open thousands of
/// connections at once. Under CI, `network_namespace_inode` once read
/// retransmits 1 while the scale test's 5 000 connections (and the
/// sidecar's passes over them) ran beside it on the two CPUs: a real
/// retransmit, not a misread counter, of an exchange starved past its
/// timeout. The counts stay exact; the bursts wait for the exchanges.
static LOOPBACK_BURSTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn loopback_burst() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOOPBACK_BURSTS.write().unwrap_or_else(|e| e.into_inner())
}

fn exact_counts(attach: &str, bind: &'static str, client_closes_first: bool, name: &'static str) {
    if !have_root() {
        return;
    }
    let ns = Netns::new(format!("flowlog-{name}-{}", std::process::id()));
    let want = inode(&ns.path());
    let sc = Sidecar::start(&["--attach", attach]);
    let ex = in_quiet_namespace(&ns, move || exchange(bind, client_closes_first, name));
    wait_pair(&sc, &ex);
    let (records, stats) = sc.stop();
    // Same loopback ports may exist in other namespaces; select ours by inode.
    let mine: Vec<Value> = records.into_iter().filter(|r| r["netns_ino"] == want).collect();
    check_pair(&mine, &ex, name, want);
    assert_eq!(stats["attach"], if attach == "tracepoint" { "tracepoint" } else { "tp_btf" });
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);
}

/// One test per attach mode, family and close order.
macro_rules! exact_counts_tests {
    ($($name:ident: $attach:literal, $addr:literal, $client_first:literal, $tag:literal;)+) => {
        $(
            #[test]
            fn $name() {
                exact_counts($attach, $addr, $client_first, $tag);
            }
        )+
    };
}

exact_counts_tests! {
    ipv4_exact_counts_tp_btf: "tp-btf", "127.0.0.1:0", true, "v4btf";
    ipv4_exact_counts_classic_tracepoint: "tracepoint", "127.0.0.1:0", false, "v4tp";
    ipv6_exact_counts: "auto", "[::1]:0", false, "v6";
    ipv6_client_closes_first: "auto", "[::1]:0", true, "v6cf";
}

/// A network namespace made by the test: the records carry its inode.
#[test]
fn network_namespace_inode() {
    if !have_root() {
        return;
    }
    let ns = Netns::new(format!("flowlog-t{}", std::process::id()));
    let want = inode(&ns.path());
    assert_ne!(want, netns_self());

    let sc = Sidecar::start(&[]);
    // The whole exchange runs from a thread inside the namespace, whose own
    // client/server threads inherit it.
    let ex = in_quiet_namespace(&ns, exchange_in_ns);
    wait_pair(&sc, &ex);
    let (records, _) = sc.stop();
    // Same loopback ports may exist in the root namespace; select ours by inode.
    let mine: Vec<Value> = records.into_iter().filter(|r| r["netns_ino"] == want).collect();
    check_pair(&mine, &ex, "netns", want);
}

/// exchange() spawns threads, which would start in the process's namespace;
/// here both ends must stay in the caller's namespace, so spawn them from a
/// thread that already switched (threads inherit the creator's namespace).
fn exchange_in_ns() -> Exchange {
    exchange("127.0.0.1:0", true, "netns")
}

#[test]
fn failed_connect_is_recorded() {
    if !have_root() {
        return;
    }
    let sc = Sidecar::start(&[]);
    // A port nobody listens on, held for the whole test: bound but not
    // listening, so the kernel refuses connections to it and no other
    // process can take it meanwhile (a closed "free" port could be).
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = holder.local_addr().unwrap().as_socket().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("fl-refused".into())
        .spawn(move || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let err = sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
            tx.send(sock.local_addr().unwrap().as_socket().unwrap().port()).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
    let _ = rx.recv();
    sc.wait_for("refused connect", WAIT, |r| r.iter().any(|x| x["remote_port"] == port && x["comm"] == "fl-refused"));
    let (records, _) = sc.stop();
    let mine: Vec<&Value> = records.iter().filter(|x| x["remote_port"] == port && x["comm"] == "fl-refused").collect();
    assert_eq!(mine.len(), 1, "{mine:#?}");
    let r = mine[0];
    assert_eq!(r["direction"], "client");
    assert_eq!(r["end_reason"], "failed_connect");
    assert_eq!(r["error"], "ECONNREFUSED");
    assert_eq!(r["bytes_sent"], 0);
    assert_eq!(r["bytes_received"], 0);
    assert_eq!(r["pid"], std::process::id());
    assert_eq!(r["state_path"], serde_json::json!(["CLOSE", "SYN_SENT", "CLOSE"]));
}

#[test]
fn reset_is_recorded() {
    if !have_root() {
        return;
    }
    let sc = Sidecar::start(&[]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = l.local_addr().unwrap().port();
    let client = thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", sp)).unwrap();
        c.write_all(&[7u8; 777]).unwrap();
        let mut ack = [0u8; 1];
        c.read_exact(&mut ack).unwrap();
        let cp = c.local_addr().unwrap().port();
        // SO_LINGER 0: close() sends a reset instead of a FIN.
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        cp
    });
    let (mut s, _) = l.accept().unwrap();
    read_exact_n(&mut s, 777);
    s.write_all(&[1]).unwrap();
    let cp = client.join().unwrap();
    // The server learns of the reset on its next read.
    let mut buf = [0u8; 16];
    let err = loop {
        match s.read(&mut buf) {
            Err(e) => break e,
            Ok(0) => panic!("expected a reset, got EOF"),
            Ok(_) => {}
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    drop(s);
    sc.wait_for("reset records", WAIT, |r| !by_ports(r, cp, sp).is_empty() && !by_ports(r, sp, cp).is_empty());
    let (records, _) = sc.stop();
    let c = by_ports(&records, cp, sp);
    let s = by_ports(&records, sp, cp);
    assert_eq!((c.len(), s.len()), (1, 1));
    assert_eq!(c[0]["end_reason"], "reset_sent");
    assert_eq!(c[0]["bytes_sent"], 777);
    assert_eq!(c[0]["bytes_received"], 1);
    assert_eq!(s[0]["end_reason"], "reset_received");
    assert_eq!(s[0]["error"], "ECONNRESET");
    assert_eq!(s[0]["bytes_received"], 777);
    assert_eq!(s[0]["bytes_sent"], 1);
}

/// One of the sidecar's maps, found by name among the BPF maps its process
/// holds (`/proc/PID/fdinfo`), so that a test can reach its socket table.
fn sidecar_map(pid: u32, name: &str) -> aya::maps::MapData {
    // The kernel keeps 15 bytes of a map's name.
    let short = &name[..name.len().min(15)];
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo").flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")).and_then(|v| v.trim().parse().ok()) else { continue };
        let map = aya::maps::MapData::from_id(id).expect("map by id");
        if map.info().expect("map info").name_as_str() == Some(short) {
            return map;
        }
    }
    panic!("the sidecar (pid {pid}) holds no map {name}");
}

/// A socket whose open the program did not see, at an address where the
/// table still holds an entry another socket left (its close and destroy
/// ran no program: README "Known limitations"), must not inherit that
/// entry's direction, start and owner. The test gives a live server socket
/// such an entry: a client socket's that ended in LAST_ACK, owned by
/// someone else, as a CI run with RPS met it (a server socket's open goes
/// unseen there, ~1 in 400). Its close is then recorded as first seen
/// there, with its own exact bytes, and the entry is counted as stale.
/// (Before, the record took the entry's direction and owner, and its bytes
/// sent were one short: the client's SYN taken out.)
#[test]
fn an_entry_left_at_a_reused_address_is_not_inherited() {
    use flowlog_common::{direction, flags, socktable, tcp_state, SockState, COMM_LEN};
    if !have_root() {
        return;
    }
    for attach in ["tp-btf", "tracepoint"] {
        let sc = Sidecar::start(&["--attach", attach]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sp = l.local_addr().unwrap().port();
        // The server socket's open is recorded under the owner of the
        // listener (this thread) before accept() returns it.
        let mut c = TcpStream::connect(("127.0.0.1", sp)).unwrap();
        let cp = c.local_addr().unwrap().port();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[1u8; 10]).unwrap();
        read_exact_n(&mut s, 10);
        s.write_all(&[2u8; 20]).unwrap();
        read_exact_n(&mut c, 20);

        let buckets: aya::maps::Array<_, socktable::SockBucket> = aya::maps::Array::try_from(aya::maps::Map::Array(sidecar_map(sc.pid(), flowlog_common::SOCK_BUCKETS_MAP))).unwrap();
        let mut slots: aya::maps::Array<_, socktable::SockSlot> = aya::maps::Array::try_from(aya::maps::Map::Array(sidecar_map(sc.pid(), flowlog_common::SOCK_SLOTS_MAP))).unwrap();
        let me = gettid();
        let mine: Vec<u32> = (0..buckets.len())
            .flat_map(|b| {
                let keys = buckets.get(&b, 0).unwrap().keys;
                (0..socktable::BUCKET_SLOTS).filter(move |&i| socktable::is_live(keys[i])).map(move |i| socktable::slot_index(b, i))
            })
            .filter(|&i| {
                let st = slots.get(&i, 0).unwrap().state;
                st.tid == me && st.direction == direction::SERVER && st.last_state() == tcp_state::SYN_RECV
            })
            .collect();
        assert_eq!(mine.len(), 1, "{attach}: the server socket in the table");
        let mut left = SockState { start_ns: 1, cgroup_id: 1, state_path: 0, tgid: 4242, tid: 4242, comm: [0; COMM_LEN], direction: direction::CLIENT, transitions: 0, flags: flags::OPEN_SEEN | flags::OWNER_AT_OPEN | flags::SYN_ACKED, netns_ino: 0 };
        left.comm[..5].copy_from_slice(b"stale");
        for st in [tcp_state::CLOSE, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK] {
            left.push_state(st);
        }
        slots.set(mine[0], socktable::SockSlot { state: left, _pad: 0 }, 0).unwrap();

        // The server closes first: ESTABLISHED -> FIN_WAIT1 finds the entry.
        drop(s);
        assert_eq!(read_to_end(&mut c), 0);
        drop(c);
        sc.wait_for("the client's record", WAIT, |r| !by_ports(r, cp, sp).is_empty() && !by_ports(r, sp, cp).is_empty());
        let (records, stats) = sc.stop();
        let (cr, sr) = (by_ports(&records, cp, sp), by_ports(&records, sp, cp));
        assert_eq!((cr.len(), sr.len()), (1, 1), "{attach}");
        let r = &sr[0];
        assert_eq!((r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()), (Some(20), Some(10)), "{attach}: {r}");
        assert_eq!(r["direction"], "unknown", "{attach}: {r}");
        // As for any socket first seen closing first (see
        // ownerless_flows_are_their_network_namespaces_pod): no owner.
        assert_eq!((r["pid"].as_u64(), &r["owner_source"]), (Some(0), &Value::from("unknown")), "{attach}: {r}");
        assert_eq!(r["start_time_ns"], Value::Null, "{attach}: {r}");
        assert_eq!(r["state_path"], serde_json::json!(["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]), "{attach}: {r}");
        let c0 = &cr[0];
        assert_eq!((c0["bytes_sent"].as_u64(), c0["bytes_received"].as_u64(), &c0["direction"]), (Some(10), Some(20), &Value::from("client")), "{attach}: {c0}");
        assert!(stats["kernel"]["stale_sockets"].as_u64() >= Some(1), "{attach}: {stats:#}");
    }
}

/// 2 000 connections open at the same time: each one is reported exactly
/// once per side with its own exact byte counts.
#[test]
fn two_thousand_parallel_connections() {
    if !have_root() {
        return;
    }
    raise_nofile();
    let _burst = loopback_burst();
    const N: usize = 2000;
    let sc = Sidecar::start(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server_port, clients) = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        sock.listen(4096).unwrap();
        sock.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(sock.into()).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Server: read to EOF, answer with twice as many bytes, close.
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(&vec![0u8; buf.len() * 2]).await.unwrap();
                });
            }
        });
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let cp = c.local_addr().unwrap().port();
                // Every connection is open before any of them sends.
                barrier.wait().await;
                let n = 100 + i;
                c.write_all(&vec![1u8; n]).await.unwrap();
                c.shutdown().await.unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.unwrap();
                assert_eq!(back.len(), 2 * n);
                (cp, n)
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        (port, clients)
    });
    let ports: std::collections::HashSet<u16> = clients.iter().map(|c| c.0).collect();
    assert_eq!(ports.len(), N);
    let count_mine = |r: &[Value]| {
        r.iter()
            .filter(|x| {
                (x["remote_port"] == server_port && ports.contains(&(x["local_port"].as_u64().unwrap() as u16)))
                    || (x["local_port"] == server_port && ports.contains(&(x["remote_port"].as_u64().unwrap() as u16)))
            })
            .count()
    };
    sc.wait_for("4 000 records", Duration::from_secs(30), |r| count_mine(r) >= 2 * N);
    let (records, stats) = sc.stop();
    assert_eq!(count_mine(&records), 2 * N, "duplicates");
    for (cp, n) in clients {
        let c = by_ports(&records, cp, server_port);
        let s = by_ports(&records, server_port, cp);
        assert_eq!((c.len(), s.len()), (1, 1), "port {cp}");
        assert_eq!((c[0]["bytes_sent"].as_u64(), c[0]["bytes_received"].as_u64()), (Some(n as u64), Some(2 * n as u64)));
        assert_eq!((s[0]["bytes_sent"].as_u64(), s[0]["bytes_received"].as_u64()), (Some(2 * n as u64), Some(n as u64)));
        assert_eq!(c[0]["direction"], "client");
        assert_eq!(s[0]["direction"], "server");
    }
    for k in ["ringbuf_full", "sock_map_full", "read_errors"] {
        assert_eq!(stats["kernel"][k], 0, "{k}");
    }
    assert_eq!(stats["user"]["decode_errors"], 0);
}

/// Held by the tests that count on interim passes coming on time: every
/// sidecar snapshots every socket of the host, and the scale test's 10 000
/// make a debug build's passes take seconds.
static INTERIM_PASSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A connection open longer than the interim interval gets interim records;
/// each record carries the delta since the previous one, so they sum to the
/// exact totals. A connection still open at SIGTERM gets a last interim record.
#[test]
fn long_lived_connections_get_exact_interim_records() {
    if !have_root() {
        return;
    }
    let _passes = INTERIM_PASSES.lock().unwrap_or_else(|e| e.into_inner());
    let sc = Sidecar::start(&["--interim-interval-secs", "1"]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = l.local_addr().unwrap().port();
    let srv = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(read_to_end(&mut s), 1_000 + 2_000);
        s.write_all(&[5u8; 777]).unwrap();
    });
    let mut c = TcpStream::connect(("127.0.0.1", sp)).unwrap();
    let cp = c.local_addr().unwrap().port();
    c.write_all(&[1u8; 1_000]).unwrap();
    // An interim pass reports both ends while only the first write is in.
    let interim = |r: &[Value], local, remote| by_ports(r, local, remote).iter().any(|x| x["record_type"] == "interim");
    sc.wait_for("interim records of both ends", WAIT, |r| interim(r, cp, sp) && interim(r, sp, cp));
    c.write_all(&[2u8; 2_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), 777);
    drop(c);
    srv.join().unwrap();

    // A second connection left open until the sidecar stops.
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let sp2 = l2.local_addr().unwrap().port();
    let mut open = TcpStream::connect(("127.0.0.1", sp2)).unwrap();
    let (mut open_srv, _) = l2.accept().unwrap();
    open.write_all(&[3u8; 4_321]).unwrap();
    read_exact_n(&mut open_srv, 4_321);
    // Reported by the last pass at the stop (every socket, whatever its age).
    let cp2 = open.local_addr().unwrap().port();

    wait_pair(&sc, &Exchange {
        server_addr: SocketAddr::from(([127, 0, 0, 1], sp)),
        client_addr: SocketAddr::from(([127, 0, 0, 1], cp)),
        server_tid: 0,
        client_tid: 0,
        client_closes_first: false,
    });
    let (records, _) = sc.stop();
    let sum = |recs: &[Value], key: &str| recs.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    for (local, remote, sent, received) in [(cp, sp, 3_000u64, 777u64), (sp, cp, 777, 3_000)] {
        let recs = by_ports(&records, local, remote);
        let interim: Vec<&Value> = recs.iter().filter(|r| r["record_type"] == "interim").collect();
        let finals: Vec<&Value> = recs.iter().filter(|r| r["record_type"] == "final").collect();
        assert!(!interim.is_empty(), "no interim record for {local}->{remote}: {recs:#?}");
        assert_eq!(finals.len(), 1);
        // One connection: all its records share the connection id.
        assert!(recs.iter().all(|r| r["connection_id"] == recs[0]["connection_id"]));
        assert_eq!(sum(&recs, "bytes_sent"), sent, "{recs:#?}");
        assert_eq!(sum(&recs, "bytes_received"), received, "{recs:#?}");
        // The first interim record saw only the first write.
        if local == cp {
            assert_eq!(interim[0]["bytes_sent"], 1_000);
        }
        assert_eq!(finals[0]["end_reason"], "normal");
        // Every state, including those the program does not look the socket
        // up for (filled in by the snapshot and at close).
        let path = |r: &Value| r["state_path"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>();
        let (open, closed) = if local == cp {
            (vec!["CLOSE", "SYN_SENT", "ESTABLISHED"], vec!["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"])
        } else {
            (vec!["LISTEN", "SYN_RECV", "ESTABLISHED"], vec!["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"])
        };
        assert_eq!(path(interim[0]), open, "{:#}", interim[0]);
        assert_eq!(path(finals[0]), closed, "{:#}", finals[0]);
    }
    // Still open at SIGTERM: interim records only, with what was exchanged.
    let open_recs = by_ports(&records, cp2, sp2);
    assert!(!open_recs.is_empty(), "open connection not reported at shutdown");
    assert!(open_recs.iter().all(|r| r["record_type"] == "interim"));
    assert_eq!(sum(&open_recs, "bytes_sent"), 4_321);
    drop(open);
}

/// Sends `n` bytes from `from` and reads them all at `to`.
fn send_across(from: &mut TcpStream, to: &mut TcpStream, n: usize) {
    from.write_all(&vec![9u8; n]).unwrap();
    read_exact_n(to, n);
}

/// A restart (a DaemonSet rollout) while connections stay open: the next run
/// continues each one (same connection id, start and owner) from the totals
/// the first run reported, so the records of both runs sum to the exact
/// bytes, the bytes sent while no sidecar ran included, and every
/// connection has one FINAL record.
#[test]
fn restart_continues_open_connections_exactly() {
    if !have_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("flowlog-carry-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let carry = dir.join("interim.carry");
    let args = ["--interim-interval-secs", "1", "--carry-file", carry.to_str().unwrap()];
    let sc = Sidecar::start(&args);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = l.local_addr().unwrap().port();
    // Odd sizes per connection and phase; (client, server) byte totals kept.
    let mut conns: Vec<(TcpStream, TcpStream, usize, usize)> = (0..8)
        .map(|_| {
            let c = TcpStream::connect(("127.0.0.1", sp)).unwrap();
            let (s, _) = l.accept().unwrap();
            (c, s, 0, 0)
        })
        .collect();
    let phase = |conns: &mut Vec<(TcpStream, TcpStream, usize, usize)>, k: usize| {
        for (i, (c, s, sent, received)) in conns.iter_mut().enumerate() {
            let (up, down) = (1_000 * k + 17 * i + 1, 7_001 * k + 3 * i);
            send_across(c, s, up);
            send_across(s, c, down);
            *sent += up;
            *received += down;
        }
    };
    let ports: Vec<u16> = conns.iter().map(|(c, ..)| c.local_addr().unwrap().port()).collect();
    phase(&mut conns, 1);
    // Every connection reported at least once by the first run.
    sc.wait_for("interim records of every connection", WAIT, |recs| {
        ports.iter().all(|&cp| recs.iter().any(|r| r["local_port"] == cp && r["record_type"] == "interim"))
    });
    phase(&mut conns, 2);
    let (first, _) = sc.stop();
    assert!(carry.exists(), "no carry file after a clean stop");
    // While no sidecar runs.
    phase(&mut conns, 3);
    let sc = Sidecar::start(&args);
    phase(&mut conns, 4);
    let totals: Vec<(u16, usize, usize)> = conns.iter().map(|(c, _, sent, received)| (c.local_addr().unwrap().port(), *sent, *received)).collect();
    for (c, s, ..) in conns.drain(..) {
        c.shutdown(Shutdown::Write).unwrap();
        let mut s = s;
        assert_eq!(read_to_end(&mut s), 0);
        drop(s);
        drop(c);
    }
    sc.wait_for("the final records of both sides", WAIT, |recs| {
        ports.iter().all(|&cp| {
            [(cp, sp), (sp, cp)].iter().all(|&(a, b)| recs.iter().any(|r| r["local_port"] == a && r["remote_port"] == b && r["record_type"] == "final"))
        })
    });
    let (second, _) = sc.stop();
    let all: Vec<Value> = first.into_iter().chain(second).collect();
    let sum = |recs: &[Value], key: &str| recs.iter().map(|r| r[key].as_u64().unwrap()).sum::<u64>();
    for (cp, sent, received) in totals {
        for (local, remote, direction, out, inn) in [(cp, sp, "client", sent, received), (sp, cp, "server", received, sent)] {
            let recs = by_ports(&all, local, remote);
            let finals: Vec<&Value> = recs.iter().filter(|r| r["record_type"] == "final").collect();
            assert_eq!(finals.len(), 1, "{recs:#?}");
            assert!(recs.iter().all(|r| r["connection_id"] == recs[0]["connection_id"]), "one connection id across both runs: {recs:#?}");
            assert!(recs.iter().all(|r| r["start_time_ns"] == recs[0]["start_time_ns"] && r["direction"] == direction), "{recs:#?}");
            assert_eq!(finals[0]["pid"], std::process::id(), "{recs:#?}");
            assert_eq!((sum(&recs, "bytes_sent"), sum(&recs, "bytes_received")), (out as u64, inn as u64), "{local}->{remote}: {recs:#?}");
            assert_eq!(finals[0]["end_reason"], "normal");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Not root: an unprivileged user with only CAP_BPF and CAP_PERFMON captures
/// flows; without them the sidecar says which capabilities it needs.
#[test]
fn runs_with_only_cap_bpf_and_cap_perfmon() {
    if !have_root() {
        return;
    }
    // A copy nobody can execute (the build tree may not be).
    let bin = std::env::temp_dir().join(format!("flowlog-sidecar-caps-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_flowlog-sidecar"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let caps = |set: &str| {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps=-all{set}"))
            .arg(format!("--ambient-caps=-all{set}"))
            .arg(format!("--bounding-set=-all{set}"))
            .arg(&bin)
            .args(["--output", "json", "--metrics-listen", "", "--drain-interval-ms", "20"]);
        c
    };
    // Without capabilities: a clear error, non-zero exit.
    let out = caps("").output().expect("run setpriv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_BPF") && err.contains("CAP_PERFMON"), "{err}");

    let mut child = caps(",+bpf,+perfmon")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        use std::io::BufRead;
        assert!(stderr.read_line(&mut line).unwrap() > 0, "sidecar exited before attaching");
        if line.contains("capturing TCP flows") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let reader = {
        let seen = seen.clone();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in stdout.lines().map_while(Result::ok) {
                seen.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        })
    };
    let (sp, cps) = short_connections(3);
    // Every connection's two records are out before the stop.
    let t0 = std::time::Instant::now();
    while !cps.iter().all(|&cp| {
        let r = seen.lock().unwrap();
        by_ports(&r, cp, sp).len() == 1 && by_ports(&r, sp, cp).len() == 1
    }) {
        assert!(t0.elapsed() < WAIT, "timed out waiting for the records: {:#?}", seen.lock().unwrap());
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();
    let records = std::mem::take(&mut *seen.lock().unwrap());
    for cp in cps {
        assert_eq!(by_ports(&records, cp, sp).len(), 1);
        assert_eq!(by_ports(&records, sp, cp).len(), 1);
    }
    let _ = std::fs::remove_file(bin);
}

/// Whether a record (its JSON line) is a final one.
fn is_final(line: &Value) -> bool {
    line.as_str().is_some_and(|l| l.contains("\"record_type\":\"final\""))
}

/// The records' lines summed per socket.
fn long_lived_totals(lines: &[Value]) -> Totals {
    let mut t = Totals::default();
    for line in lines {
        let line = line.as_str().unwrap();
        t.add_json(line).unwrap_or_else(|e| panic!("bad record {line:?}: {e}"));
    }
    t
}

/// Issue 11.3 at a smaller scale (bench-long-lived runs 100 000 on a
/// release build): 5 000 long-lived connections (10 000 tracked sockets,
/// one snapshot each per pass) beside a churn of short connections, interim
/// passes every 2 s through a 2 MiB ring buffer (13 000 events: a pass may
/// fill half of it, then waits for the reader; the other half takes the
/// closes), half the connections closed (1 250 at a time) and half still
/// open at SIGTERM. No event is lost to a full ring buffer, and every
/// socket's interim and final records sum to exactly what it sent and
/// received. The long-lived connections live in a network namespace that
/// is the sidecar's scope: the churn's events go through the same ring
/// buffer, but only the long-lived records are printed for this test's
/// reader (it keeps the lines and parses them at the end). The scale and
/// the churn are what a debug build of the sidecar keeps up with beside
/// other work on two cores: it processes some 5 000 events/s (a release
/// build millions), so the churn is a closed loop, each round of short
/// connections waiting until the sidecar has read as many events as the
/// round made.
#[test]
fn long_lived_connections_at_scale_add_up_exactly() {
    if !have_root() {
        return;
    }
    let _passes = INTERIM_PASSES.lock().unwrap_or_else(|e| e.into_inner());
    let _burst = loopback_burst();
    const N: usize = 5_000;
    let ns = Netns::new(format!("flowlog-ll-{}", std::process::id()));
    let ns_path = ns.path();
    let metrics = format!("127.0.0.1:{}", flowlog_runtime::testkit::free_port());
    let sc = Sidecar::start_with(
        &[],
        &[
            "--interim-interval-secs", "2", "--max-sockets", "131072", "--scope-netns", &ns_path,
            "--ring-buffer-bytes", "2097152", "--wakeup-bytes", "262144", "--metrics-listen", &metrics,
        ],
        // Kept as they are, parsed at the end: the reader must keep up.
        |line| Some(Value::String(line.to_string())),
    );
    // The workers are threads of a thread in the namespace: they are in it too.
    let mut conns = ns.run(|| LongLived::open(N)).expect("opening the long-lived connections");
    conns.exchange().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        thread::spawn(move || {
            // A busy sidecar's endpoint may time out: that is no progress yet.
            let read = || flowlog_runtime::testkit::sample_at(&metrics, "flowlog_sidecar_events_read_total");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let before = read();
                if before == 0.0 {
                    continue;
                }
                n += short_connections(100).1.len();
                // Two events per connection (its two ends).
                while read() < before + 200.0 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            n
        })
    };
    let interim = |r: &[Value]| r.iter().filter(|x| !is_final(x)).count();
    // Bytes before and after a pass over every connection.
    sc.wait_for("interim records for every socket", Duration::from_secs(60), |r| interim(r) >= 2 * N);
    conns.exchange().unwrap();
    sc.wait_for("a second pass", Duration::from_secs(60), |r| interim(r) >= 4 * N);
    // Closed 1 250 at a time, each step read before the next (a burst of
    // closes must fit in the ring beside a pass).
    let mut closed = 0;
    loop {
        let now = conns.close_every(2, 1_250).unwrap();
        if now == 0 {
            break;
        }
        closed += now;
        sc.wait_for("the closed connections' final records", Duration::from_secs(60), |r| {
            r.iter().filter(|x| is_final(x)).count() >= 2 * closed
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let short = churn.join().unwrap();
    // SIGTERM: the half still open gets a last interim record.
    let (records, stats) = sc.stop();
    let problems = conns.check(&long_lived_totals(&records)).unwrap();
    assert!(problems.is_empty(), "{} sockets do not add up, e.g.\n{}", problems.len(), problems[..problems.len().min(20)].join("\n"));
    for k in ["ringbuf_full", "sock_map_full", "read_errors"] {
        assert_eq!(stats["kernel"][k], 0, "{k}: {stats:#}");
    }
    assert_eq!(stats["user"]["decode_errors"], 0);
    eprintln!("{N} long-lived connections ({closed} closed), {short} short ones, {} records of the long-lived", records.len());
}

/// Stops the sidecar once it reported every one of `short_connections`'
/// connections, and checks each was reported once per side with its exact
/// bytes; returns the sidecar's final stats.
fn check_short_connections(sc: Sidecar, server_port: u16, clients: &[u16], attach: &str) -> Value {
    let n = clients.len();
    let ns = netns_self();
    let mine = move |r: &Value| r["netns_ino"] == ns && (r["local_port"] == server_port || r["remote_port"] == server_port);
    sc.wait_for("every connection's two records", WAIT, |r| r.iter().filter(|x| mine(x)).count() >= 2 * n);
    let (records, stats) = sc.stop();
    let records: Vec<Value> = records.into_iter().filter(|x| mine(x)).collect();
    assert_eq!(records.len(), 2 * n, "{attach}: duplicates");
    let reused = check_short_records(&records, server_port, clients, PerSide::Exactly, attach);
    if reused > 0 {
        eprintln!("{attach}: {reused} of {n} connections reused a client port of the same burst");
    }
    stats
}

/// A burst of closes while the reader cannot read (stopped with SIGSTOP)
/// overflows a one-page ring buffer (room for ~25 events): the final events
/// that find it full wait in the kernel's parking queue, and once the reader
/// runs again every connection is reported exactly once per side with its
/// exact bytes. None is lost; the parked ones are counted. Both attach modes
/// (the parking path is the same code, verified once per program).
#[test]
fn finals_that_find_the_ring_full_are_parked_not_lost() {
    if !have_root() {
        return;
    }
    let _burst = loopback_burst();
    const N: usize = 400;
    for attach in ["tp-btf", "tracepoint"] {
        let sc = Sidecar::start(&["--attach", attach, "--ring-buffer-bytes", "4096", "--wakeup-bytes", "1024"]);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(sc.pid() as i32, libc::SIGSTOP) };
        let (server_port, clients) = short_connections(N);
        unsafe { libc::kill(sc.pid() as i32, libc::SIGCONT) };
        let stats = check_short_connections(sc, server_port, &clients, attach);
        let parked = stats["kernel"]["parked"].as_u64().unwrap();
        // 2 N finals, of which the one-page ring held at most 4096 / 160,
        // and each CPU's stage fewer than a full one (then sent or parked).
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) } as usize;
        let unparked = 4096 / 160 + cpus * (flowlog_common::STAGE_EVENTS - 1);
        assert!(parked as usize >= 2 * N - unparked, "{attach}: only {parked} parked: {stats:#}");
        assert_eq!(stats["kernel"]["ringbuf_full"], 0, "{attach}: {stats:#}");
        assert_eq!(stats["user"]["decode_errors"], 0);
    }
}

/// Closes are staged per CPU and reach the ring buffer several to a record:
/// a burst of connections comes in far fewer ring records than events, and
/// every connection is still reported once per side with its exact bytes
/// (including those a CPU still held when the burst ended, which the
/// reader's flush sent). Both attach modes.
#[test]
fn staged_finals_are_batched_and_none_is_lost() {
    if !have_root() {
        return;
    }
    let _burst = loopback_burst();
    const N: usize = 300;
    for attach in ["tp-btf", "tracepoint"] {
        let sc = Sidecar::start(&["--attach", attach]);
        let (server_port, clients) = short_connections(N);
        let stats = check_short_connections(sc, server_port, &clients, attach);
        // One by one, no event would come with others. Staged, most of the
        // burst's do: only flushes of part-filled stages (one per CPU per
        // drain, every 50 ms) send one alone. Other tests' flows only add.
        let batched = stats["user"]["batched_events"].as_u64().unwrap();
        assert!(batched >= N as u64, "{attach}: only {batched} events came in batches: {stats:#}");
        assert_eq!(stats["kernel"]["ringbuf_full"], 0, "{attach}: {stats:#}");
        assert_eq!(stats["user"]["decode_errors"], 0);
    }
}

/// Records are sent as they are read, 16 at a time, and the output is
/// flushed after every drain that read any, whatever their number: a drain
/// of a multiple of 16 must not leave its last records in the buffer until
/// more traffic comes. Bursts of 1 to 24 connections one after the other,
/// each waited for before the next (each burst's finals are flushed from
/// the CPUs' stages together, so most drains read one whole burst).
#[test]
fn every_drain_is_flushed_whatever_its_size() {
    if !have_root() {
        return;
    }
    let _burst = loopback_burst();
    let sc = Sidecar::start(&[]);
    for k in 1..=24 {
        let (server_port, _) = short_connections(k);
        let mine = move |r: &Value| r["local_port"] == server_port || r["remote_port"] == server_port;
        sc.wait_for(&format!("the {} records of a burst of {k} connections", 2 * k), WAIT, |r| {
            r.iter().filter(|x| mine(x)).count() >= 2 * k
        });
    }
    sc.stop();
}

/// What held a connection back (the record's `limits`), told apart for
/// two connections of the same size class:
/// - receiver-limited: the server has a 4 KiB receive buffer and reads
///   nothing for 600 ms while the client writes 1 MB, so the client's
///   sending stops on the receiver's window;
/// - sender-limited: the client's own application writes 100 bytes every
///   25 ms for 500 ms, the window open all along: nearly all of that time
///   nothing is in flight (busy time is a small part of the duration) and
///   none of it is window-limited.
#[test]
fn receiver_and_sender_limited_flows_are_told_apart() {
    if !have_root() {
        return;
    }
    for attach in ["tp-btf", "tracepoint"] {
        let sc = Sidecar::start(&["--attach", attach]);

        let small = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Before listen(): accepted sockets inherit it, and the window they
        // offer is sized from it.
        small.set_recv_buffer_size(4096).unwrap();
        small.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        small.listen(1).unwrap();
        let rwnd_port = small.local_addr().unwrap().as_socket().unwrap().port();
        let client = thread::spawn(move || {
            let mut c = TcpStream::connect(("127.0.0.1", rwnd_port)).unwrap();
            c.write_all(&vec![5u8; 1_000_000]).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            read_to_end(&mut c);
            c.local_addr().unwrap().port()
        });
        let (s, _) = small.accept().unwrap();
        let mut s: TcpStream = s.into();
        thread::sleep(Duration::from_millis(600));
        assert_eq!(read_to_end(&mut s), 1_000_000);
        drop(s);
        let rwnd_client = client.join().unwrap();

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let app_port = l.local_addr().unwrap().port();
        let client = thread::spawn(move || {
            let mut c = TcpStream::connect(("127.0.0.1", app_port)).unwrap();
            c.set_nodelay(true).unwrap();
            for _ in 0..20 {
                c.write_all(&[6u8; 100]).unwrap();
                thread::sleep(Duration::from_millis(25));
            }
            c.shutdown(Shutdown::Write).unwrap();
            read_to_end(&mut c);
            c.local_addr().unwrap().port()
        });
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(read_to_end(&mut s), 2_000);
        drop(s);
        let app_client = client.join().unwrap();

        let last = |r: &[Value], local, remote| by_ports(r, local, remote).into_iter().find(|x| x["record_type"] == "final");
        sc.wait_for("both clients' records", WAIT, |r| {
            last(r, rwnd_client, rwnd_port).is_some() && last(r, app_client, app_port).is_some()
        });
        let (records, _) = sc.stop();
        let rwnd = last(&records, rwnd_client, rwnd_port).unwrap();
        let app = last(&records, app_client, app_port).unwrap();
        let us = |r: &Value, name: &str| r["limits"][name].as_i64().unwrap_or_else(|| panic!("{attach}: limits.{name} in {r}"));
        let duration_us = |r: &Value| (r["end_time_ns"].as_i64().unwrap() - r["start_time_ns"].as_i64().unwrap()) / 1000;
        eprintln!("{attach}: receiver-limited {}; sender-limited {} over {} us", rwnd["limits"], app["limits"], duration_us(&app));
        assert_eq!(rwnd["bytes_sent"], 1_000_000, "{attach}");
        assert_eq!(app["bytes_sent"], 2_000, "{attach}");
        // Jiffy resolution (1-10 ms) and a loaded machine: generous bounds.
        assert!(us(&rwnd, "rwnd_limited_us") >= 400_000, "{attach}: receiver-limited {rwnd}");
        assert!(us(&rwnd, "busy_us") >= us(&rwnd, "rwnd_limited_us"), "{attach}: busy includes the limited time {rwnd}");
        assert_eq!(us(&app, "rwnd_limited_us"), 0, "{attach}: the window stayed open {app}");
        assert!(duration_us(&app) >= 475_000, "{attach}: {app}");
        assert!(us(&app, "busy_us") * 4 < duration_us(&app), "{attach}: sender-limited: mostly nothing in flight {app}");
        // A kernel that counts RTOs (6.7+) says so; none fired on loopback.
        assert_eq!(rwnd["limits"]["rto_count"], 0, "{attach}: {rwnd}");
        assert_eq!(app["limits"]["bytes_retrans"], 0, "{attach}: {app}");
    }
}

/// Runs nft in network namespace `ns` with `args`; panics if it fails.
fn nft(ns: &str, args: &str) {
    let status = std::process::Command::new("ip").args(["netns", "exec", ns, "nft"]).args(args.split_whitespace()).status().unwrap();
    assert!(status.success(), "nft {args}");
}

/// Retransmission timeouts are counted in `limits`: in a network namespace
/// of the test's own, an nftables rule drops the client's data segments on
/// arrival for 700 ms after the handshake, so the kernel resends them on timeouts (the
/// first after at least 200 ms, then doubling) until one gets through. The
/// client's record counts the timeouts, the time spent recovering from them
/// and the bytes sent again, and its byte count stays exact.
#[test]
fn retransmission_timeouts_are_counted() {
    if !have_root() {
        return;
    }
    let ns = Netns::new(format!("flowlog-rto-{}", std::process::id()));
    let want = inode(&ns.path());
    let sc = Sidecar::start(&[]);
    let name = ns.0.clone();
    let (client, server) = ns.run(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sp = l.local_addr().unwrap().port();
        let reader = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            read_to_end(&mut s)
        });
        let mut c = TcpStream::connect(("127.0.0.1", sp)).unwrap();
        nft(&name, "add table inet flowlog_rto");
        // On input: the client's stack has sent them (a drop on output is
        // an error it sees, and it keeps the data queued instead).
        nft(&name, "add chain inet flowlog_rto in { type filter hook input priority 0 ; }");
        // Segments to the server that carry data (more than the 52 bytes of
        // IPv4 and TCP headers with timestamps); the handshake is done.
        nft(&name, &format!("add rule inet flowlog_rto in tcp dport {sp} ip length > 100 drop"));
        c.write_all(&[3u8; 10_000]).unwrap();
        thread::sleep(Duration::from_millis(700));
        nft(&name, "delete table inet flowlog_rto");
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), 10_000);
        read_to_end(&mut c);
        (c.local_addr().unwrap().port(), sp)
    });
    let mine = |r: &[Value]| -> Option<Value> {
        by_ports(r, client, server).into_iter().find(|x| x["netns_ino"] == want && x["record_type"] == "final")
    };
    sc.wait_for("the client's record", WAIT, |r| mine(r).is_some());
    let (records, _) = sc.stop();
    let r = mine(&records).unwrap();
    eprintln!("retransmitted: {}", r["limits"]);
    assert_eq!(r["bytes_sent"], 10_000, "{r}");
    assert!(r["retransmits"].as_i64().unwrap() >= 1, "{r}");
    let l = &r["limits"];
    assert!(l["bytes_retrans"].as_i64().unwrap() >= 10_000, "the whole write was sent again: {r}");
    // The totals are null on kernels before 6.7, which do not keep them.
    if l["rto_count"].is_null() {
        assert!(l["rto_recoveries"].is_null() && l["rto_time_ms"].is_null(), "{r}");
        eprintln!("this kernel keeps no RTO totals");
        return;
    }
    assert!(l["rto_count"].as_i64().unwrap() >= 1, "{r}");
    assert!(l["rto_recoveries"].as_i64().unwrap() >= 1, "{r}");
    assert!(l["rto_time_ms"].as_i64().unwrap() >= 100, "{r}");
}
