//! Rooms on the client side: the opt-in, subscriptions kept and restored, answers
//! matched by reference, and old servers. By hand against a `ClientSession`, then as
//! properties over the single-server simulation (an open rooms policy).

mod sim;

use std::collections::{BTreeSet, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mesa_core::rooms::{RefusalCode, RoomRequest};
use mesa_core::{
    AuthConfig, ClientConfig, ClientError, ClientEvent, ClientSession, ClientTransmit, Close,
    CloseCode, Limits, Message, Reference, ServerConfig, SessionEvent,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use sim::Sim;

fn t0() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

const ROOMS_AUTH: &str = r#"{"op":10,"d":{"c_authentication_timeout":10000,"rules":["rooms"]}}"#;
const ROOMS_OPEN: &str = r#"{"op":10,"d":{"rules":["rooms"]}}"#;
const OLD: &str =
    r#"{"op":10,"d":{"c_authentication_timeout":10000,"rules":["sends_user_object"]}}"#;

fn client(config: ClientConfig) -> ClientSession {
    ClientSession::new(config, 7).unwrap()
}

/// Open a transport and receive `hello` on it.
fn open(client: &mut ClientSession, hello: &str) {
    let _ = client.connect(t0());
    while let Some(transmit) = client.poll_transmit() {
        assert_eq!(transmit, ClientTransmit::Connect);
    }
    client.handle_connected(t0()).unwrap();
    assert!(client.poll_transmit().is_none(), "nothing before the hello");
    client.handle_frame(t0(), hello);
}

/// The frames written since the last call, decoded.
fn sent(client: &mut ClientSession) -> Vec<Value> {
    std::iter::from_fn(|| client.poll_transmit())
        .filter_map(|t| match t {
            ClientTransmit::Text(frame) => Some(serde_json::from_str(frame.as_str()).unwrap()),
            _ => None,
        })
        .collect()
}

/// The events since the last call, without `Connected`.
fn events(client: &mut ClientSession) -> Vec<ClientEvent> {
    std::iter::from_fn(|| client.poll_event())
        .filter(|e| !matches!(e, ClientEvent::Connected { .. }))
        .collect()
}

fn subscribe_frame(room: &str, reference: Reference) -> Value {
    json!({"op": 0, "t": "mesa:subscribe", "d": {"room": room, "ref": reference.get()}})
}

fn answer(client: &mut ClientSession, kind: &str, room: &str, reference: Value) {
    let d = json!({"room": room, "ref": reference});
    client.handle_frame(t0(), &json!({"op": 0, "t": kind, "d": d}).to_string());
}

fn rooms(client: &ClientSession) -> Vec<&str> {
    client.subscriptions().collect()
}

/// A client connected to a server with rooms and no authentication.
fn carrying_rooms() -> ClientSession {
    let mut c = client(ClientConfig::default());
    open(&mut c, ROOMS_OPEN);
    sent(&mut c);
    events(&mut c);
    assert!(c.carries_rooms());
    c
}

#[test]
fn op_2_waits_for_the_hello_and_opts_in_only_on_a_server_with_rooms() {
    let credentials = json!({"token": "alice", "shouldSync": true});
    for (hello, wants, opt_in) in [
        (ROOMS_AUTH, true, true),
        (ROOMS_AUTH, false, false),
        (OLD, true, false),
    ] {
        let config = ClientConfig {
            rooms: wants,
            ..ClientConfig::default()
        };
        let mut c = client(config);
        c.authenticate(t0(), json!({"token": "alice"}), true)
            .unwrap();
        open(&mut c, hello);
        let mut expected = credentials.clone();
        if opt_in {
            expected["mesa"] = json!({"caps": ["rooms"]});
        }
        assert_eq!(sent(&mut c), [json!({"op": 2, "d": expected})], "{hello}");
        // Every later op 2 carries it too.
        c.authenticate(t0(), json!({"token": "alice"}), true)
            .unwrap();
        assert_eq!(sent(&mut c), [json!({"op": 2, "d": expected})], "{hello}");
    }
}

#[test]
fn an_old_server_hears_upstream_s_bytes() {
    let mut c = client(ClientConfig::default());
    c.authenticate(t0(), json!({"token": "alice"}), true)
        .unwrap();
    c.send(t0(), Message::dispatch("CHAT", json!({"x": 1})))
        .unwrap();
    open(&mut c, OLD);
    let frames: Vec<String> = std::iter::from_fn(|| c.poll_transmit())
        .filter_map(|t| match t {
            ClientTransmit::Text(frame) => Some(frame.as_str().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(
        frames,
        [
            r#"{"op":2,"d":{"token":"alice","shouldSync":true}}"#,
            r#"{"op":0,"d":{"x":1},"t":"CHAT"}"#
        ]
    );
    // Its `mesa:` dispatches and `room` fields are the application's business.
    c.handle_frame(
        t0(),
        r#"{"op":0,"t":"mesa:subscribed","d":{"room":"a","ref":1},"room":"a"}"#,
    );
    assert!(
        matches!(&events(&mut c)[..], [ClientEvent::Message(m)] if m.t.as_deref() == Some("mesa:subscribed"))
    );
}

#[test]
fn without_authentication_the_opt_in_goes_alone_then_subscriptions_then_the_queue() {
    let mut c = client(ClientConfig::default());
    let a = c.subscribe(t0(), "a", Some("k")).unwrap();
    let p = c
        .publish(t0(), "a", Message::dispatch("CHAT", json!({"n": 1})))
        .unwrap();
    c.send(t0(), Message::dispatch("SEND", json!({}))).unwrap();
    assert_eq!(c.queued(), 2);
    open(&mut c, ROOMS_OPEN);
    assert_eq!(
        sent(&mut c),
        [
            json!({"op": 2, "d": {"mesa": {"caps": ["rooms"]}}}),
            json!({"op": 0, "t": "mesa:subscribe", "d": {"room": "a", "token": "k", "ref": a.get()}}),
            json!({"op": 0, "t": "mesa:publish", "d": {"room": "a", "t": "CHAT", "d": {"n": 1}, "ref": p.get()}}),
            json!({"op": 0, "t": "SEND", "d": {}}),
        ]
    );
    assert!(c.carries_rooms());
    assert_eq!(c.queued(), 0);
}

#[test]
fn with_authentication_room_requests_wait_for_op_22() {
    let mut c = client(ClientConfig::default());
    c.authenticate(t0(), json!({"token": "alice"}), false)
        .unwrap();
    open(&mut c, ROOMS_AUTH);
    sent(&mut c);
    let a = c.subscribe(t0(), "a", None).unwrap();
    assert!(
        sent(&mut c).is_empty(),
        "the server does not know who asks yet"
    );
    assert!(!c.carries_rooms());
    c.handle_frame(t0(), r#"{"op":22,"d":{"id":"alice"}}"#);
    assert_eq!(sent(&mut c), [subscribe_frame("a", a)]);
    assert!(c.carries_rooms());
}

#[test]
fn on_a_server_that_authenticates_no_op_2_goes_out_before_the_application_s() {
    let mut c = client(ClientConfig::default());
    let a = c.subscribe(t0(), "a", None).unwrap();
    open(&mut c, ROOMS_AUTH);
    assert!(
        sent(&mut c).is_empty(),
        "an op 2 without a token would be rejected"
    );
    c.authenticate(t0(), json!({"token": "bob"}), true).unwrap();
    assert_eq!(
        sent(&mut c),
        [json!({"op": 2, "d": {"token": "bob", "shouldSync": true, "mesa": {"caps": ["rooms"]}}})]
    );
    c.handle_frame(t0(), r#"{"op":22,"d":{}}"#);
    assert_eq!(sent(&mut c), [subscribe_frame("a", a)]);
}

#[test]
fn answers_and_room_messages_are_events() {
    let mut c = carrying_rooms();
    let a = c.subscribe(t0(), "a", None).unwrap();
    let b = c.subscribe(t0(), "b", None).unwrap();
    assert_eq!(
        sent(&mut c),
        [subscribe_frame("a", a), subscribe_frame("b", b)]
    );
    answer(&mut c, "mesa:subscribed", "a", json!(a.get()));
    c.handle_frame(
        t0(),
        &json!({"op": 0, "t": "mesa:error", "d": {
            "room": "b", "ref": b.get(), "code": "unauthorized", "reason": "no"
        }})
        .to_string(),
    );
    answer(&mut c, "mesa:subscribed", "team", Value::Null);
    c.handle_frame(t0(), r#"{"op":0,"d":{"x":1},"t":"CHAT","room":"a"}"#);
    c.handle_frame(t0(), r#"{"op":0,"d":{"x":2},"t":"CHAT"}"#);
    let got = events(&mut c);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(
        got[0],
        ClientEvent::Subscribed {
            room: "a".into(),
            reference: Some(a),
            position: None,
            recovered: None,
        }
    );
    assert!(matches!(
        &got[1],
        ClientEvent::RoomRefused { room: Some(room), reference: Some(r), refusal }
            if room == "b" && *r == b && refusal.code == RefusalCode::Unauthorized
    ));
    assert_eq!(
        got[2],
        ClientEvent::Subscribed {
            room: "team".into(),
            reference: None,
            position: None,
            recovered: None,
        }
    );
    assert_eq!(
        got[3],
        ClientEvent::RoomMessage {
            room: "a".into(),
            message: Message::dispatch("CHAT", json!({"x": 1})),
            position: None,
        }
    );
    assert_eq!(
        got[4],
        ClientEvent::Message(Message::dispatch("CHAT", json!({"x": 2})))
    );
    // The refused room is not held; the server's own join is not the client's.
    assert_eq!(rooms(&c), ["a"]);
    // The server takes the connection out of a: the subscription ends.
    answer(&mut c, "mesa:unsubscribed", "a", Value::Null);
    assert_eq!(
        events(&mut c),
        [ClientEvent::Unsubscribed {
            room: "a".into(),
            reference: None
        }]
    );
    assert!(rooms(&c).is_empty());
}

#[test]
fn a_reconnection_restores_the_subscriptions_in_order() {
    let mut c = carrying_rooms();
    let a = c.subscribe(t0(), "a", None).unwrap();
    let b = c.subscribe(t0(), "b", None).unwrap();
    let x = c.subscribe(t0(), "x", None).unwrap();
    answer(&mut c, "mesa:subscribed", "a", json!(a.get()));
    answer(&mut c, "mesa:subscribed", "x", json!(x.get()));
    let u = c.unsubscribe(t0(), "x").unwrap();
    sent(&mut c);
    events(&mut c);
    // b's answer is lost with the connection.
    c.handle_closed(t0(), None);
    let at = c.poll_timeout().expect("backoff");
    c.handle_timeout(at);
    open(&mut c, ROOMS_OPEN);
    let frames = sent(&mut c);
    assert_eq!(
        frames[0],
        json!({"op": 2, "d": {"mesa": {"caps": ["rooms"]}}})
    );
    // a confirmed: a new reference; b unanswered: its own, still awaited.
    assert_eq!(
        frames[1]["d"],
        json!({"room": "a", "ref": frames[1]["d"]["ref"]})
    );
    let restored_a = frames[1]["d"]["ref"].as_u64().unwrap();
    assert!(restored_a > u.get(), "a reference never used before");
    assert_eq!(frames[2], subscribe_frame("b", b));
    assert_eq!(frames.len(), 3);
    assert_eq!(rooms(&c), ["a", "b"]);
}

#[test]
fn unsubscribing_without_a_connection_carrying_rooms_answers_at_once() {
    let mut c = client(ClientConfig::default());
    c.subscribe(t0(), "a", None).unwrap();
    let u = c.unsubscribe(t0(), "a").unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::Unsubscribed {
            room: "a".into(),
            reference: Some(u)
        }]
    );
    assert_eq!(c.unsubscribe(t0(), "a"), Err(ClientError::NotSubscribed));
    // Carrying rooms, the server is asked (it may have joined the room itself).
    let mut c = carrying_rooms();
    let u = c.unsubscribe(t0(), "team").unwrap();
    assert_eq!(
        sent(&mut c),
        [json!({"op": 0, "t": "mesa:unsubscribe", "d": {"room": "team", "ref": u.get()}})]
    );
}

#[test]
fn an_old_server_has_no_rooms() {
    let mut c = client(ClientConfig::default());
    let a = c.subscribe(t0(), "a", None).unwrap();
    let p = c
        .publish(t0(), "b", Message::dispatch("CHAT", json!({})))
        .unwrap();
    open(&mut c, OLD);
    assert_eq!(
        events(&mut c),
        [ClientEvent::RoomsUnavailable {
            dropped: vec![(a, "a".to_owned()), (p, "b".to_owned())]
        }]
    );
    assert_eq!(c.queued(), 0);
    assert_eq!(c.subscribe(t0(), "a", None), Err(ClientError::NoRooms));
    assert_eq!(
        c.publish(t0(), "a", Message::dispatch("CHAT", json!({}))),
        Err(ClientError::NoRooms)
    );
    assert!(sent(&mut c).is_empty());
}

#[test]
fn a_confirmed_subscription_waits_out_a_server_without_rooms() {
    let mut c = carrying_rooms();
    let a = c.subscribe(t0(), "a", None).unwrap();
    answer(&mut c, "mesa:subscribed", "a", json!(a.get()));
    sent(&mut c);
    c.handle_closed(t0(), None);
    open(&mut c, OLD);
    assert!(
        events(&mut c)
            .iter()
            .all(|e| !matches!(e, ClientEvent::RoomsUnavailable { .. }))
    );
    assert_eq!(rooms(&c), ["a"]);
    c.handle_closed(t0(), None);
    open(&mut c, ROOMS_OPEN);
    let frames = sent(&mut c);
    assert_eq!(frames[1]["t"], "mesa:subscribe");
    assert_eq!(frames[1]["d"]["room"], "a");
}

#[test]
fn room_commands_are_checked_before_anything_is_sent() {
    let off = ClientConfig {
        rooms: false,
        ..ClientConfig::default()
    };
    let mut c = client(off);
    assert_eq!(
        c.subscribe(t0(), "a", None),
        Err(ClientError::RoomsDisabled)
    );
    assert_eq!(c.unsubscribe(t0(), "a"), Err(ClientError::RoomsDisabled));
    let chat = || Message::dispatch("CHAT", json!({}));
    assert_eq!(
        c.publish(t0(), "a", chat()),
        Err(ClientError::RoomsDisabled)
    );

    let small = ClientConfig {
        limits: Limits {
            max_rooms_per_connection: 2,
            max_queued_sends: 2,
            ..Limits::default()
        },
        ..ClientConfig::default()
    };
    let mut c = client(small);
    assert!(matches!(
        c.subscribe(t0(), "a b", None),
        Err(ClientError::InvalidRoom(refusal)) if refusal.code == RefusalCode::InvalidRoom
    ));
    c.subscribe(t0(), "a", None).unwrap();
    c.subscribe(t0(), "b", None).unwrap();
    assert_eq!(
        c.subscribe(t0(), "c", None),
        Err(ClientError::TooManyRooms(2))
    );
    // Subscribing again to a held room is no new room.
    c.subscribe(t0(), "a", Some("new token")).unwrap();
    let untyped = Message { t: None, ..chat() };
    assert_eq!(
        c.publish(t0(), "a", untyped),
        Err(ClientError::InvalidRoomMessage)
    );
    let reserved = Message::dispatch("mesa:subscribe", json!({}));
    assert_eq!(
        c.publish(t0(), "a", reserved),
        Err(ClientError::InvalidRoomMessage)
    );
    // Publishes and sends share the offline bound.
    c.publish(t0(), "a", chat()).unwrap();
    c.send(t0(), chat()).unwrap();
    assert_eq!(c.publish(t0(), "a", chat()), Err(ClientError::QueueFull(2)));
    assert_eq!(c.send(t0(), chat()), Err(ClientError::QueueFull(2)));
    assert!(c.poll_transmit().is_none());
}

#[test]
fn a_subscribe_waiting_for_a_connection_shares_its_reference() {
    let mut c = client(ClientConfig::default());
    let first = c.subscribe(t0(), "a", None).unwrap();
    assert_eq!(c.subscribe(t0(), "a", Some("k")).unwrap(), first);
    open(&mut c, ROOMS_OPEN);
    let frames = sent(&mut c);
    assert_eq!(frames.len(), 2, "one subscribe: {frames:?}");
    assert_eq!(frames[1]["d"]["token"], "k");
}

// ----- properties over the simulation -----

#[derive(Debug, Clone)]
enum Op {
    Subscribe(u8),
    Unsubscribe(u8),
    Publish(u8),
    /// The transport drops; the client reconnects by itself.
    Cut,
    /// The application disconnects, then connects again.
    Reconnect,
    Run(u16),
    /// Wait until the connection carries rooms and every answer arrived, then check.
    Settle,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6).prop_map(Op::Subscribe),
        3 => (0u8..6).prop_map(Op::Unsubscribe),
        1 => (0u8..6).prop_map(Op::Publish),
        1 => Just(Op::Cut),
        1 => Just(Op::Reconnect),
        2 => (0u16..50).prop_map(Op::Run),
        1 => Just(Op::Settle),
    ]
}

fn room(index: u8) -> String {
    format!("room:{index}")
}

fn rooms_sim() -> (Sim, usize) {
    let config = ServerConfig::builder()
        .rooms(true)
        .authentication(AuthConfig::default())
        .reconnect_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 3);
    let c = sim.add_client(ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.connect(c);
    (sim, c)
}

/// Run until client `c` carries rooms and nothing is on the way, then check that
/// the rooms the server holds for its connection are the application's, and the
/// client's own list is too.
fn settle(sim: &mut Sim, c: usize, model: &[String]) -> Result<(), TestCaseError> {
    let settled = sim.drive_bounded(10_000, Duration::from_secs(60), |sim| {
        sim.clients[c].session.carries_rooms() && !sim.in_flight(c)
    });
    prop_assert!(settled, "never settled");
    let held: Vec<&str> = sim.clients[c].session.subscriptions().collect();
    prop_assert_eq!(&held, &model.iter().map(String::as_str).collect::<Vec<_>>());
    let conn = *sim.conn_logs.keys().last().expect("a connection");
    let on_server: BTreeSet<&str> = sim.hub.rooms().rooms_of(conn).collect();
    let expected: BTreeSet<&str> = model.iter().map(String::as_str).collect();
    prop_assert_eq!(on_server, expected);
    Ok(())
}

/// Every request a connection carried has a reference of its own.
fn references_unique(sim: &Sim) -> Result<(), TestCaseError> {
    for log in sim.conn_logs.values() {
        let mut seen = HashSet::new();
        for event in &log.events {
            if let SessionEvent::Room(request) = event {
                let (RoomRequest::Subscribe { reference, .. }
                | RoomRequest::Unsubscribe { reference, .. }
                | RoomRequest::Publish { reference, .. }
                | RoomRequest::Presence { reference, .. }) = &**request;
                prop_assert!(seen.insert(reference.to_string()), "{} twice", reference);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_rooms_restored_are_the_rooms_the_application_holds(
        ops in prop::collection::vec(arb_op(), 0..40)
    ) {
        let (mut sim, c) = rooms_sim();
        let mut model: Vec<String> = Vec::new();
        let mut returned = HashSet::new();
        for op in ops {
            match op {
                Op::Subscribe(i) => {
                    let reference = sim.command(c, |s, now| s.subscribe(now, &room(i), None));
                    let reference = reference.expect("an open policy, few rooms");
                    if !model.contains(&room(i)) {
                        model.push(room(i));
                        prop_assert!(returned.insert(reference), "reference reused");
                    }
                }
                Op::Unsubscribe(i) => {
                    let carries = sim.clients[c].session.carries_rooms();
                    let result = sim.command(c, |s, now| s.unsubscribe(now, &room(i)));
                    let held = model.contains(&room(i));
                    model.retain(|r| *r != room(i));
                    match result {
                        Ok(reference) => prop_assert!(returned.insert(reference), "reference reused"),
                        Err(error) => {
                            prop_assert_eq!(error, ClientError::NotSubscribed);
                            prop_assert!(!held && !carries);
                        }
                    }
                }
                Op::Publish(i) => {
                    let message = Message::dispatch("CHAT", json!({"i": i}));
                    if let Ok(reference) = sim.command(c, |s, now| s.publish(now, &room(i), message)) {
                        prop_assert!(returned.insert(reference), "reference reused");
                    }
                }
                Op::Cut => sim.cut(c),
                Op::Reconnect => {
                    let _ = sim.command(c, |s, now| s.disconnect(now, Close::new(CloseCode::NORMAL, "bye")));
                    let _ = sim.command(c, |s, now| s.connect(now));
                }
                Op::Run(ms) => sim.run_for(Duration::from_millis(u64::from(ms))),
                Op::Settle => settle(&mut sim, c, &model)?,
            }
        }
        settle(&mut sim, c, &model)?;
        references_unique(&sim)?;
        // An open policy refuses only leaving a room the connection is not in.
        let refused = sim.clients[c].log.count(|e| matches!(
            e,
            ClientEvent::RoomRefused { refusal, .. } if refusal.code != RefusalCode::NotSubscribed
        ));
        prop_assert_eq!(refused, 0);
    }
}

/// The presence events client `c` received, in order: `(room, id, joined)`.
fn presence_events(sim: &Sim, c: usize) -> Vec<(String, String, bool)> {
    sim.clients[c]
        .log
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::MemberJoined { room, id } => Some((room.clone(), id.clone(), true)),
            ClientEvent::MemberLeft { room, id } => Some((room.clone(), id.clone(), false)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_server_alone_tells_presence_per_id_to_the_subscriptions_that_asked() {
    let (mut sim, watcher) = rooms_sim();
    let quiet = sim.add_client(ClientConfig::default());
    sim.authenticate(quiet, "carol", true);
    sim.connect(quiet);
    let tabs: Vec<usize> = (0..2)
        .map(|_| {
            let tab = sim.add_client(ClientConfig::default());
            sim.authenticate(tab, "bob", true);
            sim.connect(tab);
            tab
        })
        .collect();
    sim.command(watcher, |s, now| {
        s.subscribe_with_presence(now, "lobby", None)
    })
    .unwrap();
    sim.command(quiet, |s, now| s.subscribe(now, "lobby", None))
        .unwrap();
    let carried = |sim: &Sim| {
        (0..sim.clients.len()).all(|c| sim.clients[c].session.carries_rooms() && !sim.in_flight(c))
    };
    assert!(sim.drive_bounded(10_000, Duration::from_secs(10), carried));
    for &tab in &tabs {
        sim.command(tab, |s, now| s.subscribe(now, "lobby", None))
            .unwrap();
    }
    sim.run_for(Duration::from_millis(100));
    // Both tabs leave: one leave.
    for &tab in &tabs {
        sim.command(tab, |s, now| s.unsubscribe(now, "lobby"))
            .unwrap();
    }
    sim.run_for(Duration::from_millis(100));
    let event = |id: &str, joined| ("lobby".to_owned(), id.to_owned(), joined);
    assert_eq!(
        presence_events(&sim, watcher),
        [
            event("alice", true),
            event("carol", true),
            event("bob", true),
            event("bob", false)
        ]
    );
    assert!(presence_events(&sim, quiet).is_empty(), "it did not ask");
    // Who is in the room now, asked by a member.
    let asked = sim
        .command(quiet, |s, now| s.presence(now, "lobby"))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    let members = sim.clients[quiet]
        .log
        .events
        .iter()
        .find_map(|(_, e)| match e {
            ClientEvent::Members {
                room,
                reference: Some(reference),
                members,
            } if *reference == asked && room == "lobby" => Some(members.clone()),
            _ => None,
        });
    let expected = vec![("alice".to_owned(), 1), ("carol".to_owned(), 1)];
    assert_eq!(members, Some(expected));
    // By one that is not a member: refused.
    let outside = sim
        .command(tabs[0], |s, now| s.presence(now, "lobby"))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    let refused = sim.clients[tabs[0]].log.count(|e| {
        matches!(
            e,
            ClientEvent::RoomRefused { reference: Some(r), refusal, .. }
                if *r == outside && refusal.code == RefusalCode::NotSubscribed
        )
    });
    assert_eq!(refused, 1);
}
