//! The recoverable rooms a replica has members in, as a state machine of its own
//! (driven by the [`Replica`](super::Replica), like its rounds of sends): each
//! room's messages are forwarded in the stream's order, every offset once, holes
//! repaired from the stream; each member's position is kept, so a member gets
//! exactly the messages after the position it starts from, once.
//!
//! A room's channel is the only way its messages reach this replica's members (the
//! publisher's own included): the script that numbers a message publishes it, so
//! the channel's order is the stream's. What the channel lost (before its
//! subscription was confirmed, or while the link to Redis was down) is read from the
//! stream once the subscription is confirmed (again); an offset that comes ahead of
//! the next one expected is held while the hole is read.
//!
//! Every member starts with a read of the stream: one that reports no position (an
//! old client the server put in the room, or an extended one subscribing afresh)
//! reads only where the stream stands, made as it joins (before anything this
//! replica publishes after the join: commands run in order), or, when the link is
//! down, as it comes back (nobody can tell the room's position before); it gets
//! every message after that. One that reports a position (a resume) reads the stream
//! after it: the read replays what it missed (all of it, or nothing and `recovered:
//! false`). Either way it hears nothing live until its read is answered, and is live
//! from the read's last offset on (messages up to it skipped, later ones delivered).
//! A read may answer behind what the channel forwarded meanwhile (the read's reply
//! and the channel come on two connections): the member reads again from where the
//! first read ended.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::hub::ConnId;
use crate::recovery::{History, Position};
use crate::rooms::{RefusalCode, RoomNotice, RoomRefusal};
use crate::wire::Message;

use super::command::RedisValue;

/// Messages held ahead of a hole at most, per room: past it the hole is given up
/// (its extended members told `recovered: false`).
pub(super) const MAX_HELD: usize = 1024;

/// Subscribes of one member to one room awaiting their answer at most (a client
/// that sends more while its first read waits, say for a link, is refused).
pub(super) const MAX_UNANSWERED: usize = 4;

/// Who a read of a room's stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// The room: a hole, in the room's epoch of that number (a read made before
    /// the epoch changed counts in the old one, and is disregarded).
    Room(u64),
    /// A member starting or catching up.
    Member(ConnId),
}

/// What the machine decided.
#[derive(Debug, PartialEq)]
pub(super) enum Out {
    /// Read `room`'s stream after `after` (`None`: only where it stands).
    Read {
        room: String,
        after: Option<u64>,
        reader: Reader,
    },
    /// Deliver a room's message at `position` to `targets` (the live members that
    /// had not got it).
    Forward {
        room: String,
        position: Position,
        message: Message,
        targets: Vec<ConnId>,
    },
    /// Replay a message to one member.
    Replay {
        conn: ConnId,
        room: String,
        position: Position,
        message: Message,
    },
    /// Tell one (extended) member.
    Notice { conn: ConnId, notice: RoomNotice },
    /// A member that reported a position caught up, completely or not.
    Resumed { recovered: bool },
    /// Messages the channel lost were read from the stream.
    Repaired { messages: usize },
    /// Offsets neither the channel nor the stream had were skipped.
    Skipped { messages: usize },
}

/// How a member starts, answered once it is live.
#[derive(Debug, Clone, PartialEq)]
struct Ask {
    /// The references of the subscribes to answer (`null`: a join the server
    /// made); none for an old client, which is never told.
    references: Vec<Value>,
    /// Where it reports it was.
    since: Option<Position>,
    /// Whether what was replayed so far is all it missed (`None`: nothing asked).
    recovered: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
enum Member {
    /// Waiting for a link to read the stream on.
    Waiting(Ask),
    /// Its read is out.
    Reading(Ask),
    /// Delivered through this offset of the room's epoch.
    Live { delivered: u64 },
}

#[derive(Debug, Default)]
struct Room {
    /// The link of the room's instance is up (reads can be made).
    linked: bool,
    /// The channel's subscription was confirmed before the room knew where its
    /// stream stands, or while its read was out: what the channel missed before must
    /// be read once it knows.
    repair_due: bool,
    /// The stream's epoch, once a read told it.
    epoch: Option<String>,
    /// The next offset to forward, once a read told it.
    next: Option<u64>,
    /// Messages that came ahead of `next`, by offset.
    held: BTreeMap<u64, Message>,
    /// The epoch of the held messages while the room's is unknown (once it is
    /// known, they are all of it): messages of an epoch Redis since lost must not
    /// pass for the same offsets of the next one.
    held_epoch: Option<String>,
    /// A read for the room (a hole) is out.
    reading: bool,
    /// Epochs seen since the room opened here: what a read of the room is counted
    /// in.
    generation: u64,
    /// Every member here, in order: their reads and notices go out in the same
    /// order every run (the simulator's seeded runs repeat exactly).
    members: BTreeMap<ConnId, Member>,
}

/// The recoverable rooms with a member here.
#[derive(Debug, Default)]
pub(super) struct Streams {
    rooms: HashMap<String, Room>,
    out: Vec<Out>,
}

impl Streams {
    /// Take what was decided.
    pub(super) fn drain(&mut self) -> std::vec::Drain<'_, Out> {
        self.out.drain(..)
    }

