//! The server side of one connection: hello, heartbeats, authentication (with its
//! timeout), version enforcement, sync redelivery, and every way it can close.
//!
//! Every state change of a connection happens in this file.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use crate::close::{Close, CloseCode};
use crate::config::ServerConfig;
use crate::heartbeat::{Beat, Heartbeat};
use crate::limits::RateLimitPolicy;
use crate::rate::TokenBucket;
use crate::recovery::Since;
use crate::rooms::{self, RefusalCode, RoomNotice, RoomRefusal, RoomRequest};
use crate::sync::Redelivery;
use crate::timer::TimerTable;
use crate::wire::{DecodeError, Frame, Message, Opcode};

/// Something the adapter writes to the transport, in order.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Transmit {
    /// Write this text frame.
    Text(Frame),
    /// Send a close frame with this code and reason, then stop writing.
    Close(Close),
}

/// Something the application (or the adapter's hub and sync store) must learn.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum SessionEvent {
    /// The client sent op 2: answer with [`ServerSession::accept`] or [`ServerSession::reject`].
    AuthenticationRequested {
        /// The op 2 data as sent (credentials merged with options such as `shouldSync`).
        credentials: Value,
        /// Whether the client asked for its stored messages (`shouldSync`, default true).
        should_sync: bool,
    },
    /// The connection is now (or again) authenticated as `id`.
    Authenticated {
        /// The id the application named.
        id: String,
        /// The user object.
        user: Value,
        /// False for a re-authentication, which updates silently (no second op 22).
        initial: bool,
    },
    /// An application message from the client.
    Message(Message),
    /// The client opted in to rooms (once per connection): its room requests arrive as
    /// [`SessionEvent::Room`], and room messages to it carry their room.
    Extended {
        /// Where it reports it stood in its personal and broadcast streams.
        since: Since,
    },
    /// A room request of an extended client, well formed and naming a valid room:
    /// answer it with [`ServerSession::room_notice`] (a publish that went through is
    /// not answered), a presence request with [`ServerSession::presence_answer`].
    /// Boxed: a request is nearly twice the size of any other event, and every
    /// message moves through this enum.
    Room(Box<RoomRequest>),
    /// Sync: read the messages stored for `id` and answer with
    /// [`ServerSession::handle_undelivered`].
    LoadUndelivered {
        /// The id whose messages to load.
        id: String,
    },
    /// Sync: the client declined its stored messages (`shouldSync: false`): delete them.
    ClearUndelivered {
        /// The id whose messages to delete.
        id: String,
    },
    /// Sync: redelivery ended (completely, or cut short by a close). Remove the first
    /// `dropped + delivered` stored messages of `id`; the rest stay for next time.
    Redelivered {
        /// The id whose messages were redelivered.
        id: String,
        /// Messages handed to the transport, in order, with `s = 1..=delivered`.
        delivered: usize,
        /// Oldest messages skipped because more than the per-id limit were stored.
        dropped: usize,
    },
    /// The client left the heartbeat before this one unanswered: `misses` beats in a
    /// row so far (1, 2, ...). Past the configured `max_attempts` the connection
    /// closes with 1001 right after this event. For observers only.
    HeartbeatMissed {
        /// Consecutive unanswered heartbeats, this one included.
        misses: u32,
    },
    /// The connection is closed; nothing more will be transmitted. Always the last event.
    Closed {
        /// The code and reason.
        close: Close,
        /// Whether the peer (or the transport) closed, rather than this side.
        by_peer: bool,
    },
}

/// Which session events a server's registry of connections acts on: a [`Hub`] on its
/// own learns ids; a [`Replica`] also loads, clears and trims stored messages, and
/// forwards messages to portals when it has them. Known outside the registry, so that
/// the events it ignores (most messages) take no lock every connection shares.
///
/// [`Hub`]: crate::Hub
/// [`Replica`]: crate::Replica
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInterest {
    cluster: bool,
    messages: bool,
}

impl EventInterest {
    /// A hub on its own ([`Hub::handle_session_event`](crate::Hub::handle_session_event)).
    pub const HUB: EventInterest = EventInterest {
        cluster: false,
        messages: false,
    };

    /// A replica of a cluster, which forwards messages when `portals` are on.
    pub(crate) fn replica(portals: bool) -> EventInterest {
        EventInterest {
            cluster: true,
            messages: portals,
        }
    }

