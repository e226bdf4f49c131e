//! The sidecars' identity heartbeats as an ownership source: the identity
//! topic, read from the beginning into an ownership history. This is the
//! one place that turns the wire heartbeat into [`Event`]s.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::KafkaResult,
    Message, Offset, TopicPartitionList,
};
use tracing::{info, warn};

use flowlog_schema::{Identity, IdentityReason, Workload};

use super::{
    identity::IdentityStore,
    ownership::{Change, Event},
    Attrs,
};
use crate::{config::Config, kafka, metrics};


/// A key naming one workload the same way in every heartbeat: its pod
/// UID, container id or unit, else its namespace and name (kind first, so
/// kinds never collide). The self-check compares workloads by it too.
pub fn workload_key(w: &Workload) -> String {
    let kind = w.kind.symbol();
    match w.pod_uid.as_deref().or(w.container_id.as_deref()).or(w.unit.as_deref()) {
        Some(id) => format!("{kind}/{id}"),
        None => {
            let (ns, name) = (w.namespace.as_deref().unwrap_or(""), w.name.as_deref().or(w.cgroup_path.as_deref()).unwrap_or(""));
            format!("{kind}/{ns}/{name}")
        }
    }
}

/// The sidecars' heartbeats as ownership events. Each host is one
/// announcer (its own IPs) and each workload it lists another
/// (`{host_id}/{workload_key}`: its IPs, owned by the workload); so per
/// host, the workloads it listed last are remembered, to release those a
/// later heartbeat no longer lists.
#[derive(Default)]
pub struct Heartbeats {
    listed: HashMap<String, BTreeSet<String>>,
}

impl Heartbeats {
    /// One heartbeat's events, all at its time: the workloads no longer
    /// listed released, then the host's IPs (the unparseable ones left
    /// out) and each workload's; after STOP, the host and all its
    /// workloads release everything.
    pub fn events(&mut self, id: &Identity) -> Vec<Event> {
        let h = &id.host;
        let event = |key: String, change| Event { key, time_ns: id.time_ns, change };
        let parse = |ips: &[String]| ips.iter().filter_map(|s| s.parse().ok()).collect::<Vec<IpAddr>>();
        // Workload key -> its IPs (a workload listed twice holds both lists).
        let mut now: BTreeMap<String, (Arc<Workload>, Vec<IpAddr>)> = BTreeMap::new();
        if id.reason != IdentityReason::Stop {
            for w in &id.workloads {
                let key = format!("{}/{}", h.host_id, workload_key(&w.workload));
                now.entry(key).or_insert_with(|| (w.workload.clone(), Vec::new())).1.extend(parse(&w.ips));
            }
        }
        let before = self.listed.remove(&h.host_id).unwrap_or_default();
        let mut events: Vec<Event> =
            before.into_iter().filter(|k| !now.contains_key(k)).map(|k| event(k, Change::Released)).collect();
        if id.reason == IdentityReason::Stop {
            events.push(event(h.host_id.clone(), Change::Released));
            return events;
        }
        let owner = Arc::new(Attrs::of_host(h));
        events.push(event(h.host_id.clone(), Change::Holds { owner, ips: parse(&h.ips) }));
        if !now.is_empty() {
            self.listed.insert(h.host_id.clone(), now.keys().cloned().collect());
        }
        for (key, (w, ips)) in now {
            let owner = Arc::new(Attrs::of_workload(h, w));
            events.push(event(key, Change::Holds { owner, ips }));
        }
        events
    }
}

/// The topic's partitions and their end offsets.
fn partition_ends(consumer: &BaseConsumer, topic: &str) -> KafkaResult<(Vec<i32>, HashMap<i32, i64>)> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut ends = HashMap::new();
    for p in &parts {
        let (_, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
    }
    Ok((parts, ends))
}

