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
}
