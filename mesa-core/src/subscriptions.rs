//! A client's rooms: the subscriptions it holds (sent again on every connection that
//! carries rooms), the publishes waiting for such a connection, and the references
//! that match the server's answers to requests.
//!
//! Bookkeeping only: when a request goes out is the client session's decision
//! (`client.rs`), so this module never sees a connection.

use std::collections::VecDeque;

use serde_json::Value;

use crate::recovery::Position;
use crate::rooms::RoomRequest;
use crate::wire::Message;

/// Names one room request of a client; the server's answer (or refusal) carries it
/// back. Drawn from a counter, so no two requests on a connection share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference(u64);

impl Reference {
    /// The number sent as the request's `ref`.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Read an answer's `ref`: `None` for null (the server acted on its own) and for
    /// anything this client never sends.
    pub(crate) fn from_wire(value: &Value) -> Option<Reference> {
        value.as_u64().map(Reference)
    }

    /// The reference numbered `n`, for a fuzz target's model of the client.
    #[cfg(fuzzing)]
    pub fn from_u64(n: u64) -> Reference {
        Reference(n)
    }

    /// The request's `ref` on the wire.
    pub(crate) fn to_wire(self) -> Value {
        Value::from(self.0)
    }
}

/// A room the application subscribed to and did not leave.
#[derive(Debug)]
struct Subscription {
    room: String,
    token: Option<String>,
    /// Asked with `"presence": true`.
    presence: bool,
    /// The subscribe awaiting its answer; `None` once the server confirmed it.
    pending: Option<Reference>,
    /// In a recoverable room, the position of the last message received (or the
    /// one the server answered with): sent as `since` when the subscription is
    /// made again, to get what was missed.
    position: Option<Position>,
}

impl Subscription {
    fn request(&self) -> RoomRequest {
        RoomRequest::Subscribe {
            room: self.room.clone(),
            reference: self.pending.map_or(Value::Null, Reference::to_wire),
            token: self.token.clone(),
            presence: self.presence,
            since: self.position.clone(),
        }
    }
}

/// The subscriptions, in the order they were made, and the publishes waiting for a
/// connection that carries rooms, in the order they were made.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    held: Vec<Subscription>,
    waiting: VecDeque<(Reference, String, Message)>,
    last: u64,
}

impl Subscriptions {
    /// The rooms held, oldest first.
    pub(crate) fn rooms(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(|s| s.room.as_str())
    }

    /// How many rooms are held.
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether `room` is held.
    pub(crate) fn holds(&self, room: &str) -> bool {
        self.held.iter().any(|s| s.room == room)
    }

    /// Publishes waiting for a connection that carries rooms.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A new reference, never drawn before by this client.
    pub(crate) fn draw(&mut self) -> Reference {
        self.last += 1;
        Reference(self.last)
    }

    /// Hold `room` (with `token` for the server's authorization, and `presence`
    /// notices if asked) and return the
    /// reference its answer will carry. A subscribe that has not gone out yet
    /// (`sent_now` false) keeps the reference of one already waiting for the same
    /// room: the server will answer it once, so both callers share that answer.
    /// The caller checks the bound on held rooms.
    pub(crate) fn subscribe(
        &mut self,
        room: &str,
        token: Option<&str>,
        presence: bool,
        sent_now: bool,
    ) -> Reference {
        let token = token.map(str::to_owned);
        let index = match self.held.iter().position(|s| s.room == room) {
            Some(index) => index,
            None => {
                self.held.push(Subscription {
                    room: room.to_owned(),
                    token: None,
                    presence,
                    pending: None,
                    position: None,
                });
                self.held.len() - 1
            }
        };
        let shared = self.held[index].pending.filter(|_| !sent_now);
        let reference = shared.unwrap_or_else(|| self.draw());
        let held = &mut self.held[index];
        held.token = token;
        held.presence = presence;
        held.pending = Some(reference);
        reference
    }

    /// The position of the held `room`, for the next subscribe to resume from.
    pub(crate) fn set_position(&mut self, room: &str, position: Position) {
        if let Some(held) = self.held.iter_mut().find(|s| s.room == room) {
            held.position = Some(position);
        }
    }

    /// Each held room with its position (for a client that keeps them across
    /// restarts), oldest first.
    pub(crate) fn positions(&self) -> impl Iterator<Item = (&str, Option<&Position>)> {
        self.held
            .iter()
            .map(|s| (s.room.as_str(), s.position.as_ref()))
    }

    /// The subscribe request of the held `room`, under its pending reference.
    pub(crate) fn request(&self, room: &str) -> Option<RoomRequest> {
        self.held
            .iter()
            .find(|s| s.room == room)
            .map(Subscription::request)
    }

    /// Stop holding `room`; whether it was held.
    pub(crate) fn unsubscribe(&mut self, room: &str) -> bool {
        let before = self.held.len();
        self.held.retain(|s| s.room != room);
        self.held.len() != before
    }

    /// Keep a publish until a connection carries rooms; returns its reference.
    pub(crate) fn wait_to_publish(&mut self, room: &str, message: Message) -> Reference {
        let reference = self.draw();
        self.waiting
            .push_back((reference, room.to_owned(), message));
        reference
    }

