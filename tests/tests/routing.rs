//! Routing by interest on a real `redis-server`: with the legacy bus off, a send to
//! ids reaches only the replicas that hold them (each replica's own channel, the
//! route table `mesa_routes:<id>`), from a server or a Dispatcher; replicas with
//! the bus on and off work together; a crashed replica's routes go with its lease.

use std::net::SocketAddr;
use std::time::Duration;

use mesa_core::{Message, Recipients, SyncConfig};
use mesa_tests::ours::{Crashable, eventually, sample, serve};
use mesa_tests::runtimes::{Raw, Tokio, next_json, raw_signed_in};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{ClusterConfig, DevAuthenticator, Server, ServerHandle};
use serde_json::json;

/// A replica on `redis`, with the legacy bus `on` or off, counting into `metrics`.
fn replica(redis: &RedisServer, legacy_bus: bool, metrics: &Metrics) -> Server {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.legacy_bus = legacy_bus;
    cluster.lease = Duration::from_secs(1);
    mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .cluster(cluster)
        .sync(SyncConfig::default())
        .middleware(metrics.clone())
        .build()
        .expect("a valid server")
}

async fn start(server: &Server) -> SocketAddr {
    serve(server, "127.0.0.1:0".parse().unwrap()).await
}

/// Messages received from Redis, and those for nobody on the replica.
fn received(metrics: &Metrics) -> (f64, f64) {
    let text = metrics.render();
    let count = |series| sample(&text, series).unwrap_or(0.0);
    (
        count("mesa_cluster_messages_received_total"),
        count("mesa_cluster_messages_unneeded_total"),
    )
}

/// The replicas Redis routes `id` to.
fn routes(redis: &RedisServer, id: &str) -> i64 {
    redis
        .integer(&["SCARD", &format!("mesa_routes:{id}")])
        .unwrap_or(-1)
}

async fn signed_in(addr: SocketAddr, id: &str, redis: &RedisServer, holders: i64) -> Raw<Tokio> {
    let ws = raw_signed_in(&Tokio, addr, id).await;
    eventually(&format!("{id} routed"), WAIT, || async {
        routes(redis, id) == holders
    })
    .await;
    ws
}

/// Three replicas with the legacy bus off: the servers, their metrics, addresses.
async fn routed_replicas(redis: &RedisServer) -> (Vec<Server>, Vec<Metrics>, Vec<SocketAddr>) {
    let metrics: Vec<Metrics> = (0..3).map(|_| Metrics::new()).collect();
    let servers: Vec<Server> = metrics.iter().map(|m| replica(redis, false, m)).collect();
    let mut addrs = Vec::new();
    for server in &servers {
        addrs.push(start(server).await);
    }
    (servers, metrics, addrs)
}

fn send(handle: &ServerHandle, t: &str, to: &[&str]) {
    let ids = to.iter().map(|id| id.to_string()).collect();
    handle
        .send(&Message::dispatch(t, json!({})), &Recipients::Ids(ids))
        .expect("within the limits");
}

#[tokio::test]
async fn a_routed_send_reaches_only_the_replicas_that_hold_its_ids() {
    let redis = RedisServer::start();
    let (servers, metrics, addrs) = routed_replicas(&redis).await;
    let mut bob = signed_in(addrs[1], "bob", &redis, 1).await;
    let mut carol = signed_in(addrs[2], "carol", &redis, 1).await;

    send(&servers[0].handle(), "TO_BOB", &["bob"]);
    assert_eq!(next_json(&Tokio, &mut bob).await["t"], "TO_BOB");
    // A Dispatcher routes as well.
    let dispatcher = mesa_tokio::Dispatcher::builder(redis.url())
        .legacy_bus(false)
        .connect()
        .await
        .expect("a dispatcher");
    let ids = Recipients::Ids(vec!["bob".into(), "carol".into()]);
    dispatcher
        .dispatch(Message::dispatch("TO_BOTH", json!({})), None, ids, &[])
        .await
        .expect("dispatched");
    assert_eq!(next_json(&Tokio, &mut bob).await["t"], "TO_BOTH");
    assert_eq!(next_json(&Tokio, &mut carol).await["t"], "TO_BOTH");

    // Replica 0 holds nobody: it received nothing. Each other got what it needed.
    assert_eq!(received(&metrics[0]), (0.0, 0.0));
    assert_eq!(received(&metrics[1]), (2.0, 0.0));
    assert_eq!(received(&metrics[2]), (1.0, 0.0));

    // A global send still goes over `ws`, to every replica.
    servers[2]
        .handle()
        .broadcast(&Message::dispatch("ALL", json!({})));
    assert_eq!(next_json(&Tokio, &mut bob).await["t"], "ALL");
    assert_eq!(next_json(&Tokio, &mut carol).await["t"], "ALL");
}

