//! Who this host is: ids from config, host name, and its current IPs.

use std::{collections::BTreeMap, net::IpAddr};

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
        /// Fixed IP list; default: the host's non-loopback interface addresses.
        pub ips: Option<Vec<String>> = None,
    }
}

pub use flowlog_schema::HostIdentity;

pub fn hostname() -> String {
    nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned())
}

/// An address others can reach this host on: not loopback, not unspecified,
/// not IPv6 link-local (fe80::/10, the same on every link).
fn is_host_address(ip: &IpAddr) -> bool {
    let link_local = matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local());
    !ip.is_loopback() && !link_local && !ip.is_unspecified()
}

/// Non-loopback, non-link-local addresses of this host's interfaces, sorted.
pub fn local_ips() -> Vec<String> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<String> = interfaces
        .filter_map(|i| i.address)
        .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .filter(is_host_address)
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl IdentityConfig {
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
            ips: self.ips.clone().unwrap_or_else(local_ips),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_others_can_reach_count() {
        let ok = |s: &str| is_host_address(&s.parse().unwrap());
        assert!(ok("10.1.2.3") && ok("2001:db8::1") && ok("fec0::1"));
        assert!(!ok("127.0.0.1") && !ok("::1") && !ok("0.0.0.0") && !ok("::"));
        assert!(!ok("fe80::1") && !ok("febf::1"));
    }

    #[test]
    fn local_ips_are_sorted_unique_host_addresses() {
        let ips = local_ips();
        let mut sorted = ips.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(ips, sorted);
        assert!(ips.iter().all(|ip| is_host_address(&ip.parse().unwrap())), "{ips:?}");
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
