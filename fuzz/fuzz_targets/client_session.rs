//! Operation sequences replayed against a `ClientSession` on a virtual clock, checked
//! step by step against a small reference model of the client.
//!
//! Invariants:
//! - every command and transport input succeeds exactly when the model says it may;
//!   misuse is an `Err` of the right kind, never a panic;
//! - the outputs of each step are exactly the model's, in order (frames compared as
//!   decoded messages; the jittered reconnect time is taken from the session and then
//!   checked against its bounds);
//! - nothing is written before the hello; the send queue (with the publishes waiting
//!   for rooms) never exceeds `limits.max_queued_sends`, and queued sends go out in
//!   order, after the credentials, as soon as the hello arrives;
//! - every op 2 carries the rooms opt-in exactly when the client wants rooms and the
//!   hello has the `rooms` rule; room requests go out only on a connection that
//!   carries rooms (after the hello on a server without authentication, else after op
//!   22), the held subscriptions first, in order, each under a reference not used on
//!   that connection before; at most `max_rooms_per_connection` are held;
//! - after `disconnect`, no `ClientTransmit::Connect` is emitted until `connect`;
//! - every `Disconnected { reconnect_at: Some(at) }` has
//!   `now <= at <= now + min(cap, base · 2^attempt)` (so `at <= now + cap`);
//! - `poll_timeout()` is the model's next deadline, and `handle_timeout(now)` fires
//!   everything due (the next deadline is later) and does nothing when early.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::recovery::{Personal, Position, Since};
use mesa_core::rooms::{self, RoomNotice, RoomRequest};
use mesa_core::{
    BackoffConfig, ClientConfig, ClientError, ClientEvent, ClientSession, ClientTransmit, Close,
    CloseCode, Limits, Message, Opcode, Reference,
};
use serde_json::{Value, json};

const VERSION: &str = "1.5.8";

/// The rooms ops name (the last is invalid).
const ROOMS: [&str; 4] = ["a", "b", "c", "not a room"];

fn room(index: u8) -> &'static str {
    ROOMS[usize::from(index) % ROOMS.len()]
}

#[derive(Arbitrary, Debug)]
struct Setup {
    reconnect: bool,
    base_is_fixed: bool,
    base_ms: u16,
    cap_extra_ms: u16,
    heartbeat_max_attempts: u8,
    with_version: bool,
    seed: u64,
    rooms: bool,
    max_rooms: u8,
}

/// Frames a real server sends, so the fuzzer reaches past the decoder quickly.
#[derive(Arbitrary, Debug)]
enum Known {
    Hello {
        heartbeat_ms: Option<u16>,
        reconnect_ms: Option<u16>,
        enforce_equal_versions: bool,
        rooms: bool,
        authentication: bool,
    },
    Heartbeat,
    Authenticated(String),
    Dispatch(String),
    /// `mesa:subscribed` (`None`: null reference, the server acting on its own).
    Subscribed(u8, Option<u8>),
    Unsubscribed(u8, Option<u8>),
    Refused(u8, Option<u8>),
    /// A room's message, at this offset of a recoverable room's stream.
    RoomMessage(u8, Option<u8>),
    /// `mesa:join` (`true`) or `mesa:leave` of an id.
    Presence(u8, bool, String),
    /// `mesa:presence`: the answer to a presence request.
    Members(u8, Option<u8>),
    /// A send from the personal (`false`) or broadcast stream, at this offset.
    StreamMessage(bool, Option<u8>),
    /// `mesa:resumed` of the personal (`false`) or broadcast stream, at this
    /// offset, with `recovered`.
    Resumed(bool, Option<u8>, Option<bool>),
}

fn personal(broadcast: bool) -> Personal {
    if broadcast {
        Personal::Broadcast
    } else {
        Personal::User
    }
}

fn at(offset: Option<u8>) -> Option<Position> {
    offset.map(|offset| Position {
        epoch: "e".into(),
        offset: offset.into(),
    })
}

