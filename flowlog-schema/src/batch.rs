//! Several Flow records in one Kafka message of the flow topic
//! (`schemas/flow_batch.avsc`): a `FlowBatch` record holding an array of
//! bytes, each item one Flow datum without its host block, then the host
//! block they share and the fingerprint of the Flow schema they are written
//! with. Producing one Kafka message per record costs the sidecar and the
//! broker more than encoding it (librdkafka's allocation, queueing and
//! delivery report per message); a batch pays that once, and the host
//! block once. The Flow schema stays defined once, and each record still
//! decodes, or fails to, on its own ([`FlowItem`]).

use std::borrow::Cow;

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    flow::{decode_flow, decode_flow_body},
    host::HostIdentity,
    schemas::{header, FLOW, FLOW_BATCH, FLOW_BATCH_V1},
    Flow,
};

/// Builds one FlowBatch message from Flow records added one at a time, in
/// one buffer and without copying them again: each is encoded in place
/// ([`BatchWriter::push_with`]), the header and item count go into room
/// kept in front, and the host block after the items ([`BatchWriter::take`]).
/// The sidecar builds every message this way, so its cost counts per record.
#[derive(Debug)]
pub struct BatchWriter {
    /// [`FRONT`] bytes kept for the header and count, then the items, each
    /// length-prefixed.
    buf: Vec<u8>,
    count: usize,
    /// Where a length or the header is encoded before it goes into `buf`
    /// (kept: no allocation per record).
    scratch: Vec<u8>,
    /// The encoded [`HostIdentity`] every item shares.
    host_block: Vec<u8>,
}

/// Room for the single-object header (10 bytes) and the item count (a
/// zig-zag varint: 3 bytes up to 1 048 575 items).
const FRONT: usize = 13;
/// Items are counted in at most 3 varint bytes.
const MAX_ITEMS: usize = (1 << 20) - 1;

impl BatchWriter {
    /// A writer of batches from the host `host_block` encodes
    /// ([`HostIdentity::encode`]).
    pub fn new(host_block: Vec<u8>) -> BatchWriter {
        BatchWriter { buf: vec![0; FRONT], count: 0, scratch: Vec::with_capacity(FRONT), host_block }
    }

    /// The host of the next batches. The open batch, if any, was written
    /// for the previous one: it must be taken first.
    pub fn set_host(&mut self, host_block: Vec<u8>) {
        assert!(self.is_empty(), "a batch's records share one host: take the open batch first");
        self.host_block = host_block;
    }

    /// Adds the Flow record `encode` appends to the buffer it is given:
    /// its fields after the host block, current schema
    /// ([`Flow::write_body_with`]), encoded in place. Its length goes in
    /// front of it: two bytes are kept for it (records of 64 bytes to 8 KiB,
    /// all of ours), anything else is moved once to fit.
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
            // Rare: make the room fit the prefix (moves this one record).
            self.buf.splice(at..at + 2, std::iter::repeat_n(0, prefix.len()));
        }
        self.buf[at..at + prefix.len()].copy_from_slice(prefix);
        self.count += 1;
    }

    /// Adds `flow` (its workload encoded in full).
    pub fn push(&mut self, flow: &Flow) {
        self.push_with(|out| flow.write_body_with(&mut Writer(out), &mut crate::flow::Fresh));
    }

    /// Adds raw item bytes, well-formed or not (tests of the readers).
    pub fn push_raw(&mut self, item: &[u8]) {
        self.push_with(|out| out.extend_from_slice(item));
    }

    /// Records added since the last [`BatchWriter::take`].
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the items so far (the message is the host block and ~25 more).
    pub fn bytes(&self) -> usize {
        self.buf.len() - FRONT
    }

    /// Hands the message to `send` (header, one array block of every
    /// item, the array's end, the host block, the Flow schema's
    /// fingerprint); the writer is empty again afterwards.
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
        self.buf.extend_from_slice(&self.host_block);
        self.buf.extend_from_slice(&FLOW.fingerprint());
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

