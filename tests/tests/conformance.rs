//! The conformance suite: every scenario is written once, as an async fn over
//! `R: mesa_driver::Runtime`, and runs as one test per runtime (`tokio`, `smol`,
//! `async_std`) over real loopback sockets: our server, our client, and a raw
//! WebSocket peer on the runtime's own sockets. Every wait runs on the scenario's own
//! timer and is bounded; a whole scenario is bounded by
//! [`mesa_tests::runtimes::SCENARIO`].
//!
//! The Node interop cases at the end run the published upstream clients against our
//! server on each runtime (they need Node.js and `npm ci --prefix tests/node`).
//!
//! The Redis scenarios (replication, sync, Dispatcher, Portal), written the same way,
//! are in `conformance_cluster.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::Message as WsMessage;
use async_tungstenite::tungstenite::protocol::frame::Frame;
use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use mesa_core::{
    BackoffConfig, ClientEvent, Close, CloseCode, Message, RateLimitPolicy, TooManyRecipients,
};
use mesa_driver::echo::Echo;
use mesa_driver::{
    Connection, DevAuthenticator, Handler, Refusal, Relay, Runtime, SendError, Server,
    ServerBuilder, TransportConfig,
};
use mesa_tests::ours::url;
use mesa_tests::runtimes::{
    AsyncStd, Smol, Tokio, close_code, event, message, next_frame, next_json, raw, raw_signed_in,
    run_scenario, say, serve_on, signed_in, sleep, start, until, upgrade, within, yield_now,
};
use mesa_tests::{ClientKind, NodePeer, conformance};
use serde_json::{Value, json};

conformance!(
    clients_authenticate_echo_and_broadcast,
    heartbeats_keep_clients_and_close_silent_ones,
    a_malformed_frame_closes_only_its_connection,
    a_bad_token_closes_with_1008,
    the_authentication_timeout_closes_with_1008,
    the_client_reconnects_to_a_restarted_server,
    a_slow_consumer_is_closed_with_1013,
    upgrades_past_max_connections_get_503,
    an_origin_not_allowed_gets_403,
    a_flood_past_the_message_rate_is_slowed_and_loses_nothing,
    a_flood_under_the_close_policy_closes_with_1008,
    sends_past_max_recipients_are_refused,
    websocket_protocol_violations_are_closed_with_1002,
    an_oversized_frame_still_being_written_gets_1009,
);

/// Heartbeats every 200 ms (2 misses allowed), reconnect interval 100 ms,
/// development authentication, the relay handler.
fn dev_server<R: Runtime>(rt: &R) -> ServerBuilder<R, mesa_driver::Relay> {
    Server::builder(rt.clone())
        .handler(mesa_driver::Relay)
        .heartbeat(Duration::from_millis(200), 2)
        .reconnect_interval(Duration::from_millis(100))
        .authenticate(DevAuthenticator)
}

async fn clients_authenticate_echo_and_broadcast<R: Runtime>(rt: R) {
    let addr = start(&rt, &dev_server(&rt).build().unwrap()).await;
    let (alice, mut alice_events) = signed_in(&rt, addr, "alice").await;
    let (bob, mut bob_events) = signed_in(&rt, addr, "bob").await;

    say(&alice, "ECHO", json!({"n": 1})).await;
    let echoed = message(&rt, &mut alice_events).await;
    assert_eq!(
        (echoed.t.as_deref(), echoed.d),
        (Some("ECHO"), json!({"n": 1}))
    );

    say(&bob, "BROADCAST", json!({"text": "hi all"})).await;
    for events in [&mut alice_events, &mut bob_events] {
        let broadcast = message(&rt, events).await;
        assert_eq!(
            (broadcast.t.as_deref(), broadcast.d),
            (Some("BROADCAST"), json!({"text": "hi all"}))
        );
    }

    // A BROADCAST to bob only: alice's next message is her own marker.
    let to_bob = json!({"to": ["bob"], "only": "bob"});
    say(&bob, "BROADCAST", to_bob.clone()).await;
    say(&alice, "ECHO", json!("marker")).await;
    assert_eq!(message(&rt, &mut bob_events).await.d, to_bob);
    assert_eq!(message(&rt, &mut alice_events).await.d, json!("marker"));
}