#[tokio::test]
async fn tabs_on_two_replicas_each_get_a_routed_send_once_and_offline_ids_get_it_stored() {
    let redis = RedisServer::start();
    let (servers, metrics, addrs) = routed_replicas(&redis).await;
    let mut tab_a = signed_in(addrs[0], "bob", &redis, 1).await;
    let mut tab_b = signed_in(addrs[1], "bob", &redis, 2).await;
    send(&servers[2].handle(), "ONE", &["bob", "dave"]);
    send(&servers[2].handle(), "TWO", &["bob"]);
    for tab in [&mut tab_a, &mut tab_b] {
        assert_eq!(next_json(&Tokio, tab).await["t"], "ONE");
        assert_eq!(next_json(&Tokio, tab).await["t"], "TWO");
    }
    // Dave was connected nowhere: stored, and redelivered where he signs in.
    let mut dave = raw_signed_in(&Tokio, addrs[1], "dave").await;
    assert_eq!(next_json(&Tokio, &mut dave).await["t"], "ONE");

    // A tab closes: its replica's route goes, the other stays.
    drop(tab_a);
    eventually("one route left", WAIT, || async {
        routes(&redis, "bob") == 1
    })
    .await;
    send(&servers[2].handle(), "THREE", &["bob"]);
    assert_eq!(next_json(&Tokio, &mut tab_b).await["t"], "THREE");
    assert_eq!(received(&metrics[0]), (2.0, 0.0), "ONE and TWO only");
}

#[tokio::test]
async fn replicas_with_the_legacy_bus_on_and_off_deliver_each_other_s_sends() {
    let redis = RedisServer::start();
    let (on_metrics, off_metrics) = (Metrics::new(), Metrics::new());
    let on = replica(&redis, true, &on_metrics);
    let off = replica(&redis, false, &off_metrics);
    let (on_addr, off_addr) = (start(&on).await, start(&off).await);
    let mut at_on = signed_in(on_addr, "alice", &redis, 1).await;
    let mut at_off = signed_in(off_addr, "bob", &redis, 1).await;
    // `ws` from the replica with the bus on; routed from the other.
    send(&on.handle(), "FROM_ON", &["bob"]);
    assert_eq!(next_json(&Tokio, &mut at_off).await["t"], "FROM_ON");
    send(&off.handle(), "FROM_OFF", &["alice"]);
    assert_eq!(next_json(&Tokio, &mut at_on).await["t"], "FROM_OFF");
}

#[tokio::test]
async fn a_crashed_replica_s_routes_go_with_its_lease() {
    let redis = RedisServer::start();
    let metrics = Metrics::new();
    let survivor = replica(&redis, false, &metrics);
    let survivor_addr = start(&survivor).await;
    let url = redis.url();
    let doomed = Crashable::start(move || {
        let mut cluster = ClusterConfig::new(url);
        cluster.legacy_bus = false;
        cluster.lease = Duration::from_secs(1);
        mesa_tokio::server()
            .authenticate(DevAuthenticator)
            .cluster(cluster)
            .build()
            .expect("a valid server")
    });
    let _bob = signed_in(doomed.addr(), "bob", &redis, 1).await;
    let mut tab = signed_in(survivor_addr, "bob", &redis, 2).await;
    doomed.crash();
    // The survivor's janitor removes the dead replica's route once its lease ran out.
    eventually("the dead route removed", WAIT, || async {
        routes(&redis, "bob") == 1
    })
    .await;
    send(&survivor.handle(), "AFTER", &["bob"]);
    assert_eq!(next_json(&Tokio, &mut tab).await["t"], "AFTER");
}
