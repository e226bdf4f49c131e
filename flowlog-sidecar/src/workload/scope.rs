//! Capture scope: the part of the machine this sidecar speaks for.
//!
//! One kernel can hold several "hosts": the demo and the tests run two
//! sidecars on one VM, each for its own cgroup subtree; a shared machine
//! may run one per tenant. Flows outside the scope are dropped (counted as
//! `out_of_scope`, never sent), and workload IPs are only announced for
//! workloads inside it.
//!
//! The filter is in user space, after workload resolution, not in the
//! kernel: the cgroup that owns a flow is only known for certain there
//! (a passive open is named after its listener, an ownerless flow after its
//! network namespace's pod, and a cgroup made after the sidecar started is
//! known by path only once the walker lists it). An out-of-scope flow costs
//! its ring-buffer event and a hash lookup (well under a microsecond), and
//! the eBPF program needs no extra map or helper. A busy shared machine
//! where most flows are someone else's could move the netns part into the
//! kernel later.

use std::os::unix::fs::MetadataExt;

flowlog_settings::settings! {
    /// Capture scope (`[scope]` in the config file). Unset: the whole machine.
    /// A flow is in scope when its owner's cgroup is in `cgroup`'s subtree or
    /// its network namespace is one of `netns`.
    pub struct ScopeConfig {
        /// A cgroup v2 subtree, as /proc/PID/cgroup names it (e.g.
        /// `/flowlog-demo/node1`): only flows owned by processes in it (or
        /// in its sub-cgroups) are captured. Needs `workload.resolve`.
        /// Flows with no owning process are judged by their network
        /// namespace (`netns`, or the pod that owns it).
        #[flag(long = "scope-cgroup", env = "FLOWLOG_SCOPE_CGROUP")]
        pub cgroup: Option<String> = None,
        /// Network namespaces whose flows are captured: inode numbers or
        /// paths (`/run/netns/NAME`, `/proc/PID/ns/net`), resolved at start.
        #[flag(long = "scope-netns", env = "FLOWLOG_SCOPE_NETNS")]
        pub netns: Vec<String> = Vec::new(),
    }
}

/// The scope, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Without its trailing `/`; None: no cgroup scope.
    cgroup: Option<String>,
    netns: Vec<u64>,
}

impl Scope {
    /// Resolves the namespaces the config names; the error names the
    /// setting and the value at fault.
    pub fn new(c: &ScopeConfig) -> Result<Scope, (&'static str, String)> {
        let cgroup = match c.cgroup.as_deref() {
            None => None,
            Some(p) if !p.starts_with('/') => {
                return Err(("scope.cgroup", format!("{p:?} must start with / (a path as /proc/PID/cgroup shows it)")))
            }
            Some(p) => Some(p.trim_end_matches('/').to_string()),
        };
        let netns = c
            .netns
            .iter()
            .map(|n| match n.parse::<u64>() {
                Ok(ino) => Ok(ino),
                Err(_) => std::fs::metadata(n)
                    .map(|m| m.ino())
                    .map_err(|e| ("scope.netns", format!("{n:?}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Scope { cgroup, netns })
    }

    /// No scope: everything is in it.
    pub fn is_all(&self) -> bool {
        self.cgroup.is_none() && self.netns.is_empty()
    }

    pub fn has_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    pub fn has_netns(&self) -> bool {
        !self.netns.is_empty()
    }

    /// Whether the cgroup at `path` (from the cgroup v2 root) is in the
    /// scope's subtree (true with no cgroup scope only if nothing is scoped).
    pub fn cgroup_in(&self, path: &str) -> bool {
        match &self.cgroup {
            None => self.is_all(),
            // "/" is the whole tree.
            Some(s) if s.is_empty() => true,
            Some(s) => path.strip_prefix(s.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }

    /// Whether network namespace `ino` is named by the scope.
    pub fn netns_in(&self, ino: u64) -> bool {
        self.is_all() || self.netns.contains(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(cgroup: Option<&str>, netns: &[&str]) -> Result<Scope, (&'static str, String)> {
        Scope::new(&ScopeConfig { cgroup: cgroup.map(Into::into), netns: netns.iter().map(|s| s.to_string()).collect() })
    }

    #[test]
    fn no_scope_is_everything() {
        let s = scope(None, &[]).unwrap();
        assert!(s.is_all() && s.cgroup_in("/anything") && s.netns_in(42) && !s.has_cgroup() && !s.has_netns());
    }

    #[test]
    fn a_cgroup_scope_is_its_subtree() {
        let s = scope(Some("/flowlog-demo/node1/"), &[]).unwrap();
        assert!(s.cgroup_in("/flowlog-demo/node1"));
        assert!(s.cgroup_in("/flowlog-demo/node1/kubepods/besteffort/pod1"));
        assert!(!s.cgroup_in("/flowlog-demo/node10"), "a sibling with a longer name");
        assert!(!s.cgroup_in("/flowlog-demo") && !s.cgroup_in("/") && !s.cgroup_in(""));
        assert!(!s.netns_in(4026531840), "no namespace is named");
        assert!(scope(Some("/"), &[]).unwrap().cgroup_in("/system.slice/x.service"));
        let (name, reason) = scope(Some("flowlog-demo"), &[]).unwrap_err();
        assert!(name == "scope.cgroup" && reason.contains("must start with /"), "{reason}");
    }

    #[test]
    fn namespaces_by_inode_or_path() {
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let s = scope(None, &["/proc/self/ns/net", "12345"]).unwrap();
        assert!(s.netns_in(own) && s.netns_in(12345) && !s.netns_in(1) && s.has_netns());
        assert!(!s.cgroup_in("/"), "a netns scope alone takes no cgroup");
        let (name, reason) = scope(None, &["/run/netns/flowlog-no-such-namespace"]).unwrap_err();
        assert!(name == "scope.netns" && reason.contains("flowlog-no-such-namespace"), "{reason}");
    }
}
