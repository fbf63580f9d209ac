//! Sync decisions: which messages are stored for an offline id, in what format, and
//! how they are redelivered (in order, numbered `s = 1..n`, paced by a timer).
//!
//! The Redis IO lives in the driver; this module only decides.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::session::SessionEvent;
use crate::wire::{DecodeError, Message};

/// Per-message options travelling between processes (`o`); upstream's default is
/// `{"sync": true}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MessageOptions {
    /// The raw `o` object, kept whole so that unknown options survive a round trip.
    pub raw: serde_json::Map<String, Value>,
}

impl MessageOptions {
    /// Whether the message may be stored for offline recipients (`sync` is not `false`).
    pub fn allows_sync(&self) -> bool {
        self.raw.get("sync") != Some(&Value::Bool(false))
    }

    /// Options that forbid storing the message (`{"sync": false}`), e.g. for typing
    /// indicators that are worthless later.
    pub fn no_sync() -> Self {
        let mut raw = serde_json::Map::new();
        raw.insert("sync".into(), Value::Bool(false));
        MessageOptions { raw }
    }
}

/// Whether a message to an offline id is stored: never an empty or blank id (as
/// upstream), and never a message whose options say `sync: false`.
pub fn should_store(recipient: &str, options: Option<&MessageOptions>) -> bool {
    !recipient.trim().is_empty() && options.is_none_or(MessageOptions::allows_sync)
}

/// One entry of an id's stored array: `{"op","d","t"}` (the sequence is assigned at
/// redelivery), exactly upstream's format.
pub fn encode_stored(message: &Message) -> String {
    let stored = Message {
        s: None,
        ..message.clone()
    };
    stored.encode().as_str().to_owned()
}

/// Parse an id's stored array. Entries that are not messages are skipped and counted,
/// so one corrupt entry cannot hide the rest.
pub fn decode_stored(json: &str) -> Result<(Vec<Message>, usize), DecodeError> {
    let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
    let Value::Array(entries) = value else {
        return Err(DecodeError::NotObject);
    };
    let mut skipped = 0;
    let messages = entries
        .into_iter()
        .filter_map(|entry| {
            Message::from_value(entry)
                .inspect_err(|_| skipped += 1)
                .ok()
        })
        .map(|m| Message { s: None, ..m })
        .collect();
    Ok((messages, skipped))
}

/// The entries of an id's stored array as the text they are stored as, split the
/// way our scripts split them (a comma at depth 0, outside strings); `None` when the
/// value is not bracketed. Our scripts compare and cut entries as text, never
/// re-encoded, so these are the exact texts they see.
pub fn stored_entries(raw: &str) -> Option<Vec<&str>> {
    let mut body = raw.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut entries = Vec::new();
    while !body.is_empty() {
        let (first, rest) = split_first_entry(body);
        entries.push(first);
        body = rest;
    }
    Some(entries)
}

/// The scripts' `first_end`/`drop_first`: the first entry of an array's body, and
/// what follows its comma (empty when it was the only one).
pub fn split_first_entry(body: &str) -> (&str, &str) {
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for (i, c) in body.bytes().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else if c == b'{' || c == b'[' {
            depth += 1;
        } else if c == b'}' || c == b']' {
            depth -= 1;
        } else if c == b',' && depth == 0 {
            return (&body[..i], &body[i + 1..]);
        }
    }
    (body, "")
}

/// Paced, numbered redelivery of one id's stored messages.
#[derive(Debug)]
pub struct Redelivery {
    id: String,
    queue: VecDeque<Message>,
    dropped: usize,
    delivered: usize,
    interval: Duration,
    next_at: Instant,
}

impl Redelivery {
    /// Redeliver `stored` (oldest first), keeping only the newest `max` of them; the
    /// first goes out at `now`, then one every `interval`.
    pub fn new(
        id: String,
        mut stored: Vec<Message>,
        max: usize,
        interval: Duration,
        now: Instant,
    ) -> Self {
        let dropped = stored.len().saturating_sub(max);
        stored.drain(..dropped);
        Redelivery {
            id,
            queue: stored.into(),
            dropped,
            delivered: 0,
            interval,
            next_at: now,
        }
    }

    /// The next message due at `now`, numbered from 1.
    pub fn poll(&mut self, now: Instant) -> Option<Message> {
        if now < self.next_at {
            return None;
        }
        let mut message = self.queue.pop_front()?;
        self.delivered += 1;
        message.s = Some(self.delivered as u64);
        self.next_at = now + self.interval;
        Some(message)
    }

    /// When the next message is due, or `None` when all were handed out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.queue.is_empty()).then_some(self.next_at)
    }

    /// The event that tells the adapter what may leave the store.
    pub fn finished_event(&self) -> SessionEvent {
        SessionEvent::Redelivered {
            id: self.id.clone(),
            delivered: self.delivered,
            dropped: self.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_format_round_trips_and_skips_garbage() {
        let message = Message::dispatch("CHAT", json!({"text": "hi"}));
        let array = format!(
            "[{},42,{}]",
            encode_stored(&message),
            encode_stored(&message)
        );
        let (messages, skipped) = decode_stored(&array).unwrap();
        assert_eq!(messages, [message.clone(), message]);
        assert_eq!(skipped, 1);
    }

    #[test]
    fn entries_split_as_the_scripts_split_them() {
        assert_eq!(
            stored_entries(r#" [{"a":"x,]"},{"b":[1,2]},3] "#),
            Some(vec![r#"{"a":"x,]"}"#, r#"{"b":[1,2]}"#, "3"])
        );
        assert_eq!(stored_entries("[]"), Some(vec![]));
        assert_eq!(stored_entries("{}"), None);
        assert_eq!(
            split_first_entry(r#"{"q":"\"},"}"#),
            (r#"{"q":"\"},"}"#, "")
        );
    }

    #[test]
    fn sync_false_and_blank_ids_are_not_stored() {
        assert!(should_store("alice", None));
        assert!(!should_store("  ", None));
        assert!(!should_store("alice", Some(&MessageOptions::no_sync())));
    }
}
