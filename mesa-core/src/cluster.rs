//! The Redis contract shared with upstream replicas, as pure encode/decode: key and
//! channel names, the `ws` envelope, and portal events.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::hub::Recipients;
use crate::recovery::Personal;
use crate::rng::Rng;
use crate::sync::{MessageOptions, should_store};
use crate::wire::{DecodeError, Message};

/// Key and channel names: `ns(x)` is `x`, or `x_<namespace>` when one is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace(Option<String>);

/// What every room channel starts with.
pub const ROOM_CHANNEL_PREFIX: &str = "mesa_room:";

/// What every replica's own channel starts with.
pub const REPLICA_CHANNEL_PREFIX: &str = "mesa_replica:";

impl Namespace {
    /// A namespace; an empty string means none, as in upstream (`if (namespace)`).
    pub fn new(namespace: Option<String>) -> Self {
        Namespace(namespace.filter(|ns| !ns.is_empty()))
    }

    /// `ns(prefix)`.
    pub fn key(&self, prefix: &str) -> String {
        match &self.0 {
            Some(ns) => format!("{prefix}_{ns}"),
            None => prefix.to_owned(),
        }
    }

    /// The pub/sub channel every replica delivers from.
    pub fn ws_channel(&self) -> String {
        self.key("ws")
    }

    /// The set of authenticated connected ids.
    pub fn connected_clients(&self) -> String {
        self.key("connected_clients")
    }

    /// The connection counter.
    pub fn connected_clients_count(&self) -> String {
        self.key("connected_clients_count")
    }

    /// The hash of messages waiting for offline ids.
    pub fn undelivered_messages(&self) -> String {
        self.key("undelivered_messages")
    }

    /// The channel carrying client events to portals.
    pub fn portal_channel(&self) -> String {
        self.key("portal")
    }

    /// The set (and channel) of available portal ids.
    pub fn available_portals_pool(&self) -> String {
        self.key("available_portals_pool")
    }

    /// Ours only: the stream of durable portal events of partition `partition`
    /// ([`portal_partition`]), read by durable portals through a consumer group.
    pub fn portal_queue(&self, partition: usize) -> String {
        self.key(&format!("portal_q:{partition}"))
    }

    /// Ours only: the dead-letter stream, where durable portals move the events that
    /// failed too often or could not be read, so that they stop blocking nobody and
    /// stay inspectable.
    pub fn portal_dead_letters(&self) -> String {
        self.key("portal_dlq")
    }

    /// Ours only: the lease of consumer group `group` on partition `partition`: the
    /// portal id holding it reads the partition alone, so a client's events are
    /// handled in order.
    pub fn portal_lease(&self, group: &str, partition: usize) -> String {
        self.key(&format!("portal_lease:{group}:{partition}"))
    }

    /// Ours only (upstream never reads it): the set of live mesa-rs replica ids.
    pub fn replicas(&self) -> String {
        self.key("mesa_replicas")
    }

    /// The connections of each id in `room`, over the cluster (ours).
    pub fn room_members(&self, room: &str) -> String {
        self.key(&format!("mesa_room_members:{room}"))
    }

    /// The stream of a recoverable room's last messages (ours): entry ids are the
    /// offsets, each entry's field `m` the message.
    pub fn room_stream(&self, room: &str) -> String {
        self.key(&format!("mesa_stream:{room}"))
    }

    /// The meta record of a recoverable room's stream (ours): a hash of its epoch
    /// `e` and its last offset `s`.
    pub fn room_stream_meta(&self, room: &str) -> String {
        self.key(&format!("mesa_stream_meta:{room}"))
    }

    /// A counter that makes every new epoch of a room's stream unique (ours).
    pub fn stream_epochs(&self) -> String {
        self.key("mesa_stream_epochs")
    }

    /// The room memberships of `replica`, for its presence in rooms (ours).
    pub fn replica_rooms(&self, replica: &str) -> String {
        self.key(&format!("mesa_replica_rooms:{replica}"))
    }

    /// The pub/sub channel of a room (ours; Node replicas never subscribe to it).
    pub fn room_channel(&self, room: &str) -> String {
        self.key(&format!("{ROOM_CHANNEL_PREFIX}{room}"))
    }