    /// `room` got its first member here, its instance's link up or not: it is
    /// tracked until its last one leaves.
    pub(super) fn open(&mut self, room: &str, linked: bool) {
        self.rooms.entry(room.to_owned()).or_default().linked = linked;
    }

    /// `room` lost its last member here.
    pub(super) fn close(&mut self, room: &str) {
        self.rooms.remove(room);
    }

    /// Connection `conn` joined `room`, or subscribed again: `answer` is the
    /// reference of an extended connection's subscribe (`null` for a join the
    /// server made), `None` for an old client, and `since` the position it resumes
    /// from. A new member is answered once its read told where it stands; a live
    /// one at once.
    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        room: &str,
        answer: Option<Value>,
        since: Option<Position>,
    ) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        match state.members.get_mut(&conn) {
            Some(Member::Waiting(ask) | Member::Reading(ask)) => {
                let Some(reference) = answer else {
                    return;
                };
                if ask.references.len() < MAX_UNANSWERED {
                    return ask.references.push(reference);
                }
                let reason = "earlier subscribes to this room await their answer";
                let refusal = RoomRefusal::new(RefusalCode::TooManyRequests, reason);
                let notice = RoomNotice::refused(room.to_owned(), reference, refusal);
                self.out.push(Out::Notice { conn, notice });
            }
            Some(Member::Live { delivered }) => {
                let Some(reference) = answer else {
                    return;
                };
                let position = state.epoch.clone().map(|epoch| Position {
                    epoch,
                    offset: *delivered,
                });
                // Live on this connection: nothing was missed since `delivered`.
                let recovered = since.map(|since| Some(&since) == position.as_ref());
                let notice = RoomNotice::Subscribed {
                    room: room.to_owned(),
                    reference,
                    position,
                    recovered,
                };
                self.out.push(Out::Notice { conn, notice });
            }
            None => {
                let ask = Ask {
                    references: answer.into_iter().collect(),
                    recovered: since.as_ref().map(|_| true),
                    since,
                };
                state.members.insert(conn, Member::Waiting(ask));
                self.start_members(room);
            }
        }
    }

    /// Member `conn` left `room` (or closed).
    pub(super) fn leave(&mut self, conn: ConnId, room: &str) {
        if let Some(state) = self.rooms.get_mut(room) {
            state.members.remove(&conn);
        }
    }

    /// The link of these rooms opened (again): the members waiting for it read.
    pub(super) fn linked(&mut self, mut on_link: impl FnMut(&str) -> bool) {
        let mut rooms: Vec<String> = self
            .rooms
            .keys()
            .filter(|room| on_link(room))
            .cloned()
            .collect();
        // In a stable order, so that a seeded run repeats exactly.
        rooms.sort_unstable();
        for room in rooms {
            if let Some(state) = self.rooms.get_mut(&room) {
                state.linked = true;
            }
            self.start_members(&room);
        }
    }

    /// The subscription to `room`'s channel is confirmed (on a new link, or for a
    /// new room): what the channel missed before is read.
    pub(super) fn subscribed(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        state.linked = true;
        state.repair_due = true;
        self.start_members(room);
        self.repair_if_due(room);
    }

    /// The link of these rooms failed: their reads are gone, and their channels
    /// until they are subscribed again. Members keep their positions; those that
    /// were reading wait for the next link.
    pub(super) fn unsubscribed(&mut self, mut on_link: impl FnMut(&str) -> bool) {
        for (room, state) in self.rooms.iter_mut() {
            if !on_link(room) {
                continue;
            }
            state.linked = false;
            state.reading = false;
            state.repair_due = false;
            for member in state.members.values_mut() {
                if let Member::Reading(ask) = member {
                    *member = Member::Waiting(ask.clone());
                }
            }
        }
    }

    /// A message of `room` at `position` came on its channel.
    pub(super) fn arrived(&mut self, room: &str, position: Position, message: Message) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        if state
            .epoch
            .as_ref()
            .is_some_and(|epoch| *epoch != position.epoch)
        {
            // Redis lost the stream's meta record: a new epoch, from offset 1.
            Self::new_epoch(&mut self.out, room, state, position.epoch.clone());
        }
        if state.next.is_some_and(|next| position.offset < next) {
            return;
        }
        if state.epoch.is_none() && state.held_epoch.as_ref() != Some(&position.epoch) {
            // A channel's messages come in the order they were appended: the held
            // ones are of an epoch Redis lost since.
            state.held.clear();
            state.held_epoch = Some(position.epoch.clone());
        }
        // Before the room knows where its stream stands, the read that tells it
        // decides what was before. Held messages are bounded: past the bound the
        // oldest go, to be read from the stream as a hole if they are needed.
        state.held.insert(position.offset, message);
        while state.next.is_none() && state.held.len() > MAX_HELD {
            state.held.pop_first();
        }
        self.flush(room);
    }

    /// A read of `room`'s stream after `after` for `reader` was answered.
    pub(super) fn answered(
        &mut self,
        room: &str,
        after: Option<u64>,
        reader: Reader,
        history: History,
    ) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        if let Reader::Room(generation) = reader {
            state.reading = false;
            if generation != state.generation {
                return self.repair_if_due(room);
            }
        }
        match &state.epoch {
            None => {
                state.epoch = Some(history.epoch.clone());
                state.next = Some(history.top + 1);
                if state.held_epoch.take().as_ref() == Some(&history.epoch) {
                    state.held.retain(|offset, _| *offset > history.top);
                } else if !state.held.is_empty() {
                    // Held from another epoch than the read's: from before the
                    // read's (Redis lost them), or after it (the read ran before
                    // Redis lost the stream). Either way the stream is read again
                    // from the read's end: the next epoch is found there.
                    state.held.clear();
                    state.repair_due = true;
                }
            }
            Some(epoch) if *epoch != history.epoch => {
                Self::new_epoch(&mut self.out, room, state, history.epoch.clone());
                if let Reader::Room(_) = reader {
                    // The read counted in the old epoch: the new one is read from its
                    // start, all of which came after the members joined.
                    return self.repair_if_due(room);
                }
            }
            Some(_) => {}
        }
        match reader {
            Reader::Room(_) => self.repair(room, after, history),
            Reader::Member(conn) => self.catch_up(room, conn, history),
        }
        self.flush(room);
        self.repair_if_due(room);
    }

    /// Start the reads of the members waiting, when the room's link is up.
    fn start_members(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        if !state.linked {
            return;
        }
        let mut reads = Vec::new();
        for (conn, member) in state.members.iter_mut() {
            if let Member::Waiting(ask) = member {
                reads.push((*conn, ask.since.as_ref().map(|since| since.offset)));
                *member = Member::Reading(ask.clone());
            }
        }
        for (conn, after) in reads {
            self.push_read(room, after, Reader::Member(conn));
        }
    }

    /// Read what the channel may have missed, once the room knows where its stream
    /// stands and no read of the room is out.
    fn repair_if_due(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(next) = state.next else {
            return;
        };
        if state.repair_due && state.linked && !state.reading {
            state.repair_due = false;
            state.reading = true;
            let reader = Reader::Room(state.generation);
            self.push_read(room, Some(next - 1), reader);
        }
    }

    /// The room read what it missed after `after`: hold it to be forwarded; what
    /// the stream no longer had is lost, and its extended members are told.
    fn repair(&mut self, room: &str, after: Option<u64>, history: History) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(next) = state.next else {
            return;
        };
        if after.is_none() {
            return;
        }
        let mut repaired = 0;
        for (offset, message) in history.entries {
            if offset >= next && !state.held.contains_key(&offset) {
                state.held.insert(offset, message);
                repaired += 1;
            }
        }
        if repaired > 0 {
            self.out.push(Out::Repaired { messages: repaired });
        }
        let first = state.held.keys().next().copied();
        let missing = match first {
            Some(first) => first > next,
            None => history.top >= next,
        };
        if missing {
            let skip_to = first.unwrap_or(history.top + 1);
            Self::lost(&mut self.out, room, state, skip_to - 1, false);
            state.next = Some(skip_to);
            let messages = usize::try_from(skip_to - next).unwrap_or(usize::MAX);
            self.out.push(Out::Skipped { messages });
        }
    }

    /// Member `conn` read its room's stream: replay, then live or read on.
    fn catch_up(&mut self, room: &str, conn: ConnId, history: History) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(Member::Reading(ask)) = state.members.get(&conn) else {
            return;
        };
        let mut ask = ask.clone();
        let resume = history.resume(ask.since.as_ref());
        // A member told `recovered: false` gets nothing replayed: a read that went
        // on behind the channel only finds where it stands.
        let replay = match ask.recovered {
            Some(false) => Vec::new(),
            _ => resume.replay,
        };
        for (offset, message) in replay {
            let position = Position {
                epoch: history.epoch.clone(),
                offset,
            };
            self.out.push(Out::Replay {
                conn,
                room: room.to_owned(),
                position,
                message,
            });
        }
        ask.recovered = match (ask.recovered, resume.recovered) {
            (Some(so_far), Some(now)) => Some(so_far && now),
            (so_far, _) => so_far,
        };
        let position = Position {
            epoch: history.epoch,
            offset: history.top,
        };
        let forwarded = state.next.unwrap_or(1) - 1;
        if forwarded > history.top {
            // The channel went past the read: read on from its end.
            ask.since = Some(position);
            state.members.insert(conn, Member::Reading(ask));
            return self.push_read(room, Some(history.top), Reader::Member(conn));
        }
        state.members.insert(
            conn,
            Member::Live {
                delivered: history.top,
            },
        );
        if let Some(recovered) = ask.recovered {
            self.out.push(Out::Resumed { recovered });
        }
        for reference in ask.references {
            let notice = RoomNotice::Subscribed {
                room: room.to_owned(),
                reference,
                position: Some(position.clone()),
                recovered: ask.recovered,
            };
            self.out.push(Out::Notice { conn, notice });
        }
    }

    /// Forward what was held from the next offset on, while it is contiguous; ask
    /// for a hole once (or give it up when too much waits behind it).
    fn flush(&mut self, room: &str) {
        let Some(state) = self.rooms.get_mut(room) else {
            return;
        };
        let (Some(epoch), Some(mut next)) = (state.epoch.clone(), state.next) else {
            return;
        };
        loop {
            state.held.retain(|offset, _| *offset >= next);
            match state.held.first_key_value() {
                Some((offset, _)) if *offset == next => {
                    let Some((_, message)) = state.held.pop_first() else {
                        break;
                    };
                    let targets = state
                        .members
                        .iter_mut()
                        .filter_map(|(conn, member)| match member {
                            Member::Live { delivered } if *delivered < next => {
                                *delivered = next;
                                Some(*conn)
                            }
                            _ => None,
                        })
                        .collect();
                    let position = Position {
                        epoch: epoch.clone(),
                        offset: next,
                    };
                    self.out.push(Out::Forward {
                        room: room.to_owned(),
                        position,
                        message,
                        targets,
                    });
                    next += 1;
                }
                Some((offset, _)) if state.held.len() > MAX_HELD => {
                    let offset = *offset;
                    Self::lost(&mut self.out, room, state, offset - 1, false);
                    let messages = usize::try_from(offset - next).unwrap_or(usize::MAX);
                    self.out.push(Out::Skipped { messages });
                    next = offset;
                }
                Some(_) if !state.reading && state.linked => {
                    state.reading = true;
                    state.next = Some(next);
                    let reader = Reader::Room(state.generation);
                    return self.push_read(room, Some(next - 1), reader);
                }
                _ => break,
            }
        }
        state.next = Some(next);
    }

    /// The room's stream changed epoch (Redis lost its meta record): its live
    /// members lost what they had not got, and are told so; the new epoch is
    /// forwarded from its first offset.
    fn new_epoch(out: &mut Vec<Out>, room: &str, state: &mut Room, epoch: String) {
        state.epoch = Some(epoch);
        state.next = Some(1);
        state.held.clear();
        state.generation += 1;
        state.repair_due = true;
        Self::lost(out, room, state, 0, true);
    }

    /// What came through `through` is lost to the room's live members (those that
    /// had not got it, unless `all`): they go on from there, and the extended ones
    /// are told (`mesa:subscribed` without a reference, `recovered: false`).
    fn lost(out: &mut Vec<Out>, room: &str, state: &mut Room, through: u64, all: bool) {
        let Some(epoch) = state.epoch.clone() else {
            return;
        };
        for (conn, member) in state.members.iter_mut() {
            let Member::Live { delivered } = member else {
                continue;
            };
            if *delivered >= through && !all {
                continue;
            }
            *delivered = through;
            let notice = RoomNotice::Subscribed {
                room: room.to_owned(),
                reference: Value::Null,
                position: Some(Position {
                    epoch: epoch.clone(),
                    offset: through,
                }),
                recovered: Some(false),
            };
            out.push(Out::Notice {
                conn: *conn,
                notice,
            });
        }
    }

    fn push_read(&mut self, room: &str, after: Option<u64>, reader: Reader) {
        self.out.push(Out::Read {
            room: room.to_owned(),
            after,
            reader,
        });
    }
}

