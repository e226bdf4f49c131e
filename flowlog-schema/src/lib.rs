//! The records of `schemas/*.avsc`, defined once: their Rust types, their
//! Avro binary encoding and decoding side by side, the single-object header
//! and fingerprints, and the fixtures every test and benchmark builds from.
//!
//! The codecs are hand-written for speed (no generic `Value` tree, no
//! per-field allocation beyond the strings a record owns). They write and
//! read fields in the schema's order; the tests in `tests/` check every field
//! and every enum symbol against the committed `.avsc` files through
//! apache-avro, so the two cannot drift.
//!
//! Data flows one way: the sidecar builds a [`Flow`] and encodes it with its
//! host block ([`HostIdentity::encode`]), the enricher decodes it
//! ([`decode_flow`]), attributes it and encodes an [`EnrichedFlow`].

pub mod avro;
pub mod batch;
pub mod container;
pub mod enriched;
pub mod enums;
pub mod fixtures;
pub mod flow;
pub mod host;
pub mod identity;
pub mod schemas;
pub mod workload;

pub use avro::{DecodeError, Encoder, Reader, Writer};
pub use enriched::{Attribution, Attrs, EnrichedFlow};
pub use enums::{
    Direction, EndReason, Family, IdentityReason, OwnerSource, RecordType, Source, Unattributed, WorkloadKind, WorkloadReason,
};
pub use flow::{decode_flow, decode_flow_body, Flow, Fresh, Limits, Parts, StatePath};
pub use smol_str::SmolStr;
pub use host::{Host, HostIdentity};
pub use identity::{Identity, WorkloadIps};
pub use batch::{flow_messages, records_in, BatchWriter, FlowItem, FlowMessages};
pub use schemas::{SchemaDef, ENRICHED_FLOW, FLOW, FLOW_BATCH, IDENTITY};
pub use workload::Workload;
