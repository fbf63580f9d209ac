//! Which local connections are in which rooms, which connections opted in to
//! rooms (they receive a room's messages with their room, see [`crate::rooms`]),
//! and which members asked for the room's presence notices.
//! Every lookup is by room or by connection: no operation scans every room.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::hub::{Action, ConnId};
use crate::recovery::Position;
use crate::rooms::{PresenceChange, RefusalCode, RoomRefusal, room_frame};
use crate::wire::Message;

/// The room memberships of one server's connections.
#[derive(Debug, Default)]
pub struct RoomTable {
    members: HashMap<String, BTreeSet<ConnId>>,
    joined: HashMap<ConnId, BTreeSet<String>>,
    extended: HashSet<ConnId>,
    /// Per room, the extended members that hear its `mesa:join` and `mesa:leave`.
    watchers: HashMap<String, BTreeSet<ConnId>>,
    /// Memberships over all rooms, kept as they change.
    memberships: usize,
}

/// What a join changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The connection was in the room already: nothing changed.
    pub already: bool,
    /// The room had no member here before (a cluster replica now subscribes to it).
    pub first_here: bool,
    /// The replica answers the subscribe itself (`mesa:subscribed` with the
    /// position of a recoverable room), once it read the room's stream: the caller
    /// does not.
    pub deferred: bool,
}

impl RoomTable {
    /// `conn` opted in to rooms.
    pub fn extend(&mut self, conn: ConnId) {
        self.extended.insert(conn);
    }

    /// Whether `conn` opted in to rooms.
    pub fn is_extended(&self, conn: ConnId) -> bool {
        self.extended.contains(&conn)
    }

    /// Put `conn` in `room`, unless it is in `max` rooms already.
    pub fn join(&mut self, conn: ConnId, room: &str, max: usize) -> Result<Joined, RoomRefusal> {
        let rooms = self.joined.entry(conn).or_default();
        if rooms.contains(room) {
            return Ok(Joined {
                already: true,
                first_here: false,
                deferred: false,
            });
        }
        if rooms.len() >= max {
            if rooms.is_empty() {
                self.joined.remove(&conn);
            }
            let reason = format!("a connection is in {max} rooms at most");
            return Err(RoomRefusal::new(RefusalCode::TooManyRooms, reason));
        }
        rooms.insert(room.to_owned());
        self.memberships += 1;
        let members = self.members.entry(room.to_owned()).or_default();
        members.insert(conn);
        Ok(Joined {
            already: false,
            first_here: members.len() == 1,
            deferred: false,
        })
    }

    /// Take `conn` out of `room`: `None` when it was not in it, else whether the
    /// room has no member here any more.
    pub fn leave(&mut self, conn: ConnId, room: &str) -> Option<bool> {
        let rooms = self.joined.get_mut(&conn)?;
        if !rooms.remove(room) {
            return None;
        }
        if rooms.is_empty() {
            self.joined.remove(&conn);
        }
        Some(self.forget(conn, room))
    }

    /// Take a closing `conn` out of every room; returns the rooms left with no member
    /// here.
    pub fn leave_all(&mut self, conn: ConnId) -> Vec<String> {
        self.extended.remove(&conn);
        let rooms = self.joined.remove(&conn).unwrap_or_default();
        rooms
            .into_iter()
            .filter(|room| self.forget(conn, room))
            .collect()
    }

    /// Whether `conn`, a member of `room`, hears the room's presence notices (`on`);
    /// only an extended connection can. Returns whether it does now.
    pub fn watch(&mut self, conn: ConnId, room: &str, on: bool) -> bool {
        let on = on && self.is_extended(conn) && self.is_member(conn, room);
        if on {
            self.watchers
                .entry(room.to_owned())
                .or_default()
                .insert(conn);
        } else {
            self.unwatch(conn, room);
        }
        on
    }

