//! Metadata sources: who owned an IP, and when.

pub mod cidr;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod identity;

use std::sync::Arc;

/// Workload attributes of an owner (the enriched schema's Attribution
/// fields), shared by every IP it owns.
pub use flowlog_schema::Attrs;

pub type Owner = Arc<Attrs>;
