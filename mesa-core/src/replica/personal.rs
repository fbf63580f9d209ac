//! Which connections here take their id's sends and the broadcasts from streams
//! (see [`Personal`]): the members of each personal and broadcast stream, which the
//! hub's room table does not hold, since they are no rooms a client asked for (no
//! presence, no room limit, never listed).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::hub::ConnId;
use crate::recovery::{Personal, Position};

use super::job::Job;

/// Where a connection that resumes its id's stream is: its stored messages (the
/// sync) wait for the resume's answer, since a complete resume replays them (every
/// message stored for an id was appended to its stream first).
#[derive(Debug)]
pub(super) enum Resuming {
    /// The stream is being read; the load was not asked yet.
    Reading,
    /// The stream answered whether the resume was complete; the load was not asked
    /// yet.
    Answered(bool),
    /// The load was asked (on this instance) and waits for the answer.
    Parked(usize, Job),
}

/// The members here of the personal and broadcast streams.
#[derive(Debug, Default)]
pub(super) struct PersonalTable {
    /// Each stream's members here (ordered: a new link subscribes to their channels
    /// in the same order every time, which the simulator's runs rely on).
    members: BTreeMap<String, BTreeSet<ConnId>>,
    /// The streams each connection is in: its id's, the broadcast's, or both.
    of: HashMap<ConnId, Vec<String>>,
    /// The position an extended connection reported in its id's stream, kept from
    /// its opt-in until its id is known.
    since: HashMap<ConnId, Option<Position>>,
    /// Connections that reported a position in their id's stream, until their
    /// stored messages were decided.
    resuming: HashMap<ConnId, Resuming>,
    /// Connections that got a broadcast the legacy way (before they opted in: a
    /// server that lets unauthenticated connections hear broadcasts): a resume of
    /// the broadcast stream would give them those twice.
    plain_broadcasts: HashSet<ConnId>,
}

impl PersonalTable {
    /// Keep the position `conn` reported in its id's stream until it authenticates.
    pub(super) fn reported(&mut self, conn: ConnId, since: Option<Position>) {
        self.since.insert(conn, since);
    }

    /// The position `conn` reported in its id's stream, once: a later id (a
    /// re-authentication as another) starts from where that id's stream stands.
    pub(super) fn take_reported(&mut self, conn: ConnId) -> Option<Position> {
        let since = self.since.remove(&conn).flatten();
        if since.is_some() {
            self.resuming.insert(conn, Resuming::Reading);
        }
        since
    }

    /// The load of `conn`'s stored messages (`job`, for instance `shard`), as asked:
    /// given back with whether the resume was complete once the stream answered,
    /// parked until it does, given back with `None` when `conn` does not resume.
    pub(super) fn load(
        &mut self,
        conn: ConnId,
        shard: usize,
        job: Job,
    ) -> Option<(Job, Option<bool>)> {
        match self.resuming.remove(&conn) {
            None => Some((job, None)),
            Some(Resuming::Answered(complete)) => Some((job, Some(complete))),
            Some(_) => {
                self.resuming.insert(conn, Resuming::Parked(shard, job));
                None
            }
        }
    }

    /// `conn`'s id's stream answered its resume (`complete` or not): the parked
    /// load, if it was asked already.
    pub(super) fn answered(&mut self, conn: ConnId, complete: bool) -> Option<(usize, Job)> {
        match self.resuming.remove(&conn)? {
            Resuming::Parked(shard, job) => Some((shard, job)),
            _ => {
                self.resuming.insert(conn, Resuming::Answered(complete));
                None
            }
        }
    }

    /// Put `conn` in `stream`: whether it is the stream's first member here (`None`
    /// when it was in it already).
    pub(super) fn join(&mut self, conn: ConnId, stream: &str) -> Option<bool> {
        let members = self.members.entry(stream.to_owned()).or_default();
        if !members.insert(conn) {
            return None;
        }
        self.of.entry(conn).or_default().push(stream.to_owned());
        Some(members.len() == 1)
    }

    /// Take `conn` out of `stream`: whether the stream has no member here any more
    /// (`None` when it was not in it).
    pub(super) fn leave(&mut self, conn: ConnId, stream: &str) -> Option<bool> {
        let members = self.members.get_mut(stream)?;
        if !members.remove(&conn) {
            return None;
        }
        let empty = members.is_empty();
        if empty {
            self.members.remove(stream);
        }
        if let Some(streams) = self.of.get_mut(&conn) {
            streams.retain(|s| s != stream);
            if streams.is_empty() {
                self.of.remove(&conn);
            }
        }
        Some(empty)
    }

    /// `conn` got a broadcast the legacy way.
    pub(super) fn broadcast_plain(&mut self, conn: ConnId) {
        self.plain_broadcasts.insert(conn);
    }

    /// Whether `conn` got a broadcast the legacy way (asked once, as it opts in).
    pub(super) fn took_plain_broadcasts(&mut self, conn: ConnId) -> bool {
        self.plain_broadcasts.remove(&conn)
    }

    /// A closing `conn`'s streams; it is forgotten.
    pub(super) fn close(&mut self, conn: ConnId) -> Vec<String> {
        self.since.remove(&conn);
        self.plain_broadcasts.remove(&conn);
        self.resuming.remove(&conn);
        self.of.get(&conn).cloned().unwrap_or_default()
    }

    /// The stream of kind `kind` `conn` is in, if any.
    pub(super) fn stream_of(&self, conn: ConnId, kind: Personal) -> Option<&str> {
        self.of
            .get(&conn)?
            .iter()
            .map(String::as_str)
            .find(|stream| Personal::of_stream(stream) == Some(kind))
    }

    /// Whether `conn` takes the sends of kind `kind` from its stream (and so skips
    /// them elsewhere).
    pub(super) fn takes(&self, conn: ConnId, kind: Personal) -> bool {
        self.stream_of(conn, kind).is_some()
    }

    /// Every stream with a member here.
    pub(super) fn streams(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_and_go_by_stream() {
        let mut table = PersonalTable::default();
        let (a, b) = (ConnId(1), ConnId(2));
        let alice = Personal::User.stream("alice");
        let all = Personal::Broadcast.stream("");
        assert_eq!(table.join(a, &alice), Some(true));
        assert_eq!(table.join(b, &alice), Some(false));
        assert_eq!(table.join(b, &alice), None);
        assert_eq!(table.join(a, &all), Some(true));
        assert!(table.takes(a, Personal::Broadcast) && !table.takes(b, Personal::Broadcast));
        assert_eq!(table.stream_of(b, Personal::User), Some(alice.as_str()));
        assert_eq!(table.close(a), vec![alice.clone(), all.clone()]);
        assert_eq!(table.leave(a, &alice), Some(false));
        assert_eq!(table.leave(a, &all), Some(true));
        assert_eq!(table.leave(a, &all), None);
        assert_eq!(table.streams().collect::<Vec<_>>(), [alice.as_str()]);
        assert_eq!(table.leave(b, &alice), Some(true));
        assert!(table.of.is_empty() && table.members.is_empty());
    }

    #[test]
    fn a_reported_position_is_taken_once() {
        let mut table = PersonalTable::default();
        let position = Position {
            epoch: "e".into(),
            offset: 2,
        };
        table.reported(ConnId(1), Some(position.clone()));
        table.reported(ConnId(2), None);
        assert_eq!(table.take_reported(ConnId(1)), Some(position));
        assert_eq!(table.take_reported(ConnId(1)), None);
        assert_eq!(table.take_reported(ConnId(2)), None);
    }
}
