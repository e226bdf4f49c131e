//! What a cgroup v2 path says about the workload that owns it. The names
//! are the ones kubelet, the container runtimes and systemd give:
//!
//! - kubelet, cgroupfs driver: `kubepods/burstable/pod<uid>/<container id>`
//!   (CRI-O: `.../crio-<id>`); Guaranteed pods sit right under `kubepods`.
//! - kubelet, systemd driver: `kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`). The kubepods tree may sit
//!   deeper (kind and k3s nodes: `kubelet.slice/kubelet-kubepods.slice/...`).
//! - Docker: `system.slice/docker-<id>.scope` (systemd) or `docker/<id>`
//!   (cgroupfs); Podman: `machine.slice/libpod-<id>.scope`,
//!   `libpod_parent/libpod-<id>`; containerd and CRI-O outside Kubernetes:
//!   `cri-containerd-<id>.scope`, `crio-<id>.scope`.
//! - systemd services: the innermost `<name>.service`.
//!
//! A path shaped like a pod's or a container's that does not parse gives
//! the host with a reason, never an error: the flow is still reported.

use flowlog_schema::{Workload, WorkloadKind, WorkloadReason};

/// Container scope prefixes and the runtime each names, longest first
/// (`crio-conmon-` before `crio-`). The conmon scopes hold the runtime's
/// monitor process of that container: it is counted as the container's.
const RUNTIMES: [(&str, &str); 6] = [
    ("cri-containerd-", "containerd"),
    ("crio-conmon-", "crio"),
    ("crio-", "crio"),
    ("docker-", "docker"),
    ("libpod-conmon-", "podman"),
    ("libpod-", "podman"),
];

/// The workload of the cgroup at `path` (relative to the cgroup v2 root,
/// e.g. `/system.slice/nginx.service`).
pub fn classify(path: &str) -> Workload {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let parsed = if let Some(k) = segs.iter().position(|s| is_kubepods(s)) {
        pod(&segs[k + 1..])
    } else if let Some(c) = container(&segs) {
        c
    } else if let Some(unit) = segs.iter().rev().find(|s| s.ends_with(".service")) {
        Ok(Workload {
            name: unit.strip_suffix(".service").map(str::to_owned),
            unit: Some(unit.to_string()),
            ..Workload::of(WorkloadKind::Service)
        })
    } else {
        Ok(Workload::of(WorkloadKind::Host))
    };
    parsed.unwrap_or_else(|reason| Workload::unresolved(reason, Some(path.to_string())))
}

/// kubelet's root: `kubepods` (cgroupfs), `kubepods.slice` (systemd), or a
/// nested one such as kind's `kubelet-kubepods.slice`.
fn is_kubepods(s: &str) -> bool {
    s == "kubepods" || s == "kubepods.slice" || s.ends_with("-kubepods.slice")
}

/// The segments below kubelet's root: QoS level, pod, container.
fn pod(segs: &[&str]) -> Result<Workload, WorkloadReason> {
    let (qos, rest) = match segs.first().and_then(|s| qos_class(s)) {
        Some(q) => (q, &segs[1..]),
        None => ("Guaranteed", segs),
    };
    let uid = rest
        .first()
        .and_then(|s| pod_uid(s))
        .ok_or(WorkloadReason::UnparsablePath)?;
    let mut w = Workload {
        pod_uid: Some(uid),
        qos_class: Some(qos.into()),
        ..Workload::of(WorkloadKind::Pod)
    };
    // A process in the pod's own cgroup (none in practice) is the pod's.
    if let Some(c) = rest.get(1) {
        let (runtime, id, unit) =
            container_segment(c).ok_or_else(|| unknown_runtime_or_garbage(c))?;
        w.runtime = runtime.map(str::to_owned);
        w.container_id = Some(id.to_owned());
        w.unit = unit.map(str::to_owned);
    }
    Ok(w)
}

