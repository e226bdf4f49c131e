//! Shared pieces of the benchmarks: a loopback TCP connection-rate load
//! generator and helpers to read a process's CPU time and peak memory.

pub mod loadgen;
pub mod procstat;
pub mod sidecar;
