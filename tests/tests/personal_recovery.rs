//! Recovery of the sends to ids and of the broadcasts (docs/protocol.md, "Recovery
//! of the sends to ids and of the broadcasts") on a `redis-server` of the test's
//! own, with our Rust client behind a proxy that cuts its TCP connection: a client
//! that drops gets exactly what was sent to its id and to everyone meanwhile, in
//! order, once; what was stored for it while it was connected nowhere comes by the
//! sync, not twice; an old client of the same id gets every message as before,
//! without a position.

use std::net::SocketAddr;
use std::time::Duration;

use mesa_core::Message;
use mesa_tests::ours::{gather, next_event, replicas_linked, serve};
use mesa_tests::proxy::CutProxy;
use mesa_tests::runtimes::{Tokio, next_json, raw_signed_in};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::recovery::{Personal, Position, RecoveryConfig};
use mesa_tokio::{
    Client, ClientEvent, ClientEvents, ClusterConfig, DevAuthenticator, RoomPolicy, Server,
    ServerHandle, SyncConfig,
};
use serde_json::json;

/// The events a test of recovery looks at.
fn kept(event: &ClientEvent) -> bool {
    matches!(
        event,
        ClientEvent::Message(_) | ClientEvent::StreamPosition { .. } | ClientEvent::Resumed { .. }
    )
}

/// A cluster on `redis` whose ids and broadcasts keep streams; leases of 900 ms.
fn streaming(redis: &RedisServer) -> ClusterConfig {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.lease = Duration::from_millis(900);
    cluster.recovery = Some(RecoveryConfig {
        users: true,
        broadcast: true,
        ..RecoveryConfig::default()
    });
    cluster
}

/// A replica of that cluster, with sync (messages stored for ids connected
/// nowhere) and sends to everyone for authenticated connections only (otherwise a
/// reconnecting client may hear a broadcast before it opts in, and is then told its
/// broadcast resume is incomplete); clients reconnect 50 ms after a drop.
fn replica(cluster: ClusterConfig) -> Server {
    mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .auth_required(true)
        .rooms(RoomPolicy::Authenticated)
        .reconnect_interval(Duration::from_millis(50))
        .sync(SyncConfig::default())
        .cluster(cluster)
        .build()
        .unwrap()
}

async fn start(server: &Server) -> SocketAddr {
    serve(server, "127.0.0.1:0".parse().unwrap()).await
}

/// Our client through `proxy`, signed in as `id`; returns where its personal and
/// broadcast streams stood (told after the authentication).
async fn extended(proxy: &CutProxy, id: &str) -> (Client, ClientEvents, Position, Position) {
    let url = format!("ws://{}/", proxy.addr());
    let (client, mut events) = mesa_tokio::client(url).build().unwrap();
    client
        .authenticate(json!({ "token": id }), true)
        .await
        .unwrap();
    let (mut user, mut broadcast) = (None, None);
    while user.is_none() || broadcast.is_none() {
        match next_event(&mut events, "mesa:resumed", is_resumed, WAIT).await {
            ClientEvent::Resumed {
                stream,
                position: Some(position),
                recovered: None,
            } => match stream {
                Personal::User => user = Some(position),
                Personal::Broadcast => broadcast = Some(position),
            },
            other => panic!("a fresh client is told its positions, no recovery: {other:?}"),
        }
    }
    (client, events, user.unwrap(), broadcast.unwrap())
}

fn is_resumed(event: &ClientEvent) -> bool {
    matches!(event, ClientEvent::Resumed { .. })
}

/// Whether `event` is the message numbered `n` of kind `t`.
fn is_message(event: &ClientEvent, t: &str, n: u64) -> bool {
    matches!(event, ClientEvent::Message(m) if m.t.as_deref() == Some(t) && m.d["n"] == n)
}

/// The numbers of the messages of kind `t` among `events`, in order.
fn numbers(events: &[ClientEvent], t: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|event| match event {
            ClientEvent::Message(m) if m.t.as_deref() == Some(t) => m.d["n"].as_u64(),
            _ => None,
        })
        .collect()
}

/// The offsets the positions among `events` gave in stream `kind`, in order.
fn offsets(events: &[ClientEvent], kind: Personal) -> Vec<u64> {
    events
        .iter()
        .filter_map(|event| match event {
            ClientEvent::StreamPosition { stream, position } if *stream == kind => {
                Some(position.offset)
            }
            _ => None,
        })
        .collect()
}

/// What the resumes among `events` said, by stream.
fn resumes(events: &[ClientEvent]) -> Vec<(Personal, Option<bool>)> {
    events
        .iter()
        .filter_map(|event| match event {
            ClientEvent::Resumed {
                stream, recovered, ..
            } => Some((*stream, *recovered)),
            _ => None,
        })
        .collect()
}

fn to_alice(handle: &ServerHandle, n: u64) {
    let message = Message::dispatch("TO_ALICE", json!({ "n": n }));
    handle.send_to(&message, ["alice"], &[]).unwrap();
}

