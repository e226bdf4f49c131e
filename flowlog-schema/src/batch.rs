//! Several Flow messages in one Kafka message of the flow topic
//! (`schemas/flow_batch.avsc`): a `FlowBatch` record whose one field is an
//! array of bytes, each item a whole single-object Flow message. Producing
//! one Kafka message per record costs the sidecar and the broker more than
//! encoding it (librdkafka's allocation, queueing and delivery report per
//! message); a batch pays that once. The Flow schema stays defined once, and
//! each record still decodes, or fails to, on its own.

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    schemas::FLOW_BATCH,
};

/// Builds one FlowBatch message from Flow messages added one at a time,
/// in one buffer and without copying them again: each is encoded in place
/// ([`BatchWriter::push_with`]), and the header and item count go into room
/// kept in front ([`BatchWriter::take`]). The sidecar builds every message
/// this way, so its cost counts per record.
#[derive(Debug)]
pub struct BatchWriter {
    /// [`FRONT`] bytes kept for the header and count, then the items, each
    /// length-prefixed.
    buf: Vec<u8>,
    count: usize,
    /// Where a length or the header is encoded before it goes into `buf`
    /// (kept: no allocation per record).
    scratch: Vec<u8>,
}

/// Room for the single-object header (10 bytes) and the item count (a
/// zig-zag varint: 3 bytes up to 1 048 575 items).
const FRONT: usize = 13;
/// Items are counted in at most 3 varint bytes.
const MAX_ITEMS: usize = (1 << 20) - 1;

impl Default for BatchWriter {
    fn default() -> Self {
        BatchWriter { buf: vec![0; FRONT], count: 0, scratch: Vec::with_capacity(FRONT) }
    }
}

impl BatchWriter {
    /// Adds one Flow message (single-object encoded).
    pub fn push(&mut self, flow_message: &[u8]) {
        self.push_with(|out| out.extend_from_slice(flow_message));
    }

    /// Adds the Flow message `encode` appends to the buffer it is given
    /// (e.g. [`crate::Flow::to_message`]), encoded in place. Its length
    /// goes in front of it: two bytes are kept for it (messages of 64 bytes
    /// to 8 KiB, all of ours), anything else is moved once to fit.
    pub fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        assert!(self.count < MAX_ITEMS, "a FlowBatch holds at most {MAX_ITEMS} items");
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        encode(&mut self.buf);
        let len = self.buf.len() - at - 2;
        self.scratch.clear();
        Writer(&mut self.scratch).long(len as i64);
        let prefix = &self.scratch[..];
        if prefix.len() != 2 {
            // Rare: make the room fit the prefix (moves this one message).
            self.buf.splice(at..at + 2, std::iter::repeat_n(0, prefix.len()));
        }
        self.buf[at..at + prefix.len()].copy_from_slice(prefix);
        self.count += 1;
    }

    /// Records added since the last [`BatchWriter::take`].
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the items so far (the message is ~15 more).
    pub fn bytes(&self) -> usize {
        self.buf.len() - FRONT
    }

    /// Hands the message to `send` (header, one array block of every
    /// item, the array's end); the writer is empty again afterwards.
    pub fn take<R>(&mut self, send: impl FnOnce(&[u8]) -> R) -> R {
        let head = &mut self.scratch;
        head.clear();
        head.extend_from_slice(&FLOW_BATCH.header());
        if self.count > 0 {
            Writer(head).long(self.count as i64);
            Writer(&mut self.buf).long(0);
        } else {
            Writer(head).long(0);
        }
        let start = FRONT - head.len();
        self.buf[start..FRONT].copy_from_slice(head);
        let r = send(&self.buf[start..]);
        self.buf.truncate(FRONT);
        self.count = 0;
        r
    }

    /// [`BatchWriter::take`] into `out` (replacing its contents).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.take(|m| {
            out.clear();
            out.extend_from_slice(m);
        })
    }
}

/// The Flow messages a message of the flow topic holds: a FlowBatch's
/// items, or the message itself when it is not a FlowBatch (a Flow message,
/// or anything else, which the Flow decoder then refuses). A FlowBatch whose
/// framing is broken is refused whole: where its items begin is unknown.
pub fn flow_messages(msg: &[u8]) -> Result<FlowMessages<'_>, DecodeError> {
    if !is_batch(msg) {
        return Ok(FlowMessages::One(Some(msg)));
    }
    // One pass: the items are handed out only once the whole framing
    // checked (the error drops them).
    let mut r = Reader::new(FLOW_BATCH.datum(msg)?);
    let mut items = Vec::new();
    r.blocks(|r| r.bytes().map(|item| items.push(item)))?;
    r.finish()?;
    Ok(FlowMessages::Many(items.into_iter()))
}

