//! The committed schemas, their fingerprints and the single-object header:
//! `C3 01`, then the schema's 8-byte CRC-64-AVRO fingerprint (little endian),
//! then the binary datum.

use std::sync::OnceLock;

use apache_avro::{rabin::Rabin, Schema};

use crate::avro::DecodeError;

/// One schema of `schemas/`.
pub struct SchemaDef {
    /// File stem in `schemas/` (`flow`, `flow_batch`, `identity`, `enriched_flow`).
    pub name: &'static str,
    /// The `.avsc` text, as committed.
    pub json: &'static str,
    fingerprint: OnceLock<[u8; 8]>,
}

pub static FLOW: SchemaDef = SchemaDef::new("flow", include_str!("../../schemas/flow.avsc"));
pub static IDENTITY: SchemaDef = SchemaDef::new("identity", include_str!("../../schemas/identity.avsc"));
pub static ENRICHED_FLOW: SchemaDef = SchemaDef::new("enriched_flow", include_str!("../../schemas/enriched_flow.avsc"));
/// Several Flow messages in one Kafka message ([`crate::batch`]).
pub static FLOW_BATCH: SchemaDef = SchemaDef::new("flow_batch", include_str!("../../schemas/flow_batch.avsc"));

/// The previous Flow versions, still decoded (sidecars not yet upgraded and
/// their spools send them). Not in [`ALL`]: docs and new data use the current one.
pub static FLOW_V1: SchemaDef = SchemaDef::new("flow", include_str!("../../schemas/history/flow.v1.avsc"));
/// v2 added `workload` (without the Kubernetes API's fields v3 added).
pub static FLOW_V2: SchemaDef = SchemaDef::new("flow", include_str!("../../schemas/history/flow.v2.avsc"));
/// v3: the current form without `limits` (v4).
pub static FLOW_V3: SchemaDef = SchemaDef::new("flow", include_str!("../../schemas/history/flow.v3.avsc"));

/// FlowBatch v1: items are whole Flow messages (no shared host block).
pub static FLOW_BATCH_V1: SchemaDef = SchemaDef::new("flow_batch", include_str!("../../schemas/history/flow_batch.v1.avsc"));

/// Every schema, for tests and docs.
pub static ALL: [&SchemaDef; 4] = [&FLOW, &FLOW_BATCH, &IDENTITY, &ENRICHED_FLOW];

impl SchemaDef {
    const fn new(name: &'static str, json: &'static str) -> SchemaDef {
        SchemaDef { name, json, fingerprint: OnceLock::new() }
    }

    /// The schema parsed by apache-avro (tests, generic readers).
    pub fn parse(&self) -> Schema {
        // Compiled in and checked by this crate's tests: cannot fail at run time.
        Schema::parse_str(self.json).unwrap_or_else(|e| panic!("schemas/{}.avsc does not parse: {e}", self.name))
    }

    /// CRC-64-AVRO (Rabin) fingerprint of the canonical form, little endian.
    pub fn fingerprint(&self) -> [u8; 8] {
        *self.fingerprint.get_or_init(|| {
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&self.parse().fingerprint::<Rabin>().bytes[..8]);
            fp
        })
    }

    /// The 10-byte single-object header.
    pub fn header(&self) -> [u8; 10] {
        header(self.fingerprint())
    }

    /// Checks a message's single-object header; returns the datum after it.
    pub fn datum<'a>(&self, msg: &'a [u8]) -> Result<&'a [u8], DecodeError> {
        let (fp, datum) = single_object(msg)?;
        if fp != self.fingerprint() {
            return Err(DecodeError::UnknownFingerprint(fp));
        }
        Ok(datum)
    }
}

/// The single-object header of the schema with this fingerprint.
pub fn header(fingerprint: [u8; 8]) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 0xC3;
    h[1] = 0x01;
    h[2..].copy_from_slice(&fingerprint);
    h
}

/// Splits a single-object message into its schema's fingerprint and the
/// datum, whichever schema that is.
pub fn single_object(msg: &[u8]) -> Result<([u8; 8], &[u8]), DecodeError> {
    if msg.len() < 10 || msg[0] != 0xC3 || msg[1] != 0x01 {
        return Err(DecodeError::NotSingleObject);
    }
    Ok((msg[2..10].try_into().expect("8 bytes"), &msg[10..]))
}