    /// Whether the registry acts on `event`.
    pub fn acts_on(self, event: &SessionEvent) -> bool {
        match event {
            SessionEvent::Authenticated { .. } | SessionEvent::Extended { .. } => true,
            SessionEvent::LoadUndelivered { .. }
            | SessionEvent::ClearUndelivered { .. }
            | SessionEvent::Redelivered { .. }
            | SessionEvent::Closed { .. } => self.cluster,
            SessionEvent::Message(_) => self.messages,
            SessionEvent::AuthenticationRequested { .. }
            | SessionEvent::Room(_)
            | SessionEvent::HeartbeatMissed { .. } => false,
        }
    }
}

/// A command the session cannot carry out in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// No authentication request is waiting for an answer.
    #[error("no authentication request is pending")]
    NoPendingAuthentication,
    /// The connection has not authenticated yet.
    #[error("the connection is not authenticated")]
    NotAuthenticated,
    /// Undelivered messages arrived that were not asked for.
    #[error("no undelivered messages were requested")]
    NoPendingSync,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Heartbeat,
    AuthTimeout,
    Redelivery,
    /// Reading is paused for the rate until then (the next token).
    ReadResume,
    /// A `LoadUndelivered` is given up then.
    SyncLoad,
}
const TIMERS: usize = 5;

/// Who the connection is.
#[derive(Debug, Clone, PartialEq)]
enum Identity {
    /// Not authenticated (yet).
    Anonymous,
    /// Authenticated as `id`. (The user object is the application's: it leaves with
    /// [`SessionEvent::Authenticated`], and a session keeps no copy, which would cost
    /// every idle connection hundreds of bytes.)
    User { id: String },
}

#[derive(Debug)]
enum State {
    Open {
        identity: Identity,
        /// An op 2 awaits the application's answer; carries its `shouldSync`.
        pending_auth: Option<bool>,
        /// The latest op 2 that arrived while one was pending: decided next. Later
        /// ones replace it, so a flood costs one decision per answer, not a queue.
        /// Boxed: rare, and a `Value` inline would cost every connection 80 bytes.
        queued_auth: Option<Box<Value>>,
        /// A `LoadUndelivered` awaits the adapter's answer.
        pending_sync: bool,
        redelivery: Option<Box<Redelivery>>,
    },
    Closed,
}

/// The server side of one Mesa connection.
///
/// Methods come in four groups, as in quinn-proto: getters (`id`,
/// `is_authenticated`, `is_closed`, `read_paused_until`, `awaits_undelivered`),
/// inputs (`handle_*`), commands (`accept`, `reject`, `send`,
/// `disconnect`), and outputs (`poll_*`). After every input or
/// command, drain `poll_transmit` until `None`, then `poll_event` until `None`, then
/// re-arm the timer from `poll_timeout`. Apply the events (notably
/// [`SessionEvent::Authenticated`] to the hub) before the drained frames reach the
/// socket, so that a client never sees op 22 before sends to its id can reach it.
///
/// The session's own queues are drained after every call, so they stay short; the
/// bound on what waits for a slow reader belongs to the adapter's outbound queue,
/// which applies [`CloseCode::TRY_AGAIN_LATER`] when it overflows.
///
/// Every text frame, ping and pong the peer sends takes a token from the
/// connection's [`TokenBucket`] (`max_messages_per_second`, `max_message_burst` of
/// [`Limits`](crate::Limits)). Under [`RateLimitPolicy::Slow`] (the default) the
/// frame that empties the bucket pauses reading: [`read_paused_until`](Self::read_paused_until)
/// says until when, and the adapter reads nothing from the transport before then
/// (nor before [`handle_timeout`](Self::handle_timeout) at that instant), so TCP
/// slows the sender down and nothing read is ever dropped. Under
/// [`RateLimitPolicy::Close`] a frame that finds the bucket empty is not processed
/// and closes the connection with [`CloseCode::POLICY`] `rate limit exceeded`. (A
/// binary frame closes the connection with 1003 in any case.)
#[derive(Debug)]
pub struct ServerSession {
    config: Arc<ServerConfig>,
    state: State,
    heartbeat: Option<Heartbeat>,
    rate: TokenBucket,
    timers: TimerTable<TIMERS>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SessionEvent>,
    /// The client opted in to rooms.
    extended: bool,
    /// Presence requests awaiting their answers (at most
    /// [`Limits::max_presence_requests`](crate::Limits::max_presence_requests)).
    presence_asked: usize,
}

