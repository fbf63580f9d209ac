//! Recovery by position: what a room's stream is, how a position is written on
//! the wire, and how a client's reported position turns into a replay (see
//! `docs/protocol.md`, "Recovery").
//!
//! A recoverable room (one [`RecoveryConfig::covers`]) keeps its last messages in a
//! capped Redis Stream beside a small meta record holding the stream's *epoch* and
//! its last *offset*. One script appends a message, numbers it and publishes it, so
//! offsets are contiguous and the stream's order is the order every member gets.
//! Every message an extended member receives carries its [`Position`]; a client that
//! comes back reports the last one it got, and gets exactly what it missed, in
//! order, or is told it cannot ([`Resume::recovered`] false: reload your state).
//! Never a partial replay presented as complete.

use std::time::Duration;

use serde_json::{Value, json};

use crate::wire::Message;

/// Where a message stands in its room's stream: the stream's epoch (new whenever the
/// stream's meta record is created, so after Redis lost it) and the message's
/// offset (1, 2, ... within the epoch; 0 is "before the first").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream's epoch: a random text drawn by whoever created the meta record.
    pub epoch: String,
    /// The offset within the epoch.
    pub offset: u64,
}

impl Position {
    /// Read a position from `{"epoch": "e", "offset": 17}` (the shape of a subscribe's
    /// `since`); `None` when it has another shape.
    pub fn from_value(value: &Value) -> Option<Position> {
        let epoch = value.get("epoch")?.as_str()?;
        let offset = value.get("offset")?.as_u64()?;
        (!epoch.is_empty() && epoch.len() <= MAX_EPOCH_BYTES).then(|| Position {
            epoch: epoch.to_owned(),
            offset,
        })
    }

    /// `{"epoch": "e", "offset": 17}`.
    pub fn to_value(&self) -> Value {
        json!({ "epoch": self.epoch, "offset": self.offset })
    }
}

/// An epoch is at most this long: a client cannot make the server hold more.
pub const MAX_EPOCH_BYTES: usize = 64;

/// Which rooms keep a stream, and how much of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// Room patterns: a room name, or a prefix followed by `*` (`chat:*`); `*`
    /// alone covers every room.
    pub rooms: Vec<String>,
    /// Entries a stream keeps at most (the oldest go).
    pub size: usize,
    /// A stream not appended to for this long expires as a whole.
    pub ttl: Duration,
    /// A meta record (epoch and last offset) not touched for this long expires: a
    /// client whose position is older gets `recovered: false`.
    pub meta_ttl: Duration,
}

impl Default for RecoveryConfig {
    /// No room, 100 entries, 120 s, 24 h.
    fn default() -> Self {
        RecoveryConfig {
            rooms: Vec::new(),
            size: 100,
            ttl: Duration::from_secs(120),
            meta_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl RecoveryConfig {
    /// Whether `room` keeps a stream.
    pub fn covers(&self, room: &str) -> bool {
        self.rooms
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => pattern == room,
            })
    }
}

/// What a room's stream held after a position: the stream's epoch, its last offset
/// (`top`), and the entries after the position asked about, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// The epoch.
    pub epoch: String,
    /// The last offset given out in this epoch (0: none yet).
    pub top: u64,
    /// Entries after the position asked about, each with its offset, oldest first
    /// (fewer than asked when the stream no longer holds them).
    pub entries: Vec<(u64, Message)>,
}

/// What a client that reported `since` gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// The messages it missed, oldest first: all of them, or none.
    pub replay: Vec<(u64, Message)>,
    /// `Some(true)`: the replay is everything it missed; `Some(false)`: what it
    /// missed is no longer known (another epoch, trimmed, expired); `None`: it
    /// reported no position.
    pub recovered: Option<bool>,
}

impl History {
    /// The replay for a client whose last position is `since`: the entries after
    /// it when the stream holds every one of them (same epoch, contiguous from
    /// `since + 1` to `top`), else nothing and `recovered: false`.
    pub fn resume(&self, since: Option<&Position>) -> Resume {
        let Some(since) = since else {
            return Resume {
                replay: Vec::new(),
                recovered: None,
            };
        };
        let complete =
            since.epoch == self.epoch && since.offset <= self.top && self.covers(since.offset);
        Resume {
            replay: if complete {
                self.entries
                    .iter()
                    .filter(|(offset, _)| *offset > since.offset)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            },
            recovered: Some(complete),
        }
    }

    /// Whether the entries are every offset from `after + 1` to `top`.
    fn covers(&self, after: u64) -> bool {
        let mut expected = after + 1;
        for (offset, _) in self.entries.iter().filter(|(offset, _)| *offset > after) {
            if *offset != expected {
                return false;
            }
            expected += 1;
        }
        expected == self.top + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(epoch: &str, top: u64, offsets: &[u64]) -> History {
        History {
            epoch: epoch.into(),
            top,
            entries: offsets
                .iter()
                .map(|o| (*o, Message::dispatch("M", json!({ "n": o }))))
                .collect(),
        }
    }

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn a_replay_is_all_or_nothing() {
        let full = history("e", 5, &[3, 4, 5]);
        let resume = full.resume(Some(&at("e", 2)));
        assert_eq!(resume.recovered, Some(true));
        assert_eq!(
            resume.replay.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        // Up to date: nothing to replay, recovered.
        assert_eq!(full.resume(Some(&at("e", 5))).recovered, Some(true));
        // Trimmed: offset 2 is gone.
        let trimmed = full.resume(Some(&at("e", 1)));
        assert_eq!((trimmed.recovered, trimmed.replay.len()), (Some(false), 0));
        // Another epoch, a position from the future, a hole.
        assert_eq!(full.resume(Some(&at("f", 2))).recovered, Some(false));
        assert_eq!(full.resume(Some(&at("e", 9))).recovered, Some(false));
        let holed = history("e", 5, &[3, 5]);
        assert_eq!(holed.resume(Some(&at("e", 2))).recovered, Some(false));
        // No position: nothing to recover.
        assert_eq!(full.resume(None).recovered, None);
    }

    #[test]
    fn patterns_cover_names_and_prefixes() {
        let config = RecoveryConfig {
            rooms: vec!["chat:*".into(), "news".into()],
            ..RecoveryConfig::default()
        };
        assert!(config.covers("chat:1") && config.covers("news"));
        assert!(!config.covers("newsroom") && !config.covers("chat"));
        let all = RecoveryConfig {
            rooms: vec!["*".into()],
            ..RecoveryConfig::default()
        };
        assert!(all.covers("anything"));
    }

    #[test]
    fn positions_read_only_their_shape() {
        assert_eq!(
            Position::from_value(&json!({"epoch":"e","offset":3})),
            Some(at("e", 3))
        );
        assert_eq!(Position::from_value(&json!({"epoch":"","offset":3})), None);
        assert_eq!(
            Position::from_value(&json!({"epoch":"e","offset":-1})),
            None
        );
        assert_eq!(Position::from_value(&json!("e:3")), None);
    }
}
