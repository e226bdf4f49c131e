//! Metadata sources: who owned an IP, and when.

pub mod cidr;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod identity;

use std::{collections::BTreeMap, sync::Arc};

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

pub type Owner = Arc<Attrs>;
