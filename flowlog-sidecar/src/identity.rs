//! Who this host is: ids from config, host name, and its current IPs.

use std::collections::BTreeMap;

use crate::claim::{interface_addresses, ClaimFilter};

flowlog_settings::settings! {
    /// Identity settings (`[identity]` in the config file).
    pub struct IdentityConfig {
        /// Stable host id; default /etc/machine-id, else the host name.
        #[flag(long = "host-id", env = "FLOWLOG_HOST_ID")]
        pub host_id: Option<String> = None,
        /// Cloud instance id (e.g. the EC2 instance id).
        #[flag(long = "instance-id", env = "FLOWLOG_INSTANCE_ID")]
        pub instance_id: Option<String> = None,
        /// This host's workload name.
        #[flag(long = "workload", env = "FLOWLOG_WORKLOAD")]
        pub workload: Option<String> = None,
        /// Free-form workload labels.
        pub labels: BTreeMap<String, String> = BTreeMap::new(),
        /// Fixed IP list; default: the addresses of the host's interfaces
        /// that are up, except loopback, link-local (169.254.0.0/16,
        /// fe80::/10) and those on `shared_interfaces`.
        pub ips: Option<Vec<String>> = None,
        /// Interfaces whose addresses are the same on every host (bridges,
        /// dummy interfaces): never announced, for the host or its workloads.
        /// Glob patterns (`*`, `?`, `[...]`).
        #[flag(long = "shared-interfaces", env = "FLOWLOG_SHARED_INTERFACES")]
        pub shared_interfaces: Vec<String> = crate::claim::default_shared_interfaces(),
    }
}

pub use flowlog_schema::HostIdentity;

pub fn hostname() -> String {
    nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned())
}

/// The addresses of this host's interfaces it may announce (see
/// [`crate::claim`]), sorted.
pub fn local_ips(filter: &ClaimFilter) -> Vec<String> {
    let Ok(addresses) = interface_addresses() else {
        return Vec::new();
    };
    let mut out: Vec<String> = addresses
        .into_iter()
        .filter_map(|a| filter.judge(&a.ifname, a.ip).ok())
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl IdentityConfig {
    /// `shared_interfaces` compiled (checked by `Config::validate`).
    pub fn claim_filter(&self) -> ClaimFilter {
        ClaimFilter::new(&self.shared_interfaces).unwrap_or_default()
    }

    pub fn current(&self) -> HostIdentity {
        let host_id = self.host_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/machine-id")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(hostname)
        });
        HostIdentity {
            host_id,
            hostname: hostname(),
            instance_id: self.instance_id.clone(),
            workload: self.workload.clone(),
            labels: self.labels.clone(),
            ips: self.ips.clone().unwrap_or_else(|| local_ips(&self.claim_filter())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ips_are_sorted_unique_host_addresses() {
        let filter = IdentityConfig::default().claim_filter();
        let ips = local_ips(&filter);
        let mut sorted = ips.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(ips, sorted);
        let all = interface_addresses().unwrap();
        for ip in &ips {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert!(all.iter().any(|a| a.ip == ip && filter.judge(&a.ifname, ip).is_ok()), "{ip}");
        }
        // Each is this host's own: a socket can bind to it.
        for ip in ips.iter().filter(|ip| !ip.contains(':')) {
            std::net::TcpListener::bind((ip.as_str(), 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        }
    }

    #[test]
    fn hostname_is_the_kernels() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), kernel.trim_end());
    }
}