    /// The room whose channel is `channel` ([`room_channel`](Self::room_channel)).
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let room = channel.strip_prefix(ROOM_CHANNEL_PREFIX)?;
        match &self.0 {
            Some(ns) => room.strip_suffix(ns.as_str())?.strip_suffix('_'),
            None => Some(room),
        }
    }

    /// The pub/sub channel of one replica (ours): the ids sends routed to it, when
    /// senders route by interest instead of publishing on `ws`.
    pub fn replica_channel(&self, replica: &str) -> String {
        self.key(&format!("{REPLICA_CHANNEL_PREFIX}{replica}"))
    }

    /// The replicas holding a connection of `id` (ours): the route table of sends
    /// routed by interest, kept by the presence scripts beside each replica's ids set.
    pub fn routes(&self, id: &str) -> String {
        self.key(&format!("mesa_routes:{id}"))
    }

    /// Ours only: a replica's lease, a key with a TTL renewed while it is alive.
    pub fn replica_lease(&self, replica: &str) -> String {
        self.key(&format!("mesa_replica_lease:{replica}"))
    }

    /// Ours only: the ids with a connection on a replica.
    pub fn replica_ids(&self, replica: &str) -> String {
        self.key(&format!("mesa_replica_ids:{replica}"))
    }

    /// Ours only: how many connections a replica counted into `connected_clients_count`.
    pub fn replica_connections(&self, replica: &str) -> String {
        self.key(&format!("mesa_replica_conns:{replica}"))
    }
}

/// A message published on `ns("ws")`: every replica delivers it to its local
/// connections among `recipients`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The message, without a sequence number.
    pub message: Message,
    /// Options a Dispatcher attached (`o`), if any.
    pub options: Option<MessageOptions>,
    /// Who receives it.
    pub recipients: Recipients,
    /// The mesa-rs replica that published it and already delivered it to its own
    /// connections. An extra field, which upstream replicas ignore.
    pub origin: Option<String>,
    /// Whether the sender also appended the message to its recipients' personal
    /// streams (or the broadcast stream), from which extended connections taking
    /// those streams get it: they skip the envelope. An extra field (`"streamed":
    /// true`); upstream's envelopes lack it and reach every connection.
    pub streamed: bool,
}

impl Envelope {
    /// `{"message": {"op","d","t"[,"o"]}, "recipients": [..] | ["*"][, "origin"]}`.
    pub fn encode(&self) -> String {
        let (head, tail) = self.halves();
        let recipients = match &self.recipients {
            Recipients::All => vec![Value::from("*")],
            Recipients::Ids(ids) => ids.iter().cloned().map(Value::from).collect(),
        };
        let list = Value::Array(recipients).to_string();
        format!("{head}{}{tail}", &list[1..list.len() - 1])
    }

