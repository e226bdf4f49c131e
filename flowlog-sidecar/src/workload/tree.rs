//! The cgroup v2 tree: where it is mounted, and a walk of it that names
//! every cgroup by id. A cgroup v2 id (what the eBPF program records) is
//! the inode number of the cgroup's directory, and a directory listing
//! gives each entry's inode without a stat, so one walk maps every id to
//! its path. The walk runs on its own thread ([`Walker`]), never on the
//! capture path, at most once per [`MIN_WALK_GAP`].

use std::{
    collections::HashSet,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        mpsc::{self, Receiver, Sender},
        Arc,
    },
    time::{Duration, Instant},
};

use flowlog_schema::{Workload, WorkloadKind};
use nix::{
    dir::{Dir, Type},
    fcntl::OFlag,
    sys::stat::Mode,
};

use super::{cgroup, scope::Scope, FastMap};

/// Walks are at least this far apart: requests in between are answered by
/// one walk. A new cgroup's first flows wait at most about this long.
pub const MIN_WALK_GAP: Duration = Duration::from_millis(250);
/// More cgroups than any host has (a busy Kubernetes node has a few
/// thousand); past it a walk stops, and the rest resolve as not found.
const MAX_CGROUPS: usize = 200_000;
/// cgroup v2's own nesting limit is far deeper than any real tree.
const MAX_DEPTH: usize = 32;

/// A mounted cgroup v2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
    /// on the hybrid layout).
    pub dir: PathBuf,
    /// The cgroup the mount shows as its root (`/` unless the mount is of a
    /// sub-tree, as in a container with its own cgroup namespace): paths
    /// are given from the real root.
    pub root: String,
}

impl Mount {
    /// The directory of the cgroup at `path` (from the real root, as walks
    /// name them).
    pub fn dir_of(&self, path: &str) -> PathBuf {
        let below = path.strip_prefix(self.root.trim_end_matches('/')).unwrap_or(path);
        self.dir.join(below.trim_start_matches('/'))
    }
}

