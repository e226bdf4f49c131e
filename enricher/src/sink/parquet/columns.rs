//! Arrow columns filled straight from enriched records: no Avro bytes in
//! between. The columns are a depth-first walk of the Arrow schema that
//! arrow-avro derives from the `.avsc`; the record's own `encode` (the one
//! that writes its Avro datum) hands over its values in the schema's order,
//! and each value goes to the next column of the walk. So the columns still
//! follow the one definition, and a test checks the batches against
//! arrow-avro decoding the same records' datums.

use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{
    builder::{ArrayBuilder, BooleanBuilder, Float32Builder, Int32Builder, Int64Builder, StringBuilder},
    ArrayRef, MapArray, RecordBatch, StructArray,
};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer};
use arrow_schema::{DataType, Field, SchemaRef};
use flowlog_schema::{EnrichedFlow, Encoder};

/// One column of the walk. Records that cannot be null (`local`, `remote`)
/// have no column of their own: only their fields do.
enum Column {
    Utf8(StringBuilder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Boolean(BooleanBuilder),
    /// A `["null", record]`: its validity; its fields' columns follow, up
    /// to (not including) column `end`.
    Struct { nulls: NullBufferBuilder, end: usize },
    /// A map of strings: where each row's entries end, the keys, the values.
    Map { offsets: Vec<i32>, keys: StringBuilder, values: StringBuilder },
}

impl Column {
    /// `n` nulls in a row: values that are null, and the fields of null
    /// records (a record's validity masks them; nulls are the cheapest to
    /// append in bulk). A map has no validity: an empty one.
    fn append_nulls(&mut self, n: usize) {
        match self {
            Column::Utf8(b) => b.append_nulls(n),
            Column::Int32(b) => b.append_nulls(n),
            Column::Int64(b) => b.append_nulls(n),
            Column::Float32(b) => b.append_nulls(n),
            Column::Boolean(b) => b.append_nulls(n),
            Column::Struct { nulls, .. } => nulls.append_n_nulls(n),
            Column::Map { offsets, .. } => {
                let last = *offsets.last().unwrap_or(&0);
                offsets.resize(offsets.len() + n, last);
            }
        }
    }
}

/// A batch of enriched records being filled, column by column.
pub struct Columns {
    schema: SchemaRef,
    columns: Vec<Column>,
    /// Nulls each column owes, appended all at once before its next value
    /// (or at `finish`): a null costs a count, not a builder call, and a
    /// null record a count per field (most remote peers have no owner: a
    /// dozen fields each).
    owed: Vec<u32>,
    /// The column the record's next value goes to.
    at: usize,
    /// Set when a value did not fit the column it came to (the record and
    /// the schema disagree: a bug, reported by `finish`): that column.
    mismatch: Option<usize>,
}

impl Columns {
    pub fn new(schema: SchemaRef) -> anyhow::Result<Columns> {
        let mut columns = Vec::new();
        for f in schema.fields() {
            walk(f, &mut columns)?;
        }
        let owed = vec![0; columns.len()];
        Ok(Columns { schema, columns, owed, at: 0, mismatch: None })
    }

    /// Appends one record as a row.
    pub fn push(&mut self, r: &EnrichedFlow) {
        r.encode(self);
        if self.at != self.columns.len() {
            self.mismatch.get_or_insert(self.at);
        }
        self.at = 0;
    }

    /// The rows so far as a batch; starts the next one empty.
    pub fn finish(&mut self) -> anyhow::Result<RecordBatch> {
        if let Some(c) = self.mismatch {
            bail!("enriched records do not fit the Arrow schema at column {c} of the walk");
        }
        for i in 0..self.columns.len() {
            self.pay(i);
        }
        let mut columns = self.columns.iter_mut();
        let arrays =
            self.schema.fields().iter().map(|f| build(f, &mut columns)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(self.schema.clone(), arrays)?)
    }

    /// The column the next value goes to (None past the end), its owed
    /// nulls appended.
    #[inline]
    fn next(&mut self) -> Option<&mut Column> {
        let at = self.at;
        self.at += 1;
        self.pay(at);
        self.columns.get_mut(at)
    }

    /// Appends the nulls column `i` owes.
    #[inline]
    fn pay(&mut self, i: usize) {
        if let Some(n) = self.owed.get_mut(i).filter(|n| **n != 0) {
            self.columns[i].append_nulls(*n as usize);
            *n = 0;
        }
    }

