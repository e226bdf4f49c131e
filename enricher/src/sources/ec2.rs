//! EC2 network interfaces as an ownership source: each refresh's snapshot is
//! diffed against the previous one into ownership events for an ownership
//! history (the same interval store as the sidecars' heartbeats), so IPs that
//! move between ENIs are attributed by time. Errors back off and keep serving
//! the last good data; the source's age is exported.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use flowlog_enricher_ec2::{snapshot, Ec2Config, Eni};
use flowlog_schema::HostIdentity;
use tracing::{info, warn};

use super::{
    identity::IdentityStore,
    ownership::{Change, Event},
    Attrs,
};
use crate::metrics;

pub use crate::config::Ec2Settings;

fn now_ns() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// An ENI as an owner: its tags, plus ENI/VPC/subnet/account/region/zone as
/// labels (the attribute record carries account, region and zone too).
fn owner(e: &Eni) -> Attrs {
    let mut labels = e.tags.clone();
    labels.insert("eni_id".into(), e.eni_id.clone());
    for (k, v) in [("vpc_id", &e.vpc_id), ("subnet_id", &e.subnet_id), ("account", &e.account), ("zone", &e.zone)] {
        if let Some(v) = v {
            labels.insert(k.into(), v.clone());
        }
    }
    labels.insert("region".into(), e.region.clone());
    let workload = ["workload", "app", "Name"].iter().find_map(|k| e.tags.get(*k).cloned());
    // Described as a host, its attributes come out as a sidecar's would
    // (the ENI being the "host" of its IPs).
    let host = HostIdentity { host_id: e.eni_id.clone(), instance_id: e.instance_id.clone(), workload, labels, ..Default::default() };
    Attrs::of_host(&host)
}

/// The ownership events of one snapshot taken at `t`, against the previous
/// one (`prev`, updated): changed or new ENIs hold their IPs, vanished ones
/// release them.
pub fn diff(prev: &mut HashMap<String, Eni>, snap: Vec<Eni>, t: i64, first: bool) -> Vec<Event> {
    let mut events = Vec::new();
    let mut next = HashMap::with_capacity(snap.len());
    for e in snap {
        if prev.get(&e.eni_id) != Some(&e) {
            // On the first snapshot an attached ENI has owned its IPs since
            // it was attached; otherwise ownership starts when it is seen.
            let since = if first && !prev.contains_key(&e.eni_id) { e.attached_ns.unwrap_or(t).min(t) } else { t };
            let ips = e.ips.iter().filter_map(|s| s.parse().ok()).collect();
            events.push(Event { key: e.eni_id.clone(), time_ns: since, change: Change::Holds { owner: owner(&e).into(), ips } });
        }
        next.insert(e.eni_id.clone(), e);
    }
    for id in prev.keys().filter(|id| !next.contains_key(*id)) {
        events.push(Event { key: id.clone(), time_ns: t, change: Change::Released });
    }
    *prev = next;
    events
}

/// Applies one snapshot taken at `t` against the previous one.
fn apply_snapshot(store: &RwLock<IdentityStore>, prev: &mut HashMap<String, Eni>, snap: Vec<Eni>, t: i64, first: bool) {
    let events = diff(prev, snap, t, first);
    ::metrics::gauge!(metrics::EC2_INTERFACES).set(prev.len() as f64);
    let mut store = store.write().unwrap();
    let conflicts = events.into_iter().map(|e| store.apply(e)).sum();
    metrics::count_conflicts("ec2", conflicts);
}

/// Loads once (so attribution starts complete), then refreshes in the background.
pub fn start(settings: Ec2Settings, store: Arc<RwLock<IdentityStore>>) -> anyhow::Result<()> {
    let cfg = Ec2Config { regions: settings.regions.clone(), endpoint_url: settings.endpoint_url.clone() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut prev = HashMap::new();
    let mut last_ok = SystemTime::now();
    match rt.block_on(snapshot(&cfg)) {
        Ok(s) => {
            info!(interfaces = s.len(), "EC2 network interfaces loaded");
            apply_snapshot(&store, &mut prev, s, now_ns(), true);
        }
        Err(e) => {
            ::metrics::counter!(metrics::SOURCE_ERRORS, "source" => "ec2").increment(1);
            warn!("EC2 source: first load failed, retrying in the background: {e}");
        }
    }
    let refresh = Duration::from_secs(settings.refresh_secs.max(1));
    std::thread::Builder::new().name("ec2".into()).spawn(move || {
        let mut delay = refresh;
        loop {
            std::thread::sleep(delay);
            match rt.block_on(snapshot(&cfg)) {
                Ok(s) => {
                    let first = prev.is_empty();
                    apply_snapshot(&store, &mut prev, s, now_ns(), first);
                    last_ok = SystemTime::now();
                    delay = refresh;
                }
                Err(e) => {
                    ::metrics::counter!(metrics::SOURCE_ERRORS, "source" => "ec2").increment(1);
                    // Throttled or down: back off, keep serving the last good data.
                    delay = (delay * 2).min(Duration::from_secs(300));
                    warn!(retry_in = ?delay, "EC2 refresh failed, keeping the last snapshot: {e}");
                }
            }
            ::metrics::gauge!(metrics::SOURCE_AGE, "source" => "ec2").set(last_ok.elapsed().unwrap_or_default().as_secs_f64());
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eni(id: &str, ip: &str, workload: &str) -> Eni {
        Eni {
            eni_id: id.into(),
            ips: vec![ip.into()],
            instance_id: Some(format!("i-{id}")),
            vpc_id: Some("vpc-1".into()),
            subnet_id: Some("subnet-1".into()),
            account: Some("123456789012".into()),
            region: "us-east-1".into(),
            zone: Some("us-east-1a".into()),
            tags: [("workload".to_string(), workload.to_string())].into(),
            attached_ns: None,
        }
    }

    /// An ENI's IP is released at 200 and reassigned to another workload at 300.
    #[test]
    fn snapshots_diff_into_ownership_by_time() {
        let store = RwLock::new(IdentityStore::default());
        let mut prev = HashMap::new();
        let ip = "172.31.0.50".parse().unwrap();
        apply_snapshot(&store, &mut prev, vec![eni("eni-a", "172.31.0.50", "billing")], 100, true);
        // Unchanged: no event.
        assert!(diff(&mut prev.clone(), vec![eni("eni-a", "172.31.0.50", "billing")], 150, false).is_empty());
        apply_snapshot(&store, &mut prev, vec![eni("eni-a", "172.31.0.50", "billing")], 150, false);
        apply_snapshot(&store, &mut prev, vec![], 200, false);
        apply_snapshot(&store, &mut prev, vec![eni("eni-b", "172.31.0.50", "search")], 300, false);
        let store = store.read().unwrap();
        let owner = |t| store.owner_at(ip, t).ok().and_then(|o| o.workload.clone());
        assert_eq!(owner(120).as_deref(), Some("billing"));
        assert_eq!(owner(250), None);
        assert_eq!(owner(350).as_deref(), Some("search"));
        let o = store.owner_at(ip, 350).unwrap();
        assert_eq!(o.instance_id.as_deref(), Some("i-eni-b"));
        assert_eq!(o.account.as_deref(), Some("123456789012"));
        assert_eq!(o.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(o.labels["vpc_id"], "vpc-1");
        assert_eq!(o.labels["eni_id"], "eni-b");
    }
}
