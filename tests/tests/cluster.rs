//! Replicas of our server on real `redis-server` processes the tests start, kill and
//! restart: replication, sync, presence with leases, and Redis faults.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use mesa_core::{Close, CloseCode, Limits, Message, Opcode, Recipients, SyncConfig};
use mesa_tests::ours::{Crashable, eventually, next_event, next_message, serve, url};
use mesa_tests::runtimes::{Tokio, next_json, raw};
use mesa_tests::{CuttingProxy, RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{ClientEvent, ClusterConfig, DevAuthenticator, Server};
use redis::AsyncCommands;
use serde_json::{Value, json};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn replica(redis: &RedisServer, namespace: Option<&str>, sync: bool) -> Server<mesa_tokio::Relay> {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.namespace = namespace.map(str::to_owned);
    cluster.lease = Duration::from_millis(900);
    let mut builder = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(Duration::from_millis(300), 2)
        .reconnect_interval(Duration::from_millis(100))
        .authenticate(DevAuthenticator)
        .cluster(cluster);
    if sync {
        builder = builder.sync(SyncConfig {
            redelivery_interval: Duration::ZERO,
            ..SyncConfig::default()
        });
    }
    builder.build().unwrap()
}

async fn user(addr: SocketAddr, id: &str) -> (mesa_tokio::Client, mesa_tokio::ClientEvents) {
    let (client, events) = mesa_tokio::client(url(addr)).build().unwrap();
    let user = client
        .authenticate(json!({"token": id}), true)
        .await
        .unwrap();
    assert_eq!(user, json!({"id": id}));
    (client, events)
}

/// A relaying server with development authentication in `cluster`, storing for ids
/// connected nowhere with `sync`: the start of every sync scenario's server.
fn synced(
    cluster: ClusterConfig,
    sync: SyncConfig,
) -> mesa_tokio::ServerBuilder<mesa_tokio::Relay> {
    mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .authenticate(DevAuthenticator)
        .cluster(cluster)
        .sync(sync)
}

async fn redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    server.connection().await
}

async fn is_member(conn: &mut redis::aio::MultiplexedConnection, key: &str, id: &str) -> bool {
    conn.sismember(key, id).await.unwrap()
}

/// The stored array of `id`, decoded.
async fn stored(conn: &mut redis::aio::MultiplexedConnection, key: &str, id: &str) -> Vec<Value> {
    let raw: Option<String> = conn.hget(key, id).await.unwrap();
    raw.map(|raw| serde_json::from_str(&raw).unwrap())
        .unwrap_or_default()
}

/// Wait until `count` replicas listen on the cluster channel `channel`.
async fn subscribed(redis: &RedisServer, channel: &str, count: usize) {
    eventually(&format!("{count} replicas on {channel}"), WAIT, || async {
        redis.subscribers(channel) >= count
    })
    .await;
}

/// Wait until exactly `count` messages are stored for `id`.
async fn until_stored(conn: &redis::aio::MultiplexedConnection, id: &str, count: usize) {
    eventually(&format!("{count} messages stored for {id}"), WAIT, || {
        let mut conn = conn.clone();
        async move { stored(&mut conn, "undelivered_messages", id).await.len() == count }
    })
    .await;
}

/// Wait until `ids` are all in `connected_clients`.
async fn present(redis: &RedisServer, ids: &[&str]) {
    eventually(&format!("{ids:?} in connected_clients"), WAIT, || async {
        ids.iter()
            .all(|id| redis.integer(&["SISMEMBER", "connected_clients", id]) == Some(1))
    })
    .await;
}

/// Wait until the server has handled everything `client` sent so far: one
/// connection's messages are handled in order, so an ECHO sent after them comes back
/// after.
async fn handled(client: &mesa_tokio::Client, events: &mut mesa_tokio::ClientEvents) {
    let marker = json!("everything before me is handled");
    client
        .send(Message::dispatch("ECHO", marker.clone()))
        .await
        .unwrap();
    while next_message(events, "ECHO").await.d != marker {}
}

