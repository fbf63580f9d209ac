//! Operation sequences replayed against a `ServerSession` with heartbeats,
//! authentication, sync, version enforcement and small limits, on a virtual clock.
//!
//! A small model follows the session through its outputs and checks:
//! - the hello is the first frame, and every frame the server writes decodes;
//! - nothing is transmitted after a `Transmit::Close`, and a close this side started
//!   is always followed by `SessionEvent::Closed { by_peer: false }`;
//! - `SessionEvent::Closed` is emitted at most once and is the last event; after it
//!   `is_closed()` holds and `poll_timeout()` is `None`;
//! - every close code is in 1000..=1015, a close the core starts never uses a code
//!   reserved for "no frame" (1005, 1006, 1015), and each close has the cause the
//!   protocol gives it (1007/1009 for a bad frame or one the transport rejected,
//!   1003 for binary, 1002 for a wrong version, 1008 for authentication, 1001 for
//!   missed heartbeats);
//! - `handle_timeout(now)` fires everything due at `now` (the next deadline is later),
//!   and calling it early or twice does nothing;
//! - the authentication timeout and the heartbeat miss limit are enforced on time;
//! - commands succeed exactly when the model says they may, and misuse is an `Err`;
//! - an op 2 that arrives while another awaits an answer is decided next (the latest
//!   one wins), after the pending one is accepted or rejected without closing;
//! - redelivery numbers the newest `max_stored_per_id` messages `s = 1..` in order and
//!   reports what it delivered and dropped;
//! - every unanswered heartbeat is reported (`HeartbeatMissed`) with the beat that
//!   carries its count, or with the 1001 close past the limit;
//! - every frame (text, binary, ping or pong) takes a token of the inbound rate
//!   (restated here as its own token bucket). Under the close policy the frame that
//!   finds none closes with 1008 and is not processed, and no frame within the rate
//!   is refused; under the slow policy every frame is processed, and the one that
//!   empties the bucket pauses reading until the next token (`read_paused_until`,
//!   also a deadline), which counts as a heartbeat answer;
//! - a load of stored messages is awaited (`awaits_undelivered`) until it is
//!   answered or its timeout passes; a later answer is refused.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::{
    AuthConfig, Close, CloseCode, DecodeError, HeartbeatConfig, Limits, Message, Opcode,
    RateLimitPolicy, ServerConfig, ServerSession, SessionError, SessionEvent, SyncConfig, Transmit,
};
use serde_json::{Value, json};

const VERSION: &str = "1.5.8";
/// The inbound rate of the fuzzed sessions: small, so that floods are reached.
const RATE: u32 = 20;
const BURST: u32 = 8;

#[derive(Arbitrary, Debug)]
struct Setup {
    heartbeat_ms: u16,
    max_attempts: u8,
    auth_timeout_ms: u16,
    redelivery_ms: u8,
    disconnect_on_fail: bool,
    send_user_object: bool,
    /// The slow rate limit policy (else close).
    slow_rate: bool,
}

/// Frames a real client sends, so the fuzzer reaches past the decoder quickly.
#[derive(Arbitrary, Debug)]
enum Known {
    HeartbeatAck,
    Authenticate {
        token: String,
        should_sync: Option<bool>,
    },
    ClientVersion {
        matching: bool,
    },
    Dispatch {
        t: String,
    },
    Opcode(u8),
}

