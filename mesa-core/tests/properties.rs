//! Property tests of the state machines' invariants.

mod sim;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesa_core::{
    AuthConfig, Backoff, BackoffConfig, ClientConfig, ClientSession, ClientTransmit, Close,
    CloseCode, ConnId, DecodeError, HeartbeatConfig, Hub, Limits, Message, Opcode, RateLimitPolicy,
    Recipients, ServerConfig, ServerSession, SessionEvent, SyncConfig, Transmit,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use sim::Sim;

fn clock() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

// ----- heartbeat -----

/// Upstream's rule, restated independently: the tick at which the connection closes,
/// given whether an ack arrived during each interval before a tick.
fn expected_close_tick(acks: &[bool], max: u32) -> Option<usize> {
    let mut misses = 0;
    for tick in 0..acks.len() {
        // Tick `tick` fires after interval `tick`; the ack flag is what arrived during it.
        let acked_since_last_beat = tick > 0 && acks[tick - 1];
        if tick == 0 || acked_since_last_beat {
            misses = 0;
        } else {
            misses += 1;
            if misses > max {
                return Some(tick);
            }
        }
    }
    None
}

proptest! {
    #[test]
    fn heartbeat_closes_exactly_after_max_attempts_misses(
        acks in prop::collection::vec(any::<bool>(), 1..40),
        max in 1u32..5,
    ) {
        let interval = Duration::from_millis(100);
        let config = ServerConfig::builder()
            .heartbeat(HeartbeatConfig { interval, max_attempts: max })
            .build()
            .unwrap();
        let start = clock();
        let mut session = ServerSession::new(Arc::new(config), start);
        let mut closed_at = None;
        for (tick, acked) in acks.iter().enumerate() {
            let now = start + interval * (tick as u32 + 1);
            prop_assert_eq!(session.poll_timeout(), Some(now));
            session.handle_timeout(now);
            while let Some(transmit) = session.poll_transmit() {
                if let Transmit::Close(close) = transmit {
                    prop_assert_eq!(close.code, CloseCode::GOING_AWAY);
                    closed_at = Some(tick);
                }
            }
            if closed_at.is_some() {
                break;
            }
            if *acked {
                session.handle_frame(now, r#"{"op":11,"d":{}}"#);
            }
        }
        prop_assert_eq!(closed_at, expected_close_tick(&acks, max));
        if acks.iter().all(|a| *a) {
            prop_assert_eq!(closed_at, None);
        }
    }

    // ----- backoff -----

    #[test]
    fn backoff_delays_stay_within_their_ceiling(
        base_ms in 1u64..5_000,
        extra_ms in 0u64..60_000,
        seed in any::<u64>(),
        attempts in 1usize..64,
    ) {
        let config = BackoffConfig {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(base_ms + extra_ms),
            base_is_fixed: true,
        };
        let mut backoff = Backoff::new(config, seed);
        let mut previous_ceiling = Duration::ZERO;
        for n in 0..attempts {
            let ceiling = backoff.ceiling(n as u32);
            let expected = config.base.saturating_mul(1u32.checked_shl(n as u32).unwrap_or(u32::MAX)).min(config.cap);
            prop_assert_eq!(ceiling, expected);
            prop_assert!(ceiling >= previous_ceiling, "the ceiling never shrinks");
            previous_ceiling = ceiling;
            let delay = backoff.next_delay();
            prop_assert!(delay <= ceiling && delay <= config.cap);
        }
    }

    // ----- codec -----

    #[test]
    fn decoding_never_panics(text in ".{0,200}") {
        let _ = Message::decode(&text, &Limits::default());
    }

    /// `encode` writes its JSON from the fields: the bytes of the tree
    /// `to_value` builds, byte for byte (upstream's field order, absent fields left
    /// out, strings escaped alike).
    #[test]
    fn encode_writes_the_json_of_to_value(message in arb_message()) {
        let tree = serde_json::to_string(&message.to_value()).unwrap();
        let encoded = message.encode();
        prop_assert_eq!(encoded.as_str(), tree.as_str());
    }

    /// `decode` reads the frame's object field by field; it answers exactly what
    /// interpreting the whole parsed value does, for duplicate, escaped and unknown
    /// keys, fields of the wrong type, invalid JSON and values that are no object.
    #[test]
    fn decode_answers_as_the_parsed_value_does(text in arb_frame_text()) {
        let limits = Limits::default();
        let reference = serde_json::from_str::<Value>(&text)
            .map_err(|_| DecodeError::NotJson)
            .and_then(Message::from_value);
        prop_assert_eq!(Message::decode(&text, &limits), reference, "{}", text);
    }

    /// A frame is refused as too deep exactly when its brackets outside strings nest
    /// deeper than the limit, whatever else it holds (the check counts brackets
    /// first and scans exactly only when there are more than the limit).
    #[test]
    fn decode_refuses_exactly_the_frames_nested_too_deep(
        text in "[\\[\\]{}\"\\\\a:,0]{0,24}",
        max in 0usize..6,
    ) {
        let limits = Limits { max_json_depth: max, ..Limits::default() };
        let too_deep = Message::decode(&text, &limits) == Err(DecodeError::TooDeep { max });
        prop_assert_eq!(too_deep, nesting(&text) > max, "{}", text);
    }

    #[test]
    fn decode_inverts_encode(message in arb_message()) {
        let encoded = message.encode();
        prop_assert_eq!(Message::decode(encoded.as_str(), &Limits::default()), Ok(message));
    }
}

/// The deepest nesting of brackets outside strings in `text`, read byte by byte (a
/// backslash in a string escapes the next byte).
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        match (in_string, byte) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (_, b'"') => in_string = !in_string,
            (false, b'{' | b'[') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z\"\\\\{}\\[\\] ]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frame-like text: an object of known, escaped and unknown keys (some twice) with
/// values of every type, some not JSON at all; or a value that is no object; or either
/// with trailing bytes.
fn arb_frame_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec!["op", "d", "t", "s", "o\\u0070", "x", "", "OP"]);
    let value = prop::sample::select(vec![
        "0",
        "1",
        "22",
        "-1",
        "1.0",
        "1e400",
        "18446744073709551616",
        "null",
        "true",
        "\"ECHO\"",
        "\"\\ud800\"",
        "{}",
        "{\"a\":[1,{\"b\":null}]}",
        "[1,2]",
        "[1",
        "{\"a\"}",
        "tru",
        "\"",
        "{\"a\":1,\"a\":2}",
    ]);
    let object = prop::collection::vec((key, value), 0..6).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    });
    let other = prop::sample::select(vec!["[]", "3", "\"op\"", "null", "", "{", "[{\"op\":0}]"])
        .prop_map(str::to_owned);
    let trailer = prop::sample::select(vec!["", "", " ", "x", "}", "{}"]);
    (prop_oneof![4 => object, 1 => other], trailer).prop_map(|(text, tail)| text + tail)
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        arb_json(),
        prop::option::of(".{0,12}"),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(op, d, t, s)| Message {
            op: Opcode::from(op),
            d,
            t,
            s,
        })
}

