//! The `Workload` record (Flow.workload) and its enriched form
//! (EnrichedFlow.local_workload, `WorkloadInfo`: the same fields with the
//! enums as text): which pod, container or systemd service on the sidecar's
//! host owned a connection.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    enums::{WorkloadKind, WorkloadReason},
};

/// One workload, shared (`Arc`) by every flow of its cgroup. The fields
/// are in the schema's order; see schemas/flow.avsc for each one's meaning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub reason: Option<WorkloadReason>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub runtime: Option<String>,
    pub qos_class: Option<String>,
    pub unit: Option<String>,
    pub cgroup_path: Option<String>,
    pub container_name: Option<String>,
    pub owner_kind: Option<String>,
    pub owner_name: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Which Flow schema a workload was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadVersion {
    /// history/flow.v2.avsc: up to `cgroup_path`.
    V2,
    /// The current schema: with the Kubernetes API's names, owner and labels.
    Current,
}

impl Workload {
    /// A workload of `kind` with every other field empty.
    pub fn of(kind: WorkloadKind) -> Workload {
        Workload {
            kind,
            reason: None,
            name: None,
            namespace: None,
            pod_uid: None,
            container_id: None,
            runtime: None,
            qos_class: None,
            unit: None,
            cgroup_path: None,
            container_name: None,
            owner_kind: None,
            owner_name: None,
            labels: BTreeMap::new(),
        }
    }

    /// The host, because of `reason`; `cgroup_path` is the evidence, if any.
    pub fn unresolved(reason: WorkloadReason, cgroup_path: Option<String>) -> Workload {
        Workload {
            reason: Some(reason),
            cgroup_path,
            ..Workload::of(WorkloadKind::Host)
        }
    }

    /// The name people know it by: a pod's or service's name, else the
    /// container id.
    pub fn display_name(&self) -> Option<&str> {
        self.name.as_deref().or(self.container_id.as_deref()).or(self.pod_uid.as_deref())
    }

    /// The optional strings from `name` to `cgroup_path`, in the schema's order.
    fn strings(&self) -> [&Option<String>; 8] {
        [
            &self.name,
            &self.namespace,
            &self.pod_uid,
            &self.container_id,
            &self.runtime,
            &self.qos_class,
            &self.unit,
            &self.cgroup_path,
        ]
    }

    /// The fields after `cgroup_path`, in the schema's order (both forms).
    fn write_metadata(&self, w: &mut impl Encoder) {
        for s in [&self.container_name, &self.owner_kind, &self.owner_name] {
            w.opt_string(s.as_deref());
        }
        w.string_map(self.labels.iter());
    }

    /// `["null", Workload]` as in schemas/flow.avsc (Avro enums).
    pub fn write_opt(w: &mut Writer, v: Option<&Workload>) {
        let Some(v) = v else { return w.long(0) };
        w.long(1);
        v.write(w);
    }

    /// The `Workload` record (Flow.workload, Identity.workloads).
    pub fn write(&self, w: &mut Writer) {
        self.kind.write(w);
        match self.reason {
            None => w.long(0),
            Some(r) => {
                w.long(1);
                r.write(w);
            }
        }
        for s in self.strings() {
            w.opt_string(s.as_deref());
        }
        self.write_metadata(w);
    }

    /// `["null", WorkloadInfo]` as in schemas/enriched_flow.avsc (enums as text).
    pub fn write_opt_text(w: &mut impl Encoder, v: Option<&Workload>) {
        w.null_or(v.is_some());
        let Some(v) = v else { return };
        w.string(v.kind.symbol());
        w.opt_string(v.reason.map(WorkloadReason::symbol));
        for s in v.strings() {
            w.opt_string(s.as_deref());
        }
        v.write_metadata(w);
    }

    /// Reads `["null", Workload]` (the Flow form) as `version` wrote it.
    pub fn read_opt(r: &mut Reader, version: WorkloadVersion) -> Result<Option<Arc<Workload>>, DecodeError> {
        if r.union_index(2)? == 0 {
            return Ok(None);
        }
        Workload::read_version(r, version).map(|w| Some(Arc::new(w)))
    }

    /// Reads the `Workload` record (current form).
    pub fn read(r: &mut Reader) -> Result<Workload, DecodeError> {
        Workload::read_version(r, WorkloadVersion::Current)
    }

    fn read_version(r: &mut Reader, version: WorkloadVersion) -> Result<Workload, DecodeError> {
        let kind = WorkloadKind::read(r)?;
        let reason = if r.union_index(2)? == 0 {
            None
        } else {
            Some(WorkloadReason::read(r)?)
        };
        let mut w = Workload {
            kind,
            reason,
            name: r.opt_string()?,
            namespace: r.opt_string()?,
            pod_uid: r.opt_string()?,
            container_id: r.opt_string()?,
            runtime: r.opt_string()?,
            qos_class: r.opt_string()?,
            unit: r.opt_string()?,
            cgroup_path: r.opt_string()?,
            ..Workload::of(kind)
        };
        if version == WorkloadVersion::Current {
            w.container_name = r.opt_string()?;
            w.owner_kind = r.opt_string()?;
            w.owner_name = r.opt_string()?;
            r.blocks(|r| {
                let k = r.string()?;
                w.labels.insert(k, r.string()?);
                Ok(())
            })?;
        }
        Ok(w)
    }
}