/// The Flow records a message of the flow topic holds: a FlowBatch's items,
/// or the message itself when it is not a FlowBatch (a Flow message, or
/// anything else, which the Flow decoder then refuses). A FlowBatch whose
/// framing is broken is refused whole: where its items begin is unknown.
pub fn flow_messages(msg: &[u8]) -> Result<FlowMessages<'_>, DecodeError> {
    let (datum, v1) = match batch_version(msg) {
        None => return Ok(FlowMessages { items: Vec::new().into_iter(), shared: None, one: Some(msg) }),
        Some(v1) => (&msg[10..], v1),
    };
    // One pass: the items are handed out only once the whole framing
    // checked (the error drops them).
    let mut r = Reader::new(datum);
    let mut items = Vec::new();
    r.blocks(|r| r.bytes().map(|item| items.push(item)))?;
    let shared = if v1 {
        None
    } else {
        let host = HostIdentity::skip(&mut r)?;
        Some(Shared { host, flow_schema: r.fixed::<8>()? })
    };
    r.finish()?;
    Ok(FlowMessages { items: items.into_iter(), shared, one: None })
}

/// How many records a message of the flow topic holds, for counting what
/// was produced, delivered, spooled or lost: a FlowBatch's item count (at
/// least 1, so that a message is never counted as none); 1 for anything
/// else. Reads only the first block's count, which is every item of a batch
/// [`BatchWriter`] wrote (the sidecar counts its own messages with it, per
/// delivery report).
pub fn records_in(msg: &[u8]) -> u64 {
    if batch_version(msg).is_none() {
        return 1;
    }
    let mut r = Reader::new(&msg[10..]);
    match r.long() {
        Ok(n) => n.unsigned_abs().max(1),
        Err(_) => 1,
    }
}

/// Some(true) for a FlowBatch of version 1 (whole Flow messages), Some(false)
/// for the current one, None for anything else.
fn batch_version(msg: &[u8]) -> Option<bool> {
    let header = msg.get(..10)?;
    if header == FLOW_BATCH.header() {
        Some(false)
    } else if header == FLOW_BATCH_V1.header() {
        Some(true)
    } else {
        None
    }
}

/// What the items of a current FlowBatch share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shared<'a> {
    host: &'a [u8],
    flow_schema: [u8; 8],
}

/// One Flow record of a message of the flow topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowItem<'a> {
    /// A whole Flow message, or (`shared`) a batch item.
    bytes: &'a [u8],
    shared: Option<Shared<'a>>,
}

impl<'a> FlowItem<'a> {
    /// Decodes and checks the record; its host block goes to `host`, which
    /// may decode it or find it in a cache (see [`decode_flow`]).
    pub fn decode<H>(&self, host: impl FnOnce(&[u8]) -> Result<H, DecodeError>) -> Result<(H, Flow), DecodeError> {
        match self.shared {
            None => decode_flow(self.bytes, host),
            Some(s) => decode_flow_body(s.flow_schema, s.host, self.bytes, host),
        }
    }

    /// The record as a whole single-object Flow message (for the
    /// dead-letter topic): a batch item gets its header and host block back.
    pub fn message(&self) -> Cow<'a, [u8]> {
        match self.shared {
            None => Cow::Borrowed(self.bytes),
            Some(s) => Cow::Owned([&header(s.flow_schema)[..], s.host, self.bytes].concat()),
        }
    }
}

/// The items of [`flow_messages`].
pub struct FlowMessages<'a> {
    items: std::vec::IntoIter<&'a [u8]>,
    shared: Option<Shared<'a>>,
    /// A message that is not a FlowBatch: its own one item.
    one: Option<&'a [u8]>,
}

impl<'a> Iterator for FlowMessages<'a> {
    type Item = FlowItem<'a>;
    fn next(&mut self) -> Option<FlowItem<'a>> {
        if let Some(m) = self.one.take() {
            return Some(FlowItem { bytes: m, shared: None });
        }
        self.items.next().map(|bytes| FlowItem { bytes, shared: self.shared })
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.items.len() + usize::from(self.one.is_some());
        (n, Some(n))
    }
}

