//! Avro object container files: header with the schema, the codec and a
//! sync marker, then blocks of records. Codec `null` (the default) or the
//! spec's `zstandard` (each block's bytes one zstd frame).

use std::{
    hash::{BuildHasher, Hasher},
    io::{self, Write},
};

use crate::{
    avro::{Encoder, Writer},
    enriched::EnrichedFlow,
    schemas::SchemaDef,
};

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

/// How each block's bytes are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Codec {
    /// As encoded (`null`).
    #[default]
    Null,
    /// `zstandard` at this level (1..=22; 3 is zstd's own default).
    Zstandard(i32),
}

impl Codec {
    /// The `avro.codec` metadata value.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Null => "null",
            Codec::Zstandard(_) => "zstandard",
        }
    }

    /// Records per block are cut at about this many bytes: bigger blocks for
    /// zstd, whose ratio and speed improve with more context per frame.
    fn block_bytes(self) -> usize {
        match self {
            Codec::Null => 256 * 1024,
            Codec::Zstandard(_) => 1024 * 1024,
        }
    }
}

pub struct ContainerWriter<W: Write, D: Datum = EnrichedFlow> {
    out: W,
    block: Vec<u8>,
    block_bytes: usize,
    /// Set for `zstandard`: one compression context reused for every block.
    zstd: Option<zstd::bulk::Compressor<'static>>,
    count: i64,
    sync: [u8; 16],
    _datum: std::marker::PhantomData<fn(&D)>,
}

impl<W: Write, D: Datum> ContainerWriter<W, D> {
    /// Writes the header of a `null`-codec file.
    pub fn new(out: W) -> io::Result<Self> {
        Self::with_codec(out, Codec::Null)
    }

    /// Writes the header: magic, metadata (schema, codec), sync marker.
    pub fn with_codec(mut out: W, codec: Codec) -> io::Result<Self> {
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
        w.string(codec.name());
        w.long(0);
        head.extend_from_slice(&sync);
        out.write_all(&head)?;
        let zstd = match codec {
            Codec::Null => None,
            Codec::Zstandard(level) => Some(zstd::bulk::Compressor::new(level)?),
        };
        let block_bytes = codec.block_bytes();
        Ok(ContainerWriter {
            out,
            block: Vec::with_capacity(block_bytes + 4096),
            block_bytes,
            zstd,
            count: 0,
            sync,
            _datum: std::marker::PhantomData,
        })
    }

    pub fn append(&mut self, d: &D) -> io::Result<()> {
        d.write_datum(&mut self.block);
        self.count += 1;
        if self.block.len() >= self.block_bytes {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let compressed;
        let data = match &mut self.zstd {
            None => &self.block,
            Some(z) => {
                compressed = z.compress(&self.block)?;
                &compressed
            }
        };
        let mut head = Vec::with_capacity(20);
        let w = &mut Writer(&mut head);
        w.long(self.count);
        w.long(data.len() as i64);
        self.out.write_all(&head)?;
        self.out.write_all(data)?;
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