impl Known {
    fn text(&self) -> String {
        let message = match self {
            Known::Hello {
                heartbeat_ms,
                reconnect_ms,
                enforce_equal_versions,
                rooms,
                authentication,
            } => {
                let mut d = json!({});
                if let Some(ms) = heartbeat_ms {
                    d["c_heartbeat_interval"] = json!(ms);
                }
                if let Some(ms) = reconnect_ms {
                    d["c_reconnect_interval"] = json!(ms);
                }
                if *authentication {
                    d["c_authentication_timeout"] = json!(10_000);
                }
                let rules = [
                    (*enforce_equal_versions, "enforce_equal_versions"),
                    (*rooms, rooms::ROOMS_RULE),
                ];
                d["rules"] = rules
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, rule)| json!(rule))
                    .collect();
                Message::new(Opcode::Hello, d)
            }
            Known::Heartbeat => Message::new(Opcode::Heartbeat, json!({})),
            Known::Authenticated(id) => Message::new(Opcode::Authenticated, json!({ "id": id })),
            Known::Dispatch(t) => Message::dispatch(t.clone(), json!({"x": 1})),
            Known::Subscribed(r, reference) => return notice("subscribed", *r, *reference),
            Known::Unsubscribed(r, reference) => return notice("unsubscribed", *r, *reference),
            Known::Refused(r, reference) => return notice("error", *r, *reference),
            Known::Presence(r, joined, id) => {
                let kind = if *joined { "mesa:join" } else { "mesa:leave" };
                Message::dispatch(kind, json!({"room": room(*r), "id": id}))
            }
            Known::Members(r, reference) => Message::dispatch(
                "mesa:presence",
                json!({"room": room(*r), "ref": reference, "members": {"alice": 2}}),
            ),
            Known::StreamMessage(broadcast, offset) => {
                let message = Message::dispatch("SENT", json!({"x": 1}));
                let stream = personal(*broadcast).stream("");
                return rooms::room_frame(&message, &stream, at(*offset).as_ref())
                    .as_str()
                    .to_owned();
            }
            Known::Resumed(broadcast, offset, recovered) => {
                let notice = RoomNotice::Subscribed {
                    room: personal(*broadcast).stream(""),
                    reference: Value::Null,
                    position: at(*offset),
                    recovered: *recovered,
                };
                return notice.encode().as_str().to_owned();
            }
            Known::RoomMessage(r, offset) => {
                let message = Message::dispatch("CHAT", json!({"x": 1}));
                let position = offset.map(|offset| Position {
                    epoch: "e".into(),
                    offset: offset.into(),
                });
                return rooms::room_frame(&message, room(*r), position.as_ref())
                    .as_str()
                    .to_owned();
            }
        };
        message.encode().as_str().to_owned()
    }
}