impl ServerSession {
    /// A connection just opened at `now`: the hello is queued and the timers armed.
    pub fn new(config: Arc<ServerConfig>, now: Instant) -> Self {
        let mut timers = TimerTable::new();
        let heartbeat = config.heartbeat.map(|hb| {
            timers.set(Timer::Heartbeat as usize, now + hb.interval);
            Heartbeat::new(hb)
        });
        if let Some(auth) = config.authentication {
            timers.set(Timer::AuthTimeout as usize, now + auth.timeout);
        }
        let hello = Transmit::Text(config.hello().to_message().encode());
        let limits = &config.limits;
        let rate = TokenBucket::new(
            limits.max_messages_per_second,
            limits.max_message_burst,
            now,
        );
        ServerSession {
            rate,
            state: State::Open {
                identity: Identity::Anonymous,
                pending_auth: None,
                queued_auth: None,
                pending_sync: false,
                redelivery: None,
            },
            config,
            heartbeat,
            timers,
            transmits: VecDeque::from([hello]),
            events: VecDeque::new(),
            extended: false,
            presence_asked: 0,
        }
    }

    // ----- getters -----

    /// The authenticated id, if any.
    pub fn id(&self) -> Option<&str> {
        match &self.state {
            State::Open {
                identity: Identity::User { id, .. },
                ..
            } => Some(id),
            _ => None,
        }
    }

    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.id().is_some()
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Until when the adapter must not read from the transport: the connection
    /// outpaced its message rate under [`RateLimitPolicy::Slow`]. The instant is also
    /// a deadline of [`poll_timeout`](Self::poll_timeout), and reading resumes once
    /// [`handle_timeout`](Self::handle_timeout) has run at it. Writing goes on
    /// meanwhile.
    pub fn read_paused_until(&self) -> Option<Instant> {
        self.timers.get(Timer::ReadResume as usize)
    }

    /// Whether a [`SessionEvent::LoadUndelivered`] still awaits its answer. While it
    /// does, the adapter holds back live sends to this connection, so that the
    /// redelivered messages precede them; the wait ends with
    /// [`handle_undelivered`](Self::handle_undelivered) or at the sync load timeout.
    pub fn awaits_undelivered(&self) -> bool {
        matches!(
            self.state,
            State::Open {
                pending_sync: true,
                ..
            }
        )
    }

    // ----- inputs -----