    /// The encoded envelope before and after the items of its recipients' list (its
    /// recipients ignored): a script that routes ids to replicas (see
    /// [`Script::Route`](crate::replica::Script::Route)) puts each replica's share
    /// in between, as JSON strings separated by commas.
    pub fn halves(&self) -> (String, String) {
        let mut message = match self.message.to_value() {
            Value::Object(object) => object,
            _ => Map::new(),
        };
        message.remove("s");
        if let Some(options) = &self.options {
            message.insert("o".into(), Value::Object(options.raw.clone()));
        }
        let head = format!(r#"{{"message":{},"recipients":["#, Value::Object(message));
        let mut tail = match &self.origin {
            Some(origin) => format!(r#"],"origin":{}"#, Value::from(origin.as_str())),
            None => "]".to_owned(),
        };
        if self.streamed {
            tail.push_str(r#","streamed":true"#);
        }
        tail.push('}');
        (head, tail)
    }

    /// Parse an envelope published by any replica or Dispatcher.
    pub fn decode(json: &str) -> Result<Envelope, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        let mut raw = object
            .remove("message")
            .ok_or(DecodeError::BadField("message"))?;
        let options = match raw.as_object_mut().and_then(|m| m.remove("o")) {
            None | Some(Value::Null) => None,
            Some(Value::Object(raw)) => Some(MessageOptions { raw }),
            Some(_) => return Err(DecodeError::BadField("o")),
        };
        let message = Message {
            s: None,
            ..Message::from_value(raw)?
        };
        let recipients = object
            .get("recipients")
            .and_then(Value::as_array)
            .ok_or(DecodeError::BadField("recipients"))?
            .iter()
            .map(|id| id.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or(DecodeError::BadField("recipients"))?;
        let origin = object
            .get("origin")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let streamed = object.get("streamed") == Some(&Value::Bool(true));
        Ok(Envelope {
            message,
            options,
            recipients: Recipients::from_ids(recipients),
            origin,
            streamed,
        })
    }
}

/// Which of `shards` Redis instances holds the data of `key` (an id or a room):
/// jump consistent hashing (Lamping and Veach) of its 64-bit FNV-1a hash, so that
/// every replica and Dispatcher, whatever its version, agrees, and adding an
/// instance moves only a share of the keys. Global data (`ws`, portals, the
/// connection counter) lives on shard 0. A personal stream ([`Personal`]) lives
/// with its id's data, the broadcast stream with the global data.
pub fn shard_of(key: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let key = match Personal::of_stream(key) {
        Some(Personal::Broadcast) => return 0,
        Some(Personal::User) => Personal::id_of(key).unwrap_or(key),
        None => key,
    };
    let mut hash = fnv1a(key);
    let (mut bucket, mut next) = (0u64, 0u64);
    while next < shards as u64 {
        bucket = next;
        hash = hash.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let step = f64::from(1u32 << 31) / ((hash >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * step) as u64;
    }
    bucket as usize
}

/// The 64-bit FNV-1a hash of `key`: stable across versions and processes, so every
/// replica and portal places a key alike.
fn fnv1a(key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Partitions of the durable portal queues by default, on servers and portals alike
/// (both sides must agree).
pub const DEFAULT_PORTAL_PARTITIONS: usize = 16;

/// Which of `partitions` durable portal streams carries the events of client
/// `client_id`: every event of one id goes to one stream, so a portal reading that
/// stream alone handles them in order. Events of connections that never
/// authenticated have no id and go to partition 0.
pub fn portal_partition(client_id: Option<&str>, partitions: usize) -> usize {
    match client_id {
        Some(id) if partitions > 1 => (fnv1a(id) % partitions as u64) as usize,
        _ => 0,
    }
}

/// What a send still needs from the cluster once the local connections are served.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum RemotePlan {
    /// Nothing: every recipient was local.
    Nothing,
    /// Publish to these recipients (`*`, or ids absent here) without a presence check.
    Publish(Recipients),
    /// Sync is on: ask the cluster which of these ids are connected anywhere, then
    /// [`split_by_presence`].
    CheckPresence(Vec<String>),
}

/// Decide the remote part of a send: a global send is published for the other
/// replicas; ids absent here are published, or first checked for presence when sync
/// is on (so the offline ones are stored instead).
pub fn plan_remote(recipients: &Recipients, absent: Vec<String>, sync: bool) -> RemotePlan {
    match recipients {
        Recipients::All => RemotePlan::Publish(Recipients::All),
        Recipients::Ids(_) if absent.is_empty() => RemotePlan::Nothing,
        Recipients::Ids(_) if sync => RemotePlan::CheckPresence(absent),
        Recipients::Ids(_) => RemotePlan::Publish(Recipients::Ids(absent)),
    }
}

impl RemotePlan {
    /// The part of this plan each of `shards` Redis instances does: every id's on its
    /// own instance ([`shard_of`]); a global send on the first. Nothing to do, no part.
    pub fn by_shard(self, shards: usize) -> Vec<(usize, RemotePlan)> {
        let split = |ids: Vec<String>| {
            let mut parts: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
            for id in ids {
                parts.entry(shard_of(&id, shards)).or_default().push(id);
            }
            parts.into_iter()
        };
        match self {
            RemotePlan::Nothing => Vec::new(),
            plan @ RemotePlan::Publish(Recipients::All) => vec![(0, plan)],
            plan if shards <= 1 => vec![(0, plan)],
            RemotePlan::Publish(Recipients::Ids(ids)) => split(ids)
                .map(|(shard, ids)| (shard, RemotePlan::Publish(Recipients::Ids(ids))))
                .collect(),
            RemotePlan::CheckPresence(ids) => split(ids)
                .map(|(shard, ids)| (shard, RemotePlan::CheckPresence(ids)))
                .collect(),
        }
    }

    /// The ids this plan asks the cluster to check for presence (none for a publish).
    pub fn checked(&self) -> &[String] {
        match self {
            RemotePlan::CheckPresence(ids) => ids,
            RemotePlan::Nothing | RemotePlan::Publish(_) => &[],
        }
    }

    /// Forget the first `done` ids of a presence check: a round trip carried them
    /// (see [`Round`]), and the rest waits for the next.
    pub fn advance(&mut self, done: usize) {
        if let RemotePlan::CheckPresence(ids) = self {
            ids.drain(..done.min(ids.len()));
        }
    }
}

/// Most ids in one presence check (SMISMEMBER) or one store script call: Redis runs
/// each command whole, so a bounded one keeps Redis's other clients served.
pub const IDS_PER_COMMAND: usize = 1000;

/// Most ids checked for presence (and so stored for) in one round trip to Redis, over
/// all the sends it carries: between two round trips the cluster link serves its
/// pub/sub messages, its lease and its other jobs, and what one round holds in memory
/// does not grow with a send's recipients.
pub const IDS_PER_ROUND: usize = 4 * IDS_PER_COMMAND;

/// Most sends in one round trip to Redis.
pub const SENDS_PER_ROUND: usize = 512;

/// The share of a queue of remote sends (oldest first) that the next round trip to
/// Redis carries.
///
/// A send too big for what is left of the round is cut: its first ids go now, and the
/// rest stays at the head of the queue, ahead of every later send. So no later send
/// is published to, or stored for, an id before an earlier one (per-sender order),
/// however many recipients the earlier one has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use]
pub struct Round {
    /// Sends carried whole, from the front of the queue.
    pub whole: usize,
    /// Then the first ids of the next send's presence check (0: none).
    pub part: usize,
    /// The ids checked for presence in all, at most [`IDS_PER_ROUND`].
    pub ids: usize,
}

impl Round {
    /// Plan the next round over the plans of the queued sends, oldest first.
    pub fn plan<'a>(queue: impl IntoIterator<Item = &'a RemotePlan>) -> Round {
        let mut round = Round::default();
        let mut budget = IDS_PER_ROUND;
        for plan in queue.into_iter().take(SENDS_PER_ROUND) {
            let cost = plan.checked().len();
            if cost > budget {
                round.part = budget;
                break;
            }
            budget -= cost;
            round.whole += 1;
        }
        round.ids = IDS_PER_ROUND - budget + round.part;
        round
    }

    /// How long the cluster link rests after this round, which took `took`, before
    /// its next round of sends (serving everything else meanwhile): as long again
    /// after a full round, none otherwise.
    ///
    /// A full round is bulk work (a send to many ids, or a flood of sends). Redis runs
    /// one command at a time, so bulk work at full speed makes every other client
    /// (other replicas' publishes, this replica's lease) wait behind its scripts, and
    /// it competes with this process's connections for CPU; resting halves its share
    /// of both. Ordinary traffic never fills a round and is never slowed.
    pub fn rest(&self, took: Duration) -> Duration {
        if self.ids >= IDS_PER_ROUND {
            took
        } else {
            Duration::ZERO
        }
    }
}

/// Who gets the message through the cluster, and for whom it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceSplit {
    /// Ids connected on another replica: publish to them.
    pub publish: Vec<String>,
    /// Ids connected nowhere: store the message for them.
    pub store: Vec<String>,
    /// Ids connected nowhere for whom nothing is stored (`sync: false`, blank ids).
    pub undeliverable: Vec<String>,
}

/// Split checked ids by presence (`online[i]` answers `ids[i]`).
pub fn split_by_presence(
    ids: Vec<String>,
    online: &[bool],
    options: Option<&MessageOptions>,
) -> PresenceSplit {
    let mut split = PresenceSplit::default();
    for (i, id) in ids.into_iter().enumerate() {
        if online.get(i).copied().unwrap_or(false) {
            split.publish.push(id);
        } else if should_store(&id, options) {
            split.store.push(id);
        } else {
            split.undeliverable.push(id);
        }
    }
    split
}

/// How a server picks the portal that handles a client event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortalChoice {
    /// Each event to the next portal in turn (upstream's `distributeLoad`, the default).
    #[default]
    RoundRobin,
    /// Each event to a portal picked at random.
    Random,
}

/// The portals available to a server, as announced on `ns("available_portals_pool")`.
#[derive(Debug, Clone)]
pub struct PortalPool {
    portals: Vec<String>,
    next: usize,
    choice: PortalChoice,
    rng: Rng,
}

impl PortalPool {
    /// An empty pool; `seed` drives the random choice.
    pub fn new(choice: PortalChoice, seed: u64) -> Self {
        PortalPool {
            portals: Vec::new(),
            next: 0,
            choice,
            rng: Rng::new(seed),
        }
    }