/// A control dispatch from the server about `room`.
fn notice(kind: &str, r: u8, reference: Option<u8>) -> String {
    let d = json!({
        "room": room(r),
        "ref": reference,
        "code": "unauthorized",
        "reason": "no",
    });
    Message::dispatch(format!("mesa:{kind}"), d)
        .encode()
        .as_str()
        .to_owned()
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Connected,
    ConnectFailed,
    Frame(String),
    Known(Known),
    Closed(Option<u16>),
    Advance(u16),
    /// `None` passes credentials that are not an object (misuse).
    Authenticate {
        token: Option<String>,
        should_sync: bool,
    },
    Send,
    Disconnect(u16),
    Subscribe {
        room: u8,
        token: bool,
        presence: bool,
    },
    Unsubscribe(u8),
    /// A presence request.
    Presence(u8),
    /// `typed` false publishes a message without a type (misuse).
    Publish {
        room: u8,
        typed: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

/// What the model expects of the current connection's rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Plain,
    OptedIn,
    Rooms,
}

/// The current connection's hello, as far as rooms go.
#[derive(Debug, Clone, Copy)]
struct Greeting {
    rooms: bool,
    authenticates: bool,
}

/// A subscription the model holds.
#[derive(Debug, Clone)]
struct Held {
    room: String,
    token: Option<String>,
    presence: bool,
    pending: Option<u64>,
    position: Option<Position>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting { automatic: bool },
    Open,
    Backoff,
}

/// What the model expects on the transport (frames as decoded messages).
#[derive(Debug, Clone, PartialEq)]
enum Out {
    Connect,
    Text(Message),
    Close(Close),
}

struct Model {
    config: ClientConfig,
    now: Instant,
    state: State,
    /// `disconnect` succeeded and `connect` was not called since.
    stopped: bool,
    initial_connection: bool,
    initial_session: bool,
    credentials: Option<Value>,
    /// The user object of op 22 on the current connection, once authenticated.
    user: Option<Value>,
    queue: Vec<Message>,
    /// The current connection's announced heartbeat interval.
    heartbeat: Option<Duration>,
    base: Duration,
    attempt: u32,
    liveness: Option<Instant>,
    reconnect: Option<Instant>,
    sends: u64,
    /// The hello of the current connection, once it arrived.
    hello: Option<Greeting>,
    link: Link,
    held: Vec<Held>,
    /// The last positions in the personal and broadcast streams.
    streams: Since,
    /// Publishes waiting for a connection that carries rooms.
    waiting: Vec<(u64, String, Message)>,
    /// The last reference drawn.
    last_ref: u64,
    /// References of the room requests written on the current connection.
    refs_on_connection: Vec<u64>,
    // Expected outputs of the current step.
    out: Vec<Out>,
    events: Vec<ClientEvent>,
    /// The reconnect times the session drew in this step, oldest first.
    drawn: VecDeque<Option<Instant>>,
}

impl Model {
    fn next_deadline(&self) -> Option<Instant> {
        self.liveness.into_iter().chain(self.reconnect).min()
    }

    fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(31);
        self.base
            .saturating_mul(factor)
            .min(self.config.backoff.cap)
    }

    fn window(&self, interval: Duration) -> Duration {
        interval.saturating_mul(self.config.heartbeat_max_attempts + 1)
    }

    fn connecting(&mut self, automatic: bool) {
        assert!(
            !self.stopped,
            "Connect emitted after disconnect and before connect"
        );
        self.state = State::Connecting { automatic };
        self.out.push(Out::Connect);
    }

    /// The connection ended without the application asking.
    fn lost(&mut self, close: Close) {
        self.liveness = None;
        self.reconnect = None;
        self.user = None;
        self.heartbeat = None;
        self.end_connection();
        let drawn = self
            .drawn
            .pop_front()
            .expect("the model expected a Disconnected event");
        let reconnect_at = if self.config.reconnect {
            let at = drawn.expect("reconnect is on, but no reconnect time");
            assert!(at >= self.now, "reconnect_at before now");
            assert!(
                at <= self.now + self.config.backoff.cap,
                "reconnect_at beyond the backoff cap"
            );
            let ceiling = self.ceiling();
            assert!(
                at - self.now <= ceiling,
                "delay {:?} above the ceiling {ceiling:?} of attempt {}",
                at - self.now,
                self.attempt
            );
            self.attempt += 1;
            self.reconnect = Some(at);
            self.state = State::Backoff;
            Some(at)
        } else {
            assert_eq!(drawn, None, "reconnect is off, but a reconnect time");
            self.state = State::Idle;
            None
        };
        self.events.push(ClientEvent::Disconnected {
            close,
            reconnect_at,
        });
    }

    fn handle_timeout(&mut self) {
        if self.liveness.is_some_and(|at| at <= self.now) {
            self.liveness = None;
            let close = Close::new(CloseCode::GOING_AWAY, "heartbeat timeout: server silent");
            self.out.push(Out::Close(close.clone()));
            self.lost(close);
        }
        if self.reconnect.is_some_and(|at| at <= self.now) {
            self.reconnect = None;
            self.connecting(true);
        }
    }

    fn refresh_liveness(&mut self) {
        if let Some(interval) = self.heartbeat {
            self.liveness = Some(self.now + self.window(interval));
        }
    }

    fn frame(&mut self, text: &str) {
        if self.state != State::Open {
            return;
        }
        self.refresh_liveness();
        let opted_in = self.link != Link::Plain;
        let decoded = if opted_in {
            rooms::decode_room_message(text, &self.config.limits)
        } else {
            Message::decode(text, &self.config.limits).map(|message| rooms::RoomFrame {
                message,
                room: None,
                stream: None,
                position: None,
            })
        };
        let rooms::RoomFrame {
            message,
            room,
            stream,
            position,
        } = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                self.events.push(ClientEvent::InvalidFrame(error));
                return;
            }
        };
        match message.op {
            Opcode::Hello => {
                let millis = |key: &str| {
                    message
                        .d
                        .get(key)
                        .and_then(Value::as_u64)
                        .filter(|ms| *ms > 0)
                        .map(Duration::from_millis)
                };
                if let Some(base) = millis("c_reconnect_interval")
                    && !self.config.backoff.base_is_fixed
                {
                    self.base = base.min(self.config.backoff.cap);
                }
                self.attempt = 0;
                let enforce = message
                    .d
                    .get("rules")
                    .and_then(Value::as_array)
                    .is_some_and(|rules| rules.iter().any(|r| r == "enforce_equal_versions"));
                if enforce && let Some(version) = &self.config.version {
                    self.out.push(Out::Text(Message::dispatch(
                        "CLIENT_VERSION",
                        json!({ "v": version }),
                    )));
                }
                self.heartbeat = millis("c_heartbeat_interval");
                if self.heartbeat.is_none() {
                    // A hello without heartbeats ends the dead-server watch.
                    self.liveness = None;
                }
                self.refresh_liveness();
                // Every hello replaces the last; only the first is answered.
                let first = self.hello.is_none();
                let has = |rule: &str| {
                    message
                        .d
                        .get("rules")
                        .and_then(Value::as_array)
                        .is_some_and(|rules| rules.iter().any(|r| r == rule))
                };
                self.hello = Some(Greeting {
                    rooms: has(rooms::ROOMS_RULE),
                    authenticates: millis("c_authentication_timeout").is_some(),
                });
                if first {
                    self.greet();
                }
            }
            Opcode::Heartbeat => self
                .out
                .push(Out::Text(Message::new(Opcode::HeartbeatAck, json!({})))),
            Opcode::Authenticated => {
                self.user = Some(message.d.clone());
                self.events
                    .push(ClientEvent::Authenticated { user: message.d });
                if self.link == Link::OptedIn {
                    self.start_rooms();
                }
            }
            Opcode::Dispatch if opted_in => match (RoomNotice::parse(&message), room) {
                (Some(notice), _) => self.notice(notice),
                (None, Some(room)) => {
                    self.moved(&room, position.as_ref());
                    self.events.push(ClientEvent::RoomMessage {
                        room,
                        message,
                        position,
                    })
                }
                (None, None) => {
                    self.events.push(ClientEvent::Message(message));
                    if let (Some(stream), Some(position)) = (stream, position) {
                        *self.streams.get_mut(stream) = Some(position.clone());
                        self.events
                            .push(ClientEvent::StreamPosition { stream, position });
                    }
                }
            },
            _ => self.events.push(ClientEvent::Message(message)),
        }
    }

    // ----- rooms -----

    fn end_connection(&mut self) {
        self.hello = None;
        self.link = Link::Plain;
        self.refs_on_connection.clear();
    }

    fn draw(&mut self) -> u64 {
        self.last_ref += 1;
        self.last_ref
    }

    fn spoken(&self) -> bool {
        self.state == State::Open && self.hello.is_some()
    }

    fn carries(&self) -> bool {
        self.state == State::Open && self.link == Link::Rooms
    }

    fn opts_in(&self) -> bool {
        self.config.rooms && self.hello.is_some_and(|h| h.rooms)
    }

    fn queued(&self) -> usize {
        self.queue.len() + self.waiting.len()
    }

    fn request(&mut self, request: RoomRequest) {
        let (RoomRequest::Subscribe { reference, .. }
        | RoomRequest::Unsubscribe { reference, .. }
        | RoomRequest::Publish { reference, .. }
        | RoomRequest::Presence { reference, .. }) = &request;
        let reference = reference.as_u64().expect("a numbered reference");
        assert!(
            !self.refs_on_connection.contains(&reference),
            "reference {reference} used twice on one connection"
        );
        self.refs_on_connection.push(reference);
        let message = Message::decode(request.encode().as_str(), &Limits::default())
            .expect("a request decodes");
        self.out.push(Out::Text(message));
    }

    fn send_credentials(&mut self, mut data: Value) {
        if self.opts_in() {
            data["mesa"] = json!({"caps": ["rooms"]});
            if let Some(since) = self.streams.to_value() {
                data["mesa"]["since"] = since;
            }
            if self.link == Link::Plain {
                self.link = Link::OptedIn;
            }
        }
        self.out
            .push(Out::Text(Message::new(Opcode::Authenticate, data)));
    }

    fn greet(&mut self) {
        let hello = self.hello.expect("greeted after the hello");
        let alone = self.opts_in() && !hello.authenticates;
        match self.credentials.clone() {
            Some(credentials) => self.send_credentials(credentials),
            None if alone => self.send_credentials(json!({})),
            None => {}
        }
        if alone {
            self.start_rooms();
        }
        if !hello.rooms {
            let mut dropped: Vec<(Reference, String)> = self
                .held
                .iter()
                .filter_map(|h| h.pending.map(|r| (Reference::from_u64(r), h.room.clone())))
                .collect();
            self.held.retain(|h| h.pending.is_none());
            dropped.extend(
                self.waiting
                    .drain(..)
                    .map(|(r, room, _)| (Reference::from_u64(r), room)),
            );
            if !dropped.is_empty() {
                self.events.push(ClientEvent::RoomsUnavailable { dropped });
            }
        }
        for message in std::mem::take(&mut self.queue) {
            self.out.push(Out::Text(message));
        }
    }

    fn start_rooms(&mut self) {
        self.link = Link::Rooms;
        for index in 0..self.held.len() {
            if self.held[index].pending.is_none() {
                self.held[index].pending = Some(self.draw());
            }
            let held = self.held[index].clone();
            self.request(RoomRequest::Subscribe {
                room: held.room,
                reference: json!(held.pending),
                token: held.token,
                presence: held.presence,
                since: held.position,
            });
        }
        for (reference, room, message) in std::mem::take(&mut self.waiting) {
            self.request(RoomRequest::Publish {
                room,
                message,
                reference: json!(reference),
            });
        }
    }

    /// A held room's last position, as the client keeps it for its next subscribe.
    fn moved(&mut self, room: &str, position: Option<&Position>) {
        if let (Some(held), Some(position)) =
            (self.held.iter_mut().find(|h| h.room == room), position)
        {
            held.position = Some(position.clone());
        }
    }

    fn notice(&mut self, notice: RoomNotice) {
        if let RoomNotice::Subscribed {
            room,
            position,
            recovered,
            ..
        } = &notice
            && let Some(stream) = Personal::of_stream(room)
        {
            if let Some(position) = position {
                *self.streams.get_mut(stream) = Some(position.clone());
            }
            return self.events.push(ClientEvent::Resumed {
                stream,
                position: position.clone(),
                recovered: *recovered,
            });
        }
        let event = match notice {
            RoomNotice::Subscribed {
                room,
                reference,
                position,
                recovered,
            } => {
                let reference = reference.as_u64();
                self.moved(&room, position.as_ref());
                if let Some(held) = self
                    .held
                    .iter_mut()
                    .find(|h| h.room == room && reference.is_some() && h.pending == reference)
                {
                    held.pending = None;
                }
                ClientEvent::Subscribed {
                    room,
                    reference: reference.map(Reference::from_u64),
                    position,
                    recovered,
                }
            }
            RoomNotice::Unsubscribed { room, reference } => {
                let reference = reference.as_u64();
                if reference.is_none() {
                    self.held.retain(|h| h.room != room || h.pending.is_some());
                }
                ClientEvent::Unsubscribed {
                    room,
                    reference: reference.map(Reference::from_u64),
                }
            }
            RoomNotice::Refused(refused) => {
                let reference = refused.reference.as_u64();
                if reference.is_some() {
                    self.held.retain(|h| h.pending != reference);
                }
                ClientEvent::RoomRefused {
                    room: refused.room,
                    reference: reference.map(Reference::from_u64),
                    refusal: refused.refusal,
                }
            }
            RoomNotice::Join { room, id } => ClientEvent::MemberJoined { room, id },
            RoomNotice::Leave { room, id } => ClientEvent::MemberLeft { room, id },
            RoomNotice::Members {
                room,
                reference,
                members,
            } => ClientEvent::Members {
                room,
                reference: reference.as_u64().map(Reference::from_u64),
                members,
            },
        };
        self.events.push(event);
    }

    /// The checks of a command naming a room, in the session's order.
    fn check_room(&self, room: &str) -> Result<(), ClientError> {
        if !self.config.rooms {
            return Err(ClientError::RoomsDisabled);
        }
        rooms::check_room(room, &self.config.limits).map_err(ClientError::InvalidRoom)?;
        if self.spoken() && !self.hello.is_some_and(|h| h.rooms) {
            return Err(ClientError::NoRooms);
        }
        Ok(())
    }

    fn presence(&mut self, room: &str) -> Result<Reference, ClientError> {
        self.check_room(room)?;
        if !self.carries() {
            return Err(ClientError::NotCarryingRooms);
        }
        let reference = self.draw();
        self.request(RoomRequest::Presence {
            room: room.to_owned(),
            reference: json!(reference),
        });
        Ok(Reference::from_u64(reference))
    }

    fn subscribe(
        &mut self,
        room: &str,
        token: Option<String>,
        presence: bool,
    ) -> Result<Reference, ClientError> {
        self.check_room(room)?;
        let max = self.config.limits.max_rooms_per_connection;
        let index = match self.held.iter().position(|h| h.room == room) {
            Some(index) => index,
            None if self.held.len() >= max => return Err(ClientError::TooManyRooms(max)),
            None => {
                self.held.push(Held {
                    room: room.to_owned(),
                    token: None,
                    presence,
                    pending: None,
                    position: None,
                });
                self.held.len() - 1
            }
        };
        let carries = self.carries();
        let reference = match self.held[index].pending {
            Some(reference) if !carries => reference,
            _ => self.draw(),
        };
        self.held[index].token = token;
        self.held[index].presence = presence;
        self.held[index].pending = Some(reference);
        if carries {
            let held = self.held[index].clone();
            self.request(RoomRequest::Subscribe {
                room: held.room,
                reference: json!(reference),
                token: held.token,
                presence: held.presence,
                since: held.position,
            });
        }
        Ok(Reference::from_u64(reference))
    }

    fn unsubscribe(&mut self, room: &str) -> Result<Reference, ClientError> {
        if !self.config.rooms {
            return Err(ClientError::RoomsDisabled);
        }
        rooms::check_room(room, &self.config.limits).map_err(ClientError::InvalidRoom)?;
        let held = self.held.iter().any(|h| h.room == room);
        self.held.retain(|h| h.room != room);
        if !held && !self.carries() {
            return Err(ClientError::NotSubscribed);
        }
        let reference = self.draw();
        if self.carries() {
            self.request(RoomRequest::Unsubscribe {
                room: room.to_owned(),
                reference: json!(reference),
            });
        } else {
            self.events.push(ClientEvent::Unsubscribed {
                room: room.to_owned(),
                reference: Some(Reference::from_u64(reference)),
            });
        }
        Ok(Reference::from_u64(reference))
    }

    fn publish(&mut self, room: &str, message: Message) -> Result<Reference, ClientError> {
        self.check_room(room)?;
        if message.t.as_deref().is_none_or(|t| t.starts_with("mesa:")) {
            return Err(ClientError::InvalidRoomMessage);
        }
        if !self.carries() {
            if self.queued() >= self.config.limits.max_queued_sends {
                return Err(ClientError::QueueFull(self.queued()));
            }
            let reference = self.draw();
            self.waiting.push((reference, room.to_owned(), message));
            return Ok(Reference::from_u64(reference));
        }
        let reference = self.draw();
        self.request(RoomRequest::Publish {
            room: room.to_owned(),
            message,
            reference: json!(reference),
        });
        Ok(Reference::from_u64(reference))
    }
}

