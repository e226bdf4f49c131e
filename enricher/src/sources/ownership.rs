//! Ownership events: what every ownership source (the sidecars' heartbeats,
//! EC2 network interfaces) tells the ownership history, whatever its wire
//! format or API.

use std::net::IpAddr;

use super::Owner;

/// From `time_ns` on, the announcer `key` holds exactly the IPs of `change`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Who announces: a sidecar's host id, an ENI id. Each key's events
    /// replace its previous ones.
    pub key: String,
    pub time_ns: i64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Holds these IPs (and no longer any it held before and are not
    /// listed), as this owner. The owner is this key's own (not shared
    /// with another key's events).
    Holds { owner: Owner, ips: Vec<IpAddr> },
    /// Holds nothing any more (sidecar stopped, ENI deleted).
    Released,
}
