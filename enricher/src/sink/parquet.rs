//! Parquet files of enriched records, for query engines (DuckDB, Athena,
//! Trino, Spark). The record format stays defined once: the columnar schema
//! is what arrow-avro derives from schemas/enriched_flow.avsc (nested
//! `Attribution`/`WorkloadInfo` records as structs, unions with null as
//! nullable columns, maps as Arrow maps), and the columns are filled by the
//! record's own `encode`, the one that writes its Avro datum, walking that
//! schema (columns.rs; a test checks the batches against arrow-avro decoding
//! the datums). So the Parquet columns cannot drift from the Avro files or
//! the enriched topic.
//!
//! Within a file rows are sorted by workload pair (local, then remote
//! attribution's workload), declared in the footer as the sorting columns:
//! per-row-group and per-page min/max statistics then let an engine skip
//! what a `WHERE local.workload = ...` excludes.

use std::{collections::HashMap, sync::OnceLock};

use anyhow::Context;
use arrow_avro::{
    reader::{Decoder, DecoderMode, ReaderBuilder},
    schema::{AvroSchema, SchemaStore},
};
use arrow_schema::SchemaRef;
use flowlog_schema::{EnrichedFlow, ENRICHED_FLOW};
use parquet::{
    arrow::{ArrowSchemaConverter, ArrowWriter},
    basic::{Compression, Encoding, ZstdLevel},
    schema::types::ColumnPath,
    file::{
        metadata::SortingColumn,
        properties::{EnabledStatistics, WriterProperties},
    },
};

/// How a Parquet file is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetOptions {
    /// Rows per row group (the unit engines parallelise and prune on).
    pub row_group_rows: usize,
    /// zstd level of every column chunk.
    pub zstd_level: i32,
}

impl Default for ParquetOptions {
    /// 128 Ki rows: about DuckDB's own row group (122 880 rows) and some
    /// MB of zstd data per group at this record's ~20–40 compressed bytes a
    /// row, enough for engines to read efficiently and small enough that
    /// a file of a few hundred thousand rows still has groups to prune and
    /// to spread over cores. zstd level 1: the fastest to write, and on these
    /// column chunks no larger than level 3 (bench-enrich: 21.8 against 22.1
    /// bytes a flow).
    fn default() -> Self {
        ParquetOptions { row_group_rows: 128 * 1024, zstd_level: 1 }
    }
}

/// The (local, remote) workload columns rows are sorted by.
const SORT_COLUMNS: [&str; 2] = ["local.workload", "remote.workload"];

/// Columns with a new value in (nearly) every flow: a dictionary would only
/// cost time to build and be dropped when it overflows, so they are written
/// plain; the ids and times, which rise within a workload pair, delta-encoded.
const PER_FLOW_COLUMNS: [(&str, Encoding); 9] = [
    ("flow_id", Encoding::PLAIN),
    ("sequence", Encoding::DELTA_BINARY_PACKED),
    ("connection_id", Encoding::DELTA_BINARY_PACKED),
    ("start_time_ns", Encoding::DELTA_BINARY_PACKED),
    ("end_time_ns", Encoding::DELTA_BINARY_PACKED),
    ("bytes_sent", Encoding::PLAIN),
    ("bytes_received", Encoding::PLAIN),
    ("limits.busy_us", Encoding::PLAIN),
    ("limits.delivery_rate_bytes_per_s", Encoding::PLAIN),
];

/// Rows filled into one Arrow batch before it goes to the writer (bounds
/// the memory of the intermediate arrays, not the row group size).
const BATCH_ROWS: usize = 16 * 1024;

/// The columnar schema of enriched records, derived from the `.avsc`.
pub fn arrow_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            // Compiled in and checked by the tests below: cannot fail at run time.
            decoder(1).unwrap_or_else(|e| panic!("arrow-avro rejects schemas/enriched_flow.avsc: {e:#}")).schema()
        })
        .clone()
}

/// An arrow-avro decoder of bare EnrichedFlow datums into batches of up to
/// `rows` rows: what derives the schema, and the tests' reference for the
/// batches.
fn decoder(rows: usize) -> anyhow::Result<Decoder> {
    let mut store = SchemaStore::new();
    let fingerprint = store.register(AvroSchema::new(ENRICHED_FLOW.json.to_string()))?;
    Ok(ReaderBuilder::new()
        .with_writer_schema_store(store)
        .with_active_fingerprint(fingerprint)
        .with_decoder_mode(DecoderMode::UnframedDatum)
        .with_batch_size(rows)
        .build_decoder()?)
}

/// The sort key: the workload of each side's attribution (null first).
fn workload_pair(r: &EnrichedFlow) -> (Option<&str>, Option<&str>) {
    fn workload(a: &flowlog_schema::Attribution) -> Option<&str> {
        a.owner.as_ref()?.workload.as_deref()
    }
    (workload(&r.local), workload(&r.remote))
}