    /// Everything a connection that now carries rooms must be sent, in order: every
    /// held subscription (a confirmed one under a new reference, an unanswered one
    /// under its own: its answer never came on the connection it went out on), then
    /// the waiting publishes.
    pub(crate) fn restore(&mut self) -> Vec<RoomRequest> {
        let mut requests = Vec::with_capacity(self.held.len() + self.waiting.len());
        for index in 0..self.held.len() {
            if self.held[index].pending.is_none() {
                self.held[index].pending = Some(self.draw());
            }
            requests.push(self.held[index].request());
        }
        requests.extend(self.waiting.drain(..).map(|(reference, room, message)| {
            RoomRequest::Publish {
                room,
                message,
                reference: reference.to_wire(),
            }
        }));
        requests
    }

    /// The server confirmed the subscribe `reference` to `room`.
    pub(crate) fn confirmed(&mut self, room: &str, reference: Reference) {
        if let Some(held) = self
            .held
            .iter_mut()
            .find(|s| s.room == room && s.pending == Some(reference))
        {
            held.pending = None;
        }
    }

    /// The server refused request `reference`: a subscribe waiting for it is dropped.
    pub(crate) fn refused(&mut self, reference: Reference) {
        self.held.retain(|s| s.pending != Some(reference));
    }

    /// The server took the connection out of `room` on its own. A confirmed
    /// subscription ends; one awaiting its answer stays, since the server read that
    /// subscribe after it sent the removal (the wire keeps order).
    pub(crate) fn removed_by_server(&mut self, room: &str) {
        self.held.retain(|s| s.room != room || s.pending.is_some());
    }

    /// Drop every request still waiting for an answer or for a connection (the
    /// server turned out to have no rooms), with its room; confirmed subscriptions
    /// stay for a later server that has rooms.
    pub(crate) fn drop_unanswered(&mut self) -> Vec<(Reference, String)> {
        let mut dropped: Vec<(Reference, String)> = self
            .held
            .iter()
            .filter_map(|s| s.pending.map(|reference| (reference, s.room.clone())))
            .collect();
        self.held.retain(|s| s.pending.is_none());
        dropped.extend(
            self.waiting
                .drain(..)
                .map(|(reference, room, _)| (reference, room)),
        );
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn references(requests: &[RoomRequest]) -> Vec<Value> {
        requests
            .iter()
            .map(|request| match request {
                RoomRequest::Subscribe { reference, .. }
                | RoomRequest::Unsubscribe { reference, .. }
                | RoomRequest::Publish { reference, .. }
                | RoomRequest::Presence { reference, .. } => reference.clone(),
            })
            .collect()
    }

    #[test]
    fn a_restore_keeps_unanswered_references_and_draws_new_ones_for_confirmed_rooms() {
        let mut subs = Subscriptions::default();
        let a = subs.subscribe("a", None, false, true);
        let b = subs.subscribe("b", Some("t"), false, true);
        subs.confirmed("a", a);
        let p = subs.wait_to_publish("a", Message::dispatch("CHAT", Value::Null));
        let restored = subs.restore();
        assert_eq!(
            references(&restored),
            [
                Value::from(p.get() + 1),
                Value::from(b.get()),
                Value::from(p.get())
            ]
        );
        assert_eq!(subs.waiting(), 0);
        assert_eq!(subs.rooms().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_subscribe_not_yet_sent_shares_the_reference_of_the_one_waiting() {
        let mut subs = Subscriptions::default();
        let first = subs.subscribe("a", None, false, false);
        assert_eq!(subs.subscribe("a", Some("t"), false, false), first);
        let again = subs.subscribe("a", None, false, true);
        assert_ne!(again, first);
        assert_eq!(subs.len(), 1);
    }

    #[test]
    fn refusals_and_removals_end_only_what_they_name() {
        let mut subs = Subscriptions::default();
        let a = subs.subscribe("a", None, false, true);
        let b = subs.subscribe("b", None, false, true);
        subs.confirmed("a", a);
        // A stale answer confirms nothing.
        subs.confirmed("b", a);
        subs.removed_by_server("b");
        assert!(subs.holds("b"), "b's subscribe is still on its way");
        subs.removed_by_server("a");
        assert!(!subs.holds("a"));
        subs.refused(b);
        assert_eq!(subs.len(), 0);
    }

    #[test]
    fn a_server_without_rooms_drops_what_waits_and_keeps_what_was_confirmed() {
        let mut subs = Subscriptions::default();
        let a = subs.subscribe("a", None, false, true);
        subs.confirmed("a", a);
        let b = subs.subscribe("b", None, false, false);
        let p = subs.wait_to_publish("c", Message::dispatch("CHAT", Value::Null));
        assert_eq!(
            subs.drop_unanswered(),
            [(b, "b".to_owned()), (p, "c".to_owned())]
        );
        assert_eq!(subs.rooms().collect::<Vec<_>>(), ["a"]);
        assert_eq!(subs.waiting(), 0);
    }
}