    /// The portal ids known now.
    pub fn portals(&self) -> &[String] {
        &self.portals
    }

    /// Replace the pool (the set's members, read at start or after a reconnection).
    pub fn reset(&mut self, mut portals: Vec<String>) {
        portals.sort();
        portals.dedup();
        self.portals = portals;
    }

    /// Apply a pool update; returns whether it changed the pool.
    pub fn update(&mut self, update: &PortalUpdate) -> bool {
        let known = self.portals.iter().position(|p| *p == update.id);
        match (update.ready, known) {
            (true, None) => self.portals.push(update.id.clone()),
            (false, Some(index)) => {
                self.portals.remove(index);
            }
            _ => return false,
        }
        true
    }

    /// The portal for the next event, if any portal is known.
    pub fn pick(&mut self) -> Option<&str> {
        if self.portals.is_empty() {
            return None;
        }
        let index = match self.choice {
            PortalChoice::RoundRobin => {
                self.next = (self.next + 1) % self.portals.len();
                self.next
            }
            PortalChoice::Random => self.rng.below_or_equal(self.portals.len() as u64 - 1) as usize,
        };
        self.portals.get(index).map(String::as_str)
    }
}

/// What a portal is told about a client.
#[derive(Debug, Clone, PartialEq)]
pub enum PortalEventKind {
    /// A connection opened.
    Connection,
    /// A connection authenticated.
    Authentication,
    /// A connection sent a message.
    Message(Message),
    /// A connection closed.
    Disconnection,
}

/// One event on `ns("portal")`, addressed to one portal.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalEvent {
    /// What happened.
    pub kind: PortalEventKind,
    /// The client's id, when it had authenticated.
    pub client_id: Option<String>,
    /// The portal chosen to handle it.
    pub portal_id: String,
}

