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

use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
    str::FromStr,
    sync::Arc,
};

use foldhash::HashMap;
use ipnetwork::{IpNetwork, IpNetworkError, Ipv4Network, Ipv6Network};

use super::{Attrs, Owner};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Each entry is `cidr` plus the attributes ([`Attrs`]).
    #[serde(default)]
    entry: Vec<toml::Table>,
}

/// IPv4 is stored as IPv4-mapped IPv6 so both share one set of tables.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The mask of a network's prefix on that shared 128-bit scale.
fn mask(net: &IpNetwork) -> u128 {
    let bits = match net {
        IpNetwork::V4(n) => n.prefix() + 96,
        IpNetwork::V6(n) => n.prefix(),
    };
    Ipv6Network::new(Ipv6Addr::UNSPECIFIED, bits).map_or(u128::MAX, |n| u128::from(n.mask()))
}

#[derive(Default, Debug)]
pub struct CidrMap {
    /// Prefix mask -> masked network -> owner, longest prefix first.
    tables: Vec<(u128, HashMap<u128, Owner>)>,
    pub entries: usize,
}

/// An entry's network: a CIDR, or one address (its /32 or /128).
fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    // Parsed as the family the text names, so that a bad prefix length is
    // reported as such (IpNetwork's own parser only says "invalid address").
    let v6 = s.contains(':');
    let net = if v6 {
        Ipv6Network::from_str(s.trim()).map(IpNetwork::V6)
    } else {
        Ipv4Network::from_str(s.trim()).map(IpNetwork::V4)
    };
    net.map_err(|e| match e {
        IpNetworkError::InvalidPrefix => {
            format!(
                "{s:?}: prefix length must be 0..={}",
                if v6 { 128 } else { 32 }
            )
        }
        _ => format!("{s:?} is not an IP address or CIDR"),
    })
}

impl CidrMap {
    pub fn parse(text: &str) -> Result<CidrMap, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let entries = file.entry.len();
        let mut by_mask: HashMap<u128, HashMap<u128, Owner>> = HashMap::default();
        for (i, mut e) in file.entry.into_iter().enumerate() {
            let at = |m: String| format!("entry {}: {m}", i + 1);
            let cidr = match e.remove("cidr") {
                Some(toml::Value::String(c)) => c,
                Some(other) => return Err(at(format!("cidr must be a string, not {other}"))),
                None => return Err(at("missing cidr".into())),
            };
            // Attrs denies unknown keys: a misspelt attribute must not
            // silently vanish.
            let attrs: Attrs = toml::Value::Table(e)
                .try_into()
                .map_err(|err: toml::de::Error| at(err.message().to_string()))?;
            let net = parse_cidr(&cidr).map_err(at)?;
            let mask = mask(&net);
            if by_mask
                .entry(mask)
                .or_default()
                .insert(key(net.network()) & mask, Arc::new(attrs))
                .is_some()
            {
                return Err(at(format!("{cidr} appears twice")));
            }
        }
        let mut tables: Vec<(u128, HashMap<u128, Owner>)> = by_mask.into_iter().collect();
        // A longer prefix has more leading ones: a larger mask.
        tables.sort_by_key(|t| std::cmp::Reverse(t.0));
        Ok(CidrMap { tables, entries })
    }

    pub fn load(path: &Path) -> Result<CidrMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        CidrMap::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Longest-prefix match.
    pub fn lookup(&self, ip: IpAddr) -> Option<&Owner> {
        let k = key(ip);
        self.tables.iter().find_map(|(mask, t)| t.get(&(k & mask)))
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

    /// Host bits in an entry are ignored; an IPv4 default route covers IPv4
    /// only (IPv4 keys are IPv4-mapped IPv6); a single IPv6 address is its /128.
    #[test]
    fn prefixes_cover_exactly_their_addresses() {
        let m = CidrMap::parse(
            "[[entry]]\ncidr = \"10.1.2.3/16\"\nworkload = \"a\"\n\
             [[entry]]\ncidr = \"0.0.0.0/0\"\nworkload = \"v4\"\n\
             [[entry]]\ncidr = \" 2001:db8::7 \"\nworkload = \"one\"\n",
        )
        .unwrap();
        let wl = |ip: &str| {
            m.lookup(ip.parse().unwrap())
                .and_then(|o| o.workload.clone())
        };
        assert_eq!(m.entries, 3);
        assert_eq!(wl("10.1.200.1").as_deref(), Some("a"));
        assert_eq!(wl("10.2.0.1").as_deref(), Some("v4"));
        assert_eq!(wl("2001:db8::7").as_deref(), Some("one"));
        assert_eq!(wl("2001:db8::8"), None);
        assert_eq!(wl("::1"), None);
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
        let misspelt = CidrMap::parse(
            "[[entry]]\ncidr = \"10.0.0.0/8\"\n[[entry]]\ncidr = \"10.1.0.0/16\"\nwrokload = \"x\"",
        )
        .unwrap_err();
        assert!(
            misspelt.starts_with("entry 2: unknown field `wrokload`"),
            "{misspelt}"
        );
        assert_eq!(
            CidrMap::parse("[[entry]]\nworkload = \"x\"").unwrap_err(),
            "entry 1: missing cidr"
        );
        assert_eq!(
            CidrMap::parse("[[entry]]\ncidr = \"2001:db8::/129\"").unwrap_err(),
            "entry 1: \"2001:db8::/129\": prefix length must be 0..=128"
        );
        assert!(CidrMap::parse(
            "[[entry]]\ncidr = \"10.0.0.0/8\"\n[[entry]]\ncidr = \"10.0.0.0/8\""
        )
        .unwrap_err()
        .contains("twice"));
    }
}
