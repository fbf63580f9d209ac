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
    /// Whether each user id keeps a stream of the sends to it (its *personal*
    /// stream), which its extended connections take those sends from.
    pub users: bool,
    /// Whether the global broadcast (a send to `["*"]`) keeps a stream, which
    /// extended connections take broadcasts from.
    pub broadcast: bool,
}

impl Default for RecoveryConfig {
    /// No room, no personal or broadcast stream, 100 entries, 120 s, 24 h.
    fn default() -> Self {
        RecoveryConfig {
            rooms: Vec::new(),
            size: 100,
            ttl: Duration::from_secs(120),
            meta_ttl: Duration::from_secs(24 * 3600),
            users: false,
            broadcast: false,
        }
    }
}

impl RecoveryConfig {
    /// Whether `room` keeps a stream: a room a pattern names, or a personal or the
    /// broadcast stream's name ([`Personal::stream`]) when those keep one.
    pub fn covers(&self, room: &str) -> bool {
        match Personal::of_stream(room) {
            Some(Personal::User) => return self.users,
            Some(Personal::Broadcast) => return self.broadcast,
            None => {}
        }
        self.rooms
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => pattern == room,
            })
    }
}

/// A stream a connection is in by what it is rather than by subscribing: its id's
/// (the sends to the id) and the broadcast's (the sends to `["*"]`). Inside the
/// server each is a room whose name no client can subscribe to (`~` is not a room
/// name's character): `~user:<id>` and `~all`. On the wire it is named by its kind:
/// a message from it carries `"stream": "user"` or `"broadcast"` with its position,
/// and a client reports where it stood in each when it opts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Personal {
    /// The sends to the connection's id.
    User,
    /// The sends to every connection.
    Broadcast,
}

/// The prefix of a personal stream's room name, before the id.
const USER_STREAM_PREFIX: &str = "~user:";

/// The broadcast stream's room name.
const BROADCAST_STREAM: &str = "~all";

impl Personal {
    /// Both kinds.
    pub const ALL: [Personal; 2] = [Personal::User, Personal::Broadcast];

    /// The room name the server keeps this stream under, for connections of `id`
    /// (ignored for the broadcast).
    pub fn stream(self, id: &str) -> String {
        match self {
            Personal::User => format!("{USER_STREAM_PREFIX}{id}"),
            Personal::Broadcast => BROADCAST_STREAM.to_owned(),
        }
    }

    /// The id whose personal stream `room` is, if it is one.
    pub fn id_of(room: &str) -> Option<&str> {
        room.strip_prefix(USER_STREAM_PREFIX)
    }

    /// Which kind of stream a room name is, if it is one.
    pub fn of_stream(room: &str) -> Option<Personal> {
        if room.starts_with(USER_STREAM_PREFIX) {
            Some(Personal::User)
        } else if room == BROADCAST_STREAM {
            Some(Personal::Broadcast)
        } else {
            None
        }
    }

    /// Its name on the wire: `"user"` or `"broadcast"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Personal::User => "user",
            Personal::Broadcast => "broadcast",
        }
    }

    /// The kind a wire name names.
    pub fn parse(name: &str) -> Option<Personal> {
        Personal::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// Where a client stood in its personal and broadcast streams, as it reports them
/// when it opts in (`"since": {"user": {"epoch","offset"}, "broadcast": {...}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Since {
    /// In the stream of its id's sends.
    pub user: Option<Position>,
    /// In the broadcast stream.
    pub broadcast: Option<Position>,
}

impl Since {
    /// Read the opt-in's `since` (a missing or malformed position is none).
    pub fn from_value(value: Option<&Value>) -> Since {
        let at = |kind: Personal| {
            value
                .and_then(|since| since.get(kind.as_str()))
                .and_then(Position::from_value)
        };
        Since {
            user: at(Personal::User),
            broadcast: at(Personal::Broadcast),
        }
    }

    /// The opt-in's `since`; `None` when no position is known.
    pub fn to_value(&self) -> Option<Value> {
        let mut since = serde_json::Map::new();
        for kind in Personal::ALL {
            if let Some(position) = self.get(kind) {
                since.insert(kind.as_str().into(), position.to_value());
            }
        }
        (!since.is_empty()).then_some(Value::Object(since))
    }

    /// The position in stream `kind`.
    pub fn get(&self, kind: Personal) -> Option<&Position> {
        match kind {
            Personal::User => self.user.as_ref(),
            Personal::Broadcast => self.broadcast.as_ref(),
        }
    }

    /// Where the position in stream `kind` is kept.
    pub fn get_mut(&mut self, kind: Personal) -> &mut Option<Position> {
        match kind {
            Personal::User => &mut self.user,
            Personal::Broadcast => &mut self.broadcast,
        }
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
    fn personal_streams_are_covered_by_their_switch_only() {
        let config = RecoveryConfig {
            rooms: vec!["*".into()],
            users: true,
            ..RecoveryConfig::default()
        };
        assert!(config.covers(&Personal::User.stream("alice")));
        assert!(!config.covers(&Personal::Broadcast.stream("")));
        assert_eq!(Personal::of_stream("~user:a"), Some(Personal::User));
        assert_eq!(Personal::of_stream("~all"), Some(Personal::Broadcast));
        assert_eq!(Personal::of_stream("user:a"), None);
        assert_eq!(Personal::parse("broadcast"), Some(Personal::Broadcast));
    }

    #[test]
    fn since_reads_each_stream_and_skips_the_malformed() {
        let since = Since::from_value(Some(&json!({
            "user": {"epoch": "e", "offset": 4},
            "broadcast": {"epoch": "", "offset": 1}
        })));
        assert_eq!(since.user, Some(at("e", 4)));
        assert_eq!(since.broadcast, None);
        assert_eq!(
            since.to_value(),
            Some(json!({"user": {"epoch": "e", "offset": 4}}))
        );
        assert_eq!(Since::from_value(Some(&json!(3))), Since::default());
        assert_eq!(Since::default().to_value(), None);
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
