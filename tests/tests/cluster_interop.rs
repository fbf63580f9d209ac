//! Our replicas, Dispatcher and Portal side by side with `@cryb/mesa` 1.5.8's on one
//! Redis (a real `redis-server` per test): replication both ways, Dispatchers and
//! Portals of each side against the replicas of the other, sync stores written by one
//! side and redelivered by the other; and our Dispatcher's atomic stores.
//!
//! Needs Node.js (`npm ci --prefix tests/node`) and `redis-server`; every wait is
//! bounded, and every process is killed on drop.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesa_core::{
    CloseCode, Message, MessageOptions, PortalChoice, PortalEvent, PortalEventKind, Recipients,
    SyncConfig,
};
use mesa_tests::ours::{eventually, next_event, next_message, serve, url};
use mesa_tests::{ClientKind, NodePeer, RedisServer, WAIT};
use mesa_tokio::mesa_driver::BoxError;
use mesa_tokio::{ClientEvent, DevAuthenticator, Dispatcher, Middleware, Portal, Server};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::sync::watch;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Tells when a replica's cluster link is up.
struct LinkWatch(watch::Sender<bool>);

impl Middleware for LinkWatch {
    fn on_cluster_link(&self, up: bool) -> Result<(), BoxError> {
        let _ = self.0.send(up);
        Ok(())
    }
}

/// One of our replicas on `redis` (dev authentication, relay handler), served on a
/// free port once its cluster link is up.
async fn ours(
    redis: &RedisServer,
    sync: bool,
    portals: Option<PortalChoice>,
) -> (Server<mesa_tokio::Relay>, SocketAddr) {
    let (tx, mut up) = watch::channel(false);
    let mut builder = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(Duration::from_millis(500), 3)
        .authenticate(DevAuthenticator)
        .middleware(LinkWatch(tx))
        .redis(redis.url());
    if let Some(choice) = portals {
        builder = builder.portals(choice);
    }
    if sync {
        builder = builder.sync(SyncConfig {
            redelivery_interval: Duration::ZERO,
            ..SyncConfig::default()
        });
    }
    let server = builder.build().unwrap();
    tokio::time::timeout(WAIT, up.wait_for(|up| *up))
        .await
        .expect("our replica's cluster link up in time")
        .expect("the link watch is alive");
    let addr = serve(&server, any_port()).await;
    (server, addr)
}

/// An `@cryb/mesa` replica (`server.js`) on `redis` with these extra options.
async fn theirs(redis: &RedisServer, extra: Value) -> (NodePeer, u16) {
    let mut options = json!({"redis": redis.url()});
    if let (Some(options), Some(extra)) = (options.as_object_mut(), extra.as_object()) {
        options.extend(extra.clone());
    }
    NodePeer::server("their replica", 0, &options).await
}

/// Our client, authenticated as `id`, on the server at `addr`.
async fn our_user(addr: SocketAddr, id: &str) -> (mesa_tokio::Client, mesa_tokio::ClientEvents) {
    let (client, events) = mesa_tokio::client(url(addr)).build().unwrap();
    let user = client
        .authenticate(json!({"token": id}), true)
        .await
        .unwrap();
    assert_eq!(user, json!({"id": id}));
    (client, events)
}

/// `@cryb/mesa`'s Node client, authenticated as `id`, on the server at `port`.
async fn node_user(port: u16, id: &str) -> NodePeer {
    let mut client = NodePeer::client(
        &format!("{id} (their Node client)"),
        ClientKind::Node,
        &format!("ws://127.0.0.1:{port}"),
    );
    client.expect_event("connected").await;
    client.authenticate(id).await;
    client.expect_event("authenticated").await;
    client
}

async fn connection(redis: &RedisServer) -> MultiplexedConnection {
    redis.connection().await
}

