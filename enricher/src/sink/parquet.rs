//! Parquet files of enriched records, for query engines (DuckDB, Athena,
//! Trino, Spark). The record format stays defined once: the columnar schema
//! is what arrow-avro derives from schemas/enriched_flow.avsc (nested
//! `Attribution`/`WorkloadInfo` records as structs, unions with null as
//! nullable columns, maps as Arrow maps), and the rows are each record's own
//! Avro datum decoded by arrow-avro into Arrow arrays. So the Parquet columns
//! cannot drift from the Avro files or the enriched topic.
//!
//! Within a file rows are sorted by workload pair (local, then remote
//! attribution's workload), declared in the footer as the sorting columns:
//! per-row-group and per-page min/max statistics then let an engine skip
//! what a `WHERE local.workload = ...` excludes.

use std::sync::OnceLock;

use anyhow::{ensure, Context};
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
    /// to spread over cores. zstd level 3: zstd's default, fast to write.
    fn default() -> Self {
        ParquetOptions { row_group_rows: 128 * 1024, zstd_level: 3 }
    }
}

/// The (local, remote) workload columns rows are sorted by.
const SORT_COLUMNS: [&str; 2] = ["local.workload", "remote.workload"];

/// Columns with a new value in (nearly) every flow: a dictionary would only
/// cost time to build and be dropped when it overflows, so they are written
/// plain; the ids and times, which rise within a workload pair, delta-encoded.
const PER_FLOW_COLUMNS: [(&str, Encoding); 7] = [
    ("flow_id", Encoding::PLAIN),
    ("sequence", Encoding::DELTA_BINARY_PACKED),
    ("connection_id", Encoding::DELTA_BINARY_PACKED),
    ("start_time_ns", Encoding::DELTA_BINARY_PACKED),
    ("end_time_ns", Encoding::DELTA_BINARY_PACKED),
    ("bytes_sent", Encoding::PLAIN),
    ("bytes_received", Encoding::PLAIN),
];

/// Rows decoded into one Arrow batch before it goes to the writer (bounds
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
/// `rows` rows.
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
        let column = ColumnPath::from(name);
        props = props.set_column_dictionary_enabled(column.clone(), false).set_column_encoding(column, encoding);
    }
    Ok(props.build())
}

/// One Parquet file's bytes holding `records`, sorted by workload pair
/// (stable: records of one pair keep their order).
pub fn encode<R: std::borrow::Borrow<EnrichedFlow>>(records: &[R], opts: &ParquetOptions) -> anyhow::Result<Vec<u8>> {
    // Encoded in arrival order, read in sorted order: walking the records
    // themselves in sorted order (flow, host and owner behind pointers) was
    // slower than reading each record's contiguous datum.
    let mut datums = Vec::with_capacity(records.len() * 256);
    let mut ends = Vec::with_capacity(records.len());
    let mut keys = Vec::with_capacity(records.len());
    for r in records {
        let r = r.borrow();
        r.write(&mut datums);
        ends.push(datums.len());
        keys.push(workload_pair(r));
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| keys[i]);
    // Sized for the usual ~20-40 bytes a row: no copies while it grows.
    let out = Vec::with_capacity(64 * 1024 + records.len() * 48);
    let mut writer = ArrowWriter::try_new(out, arrow_schema(), Some(properties(opts)?))?;
    let mut decoder = decoder(BATCH_ROWS.min(records.len()).max(1))?;
    for chunk in order.chunks(decoder.batch_size()) {
        for &i in chunk {
            let datum = &datums[if i == 0 { 0 } else { ends[i - 1] }..ends[i]];
            let used = decoder.decode(datum)?;
            ensure!(used == datum.len(), "arrow-avro read {used} of a {}-byte datum", datum.len());
        }
        if let Some(batch) = decoder.flush()? {
            writer.write(&batch)?;
        }
    }
    Ok(writer.into_inner()?)
}

#[cfg(test)]
mod tests;