struct Harness {
    session: ClientSession,
    model: Model,
}

impl Harness {
    fn new(setup: &Setup) -> Self {
        let base = Duration::from_millis(u64::from(setup.base_ms % 2_000) + 1);
        let config = ClientConfig {
            reconnect: setup.reconnect,
            backoff: BackoffConfig {
                base,
                cap: base + Duration::from_millis(u64::from(setup.cap_extra_ms % 10_000)),
                base_is_fixed: setup.base_is_fixed,
            },
            heartbeat_max_attempts: u32::from(setup.heartbeat_max_attempts % 4) + 1,
            version: setup.with_version.then(|| VERSION.to_owned()),
            limits: Limits {
                max_message_bytes: 256,
                max_json_depth: 4,
                max_queued_sends: 4,
                max_stored_per_id: 3,
                max_rooms_per_connection: usize::from(setup.max_rooms % 4) + 1,
                ..Limits::default()
            },
            rooms: setup.rooms,
        };
        let session = ClientSession::new(config.clone(), setup.seed).expect("valid config");
        Harness {
            session,
            model: Model {
                base: config.backoff.base,
                config,
                now: Instant::now(),
                state: State::Idle,
                stopped: false,
                initial_connection: true,
                initial_session: true,
                credentials: None,
                user: None,
                queue: Vec::new(),
                heartbeat: None,
                attempt: 0,
                liveness: None,
                reconnect: None,
                sends: 0,
                hello: None,
                link: Link::Plain,
                held: Vec::new(),
                streams: Since::default(),
                waiting: Vec::new(),
                last_ref: 0,
                refs_on_connection: Vec::new(),
                out: Vec::new(),
                events: Vec::new(),
                drawn: VecDeque::new(),
            },
        }
    }