#[tokio::test]
async fn replicas_deliver_each_others_sends_once() {
    let redis_server = RedisServer::start();
    let (a, b) = (
        replica(&redis_server, None, false),
        replica(&redis_server, None, false),
    );
    let (addr_a, addr_b) = (serve(&a, any_port()).await, serve(&b, any_port()).await);
    let (alice, mut alice_events) = user(addr_a, "alice").await;
    let (_bob, mut bob_events) = user(addr_b, "bob").await;
    subscribed(&redis_server, "ws", 2).await;

    alice
        .send(Message::dispatch("BROADCAST", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut bob_events, "BROADCAST").await.d,
        json!({"n": 1})
    );
    assert_eq!(
        next_message(&mut alice_events, "BROADCAST").await.d,
        json!({"n": 1})
    );

    alice
        .send(Message::dispatch(
            "BROADCAST",
            json!({"to": ["bob"], "n": 2}),
        ))
        .await
        .unwrap();
    assert_eq!(next_message(&mut bob_events, "BROADCAST").await.d["n"], 2);

    // The server API reaches ids on any replica; a marker shows nothing arrived twice.
    b.handle()
        .send(
            &Message::dispatch("DM", json!("from b")),
            &Recipients::Ids(vec!["alice".into()]),
        )
        .unwrap();
    assert_eq!(
        next_message(&mut alice_events, "DM").await.d,
        json!("from b")
    );
    alice
        .send(Message::dispatch("ECHO", json!("marker")))
        .await
        .unwrap();
    let rest = mesa_tests::ours::next_event(
        &mut alice_events,
        "the marker",
        |e| matches!(e, ClientEvent::Message(m) if m.t.as_deref() == Some("ECHO")),
        WAIT,
    )
    .await;
    assert!(matches!(rest, ClientEvent::Message(_)));
    let more = mesa_tests::ours::ready_events(&mut alice_events);
    assert!(
        !more
            .iter()
            .any(|e| matches!(e, ClientEvent::Message(m) if m.t.as_deref() != Some("ECHO"))),
        "a duplicate arrived: {more:?}"
    );
}

#[tokio::test]
async fn namespaces_isolate_clusters_on_one_redis() {
    let redis_server = RedisServer::start();
    let one = replica(&redis_server, Some("one"), false);
    let two = replica(&redis_server, Some("two"), false);
    let (addr_one, addr_two) = (serve(&one, any_port()).await, serve(&two, any_port()).await);
    let (alice, _alice_events) = user(addr_one, "alice").await;
    let (bob, mut bob_events) = user(addr_two, "bob").await;
    subscribed(&redis_server, "ws_one", 1).await;
    subscribed(&redis_server, "ws_two", 1).await;
    alice
        .send(Message::dispatch("BROADCAST", json!("one only")))
        .await
        .unwrap();
    bob.send(Message::dispatch("ECHO", json!("marker")))
        .await
        .unwrap();
    // The marker comes back; the other cluster's broadcast never came before it.
    let first = next_event(
        &mut bob_events,
        "a message",
        |e| matches!(e, ClientEvent::Message(_)),
        WAIT,
    )
    .await;
    let ClientEvent::Message(first) = first else {
        unreachable!()
    };
    assert_eq!(first.t.as_deref(), Some("ECHO"));
    let mut conn = redis(&redis_server).await;
    assert!(is_member(&mut conn, "connected_clients_one", "alice").await);
    assert!(!is_member(&mut conn, "connected_clients_one", "bob").await);
    assert!(is_member(&mut conn, "connected_clients_two", "bob").await);
}

#[tokio::test]
async fn sync_stores_every_message_from_two_replicas_and_redelivers_in_order() {
    let redis_server = RedisServer::start();
    let (a, b) = (
        replica(&redis_server, None, true),
        replica(&redis_server, None, true),
    );
    let addr_a = serve(&a, any_port()).await;
    serve(&b, any_port()).await;
    let (handle_a, handle_b) = (a.handle(), b.handle());
    let burst = |handle: mesa_tokio::ServerHandle, from: &'static str| {
        tokio::spawn(async move {
            for n in 0..500 {
                let message = Message::dispatch("NOTE", json!({"from": from, "n": n}));
                handle
                    .send(&message, &Recipients::Ids(vec!["carol".into()]))
                    .unwrap();
                if n % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let (x, y) = (burst(handle_a, "a"), burst(handle_b, "b"));
    x.await.unwrap();
    y.await.unwrap();
    let mut conn = redis(&redis_server).await;
    eventually("1000 messages stored", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "carol")
                .await
                .len()
                == 1000
        }
    })
    .await;
    let entries = stored(&mut conn, "undelivered_messages", "carol").await;
    assert!(
        entries
            .iter()
            .all(|e| e["op"] == 0 && e["t"] == "NOTE" && e.get("s").is_none())
    );

    let (_carol, mut events) = user(addr_a, "carol").await;
    let mut received = Vec::new();
    while received.len() < 1000 {
        received.push(next_message(&mut events, "NOTE").await);
    }
    let sequence: Vec<u64> = received.iter().map(|m| m.s.unwrap()).collect();
    assert_eq!(sequence, (1..=1000).collect::<Vec<u64>>());
    for from in ["a", "b"] {
        let order: Vec<i64> = received
            .iter()
            .filter(|m| m.d["from"] == from)
            .map(|m| m.d["n"].as_i64().unwrap())
            .collect();
        assert_eq!(
            order,
            (0..500).collect::<Vec<i64>>(),
            "{from}'s messages in order"
        );
    }
    eventually("the store emptied once written", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "carol")
                .await
                .is_empty()
        }
    })
    .await;
}