impl PortalEvent {
    /// `{"type", "clientId"?, "message"?, "portalId"}`.
    pub fn encode(&self) -> String {
        let mut object = Map::new();
        let kind = match &self.kind {
            PortalEventKind::Connection => "connection",
            PortalEventKind::Authentication => "authentication",
            PortalEventKind::Message(_) => "message",
            PortalEventKind::Disconnection => "disconnection",
        };
        object.insert("type".into(), kind.into());
        if let PortalEventKind::Message(message) = &self.kind {
            object.insert("message".into(), message.to_value());
        }
        if let Some(id) = &self.client_id {
            object.insert("clientId".into(), id.clone().into());
        }
        object.insert("portalId".into(), self.portal_id.clone().into());
        Value::Object(object).to_string()
    }

    /// Parse a portal event from any server.
    pub fn decode(json: &str) -> Result<PortalEvent, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        let kind = match object.get("type").and_then(Value::as_str) {
            Some("connection") => PortalEventKind::Connection,
            Some("authentication") => PortalEventKind::Authentication,
            Some("disconnection") => PortalEventKind::Disconnection,
            Some("message") => PortalEventKind::Message(Message::from_value(
                object
                    .remove("message")
                    .ok_or(DecodeError::BadField("message"))?,
            )?),
            _ => return Err(DecodeError::BadField("type")),
        };
        let text = |object: &Map<String, Value>, key| {
            object.get(key).and_then(Value::as_str).map(str::to_owned)
        };
        Ok(PortalEvent {
            kind,
            client_id: text(&object, "clientId"),
            portal_id: text(&object, "portalId").ok_or(DecodeError::BadField("portalId"))?,
        })
    }
}

