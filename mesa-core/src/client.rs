//! The client side: connection lifecycle, hello adoption, heartbeat replies,
//! dead-server detection, authentication (and re-authentication after a reconnect),
//! a bounded queue of sends made while disconnected, and jittered reconnection.
//!
//! Every state change of a client happens in this file.

use std::collections::VecDeque;
use std::time::Instant;

use serde_json::{Value, json};

use crate::backoff::{Backoff, BackoffConfig};
use crate::close::{Close, CloseCode};
use crate::config::{ConfigError, validate_limits};
use crate::hello::{Hello, Rule};
use crate::limits::Limits;
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
    /// Limits on frames from the server and on the send queue.
    pub limits: Limits,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            reconnect: true,
            backoff: BackoffConfig::default(),
            heartbeat_max_attempts: 3,
            version: None,
            limits: Limits::default(),
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
    /// The transport is open.
    Open { hello: Option<Hello> },
    /// Waiting for the reconnect timer.
    Backoff,
}

/// The client side of a Mesa connection, across reconnections.
///
/// Methods come in four groups: getters (`is_open`, `is_authenticated`, `hello`,
/// `queued`), inputs (`handle_*`), commands (`connect`, `authenticate`, `send`,
/// `disconnect`), and outputs (`poll_*`). After every input or command, drain
/// `poll_transmit` until `None`, then `poll_event` until `None`, then re-arm the timer
/// from `poll_timeout`.
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
            State::Open { hello } => hello.as_ref(),
            _ => None,
        }
    }

    /// Sends waiting for a connection.
    pub fn queued(&self) -> usize {
        self.queue.len()
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
    /// messages stored while offline. Sent now if open, else on the next open, and
    /// again after every automatic reconnection. Resolves with
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
        if self.is_open() {
            self.transmit(Message::new(Opcode::Authenticate, data.clone()));
            if let Some(user) = self.user.clone() {
                self.events.push_back(ClientEvent::Authenticated { user });
            }
        }
        self.credentials = Some(data);
        Ok(())
    }

    /// Send `message` now if open; otherwise queue it for the next open.
    pub fn send(&mut self, _now: Instant, message: Message) -> Result<(), ClientError> {
        if self.is_open() {
            self.transmit(message);
            return Ok(());
        }
        if self.queue.len() >= self.config.limits.max_queued_sends {
            return Err(ClientError::QueueFull(self.queue.len()));
        }
        self.queue.push_back(message);
        Ok(())
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
        self.state = State::Open { hello: None };
        self.events.push_back(ClientEvent::Connected {
            is_initial_connection: self.initial_connection,
            is_initial_session_connection: self.initial_session,
            is_automatic_reconnection: automatic,
        });
        self.initial_connection = false;
        self.initial_session = false;
        self.user = None;
        if let Some(credentials) = self.credentials.clone() {
            self.transmit(Message::new(Opcode::Authenticate, credentials));
        }
        while let Some(message) = self.queue.pop_front() {
            self.transmit(message);
        }
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
        let message = match Message::decode(text, &self.config.limits) {
            Ok(message) => message,
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
            }
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
        if let State::Open { hello: slot } = &mut self.state {
            *slot = Some(hello);
        }
        self.refresh_liveness(now);
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
