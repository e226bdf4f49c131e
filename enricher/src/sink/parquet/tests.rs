//! The Parquet encoder against independent readers: the `parquet` crate's
//! Arrow reader for the values, apache-avro for what the record is.

use apache_avro::schema::{Name, RecordField, RecordSchema, Schema as Avro};
use std::{collections::BTreeSet, sync::Arc};

use arrow_array::{cast::AsArray, types, Array, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use flowlog_schema::{fixtures, EnrichedFlow, ENRICHED_FLOW};
use parquet::{
    arrow::arrow_reader::ParquetRecordBatchReaderBuilder,
    basic::{Compression, Encoding},
    file::{reader::FileReader, serialized_reader::SerializedFileReader, statistics::Statistics},
};
use serde_json::Value as Json;

use super::*;

/// Small row groups so that a few hundred rows span several.
fn small_groups() -> ParquetOptions {
    ParquetOptions { row_group_rows: 64, ..ParquetOptions::default() }
}

/// What a record is: its Avro datum as apache-avro reads it, as JSON
/// (unions unwrapped, maps as objects).
fn as_json(r: &EnrichedFlow, schema: &Avro) -> Json {
    let mut datum = Vec::new();
    r.write(&mut datum);
    let v = apache_avro::from_avro_datum(schema, &mut &datum[..], None).expect("apache-avro reads our datum");
    Json::try_from(v).expect("JSON holds every value of the record")
}

/// Row `i` of an Arrow column as JSON, for the column types the schema has.
fn cell(a: &dyn Array, i: usize) -> Json {
    if a.is_null(i) {
        return Json::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Json::from(a.as_string::<i32>().value(i)),
        DataType::Int32 => Json::from(a.as_primitive::<types::Int32Type>().value(i)),
        DataType::Int64 => Json::from(a.as_primitive::<types::Int64Type>().value(i)),
        DataType::Float32 => Json::from(f64::from(a.as_primitive::<types::Float32Type>().value(i))),
        DataType::Boolean => Json::from(a.as_boolean().value(i)),
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Json::Object(fields.iter().zip(s.columns()).map(|(f, c)| (f.name().clone(), cell(c, i))).collect())
        }
        DataType::Map(_, _) => {
            let entries = a.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            Json::Object((0..entries.len()).map(|j| (keys.as_string::<i32>().value(j).to_string(), cell(values, j))).collect())
        }
        other => panic!("column type {other} is not in the enriched schema"),
    }
}

fn rows(batches: &[RecordBatch]) -> Vec<Json> {
    batches
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |i| {
                Json::Object(b.schema().fields().iter().zip(b.columns()).map(|(f, c)| (f.name().clone(), cell(c, i))).collect())
            })
        })
        .collect()
}

fn read(bytes: Vec<u8>) -> (SchemaRef, Vec<RecordBatch>) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
    let schema = reader.schema().clone();
    (schema, reader.build().unwrap().map(Result::unwrap).collect())
}

/// The input sorted as the file should hold it.
fn sorted(records: &[EnrichedFlow]) -> Vec<&EnrichedFlow> {
    let mut s: Vec<&EnrichedFlow> = records.iter().collect();
    s.sort_by(|a, b| workload_pair(a).cmp(&workload_pair(b)));
    s
}