/// The cgroup v2 mount in a `/proc/self/mountinfo` text that shows the
/// most of the tree. In a container with its own cgroup namespace, the
/// runtime's `/sys/fs/cgroup` shows only the container's own cgroup (its
/// root reads `/`), while the host's tree mounted in (a hostPath volume)
/// reads `/../..`: above the namespace's root. Of mounts at the same place
/// the last one listed is the one visible.
pub fn find_mount(mountinfo: &str) -> Option<Mount> {
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = pre.split(' ').collect();
        let (Some(root), Some(dir)) = (f.get(3), f.get(4)) else {
            continue;
        };
        let dir = PathBuf::from(unescape(dir));
        mounts.retain(|(_, d)| *d != dir);
        mounts.push((unescape(root), dir));
    }
    let ups = |root: &str| root.split('/').skip(1).take_while(|s| *s == "..").count();
    let (root, dir) = mounts
        .into_iter()
        .rev()
        .max_by_key(|(root, _)| (ups(root), root == "/"))?;
    // `/../..` is an ancestor of the namespace's root: the host's root when
    // the host's tree is mounted, as it should be.
    let rest: Vec<&str> = root
        .split('/')
        .filter(|s| !s.is_empty())
        .skip(ups(&root))
        .collect();
    Some(Mount {
        dir,
        root: format!("/{}", rest.join("/")),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(o) => {
                out.push(
                    o.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One cgroup found by a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: u64,
    /// From the root: `/`, `/system.slice/nginx.service`, ...
    pub path: String,
    /// Whether it has sub-cgroups; None when the walk did not list it.
    pub has_children: Option<bool>,
}

/// Every cgroup under `mount`, listing only the directories `list` accepts
/// (by id: the others are named by their parent's listing, their own
/// contents are skipped). Cgroups that vanish while it runs are skipped;
/// only an unreadable root is an error.
pub fn walk(mount: &Mount, list: impl Fn(u64) -> bool) -> io::Result<Vec<Found>> {
    let base = mount.root.trim_end_matches('/').to_string();
    let root_id = std::fs::metadata(&mount.dir)?.ino();
    let mut out = vec![Found {
        id: root_id,
        path: if base.is_empty() {
            "/".into()
        } else {
            base.clone()
        },
        has_children: None,
    }];
    let mut stack = vec![(0usize, mount.dir.clone(), 0usize)];
    while let Some((at, dir, depth)) = stack.pop() {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut listing = match Dir::open(&dir, flags, Mode::empty()) {
            Ok(d) => d,
            Err(e) if at == 0 => return Err(e.into()),
            Err(e) => {
                tracing::trace!(dir = %dir.display(), "cgroup gone during the walk: {e}");
                continue;
            }
        };
        let mut has_children = false;
        // nix's listing borrows each name: the many files of a cgroup
        // directory cost no allocation.
        for entry in listing.iter().flatten() {
            let name = entry.file_name().to_bytes();
            if entry.file_type() != Some(Type::Directory) || name == b"." || name == b".." {
                continue;
            }
            has_children = true;
            if out.len() >= MAX_CGROUPS {
                tracing::warn!(
                    max = MAX_CGROUPS,
                    "cgroup tree larger than the walk's limit: the rest is not resolved"
                );
                break;
            }
            let name = String::from_utf8_lossy(name);
            out.push(Found {
                id: entry.ino(),
                path: format!("{}/{name}", out[at].path.trim_end_matches('/')),
                has_children: None,
            });
            if depth + 1 < MAX_DEPTH && list(entry.ino()) {
                stack.push((out.len() - 1, dir.join(&*name), depth + 1));
            }
        }
        out[at].has_children = Some(has_children);
    }
    Ok(out)
}

/// A walk request: its number, and the unknown cgroup ids it is for.
pub struct Request {
    pub seq: u64,
    pub wanted: Vec<u64>,
}

/// What a walk knows of one cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub workload: Arc<Workload>,
    /// In the capture scope's cgroup subtree (always, with no scope).
    pub in_scope: bool,
}

/// One walk's answer to every request numbered up to `seq`.
pub struct WalkResult {
    pub seq: u64,
    /// Every cgroup by id, or why the tree could not be read.
    pub cgroups: Result<FastMap<u64, Cgroup>, String>,
    pub took: Duration,
}

/// The walking thread: requests in (numbered), results out.
pub struct Walker {
    requests: Sender<Request>,
    pub results: Receiver<WalkResult>,
}

impl Walker {
    /// Starts the thread; it walks once at once (request 0), to warm the cache.
    pub fn start(mount: Mount, scope: Scope) -> io::Result<Walker> {
        let (req_tx, req_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("cgroup-walk".into())
            .spawn(move || walker(mount, scope, req_rx, res_tx))?;
        req_tx
            .send(Request {
                seq: 0,
                wanted: Vec::new(),
            })
            .expect("the walker holds its receiver");
        Ok(Walker {
            requests: req_tx,
            results: res_rx,
        })
    }

    /// A walker with no thread: the test plays the thread's part.
    #[cfg(test)]
    pub fn fake() -> (Walker, Receiver<Request>, Sender<WalkResult>) {
        let (req_tx, req_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        (
            Walker {
                requests: req_tx,
                results: res_rx,
            },
            req_rx,
            res_tx,
        )
    }

    /// Asks for a walk. False when the thread is gone.
    pub fn request(&self, r: Request) -> bool {
        self.requests.send(r).is_ok()
    }
}

fn walker(mount: Mount, scope: Scope, requests: Receiver<Request>, results: Sender<WalkResult>) {
    let mut tree = Tree { scope, ..Tree::default() };
    while let Ok(Request {
        mut seq,
        mut wanted,
    }) = requests.recv()
    {
        // Requests that queued up meanwhile are answered by the same walk.
        while let Ok(r) = requests.try_recv() {
            seq = seq.max(r.seq);
            wanted.extend(r.wanted);
        }
        let t0 = Instant::now();
        let cgroups = tree
            .walk(&mount, &wanted)
            .map_err(|e| format!("reading {}: {e}", mount.dir.display()));
        if results
            .send(WalkResult {
                seq,
                cgroups,
                took: t0.elapsed(),
            })
            .is_err()
        {
            return;
        }
        std::thread::sleep(MIN_WALK_GAP.saturating_sub(t0.elapsed()));
    }
}

/// What the walker remembers between walks.
#[derive(Default)]
struct Tree {
    /// Cgroups by id from the last walk: a cgroup id is never reused, so a
    /// known id's path (workload, scope) need not be parsed again.
    known: FastMap<u64, Cgroup>,
    /// Containers' cgroups with no sub-cgroups: most of a busy host's tree,
    /// and nothing new appears in them but the odd runtime's sub-cgroup, so
    /// a walk does not list them again (unless it misses a wanted id).
    leaves: HashSet<u64, foldhash::fast::RandomState>,
    scope: Scope,
}

impl Tree {
    fn walk(&mut self, mount: &Mount, wanted: &[u64]) -> io::Result<FastMap<u64, Cgroup>> {
        let mut found = walk(mount, |id| !self.leaves.contains(&id))?;
        if wanted.iter().any(|id| !found.iter().any(|f| f.id == *id)) {
            found = walk(mount, |_| true)?;
        }
        // The plain host is one shared value.
        let host = Arc::new(Workload::of(WorkloadKind::Host));
        let mut map = FastMap::with_capacity_and_hasher(found.len(), Default::default());
        let mut leaves = HashSet::with_capacity_and_hasher(self.leaves.len(), Default::default());
        for f in found {
            let c = self.known.get(&f.id).cloned().unwrap_or_else(|| {
                let w = cgroup::classify(&f.path);
                Cgroup {
                    workload: if w == *host { host.clone() } else { Arc::new(w) },
                    in_scope: self.scope.cgroup_in(&f.path),
                }
            });
            if c.workload.container_id.is_some() && f.has_children != Some(true) {
                leaves.insert(f.id);
            }
            map.insert(f.id, c);
        }
        self.known = map.clone();
        self.leaves = leaves;
        Ok(map)
    }
}

/// This host's own network namespaces (the sidecar's, and init's when it
/// can be read): flows there are no single workload's.
pub fn host_netns() -> Vec<u64> {
    ["/proc/self/ns/net", "/proc/1/ns/net"]
        .iter()
        .filter_map(|p| std::fs::metadata(Path::new(p)).ok().map(|m| m.ino()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(found: Vec<Found>) -> std::collections::HashMap<u64, String> {
        found.into_iter().map(|f| (f.id, f.path)).collect()
    }

    #[test]
    fn finds_the_v2_mount_on_each_layout() {
        let hybrid = "25 1 0:23 / /sys rw - sysfs sysfs rw\n\
                      33 25 0:28 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
                      34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                      35 33 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            find_mount(hybrid),
            Some(Mount {
                dir: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            })
        );
        let unified = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(
            find_mount(unified),
            Some(Mount {
                dir: "/sys/fs/cgroup".into(),
                root: "/".into()
            })
        );
        // A container's own sub-tree first, the host's whole tree mounted later.
        let both = "40 30 0:26 /kubepods/pod1/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n\
                    41 30 0:26 / /host/sys\\040fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(both),
            Some(Mount {
                dir: "/host/sys fs/cgroup".into(),
                root: "/".into()
            })
        );
        let sub = "40 30 0:26 /kubepods/pod1/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(sub).unwrap().root, "/kubepods/pod1/abc");
        // A pod with its own cgroup namespace: its /sys/fs/cgroup is its own
        // cgroup (`/`); the host's tree, mounted in, is above it.
        let ns = "50 40 0:26 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n\
                  51 40 0:26 /../../.. /host/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(ns),
            Some(Mount {
                dir: "/host/cgroup".into(),
                root: "/".into()
            })
        );
        // The host's tree mounted over the container's own: the later one is visible.
        let shadowed = "50 40 0:26 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n\
                        51 50 0:26 /../.. /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(shadowed),
            Some(Mount {
                dir: "/sys/fs/cgroup".into(),
                root: "/".into()
            })
        );
        let partial = "51 40 0:26 /../kubepods.slice /host/kp ro - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(partial).unwrap().root, "/kubepods.slice");
        assert_eq!(find_mount("25 1 0:23 / /sys rw - sysfs sysfs rw\n"), None);
        assert_eq!(find_mount("garbage\n\n - \n1 2 3 - cgroup2\n"), None);
    }

    #[test]
    fn walks_a_directory_tree_by_inode() {
        // Any directory tree walks the same way; a real cgroup tree is walked
        // by the root tests (tests/workload.rs).
        let dir = std::env::temp_dir().join(format!("flowlog-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("system.slice/nginx.service")).unwrap();
        std::fs::create_dir_all(dir.join("kubepods/burstable")).unwrap();
        std::fs::write(dir.join("system.slice/cgroup.procs"), "").unwrap();
        let ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
        let mount = Mount {
            dir: dir.clone(),
            root: "/".into(),
        };
        let found = walk(&mount, |_| true).unwrap();
        let by_id = paths(found.clone());
        assert_eq!(by_id.len(), 5, "{by_id:?}");
        assert_eq!(by_id[&ino("")], "/");
        assert_eq!(
            by_id[&ino("system.slice/nginx.service")],
            "/system.slice/nginx.service"
        );
        assert_eq!(by_id[&ino("kubepods/burstable")], "/kubepods/burstable");
        let leaf = found
            .iter()
            .find(|f| f.id == ino("kubepods/burstable"))
            .unwrap();
        assert_eq!(leaf.has_children, Some(false));
        assert_eq!(found[0].has_children, Some(true));
        // Not listing kubepods: it is named, its children are not.
        let pruned = paths(walk(&mount, |id| id != ino("kubepods")).unwrap());
        assert_eq!(pruned.len(), 4);
        assert!(!pruned.contains_key(&ino("kubepods/burstable")));
        // A mount of a sub-tree names paths from the real root.
        let found = paths(
            walk(
                &Mount {
                    dir: dir.join("system.slice"),
                    root: "/system.slice".into(),
                },
                |_| true,
            )
            .unwrap(),
        );
        assert_eq!(
            found[&ino("system.slice/nginx.service")],
            "/system.slice/nginx.service"
        );
        assert!(walk(
            &Mount {
                dir: dir.join("missing"),
                root: "/".into()
            },
            |_| true
        )
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Containers' leaf cgroups are not listed again, unless a wanted id is
    /// missing: then the whole tree is.
    #[test]
    fn later_walks_skip_leaf_containers_unless_an_id_is_missing() {
        let dir = std::env::temp_dir().join(format!("flowlog-walk-leaves-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pod = "kubepods/burstable/pod7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b";
        let container = format!("{pod}/{}", "a".repeat(64));
        std::fs::create_dir_all(dir.join(&container)).unwrap();
        let ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
        let mount = Mount {
            dir: dir.clone(),
            root: "/".into(),
        };
        let mut tree = Tree::default();
        let first = tree.walk(&mount, &[]).unwrap();
        assert_eq!(first[&ino(&container)].workload.kind, WorkloadKind::Pod);
        assert!(tree.leaves.contains(&ino(&container)));
        // A runtime's sub-cgroup appears inside the container, and a new container beside it.
        let sub = format!("{container}/container");
        let other = format!("{pod}/{}", "b".repeat(64));
        std::fs::create_dir_all(dir.join(&sub)).unwrap();
        std::fs::create_dir_all(dir.join(&other)).unwrap();
        let second = tree.walk(&mount, &[]).unwrap();
        assert!(
            second.contains_key(&ino(&other)),
            "new containers are found"
        );
        assert!(
            !second.contains_key(&ino(&sub)),
            "the known leaf was not listed"
        );
        let wanted = tree.walk(&mount, &[ino(&sub)]).unwrap();
        assert_eq!(
            wanted[&ino(&sub)].workload.container_id.as_deref(),
            Some(&*"a".repeat(64))
        );
        assert!(!tree.leaves.contains(&ino(&container)), "no longer a leaf");
        assert!(wanted.values().all(|c| c.in_scope), "no scope: everything is in it");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cgroups_in_the_scopes_subtree_are_marked() {
        let dir = std::env::temp_dir().join(format!("flowlog-walk-scope-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["node1/system.slice/a.service", "node10/b.service", "node2"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
        let scope = Scope::new(&super::super::scope::ScopeConfig { cgroup: Some("/node1".into()), netns: vec![] }).unwrap();
        let mut tree = Tree { scope, ..Tree::default() };
        let found = tree.walk(&Mount { dir: dir.clone(), root: "/".into() }, &[]).unwrap();
        let in_scope = |p: &str| found[&ino(p)].in_scope;
        assert!(in_scope("node1") && in_scope("node1/system.slice") && in_scope("node1/system.slice/a.service"));
        assert!(!in_scope("") && !in_scope("node10") && !in_scope("node10/b.service") && !in_scope("node2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cgroups_directory_below_the_mount() {
        let m = Mount { dir: "/sys/fs/cgroup".into(), root: "/".into() };
        assert_eq!(m.dir_of("/a/b.service"), Path::new("/sys/fs/cgroup/a/b.service"));
        assert_eq!(m.dir_of("/"), Path::new("/sys/fs/cgroup"));
        let sub = Mount { dir: "/host/cg".into(), root: "/kubepods.slice".into() };
        assert_eq!(sub.dir_of("/kubepods.slice/pod1"), Path::new("/host/cg/pod1"));
        assert_eq!(sub.dir_of("/kubepods.slice"), Path::new("/host/cg"));
    }
}