async fn heartbeats_keep_clients_and_close_silent_ones<R: Runtime>(rt: R) {
    let addr = start(&rt, &dev_server(&rt).build().unwrap()).await;
    let (client, mut events) = signed_in(&rt, addr, "alice").await;
    let mut silent = raw(&rt, addr).await;
    let hello = next_json(&rt, &mut silent).await;
    assert_eq!(hello["d"]["c_heartbeat_interval"], 200, "{hello}");

    // The silent peer never answers: {} then tries 1 and 2 of 2, then 1001.
    let mut beats = Vec::new();
    let code = loop {
        match next_frame(&rt, &mut silent).await {
            WsMessage::Text(text) => {
                let beat: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(beat["op"], 1, "{beat}");
                beats.push(beat["d"].clone());
            }
            WsMessage::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => {}
        }
    };
    assert_eq!(
        beats,
        [
            json!({}),
            json!({"tries": 1, "max": 2}),
            json!({"tries": 2, "max": 2})
        ]
    );
    assert_eq!(code, Some(1001));

    // Our client, connected before the silent peer, has been through as many beats
    // and answered them: it still has its connection (an ECHO comes back on it, and
    // no disconnection came before).
    say(&client, "ECHO", json!("still here")).await;
    let next = event(&rt, &mut events, "the ECHO or a disconnection", |e| {
        matches!(
            e,
            ClientEvent::Message(_) | ClientEvent::Disconnected { .. }
        )
    })
    .await;
    assert!(
        matches!(&next, ClientEvent::Message(m) if m.d == json!("still here")),
        "our client was dropped: {next:?}"
    );
}

