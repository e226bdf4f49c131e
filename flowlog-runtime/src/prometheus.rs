//! The Prometheus endpoint (`GET /metrics`) every binary serves.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

#[derive(Debug, thiserror::Error)]
#[error("starting the metrics endpoint on {listen}: {source}")]
pub struct ServeError {
    listen: SocketAddr,
    source: BuildError,
}

/// Installs the global `metrics` recorder and serves it on `listen`.
/// `buckets` gives histogram buckets by exact metric name (histograms not
/// named there are exported as summaries).
pub fn serve(listen: SocketAddr, buckets: &[(&str, &[f64])]) -> Result<(), ServeError> {
    let err = |source| ServeError { listen, source };
    let mut builder = PrometheusBuilder::new().with_http_listener(listen);
    for (name, bounds) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), bounds)
            .map_err(err)?;
    }
    builder.install().map_err(err)
}

/// One metric as its binary describes it (name, type, unit, HELP text).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetricRef {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    pub unit: Option<&'static str>,
    pub help: String,
}

/// Every metric `describe` describes, captured by a recorder that keeps only
/// the descriptions: the binary's own list of what it exports, for docs and
/// deployment checks (no parsing of source text).
pub fn reference(describe: impl FnOnce()) -> Vec<MetricRef> {
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
    #[derive(Default)]
    struct Descriptions(std::sync::Mutex<Vec<MetricRef>>);
    impl Descriptions {
        fn add(&self, kind: &'static str, key: KeyName, unit: Option<Unit>, help: SharedString) {
            let m = MetricRef { name: key.as_str().to_string(), kind, unit: unit.map(|u| u.as_str()), help: help.to_string() };
            self.0.lock().unwrap().push(m);
        }
    }
    impl Recorder for Descriptions {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.add("counter", key, unit, help)
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.add("gauge", key, unit, help)
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, help: SharedString) {
            self.add("histogram", key, unit, help)
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }
    let d = Descriptions::default();
    metrics::with_local_recorder(&d, describe);
    let mut all = d.0.into_inner().unwrap();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all.dedup_by(|a, b| a.name == b.name);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one test that installs the global recorder.
    #[test]
    fn serves_what_is_recorded_with_the_buckets() {
        use crate::testkit::{free_port, sample, scrape};
        let addr = format!("127.0.0.1:{}", free_port());
        serve(addr.parse().unwrap(), &[("t_latency_seconds", &[0.1, 1.0])]).unwrap();
        metrics::counter!("t_total").increment(2);
        metrics::histogram!("t_latency_seconds").record(0.5);
        let t0 = std::time::Instant::now();
        let body = loop {
            match scrape(&addr) {
                Ok(b) if b.contains("t_total") => break b,
                r => assert!(t0.elapsed().as_secs() < 10, "endpoint: {r:?}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(sample(&body, "t_total"), 2.0, "{body}");
        assert_eq!(
            sample(&body, "t_latency_seconds_bucket{le=\"0.1\"}"),
            0.0,
            "{body}"
        );
        assert_eq!(
            sample(&body, "t_latency_seconds_bucket{le=\"1\"}"),
            1.0,
            "{body}"
        );
    }

    #[test]
    fn empty_buckets_are_refused_with_the_address() {
        let listen: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = serve(listen, &[("x_seconds", &[])]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("starting the metrics endpoint on 127.0.0.1:1: "),
            "{e}"
        );
    }

    #[test]
    fn reference_lists_what_is_described() {
        let r = reference(|| {
            metrics::describe_counter!("t_events_total", "Events.");
            crate::process::describe("t", "The test");
            metrics::describe_histogram!("t_latency_seconds", metrics::Unit::Seconds, "Latency.");
        });
        let names: Vec<(&str, &str)> = r.iter().map(|m| (m.name.as_str(), m.kind)).collect();
        assert_eq!(
            names,
            [
                ("t_events_total", "counter"),
                ("t_latency_seconds", "histogram"),
                ("t_process_cpu_seconds_total", "gauge"),
                ("t_process_resident_memory_bytes", "gauge")
            ]
        );
        assert_eq!(r[1].unit, Some("seconds"));
        assert_eq!(r[0].help, "Events.");
    }
}
