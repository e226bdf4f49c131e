//! Avro binary primitives, written once: zig-zag varints, length-prefixed
//! bytes and strings, `["null", T]` unions, array and map blocks. The reader
//! takes bytes from the network: every length is checked before use and
//! nothing it reads can make it panic.

use crate::enums::Family;

/// Why a message could not be decoded (or decoded to nonsense). The text is
/// what the dead-letter topic's `flowlog.dlq.reason` header carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not Avro single-object encoded")]
    NotSingleObject,
    #[error("unknown schema fingerprint {}", hex(.0))]
    UnknownFingerprint([u8; 8]),
    #[error("truncated")]
    Truncated,
    #[error("varint too long")]
    VarintTooLong,
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    #[error("int out of range")]
    IntOutOfRange,
    #[error("invalid UTF-8")]
    InvalidUtf8,
    #[error("bad union index {0}")]
    BadUnionIndex(i64),
    #[error("bad enum index {0}")]
    BadEnumIndex(i64),
    #[error("absurd block count")]
    AbsurdBlockCount,
    #[error("bad {side} address length {len} for {}", .family.symbol())]
    BadAddressLength { side: &'static str, len: usize, family: Family },
    #[error("port out of range")]
    PortOutOfRange,
    #[error("end before start")]
    EndBeforeStart,
    #[error("negative counter or time")]
    NegativeCounterOrTime,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl DecodeError {
    /// A bounded metric label: `schema`, `truncated`, `bad_address`,
    /// `bad_time` or `invalid`.
    pub fn kind(&self) -> &'static str {
        use DecodeError::*;
        match self {
            NotSingleObject | UnknownFingerprint(_) => "schema",
            Truncated | VarintTooLong | TrailingBytes(_) => "truncated",
            BadAddressLength { .. } => "bad_address",
            EndBeforeStart | NegativeCounterOrTime => "bad_time",
            IntOutOfRange | InvalidUtf8 | BadUnionIndex(_) | BadEnumIndex(_) | AbsurdBlockCount | PortOutOfRange => {
                "invalid"
            }
        }
    }
}

/// Where a record's fields go, one value at a time in the schema's order:
/// Avro binary ([`Writer`]), or (in the enricher) Arrow columns filled by a
/// walk of the schema's fields. A record's `write` is written once against
/// this trait, so both forms hold the same fields.
pub trait Encoder {
    fn long(&mut self, v: i64);
    fn int(&mut self, v: i32);
    fn boolean(&mut self, v: bool);
    fn float(&mut self, v: f32);
    fn string(&mut self, s: &str);
    /// The branch of a `["null", T]` union: whether a `T` follows.
    fn null_or(&mut self, present: bool);
    /// `{"type": "map", "values": "string"}`.
    fn string_map<'s>(&mut self, m: impl ExactSizeIterator<Item = (&'s String, &'s String)>);
    /// `["null", "string"]`.
    #[inline]
    fn opt_string(&mut self, s: Option<&str>) {
        self.null_or(s.is_some());
        if let Some(s) = s {
            self.string(s);
        }
    }
    /// `["null", "long"]`.
    #[inline]
    fn opt_long(&mut self, v: Option<i64>) {
        self.null_or(v.is_some());
        if let Some(v) = v {
            self.long(v);
        }
    }
}

/// Appends Avro binary primitives to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Encoder for Writer<'_> {
    #[inline]
    fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            self.0.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }
    #[inline]
    fn int(&mut self, v: i32) {
        self.long(v as i64)
    }
    #[inline]
    fn boolean(&mut self, v: bool) {
        self.0.push(v as u8)
    }
    #[inline]
    fn float(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    #[inline]
    fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes())
    }
    #[inline]
    fn null_or(&mut self, present: bool) {
        self.long(present as i64)
    }
    fn string_map<'s>(&mut self, m: impl ExactSizeIterator<Item = (&'s String, &'s String)>) {
        self.block(m, |w, (k, v)| {
            w.string(k);
            w.string(v);
        })
    }
}

impl Writer<'_> {
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }
    /// An array (or map) of `n` items written by `item`: one block, then the end.
    pub fn block<I: ExactSizeIterator>(&mut self, items: I, mut item: impl FnMut(&mut Self, I::Item)) {
        if items.len() > 0 {
            self.long(items.len() as i64);
            for i in items {
                item(self, i);
            }
        }
        self.long(0);
    }
    /// `{"type": "array", "items": "string"}`.
    pub fn string_array<'s>(&mut self, items: impl ExactSizeIterator<Item = &'s str>) {
        self.block(items, |w, s| w.string(s))
    }
}

/// Blocks larger than this are refused: no record of ours comes near it,
/// and a hostile count must not make the reader spin.
const MAX_BLOCK_ITEMS: i64 = 1_000_000;

