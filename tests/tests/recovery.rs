//! Recovery by position (docs/protocol.md, "Recovery") on a `redis-server` of the
//! test's own, with our Rust client behind a proxy that cuts its TCP connection:
//! a client that drops gets exactly what it missed, in order, once; after its
//! replica is killed too; a gap the stream no longer holds is told as
//! `recovered: false`, never replayed in part; an old client in the same room never
//! sees a position.

use std::net::SocketAddr;
use std::time::Duration;

use mesa_core::Message;
use mesa_tests::ours::{Crashable, next_event, sample, serve};
use mesa_tests::proxy::CutProxy;
use mesa_tests::runtimes::{Tokio, next_json, raw};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::recovery::{Position, RecoveryConfig};
use mesa_tokio::{
    Client, ClientEvent, ClientEvents, ClusterConfig, DevAuthenticator, Dispatcher, RoomPolicy,
    Server, ServerHandle,
};
use serde_json::{Value, json};

const ROOM: &str = "chat:1";

/// A cluster on `redis` whose `chat:*` rooms keep `size` messages; leases of 900 ms,
/// so that a killed replica's members go soon.
fn recovering(redis: &RedisServer, size: usize) -> ClusterConfig {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.lease = Duration::from_millis(900);
    cluster.recovery = Some(RecoveryConfig {
        rooms: vec!["chat:*".into()],
        size,
        ..RecoveryConfig::default()
    });
    cluster
}

/// A replica of that cluster; clients reconnect 50 ms after a drop.
fn replica(cluster: ClusterConfig) -> Server {
    replica_with(cluster, Metrics::new())
}

/// [`replica`] reporting to `metrics`.
fn replica_with(cluster: ClusterConfig, metrics: Metrics) -> Server {
    mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .rooms(RoomPolicy::Authenticated)
        .reconnect_interval(Duration::from_millis(50))
        .cluster(cluster)
        .middleware(metrics)
        .build()
        .unwrap()
}

/// A counter's value now.
fn counter(metrics: &Metrics, name: &str) -> f64 {
    sample(&metrics.render(), name).unwrap_or_default()
}

async fn start(server: &Server) -> SocketAddr {
    serve(server, "127.0.0.1:0".parse().unwrap()).await
}

/// Our client through `proxy`, signed in as `id` and subscribed to [`ROOM`]; returns
/// the position the subscribe answered with.
async fn member(proxy: &CutProxy, id: &str) -> (Client, ClientEvents, Position) {
    let url = format!("ws://{}/", proxy.addr());
    let (client, mut events) = mesa_tokio::client(url).build().unwrap();
    client
        .authenticate(json!({ "token": id }), false)
        .await
        .unwrap();
    client.subscribe(ROOM).await.unwrap();
    let position = match subscribed(&mut events).await {
        (Some(position), None) => position,
        other => panic!("a fresh subscribe answers a position and no recovery: {other:?}"),
    };
    (client, events, position)
}

/// The next answer to a subscribe (the client's own, or after a reconnection): its
/// position and `recovered`. Room messages before it are returned by
/// [`collect`]; here none may come first.
async fn subscribed(events: &mut ClientEvents) -> (Option<Position>, Option<bool>) {
    let event = next_event(
        events,
        "mesa:subscribed",
        |e| {
            matches!(
                e,
                ClientEvent::Subscribed { .. } | ClientEvent::RoomMessage { .. }
            )
        },
        WAIT,
    )
    .await;
    match event {
        ClientEvent::Subscribed {
            position,
            recovered,
            ..
        } => (position, recovered),
        other => panic!("a room message before the answer to the subscribe: {other:?}"),
    }
}

/// Room messages and answers to subscribes, in order, until the message numbered
/// `last` (`{"n": last}`).
async fn collect(events: &mut ClientEvents, last: u64) -> Vec<ClientEvent> {
    let mut seen = Vec::new();
    gather(
        events,
        &mut seen,
        &format!("message {last}"),
        |e| matches!(e, ClientEvent::RoomMessage { message, .. } if message.d["n"] == last),
    )
    .await;
    seen
}