/// A portal joining or leaving the pool (`{"id", "ready"}` on `ns("available_portals_pool")`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalUpdate {
    /// The portal's id.
    pub id: String,
    /// True when it joins, false when it leaves.
    pub ready: bool,
}

impl PortalUpdate {
    /// `{"id": .., "ready": ..}`.
    pub fn encode(&self) -> String {
        json!({"id": self.id, "ready": self.ready}).to_string()
    }

    /// Parse a pool update.
    pub fn decode(json: &str) -> Result<PortalUpdate, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let id = value
            .get("id")
            .and_then(Value::as_str)
            .ok_or(DecodeError::BadField("id"))?;
        let ready = value.get("ready").and_then(Value::as_bool).unwrap_or(false);
        Ok(PortalUpdate {
            id: id.to_owned(),
            ready,
        })
    }
}

/// One entry of a durable portal stream (`ns("portal_q:<p>")`): the fields
/// `event_id` (unique in the cluster: the replica's name and a sequence, so a
/// consumer can drop an event it already handled, e.g. an append retried after a
/// lost reply) and `event` (the [`PortalEvent`] JSON, `portalId` empty: no portal
/// was chosen, the consumer group shares the work).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPortalEvent {
    /// Unique per event; the same on every delivery of it.
    pub event_id: String,
    /// What happened.
    pub event: PortalEvent,
}