impl Known {
    fn text(&self) -> String {
        let message = match self {
            Known::HeartbeatAck => Message::new(Opcode::HeartbeatAck, json!({})),
            Known::Authenticate { token, should_sync } => {
                let mut d = json!({ "token": token });
                if let Some(sync) = should_sync {
                    d["shouldSync"] = json!(sync);
                }
                Message::new(Opcode::Authenticate, d)
            }
            Known::ClientVersion { matching } => {
                let v = if *matching { VERSION } else { "0.0.1" };
                Message::dispatch("CLIENT_VERSION", json!({ "v": v }))
            }
            Known::Dispatch { t } => Message::dispatch(t.clone(), json!({"x": 1})),
            Known::Opcode(op) => Message::new(Opcode::from(u64::from(*op)), json!({})),
        };
        message.encode().as_str().to_owned()
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Frame(String),
    Known(Known),
    Binary,
    /// The transport rejected a frame: invalid UTF-8 (`true`) or too big (`false`).
    Invalid(bool),
    /// A ping or pong arrived.
    Control,
    PeerClosed(Option<u16>),
    Advance(u16),
    Accept(String),
    Reject,
    Send,
    Disconnect(u16),
    Undelivered(Vec<String>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<Op>,
}

/// What the ongoing redelivery must produce.
struct ExpectedRedelivery {
    messages: Vec<Message>,
    dropped: usize,
    seen: usize,
}

/// Which closes the current step may (or must) produce.
struct CloseRule {
    allowed: Vec<u16>,
    must: bool,
    /// The close was asked for by the application, with any code.
    requested: bool,
}

impl CloseRule {
    fn none() -> Self {
        CloseRule {
            allowed: Vec::new(),
            must: false,
            requested: false,
        }
    }
}

struct Harness {
    session: ServerSession,
    limits: Limits,
    heartbeat: HeartbeatConfig,
    disconnect_on_fail: bool,
    send_user_object: bool,
    now: Instant,
    auth_deadline: Instant,
    last_ack: Instant,
    transmitted: usize,
    close_sent: bool,
    closed_event: Option<bool>,
    /// An authentication request awaits an answer; carries its `shouldSync`.
    pending_auth: Option<bool>,
    authenticated: bool,
    /// The latest op 2 that arrived while another was pending.
    queued_auth: Option<Value>,
    pending_sync: bool,
    redelivery: Option<ExpectedRedelivery>,
    expected_events: Vec<SessionEvent>,
    sends: u64,
    /// The model's token bucket: when it is full again.
    rate_full_at: Instant,
    slow_rate: bool,
    /// Reading is paused for the rate until then.
    paused_until: Option<Instant>,
    load_timeout: Duration,
    /// The pending load of stored messages is given up then.
    load_deadline: Option<Instant>,
}

impl Harness {
    fn new(setup: &Setup) -> Self {
        let heartbeat = HeartbeatConfig {
            interval: Duration::from_millis(u64::from(setup.heartbeat_ms % 5_000) + 1),
            max_attempts: u32::from(setup.max_attempts % 4) + 1,
        };
        let auth = AuthConfig {
            timeout: Duration::from_millis(u64::from(setup.auth_timeout_ms % 10_000) + 1),
            disconnect_on_fail: setup.disconnect_on_fail,
            send_user_object: setup.send_user_object,
            ..AuthConfig::default()
        };
        let limits = Limits {
            max_message_bytes: 256,
            max_json_depth: 4,
            max_queued_sends: 4,
            max_stored_per_id: 3,
            max_messages_per_second: RATE,
            max_message_burst: BURST,
            max_recipients: 4,
            rate_limit_policy: if setup.slow_rate {
                RateLimitPolicy::Slow
            } else {
                RateLimitPolicy::Close
            },
            max_rooms_per_connection: 2,
            max_room_name_bytes: 8,
            max_presence_requests: 1,
        };
        let sync = SyncConfig {
            redelivery_interval: Duration::from_millis(u64::from(setup.redelivery_ms % 4)),
            ..SyncConfig::default()
        };
        let config = ServerConfig::builder()
            .heartbeat(heartbeat)
            .authentication(auth)
            .sync(sync)
            .enforce_equal_versions(VERSION)
            .limits(limits.clone())
            .build()
            .expect("valid config");
        let start = Instant::now();
        let session = ServerSession::new(Arc::new(config), start);
        Harness {
            session,
            limits,
            heartbeat,
            disconnect_on_fail: auth.disconnect_on_fail,
            send_user_object: auth.send_user_object,
            now: start,
            auth_deadline: start + auth.timeout,
            last_ack: start,
            transmitted: 0,
            close_sent: false,
            closed_event: None,
            pending_auth: None,
            queued_auth: None,
            authenticated: false,
            pending_sync: false,
            redelivery: None,
            expected_events: Vec::new(),
            sends: 0,
            rate_full_at: start,
            slow_rate: setup.slow_rate,
            paused_until: None,
            load_timeout: sync.load_timeout,
            load_deadline: None,
        }
    }

    /// The inbound rate, restated: a frame takes one of at most `BURST` tokens, one
    /// earned every `1 s / RATE` (rounded up). Only frames of an open session count.
    /// Whether the frame is processed: under the close policy when it found a token,
    /// under the slow policy always, pausing reading once the bucket is empty.
    fn rate_admits(&mut self) -> bool {
        let cost = Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(RATE)));
        let base = self.rate_full_at.max(self.now);
        let taken = (base - self.now) + cost <= cost * BURST;
        if taken {
            self.rate_full_at = base + cost;
        }
        if !self.slow_rate {
            return taken;
        }
        // Empty: the debt leaves less than one token's worth of room.
        let debt = self.rate_full_at.saturating_duration_since(self.now);
        if debt + cost > cost * BURST {
            self.paused_until = Some(self.rate_full_at - cost * (BURST - 1));
            // A pause counts as a heartbeat answer (the answer may be unread).
            self.last_ack = self.now;
        }
        true
    }