#[tokio::test]
async fn a_drop_during_redelivery_keeps_the_rest_stored() {
    let redis_server = RedisServer::start();
    let mut cluster = ClusterConfig::new(redis_server.url());
    cluster.lease = Duration::from_millis(900);
    let sync = SyncConfig {
        redelivery_interval: Duration::from_millis(20),
        ..SyncConfig::default()
    };
    let server = synced(cluster, sync).build().unwrap();
    let addr = serve(&server, any_port()).await;
    for n in 0..40 {
        server
            .handle()
            .send(
                &Message::dispatch("NOTE", json!(n)),
                &Recipients::Ids(vec!["dan".into()]),
            )
            .unwrap();
    }
    let mut conn = redis(&redis_server).await;
    eventually("40 stored", WAIT, || {
        let mut conn = conn.clone();
        async move { stored(&mut conn, "undelivered_messages", "dan").await.len() == 40 }
    })
    .await;

    let (first, mut first_events) = user(addr, "dan").await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(
            next_message(&mut first_events, "NOTE")
                .await
                .d
                .as_i64()
                .unwrap(),
        );
    }
    first
        .disconnect(Close::new(CloseCode::NORMAL, "gone halfway"))
        .await
        .unwrap();
    eventually("the rest is still stored", WAIT, || {
        let mut conn = conn.clone();
        async move {
            let left = stored(&mut conn, "undelivered_messages", "dan").await.len();
            (28..=30).contains(&left)
        }
    })
    .await;

    let (_second, mut second_events) = user(addr, "dan").await;
    let left = stored(&mut conn, "undelivered_messages", "dan").await.len();
    while seen.len() < 40 {
        let message = next_message(&mut second_events, "NOTE").await;
        seen.push(message.d.as_i64().unwrap());
    }
    seen.dedup();
    assert!(left > 0);
    // Nothing lost; at most the frame in flight at the drop arrives twice.
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (0..40).collect::<Vec<i64>>());
}

/// A departure Redis never heard of (the LEAVE was lost while the replica could not
/// reach Redis, or Redis restarted from a persisted file) is repaired by the
/// replica's next renewal: otherwise sends to that id would be published to nobody
/// instead of stored for it.
#[tokio::test]
async fn an_id_that_left_unseen_leaves_presence_at_the_next_renewal_and_gets_stored_for() {
    let redis_server = RedisServer::start();
    let a = replica(&redis_server, None, true);
    let addr_a = serve(&a, any_port()).await;
    let (alice, _alice_events) = user(addr_a, "alice").await;
    let mut conn = redis(&redis_server).await;
    eventually("alice online", WAIT, || {
        let mut conn = conn.clone();
        async move { is_member(&mut conn, "connected_clients", "alice").await }
    })
    .await;
    let replicas: Vec<String> = conn.smembers("mesa_replicas").await.unwrap();
    assert_eq!(replicas.len(), 1);
    // What a lost LEAVE leaves behind: the id in this replica's set and in presence.
    let ids = format!("mesa_replica_ids:{}", replicas[0]);
    let _: () = conn.sadd(ids, "ghost").await.unwrap();
    let _: () = conn.sadd("connected_clients", "ghost").await.unwrap();
    eventually("the ghost leaving presence", WAIT, || {
        let mut conn = conn.clone();
        async move { !is_member(&mut conn, "connected_clients", "ghost").await }
    })
    .await;
    assert!(is_member(&mut conn, "connected_clients", "alice").await);
    alice
        .send(Message::dispatch(
            "BROADCAST",
            json!({"to": ["ghost"], "n": 1}),
        ))
        .await
        .unwrap();
    eventually("the message to the ghost stored", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "ghost")
                .await
                .len()
                == 1
        }
    })
    .await;
}

