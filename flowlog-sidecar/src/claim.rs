//! Which interface addresses a host or a workload may announce as its own.
//!
//! The enricher gives an IP to whoever announced it at the time, so an
//! address that every host (or every node's pods) holds alike must never be
//! announced: it would flap between owners. Those are loopback and
//! unspecified addresses, link-local ones (169.254.0.0/16, node-local DNS
//! 169.254.20.10 among them, and fe80::/10), and the addresses of bridges and
//! dummy interfaces that hold the same address on every host (`docker0`'s
//! 172.17.0.1, `cni0`, `kube-ipvs0`'s ClusterIPs, ...), named by
//! `identity.shared_interfaces`. The same rules apply to the host's own IPs
//! (`identity.rs`) and to its workloads' (`workload::addresses`).

use std::net::IpAddr;

/// `identity.shared_interfaces` by default: bridges and dummy interfaces
/// whose addresses are the same on every host.
pub fn default_shared_interfaces() -> Vec<String> {
    ["docker*", "cni*", "cbr*", "kube-ipvs*", "nodelocaldns", "virbr*", "br-*", "podman*"]
        .map(String::from)
        .to_vec()
}

/// Why an address is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unclaimed {
    /// Loopback, unspecified or multicast: never anyone's; not counted.
    NotAnAddress,
    /// 169.254.0.0/16 or fe80::/10.
    LinkLocal,
    /// On an interface named by `identity.shared_interfaces`.
    SharedInterface,
}

/// The shared-interface patterns, compiled once.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    shared: Vec<glob::Pattern>,
}

impl ClaimFilter {
    /// Glob patterns (`*`, `?`, `[...]`) of interface names; the error names
    /// the pattern that does not parse.
    pub fn new(shared_interfaces: &[String]) -> Result<ClaimFilter, String> {
        let shared = shared_interfaces
            .iter()
            .map(|p| glob::Pattern::new(p).map_err(|e| format!("{p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(ClaimFilter { shared })
    }

    /// Whether `ip` on interface `ifname` may be announced (Ok) or why not.
    pub fn judge(&self, ifname: &str, ip: IpAddr) -> Result<IpAddr, Unclaimed> {
        let ip = judge_ip(ip)?;
        if self.shared.iter().any(|p| p.matches(ifname)) {
            return Err(Unclaimed::SharedInterface);
        }
        Ok(ip)
    }
}

/// The rules that need no interface name, for addresses known without one
/// (a pod's IPs from the Kubernetes API): whether `ip` may be announced.
pub fn judge_ip(ip: IpAddr) -> Result<IpAddr, Unclaimed> {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(Unclaimed::NotAnAddress);
    }
    if is_link_local(ip) {
        return Err(Unclaimed::LinkLocal);
    }
    Ok(ip)
}

/// 169.254.0.0/16 (IPv4 link-local, node-local DNS's 169.254.20.10, cloud
/// metadata endpoints) and fe80::/10: the same on every link.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}

/// One address of an interface, as `getifaddrs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub ip: IpAddr,
}

/// The addresses of the interfaces that are up in the calling thread's
/// network namespace.
pub fn interface_addresses() -> nix::Result<Vec<IfAddr>> {
    use nix::net::if_::InterfaceFlags;
    Ok(nix::ifaddrs::getifaddrs()?
        .filter(|i| i.flags.contains(InterfaceFlags::IFF_UP))
        .filter_map(|i| {
            let a = i.address?;
            let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some(IfAddr { ifname: i.interface_name, ip })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> ClaimFilter {
        ClaimFilter::new(&default_shared_interfaces()).unwrap()
    }

    fn judge(ifname: &str, ip: &str) -> Result<IpAddr, Unclaimed> {
        filter().judge(ifname, ip.parse().unwrap())
    }

    #[test]
    fn addresses_others_can_reach_are_claimed() {
        for ip in ["10.1.2.3", "2001:db8::1", "fec0::1", "172.17.0.2", "169.253.255.255", "169.255.0.1"] {
            assert_eq!(judge("eth0", ip), Ok(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn loopback_unspecified_and_multicast_are_no_ones() {
        for ip in ["127.0.0.1", "127.9.9.9", "::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1"] {
            assert_eq!(judge("eth0", ip), Err(Unclaimed::NotAnAddress), "{ip}");
        }
    }

    #[test]
    fn link_local_is_never_claimed() {
        // Node-local DNS sits on a dummy interface of its own name, but its
        // address alone is enough.
        for ip in ["169.254.0.1", "169.254.20.10", "169.254.169.254", "fe80::1", "febf::1"] {
            assert_eq!(judge("eth0", ip), Err(Unclaimed::LinkLocal), "{ip}");
        }
        assert_eq!(judge("nodelocaldns", "169.254.20.10"), Err(Unclaimed::LinkLocal));
        // Without an interface name, the same address rules.
        for (ip, want) in [("169.254.3.3", Err(Unclaimed::LinkLocal)), ("::1", Err(Unclaimed::NotAnAddress)), ("10.1.2.3", Ok(()))] {
            assert_eq!(judge_ip(ip.parse().unwrap()).map(drop), want, "{ip}");
        }
    }

    #[test]
    fn shared_interfaces_match_by_glob() {
        for ifname in ["docker0", "docker_gwbridge", "cni0", "cbr0", "kube-ipvs0", "nodelocaldns", "virbr0", "br-1a2b3c", "podman0"] {
            assert_eq!(judge(ifname, "10.96.0.1"), Err(Unclaimed::SharedInterface), "{ifname}");
        }
        // Near misses are a host's or pod's own interfaces.
        for ifname in ["eth0", "ens5", "br0", "nodelocaldns0", "mydocker0", "veth1234", "flannel.1", "lo"] {
            assert!(judge(ifname, "10.96.0.1").is_ok(), "{ifname}");
        }
        let custom = ClaimFilter::new(&["weave".into(), "vxlan-?".into(), "tun[0-9]".into()]).unwrap();
        let ip = "10.0.0.1".parse().unwrap();
        assert!(custom.judge("weave", ip).is_err() && custom.judge("vxlan-7", ip).is_err() && custom.judge("tun3", ip).is_err());
        assert!(custom.judge("docker0", ip).is_ok() && custom.judge("vxlan-77", ip).is_ok());
        assert!(ClaimFilter::new(&[]).unwrap().judge("docker0", ip).is_ok());
        assert!(ClaimFilter::new(&["br-[".into()]).unwrap_err().contains("br-["));
    }

    #[test]
    fn this_hosts_interfaces_are_listed() {
        let all = interface_addresses().unwrap();
        // Loopback is up in every namespace this test can run in.
        assert!(all.iter().any(|a| a.ifname == "lo" && a.ip.is_loopback()), "{all:?}");
    }
}
