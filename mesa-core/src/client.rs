//! The client side: connection lifecycle, hello adoption, heartbeat replies,
//! dead-server detection, authentication (and re-authentication after a reconnect),
//! a bounded queue of sends made while disconnected, jittered reconnection, and rooms
//! (subscriptions restored on every connection, see `docs/protocol.md`).
//!
//! A connection speaks only once the server's hello arrived: the hello says whether
//! the server has rooms, and so whether the op 2 carries the opt-in, and op 2 goes
//! before anything queued. Room requests go out once the connection *carries rooms*:
//! at the hello on a server without authentication (after an op 2 holding the opt-in
//! alone), else at op 22, so that the server's authorization knows who asks.
//!
//! Every state change of a client happens in this file; the subscriptions' bookkeeping
//! is in `subscriptions.rs`.

use std::collections::VecDeque;
use std::time::Instant;

use serde_json::{Value, json};

use crate::backoff::{Backoff, BackoffConfig};
use crate::close::{Close, CloseCode};
use crate::config::{ConfigError, validate_limits};
use crate::hello::{Hello, Rule};
use crate::limits::Limits;
use crate::recovery::{Personal, Position, Since};
use crate::rooms::{
    self, CONTROL_PREFIX, OPT_IN_KEY, RoomNotice, RoomRefusal, RoomRequest, check_room,
};
pub use crate::subscriptions::Reference;
use crate::subscriptions::Subscriptions;
use crate::timer::TimerTable;
use crate::wire::{DecodeError, Frame, Message, Opcode};

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Reconnect automatically after a connection is lost. Default true.
    pub reconnect: bool,
    /// Bounds of the reconnection delays.
    pub backoff: BackoffConfig,
    /// Heartbeats the server may skip before the client declares it dead: the
    /// connection is dropped when nothing arrived for `interval × (max + 1)`. Default 3.
    pub heartbeat_max_attempts: u32,
    /// The version sent as `CLIENT_VERSION` when the server enforces equal versions.
    pub version: Option<String>,
    /// Limits on frames from the server, on the send queue and on subscriptions.
    pub limits: Limits,
    /// Opt in to rooms on servers that have them (their hello's `rooms` rule): every
    /// op 2 then carries `"mesa": {"caps": ["rooms"]}`, and on such a server without
    /// authentication an op 2 with the opt-in alone follows the hello. Default true:
    /// it costs those few bytes (and that one frame) only on servers that announce
    /// rooms, and without it the server's own joins arrive as plain
    /// [`ClientEvent::Message`]s whose room is unknown. Off, room commands fail
    /// with [`ClientError::RoomsDisabled`] and no frame of the client mentions rooms.
    pub rooms: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            reconnect: true,
            backoff: BackoffConfig::default(),
            heartbeat_max_attempts: 3,
            version: None,
            limits: Limits::default(),
            rooms: true,
        }
    }
}

impl ClientConfig {
    /// Check the settings once, before a session uses them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backoff.base.is_zero() {
            return Err(ConfigError::ZeroDuration("backoff base"));
        }
        if self.backoff.cap < self.backoff.base {
            return Err(ConfigError::BackoffCapBelowBase);
        }
        if self.heartbeat_max_attempts == 0 {
            return Err(ConfigError::ZeroCount("heartbeat max attempts"));
        }
        validate_limits(&self.limits)
    }
}

/// Something the adapter does with the transport, in order.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum ClientTransmit {
    /// Open a new transport, then call `handle_connected` or `handle_connect_failed`.
    Connect,
    /// Write this text frame.
    Text(Frame),
    /// Close the current transport (or abandon the attempt) with this code and reason.
    Close(Close),
}