/// A Redis restarted from its append-only file brings back the presence and the
/// lease of a replica that is gone (or has not reconnected yet). The replica that
/// reconnects first must not trust them: a send to an id that left meanwhile is
/// stored for it, not published to nobody.
#[tokio::test]
async fn after_a_redis_restart_from_disk_stale_presence_does_not_swallow_sends() {
    let mut redis_server = RedisServer::start_persistent();
    let long_lease = || {
        let mut cluster = ClusterConfig::new(redis_server.url());
        cluster.lease = Duration::from_secs(30);
        synced(cluster, SyncConfig::default()).build().unwrap()
    };
    let (a, b) = (long_lease(), long_lease());
    let (addr_a, addr_b) = (serve(&a, any_port()).await, serve(&b, any_port()).await);
    let (_alice, mut alice_events) = user(addr_a, "alice").await;
    let (bob, _bob_events) = user(addr_b, "bob").await;
    let conn = redis(&redis_server).await;
    eventually("alice online", WAIT, || {
        let mut conn = conn.clone();
        async move { is_member(&mut conn, "connected_clients", "alice").await }
    })
    .await;

    // Redis goes down; replica a goes for good meanwhile (alice with it), unable to
    // tell Redis. Redis comes back from its file with a's lease and alice's presence.
    redis_server.kill();
    a.shutdown();
    let _ = next_event(
        &mut alice_events,
        "alice's disconnection",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    drop(a);
    redis_server.restart();
    let mut conn = redis(&redis_server).await;
    bob.send(Message::dispatch(
        "BROADCAST",
        json!({"to": ["alice"], "n": 1}),
    ))
    .await
    .unwrap();
    // Long before a's restored lease (30 s) expires.
    eventually("the message to alice stored", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "alice")
                .await
                .len()
                == 1
        }
    })
    .await;
    assert!(!is_member(&mut conn, "connected_clients", "alice").await);
}

/// A send to an offline id waits while Redis is unreachable; if the id connects to
/// the same replica meanwhile, the presence check finds it online once Redis is
/// back, and the message reaches it there (a replica ignores its own envelopes).
#[tokio::test]
async fn a_send_that_waited_for_redis_reaches_an_id_that_connected_here_meanwhile() {
    let mut redis_server = RedisServer::start();
    let a = synced(
        ClusterConfig::new(redis_server.url()),
        SyncConfig::default(),
    )
    .build()
    .unwrap();
    let addr_a = serve(&a, any_port()).await;
    let (alice, mut alice_events) = user(addr_a, "alice").await;
    subscribed(&redis_server, "ws", 1).await;

    redis_server.kill();
    alice
        .send(Message::dispatch(
            "BROADCAST",
            json!({"to": ["bob"], "n": 1}),
        ))
        .await
        .unwrap();
    handled(&alice, &mut alice_events).await;
    // bob connects while Redis is still down (his stored messages cannot be read).
    let (bob, mut bob_events) = mesa_tokio::client(url(addr_a)).build().unwrap();
    let authenticating = bob.authenticate(json!({"token": "bob"}), true);
    let user = tokio::time::timeout(WAIT, authenticating).await.unwrap();
    assert_eq!(user.unwrap(), json!({"id": "bob"}));
    redis_server.restart();
    assert_eq!(
        next_message(&mut bob_events, "BROADCAST").await.d,
        json!({"to": ["bob"], "n": 1})
    );
}

