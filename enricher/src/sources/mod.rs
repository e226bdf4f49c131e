//! Metadata sources: who owned an IP, and when. The sidecars' heartbeats
//! and EC2 feed ownership histories ([`identity::IdentityStore`]) with
//! [`ownership::Event`]s; the static map is a fixed CIDR table.

pub mod cidr;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod heartbeats;
pub mod identity;
pub mod ownership;
pub mod static_map;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use crate::attribute::Attributor;
use identity::IdentityStore;

/// Workload attributes of an owner, shared by every IP it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Attrs {
    pub workload: Option<String>,
    pub host_id: Option<String>,
    pub instance_id: Option<String>,
    pub app: Option<String>,
    pub service: Option<String>,
    pub cluster: Option<String>,
    pub env: Option<String>,
    pub account: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub team: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub eni_id: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
}

impl Attrs {
    /// An owner described by labels: the well-known ones (`app`, `team`,
    /// `eni_id`, ...) also fill the attribute of that name.
    pub fn from_labels(
        host_id: Option<String>,
        instance_id: Option<String>,
        workload: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Attrs {
        let get = |k: &str| labels.get(k).cloned();
        Attrs {
            workload,
            host_id,
            instance_id,
            app: get("app"),
            service: get("service"),
            cluster: get("cluster"),
            env: get("env"),
            account: get("account"),
            region: get("region"),
            zone: get("zone"),
            team: get("team"),
            eni_id: get("eni_id"),
            vpc_id: get("vpc_id"),
            subnet_id: get("subnet_id"),
            labels,
        }
    }
}

pub type Owner = Arc<Attrs>;

/// The metadata attribution reads, each updated in the background by its
/// source (identity topic, EC2, static-map file).
#[derive(Clone, Default)]
pub struct Sources {
    pub identity: Arc<RwLock<IdentityStore>>,
    pub ec2: Arc<RwLock<IdentityStore>>,
    pub cidr: Arc<RwLock<cidr::CidrMap>>,
}

impl Sources {
    /// Runs `f` with an attributor over the sources as they are now.
    pub fn attribute<R>(&self, f: impl FnOnce(&Attributor) -> R) -> R {
        let (identity, ec2, cidr) = (
            self.identity.read().unwrap(),
            self.ec2.read().unwrap(),
            self.cidr.read().unwrap(),
        );
        f(&Attributor {
            identity: &identity,
            ec2: &ec2,
            cidr: &cidr,
        })
    }
}