// ----- sessions never speak after close; every close has a reason -----

#[derive(Debug, Clone)]
enum ServerOp {
    Frame(String),
    Binary,
    PeerClosed,
    Advance(u16),
    Accept,
    Reject,
    Send,
    Disconnect,
    Undelivered(u8),
}

fn arb_server_op() -> impl Strategy<Value = ServerOp> {
    let frames = prop_oneof![
        Just(r#"{"op":11,"d":{}}"#.to_owned()),
        Just(r#"{"op":2,"d":{"token":"a","shouldSync":true}}"#.to_owned()),
        Just(r#"{"op":0,"d":{"v":"2"},"t":"CLIENT_VERSION"}"#.to_owned()),
        Just(r#"{"op":0,"d":{},"t":"ECHO"}"#.to_owned()),
        ".{0,20}",
    ];
    prop_oneof![
        frames.prop_map(ServerOp::Frame),
        Just(ServerOp::Binary),
        Just(ServerOp::PeerClosed),
        (0u16..3000).prop_map(ServerOp::Advance),
        Just(ServerOp::Accept),
        Just(ServerOp::Reject),
        Just(ServerOp::Send),
        Just(ServerOp::Disconnect),
        (0u8..5).prop_map(ServerOp::Undelivered),
    ]
}

proptest! {
    #[test]
    fn a_server_session_never_transmits_after_close(ops in prop::collection::vec(arb_server_op(), 0..60)) {
        let config = ServerConfig::builder()
            .heartbeat(HeartbeatConfig { interval: Duration::from_millis(500), max_attempts: 2 })
            .authentication(AuthConfig { timeout: Duration::from_secs(2), ..AuthConfig::default() })
            .sync(SyncConfig { redelivery_interval: Duration::from_millis(50), ..SyncConfig::default() })
            .enforce_equal_versions("1")
            .build()
            .unwrap();
        let start = clock();
        let mut now = start;
        let mut session = ServerSession::new(Arc::new(config), now);
        let mut closed = false;
        let mut closed_events = 0;
        for op in ops {
            match op {
                ServerOp::Frame(text) => session.handle_frame(now, &text),
                ServerOp::Binary => session.handle_binary(now),
                ServerOp::PeerClosed => session.handle_peer_closed(now, None),
                ServerOp::Advance(ms) => {
                    now += Duration::from_millis(u64::from(ms));
                    session.handle_timeout(now);
                }
                ServerOp::Accept => { let _ = session.accept(now, "a".into(), json!({})); }
                ServerOp::Reject => { let _ = session.reject(now, "no"); }
                ServerOp::Send => { let _ = session.send(Message::dispatch("X", json!({})).encode()); }
                ServerOp::Disconnect => { let _ = session.disconnect(Close::new(CloseCode::NORMAL, "bye")); }
                ServerOp::Undelivered(n) => {
                    let stored = (0..n).map(|i| Message::dispatch("S", json!(i))).collect();
                    let _ = session.handle_undelivered(now, stored);
                }
            }
            while let Some(transmit) = session.poll_transmit() {
                prop_assert!(!closed, "transmitted {:?} after close", transmit);
                if let Transmit::Close(close) = transmit {
                    prop_assert!(!close.reason.is_empty());
                    prop_assert!((1000..=1015).contains(&close.code.0));
                    closed = true;
                }
            }
            while let Some(event) = session.poll_event() {
                prop_assert_eq!(closed_events, 0, "event {:?} after Closed", event);
                if let SessionEvent::Closed { close, .. } = event {
                    prop_assert!(!close.reason.is_empty());
                    closed_events += 1;
                    closed = true;
                }
            }
            if closed {
                prop_assert_eq!(session.poll_timeout(), None);
            } else {
                prop_assert!(session.poll_timeout().is_none_or(|t| t > now), "a due timer was not fired");
            }
        }
    }
}

// ----- nothing queued is lost or reordered across reconnects -----

#[derive(Debug, Clone)]
enum Fault {
    Send,
    Wait(u16),
    Cut,
    Crash,
    Restart,
}

fn arb_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::Send),
        3 => (1u16..2_000).prop_map(Fault::Wait),
        1 => Just(Fault::Cut),
        1 => Just(Fault::Crash),
        1 => Just(Fault::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn no_send_is_lost_or_reordered_across_reconnects(
        faults in prop::collection::vec(arb_fault(), 1..80),
        seed in any::<u64>(),
    ) {
        let config = ServerConfig::builder()
            .heartbeat(HeartbeatConfig { interval: Duration::from_millis(300), max_attempts: 2 })
            .reconnect_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        let mut sim = Sim::new(config, seed);
        let client_config = ClientConfig {
            backoff: BackoffConfig { base: Duration::from_millis(50), cap: Duration::from_secs(2), base_is_fixed: false },
            limits: Limits { max_queued_sends: 16, ..Limits::default() },
            ..ClientConfig::default()
        };
        let c = sim.add_client(client_config);
        sim.connect(c);
        let mut accepted = Vec::new();
        let mut next = 0u64;
        for fault in faults {
            match fault {
                Fault::Send => {
                    if sim.send(c, Message::dispatch("NOTE", json!(next))).is_ok() {
                        accepted.push(next);
                    }
                    next += 1;
                }
                Fault::Wait(ms) => sim.run_for(Duration::from_millis(u64::from(ms))),
                // Faults strike between frames: a frame lost in flight is the
                // transport's at-most-once, not a queue loss.
                Fault::Cut if !sim.in_flight(c) => sim.cut(c),
                Fault::Crash if !sim.in_flight(c) => sim.crash_server(),
                Fault::Restart => sim.restart_server(),
                Fault::Cut | Fault::Crash => {}
            }
        }
        sim.restart_server();
        let settled = sim.drive_bounded(1_000_000, Duration::from_secs(120), |sim| {
            sim.clients[c].session.is_open() && sim.clients[c].session.queued() == 0 && !sim.in_flight(c)
        });
        prop_assert!(settled, "the client came back and flushed its queue");
        let received: Vec<u64> = sim
            .conn_logs
            .values()
            .flat_map(|log| log.events.iter())
            .filter_map(|e| match e {
                SessionEvent::Message(m) if m.t.as_deref() == Some("NOTE") => m.d.as_u64(),
                _ => None,
            })
            .collect();
        prop_assert_eq!(received, accepted);
    }

    #[test]
    fn a_deliberately_disconnected_client_never_reconnects_by_itself(
        waits in prop::collection::vec(0u16..5_000, 1..10),
        seed in any::<u64>(),
    ) {
        let mut client = ClientSession::new(ClientConfig::default(), seed).unwrap();
        let mut now = clock();
        client.connect(now).unwrap();
        client.handle_connected(now).unwrap();
        client.handle_closed(now, None);
        client.disconnect(now, Close::new(CloseCode::NORMAL, "bye")).unwrap();
        while client.poll_transmit().is_some() {}
        for wait in waits {
            now += Duration::from_millis(u64::from(wait));
            client.handle_timeout(now);
            while let Some(transmit) = client.poll_transmit() {
                prop_assert!(!matches!(transmit, ClientTransmit::Connect), "reconnected after disconnect");
            }
        }
        prop_assert_eq!(client.poll_timeout(), None);
    }
}

// ----- inbound rate -----

/// Whether no window of `times` (sorted) holds more than `burst + rate · t` of them.
fn within_rate(times: &[Instant], rate: u32, burst: u32) -> Result<(), TestCaseError> {
    for (i, first) in times.iter().enumerate() {
        for (j, last) in times.iter().enumerate().skip(i) {
            let count = (j - i + 1) as u128;
            let t = (*last - *first).as_nanos();
            prop_assert!(
                count <= u128::from(burst)
                    || (count - u128::from(burst)) * 1_000_000_000 <= u128::from(rate) * t,
                "{} frames in {:?} with rate {} and burst {}",
                count,
                *last - *first,
                rate,
                burst
            );
        }
    }
    Ok(())
}

proptest! {
    /// Whatever the arrival pattern, the bucket admits at most `burst + rate · t`
    /// frames in any window of length `t` (checked over every pair of admissions),
    /// and it is empty exactly when it has no whole token and refuses a frame.
    #[test]
    fn the_token_bucket_never_admits_more_than_burst_plus_rate_times_t(
        rate in 1u32..2_000,
        burst in 1u32..300,
        gaps_us in prop::collection::vec(prop_oneof![Just(0u64), 0u64..2_000, 0u64..2_000_000], 1..400),
    ) {
        let start = clock();
        let mut bucket = mesa_core::TokenBucket::new(rate, burst, start);
        let mut now = start;
        let mut admitted = Vec::new();
        for gap in gaps_us {
            now += Duration::from_micros(gap);
            let empty = bucket.is_empty(now);
            prop_assert_eq!(empty, bucket.available(now) == 0);
            let taken = bucket.try_take(now);
            prop_assert_eq!(taken, !empty);
            if taken {
                admitted.push(now);
            }
        }
        within_rate(&admitted, rate, burst)?;
    }

    /// Under the `Close` policy, a client that never sends faster than the sustained
    /// rate is never closed for it, however long it goes on; one that sends
    /// `burst + 1` frames at once is.
    #[test]
    fn a_session_closes_for_rate_exactly_when_the_peer_outpaces_it(
        rate in 1u32..1_000,
        burst in 1u32..50,
        slack_us in prop::collection::vec(0u64..5_000, 1..300),
    ) {
        let limits = Limits {
            max_messages_per_second: rate,
            max_message_burst: burst,
            rate_limit_policy: RateLimitPolicy::Close,
            ..Limits::default()
        };
        let config = Arc::new(ServerConfig::builder().limits(limits).build().unwrap());
        let start = clock();
        let period = Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(rate)));
        let mut paced = ServerSession::new(config.clone(), start);
        let mut now = start;
        for slack in slack_us {
            now += period + Duration::from_micros(slack);
            paced.handle_frame(now, r#"{"op":0,"t":"NOTE","d":1}"#);
            prop_assert!(!paced.is_closed(), "a paced sender was closed");
        }
        let mut flood = ServerSession::new(config, start);
        for _ in 0..burst {
            flood.handle_frame(start, r#"{"op":0,"t":"NOTE","d":1}"#);
        }
        prop_assert!(!flood.is_closed());
        flood.handle_frame(start, r#"{"op":0,"t":"NOTE","d":1}"#);
        prop_assert!(flood.is_closed());
        let closed = std::iter::from_fn(|| flood.poll_event())
            .find_map(|e| match e { SessionEvent::Closed { close, .. } => Some(close), _ => None });
        prop_assert_eq!(closed, Some(Close::new(CloseCode::POLICY, "rate limit exceeded")));
    }

    /// Under the default `Slow` policy, with a driver that reads only while the
    /// session lets it (as ours does: frames wait in TCP meanwhile), whatever the
    /// sender does the session processes at most `burst + rate · t` frames in any
    /// window of length `t`, processes every frame, in order, never closes, and
    /// pauses no longer than one token interval after a read.
    #[test]
    fn a_slowed_session_holds_the_rate_and_never_closes_for_it(
        rate in 1u32..1_000,
        burst in 1u32..50,
        gaps_us in prop::collection::vec(prop_oneof![Just(0u64), 0u64..5_000, 0u64..500_000], 1..300),
        pings in prop::collection::vec(any::<bool>(), 300),
    ) {
        let limits = Limits { max_messages_per_second: rate, max_message_burst: burst, ..Limits::default() };
        let config = Arc::new(ServerConfig::builder().limits(limits).build().unwrap());
        let cost = Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(rate)));
        let start = clock();
        let mut session = ServerSession::new(config, start);
        let (mut now, mut arrival) = (start, start);
        let mut reads = Vec::new();
        let mut texts = 0u64;
        for (gap, ping) in gaps_us.iter().zip(&pings) {
            arrival += Duration::from_micros(*gap);
            now = now.max(arrival);
            // The driver: no read while paused; the resume instant is a deadline.
            while let Some(until) = session.read_paused_until() {
                prop_assert_eq!(session.poll_timeout(), Some(until));
                let last = *reads.last().expect("a pause follows a read");
                prop_assert!(until <= last + cost, "paused {:?} after a read", until - last);
                now = now.max(until);
                session.handle_timeout(now);
            }
            if *ping {
                session.handle_control(now);
            } else {
                session.handle_frame(now, &format!(r#"{{"op":0,"t":"N","d":{texts}}}"#));
                texts += 1;
            }
            reads.push(now);
            prop_assert!(!session.is_closed(), "closed after {} reads", reads.len());
        }
        while session.poll_transmit().is_some() {}
        let processed: Vec<Value> = std::iter::from_fn(|| session.poll_event())
            .map(|event| match event {
                SessionEvent::Message(message) => Ok(message.d),
                other => Err(format!("{other:?}")),
            })
            .collect::<Result<_, _>>()
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(processed, (0..texts).map(|n| json!(n)).collect::<Vec<_>>());
        within_rate(&reads, rate, burst)?;
    }
}

// ----- routing -----

/// Short ids from a small alphabet, so lists repeat ids and overlap their exclusions.
fn arb_ids() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-f]{1,2}", 0..60)
}

proptest! {
    /// `excluding` (a hash set) keeps exactly what the naive filter keeps, in order.
    #[test]
    fn excluding_equals_the_naive_filter(ids in arb_ids(), excluding in arb_ids()) {
        let naive: Vec<String> = ids.iter().filter(|id| !excluding.contains(id)).cloned().collect();
        prop_assert_eq!(
            Recipients::Ids(ids).excluding(&excluding),
            Recipients::Ids(naive)
        );
    }

    /// `route` finds the connections of the listed ids here, in connection order,
    /// and lists the others once each in the order they first appear, as the naive
    /// search does; `at_most` counts the same distinct ids.
    #[test]
    fn routing_equals_the_naive_search(online in arb_ids(), ids in arb_ids(), max in 0usize..40) {
        let mut hub = Hub::new(false);
        let conns: Vec<(ConnId, String)> = online
            .iter()
            .map(|id| {
                let conn = hub.connect();
                let _ = hub.authenticate(conn, id);
                (conn, id.clone())
            })
            .collect();
        let recipients = Recipients::Ids(ids.clone());
        let (targets, absent) = hub.route(&recipients);

        let naive_targets: Vec<ConnId> =
            conns.iter().filter(|(_, id)| ids.contains(id)).map(|(conn, _)| *conn).collect();
        let mut distinct: Vec<String> = Vec::new();
        for id in &ids {
            if !distinct.contains(id) {
                distinct.push(id.clone());
            }
        }
        let naive_absent: Vec<String> =
            distinct.iter().filter(|id| !online.contains(id)).cloned().collect();
        prop_assert_eq!(targets, naive_targets);
        prop_assert_eq!(absent, naive_absent);
        prop_assert_eq!(&mesa_core::distinct_ids(&ids), &distinct);
        prop_assert_eq!(recipients.at_most(max).is_ok(), distinct.len() <= max);
    }
}