/// Something the application learns.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum ClientEvent {
    /// A transport opened.
    Connected {
        /// The first connection of this client ever.
        is_initial_connection: bool,
        /// The first connection since the client was created or deliberately disconnected.
        is_initial_session_connection: bool,
        /// This connection was made by automatic reconnection.
        is_automatic_reconnection: bool,
    },
    /// The server accepted the credentials (op 22); `user` is its data.
    Authenticated {
        /// The user object, or `{}` when the server does not send it.
        user: Value,
    },
    /// An application message from the server.
    Message(Message),
    /// The connection ended or could not be made.
    Disconnected {
        /// Code and reason (1006 when the transport dropped without one).
        close: Close,
        /// When the next attempt starts, if the client will reconnect.
        reconnect_at: Option<Instant>,
    },
    /// A frame from the server could not be decoded; it was skipped.
    InvalidFrame(DecodeError),
    /// The connection is in `room`: the answer to
    /// [`subscribe`](ClientSession::subscribe) (again for every subscription restored
    /// on a new connection, under a reference the client drew), or the server put it
    /// there on its own (`reference: None`; such a room is not restored by the client).
    Subscribed {
        /// The room.
        room: String,
        /// The request answered; `None` when the server acted on its own.
        reference: Option<Reference>,
        /// In a recoverable room: the position the room's messages continue from.
        position: Option<Position>,
        /// In a recoverable room: whether everything missed since the position the
        /// client reported was replayed before this event (`Some(false)`: it was
        /// not, reload the room's state). Also told without a reference when the
        /// server could not forward what a live subscription missed.
        recovered: Option<bool>,
    },
    /// The connection left `room`: the answer to
    /// [`unsubscribe`](ClientSession::unsubscribe) (given at once when the
    /// connection does not carry rooms), or the server took it out on its own
    /// (`reference: None`; the subscription then ends).
    Unsubscribed {
        /// The room.
        room: String,
        /// The request answered; `None` when the server acted on its own.
        reference: Option<Reference>,
    },
    /// The server refused a room request; a refused subscribe (or restore) ends the
    /// subscription.
    RoomRefused {
        /// The room the refusal names.
        room: Option<String>,
        /// The request refused.
        reference: Option<Reference>,
        /// Its code and reason.
        refusal: RoomRefusal,
    },
    /// A message published to a room the connection is in.
    RoomMessage {
        /// The room.
        room: String,
        /// The message (`op` 0 with its `t` and `d`).
        message: Message,
        /// Its position in a recoverable room's stream.
        position: Option<Position>,
    },
    /// `id` has its first connection in `room` (over the cluster): told to a
    /// subscription made with presence ([`subscribe_with_presence`](ClientSession::subscribe_with_presence)).
    MemberJoined {
        /// The room.
        room: String,
        /// The id that joined.
        id: String,
    },
    /// `id`'s last connection in `room` left it.
    MemberLeft {
        /// The room.
        room: String,
        /// The id that left.
        id: String,
    },
    /// The answer to [`presence`](ClientSession::presence): who is in `room`.
    Members {
        /// The room.
        room: String,
        /// The request answered.
        reference: Option<Reference>,
        /// Each id in the room with its connections in it, by id.
        members: Vec<(String, u64)>,
    },
    /// The server of this connection has no rooms (its hello lacks the `rooms` rule),
    /// so the room requests that waited for an answer or for a connection are
    /// dropped; subscriptions the server confirmed before are kept for the next
    /// server that has rooms.
    RoomsUnavailable {
        /// Each request dropped, with its room.
        dropped: Vec<(Reference, String)>,
    },
    /// The [`ClientEvent::Message`] just before this event came from the client's
    /// personal or broadcast stream, at `position`: what a client that keeps its
    /// state across restarts saves once it handled the message.
    StreamPosition {
        /// Which stream.
        stream: Personal,
        /// The message's position.
        position: Position,
    },
    /// Where the client stands in its personal or broadcast stream (a server that
    /// keeps the sends to ids or the broadcasts in streams), told after every
    /// authentication: the client reported its last position there
    /// ([`stream_positions`](ClientSession::stream_positions)) and the messages it
    /// missed since arrived, as [`ClientEvent::Message`]s, before this event.
    Resumed {
        /// Which stream.
        stream: Personal,
        /// The position the stream's messages continue from.
        position: Option<Position>,
        /// `Some(true)`: everything missed was replayed; `Some(false)`: it could
        /// not be (reload what depends on those messages); `None`: the client
        /// reported no position. Also told (`Some(false)`) when the server could
        /// not forward what a live connection missed.
        recovered: Option<bool>,
    },
}

impl ClientEvent {
    /// For `Disconnected`: whether the client will try again by itself.
    pub fn will_reconnect(&self) -> bool {
        matches!(
            self,
            ClientEvent::Disconnected {
                reconnect_at: Some(_),
                ..
            }
        )
    }
}

