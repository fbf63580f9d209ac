//! What the cluster simulation records about its messages, and the properties it
//! checks over the records: nothing stored is lost, nothing is delivered twice
//! outside the at-least-once window, each sender's order holds, presence ends
//! within its bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::ClientEvent;
use crate::sim::net::ClientRecorder;
use crate::wire::Message;

/// A simulated message: the index of the client that sent it, and its number
/// among that client's messages (from 1).
pub type MessageKey = (u32, u32);

/// The key of a message the simulation's clients send (`d.from`, `d.n`).
pub fn message_key(message: &Message) -> Option<MessageKey> {
    let from = message.d.get("from")?.as_u64()?;
    let n = message.d.get("n")?.as_u64()?;
    Some((u32::try_from(from).ok()?, u32::try_from(n).ok()?))
}

/// The key of a stored entry (`{"op","d","t"}` text).
pub(crate) fn entry_key(entry: &str) -> Option<MessageKey> {
    let value: Value = serde_json::from_str(entry).ok()?;
    let message = Message::from_value(value).ok()?;
    message_key(&message)
}

/// One message received by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reception {
    /// Which message.
    pub key: MessageKey,
    /// It came from the store (it had a sequence number `s`).
    pub redelivered: bool,
    /// The link it came on.
    pub link: u32,
}

/// A cluster simulation client's record: compact, for a million of them.
#[derive(Debug, Default)]
pub struct Received {
    /// The simulation's messages received, in order (when recording is on).
    pub receptions: Vec<Reception>,
    /// Receptions, counted even when not recorded.
    pub count: u64,
    /// Whether the client is authenticated now.
    pub authenticated: bool,
    /// Disconnections so far.
    pub disconnects: u32,
    /// The link the client reads from now (set by the simulation).
    pub(crate) link: u32,
    pub(crate) record: bool,
}

impl ClientRecorder for Received {
    fn event(&mut self, _now: Instant, event: ClientEvent) {
        match event {
            ClientEvent::Message(message) => {
                self.count += 1;
                if let (true, Some(key)) = (self.record, message_key(&message)) {
                    self.receptions.push(Reception {
                        key,
                        redelivered: message.s.is_some(),
                        link: self.link,
                    });
                }
            }
            ClientEvent::Authenticated { .. } => self.authenticated = true,
            ClientEvent::Disconnected { .. } => {
                self.authenticated = false;
                self.disconnects += 1;
            }
            _ => {}
        }
    }
}

/// A message as the relay handed it to a replica.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// When.
    pub at: Instant,
    /// The link of the sender's connection (a sender's order is per connection).
    pub sender_link: u32,
    /// The recipient ids (none for a room's message).
    pub to: Vec<String>,
    /// A room's message: ordered with the sender's other room messages only (order
    /// is per channel, as in every pub/sub system: a room's channel, or the sends).
    pub room: bool,
}

/// The simulation's records of its messages.
#[derive(Debug, Default)]
pub struct Track {
    /// Every message relayed to a replica.
    pub relayed: HashMap<MessageKey, Relayed>,
    /// When each link's connection authenticated, server side.
    pub auth_at: HashMap<u32, Instant>,
    /// Stored messages written to a transport of each id (redelivered).
    pub written: HashMap<String, HashSet<MessageKey>>,
    /// Messages whose store or publish Redis ran without the answer reaching the
    /// replica: done again, so possibly twice.
    pub uncertain_messages: HashSet<MessageKey>,
    /// Ids that loaded their stored messages while a trim of theirs was not done
    /// yet (or never would be): their redelivered messages may repeat.
    pub uncertain_ids: HashSet<String>,
    /// Trims asked and not yet run by Redis, per id.
    pub trims_pending: HashMap<String, usize>,
    /// Stored entries a Redis restart without persistence erased.
    pub wiped: Vec<(String, String)>,
    /// Live authenticated connections per id, over all replicas.
    pub online: HashMap<String, usize>,
    /// When each id's last connection closed.
    pub offline_since: HashMap<String, Instant>,
}

impl Track {
    /// An id's connection authenticated.
    pub(crate) fn arrive(&mut self, id: &str) {
        *self.online.entry(id.to_owned()).or_default() += 1;
    }

    /// An id's authenticated connection closed at `now`.
    pub(crate) fn leave(&mut self, now: Instant, id: &str) {
        if let Some(count) = self.online.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                self.online.remove(id);
                self.offline_since.insert(id.to_owned(), now);
            }
        }
    }
}

/// A broken promise, in words.
pub type Violation = String;

/// Stored messages: a trim removes only messages written to a transport of the id
/// (a redelivery done), and every stored message is written, still stored, pushed
/// out by the cap (reported), cleared at the client's request, or erased by a Redis
/// that restarted without persistence.
pub fn check_stored(
    track: &Track,
    log: &super::redis::StoreLog,
    stored_now: &[(String, String)],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let written =
        |id: &str, key: &MessageKey| track.written.get(id).is_some_and(|w| w.contains(key));
    for (id, entry) in &log.trimmed {
        if let Some(key) = entry_key(entry) {
            if !written(id, &key) {
                violations.push(format!("{key:?} trimmed for {id} but never written to it"));
            }
        }
    }
    let accounted: HashSet<(&str, MessageKey)> = stored_now
        .iter()
        .chain(&log.dropped)
        .chain(&track.wiped)
        .filter_map(|(id, entry)| Some((id.as_str(), entry_key(entry)?)))
        .chain(log.cleared.iter().flat_map(|(id, array)| {
            crate::sync::decode_stored(array)
                .map(|(messages, _)| messages)
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |m| Some((id.as_str(), message_key(&m)?)))
        }))
        .collect();
    for (id, entry) in &log.appended {
        let Some(key) = entry_key(entry) else {
            continue;
        };
        if !written(id, &key) && !accounted.contains(&(id.as_str(), key)) {
            violations.push(format!("{key:?} stored for {id} and lost"));
        }
    }
    violations
}

