//! The enricher's pieces, as a library so benchmarks can drive the hot path.

pub mod attribute;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod sink;
pub mod sources;
