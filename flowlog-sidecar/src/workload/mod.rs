//! Local workload resolution: which pod, container or systemd service on
//! this host owned each flow, from the cgroup the eBPF program recorded.
//! [`cgroup`] reads a cgroup path, [`tree`] finds and walks the cgroup v2
//! tree, [`resolver`] keeps the cache the capture path reads, [`pods`]
//! names the pods found by their UID from a watch of the Kubernetes API
//! (`[workload.kubernetes]`), [`scope`] limits capture to part of the
//! machine. [`addresses`] (with [`netns`]) lists the IPs the workloads
//! hold, for the identity heartbeats.

pub mod addresses;
pub mod cgroup;
pub mod netns;
pub mod pods;
pub mod resolver;
pub mod scope;
pub mod tree;

use std::collections::BTreeMap;

use flowlog_schema::{Workload, WorkloadKind, WorkloadReason};
use serde::Serialize;

pub use resolver::Resolver;

/// Hash maps keyed by cgroup id or namespace inode, read once per flow:
/// foldhash, several times cheaper than SipHash for a u64.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

flowlog_settings::settings! {
    /// Workload settings (`[workload]` in the config file).
    pub struct WorkloadConfig {
        /// Resolve each flow's local workload (pod, container, systemd service)
        /// from its cgroup; false leaves the records' `workload` empty.
        #[flag(long = "workload-resolve", env = "FLOWLOG_WORKLOAD_RESOLVE")]
        pub resolve: bool = true,
        /// Announce the IPs of local pods and containers (those in a network
        /// namespace of their own) in the identity heartbeats (with
        /// `output = "kafka"`). Pods the Kubernetes API lists
        /// (workload.kubernetes) are announced with their podIPs, which needs
        /// no privilege; other containers' IPs are read inside their
        /// namespaces, which needs CAP_SYS_ADMIN and CAP_SYS_PTRACE (root has
        /// both): without them those are skipped and counted.
        #[flag(long = "workload-announce-ips", env = "FLOWLOG_WORKLOAD_ANNOUNCE_IPS")]
        pub announce_ips: bool = true,
        /// How often the workloads' IPs are listed again, seconds (also at
        /// once when the Kubernetes API's pods change, and soon after a flow
        /// shows a pod's network namespace for the first time).
        #[flag(long = "workload-ips-interval-secs", env = "FLOWLOG_WORKLOAD_IPS_INTERVAL_SECS")]
        pub ips_interval_secs: u64 = 5,
        /// Pod names, namespaces, containers, owners and labels from the Kubernetes API.
        pub kubernetes: pods::KubernetesConfig = pods::KubernetesConfig::default(),
    }
}

impl WorkloadConfig {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        self.kubernetes.validate(self.resolve)
    }
}

/// Counts of the resolver's work (the stats file's `workload` block and,
/// on the stats tick, the Prometheus counters).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Flows by workload kind (index: `WorkloadKind::index`).
    pub flows: [u64; WorkloadKind::SYMBOLS.len()],
    /// Flows attributed to the host with a reason (index: `WorkloadReason::index`).
    pub unresolved: [u64; WorkloadReason::SYMBOLS.len()],
    /// Ownerless flows resolved by their network namespace.
    pub by_netns: u64,
    /// Flows dropped: outside the capture scope.
    pub out_of_scope: u64,
    pub walks: u64,
    pub walk_errors: u64,
}

impl Stats {
    #[inline]
    fn count(&mut self, w: &Workload) {
        self.flows[w.kind.index() as usize] += 1;
        if let Some(r) = w.reason {
            self.unresolved[r.index() as usize] += 1;
        }
    }

    /// Labels as the metrics and the stats file spell them (snake_case).
    pub fn by_name<const N: usize>(counts: &[u64; N], symbols: &[&str]) -> BTreeMap<String, u64> {
        symbols
            .iter()
            .zip(counts)
            .map(|(s, n)| (s.to_ascii_lowercase(), *n))
            .collect()
    }
}

/// The stats file's `workload` block.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub flows: BTreeMap<String, u64>,
    pub unresolved: BTreeMap<String, u64>,
    pub by_netns: u64,
    pub cgroup_walks: u64,
    pub cgroup_walk_errors: u64,
    pub cgroups_known: usize,
    /// Pods the Kubernetes API named (null with workload.kubernetes off).
    pub kubernetes_pods: Option<usize>,
}

impl Resolver {
    pub fn report(&self) -> StatsReport {
        let s = self.stats();
        StatsReport {
            flows: Stats::by_name(&s.flows, WorkloadKind::SYMBOLS),
            unresolved: Stats::by_name(&s.unresolved, WorkloadReason::SYMBOLS),
            by_netns: s.by_netns,
            cgroup_walks: s.walks,
            cgroup_walk_errors: s.walk_errors,
            cgroups_known: self.cgroups_known(),
            kubernetes_pods: self.pods_named(),
        }
    }
}
