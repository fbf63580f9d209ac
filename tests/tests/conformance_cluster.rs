//! The cluster scenarios of the conformance suite: replication, sync, the Dispatcher
//! and a Portal, each written once over `R: mesa_driver::Runtime` and run on tokio,
//! smol and async-std against a `redis-server` the scenario starts (Redis IO goes
//! through redis-rs on the runtime under test: its tokio runtime, or its smol runtime
//! for smol and async-std). One scenario reaches Redis over TLS (`rediss://`, the
//! test CA trusted through `redis_ca_pem`).

use std::time::Duration;

use mesa_core::{
    Message, PortalChoice, PortalEventKind, Recipients, SyncConfig, TooManyRecipients,
};
use mesa_driver::{
    ClusterConfig, DevAuthenticator, DispatchError, Dispatcher, PortalBuilder, Runtime, Server,
};
use mesa_tests::runtimes::{message, say, signed_in, start, until, within};
use mesa_tests::{RedisServer, conformance};
use serde_json::json;

conformance!(
    replicas_deliver_each_others_sends,
    sync_redelivers_what_was_stored_while_offline,
    a_dispatcher_and_a_portal_reach_this_runtimes_replica,
    a_replica_a_dispatcher_and_a_portal_reach_redis_over_tls,
);

/// A replica on `rt` with development authentication and the relay handler.
fn replica<R: Runtime>(
    rt: &R,
    redis: &RedisServer,
    sync: bool,
    portals: bool,
) -> Server<R, mesa_driver::Relay> {
    replica_of(rt, ClusterConfig::new(redis.url()), sync, portals)
}

/// A replica on `rt` of the cluster `cluster` (its lease and portals set here).
fn replica_of<R: Runtime>(
    rt: &R,
    mut cluster: ClusterConfig,
    sync: bool,
    portals: bool,
) -> Server<R, mesa_driver::Relay> {
    cluster.lease = Duration::from_millis(900);
    cluster.portals = portals.then_some(PortalChoice::RoundRobin);
    let builder = Server::builder(rt.clone())
        .handler(mesa_driver::Relay)
        .authenticate(DevAuthenticator)
        .cluster(cluster);
    let builder = if sync {
        builder.sync(SyncConfig::default())
    } else {
        builder
    };
    builder.build().unwrap()
}

/// Wait until `replicas` replicas listen on the cluster's channel.
async fn settle<R: Runtime>(rt: &R, redis: &RedisServer, replicas: usize) {
    until(rt, "the replicas subscribing", || {
        redis.subscribers("ws") >= replicas
    })
    .await;
}

async fn replicas_deliver_each_others_sends<R: Runtime>(rt: R) {
    let redis = RedisServer::start();
    let (a, b) = (
        replica(&rt, &redis, false, false),
        replica(&rt, &redis, false, false),
    );
    let (addr_a, addr_b) = (start(&rt, &a).await, start(&rt, &b).await);
    let (alice, mut alice_events) = signed_in(&rt, addr_a, "alice").await;
    let (_bob, mut bob_events) = signed_in(&rt, addr_b, "bob").await;
    settle(&rt, &redis, 2).await;

    say(&alice, "BROADCAST", json!({"to": ["bob"], "n": 1})).await;
    assert_eq!(message(&rt, &mut bob_events).await.d["n"], 1);
    say(&alice, "BROADCAST", json!({"n": 2})).await;
    assert_eq!(message(&rt, &mut bob_events).await.d["n"], 2);
    assert_eq!(
        message(&rt, &mut alice_events).await.d["n"],
        2,
        "once, from her replica"
    );
    say(&alice, "ECHO", json!("marker")).await;
    assert_eq!(
        message(&rt, &mut alice_events).await.d,
        json!("marker"),
        "no duplicate"
    );
}

async fn sync_redelivers_what_was_stored_while_offline<R: Runtime>(rt: R) {
    let redis = RedisServer::start();
    let (a, b) = (
        replica(&rt, &redis, true, false),
        replica(&rt, &redis, true, false),
    );
    let (addr_a, addr_b) = (start(&rt, &a).await, start(&rt, &b).await);
    let (alice, _alice_events) = signed_in(&rt, addr_a, "alice").await;
    settle(&rt, &redis, 2).await;
    for n in 0..20 {
        say(&alice, "BROADCAST", json!({"to": ["carol"], "n": n})).await;
    }
    // Carol comes to the other replica and gets all of them, numbered, in order.
    until(&rt, "the 20 messages stored", || {
        redis.stored("undelivered_messages", "carol").len() == 20
    })
    .await;
    let (_carol, mut carol_events) = signed_in(&rt, addr_b, "carol").await;
    for n in 0..20u64 {
        let redelivered = message(&rt, &mut carol_events).await;
        assert_eq!(
            (redelivered.s, redelivered.d["n"].as_u64()),
            (Some(n + 1), Some(n))
        );
    }
}