    /// Drain the session; return its transport outputs and events, and queue the
    /// reconnect times it drew for the model.
    fn drain(&mut self) -> (Vec<Out>, Vec<ClientEvent>) {
        let mut out = Vec::new();
        while let Some(transmit) = self.session.poll_transmit() {
            out.push(match transmit {
                ClientTransmit::Connect => Out::Connect,
                ClientTransmit::Text(frame) => Out::Text(
                    Message::decode(frame.as_str(), &Limits::default())
                        .unwrap_or_else(|e| panic!("client wrote an invalid frame {frame:?}: {e}")),
                ),
                ClientTransmit::Close(close) => {
                    assert!(
                        (1000..=1015).contains(&close.code.0),
                        "close code {} out of range",
                        close.code
                    );
                    Out::Close(close)
                }
            });
        }
        let mut events = Vec::new();
        while let Some(event) = self.session.poll_event() {
            if let ClientEvent::Disconnected { reconnect_at, .. } = &event {
                self.model.drawn.push_back(*reconnect_at);
            }
            events.push(event);
        }
        (out, events)
    }

    /// Compare what the session did in this step with what the model expected.
    fn compare(&mut self, what: &dyn std::fmt::Debug, out: Vec<Out>, events: Vec<ClientEvent>) {
        let model = &mut self.model;
        assert!(model.drawn.is_empty(), "{what:?}: unexpected Disconnected");
        assert_eq!(
            out,
            std::mem::take(&mut model.out),
            "{what:?}: transmits differ"
        );
        assert_eq!(
            events,
            std::mem::take(&mut model.events),
            "{what:?}: events differ"
        );
        // A Text after a Close in one step would be written to a dead transport.
        let mut closed = false;
        for o in &out {
            match o {
                Out::Close(_) => closed = true,
                Out::Connect => closed = false,
                Out::Text(_) => assert!(!closed, "{what:?}: a frame after the close"),
            }
        }
        let session = &self.session;
        assert_eq!(
            session.is_open(),
            model.state == State::Open,
            "{what:?}: is_open"
        );
        assert_eq!(
            session.is_authenticated(),
            model.user.is_some(),
            "{what:?}: authenticated"
        );
        assert_eq!(session.queued(), model.queued(), "{what:?}: queue length");
        assert_eq!(
            session.carries_rooms(),
            model.carries(),
            "{what:?}: carries rooms"
        );
        assert!(
            session
                .subscriptions()
                .eq(model.held.iter().map(|h| h.room.as_str())),
            "{what:?}: subscriptions"
        );
        assert!(
            model.held.len() <= model.config.limits.max_rooms_per_connection,
            "more rooms held than allowed"
        );
        assert!(
            session.queued() <= model.config.limits.max_queued_sends,
            "queue over its limit"
        );
        assert_eq!(
            session.backoff().attempt(),
            model.attempt,
            "{what:?}: backoff attempt"
        );
        assert_eq!(
            session.backoff().config().base,
            model.base,
            "{what:?}: backoff base"
        );
        assert_eq!(
            session.hello().and_then(|h| h.heartbeat_interval),
            if model.state == State::Open {
                model.heartbeat
            } else {
                None
            },
            "{what:?}: heartbeat interval"
        );
        assert_eq!(
            session.poll_timeout(),
            model.next_deadline(),
            "{what:?}: poll_timeout"
        );
        if model.stopped {
            assert_eq!(
                session.poll_timeout(),
                None,
                "a timer runs after disconnect"
            );
        }
    }

