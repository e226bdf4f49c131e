//! Metadata sources: who owned an IP, and when. The sidecars' heartbeats,
//! the Kubernetes Services watch and EC2 feed ownership histories
//! ([`identity::IdentityStore`]) with [`ownership::Event`]s; the static map
//! is a fixed CIDR table.

pub mod cidr;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod heartbeats;
pub mod identity;
pub mod ownership;
pub mod services;
pub mod static_map;

use std::sync::{Arc, RwLock};

use identity::IdentityStore;

/// Workload attributes of an owner (the enriched schema's Attribution
/// fields), shared by every IP it owns.
pub use flowlog_schema::Attrs;

pub type Owner = Arc<Attrs>;

/// The metadata attribution reads, each updated in the background by its
/// source (identity topic, Kubernetes API, EC2, static-map file).
#[derive(Clone, Default)]
pub struct Sources {
    pub identity: Arc<RwLock<IdentityStore>>,
    pub kubernetes: Arc<RwLock<IdentityStore>>,
    pub ec2: Arc<RwLock<IdentityStore>>,
    pub cidr: Arc<RwLock<cidr::CidrMap>>,
    /// How far each sidecar's sequence epochs got (heartbeats), for the
    /// pipeline's gap count.
    pub produced: Arc<crate::pipeline::Produced>,
}
