//! Runtime pieces the sidecar and the enricher share, written once: log
//! setup, the Prometheus endpoint and the process CPU/memory gauges. The
//! `kafka` feature adds a producer that serves its delivery reports without
//! a busy loop; the `kube` feature adds the Kubernetes API client and watch helpers; the
//! `testkit` feature the local Kafka-protocol broker the test suites and the
//! benchmarks start.

#[cfg(feature = "kube")]
pub mod kube;
pub mod logging;
pub mod process;
#[cfg(feature = "kafka")]
pub mod producer;
pub mod prometheus;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