/// Wait until `channel` has `count` subscribers (their replicas subscribe without
/// telling anyone when it is done).
async fn subscribers(conn: &MultiplexedConnection, channel: &str, count: i64) {
    eventually(&format!("{count} subscribers on {channel}"), WAIT, || {
        let mut conn = conn.clone();
        async move {
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query_async(&mut conn)
                .await
                .unwrap();
            counts.first().is_some_and(|(_, n)| *n == count)
        }
    })
    .await;
}

/// Wait until `id` is (or is not) in `connected_clients`.
async fn presence(conn: &MultiplexedConnection, id: &str, online: bool) {
    eventually(&format!("{id} online = {online}"), WAIT, || {
        let mut conn = conn.clone();
        async move {
            conn.sismember::<_, _, bool>("connected_clients", id)
                .await
                .unwrap()
                == online
        }
    })
    .await;
}

/// The raw stored array of `id` (upstream's format), if any.
async fn stored_raw(conn: &MultiplexedConnection, id: &str) -> Option<String> {
    conn.clone().hget("undelivered_messages", id).await.unwrap()
}

/// The stored array of `id`, decoded.
async fn stored(conn: &MultiplexedConnection, id: &str) -> Vec<Value> {
    stored_raw(conn, id)
        .await
        .map(|raw| serde_json::from_str(&raw).unwrap())
        .unwrap_or_default()
}

async fn wait_stored(conn: &MultiplexedConnection, id: &str, count: usize) {
    eventually(
        &format!("{count} messages stored for {id}"),
        WAIT,
        || async move { stored(conn, id).await.len() == count },
    )
    .await;
}

/// The next BROADCAST or NOTICE (type `t`) our client receives; its `d` must be `d`.
async fn ours_gets(events: &mut mesa_tokio::ClientEvents, who: &str, t: &str, d: &Value) {
    let message = next_message(events, t).await;
    assert_eq!(&message.d, d, "{who}: the next {t}");
}

/// The next message of type `t` a Node client receives; its `d` must be `d`.
async fn node_gets(peer: &mut NodePeer, t: &str, d: &Value) -> Value {
    let event = peer
        .expect(
            &format!("a {t} message"),
            |e| e["event"] == "message" && e["t"] == t,
            WAIT,
        )
        .await;
    if event["d"] != *d {
        peer.fail(&format!("the next {t} is {event}, not d = {d}"));
    }
    event
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|id| id.to_string()).collect()
}

async fn next_portal_event(portal: &mut Portal, what: &str) -> PortalEvent {
    match tokio::time::timeout(WAIT, portal.next()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("our portal ended before {what}"),
        Err(_) => panic!("our portal: no {what} within {WAIT:?}"),
    }
}