/// `burstable` / `besteffort` (cgroupfs) or `kubepods-burstable.slice` (systemd).
fn qos_class(s: &str) -> Option<&'static str> {
    let level = s
        .strip_suffix(".slice")
        .and_then(|s| s.rsplit_once("kubepods-"))
        .map_or(s, |(_, l)| l);
    match level {
        "burstable" => Some("Burstable"),
        "besteffort" => Some("BestEffort"),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd).
fn pod_uid(s: &str) -> Option<String> {
    let uid = match s.strip_suffix(".slice") {
        Some(unit) => unit
            .rsplit_once("-pod")
            .filter(|(p, _)| p.contains("kubepods"))?
            .1
            .replace('_', "-"),
        None => s.strip_prefix("pod")?.to_owned(),
    };
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID (8-4-4-4-12 lowercase hex), or the 32 hex digits kubelet uses as
/// the UID of a static pod (a hash of its manifest).
fn is_pod_uid(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    match b.len() {
        32 => b.iter().all(hex),
        36 => b.iter().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                *c == b'-'
            } else {
                hex(c)
            }
        }),
        _ => false,
    }
}

/// A full container id: 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// A container's cgroup: (runtime, id, systemd unit). A bare id is
/// kubelet's cgroupfs naming, which does not say the runtime.
fn container_segment(s: &str) -> Option<(Option<&'static str>, &str, Option<&str>)> {
    let (name, unit) = match s.strip_suffix(".scope") {
        Some(n) => (n, Some(s)),
        None => (s, None),
    };
    if unit.is_none() && is_container_id(name) {
        return Some((None, name, None));
    }
    RUNTIMES
        .iter()
        .find_map(|(prefix, runtime)| Some((Some(*runtime), name.strip_prefix(prefix)?, unit)))
        .filter(|(_, id, _)| is_container_id(id))
}

/// `<something>-<container id>` is a runtime this version does not know;
/// anything else does not parse.
fn unknown_runtime_or_garbage(s: &str) -> WorkloadReason {
    let name = s.strip_suffix(".scope").unwrap_or(s);
    match name.rsplit_once('-') {
        Some((prefix, id)) if !prefix.is_empty() && is_container_id(id) => {
            WorkloadReason::UnknownRuntime
        }
        _ => WorkloadReason::UnparsablePath,
    }
}