    /// A text frame arrived from the client. It is processed unless the connection
    /// is closed or, under [`RateLimitPolicy::Close`], the frame exceeds the rate.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        if self.is_closed() || !self.admit(now) {
            return;
        }
        match Message::decode(text, &self.config.limits) {
            Ok(message) => self.handle_message(message),
            Err(error) => self.close_for(error),
        }
    }

    /// A binary frame arrived: Mesa is text only, so the connection closes with 1003.
    pub fn handle_binary(&mut self, now: Instant) {
        self.handle_invalid(now, DecodeError::Binary);
    }

    /// A ping or pong arrived (the transport answers pings by itself). It counts
    /// toward the inbound rate, so a ping flood is slowed (or closed) like a message
    /// flood.
    pub fn handle_control(&mut self, now: Instant) {
        if !self.is_closed() {
            self.admit(now);
        }
    }

    /// The transport could not deliver a frame (too big, invalid UTF-8): close with
    /// the error's code.
    pub fn handle_invalid(&mut self, _now: Instant, error: DecodeError) {
        if !self.is_closed() {
            self.close_for(error);
        }
    }

    /// The peer closed (with its close frame, if any) or the transport dropped.
    pub fn handle_peer_closed(&mut self, _now: Instant, close: Option<Close>) {
        if self.is_closed() {
            return;
        }
        let close = close.unwrap_or_else(|| Close::new(CloseCode::ABNORMAL, "transport dropped"));
        self.finish(close, true);
    }

    /// The messages stored for this connection's id, oldest first, in answer to
    /// [`SessionEvent::LoadUndelivered`]. An answer after the sync load timeout is
    /// refused with [`SessionError::NoPendingSync`]: the session went on without it,
    /// and the messages stay stored.
    pub fn handle_undelivered(
        &mut self,
        now: Instant,
        messages: Vec<Message>,
    ) -> Result<(), SessionError> {
        let State::Open {
            identity: Identity::User { id, .. },
            pending_sync,
            redelivery,
            ..
        } = &mut self.state
        else {
            return Err(if self.is_closed() {
                SessionError::Closed
            } else {
                SessionError::NoPendingSync
            });
        };
        if !*pending_sync {
            return Err(SessionError::NoPendingSync);
        }
        *pending_sync = false;
        self.timers.stop(Timer::SyncLoad as usize);
        let interval = self
            .config
            .sync
            .map(|s| s.redelivery_interval)
            .unwrap_or_default();
        let max = self.config.limits.max_stored_per_id;
        *redelivery = Some(Box::new(Redelivery::new(
            id.clone(),
            messages,
            max,
            interval,
            now,
        )));
        self.redeliver_due(now);
        Ok(())
    }

    /// Fire every timer that is due at `now`; calling early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        // Reading resumes: the paused state is this timer being armed.
        self.timers.expire(Timer::ReadResume as usize, now);
        if self.timers.expire(Timer::AuthTimeout as usize, now) {
            self.close(Close::new(CloseCode::POLICY, "authentication timed out"));
            return;
        }
        if self.timers.expire(Timer::Heartbeat as usize, now) {
            self.beat(now);
            if self.is_closed() {
                return;
            }
        }
        if self.timers.expire(Timer::SyncLoad as usize, now) {
            // The store did not answer in time: go on without the stored messages,
            // which stay stored for the next authentication.
            if let State::Open { pending_sync, .. } = &mut self.state {
                *pending_sync = false;
            }
        }
        if self.timers.expire(Timer::Redelivery as usize, now) {
            self.redeliver_due(now);
        }
    }

    // ----- commands -----

    /// Accept the pending authentication as `id` with `user`.
    ///
    /// The first success answers op 22 (with the user object when configured) and
    /// stops the authentication timeout; a re-authentication updates silently.
    pub fn accept(&mut self, now: Instant, id: String, user: Value) -> Result<(), SessionError> {
        let sync = self.config.sync;
        let send_user = self
            .config
            .authentication
            .is_some_and(|a| a.send_user_object);
        let State::Open {
            identity,
            pending_auth,
            pending_sync,
            ..
        } = &mut self.state
        else {
            return Err(SessionError::Closed);
        };
        let should_sync = pending_auth
            .take()
            .ok_or(SessionError::NoPendingAuthentication)?;
        let initial = matches!(identity, Identity::Anonymous);
        *identity = Identity::User { id: id.clone() };
        if initial {
            self.timers.stop(Timer::AuthTimeout as usize);
            let d = if send_user { user.clone() } else { json!({}) };
            self.transmits.push_back(Transmit::Text(
                Message::new(Opcode::Authenticated, d).encode(),
            ));
        }
        self.events.push_back(SessionEvent::Authenticated {
            id: id.clone(),
            user,
            initial,
        });
        if let Some(sync) = sync.filter(|_| initial) {
            if should_sync {
                *pending_sync = true;
                self.timers
                    .set(Timer::SyncLoad as usize, now + sync.load_timeout);
                self.events.push_back(SessionEvent::LoadUndelivered { id });
            } else {
                self.events.push_back(SessionEvent::ClearUndelivered { id });
            }
        }
        self.request_queued_authentication();
        Ok(())
    }

    /// Reject the pending authentication. With `disconnect_on_fail` (the default) the
    /// connection closes with 1008; otherwise it stays as it was, and the
    /// authentication timeout still applies.
    pub fn reject(&mut self, _now: Instant, reason: &str) -> Result<(), SessionError> {
        let State::Open { pending_auth, .. } = &mut self.state else {
            return Err(SessionError::Closed);
        };
        pending_auth
            .take()
            .ok_or(SessionError::NoPendingAuthentication)?;
        if self
            .config
            .authentication
            .is_none_or(|a| a.disconnect_on_fail)
        {
            let reason = format!("authentication failed: {reason}");
            self.close(Close::truncated(CloseCode::POLICY, reason));
            return Ok(());
        }
        self.request_queued_authentication();
        Ok(())
    }

    /// Whether the client opted in to rooms.
    pub fn is_extended(&self) -> bool {
        self.extended
    }

    /// Answer a room request, or tell the client of a room change the server made;
    /// only an extended client hears of it (the others get nothing new).
    pub fn room_notice(&mut self, notice: RoomNotice) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        if self.extended {
            self.transmits.push_back(Transmit::Text(notice.encode()));
        }
        Ok(())
    }

    /// Answer the presence request `reference` about `room`: its members, or why
    /// they cannot be told. The request stops counting toward
    /// [`Limits::max_presence_requests`](crate::Limits::max_presence_requests).
    pub fn presence_answer(
        &mut self,
        room: String,
        reference: Value,
        members: Result<Vec<(String, u64)>, RoomRefusal>,
    ) -> Result<(), SessionError> {
        self.presence_asked = self.presence_asked.saturating_sub(1);
        let notice = match members {
            Ok(members) => RoomNotice::Members {
                room,
                reference,
                members,
            },
            Err(refusal) => RoomNotice::refused(room, reference, refusal),
        };
        self.room_notice(notice)
    }

    /// Queue an already encoded frame (a broadcast shares one [`Frame`]).
    pub fn send(&mut self, frame: Frame) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.transmits.push_back(Transmit::Text(frame));
        Ok(())
    }

    /// Close the connection with `code` and `reason`.
    pub fn disconnect(&mut self, close: Close) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.close(close);
        Ok(())
    }

    // ----- outputs -----

    /// How many frames wait for [`poll_transmit`](Self::poll_transmit). An adapter
    /// whose transport is backed up leaves them here, and past a bound stops handing
    /// the session more to send.
    pub fn queued_transmits(&self) -> usize {
        self.transmits.len()
    }

    /// The next thing to write to the transport.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let transmit = self.transmits.pop_front();
        if transmit.is_none() && self.transmits.capacity() > 0 {
            // Drained: an idle session keeps no frame buffer either (the hello's
            // stays otherwise, on every connection).
            self.transmits = VecDeque::new();
        }
        transmit
    }

    /// The next event for the application or the adapter.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let event = self.events.pop_front();
        if event.is_none() && self.events.capacity() > 0 {
            // Drained: events are large and rare, and most connections are idle, so
            // an idle session keeps no event buffer (512 bytes per connection).
            self.events = VecDeque::new();
        }
        event
    }

    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ----- transitions -----

    fn handle_message(&mut self, message: Message) {
        match message.op {
            Opcode::HeartbeatAck => {
                if let Some(heartbeat) = &mut self.heartbeat {
                    heartbeat.handle_ack();
                }
            }
            Opcode::Authenticate if self.config.authentication.is_some() => {
                self.request_authentication(message.d)
            }
            // Without authentication, op 2 only opts in.
            Opcode::Authenticate if self.config.rooms => {
                let mut d = message.d;
                self.take_opt_in(&mut d);
            }
            Opcode::Dispatch if self.is_version_check(&message) => {
                self.check_version(&message.d);
            }
            Opcode::Dispatch if self.extended => {
                match RoomRequest::parse(&message, &self.config.limits) {
                    None => self.events.push_back(SessionEvent::Message(message)),
                    Some(Ok(RoomRequest::Presence { room, reference }))
                        if self.presence_asked >= self.config.limits.max_presence_requests =>
                    {
                        let max = self.config.limits.max_presence_requests;
                        let reason = format!("{max} presence requests at most await answers");
                        let refusal = RoomRefusal::new(RefusalCode::TooManyRequests, reason);
                        let notice = RoomNotice::refused(room, reference, refusal).encode();
                        self.transmits.push_back(Transmit::Text(notice));
                    }
                    Some(Ok(request)) => {
                        if matches!(request, RoomRequest::Presence { .. }) {
                            self.presence_asked += 1;
                        }
                        self.events.push_back(SessionEvent::Room(Box::new(request)));
                    }
                    Some(Err(refused)) => {
                        let notice = RoomNotice::Refused(*refused).encode();
                        self.transmits.push_back(Transmit::Text(notice));
                    }
                }
            }
            _ => self.events.push_back(SessionEvent::Message(message)),
        }
    }

    /// Take the rooms opt-in out of op 2's data (when the server has rooms).
    fn take_opt_in(&mut self, credentials: &mut Value) {
        if !self.config.rooms {
            return;
        }
        let Some(since) = rooms::take_opt_in(credentials) else {
            return;
        };
        if !self.extended {
            self.extended = true;
            self.events.push_back(SessionEvent::Extended { since });
        }
    }

    fn request_authentication(&mut self, mut credentials: Value) {
        self.take_opt_in(&mut credentials);
        let State::Open {
            pending_auth,
            queued_auth,
            ..
        } = &mut self.state
        else {
            return;
        };
        if pending_auth.is_some() {
            // One decision at a time, as upstream answers each op 2 in turn.
            *queued_auth = Some(Box::new(credentials));
            return;
        }
        let should_sync = credentials.get("shouldSync").is_none_or(is_truthy);
        *pending_auth = Some(should_sync);
        self.events
            .push_back(SessionEvent::AuthenticationRequested {
                credentials,
                should_sync,
            });
    }

    fn request_queued_authentication(&mut self) {
        if let State::Open { queued_auth, .. } = &mut self.state {
            if let Some(credentials) = queued_auth.take() {
                self.request_authentication(*credentials);
            }
        }
    }

    fn is_version_check(&self, message: &Message) -> bool {
        self.config.version.is_some() && message.t.as_deref() == Some("CLIENT_VERSION")
    }

    fn check_version(&mut self, d: &Value) {
        let expected = self.config.version.as_deref().unwrap_or_default();
        let got = d.get("v").and_then(Value::as_str);
        if got != Some(expected) {
            let reason = format!(
                "client version {} does not match server version {expected}",
                got.unwrap_or("(none)")
            );
            self.close(Close::truncated(CloseCode::PROTOCOL_ERROR, reason));
        }
    }

    fn beat(&mut self, now: Instant) {
        let (Some(heartbeat), Some(config)) = (&mut self.heartbeat, self.config.heartbeat) else {
            return;
        };
        let beat = heartbeat.tick();
        if heartbeat.misses() > 0 {
            self.events.push_back(SessionEvent::HeartbeatMissed {
                misses: heartbeat.misses(),
            });
        }
        match beat {
            Beat::Send(d) => {
                let frame = Message::new(Opcode::Heartbeat, d).encode();
                self.transmits.push_back(Transmit::Text(frame));
                self.timers
                    .set(Timer::Heartbeat as usize, now + config.interval);
            }
            Beat::Dead => self.close(Close::new(CloseCode::GOING_AWAY, "heartbeat timeout")),
        }
    }

    fn redeliver_due(&mut self, now: Instant) {
        let State::Open {
            redelivery: Some(redelivery),
            ..
        } = &mut self.state
        else {
            return;
        };
        while let Some(message) = redelivery.poll(now) {
            self.transmits.push_back(Transmit::Text(message.encode()));
        }
        if let Some(at) = redelivery.poll_timeout() {
            self.timers.set(Timer::Redelivery as usize, at);
            return;
        }
        self.events.push_back(redelivery.finished_event());
        if let State::Open { redelivery, .. } = &mut self.state {
            *redelivery = None;
        }
    }

    /// Take a token for one inbound frame and say whether to process it. Past the
    /// rate, the `Close` policy refuses the frame and closes with 1008; the `Slow`
    /// policy processes it (nothing read is dropped) and pauses reading until the
    /// bucket holds a token again.
    fn admit(&mut self, now: Instant) -> bool {
        let taken = self.rate.try_take(now);
        match self.config.limits.rate_limit_policy {
            RateLimitPolicy::Close if !taken => {
                self.close(Close::new(CloseCode::POLICY, "rate limit exceeded"));
                false
            }
            RateLimitPolicy::Close => true,
            RateLimitPolicy::Slow => {
                if self.rate.is_empty(now) {
                    self.pause_reading(now);
                }
                true
            }
        }
    }

    /// Stop reading until the next token.
    fn pause_reading(&mut self, now: Instant) {
        let resume = self.rate.next_token_at(now);
        self.timers.set(Timer::ReadResume as usize, resume);
        // While reading is paused the client's op 11 may wait unread behind the
        // frames we hold back, so a beat cannot tell an unanswered heartbeat from an
        // unread answer. A client that outpaces its rate is evidently alive (and one
        // that stops reading is the outbound queue's business), so a pause counts as
        // an answer. A pause lasts one token interval at most and follows a frame
        // read, so a client that goes silent is closed as before, its misses counted
        // from its last frame on.
        if let Some(heartbeat) = &mut self.heartbeat {
            heartbeat.handle_ack();
        }
    }

    fn close_for(&mut self, error: DecodeError) {
        self.close(Close::new(error.close_code(), error.to_string()));
    }

    fn close(&mut self, close: Close) {
        self.transmits.push_back(Transmit::Close(close.clone()));
        self.finish(close, false);
    }

    fn finish(&mut self, close: Close, by_peer: bool) {
        if by_peer {
            // The transport is gone: frames still queued can no longer be written.
            self.transmits.clear();
        }
        if let State::Open {
            redelivery: Some(redelivery),
            ..
        } = &self.state
        {
            self.events.push_back(redelivery.finished_event());
        }
        self.state = State::Closed;
        self.timers.stop_all();
        self.events
            .push_back(SessionEvent::Closed { close, by_peer });
    }
}

/// JavaScript truthiness, for options upstream reads with `if (x)`.
fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
