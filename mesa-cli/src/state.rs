//! `mesa client --state FILE`: the rooms a client holds and, in recoverable rooms,
//! the position of the last message it received, and its positions in its personal
//! and broadcast streams, kept in a JSON file so that a client process killed and
//! started again resumes where it was:
//! `{"rooms": {"chat:1": {"epoch": "…", "offset": 17}, "lobby": null},
//! "streams": {"user": {"epoch": "…", "offset": 4}}}`.

use std::collections::BTreeMap;
use std::path::Path;

use mesa_tokio::ClientEvent;
use mesa_tokio::recovery::{Position, Since};
use serde_json::{Map, Value, json};

/// The rooms and their positions, by room.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct State {
    rooms: BTreeMap<String, Option<Position>>,
    streams: Since,
}

impl State {
    /// Read FILE; a file that does not exist yet is an empty state.
    pub(crate) fn load(path: &Path) -> Result<State, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State::default());
            }
            Err(error) => return Err(format!("cannot read --state {}: {error}", path.display())),
        };
        Self::parse(&text).ok_or_else(|| {
            format!(
                "--state {} is not a state file ({{\"rooms\": {{ROOM: {{\"epoch\", \"offset\"}} or null}}}})",
                path.display()
            )
        })
    }

    fn parse(text: &str) -> Option<State> {
        let value: Value = serde_json::from_str(text).ok()?;
        let rooms = value.get("rooms")?.as_object()?;
        let rooms = rooms
            .iter()
            .map(|(room, position)| match position {
                Value::Null => Some((room.clone(), None)),
                position => Some((room.clone(), Some(Position::from_value(position)?))),
            })
            .collect::<Option<_>>()?;
        let streams = Since::from_value(value.get("streams"));
        Some(State { rooms, streams })
    }

    /// The positions in the personal and broadcast streams.
    pub(crate) fn streams(&self) -> &Since {
        &self.streams
    }

    /// The rooms to subscribe to: those of the state with their positions, then
    /// those of `--subscribe` it lacks.
    pub(crate) fn rooms_with(&mut self, subscribe: &[String]) -> Vec<(String, Option<Position>)> {
        for room in subscribe {
            self.rooms.entry(room.clone()).or_default();
        }
        self.rooms
            .iter()
            .map(|(room, position)| (room.clone(), position.clone()))
            .collect()
    }

    /// Follow what `event` changes; whether it changed anything. The rooms kept are
    /// the client's own subscriptions (answered with its reference), as the client
    /// restores only those: a room the server put it in is the server's to restore.
    pub(crate) fn follow(&mut self, event: &ClientEvent) -> bool {
        let (room, position) = match event {
            ClientEvent::StreamPosition { stream, position }
            | ClientEvent::Resumed {
                stream,
                position: Some(position),
                ..
            } => {
                let kept = self.streams.get_mut(*stream);
                let changed = kept.as_ref() != Some(position);
                *kept = Some(position.clone());
                return changed;
            }
            ClientEvent::Subscribed {
                room,
                reference: Some(_),
                position,
                ..
            } => (room, position.clone()),
            ClientEvent::RoomMessage {
                room,
                position: Some(position),
                ..
            }
            | ClientEvent::Subscribed {
                room,
                position: Some(position),
                ..
            } if self.rooms.contains_key(room) => (room, Some(position.clone())),
            ClientEvent::Unsubscribed { room, .. } => {
                return self.rooms.remove(room).is_some();
            }
            _ => return false,
        };
        let changed = self.rooms.get(room) != Some(&position);
        self.rooms.insert(room.clone(), position);
        changed
    }

    /// Write FILE: to a temporary file beside it, then renamed over it, so that a
    /// process killed meanwhile leaves the old state or the new one, never half.
    pub(crate) fn save(&self, path: &Path) -> Result<(), String> {
        let rooms: Map<String, Value> = self
            .rooms
            .iter()
            .map(|(room, position)| {
                let position = position.as_ref().map_or(Value::Null, Position::to_value);
                (room.clone(), position)
            })
            .collect();
        let mut state = json!({ "rooms": rooms });
        if let Some(streams) = self.streams.to_value() {
            state["streams"] = streams;
        }
        let text = state.to_string();
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|error| format!("cannot write --state {}: {error}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesa_tokio::Message;
    use mesa_tokio::recovery::Personal;

    #[test]
    fn a_state_round_trips_and_follows_the_rooms() {
        let mut state =
            State::parse(r#"{"rooms":{"a":{"epoch":"e","offset":3},"b":null}}"#).expect("a state");
        assert_eq!(
            state.rooms_with(&["c".to_owned(), "a".to_owned()]),
            [
                (
                    "a".to_owned(),
                    Some(Position {
                        epoch: "e".into(),
                        offset: 3
                    })
                ),
                ("b".to_owned(), None),
                ("c".to_owned(), None),
            ]
        );
        let moved = state.follow(&ClientEvent::RoomMessage {
            room: "b".into(),
            message: Message::dispatch("M", json!({})),
            position: Some(Position {
                epoch: "f".into(),
                offset: 9,
            }),
        });
        assert!(moved);
        let unchanged = state.follow(&ClientEvent::RoomMessage {
            room: "c".into(),
            message: Message::dispatch("M", json!({})),
            position: None,
        });
        assert!(!unchanged);
        // A room the server put the client in is not the client's to restore.
        let by_server = state.follow(&ClientEvent::RoomMessage {
            room: "team".into(),
            message: Message::dispatch("M", json!({})),
            position: Some(Position {
                epoch: "f".into(),
                offset: 1,
            }),
        });
        assert!(!by_server);
        let streamed = state.follow(&ClientEvent::StreamPosition {
            stream: Personal::User,
            position: Position {
                epoch: "u".into(),
                offset: 4,
            },
        });
        assert!(streamed);
        assert_eq!(state.streams().user.as_ref().map(|p| p.offset), Some(4));
        let dir = std::env::temp_dir().join(format!("mesa-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), state);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(State::parse(r#"{"rooms":{"a":{"offset":3}}}"#).is_none());
        assert_eq!(
            State::load(Path::new("/nonexistent/state.json")).unwrap(),
            State::default()
        );
    }
}