fn to_everyone(handle: &ServerHandle, n: u64) {
    handle.broadcast(&Message::dispatch("TO_ALL", json!({ "n": n })));
}

/// Cut alice's connection several times while messages to her id and to everyone
/// flow from another replica: after each reconnection both streams are told
/// `recovered: true`, and over all the cuts she gets every message once, in order,
/// each at the offset after the last. An old client of alice's on the other
/// replica gets every one of them too, with no position.
#[tokio::test]
async fn an_id_that_drops_gets_exactly_what_was_sent_to_it_and_to_everyone() {
    let redis = RedisServer::start();
    let (a, b) = (replica(streaming(&redis)), replica(streaming(&redis)));
    let sender = b.handle();
    let (addr_a, addr_b) = (start(&a).await, start(&b).await);
    let proxy = CutProxy::start(addr_a).await;
    let (_client, mut events, user_at, all_at) = extended(&proxy, "alice").await;
    let mut old = raw_signed_in(&Tokio, addr_b, "alice").await;
    replicas_linked(&redis, 2).await;

    let (trials, per_phase) = (4, 10);
    let (mut n, mut seen) = (0, Vec::new());
    let phase = |n: &mut u64| {
        for _ in 0..per_phase {
            to_alice(&sender, *n);
            to_everyone(&sender, *n);
            *n += 1;
        }
    };
    for _ in 0..trials {
        phase(&mut n);
        proxy.cut();
        gather(&mut events, &mut seen, "the cut", kept, |e| {
            matches!(e, ClientEvent::Disconnected { .. })
        })
        .await;
        phase(&mut n);
        proxy.resume(addr_a);
        // Both streams answer, in either order.
        gather(&mut events, &mut seen, "the first resume", kept, is_resumed).await;
        gather(
            &mut events,
            &mut seen,
            "the second resume",
            kept,
            is_resumed,
        )
        .await;
        phase(&mut n);
    }
    let last = n - 1;
    gather(&mut events, &mut seen, "the last messages", kept, |e| {
        is_message(e, "TO_ALL", last)
    })
    .await;
    // The last position of each stream follows its message.
    for (kind, from) in [(Personal::User, &user_at), (Personal::Broadcast, &all_at)] {
        let end = from.offset + n;
        if offsets(&seen, kind).last() != Some(&end) {
            gather(&mut events, &mut seen, "the last positions", kept, |e| {
                matches!(e, ClientEvent::StreamPosition { stream, position }
                    if *stream == kind && position.offset == end)
            })
            .await;
        }
    }
    let recovered = resumes(&seen).into_iter().filter(|(_, r)| *r == Some(true));
    assert_eq!(recovered.count(), 2 * trials, "{:?}", resumes(&seen));
    let all: Vec<u64> = (0..n).collect();
    assert_eq!(
        numbers(&seen, "TO_ALICE"),
        all,
        "every send to alice once, in order"
    );
    assert_eq!(
        numbers(&seen, "TO_ALL"),
        all,
        "every broadcast once, in order"
    );
    let contiguous = |from: u64| (from + 1..=from + n).collect::<Vec<_>>();
    assert_eq!(offsets(&seen, Personal::User), contiguous(user_at.offset));
    assert_eq!(
        offsets(&seen, Personal::Broadcast),
        contiguous(all_at.offset)
    );

    // The old client got all of it too, as upstream's clients always did.
    let (mut to_alice_seen, mut to_all_seen) = (Vec::new(), Vec::new());
    while to_alice_seen.len() < n as usize || to_all_seen.len() < n as usize {
        let frame = next_json(&Tokio, &mut old).await;
        assert!(
            frame.get("stream").is_none() && frame.get("offset").is_none(),
            "an old client sees nothing new: {frame}"
        );
        match frame["t"].as_str() {
            Some("TO_ALICE") => to_alice_seen.push(frame["d"]["n"].as_u64().unwrap()),
            Some("TO_ALL") => to_all_seen.push(frame["d"]["n"].as_u64().unwrap()),
            _ => {}
        }
    }
    assert_eq!((to_alice_seen.clone(), to_all_seen), (all.clone(), all));
}