/// How many records a message of the flow topic holds, for counting what
/// was produced, delivered, spooled or lost: a FlowBatch's item count (at
/// least 1, so that a message is never counted as none); 1 for anything
/// else. Reads only the first block's count, which is every item of a batch
/// [`BatchWriter`] wrote (the sidecar counts its own messages with it, per
/// delivery report).
pub fn records_in(msg: &[u8]) -> u64 {
    if !is_batch(msg) {
        return 1;
    }
    let mut r = Reader::new(&msg[10..]);
    match r.long() {
        Ok(n) => n.unsigned_abs().max(1),
        Err(_) => 1,
    }
}

fn is_batch(msg: &[u8]) -> bool {
    msg.len() >= 10 && msg[..10] == FLOW_BATCH.header()
}

/// The items of [`flow_messages`].
pub enum FlowMessages<'a> {
    One(Option<&'a [u8]>),
    Many(std::vec::IntoIter<&'a [u8]>),
}

impl<'a> Iterator for FlowMessages<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            FlowMessages::One(m) => m.take(),
            FlowMessages::Many(it) => it.next(),
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match self {
            FlowMessages::One(m) => usize::from(m.is_some()),
            FlowMessages::Many(it) => it.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for FlowMessages<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_flow, fixtures, Flow, HostIdentity};

    #[test]
    fn a_batch_holds_its_flow_messages_in_order() {
        let h = fixtures::host();
        let msgs: Vec<Vec<u8>> = (0..3).map(|i| fixtures::flow_message(&h, &Flow { sequence: i, ..fixtures::flow() })).collect();
        let mut w = BatchWriter::default();
        for m in &msgs {
            w.push(m);
        }
        assert_eq!(w.len(), 3);
        let mut out = vec![9; 4];
        w.finish(&mut out);
        assert!(w.is_empty());
        assert_eq!(records_in(&out), 3);
        let items: Vec<&[u8]> = flow_messages(&out).unwrap().collect();
        assert_eq!(items, msgs.iter().map(|m| &m[..]).collect::<Vec<_>>());
        let seqs: Vec<i64> = items.iter().map(|m| decode_flow(m, HostIdentity::decode).unwrap().1.sequence).collect();
        assert_eq!(seqs, [0, 1, 2]);
        // A plain Flow message is its own one item.
        assert_eq!(flow_messages(&msgs[1]).unwrap().collect::<Vec<_>>(), [&msgs[1][..]]);
        assert_eq!(records_in(&msgs[1]), 1);
        // The writer starts over after finish.
        w.push(&msgs[0]);
        w.finish(&mut out);
        assert_eq!(flow_messages(&out).unwrap().len(), 1);
    }

    /// Items of any length keep their bytes: the two bytes kept for a
    /// length fit 64 B to 8 KiB; shorter and longer ones are moved to fit.
    #[test]
    fn items_of_every_length_round_trip() {
        let items: Vec<Vec<u8>> = [0usize, 5, 63, 64, 300, 8191, 8192, 70_000].iter().map(|&n| vec![(n % 251) as u8; n]).collect();
        let mut w = BatchWriter::default();
        items.iter().for_each(|i| w.push(i));
        assert_eq!(w.bytes(), items.iter().map(|i| i.len()).sum::<usize>() + 1 + 1 + 1 + 2 + 2 + 2 + 3 + 3);
        let mut out = Vec::new();
        w.finish(&mut out);
        assert_eq!(flow_messages(&out).unwrap().collect::<Vec<_>>(), items.iter().map(|i| &i[..]).collect::<Vec<_>>());
        assert_eq!(records_in(&out), items.len() as u64);
    }

    /// Bytes from the network: a torn or padded batch is refused whole,
    /// never read past its end, and counts as one record.
    #[test]
    fn a_broken_batch_is_refused_whole() {
        let m = fixtures::flow_message(&fixtures::host(), &fixtures::flow());
        let mut w = BatchWriter::default();
        w.push(&m);
        w.push(&m);
        let mut out = Vec::new();
        w.finish(&mut out);
        for cut in 10..out.len() {
            assert!(flow_messages(&out[..cut]).is_err(), "cut at {cut}");
            assert!(records_in(&out[..cut]) <= 2, "cut at {cut}");
        }
        let mut padded = out.clone();
        padded.push(0);
        assert_eq!(flow_messages(&padded).err(), Some(DecodeError::TrailingBytes(1)));
        // An empty batch holds nothing, but counts as one message's worth.
        w.finish(&mut out);
        assert_eq!(flow_messages(&out).unwrap().len(), 0);
        assert_eq!(records_in(&out), 1);
    }
}