/// The authentication reply and heartbeats never wait on Redis. With Redis frozen
/// (SIGSTOP: the load of stored messages hangs rather than fails), a client that
/// authenticates with sync gets op 22 at once and its heartbeats keep their
/// schedule; a live message for it waits. Once Redis thaws, the stored messages are
/// redelivered, then the live one follows, and the stored ones are removed.
#[tokio::test]
async fn op_22_and_heartbeats_do_not_wait_for_a_frozen_redis() {
    let redis_server = RedisServer::start();
    let sync = SyncConfig {
        // Longer than Redis stays frozen, retries included.
        load_timeout: Duration::from_secs(60),
        ..SyncConfig::default()
    };
    let server = synced(ClusterConfig::new(redis_server.url()), sync)
        .heartbeat(Duration::from_millis(200), 2)
        .build()
        .unwrap();
    let addr = serve(&server, any_port()).await;
    let (alice, _alice_events) = user(addr, "alice").await;
    for n in 1..=2 {
        let to_carol = json!({"to": ["carol"], "n": n});
        alice
            .send(Message::dispatch("BROADCAST", to_carol))
            .await
            .unwrap();
    }
    let conn = redis(&redis_server).await;
    until_stored(&conn, "carol", 2).await;

    redis_server.freeze();
    let rt = Tokio;
    let mut carol = raw(&rt, addr).await;
    assert_eq!(next_json(&rt, &mut carol).await["op"], 10);
    let asked = Instant::now();
    carol
        .send(WsMessage::text(r#"{"op":2,"d":{"token":"carol"}}"#))
        .await
        .unwrap();
    // Every frame until op 22 (a heartbeat may come first).
    while next_json(&rt, &mut carol).await["op"] != 22 {}
    let waited = asked.elapsed();
    // Redis's own timeout is 3 s; the load would have held op 22 for that long.
    assert!(waited < Duration::from_secs(2), "op 22 after {waited:?}");
    alice
        .send(Message::dispatch(
            "BROADCAST",
            json!({"to": ["carol"], "n": 3}),
        ))
        .await
        .unwrap();
    // Heartbeats keep their schedule (200 ms; 2 misses allowed) while Redis is
    // frozen; answered, they keep carol connected.
    for _ in 0..5 {
        let beat = next_json(&rt, &mut carol).await;
        assert_eq!(
            beat["op"], 1,
            "only heartbeats while the load waits: {beat}"
        );
        carol.send(WsMessage::text(r#"{"op":11}"#)).await.unwrap();
    }

    redis_server.thaw();
    let mut received = Vec::new();
    while received.len() < 3 {
        let frame = next_json(&rt, &mut carol).await;
        match frame["op"].as_u64() {
            Some(1) => carol.send(WsMessage::text(r#"{"op":11}"#)).await.unwrap(),
            _ => received.push((frame["s"].as_u64(), frame["d"]["n"].clone())),
        }
    }
    assert_eq!(
        received,
        [(Some(1), json!(1)), (Some(2), json!(2)), (None, json!(3))],
        "stored messages first, numbered, then the live one"
    );
    until_stored(&conn, "carol", 0).await;
}

#[tokio::test]
async fn presence_survives_one_of_two_connections_and_counts_connections() {
    let redis_server = RedisServer::start();
    let (a, b) = (
        replica(&redis_server, None, false),
        replica(&redis_server, None, false),
    );
    let (addr_a, addr_b) = (serve(&a, any_port()).await, serve(&b, any_port()).await);
    let (tab1, _e1) = user(addr_a, "erin").await;
    let (_tab2, _e2) = user(addr_b, "erin").await;
    let mut conn = redis(&redis_server).await;
    eventually("erin online with 2 connections", WAIT, || {
        let mut conn = conn.clone();
        async move {
            let count: Option<i64> = conn.get("connected_clients_count").await.unwrap();
            is_member(&mut conn, "connected_clients", "erin").await && count == Some(2)
        }
    })
    .await;
    tab1.disconnect(Close::new(CloseCode::NORMAL, "tab closed"))
        .await
        .unwrap();
    eventually("one connection left", WAIT, || {
        let mut conn = conn.clone();
        async move {
            conn.get::<_, Option<i64>>("connected_clients_count")
                .await
                .unwrap()
                == Some(1)
        }
    })
    .await;
    // Upstream would have removed erin here; she still has a tab on replica b. Once
    // replica a has forgotten her (its LEAVE script ran), the decision is made.
    eventually("erin held by one replica only", WAIT, || {
        let mut conn = conn.clone();
        async move {
            let sets: Vec<String> = conn.keys("mesa_replica_ids:*").await.unwrap();
            let mut holders = 0;
            for set in sets {
                holders += usize::from(is_member(&mut conn, &set, "erin").await);
            }
            holders == 1
        }
    })
    .await;
    assert!(is_member(&mut conn, "connected_clients", "erin").await);
}

#[tokio::test]
async fn a_crashed_replicas_ids_leave_presence_within_the_lease_and_get_stored_for() {
    let redis_server = RedisServer::start();
    let a = replica(&redis_server, None, true);
    let addr_a = serve(&a, any_port()).await;
    // Replica b runs on its own runtime, so that dropping it is a crash: no cleanup.
    let url_redis = redis_server.url();
    let b = Crashable::start(move || {
        let mut cluster = ClusterConfig::new(url_redis);
        cluster.lease = Duration::from_millis(900);
        synced(cluster, SyncConfig::default()).build().unwrap()
    });
    let addr_b = b.addr();
    let (_frank, _frank_events) = user(addr_b, "frank").await;
    let mut conn = redis(&redis_server).await;
    eventually("frank online", WAIT, || {
        let mut conn = conn.clone();
        async move { is_member(&mut conn, "connected_clients", "frank").await }
    })
    .await;

    b.crash();
    let crashed = Instant::now();
    let took = eventually("frank's presence expired", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move { !is_member(&mut conn, "connected_clients", "frank").await }
    })
    .await;
    eprintln!("lease expiry: frank left connected_clients {took:?} after the crash (lease 900 ms)");
    assert!(crashed.elapsed() < Duration::from_secs(3));

    // From now on, messages to frank are stored, not lost.
    let (gina, _g) = user(addr_a, "gina").await;
    gina.send(Message::dispatch(
        "BROADCAST",
        json!({"to": ["frank"], "text": "later"}),
    ))
    .await
    .unwrap();
    eventually("stored for frank", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "frank")
                .await
                .len()
                == 1
        }
    })
    .await;
    let count: Option<i64> = conn.get("connected_clients_count").await.unwrap();
    assert_eq!(
        count,
        Some(1),
        "the crashed replica's connection was taken back"
    );
}

#[tokio::test]
async fn replicas_recover_from_a_redis_restart_and_lose_no_stored_message() {
    let mut redis_server = RedisServer::start();
    let (a, b) = (
        replica(&redis_server, None, true),
        replica(&redis_server, None, true),
    );
    let (addr_a, addr_b) = (serve(&a, any_port()).await, serve(&b, any_port()).await);
    let (alice, mut alice_events) = user(addr_a, "alice").await;
    let (_bob, mut bob_events) = user(addr_b, "bob").await;
    subscribed(&redis_server, "ws", 2).await;
    present(&redis_server, &["alice", "bob"]).await;
    alice
        .send(Message::dispatch(
            "BROADCAST",
            json!({"to": ["bob"], "n": 0}),
        ))
        .await
        .unwrap();
    next_message(&mut bob_events, "BROADCAST").await;

    redis_server.kill();
    // While Redis is down: local delivery goes on, and sends to an offline id wait.
    alice
        .send(Message::dispatch("ECHO", json!("local")))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut alice_events, "ECHO").await.d,
        json!("local")
    );
    for n in 0..5 {
        alice
            .send(Message::dispatch(
                "BROADCAST",
                json!({"to": ["hank"], "n": n}),
            ))
            .await
            .unwrap();
    }
    handled(&alice, &mut alice_events).await;
    redis_server.restart();
    let restarted = Instant::now();

    // Cross-replica delivery comes back by itself.
    let mut n = 1;
    let recovered = loop {
        alice
            .send(Message::dispatch(
                "BROADCAST",
                json!({"to": ["bob"], "n": n}),
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(
            Duration::from_millis(200),
            next_message(&mut bob_events, "BROADCAST"),
        )
        .await;
        if got.is_ok() {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "no recovery after a Redis restart"
        );
        n += 1;
    };
    eprintln!("recovery: cross-replica delivery back {recovered:?} after Redis restarted");
    let conn = redis(&redis_server).await;
    eventually("hank's 5 messages stored after the restart", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "hank")
                .await
                .len()
                == 5
        }
    })
    .await;
    let (_hank, mut hank_events) = user(addr_b, "hank").await;
    for n in 0..5 {
        assert_eq!(next_message(&mut hank_events, "BROADCAST").await.d["n"], n);
    }
}