#[tokio::test]
async fn broadcasts_from_every_replica_reach_clients_on_every_replica() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let (_a, addr_a) = ours(&redis, false, None).await;
    let (_b, addr_b) = ours(&redis, false, None).await;
    let (_node, port) = theirs(&redis, json!({})).await;
    subscribers(&conn, "ws", 3).await;

    // Our clients on our replicas and on theirs, their Node clients on both.
    let (alice, mut alice_events) = our_user(addr_a, "alice").await;
    let (bob, mut bob_events) = our_user(addr_b, "bob").await;
    let mut carol = node_user(port, "carol").await;
    let mut dave = node_user(addr_a.port(), "dave").await;
    let their_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_erin, mut erin_events) = our_user(their_addr, "erin").await;
    for id in ["alice", "bob", "carol", "dave", "erin"] {
        presence(&conn, id, true).await;
    }

    // Global sends from each kind of replica reach all five clients.
    let from = |who: &str| json!({"from": who});
    for sender in ["alice", "bob", "carol"] {
        let d = from(sender);
        match sender {
            "alice" => alice
                .send(Message::dispatch("BROADCAST", d.clone()))
                .await
                .unwrap(),
            "bob" => bob
                .send(Message::dispatch("BROADCAST", d.clone()))
                .await
                .unwrap(),
            _ => carol.dispatch("BROADCAST", d.clone()).await,
        }
        ours_gets(&mut alice_events, "alice", "BROADCAST", &d).await;
        ours_gets(&mut bob_events, "bob", "BROADCAST", &d).await;
        ours_gets(&mut erin_events, "erin", "BROADCAST", &d).await;
        node_gets(&mut carol, "BROADCAST", &d).await;
        node_gets(&mut dave, "BROADCAST", &d).await;
    }

    // Targeted sends (to minus except) across replicas, both ways.
    let to_them = json!({"from": "alice", "to": ["carol", "bob", "erin"], "except": ["erin"]});
    alice
        .send(Message::dispatch("BROADCAST", to_them.clone()))
        .await
        .unwrap();
    ours_gets(&mut bob_events, "bob", "BROADCAST", &to_them).await;
    node_gets(&mut carol, "BROADCAST", &to_them).await;
    let to_us = json!({"from": "carol", "to": ["alice", "dave"]});
    carol.dispatch("BROADCAST", to_us.clone()).await;
    ours_gets(&mut alice_events, "alice", "BROADCAST", &to_us).await;
    node_gets(&mut dave, "BROADCAST", &to_us).await;

    // A last global send: for every client it is the next BROADCAST, so nobody got a
    // duplicate or a send that was not theirs.
    let end = from("end");
    bob.send(Message::dispatch("BROADCAST", end.clone()))
        .await
        .unwrap();
    ours_gets(&mut alice_events, "alice", "BROADCAST", &end).await;
    ours_gets(&mut bob_events, "bob", "BROADCAST", &end).await;
    ours_gets(&mut erin_events, "erin", "BROADCAST", &end).await;
    node_gets(&mut carol, "BROADCAST", &end).await;
    node_gets(&mut dave, "BROADCAST", &end).await;
}

