//! Shared pieces of the benchmarks: a loopback TCP connection-rate load
//! generator and starting the sidecar. (A process's CPU time and memory, the
//! local broker and scraping metrics: `flowlog_runtime`.)

pub mod loadgen;
pub mod sidecar;
