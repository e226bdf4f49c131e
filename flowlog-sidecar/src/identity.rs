//! Who this host is: ids from config, host name, and its current IPs.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

/// Identity settings (`[identity]` in the config file).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Stable host id; default /etc/machine-id, else the host name.
    pub host_id: Option<String>,
    /// Cloud instance id (e.g. the EC2 instance id).
    pub instance_id: Option<String>,
    /// This host's workload name.
    pub workload: Option<String>,
    /// Free-form workload labels.
    pub labels: BTreeMap<String, String>,
    /// Fixed IP list; default: the host's non-loopback interface addresses.
    pub ips: Option<Vec<String>>,
}

pub use flowlog_schema::HostIdentity;

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: valid buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Non-loopback, non-link-local addresses of this host's interfaces, sorted.
pub fn local_ips() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let ip = match family {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            };
            if let Some(ip) = ip {
                let link_local = matches!(ip, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
                if !ip.is_loopback() && !link_local && !ip.is_unspecified() {
                    out.push(ip.to_string());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: list from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
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
