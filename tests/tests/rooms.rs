//! Rooms through our server (docs/protocol.md), with raw WebSockets in the roles of
//! an extended client and an old one: negotiation, the room policy and the
//! application's authorization, the server's own joins and publishes, limits, and
//! rooms across two replicas on one `redis-server`.

use std::net::SocketAddr;

use async_tungstenite::tungstenite::Message as WsMessage;
use mesa_core::{Limits, Message};
use mesa_tests::ours::{Crashable, eventually, sample, serve};
use mesa_tests::runtimes::{Raw, Tokio, next_json, raw};
use mesa_tests::{ClientKind, NodePeer, RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{
    ClusterConfig, DevAuthenticator, RefusalCode, RoomAccess, RoomAccessKind, RoomPolicy,
    RoomRefusal, Server,
};
use serde_json::{Value, json};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn builder(policy: RoomPolicy) -> mesa_tokio::ServerBuilder {
    mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .rooms(policy)
}

async fn start<H: mesa_tokio::Handler>(server: Server<H>) -> SocketAddr {
    serve(&server, any_port()).await
}

async fn send(ws: &mut Raw<Tokio>, frame: Value) {
    ws.send(WsMessage::text(frame.to_string()))
        .await
        .expect("frame sent");
}

/// A raw client past its hello (returned) and signed in as `id`, opted in to rooms
/// when `extended`.
async fn client(addr: SocketAddr, id: &str, extended: bool) -> (Raw<Tokio>, Value) {
    let mut ws = raw(&Tokio, addr).await;
    let hello = next_json(&Tokio, &mut ws).await;
    let mut d = json!({"token": id});
    if extended {
        d["mesa"] = json!({"caps": ["rooms"]});
    }
    send(&mut ws, json!({"op": 2, "d": d})).await;
    assert_eq!(next_json(&Tokio, &mut ws).await["op"], 22, "{id} signed in");
    (ws, hello)
}

async fn subscribe(ws: &mut Raw<Tokio>, room: &str, reference: u64) -> Value {
    let d = json!({"room": room, "ref": reference});
    send(ws, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
    next_json(&Tokio, ws).await
}

#[tokio::test]
async fn an_extended_client_subscribes_and_members_receive_with_or_without_the_room() {
    let server = builder(RoomPolicy::Authenticated).build().unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (mut new, hello) = client(addr, "alice", true).await;
    assert!(
        hello["d"]["rules"]
            .as_array()
            .unwrap()
            .contains(&json!("rooms"))
    );
    let (mut old, _) = client(addr, "bob", false).await;

    let answer = subscribe(&mut new, "lobby", 1).await;
    assert_eq!(
        answer,
        json!({"op": 0, "t": "mesa:subscribed", "d": {"room": "lobby", "ref": 1}})
    );
    // The old client gets in by the server, and hears nothing of it.
    assert_eq!(handle.join_id("bob", "lobby").unwrap(), 1);
    assert_eq!((handle.room_count(), handle.membership_count()), (1, 2));

    let chat = Message::dispatch("CHAT", json!({"text": "hi"}));
    let report = handle.publish("lobby", &chat).unwrap();
    assert_eq!(report.delivered, 2);
    assert_eq!(
        next_json(&Tokio, &mut new).await,
        json!({"op": 0, "d": {"text": "hi"}, "t": "CHAT", "room": "lobby"})
    );
    assert_eq!(
        next_json(&Tokio, &mut old).await,
        json!({"op": 0, "d": {"text": "hi"}, "t": "CHAT"})
    );

    // A client publishes; then leaves.
    let d = json!({"room": "lobby", "t": "CHAT", "d": {"text": "yo"}, "ref": 2});
    send(&mut new, json!({"op": 0, "t": "mesa:publish", "d": d})).await;
    assert_eq!(next_json(&Tokio, &mut new).await["room"], "lobby");
    assert_eq!(next_json(&Tokio, &mut old).await["d"]["text"], "yo");
    let d = json!({"room": "lobby", "ref": 3});
    send(&mut new, json!({"op": 0, "t": "mesa:unsubscribe", "d": d})).await;
    assert_eq!(next_json(&Tokio, &mut new).await["t"], "mesa:unsubscribed");
    assert_eq!(handle.membership_count(), 1);
}

#[tokio::test]
async fn an_old_client_s_mesa_dispatch_is_an_ordinary_message() {
    let server = builder(RoomPolicy::Open)
        .handler(mesa_tokio::Relay)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (mut old, _) = client(addr, "bob", false).await;
    let d = json!({"room": "lobby", "ref": 1});
    send(&mut old, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
    // The relay ECHOs only ECHO; the frame reached the application, not the rooms.
    send(&mut old, json!({"op": 0, "t": "ECHO", "d": {}})).await;
    assert_eq!(next_json(&Tokio, &mut old).await["t"], "ECHO");
    assert_eq!(handle.membership_count(), 0);
}

#[tokio::test]
async fn the_authorization_decides_and_denies_what_it_does_not_allow() {
    let policy = RoomPolicy::authorizer(
        |conn: mesa_tokio::Connection, access: RoomAccess| async move {
            let allowed = match &access.kind {
                RoomAccessKind::Subscribe { token } => token.as_deref() == Some("ok"),
                RoomAccessKind::Publish => false,
            };
            if allowed && conn.id().is_some() {
                Ok(())
            } else {
                Err(RoomRefusal::new(RefusalCode::Unauthorized, "not for you"))
            }
        },
    );
    let server = builder(policy).build().unwrap();
    let addr = start(server).await;
    let (mut ws, _) = client(addr, "alice", true).await;
    let d = json!({"room": "vip", "ref": 1});
    send(&mut ws, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
    let refused = next_json(&Tokio, &mut ws).await;
    assert_eq!(refused["t"], "mesa:error");
    assert_eq!(
        refused["d"],
        json!({"room": "vip", "ref": 1, "code": "unauthorized", "reason": "not for you"})
    );
    let d = json!({"room": "vip", "ref": 2, "token": "ok"});
    send(&mut ws, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
    assert_eq!(next_json(&Tokio, &mut ws).await["t"], "mesa:subscribed");
    let d = json!({"room": "vip", "t": "X", "d": {}, "ref": 3});
    send(&mut ws, json!({"op": 0, "t": "mesa:publish", "d": d})).await;
    assert_eq!(
        next_json(&Tokio, &mut ws).await["d"]["code"],
        "unauthorized"
    );
}

#[tokio::test]
async fn unauthenticated_clients_are_refused_unless_rooms_are_open_and_limits_hold() {
    let limits = Limits {
        max_rooms_per_connection: 1,
        ..Limits::default()
    };
    let server = builder(RoomPolicy::Authenticated)
        .limits(limits)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (mut ws, _) = client(addr, "alice", true).await;
    assert_eq!(subscribe(&mut ws, "one", 1).await["t"], "mesa:subscribed");
    let over = subscribe(&mut ws, "two", 2).await;
    assert_eq!(over["d"]["code"], "too_many_rooms");
    let bad = subscribe(&mut ws, "a room", 3).await;
    assert_eq!(bad["d"]["code"], "invalid_room");
    assert!(
        handle
            .publish("a room", &Message::dispatch("X", json!({})))
            .is_err()
    );

    // Without authentication, op 2 only opts in; `authenticated` refuses.
    let server = mesa_tokio::server()
        .rooms(RoomPolicy::Authenticated)
        .build()
        .unwrap();
    let addr = start(server).await;
    let mut anon = raw(&Tokio, addr).await;
    next_json(&Tokio, &mut anon).await;
    send(
        &mut anon,
        json!({"op": 2, "d": {"mesa": {"caps": ["rooms"]}}}),
    )
    .await;
    assert_eq!(
        subscribe(&mut anon, "lobby", 1).await["d"]["code"],
        "unauthorized"
    );
}

#[tokio::test]
async fn a_room_spans_replicas_and_a_replica_listens_only_while_it_has_a_member() {
    let redis = RedisServer::start();
    let (metrics_a, metrics_b) = (Metrics::new(), Metrics::new());
    let replica = |metrics: &Metrics| {
        builder(RoomPolicy::Authenticated)
            .cluster(ClusterConfig::new(redis.url()))
            .middleware(metrics.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (replica(&metrics_a), replica(&metrics_b));
    let (handle_a, handle_b) = (a.handle(), b.handle());
    let (addr_a, addr_b) = (start(a).await, start(b).await);
    let (mut alice, _) = client(addr_a, "alice", true).await;
    let (mut bob, _) = client(addr_b, "bob", false).await;
    assert_eq!(
        subscribe(&mut alice, "lobby", 1).await["t"],
        "mesa:subscribed"
    );
    handle_b.join_id("bob", "lobby").unwrap();
    let channel = "mesa_room:lobby";
    eventually("both replicas subscribed", WAIT, || async {
        redis.subscribers(channel) == 2
    })
    .await;
    // A round trip through replica A: by its answer, A has read Redis's
    // confirmation of its subscription (sent before), so what it publishes comes
    // back to it.
    handle_a.room_members("lobby").await.unwrap();

    handle_a
        .publish("lobby", &Message::dispatch("CHAT", json!({"n": 1})))
        .unwrap();
    assert_eq!(next_json(&Tokio, &mut alice).await["room"], "lobby");
    let at_bob = next_json(&Tokio, &mut bob).await;
    assert_eq!(at_bob, json!({"op": 0, "d": {"n": 1}, "t": "CHAT"}));

    // Bob leaves: replica B has no member any more and stops listening.
    assert_eq!(handle_b.leave_id("bob", "lobby"), 1);
    eventually("replica B unsubscribed", WAIT, || async {
        redis.subscribers(channel) == 1
    })
    .await;
    // A dispatcher reaches the members too.
    let dispatcher = mesa_tokio::Dispatcher::builder(redis.url())
        .connect()
        .await
        .unwrap();
    let report = dispatcher
        .dispatch_room("lobby", Message::dispatch("NOTE", json!({})))
        .await
        .unwrap();
    assert_eq!(report.room.as_deref(), Some("lobby"));
    assert_eq!(next_json(&Tokio, &mut alice).await["t"], "NOTE");

    // What each replica received from Redis, and needed: A got its own CHAT back
    // (its subscription confirmed, alice got it from there) and the NOTE; B got the
    // CHAT only, for bob.
    let a = metrics_a.render();
    assert_eq!(sample(&a, "mesa_rooms"), Some(1.0), "{a}");
    assert_eq!(sample(&a, "mesa_room_memberships"), Some(1.0));
    assert_eq!(
        sample(&a, "mesa_cluster_messages_received_total"),
        Some(2.0)
    );
    assert_eq!(
        sample(&a, "mesa_cluster_messages_unneeded_total"),
        Some(0.0)
    );
    let b = metrics_b.render();
    assert_eq!(sample(&b, "mesa_rooms"), Some(0.0), "{b}");
    assert_eq!(
        sample(&b, "mesa_cluster_messages_received_total"),
        Some(1.0)
    );
    assert_eq!(
        sample(&b, "mesa_cluster_messages_unneeded_total"),
        Some(0.0)
    );
}

/// Every authenticated connection goes into the lobby, the way an application puts
/// old clients into rooms.
struct Lobby;

impl mesa_tokio::Handler for Lobby {
    async fn on_authenticated(&self, conn: &mesa_tokio::Connection) {
        conn.join("lobby").expect("within the limits");
    }
}

/// With rooms on and an extended client busy beside them, the published clients
/// receive 10,000 room messages and sends as ordinary dispatches: no control dispatch,
/// no new field (the raw old client checks the frames themselves).
#[tokio::test]
async fn the_published_clients_never_see_anything_new_over_ten_thousand_messages() {
    const MESSAGES: usize = 10_000;
    let server = builder(RoomPolicy::Authenticated)
        .handler(Lobby)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let url = mesa_tests::ours::url(addr);
    let mut node = NodePeer::client("node", ClientKind::Node, &url);
    let mut browser = NodePeer::client("browser", ClientKind::Browser, &url);
    for (peer, id) in [(&mut node, "node"), (&mut browser, "browser")] {
        peer.expect_event("connected").await;
        peer.authenticate(id).await;
        peer.expect_event("authenticated").await;
    }
    let (mut old, _) = client(addr, "old", false).await;
    let (mut new, _) = client(addr, "new", true).await;
    assert_eq!(
        subscribe(&mut new, "lobby", 1).await["t"],
        "mesa:subscribed"
    );
    eventually("everyone in the lobby", WAIT, || async {
        handle.membership_count() == 4
    })
    .await;

    let ids = ["node", "browser", "old", "new"];
    for n in 0..MESSAGES {
        let message = Message::dispatch("N", json!({"n": n}));
        if n % 2 == 0 {
            handle.publish("lobby", &message).unwrap();
        } else {
            handle.send_to(&message, ids, &[]).unwrap();
        }
        if n % 500 == 499 {
            // The extended client asks for more control traffic meanwhile.
            let d = json!({"room": format!("side{n}"), "ref": n});
            send(&mut new, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
            tokio::task::yield_now().await;
        }
    }
    // It gets every message (the lobby's with their room) and every answer.
    let (mut answers, mut messages) = (0, 0);
    while answers + messages < MESSAGES + MESSAGES / 500 {
        let frame = next_json(&Tokio, &mut new).await;
        match frame["t"].as_str() {
            Some("mesa:subscribed") => answers += 1,
            _ => {
                let n = frame["d"]["n"].as_u64().unwrap();
                assert_eq!(frame.get("room").is_some(), n % 2 == 0, "{frame}");
                messages += 1;
            }
        }
    }
    assert_eq!(answers, MESSAGES / 500);
    for n in 0..MESSAGES {
        let frame = next_json(&Tokio, &mut old).await;
        let keys: Vec<&str> = frame
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["op", "d", "t"], "frame {n}: {frame}");
        assert_eq!(frame["d"]["n"], n, "in order");
    }
    for peer in [&mut node, &mut browser] {
        // In order: the last one means all came.
        let last = json!(MESSAGES - 1);
        peer.expect("the last message", |e| e["d"]["n"] == last, WAIT)
            .await;
        let received = peer.count(|e| e["event"] == "message" && e["t"] == "N");
        assert_eq!(received, MESSAGES);
        peer.assert_none("a control dispatch", |e| {
            e["t"].as_str().is_some_and(|t| t.starts_with("mesa:"))
        });
        peer.assert_none("a sequence number", |e| {
            e["event"] == "message" && !e["s"].is_null()
        });
    }
}

/// A cluster on `redis` whose leases last 900 ms: a crashed replica's members go soon.
fn short_lease(redis: &RedisServer) -> ClusterConfig {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.lease = std::time::Duration::from_millis(900);
    cluster
}

/// A replica of that cluster on a runtime of its own, so that dropping it is a crash.
fn crashable(redis: &RedisServer) -> Crashable {
    let cluster = short_lease(redis);
    Crashable::start(move || {
        builder(RoomPolicy::Authenticated)
            .cluster(cluster)
            .build()
            .unwrap()
    })
}

/// Who is in a room, asked of one replica: the members of every replica, by id with
/// their connections; a member that leaves goes; a replica that crashes takes its
/// members with it within its lease.
#[tokio::test]
async fn who_is_in_a_room_counts_every_replica_and_forgets_a_crashed_one() {
    let redis = RedisServer::start();
    let a = builder(RoomPolicy::Authenticated)
        .cluster(short_lease(&redis))
        .build()
        .unwrap();
    let handle = a.handle();
    let addr_a = start(a).await;
    let b = crashable(&redis);
    let addr_b = b.addr();

    let (mut alice, _) = client(addr_a, "alice", true).await;
    assert_eq!(
        subscribe(&mut alice, "lobby", 1).await["t"],
        "mesa:subscribed"
    );
    let mut tabs = Vec::new();
    for tab in 0..2 {
        let (mut bob, _) = client(addr_b, "bob", true).await;
        assert_eq!(
            subscribe(&mut bob, "lobby", tab).await["t"],
            "mesa:subscribed"
        );
        tabs.push(bob);
    }
    let members = |expected: Vec<(&'static str, u64)>| {
        let handle = handle.clone();
        async move {
            // Until the link is up, Redis cannot tell.
            let Ok(members) = handle.room_members("lobby").await else {
                return false;
            };
            let got: Vec<(&str, u64)> = members
                .iter()
                .map(|m| (m.id.as_str(), m.connections))
                .collect();
            got == expected
        }
    };
    eventually("alice and bob's two tabs", WAIT, || {
        members(vec![("alice", 1), ("bob", 2)])
    })
    .await;

    let d = json!({"room": "lobby", "ref": 9});
    send(
        &mut alice,
        json!({"op": 0, "t": "mesa:unsubscribe", "d": d}),
    )
    .await;
    eventually("alice left", WAIT, || members(vec![("bob", 2)])).await;

    b.crash();
    eventually("the crashed replica's members gone", WAIT, || {
        members(Vec::new())
    })
    .await;
    assert!(matches!(
        handle.room_members("not a room").await,
        Err(mesa_tokio::PresenceError::InvalidRoom(_))
    ));
}

/// Read frames until `count` presence notices (`mesa:join`, `mesa:leave`) about ids
/// other than `own` came; each as `(t, id)`. Its own id's first join may or may not
/// come (see docs/protocol.md, Presence): it is skipped.
async fn notices(ws: &mut Raw<Tokio>, own: &str, count: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let frame = next_json(&Tokio, ws).await;
        let t = frame["t"].as_str().unwrap_or_default().to_owned();
        if t == "mesa:join" || t == "mesa:leave" {
            assert_eq!(frame["d"]["room"], "lobby", "{frame}");
            let id = frame["d"]["id"].as_str().unwrap().to_owned();
            if id != own {
                seen.push((t, id));
            }
        }
    }
    seen
}

/// Presence across two replicas: a member that asked hears one join and one leave
/// per id (two tabs of bob on the other replica make one), a crashed replica's ids
/// leave when the janitor takes its lease, a member asks who is there, and members
/// that did not ask, or old clients, hear nothing.
#[tokio::test]
async fn members_that_ask_hear_each_id_join_and_leave_over_the_cluster() {
    let redis = RedisServer::start();
    // The relay echoes: an echo ends what a client received.
    let a = builder(RoomPolicy::Authenticated)
        .cluster(short_lease(&redis))
        .handler(mesa_tokio::Relay)
        .build()
        .unwrap();
    let handle = a.handle();
    let addr_a = start(a).await;
    let b = crashable(&redis);
    let (mut alice, _) = client(addr_a, "alice", true).await;
    let d = json!({"room": "lobby", "ref": 1, "presence": true});
    send(&mut alice, json!({"op": 0, "t": "mesa:subscribe", "d": d})).await;
    // Replica a listens on the room's channel before anyone else comes.
    eventually("a subscribed to the lobby", WAIT, || {
        std::future::ready(redis.subscribers("mesa_room:lobby") == 1)
    })
    .await;
    // A member that did not ask, and an old client the server put in the room.
    let (mut quiet, _) = client(addr_a, "carol", true).await;
    assert_eq!(
        subscribe(&mut quiet, "lobby", 1).await["t"],
        "mesa:subscribed"
    );
    let (mut old, _) = client(addr_a, "dave", false).await;
    assert_eq!(handle.join_id("dave", "lobby").unwrap(), 1);
    let joined = |id: &str| ("mesa:join".to_owned(), id.to_owned());
    let left = |id: &str| ("mesa:leave".to_owned(), id.to_owned());
    assert_eq!(
        notices(&mut alice, "alice", 2).await,
        [joined("carol"), joined("dave")]
    );

    // Two tabs of bob on replica b: one join.
    let mut tabs = Vec::new();
    for tab in 0..2 {
        let (mut bob, _) = client(b.addr(), "bob", true).await;
        assert_eq!(
            subscribe(&mut bob, "lobby", tab).await["t"],
            "mesa:subscribed"
        );
        tabs.push(bob);
    }
    assert_eq!(notices(&mut alice, "alice", 1).await, [joined("bob")]);

    // Who is there, asked by a member (once bob's second tab is registered too);
    // refused to a connection that is not one.
    eventually("bob's two tabs registered", WAIT, || {
        let handle = handle.clone();
        async move {
            let members = handle.room_members("lobby").await.unwrap_or_default();
            members.iter().any(|m| m.id == "bob" && m.connections == 2)
        }
    })
    .await;
    let d = json!({"room": "lobby", "ref": 7});
    send(
        &mut quiet,
        json!({"op": 0, "t": "mesa:presence", "d": d.clone()}),
    )
    .await;
    assert_eq!(
        next_json(&Tokio, &mut quiet).await,
        json!({"op": 0, "t": "mesa:presence", "d": {"room": "lobby", "ref": 7,
            "members": {"alice": 1, "bob": 2, "carol": 1, "dave": 1}}})
    );
    let (mut outsider, _) = client(addr_a, "erin", true).await;
    send(
        &mut outsider,
        json!({"op": 0, "t": "mesa:presence", "d": d}),
    )
    .await;
    let refused = next_json(&Tokio, &mut outsider).await;
    assert_eq!(refused["t"], "mesa:error");
    assert_eq!(refused["d"]["code"], "not_subscribed");

    // One tab leaves: nothing; the replica with the other crashes: bob leaves once
    // the janitor took its lease.
    let d = json!({"room": "lobby", "ref": 9});
    send(
        &mut tabs[0],
        json!({"op": 0, "t": "mesa:unsubscribe", "d": d}),
    )
    .await;
    b.crash();
    assert_eq!(notices(&mut alice, "alice", 1).await, [left("bob")]);
    // The old client leaves.
    assert_eq!(handle.leave_id("dave", "lobby"), 1);
    assert_eq!(notices(&mut alice, "alice", 1).await, [left("dave")]);

    // The member that did not ask, and the old client, heard no notice.
    send(
        &mut quiet,
        json!({"op": 0, "t": "ECHO", "d": {"last": true}}),
    )
    .await;
    let frame = next_json(&Tokio, &mut quiet).await;
    assert_eq!(frame["t"], "ECHO", "nothing before the echo: {frame}");
    send(&mut old, json!({"op": 0, "t": "ECHO", "d": {"last": true}})).await;
    let frame = next_json(&Tokio, &mut old).await;
    assert_eq!(frame["t"], "ECHO", "nothing before the echo: {frame}");
}

/// A connection has at most `max_presence_requests` awaiting answers; a presence
/// request while Redis is unreachable is answered with `unavailable`.
#[tokio::test]
async fn presence_requests_are_bounded_and_answered_unavailable_without_redis() {
    let mut redis = RedisServer::start();
    let limits = Limits {
        max_presence_requests: 1,
        ..Limits::default()
    };
    let server = builder(RoomPolicy::Authenticated)
        .cluster(ClusterConfig::new(redis.url()))
        .limits(limits)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(server).await;
    let (mut alice, _) = client(addr, "alice", true).await;
    assert_eq!(
        subscribe(&mut alice, "lobby", 1).await["t"],
        "mesa:subscribed"
    );
    eventually("alice registered in the lobby", WAIT, || {
        let handle = handle.clone();
        async move {
            handle
                .room_members("lobby")
                .await
                .is_ok_and(|m| m.len() == 1)
        }
    })
    .await;
    let ask = |reference: u64| {
        let d = json!({"room": "lobby", "ref": reference});
        json!({"op": 0, "t": "mesa:presence", "d": d})
    };
    // Redis does not answer the first: the second is over the bound.
    redis.freeze();
    send(&mut alice, ask(2)).await;
    send(&mut alice, ask(3)).await;
    let refused = next_json(&Tokio, &mut alice).await;
    assert_eq!(
        (&refused["d"]["ref"], &refused["d"]["code"]),
        (&json!(3), &json!("too_many_requests")),
        "{refused}"
    );
    redis.thaw();
    let answer = next_json(&Tokio, &mut alice).await;
    assert_eq!(
        answer,
        json!({"op": 0, "t": "mesa:presence", "d": {"room": "lobby", "ref": 2,
            "members": {"alice": 1}}})
    );
    redis.kill();
    send(&mut alice, ask(4)).await;
    let unavailable = next_json(&Tokio, &mut alice).await;
    assert_eq!(
        (&unavailable["d"]["ref"], &unavailable["d"]["code"]),
        (&json!(4), &json!("unavailable")),
        "{unavailable}"
    );
}

/// Redis restarts empty: every replica subscribes to its rooms' channels again and
/// registers its members anew, so room messages and presence come back by
/// themselves.
#[tokio::test]
async fn room_subscriptions_and_presence_come_back_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let replica = || {
        builder(RoomPolicy::Authenticated)
            .cluster(short_lease(&redis))
            .build()
            .unwrap()
    };
    let (a, b) = (replica(), replica());
    let (handle_a, handle_b) = (a.handle(), b.handle());
    let (addr_a, addr_b) = (start(a).await, start(b).await);
    let (mut alice, _) = client(addr_a, "alice", true).await;
    let (mut bob, _) = client(addr_b, "bob", true).await;
    for ws in [&mut alice, &mut bob] {
        assert_eq!(subscribe(ws, "lobby", 1).await["t"], "mesa:subscribed");
    }
    eventually("both replicas in the lobby", WAIT, || {
        both_in_lobby(&handle_a, &redis)
    })
    .await;

    redis.restart();
    eventually("subscribed and registered anew", WAIT, || {
        both_in_lobby(&handle_a, &redis)
    })
    .await;
    handle_b
        .publish("lobby", &Message::dispatch("BACK", json!({})))
        .unwrap();
    for ws in [&mut alice, &mut bob] {
        let message = next_json(&Tokio, ws).await;
        assert_eq!(
            (&message["t"], &message["room"]),
            (&json!("BACK"), &json!("lobby"))
        );
    }
}

/// Whether Redis knows alice and bob in the lobby and both replicas listen to it.
async fn both_in_lobby(handle: &mesa_tokio::ServerHandle, redis: &RedisServer) -> bool {
    let Ok(members) = handle.room_members("lobby").await else {
        return false;
    };
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    ids == ["alice", "bob"] && redis.subscribers("mesa_room:lobby") == 2
}