/// Read the answer of a [`StreamRead`](super::Command::StreamRead):
/// `{epoch, top, [[id, [field, value, ...]], ...]}`, each entry's id its offset
/// (`O-0`) and its field `m` the message. An entry that is not a message is
/// skipped (the replay then lacks it, and is reported incomplete).
pub(super) fn history(value: Option<RedisValue>) -> Option<History> {
    let RedisValue::Array(mut parts) = value? else {
        return None;
    };
    if parts.len() != 3 {
        return None;
    }
    let entries = parts.pop()?;
    let top = match parts.pop()? {
        RedisValue::Int(top) => u64::try_from(top).ok()?,
        _ => return None,
    };
    let RedisValue::Text(epoch) = parts.pop()? else {
        return None;
    };
    let RedisValue::Array(entries) = entries else {
        return None;
    };
    let entries = entries.into_iter().filter_map(entry).collect();
    Some(History {
        epoch,
        top,
        entries,
    })
}

/// One `XRANGE` entry: its offset and message.
fn entry(value: RedisValue) -> Option<(u64, Message)> {
    let RedisValue::Array(mut parts) = value else {
        return None;
    };
    let fields = parts.pop()?;
    let RedisValue::Text(id) = parts.pop()? else {
        return None;
    };
    let offset = id.split_once('-')?.0.parse().ok()?;
    let RedisValue::Array(fields) = fields else {
        return None;
    };
    let text = fields.chunks(2).find_map(|pair| match pair {
        [RedisValue::Text(name), RedisValue::Text(text)] if name == "m" => Some(text),
        _ => None,
    })?;
    let value = serde_json::from_str(text).ok()?;
    Some((offset, Message::from_value(value).ok()?))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(offset: u64) -> Position {
        Position {
            epoch: "e".into(),
            offset,
        }
    }

    fn history(top: u64, offsets: &[u64]) -> History {
        History {
            epoch: "e".into(),
            top,
            entries: offsets
                .iter()
                .map(|o| (*o, Message::dispatch("M", json!({ "n": o }))))
                .collect(),
        }
    }

    fn notices(streams: &mut Streams) -> Vec<RoomNotice> {
        streams
            .drain()
            .filter_map(|out| match out {
                Out::Notice { notice, .. } => Some(notice),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn subscribes_waiting_for_a_link_are_bounded() {
        let mut streams = Streams::default();
        streams.open("r", false);
        for reference in 0..MAX_UNANSWERED as u64 + 1 {
            streams.subscribe(ConnId(1), "r", Some(json!(reference)), Some(at(3)));
        }
        let refused = notices(&mut streams);
        assert!(
            matches!(&refused[..], [RoomNotice::Refused(r)] if r.reference == json!(4)
                && r.refusal.code == RefusalCode::TooManyRequests),
            "{refused:?}"
        );
        // The link comes: one read, answered to all four.
        streams.linked(|_| true);
        let reads: Vec<Out> = streams.drain().collect();
        assert_eq!(
            reads,
            [Out::Read {
                room: "r".into(),
                after: Some(3),
                reader: Reader::Member(ConnId(1)),
            }]
        );
        streams.answered("r", Some(3), Reader::Member(ConnId(1)), history(5, &[4, 5]));
        let out: Vec<Out> = streams.drain().collect();
        let replayed = out
            .iter()
            .filter(|o| matches!(o, Out::Replay { .. }))
            .count();
        let answers = out
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Out::Notice {
                        notice: RoomNotice::Subscribed {
                            recovered: Some(true),
                            ..
                        },
                        ..
                    }
                )
            })
            .count();
        assert_eq!((replayed, answers), (2, 4));
    }

    /// Found by the recovery trials: a resume told `recovered: false` whose read the
    /// channel had gone past read on, and replayed what the second read found.
    #[test]
    fn an_incomplete_resume_replays_nothing_even_when_it_reads_on() {
        let mut streams = Streams::default();
        streams.open("r", true);
        // The room forwards up to 9 already.
        streams.subscribe(ConnId(1), "r", Some(json!(1)), None);
        streams.answered("r", None, Reader::Member(ConnId(1)), history(9, &[]));
        streams.drain().for_each(drop);
        // A resume from 2; the stream keeps 6 to 8 only, and 9 came on the channel.
        streams.subscribe(ConnId(2), "r", Some(json!(2)), Some(at(2)));
        streams.drain().for_each(drop);
        streams.answered(
            "r",
            Some(2),
            Reader::Member(ConnId(2)),
            history(8, &[6, 7, 8]),
        );
        let again: Vec<Out> = streams.drain().collect();
        assert!(
            again.iter().all(|o| !matches!(o, Out::Replay { .. })),
            "{again:?}"
        );
        assert!(matches!(
            &again[..],
            [Out::Read {
                after: Some(8),
                reader: Reader::Member(ConnId(2)),
                ..
            }]
        ));
        streams.answered("r", Some(8), Reader::Member(ConnId(2)), history(9, &[9]));
        let out: Vec<Out> = streams.drain().collect();
        assert!(
            out.iter().all(|o| !matches!(o, Out::Replay { .. })),
            "{out:?}"
        );
        assert!(out.iter().any(|o| matches!(
            o,
            Out::Notice { notice: RoomNotice::Subscribed { recovered: Some(false), position: Some(p), .. }, .. }
                if p.offset == 9
        )));
    }

    #[test]
    fn a_hole_the_stream_lost_is_told_and_skipped() {
        let mut streams = Streams::default();
        streams.open("r", true);
        streams.subscribe(ConnId(1), "r", Some(json!(1)), None);
        streams.answered("r", None, Reader::Member(ConnId(1)), history(2, &[]));
        streams.drain().for_each(drop);
        // Offset 6 comes; 3 to 5 are read, and the stream kept only 5.
        streams.arrived("r", at(6), Message::dispatch("M", json!({})));
        let read: Vec<Out> = streams.drain().collect();
        assert!(matches!(
            &read[..],
            [Out::Read {
                after: Some(2),
                reader: Reader::Room(0),
                ..
            }]
        ));
        streams.answered("r", Some(2), Reader::Room(0), history(6, &[5, 6]));
        let out: Vec<Out> = streams.drain().collect();
        let lost = out.iter().any(|o| {
            matches!(o, Out::Notice { notice: RoomNotice::Subscribed { recovered: Some(false), position: Some(p), .. }, .. } if p.offset == 4)
        });
        let forwarded: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Out::Forward {
                    position, targets, ..
                } if targets == &[ConnId(1)] => Some(position.offset),
                _ => None,
            })
            .collect();
        assert!(lost, "{out:?}");
        assert_eq!(forwarded, [5, 6]);
    }

    /// Found by the simulator: a message held before the room knew its epoch, of
    /// an epoch Redis then lost, was forwarded as the next epoch's message at its
    /// offset, and the real one skipped.
    #[test]
    fn messages_held_from_a_lost_epoch_are_not_forwarded_as_the_next_one_s() {
        let mut streams = Streams::default();
        streams.open("r", true);
        streams.subscribe(ConnId(1), "r", None, None);
        streams.drain().for_each(drop);
        // Offset 3 of epoch "old" comes before the read; Redis loses the stream.
        let old = Position {
            epoch: "old".into(),
            offset: 3,
        };
        streams.arrived("r", old, Message::dispatch("OLD", json!({})));
        streams.answered("r", None, Reader::Member(ConnId(1)), history(0, &[]));
        streams.arrived("r", at(1), Message::dispatch("M", json!({ "n": 1 })));
        streams.arrived("r", at(2), Message::dispatch("M", json!({ "n": 2 })));
        streams.arrived("r", at(3), Message::dispatch("M", json!({ "n": 3 })));
        let forwarded: Vec<(u64, String)> = streams
            .drain()
            .filter_map(|o| match o {
                Out::Forward {
                    position, message, ..
                } => Some((position.offset, message.t.unwrap_or_default())),
                _ => None,
            })
            .collect();
        let m = |n: u64| (n, "M".to_owned());
        assert_eq!(forwarded, [m(1), m(2), m(3)]);
    }
}