    fn closed(&self) -> bool {
        self.closed_event.is_some()
    }

    /// Drain both outputs and check them against the model and `rule`.
    fn drain(&mut self, rule: &CloseRule) -> Vec<Message> {
        let mut texts = Vec::new();
        let mut closed_now = None;
        while let Some(transmit) = self.session.poll_transmit() {
            assert!(
                !self.close_sent,
                "transmitted {transmit:?} after a close frame"
            );
            self.transmitted += 1;
            match transmit {
                Transmit::Text(frame) => {
                    let message = Message::decode(frame.as_str(), &Limits::default())
                        .unwrap_or_else(|e| panic!("server wrote an invalid frame {frame:?}: {e}"));
                    if self.transmitted == 1 {
                        assert_eq!(message.op, Opcode::Hello, "the hello must come first");
                    } else {
                        assert_ne!(message.op, Opcode::Hello, "a second hello: {frame:?}");
                    }
                    if let Some(s) = message.s {
                        let expected = self.redelivery.as_mut().unwrap_or_else(|| {
                            panic!("sequenced frame {frame:?} outside a redelivery")
                        });
                        expected.seen += 1;
                        assert_eq!(s, expected.seen as u64, "redelivery out of order");
                        assert!(
                            expected.seen <= expected.messages.len(),
                            "redelivered more than the {} kept messages",
                            expected.messages.len()
                        );
                        let mut want = expected.messages[expected.seen - 1].clone();
                        want.s = Some(s);
                        assert_eq!(message, want, "redelivered the wrong message");
                    }
                    texts.push(message);
                }
                Transmit::Close(close) => {
                    let code = close.code.0;
                    assert!(
                        (1000..=1015).contains(&code),
                        "close code {code} out of range"
                    );
                    if !rule.requested {
                        assert!(
                            !matches!(code, 1005 | 1006 | 1015),
                            "the core sent reserved close code {code}"
                        );
                    }
                    assert!(
                        rule.allowed.contains(&code),
                        "unexpected close {close} (allowed {:?})",
                        rule.allowed
                    );
                    self.close_sent = true;
                    closed_now = Some(close);
                }
            }
        }
        while let Some(event) = self.session.poll_event() {
            assert!(
                self.closed_event.is_none(),
                "event {event:?} after SessionEvent::Closed"
            );
            let position = self.expected_events.iter().position(|e| *e == event);
            if let Some(position) = position {
                assert_eq!(position, 0, "events out of order: {event:?}");
                let _ = self.expected_events.remove(0);
            }
            match event {
                SessionEvent::AuthenticationRequested { should_sync, .. } => {
                    assert!(position.is_some(), "unexpected {should_sync}");
                    assert!(
                        self.pending_auth.is_none(),
                        "two authentication requests at once"
                    );
                    self.pending_auth = Some(should_sync);
                }
                SessionEvent::Authenticated { initial, .. } => {
                    assert_eq!(initial, !self.authenticated, "wrong `initial` flag");
                    self.authenticated = true;
                }
                SessionEvent::LoadUndelivered { .. } => {
                    assert!(!self.pending_sync, "unexpected LoadUndelivered");
                    self.pending_sync = true;
                    self.load_deadline = Some(self.now + self.load_timeout);
                }
                SessionEvent::ClearUndelivered { .. } => {}
                SessionEvent::Redelivered {
                    delivered, dropped, ..
                } => {
                    let expected = self
                        .redelivery
                        .take()
                        .expect("Redelivered without a redelivery");
                    assert_eq!(delivered, expected.seen, "Redelivered miscounts delivered");
                    assert_eq!(dropped, expected.dropped, "Redelivered miscounts dropped");
                    if !self.session.is_closed() {
                        assert_eq!(
                            delivered,
                            expected.messages.len(),
                            "redelivery ended early on an open connection"
                        );
                    }
                }
                SessionEvent::Message(message) => {
                    assert!(position.is_some(), "unexpected message event {message:?}");
                }
                SessionEvent::HeartbeatMissed { misses } => {
                    // Reported for every unanswered beat: the one that carries
                    // `tries = misses`, or the fatal one past the limit (1001 follows).
                    assert!(
                        (1..=self.heartbeat.max_attempts + 1).contains(&misses),
                        "heartbeat misses {misses} out of range"
                    );
                    let reported = texts.iter().any(|m| {
                        m.op == Opcode::Heartbeat && m.d.get("tries") == Some(&json!(misses))
                    });
                    let fatal = misses > self.heartbeat.max_attempts
                        && matches!(&closed_now, Some(c) if c.code == CloseCode::GOING_AWAY);
                    assert!(reported || fatal, "miss {misses} without its beat or close");
                }
                // Rooms are off here (the `rooms` target fuzzes their decoding, and
                // the rooms tests their negotiation): `mesa:` dispatches are messages.
                SessionEvent::Extended { .. } | SessionEvent::Room(_) => {
                    panic!("a room event with rooms off: {event:?}")
                }
                SessionEvent::Closed { close, by_peer } => {
                    match &closed_now {
                        Some(sent) => {
                            assert!(!by_peer, "we sent {sent} but the close is by the peer");
                            assert_eq!(*sent, close, "Closed differs from the close frame");
                        }
                        None => assert!(by_peer, "closed by us without a close frame: {close}"),
                    }
                    self.closed_event = Some(by_peer);
                }
            }
        }
        assert!(
            self.expected_events.is_empty(),
            "missing events {:?}",
            self.expected_events
        );
        assert!(
            closed_now.is_none() || self.closed_event == Some(false),
            "a close frame without SessionEvent::Closed"
        );
        if rule.must && !self.closed() {
            panic!(
                "the session should have closed (allowed {:?})",
                rule.allowed
            );
        }
        assert_eq!(
            self.session.is_closed(),
            self.closed(),
            "is_closed disagrees"
        );
        if self.closed() {
            assert_eq!(
                self.session.poll_timeout(),
                None,
                "a timer survived the close"
            );
            assert!(self.session.id().is_none());
            self.pending_auth = None;
            self.queued_auth = None;
            self.pending_sync = false;
            self.paused_until = None;
            self.load_deadline = None;
        } else {
            assert_eq!(self.session.is_authenticated(), self.authenticated);
        }
        texts
    }

