//! Any text as a settings file and as the enricher's static CIDR map: an
//! error or a value, never a panic.
//!
//! The settings file: `flowlog_settings::parse_toml` (what `--config` goes
//! through, error messages included) into a `settings!` struct with the
//! field shapes of the sidecar's and the enricher's Config. The static map:
//! the enricher's own sources/cidr.rs, compiled in, then looked up.
#![no_main]

use std::{collections::BTreeMap, net::IpAddr, path::{Path, PathBuf}};

use libfuzzer_sys::fuzz_target;

/// The enricher's sources/ with just cidr.rs, and what it takes from its
/// parent module there.
// Only the parser and the lookup are used here.
#[allow(dead_code)]
#[path = "../../enricher/src/sources"]
mod sources {
    pub use flowlog_schema::Attrs;
    pub type Owner = std::sync::Arc<Attrs>;

    pub mod cidr;
}

flowlog_settings::settings! {
    /// The shapes of the real settings: scalars, lists, maps, optional
    /// values and a section.
    pub struct Settings {
        /// A string.
        pub brokers: String = "127.0.0.1:9092".into(),
        /// A list of strings.
        pub output_formats: Vec<String> = vec!["avro".into()],
        /// A list of numbers.
        pub static_partitions: Vec<i32> = Vec::new(),
        /// Unsigned numbers.
        pub batch_max_records: usize = 50_000,
        /// An optional path.
        pub static_map: Option<PathBuf> = None,
        /// A map.
        pub kafka_properties: BTreeMap<String, String> = BTreeMap::new(),
        /// A section.
        pub s3: Section = Section::default(),
    }
}

flowlog_settings::settings! {
    /// A `[section]`.
    pub struct Section {
        /// A flag.
        pub services: bool = false,
        /// An optional string.
        pub endpoint_url: Option<String> = None,
        /// A number of seconds.
        pub request_timeout_secs: u64 = 30,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = flowlog_settings::parse_toml::<Settings>(text, Path::new("fuzz.toml")) {
        let _ = (e.to_string(), e.key());
    }
    if let Ok(map) = sources::cidr::CidrMap::parse(text) {
        for ip in ["10.1.2.3", "169.254.169.254", "0.0.0.0", "255.255.255.255", "::", "::ffff:10.1.2.3", "fd00:ec2::1"] {
            let _ = map.lookup(ip.parse::<IpAddr>().expect("an IP"));
        }
    }
});
