//! Our server and our client over real loopback sockets on tokio.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::StreamExt;
use mesa_tokio::{
    BackoffConfig, ClientEvent, ClientEvents, CloseCode, DevAuthenticator, Handler, Message,
    Middleware, SendError, Server, TooManyRecipients,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

const WAIT: Duration = Duration::from_secs(10);

async fn start<H: Handler>(server: Server<H>) -> SocketAddr {
    let listening = server.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listening.local_addr();
    tokio::spawn(listening.run());
    addr
}

fn dev_server() -> mesa_tokio::ServerBuilder {
    mesa_tokio::server()
        .heartbeat(Duration::from_millis(200), 2)
        .reconnect_interval(Duration::from_millis(100))
        .authenticate(DevAuthenticator)
}

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

type Raw = WebSocketStream<Compat<TcpStream>>;

async fn raw(addr: SocketAddr) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap().compat();
    async_tungstenite::client_async(url(addr), stream)
        .await
        .unwrap()
        .0
}

/// The next text frame as JSON, answering heartbeats on the way if `ack` is set.
async fn next_json(ws: &mut Raw) -> Value {
    loop {
        match timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(WsMessage::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close code the server sent, reading past any other frame.
async fn close_code(ws: &mut Raw) -> u16 {
    loop {
        match timeout(WAIT, ws.next()).await.expect("a close in time") {
            Some(Ok(WsMessage::Close(Some(frame)))) => return frame.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn until(
    events: &mut ClientEvents,
    mut pred: impl FnMut(&ClientEvent) -> bool,
) -> ClientEvent {
    loop {
        let event = timeout(WAIT, events.next())
            .await
            .expect("event in time")
            .expect("stream open");
        if pred(&event) {
            return event;
        }
    }
}

async fn next_message(events: &mut ClientEvents) -> Message {
    match until(events, |e| matches!(e, ClientEvent::Message(_))).await {
        ClientEvent::Message(message) => message,
        _ => unreachable!(),
    }
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(500),
        base_is_fixed: false,
    }
}

#[tokio::test]
async fn clients_authenticate_echo_and_broadcast() {
    let addr = start(dev_server().build().unwrap()).await;
    let (alice, mut alice_events) = mesa_tokio::client(url(addr)).build().unwrap();
    let (bob, mut bob_events) = mesa_tokio::client(url(addr)).build().unwrap();
    assert_eq!(
        alice
            .authenticate(json!({"token": "alice"}), true)
            .await
            .unwrap(),
        json!({"id": "alice"})
    );
    assert_eq!(
        bob.authenticate(json!({"token": "bob"}), true)
            .await
            .unwrap(),
        json!({"id": "bob"})
    );

    alice
        .send(Message::dispatch("ECHO", json!({"n": 1})))
        .await
        .unwrap();
    let echoed = next_message(&mut alice_events).await;
    assert_eq!(
        (echoed.t.as_deref(), echoed.d),
        (Some("ECHO"), json!({"n": 1}))
    );

    bob.send(Message::dispatch("BROADCAST", json!({"text": "hi all"})))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut alice_events).await.d,
        json!({"text": "hi all"})
    );
    assert_eq!(
        next_message(&mut bob_events).await.d,
        json!({"text": "hi all"})
    );

    bob.send(Message::dispatch(
        "BROADCAST",
        json!({"to": ["bob"], "only": "bob"}),
    ))
    .await
    .unwrap();
    alice
        .send(Message::dispatch("ECHO", json!("marker")))
        .await
        .unwrap();
    assert_eq!(next_message(&mut bob_events).await.d["only"], "bob");
    assert_eq!(
        next_message(&mut alice_events).await.d,
        json!("marker"),
        "alice got no BROADCAST to bob"
    );
}

#[tokio::test]
async fn heartbeats_keep_clients_and_drop_silent_ones() {
    let addr = start(dev_server().build().unwrap()).await;
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    let _connected = until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    let mut silent = raw(addr).await;
    let hello = next_json(&mut silent).await;
    assert_eq!(hello["d"]["c_heartbeat_interval"], 200);
    // The silent client never answers: {} then tries 1, 2, then a 1001 close.
    let mut beats = Vec::new();
    let code = loop {
        match timeout(WAIT, silent.next()).await.unwrap() {
            Some(Ok(WsMessage::Text(text))) => {
                beats.push(serde_json::from_str::<Value>(&text).unwrap()["d"].clone())
            }
            Some(Ok(WsMessage::Close(Some(frame)))) => break u16::from(frame.code),
            other => panic!("{other:?}"),
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
    assert_eq!(code, 1001);
    // Our client, connected before the silent one, has been through as many beats
    // and answered them: an ECHO comes back on its connection, with no disconnection
    // before it.
    client
        .send(Message::dispatch("ECHO", json!("still here")))
        .await
        .unwrap();
    let next = until(&mut events, |e| {
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

#[tokio::test]
async fn authentication_failures_and_timeouts_close_with_1008() {
    let server = dev_server()
        .auth_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let addr = start(server).await;
    let mut bad = raw(addr).await;
    next_json(&mut bad).await;
    bad.send(WsMessage::text(r#"{"op":2,"d":{"token":""}}"#))
        .await
        .unwrap();
    assert_eq!(close_code(&mut bad).await, 1008);
    let mut idle = raw(addr).await;
    assert_eq!(close_code(&mut idle).await, 1008);
}

#[tokio::test]
async fn a_malformed_frame_closes_only_its_connection() {
    let addr = start(dev_server().build().unwrap()).await;
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    client
        .authenticate(json!({"token": "alice"}), true)
        .await
        .unwrap();
    for (frame, code) in [
        (WsMessage::text("this is not json"), 1007),
        (WsMessage::text("[1,2,3]"), 1007),
        (WsMessage::binary(vec![1, 2, 3]), 1003),
        (
            WsMessage::text(format!(r#"{{"op":0,"d":"{}"}}"#, "x".repeat(2 << 20))),
            1009,
        ),
    ] {
        let mut offender = raw(addr).await;
        next_json(&mut offender).await;
        offender.send(frame).await.unwrap();
        assert_eq!(close_code(&mut offender).await, code);
    }
    client
        .send(Message::dispatch("ECHO", json!("still here")))
        .await
        .unwrap();
    assert_eq!(next_message(&mut events).await.d, json!("still here"));
}

/// Counts sends and their recipients, to show a broadcast is one send, not one per peer.
#[derive(Default)]
struct Counter {
    sends: AtomicUsize,
    recipients: AtomicUsize,
}

struct Counting(Arc<Counter>);

impl Middleware for Counting {
    fn on_message_sent(
        &self,
        _: &Message,
        recipients: usize,
    ) -> Result<(), mesa_tokio::mesa_driver::BoxError> {
        self.0.sends.fetch_add(1, Ordering::SeqCst);
        self.0.recipients.fetch_add(recipients, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_broadcast_to_many_is_one_send() {
    let counter = Arc::new(Counter::default());
    let server = dev_server()
        .middleware(Counting(counter.clone()))
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let mut clients = Vec::new();
    for n in 0..20 {
        let (client, events) = mesa_tokio::client(url(addr)).build().unwrap();
        client
            .authenticate(json!({"token": format!("user{n}")}), true)
            .await
            .unwrap();
        clients.push((client, events));
    }
    let report = handle.broadcast(&Message::dispatch("NEWS", json!({"n": 1})));
    assert_eq!(report.delivered, 20);
    for (_, events) in &mut clients {
        assert_eq!(next_message(events).await.t.as_deref(), Some("NEWS"));
    }
    assert_eq!(counter.sends.load(Ordering::SeqCst), 1);
    assert_eq!(counter.recipients.load(Ordering::SeqCst), 20);
}

/// Issue 11's send (20,000 ids, 10,000 of them excluded, none connected) is routed
/// whole; past the default limit of 100,000 distinct ids a send is refused, counted
/// after `excluding`.
#[tokio::test]
async fn long_recipient_lists_are_routed_up_to_max_recipients() {
    let handle = dev_server().build().unwrap().handle();
    let ids = |n: usize| (0..n).map(|i| format!("u{i}"));
    let note = Message::dispatch("NOTE", json!({}));
    let except: Vec<String> = ids(10_000).collect();
    let report = handle.send_to(&note, ids(20_000), &except).unwrap();
    assert_eq!(report.absent.len(), 10_000);
    assert_eq!(report.absent.first().map(String::as_str), Some("u10000"));

    assert_eq!(handle.max_recipients(), 100_000);
    assert_eq!(
        handle.send_to(&note, ids(100_001), &[]),
        Err(SendError::TooManyRecipients(TooManyRecipients {
            count: 100_001,
            max: 100_000
        }))
    );
    let report = handle.send_to(&note, ids(100_001), &["u0".into()]).unwrap();
    assert_eq!(report.absent.len(), 100_000);
}

#[tokio::test]
async fn the_client_reconnects_to_a_restarted_server_and_reauthenticates() {
    let server = dev_server().build().unwrap();
    let addr = start(server.clone()).await;
    let (client, mut events) = mesa_tokio::client(url(addr))
        .backoff(fast_backoff())
        .build()
        .unwrap();
    client
        .authenticate(json!({"token": "alice"}), true)
        .await
        .unwrap();
    server.shutdown();
    let ClientEvent::Disconnected {
        close,
        reconnect_at,
    } = until(&mut events, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(close.code, CloseCode::GOING_AWAY);
    assert!(reconnect_at.is_some());
    // Messages sent while the server is down are queued and delivered later.
    client
        .send(Message::dispatch("ECHO", json!("queued")))
        .await
        .unwrap();

    let restarted = dev_server().build().unwrap();
    let listening = loop {
        // The old listener's port may take a moment to be free again.
        match restarted.bind(addr).await {
            Ok(listening) => break listening,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    tokio::spawn(listening.run());
    let connected = until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    assert!(matches!(
        connected,
        ClientEvent::Connected {
            is_automatic_reconnection: true,
            is_initial_connection: false,
            ..
        }
    ));
    let _ = until(&mut events, |e| {
        matches!(e, ClientEvent::Authenticated { .. })
    })
    .await;
    assert_eq!(next_message(&mut events).await.d, json!("queued"));
    assert!(restarted.handle().is_online("alice"));
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1013_and_others_are_served() {
    let transport = mesa_tokio::TransportConfig {
        max_outbound_bytes: 64 * 1024,
        ..Default::default()
    };
    let server = mesa_tokio::server().transport(transport).build().unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    let _ = until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    let mut slow = raw(addr).await;
    next_json(&mut slow).await;
    // The slow client stops reading; broadcasts pile up until its queue overflows.
    let payload = json!({"blob": "y".repeat(16 * 1024)});
    let mut overflowed = false;
    for _ in 0..2_000 {
        let report = handle.broadcast(&Message::dispatch("BULK", payload.clone()));
        if report.overflowed > 0 {
            overflowed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(overflowed, "the slow reader's queue must overflow");
    let closed = timeout(WAIT, async {
        while handle.connection_count() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the slow consumer was dropped within the close timeout"
    );
    client
        .send(Message::dispatch("ECHO", json!("fine")))
        .await
        .unwrap();
    let echoed = loop {
        let message = next_message(&mut events).await;
        if message.t.as_deref() == Some("ECHO") {
            break message;
        }
    };
    assert_eq!(echoed.d, json!("fine"));
    drop(slow);
}

#[tokio::test]
async fn a_deliberate_disconnect_does_not_reconnect() {
    let server = dev_server().build().unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (client, mut events) = mesa_tokio::client(url(addr))
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let _ = until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    client
        .disconnect(mesa_tokio::Close::new(CloseCode::NORMAL, "bye"))
        .await
        .unwrap();
    let event = until(&mut events, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    assert!(!event.will_reconnect());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(handle.connection_count(), 0);
}

/// The runtime's clock is tokio's: with paused time, a 10 s heartbeat schedule plays
/// out instantly, and the silent client is closed after exactly 4 intervals.
#[tokio::test(start_paused = true)]
async fn heartbeats_run_on_tokio_paused_time() {
    let server = mesa_tokio::server()
        .heartbeat(Duration::from_secs(10), 2)
        .build()
        .unwrap();
    let addr = start(server).await;
    let mut silent = raw(addr).await;
    let opened = tokio::time::Instant::now();
    // Virtual time: wait up to two minutes of it for the close.
    let code = timeout(Duration::from_secs(120), async {
        loop {
            match silent.next().await {
                Some(Ok(WsMessage::Close(Some(frame)))) => break u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed within two virtual minutes");
    assert_eq!(code, 1001);
    let elapsed = opened.elapsed();
    // Beats at 10, 20, 30 s; the fourth tick (40 s) finds the third unanswered.
    assert!(
        elapsed >= Duration::from_secs(40) && elapsed < Duration::from_secs(41),
        "{elapsed:?}"
    );
}
