//! Static map: CIDRs and exact IPs -> workload attributes, longest prefix
//! wins. Loaded from a TOML file; a bad file is rejected with the entry at
//! fault and the previous map stays in force.
//!
//! ```toml
//! [[entry]]
//! cidr = "10.1.0.0/16"
//! workload = "billing"
//! app = "billing-api"
//! env = "prod"
//! labels = { owner = "payments" }
//! ```

use std::{net::IpAddr, path::Path, sync::Arc};

use foldhash::HashMap;

use super::{Attrs, Owner};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Debug, serde::Deserialize)]
struct Entry {
    cidr: String,
    #[serde(flatten)]
    attrs: Attrs,
}

/// IPv4 is stored as IPv4-mapped IPv6 so both share one table.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(bits: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits as u32)
    }
}

#[derive(Default, Debug)]
pub struct CidrMap {
    /// Prefix length (IPv6 scale) -> masked network -> owner, longest first.
    tables: Vec<(u8, HashMap<u128, Owner>)>,
    pub entries: usize,
}

pub fn parse_cidr(s: &str) -> Result<(u128, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        Some(l) => l
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        None => max,
    };
    let bits = if ip.is_ipv4() { len + 96 } else { len };
    Ok((key(ip) & mask(bits), bits))
}

impl CidrMap {
    pub fn parse(text: &str) -> Result<CidrMap, String> {
        // serde's flatten cannot deny unknown keys, so check them here: a
        // misspelt attribute must not silently vanish.
        const KEYS: [&str; 16] = [
            "cidr",
            "workload",
            "host_id",
            "instance_id",
            "app",
            "service",
            "cluster",
            "env",
            "account",
            "region",
            "zone",
            "team",
            "labels",
            "eni_id",
            "vpc_id",
            "subnet_id",
        ];
        let raw: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(entries) = raw.get("entry").and_then(|e| e.as_array()) {
            for (i, e) in entries.iter().enumerate() {
                for k in e
                    .as_table()
                    .map(|t| t.keys().collect::<Vec<_>>())
                    .unwrap_or_default()
                {
                    if !KEYS.contains(&k.as_str()) {
                        return Err(format!("entry {}: unknown key {k:?}", i + 1));
                    }
                }
            }
        }
        let file: File = raw.try_into().map_err(|e: toml::de::Error| e.to_string())?;
        let mut by_len: HashMap<u8, HashMap<u128, Owner>> = HashMap::default();
        for (i, e) in file.entry.iter().enumerate() {
            let (net, bits) = parse_cidr(&e.cidr).map_err(|m| format!("entry {}: {m}", i + 1))?;
            if by_len
                .entry(bits)
                .or_default()
                .insert(net, Arc::new(e.attrs.clone()))
                .is_some()
            {
                return Err(format!("entry {}: {} appears twice", i + 1, e.cidr));
            }
        }
        let mut tables: Vec<(u8, HashMap<u128, Owner>)> = by_len.into_iter().collect();
        tables.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(CidrMap {
            tables,
            entries: file.entry.len(),
        })
    }

    pub fn load(path: &Path) -> Result<CidrMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        CidrMap::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Longest-prefix match.
    pub fn lookup(&self, ip: IpAddr) -> Option<&Owner> {
        let k = key(ip);
        self.tables
            .iter()
            .find_map(|(bits, t)| t.get(&(k & mask(*bits))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let m = CidrMap::parse(
            r#"
[[entry]]
cidr = "10.0.0.0/8"
workload = "corp"
[[entry]]
cidr = "10.1.0.0/16"
workload = "billing"
env = "prod"
labels = { owner = "payments" }
[[entry]]
cidr = "10.1.2.3"
workload = "billing-db"
[[entry]]
cidr = "2001:db8::/32"
workload = "v6"
"#,
        )
        .unwrap();
        let wl = |ip: &str| {
            m.lookup(ip.parse().unwrap())
                .and_then(|o| o.workload.clone())
        };
        assert_eq!(wl("10.9.9.9").as_deref(), Some("corp"));
        assert_eq!(wl("10.1.9.9").as_deref(), Some("billing"));
        assert_eq!(wl("10.1.2.3").as_deref(), Some("billing-db"));
        assert_eq!(wl("2001:db8::1").as_deref(), Some("v6"));
        assert_eq!(wl("192.168.1.1"), None);
        assert_eq!(
            m.lookup("10.1.9.9".parse().unwrap()).unwrap().labels["owner"],
            "payments"
        );
    }

    #[test]
    fn bad_files_are_rejected_with_the_entry() {
        assert_eq!(
            CidrMap::parse("[[entry]]\ncidr = \"10.0.0.0/33\"").unwrap_err(),
            "entry 1: \"10.0.0.0/33\": prefix length must be 0..=32"
        );
        assert!(CidrMap::parse("[[entry]]\ncidr = \"nope\"")
            .unwrap_err()
            .contains("not an IP address"));
        assert!(CidrMap::parse("[[entry]]\ncidr = \"10.0.0.0/8\"\nwrokload = \"x\"").is_err());
        assert!(CidrMap::parse(
            "[[entry]]\ncidr = \"10.0.0.0/8\"\n[[entry]]\ncidr = \"10.0.0.0/8\""
        )
        .unwrap_err()
        .contains("twice"));
    }
}