    /// Fire every deadline up to `target`, one at a time, as an adapter's timer would.
    fn run_until(&mut self, target: Instant) {
        let mut steps = 0u32;
        while let Some(at) = self.session.poll_timeout() {
            if at > target {
                break;
            }
            assert!(at >= self.model.now, "deadline in the past");
            steps += 1;
            assert!(steps < 100_000, "timer livelock");
            self.model.now = at;
            self.session.handle_timeout(at);
            let (out, events) = self.drain();
            self.model.handle_timeout();
            self.compare(&"timeout", out, events);
            if let Some(next) = self.session.poll_timeout() {
                assert!(next > at, "handle_timeout left a due deadline armed");
            }
        }
        self.model.now = target;
        // Early calls do nothing.
        self.session.handle_timeout(target);
        let (out, events) = self.drain();
        self.compare(&"early timeout", out, events);
    }

    fn step(&mut self, op: Op) {
        let now = self.model.now;
        let model = &mut self.model;
        match &op {
            Op::Connect => {
                let result = self.session.connect(now);
                match model.state {
                    State::Idle | State::Backoff => {
                        assert_eq!(result, Ok(()));
                        model.reconnect = None;
                        model.stopped = false;
                        model.connecting(false);
                    }
                    _ => assert_eq!(result, Err(ClientError::AlreadyConnected)),
                }
            }
            Op::Connected => {
                let result = self.session.handle_connected(now);
                if let State::Connecting { automatic } = model.state {
                    assert_eq!(result, Ok(()));
                    model.state = State::Open;
                    model.events.push(ClientEvent::Connected {
                        is_initial_connection: model.initial_connection,
                        is_initial_session_connection: model.initial_session,
                        is_automatic_reconnection: automatic,
                    });
                    model.initial_connection = false;
                    model.initial_session = false;
                    model.user = None;
                    model.heartbeat = None;
                    model.end_connection();
                } else {
                    assert_eq!(result, Err(ClientError::UnexpectedInput));
                }
            }
            Op::ConnectFailed => {
                let connecting = matches!(model.state, State::Connecting { .. });
                let result = self.session.handle_connect_failed(now, "refused");
                let (out, events) = self.drain();
                if connecting {
                    assert_eq!(result, Ok(()));
                    self.model.lost(Close::new(
                        CloseCode::ABNORMAL,
                        "connection failed: refused",
                    ));
                } else {
                    assert_eq!(result, Err(ClientError::UnexpectedInput));
                }
                return self.finish(&op, out, events);
            }
            Op::Frame(text) => {
                self.session.handle_frame(now, text);
                model.frame(text);
            }
            Op::Known(known) => {
                let text = known.text();
                self.session.handle_frame(now, &text);
                model.frame(&text);
            }
            Op::Closed(code) => {
                let close = code.map(|c| Close::new(CloseCode(c), "server closed"));
                self.session.handle_closed(now, close.clone());
                let (out, events) = self.drain();
                if matches!(self.model.state, State::Open | State::Connecting { .. }) {
                    let close = close
                        .unwrap_or_else(|| Close::new(CloseCode::ABNORMAL, "connection dropped"));
                    self.model.lost(close);
                }
                return self.finish(&op, out, events);
            }
            Op::Advance(ms) => {
                self.run_until(now + Duration::from_millis(u64::from(*ms)));
                return;
            }
            Op::Authenticate { token, should_sync } => {
                let credentials = match token {
                    Some(token) => json!({ "token": token }),
                    None => json!("not an object"),
                };
                let result = self
                    .session
                    .authenticate(now, credentials.clone(), *should_sync);
                match credentials {
                    Value::Object(mut data) => {
                        assert_eq!(result, Ok(()));
                        data.insert("shouldSync".into(), Value::Bool(*should_sync));
                        let data = Value::Object(data);
                        if model.spoken() {
                            model.send_credentials(data.clone());
                            // Servers take a re-authentication silently: it resolves at once.
                            if let Some(user) = model.user.clone() {
                                model.events.push(ClientEvent::Authenticated { user });
                            }
                        }
                        model.credentials = Some(data);
                    }
                    _ => assert_eq!(result, Err(ClientError::InvalidCredentials)),
                }
            }
            Op::Send => {
                model.sends += 1;
                let message = Message::dispatch("SEND", json!({ "n": model.sends }));
                let result = self.session.send(now, message.clone());
                if model.spoken() {
                    assert_eq!(result, Ok(()));
                    model.out.push(Out::Text(message));
                } else if model.queued() < model.config.limits.max_queued_sends {
                    assert_eq!(result, Ok(()));
                    model.queue.push(message);
                } else {
                    assert_eq!(result, Err(ClientError::QueueFull(model.queued())));
                }
            }
            Op::Disconnect(code) => {
                let code = if (1000..=1015).contains(code) {
                    *code
                } else {
                    1000 + code % 16
                };
                let close = Close::new(CloseCode(code), "bye");
                let result = self.session.disconnect(now, close.clone());
                match model.state {
                    State::Idle => assert_eq!(result, Err(ClientError::NotConnected)),
                    state => {
                        assert_eq!(result, Ok(()));
                        if state != State::Backoff {
                            model.out.push(Out::Close(close.clone()));
                            model.events.push(ClientEvent::Disconnected {
                                close,
                                reconnect_at: None,
                            });
                        }
                        model.state = State::Idle;
                        model.liveness = None;
                        model.reconnect = None;
                        model.user = None;
                        model.heartbeat = None;
                        model.end_connection();
                        model.initial_session = true;
                        model.stopped = true;
                    }
                }
            }
            Op::Subscribe {
                room: r,
                token,
                presence,
            } => {
                let token = token.then(|| "k".to_owned());
                let result = if *presence {
                    self.session
                        .subscribe_with_presence(now, room(*r), token.as_deref())
                } else {
                    self.session.subscribe(now, room(*r), token.as_deref())
                };
                let expected = model.subscribe(room(*r), token, *presence);
                assert_eq!(result, expected, "subscribe");
            }
            Op::Presence(r) => {
                let result = self.session.presence(now, room(*r));
                assert_eq!(result, model.presence(room(*r)), "presence");
            }
            Op::Unsubscribe(r) => {
                let result = self.session.unsubscribe(now, room(*r));
                assert_eq!(result, model.unsubscribe(room(*r)), "unsubscribe");
            }
            Op::Publish { room: r, typed } => {
                let mut message = Message::dispatch("CHAT", json!({"r": r}));
                if !typed {
                    message.t = None;
                }
                let result = self.session.publish(now, room(*r), message.clone());
                assert_eq!(result, model.publish(room(*r), message), "publish");
            }
        }
        let (out, events) = self.drain();
        self.finish(&op, out, events);
    }

    fn finish(&mut self, op: &Op, out: Vec<Out>, events: Vec<ClientEvent>) {
        if matches!(op, Op::Disconnect(_)) {
            // A deliberate disconnect draws no reconnect time; `compare` checks its event.
            self.model.drawn.clear();
        }
        self.compare(op, out, events);
        // A deadline due now (a zero backoff delay) is fired at once, as an adapter would.
        self.run_until(self.model.now);
    }
}

fuzz_target!(|input: Input| {
    let mut harness = Harness::new(&input.setup);
    let (out, events) = harness.drain();
    assert!(
        out.is_empty() && events.is_empty(),
        "a new client does nothing by itself"
    );
    for op in input.ops {
        harness.step(op);
    }
});