#[tokio::test]
async fn dispatchers_of_each_side_reach_clients_on_the_replicas_of_the_other() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let (_a, addr_a) = ours(&redis, false, None).await;
    let (_node, port) = theirs(&redis, json!({})).await;
    subscribers(&conn, "ws", 2).await;
    let their_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let (_alice, mut alice_events) = our_user(addr_a, "alice").await;
    let mut dave = node_user(addr_a.port(), "dave").await;
    let mut carol = node_user(port, "carol").await;
    let (_erin, mut erin_events) = our_user(their_addr, "erin").await;

    let mut their_dispatcher = NodePeer::spawn(
        "their Dispatcher",
        "dispatcher.js",
        &[&redis.url(), "{}"],
        &[],
    );
    their_dispatcher.expect_event("ready").await;
    let dispatcher = Dispatcher::builder(redis.url())
        .sync(false)
        .max_stored(1000)
        .connect()
        .await
        .unwrap();

    // Their Dispatcher: to a list minus an exception, then to everyone.
    let n1 = json!({"n": 1});
    their_dispatcher
        .send(json!({"cmd": "dispatch", "t": "NOTICE", "d": n1, "to": ["alice", "dave", "carol", "erin"], "except": ["carol"]}))
        .await;
    ours_gets(&mut alice_events, "alice", "NOTICE", &n1).await;
    node_gets(&mut dave, "NOTICE", &n1).await;
    ours_gets(&mut erin_events, "erin", "NOTICE", &n1).await;
    let n2 = json!({"n": 2});
    their_dispatcher
        .send(json!({"cmd": "dispatch", "t": "NOTICE", "d": n2}))
        .await;
    // Their Dispatcher runs in another process: wait for its sends to land before ours,
    // so that every client's order is known.
    ours_gets(&mut alice_events, "alice", "NOTICE", &n2).await;
    node_gets(&mut dave, "NOTICE", &n2).await;
    node_gets(&mut carol, "NOTICE", &n2).await;
    ours_gets(&mut erin_events, "erin", "NOTICE", &n2).await;

    // Ours: to a list minus an exception, then to everyone.
    let n3 = json!({"n": 3});
    let report = dispatcher
        .dispatch(
            Message::dispatch("NOTICE", n3.clone()),
            None,
            Recipients::Ids(ids(&["carol", "erin", "alice"])),
            &ids(&["alice"]),
        )
        .await
        .unwrap();
    assert_eq!(
        (report.global, report.published, report.stored),
        (false, 2, 0)
    );
    let n4 = json!({"n": 4});
    let report = dispatcher
        .dispatch(
            Message::dispatch("NOTICE", n4.clone()),
            None,
            Recipients::All,
            &[],
        )
        .await
        .unwrap();
    assert!(report.global);

    // Each client got exactly its share, in order (alice and dave were not sent n3).
    ours_gets(&mut alice_events, "alice", "NOTICE", &n4).await;
    node_gets(&mut dave, "NOTICE", &n4).await;
    for d in [&n3, &n4] {
        node_gets(&mut carol, "NOTICE", d).await;
        ours_gets(&mut erin_events, "erin", "NOTICE", d).await;
    }
    // And carol was not sent n1: her first NOTICE was n2 (checked above).

    // DISCONNECT_CLIENT (op 5) from either Dispatcher closes clients on either replica
    // with 1000, and is never delivered as a message.
    let closed = |e: &ClientEvent| matches!(e, ClientEvent::Disconnected { .. });
    their_dispatcher
        .send(json!({"cmd": "event", "action": "DISCONNECT_CLIENT", "to": ["alice", "erin"], "except": ["erin"]}))
        .await;
    let ClientEvent::Disconnected { close, .. } =
        next_event(&mut alice_events, "alice kicked", closed, WAIT).await
    else {
        unreachable!()
    };
    assert_eq!(close.code, CloseCode::NORMAL);
    let report = dispatcher
        .dispatch_event(
            "DISCONNECT_CLIENT",
            Recipients::Ids(ids(&["carol", "erin"])),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(report.published, 2);
    let kicked = carol.expect_event("disconnected").await;
    assert_eq!(kicked["code"], 1000, "{kicked}");
    let ClientEvent::Disconnected { close, .. } =
        next_event(&mut erin_events, "erin kicked", closed, WAIT).await
    else {
        unreachable!()
    };
    assert_eq!(close.code, CloseCode::NORMAL);
    their_dispatcher
        .send(json!({"cmd": "event", "action": "DISCONNECT_CLIENT", "to": ["dave"]}))
        .await;
    let kicked = dave.expect_event("disconnected").await;
    assert_eq!(kicked["code"], 1000, "{kicked}");
    for peer in [&mut carol, &mut dave] {
        peer.assert_none("an op 5 delivered as a message", |e| {
            e["event"] == "message" && e["op"] == 5
        });
    }
}

