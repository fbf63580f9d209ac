//! Random inputs replayed against a `Replica`: connections opening, authenticating,
//! sending and closing, sends from the application, pub/sub messages (envelopes of
//! ours and others', portal updates, garbage), the links going up and down (one
//! Redis, or two with the data spread over them), time passing, and Redis answers
//! given in any order: right (the model of that Redis instance runs the command), of
//! the wrong shape, errors, late, twice, or never.
//!
//! Invariants:
//! - tokens are unique; an answer to a token the replica no longer waits for changes
//!   nothing;
//! - every command's calls run on the model of Redis without an error (keys and
//!   arguments are laid out as the scripts read them), and after each the keys are
//!   what a Node replica expects;
//! - nothing but a `Connect` is asked of an instance while its link is not up, and
//!   nothing at all once retired;
//! - the envelopes published are ours (`origin`) and decode; portal events name a
//!   portal of the pool;
//! - a delivery targets open connections, sorted and unique, and never does nothing;
//! - stored messages are loaded only for connections that asked and are open, and a
//!   trim removes entries that were loaded for that id;
//! - `handle_timeout` at the deadline leaves the next deadline later, and called
//!   twice does nothing more;
//! - the work waiting for Redis stays within `max_pending`, and so do the presence
//!   changes;
//! - in a recoverable room (room `r0`; `r1` is not), whatever comes on its channel
//!   (in order, twice, ahead of holes, from a new epoch): each connection gets each
//!   position at most once, in increasing order within an epoch, except after the
//!   server told it `recovered: false`; the same of the personal and broadcast
//!   streams (ids' sends and broadcasts are streamed; a client opts in reporting
//!   positions of either); an old client never gets a control dispatch nor a
//!   stream's fields.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::cluster::{Envelope, PortalEvent, PortalUpdate};
use mesa_core::recovery::{Personal, Position, RecoveryConfig, Since};
use mesa_core::rooms::RoomEnvelope;
use mesa_core::sim::RedisModel;
use mesa_core::{
    Close, CloseCode, Command, ConnId, Message, MessageOptions, Opcode, PortalChoice, Recipients,
    RedisValue, Replica, ReplicaConfig, ReplicaEvent, SessionEvent, Token,
};
use serde_json::json;

const IDS: [&str; 4] = ["alice", "bob", "carol", " "];
const MAX_PENDING: usize = 16;
/// Rooms: the first keeps a stream.
const ROOMS: [&str; 2] = ["r0", "r1"];

