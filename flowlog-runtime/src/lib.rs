//! Runtime pieces the sidecar and the enricher share, written once: log
//! setup, the Prometheus endpoint and the process CPU/memory gauges. The
//! `kube` feature adds the Kubernetes API client and watch helpers; the
//! `testkit` feature the local Kafka-protocol broker the test suites and the
//! benchmarks start.

#[cfg(feature = "kube")]
pub mod kube;
pub mod logging;
pub mod process;
pub mod prometheus;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