    /// After an answer, the op 2 that waited (if any) is the next request.
    fn expect_queued_authentication(&mut self) {
        if let Some(credentials) = self.queued_auth.take() {
            let should_sync = credentials.get("shouldSync").is_none_or(truthy);
            self.expected_events
                .push(SessionEvent::AuthenticationRequested {
                    credentials,
                    should_sync,
                });
        }
    }

    /// Deadlines the model says must have fired by now.
    fn check_deadlines(&self) {
        if self.closed() {
            return;
        }
        assert!(
            self.authenticated || self.now < self.auth_deadline,
            "authentication timeout not enforced"
        );
        let limit = self.heartbeat.interval * (self.heartbeat.max_attempts + 2);
        assert!(
            self.now < self.last_ack + limit,
            "heartbeat miss limit not enforced"
        );
    }

    /// The model's timers that have no output of their own: the end of a pause
    /// for the rate, and the load timeout.
    fn expire_silent_timers(&mut self) {
        if self.paused_until.is_some_and(|at| at <= self.now) {
            self.paused_until = None;
        }
        if self.load_deadline.is_some_and(|at| at <= self.now) {
            self.load_deadline = None;
            self.pending_sync = false;
        }
    }

    /// Assert that `handle_timeout(now)` has nothing left to do.
    fn check_nothing_due(&mut self) {
        if let Some(at) = self.session.poll_timeout() {
            assert!(at > self.now, "a deadline at or before now was left armed");
        }
        self.expire_silent_timers();
        assert_eq!(
            self.session.read_paused_until(),
            self.paused_until,
            "reading paused for the rate"
        );
        assert_eq!(
            self.session.awaits_undelivered(),
            self.pending_sync && !self.closed(),
            "awaiting stored messages"
        );
        self.session.handle_timeout(self.now);
        assert!(
            self.session.poll_transmit().is_none(),
            "handle_timeout did something early"
        );
        assert!(
            self.session.poll_event().is_none(),
            "handle_timeout did something early"
        );
    }