#[tokio::test]
async fn disconnect_client_reaches_another_replica() {
    let redis_server = RedisServer::start();
    let (a, b) = (
        replica(&redis_server, None, false),
        replica(&redis_server, None, false),
    );
    serve(&a, any_port()).await;
    let addr_b = serve(&b, any_port()).await;
    let (_ivy, mut events) = user(addr_b, "ivy").await;
    subscribed(&redis_server, "ws", 2).await;
    let mut kick = Message::new(Opcode::Internal, json!({}));
    kick.t = Some("DISCONNECT_CLIENT".into());
    a.handle()
        .send(&kick, &Recipients::Ids(vec!["ivy".into()]))
        .unwrap();
    let event = next_event(
        &mut events,
        "the kick",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    let ClientEvent::Disconnected { close, .. } = event else {
        unreachable!()
    };
    assert_eq!(close.code, CloseCode::NORMAL);
}

#[tokio::test]
async fn a_graceful_shutdown_removes_the_replicas_presence() {
    let redis_server = RedisServer::start();
    let a = replica(&redis_server, None, false);
    let addr = serve(&a, any_port()).await;
    let (_jo, mut events) = user(addr, "jo").await;
    let mut conn = redis(&redis_server).await;
    eventually("jo online", WAIT, || {
        let mut conn = conn.clone();
        async move { is_member(&mut conn, "connected_clients", "jo").await }
    })
    .await;
    a.shutdown_gracefully(Duration::from_secs(3)).await;
    let event = next_event(
        &mut events,
        "the close",
        |e| matches!(e, ClientEvent::Disconnected { .. }),
        WAIT,
    )
    .await;
    let ClientEvent::Disconnected { close, .. } = event else {
        unreachable!()
    };
    assert_eq!(close.code, CloseCode::GOING_AWAY);
    assert!(!is_member(&mut conn, "connected_clients", "jo").await);
    let replicas: Vec<String> = conn.smembers("mesa_replicas").await.unwrap();
    assert!(replicas.is_empty(), "{replicas:?}");
    let count: Option<i64> = conn.get("connected_clients_count").await.unwrap();
    assert_eq!(count.unwrap_or(0), 0);
}

/// The link to Redis fails in the middle of a pipeline that carries a redelivery's
/// trim, a connection's load and a presence change, and a store is issued while it
/// is down: each that must not be lost is kept, and done once the link is back. The trim removes
/// exactly what was redelivered (entries appended meanwhile stay), the waiting
/// connection gets its stored messages, the store lands, nothing is reported dropped.
#[tokio::test]
async fn a_pipeline_cut_midway_loses_none_of_its_trims_loads_and_stores() {
    let redis_server = RedisServer::start();
    let proxy = CuttingProxy::start(&redis_server).await;
    let metrics = Metrics::new();
    let mut cluster = ClusterConfig::new(proxy.url());
    // No liveness ping to cross the cut by chance.
    cluster.lease = Duration::from_secs(30);
    // The connection waits for its stored messages across the cut: past the default
    // load timeout (5 s) it would go on without them, so the wait is longer here.
    let sync = SyncConfig {
        redelivery_interval: Duration::from_millis(20),
        load_timeout: WAIT,
    };
    let server = synced(cluster, sync)
        .middleware(metrics.clone())
        .build()
        .unwrap();
    let addr = serve(&server, any_port()).await;
    let note = |n: i64| Message::dispatch("NOTE", json!(n));
    for (id, count) in [("dan", 10), ("fay", 3)] {
        for n in 0..count {
            server
                .handle()
                .send(&note(n), &Recipients::Ids(vec![id.into()]))
                .unwrap();
        }
    }
    let mut conn = redis(&redis_server).await;
    eventually("dan's 10 and fay's 3 stored", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "dan").await.len() == 10
                && stored(&mut conn, "undelivered_messages", "fay").await.len() == 3
        }
    })
    .await;

    // dan's 10 are loaded and redelivered; another writer appends to his array meanwhile.
    let (_dan, mut dan_events) = user(addr, "dan").await;
    assert_eq!(next_message(&mut dan_events, "NOTE").await.s, Some(1));
    let late =
        json!([{"op": 0, "d": "late 1", "t": "NOTE"}, {"op": 0, "d": "late 2", "t": "NOTE"}]);
    let mut array = stored(&mut conn, "undelivered_messages", "dan").await;
    array.extend(late.as_array().unwrap().iter().cloned());
    let _: () = conn
        .hset(
            "undelivered_messages",
            "dan",
            Value::from(array).to_string(),
        )
        .await
        .unwrap();

    // Redis holds every write: the cluster task waits on fay's connection count while
    // her presence and load, and dan's trim, pile up behind it.
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "10000", "WRITE"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let fay = tokio::spawn(async move { user(addr, "fay").await });
    for n in 2..=10 {
        assert_eq!(next_message(&mut dan_events, "NOTE").await.s, Some(n));
    }
    eventually("fay authenticated", WAIT, || {
        let text = metrics.render();
        async move { text.contains("mesa_authentications_total 2\n") }
    })
    .await;
    // Then the pipeline that carries them is cut on its way.
    proxy.cut_at_next_command();
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually("the link down", WAIT, || {
        let text = metrics.render();
        async move { text.contains("mesa_redis_link_failures_total 1\n") }
    })
    .await;
    assert_eq!(proxy.cuts(), 1);
    // A store for gus, while the link comes back.
    server
        .handle()
        .send(&note(0), &Recipients::Ids(vec!["gus".into()]))
        .unwrap();
    eventually("the link back up", WAIT, || {
        let up = metrics.cluster_link_up() == Some(true);
        async move { up }
    })
    .await;

    let (_fay, mut fay_events) = fay.await.unwrap();
    for n in 0..3 {
        let message = next_message(&mut fay_events, "NOTE").await;
        assert_eq!((message.d, message.s), (json!(n), Some(n as u64 + 1)));
    }
    eventually("gus's message stored, fay's trimmed", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "gus").await.len() == 1
                && stored(&mut conn, "undelivered_messages", "fay")
                    .await
                    .is_empty()
        }
    })
    .await;
    // dan's trim ran before fay's (it was queued first), and exactly once.
    assert_eq!(
        Value::from(stored(&mut conn, "undelivered_messages", "dan").await),
        late
    );
    assert!(
        metrics
            .render()
            .contains("mesa_cluster_jobs_dropped_total 0\n"),
        "nothing was dropped"
    );
}

