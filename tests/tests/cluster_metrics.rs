//! The cluster figures of `mesa_tokio::metrics::Metrics` on a real `redis-server`:
//! link state and ping latency, messages stored for an offline id and redelivered,
//! and the link going down when Redis dies.

use std::time::{Duration, Instant};

use mesa_core::{Message, SyncConfig};
use mesa_tests::ours::{next_message, sample, serve, url};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{ClusterConfig, DevAuthenticator};
use serde_json::json;

/// Render until `check` holds on the text, at most [`WAIT`]; returns the text.
async fn until(metrics: &Metrics, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics.render();
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn redis_link_latency_and_sync_are_counted() {
    let mut redis = RedisServer::start();
    let metrics = Metrics::new();
    let mut cluster = ClusterConfig::new(redis.url());
    // A ping every 100 ms.
    cluster.lease = Duration::from_millis(300);
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .authenticate(DevAuthenticator)
        .cluster(cluster)
        .sync(SyncConfig::default())
        .middleware(metrics.clone())
        .build()
        .expect("server");
    let addr = serve(&server, "127.0.0.1:0".parse().expect("addr")).await;

    let text = until(&metrics, "the link up and a ping measured", |text| {
        sample(text, "mesa_redis_link_up") == Some(1.0)
            && sample(text, "mesa_redis_ping_seconds_count").is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(metrics.cluster_link_up(), Some(true));
    assert!(sample(&text, "mesa_redis_ping_seconds_sum").is_some_and(|s| s < 3.0));

    // Two messages to bob, who is connected nowhere: stored, then redelivered.
    let note = |n: u64| Message::dispatch("NOTE", json!({ "n": n }));
    server.handle().send_to(&note(1), ["bob"], &[]).unwrap();
    server.handle().send_to(&note(2), ["bob"], &[]).unwrap();
    until(&metrics, "two messages stored", |text| {
        sample(text, "mesa_sync_stored_total") == Some(2.0)
    })
    .await;
    let (bob, mut events) = mesa_tokio::client(url(addr)).build().expect("client");
    bob.authenticate(json!({"token": "bob"}), true)
        .await
        .expect("authenticated");
    assert_eq!(next_message(&mut events, "NOTE").await.s, Some(1));
    assert_eq!(next_message(&mut events, "NOTE").await.s, Some(2));
    until(&metrics, "two messages redelivered", |text| {
        sample(text, "mesa_sync_redelivered_total") == Some(2.0)
            && sample(text, "mesa_sync_dropped_total") == Some(0.0)
    })
    .await;

    redis.kill();
    until(&metrics, "the link down", |text| {
        sample(text, "mesa_redis_link_up") == Some(0.0)
            && sample(text, "mesa_redis_link_failures_total") == Some(1.0)
    })
    .await;
    assert_eq!(metrics.cluster_link_up(), Some(false));
    server.shutdown();
}