/// Reads Avro binary primitives from a message.
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }
    #[inline]
    pub fn long(&mut self) -> Result<i64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or(DecodeError::Truncated)?;
            self.at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err(DecodeError::VarintTooLong)
    }
    #[inline]
    pub fn int(&mut self) -> Result<i32, DecodeError> {
        i32::try_from(self.long()?).map_err(|_| DecodeError::IntOutOfRange)
    }
    pub fn boolean(&mut self) -> Result<bool, DecodeError> {
        let b = *self.buf.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        match b {
            0 | 1 => Ok(b == 1),
            _ => Err(DecodeError::BadUnionIndex(b as i64)),
        }
    }
    pub fn float(&mut self) -> Result<f32, DecodeError> {
        let b = self.fixed::<4>()?;
        Ok(f32::from_le_bytes(b))
    }
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at.checked_add(N).filter(|e| *e <= self.buf.len()).ok_or(DecodeError::Truncated)?;
        let b = self.buf[self.at..end].try_into().expect("N bytes");
        self.at = end;
        Ok(b)
    }
    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.long()?;
        // A length from the network: checked before any arithmetic on it.
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError::Truncated)?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::InvalidUtf8)
    }
    #[inline]
    pub fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }
    /// The branch of a union of `n` types.
    #[inline]
    pub fn union_index(&mut self, n: i64) -> Result<i64, DecodeError> {
        let i = self.long()?;
        if !(0..n).contains(&i) {
            return Err(DecodeError::BadUnionIndex(i));
        }
        Ok(i)
    }
    /// `["null", "string"]`.
    pub fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        Ok(if self.union_index(2)? == 0 { None } else { Some(self.string()?) })
    }
    /// `["null", "long"]`.
    pub fn opt_long(&mut self) -> Result<Option<i64>, DecodeError> {
        Ok(if self.union_index(2)? == 0 { None } else { Some(self.long()?) })
    }
    /// An enum's index (the type's `from_index` names it).
    #[inline]
    pub fn enum_index(&mut self) -> Result<i64, DecodeError> {
        self.long()
    }
    /// Array or map blocks: calls `item` once per element.
    pub fn blocks(&mut self, mut item: impl FnMut(&mut Self) -> Result<(), DecodeError>) -> Result<(), DecodeError> {
        loop {
            let mut n = self.long()?;
            if n == 0 {
                return Ok(());
            }
            if n < 0 {
                n = n.checked_neg().ok_or(DecodeError::AbsurdBlockCount)?;
                self.long()?; // block size in bytes
            }
            if n > MAX_BLOCK_ITEMS {
                return Err(DecodeError::AbsurdBlockCount);
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }
    /// Fails unless the whole buffer was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips() {
        for (v, want) in [(0i64, vec![0u8]), (-1, vec![1]), (1, vec![2]), (-64, vec![0x7f]), (64, vec![0x80, 1])] {
            let mut b = Vec::new();
            Writer(&mut b).long(v);
            assert_eq!(b, want, "{v}");
        }
        for v in [i64::MIN, i64::MAX, 0, -300, 1 << 40] {
            let mut b = Vec::new();
            Writer(&mut b).long(v);
            assert_eq!(Reader::new(&b).long(), Ok(v));
        }
    }

    /// The hand-written varint against apache-avro's, at every length's
    /// edges, appended one after another (the buffer grows meanwhile).
    #[test]
    fn longs_match_apache_avro() {
        let mut values = vec![0i64, -1, 1, i64::MIN, i64::MAX];
        for bits in 1..64 {
            let edge = 1i64 << bits;
            values.extend([0, -1, 1].iter().flat_map(|d| [edge.wrapping_add(*d), edge.wrapping_neg().wrapping_add(*d)]));
        }
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for v in values {
            Writer(&mut ours).long(v);
            theirs.extend(apache_avro::to_avro_datum(&apache_avro::Schema::Long, apache_avro::types::Value::Long(v)).unwrap());
        }
        assert_eq!(ours, theirs);
    }

    #[test]
    fn hostile_lengths_and_counts_are_errors() {
        // A length near i64::MAX must not overflow the reader.
        let huge = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(Reader::new(&huge).bytes(), Err(DecodeError::Truncated));
        assert_eq!(Reader::new(&[0xff; 11]).long(), Err(DecodeError::VarintTooLong));
        // i64::MIN items in a block: negation would overflow.
        let mut b = Vec::new();
        Writer(&mut b).long(i64::MIN);
        assert_eq!(Reader::new(&b).blocks(|_| Ok(())), Err(DecodeError::AbsurdBlockCount));
        let mut b = Vec::new();
        Writer(&mut b).long(2_000_000);
        assert_eq!(Reader::new(&b).blocks(|_| Ok(())), Err(DecodeError::AbsurdBlockCount));
        let mut b = Vec::new();
        Writer(&mut b).long(1 << 40);
        assert_eq!(Reader::new(&b).int(), Err(DecodeError::IntOutOfRange));
    }
}
