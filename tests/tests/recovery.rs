//! Recovery by position (docs/protocol.md, "Recovery") on a `redis-server` of the
//! test's own, with our Rust client behind a proxy that cuts its TCP connection:
//! a client that drops gets exactly what it missed, in order, once; after its
//! replica is killed too; a gap the stream no longer holds is told as
//! `recovered: false`, never replayed in part; an old client in the same room never
//! sees a position.

use std::net::SocketAddr;
use std::time::Duration;

use mesa_core::Message;
use mesa_tests::ours::{Crashable, gather, next_event, replicas_linked, sample, serve};
use mesa_tests::process::MesaServe;
use mesa_tests::proxy::CutProxy;
use mesa_tests::runtimes::{Tokio, next_json, raw};
use mesa_tests::{RedisServer, WAIT};
use mesa_tokio::metrics::Metrics;
use mesa_tokio::recovery::{Personal, Position, RecoveryConfig};
use mesa_tokio::{
    Client, ClientEvent, ClientEvents, ClusterConfig, DevAuthenticator, Dispatcher, RoomPolicy,
    Server, ServerHandle,
};
use serde_json::{Value, json};

const ROOM: &str = "chat:1";

/// The events a test of recovery looks at.
fn kept(event: &ClientEvent) -> bool {
    matches!(
        event,
        ClientEvent::Subscribed { .. } | ClientEvent::RoomMessage { .. }
    )
}

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
        kept,
        |e| matches!(e, ClientEvent::RoomMessage { message, .. } if message.d["n"] == last),
    )
    .await;
    seen
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
    replicas_linked(&redis, 2).await;

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
        gather(&mut events, &mut seen, "the cut", kept, |e| {
            matches!(e, ClientEvent::Disconnected { .. })
        })
        .await;
        for _ in 0..per_phase {
            publish(&publisher, n);
            n += 1;
        }
        proxy.resume(addr_a);
        gather(&mut events, &mut seen, "the resume", kept, |e| {
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
        kept,
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
    replicas_linked(&redis, 2).await;
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
    gather(&mut events, &mut after, "the resume", kept, |e| {
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
    replicas_linked(&redis, 1).await;
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
    replicas_linked(&redis, 1).await;
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
    replicas_linked(&redis, 1).await;
    let proxy = CutProxy::start(addr).await;
    let (_client, mut events, before) = member(&proxy, "alice").await;
    publish(&handle, 0);
    collect(&mut events, 0).await;

    redis.restart();
    replicas_linked(&redis, 1).await;
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

// --- Trials (run explicitly) ---------------------------------------------------------
//
// The figures: a client subscribed to 3 recoverable rooms while messages flow
// to them and to its id (whose sends keep a stream too) at a fixed rate, its TCP
// connection cut for a while at each trial. Run with
//
//   RECOVERY_TRIALS=100 RECOVERY_CUT_MS=2000 cargo test -p mesa-tests --release \
//     --test recovery -- --ignored --nocapture trials_
//
// (RECOVERY_RATE messages per second, 100 by default; RECOVERY_GAP_SIZE the stream's
// size in the gap trials, 5 by default). Each prints one line of figures. The
// `kill -9` trials run `mesa serve` processes: `cargo build -p mesa-cli --release`
// first.

/// How long a trial waits for its resumes after the proxy reopens: beyond the
/// client's backoff cap (30 s).
const RESUME_WAIT: Duration = Duration::from_secs(45);

/// The rooms of the trials, all recoverable (`chat:*`).
const TRIAL_ROOMS: [&str; 3] = ["chat:a", "chat:b", "chat:c"];

/// What a trial follows: the rooms, then the stream of the client's id (`alice`),
/// each by the name its stream has in Redis.
const TRIAL_STREAMS: [&str; 4] = ["chat:a", "chat:b", "chat:c", "~user:alice"];

/// The trials' settings, from the environment: few and short unless told.
struct Trials {
    /// How many cuts.
    count: usize,
    /// How long each cut lasts.
    cut: Duration,
    /// Messages per second, over the 3 rooms and the client's id in turn.
    rate: u64,
    /// The stream's size in the gap trials.
    gap_size: usize,
}

impl Trials {
    fn from_env() -> Self {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(default)
        };
        Trials {
            count: var("RECOVERY_TRIALS", 3) as usize,
            cut: Duration::from_millis(var("RECOVERY_CUT_MS", 500)),
            rate: var("RECOVERY_RATE", 100).max(1),
            gap_size: var("RECOVERY_GAP_SIZE", 5) as usize,
        }
    }
}

/// What each resume of a trial must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `recovered: true`, everything missed replayed before it.
    Recovered,
    /// `recovered: false`, nothing replayed (the gap is beyond the stream).
    Gap,
}

/// What the client received in one room since the start.
#[derive(Debug, Default)]
struct RoomTrack {
    /// The offset of the last message received (or the position a resume told).
    last: u64,
    /// Messages received since the last disconnection.
    since_cut: u64,
    /// Offsets skipped (ahead of the next expected) since the last disconnection.
    skipped_since_cut: u64,
    /// The last offset at the last disconnection.
    at_cut: u64,
    /// Messages received at all.
    received: u64,
    /// Whether the room's resume was answered in the current trial.
    answered: bool,
}

/// The counts of one trial (and, summed, of all).
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    /// Answers to the resumes.
    resumes: u64,
    /// Of which `recovered: true`.
    recovered: u64,
    /// Of which `recovered: false`.
    not_recovered: u64,
    /// Answers with `recovered: true` whose position was not the last offset
    /// received (a replay that did not reach it).
    wrong_position: u64,
    /// Messages delivered after the cut and before a `recovered: false` (a
    /// partial replay, or a live message ahead of the answer).
    partial: u64,
    /// Messages received twice, or after a later one.
    out_of_order: u64,
    /// Messages skipped (an offset ahead of the next expected) outside a told gap.
    missing: u64,
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.resumes += other.resumes;
        self.recovered += other.recovered;
        self.not_recovered += other.not_recovered;
        self.wrong_position += other.wrong_position;
        self.partial += other.partial;
        self.out_of_order += other.out_of_order;
        self.missing += other.missing;
    }

    /// Whether the trial went as `expect` says, for the 3 rooms and the id.
    fn ok(&self, expect: Expect) -> bool {
        let rooms = TRIAL_STREAMS.len() as u64;
        let told = match expect {
            Expect::Recovered => self.recovered == rooms && self.wrong_position == 0,
            Expect::Gap => self.not_recovered == rooms && self.partial == 0,
        };
        told && self.resumes == rooms && self.out_of_order == 0 && self.missing == 0
    }
}

