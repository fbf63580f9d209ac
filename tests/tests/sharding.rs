//! A cluster spread over two `redis-server` processes (sharding): each id's and each
//! room's keys and channels live on the instance `shard_of` names, every replica
//! links to both; sends, stored messages, rooms and a Dispatcher work across them,
//! and one instance dying costs only its own ids until it is back.

use std::net::SocketAddr;

use mesa_core::cluster::shard_of;
use mesa_core::{Message, Recipients, SyncConfig};
use mesa_tests::ours::{eventually, serve};
use mesa_tests::runtimes::{Raw, Tokio, next_json, raw_signed_in};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::{ClusterConfig, DevAuthenticator, RoomPolicy, Server};
use serde_json::json;

/// A replica of the cluster on `redis` (the first holds the global keys).
fn replica(redis: &[RedisServer]) -> Server {
    let mut cluster = ClusterConfig::new(redis[0].url());
    cluster.shard_urls = redis[1..].iter().map(RedisServer::url).collect();
    cluster.legacy_bus = false;
    mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .cluster(cluster)
        .sync(SyncConfig::default())
        .rooms(RoomPolicy::Authenticated)
        .build()
        .expect("a valid server")
}

async fn start(server: &Server) -> SocketAddr {
    serve(server, "127.0.0.1:0".parse().unwrap()).await
}

/// Two ids of each instance.
fn ids() -> Vec<String> {
    let mut on = [Vec::new(), Vec::new()];
    for id in (0..).map(|i| format!("user{i}")) {
        let shard = shard_of(&id, 2);
        if on[shard].len() < 2 {
            on[shard].push(id);
        }
        if on.iter().all(|ids| ids.len() == 2) {
            break;
        }
    }
    on.concat()
}

/// Whether `id` is in `connected_clients` of `redis`.
fn present(redis: &RedisServer, id: &str) -> bool {
    redis.integer(&["SISMEMBER", "connected_clients", id]) == Some(1)
}

async fn signed_in(addr: SocketAddr, id: &str, redis: &[RedisServer]) -> Raw<Tokio> {
    let ws = raw_signed_in(&Tokio, addr, id).await;
    let holder = &redis[shard_of(id, redis.len())];
    eventually(&format!("{id} present"), WAIT, || async {
        present(holder, id)
    })
    .await;
    ws
}

fn send(server: &Server, t: &str, to: &[&str]) {
    let ids = to.iter().map(|id| id.to_string()).collect();
    server
        .handle()
        .send(&Message::dispatch(t, json!({})), &Recipients::Ids(ids))
        .expect("within the limits");
}

#[tokio::test]
async fn ids_rooms_and_stored_messages_live_on_their_own_instance() {
    let redis = [RedisServer::start(), RedisServer::start()];
    let (a, b) = (replica(&redis), replica(&redis));
    let (addr_a, addr_b) = (start(&a).await, start(&b).await);
    let ids = ids();
    let (x0, y0, x1, y1) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let mut at_b0 = signed_in(addr_b, x0, &redis).await;
    let mut at_b1 = signed_in(addr_b, x1, &redis).await;
    // Presence is kept where each id lives, and only there.
    assert!(present(&redis[0], x0) && !present(&redis[1], x0));
    assert!(present(&redis[1], x1) && !present(&redis[0], x1));

    // A send from A to ids of both instances, one of them offline on each.
    send(&a, "HELLO", &[x0, x1, y0, y1]);
    assert_eq!(next_json(&Tokio, &mut at_b0).await["t"], "HELLO");
    assert_eq!(next_json(&Tokio, &mut at_b1).await["t"], "HELLO");
    let stored = |shard: usize, id: &str| redis[shard].stored("undelivered_messages", id);
    eventually("stored on each id's instance", WAIT, || async {
        stored(0, y0).len() == 1 && stored(1, y1).len() == 1
    })
    .await;
    assert!(stored(1, y0).is_empty() && stored(0, y1).is_empty());
    let mut late = raw_signed_in(&Tokio, addr_a, y1).await;
    assert_eq!(next_json(&Tokio, &mut late).await["t"], "HELLO");

    // A Dispatcher of the same instances reaches both.
    let dispatcher = mesa_tokio::Dispatcher::builder(redis[0].url())
        .shard_urls([redis[1].url()])
        .legacy_bus(false)
        .connect()
        .await
        .expect("a dispatcher");
    let to = Recipients::Ids(vec![x0.clone(), x1.clone()]);
    dispatcher
        .dispatch(Message::dispatch("NEWS", json!({})), None, to, &[])
        .await
        .expect("dispatched");
    assert_eq!(next_json(&Tokio, &mut at_b0).await["t"], "NEWS");
    assert_eq!(next_json(&Tokio, &mut at_b1).await["t"], "NEWS");

    // Rooms of either instance span the replicas; a broadcast goes everywhere.
    for room in ["lobby", "kitchen", "garden", "attic"] {
        b.handle().join_id(x0, room).expect("joined");
        let channel = format!("mesa_room:{room}");
        let holder = &redis[shard_of(room, 2)];
        eventually("B listens on the room's instance", WAIT, || async {
            holder.subscribers(&channel) == 1
        })
        .await;
        a.handle()
            .publish(room, &Message::dispatch("ROOM", json!({ "room": room })))
            .expect("published");
        assert_eq!(next_json(&Tokio, &mut at_b0).await["d"]["room"], room);
    }
    a.handle().broadcast(&Message::dispatch("ALL", json!({})));
    assert_eq!(next_json(&Tokio, &mut at_b1).await["t"], "ALL");
}

#[tokio::test]
async fn one_instance_down_costs_only_its_own_ids_until_it_is_back() {
    let mut redis = [RedisServer::start(), RedisServer::start()];
    let (a, b) = (replica(&redis), replica(&redis));
    let addr_b = start(&b).await;
    let _ = start(&a).await;
    let ids = ids();
    let (x0, x1) = (&ids[0], &ids[2]);
    let mut at_b0 = signed_in(addr_b, x0, &redis).await;
    let mut at_b1 = signed_in(addr_b, x1, &redis).await;

    redis[1].kill();
    // The ids of the instance that is up are still reached.
    send(&a, "STILL", &[x0]);
    assert_eq!(next_json(&Tokio, &mut at_b0).await["t"], "STILL");

    // Back empty (no persistence): both replicas register their ids there anew.
    redis[1].restart();
    eventually("x1 registered anew", WAIT, || async {
        present(&redis[1], x1)
            && redis[1].integer(&["SCARD", &format!("mesa_routes:{x1}")]) == Some(1)
    })
    .await;
    send(&a, "AGAIN", &[x1]);
    assert_eq!(next_json(&Tokio, &mut at_b1).await["t"], "AGAIN");
}