#[test]
fn every_field_of_every_record_reads_back() {
    let records = fixtures::enriched_flows(300);
    let (_, batches) = read(encode(&records, &small_groups()).unwrap());
    let got = rows(&batches);
    let schema = ENRICHED_FLOW.parse();
    let want: Vec<Json> = sorted(&records).into_iter().map(|r| as_json(r, &schema)).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "row {i}");
    }
    // The fixtures fill every field somewhere and leave every nullable one
    // null somewhere, so equal rows mean every column was carried.
    // (Paths of a type, wherever it is used: `remote` fills what `local` leaves null.)
    let leaves = |pick: &dyn Fn(&Json) -> bool| {
        fn walk(j: &Json, path: &str, pick: &dyn Fn(&Json) -> bool, out: &mut BTreeSet<String>) {
            match j {
                Json::Object(o) if !path.ends_with("labels") => {
                    for (k, v) in o {
                        let k = k.replace("remote", "local").replace("held_by", "local_workload");
                        walk(v, &if path.is_empty() { k } else { format!("{path}.{k}") }, pick, out)
                    }
                }
                _ if pick(j) => {
                    out.insert(path.replace("local.local_workload", "local_workload"));
                }
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        want.iter().for_each(|w| walk(w, "", pick, &mut out));
        out
    };
    let mut every = leaves(&|_: &Json| true);
    // (A record-typed field that is null is no leaf: its fields are.)
    every = every.iter().filter(|p| !every.iter().any(|q| q.starts_with(&format!("{p}.")))).cloned().collect();
    let set = leaves(&|j: &Json| !j.is_null() && j.as_object().is_none_or(|o| !o.is_empty()));
    assert_eq!(every.difference(&set).collect::<Vec<_>>(), Vec::<&String>::new(), "never set by the fixtures");
}

/// The batches filled from the records are exactly what arrow-avro decodes
/// from the same records' Avro datums: the library is the reference for
/// every column, null, union branch, nested record and map (and a second
/// batch from the same columns starts empty).
#[test]
fn columns_are_what_arrow_avro_decodes_from_the_datums() {
    let records = fixtures::enriched_flows(300);
    let mut columns = Columns::new(arrow_schema()).unwrap();
    for part in [&records[..7], &records[7..]] {
        let mut decoder = decoder(part.len()).unwrap();
        for r in part {
            columns.push(r);
            let mut datum = Vec::new();
            r.write(&mut datum);
            assert_eq!(decoder.decode(&datum).unwrap(), datum.len());
        }
        let want = decoder.flush().unwrap().unwrap();
        let got = columns.finish().unwrap();
        assert_eq!(got.num_rows(), part.len());
        for (i, (g, w)) in got.columns().iter().zip(want.columns()).enumerate() {
            assert_eq!(g, w, "column {}", want.schema().field(i).name());
        }
        assert_eq!(got, want);
    }
}

#[test]
fn records_that_do_not_fit_the_schema_are_an_error() {
    let fields: Vec<_> = arrow_schema().fields().iter().take(5).cloned().collect();
    let mut columns = Columns::new(Arc::new(arrow_schema::Schema::new(fields))).unwrap();
    columns.push(&fixtures::enriched_flows(1)[0]);
    assert!(columns.finish().is_err());
}

#[test]
fn empty_input_gives_a_readable_file() {
    let (schema, batches) = read(encode::<EnrichedFlow>(&[], &ParquetOptions::default()).unwrap());
    assert_eq!(schema.fields().len(), arrow_schema().fields().len());
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
}

/// Checks an Arrow type against the Avro type it was derived from: records
/// as structs with the same fields in the same order, nullable exactly
/// where the Avro type is a union with null.
fn check_type(path: &str, avro: &Avro, arrow: &DataType, nullable: bool) {
    let (inner, optional) = match avro {
        Avro::Union(u) if u.variants().len() == 2 && u.variants()[0] == Avro::Null => (&u.variants()[1], true),
        other => (other, false),
    };
    assert_eq!(nullable, optional, "{path}: nullable");
    match (inner, arrow) {
        (Avro::String, DataType::Utf8)
        | (Avro::Int, DataType::Int32)
        | (Avro::Long, DataType::Int64)
        | (Avro::Float, DataType::Float32)
        | (Avro::Boolean, DataType::Boolean) => {}
        (Avro::Map(m), DataType::Map(entries, _)) => {
            let DataType::Struct(kv) = entries.data_type() else { panic!("{path}: map entries not a struct") };
            assert_eq!(kv[0].data_type(), &DataType::Utf8, "{path}: map key");
            check_type(&format!("{path}.value"), &m.types, kv[1].data_type(), kv[1].is_nullable());
        }
        (Avro::Record(r), DataType::Struct(fields)) => check_fields(path, &r.fields, fields),
        (Avro::Ref { name }, DataType::Struct(fields)) => {
            let schema = ENRICHED_FLOW.parse();
            check_fields(path, &record_named(&schema, name).expect("a defined type").fields, fields)
        }
        (a, b) => panic!("{path}: Avro {a:?} became Arrow {b}"),
    }
}

/// Where the schema defines the record a reference names.
fn record_named<'a>(s: &'a Avro, name: &Name) -> Option<&'a RecordSchema> {
    match s {
        Avro::Record(r) if &r.name == name => Some(r),
        Avro::Record(r) => r.fields.iter().find_map(|f| record_named(&f.schema, name)),
        Avro::Union(u) => u.variants().iter().find_map(|v| record_named(v, name)),
        _ => None,
    }
}