impl ExactSizeIterator for FlowMessages<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixtures, Flow, HostIdentity};

    fn flows(n: i64) -> Vec<Flow> {
        (0..n).map(|i| Flow { sequence: i, ..fixtures::flow() }).collect()
    }

    #[test]
    fn a_batch_holds_its_flow_records_in_order() {
        let h = fixtures::host();
        let mut w = BatchWriter::new(h.encode());
        flows(3).iter().for_each(|f| w.push(f));
        assert_eq!(w.len(), 3);
        let mut out = vec![9; 4];
        w.finish(&mut out);
        assert!(w.is_empty());
        assert_eq!(records_in(&out), 3);
        let items: Vec<FlowItem> = flow_messages(&out).unwrap().collect();
        for (item, f) in items.iter().zip(flows(3)) {
            assert_eq!(item.decode(HostIdentity::decode).unwrap(), (h.clone(), f.clone()));
            // Each is, whole again, the Flow message the record would be alone.
            assert_eq!(item.message(), fixtures::flow_message(&h, &f));
        }
        assert_eq!(items.len(), 3);
        // The host block is written once, after the items.
        let block = h.encode();
        assert_eq!(out.windows(block.len()).filter(|w| *w == &block[..]).count(), 1);
        assert_eq!(&out[out.len() - 8..], &FLOW.fingerprint());
        // A plain Flow message is its own one item.
        let one = fixtures::flow_message(&h, &fixtures::flow());
        let items: Vec<FlowItem> = flow_messages(&one).unwrap().collect();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].message(), &one[..]);
        assert_eq!(items[0].decode(HostIdentity::decode).unwrap(), (h.clone(), fixtures::flow()));
        assert_eq!(records_in(&one), 1);
        // The writer starts over after finish, under a new host if set.
        let h2 = fixtures::host_with("h2", "api", &["fd00::1"]);
        w.set_host(h2.encode());
        w.push(&fixtures::flow());
        w.finish(&mut out);
        let items: Vec<FlowItem> = flow_messages(&out).unwrap().collect();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].decode(HostIdentity::decode).unwrap().0, h2);
    }

    /// Batches written before the host block was shared (version 1: whole
    /// Flow messages as items) still decode, each item its own message.
    #[test]
    fn version_1_batches_still_decode() {
        let h = fixtures::host();
        let msgs: Vec<Vec<u8>> = flows(3).iter().map(|f| fixtures::flow_message(&h, f)).collect();
        let mut v1 = FLOW_BATCH_V1.header().to_vec();
        let mut w = Writer(&mut v1);
        w.block(msgs.iter(), |w, m| w.bytes(m));
        assert_eq!(records_in(&v1), 3);
        let items: Vec<FlowItem> = flow_messages(&v1).unwrap().collect();
        assert_eq!(items.iter().map(|i| i.message().into_owned()).collect::<Vec<_>>(), msgs);
        for (item, f) in items.iter().zip(flows(3)) {
            assert_eq!(item.decode(HostIdentity::decode).unwrap(), (h.clone(), f));
        }
    }

    /// Items of any length keep their bytes: the two bytes kept for a
    /// length fit 64 B to 8 KiB; shorter and longer ones are moved to fit.
    #[test]
    fn items_of_every_length_round_trip() {
        let items: Vec<Vec<u8>> = [0usize, 5, 63, 64, 300, 8191, 8192, 70_000].iter().map(|&n| vec![(n % 251) as u8; n]).collect();
        let mut w = BatchWriter::new(fixtures::host().encode());
        items.iter().for_each(|i| w.push_raw(i));
        assert_eq!(w.bytes(), items.iter().map(|i| i.len()).sum::<usize>() + 1 + 1 + 1 + 2 + 2 + 2 + 3 + 3);
        let mut out = Vec::new();
        w.finish(&mut out);
        assert_eq!(flow_messages(&out).unwrap().map(|i| i.bytes).collect::<Vec<_>>(), items.iter().map(|i| &i[..]).collect::<Vec<_>>());
        assert_eq!(records_in(&out), items.len() as u64);
    }

    /// Bytes from the network: a torn or padded batch is refused whole,
    /// never read past its end, and counts as one record; a record that does
    /// not decode fails alone.
    #[test]
    fn a_broken_batch_is_refused_whole() {
        let mut w = BatchWriter::new(fixtures::host().encode());
        w.push(&fixtures::flow());
        w.push(&fixtures::flow());
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
        // A torn record among good ones.
        let mut body = Vec::new();
        fixtures::flow().write_body_with(&mut Writer(&mut body), &mut crate::flow::Fresh);
        w.push_raw(&body);
        w.push_raw(&body[..body.len() - 3]);
        w.finish(&mut out);
        let got: Vec<_> = flow_messages(&out).unwrap().map(|i| i.decode(|_| Ok(())).map(|(_, f)| f.sequence)).collect();
        assert_eq!(got, [Ok(fixtures::flow().sequence), Err(DecodeError::Truncated)]);
    }
}