/// Alice connected nowhere for a while: what was sent to her then is stored (the
/// sync) and appended to her stream; when she comes back her complete resume
/// replays it, in order, and the stored copies are taken, not sent again.
#[tokio::test]
async fn what_was_stored_for_an_id_connected_nowhere_comes_once_in_order() {
    let redis = RedisServer::start();
    let (a, b) = (replica(streaming(&redis)), replica(streaming(&redis)));
    let sender = b.handle();
    let (addr_a, _) = (start(&a).await, start(&b).await);
    let proxy = CutProxy::start(addr_a).await;
    let (_client, mut events, _, _) = extended(&proxy, "alice").await;
    replicas_linked(&redis, 2).await;
    to_alice(&sender, 0);
    let mut seen = Vec::new();
    gather(&mut events, &mut seen, "message 0", kept, |e| {
        is_message(e, "TO_ALICE", 0)
    })
    .await;

    proxy.cut();
    gather(&mut events, &mut seen, "the cut", kept, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    // Until her replica saw the connection close, she counts as connected.
    mesa_tests::ours::eventually("alice left", WAIT, || async {
        redis.integer(&["SISMEMBER", "connected_clients", "alice"]) == Some(0)
    })
    .await;
    for n in 1..=5 {
        to_alice(&sender, n);
    }
    mesa_tests::ours::eventually("the messages stored", WAIT, || async {
        redis.integer(&["HEXISTS", "undelivered_messages", "alice"]) == Some(1)
    })
    .await;
    proxy.resume(addr_a);
    gather(&mut events, &mut seen, "the resume", kept, |e| {
        matches!(
            e,
            ClientEvent::Resumed {
                stream: Personal::User,
                ..
            }
        )
    })
    .await;
    mesa_tests::ours::eventually("the stored copies taken", WAIT, || async {
        redis.integer(&["HEXISTS", "undelivered_messages", "alice"]) == Some(0)
    })
    .await;
    let user_resumes: Vec<_> = resumes(&seen)
        .into_iter()
        .filter(|(stream, _)| *stream == Personal::User)
        .collect();
    assert_eq!(user_resumes, [(Personal::User, Some(true))]);
    // Live again: a send reaches her once more through her stream.
    to_alice(&sender, 6);
    gather(&mut events, &mut seen, "message 6", kept, |e| {
        is_message(e, "TO_ALICE", 6)
    })
    .await;
    assert_eq!(numbers(&seen, "TO_ALICE"), (0..=6).collect::<Vec<_>>());
}

/// Send `value` as a text frame.
async fn send_json(ws: &mut mesa_tests::runtimes::Raw<Tokio>, value: serde_json::Value) {
    let frame = async_tungstenite::tungstenite::Message::text(value.to_string());
    ws.send(frame).await.expect("a frame sent");
}

/// The next `mesa:resumed` of the broadcast stream on a raw connection, skipping
/// other frames.
async fn broadcast_resumed(ws: &mut mesa_tests::runtimes::Raw<Tokio>) -> serde_json::Value {
    loop {
        let frame = next_json(&Tokio, ws).await;
        if frame["t"] == "mesa:resumed" && frame["d"]["stream"] == "broadcast" {
            return frame["d"].clone();
        }
    }
}

/// On a server that lets unauthenticated connections hear broadcasts, a client
/// that heard one the legacy way before it opted in would get it again from a
/// replay: its broadcast resume is told `recovered: false` instead, with nothing
/// replayed.
#[tokio::test]
async fn a_broadcast_heard_before_the_opt_in_is_never_replayed() {
    let redis = RedisServer::start();
    let server = mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .rooms(RoomPolicy::Authenticated)
        .cluster(streaming(&redis))
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = start(&server).await;
    replicas_linked(&redis, 1).await;
    let opt_in = |since: Option<serde_json::Value>| {
        let mut mesa = json!({"caps": ["rooms"]});
        if let Some(since) = since {
            mesa["since"] = json!({ "broadcast": since });
        }
        json!({"op": 2, "d": {"token": "alice", "mesa": mesa}})
    };
    // Where the broadcast stream stands, after one broadcast.
    to_everyone(&handle, 0);
    let mut first = mesa_tests::runtimes::raw(&Tokio, addr).await;
    next_json(&Tokio, &mut first).await;
    send_json(&mut first, opt_in(None)).await;
    let at = broadcast_resumed(&mut first).await;
    let since = json!({"epoch": at["epoch"], "offset": at["offset"]});

    // A second connection hears broadcast 1 before it opts in, plainly.
    let mut second = mesa_tests::runtimes::raw(&Tokio, addr).await;
    next_json(&Tokio, &mut second).await;
    to_everyone(&handle, 1);
    let heard = next_json(&Tokio, &mut second).await;
    assert_eq!(
        (heard["t"].clone(), heard.get("stream")),
        (json!("TO_ALL"), None)
    );
    send_json(&mut second, opt_in(Some(since))).await;
    let resumed = broadcast_resumed(&mut second).await;
    assert_eq!(resumed["recovered"], false, "{resumed}");
    // Live again: the next broadcast comes from the stream, after broadcast 1.
    to_everyone(&handle, 2);
    loop {
        let frame = next_json(&Tokio, &mut second).await;
        if frame["t"] == "TO_ALL" {
            assert_eq!(frame["d"]["n"], 2, "nothing replayed: {frame}");
            assert_eq!(frame["stream"], "broadcast");
            assert_eq!(frame["offset"], resumed["offset"].as_u64().unwrap() + 1);
            break;
        }
    }
}
