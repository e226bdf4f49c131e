//! EC2 metadata source: every network interface (all pages of
//! DescribeNetworkInterfaces, per configured region) with its IPs and the
//! attributes the enricher attributes flows with. It only fetches; the
//! enricher diffs successive snapshots into ownership changes.

use std::collections::BTreeMap;

use aws_config::{BehaviorVersion, Region};

/// One network interface and who it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eni {
    pub eni_id: String,
    /// Private IPv4 and IPv6 addresses (and the public IPv4, if any).
    pub ips: Vec<String>,
    pub instance_id: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    /// The owning account.
    pub account: Option<String>,
    pub region: String,
    pub zone: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// When the interface was attached (Unix ns), if it is.
    pub attached_ns: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Ec2Config {
    pub regions: Vec<String>,
    /// Custom endpoint (e.g. a local EC2-compatible server); None for AWS.
    pub endpoint_url: Option<String>,
}

/// Fetches every ENI of every configured region. Credentials come from the
/// standard AWS chain (environment, profile, SSO, IMDS, ...).
pub async fn snapshot(cfg: &Ec2Config) -> Result<Vec<Eni>, String> {
    let mut out = Vec::new();
    for region in &cfg.regions {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.clone())).load().await;
        let mut b = aws_sdk_ec2::config::Builder::from(&sdk);
        if let Some(url) = &cfg.endpoint_url {
            b = b.endpoint_url(url);
        }
        let client = aws_sdk_ec2::Client::from_conf(b.build());
        let mut pages = client.describe_network_interfaces().max_results(1000).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| format!("DescribeNetworkInterfaces in {region}: {}", aws_sdk_ec2::error::DisplayErrorContext(&e)))?;
            for n in page.network_interfaces() {
                let Some(id) = n.network_interface_id() else { continue };
                let mut ips: Vec<String> = n.private_ip_addresses().iter().filter_map(|p| p.private_ip_address().map(str::to_owned)).collect();
                if let Some(ip) = n.private_ip_address() {
                    ips.push(ip.to_owned());
                }
                ips.extend(n.ipv6_addresses().iter().filter_map(|a| a.ipv6_address().map(str::to_owned)));
                if let Some(ip) = n.association().and_then(|a| a.public_ip()) {
                    ips.push(ip.to_owned());
                }
                ips.sort();
                ips.dedup();
                out.push(Eni {
                    eni_id: id.to_owned(),
                    ips,
                    instance_id: n.attachment().and_then(|a| a.instance_id()).map(str::to_owned),
                    vpc_id: n.vpc_id().map(str::to_owned),
                    subnet_id: n.subnet_id().map(str::to_owned),
                    account: n.owner_id().map(str::to_owned),
                    region: region.clone(),
                    zone: n.availability_zone().map(str::to_owned),
                    attached_ns: n.attachment().and_then(|a| a.attach_time()).map(|t| t.secs() * 1_000_000_000 + t.subsec_nanos() as i64),
                    tags: n.tag_set().iter().filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned()))).collect(),
                });
            }
        }
    }
    Ok(out)
}