/// `calls` of `cmdstat_publish` in the test's Redis.
async fn publish_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// One send to more ids than one round trip to Redis carries: a copy is stored for
/// each offline id, in upstream's text format, with the per-id cap and the corruption
/// handling; the one id online elsewhere gets it through one PUBLISH; and a later
/// send to the same ids is stored after it (order holds across the rounds).
#[tokio::test]
async fn a_send_to_thousands_of_offline_ids_is_stored_for_each_in_order() {
    let redis_server = RedisServer::start();
    let capped = || {
        synced(
            ClusterConfig::new(redis_server.url()),
            SyncConfig::default(),
        )
        .limits(Limits {
            max_stored_per_id: 2,
            ..Limits::default()
        })
        .build()
        .unwrap()
    };
    let (a, b) = (capped(), capped());
    serve(&a, any_port()).await;
    let addr_b = serve(&b, any_port()).await;
    let (bob, mut bob_events) = user(addr_b, "bob").await;
    let mut conn = redis(&redis_server).await;
    eventually("bob online", WAIT, || {
        let mut conn = conn.clone();
        async move { is_member(&mut conn, "connected_clients", "bob").await }
    })
    .await;
    let old = r#"[{"op":0,"d":"old 1","t":"NOTE"},{"op":0,"d":"old 2","t":"NOTE"}]"#;
    let _: () = conn
        .hset_multiple(
            "undelivered_messages",
            &[("off0", "not json"), ("off1", old)],
        )
        .await
        .unwrap();
    let publishes = publish_calls(&mut conn).await;

    let mut ids: Vec<String> = (0..10_000).map(|i| format!("off{i}")).collect();
    ids.insert(5_000, "bob".into());
    let first = Message::dispatch("NOTE", json!("first"));
    let second = Message::dispatch("NOTE", json!("second"));
    a.handle().send(&first, &Recipients::Ids(ids)).unwrap();
    a.handle()
        .send(
            &second,
            &Recipients::Ids(vec!["off9999".into(), "off0".into()]),
        )
        .unwrap();
    eventually("the second send stored after the first", WAIT, || {
        let mut conn = conn.clone();
        async move {
            stored(&mut conn, "undelivered_messages", "off9999")
                .await
                .len()
                == 2
        }
    })
    .await;
    let fields: usize = conn.hlen("undelivered_messages").await.unwrap();
    assert_eq!(fields, 10_001, "one field per offline id, and off0:corrupt");
    let raw = |id: &'static str| {
        let mut conn = conn.clone();
        async move {
            conn.hget::<_, _, String>("undelivered_messages", id)
                .await
                .unwrap()
        }
    };
    let (first_text, second_text) = (
        r#"{"op":0,"d":"first","t":"NOTE"}"#,
        r#"{"op":0,"d":"second","t":"NOTE"}"#,
    );
    assert_eq!(raw("off5000").await, format!("[{first_text}]"));
    assert_eq!(
        raw("off9999").await,
        format!("[{first_text},{second_text}]")
    );
    assert_eq!(raw("off0").await, format!("[{first_text},{second_text}]"));
    assert_eq!(raw("off0:corrupt").await, "not json");
    assert_eq!(
        raw("off1").await,
        format!(r#"[{{"op":0,"d":"old 2","t":"NOTE"}},{first_text}]"#)
    );

    assert_eq!(
        next_message(&mut bob_events, "NOTE").await.d,
        json!("first")
    );
    bob.send(Message::dispatch("ECHO", json!("marker")))
        .await
        .unwrap();
    let next = next_event(
        &mut bob_events,
        "the marker",
        |e| matches!(e, ClientEvent::Message(_)),
        WAIT,
    )
    .await;
    assert!(
        matches!(&next, ClientEvent::Message(m) if m.t.as_deref() == Some("ECHO")),
        "bob got the send twice: {next:?}"
    );
    assert_eq!(publish_calls(&mut conn).await - publishes, 1);
}

/// A Dispatcher's dispatch to thousands of ids (some listed twice) is stored once per
/// id, in the same bounded rounds as a server's sends.
#[tokio::test]
async fn a_dispatch_to_thousands_of_ids_stores_once_per_id() {
    let redis_server = RedisServer::start();
    let dispatcher = mesa_tokio::Dispatcher::builder(redis_server.url())
        .sync(true)
        .max_stored(1000)
        .connect()
        .await
        .unwrap();
    let ids: Vec<String> = (0..6_000).map(|i| format!("off{}", i % 5_000)).collect();
    let report = dispatcher
        .dispatch(
            Message::dispatch("NOTE", json!("hi")),
            None,
            Recipients::Ids(ids),
            &[],
        )
        .await
        .unwrap();
    assert_eq!((report.stored, report.published), (5_000, 0));
    let mut conn = redis(&redis_server).await;
    let fields: usize = conn.hlen("undelivered_messages").await.unwrap();
    assert_eq!(fields, 5_000);
    assert_eq!(
        stored(&mut conn, "undelivered_messages", "off4999")
            .await
            .len(),
        1
    );
}