/// A container outside Kubernetes: the outermost container cgroup in the
/// path (what runs inside it, systemd services included, is the
/// container's). None when the path names no container.
fn container(segs: &[&str]) -> Option<Result<Workload, WorkloadReason>> {
    for (i, s) in segs.iter().enumerate() {
        // Docker's cgroupfs driver: `docker/<id>`.
        if *s == "docker" && i + 1 < segs.len() {
            let id = segs[i + 1];
            return Some(if is_container_id(id) {
                Ok(Workload {
                    runtime: Some("docker".into()),
                    container_id: Some(id.into()),
                    ..Workload::of(WorkloadKind::Container)
                })
            } else {
                Err(WorkloadReason::UnparsablePath)
            });
        }
        // A runtime's scope (`docker-<id>.scope`), or Podman's cgroupfs `libpod-<id>`.
        let name = s.strip_suffix(".scope").unwrap_or(s);
        let scoped = name.len() != s.len() || (i > 0 && segs[i - 1] == "libpod_parent");
        if scoped && RUNTIMES.iter().any(|(p, _)| name.starts_with(p)) {
            return Some(match container_segment(s) {
                Some((runtime, id, unit)) => Ok(Workload {
                    runtime: runtime.map(str::to_owned),
                    container_id: Some(id.into()),
                    unit: unit.map(str::to_owned),
                    ..Workload::of(WorkloadKind::Container)
                }),
                None => Err(WorkloadReason::UnparsablePath),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b";
    const UID_: &str = "7f3e1c2a_9b4d_4e5f_8a6b_0c1d2e3f4a5b";
    const STATIC_UID: &str = "6f9a2ac1f3b1c0d4e5f60718293a4b5c";

    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn pod(
        uid: &str,
        cid: Option<&str>,
        runtime: Option<&str>,
        qos: &str,
        unit: Option<&str>,
    ) -> Workload {
        Workload {
            pod_uid: Some(uid.into()),
            container_id: cid.map(Into::into),
            runtime: runtime.map(Into::into),
            qos_class: Some(qos.into()),
            unit: unit.map(Into::into),
            ..Workload::of(WorkloadKind::Pod)
        }
    }

    fn container(runtime: &str, cid: &str, unit: Option<&str>) -> Workload {
        Workload {
            runtime: Some(runtime.into()),
            container_id: Some(cid.into()),
            unit: unit.map(Into::into),
            ..Workload::of(WorkloadKind::Container)
        }
    }

    fn service(name: &str) -> Workload {
        Workload {
            name: Some(name.into()),
            unit: Some(format!("{name}.service")),
            ..Workload::of(WorkloadKind::Service)
        }
    }

    #[test]
    fn kubelet_systemd_driver() {
        let (a, b, c) = (id('a'), id('b'), id('c'));
        let cases = [
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{a}.scope"),
                pod(UID, Some(&a), Some("containerd"), "Burstable", Some(&format!("cri-containerd-{a}.scope"))),
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{b}.scope"),
                pod(UID, Some(&b), Some("crio"), "BestEffort", Some(&format!("crio-{b}.scope"))),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{c}.scope"),
                pod(UID, Some(&c), Some("docker"), "Guaranteed", Some(&format!("docker-{c}.scope"))),
            ),
            // CRI-O's monitor, and the `container` sub-cgroup some runtimes make.
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{b}.scope"),
                pod(UID, Some(&b), Some("crio"), "Burstable", Some(&format!("crio-conmon-{b}.scope"))),
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{b}.scope/container"),
                pod(UID, Some(&b), Some("crio"), "Burstable", Some(&format!("crio-{b}.scope"))),
            ),
            // kind / k3s-in-docker nodes: the kubepods tree below the node's own cgroup.
            (
                format!(
                    "/system.slice/docker-{c}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                     kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{a}.scope"
                ),
                pod(UID, Some(&a), Some("containerd"), "BestEffort", Some(&format!("cri-containerd-{a}.scope"))),
            ),
            // The pod's own cgroup, and a static pod's hash UID.
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"), pod(UID, None, None, "Burstable", None)),
            (
                format!("/kubepods.slice/kubepods-pod{STATIC_UID}.slice/cri-containerd-{a}.scope"),
                pod(STATIC_UID, Some(&a), Some("containerd"), "Guaranteed", Some(&format!("cri-containerd-{a}.scope"))),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(classify(&path), want, "{path}");
        }
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        let (a, b) = (id('a'), id('b'));
        let cases = [
            (
                format!("/kubepods/burstable/pod{UID}/{a}"),
                pod(UID, Some(&a), None, "Burstable", None),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{a}"),
                pod(UID, Some(&a), None, "BestEffort", None),
            ),
            (
                format!("/kubepods/pod{UID}/{a}"),
                pod(UID, Some(&a), None, "Guaranteed", None),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/crio-{b}"),
                pod(UID, Some(&b), Some("crio"), "Burstable", None),
            ),
            (
                format!("/kubepods/burstable/pod{UID}"),
                pod(UID, None, None, "Burstable", None),
            ),
            // kind's cgroupfs nodes nest it under /kubelet.
            (
                format!("/kubelet/kubepods/besteffort/pod{UID}/{a}"),
                pod(UID, Some(&a), None, "BestEffort", None),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(classify(&path), want, "{path}");
        }
    }

    #[test]
    fn plain_containers() {
        let (a, b) = (id('a'), id('b'));
        let cases = [
            (
                format!("/system.slice/docker-{a}.scope"),
                container("docker", &a, Some(&format!("docker-{a}.scope"))),
            ),
            (format!("/docker/{a}"), container("docker", &a, None)),
            (
                format!("/machine.slice/libpod-{b}.scope"),
                container("podman", &b, Some(&format!("libpod-{b}.scope"))),
            ),
            (
                format!("/machine.slice/libpod-{b}.scope/container"),
                container("podman", &b, Some(&format!("libpod-{b}.scope"))),
            ),
            (
                format!("/machine.slice/libpod-conmon-{b}.scope"),
                container("podman", &b, Some(&format!("libpod-conmon-{b}.scope"))),
            ),
            (
                format!("/libpod_parent/libpod-{b}"),
                container("podman", &b, None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{b}.scope"
                ),
                container("podman", &b, Some(&format!("libpod-{b}.scope"))),
            ),
            (
                format!("/system.slice/cri-containerd-{a}.scope"),
                container("containerd", &a, Some(&format!("cri-containerd-{a}.scope"))),
            ),
            (
                format!("/system.slice/crio-{a}.scope"),
                container("crio", &a, Some(&format!("crio-{a}.scope"))),
            ),
            // A systemd inside a container: still the container.
            (
                format!("/system.slice/docker-{a}.scope/system.slice/nginx.service"),
                container("docker", &a, Some(&format!("docker-{a}.scope"))),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(classify(&path), want, "{path}");
        }
    }

    #[test]
    fn systemd_services_and_the_host() {
        assert_eq!(classify("/system.slice/nginx.service"), service("nginx"));
        assert_eq!(
            classify("/system.slice/system-getty.slice/getty@tty1.service"),
            service("getty@tty1")
        );
        assert_eq!(
            classify("/system.slice/system-postgresql.slice/postgresql@15-main.service"),
            service("postgresql@15-main")
        );
        // Sub-cgroups a service delegates are still the service's.
        assert_eq!(
            classify("/system.slice/containerd.service/worker"),
            service("containerd")
        );
        assert_eq!(classify("/system.slice/docker.service"), service("docker"));
        assert_eq!(
            classify("/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service"),
            service("app-foo")
        );
        assert_eq!(
            classify("/user.slice/user-1000.slice/user@1000.service/init.scope"),
            service("user@1000")
        );
        // docker-compose@ is a service, not a container scope.
        assert_eq!(
            classify("/system.slice/system-docker\\x2dcompose.slice/docker-compose@web.service"),
            service("docker-compose@web")
        );
        for host in [
            "/",
            "",
            "/init.scope",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice",
            "/machine.slice",
            "/docker",
        ] {
            assert_eq!(classify(host), Workload::of(WorkloadKind::Host), "{host:?}");
        }
    }

    #[test]
    fn garbage_is_the_host_with_a_reason() {
        let a = id('a');
        let unparsable = [
            "/kubepods".to_string(),
            "/kubepods/burstable".to_string(),
            "/kubepods.slice/kubepods-burstable.slice".to_string(),
            "/kubepods/burstable/podnot-a-uid/x".to_string(),
            format!("/kubepods/burstable/pod{}/{a}", &UID[..35]),
            format!("/kubepods/burstable/pod{}/{a}", UID.to_uppercase()),
            format!("/kubepods/burstable/pod{UID}/not-a-container!"),
            format!("/kubepods/burstable/pod{UID}/{}", &a[..63]),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-xyz.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}x.slice/cri-containerd-{a}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{}.scope", a.to_uppercase()),
            "/system.slice/docker-xyz.scope".to_string(),
            "/docker/not-an-id".to_string(),
            format!("/machine.slice/libpod-{a}a.scope"),
            "/kubepods/burstable/pod\u{e9}\u{e9}/\0".to_string(),
        ];
        for path in unparsable {
            assert_eq!(
                classify(&path),
                Workload::unresolved(WorkloadReason::UnparsablePath, Some(path.clone())),
                "{path:?}"
            );
        }
        for path in [
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/runsc-{a}.scope"),
            format!("/kubepods/burstable/pod{UID}/kata-{a}"),
        ] {
            assert_eq!(classify(&path), Workload::unresolved(WorkloadReason::UnknownRuntime, Some(path.clone())), "{path}");
        }
    }
}