#[tokio::test]
async fn their_portal_receives_our_replicas_events() {
    let redis = RedisServer::start();
    let mut portal = NodePeer::spawn("their Portal", "portal.js", &[&redis.url(), "{}"], &[]);
    let ready = portal.expect_event("ready").await;
    let portal_id = ready["id"].as_str().unwrap().to_owned();
    // Our replica reads the pool when its link comes up.
    let (_a, addr_a) = ours(&redis, false, Some(PortalChoice::RoundRobin)).await;

    let (alice, _events) = our_user(addr_a, "alice").await;
    let opened = portal.expect_event("portal").await;
    assert_eq!(
        (&opened["type"], &opened["clientId"]),
        (&json!("connection"), &Value::Null)
    );
    let authentication = portal.expect_event("portal").await;
    assert_eq!(
        (&authentication["type"], &authentication["clientId"]),
        (&json!("authentication"), &json!("alice"))
    );
    alice
        .send(Message::dispatch("HELLO", json!({"x": 1})))
        .await
        .unwrap();
    let message = portal.expect_event("portal").await;
    assert_eq!(
        (&message["type"], &message["clientId"]),
        (&json!("message"), &json!("alice"))
    );
    alice
        .disconnect(mesa_tokio::Close::new(CloseCode::NORMAL, "bye"))
        .await
        .unwrap();
    let disconnection = portal.expect_event("portal").await;
    assert_eq!(
        (&disconnection["type"], &disconnection["clientId"]),
        (&json!("disconnection"), &json!("alice"))
    );
    // On the wire: upstream's fields, addressed to that portal. The harness may log
    // the last raw line just after the parsed event: wait for all four.
    let deadline = Instant::now() + WAIT;
    while portal.count(|e| e["event"] == "raw") < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let raw: Vec<Value> = portal
        .history()
        .iter()
        .filter(|e| e["event"] == "raw")
        .map(|e| e["data"].clone())
        .collect();
    assert_eq!(raw.len(), 4, "{raw:?}");
    assert!(
        raw.iter().all(|e| e["portalId"] == portal_id.as_str()),
        "{raw:?}"
    );
    assert_eq!(raw[0], json!({"type": "connection", "portalId": portal_id}));
    assert_eq!(
        raw[2]["message"],
        json!({"op": 0, "d": {"x": 1}, "t": "HELLO"}),
        "the client's message, exactly"
    );

    // Leaving through upstream's exit handler takes it out of the pool.
    portal.send(json!({"cmd": "exit"})).await;
    portal.expect_event("exit").await;
    let conn = connection(&redis).await;
    eventually("their portal left the pool", WAIT, || {
        let mut conn = conn.clone();
        async move {
            let members: Vec<String> = conn.smembers("available_portals_pool").await.unwrap();
            members.is_empty()
        }
    })
    .await;
}