async fn a_malformed_frame_closes_only_its_connection<R: Runtime>(rt: R) {
    let addr = start(&rt, &dev_server(&rt).build().unwrap()).await;
    let (client, mut events) = signed_in(&rt, addr, "alice").await;
    for (frame, code) in [
        (WsMessage::text("this is not json"), 1007),
        (WsMessage::text("[1,2,3]"), 1007),
        (WsMessage::text(r#"{"op":"zero","d":{}}"#), 1007),
        (WsMessage::binary(vec![1, 2, 3]), 1003),
    ] {
        let mut offender = raw(&rt, addr).await;
        next_json(&rt, &mut offender).await;
        offender.send(frame.clone()).await.unwrap();
        assert_eq!(close_code(&rt, &mut offender).await, code, "{frame:?}");
    }
    say(&client, "ECHO", json!("still here")).await;
    assert_eq!(message(&rt, &mut events).await.d, json!("still here"));
}

async fn a_bad_token_closes_with_1008<R: Runtime>(rt: R) {
    let addr = start(&rt, &dev_server(&rt).build().unwrap()).await;
    let mut bad = raw(&rt, addr).await;
    next_json(&rt, &mut bad).await;
    bad.send(WsMessage::text(r#"{"op":2,"d":{"token":""}}"#))
        .await
        .unwrap();
    assert_eq!(close_code(&rt, &mut bad).await, 1008);
}

async fn the_authentication_timeout_closes_with_1008<R: Runtime>(rt: R) {
    let server = dev_server(&rt)
        .auth_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let addr = start(&rt, &server).await;
    let opened = rt.now();
    let mut idle = raw(&rt, addr).await;
    let hello = next_json(&rt, &mut idle).await;
    assert_eq!(hello["d"]["c_authentication_timeout"], 300, "{hello}");
    assert_eq!(close_code(&rt, &mut idle).await, 1008);
    assert!(rt.now() - opened >= Duration::from_millis(300));
}

async fn the_client_reconnects_to_a_restarted_server<R: Runtime>(rt: R) {
    let server = dev_server(&rt).build().unwrap();
    let addr = start(&rt, &server).await;
    let (client, mut events) = mesa_driver::client(rt.clone(), url(addr))
        .backoff(BackoffConfig {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(500),
            base_is_fixed: false,
        })
        .build()
        .unwrap();
    within(
        &rt,
        "alice authenticating",
        client.authenticate(json!({"token": "alice"}), true),
    )
    .await
    .unwrap();

    server.shutdown();
    let disconnected = event(&rt, &mut events, "Disconnected", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    // Told the server is going away, with an automatic reconnection planned.
    assert!(
        matches!(&disconnected, ClientEvent::Disconnected { close, reconnect_at: Some(_) }
            if close.code == CloseCode::GOING_AWAY),
        "{disconnected:?}"
    );
    // Sent while the server is down: queued, and delivered after the reconnection.
    say(&client, "ECHO", json!("queued")).await;

    let restarted = dev_server(&rt).build().unwrap();
    assert_eq!(serve_on(&rt, &restarted, addr).await, addr);
    let connected = event(&rt, &mut events, "Connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    assert!(
        matches!(
            connected,
            ClientEvent::Connected {
                is_automatic_reconnection: true,
                is_initial_connection: false,
                ..
            }
        ),
        "{connected:?}"
    );
    let _ = event(&rt, &mut events, "Authenticated", |e| {
        matches!(e, ClientEvent::Authenticated { .. })
    })
    .await;
    assert_eq!(message(&rt, &mut events).await.d, json!("queued"));
    assert!(restarted.handle().is_online("alice"));
}

/// Relays like [`Relay`] and records how each authenticated connection closed, by id.
#[derive(Clone, Default)]
struct Closes(Arc<Mutex<HashMap<String, Close>>>);

impl Closes {
    fn of(&self, id: &str) -> Option<Close> {
        self.0.lock().unwrap().get(id).cloned()
    }
}

impl Handler for Closes {
    async fn on_message(&self, conn: &Connection, message: Message) {
        Relay.on_message(conn, message).await;
    }

    async fn on_disconnect(&self, conn: &Connection, close: &Close) {
        if let Some(id) = conn.id() {
            self.0.lock().unwrap().insert(id, close.clone());
        }
    }
}

async fn a_slow_consumer_is_closed_with_1013<R: Runtime>(rt: R) {
    let transport = mesa_driver::TransportConfig {
        max_outbound_bytes: 64 * 1024,
        close_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let closes = Closes::default();
    let server = Server::builder(rt.clone())
        .authenticate(DevAuthenticator)
        .transport(transport)
        .handler(closes.clone())
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(&rt, &server).await;
    let (client, mut events) = signed_in(&rt, addr, "alice").await;
    let slow = raw_signed_in(&rt, addr, "slow").await;

    // The slow peer stops reading; what is sent to it piles up until its queue is full.
    let bulk = Message::dispatch("BULK", json!({"blob": "y".repeat(16 * 1024)}));
    let mut overflowed = false;
    for _ in 0..4_000 {
        if handle.send_to(&bulk, ["slow"], &[]).unwrap().overflowed > 0 {
            overflowed = true;
            break;
        }
        yield_now().await;
    }
    assert!(overflowed, "the slow reader's queue must overflow");
    until(&rt, "the slow consumer being dropped", || {
        handle.connection_count() == 1
    })
    .await;
    until(
        &rt,
        "the slow consumer's close reaching the handler",
        || closes.of("slow").is_some(),
    )
    .await;
    assert_eq!(closes.of("slow").unwrap().code, CloseCode::TRY_AGAIN_LATER);

    // Everyone else is served as before.
    say(&client, "ECHO", json!("fine")).await;
    assert_eq!(message(&rt, &mut events).await.d, json!("fine"));
    assert!(closes.of("alice").is_none());
    drop(slow);
}

async fn upgrades_past_max_connections_get_503<R: Runtime>(rt: R) {
    let server = dev_server(&rt).max_connections(2).build().unwrap();
    let handle = server.handle();
    let addr = start(&rt, &server).await;
    let (client, mut events) = signed_in(&rt, addr, "alice").await;
    let mut second = raw(&rt, addr).await;
    next_json(&rt, &mut second).await;
    assert_eq!(upgrade(&rt, addr, None).await.err(), Some(503));
    assert_eq!(handle.connection_count(), 2);
    // The same answer for an HTTP framework that upgrades by itself.
    assert_eq!(server.check_upgrade(None), Err(Refusal::Full));
    assert_eq!(Refusal::Full.status(), 503);

    // A slot frees when a connection leaves; those open are served all along.
    second.close(None).await.unwrap();
    until(&rt, "the second connection leaving", || {
        handle.connection_count() == 1
    })
    .await;
    let mut third = upgrade(&rt, addr, None).await.expect("a free slot");
    assert_eq!(next_json(&rt, &mut third).await["op"], 10);
    say(&client, "ECHO", json!("still served")).await;
    assert_eq!(message(&rt, &mut events).await.d, json!("still served"));
}

async fn an_origin_not_allowed_gets_403<R: Runtime>(rt: R) {
    let server = dev_server(&rt)
        .allowed_origins(["https://app.example.com"])
        .build()
        .unwrap();
    let addr = start(&rt, &server).await;
    let evil = Some("https://evil.example.com");
    assert_eq!(server.check_upgrade(evil), Err(Refusal::OriginNotAllowed));
    assert_eq!(
        server.check_upgrade(Some("https://app.example.com/")),
        Ok(())
    );
    for origin in ["https://evil.example.com", "null", "http://app.example.com"] {
        assert_eq!(
            upgrade(&rt, addr, Some(origin)).await.err(),
            Some(403),
            "{origin}"
        );
    }
    // Origins compare without case; a request without one is not a browser's.
    let mut admitted = Vec::new();
    for origin in [
        Some("https://app.example.com"),
        Some("HTTPS://App.Example.COM"),
        None,
    ] {
        let mut ws = upgrade(&rt, addr, origin).await.expect("admitted");
        assert_eq!(next_json(&rt, &mut ws).await["op"], 10, "{origin:?}");
        admitted.push(ws);
    }
    assert_eq!(server.handle().connection_count(), admitted.len());
}

/// A [`dev_server`] with these limits, relaying and recording every close.
fn limited_server<R: Runtime>(rt: &R, limits: mesa_core::Limits) -> (Server<R, Closes>, Closes) {
    let closes = Closes::default();
    let server = dev_server(rt)
        .limits(limits)
        .handler(closes.clone())
        .build()
        .unwrap();
    (server, closes)
}

/// A [`dev_server`] allowing 50 messages a second (burst 20) under `policy`, and the
/// record of its closes.
fn rate_limited<R: Runtime>(rt: &R, policy: RateLimitPolicy) -> (Server<R, Closes>, Closes) {
    let limits = mesa_core::Limits {
        max_messages_per_second: 50,
        max_message_burst: 20,
        rate_limit_policy: policy,
        ..Default::default()
    };
    limited_server(rt, limits)
}

/// By default a flood is slowed to the message rate, not closed: our client writes
/// 100 messages at once, the server reads them at the rate (TCP holds the rest back),
/// and every echo comes back, in order, on a connection that stays open although its
/// heartbeat answers waited behind the flood for longer than two beats.
async fn a_flood_past_the_message_rate_is_slowed_and_loses_nothing<R: Runtime>(rt: R) {
    let (server, closes) = rate_limited(&rt, RateLimitPolicy::Slow);
    let addr = start(&rt, &server).await;
    let (client, mut events) = signed_in(&rt, addr, "flooder").await;
    let started = rt.now();
    for n in 0..100 {
        say(&client, "ECHO", json!(n)).await;
    }
    for n in 0..100 {
        assert_eq!(message(&rt, &mut events).await.d, json!(n));
    }
    // At most 20 at once (op 2 took one), then 50 a second.
    let elapsed = rt.now() - started;
    assert!(elapsed >= Duration::from_millis(1600), "{elapsed:?}");
    assert!(closes.of("flooder").is_none(), "{:?}", closes.of("flooder"));
    assert_eq!(server.handle().connection_count(), 1);
}

/// The close policy, for servers that treat a fast sender as abusive: the frame past
/// the rate and burst closes with 1008, while a paced client is served.
async fn a_flood_under_the_close_policy_closes_with_1008<R: Runtime>(rt: R) {
    let (server, closes) = rate_limited(&rt, RateLimitPolicy::Close);
    let addr = start(&rt, &server).await;
    let (client, mut events) = signed_in(&rt, addr, "paced").await;

    let mut flooder = raw_signed_in(&rt, addr, "flooder").await;
    let frame = WsMessage::text(r#"{"op":0,"t":"NOISE","d":{}}"#);
    for _ in 0..100 {
        if flooder.send(frame.clone()).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&rt, &mut flooder).await, 1008);
    until(&rt, "the flooder's close reaching the handler", || {
        closes.of("flooder").is_some()
    })
    .await;
    assert_eq!(
        closes.of("flooder").unwrap(),
        Close::new(CloseCode::POLICY, "rate limit exceeded")
    );

    // A client at half the sustained rate, for longer than its burst lasts, is served.
    for n in 0..40 {
        say(&client, "ECHO", json!(n)).await;
        sleep(&rt, Duration::from_millis(40)).await;
    }
    for n in 0..40 {
        assert_eq!(message(&rt, &mut events).await.d, json!(n));
    }
    assert!(closes.of("paced").is_none());
}

/// With `max_recipients` 2, a library send to three distinct ids (after excluding)
/// is refused and delivers nothing; a client's BROADCAST to three closes that client
/// with 1008 and the reason, sends nothing, and leaves everyone else talking.
async fn sends_past_max_recipients_are_refused<R: Runtime>(rt: R) {
    let limits = mesa_core::Limits {
        max_recipients: 2,
        ..Default::default()
    };
    let (server, closes) = limited_server(&rt, limits);
    let handle = server.handle();
    assert_eq!(handle.max_recipients(), 2);
    let addr = start(&rt, &server).await;
    let (alice, mut alice_events) = signed_in(&rt, addr, "alice").await;
    let (bob, mut bob_events) = signed_in(&rt, addr, "bob").await;

    let refused = Message::dispatch("NOTE", json!("refused"));
    let four = ["alice", "bob", "carol", "dave"];
    assert_eq!(
        handle.send_to(&refused, four, &["dave".into()]),
        Err(SendError::TooManyRecipients(TooManyRecipients {
            count: 3,
            max: 2
        }))
    );
    // Two distinct ids, one listed twice: within the limit.
    let sent = Message::dispatch("NOTE", json!("sent"));
    let report = handle
        .send_to(&sent, ["alice", "bob", "alice"], &[])
        .unwrap();
    assert_eq!(report.delivered, 2);
    for events in [&mut alice_events, &mut bob_events] {
        assert_eq!(message(&rt, events).await.d, json!("sent"));
    }

    let mut greedy = raw_signed_in(&rt, addr, "greedy").await;
    let broadcast = r#"{"op":0,"t":"BROADCAST","d":{"to":["alice","bob","carol"]}}"#;
    greedy.send(WsMessage::text(broadcast)).await.unwrap();
    let close = loop {
        if let WsMessage::Close(frame) = next_frame(&rt, &mut greedy).await {
            break frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
        }
    };
    assert_eq!(close, Some((1008, "too many recipients: 3 > 2".to_owned())));
    until(
        &rt,
        "the greedy client's close reaching the handler",
        || closes.of("greedy").is_some(),
    )
    .await;

    // The refused BROADCAST reached no one: each one's next message is the other's.
    say(&bob, "BROADCAST", json!({"to": ["alice"], "from": "bob"})).await;
    say(&alice, "BROADCAST", json!({"to": ["bob"], "from": "alice"})).await;
    assert_eq!(message(&rt, &mut alice_events).await.d["from"], "bob");
    assert_eq!(message(&rt, &mut bob_events).await.d["from"], "alice");
    assert!(closes.of("alice").is_none() && closes.of("bob").is_none());
}

/// A frame that breaks RFC 6455 (here a reserved bit set without an extension) is
/// answered with a close frame 1002, by a Mesa server and by the echo server that
/// the Autobahn TestSuite checks (the same transport), not by a dropped socket.
async fn websocket_protocol_violations_are_closed_with_1002<R: Runtime>(rt: R) {
    let violation = || {
        let mut frame = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
        frame.header_mut().rsv1 = true;
        WsMessage::Frame(frame)
    };
    let mesa = start(&rt, &dev_server(&rt).build().unwrap()).await;
    let mut peer = raw(&rt, mesa).await;
    next_json(&rt, &mut peer).await;
    peer.send(violation()).await.unwrap();
    assert_eq!(close_code(&rt, &mut peer).await, 1002);

    let limits = mesa_core::Limits {
        max_message_bytes: 1024,
        ..Default::default()
    };
    let echo = Echo::new(rt.clone(), TransportConfig::default(), limits);
    let listening = echo.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listening.local_addr();
    rt.spawn(async move {
        let _ = listening.run().await;
    });
    let mut peer = raw(&rt, addr).await;
    for message in [WsMessage::text("any text"), WsMessage::binary(vec![0, 255])] {
        peer.send(message.clone()).await.unwrap();
        assert_eq!(next_frame(&rt, &mut peer).await, message);
    }
    peer.send(violation()).await.unwrap();
    assert_eq!(close_code(&rt, &mut peer).await, 1002);
    let mut peer = raw(&rt, addr).await;
    peer.send(WsMessage::text("x".repeat(1025))).await.unwrap();
    assert_eq!(close_code(&rt, &mut peer).await, 1009);
}
/// A peer still writing a frame far over the limit when the server answers it must
/// still read the server's 1009: the server discards the rest of its input (bounded)
/// instead of closing the socket under it, whose reset would destroy the close frame.
async fn an_oversized_frame_still_being_written_gets_1009<R: Runtime>(rt: R) {
    use futures_util::AsyncWriteExt;

    const TRIES: usize = 100;
    let addr = start(&rt, &dev_server(&rt).build().unwrap()).await;
    // One masked 20 MiB text frame, written as raw bytes: a zero mask key leaves the
    // payload as it is, so no try spends time masking it.
    let len = 20usize << 20;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.resize(frame.len() + len, b'a');
    for attempt in 0..TRIES {
        let mut offender = raw(&rt, addr).await;
        next_json(&rt, &mut offender).await;
        // A client library whose write fails with a reset reports 1006 and never
        // reads the close frame waiting for it: the whole frame must be taken.
        let written = within(&rt, "writing 20 MiB", offender.get_mut().write_all(&frame)).await;
        assert!(written.is_ok(), "try {attempt} of {TRIES}: {written:?}");
        assert_eq!(
            close_code(&rt, &mut offender).await,
            1009,
            "try {attempt} of {TRIES}"
        );
    }
}

/// Interop on every runtime: `@cryb/mesa`'s Node client, `mesa-js-client` and our
/// client authenticate on our server running on `rt`, ECHO, and BROADCAST to each
/// other. The Node peers are driven from tokio (they are tokio processes); the
/// server and our client run on `rt`.
async fn their_clients_on_our_server<R: Runtime>(rt: R) {
    let server = dev_server(&rt).build().unwrap();
    let handle = server.handle();
    let addr = start(&rt, &server).await;
    // alice on `@cryb/mesa`'s Node client, bob on `mesa-js-client`.
    let mut peers =
        [(ClientKind::Node, "alice"), (ClientKind::Browser, "bob")].map(|(kind, token)| {
            let name = format!("{token} ({})", kind.script());
            (NodePeer::client(&name, kind, &url(addr)), token)
        });
    for (peer, token) in &mut peers {
        peer.expect_event("connected").await;
        let hello = peer.expect_event("hello").await;
        assert_eq!(hello["d"]["c_heartbeat_interval"], 200, "{hello}");
        peer.authenticate(token).await;
        let authenticated = peer.expect_event("authenticated").await;
        assert_eq!(
            authenticated["user"],
            json!({"id": *token}),
            "{authenticated}"
        );
        peer.dispatch("ECHO", json!({"from": *token})).await;
        peer.expect_message("ECHO", &json!({"from": *token})).await;
    }
    let (carol, mut carol_events) = signed_in(&rt, addr, "carol").await;
    assert!(handle.is_online("alice") && handle.is_online("bob") && handle.is_online("carol"));

    // Their BROADCAST reaches everyone, ours included.
    let [(alice, _), (bob, _)] = &mut peers;
    let everyone = json!({"from": "alice"});
    alice.dispatch("BROADCAST", everyone.clone()).await;
    alice.expect_message("BROADCAST", &everyone).await;
    bob.expect_message("BROADCAST", &everyone).await;
    assert_eq!(message(&rt, &mut carol_events).await.d, everyone);

    // Ours to alice only: bob's next message is his own marker.
    let to_alice = json!({"from": "carol", "to": ["alice"]});
    say(&carol, "BROADCAST", to_alice.clone()).await;
    alice.expect_message("BROADCAST", &to_alice).await;
    bob.dispatch("ECHO", json!("marker")).await;
    let next = bob
        .expect("a message", |e| e["event"] == "message", mesa_tests::WAIT)
        .await;
    assert_eq!(
        next["d"],
        json!("marker"),
        "the BROADCAST to alice reached bob"
    );
    // Their heartbeats were answered all along.
    for (peer, _) in &mut peers {
        peer.assert_none("disconnection", |e| e["event"] == "disconnected");
    }
}

/// The Node interop scenario on our server on each runtime. The test itself runs on
/// tokio, which drives the Node processes.
mod their_clients_on_our_server {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokio() {
        run_scenario(Tokio, super::their_clients_on_our_server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smol() {
        run_scenario(Smol, super::their_clients_on_our_server).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_std() {
        run_scenario(AsyncStd, super::their_clients_on_our_server).await;
    }
}
