//! The Kubernetes API as both binaries watch it (the sidecar its node's
//! pods, the enricher every Service), set up once: the watch's own thread
//! and runtime, the client, and what a watch error means.
//!
//! kube-runtime's `watcher` gives the semantics: a paginated list, then a
//! watch from its resourceVersion with bookmarks; on 410 Gone (history
//! compacted) a fresh list; on errors a retry with exponential backoff
//! (`default_backoff`: 0.8 s doubling to 30 s).

use std::{future::Future, time::Duration};

use ::kube::{runtime::watcher, Client};
use tracing::{error, info, warn};

/// The API server ends each watch after this long and the watcher resumes
/// it from the last resourceVersion: with [`READ_TIMEOUT`] above it, a
/// quiet but healthy watch is never cut, and a server that stops answering
/// (a list or get that hangs) is given up on.
pub const WATCH_TIMEOUT_SECS: u32 = 55;
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A watch's metrics: the `api_up` gauge and the errors counter (label `error`).
pub struct WatchMetrics {
    pub up: &'static str,
    pub errors: &'static str,
}

/// An `api_url` setting the client can use: plain http, with a host.
pub fn api_url_ok(url: &str) -> bool {
    url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some() && u.scheme_str() == Some("http"))
}

/// Runs the future `watch` makes on a thread of its own (`name`) with its
/// own tokio runtime, so that nothing synchronous ever waits for it. Never
/// fails: a thread or runtime that cannot start is logged, with what that
/// means (`meanwhile`).
pub fn spawn<F: Future<Output = ()>>(name: &str, meanwhile: &'static str, watch: impl FnOnce() -> F + Send + 'static) {
    // rustls needs one crypto provider for the process; with both ring and
    // aws-lc-rs linked (the enricher's EC2 source brings the latter) it
    // cannot choose by itself and the client would panic. Already installed
    // (the other watch, or the EC2 client) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(watch()),
            Err(e) => error!("starting the Kubernetes watch's runtime: {e}; {meanwhile}"),
        }
    });
    if let Err(e) = spawned {
        error!("starting the Kubernetes watch thread: {e}; {meanwhile}");
    }
}

/// The client: `api_url` as given (plain http, no auth), else what kube-rs
/// infers (in-cluster service account, else the kubeconfig). Retried (1 s
/// doubling to 60 s) until one is built, each failure logged and counted
/// (`error="client"`).
pub async fn connect(api_url: Option<&str>, m: &WatchMetrics, meanwhile: &str) -> Client {
    let mut retry = Duration::from_secs(1);
    loop {
        match client(api_url).await {
            Ok(c) => return c,
            Err(e) => {
                error!("Kubernetes API client: {e}; retrying in {retry:?} ({meanwhile})");
                metrics::counter!(m.errors, "error" => "client").increment(1);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(60));
            }
        }
    }
}

async fn client(api_url: Option<&str>) -> Result<Client, String> {
    let mut c = match api_url {
        Some(url) => ::kube::Config::new(url.parse::<http::Uri>().map_err(|e| format!("api_url {url:?}: {e}"))?),
        None => ::kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    c.read_timeout = Some(READ_TIMEOUT);
    // The read timeout counts from each request, not from when its pooled
    // connection went idle.
    c.reset_reader_on_write = true;
    Client::try_from(c).map_err(|e| e.to_string())
}

/// Counts and logs a watch error (`what`: "pod watch"). A compacted history
/// (410 Gone) is routine, the watcher lists again; anything else sets
/// `api_up` to 0 until the watch works again (`meanwhile`: what stays).
pub fn watch_error(e: &watcher::Error, m: &WatchMetrics, what: &str, meanwhile: &str) {
    let kind = error_kind(e);
    metrics::counter!(m.errors, "error" => kind).increment(1);
    if kind == "expired" {
        info!("{what}: {e}; listing again");
    } else {
        metrics::gauge!(m.up).set(0.0);
        warn!("{what}: {e}; retrying with backoff ({meanwhile})");
    }
}

/// The `error` label of a watch error.
fn error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "list",
        watcher::Error::WatchError(s) if s.code == 410 => "expired",
        watcher::Error::WatchError(_) => "watch_status",
        watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_) | watcher::Error::NoResourceVersion => "watch",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls() {
        assert!(api_url_ok("http://127.0.0.1:8001"));
        assert!(!api_url_ok("127.0.0.1:8001"));
        assert!(!api_url_ok("https://api.example:6443"), "no auth over https");
        assert!(!api_url_ok("not a url"));
    }
}