#[tokio::test]
async fn our_portals_receive_their_replicas_events() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let (_node, port) = theirs(&redis, json!({"portal": {"enabled": true}})).await;
    // Their replica learns of portals from the pool channel once subscribed.
    subscribers(&conn, "available_portals_pool", 1).await;
    let mut one = mesa_tokio::portal(redis.url()).start().await.unwrap();
    let mut all = mesa_tokio::portal(redis.url())
        .report_all_events(true)
        .start()
        .await
        .unwrap();
    assert_ne!(one.id(), all.id());
    let members: BTreeSet<String> = conn
        .clone()
        .smembers("available_portals_pool")
        .await
        .unwrap();
    assert_eq!(
        members,
        BTreeSet::from([one.id().to_owned(), all.id().to_owned()])
    );

    let mut carol = node_user(port, "carol").await;
    carol.dispatch("HELLO", json!({"x": 1})).await;
    carol.send(json!({"cmd": "disconnect", "code": 1000})).await;
    carol.expect_event("disconnected").await;

    // The reporting-all portal sees every event, in order, whoever it was for.
    let expected = [
        (PortalEventKind::Connection, None),
        (PortalEventKind::Authentication, Some("carol")),
        (
            PortalEventKind::Message(Message::dispatch("HELLO", json!({"x": 1}))),
            Some("carol"),
        ),
        (PortalEventKind::Disconnection, Some("carol")),
    ];
    let mut seen = Vec::new();
    for (kind, client) in &expected {
        let event = next_portal_event(&mut all, "an event of their replica").await;
        assert_eq!(&event.kind, kind);
        assert_eq!(event.client_id.as_deref(), *client);
        assert!(
            event.portal_id == one.id() || event.portal_id == all.id(),
            "addressed to an unknown portal: {event:?}"
        );
        seen.push(event);
    }
    // The other portal gets exactly the events addressed to it (round robin: some).
    let for_one: Vec<&PortalEvent> = seen.iter().filter(|e| e.portal_id == one.id()).collect();
    assert!(!for_one.is_empty() && for_one.len() < 4, "{seen:?}");
    for expected in for_one {
        assert_eq!(
            &next_portal_event(&mut one, "an event addressed to it").await,
            expected
        );
    }

    // A portal that closes leaves the pool, and their replica stops picking it.
    let gone = one.id().to_owned();
    one.close().await.unwrap();
    let members: BTreeSet<String> = conn
        .clone()
        .smembers("available_portals_pool")
        .await
        .unwrap();
    assert_eq!(members, BTreeSet::from([all.id().to_owned()]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _dan = node_user(port, "dan").await;
    for _ in 0..2 {
        let event = next_portal_event(&mut all, "dan's events").await;
        assert_eq!(event.portal_id, all.id(), "{gone} was picked after it left");
    }
    all.close().await.unwrap();
}

#[tokio::test]
async fn our_dispatchers_stores_are_redelivered_by_their_replica() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let (_node, port) = theirs(&redis, json!({"sync": {"enabled": true}})).await;
    let dispatcher = Dispatcher::builder(redis.url())
        .sync(true)
        .max_stored(1000)
        .connect()
        .await
        .unwrap();
    let frank = || Recipients::Ids(ids(&["frank"]));
    for n in 0..3 {
        let report = dispatcher
            .dispatch(
                Message::dispatch("NOTE", json!({"n": n})),
                None,
                frank(),
                &[],
            )
            .await
            .unwrap();
        assert_eq!((report.published, report.stored), (0, 1));
    }
    let report = dispatcher
        .dispatch(
            Message::dispatch("TYPING", json!({})),
            Some(MessageOptions::no_sync()),
            frank(),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(report.undeliverable, ids(&["frank"]));
    // Exactly upstream's format.
    assert_eq!(
        stored_raw(&conn, "frank").await.unwrap(),
        r#"[{"op":0,"d":{"n":0},"t":"NOTE"},{"op":0,"d":{"n":1},"t":"NOTE"},{"op":0,"d":{"n":2},"t":"NOTE"}]"#
    );

    let mut frank_client = node_user(port, "frank").await;
    for n in 0..3u64 {
        let message = node_gets(&mut frank_client, "NOTE", &json!({"n": n})).await;
        assert_eq!(message["s"], n + 1);
    }
    eventually("their replica cleared the store", WAIT, || async {
        stored_raw(&conn, "frank").await.is_none()
    })
    .await;

    // Their replica's presence is ours too: now frank is online, nothing is stored.
    presence(&conn, "frank", true).await;
    let report = dispatcher
        .dispatch(
            Message::dispatch("NOTE", json!({"n": 3})),
            None,
            frank(),
            &[],
        )
        .await
        .unwrap();
    assert_eq!((report.published, report.stored), (1, 0));
    let live = node_gets(&mut frank_client, "NOTE", &json!({"n": 3})).await;
    assert_eq!(live["s"], Value::Null);
    frank_client.assert_none("the no-sync message", |e| e["t"] == "TYPING");
}

#[tokio::test]
async fn their_stores_are_redelivered_by_our_replica() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let (_node, port) = theirs(&redis, json!({"sync": {"enabled": true}})).await;
    let (_a, addr_a) = ours(&redis, true, None).await;
    let mut their_dispatcher = NodePeer::spawn(
        "their Dispatcher",
        "dispatcher.js",
        &[&redis.url(), r#"{"sync":{"enabled":true}}"#],
        &[],
    );
    their_dispatcher.expect_event("ready").await;

    // Their replica stores a send to an offline id (one at a time: upstream's
    // read-modify-write would lose racing appends).
    let mut carol = node_user(port, "carol").await;
    carol
        .dispatch("BROADCAST", json!({"to": ["gina"], "n": 0}))
        .await;
    wait_stored(&conn, "gina", 1).await;
    // Their Dispatcher stores too, with the message's options kept in the entry.
    let dispatch = |n: u64, sync: bool| json!({"cmd": "dispatch", "t": "NOTE", "d": {"n": n}, "o": {"sync": sync}, "to": ["gina"]});
    their_dispatcher.send(dispatch(1, true)).await;
    wait_stored(&conn, "gina", 2).await;
    their_dispatcher.send(dispatch(2, false)).await;
    their_dispatcher.send(dispatch(3, true)).await;
    wait_stored(&conn, "gina", 3).await;
    let entries = stored(&conn, "gina").await;
    assert_eq!(
        entries[1],
        json!({"op": 0, "d": {"n": 1}, "t": "NOTE", "o": {"sync": true}})
    );

    // Our replica redelivers them, numbered, in order, and clears the store.
    let (_gina, mut events) = our_user(addr_a, "gina").await;
    let first = next_message(&mut events, "BROADCAST").await;
    assert_eq!((first.d["n"].as_u64(), first.s), (Some(0), Some(1)));
    for (n, s) in [(1, 2), (3, 3)] {
        let note = next_message(&mut events, "NOTE").await;
        assert_eq!((note.d, note.s), (json!({"n": n}), Some(s)));
    }
    eventually("our replica cleared the store", WAIT, || async {
        stored_raw(&conn, "gina").await.is_none()
    })
    .await;
}

#[tokio::test]
async fn two_dispatchers_store_every_one_of_1000_concurrent_messages() {
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let dispatchers = [
        Arc::new(
            Dispatcher::builder(redis.url())
                .sync(true)
                .max_stored(10_000)
                .connect()
                .await
                .unwrap(),
        ),
        Arc::new(
            Dispatcher::builder(redis.url())
                .sync(true)
                .max_stored(10_000)
                .connect()
                .await
                .unwrap(),
        ),
    ];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..1000u64 {
        let dispatcher = dispatchers[(n % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            dispatcher
                .dispatch(
                    Message::dispatch("NOTE", json!({"n": n})),
                    None,
                    Recipients::Ids(vec!["carol".into()]),
                    &[],
                )
                .await
        }));
    }
    for task in tasks {
        let report = task.await.unwrap().unwrap();
        assert_eq!((report.stored, report.dropped), (1, 0));
    }
    let elapsed = started.elapsed();
    let entries = stored(&conn, "carol").await;
    let numbers: BTreeSet<u64> = entries
        .iter()
        .map(|e| e["d"]["n"].as_u64().unwrap())
        .collect();
    eprintln!(
        "figure: 1000 concurrent dispatches from two Dispatchers to one offline id: {} stored ({} distinct) in {elapsed:?}",
        entries.len(),
        numbers.len()
    );
    assert_eq!(entries.len(), 1000);
    assert_eq!(numbers, (0..1000).collect::<BTreeSet<u64>>());
    assert!(
        entries
            .iter()
            .all(|e| e["op"] == 0 && e["t"] == "NOTE" && e.get("s").is_none())
    );

    // The cap keeps the newest messages and says how many went.
    let capped = Dispatcher::builder(redis.url())
        .sync(true)
        .max_stored(5)
        .connect()
        .await
        .unwrap();
    let mut dropped = 0;
    for n in 0..8 {
        let report = capped
            .dispatch(
                Message::dispatch("NOTE", json!({"n": n})),
                None,
                Recipients::Ids(ids(&["ivan"])),
                &[],
            )
            .await
            .unwrap();
        dropped += report.dropped;
    }
    assert_eq!(dropped, 3);
    let kept: Vec<Value> = stored(&conn, "ivan")
        .await
        .iter()
        .map(|e| e["d"]["n"].clone())
        .collect();
    assert_eq!(kept, [3, 4, 5, 6, 7].map(|n| json!(n)));
}

