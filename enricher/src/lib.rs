//! The enricher's pieces, as a library so benchmarks can drive the hot path.

pub mod attribute;
pub mod config;
pub mod consumer;
pub mod decode;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod selfcheck;
pub mod sink;
pub mod sources;