#[derive(Arbitrary, Debug)]
enum Op {
    Open,
    Authenticate {
        conn: u8,
        id: u8,
    },
    Message {
        conn: u8,
    },
    Load {
        conn: u8,
    },
    Clear {
        conn: u8,
    },
    Redelivered {
        conn: u8,
        delivered: u8,
        dropped: u8,
    },
    Close {
        conn: u8,
    },
    Send {
        ids: Vec<u8>,
        global: bool,
        internal: bool,
        no_sync: bool,
    },
    Envelope {
        ours: bool,
        ids: Vec<u8>,
        disconnect: bool,
    },
    Portal {
        id: u8,
        ready: bool,
    },
    /// Any text on `ws`, the portal pool's channel or a recoverable room's.
    Garbage {
        channel: u8,
        text: String,
    },
    Answer {
        which: u8,
        how: How,
    },
    AnswerStale {
        token: u64,
    },
    LinkUp {
        shard: u8,
        restarted: bool,
    },
    LinkDown {
        shard: u8,
    },
    Advance {
        ms: u16,
    },
    Retire,
    /// The connection opts in, reporting these positions in its id's stream (of
    /// alice's epoch, or a stale one) and in the broadcast stream.
    Extend {
        conn: u8,
        user: Option<(bool, u8)>,
        broadcast: Option<(bool, u8)>,
    },
    Join {
        conn: u8,
        room: u8,
        since: Option<(bool, u8)>,
    },
    Leave {
        conn: u8,
        room: u8,
    },
    RoomSend {
        room: u8,
    },
    /// A room message on the channel at this offset, of the stream's epoch or of
    /// another one.
    RoomArrive {
        room: u8,
        offset: u8,
        other_epoch: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum How {
    /// What the model of Redis answers.
    Right,
    /// A value of the wrong shape.
    Wrong,
    /// An error reply.
    Error,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

struct Harness {
    replica: Replica,
    /// One per Redis instance.
    redis: Vec<RedisModel>,
    now: Instant,
    /// Connections as the replica numbered them: their id, if authenticated.
    conns: BTreeMap<ConnId, Option<String>>,
    opened: Vec<ConnId>,
    /// Commands sent and not answered, oldest first.
    outstanding: Vec<(Token, Command)>,
    tokens: BTreeSet<Token>,
    /// Per instance.
    linked: Vec<bool>,
    connecting: Vec<bool>,
    retired: bool,
    /// Connections that asked for their stored messages.
    asked: BTreeSet<ConnId>,
    /// Entries loaded per id, as stored text.
    loaded: HashMap<String, BTreeSet<String>>,
    portals: BTreeSet<String>,
    /// Per connection and room: the last position delivered (`None` once the server
    /// said it lost some, so anything may follow).
    positions: HashMap<(ConnId, String), Option<Position>>,
    extended: BTreeSet<ConnId>,
}

impl Harness {
    /// A frame to `conn`: a position of a room increases within its epoch; a
    /// control dispatch goes only to an extended connection.
    fn check_position(&mut self, conn: ConnId, text: &str) {
        let value: serde_json::Value = serde_json::from_str(text).expect("JSON frames");
        let control = value["t"].as_str().is_some_and(|t| t.starts_with("mesa:"));
        assert!(
            !control || self.extended.contains(&conn),
            "a control dispatch to an old client: {text}"
        );
        let streamed = value.get("stream").is_some() || value.get("offset").is_some();
        assert!(
            !streamed || self.extended.contains(&conn),
            "a stream's fields to an old client: {text}"
        );
        // A room by its name, a personal or the broadcast stream by its kind.
        let named = |v: &serde_json::Value| {
            v["room"]
                .as_str()
                .or_else(|| v["stream"].as_str())
                .map(str::to_owned)
        };
        let told = ["mesa:subscribed", "mesa:resumed"].iter().any(|t| value["t"] == *t);
        if told && value["d"]["recovered"] == false {
            let room = named(&value["d"]).unwrap_or_default();
            self.positions.insert((conn, room), None);
            return;
        }
        let (Some(room), Some(position)) = (named(&value), Position::from_value(&value)) else {
            return;
        };
        let last = self.positions.insert((conn, room), Some(position.clone()));
        if let Some(Some(last)) = last {
            assert!(
                last.epoch != position.epoch || last.offset < position.offset,
                "{conn:?} got {position:?} after {last:?}"
            );
        }
    }

    /// The epoch of `room`'s stream in the model of its Redis ("none" before one).
    fn epoch(&self, room: &str) -> String {
        let redis = &self.redis[mesa_core::cluster::shard_of(room, self.redis.len())];
        redis
            .hash(&format!("mesa_stream_meta:{room}"))
            .and_then(|meta| meta.get("e"))
            .cloned()
            .unwrap_or_else(|| "none".to_owned())
    }

    fn conn(&self, index: u8) -> ConnId {
        let index = usize::from(index) % (self.opened.len() + 1);
        self.opened.get(index).copied().unwrap_or(ConnId(u64::MAX))
    }

    fn session_event(&mut self, conn: ConnId, event: SessionEvent) {
        self.replica.handle_session_event(self.now, conn, &event);
    }

    /// Drain the replica and check what it asks.
    fn drain(&mut self) {
        while let Some(delivery) = self.replica.poll_delivery() {
            assert!(!matches!(delivery.action, mesa_core::Action::Ignore));
            let sorted: BTreeSet<ConnId> = delivery.targets.iter().copied().collect();
            assert_eq!(sorted.len(), delivery.targets.len(), "targets unique");
            assert!(delivery.targets.windows(2).all(|w| w[0] < w[1]), "sorted");
            for target in &delivery.targets {
                assert!(
                    self.conns.contains_key(target),
                    "delivery to a closed {target:?}"
                );
            }
            if let mesa_core::Action::Write(frame) = &delivery.action {
                for target in &delivery.targets {
                    self.check_position(*target, frame.as_str());
                }
            }
        }
        let mut owed = Vec::new();
        while let Some((token, command)) = self.replica.poll_command() {
            assert!(!self.retired, "{command:?} after retiring");
            assert!(self.tokens.insert(token), "token {token:?} reused");
            let shard = token.shard();
            assert!(shard < self.redis.len(), "{token:?} of no instance");
            if command == Command::Connect {
                // Either the link is down, or its failure is among the events of this
                // same drain (commands are drained first): a zero backoff reconnects
                // at once.
                if self.linked[shard] || self.connecting[shard] {
                    owed.push(shard);
                } else {
                    self.connecting[shard] = true;
                }
                continue;
            }
            assert!(self.linked[shard], "{command:?} without a link");
            self.check_command(&command);
            self.outstanding.push((token, command));
        }
        while let Some(event) = self.replica.poll_event() {
            match event {
                ReplicaEvent::LinkDown { shard, .. } => {
                    self.linked[shard] = false;
                    self.outstanding.retain(|(token, _)| token.shard() != shard);
                    let reconnecting = owed.iter().position(|owed| *owed == shard);
                    self.connecting[shard] = reconnecting.map(|at| owed.remove(at)).is_some();
                }
                ReplicaEvent::Retired => {
                    self.retired = true;
                    self.linked.iter_mut().for_each(|linked| *linked = false);
                }
                ReplicaEvent::Loaded { conn, id, .. } => {
                    assert!(self.asked.contains(&conn), "loaded for {conn:?} unasked");
                    assert!(self.conns.contains_key(&conn), "loaded for closed {conn:?}");
                    let _ = id;
                }
                _ => {}
            }
        }
        assert!(owed.is_empty(), "Connect while linked to {owed:?}");
        let pending = self.replica.pending();
        assert!(pending <= 2 * MAX_PENDING, "{pending} jobs pending");
    }

    fn check_command(&mut self, command: &Command) {
        match command {
            Command::Publish { channel, payload } if channel == "ws" => {
                let envelope = Envelope::decode(payload).expect("our envelope decodes");
                assert_eq!(envelope.origin.as_deref(), Some("me"));
            }
            Command::Route { head, tail, ids } => {
                assert!(!ids.is_empty(), "a route to nobody");
                let envelope =
                    Envelope::decode(&format!("{head}{tail}")).expect("our envelope decodes");
                assert_eq!(envelope.origin.as_deref(), Some("me"));
            }
            Command::Publish { channel, payload } if channel.starts_with("mesa_room:") => {
                let envelope = RoomEnvelope::decode(payload).expect("our room envelope decodes");
                // Ours, or none once the subscription is confirmed (it comes back).
                assert!(matches!(envelope.origin.as_deref(), None | Some("me")));
                assert_ne!(envelope.room, ROOMS[0], "a recoverable room's goes to its stream");
            }
            Command::Publish { payload, .. } => {
                let event = PortalEvent::decode(payload).expect("our portal event decodes");
                assert!(self.portals.contains(&event.portal_id), "unknown portal");
            }
            Command::Trim { id, count, last } => {
                assert!(*count >= 1);
                let loaded = self.loaded.get(id).is_some_and(|l| l.contains(last));
                assert!(loaded, "trim of {last} never loaded for {id}");
            }
            _ => {}
        }
    }

    fn answer(&mut self, which: u8, how: How) {
        if self.outstanding.is_empty() {
            return;
        }
        let index = usize::from(which) % self.outstanding.len();
        let (token, command) = self.outstanding.remove(index);
        let reply = match how {
            How::Right => {
                let calls = command.calls(self.replica.keys());
                let redis = &mut self.redis[token.shard()];
                let values = redis
                    .execute(self.now, &calls)
                    .unwrap_or_else(|error| panic!("{command:?} failed on Redis: {error}"));
                redis
                    .check_upstream_contract(self.now, self.replica.keys().namespace())
                    .unwrap_or_else(|broken| panic!("after {command:?}: {broken}"));
                let _ = redis.take_published();
                if let (Command::Load { id }, Some(RedisValue::Text(raw))) =
                    (&command, values.first())
                {
                    let entries = mesa_core::sync::stored_entries(raw).unwrap_or_default();
                    let loaded = self.loaded.entry(id.clone()).or_default();
                    loaded.extend(entries.into_iter().map(str::to_owned));
                }
                Ok(values)
            }
            How::Wrong => Ok(vec![RedisValue::Array(vec![RedisValue::Nil])]),
            How::Error => Err("ERR fuzzed".to_owned()),
        };
        self.replica.handle_reply(self.now, token, reply);
    }
}

fuzz_target!(|input: (bool, bool, Vec<Op>)| {
    let (legacy_bus, two, ops) = input;
    // Several instances need the legacy bus off.
    let shards = if two && !legacy_bus { 2 } else { 1 };
    let config = ReplicaConfig {
        legacy_bus,
        shards,
        sync: true,
        max_pending: MAX_PENDING,
        max_stored_per_id: 3,
        portals: Some(PortalChoice::RoundRobin),
        recovery: Some(RecoveryConfig {
            rooms: vec![ROOMS[0].to_owned()],
            size: 4,
            users: true,
            broadcast: true,
            ..RecoveryConfig::default()
        }),
        ..ReplicaConfig::default()
    };
    let now = start();
    let mut h = Harness {
        replica: Replica::new(config, "me", 7, now).expect("valid"),
        redis: (0..shards).map(|_| RedisModel::new()).collect(),
        now,
        conns: BTreeMap::new(),
        opened: Vec::new(),
        outstanding: Vec::new(),
        tokens: BTreeSet::new(),
        linked: vec![false; shards],
        connecting: vec![false; shards],
        retired: false,
        asked: BTreeSet::new(),
        loaded: HashMap::new(),
        portals: BTreeSet::new(),
        positions: HashMap::new(),
        extended: BTreeSet::new(),
    };
    h.drain();
    for op in ops {
        let now = h.now;
        match op {
            Op::Open => {
                let conn = h.replica.handle_connection_opened(now);
                assert!(!h.conns.contains_key(&conn));
                h.conns.insert(conn, None);
                h.opened.push(conn);
            }
            Op::Authenticate { conn, id } => {
                let conn = h.conn(conn);
                if let Some(held) = h.conns.get_mut(&conn) {
                    let id = IDS[usize::from(id) % IDS.len()].to_owned();
                    *held = Some(id.clone());
                    let user = json!({});
                    h.session_event(
                        conn,
                        SessionEvent::Authenticated {
                            id,
                            user,
                            initial: true,
                        },
                    );
                }
            }
            Op::Message { conn } => {
                let conn = h.conn(conn);
                let message = Message::dispatch("HI", json!({}));
                h.session_event(conn, SessionEvent::Message(message));
            }
            Op::Load { conn } => {
                let conn = h.conn(conn);
                if let Some(Some(id)) = h.conns.get(&conn).cloned() {
                    h.asked.insert(conn);
                    h.session_event(conn, SessionEvent::LoadUndelivered { id });
                }
            }
            Op::Clear { conn } => {
                let conn = h.conn(conn);
                if let Some(Some(id)) = h.conns.get(&conn).cloned() {
                    h.session_event(conn, SessionEvent::ClearUndelivered { id });
                }
            }
            Op::Redelivered {
                conn,
                delivered,
                dropped,
            } => {
                let conn = h.conn(conn);
                if let Some(Some(id)) = h.conns.get(&conn).cloned() {
                    let (delivered, dropped) =
                        (usize::from(delivered % 5), usize::from(dropped % 3));
                    let event = SessionEvent::Redelivered {
                        id,
                        delivered,
                        dropped,
                    };
                    h.session_event(conn, event);
                }
            }
            Op::Close { conn } => {
                let conn = h.conn(conn);
                let close = Close::new(CloseCode::NORMAL, "");
                h.session_event(
                    conn,
                    SessionEvent::Closed {
                        close,
                        by_peer: true,
                    },
                );
                h.conns.remove(&conn);
                h.positions.retain(|(c, _), _| *c != conn);
            }
            Op::Send {
                ids,
                global,
                internal,
                no_sync,
            } => {
                let recipients = if global {
                    Recipients::All
                } else {
                    Recipients::Ids(
                        ids.iter()
                            .map(|i| IDS[usize::from(*i) % IDS.len()].to_owned())
                            .collect(),
                    )
                };
                let message = if internal {
                    Message {
                        t: Some("DISCONNECT_CLIENT".into()),
                        ..Message::new(Opcode::Internal, json!({}))
                    }
                } else {
                    Message::dispatch("M", json!({"n": h.tokens.len()}))
                };
                let options = no_sync.then(MessageOptions::no_sync);
                let report = h
                    .replica
                    .handle_send(now, &message, options.as_ref(), &recipients);
                assert!(report.is_ok(), "a short list is never refused");
            }
            Op::Envelope {
                ours,
                ids,
                disconnect,
            } => {
                let message = if disconnect {
                    Message {
                        t: Some("DISCONNECT_CLIENT".into()),
                        ..Message::new(Opcode::Internal, json!({}))
                    }
                } else {
                    Message::dispatch("E", json!({}))
                };
                let envelope = Envelope {
                    message,
                    options: None,
                    recipients: Recipients::from_ids(
                        ids.iter()
                            .map(|i| IDS[usize::from(*i) % IDS.len()].to_owned())
                            .collect(),
                    ),
                    origin: ours.then(|| "me".to_owned()),
                    streamed: false,
                };
                h.replica.handle_pubsub(now, "ws", &envelope.encode());
            }
            Op::Portal { id, ready } => {
                let id = format!("p{}", id % 3);
                if ready {
                    h.portals.insert(id.clone());
                }
                let update = PortalUpdate { id, ready };
                h.replica
                    .handle_pubsub(now, "available_portals_pool", &update.encode());
            }
            Op::Garbage { channel, text } => {
                let channel = ["ws", "available_portals_pool", "mesa_room:r0"]
                    [usize::from(channel) % 3];
                h.replica.handle_pubsub(now, channel, &text);
            }
            Op::Answer { which, how } => h.answer(which, how),
            Op::AnswerStale { token } => {
                let token = Token(token);
                if !h.outstanding.iter().any(|(t, _)| *t == token) {
                    let before = h.replica.pending();
                    h.replica
                        .handle_reply(now, token, Ok(vec![RedisValue::Nil]));
                    assert_eq!(
                        h.replica.pending(),
                        before,
                        "a stale answer changed the work"
                    );
                }
            }
            Op::LinkUp { shard, restarted } => {
                let shard = usize::from(shard) % shards;
                if h.connecting[shard] {
                    if restarted {
                        h.redis[shard].restart(true);
                    }
                    h.connecting[shard] = false;
                    h.linked[shard] = true;
                    let run_id = h.redis[shard].run_id().to_owned();
                    h.replica.handle_link_up(now, shard, &run_id);
                }
            }
            Op::LinkDown { shard } => {
                let shard = usize::from(shard) % shards;
                h.replica.handle_link_down(now, shard, "fuzzed");
            }
            Op::Advance { ms } => {
                h.now += Duration::from_millis(u64::from(ms));
                let now = h.now;
                if h.replica.poll_timeout().is_some_and(|at| at <= now) {
                    h.replica.handle_timeout(now);
                    h.drain();
                    h.replica.handle_timeout(now);
                    assert!(
                        h.replica.poll_command().is_none(),
                        "a second timeout did more"
                    );
                    assert!(
                        h.replica.poll_timeout().is_none_or(|at| at > now),
                        "due after firing"
                    );
                }
            }
            Op::Retire => h.replica.handle_retire(now),
            Op::Extend {
                conn,
                user,
                broadcast,
            } => {
                let conn = h.conn(conn);
                if h.conns.contains_key(&conn) {
                    h.extended.insert(conn);
                    let at = |stream: &str, at: Option<(bool, u8)>| {
                        at.map(|(stale, offset)| Position {
                            epoch: if stale { "stale".into() } else { h.epoch(stream) },
                            offset: offset.into(),
                        })
                    };
                    let since = Since {
                        user: at(&Personal::User.stream(IDS[0]), user),
                        broadcast: at(&Personal::Broadcast.stream(""), broadcast),
                    };
                    h.session_event(conn, SessionEvent::Extended { since });
                }
            }
            Op::Join { conn, room, since } => {
                let conn = h.conn(conn);
                let room = ROOMS[usize::from(room) % ROOMS.len()];
                let since = since.map(|(stale, offset)| Position {
                    epoch: if stale { "stale".into() } else { h.epoch(room) },
                    offset: offset.into(),
                });
                let joined = h
                    .replica
                    .handle_subscribe(now, conn, room, json!(1), since);
                if let Ok(joined) = joined {
                    assert!(h.conns.contains_key(&conn), "a closed connection joined");
                    assert_eq!(
                        joined.deferred,
                        room == ROOMS[0] && h.extended.contains(&conn),
                        "only an extended member of a recoverable room is answered later"
                    );
                }
            }
            Op::Leave { conn, room } => {
                let conn = h.conn(conn);
                let room = ROOMS[usize::from(room) % ROOMS.len()];
                h.replica.handle_leave(now, conn, room);
                h.positions.remove(&(conn, room.to_owned()));
            }
            Op::RoomSend { room } => {
                let room = ROOMS[usize::from(room) % ROOMS.len()];
                let message = Message::dispatch("R", json!({}));
                h.replica.handle_room_send(now, &message, room);
            }
            Op::RoomArrive {
                room,
                offset,
                other_epoch,
            } => {
                let room = ROOMS[usize::from(room) % ROOMS.len()];
                let epoch = if other_epoch {
                    "other".to_owned()
                } else {
                    h.epoch(room)
                };
                let envelope = RoomEnvelope {
                    room: room.to_owned(),
                    message: Message::dispatch("R", json!({})),
                    origin: None,
                    position: Some(Position {
                        epoch,
                        offset: offset.into(),
                    }),
                };
                let channel = format!("mesa_room:{room}");
                h.replica.handle_pubsub(now, &channel, &envelope.encode());
            }
        }
        h.drain();
    }
});