/// A command the client cannot carry out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `connect` while a transport is open or being opened.
    #[error("the client is already connected or connecting")]
    AlreadyConnected,
    /// `disconnect` while there is nothing to disconnect.
    #[error("the client is not connected")]
    NotConnected,
    /// The queue of sends made while disconnected is full; this message was not queued.
    #[error("the send queue is full ({0} messages)")]
    QueueFull(usize),
    /// Credentials must be a JSON object (they are merged with `shouldSync`).
    #[error("credentials must be a JSON object")]
    InvalidCredentials,
    /// A transport input arrived that does not match the state (e.g. `handle_connected`
    /// without a pending `Connect`).
    #[error("unexpected transport input in the current state")]
    UnexpectedInput,
    /// A room command while rooms are off in the settings ([`ClientConfig::rooms`]).
    #[error("rooms are off in this client's settings")]
    RoomsDisabled,
    /// A room command on a connection whose server has no rooms (its hello has no
    /// `rooms` rule: an older server, or one started with rooms off).
    #[error("the server has no rooms (its hello has no `rooms` rule)")]
    NoRooms,
    /// The room name is empty, too long, or has a character outside the allowed set.
    #[error("invalid room: {0}")]
    InvalidRoom(RoomRefusal),
    /// The client holds `max_rooms_per_connection` subscriptions already.
    #[error("the client is in the most rooms it may be in ({0})")]
    TooManyRooms(usize),
    /// `unsubscribe` from a room the client does not hold, with no connection that
    /// could ask the server.
    #[error("not subscribed to this room")]
    NotSubscribed,
    /// A room message needs a type `t`, outside the reserved `mesa:` prefix.
    #[error("a room message needs a type `t` that does not start with `mesa:`")]
    InvalidRoomMessage,
    /// A presence request while no connection carries rooms (it is asked of the
    /// connection of the moment, never queued).
    #[error("no connection carries rooms now")]
    NotCarryingRooms,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Reconnect,
    Liveness,
}
const TIMERS: usize = 2;

#[derive(Debug)]
enum State {
    /// Not connected, and not trying: never started, or deliberately disconnected.
    Idle,
    /// A `Connect` was issued; waiting for the transport.
    Connecting { automatic: bool },
    /// The transport is open; it speaks once the hello arrived.
    Open { hello: Option<Hello>, rooms: Link },
    /// Waiting for the reconnect timer.
    Backoff,
}

/// What the current connection does with rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No opt-in went out: no hello yet, no rooms on the server or in the settings,
    /// or no credentials yet on a server that authenticates.
    Plain,
    /// The opt-in went out with the credentials; room requests wait for op 22.
    OptedIn,
    /// Room requests go out at once.
    Rooms,
}

/// The client side of a Mesa connection, across reconnections.
///
/// Methods come in four groups: getters (`is_open`, `is_authenticated`, `hello`,
/// `queued`, `subscriptions`, `carries_rooms`), inputs (`handle_*`), commands
/// (`connect`, `authenticate`, `send`, `subscribe`, `unsubscribe`, `publish`,
/// `disconnect`), and outputs (`poll_*`). After every input or command, drain
/// `poll_transmit` until `None`, then `poll_event` until `None`, then re-arm the timer
/// from `poll_timeout`.
///
/// On every connection the client waits for the hello, then sends `CLIENT_VERSION`
/// (when the server enforces versions), its credentials, its subscriptions (when the
/// connection carries rooms by then), then what was queued.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    state: State,
    backoff: Backoff,
    timers: TimerTable<TIMERS>,
    /// No connection was ever opened.
    initial_connection: bool,
    /// No connection was opened since creation or the last deliberate disconnect.
    initial_session: bool,
    /// The op 2 data to (re)send on every open; set by `authenticate`.
    credentials: Option<Value>,
    /// The user object of op 22 on the current connection, once authenticated.
    user: Option<Value>,
    queue: VecDeque<Message>,
    /// Rooms held and publishes waiting, across connections.
    subscriptions: Subscriptions,
    /// The last positions received in the personal and broadcast streams, reported
    /// at every authentication.
    streams: Since,
    transmits: VecDeque<ClientTransmit>,
    events: VecDeque<ClientEvent>,
}

