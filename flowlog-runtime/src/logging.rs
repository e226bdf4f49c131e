//! Log setup: `tracing` events to stderr, filtered by the `--log` directive.

use tracing_subscriber::EnvFilter;

/// The filter for a `--log` directive (e.g. `info`, `flowlog_sidecar=debug`);
/// `info` when the directive does not parse.
fn filter(directive: &str) -> EnvFilter {
    EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Sends log events to stderr, coloured only on a terminal so logs in files
/// and journald stay greppable. A second call keeps the first setup.
pub fn init(directive: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(directive))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_directive_falls_back_to_info() {
        assert_eq!(filter("no[such").to_string(), "info");
        assert_eq!(
            filter("flowlog_sidecar=debug").to_string(),
            "flowlog_sidecar=debug"
        );
    }

    #[test]
    fn init_twice_keeps_the_first() {
        init("debug");
        init("warn");
        assert!(
            tracing_subscriber::fmt().try_init().is_err(),
            "a subscriber is installed"
        );
    }
}
