//! Durable portals against a `redis-server` of their own: servers append client
//! events to the partitioned portal streams, a durable portal hands each client's
//! events out in order and acknowledges what the application acked; a poison event
//! (its handler always fails) lands in the dead-letter stream after `max_deliveries`
//! deliveries, and an unreadable entry goes there at once. Run on tokio (the durable
//! portal's shell is the same driver code on every runtime).
//!
//! Needs `redis-server` on PATH: `cargo test -p mesa-tests --test portal_durable`.

use std::collections::BTreeMap;
use std::time::Duration;

use mesa_core::{DurablePortalConfig, DurablePortals, Message, PortalEventKind};
use mesa_driver::{ClusterConfig, DevAuthenticator, DurablePortal, DurablePortalBuilder, Server};
use mesa_tests::RedisServer;
use mesa_tests::runtimes::{Tokio, block_on_tokio, signed_in, start, within};
use serde_json::json;

/// A portal of group `g` over 4 partitions, with timings short enough for a test:
/// a failed event comes back after 600 ms.
fn portal(redis: &RedisServer, id: &str) -> DurablePortalBuilder<Tokio> {
    DurablePortal::builder(Tokio, redis.url(), "g").config(DurablePortalConfig {
        group: "g".into(),
        id: Some(id.into()),
        partitions: 4,
        visibility_timeout: Duration::from_millis(600),
        tick: Duration::from_millis(100),
        reply_timeout: Duration::from_millis(500),
        max_deliveries: 3,
        ..DurablePortalConfig::default()
    })
}

#[test]
fn client_events_reach_a_durable_portal_in_order_per_client() {
    block_on_tokio(async {
        let rt = Tokio;
        let redis = RedisServer::start();
        let mut cluster = ClusterConfig::new(redis.url());
        // Durable only: nothing on the pub/sub channel.
        cluster.durable_portals = Some(DurablePortals {
            partitions: 4,
            maxlen: 10_000,
        });
        let server = Server::builder(rt)
            .authenticate(DevAuthenticator)
            .cluster(cluster)
            .build()
            .unwrap();
        let addr = start(&rt, &server).await;
        let mut portal = within(&rt, "the portal starting", portal(&redis, "p1").start())
            .await
            .unwrap();
        let (ann, _a) = signed_in(&rt, addr, "ann").await;
        let (bob, _b) = signed_in(&rt, addr, "bob").await;
        for n in 0..20 {
            ann.send(Message::dispatch("N", json!({"n": n})))
                .await
                .unwrap();
            bob.send(Message::dispatch("N", json!({"n": n})))
                .await
                .unwrap();
        }
        let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut ids = std::collections::BTreeSet::new();
        within(&rt, "40 messages at the portal", async {
            while seen.values().map(Vec::len).sum::<usize>() < 40 {
                let event = portal.next().await.expect("the portal runs");
                assert_eq!(event.event().portal_id, "p1");
                assert!(
                    ids.insert(event.event_id().to_owned()),
                    "event ids are unique"
                );
                if let PortalEventKind::Message(message) = &event.event().kind {
                    let client = event.event().client_id.clone().expect("an id");
                    let n = message.d["n"].as_i64().unwrap();
                    seen.entry(client).or_default().push(n);
                }
                event.ack();
            }
        })
        .await;
        let in_order: Vec<i64> = (0..20).collect();
        assert_eq!(seen["ann"], in_order);
        assert_eq!(seen["bob"], in_order);
        // Acknowledged: nothing stays pending once the acks reached Redis.
        within(&rt, "the acks reaching Redis", async {
            loop {
                let pending: i64 = (0..4)
                    .map(|p| {
                        let key = format!("portal_q:{p}");
                        pending_count(&redis, &key)
                    })
                    .sum();
                if pending == 0 {
                    break;
                }
                mesa_tests::runtimes::sleep(&rt, Duration::from_millis(20)).await;
            }
        })
        .await;
        portal.close().await.unwrap();
        drop((ann, bob));
    });
}

/// Entries of `stream` pending in group `g`.
fn pending_count(redis: &RedisServer, stream: &str) -> i64 {
    let reply = redis
        .command(&["XPENDING", stream, "g"])
        .unwrap_or_default();
    // RESP: *4\r\n:<count>\r\n...
    reply
        .lines()
        .nth(1)
        .and_then(|line| line.trim_start_matches(':').parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_poison_event_lands_in_the_dead_letter_stream_after_max_deliveries() {
    block_on_tokio(async {
        let rt = Tokio;
        let redis = RedisServer::start();
        let event = |n: u32| {
            format!(
                r#"{{"type":"message","clientId":"c","message":{{"op":0,"d":{{"n":{n}}}}},"portalId":""}}"#
            )
        };
        for (n, id) in [(1, "t:1"), (2, "poison"), (3, "t:3")] {
            let e = event(n);
            redis.command(&["XADD", "portal_q:0", "*", "event_id", id, "event", &e]);
        }
        redis.command(&["XADD", "portal_q:0", "*", "junk", "x"]);
        let mut portal = within(&rt, "the portal starting", portal(&redis, "p1").start())
            .await
            .unwrap();
        let mut poison_deliveries = Vec::new();
        let mut acked = Vec::new();
        within(&rt, "three deliveries of the poison event", async {
            while poison_deliveries.len() < 3 {
                let event = portal.next().await.expect("the portal runs");
                if event.event_id() == "poison" {
                    poison_deliveries.push(event.deliveries());
                    event.fail();
                } else {
                    acked.push(event.event_id().to_owned());
                    event.ack();
                }
            }
        })
        .await;
        assert_eq!(poison_deliveries, [1, 2, 3]);
        assert_eq!(
            acked,
            ["t:1", "t:3"],
            "the others are handled once, in order"
        );
        within(&rt, "the poison event dead-lettered", async {
            while redis.integer(&["XLEN", "portal_dlq"]) != Some(2) {
                mesa_tests::runtimes::sleep(&rt, Duration::from_millis(20)).await;
            }
        })
        .await;
        let dead = redis.command(&["XRANGE", "portal_dlq", "-", "+"]).unwrap();
        assert!(
            dead.contains("poison") && dead.contains("delivered 3 times"),
            "{dead}"
        );
        assert!(
            dead.contains("junk") && dead.contains("no event_id field"),
            "{dead}"
        );
        assert_eq!(pending_count(&redis, "portal_q:0"), 0);
        portal.close().await.unwrap();
    });
}
