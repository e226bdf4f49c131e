//! Where records go: one interface for the printing modes and Kafka, so the
//! capture loop never asks which one it has.

use std::{io, time::Duration};

use flowlog_schema::Flow;

/// Periodic events of the capture loop a sink may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// An identity heartbeat is due.
    Heartbeat,
    /// Time to look whether the host's identity (its IPs) changed.
    IdentityCheck,
    /// Time to refresh gauges.
    Stats,
    /// The workloads' IPs changed (announce them at once).
    WorkloadIps,
}

pub trait Sink {
    /// One record; its counters are deltas since the connection's previous
    /// record. The sink may fill in its sequence fields.
    fn send(&mut self, flow: &mut Flow) -> io::Result<()>;
    /// After each drain of the ring buffer.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn tick(&mut self, _tick: Tick) {}
    /// At exit: deliver what it can within `timeout`, keep the rest for the
    /// next run.
    fn close(self: Box<Self>, _timeout: Duration) {}
}
