//! The network namespace of a cgroup's processes, and the addresses in it.
//!
//! A namespace is found from a process of the cgroup (`cgroup.procs`, then
//! `/proc/PID/ns/net`: its inode is the namespace id the eBPF program
//! records) and listed from inside: a short-lived thread enters each
//! namespace in turn (`setns`) and asks the kernel for its addresses
//! (`getifaddrs`, netlink), then exits, so no other thread of the sidecar
//! ever changes namespace. Reading `/proc/PID/net/*` instead needs no
//! privilege, but names no interface for IPv4 addresses, and the shared
//! interfaces must be told apart.
//!
//! Opening another user's `/proc/PID/ns/net` needs CAP_SYS_PTRACE, entering
//! a namespace CAP_SYS_ADMIN (root has both).

use std::{
    fs::File,
    io,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
};

use nix::{errno::Errno, sched::CloneFlags};

use crate::claim::{interface_addresses, IfAddr};

/// Why a namespace could not be found or listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsError {
    /// Not permitted (EPERM, EACCES): the capabilities above are missing.
    Permission,
    /// Anything else the kernel refused.
    Other(Errno),
}

impl NetnsError {
    fn of(e: Errno) -> NetnsError {
        match e {
            Errno::EPERM | Errno::EACCES => NetnsError::Permission,
            e => NetnsError::Other(e),
        }
    }

    fn of_io(e: &io::Error) -> NetnsError {
        NetnsError::of(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

impl std::fmt::Display for NetnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsError::Permission => {
                f.write_str("not permitted (needs CAP_SYS_ADMIN and CAP_SYS_PTRACE, as root has)")
            }
            NetnsError::Other(e) => write!(f, "{e}"),
        }
    }
}

/// A network namespace held open, and its inode.
pub struct Netns {
    pub fd: OwnedFd,
    pub ino: u64,
}

/// The network namespace of the processes in the cgroup at `dir` (the
/// first one that is still there); None when the cgroup is gone or empty.
/// Processes or cgroups vanishing meanwhile are not errors.
pub fn of_cgroup(dir: &Path) -> Result<Option<Netns>, NetnsError> {
    let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(p) => p,
        // Removed, or a threaded cgroup's: either way no namespace here.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP)) => {
            return Ok(None)
        }
        Err(e) => return Err(NetnsError::of_io(&e)),
    };
    // Pid 0: a process outside the sidecar's pid namespace (without hostPID).
    for pid in procs.lines().filter(|p| *p != "0") {
        match File::open(format!("/proc/{pid}/ns/net")) {
            Ok(f) => match f.metadata() {
                Ok(m) => return Ok(Some(Netns { ino: m.ino(), fd: f.into() })),
                Err(e) => return Err(NetnsError::of_io(&e)),
            },
            // Exited since the listing (ESRCH while exiting): the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => continue,
            Err(e) => return Err(NetnsError::of_io(&e)),
        }
    }
    Ok(None)
}

/// The addresses of the interfaces that are up in each namespace, in
/// order, listed from one short-lived thread (see the module docs).
pub fn addresses_in(namespaces: &[&OwnedFd]) -> Vec<Result<Vec<IfAddr>, NetnsError>> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let list = || -> Vec<Result<Vec<IfAddr>, NetnsError>> {
        namespaces
            .iter()
            .map(|fd| {
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(NetnsError::of)?;
                interface_addresses().map_err(NetnsError::of)
            })
            .collect()
    };
    std::thread::scope(|s| {
        let joined = std::thread::Builder::new()
            .name("netns-addrs".into())
            .spawn_scoped(s, list)
            .map(|h| h.join());
        match joined {
            Ok(Ok(listed)) => listed,
            // No thread (or it panicked): nothing listed this time.
            _ => vec![Err(NetnsError::Other(Errno::EAGAIN)); namespaces.len()],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_gone_or_empty_has_no_namespace() {
        let dir = std::env::temp_dir().join(format!("flowlog-netns-{}", std::process::id()));
        assert_eq!(of_cgroup(&dir).map(|n| n.is_none()), Ok(true), "no such cgroup");
        std::fs::create_dir_all(&dir).unwrap();
        // Pid 0 (outside our pid namespace) and a pid that cannot exist.
        std::fs::write(dir.join("cgroup.procs"), "0\n2147483647\n").unwrap();
        assert_eq!(of_cgroup(&dir).map(|n| n.is_none()), Ok(true));
        // A live process: its namespace (this one's).
        std::fs::write(dir.join("cgroup.procs"), format!("2147483647\n{}\n", std::process::id())).unwrap();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(of_cgroup(&dir).unwrap().map(|n| n.ino), Some(own));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Entering the namespace one is in needs CAP_SYS_ADMIN all the same;
    /// without it the answer is `Permission`, and this thread is untouched.
    #[test]
    fn lists_a_namespace_from_another_thread() {
        let own = File::open("/proc/self/ns/net").unwrap();
        let fd: OwnedFd = own.into();
        let listed = addresses_in(&[&fd, &fd]);
        assert_eq!(listed.len(), 2);
        match &listed[0] {
            Ok(addrs) => assert!(addrs.iter().any(|a| a.ip.is_loopback()), "{addrs:?}"),
            Err(e) => assert_eq!(*e, NetnsError::Permission),
        }
    }
}