/// Reads the identity topic from the beginning into `store`: first up to the
/// current end (so attribution starts complete), then in the background
/// until `stop`.
pub fn follow(
    cfg: &Config,
    store: Arc<RwLock<IdentityStore>>,
    produced: Arc<crate::pipeline::Produced>,
    stop: &'static AtomicBool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka::client_config(cfg)
        .set(
            "group.id",
            format!("{}-identity-{}", cfg.group_id, std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    // A broker that is away or too busy to answer at start-up is waited for
    // (with backoff), as it is later on: no exit, no crash loop.
    let mut backoff = Duration::from_secs(1);
    let (parts, ends) = loop {
        match partition_ends(&consumer, &cfg.identity_topic) {
            Ok(found) => break found,
            Err(e) if !stop.load(Ordering::Relaxed) => {
                ::metrics::counter!(metrics::SOURCE_ERRORS, "source" => "sidecar").increment(1);
                warn!(retry_in = ?backoff, "cannot read the identity topic's partitions yet: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(&cfg.identity_topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    // A host that dies without a STOP heartbeat (kill -9, a crashed node)
    // stops owning its IPs at its last heartbeat + the grace. Heartbeats
    // spooled during a broker outage keep their times: an outage is no gap.
    store.write().unwrap().set_grace(Duration::from_secs(cfg.identity_grace_secs));
    let loaded = store.clone();
    let mut heartbeats = Heartbeats::default();
    let mut apply = move |m: &rdkafka::message::BorrowedMessage| match Identity::decode(
        m.payload().unwrap_or_default(),
    ) {
        Ok(id) => {
            produced.note(&id.host.host_id, id.sequence_epoch, id.next_sequence);
            let mut s = store.write().unwrap();
            let conflicts: usize = heartbeats.events(&id).into_iter().map(|e| s.apply(e)).sum();
            metrics::count_conflicts("sidecar", conflicts);
            ::metrics::gauge!(metrics::TRACKED_IPS).set(s.tracked_ips() as f64);
            ::metrics::gauge!(metrics::IDENTITY_LAST_SEEN).set(id.time_ns as f64 / 1e9);
        }
        Err(e) => warn!("ignoring undecodable identity record: {e}"),
    };
    let t0 = Instant::now();
    let mut caught_up: HashSet<i32> = ends
        .iter()
        .filter(|(_, h)| **h == 0)
        .map(|(p, _)| *p)
        .collect();
    while caught_up.len() < parts.len() && t0.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            apply(&m);
            // A partition added since the watermarks were read has no end: treat it as caught up.
            if ends
                .get(&m.partition())
                .is_none_or(|end| m.offset() + 1 >= *end)
            {
                caught_up.insert(m.partition());
            }
        }
    }
    info!(
        ips = loaded.read().unwrap().tracked_ips(),
        "identity history loaded"
    );
    std::thread::Builder::new()
        .name("identity".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                    apply(&m);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use flowlog_schema::{fixtures, WorkloadIps};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn heartbeats_become_events() {
        let mut host = fixtures::host();
        host.ips = vec!["10.0.0.1".into(), "not an ip".into(), "fe80::1".into()];
        let mut id = fixtures::identity(&host, 100, IdentityReason::Heartbeat);
        let mut hb = Heartbeats::default();
        let events = hb.events(&id);
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.key.as_str(), e.time_ns), ("h1", 100));
        let Change::Holds { owner, ips } = &e.change else {
            panic!("{e:?}")
        };
        assert_eq!(*ips, [ip("10.0.0.1"), ip("fe80::1")]);
        assert_eq!(owner.host_id.as_deref(), Some("h1"));
        assert_eq!(owner.workload.as_deref(), Some("web"));
        assert_eq!(owner.team.as_deref(), Some("net"));
        assert_eq!(owner.labels["team"], "net");
        assert_eq!(owner.held_by, None);
        id.reason = IdentityReason::Stop;
        assert_eq!(hb.events(&id), [Event { key: "h1".into(), time_ns: 100, change: Change::Released }]);
    }

    fn pod(uid: &str, name: &str) -> Arc<Workload> {
        Arc::new(Workload { pod_uid: Some(uid.into()), name: Some(name.into()), ..fixtures::pod_workload() })
    }

    fn listing(w: &Arc<Workload>, ips: &[&str]) -> WorkloadIps {
        WorkloadIps { workload: w.clone(), ips: ips.iter().map(|s| s.to_string()).collect() }
    }

    /// (key, time, IPs held or None for a release) of each event.
    fn summary(events: &[Event]) -> Vec<(String, i64, Option<Vec<IpAddr>>)> {
        let ips = |c: &Change| match c {
            Change::Holds { ips, .. } => Some(ips.clone()),
            Change::Released => None,
        };
        events.iter().map(|e| (e.key.clone(), e.time_ns, ips(&e.change))).collect()
    }

    /// Each listed workload is an announcer of its own, owned by the
    /// workload (held_by) with the host's attributes; one no longer listed
    /// is released at that heartbeat's time; STOP releases them all.
    #[test]
    fn workloads_are_announcers_released_when_no_longer_listed() {
        let host = fixtures::host();
        let (b, c) = (pod("uid-b", "pod-b"), pod("uid-c", "pod-c"));
        let beat = |t, reason, workloads: Vec<WorkloadIps>| Identity { workloads, ..fixtures::identity(&host, t, reason) };
        let mut hb = Heartbeats::default();
        let first = hb.events(&beat(100, IdentityReason::Start, vec![listing(&b, &["10.1.0.5", "bad"]), listing(&c, &["10.1.0.6"])]));
        let (kb, kc) = ("h1/POD/uid-b".to_string(), "h1/POD/uid-c".to_string());
        assert_eq!(
            summary(&first),
            [
                ("h1".into(), 100, Some(vec![ip("10.0.0.1")])),
                (kb.clone(), 100, Some(vec![ip("10.1.0.5")])),
                (kc.clone(), 100, Some(vec![ip("10.1.0.6")])),
            ]
        );
        let Change::Holds { owner, .. } = &first[1].change else { panic!() };
        assert_eq!(owner.workload.as_deref(), Some("pod-b"));
        assert_eq!(owner.held_by.as_deref(), Some(&*b));
        assert_eq!((owner.host_id.as_deref(), owner.team.as_deref()), (Some("h1"), Some("net")));
        // B is gone at 200; C stays.
        let second = hb.events(&beat(200, IdentityReason::IpChange, vec![listing(&c, &["10.1.0.6"])]));
        assert_eq!(
            summary(&second),
            [(kb.clone(), 200, None), ("h1".into(), 200, Some(vec![ip("10.0.0.1")])), (kc.clone(), 200, Some(vec![ip("10.1.0.6")]))]
        );
        // Another host's heartbeats do not touch this host's workloads.
        let other = fixtures::host_with("h2", "db", &["10.0.0.2"]);
        assert_eq!(summary(&hb.events(&fixtures::identity(&other, 250, IdentityReason::Heartbeat))).len(), 1);
        let stop = hb.events(&beat(300, IdentityReason::Stop, vec![listing(&c, &["10.1.0.6"])]));
        assert_eq!(summary(&stop), [(kc, 300, None), ("h1".into(), 300, None)]);
        assert!(!hb.listed.contains_key("h1"), "forgotten after STOP");
    }

    /// Through the ownership history: pod B's IP goes to pod C of another
    /// host; flows are attributed to whichever held it at their time.
    #[test]
    fn a_reused_pod_ip_is_attributed_by_time() {
        let (b, c) = (pod("uid-b", "pod-b"), pod("uid-c", "pod-c"));
        let (h1, h2) = (fixtures::host_with("h1", "node1", &["10.0.0.1"]), fixtures::host_with("h2", "node2", &["10.0.0.2"]));
        let beat = |h, t, workloads| Identity { workloads, ..fixtures::identity(h, t, IdentityReason::Heartbeat) };
        let mut hb = Heartbeats::default();
        let mut store = IdentityStore::default();
        let mut apply = |id: Identity| {
            for e in hb.events(&id) {
                store.apply(e);
            }
        };
        apply(beat(&h1, 100, vec![listing(&b, &["10.1.0.5"])]));
        // h2's claim is read before h1's heartbeat that drops B.
        apply(beat(&h2, 300, vec![listing(&c, &["10.1.0.5"])]));
        apply(beat(&h1, 200, vec![]));
        let held = |t| store.owner_at(ip("10.1.0.5"), t).ok().and_then(|o| o.held_by.as_ref()?.name.clone());
        assert_eq!(held(150).as_deref(), Some("pod-b"));
        assert_eq!(held(250), None);
        assert_eq!(held(350).as_deref(), Some("pod-c"));
        assert_eq!(store.owner_at(ip("10.1.0.5"), 350).unwrap().host_id.as_deref(), Some("h2"));
    }

    #[test]
    fn workload_keys_are_stable_and_kinds_never_collide() {
        let p = fixtures::pod_workload();
        assert_eq!(workload_key(&p), format!("POD/{}", p.pod_uid.clone().unwrap()));
        let unit = Workload { unit: Some("nginx.service".into()), name: Some("nginx".into()), ..Workload::of(flowlog_schema::WorkloadKind::Service) };
        assert_eq!(workload_key(&unit), "SERVICE/nginx.service");
        let svc = Workload { name: Some("api".into()), namespace: Some("shop".into()), ..Workload::of(flowlog_schema::WorkloadKind::ClusterIp) };
        assert_eq!(workload_key(&svc), "CLUSTER_IP/shop/api");
    }

    /// A host that dies without STOP: its own IPs and its pods' are nobody's
    /// once its last heartbeat is older than the grace.
    #[test]
    fn a_host_that_dies_without_stop_lets_go_after_the_grace() {
        let host = fixtures::host();
        let b = pod("uid-b", "pod-b");
        let mut hb = Heartbeats::default();
        let grace = Duration::from_secs(crate::config::Config::default().identity_grace_secs);
        let mut store = IdentityStore::expiring(grace);
        let beat = |t| Identity { workloads: vec![listing(&b, &["10.1.0.5"])], ..fixtures::identity(&host, t, IdentityReason::Heartbeat) };
        let s = 1_000_000_000i64;
        for t in [100 * s, 130 * s] {
            for e in hb.events(&beat(t)) {
                store.apply(e);
            }
        }
        let grace = grace.as_nanos() as i64;
        for addr in ["10.0.0.1", "10.1.0.5"] {
            assert!(store.owner_at(ip(addr), 130 * s + grace - 1).is_ok(), "{addr} held within the grace");
            assert_eq!(store.owner_at(ip(addr), 130 * s + grace).unwrap_err(), crate::sources::identity::Miss::NoOwnerAtTime, "{addr}");
        }
    }
}