impl QueuedPortalEvent {
    /// The entry's field names, in the order [`fields`](Self::fields) gives them.
    pub const FIELDS: [&'static str; 2] = ["event_id", "event"];

    /// The entry's fields and values, as `XADD` takes them.
    pub fn fields(&self) -> Vec<String> {
        vec![
            Self::FIELDS[0].to_owned(),
            self.event_id.clone(),
            Self::FIELDS[1].to_owned(),
            self.event.encode(),
        ]
    }

    /// Read an entry from its fields and values (`[f1, v1, f2, v2, ..]`, other
    /// fields ignored); `Err` says what is wrong with it.
    pub fn decode(fields: &[String]) -> Result<QueuedPortalEvent, String> {
        let field = |name: &str| {
            fields
                .chunks_exact(2)
                .find(|pair| pair[0] == name)
                .map(|pair| pair[1].as_str())
                .ok_or_else(|| format!("no {name} field"))
        };
        let event_id = field(Self::FIELDS[0])?.to_owned();
        let event = PortalEvent::decode(field(Self::FIELDS[1])?)
            .map_err(|error| format!("bad event: {error}"))?;
        Ok(QueuedPortalEvent { event_id, event })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn portal_partitions_are_stable_and_in_range() {
        assert_eq!(super::portal_partition(None, 16), 0);
        assert_eq!(super::portal_partition(Some("a"), 1), 0);
        let p = super::portal_partition(Some("user-42"), 16);
        assert!(p < 16);
        assert_eq!(p, super::portal_partition(Some("user-42"), 16));
        let spread: std::collections::BTreeSet<usize> = (0..200)
            .map(|i| super::portal_partition(Some(&format!("id{i}")), 16))
            .collect();
        assert_eq!(spread.len(), 16);
    }

    #[test]
    fn queued_portal_events_round_trip_and_refuse_garbage() {
        let queued = super::QueuedPortalEvent {
            event_id: "r1:7".into(),
            event: super::PortalEvent {
                kind: super::PortalEventKind::Authentication,
                client_id: Some("u".into()),
                portal_id: String::new(),
            },
        };
        assert_eq!(
            super::QueuedPortalEvent::decode(&queued.fields()),
            Ok(queued)
        );
        assert!(super::QueuedPortalEvent::decode(&["event".into()]).is_err());
        let bad = ["event_id".into(), "x".into(), "event".into(), "{".into()];
        assert!(super::QueuedPortalEvent::decode(&bad).is_err());
    }

    use super::*;

    #[test]
    fn keys_follow_upstream_naming() {
        assert_eq!(Namespace::default().ws_channel(), "ws");
        let ns = Namespace::new(Some("prod".into()));
        assert_eq!(ns.undelivered_messages(), "undelivered_messages_prod");
        assert_eq!(
            Namespace::new(Some(String::new())).portal_channel(),
            "portal"
        );
    }

    #[test]
    fn keys_spread_evenly_over_shards_and_few_move_when_one_is_added() {
        assert_eq!(shard_of("anything", 1), 0);
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let mut counts = [0usize; 4];
        for key in &keys {
            counts[shard_of(key, 4)] += 1;
        }
        assert!(
            counts.iter().all(|n| (2_200..2_800).contains(n)),
            "{counts:?}"
        );
        // From 4 to 5 instances, about a fifth of the keys move, all to the new one.
        let moved: Vec<&String> = keys
            .iter()
            .filter(|key| shard_of(key, 4) != shard_of(key, 5))
            .collect();
        assert!((1_700..2_300).contains(&moved.len()), "{}", moved.len());
        assert!(moved.iter().all(|key| shard_of(key, 5) == 4));
        // A personal stream with its id, the broadcast's with the global data.
        for key in &keys {
            assert_eq!(shard_of(&Personal::User.stream(key), 5), shard_of(key, 5));
        }
        assert_eq!(shard_of(&Personal::Broadcast.stream(""), 5), 0);
        // Fixed forever: replicas of any version must agree.
        assert_eq!(
            ["alice", "bob", "room:1", "u0", "u1"].map(|key| shard_of(key, 3)),
            [0, 2, 2, 0, 1]
        );
    }

    #[test]
    fn envelope_matches_upstream_bytes_and_round_trips() {
        let envelope = Envelope {
            message: Message::dispatch("CHAT", json!({"a": 1})),
            options: None,
            recipients: Recipients::All,
            origin: None,
            streamed: false,
        };
        assert_eq!(
            envelope.encode(),
            r#"{"message":{"op":0,"d":{"a":1},"t":"CHAT"},"recipients":["*"]}"#
        );
        assert_eq!(Envelope::decode(&envelope.encode()).unwrap(), envelope);
        let from_dispatcher =
            r#"{"message":{"op":0,"d":{},"t":"X","o":{"sync":false}},"recipients":["a","b"]}"#;
        let decoded = Envelope::decode(from_dispatcher).unwrap();
        assert!(!decoded.options.as_ref().unwrap().allows_sync());
        assert_eq!(
            decoded.recipients,
            Recipients::Ids(vec!["a".into(), "b".into()])
        );
        assert_eq!(decoded.encode(), from_dispatcher);
        let ours = Envelope {
            origin: Some("r1".into()),
            ..envelope
        };
        assert_eq!(
            Envelope::decode(&ours.encode()).unwrap().origin.as_deref(),
            Some("r1")
        );
        let streamed = Envelope {
            streamed: true,
            ..ours
        };
        assert_eq!(
            streamed.encode(),
            r#"{"message":{"op":0,"d":{"a":1},"t":"CHAT"},"recipients":["*"],"origin":"r1","streamed":true}"#
        );
        assert_eq!(Envelope::decode(&streamed.encode()).unwrap(), streamed);
    }

    #[test]
    fn plans_the_remote_part_of_a_send() {
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            plan_remote(&Recipients::All, vec![], true),
            RemotePlan::Publish(Recipients::All)
        );
        let to = Recipients::Ids(ids(&["a", "b"]));
        assert_eq!(plan_remote(&to, vec![], true), RemotePlan::Nothing);
        assert_eq!(
            plan_remote(&to, ids(&["b"]), false),
            RemotePlan::Publish(Recipients::Ids(ids(&["b"])))
        );
        assert_eq!(
            plan_remote(&to, ids(&["b"]), true),
            RemotePlan::CheckPresence(ids(&["b"]))
        );
        let split = split_by_presence(ids(&["b", "c", " "]), &[true, false, false], None);
        assert_eq!(
            (split.publish, split.store, split.undeliverable),
            (ids(&["b"]), ids(&["c"]), ids(&[" "]))
        );
        let no_sync = MessageOptions::no_sync();
        let split = split_by_presence(ids(&["c"]), &[false], Some(&no_sync));
        assert_eq!(split.undeliverable, ids(&["c"]));
    }

    #[test]
    fn rounds_pack_small_sends_and_cut_a_big_one_in_order() {
        let check = |n: usize| RemotePlan::CheckPresence((0..n).map(|i| i.to_string()).collect());
        let publish = RemotePlan::Publish(Recipients::All);
        // Small sends and publishes travel together, one round for all.
        let small = [check(3), publish.clone(), check(IDS_PER_COMMAND)];
        let round = Round::plan(&small);
        assert_eq!(
            (round.whole, round.part, round.ids),
            (3, 0, 3 + IDS_PER_COMMAND)
        );
        let took = Duration::from_millis(7);
        assert_eq!(
            round.rest(took),
            Duration::ZERO,
            "ordinary traffic never rests"
        );
        // A big send behind small ones is cut where the round's ids run out.
        let mut queue = vec![check(10), check(3 * IDS_PER_ROUND), check(1)];
        let round = Round::plan(&queue);
        assert_eq!((round.whole, round.part), (1, IDS_PER_ROUND - 10));
        assert_eq!(
            round.rest(took),
            took,
            "bulk work rests as long as it worked"
        );
        let _done = queue.remove(0);
        queue[0].advance(IDS_PER_ROUND - 10);
        assert_eq!(queue[0].checked().len(), 2 * IDS_PER_ROUND + 10);
        // Its rest stays at the head: the later send waits until it is done.
        let mut rounds = 0;
        while queue[0].checked().len() > IDS_PER_ROUND {
            let round = Round::plan(&queue);
            assert_eq!((round.whole, round.part), (0, IDS_PER_ROUND));
            queue[0].advance(round.part);
            rounds += 1;
        }
        assert_eq!(rounds, 2);
        assert_eq!(Round::plan(&queue).whole, 2);
        // A round carries a bounded number of sends, however small.
        let many = vec![publish; SENDS_PER_ROUND + 1];
        assert_eq!(Round::plan(&many).whole, SENDS_PER_ROUND);
    }

    #[test]
    fn portal_pool_round_robins_like_upstream() {
        let mut pool = PortalPool::new(PortalChoice::RoundRobin, 1);
        assert_eq!(pool.pick(), None);
        for id in ["p1", "p2", "p3"] {
            assert!(pool.update(&PortalUpdate {
                id: id.into(),
                ready: true
            }));
        }
        // Upstream increments before picking: the first event goes to the second portal.
        let picks: Vec<String> = (0..4).map(|_| pool.pick().unwrap().to_owned()).collect();
        assert_eq!(picks, ["p2", "p3", "p1", "p2"]);
        assert!(pool.update(&PortalUpdate {
            id: "p2".into(),
            ready: false
        }));
        assert!(!pool.update(&PortalUpdate {
            id: "p2".into(),
            ready: false
        }));
        assert_eq!(pool.portals(), ["p1", "p3"]);
        let mut random = PortalPool::new(PortalChoice::Random, 7);
        random.reset(vec!["a".into(), "b".into()]);
        let picked: std::collections::HashSet<String> =
            (0..50).map(|_| random.pick().unwrap().to_owned()).collect();
        assert_eq!(picked.len(), 2);
    }

    #[test]
    fn portal_events_round_trip() {
        let event = PortalEvent {
            kind: PortalEventKind::Message(Message::dispatch("HI", json!({}))),
            client_id: Some("alice".into()),
            portal_id: "p1".into(),
        };
        assert_eq!(
            event.encode(),
            r#"{"type":"message","message":{"op":0,"d":{},"t":"HI"},"clientId":"alice","portalId":"p1"}"#
        );
        assert_eq!(PortalEvent::decode(&event.encode()).unwrap(), event);
        let update = PortalUpdate {
            id: "p1".into(),
            ready: true,
        };
        assert_eq!(PortalUpdate::decode(&update.encode()).unwrap(), update);
    }
}