async fn a_dispatcher_and_a_portal_reach_this_runtimes_replica<R: Runtime>(rt: R) {
    let redis = RedisServer::start();
    let mut portal = within(
        &rt,
        "the portal joining the pool",
        PortalBuilder::new(rt.clone(), redis.url()).start(),
    )
    .await
    .unwrap();
    let server = replica(&rt, &redis, false, true);
    let addr = start(&rt, &server).await;
    let (_dana, mut events) = signed_in(&rt, addr, "dana").await;
    settle(&rt, &redis, 1).await;

    let url = redis.url();
    let dispatcher = within(
        &rt,
        "the dispatcher connecting",
        Dispatcher::builder(&url)
            .sync(false)
            .max_stored(1000)
            .max_recipients(1)
            .connect(),
    )
    .await
    .unwrap();
    // Two ids past a limit of one: refused before Redis sees it, so dana gets only
    // the next dispatch.
    let refused = Message::dispatch("NEWS", json!({"refused": true}));
    let two = Recipients::Ids(vec!["dana".into(), "erin".into()]);
    assert_eq!(
        dispatcher.dispatch(refused, None, two, &[]).await,
        Err(DispatchError::TooManyRecipients(TooManyRecipients {
            count: 2,
            max: 1
        }))
    );
    let news = Message::dispatch("NEWS", json!({"from": "dispatcher"}));
    let to_dana = Recipients::Ids(vec!["dana".into()]);
    within(
        &rt,
        "a dispatch",
        dispatcher.dispatch(news, None, to_dana, &[]),
    )
    .await
    .unwrap();
    assert_eq!(
        message(&rt, &mut events).await.d,
        json!({"from": "dispatcher"})
    );

    let kinds = within(&rt, "the portal's events", async {
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            match portal.next().await {
                Some(event) => kinds.push(event.kind),
                None => panic!("the portal stopped"),
            }
        }
        kinds
    })
    .await;
    assert_eq!(
        kinds,
        [PortalEventKind::Connection, PortalEventKind::Authentication]
    );
}

async fn a_replica_a_dispatcher_and_a_portal_reach_redis_over_tls<R: Runtime>(rt: R) {
    let redis = RedisServer::start_tls();
    let (url, ca) = (redis.tls_url(), redis.ca_pem().to_owned());
    let mut portal = within(
        &rt,
        "the portal joining the pool over TLS",
        PortalBuilder::new(rt.clone(), url.clone())
            .redis_ca_pem(ca.clone())
            .start(),
    )
    .await
    .unwrap();
    let mut cluster = ClusterConfig::new(url.clone());
    cluster.redis_ca_pem = Some(ca.clone().into_bytes());
    let server = replica_of(&rt, cluster, false, true);
    let addr = start(&rt, &server).await;
    let (_erin, mut events) = signed_in(&rt, addr, "erin").await;
    // The replica's presence went through its TLS link (read on the plain port).
    until(&rt, "erin's presence stored over TLS", || {
        redis.integer(&["SISMEMBER", "connected_clients", "erin"]) == Some(1)
    })
    .await;
    settle(&rt, &redis, 1).await;

    let dispatcher = within(
        &rt,
        "the dispatcher connecting over TLS",
        Dispatcher::builder(url.clone()).redis_ca_pem(ca).connect(),
    )
    .await
    .unwrap();
    let news = Message::dispatch("NEWS", json!({"over": "rediss"}));
    let to_erin = Recipients::Ids(vec!["erin".into()]);
    within(
        &rt,
        "a dispatch",
        dispatcher.dispatch(news, None, to_erin, &[]),
    )
    .await
    .unwrap();
    assert_eq!(message(&rt, &mut events).await.d, json!({"over": "rediss"}));
    let authenticated = within(&rt, "the portal's events", async {
        loop {
            match portal.next().await {
                Some(event) if event.kind == PortalEventKind::Authentication => break event,
                Some(_) => {}
                None => panic!("the portal stopped"),
            }
        }
    })
    .await;
    assert_eq!(authenticated.client_id.as_deref(), Some("erin"));

    // Trusting another CA, the link cannot be made: the certificate is checked.
    let other = mesa_tests::pki::TestCa::new("another CA");
    let refused = within(
        &rt,
        "a dispatcher trusting another CA",
        Dispatcher::builder(url).redis_ca_pem(other.pem()).connect(),
    )
    .await;
    assert!(
        matches!(&refused, Err(DispatchError::Redis(reason)) if reason.to_string().contains("UnknownIssuer")),
        "{refused:?}"
    );
}