/// Writer settings: zstd, dictionaries and page statistics on every column,
/// row groups of `opts.row_group_rows`, the sort order declared.
fn properties(opts: &ParquetOptions) -> anyhow::Result<WriterProperties> {
    let columns = ArrowSchemaConverter::new().convert(&arrow_schema())?;
    let sorting = SORT_COLUMNS
        .iter()
        .map(|name| {
            let idx = columns
                .columns()
                .iter()
                .position(|c| c.path().string() == *name)
                .with_context(|| format!("no column {name} in the enriched schema"))?;
            Ok(SortingColumn { column_idx: idx as i32, descending: false, nulls_first: true })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level)?))
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(opts.row_group_rows.max(1)))
        .set_sorting_columns(Some(sorting));
    for (name, encoding) in PER_FLOW_COLUMNS {
        // A nested column's path has one part per level.
        let column = ColumnPath::new(name.split('.').map(String::from).collect());
        props = props.set_column_dictionary_enabled(column.clone(), false).set_column_encoding(column, encoding);
    }
    Ok(props.build())
}

/// Row order of a file: by workload pair (stable: records of one pair keep
/// their order). Pairs are few against rows, so each row's pair is numbered
/// through a hash map, only the distinct pairs are compared, and the rows
/// are bucketed by their pair's rank: no string comparisons per row.
fn sorted_order<R: std::borrow::Borrow<EnrichedFlow>>(records: &[R]) -> Vec<usize> {
    let mut ids: HashMap<(Option<&str>, Option<&str>), usize, foldhash::fast::RandomState> = HashMap::default();
    let pair_of: Vec<usize> = records
        .iter()
        .map(|r| {
            let next = ids.len();
            *ids.entry(workload_pair(r.borrow())).or_insert(next)
        })
        .collect();
    let mut pairs: Vec<_> = ids.into_iter().collect();
    pairs.sort_unstable();
    // Where each pair's rows start in the output, by pair id.
    let mut start = vec![0; pairs.len()];
    let mut count = vec![0; pairs.len()];
    pair_of.iter().for_each(|&p| count[p] += 1);
    let mut at = 0;
    for &(_, id) in &pairs {
        start[id] = at;
        at += count[id];
    }
    let mut order = vec![0; records.len()];
    for (i, &p) in pair_of.iter().enumerate() {
        order[start[p]] = i;
        start[p] += 1;
    }
    order
}

/// Rows read ahead of filling them: the rows of a workload pair lie
/// scattered over the file's records (a few cache lines each, plus the
/// `comm` text), and one miss after another inside the fill cost more than
/// the fill itself. Loading a field from each of the next rows first lets
/// the CPU fetch their cache lines in parallel.
const READ_AHEAD: usize = 16;

/// Touches the cache lines of `rows`' records (fields across the record).
fn read_ahead<R: std::borrow::Borrow<EnrichedFlow>>(records: &[R], rows: &[usize]) {
    let mut t = 0u64;
    for &i in rows {
        let r = records[i].borrow();
        let f = &r.flow;
        t ^= r.flow_id
            ^ (f.sequence ^ f.sequence_epoch ^ f.end_time_ns ^ f.segs_in ^ f.retransmits ^ f.cgroup_id ^ f.netns_ino) as u64
            ^ (f.srtt_us ^ f.pid) as u64
            ^ u64::from(f.local_port)
            ^ u64::from(f.error.is_some() ^ f.workload.is_some() ^ f.local_addr.is_ipv4() ^ f.remote_addr.is_ipv4())
            ^ u64::from(r.local.confidence.to_bits() ^ r.remote.confidence.to_bits())
            ^ u64::from(f.comm.as_bytes().first().copied().unwrap_or(0));
    }
    std::hint::black_box(t);
}

/// One Parquet file's bytes holding `records`, sorted by workload pair.
pub fn encode<R: std::borrow::Borrow<EnrichedFlow>>(records: &[R], opts: &ParquetOptions) -> anyhow::Result<Vec<u8>> {
    // Sized for the usual ~20-40 bytes a row: no copies while it grows.
    let out = Vec::with_capacity(64 * 1024 + records.len() * 48);
    let mut writer = ArrowWriter::try_new(out, arrow_schema(), Some(properties(opts)?))?;
    let mut columns = Columns::new(arrow_schema())?;
    for batch in sorted_order(records).chunks(BATCH_ROWS) {
        for rows in batch.chunks(READ_AHEAD) {
            read_ahead(records, rows);
            for &i in rows {
                columns.push(records[i].borrow());
            }
        }
        writer.write(&columns.finish()?)?;
    }
    Ok(writer.into_inner()?)
}

mod columns;
#[cfg(test)]
mod tests;

use columns::Columns;
