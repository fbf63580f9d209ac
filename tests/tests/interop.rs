//! Interop with the published JavaScript packages: their clients (`@cryb/mesa`'s Node
//! `Client`, `mesa-js-client`) against our server, and our client against their
//! server, driven through the scripts of `tests/node`.
//!
//! Needs Node.js and `npm ci --prefix tests/node`; every wait is bounded.

use std::net::SocketAddr;
use std::time::Duration;

use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::StreamExt;
use mesa_core::Opcode;
use mesa_tests::ours::{next_event, next_message, ready_events, serve, url};
use mesa_tests::{ClientKind, NodePeer, WAIT, bounded};
use mesa_tokio::{
    ClientEvent, Close, CloseCode, Connection, DevAuthenticator, Handler, Message, Relay,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Heartbeat interval of every server here (ours and theirs), 2 missed beats allowed.
const BEAT: Duration = Duration::from_millis(300);
/// Reconnect interval every server here announces.
const RECONNECT: Duration = Duration::from_millis(200);

/// Our server as the scenarios want it: heartbeats every 300 ms (2 misses allowed),
/// reconnect interval 200 ms, development authentication, the relay handler.
fn our_server() -> mesa_tokio::ServerBuilder<mesa_tokio::Relay> {
    mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(BEAT, 2)
        .reconnect_interval(RECONNECT)
        .authenticate(DevAuthenticator)
}

/// The same settings for their server (`server.js` options).
fn their_options() -> Value {
    json!({
        "heartbeat": {"enabled": true, "interval": 300, "maxAttempts": 2},
        "reconnect": {"enabled": true, "interval": 200}
    })
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What our server's [`Recorder`] handler saw.
#[derive(Debug)]
enum Seen {
    /// A message, with its sender's id.
    Message(Option<String>, Message),
    /// A connection closed, with its id.
    Closed(Option<String>, Close),
}

/// Relays like [`Relay`] and reports every message and every close it sees.
struct Recorder(mpsc::UnboundedSender<Seen>);

impl Handler for Recorder {
    async fn on_message(&self, conn: &Connection, message: Message) {
        let _ = self.0.send(Seen::Message(conn.id(), message.clone()));
        Relay.on_message(conn, message).await;
    }

    async fn on_disconnect(&self, conn: &Connection, close: &Close) {
        let _ = self.0.send(Seen::Closed(conn.id(), close.clone()));
    }
}

/// The next thing our server's handler saw that matches `pred`.
async fn recorded(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    what: &str,
    mut pred: impl FnMut(&Seen) -> bool,
) -> Seen {
    bounded(&format!("our handler seeing {what}"), async {
        loop {
            let next = seen.recv().await.expect("the server is running");
            if pred(&next) {
                return next;
            }
        }
    })
    .await
}

/// Wait until our server has `n` connections.
async fn connections(handle: &mesa_tokio::ServerHandle, n: usize) {
    bounded(&format!("our server having {n} connections"), async {
        while handle.connection_count() != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Scenarios a and b: one upstream client against our server.
async fn their_client_on_our_server(kind: ClientKind) {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = our_server().handler(Recorder(seen_tx)).build().unwrap();
    let handle = server.handle();
    let addr = serve(&server, any_port()).await;
    let mut alice = NodePeer::client(&format!("alice ({})", kind.script()), kind, &url(addr));

    // Connected, and our hello understood.
    let connected = alice.expect_event("connected").await;
    let opened = Instant::now();
    assert_eq!(
        connected,
        json!({"event": "connected", "isInitialConnection": true,
               "isInitialSessionConnection": true, "isAutomaticReconnection": false})
    );
    let hello = alice.expect_event("hello").await;
    assert_eq!(hello["d"]["c_heartbeat_interval"], 300, "{hello}");
    assert_eq!(hello["d"]["c_reconnect_interval"], 200, "{hello}");
    let rules = hello["d"]["rules"].as_array().expect("rules is an array");
    assert!(rules.contains(&json!("sends_user_object")), "{hello}");

    // authenticate() resolves with the user object.
    alice.authenticate("alice").await;
    let authenticated = alice.expect_event("authenticated").await;
    assert_eq!(authenticated["user"], json!({"id": "alice"}));
    assert!(handle.is_online("alice"));

    // ECHO comes back, unchanged, with no sequence number.
    alice.dispatch("ECHO", json!({"n": 1})).await;
    let echo = alice.expect_message("ECHO", &json!({"n": 1})).await;
    assert_eq!(
        (&echo["op"], &echo["s"]),
        (&json!(0), &Value::Null),
        "{echo}"
    );

    // Their dispatch reaches our handler, from alice.
    alice
        .dispatch("STATUS_UPDATE", json!({"status": "online"}))
        .await;
    let status = recorded(
        &mut seen,
        "STATUS_UPDATE",
        |s| matches!(s, Seen::Message(_, m) if m.t.as_deref() == Some("STATUS_UPDATE")),
    )
    .await;
    let Seen::Message(id, message) = status else {
        unreachable!()
    };
    assert_eq!(id.as_deref(), Some("alice"));
    assert_eq!(
        (message.op, message.d),
        (Opcode::Dispatch, json!({"status": "online"}))
    );

    // Our server's dispatch reaches them.
    let notice = Message::dispatch("NOTICE", json!({"n": 2}));
    assert_eq!(
        handle.send_to(&notice, ["alice"], &[]).unwrap().delivered,
        1
    );
    alice.expect_message("NOTICE", &json!({"n": 2})).await;

    // BROADCAST between them and our client, both ways.
    let (bob, mut bob_events) = mesa_tokio::client(url(addr)).build().unwrap();
    let user = bounded(
        "our client authenticating",
        bob.authenticate(json!({"token": "bob"}), true),
    )
    .await
    .unwrap();
    assert_eq!(user, json!({"id": "bob"}));
    alice.dispatch("BROADCAST", json!({"from": "alice"})).await;
    assert_eq!(
        next_message(&mut bob_events, "BROADCAST").await.d,
        json!({"from": "alice"})
    );
    alice
        .expect_message("BROADCAST", &json!({"from": "alice"}))
        .await;
    let to_alice = json!({"from": "bob", "to": ["alice"]});
    bob.send(Message::dispatch("BROADCAST", to_alice.clone()))
        .await
        .unwrap();
    alice.expect_message("BROADCAST", &to_alice).await;
    bob.send(Message::dispatch("ECHO", json!("marker")))
        .await
        .unwrap();
    let next = next_event(
        &mut bob_events,
        "a message",
        |e| matches!(e, ClientEvent::Message(_)),
        WAIT,
    )
    .await;
    assert!(
        matches!(&next, ClientEvent::Message(m) if m.d == json!("marker")),
        "the BROADCAST to alice reached bob: {next:?}"
    );

    // Heartbeats answered: the connection outlives more than 5 intervals.
    for _ in 0..6 {
        alice.expect_event("heartbeat").await;
    }
    tokio::time::sleep_until(opened + BEAT * 5 + Duration::from_millis(100)).await;
    alice.assert_none("missed heartbeat", |e| {
        e["event"] == "heartbeat" && e["d"] != json!({})
    });
    alice.assert_none("disconnection", |e| e["event"] == "disconnected");
    assert_eq!(handle.connection_count(), 2, "alice and bob are still here");
    let bob_seen = ready_events(&mut bob_events);
    assert!(
        !bob_seen
            .iter()
            .any(|e| matches!(e, ClientEvent::Disconnected { .. })),
        "{bob_seen:?}"
    );
    alice.dispatch("ECHO", json!({"n": 3})).await;
    alice.expect_message("ECHO", &json!({"n": 3})).await;

    // Their deliberate close reaches our handler with its code and reason.
    alice
        .send(json!({"cmd": "disconnect", "code": 1000, "reason": "bye"}))
        .await;
    let disconnected = alice.expect_event("disconnected").await;
    assert_eq!(disconnected["code"], 1000, "{disconnected}");
    let closed = recorded(
        &mut seen,
        "alice's close",
        |s| matches!(s, Seen::Closed(Some(id), _) if id == "alice"),
    )
    .await;
    let Seen::Closed(_, close) = closed else {
        unreachable!()
    };
    assert_eq!((close.code, &*close.reason), (CloseCode::NORMAL, "bye"));
}

/// a. `@cryb/mesa`'s Node client against our server.
#[tokio::test]
async fn their_node_client_on_our_server() {
    their_client_on_our_server(ClientKind::Node).await;
}

/// b. `mesa-js-client` against our server.
#[tokio::test]
async fn their_browser_client_on_our_server() {
    their_client_on_our_server(ClientKind::Browser).await;
}

/// c. Both upstream clients reconnect to our restarted server, then work again once
/// they authenticate again (they do not do it by themselves).
#[tokio::test]
async fn their_clients_reconnect_to_our_restarted_server() {
    let server = our_server().build().unwrap();
    let addr = serve(&server, any_port()).await;
    let mut peers = [
        (
            NodePeer::client("alice (client.js)", ClientKind::Node, &url(addr)),
            "alice",
        ),
        (
            NodePeer::client("bob (browser-client.js)", ClientKind::Browser, &url(addr)),
            "bob",
        ),
    ];
    for (peer, token) in &mut peers {
        peer.expect_event("connected").await;
        peer.expect_event("hello").await;
        peer.authenticate(token).await;
        let authenticated = peer.expect_event("authenticated").await;
        assert_eq!(authenticated["user"], json!({"id": *token}));
    }
    connections(&server.handle(), 2).await;

    server.shutdown();
    for (peer, _) in &mut peers {
        let disconnected = peer.expect_event("disconnected").await;
        assert_eq!(disconnected["code"], 1001, "{disconnected}");
        assert_eq!(disconnected["willAttemptReconnect"], true, "{disconnected}");
    }
    // Let them knock on the closed port a few times.
    tokio::time::sleep(RECONNECT * 3).await;

    let restarted = our_server().build().unwrap();
    let handle = restarted.handle();
    assert_eq!(serve(&restarted, addr).await, addr);
    for (peer, token) in &mut peers {
        let connected = peer
            .expect(
                "an automatic reconnection",
                |e| e["event"] == "connected",
                WAIT,
            )
            .await;
        assert_eq!(
            connected,
            json!({"event": "connected", "isInitialConnection": false,
                   "isInitialSessionConnection": false, "isAutomaticReconnection": true})
        );
        let hello = peer.expect_event("hello").await;
        assert_eq!(hello["d"]["c_reconnect_interval"], 200, "{hello}");
        peer.authenticate(token).await;
        let authenticated = peer.expect_event("authenticated").await;
        assert_eq!(authenticated["user"], json!({"id": *token}));
        peer.dispatch("ECHO", json!({"again": *token})).await;
        peer.expect_message("ECHO", &json!({"again": *token})).await;
    }
    assert!(handle.is_online("alice") && handle.is_online("bob"));
    let [(alice, _), (bob, _)] = &mut peers;
    alice
        .dispatch("BROADCAST", json!({"to": ["bob"], "n": 1}))
        .await;
    bob.expect_message("BROADCAST", &json!({"to": ["bob"], "n": 1}))
        .await;
}

/// d. Our client against their server: hello, authentication, heartbeats, ECHO and
/// BROADCAST with their Node client; then their server dies and comes back, and our
/// client reconnects, authenticates again by itself and delivers what it queued.
#[tokio::test]
async fn our_client_on_their_server_and_its_restart() {
    let (mut server, port) = NodePeer::server("their server", 0, &their_options()).await;
    let url = format!("ws://127.0.0.1:{port}/");
    let (alice, mut events) = mesa_tokio::client(url.as_str()).build().unwrap();
    let connected = next_event(
        &mut events,
        "Connected",
        |e| matches!(e, ClientEvent::Connected { .. }),
        WAIT,
    )
    .await;
    let opened = Instant::now();
    assert!(
        matches!(
            connected,
            ClientEvent::Connected {
                is_initial_connection: true,
                is_initial_session_connection: true,
                is_automatic_reconnection: false
            }
        ),
        "{connected:?}"
    );
    let user = bounded(
        "our client authenticating",
        alice.authenticate(json!({"token": "alice"}), true),
    )
    .await
    .unwrap();
    assert_eq!(user, json!({"id": "alice"}));
    let authenticated = next_event(
        &mut events,
        "Authenticated",
        |e| matches!(e, ClientEvent::Authenticated { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&authenticated, ClientEvent::Authenticated { user } if *user == json!({"id": "alice"})),
        "{authenticated:?}"
    );
    let seen = server
        .expect(
            "alice's authentication",
            |e| e["event"] == "authenticated" && e["id"] == "alice",
            WAIT,
        )
        .await;
    let alice_conn = seen["serverId"].clone();

    alice
        .send(Message::dispatch("ECHO", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(next_message(&mut events, "ECHO").await.d, json!({"n": 1}));

    // BROADCAST both ways with their Node client.
    let mut bob = NodePeer::client("bob (client.js)", ClientKind::Node, &url);
    bob.expect_event("connected").await;
    bob.authenticate("bob").await;
    assert_eq!(
        bob.expect_event("authenticated").await["user"],
        json!({"id": "bob"})
    );
    alice
        .send(Message::dispatch("BROADCAST", json!({"from": "alice"})))
        .await
        .unwrap();
    bob.expect_message("BROADCAST", &json!({"from": "alice"}))
        .await;
    assert_eq!(
        next_message(&mut events, "BROADCAST").await.d,
        json!({"from": "alice"})
    );
    let to_alice = json!({"from": "bob", "to": ["alice"]});
    bob.dispatch("BROADCAST", to_alice.clone()).await;
    assert_eq!(next_message(&mut events, "BROADCAST").await.d, to_alice);

    // Heartbeats answered for more than 5 intervals, nobody dropped.
    for _ in 0..6 {
        server
            .expect(
                "a heartbeat ACK from alice",
                |e| e["event"] == "heartbeat_ack" && e["serverId"] == alice_conn,
                WAIT,
            )
            .await;
    }
    tokio::time::sleep_until(opened + BEAT * 5 + Duration::from_millis(100)).await;
    server.assert_none("disconnection", |e| e["event"] == "disconnection");
    let seen = ready_events(&mut events);
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, ClientEvent::Disconnected { .. })),
        "{seen:?}"
    );

    // Their server dies.
    server.kill().await;
    let disconnected = next_event(
        &mut events,
        "Disconnected",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    assert!(disconnected.will_reconnect(), "{disconnected:?}");
    // Sent while down: queued, delivered after the reconnection.
    alice
        .send(Message::dispatch("ECHO", json!("queued")))
        .await
        .unwrap();

    let (mut restarted, same_port) =
        NodePeer::server("their restarted server", port, &their_options()).await;
    assert_eq!(same_port, port);
    let reconnected = next_event(
        &mut events,
        "Connected",
        |e| matches!(e, ClientEvent::Connected { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(
            reconnected,
            ClientEvent::Connected {
                is_initial_connection: false,
                is_automatic_reconnection: true,
                ..
            }
        ),
        "{reconnected:?}"
    );
    let authenticated = next_event(
        &mut events,
        "Authenticated again",
        |e| matches!(e, ClientEvent::Authenticated { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&authenticated, ClientEvent::Authenticated { user } if *user == json!({"id": "alice"})),
        "{authenticated:?}"
    );
    assert_eq!(next_message(&mut events, "ECHO").await.d, json!("queued"));
    restarted
        .expect(
            "alice's authentication on the restarted server",
            |e| e["event"] == "authenticated" && e["id"] == "alice",
            WAIT,
        )
        .await;
    restarted
        .expect(
            "alice's queued ECHO",
            |e| e["event"] == "message" && e["t"] == "ECHO" && e["d"] == "queued",
            WAIT,
        )
        .await;
}

/// d (jitter). Five of our clients with different seeds lose their server at once:
/// each schedules its reconnection within the base it adopted from the hello (200 ms),
/// and the schedules differ (full jitter, unlike upstream's lock-step).
#[tokio::test]
async fn our_clients_jitter_their_reconnections() {
    let (mut server, port) = NodePeer::server("their server", 0, &their_options()).await;
    let url = format!("ws://127.0.0.1:{port}/");
    let mut clients = Vec::new();
    for seed in 1..=5u64 {
        let (client, events) = mesa_tokio::client(url.as_str()).seed(seed).build().unwrap();
        // Authenticated means the hello (the first frame) was read and adopted.
        let user = bounded(
            "our client authenticating",
            client.authenticate(json!({"token": format!("user{seed}")}), true),
        )
        .await
        .unwrap();
        assert_eq!(user, json!({"id": format!("user{seed}")}));
        clients.push((client, events));
    }

    let killed = std::time::Instant::now();
    server.kill().await;
    let cap = mesa_tokio::BackoffConfig::default().cap;
    let mut offsets = Vec::new();
    for (_, events) in &mut clients {
        let disconnected = next_event(
            events,
            "Disconnected",
            |e| matches!(e, ClientEvent::Disconnected { .. }),
            WAIT,
        )
        .await;
        let observed = std::time::Instant::now();
        let ClientEvent::Disconnected {
            reconnect_at: Some(at),
            ..
        } = disconnected
        else {
            panic!("our client will not reconnect: {disconnected:?}")
        };
        assert!(
            at >= killed && at <= observed + cap,
            "reconnect_at outside [now, now + cap]"
        );
        // The first delay is drawn from [0, base], base = the hello's 200 ms.
        assert!(
            at <= observed + RECONNECT,
            "reconnect_at {:?} after the Disconnected event: beyond the adopted 200 ms base",
            at - observed
        );
        offsets.push(at - killed);
    }
    eprintln!("reconnect offsets after the kill: {offsets:?}");
    let (min, max) = (offsets.iter().min().unwrap(), offsets.iter().max().unwrap());
    assert!(
        *max - *min >= Duration::from_millis(20),
        "the reconnections are not spread: {offsets:?}"
    );
}

/// e. A malformed frame closes only its own connection (1007); their clients on the
/// same server carry on.
#[tokio::test]
async fn a_malformed_frame_on_our_server_spares_their_clients() {
    let server = our_server().build().unwrap();
    let handle = server.handle();
    let addr = serve(&server, any_port()).await;
    let mut peers = [
        (
            NodePeer::client("alice (client.js)", ClientKind::Node, &url(addr)),
            "alice",
        ),
        (
            NodePeer::client("bob (browser-client.js)", ClientKind::Browser, &url(addr)),
            "bob",
        ),
    ];
    for (peer, token) in &mut peers {
        peer.expect_event("connected").await;
        peer.authenticate(token).await;
        peer.expect_event("authenticated").await;
    }
    connections(&handle, 2).await;

    for frame in ["this is not json", "[1,2,3]", "{\"op\":0,\"d\":{"] {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap().compat();
        let (mut raw, _) = bounded(
            "a raw handshake",
            async_tungstenite::client_async(url(addr), stream),
        )
        .await
        .unwrap();
        let hello = bounded("the hello", raw.next()).await;
        assert!(
            matches!(&hello, Some(Ok(WsMessage::Text(text))) if text.contains("\"op\":10")),
            "{hello:?}"
        );
        connections(&handle, 3).await;
        raw.send(WsMessage::text(frame)).await.unwrap();
        let code = bounded("the close frame", async {
            loop {
                match raw.next().await {
                    Some(Ok(WsMessage::Close(Some(close)))) => break u16::from(close.code),
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close frame after {frame:?}, got {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(code, CloseCode::INVALID_PAYLOAD.0, "after {frame:?}");
        connections(&handle, 2).await;
    }

    for (peer, token) in &mut peers {
        peer.dispatch("ECHO", json!({"still": *token})).await;
        peer.expect_message("ECHO", &json!({"still": *token})).await;
        peer.assert_none("disconnection", |e| e["event"] == "disconnected");
    }
    assert!(handle.is_online("alice") && handle.is_online("bob"));
}

/// Our server's close codes as their clients see them: op 5 `DISCONNECT_CLIENT`
/// closes with 1000 (and, like upstream, they come back by themselves); a refused
/// authentication closes with 1008. Nobody else is disturbed.
#[tokio::test]
async fn their_clients_see_our_close_codes() {
    let server = our_server().build().unwrap();
    let handle = server.handle();
    let addr = serve(&server, any_port()).await;
    let mut alice = NodePeer::client("alice (client.js)", ClientKind::Node, &url(addr));
    let mut bob = NodePeer::client("bob (browser-client.js)", ClientKind::Browser, &url(addr));
    for (peer, token) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        peer.expect_event("connected").await;
        peer.authenticate(token).await;
        peer.expect_event("authenticated").await;
    }

    let mut kick = Message::new(Opcode::Internal, json!({}));
    kick.t = Some("DISCONNECT_CLIENT".into());
    assert_eq!(handle.send_to(&kick, ["alice"], &[]).unwrap().delivered, 1);
    let disconnected = alice.expect_event("disconnected").await;
    assert_eq!(disconnected["code"], 1000, "{disconnected}");
    assert_eq!(disconnected["willAttemptReconnect"], true, "{disconnected}");
    let connected = alice.expect_event("connected").await;
    assert_eq!(connected["isAutomaticReconnection"], true, "{connected}");
    bob.dispatch("ECHO", json!("bob is fine")).await;
    bob.expect_message("ECHO", &json!("bob is fine")).await;
    bob.assert_none("op 5 forwarded", |e| {
        e["event"] == "message" && e["op"] == 5
    });

    for (kind, name) in [
        (ClientKind::Node, "mallory (client.js)"),
        (ClientKind::Browser, "mallory (browser-client.js)"),
    ] {
        let mut mallory = NodePeer::client(name, kind, &url(addr));
        mallory.expect_event("connected").await;
        mallory
            .send(json!({"cmd": "authenticate", "data": {"token": ""}}))
            .await;
        let refused = mallory.expect_event("disconnected").await;
        assert_eq!(refused["code"], 1008, "{refused}");
    }
    bob.dispatch("ECHO", json!("still fine")).await;
    bob.expect_message("ECHO", &json!("still fine")).await;
}

/// `enforce_equal_versions` both ways. Our server announcing 1.5.8 keeps their Node
/// client (which announces its own version, 1.5.8) and closes `mesa-js-client`
/// (which announces 1.5.3) with 1002; their enforcing server keeps our client when it
/// announces 1.5.8 and closes it with 1002 when it announces another version.
#[tokio::test]
async fn versions_are_enforced_across_implementations() {
    let server = our_server()
        .enforce_equal_versions("1.5.8")
        .build()
        .unwrap();
    let addr = serve(&server, any_port()).await;
    let mut alice = NodePeer::client("alice (client.js)", ClientKind::Node, &url(addr));
    let mut bob = NodePeer::client("bob (browser-client.js)", ClientKind::Browser, &url(addr));
    let hello = alice.expect_event("hello").await;
    let rules = hello["d"]["rules"].as_array().expect("rules is an array");
    assert!(rules.contains(&json!("enforce_equal_versions")), "{hello}");
    let refused = bob.expect_event("disconnected").await;
    assert_eq!(refused["code"], 1002, "{refused}");
    alice.expect_event("connected").await;
    alice.authenticate("alice").await;
    alice.expect_event("authenticated").await;
    alice.dispatch("ECHO", json!("same version")).await;
    alice.expect_message("ECHO", &json!("same version")).await;
    alice.assert_none("disconnection", |e| e["event"] == "disconnected");

    let (mut theirs, port) = NodePeer::server(
        "their enforcing server",
        0,
        &json!({"client": {"enforceEqualVersions": true}}),
    )
    .await;
    let url = format!("ws://127.0.0.1:{port}/");
    let (good, mut good_events) = mesa_tokio::client(url.as_str())
        .version("1.5.8")
        .build()
        .unwrap();
    let (_bad, mut bad_events) = mesa_tokio::client(url.as_str())
        .version("0.0.1")
        .build()
        .unwrap();
    let refused = next_event(
        &mut bad_events,
        "Disconnected",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&refused, ClientEvent::Disconnected { close, .. } if close.code == CloseCode::PROTOCOL_ERROR),
        "{refused:?}"
    );
    let user = bounded(
        "our client authenticating",
        good.authenticate(json!({"token": "good"}), true),
    )
    .await
    .unwrap();
    assert_eq!(user, json!({"id": "good"}));
    good.send(Message::dispatch("ECHO", json!("same version")))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut good_events, "ECHO").await.d,
        json!("same version")
    );
    theirs
        .expect(
            "our CLIENT_VERSION 1.5.8",
            |e| {
                e["event"] == "message"
                    && e["t"] == "CLIENT_VERSION"
                    && e["d"] == json!({"v": "1.5.8"})
            },
            WAIT,
        )
        .await;
}

/// Their server kicks our client (op 5 `DISCONNECT_CLIENT`, close 1000): like
/// upstream's clients, ours comes back by itself, and also authenticates again.
#[tokio::test]
async fn our_client_kicked_by_their_server_comes_back() {
    let (mut theirs, port) = NodePeer::server("their server", 0, &their_options()).await;
    let (alice, mut events) = mesa_tokio::client(format!("ws://127.0.0.1:{port}"))
        .build()
        .unwrap();
    bounded(
        "our client authenticating",
        alice.authenticate(json!({"token": "alice"}), true),
    )
    .await
    .unwrap();
    theirs
        .send(json!({"cmd": "send", "op": 5, "t": "DISCONNECT_CLIENT", "d": {}, "to": ["alice"]}))
        .await;
    let kicked = next_event(
        &mut events,
        "Disconnected",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&kicked, ClientEvent::Disconnected { close, reconnect_at: Some(_) } if close.code == CloseCode::NORMAL),
        "{kicked:?}"
    );
    let authenticated = next_event(
        &mut events,
        "Authenticated again",
        |e| matches!(e, ClientEvent::Authenticated { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&authenticated, ClientEvent::Authenticated { user } if *user == json!({"id": "alice"})),
        "{authenticated:?}"
    );
    let connections = theirs.count(|e| e["event"] == "connection");
    assert_eq!(connections, 2, "one connection, then one reconnection");
}

/// Their server has no rooms: our client's room commands fail with `NoRooms` (a
/// subscribe made before the hello, once the hello says so), and everything else
/// works as before.
#[tokio::test]
async fn our_client_s_rooms_fail_clearly_on_their_server() {
    let (_theirs, port) = NodePeer::server("their server", 0, &their_options()).await;
    let (alice, mut events) = mesa_tokio::client(format!("ws://127.0.0.1:{port}"))
        .build()
        .unwrap();
    let no_rooms = Err(mesa_tokio::ClientError::Session(
        mesa_core::ClientError::NoRooms,
    ));
    let (subscribed, user) = bounded("a subscribe and an authentication", async {
        tokio::join!(
            alice.subscribe("lobby"),
            alice.authenticate(json!({"token": "alice"}), true)
        )
    })
    .await;
    assert_eq!(subscribed, no_rooms);
    assert_eq!(user.unwrap(), json!({"id": "alice"}));
    let unavailable = next_event(
        &mut events,
        "RoomsUnavailable",
        |e| matches!(e, ClientEvent::RoomsUnavailable { .. }),
        WAIT,
    )
    .await;
    assert!(
        matches!(&unavailable, ClientEvent::RoomsUnavailable { dropped } if dropped.len() == 1 && dropped[0].1 == "lobby"),
        "{unavailable:?}"
    );
    assert_eq!(alice.subscribe("lobby").await, no_rooms);
    let chat = Message::dispatch("CHAT", json!({}));
    assert_eq!(alice.publish("lobby", chat).await, no_rooms);
    alice
        .send(Message::dispatch("ECHO", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(next_message(&mut events, "ECHO").await.d, json!({"n": 1}));
}

/// An upstream client may call `authenticate()` twice in a row (say, once at start-up
/// and once in its `connected` handler). Upstream's server checks both and stays
/// connected; ours must too, also when its authenticator takes a moment.
#[tokio::test]
async fn their_client_authenticating_twice_quickly_stays_connected() {
    // The same exchange against their server, as the reference.
    let (_theirs, port) = NodePeer::server("their server", 0, &their_options()).await;
    let mut reference = NodePeer::client(
        "alice on their server",
        ClientKind::Node,
        &format!("ws://127.0.0.1:{port}"),
    );
    // Ours, with an authenticator that takes 100 ms (a database, say).
    let server = our_server()
        .authenticate(|credentials: Value| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            mesa_core::dev_authenticate(&credentials).map_err(mesa_tokio::AuthError::new)
        })
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = serve(&server, any_port()).await;
    let mut alice = NodePeer::client("alice on our server", ClientKind::Node, &url(addr));

    for peer in [&mut reference, &mut alice] {
        peer.expect_event("connected").await;
        peer.authenticate("alice").await;
        peer.authenticate("alice").await;
        let outcome = peer
            .expect(
                "authenticated (or disconnected)",
                |e| e["event"] == "authenticated" || e["event"] == "disconnected",
                WAIT,
            )
            .await;
        if outcome["event"] != "authenticated" {
            peer.fail(&format!(
                "closed after two quick authentications: {outcome}"
            ));
        }
        assert_eq!(outcome["user"], json!({"id": "alice"}));
        peer.dispatch("ECHO", json!("after two authentications"))
            .await;
        peer.expect_message("ECHO", &json!("after two authentications"))
            .await;
        // A heartbeat after them: the connection lived on through a beat.
        peer.expect_event("heartbeat").await;
        peer.assert_none("disconnection", |e| e["event"] == "disconnected");
    }
    assert!(handle.is_online("alice"));
}