/// Add the room messages and answers to subscribes to `seen`, in order, until an
/// event (of any kind) satisfies `done`.
async fn gather(
    events: &mut ClientEvents,
    seen: &mut Vec<ClientEvent>,
    what: &str,
    done: impl Fn(&ClientEvent) -> bool,
) {
    loop {
        let event = next_event(events, what, |_| true, WAIT).await;
        let finished = done(&event);
        if matches!(
            event,
            ClientEvent::Subscribed { .. } | ClientEvent::RoomMessage { .. }
        ) {
            seen.push(event);
        }
        if finished {
            return;
        }
    }
}

/// Wait until `count` replicas registered in Redis: their links are up, and what
/// they publish reaches the room (a publish made before is lost, and reported).
async fn linked(redis: &RedisServer, count: i64) {
    mesa_tests::ours::eventually("the replicas linked", WAIT, || async {
        redis.integer(&["SCARD", "mesa_replicas"]) == Some(count)
    })
    .await;
}

/// What the answers to subscribes among `events` said of their recovery.
fn resumes(events: &[ClientEvent]) -> Vec<Option<bool>> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Subscribed { recovered, .. } => Some(*recovered),
            _ => None,
        })
        .collect()
}

/// The numbers of the room messages among `events`, each with its offset.
fn numbered(events: &[ClientEvent]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|event| match event {
            ClientEvent::RoomMessage {
                message, position, ..
            } => Some((
                message.d["n"].as_u64().expect("numbered"),
                position.as_ref().expect("a position").offset,
            )),
            _ => None,
        })
        .collect()
}

fn publish(handle: &ServerHandle, n: u64) {
    let message = Message::dispatch("N", json!({ "n": n }));
    handle.publish(ROOM, &message).unwrap();
}

/// Cut a member's connection several times while messages flow from another
/// replica: after each reconnection it is told `recovered: true`, and over all the
/// cuts it gets every message once, in order, each at the offset after the last.
#[tokio::test]
async fn a_member_that_drops_gets_exactly_what_it_missed_in_order() {
    let redis = RedisServer::start();
    let (a, b) = (
        replica(recovering(&redis, 100)),
        replica(recovering(&redis, 100)),
    );
    let publisher = b.handle();
    let (addr_a, _) = (start(&a).await, start(&b).await);
    let proxy = CutProxy::start(addr_a).await;
    let (_client, mut events, start_at) = member(&proxy, "alice").await;
    linked(&redis, 2).await;

    let (trials, per_phase) = (5, 20);
    let (mut n, mut seen) = (0, Vec::new());
    for _ in 0..trials {
        // Messages flow; the connection is cut in the middle of them, and stays
        // down while more are published.
        for _ in 0..per_phase {
            publish(&publisher, n);
            n += 1;
        }
        proxy.cut();
        gather(&mut events, &mut seen, "the cut", |e| {
            matches!(e, ClientEvent::Disconnected { .. })
        })
        .await;
        for _ in 0..per_phase {
            publish(&publisher, n);
            n += 1;
        }
        proxy.resume(addr_a);
        gather(&mut events, &mut seen, "the resume", |e| {
            matches!(e, ClientEvent::Subscribed { .. })
        })
        .await;
        for _ in 0..per_phase {
            publish(&publisher, n);
            n += 1;
        }
    }
    let last = n - 1;
    gather(
        &mut events,
        &mut seen,
        "the last message",
        |e| matches!(e, ClientEvent::RoomMessage { message, .. } if message.d["n"] == last),
    )
    .await;
    assert_eq!(
        resumes(&seen),
        vec![Some(true); trials],
        "one complete resume per cut"
    );
    let got = numbered(&seen);
    let expected: Vec<(u64, u64)> = (0..n).map(|n| (n, start_at.offset + n + 1)).collect();
    assert_eq!(got, expected, "every message once, in order, at its offset");
}

