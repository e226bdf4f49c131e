//! The sidecars' identity heartbeats as an ownership source: the identity
//! topic, read from the beginning into an ownership history. This is the
//! one place that turns the wire heartbeat into [`Event`]s.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    Message, Offset, TopicPartitionList,
};
use tracing::{info, warn};

use flowlog_schema::{Identity, IdentityReason};

use super::{
    identity::IdentityStore,
    ownership::{Change, Event},
    Attrs,
};
use crate::{config::Config, kafka, metrics};

/// A heartbeat as an ownership event: the host holds the IPs it lists (the
/// unparseable ones left out) until its next heartbeat, none after STOP.
pub fn event_from_heartbeat(id: &Identity) -> Event {
    let h = &id.host;
    let change = if id.reason == IdentityReason::Stop {
        Change::Released
    } else {
        Change::Holds {
            owner: Arc::new(Attrs::of_host(h)),
            ips: h.ips.iter().filter_map(|s| s.parse().ok()).collect(),
        }
    };
    Event {
        key: h.host_id.clone(),
        time_ns: id.time_ns,
        change,
    }
}

/// Reads the identity topic from the beginning into `store`: first up to the
/// current end (so attribution starts complete), then in the background
/// until `stop`.
pub fn follow(
    cfg: &Config,
    store: Arc<RwLock<IdentityStore>>,
    stop: &'static AtomicBool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka::client_config(cfg)
        .set(
            "group.id",
            format!("{}-identity-{}", cfg.group_id, std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(&cfg.identity_topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in &parts {
        tpl.add_partition_offset(&cfg.identity_topic, *p, Offset::Beginning)?;
        let (_, high) =
            consumer.fetch_watermarks(&cfg.identity_topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
    }
    consumer.assign(&tpl)?;
    let loaded = store.clone();
    let apply = move |m: &rdkafka::message::BorrowedMessage| match Identity::decode(
        m.payload().unwrap_or_default(),
    ) {
        Ok(id) => {
            let mut s = store.write().unwrap();
            s.apply(event_from_heartbeat(&id));
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
    use super::*;

    #[test]
    fn heartbeats_become_events() {
        let mut host = flowlog_schema::fixtures::host();
        host.ips = vec!["10.0.0.1".into(), "not an ip".into(), "fe80::1".into()];
        let mut id = flowlog_schema::fixtures::identity(&host, 100, IdentityReason::Heartbeat);
        let e = event_from_heartbeat(&id);
        assert_eq!((e.key.as_str(), e.time_ns), ("h1", 100));
        let Change::Holds { owner, ips } = e.change else {
            panic!("{e:?}")
        };
        assert_eq!(
            ips,
            [
                "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(owner.host_id.as_deref(), Some("h1"));
        assert_eq!(owner.workload.as_deref(), Some("web"));
        assert_eq!(owner.team.as_deref(), Some("net"));
        assert_eq!(owner.labels["team"], "net");
        id.reason = IdentityReason::Stop;
        assert_eq!(event_from_heartbeat(&id).change, Change::Released);
    }
}