    #[cold]
    fn mismatch(&mut self) {
        self.mismatch.get_or_insert(self.at.saturating_sub(1));
    }
}

/// Adds the columns of `field` (depth first) to `columns`.
fn walk(field: &Field, columns: &mut Vec<Column>) -> anyhow::Result<()> {
    columns.push(match field.data_type() {
        DataType::Utf8 => Column::Utf8(StringBuilder::new()),
        DataType::Int32 => Column::Int32(Int32Builder::new()),
        DataType::Int64 => Column::Int64(Int64Builder::new()),
        DataType::Float32 => Column::Float32(Float32Builder::new()),
        DataType::Boolean => Column::Boolean(BooleanBuilder::new()),
        DataType::Struct(fields) => {
            let own = field.is_nullable().then_some(columns.len());
            if own.is_some() {
                columns.push(Column::Struct { nulls: NullBufferBuilder::new(0), end: 0 });
            }
            for f in fields {
                walk(f, columns)?;
            }
            let len = columns.len();
            if let Some(Column::Struct { end, .. }) = own.map(|i| &mut columns[i]) {
                *end = len;
            }
            return Ok(());
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 && kv.iter().all(|f| f.data_type() == &DataType::Utf8) => {
                Column::Map { offsets: vec![0], keys: StringBuilder::new(), values: StringBuilder::new() }
            }
            other => bail!("map {} of {other}: only maps of strings are filled", field.name()),
        },
        other => bail!("column {} of type {other}: not a type of the enriched record", field.name()),
    });
    Ok(())
}

/// The array of `field` from its columns (taken in the walk's order).
fn build<'a>(field: &Field, columns: &mut impl Iterator<Item = &'a mut Column>) -> anyhow::Result<ArrayRef> {
    if let DataType::Struct(fields) = field.data_type() {
        let nulls = match field.is_nullable() {
            false => None,
            true => match columns.next() {
                Some(Column::Struct { nulls, .. }) => nulls.finish(),
                _ => bail!("{}: the walk has no validity column", field.name()),
            },
        };
        let arrays = fields.iter().map(|f| build(f, columns)).collect::<anyhow::Result<Vec<_>>>()?;
        return Ok(Arc::new(StructArray::try_new(fields.clone(), arrays, nulls).with_context(|| field.name().clone())?));
    }
    Ok(match columns.next().with_context(|| format!("{}: no column", field.name()))? {
        Column::Utf8(b) => Arc::new(b.finish()),
        Column::Int32(b) => Arc::new(b.finish()),
        Column::Int64(b) => Arc::new(b.finish()),
        Column::Float32(b) => Arc::new(b.finish()),
        Column::Boolean(b) => Arc::new(b.finish()),
        Column::Map { offsets, keys, values } => {
            let DataType::Map(entries, sorted) = field.data_type() else { bail!("{}: not a map", field.name()) };
            let DataType::Struct(kv) = entries.data_type() else { bail!("{}: map entries not a struct", field.name()) };
            let entries_array = StructArray::try_new(kv.clone(), vec![Arc::new(keys.finish()), Arc::new(values.finish())], None)?;
            let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
            Arc::new(MapArray::try_new(entries.clone(), offsets, entries_array, None, *sorted)?)
        }
        Column::Struct { .. } => bail!("{}: a validity column where values were expected", field.name()),
    })
}

/// A value method of [`Encoder`]: the value goes to the next column, which
/// must be of its type.
macro_rules! value {
    ($method:ident, $type:ty, $column:ident) => {
        #[inline]
        fn $method(&mut self, v: $type) {
            match self.next() {
                Some(Column::$column(b)) => b.append_value(v),
                _ => self.mismatch(),
            }
        }
    };
}

impl Encoder for Columns {
    value!(long, i64, Int64);
    value!(int, i32, Int32);
    value!(boolean, bool, Boolean);
    value!(float, f32, Float32);
    value!(string, &str, Utf8);

    /// Null: this column gets a null (a record: it and all its fields) and
    /// the walk moves past it. Present: a record's validity is set and its
    /// fields follow; a value's column gets the value next.
    #[inline]
    fn null_or(&mut self, present: bool) {
        let at = self.at;
        match self.columns.get_mut(at) {
            Some(Column::Struct { nulls, end }) => {
                nulls.append_n_nulls(std::mem::take(&mut self.owed[at]) as usize);
                if present {
                    nulls.append_non_null();
                    self.at += 1;
                } else {
                    nulls.append_null();
                    let end = *end;
                    self.owed[at + 1..end].iter_mut().for_each(|n| *n += 1);
                    self.at = end;
                }
            }
            Some(_) if present => {}
            Some(_) => {
                self.owed[at] += 1;
                self.at += 1;
            }
            None => {
                self.at += 1;
                self.mismatch()
            }
        }
    }

    #[inline]
    fn string_map<'s>(&mut self, m: impl ExactSizeIterator<Item = (&'s String, &'s String)>) {
        match self.next() {
            Some(Column::Map { offsets, keys, values }) => {
                for (k, v) in m {
                    keys.append_value(k);
                    values.append_value(v);
                }
                offsets.push(keys.len() as i32);
            }
            _ => self.mismatch(),
        }
    }
}
