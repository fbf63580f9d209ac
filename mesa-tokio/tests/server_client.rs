//! Our server and our client over real loopback sockets on tokio.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::{FutureExt, StreamExt};
use mesa_tokio::{
    BackoffConfig, ClientEvent, ClientEvents, CloseCode, Connection, DevAuthenticator, Handler,
    Message, Middleware, SendError, Server, TooManyRecipients,
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

fn dev_server() -> mesa_tokio::ServerBuilder<mesa_tokio::Relay> {
    mesa_tokio::server()
        .handler(mesa_tokio::Relay)
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

/// Our client (fast backoff), authenticated as `token` on `server`, which then shuts
/// down: the client, its events (the disconnection still to come) and the address.
async fn offline_client<H: Handler>(
    server: Server<H>,
    token: &str,
) -> (mesa_tokio::Client, ClientEvents, SocketAddr) {
    let addr = start(server.clone()).await;
    let (client, events) = mesa_tokio::client(url(addr))
        .backoff(fast_backoff())
        .build()
        .unwrap();
    client
        .authenticate(json!({"token": token}), true)
        .await
        .unwrap();
    server.shutdown();
    (client, events, addr)
}

/// Serve `server` on `addr`, once the previous listener's port is free again.
async fn restart<H: Handler>(server: &Server<H>, addr: SocketAddr) {
    let listening = loop {
        match server.bind(addr).await {
            Ok(listening) => break listening,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    tokio::spawn(listening.run());
}

#[tokio::test]
async fn the_client_reconnects_to_a_restarted_server_and_reauthenticates() {
    let (client, mut events, addr) = offline_client(dev_server().build().unwrap(), "alice").await;
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
    restart(&restarted, addr).await;
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
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .transport(transport)
        .build()
        .unwrap();
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
        .handler(mesa_tokio::Relay)
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

/// Hands the `d` of every message received, with its (virtual) arrival time, to the
/// test, in the order the server processed them.
struct Arrivals(tokio::sync::mpsc::UnboundedSender<(Value, tokio::time::Instant)>);

impl Handler for Arrivals {
    async fn on_message(&self, _conn: &Connection, message: Message) {
        let _ = self.0.send((message.d, tokio::time::Instant::now()));
    }
}

/// A dev-authenticating server at the default limits whose messages arrive on the
/// returned receiver.
fn arrivals_server() -> (
    Server<Arrivals>,
    tokio::sync::mpsc::UnboundedReceiver<(Value, tokio::time::Instant)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let server = dev_server().handler(Arrivals(tx)).build().unwrap();
    (server, rx)
}

/// Receive `count` messages numbered `0..count`, in order; their arrival times.
async fn arrive_in_order(
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<(Value, tokio::time::Instant)>,
    count: u64,
    within: Duration,
) -> Vec<tokio::time::Instant> {
    timeout(within, async {
        let mut times = Vec::new();
        for n in 0..count {
            let (d, at) = arrivals.recv().await.expect("the server runs");
            assert_eq!(d, json!(n), "message {n} out of order");
            times.push(at);
        }
        times
    })
    .await
    .expect("every message arrives in time")
}

/// Whether the client's events so far include a close with 1008.
fn closed_with_1008(events: &mut ClientEvents) -> bool {
    std::iter::from_fn(|| events.next().now_or_never().flatten()).any(|event| {
        matches!(event, ClientEvent::Disconnected { close, .. } if close.code == CloseCode::POLICY)
    })
}

/// A client that sends 10,000 messages as fast as it can, at the default limits
/// (100 a second, a burst of 200), is slowed to the rate, not closed: all of them
/// reach the handler, in order, and no window holds more than `burst + rate · t`.
/// On paused time the ~98 virtual seconds pass at once.
#[tokio::test(start_paused = true)]
async fn a_client_sending_as_fast_as_it_can_is_slowed_to_the_rate_and_loses_nothing() {
    let (server, mut arrivals) = arrivals_server();
    let limits = server.config().limits().clone();
    let addr = start(server).await;
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    client
        .authenticate(json!({"token": "fast"}), true)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for n in 0..10_000u64 {
        client.send(Message::dispatch("N", json!(n))).await.unwrap();
    }
    let times = arrive_in_order(&mut arrivals, 10_000, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let (rate, burst) = (
        u128::from(limits.max_messages_per_second),
        u128::from(limits.max_message_burst),
    );
    eprintln!(
        "figure: 10,000 messages at once, delivered at the default rate in {elapsed:?} (virtual)"
    );
    assert!(
        elapsed.as_millis() >= (10_000 - burst) * 1000 / rate,
        "{elapsed:?}"
    );
    for span in [burst as usize, 300, 1_000, times.len() - 1] {
        for (first, last) in times.iter().zip(&times[span..]) {
            let t = (*last - *first).as_nanos();
            let count = span as u128 + 1;
            assert!(
                (count - burst) * 1_000_000_000 <= rate * t,
                "{count} messages in {:?}",
                *last - *first
            );
        }
    }
    assert!(!closed_with_1008(&mut events));
}

/// Our client keeps up to 1,024 sends while offline and flushes them at once when it
/// reconnects: at the default limits the server slows that burst instead of closing
/// it with 1008, so all 1,024 arrive, in order, and the client stays connected.
#[tokio::test(start_paused = true)]
async fn a_full_offline_queue_flushed_on_reconnect_arrives_whole_and_in_order() {
    let (client, mut events, addr) = offline_client(arrivals_server().0, "offline").await;
    let _ = until(&mut events, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    let queue = mesa_tokio::Limits::default().max_queued_sends as u64;
    for n in 0..queue {
        client.send(Message::dispatch("N", json!(n))).await.unwrap();
    }
    assert!(matches!(
        client.send(Message::dispatch("N", json!(queue))).await,
        Err(mesa_tokio::ClientError::Session(
            mesa_tokio::mesa_core::ClientError::QueueFull(_)
        ))
    ));

    let (restarted, mut arrivals) = arrivals_server();
    restart(&restarted, addr).await;
    arrive_in_order(&mut arrivals, queue, Duration::from_secs(120)).await;
    assert!(!closed_with_1008(&mut events));
    assert!(restarted.handle().is_online("offline"));
}

/// Streams of the sends to ids or of the broadcasts are taken by the connections
/// that opt in, which only a server with rooms has: without rooms `build()` refuses
/// them, saying so.
#[tokio::test]
async fn streams_of_ids_or_broadcasts_need_rooms() {
    use mesa_tokio::recovery::RecoveryConfig;
    use mesa_tokio::{ClusterConfig, ConfigError, DevAuthenticator, RoomPolicy};

    for (users, broadcast) in [(true, false), (false, true)] {
        let mut cluster = ClusterConfig::new("redis://127.0.0.1:1/");
        cluster.recovery = Some(RecoveryConfig {
            users,
            broadcast,
            ..RecoveryConfig::default()
        });
        let error = mesa_tokio::server()
            .authenticate(DevAuthenticator)
            .cluster(cluster.clone())
            .build()
            .err()
            .expect("streams without rooms are refused");
        assert_eq!(error, ConfigError::StreamsWithoutRooms);
        assert!(error.to_string().contains("need rooms on"), "{error}");
        let with_rooms = mesa_tokio::server()
            .authenticate(DevAuthenticator)
            .rooms(RoomPolicy::Authenticated)
            .cluster(cluster)
            .build();
        assert!(with_rooms.is_ok());
    }
}

/// Cluster settings do not depend on the order of the builder's calls: before
/// `redis()` they apply, and without Redis at all `build()` says what is missing.
#[tokio::test]
async fn cluster_settings_work_in_any_order_or_fail_saying_what_is_missing() {
    use mesa_tokio::{ConfigError, PortalChoice};

    let error = mesa_tokio::server()
        .namespace("tenant")
        .build()
        .err()
        .expect("a namespace without Redis is refused");
    assert_eq!(
        error,
        ConfigError::ClusterSettingWithoutRedis("a namespace")
    );
    assert!(error.to_string().contains("configure Redis"), "{error}");
    let error = mesa_tokio::server()
        .portals(PortalChoice::RoundRobin)
        .build()
        .err()
        .expect("portals without Redis are refused");
    assert_eq!(
        error,
        ConfigError::ClusterSettingWithoutRedis("forwarding to portals")
    );

    // Before redis(): accepted (the link connects in the background; nothing listens
    // on port 1, which is fine for building).
    let server = mesa_tokio::server()
        .namespace("tenant")
        .portals(PortalChoice::RoundRobin)
        .redis("redis://127.0.0.1:1/")
        .build();
    assert!(server.is_ok());
}

/// Safe by default: a server built without a handler does nothing with client
/// messages (no ECHO, no BROADCAST to everyone); middleware still sees them.
#[tokio::test]
async fn a_server_without_a_handler_ignores_client_messages() {
    #[derive(Default)]
    struct Seen(Arc<AtomicUsize>);
    impl Middleware for Seen {
        fn on_message_received(
            &self,
            _conn: &Connection,
            _message: &Message,
        ) -> Result<(), mesa_tokio::BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let server = mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .middleware(Seen(seen.clone()))
        .build()
        .unwrap();
    let addr = start(server.clone()).await;
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    client
        .authenticate(json!({"token": "alice"}), false)
        .await
        .unwrap();
    client
        .send(Message::dispatch("ECHO", json!({"n": 1})))
        .await
        .unwrap();
    client
        .send(Message::dispatch("BROADCAST", json!({"n": 2})))
        .await
        .unwrap();
    timeout(WAIT, async {
        while seen.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the middleware sees both messages");
    // The first message the client gets is the server's own, not an echo or a relay.
    server
        .handle()
        .broadcast(&Message::dispatch("MARKER", json!({})));
    let first = next_message(&mut events).await;
    assert_eq!(first.t.as_deref(), Some("MARKER"), "{first:?}");
}