fn check_fields(path: &str, avro: &[RecordField], arrow: &arrow_schema::Fields) {
    let names = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>();
    assert_eq!(
        names(&mut arrow.iter().map(|f| f.name().clone())),
        names(&mut avro.iter().map(|f| f.name.clone())),
        "{path}: columns"
    );
    for (a, f) in avro.iter().zip(arrow.iter()) {
        check_type(&format!("{path}.{}", f.name()), &a.schema, f.data_type(), f.is_nullable());
    }
}

#[test]
fn parquet_columns_are_the_avsc_fields() {
    let (schema, _) = read(encode(&fixtures::enriched_flows(4), &ParquetOptions::default()).unwrap());
    let Avro::Record(r) = ENRICHED_FLOW.parse() else { panic!("enriched_flow.avsc is a record") };
    check_fields("", &r.fields, schema.fields());
    assert_eq!(schema.fields(), arrow_schema().fields(), "the file holds the schema arrow_schema() names");
}

#[test]
fn row_groups_have_statistics_dictionaries_and_workload_pairs_in_order() {
    let records = fixtures::enriched_flows(300);
    let file = SerializedFileReader::new(Bytes::from(encode(&records, &small_groups()).unwrap())).unwrap();
    let meta = file.metadata();
    assert_eq!(meta.num_row_groups(), 300usize.div_ceil(64));
    let column = |name: &str| meta.file_metadata().schema_descr().columns().iter().position(|c| c.path().string() == name).unwrap();
    let (local, remote) = (column("local.workload"), column("remote.workload"));
    // Highest local workload of the groups so far (statistics leave nulls out).
    let mut highest: Option<String> = None;
    for g in meta.row_groups() {
        assert_eq!(g.sorting_columns().map(|s| s.iter().map(|c| c.column_idx as usize).collect()), Some(vec![local, remote]));
        for c in g.columns() {
            // (The footer names the codec, not its level.)
            assert!(matches!(c.compression(), Compression::ZSTD(_)), "{}", c.column_path());
            let stats = c.statistics().unwrap_or_else(|| panic!("{}: no statistics", c.column_path()));
            assert!(stats.null_count_opt().is_some(), "{}: no null count", c.column_path());
        }
        assert!(g.column(local).encodings().any(|e| e == Encoding::RLE_DICTIONARY), "dictionary-encoded workload column");
        for (name, encoding) in PER_FLOW_COLUMNS {
            let e: Vec<Encoding> = g.column(column(name)).encodings().collect();
            assert!(e.contains(&encoding) && !e.contains(&Encoding::RLE_DICTIONARY), "{name}: {e:?}");
        }
        let min_max = |i: usize| match g.column(i).statistics() {
            Some(Statistics::ByteArray(s)) => {
                let text = |v: Option<&parquet::data_type::ByteArray>| v.map(|b| b.as_utf8().unwrap().to_string());
                (text(s.min_opt()), text(s.max_opt()))
            }
            other => panic!("workload statistics: {other:?}"),
        };
        // Sorted by local workload: groups cover ascending, disjoint-or-touching ranges.
        let (lo, hi) = min_max(local);
        if let (Some(h), Some(lo)) = (&highest, &lo) {
            assert!(h <= lo, "row groups out of order: {h} > {lo}");
        }
        highest = hi.or(highest);
    }
    // And row by row: the (local, remote) pairs never go back.
    let (_, batches) = read(encode(&records, &small_groups()).unwrap());
    let pairs: Vec<(Json, Json)> =
        rows(&batches).iter().map(|r| (r["local"]["workload"].clone(), r["remote"]["workload"].clone())).collect();
    let key = |p: &(Json, Json)| (p.0.as_str().map(str::to_string), p.1.as_str().map(str::to_string));
    assert!(pairs.windows(2).all(|w| key(&w[0]) <= key(&w[1])), "rows not sorted by workload pair");
    let distinct: std::collections::BTreeSet<_> = pairs.iter().map(key).collect();
    assert!(distinct.len() >= 6, "the fixtures have several workload pairs: {distinct:?}");
}
