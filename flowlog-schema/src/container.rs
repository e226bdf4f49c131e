//! Avro object container files (codec `null`): header with the schema and a
//! sync marker, then blocks of records.

use std::{
    hash::{BuildHasher, Hasher},
    io::{self, Write},
};

use crate::{avro::Writer, enriched::EnrichedFlow, schemas::SchemaDef};

/// A record that can go into a container file.
pub trait Datum {
    fn schema() -> &'static SchemaDef;
    fn write_datum(&self, out: &mut Vec<u8>);
}

impl Datum for EnrichedFlow {
    fn schema() -> &'static SchemaDef {
        &crate::schemas::ENRICHED_FLOW
    }
    fn write_datum(&self, out: &mut Vec<u8>) {
        self.write(out)
    }
}

/// Records per block are cut at about this many bytes.
const BLOCK_BYTES: usize = 256 * 1024;

pub struct ContainerWriter<W: Write, D: Datum = EnrichedFlow> {
    out: W,
    block: Vec<u8>,
    count: i64,
    sync: [u8; 16],
    _datum: std::marker::PhantomData<fn(&D)>,
}

impl<W: Write, D: Datum> ContainerWriter<W, D> {
    /// Writes the header: magic, metadata (schema, codec), sync marker.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut sync = [0u8; 16];
        let rs = std::collections::hash_map::RandomState::new();
        for (i, half) in sync.chunks_mut(8).enumerate() {
            let mut h = rs.build_hasher();
            h.write_usize(i);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        let mut head = b"Obj\x01".to_vec();
        let w = &mut Writer(&mut head);
        w.long(2);
        w.string("avro.schema");
        w.string(D::schema().json);
        w.string("avro.codec");
        w.string("null");
        w.long(0);
        head.extend_from_slice(&sync);
        out.write_all(&head)?;
        Ok(ContainerWriter {
            out,
            block: Vec::with_capacity(BLOCK_BYTES + 4096),
            count: 0,
            sync,
            _datum: std::marker::PhantomData,
        })
    }

    pub fn append(&mut self, d: &D) -> io::Result<()> {
        d.write_datum(&mut self.block);
        self.count += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut head = Vec::with_capacity(20);
        let w = &mut Writer(&mut head);
        w.long(self.count);
        w.long(self.block.len() as i64);
        self.out.write_all(&head)?;
        self.out.write_all(&self.block)?;
        self.out.write_all(&self.sync)?;
        self.block.clear();
        self.count = 0;
        Ok(())
    }

    /// Writes the last block and hands back the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        self.out.flush()?;
        Ok(self.out)
    }
}