/// Follows the client's events room by room and counts what a trial checks.
struct Tracker {
    rooms: Vec<RoomTrack>,
    trial: Outcome,
    /// What went against a `recovered: false`, told in the figures' line.
    told: Vec<String>,
}

impl Tracker {
    /// The positions the first subscribes answered.
    fn new(starts: &[u64]) -> Self {
        let rooms = starts
            .iter()
            .map(|&last| RoomTrack {
                last,
                ..RoomTrack::default()
            })
            .collect();
        Tracker {
            rooms,
            trial: Outcome::default(),
            told: Vec::new(),
        }
    }

    fn room(&mut self, room: &str) -> &mut RoomTrack {
        let index = TRIAL_STREAMS
            .iter()
            .position(|r| *r == room)
            .unwrap_or_else(|| panic!("a message of another room: {room}"));
        &mut self.rooms[index]
    }

    /// Count one event: the id's stream as a room.
    fn see(&mut self, event: &ClientEvent) {
        let id_stream = TRIAL_STREAMS[3].to_owned();
        let event = match event {
            ClientEvent::StreamPosition {
                stream: Personal::User,
                position,
            } => &ClientEvent::RoomMessage {
                room: id_stream,
                message: Message::dispatch("N", json!({})),
                position: Some(position.clone()),
            },
            ClientEvent::Resumed {
                stream: Personal::User,
                position,
                recovered,
            } => &ClientEvent::Subscribed {
                room: id_stream,
                reference: None,
                position: position.clone(),
                recovered: *recovered,
            },
            event => event,
        };
        match event {
            ClientEvent::RoomMessage { room, position, .. } => {
                let offset = position.as_ref().expect("a position").offset;
                let track = self.room(room);
                track.received += 1;
                track.since_cut += 1;
                let last = track.last;
                if offset <= last {
                    self.trial.out_of_order += 1;
                } else {
                    let track = self.room(room);
                    track.last = offset;
                    track.skipped_since_cut += offset - last - 1;
                    self.trial.missing += offset - last - 1;
                }
            }
            ClientEvent::Subscribed {
                room,
                position,
                recovered,
                ..
            } => {
                let offset = position.as_ref().expect("a position").offset;
                let track = self.room(room);
                track.answered = true;
                let (last, replayed, skipped, at_cut) = (
                    track.last,
                    track.since_cut,
                    track.skipped_since_cut,
                    track.at_cut,
                );
                self.trial.resumes += 1;
                match recovered {
                    Some(true) => {
                        self.trial.recovered += 1;
                        if offset != last {
                            self.trial.wrong_position += 1;
                        }
                    }
                    _ => {
                        self.trial.not_recovered += 1;
                        self.trial.partial += replayed;
                        // A message delivered ahead of the answer skipped part of
                        // the gap the answer tells: counted as delivered before it,
                        // not as missing.
                        self.trial.missing -= skipped;
                        if replayed > 0 {
                            self.told.push(format!(
                                "{room}: {replayed} delivered before recovered false, the \
                                 last at offset {last} (at the cut {at_cut}, the answer {offset})"
                            ));
                        }
                        // Live messages go on from the position told.
                        self.room(room).last = offset;
                    }
                }
            }
            // What arrives from here on came over the next connection (the events
            // of the one cut may still be queued when the trial's cut is counted).
            ClientEvent::Disconnected { .. } => {
                for track in &mut self.rooms {
                    track.since_cut = 0;
                    track.skipped_since_cut = 0;
                    track.at_cut = track.last;
                }
            }
            _ => {}
        }
    }