/// The member's replica is killed while it is cut off; it comes back through
/// another replica, which replays what it missed from the stream.
#[tokio::test]
async fn a_member_resumes_on_another_replica_after_its_own_was_killed() {
    let redis = RedisServer::start();
    let cluster = recovering(&redis, 100);
    let a = Crashable::start(move || replica(cluster));
    let b = replica(recovering(&redis, 100));
    let publisher = b.handle();
    let addr_b = start(&b).await;
    let proxy = CutProxy::start(a.addr()).await;
    let (_client, mut events, _) = member(&proxy, "alice").await;
    linked(&redis, 2).await;
    for n in 0..10 {
        publish(&publisher, n);
    }
    let before = collect(&mut events, 9).await;
    assert_eq!(numbered(&before).len(), 10);

    proxy.cut();
    a.crash();
    for n in 10..40 {
        publish(&publisher, n);
    }
    proxy.resume(addr_b);
    let mut after = Vec::new();
    gather(&mut events, &mut after, "the resume", |e| {
        matches!(e, ClientEvent::Subscribed { .. })
    })
    .await;
    if numbered(&after).len() < 30 {
        after.extend(collect(&mut events, 39).await);
    }
    assert_eq!(resumes(&after), [Some(true)]);
    let got: Vec<u64> = numbered(&after).into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, (10..40).collect::<Vec<_>>());
}

/// A member that missed more than the stream keeps is told `recovered: false` and
/// gets none of what it missed (never a partial replay), then goes on live; a
/// client that received nothing yet resumes from the position its subscribe told.
#[tokio::test]
async fn a_gap_beyond_the_stream_is_told_and_never_replayed_in_part() {
    let redis = RedisServer::start();
    let metrics = Metrics::new();
    let server = replica_with(recovering(&redis, 5), metrics.clone());
    let addr = start(&server).await;
    let dispatcher = Dispatcher::builder(redis.url())
        .recovery(RecoveryConfig {
            rooms: vec!["chat:*".into()],
            size: 5,
            ..RecoveryConfig::default()
        })
        .connect()
        .await
        .unwrap();
    let dispatch = |n: u64| {
        let message = Message::dispatch("N", json!({ "n": n }));
        dispatcher.dispatch_room(ROOM, message)
    };
    let proxy = CutProxy::start(addr).await;
    let (_idle, mut idle_events, _) = member(&proxy, "carol").await;
    let (_client, mut events, _) = member(&proxy, "alice").await;

    // Nothing received yet: 3 missed, within the stream.
    proxy.cut();
    for n in 0..3 {
        dispatch(n).await.unwrap();
    }
    proxy.resume(addr);
    for events in [&mut idle_events, &mut events] {
        let seen = collect(events, 2).await;
        let got: Vec<u64> = numbered(&seen).into_iter().map(|(n, _)| n).collect();
        assert_eq!(got, [0, 1, 2]);
        // The replay comes first, then the answer.
        let seen = next_event(
            events,
            "the resume's answer",
            |e| matches!(e, ClientEvent::Subscribed { .. }),
            WAIT,
        )
        .await;
        assert!(
            matches!(
                seen,
                ClientEvent::Subscribed {
                    recovered: Some(true),
                    ..
                }
            ),
            "{seen:?}"
        );
    }

    // 10 missed, the stream keeps 5.
    proxy.cut();
    for n in 3..13 {
        dispatch(n).await.unwrap();
    }
    proxy.resume(addr);
    let (position, recovered) = subscribed(&mut events).await;
    assert_eq!(recovered, Some(false));
    assert_eq!(position.map(|p| p.offset), Some(13));
    dispatch(13).await.unwrap();
    let seen = collect(&mut events, 13).await;
    assert_eq!(numbered(&seen), [(13, 14)], "nothing of the gap, then live");
    // Both members resumed twice: complete, then not.
    mesa_tests::ours::eventually("every resume counted", WAIT, || async {
        counter(&metrics, "mesa_room_resumes_total") == 4.0
    })
    .await;
    assert_eq!(counter(&metrics, "mesa_room_resumes_incomplete_total"), 2.0);
}