impl ClientSession {
    /// A client that has not connected yet; `seed` drives the backoff jitter.
    pub fn new(config: ClientConfig, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(ClientSession {
            backoff: Backoff::new(config.backoff, seed),
            config,
            state: State::Idle,
            timers: TimerTable::new(),
            initial_connection: true,
            initial_session: true,
            credentials: None,
            user: None,
            queue: VecDeque::new(),
            subscriptions: Subscriptions::default(),
            streams: Since::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    // ----- getters -----

    /// Whether a transport is open.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Whether the server confirmed the credentials on the current connection.
    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// The hello of the current connection.
    pub fn hello(&self) -> Option<&Hello> {
        match &self.state {
            State::Open { hello, .. } => hello.as_ref(),
            _ => None,
        }
    }

    /// Sends and publishes waiting for a connection (together at most
    /// `limits.max_queued_sends`).
    pub fn queued(&self) -> usize {
        self.queue.len() + self.subscriptions.waiting()
    }

    /// The rooms the client holds, in the order subscribed: sent again on every
    /// connection that carries rooms.
    pub fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.rooms()
    }

    /// Whether room requests go out at once on the current connection (else they wait
    /// for one that carries rooms).
    pub fn carries_rooms(&self) -> bool {
        self.link() == Link::Rooms
    }

    /// The backoff state (attempts so far, current base).
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    // ----- commands -----

    /// Start connecting now (also cuts a pending backoff short).
    pub fn connect(&mut self, _now: Instant) -> Result<(), ClientError> {
        match self.state {
            State::Idle | State::Backoff => {
                self.timers.stop(Timer::Reconnect as usize);
                self.start_connecting(false);
                Ok(())
            }
            State::Connecting { .. } | State::Open { .. } => Err(ClientError::AlreadyConnected),
        }
    }

    /// Authenticate with `credentials` (a JSON object); `should_sync` asks for the
    /// messages stored while offline. Sent now if the hello arrived, else after the
    /// next hello, and again after every reconnection; with the rooms opt-in when the
    /// server has rooms. Resolves with
    /// [`ClientEvent::Authenticated`]: from the server's op 22, or at once on a
    /// connection that is already authenticated, since Mesa servers take a
    /// re-authentication silently (no second op 22; a rejection closes with 1008).
    pub fn authenticate(
        &mut self,
        _now: Instant,
        credentials: Value,
        should_sync: bool,
    ) -> Result<(), ClientError> {
        let Value::Object(mut data) = credentials else {
            return Err(ClientError::InvalidCredentials);
        };
        data.insert("shouldSync".into(), Value::Bool(should_sync));
        let data = Value::Object(data);
        if self.hello().is_some() {
            self.send_credentials(data.clone());
            if let Some(user) = self.user.clone() {
                self.events.push_back(ClientEvent::Authenticated { user });
            }
        }
        self.credentials = Some(data);
        Ok(())
    }

    /// Send `message` now if the hello arrived; otherwise queue it for the next one.
    pub fn send(&mut self, _now: Instant, message: Message) -> Result<(), ClientError> {
        if self.hello().is_some() {
            self.transmit(message);
            return Ok(());
        }
        self.check_queue()?;
        self.queue.push_back(message);
        Ok(())
    }

    /// Subscribe to `room` (with `token` for the server's authorization) and keep the
    /// subscription: it is sent now if the connection carries rooms, else once one
    /// does, and again on every later one. The answer is a [`ClientEvent::Subscribed`]
    /// or a [`ClientEvent::RoomRefused`] with the returned reference. A subscribe not
    /// sent yet shares the reference of one waiting for the same room.
    pub fn subscribe(
        &mut self,
        _now: Instant,
        room: &str,
        token: Option<&str>,
    ) -> Result<Reference, ClientError> {
        self.subscribe_as(room, token, false)
    }

    /// [`subscribe`](Self::subscribe) with `"presence": true`: the connection also
    /// hears which ids join and leave the room ([`ClientEvent::MemberJoined`],
    /// [`ClientEvent::MemberLeft`]), on every connection the subscription is made on.
    pub fn subscribe_with_presence(
        &mut self,
        _now: Instant,
        room: &str,
        token: Option<&str>,
    ) -> Result<Reference, ClientError> {
        self.subscribe_as(room, token, true)
    }

    /// Ask who is in `room` (a room the connection is in): answered by a
    /// [`ClientEvent::Members`] or a [`ClientEvent::RoomRefused`] with the returned
    /// reference. Asked of the connection of the moment only: without one that
    /// carries rooms it is an error, and a connection that drops takes it along.
    pub fn presence(&mut self, _now: Instant, room: &str) -> Result<Reference, ClientError> {
        self.check_room_command(room)?;
        if !self.carries_rooms() {
            return Err(ClientError::NotCarryingRooms);
        }
        let reference = self.subscriptions.draw();
        self.transmit_request(&RoomRequest::Presence {
            room: room.to_owned(),
            reference: reference.to_wire(),
        });
        Ok(reference)
    }

    /// [`subscribe`](Self::subscribe) (with presence notices if asked) to a
    /// recoverable room, resuming after `since`: the last position a previous run
    /// of the client received there ([`positions`](Self::positions)). The server
    /// replays what came after it, then answers with `recovered`.
    pub fn subscribe_since(
        &mut self,
        _now: Instant,
        room: &str,
        token: Option<&str>,
        presence: bool,
        since: Position,
    ) -> Result<Reference, ClientError> {
        self.subscribe_from(room, token, presence, Some(since))
    }

    /// Each room the client holds, oldest first, with the position of the last
    /// message it received there (in a recoverable room): what a client that
    /// keeps its state across restarts saves.
    pub fn positions(&self) -> impl Iterator<Item = (&str, Option<&Position>)> {
        self.subscriptions.positions()
    }

    /// The last positions the client received in its personal and broadcast
    /// streams: reported at every authentication, so the server replays what it
    /// missed; what a client that keeps its state across restarts saves.
    pub fn stream_positions(&self) -> &Since {
        &self.streams
    }

    /// Report `since` (saved by a previous run of the client from
    /// [`stream_positions`](Self::stream_positions)) at the next authentication, so
    /// the server replays what that run missed.
    pub fn resume_streams(&mut self, since: Since) {
        self.streams = since;
    }

    fn subscribe_as(
        &mut self,
        room: &str,
        token: Option<&str>,
        presence: bool,
    ) -> Result<Reference, ClientError> {
        self.subscribe_from(room, token, presence, None)
    }

    fn subscribe_from(
        &mut self,
        room: &str,
        token: Option<&str>,
        presence: bool,
        since: Option<Position>,
    ) -> Result<Reference, ClientError> {
        self.check_room_command(room)?;
        let max = self.config.limits.max_rooms_per_connection;
        if !self.subscriptions.holds(room) && self.subscriptions.len() >= max {
            return Err(ClientError::TooManyRooms(max));
        }
        let now_sent = self.carries_rooms();
        let reference = self
            .subscriptions
            .subscribe(room, token, presence, now_sent);
        if let Some(since) = since {
            self.subscriptions.set_position(room, since);
        }
        if now_sent && let Some(request) = self.subscriptions.request(room) {
            self.transmit_request(&request);
        }
        Ok(reference)
    }

    /// Leave `room` and stop holding it. On a connection that carries rooms the
    /// server is asked (also for rooms it joined on its own) and answers with a
    /// [`ClientEvent::Unsubscribed`] or a refusal; otherwise the connection is in no
    /// room of the client's, and the event comes at once.
    pub fn unsubscribe(&mut self, _now: Instant, room: &str) -> Result<Reference, ClientError> {
        if !self.config.rooms {
            return Err(ClientError::RoomsDisabled);
        }
        check_room(room, &self.config.limits).map_err(ClientError::InvalidRoom)?;
        let held = self.subscriptions.unsubscribe(room);
        if !held && !self.carries_rooms() {
            return Err(ClientError::NotSubscribed);
        }
        let reference = self.subscriptions.draw();
        if self.carries_rooms() {
            self.transmit_request(&RoomRequest::Unsubscribe {
                room: room.to_owned(),
                reference: reference.to_wire(),
            });
        } else {
            self.events.push_back(ClientEvent::Unsubscribed {
                room: room.to_owned(),
                reference: Some(reference),
            });
        }
        Ok(reference)
    }

    /// Publish `message` (its `t` and `d`) to the members of `room`: now if the
    /// connection carries rooms, else once one does (queued with the sends, within
    /// the same bound). Nothing answers a publish that went through; a refusal is a
    /// [`ClientEvent::RoomRefused`] with the returned reference.
    pub fn publish(
        &mut self,
        _now: Instant,
        room: &str,
        message: Message,
    ) -> Result<Reference, ClientError> {
        self.check_room_command(room)?;
        if message
            .t
            .as_deref()
            .is_none_or(|t| t.starts_with(CONTROL_PREFIX))
        {
            return Err(ClientError::InvalidRoomMessage);
        }
        if !self.carries_rooms() {
            self.check_queue()?;
            return Ok(self.subscriptions.wait_to_publish(room, message));
        }
        let reference = self.subscriptions.draw();
        self.transmit_request(&RoomRequest::Publish {
            room: room.to_owned(),
            message,
            reference: reference.to_wire(),
        });
        Ok(reference)
    }

    /// Disconnect deliberately: no automatic reconnection follows, and the next
    /// connection counts as a new session.
    pub fn disconnect(&mut self, _now: Instant, close: Close) -> Result<(), ClientError> {
        let emit = match self.state {
            State::Open { .. } | State::Connecting { .. } => true,
            State::Backoff => false,
            State::Idle => return Err(ClientError::NotConnected),
        };
        if emit {
            self.transmits
                .push_back(ClientTransmit::Close(close.clone()));
            self.events.push_back(ClientEvent::Disconnected {
                close,
                reconnect_at: None,
            });
        }
        self.state = State::Idle;
        self.timers.stop_all();
        self.user = None;
        self.initial_session = true;
        Ok(())
    }

    // ----- inputs -----

    /// The transport asked for by `Connect` is open.
    pub fn handle_connected(&mut self, _now: Instant) -> Result<(), ClientError> {
        let State::Connecting { automatic } = self.state else {
            return Err(ClientError::UnexpectedInput);
        };
        self.state = State::Open {
            hello: None,
            rooms: Link::Plain,
        };
        self.events.push_back(ClientEvent::Connected {
            is_initial_connection: self.initial_connection,
            is_initial_session_connection: self.initial_session,
            is_automatic_reconnection: automatic,
        });
        self.initial_connection = false;
        self.initial_session = false;
        self.user = None;
        Ok(())
    }

    /// The transport asked for by `Connect` could not be opened.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str) -> Result<(), ClientError> {
        if !matches!(self.state, State::Connecting { .. }) {
            return Err(ClientError::UnexpectedInput);
        }
        let reason = format!("connection failed: {reason}");
        self.lost(now, Close::new(CloseCode::ABNORMAL, reason));
        Ok(())
    }

    /// A text frame arrived from the server.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        if !self.is_open() {
            return;
        }
        self.refresh_liveness(now);
        // Only a connection that opted in receives room fields and control dispatches.
        let opted_in = self.link() != Link::Plain;
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
                self.events.push_back(ClientEvent::InvalidFrame(error));
                return;
            }
        };
        match message.op {
            Opcode::Hello => self.adopt_hello(now, Hello::from_data(&message.d)),
            Opcode::Heartbeat => self.transmit(Message::new(Opcode::HeartbeatAck, json!({}))),
            Opcode::Authenticated => {
                self.user = Some(message.d.clone());
                self.events
                    .push_back(ClientEvent::Authenticated { user: message.d });
                if self.link() == Link::OptedIn {
                    self.start_rooms();
                }
            }
            Opcode::Dispatch if opted_in => match (RoomNotice::parse(&message), room) {
                (Some(notice), _) => self.handle_notice(notice),
                (None, Some(room)) => {
                    if let Some(position) = &position {
                        self.subscriptions.set_position(&room, position.clone());
                    }
                    self.events.push_back(ClientEvent::RoomMessage {
                        room,
                        message,
                        position,
                    })
                }
                (None, None) => {
                    self.events.push_back(ClientEvent::Message(message));
                    if let (Some(stream), Some(position)) = (stream, position) {
                        *self.streams.get_mut(stream) = Some(position.clone());
                        let event = ClientEvent::StreamPosition { stream, position };
                        self.events.push_back(event);
                    }
                }
            },
            _ => self.events.push_back(ClientEvent::Message(message)),
        }
    }

    /// The transport closed (with the server's close frame, if any) or dropped.
    pub fn handle_closed(&mut self, now: Instant, close: Option<Close>) {
        if matches!(self.state, State::Open { .. } | State::Connecting { .. }) {
            let close =
                close.unwrap_or_else(|| Close::new(CloseCode::ABNORMAL, "connection dropped"));
            self.lost(now, close);
        }
    }

    /// Fire every timer that is due at `now`; calling early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.expire(Timer::Liveness as usize, now) && self.is_open() {
            let close = Close::new(CloseCode::GOING_AWAY, "heartbeat timeout: server silent");
            self.transmits
                .push_back(ClientTransmit::Close(close.clone()));
            self.lost(now, close);
        }
        if self.timers.expire(Timer::Reconnect as usize, now)
            && matches!(self.state, State::Backoff)
        {
            self.start_connecting(true);
        }
    }

    // ----- outputs -----

    /// The next thing to do with the transport.
    pub fn poll_transmit(&mut self) -> Option<ClientTransmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ----- transitions -----

    fn start_connecting(&mut self, automatic: bool) {
        self.state = State::Connecting { automatic };
        self.transmits.push_back(ClientTransmit::Connect);
    }

    fn transmit(&mut self, message: Message) {
        self.transmits
            .push_back(ClientTransmit::Text(message.encode()));
    }

    fn transmit_request(&mut self, request: &RoomRequest) {
        self.transmits
            .push_back(ClientTransmit::Text(request.encode()));
    }

    /// The current connection's rooms (a closed one has none).
    fn link(&self) -> Link {
        match self.state {
            State::Open { rooms, .. } => rooms,
            _ => Link::Plain,
        }
    }

    fn set_link(&mut self, link: Link) {
        if let State::Open { rooms, .. } = &mut self.state {
            *rooms = link;
        }
    }

    /// Whether this client opts in on the current connection: it wants rooms and the
    /// hello announces them.
    fn opts_in(&self) -> bool {
        self.config.rooms && self.hello().is_some_and(|h| h.has_rule(&Rule::Rooms))
    }

    /// The checks every command naming a room shares: rooms wanted, a valid name, and
    /// not a server known to have no rooms.
    fn check_room_command(&self, room: &str) -> Result<(), ClientError> {
        if !self.config.rooms {
            return Err(ClientError::RoomsDisabled);
        }
        check_room(room, &self.config.limits).map_err(ClientError::InvalidRoom)?;
        if self.hello().is_some_and(|h| !h.has_rule(&Rule::Rooms)) {
            return Err(ClientError::NoRooms);
        }
        Ok(())
    }

    /// Whether one more send or publish may wait for a connection.
    fn check_queue(&self) -> Result<(), ClientError> {
        if self.queued() >= self.config.limits.max_queued_sends {
            return Err(ClientError::QueueFull(self.queued()));
        }
        Ok(())
    }

    /// Send op 2 with `credentials`, adding the opt-in when the server has rooms.
    fn send_credentials(&mut self, mut credentials: Value) {
        if self.opts_in() {
            if let Value::Object(data) = &mut credentials {
                data.insert(OPT_IN_KEY.into(), rooms::opt_in(&self.streams));
            }
            if self.link() == Link::Plain {
                self.set_link(Link::OptedIn);
            }
        }
        self.transmit(Message::new(Opcode::Authenticate, credentials));
    }

    /// The first hello of a connection arrived: speak. Credentials first (or, on a
    /// server with rooms and no authentication, the opt-in alone), then the
    /// subscriptions if the connection carries rooms already, then the queue.
    fn greet(&mut self) {
        let opts_in = self.opts_in();
        let (has_rooms, without_authentication) = self.hello().map_or((false, true), |h| {
            (h.has_rule(&Rule::Rooms), h.authentication_timeout.is_none())
        });
        match self.credentials.clone() {
            Some(credentials) => self.send_credentials(credentials),
            None if opts_in && without_authentication => {
                self.send_credentials(json!({}));
            }
            None => {}
        }
        if opts_in && without_authentication {
            self.start_rooms();
        }
        if !has_rooms {
            let dropped = self.subscriptions.drop_unanswered();
            if !dropped.is_empty() {
                self.events
                    .push_back(ClientEvent::RoomsUnavailable { dropped });
            }
        }
        while let Some(message) = self.queue.pop_front() {
            self.transmit(message);
        }
    }

    /// The connection carries rooms from now on: restore the subscriptions, then
    /// send the publishes that waited.
    fn start_rooms(&mut self) {
        self.set_link(Link::Rooms);
        for request in self.subscriptions.restore() {
            self.transmit_request(&request);
        }
    }

    /// What the server said about the client's rooms.
    fn handle_notice(&mut self, notice: RoomNotice) {
        // A personal or the broadcast stream: no room of the client's.
        if let RoomNotice::Subscribed {
            room,
            position,
            recovered,
            ..
        } = &notice
        {
            if let Some(stream) = Personal::of_stream(room) {
                if position.is_some() {
                    self.streams.get_mut(stream).clone_from(position);
                }
                return self.events.push_back(ClientEvent::Resumed {
                    stream,
                    position: position.clone(),
                    recovered: *recovered,
                });
            }
        }
        let event = match notice {
            RoomNotice::Subscribed {
                room,
                reference,
                position,
                recovered,
            } => {
                let reference = Reference::from_wire(&reference);
                if let Some(reference) = reference {
                    self.subscriptions.confirmed(&room, reference);
                }
                if let Some(position) = &position {
                    self.subscriptions.set_position(&room, position.clone());
                }
                ClientEvent::Subscribed {
                    room,
                    reference,
                    position,
                    recovered,
                }
            }
            RoomNotice::Unsubscribed { room, reference } => {
                let reference = Reference::from_wire(&reference);
                if reference.is_none() {
                    self.subscriptions.removed_by_server(&room);
                }
                ClientEvent::Unsubscribed { room, reference }
            }
            RoomNotice::Refused(refused) => {
                let reference = Reference::from_wire(&refused.reference);
                if let Some(reference) = reference {
                    self.subscriptions.refused(reference);
                }
                ClientEvent::RoomRefused {
                    room: refused.room,
                    reference,
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
                reference: Reference::from_wire(&reference),
                members,
            },
        };
        self.events.push_back(event);
    }

    fn adopt_hello(&mut self, now: Instant, hello: Hello) {
        if let Some(base) = hello.reconnect_interval {
            self.backoff.adopt_base(base);
        }
        self.backoff.reset();
        if hello.has_rule(&Rule::EnforceEqualVersions) {
            if let Some(version) = self.config.version.clone() {
                self.transmit(Message::dispatch("CLIENT_VERSION", json!({ "v": version })));
            }
        }
        if hello.heartbeat_interval.is_none() {
            // A server that stopped announcing heartbeats is not expected to beat.
            self.timers.stop(Timer::Liveness as usize);
        }
        let first = self.hello().is_none();
        if let State::Open { hello: slot, .. } = &mut self.state {
            *slot = Some(hello);
        }
        self.refresh_liveness(now);
        if first {
            self.greet();
        }
    }

    /// Push the dead-server deadline out to `interval × (max_attempts + 1)` from now.
    fn refresh_liveness(&mut self, now: Instant) {
        let interval = self.hello().and_then(|h| h.heartbeat_interval);
        if let Some(interval) = interval {
            let window = interval.saturating_mul(self.config.heartbeat_max_attempts + 1);
            self.timers.set(Timer::Liveness as usize, now + window);
        }
    }

    /// The connection ended without the application asking: reconnect or go idle.
    fn lost(&mut self, now: Instant, close: Close) {
        self.timers.stop_all();
        self.user = None;
        let reconnect_at = self
            .config
            .reconnect
            .then(|| now + self.backoff.next_delay());
        match reconnect_at {
            Some(at) => {
                self.timers.set(Timer::Reconnect as usize, at);
                self.state = State::Backoff;
            }
            None => self.state = State::Idle,
        }
        self.events.push_back(ClientEvent::Disconnected {
            close,
            reconnect_at,
        });
    }
}