    /// A cut: a new trial starts.
    fn cut(&mut self) -> Outcome {
        for track in &mut self.rooms {
            track.answered = false;
        }
        std::mem::take(&mut self.trial)
    }

    fn all_answered(&self) -> bool {
        self.rooms.iter().all(|track| track.answered)
    }
}

/// Count events until `done` holds of the tracker or of an event (each event
/// awaited at most `wait`).
async fn pump(
    events: &mut ClientEvents,
    tracker: &mut Tracker,
    what: &str,
    wait: Duration,
    mut done: impl FnMut(&Tracker, &ClientEvent) -> bool,
) {
    loop {
        let event = next_event(events, what, |_| true, wait).await;
        tracker.see(&event);
        if done(tracker, &event) {
            return;
        }
    }
}

/// Publish to the trial rooms and send to `alice` in turn, `rate` a second, from
/// `handle` until `stop`.
fn publish_at_rate(
    handle: ServerHandle,
    rate: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut n = 0;
        while !*stop.borrow() {
            tick.tick().await;
            let message = Message::dispatch("N", json!({ "n": n }));
            match TRIAL_ROOMS.get((n % 4) as usize) {
                Some(room) => drop(handle.publish(room, &message).unwrap()),
                None => drop(handle.send_to(&message, ["alice"], &[]).unwrap()),
            }
            n += 1;
        }
        n
    })
}

/// Our client through `proxy`, signed in as alice and subscribed to the trial rooms;
/// the positions answered (the rooms', then the id's stream's).
async fn trial_member(proxy: &CutProxy) -> (Client, ClientEvents, Vec<u64>) {
    let url = format!("ws://{}/", proxy.addr());
    let (client, mut events) = mesa_tokio::client(url).build().unwrap();
    client
        .authenticate(json!({ "token": "alice" }), false)
        .await
        .unwrap();
    let id_start = match next_event(&mut events, "mesa:resumed", is_resumed, WAIT).await {
        ClientEvent::Resumed {
            position: Some(position),
            ..
        } => position.offset,
        other => panic!("a fresh client is told where its id's stream stands: {other:?}"),
    };
    let mut starts = Vec::new();
    for room in TRIAL_ROOMS {
        client.subscribe(room).await.unwrap();
        match subscribed(&mut events).await {
            (Some(position), None) => starts.push(position.offset),
            other => panic!("a fresh subscribe answers a position: {other:?}"),
        }
    }
    starts.push(id_start);
    (client, events, starts)
}

fn is_resumed(event: &ClientEvent) -> bool {
    matches!(event, ClientEvent::Resumed { .. })
}

/// [`recovering`], and each id's sends keep a stream too.
fn recovering_ids(redis: &RedisServer, size: usize) -> ClusterConfig {
    let mut cluster = recovering(redis, size);
    if let Some(recovery) = cluster.recovery.as_mut() {
        recovery.users = true;
    }
    cluster
}

/// What happens to the client's replica at each cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// It runs on; the client comes back to it.
    Kept,
    /// It is dropped with its runtime, in the test's process ([`Crashable`]); the
    /// client comes back to another.
    Crashed,
    /// It is a `mesa serve` process, killed with `SIGKILL`; the client comes back
    /// to another.
    Killed,
}

