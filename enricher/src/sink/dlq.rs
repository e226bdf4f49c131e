//! The dead-letter topic: messages that do not decode (or decode to
//! nonsense), as they were, with the reason and their origin in headers.
//!
//! Each dead letter is tracked until the broker acknowledges it: writing a
//! batch ([`Sink::write`]) waits until every dead letter sent so far is
//! acknowledged, so the offsets that cover one are committed only once it is
//! in the topic. One that failed fails that write (nothing is committed; the
//! roll is tried again with backoff) and is sent again, as it was, at the
//! start of the next write.
//!
//! A message larger than the producer's or the broker's maximum message size
//! is sent as a **reference**: no payload, the same headers (its origin
//! `topic/partition/offset` and reason) and `flowlog.dlq.omitted_bytes` (its
//! size); the message itself stays in the flow topic for its retention.
//! Counted in [`metrics::DLQ_OMITTED`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use flowlog_schema::DecodeError;
use rdkafka::message::{Header, OwnedHeaders};

use super::{Batch, DeadLetters, Message, Sink};
use crate::{
    kafka::{Outgoing, Producer, Returned, SendError, Tracker, DELIVERY_TIMEOUT},
    metrics,
};

pub const REASON: &str = "flowlog.dlq.reason";
pub const SOURCE: &str = "flowlog.dlq.source";
/// On a reference: the size of the payload left out.
pub const OMITTED_BYTES: &str = "flowlog.dlq.omitted_bytes";
/// A reason longer than this is cut (it may quote the input).
const MAX_REASON_BYTES: usize = 1024;

pub struct DeadLetterTopic {
    producer: Producer,
    topic: String,
    /// The flow topic, named in the `flowlog.dlq.source` header.
    source_topic: String,
    deliveries: Arc<Tracker>,
    /// Dead letters sent and not yet confirmed, by reason: counted in
    /// [`metrics::DLQ`] once delivered.
    unconfirmed: Mutex<BTreeMap<&'static str, u64>>,
    /// Dead letters whose delivery failed, sent again by the next write.
    failed: Mutex<Vec<Returned>>,
}

impl DeadLetterTopic {
    pub fn new(producer: Producer, topic: String, source_topic: String) -> DeadLetterTopic {
        DeadLetterTopic {
            producer,
            topic,
            source_topic,
            deliveries: Arc::default(),
            unconfirmed: Mutex::default(),
            failed: Mutex::default(),
        }
    }

    fn queue(&self, key: Option<&[u8]>, payload: Option<&[u8]>, headers: &[(&str, &[u8])]) -> Result<(), SendError> {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(*value) }));
        let out = Outgoing { topic: &self.topic, key, payload, headers: Some(headers) };
        self.producer.send(out, &self.deliveries)
    }

    /// Sends again dead letters whose delivery failed: as they were, or as a
    /// reference if they were too large. Those not sent are kept for the
    /// next try.
    fn resend_all(&self, letters: Vec<Returned>) -> anyhow::Result<()> {
        for (i, r) in letters.iter().enumerate() {
            let sent = if r.too_large && !is_reference(r) {
                self.send_reference(r)
            } else {
                let headers: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
                self.queue(r.key.as_deref(), r.payload.as_deref(), &headers)
                    .map_err(|e| anyhow::anyhow!("sending a dead letter again to {}: {e}", self.topic))
            };
            if let Err(e) = sent {
                self.failed.lock().unwrap_or_else(PoisonError::into_inner).extend(letters[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sends a reference to a message too large to send itself.
    fn send_reference(&self, r: &Returned) -> anyhow::Result<()> {
        let size = r.payload_bytes.to_string();
        let mut headers: Vec<(&str, &[u8])> =
            r.headers.iter().filter(|(k, _)| k != OMITTED_BYTES).map(|(k, v)| (k.as_str(), &v[..])).collect();
        headers.push((OMITTED_BYTES, size.as_bytes()));
        self.queue(r.key.as_deref(), None, &headers)
            .map_err(|e| anyhow::anyhow!("dead-letter reference to {}: {e}", self.topic))?;
        ::metrics::counter!(metrics::DLQ_OMITTED).increment(1);
        Ok(())
    }
}

fn is_reference(r: &Returned) -> bool {
    r.headers.iter().any(|(k, _)| k == OMITTED_BYTES)
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    &s[..end]
}

impl DeadLetters for DeadLetterTopic {
    fn send(&self, m: &Message, reason: &DecodeError) -> anyhow::Result<()> {
        let kind = reason.kind();
        let reason = reason.to_string();
        let source = format!("{}/{}/{}", self.source_topic, m.partition, m.offset);
        let headers = [(REASON, cut(&reason, MAX_REASON_BYTES).as_bytes()), (SOURCE, source.as_bytes())];
        match self.queue(m.key, Some(m.payload), &headers) {
            Ok(()) => {}
            Err(SendError::TooLarge) => self.send_reference(&Returned {
                key: m.key.map(<[u8]>::to_vec),
                payload: None,
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
                payload_bytes: m.payload.len(),
                too_large: true,
                error: String::new(),
            })?,
            Err(e) => return Err(e.into()),
        }
        *self.unconfirmed.lock().unwrap_or_else(PoisonError::into_inner).entry(kind).or_default() += 1;
        Ok(())
    }
}

/// The batch's dead letters were sent as its messages were read: writing
/// the batch sends again those that failed before, then waits until every
/// dead letter sent so far is acknowledged (those the broker refused as too
/// large go again as references).
impl Sink for DeadLetterTopic {
    fn write(&self, _partition: i32, _batch: &Batch) -> anyhow::Result<()> {
        let again = std::mem::take(&mut *self.failed.lock().unwrap_or_else(PoisonError::into_inner));
        self.resend_all(again)?;
        loop {
            let returned = self.producer.wait(&self.deliveries, DELIVERY_TIMEOUT)?;
            if returned.is_empty() {
                break;
            }
            let (large, failed): (Vec<Returned>, Vec<Returned>) =
                returned.into_iter().partition(|r| r.too_large && !is_reference(r));
            let first_error = failed.first().map(|f| (failed.len(), f.error.clone()));
            self.failed.lock().unwrap_or_else(PoisonError::into_inner).extend(failed);
            self.resend_all(large)?;
            if let Some((n, error)) = first_error {
                anyhow::bail!("{n} dead letters not delivered ({error}); sent again on the next try");
            }
        }
        let confirmed = std::mem::take(&mut *self.unconfirmed.lock().unwrap_or_else(PoisonError::into_inner));
        for (reason, n) in confirmed {
            ::metrics::counter!(metrics::DLQ, "reason" => reason).increment(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("aé", 2), "a");
    }
}