    /// The members of `room` that hear its presence notices, in connection order.
    pub fn watchers(&self, room: &str) -> impl Iterator<Item = ConnId> + '_ {
        self.watchers.get(room).into_iter().flatten().copied()
    }

    /// The notice of `change` and the members here that hear it (none: `None`).
    pub fn presence_delivery(&self, change: &PresenceChange) -> Option<(Message, Vec<ConnId>)> {
        let targets: Vec<ConnId> = self.watchers(&change.room).collect();
        (!targets.is_empty()).then(|| (change.notice().to_message(), targets))
    }

    fn unwatch(&mut self, conn: ConnId, room: &str) {
        if let Some(watchers) = self.watchers.get_mut(room) {
            watchers.remove(&conn);
            if watchers.is_empty() {
                self.watchers.remove(room);
            }
        }
    }

    /// Remove `conn` from `room`'s members; whether none is left.
    fn forget(&mut self, conn: ConnId, room: &str) -> bool {
        self.unwatch(conn, room);
        self.memberships -= 1;
        let Some(members) = self.members.get_mut(room) else {
            return true;
        };
        members.remove(&conn);
        let empty = members.is_empty();
        if empty {
            self.members.remove(room);
        }
        empty
    }

    /// The connections in `room`, in connection order.
    pub fn members(&self, room: &str) -> impl Iterator<Item = ConnId> + '_ {
        self.members.get(room).into_iter().flatten().copied()
    }

    /// Whether `conn` is in `room`.
    pub fn is_member(&self, conn: ConnId, room: &str) -> bool {
        self.joined
            .get(&conn)
            .is_some_and(|rooms| rooms.contains(room))
    }

    /// The rooms `conn` is in.
    pub fn rooms_of(&self, conn: ConnId) -> impl Iterator<Item = &str> {
        self.joined
            .get(&conn)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// The rooms with a member here.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Rooms with a member here.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no room has a member here.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Memberships here, over all rooms.
    pub fn memberships(&self) -> usize {
        self.memberships
    }

    /// What the message at `position` of recoverable `room` does to `targets`
    /// (its members here that had not got it): the extended ones get the frame with
    /// the room and the position, the others the plain dispatch.
    pub fn deliveries_at(
        &self,
        message: &Message,
        room: &str,
        position: &Position,
        targets: Vec<ConnId>,
    ) -> Vec<(Action, Vec<ConnId>)> {
        let action = Action::for_message(message);
        if action == Action::Ignore {
            return Vec::new();
        }
        let (extended, plain): (Vec<ConnId>, Vec<ConnId>) = targets
            .into_iter()
            .partition(|conn| self.extended.contains(conn));
        let with_room = match &action {
            Action::Write(_) => Action::Write(room_frame(message, room, Some(position))),
            other => other.clone(),
        };
        [(with_room, extended), (action, plain)]
            .into_iter()
            .filter(|(_, targets)| !targets.is_empty())
            .collect()
    }

    /// What `message` to `room` does to its members here: the extended ones get the
    /// frame with the room, the others the plain dispatch (each encoded once). An
    /// internal event (op 5) acts alike on both.
    pub fn deliveries(&self, message: &Message, room: &str) -> Vec<(Action, Vec<ConnId>)> {
        let (extended, plain): (Vec<ConnId>, Vec<ConnId>) = self
            .members(room)
            .partition(|conn| self.extended.contains(conn));
        let action = Action::for_message(message);
        if action == Action::Ignore {
            return Vec::new();
        }
        let with_room = match &action {
            Action::Write(_) => Action::Write(room_frame(message, room, None)),
            other => other.clone(),
        };
        [(with_room, extended), (action, plain)]
            .into_iter()
            .filter(|(_, targets)| !targets.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn joins_are_bounded_and_report_the_first_and_last_member_here() {
        let mut table = RoomTable::default();
        let (a, b) = (ConnId(1), ConnId(2));
        let first = table.join(a, "r", 2).unwrap();
        assert_eq!((first.already, first.first_here), (false, true));
        assert!(table.join(a, "r", 2).unwrap().already);
        assert!(!table.join(b, "r", 2).unwrap().first_here);
        table.join(a, "s", 2).unwrap();
        let refused = table.join(a, "t", 2).unwrap_err();
        assert_eq!(refused.code, RefusalCode::TooManyRooms);
        assert_eq!(table.memberships(), 3);
        assert_eq!(table.leave(a, "r"), Some(false));
        assert_eq!(table.leave(a, "r"), None);
        assert_eq!(table.leave(b, "r"), Some(true));
        assert_eq!(table.leave_all(a), ["s"]);
        assert!(table.is_empty() && table.memberships() == 0);
    }

    #[test]
    fn extended_members_get_the_room_and_the_others_a_plain_dispatch() {
        let mut table = RoomTable::default();
        let (old, new) = (ConnId(1), ConnId(2));
        table.join(old, "lobby", 8).unwrap();
        table.join(new, "lobby", 8).unwrap();
        table.extend(new);
        let message = Message::dispatch("CHAT", json!({"x": 1}));
        let deliveries = table.deliveries(&message, "lobby");
        assert_eq!(
            deliveries,
            [
                (
                    Action::Write(room_frame(&message, "lobby", None)),
                    vec![new]
                ),
                (Action::Write(message.encode()), vec![old]),
            ]
        );
        assert!(table.deliveries(&message, "empty").is_empty());
    }

    #[test]
    fn only_extended_members_hear_presence_until_they_leave() {
        let mut table = RoomTable::default();
        let (old, new, outside) = (ConnId(1), ConnId(2), ConnId(3));
        table.join(old, "lobby", 8).unwrap();
        table.join(new, "lobby", 8).unwrap();
        table.extend(new);
        table.extend(outside);
        assert!(
            !table.watch(old, "lobby", true),
            "an old client hears nothing new"
        );
        assert!(!table.watch(outside, "lobby", true), "only a member hears");
        assert!(table.watch(new, "lobby", true));
        let change = PresenceChange {
            room: "lobby".into(),
            id: "alice".into(),
            joined: true,
        };
        let (message, targets) = table.presence_delivery(&change).unwrap();
        assert_eq!(
            (message.t.as_deref(), targets),
            (Some("mesa:join"), vec![new])
        );
        assert!(!table.watch(new, "lobby", false));
        assert!(table.presence_delivery(&change).is_none());
        table.watch(new, "lobby", true);
        table.leave(new, "lobby");
        assert!(table.presence_delivery(&change).is_none());
    }
}