/// Where the client goes back after each cut, and what happens to its replica.
enum Hosts {
    /// The same replica every time (kept running by `_server`).
    One { addr: SocketAddr, _server: Server },
    /// Its replica is crashed at each cut; it comes back to a spare, and a new spare
    /// starts.
    Crashed {
        current: Crashable,
        spare: Crashable,
        cluster: Box<ClusterConfig>,
    },
    /// The same with `mesa serve` processes (`args`), killed with `SIGKILL`.
    Killed {
        current: MesaServe,
        spare: MesaServe,
        args: Vec<String>,
    },
}

impl Hosts {
    /// The client's replica and its spare, on `redis` with streams of `size`.
    async fn start(fate: Fate, redis: &RedisServer, size: usize) -> Hosts {
        let cluster = recovering_ids(redis, size);
        match fate {
            Fate::Kept => {
                let server = replica(cluster);
                Hosts::One {
                    addr: start(&server).await,
                    _server: server,
                }
            }
            Fate::Crashed => {
                let (a, b) = (cluster.clone(), cluster.clone());
                Hosts::Crashed {
                    current: Crashable::start(move || replica(a)),
                    spare: Crashable::start(move || replica(b)),
                    cluster: Box::new(cluster),
                }
            }
            Fate::Killed => {
                let args = serve_args(redis, size);
                let (current, spare) = tokio::task::block_in_place(|| {
                    (MesaServe::start(&args), MesaServe::start(&args))
                });
                Hosts::Killed {
                    current,
                    spare,
                    args,
                }
            }
        }
    }

    /// Where the client is now.
    fn addr(&self) -> SocketAddr {
        match self {
            Hosts::One { addr, .. } => *addr,
            Hosts::Crashed { current, .. } => current.addr(),
            Hosts::Killed { current, .. } => current.addr(),
        }
    }

    /// The cut: the client's replica goes (unless it is kept), a spare takes its
    /// place and a new spare starts. Returns where the client goes back.
    fn cut(&mut self) -> SocketAddr {
        match self {
            Hosts::One { .. } => {}
            Hosts::Crashed {
                current,
                spare,
                cluster,
            } => {
                let fresh = ClusterConfig::clone(cluster);
                let next = Crashable::start(move || replica(fresh));
                std::mem::replace(current, std::mem::replace(spare, next)).crash();
            }
            Hosts::Killed {
                current,
                spare,
                args,
            } => {
                // The process's start blocks this worker (it waits for the URL).
                let next = tokio::task::block_in_place(|| MesaServe::start(args));
                drop(std::mem::replace(current, std::mem::replace(spare, next)));
            }
        }
        self.addr()
    }
}

/// The arguments of a `mesa serve` replica like [`replica`] on
/// [`recovering_ids`]`(redis, size)`.
fn serve_args(redis: &RedisServer, size: usize) -> Vec<String> {
    let args = [
        "--auth",
        "dev",
        "--rooms",
        "authenticated",
        "--reconnect-interval",
        "50",
        "--redis",
        &redis.url(),
        "--lease",
        "900",
        "--recover-rooms",
        "chat:*",
        "--recovery-size",
        &size.to_string(),
        "--recover-users",
    ];
    args.iter().map(|arg| arg.to_string()).collect()
}