#[tokio::test]
async fn their_dispatcher_loses_concurrent_stores() {
    // The figure ours is compared with: upstream's HGET + HSET per message.
    let redis = RedisServer::start();
    let conn = connection(&redis).await;
    let mut their_dispatcher = NodePeer::spawn(
        "their Dispatcher",
        "dispatcher.js",
        &[&redis.url(), r#"{"sync":{"enabled":true}}"#],
        &[],
    );
    their_dispatcher.expect_event("ready").await;
    their_dispatcher
        .send(json!({"cmd": "burst", "count": 1000, "t": "NOTE", "to": ["carol"]}))
        .await;
    their_dispatcher.expect_event("burst_sent").await;
    // Wait until the count has not moved for half a second.
    let mut last = (usize::MAX, Instant::now());
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let count = stored(&conn, "carol").await.len();
        if count != last.0 {
            last = (count, Instant::now());
        } else if count > 0 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "figure: 1000 dispatches in a burst from @cryb/mesa's Dispatcher to one offline id: {} stored",
        last.0
    );
    assert!((1..=1000).contains(&last.0));
}

#[tokio::test]
async fn our_dispatcher_and_portal_recover_from_a_redis_restart() {
    let mut redis = RedisServer::start();
    let dispatcher = Dispatcher::builder(redis.url())
        .sync(true)
        .max_stored(1000)
        .connect()
        .await
        .unwrap();
    let mut portal = mesa_tokio::portal(redis.url())
        .report_all_events(true)
        .start()
        .await
        .unwrap();
    let id = portal.id().to_owned();

    redis.kill();
    let started = Instant::now();
    let outcome = dispatcher
        .dispatch(
            Message::dispatch("NOTE", json!({})),
            None,
            Recipients::Ids(ids(&["x"])),
            &[],
        )
        .await;
    assert!(outcome.is_err(), "a dispatch with Redis down: {outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it failed fast enough"
    );

    redis.restart();
    let conn = connection(&redis).await;
    let rejoined = eventually(
        "the portal back in the pool",
        Duration::from_secs(15),
        || {
            let mut conn = conn.clone();
            let id = id.clone();
            async move {
                conn.sismember::<_, _, bool>("available_portals_pool", id)
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    eprintln!("figure: our portal rejoined the pool {rejoined:?} after Redis came back");
    let report = dispatcher
        .dispatch(
            Message::dispatch("NOTE", json!({"n": 1})),
            None,
            Recipients::Ids(ids(&["x"])),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(report.stored, 1);
    let event = PortalEvent {
        kind: PortalEventKind::Authentication,
        client_id: Some("zoe".into()),
        portal_id: "someone else".into(),
    };
    let _: i64 = conn
        .clone()
        .publish("portal", event.encode())
        .await
        .unwrap();
    assert_eq!(
        next_portal_event(&mut portal, "an event after the restart").await,
        event
    );
    portal.close().await.unwrap();
}

/// Await `future` on smol for at most [`WAIT`].
async fn on_smol<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    smol::future::or(future, async {
        smol::Timer::after(WAIT).await;
        panic!("smol: no {what} within {WAIT:?}")
    })
    .await
}

#[test]
fn our_dispatcher_and_portal_run_on_smol() {
    // No tokio here: redis-rs runs on smol (async-io), the portal's task on smol's
    // executor with async-io's timers.
    let redis = RedisServer::start();
    smol::block_on(async {
        let mut portal = on_smol(
            "portal",
            mesa_driver::Portal::builder(mesa_async_std::Smol, redis.url())
                .namespace("s")
                .start(),
        )
        .await
        .unwrap();
        let dispatcher = on_smol(
            "dispatcher",
            Dispatcher::builder(redis.url())
                .namespace("s")
                .sync(true)
                .max_stored(10)
                .connect(),
        )
        .await
        .unwrap();
        let report = on_smol(
            "dispatch",
            dispatcher.dispatch(
                Message::dispatch("NOTE", json!({})),
                None,
                Recipients::Ids(ids(&["x"])),
                &[],
            ),
        )
        .await
        .unwrap();
        assert_eq!(report.stored, 1);
        let event = PortalEvent {
            kind: PortalEventKind::Connection,
            client_id: None,
            portal_id: portal.id().to_owned(),
        };
        let reply = redis.command(&["PUBLISH", "portal_s", &event.encode()]);
        assert_eq!(reply.as_deref(), Some(":1\r\n"));
        assert_eq!(on_smol("event", portal.next()).await, Some(event));
        on_smol("close", portal.close()).await.unwrap();
    });
    assert_eq!(
        redis
            .command(&["SMEMBERS", "available_portals_pool_s"])
            .as_deref(),
        Some("*0\r\n")
    );
}