/// Duplicates: a client receives a message twice only when Redis may have run its
/// store or publish twice, or (a redelivered copy) when its id loaded while a trim
/// was pending.
pub fn check_duplicates<'a>(
    track: &Track,
    clients: impl Iterator<Item = (String, &'a Received)>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, received) in clients {
        let mut seen: HashMap<MessageKey, u32> = HashMap::new();
        for reception in &received.receptions {
            let count = seen.entry(reception.key).or_default();
            *count += 1;
            let allowed = track.uncertain_messages.contains(&reception.key)
                || (reception.redelivered && track.uncertain_ids.contains(&id));
            if *count == 2 && !allowed {
                violations.push(format!("{:?} delivered twice to {id}", reception.key));
            }
        }
    }
    violations
}

/// Order: on one connection, the messages of one sender's connection arrive (their
/// first copies) in the order they were sent, live ones and redelivered ones each. A live message sent
/// before the receiving connection authenticated is exempt: it may have waited for
/// Redis (a presence check) while later ones went straight to the new connection.
pub fn check_order<'a>(
    track: &Track,
    clients: impl Iterator<Item = (String, &'a Received)>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, received) in clients {
        let mut last: BTreeMap<(u32, u32, bool, bool), u32> = BTreeMap::new();
        let mut seen = HashSet::new();
        for reception in &received.receptions {
            // A second copy is the duplicate check's business, not a reordering.
            let first = seen.insert((reception.link, reception.key, reception.redelivered));
            let Some(relayed) = track.relayed.get(&reception.key).filter(|_| first) else {
                continue;
            };
            if !reception.redelivered {
                // Relayed in the same instant as the authentication counts as before
                // it: the simulation may have handled the relay first.
                let authenticated = track.auth_at.get(&reception.link);
                if authenticated.is_none_or(|at| relayed.at <= *at) {
                    continue;
                }
            }
            let group = (
                reception.link,
                relayed.sender_link,
                reception.redelivered,
                relayed.room,
            );
            let n = reception.key.1;
            if let Some(previous) = last.insert(group, n) {
                if n < previous {
                    violations.push(format!(
                        "{id} got {:?} after n={previous} on link {}",
                        reception.key, reception.link
                    ));
                }
            }
        }
    }
    violations
}

/// Presence: every id in `connected_clients` has a live connection, or lost its
/// last one less than `bound` ago (or less than `bound` after Redis came back).
pub fn check_presence<'a>(
    track: &Track,
    members: impl Iterator<Item = &'a str>,
    now: Instant,
    bound: Duration,
    redis_since: Instant,
) -> Vec<Violation> {
    members
        .filter(|id| !track.online.contains_key(*id))
        .filter_map(|id| {
            let since = track.offline_since.get(id).copied().unwrap_or(redis_since);
            let deadline = since.max(redis_since) + bound;
            (now >= deadline).then(|| {
                format!(
                    "{id} still in connected_clients {:?} after it left",
                    now - since
                )
            })
        })
        .collect()
}

/// What became of the messages relayed, per recipient id.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// `(message, recipient id)` pairs relayed to a replica.
    pub addressed: u64,
    /// Pairs that reached a client of the id.
    pub delivered: u64,
    /// Pairs not delivered and still stored for the id (its clients stayed away).
    pub stored: u64,
    /// Pairs neither delivered nor stored: lost to a fault (a message published to an
    /// id whose connection was dying, a replica crashed with sends queued, a frame
    /// in flight on a cut connection).
    pub lost: u64,
    /// Receptions by a client of a message it had received already.
    pub duplicated: u64,
}

/// Sum up deliveries over the clients (with their ids) and what is stored now.
pub fn summarize<'a>(
    track: &Track,
    clients: impl Iterator<Item = (String, &'a Received)>,
    stored_now: &[(String, String)],
) -> Summary {
    let mut summary = Summary::default();
    let mut got: HashSet<(MessageKey, String)> = HashSet::new();
    for (id, received) in clients {
        let mut seen = HashSet::new();
        for reception in &received.receptions {
            if !seen.insert(reception.key) {
                summary.duplicated += 1;
            }
            got.insert((reception.key, id.clone()));
        }
    }
    let stored: HashSet<(MessageKey, &str)> = stored_now
        .iter()
        .filter_map(|(id, entry)| Some((entry_key(entry)?, id.as_str())))
        .collect();
    for (key, relayed) in &track.relayed {
        let mut to: Vec<&String> = relayed.to.iter().collect();
        to.sort_unstable();
        to.dedup();
        for id in to {
            summary.addressed += 1;
            if got.contains(&(*key, id.clone())) {
                summary.delivered += 1;
            } else if stored.contains(&(*key, id.as_str())) {
                summary.stored += 1;
            } else {
                summary.lost += 1;
            }
        }
    }
    summary
}