    fn advance(&mut self, ms: u16) {
        let target = self.now + Duration::from_millis(u64::from(ms));
        let mut steps = 0u32;
        while let Some(at) = self.session.poll_timeout() {
            if at > target {
                break;
            }
            assert!(at >= self.now, "deadline {at:?} is in the past");
            steps += 1;
            assert!(steps < 100_000, "timer livelock");
            self.now = at;
            let heartbeat_close_ok = self.now
                > self.last_ack + self.heartbeat.interval * (self.heartbeat.max_attempts + 1);
            let mut allowed = Vec::new();
            if !self.authenticated && self.now >= self.auth_deadline {
                allowed.push(1008);
            }
            if heartbeat_close_ok {
                allowed.push(1001);
            }
            self.session.handle_timeout(self.now);
            self.expire_silent_timers();
            self.drain(&CloseRule {
                allowed,
                must: false,
                requested: false,
            });
            self.check_deadlines();
            self.check_nothing_due();
        }
        self.now = target;
        self.check_deadlines();
    }

    fn frame(&mut self, text: &str) {
        let was_closed = self.closed();
        if !was_closed && !self.rate_admits() {
            self.session.handle_frame(self.now, text);
            self.drain(&CloseRule {
                allowed: vec![1008],
                must: true,
                requested: false,
            });
            return;
        }
        let decoded = Message::decode(text, &self.limits);
        let mut rule = CloseRule::none();
        match &decoded {
            Err(error) => {
                rule.allowed.push(error.close_code().0);
                rule.must = true;
            }
            Ok(message) => match message.op {
                Opcode::HeartbeatAck => {
                    if !was_closed {
                        self.last_ack = self.now;
                    }
                }
                Opcode::Authenticate if self.pending_auth.is_some() => {
                    // Decided after the pending one; a later op 2 replaces it.
                    self.queued_auth = Some(message.d.clone());
                }
                Opcode::Authenticate => {
                    let should_sync = message.d.get("shouldSync").is_none_or(truthy);
                    self.expected_events
                        .push(SessionEvent::AuthenticationRequested {
                            credentials: message.d.clone(),
                            should_sync,
                        });
                }
                Opcode::Dispatch if message.t.as_deref() == Some("CLIENT_VERSION") => {
                    if message.d.get("v").and_then(Value::as_str) != Some(VERSION) {
                        rule.allowed.push(1002);
                        rule.must = true;
                    }
                }
                _ => self
                    .expected_events
                    .push(SessionEvent::Message(message.clone())),
            },
        }
        if was_closed {
            rule = CloseRule::none();
            self.expected_events.clear();
        }
        self.session.handle_frame(self.now, text);
        self.drain(&rule);
    }