/// Run the trials: `expect` of every resume, streams of `size` messages, the
/// client's replica treated as `fate` says at each cut. Prints the figures and
/// asserts every trial went as expected.
async fn run_trials(name: &str, expect: Expect, size: usize, fate: Fate) {
    let settings = Trials::from_env();
    let redis = RedisServer::start();
    let publisher = replica(recovering_ids(&redis, size));
    start(&publisher).await;
    let mut hosts = Hosts::start(fate, &redis, size).await;
    let first = hosts.addr();
    replicas_linked(&redis, if fate == Fate::Kept { 2 } else { 3 }).await;
    let proxy = CutProxy::start(first).await;
    let (_client, mut events, starts) = trial_member(&proxy).await;
    let mut tracker = Tracker::new(&starts);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publishing = publish_at_rate(publisher.handle(), settings.rate, stopped);

    let started = std::time::Instant::now();
    let (mut total, mut ok, mut resume_ms) = (Outcome::default(), 0, Vec::new());
    for trial in 0..settings.count {
        // Messages flow to every room before the cut.
        let floor: Vec<u64> = tracker.rooms.iter().map(|t| t.received + 3).collect();
        pump(
            &mut events,
            &mut tracker,
            "messages before the cut",
            WAIT,
            |t, _| t.rooms.iter().zip(&floor).all(|(t, f)| t.received >= *f),
        )
        .await;
        proxy.cut();
        // What came since the previous cut: that trial's resumes and what followed
        // (before the first cut: the messages before any).
        let outcome = tracker.cut();
        if trial > 0 {
            ok += usize::from(outcome.ok(expect));
        }
        total.add(outcome);
        let target = hosts.cut();
        pump(&mut events, &mut tracker, "the cut", WAIT, |_, e| {
            matches!(e, ClientEvent::Disconnected { .. })
        })
        .await;
        // The load's fixed duration: the client stays cut off while messages flow.
        tokio::time::sleep(settings.cut).await;
        proxy.resume(target);
        let resumed = std::time::Instant::now();
        // The client's backoff (its cap 30 s) grows over the failed attempts
        // during the cut and may not be reset by the short connections between.
        pump(
            &mut events,
            &mut tracker,
            "the resumes",
            RESUME_WAIT,
            |t, _| t.all_answered(),
        )
        .await;
        resume_ms.push(resumed.elapsed().as_millis() as u64);
    }
    // The last trial ends once every message published reached the client.
    let _ = stop.send(true);
    let published = publishing.await.unwrap();
    let appended = || -> Vec<u64> {
        TRIAL_STREAMS
            .iter()
            .map(|room| {
                let key = format!("mesa_stream_meta:{room}");
                // A bulk string: `$3\r\n199\r\n`.
                let reply = redis.command(&["HGET", &key, "s"]).unwrap_or_default();
                reply
                    .lines()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    };
    let start_sum: u64 = starts.iter().sum();
    let deadline = std::time::Instant::now() + WAIT;
    while appended().iter().sum::<u64>() - start_sum < published
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lasts = appended();
    // Publishes the publishing replica never appended (none expected).
    let unappended = published.saturating_sub(lasts.iter().sum::<u64>() - start_sum);
    pump(
        &mut events,
        &mut tracker,
        "every message published",
        WAIT,
        |t, _| t.rooms.iter().zip(&lasts).all(|(t, last)| t.last >= *last),
    )
    .await;
    let outcome = tracker.cut();
    ok += usize::from(outcome.ok(expect));
    total.add(outcome);
    let received: u64 = tracker.rooms.iter().map(|t| t.received).sum();
    resume_ms.sort_unstable();
    let median = resume_ms.get(resume_ms.len() / 2).copied().unwrap_or(0);
    let max = resume_ms.last().copied().unwrap_or(0);
    println!(
        "{name}: {ok}/{} trials as expected ({expect:?}); cut {} ms each, {} messages/s over \
         3 rooms and the id, streams of {size}; {published} published ({unappended} never appended), \
         {received} received; resumes: {} \
         answered, {} recovered true, {} recovered false, {} at a wrong position; {} replayed \
         before a recovered false, {} duplicated or out of order, {} missing; resume after the \
         proxy reopened: median {median} ms, max {max} ms; {:.1} s",
        settings.count,
        settings.cut.as_millis(),
        settings.rate,
        total.resumes,
        total.recovered,
        total.not_recovered,
        total.wrong_position,
        total.partial,
        total.out_of_order,
        total.missing,
        started.elapsed().as_secs_f64(),
    );
    for told in tracker.told.iter().take(10) {
        println!("{name}: {told}");
    }
    assert_eq!(ok, settings.count, "every trial as expected: {total:?}");
}

/// Cut the client's connection at each trial while messages flow: every resume
/// answered `recovered: true`, every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "trials for the figures: run explicitly (see the comment above)"]
async fn trials_cut_connection() {
    run_trials("cut", Expect::Recovered, 100_000, Fate::Kept).await;
}

/// The same with the client's replica crashed at each cut (its runtime dropped in
/// the test's process): it resumes on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "trials for the figures: run explicitly (see the comment above)"]
async fn trials_replica_killed() {
    run_trials("killed", Expect::Recovered, 100_000, Fate::Crashed).await;
}

/// The same with the client's replica a `mesa serve` process, killed with
/// `SIGKILL` at each cut (build the `mesa` binary of the same profile first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "trials for the figures: run explicitly (see the comment above)"]
async fn trials_replica_process_killed() {
    run_trials("kill -9", Expect::Recovered, 100_000, Fate::Killed).await;
}

/// Cuts longer than the stream keeps: every resume answered `recovered: false`,
/// nothing of the gap replayed, live messages in order after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "trials for the figures: run explicitly (see the comment above)"]
async fn trials_gap_beyond_the_stream() {
    let size = Trials::from_env().gap_size;
    run_trials("gap", Expect::Gap, size, Fate::Kept).await;
}