/// An old client in a recoverable room (put there by the server) receives the
/// room's messages as plain dispatches: no position, no control dispatch.
#[tokio::test]
async fn an_old_client_in_a_recoverable_room_sees_nothing_new() {
    let redis = RedisServer::start();
    let server = replica(recovering(&redis, 100));
    let handle = server.handle();
    let addr = start(&server).await;
    linked(&redis, 1).await;
    let mut old = raw(&Tokio, addr).await;
    next_json(&Tokio, &mut old).await;
    let signin = json!({"op": 2, "d": {"token": "bob"}}).to_string();
    old.send(async_tungstenite::tungstenite::Message::text(signin))
        .await
        .unwrap();
    assert_eq!(next_json(&Tokio, &mut old).await["op"], 22);
    assert_eq!(handle.join_id("bob", ROOM).unwrap(), 1);
    for n in 0..3 {
        publish(&handle, n);
    }
    for n in 0..3 {
        let frame: Value = next_json(&Tokio, &mut old).await;
        assert_eq!(frame, json!({"op": 0, "d": {"n": n}, "t": "N"}));
    }
}

/// Redis drops the replica's subscription connection (`CLIENT KILL TYPE pubsub`)
/// while a dispatcher publishes: the replica reconnects, subscribes again and reads
/// what its channel missed from the stream, so its member, which stayed connected,
/// gets every message in order and is never told of a loss.
#[tokio::test]
async fn a_replica_repairs_what_its_channel_missed_from_the_stream() {
    let redis = RedisServer::start();
    let metrics = Metrics::new();
    let server = replica_with(recovering(&redis, 100), metrics.clone());
    let addr = start(&server).await;
    linked(&redis, 1).await;
    let dispatcher = Dispatcher::builder(redis.url())
        .recovery(RecoveryConfig {
            rooms: vec!["chat:*".into()],
            ..RecoveryConfig::default()
        })
        .connect()
        .await
        .unwrap();
    let proxy = CutProxy::start(addr).await;
    let (_client, mut events, _) = member(&proxy, "alice").await;
    for n in 0..60 {
        if n == 20 {
            redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        let message = Message::dispatch("N", json!({ "n": n }));
        dispatcher.dispatch_room(ROOM, message).await.unwrap();
    }
    let seen = collect(&mut events, 59).await;
    assert_eq!(resumes(&seen), [], "the member is told of no loss");
    let got: Vec<u64> = numbered(&seen).into_iter().map(|(n, _)| n).collect();
    assert_eq!(got, (0..60).collect::<Vec<_>>());
    assert_eq!(counter(&metrics, "mesa_room_messages_skipped_total"), 0.0);
}

/// Redis restarts without persistence: the room's stream starts a new epoch. A live
/// member is told its state is lost (`recovered: false`, no reference) and goes on
/// with the new epoch; a position of the old epoch never resumes.
#[tokio::test]
async fn a_new_epoch_after_redis_lost_its_data_is_told() {
    a_new_epoch_is_told(RedisServer::start()).await;
}

/// Redis restarts with its data (the same would be a failover to a replica that
/// had everything): another Redis process answers, which could as well lack the last
/// appends and number new messages with their offsets, so the stream starts a new
/// epoch all the same, and a live member is told.
#[tokio::test]
async fn a_new_epoch_after_another_redis_process_is_told() {
    a_new_epoch_is_told(RedisServer::start_persistent()).await;
}

async fn a_new_epoch_is_told(mut redis: RedisServer) {
    let server = replica(recovering(&redis, 100));
    let handle = server.handle();
    let addr = start(&server).await;
    linked(&redis, 1).await;
    let proxy = CutProxy::start(addr).await;
    let (_client, mut events, before) = member(&proxy, "alice").await;
    publish(&handle, 0);
    collect(&mut events, 0).await;

    redis.restart();
    linked(&redis, 1).await;
    let event = next_event(
        &mut events,
        "the loss told",
        |e| matches!(e, ClientEvent::Subscribed { .. }),
        WAIT,
    )
    .await;
    let ClientEvent::Subscribed {
        reference: None,
        position: Some(position),
        recovered: Some(false),
        ..
    } = event
    else {
        panic!("not a loss told by the server: {event:?}");
    };
    assert_ne!(position.epoch, before.epoch);
    publish(&handle, 1);
    let seen = collect(&mut events, 1).await;
    assert_eq!(numbered(&seen), [(1, position.offset + 1)]);
}