    fn step(&mut self, op: Op) {
        self.apply(op);
        self.check_deadlines();
        self.check_nothing_due();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Frame(text) => self.frame(&text),
            Op::Known(known) => self.frame(&known.text()),
            Op::Control => {
                let refused = !self.closed() && !self.rate_admits();
                self.session.handle_control(self.now);
                self.drain(&CloseRule {
                    allowed: if refused { vec![1008] } else { Vec::new() },
                    must: refused,
                    requested: false,
                });
            }
            Op::Binary => {
                let open = !self.closed();
                self.session.handle_binary(self.now);
                self.drain(&CloseRule {
                    allowed: vec![1003],
                    must: open,
                    requested: false,
                });
            }
            Op::Invalid(utf8) => {
                let error = if utf8 {
                    DecodeError::InvalidUtf8
                } else {
                    DecodeError::TooBig {
                        len: self.limits.max_message_bytes + 1,
                        max: self.limits.max_message_bytes,
                    }
                };
                let code = if utf8 { 1007 } else { 1009 };
                assert_eq!(error.close_code().0, code);
                let open = !self.closed();
                self.session.handle_invalid(self.now, error);
                self.drain(&CloseRule {
                    allowed: vec![code],
                    must: open,
                    requested: false,
                });
            }
            Op::PeerClosed(code) => {
                let open = !self.closed();
                let close = code.map(|c| Close::new(CloseCode(c), "peer"));
                self.session.handle_peer_closed(self.now, close);
                self.drain(&CloseRule::none());
                assert!(
                    !open || self.closed_event == Some(true),
                    "peer close ignored"
                );
            }
            Op::Advance(ms) => self.advance(ms),
            Op::Accept(id) => {
                let user = json!({ "name": id });
                let result = self.session.accept(self.now, id.clone(), user.clone());
                if self.closed() {
                    assert_eq!(result, Err(SessionError::Closed));
                    self.drain(&CloseRule::none());
                    return;
                }
                let Some(should_sync) = self.pending_auth.take() else {
                    assert_eq!(result, Err(SessionError::NoPendingAuthentication));
                    self.drain(&CloseRule::none());
                    return;
                };
                assert_eq!(result, Ok(()));
                assert_eq!(self.session.id(), Some(id.as_str()));
                let initial = !self.authenticated;
                self.expected_events.push(SessionEvent::Authenticated {
                    id: id.clone(),
                    user: user.clone(),
                    initial,
                });
                if initial {
                    self.expected_events.push(if should_sync {
                        SessionEvent::LoadUndelivered { id }
                    } else {
                        SessionEvent::ClearUndelivered { id }
                    });
                }
                self.expect_queued_authentication();
                let texts = self.drain(&CloseRule::none());
                if initial {
                    let d = if self.send_user_object {
                        user
                    } else {
                        json!({})
                    };
                    assert_eq!(texts, [Message::new(Opcode::Authenticated, d)], "op 22");
                } else {
                    assert!(texts.is_empty(), "a re-authentication sends nothing");
                }
            }
            Op::Reject => {
                let result = self.session.reject(self.now, "denied");
                let mut rule = CloseRule::none();
                if self.closed() {
                    assert_eq!(result, Err(SessionError::Closed));
                } else if self.pending_auth.take().is_none() {
                    assert_eq!(result, Err(SessionError::NoPendingAuthentication));
                } else {
                    assert_eq!(result, Ok(()));
                    if self.disconnect_on_fail {
                        rule.allowed.push(1008);
                        rule.must = true;
                    } else {
                        self.expect_queued_authentication();
                    }
                }
                self.drain(&rule);
            }
            Op::Send => {
                self.sends += 1;
                let message = Message::dispatch("SEND", json!({ "n": self.sends }));
                let result = self.session.send(message.encode());
                if self.closed() {
                    assert_eq!(result, Err(SessionError::Closed));
                    assert!(self.drain(&CloseRule::none()).is_empty());
                } else {
                    assert_eq!(result, Ok(()));
                    assert_eq!(self.drain(&CloseRule::none()), [message], "send lost");
                }
            }
            Op::Disconnect(code) => {
                let code = if (1000..=1015).contains(&code) {
                    code
                } else {
                    1000 + code % 16
                };
                let open = !self.closed();
                let result = self.session.disconnect(Close::new(CloseCode(code), "bye"));
                assert_eq!(result.is_err(), !open, "disconnect: {result:?}");
                self.drain(&CloseRule {
                    allowed: vec![code],
                    must: open,
                    requested: true,
                });
            }
            Op::Undelivered(texts) => {
                let messages: Vec<Message> = texts
                    .into_iter()
                    .map(|text| Message::dispatch("STORED", Value::String(text)))
                    .collect();
                let expected_ok = !self.closed() && self.pending_sync;
                let dropped = messages.len().saturating_sub(self.limits.max_stored_per_id);
                let kept = messages[dropped..].to_vec();
                let result = self.session.handle_undelivered(self.now, messages);
                if self.closed() {
                    assert_eq!(result, Err(SessionError::Closed));
                } else if !expected_ok {
                    assert_eq!(result, Err(SessionError::NoPendingSync));
                } else {
                    assert_eq!(result, Ok(()));
                    self.pending_sync = false;
                    self.load_deadline = None;
                    self.redelivery = Some(ExpectedRedelivery {
                        messages: kept,
                        dropped,
                        seen: 0,
                    });
                }
                self.drain(&CloseRule::none());
            }
        }
    }
}

/// JavaScript truthiness, as upstream reads `shouldSync`.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fuzz_target!(|input: Input| {
    let mut harness = Harness::new(&input.setup);
    harness.drain(&CloseRule::none());
    assert_eq!(harness.transmitted, 1, "only the hello goes out at first");
    for op in input.ops {
        harness.step(op);
    }
});
