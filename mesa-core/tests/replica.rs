//! One test per decision of the cluster's state machine, [`Replica`]: presence,
//! the lease and the janitor, portals, trims, loads, what survives an outage, our
//! own envelopes, op 5, rounds of sends, bounds, timeouts and retiring.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mesa_core::cluster::{IDS_PER_COMMAND, IDS_PER_ROUND};
use mesa_core::{
    Action, Call, Close, CloseCode, Command, ConnId, DurablePortals, Envelope, EventInterest,
    LocalDelivery, Loss, Message, Opcode, PortalChoice, PortalEvent, PortalEventKind, PortalUpdate,
    QueuedPortalEvent, Recipients, RedisValue, Replica, ReplicaConfig, ReplicaEvent, SessionEvent,
    StoreWait, Token, portal_partition,
};
use serde_json::{Value, json};

/// The one clock read of these tests; every other instant is an offset from it.
fn t0() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[derive(Default, Debug)]
struct Out {
    commands: Vec<(Token, Command)>,
    deliveries: Vec<LocalDelivery>,
    events: Vec<ReplicaEvent>,
}

impl Out {
    fn kinds(&self) -> Vec<&'static str> {
        self.commands.iter().map(|(_, c)| kind(c)).collect()
    }

    fn find(&self, name: &str) -> Vec<&(Token, Command)> {
        self.commands
            .iter()
            .filter(|(_, c)| kind(c) == name)
            .collect()
    }
}

fn kind(command: &Command) -> &'static str {
    match command {
        Command::Connect => "Connect",
        Command::Ping => "Ping",
        Command::Subscribe { .. } => "Subscribe",
        Command::Unsubscribe { .. } => "Unsubscribe",
        Command::Rooms { .. } => "Rooms",
        Command::RoomMembers { .. } => "RoomMembers",
        Command::LoadPortals => "LoadPortals",
        Command::Publish { .. } => "Publish",
        Command::Enqueue { .. } => "Enqueue",
        Command::Route { .. } => "Route",
        Command::CheckPresence { .. } => "CheckPresence",
        Command::StoreMany { .. } => "StoreMany",
        Command::Load { .. } => "Load",
        Command::Trim { .. } => "Trim",
        Command::Clear { .. } => "Clear",
        Command::Arrive { .. } => "Arrive",
        Command::Leave { .. } => "Leave",
        Command::ConnectionsDelta { .. } => "ConnectionsDelta",
        Command::Renew { .. } => "Renew",
        Command::Janitor { .. } => "Janitor",
        Command::StreamPublish { .. } => "StreamPublish",
        Command::StreamRead { .. } => "StreamRead",
    }
}

fn drain(replica: &mut Replica) -> Out {
    let mut out = Out::default();
    while let Some(d) = replica.poll_delivery() {
        out.deliveries.push(d);
    }
    while let Some(c) = replica.poll_command() {
        out.commands.push(c);
    }
    while let Some(e) = replica.poll_event() {
        out.events.push(e);
    }
    out
}

/// An answer of the right shape for a command that needs no particular one.
fn ok(command: &Command) -> Vec<RedisValue> {
    match command {
        Command::LoadPortals => vec![RedisValue::Array(Vec::new())],
        Command::Load { .. } => vec![RedisValue::Nil],
        Command::CheckPresence { ids } => {
            vec![RedisValue::Array(vec![RedisValue::Int(0); ids.len()])]
        }
        Command::StoreMany { ids, .. } => vec![RedisValue::Array(vec![
            RedisValue::Int(ids.len() as i64),
            RedisValue::Int(0),
        ])],
        _ => vec![RedisValue::Int(1)],
    }
}

fn config() -> ReplicaConfig {
    ReplicaConfig {
        sync: true,
        ..ReplicaConfig::default()
    }
}

/// A replica whose link is up, its opening commands answered.
fn linked(config: ReplicaConfig) -> Replica {
    let mut replica = Replica::new(config, "me", 7, t0()).unwrap();
    let out = drain(&mut replica);
    assert_eq!(out.kinds(), ["Connect"]);
    replica.handle_link_up(t0(), 0, "run1");
    answer_all(&mut replica, t0());
    replica
}

/// Answer every command with `ok` until none is left; returns all that were sent.
fn answer_all(replica: &mut Replica, now: Instant) -> Out {
    let mut all = Out::default();
    loop {
        let out = drain(replica);
        if out.commands.is_empty() && out.deliveries.is_empty() && out.events.is_empty() {
            return all;
        }
        for (token, command) in &out.commands {
            replica.handle_reply(now, *token, Ok(ok(command)));
        }
        all.commands.extend(out.commands);
        all.deliveries.extend(out.deliveries);
        all.events.extend(out.events);
    }
}

fn authenticated(id: &str) -> SessionEvent {
    SessionEvent::Authenticated {
        id: id.into(),
        user: json!({}),
        initial: true,
    }
}

fn closed() -> SessionEvent {
    SessionEvent::Closed {
        close: Close::new(CloseCode::NORMAL, ""),
        by_peer: true,
    }
}

fn open_as(replica: &mut Replica, id: &str) -> ConnId {
    let conn = replica.handle_connection_opened(t0());
    replica.handle_session_event(t0(), conn, &authenticated(id));
    conn
}

/// A replica forwarding to portals whose link is opening (its Connect drained).
fn opening_with_portals() -> Replica {
    let config = ReplicaConfig {
        portals: Some(PortalChoice::RoundRobin),
        ..config()
    };
    let mut replica = Replica::new(config, "me", 7, t0()).unwrap();
    assert_eq!(drain(&mut replica).kinds(), ["Connect"]);
    replica
}

#[test]
fn opening_the_link_cleans_up_then_registers_presence() {
    let mut replica = opening_with_portals();
    assert_eq!(
        replica.channels(0),
        ["ws", "mesa_replica:me", "available_portals_pool"]
    );
    replica.handle_link_up(t0(), 0, "run1");
    let out = drain(&mut replica);
    assert_eq!(out.kinds(), ["LoadPortals", "Janitor", "Renew"]);
    assert_eq!(
        out.events,
        [ReplicaEvent::LinkUp {
            shard: 0,
            all_up: true
        }]
    );
    let Command::Janitor { retire, run_id } = &out.commands[1].1 else {
        panic!()
    };
    assert!(!retire);
    assert_eq!(run_id, "run1");
}

/// With several Redis instances, a link that comes up says whether every one is
/// up now: what a gauge of the link (and a readiness check) follows.
#[test]
fn a_link_up_tells_whether_every_instance_is_linked() {
    let config = ReplicaConfig {
        shards: 2,
        legacy_bus: false,
        ..config()
    };
    let mut replica = Replica::new(config, "me", 7, t0()).unwrap();
    drain(&mut replica);
    let link_ups = |replica: &mut Replica| -> Vec<(usize, bool)> {
        drain(replica)
            .events
            .into_iter()
            .filter_map(|event| match event {
                ReplicaEvent::LinkUp { shard, all_up } => Some((shard, all_up)),
                _ => None,
            })
            .collect()
    };
    replica.handle_link_up(t0(), 1, "run-b");
    assert_eq!(link_ups(&mut replica), [(1, false)]);
    replica.handle_link_up(t0(), 0, "run-a");
    assert_eq!(link_ups(&mut replica), [(0, true)]);
    // Instance 1 fails; instance 0's link comes back meanwhile: not whole.
    replica.handle_link_down(t0(), 1, "connection reset");
    replica.handle_link_down(t0(), 0, "connection reset");
    drain(&mut replica);
    let later = t0() + Duration::from_secs(6);
    replica.handle_timeout(later);
    assert_eq!(drain(&mut replica).kinds(), ["Connect", "Connect"]);
    replica.handle_link_up(later, 0, "run-a");
    assert_eq!(link_ups(&mut replica), [(0, false)]);
}

#[test]
fn presence_arrives_with_the_first_connection_and_leaves_with_the_last() {
    let mut replica = linked(config());
    let a1 = open_as(&mut replica, "alice");
    let out = answer_all(&mut replica, t0());
    assert_eq!(out.kinds(), ["ConnectionsDelta", "Arrive"]);
    let a2 = open_as(&mut replica, "alice");
    assert_eq!(answer_all(&mut replica, t0()).kinds(), ["ConnectionsDelta"]);
    replica.handle_session_event(t0(), a1, &closed());
    assert_eq!(answer_all(&mut replica, t0()).kinds(), ["ConnectionsDelta"]);
    // A re-authentication under another id: the old id leaves, the new one arrives.
    replica.handle_session_event(t0(), a2, &authenticated("al"));
    let out = answer_all(&mut replica, t0());
    assert_eq!(out.kinds(), ["Leave", "Arrive"]);
    assert!(matches!(&out.commands[0].1, Command::Leave { id } if id == "alice"));
    replica.handle_session_event(t0(), a2, &closed());
    let out = answer_all(&mut replica, t0());
    assert_eq!(out.kinds(), ["Leave", "ConnectionsDelta"]);
    assert!(matches!(
        out.commands[1].1,
        Command::ConnectionsDelta { delta: -1 }
    ));
    // A second close of the same connection does nothing.
    replica.handle_session_event(t0(), a2, &closed());
    assert!(answer_all(&mut replica, t0()).commands.is_empty());
}

#[test]
fn presence_off_registers_no_ids() {
    let mut replica = linked(ReplicaConfig {
        presence: false,
        ..config()
    });
    let conn = open_as(&mut replica, "alice");
    assert_eq!(answer_all(&mut replica, t0()).kinds(), ["ConnectionsDelta"]);
    replica.handle_timeout(t0() + Duration::from_secs(4));
    let out = drain(&mut replica);
    let renew = out.find("Renew");
    let Command::Renew {
        ids, connections, ..
    } = &renew[0].1
    else {
        panic!()
    };
    assert!(ids.is_empty());
    assert_eq!(*connections, 1);
    replica.handle_session_event(t0(), conn, &closed());
}

#[test]
fn the_lease_is_renewed_every_third_with_a_ping_and_the_janitor() {
    let mut replica = linked(config());
    open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    let third = Duration::from_secs(10) / 3;
    assert_eq!(replica.poll_timeout(), Some(t0() + third));
    replica.handle_timeout(t0() + third - Duration::from_millis(1));
    assert!(drain(&mut replica).commands.is_empty(), "early: nothing");
    let now = t0() + third;
    replica.handle_timeout(now);
    let out = drain(&mut replica);
    assert_eq!(out.kinds(), ["Ping", "Renew", "Janitor"]);
    let Command::Renew {
        lease_ms,
        connections,
        run_id,
        ids,
    } = &out.commands[1].1
    else {
        panic!()
    };
    assert_eq!(
        (*lease_ms, *connections, run_id.as_str(), ids.as_slice()),
        (10_000, 1, "run1", ["alice".to_string()].as_slice())
    );
    replica.handle_timeout(now);
    assert!(drain(&mut replica).commands.is_empty(), "twice: nothing");
    let later = now + Duration::from_millis(20);
    for (token, command) in &out.commands {
        replica.handle_reply(later, *token, Ok(ok(command)));
    }
    let out = drain(&mut replica);
    assert_eq!(
        out.events,
        [ReplicaEvent::Latency(Duration::from_millis(20))]
    );
    assert_eq!(replica.poll_timeout(), Some(now + third));
}

/// Messages reach a replica's registry (and its lock) only when portals, plain or
/// durable, are on; a hub alone learns ids and room opt-ins only.
#[test]
fn messages_concern_a_replica_only_with_portals() {
    let message = SessionEvent::Message(Message::dispatch("HI", json!({})));
    let load = SessionEvent::LoadUndelivered { id: "a".into() };
    let missed = SessionEvent::HeartbeatMissed { misses: 1 };
    let without = linked(config());
    assert!(!without.event_interest().acts_on(&message));
    let with = |config: ReplicaConfig| linked(config).event_interest().acts_on(&message);
    assert!(with(ReplicaConfig {
        portals: Some(PortalChoice::RoundRobin),
        ..config()
    }));
    assert!(with(ReplicaConfig {
        durable_portals: Some(DurablePortals::default()),
        ..config()
    }));
    for event in [&authenticated("a"), &closed(), &load] {
        assert!(without.event_interest().acts_on(event), "{event:?}");
    }
    assert!(!without.event_interest().acts_on(&missed));
    let hub = EventInterest::HUB;
    assert!(hub.acts_on(&authenticated("a")) && !hub.acts_on(&message) && !hub.acts_on(&load));

    // Told anyway, a replica without portals does nothing with a message.
    let mut replica = linked(config());
    let conn = open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    replica.handle_session_event(t0(), conn, &message);
    assert!(drain(&mut replica).commands.is_empty());
}

#[test]
fn client_events_go_to_one_portal_each_in_turn() {
    let mut replica = linked(ReplicaConfig {
        portals: Some(PortalChoice::RoundRobin),
        ..config()
    });
    // No portal known: nobody is told.
    let conn = replica.handle_connection_opened(t0());
    assert!(answer_all(&mut replica, t0()).find("Publish").is_empty());
    for id in ["p1", "p2"] {
        let update = PortalUpdate {
            id: id.into(),
            ready: true,
        };
        replica.handle_pubsub(t0(), "available_portals_pool", &update.encode());
    }
    let out = drain(&mut replica);
    assert_eq!(
        out.events,
        [
            ReplicaEvent::PortalJoined { id: "p1".into() },
            ReplicaEvent::PortalJoined { id: "p2".into() }
        ]
    );
    replica.handle_session_event(t0(), conn, &authenticated("alice"));
    let message = Message::dispatch("HI", json!({}));
    replica.handle_session_event(t0(), conn, &SessionEvent::Message(message.clone()));
    replica.handle_session_event(t0(), conn, &closed());
    let out = answer_all(&mut replica, t0());
    let events: Vec<PortalEvent> = out
        .find("Publish")
        .into_iter()
        .map(|(_, c)| {
            let Command::Publish { channel, payload } = c else {
                panic!()
            };
            assert_eq!(channel, "portal");
            PortalEvent::decode(payload).unwrap()
        })
        .collect();
    let seen: Vec<(PortalEventKind, Option<&str>, &str)> = events
        .iter()
        .map(|e| (e.kind.clone(), e.client_id.as_deref(), e.portal_id.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (PortalEventKind::Authentication, Some("alice"), "p2"),
            (PortalEventKind::Message(message), Some("alice"), "p1"),
            (PortalEventKind::Disconnection, Some("alice"), "p2"),
        ]
    );
}

#[test]
fn durable_portal_events_go_to_their_clients_partition_and_survive_an_outage() {
    let config = ReplicaConfig {
        durable_portals: Some(DurablePortals {
            partitions: 8,
            maxlen: 500,
        }),
        ..config()
    };
    let mut replica = linked(config);
    let conn = open_as(&mut replica, "alice");
    let out = drain(&mut replica);
    let enqueued: Vec<&Command> = out
        .commands
        .iter()
        .map(|(_, c)| c)
        .filter(|c| matches!(c, Command::Enqueue { .. }))
        .collect();
    // Pub/sub portals are off: durable only, a connection (no id: partition 0),
    // then alice's authentication in her partition, each with its own event id.
    assert_eq!(out.find("Publish").len(), 0);
    let alice = format!("portal_q:{}", portal_partition(Some("alice"), 8));
    let mut event_ids = Vec::new();
    for (command, (stream, kind)) in enqueued.iter().zip([
        ("portal_q:0".to_owned(), "connection"),
        (alice.clone(), "authentication"),
    ]) {
        let Command::Enqueue {
            stream: s,
            maxlen,
            event,
        } = command
        else {
            panic!()
        };
        assert_eq!((s, *maxlen), (&stream, 500));
        let queued = QueuedPortalEvent::decode(event).unwrap();
        assert_eq!(queued.event.portal_id, "");
        assert!(queued.event.encode().contains(kind));
        event_ids.push(queued.event_id);
        let Call::Plain { name, args } = &command.calls(replica.keys())[0] else {
            panic!()
        };
        assert_eq!(
            (*name, &args[..4]),
            (
                "XADD",
                &[stream, "MAXLEN".into(), "~".into(), "500".into()][..]
            )
        );
    }
    assert_eq!(event_ids, ["me:1", "me:2"]);
    // The link fails with the appends unanswered: they are kept and sent again,
    // with the same event ids (a consumer drops the second copy).
    replica.handle_link_down(t0(), 0, "gone");
    replica.handle_session_event(t0(), conn, &closed());
    replica.handle_timeout(t0() + Duration::from_secs(6));
    let reconnect = drain(&mut replica);
    assert!(
        reconnect.kinds().contains(&"Connect"),
        "{:?}",
        reconnect.kinds()
    );
    replica.handle_link_up(t0() + Duration::from_secs(6), 0, "run1");
    let again = answer_all(&mut replica, t0() + Duration::from_secs(6));
    let resent: Vec<String> = again
        .commands
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Enqueue { event, .. } => {
                Some(QueuedPortalEvent::decode(event).unwrap().event_id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        resent,
        ["me:1", "me:2", "me:3"],
        "kept, then the disconnection"
    );
}

#[test]
fn client_events_before_the_first_link_wait_for_it_and_for_the_pool() {
    let mut replica = opening_with_portals();
    // A client connects while the server's link is still opening.
    open_as(&mut replica, "alice");
    let out = drain(&mut replica);
    assert!(out.commands.is_empty() && out.events.is_empty(), "{out:?}");
    replica.handle_link_up(t0(), 0, "run1");
    let out = drain(&mut replica);
    // The pool is read first; the events wait for its answer.
    assert_eq!(out.find("Publish").len(), 0, "{:?}", out.kinds());
    let (load, _) = out.find("LoadPortals")[0].clone();
    replica.handle_reply(
        t0(),
        load,
        Ok(vec![RedisValue::Array(vec![RedisValue::Text("p1".into())])]),
    );
    let out = answer_all(&mut replica, t0());
    let told: Vec<PortalEventKind> = out
        .find("Publish")
        .into_iter()
        .map(|(_, c)| {
            let Command::Publish { payload, .. } = c else {
                panic!()
            };
            PortalEvent::decode(payload).unwrap().kind
        })
        .collect();
    assert_eq!(
        told,
        [PortalEventKind::Connection, PortalEventKind::Authentication]
    );
    // Once the link was up, a failure costs best-effort work as documented.
    replica.handle_link_down(t0(), 0, "gone");
    open_as(&mut replica, "bob");
    let lost = drain(&mut replica).events;
    assert!(
        lost.contains(&ReplicaEvent::JobsLost {
            count: 1,
            reason: Loss::Outage
        }),
        "{lost:?}"
    );
}

/// Connection `conn` asks for its stored messages and Redis answers with `raw`.
fn load(replica: &mut Replica, conn: ConnId, id: &str, raw: &str) -> Vec<Message> {
    let load = SessionEvent::LoadUndelivered { id: id.into() };
    replica.handle_session_event(t0(), conn, &load);
    let out = drain(replica);
    let [(token, Command::Load { .. })] = out.commands.as_slice() else {
        panic!("{:?}", out.commands)
    };
    replica.handle_reply(t0(), *token, Ok(vec![RedisValue::Text(raw.into())]));
    match drain(replica).events.as_slice() {
        [ReplicaEvent::Loaded { messages, .. }] => messages.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_redelivery_trims_through_the_last_entry_it_wrote_or_skipped() {
    let mut replica = linked(config());
    let conn = open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    let done = |delivered, dropped| SessionEvent::Redelivered {
        id: "alice".into(),
        delivered,
        dropped,
    };
    // Nothing loaded here: nothing to trim.
    replica.handle_session_event(t0(), conn, &done(2, 0));
    assert!(drain(&mut replica).commands.is_empty());
    let raw = r#"[{"op":0,"d":{"n":1}},42,{"op":0,"d":{"n":2}},{"op":0,"d":{"n":3}}]"#;
    assert_eq!(load(&mut replica, conn, "alice", raw).len(), 3);
    // The oldest skipped over the cap, the next written: through the second
    // message, which is the third entry (the corrupt one goes with it).
    replica.handle_session_event(t0(), conn, &done(1, 1));
    let out = drain(&mut replica);
    let [(_, Command::Trim { id, count, last })] = out.commands.as_slice() else {
        panic!("{:?}", out.commands)
    };
    assert_eq!(
        (id.as_str(), *count, last.as_str()),
        ("alice", 3, r#"{"op":0,"d":{"n":2}}"#)
    );
    // Nothing written: nothing trimmed.
    let other = open_as(&mut replica, "bob");
    answer_all(&mut replica, t0());
    load(&mut replica, other, "bob", raw);
    replica.handle_session_event(t0(), other, &done(0, 0));
    assert!(drain(&mut replica).commands.is_empty());
}

#[test]
fn a_load_answers_its_connection_and_is_given_up_with_its_session() {
    let mut replica = linked(config());
    let conn = open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    let load = SessionEvent::LoadUndelivered { id: "alice".into() };
    replica.handle_session_event(t0(), conn, &load);
    let out = drain(&mut replica);
    let (token, Command::Load { id }) = &out.commands[0] else {
        panic!()
    };
    assert_eq!(id, "alice");
    let stored = r#"[{"op":0,"d":{"n":1},"t":"A"},42,{"op":0,"d":{"n":2},"t":"A"}]"#;
    replica.handle_reply(t0(), *token, Ok(vec![RedisValue::Text(stored.into())]));
    let out = drain(&mut replica);
    let [
        ReplicaEvent::Loaded {
            conn: c, messages, ..
        },
    ] = out.events.as_slice()
    else {
        panic!("{:?}", out.events)
    };
    assert_eq!((*c, messages.len()), (conn, 2));

    // Asked while the link is down: kept, but only as long as the session waits.
    replica.handle_link_down(t0(), 0, "cut");
    drain(&mut replica);
    replica.handle_session_event(t0(), conn, &load);
    let late = t0() + Duration::from_secs(6);
    replica.handle_timeout(late);
    assert_eq!(drain(&mut replica).kinds(), ["Connect"]);
    replica.handle_link_up(late, 0, "run1");
    assert!(
        drain(&mut replica).find("Load").is_empty(),
        "the session went on without them"
    );
}

#[test]
fn an_outage_keeps_synced_sends_and_loses_best_effort_work_loudly() {
    let mut replica = linked(ReplicaConfig {
        portals: Some(PortalChoice::RoundRobin),
        ..config()
    });
    let update = PortalUpdate {
        id: "p".into(),
        ready: true,
    };
    replica.handle_pubsub(t0(), "available_portals_pool", &update.encode());
    let conn = open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    load(&mut replica, conn, "alice", r#"[{"op":0,"d":{}}]"#);
    // In flight when the link fails: a synced send's check, a trim, a publish.
    let message = Message::dispatch("M", json!({}));
    let to_bob = Recipients::Ids(ids(&["bob"]));
    replica.handle_send(t0(), &message, None, &to_bob).unwrap();
    let trim = SessionEvent::Redelivered {
        id: "alice".into(),
        delivered: 1,
        dropped: 0,
    };
    replica.handle_session_event(t0(), conn, &trim);
    let message2 = Message::dispatch("M2", json!({}));
    replica
        .handle_send(t0(), &message2, None, &Recipients::All)
        .unwrap();
    let out = drain(&mut replica);
    assert_eq!(out.kinds(), ["CheckPresence", "Trim"]);
    replica.handle_link_down(t0(), 0, "reset");
    let out = drain(&mut replica);
    assert_eq!(
        out.events,
        [
            ReplicaEvent::LinkDown {
                shard: 0,
                reason: "reset".into()
            },
            ReplicaEvent::JobsLost {
                count: 1,
                reason: Loss::Outage
            },
        ],
        "the global send, waiting behind the check"
    );
    // While down: a best-effort send is lost at once, presence is forgotten.
    replica
        .handle_send(t0(), &message2, None, &Recipients::All)
        .unwrap();
    open_as(&mut replica, "carol");
    let out = drain(&mut replica);
    assert_eq!(
        out.events,
        [
            ReplicaEvent::JobsLost {
                count: 1,
                reason: Loss::Outage
            },
            ReplicaEvent::JobsLost {
                count: 1,
                reason: Loss::Outage
            },
            ReplicaEvent::JobsLost {
                count: 1,
                reason: Loss::Outage
            },
        ],
        "the send, and the portal events of carol's connection and authentication"
    );
    let at = replica.poll_timeout().unwrap();
    assert!(
        at <= t0() + Duration::from_millis(100),
        "backoff from 100 ms"
    );
    replica.handle_timeout(at);
    assert_eq!(drain(&mut replica).kinds(), ["Connect"]);
    replica.handle_link_up(at, 0, "run2");
    let out = drain(&mut replica);
    assert_eq!(
        out.kinds(),
        ["LoadPortals", "Janitor", "Renew", "Trim", "CheckPresence"]
    );
    let Command::Renew { ids: renewed, .. } = &out.commands[2].1 else {
        panic!()
    };
    assert_eq!(renewed, &ids(&["alice", "carol"]));
}

#[test]
fn envelopes_are_delivered_except_our_own_global_ones() {
    let mut replica = linked(config());
    let conn = open_as(&mut replica, "alice");
    answer_all(&mut replica, t0());
    let envelope = |origin: Option<&str>| Envelope {
        message: Message::dispatch("X", json!({})),
        options: None,
        recipients: Recipients::Ids(ids(&["alice", "bob"])),
        origin: origin.map(str::to_owned),
        streamed: false,
    };
    // Our own global send reached everyone here when it was made.
    let global = Envelope {
        recipients: Recipients::All,
        ..envelope(Some("me"))
    };
    replica.handle_pubsub(t0(), "ws", &global.encode());
    assert!(drain(&mut replica).deliveries.is_empty());
    // Our own list names ids absent here when it was sent: alice connected since.
    for origin in [Some("me"), Some("other"), None] {
        replica.handle_pubsub(t0(), "ws", &envelope(origin).encode());
    }
    let out = drain(&mut replica);
    assert_eq!(out.deliveries.len(), 3);
    assert_eq!(out.deliveries[0].targets, [conn]);
    assert!(out.commands.is_empty(), "an envelope asks nothing of Redis");
    replica.handle_pubsub(t0(), "ws", "not json");
    assert!(matches!(
        drain(&mut replica).events.as_slice(),
        [ReplicaEvent::Undecodable { .. }]
    ));
    // Op 5 DISCONNECT_CLIENT closes; another op 5 is never forwarded.
    let mut disconnect = Message::new(Opcode::Internal, json!({}));
    disconnect.t = Some("DISCONNECT_CLIENT".into());
    let closing = Envelope {
        message: disconnect,
        ..envelope(None)
    };
    replica.handle_pubsub(t0(), "ws", &closing.encode());
    let out = drain(&mut replica);
    assert!(matches!(out.deliveries[0].action, Action::Close(_)));
    let other = Envelope {
        message: Message::new(Opcode::Internal, json!({})),
        ..envelope(None)
    };
    replica.handle_pubsub(t0(), "ws", &other.encode());
    assert!(drain(&mut replica).deliveries.is_empty());
}

#[test]
fn op_5_is_never_stored() {
    let mut replica = linked(config());
    let mut event = Message::new(Opcode::Internal, json!({}));
    event.t = Some("DISCONNECT_CLIENT".into());
    let to = Recipients::Ids(ids(&["offline"]));
    let report = replica.handle_send(t0(), &event, None, &to).unwrap();
    assert!(report.queued);
    let out = drain(&mut replica);
    assert_eq!(
        out.kinds(),
        ["Publish"],
        "published without a presence check"
    );
    let message = Message::dispatch("X", json!({}));
    replica.handle_send(t0(), &message, None, &to).unwrap();
    let out = drain(&mut replica);
    assert!(out.kinds().is_empty(), "one round at a time");
    // An answer nobody waits for is ignored.
    replica.handle_reply(t0(), Token(u64::MAX), Ok(vec![]));
    assert!(drain(&mut replica).events.is_empty());
}

#[test]
fn a_round_checks_stores_for_the_offline_then_publishes_to_the_online() {
    let mut replica = linked(config());
    let message = Message::dispatch("X", json!({"n": 1}));
    let to = Recipients::Ids(ids(&["a", "b", "c", "d", " "]));
    let report = replica.handle_send(t0(), &message, None, &to).unwrap();
    assert_eq!((report.local, report.queued), (0, true));
    let out = drain(&mut replica);
    let [(check, Command::CheckPresence { ids: checked })] = out.commands.as_slice() else {
        panic!("{:?}", out.commands)
    };
    assert_eq!(checked, &ids(&["a", "b", "c", "d", " "]));
    // Meanwhile b connects here.
    let b = open_as(&mut replica, "b");
    answer_all(&mut replica, t0());
    let online = [0, 1, 0, 0, 0].map(RedisValue::Int).to_vec();
    replica.handle_reply(t0(), *check, Ok(vec![RedisValue::Array(online)]));
    let out = drain(&mut replica);
    let [
        (
            store,
            Command::StoreMany {
                ids: offline,
                text,
                cap,
                wait: None,
            },
        ),
    ] = out.commands.as_slice()
    else {
        panic!("{:?}", out.commands)
    };
    assert_eq!(
        (offline, text.as_str(), *cap),
        (
            &ids(&["a", "c", "d"]),
            r#"{"op":0,"d":{"n":1},"t":"X"}"#,
            1000
        )
    );
    // d connected since the check: the store script leaves it out and names it.
    let answer = RedisValue::Array(vec![
        RedisValue::Int(2),
        RedisValue::Int(0),
        RedisValue::Text("d".into()),
    ]);
    replica.handle_reply(t0(), *store, Ok(vec![answer]));
    let out = drain(&mut replica);
    let [(publish, Command::Publish { payload, .. })] = out.commands.as_slice() else {
        panic!("{:?}", out.commands)
    };
    let envelope = Envelope::decode(payload).unwrap();
    assert_eq!(envelope.recipients, Recipients::Ids(ids(&["b", "d"])));
    assert_eq!(envelope.origin.as_deref(), Some("me"));
    replica.handle_reply(t0(), *publish, Ok(vec![RedisValue::Int(1)]));
    let out = drain(&mut replica);
    assert!(
        out.deliveries.is_empty(),
        "b gets it with the envelope, as everyone"
    );
    assert_eq!(
        out.events,
        [
            ReplicaEvent::Stored {
                stored: 2,
                dropped: 0,
                unreplicated: 0
            },
            ReplicaEvent::Undeliverable {
                message,
                ids: ids(&[" "])
            }
        ]
    );
    replica.handle_pubsub(t0(), "ws", payload);
    assert_eq!(drain(&mut replica).deliveries[0].targets, [b]);
}

#[test]
fn a_big_send_goes_in_rounds_in_order_and_rests_after_a_full_one() {
    let mut replica = linked(config());
    let many: Vec<String> = (0..IDS_PER_ROUND + 10).map(|i| format!("u{i}")).collect();
    let first = Message::dispatch("BIG", json!({}));
    let second = Message::dispatch("SMALL", json!({}));
    replica
        .handle_send(t0(), &first, None, &Recipients::Ids(many))
        .unwrap();
    replica
        .handle_send(t0(), &second, None, &Recipients::Ids(ids(&["z"])))
        .unwrap();
    let out = drain(&mut replica);
    assert_eq!(out.kinds().len(), IDS_PER_ROUND / IDS_PER_COMMAND);
    let now = t0() + Duration::from_millis(50);
    for (token, command) in &out.commands {
        replica.handle_reply(now, *token, Ok(ok(command)));
    }
    let out = drain(&mut replica);
    assert!(out.kinds().iter().all(|k| *k == "StoreMany"));
    for (token, command) in &out.commands {
        replica.handle_reply(now, *token, Ok(ok(command)));
    }
    // A full round: the link rests as long as the round took before the next.
    let out = drain(&mut replica);
    assert!(out.commands.is_empty());
    assert_eq!(
        replica.poll_timeout(),
        Some(now + Duration::from_millis(50))
    );
    replica.handle_timeout(now + Duration::from_millis(50));
    let out = drain(&mut replica);
    // The rest of the big send and the small one, in order.
    let checked: Vec<String> = out
        .commands
        .iter()
        .flat_map(|(_, c)| match c {
            Command::CheckPresence { ids } => ids.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(checked.len(), 11);
    assert_eq!(checked.last().map(String::as_str), Some("z"));
}

#[test]
fn the_buffer_is_bounded_and_overflow_is_reported() {
    let mut replica = Replica::new(
        ReplicaConfig {
            max_pending: 2,
            ..config()
        },
        "me",
        1,
        t0(),
    )
    .unwrap();
    drain(&mut replica);
    let message = Message::dispatch("X", json!({}));
    let to = Recipients::Ids(ids(&["a"]));
    let reports: Vec<bool> = (0..3)
        .map(|_| {
            replica
                .handle_send(t0(), &message, None, &to)
                .unwrap()
                .queued
        })
        .collect();
    assert_eq!(reports, [true, true, false]);
    assert_eq!(
        drain(&mut replica).events,
        [ReplicaEvent::JobsLost {
            count: 1,
            reason: Loss::Full
        }]
    );
    assert_eq!(replica.pending(), 2);
    let too_many = Recipients::Ids((0..100_001).map(|i| i.to_string()).collect());
    assert!(
        replica
            .handle_send(t0(), &message, None, &too_many)
            .is_err()
    );
}

#[test]
fn a_silent_redis_fails_the_link_and_a_late_answer_is_ignored() {
    let mut replica = linked(config());
    let message = Message::dispatch("X", json!({}));
    replica
        .handle_send(t0(), &message, None, &Recipients::Ids(ids(&["a"])))
        .unwrap();
    let out = drain(&mut replica);
    let (token, command) = out.commands[0].clone();
    assert_eq!(replica.poll_timeout(), Some(t0() + Duration::from_secs(3)));
    replica.handle_timeout(t0() + Duration::from_secs(3));
    let out = drain(&mut replica);
    assert!(matches!(out.events[0], ReplicaEvent::LinkDown { .. }));
    replica.handle_reply(t0() + Duration::from_secs(4), token, Ok(ok(&command)));
    assert!(drain(&mut replica).events.is_empty(), "a stale answer");
    // An answer of the wrong shape fails the link too.
    let at = replica.poll_timeout().unwrap();
    replica.handle_timeout(at);
    drain(&mut replica);
    replica.handle_link_up(at, 0, "run1");
    let out = drain(&mut replica);
    let (token, _) = out.find("CheckPresence")[0];
    replica.handle_reply(at, *token, Ok(vec![RedisValue::Text("?".into())]));
    assert!(matches!(
        drain(&mut replica).events.as_slice(),
        [ReplicaEvent::LinkDown { reason, .. }] if reason.contains("presence check")
    ));
    // An error reply likewise.
    let at = replica.poll_timeout().unwrap();
    replica.handle_timeout(at);
    drain(&mut replica);
    replica.handle_link_up(at, 0, "run1");
    let out = drain(&mut replica);
    replica.handle_reply(at, out.commands[0].0, Err("OOM".into()));
    assert!(matches!(
        drain(&mut replica).events.as_slice(),
        [ReplicaEvent::LinkDown { reason, .. }] if reason == "Redis: OOM"
    ));
}

#[test]
fn retiring_finishes_the_work_then_gives_up_the_lease() {
    let mut replica = linked(config());
    let message = Message::dispatch("X", json!({}));
    replica
        .handle_send(t0(), &message, None, &Recipients::Ids(ids(&["a"])))
        .unwrap();
    replica.handle_retire(t0());
    let out = answer_all(&mut replica, t0());
    assert_eq!(
        out.kinds(),
        ["CheckPresence", "StoreMany", "Janitor"],
        "the send first"
    );
    assert!(matches!(
        out.commands[2].1,
        Command::Janitor { retire: true, .. }
    ));
    assert!(out.events.contains(&ReplicaEvent::Retired));
    assert!(replica.is_retired());
    assert_eq!(replica.poll_timeout(), None);
    // Without a link there is nothing to give up.
    let mut down = Replica::new(config(), "x", 1, t0()).unwrap();
    drain(&mut down);
    down.handle_retire(t0());
    assert_eq!(drain(&mut down).events, [ReplicaEvent::Retired]);
}

#[test]
fn local_recipients_are_served_at_once_with_one_shared_frame() {
    let mut replica = linked(config());
    let a = open_as(&mut replica, "a");
    let b = open_as(&mut replica, "b");
    answer_all(&mut replica, t0());
    let message = Message::dispatch("X", json!({"v": Value::Null}));
    let report = replica
        .handle_send(t0(), &message, None, &Recipients::Ids(ids(&["a", "b"])))
        .unwrap();
    assert_eq!((report.local, report.queued), (2, false));
    let out = drain(&mut replica);
    assert_eq!(out.deliveries[0].targets, [a, b]);
    assert!(
        out.commands.is_empty(),
        "nobody elsewhere: nothing for Redis"
    );
    // A global send is published for the other replicas as well.
    replica
        .handle_send(t0(), &message, None, &Recipients::All)
        .unwrap();
    let out = drain(&mut replica);
    assert_eq!(out.kinds(), ["Publish"]);
}

#[test]
fn with_the_legacy_bus_off_sends_to_ids_are_routed_and_global_ones_stay_on_ws() {
    let mut replica = linked(ReplicaConfig {
        sync: false,
        legacy_bus: false,
        ..config()
    });
    // More ids than one command carries: one route per chunk, in order.
    let ids: Vec<String> = (0..IDS_PER_COMMAND + 1).map(|i| format!("u{i}")).collect();
    let message = Message::dispatch("HI", json!({}));
    let to = Recipients::Ids(ids.clone());
    replica.handle_send(t0(), &message, None, &to).unwrap();
    replica
        .handle_send(t0(), &message, None, &Recipients::All)
        .unwrap();
    let out = answer_all(&mut replica, t0());
    let routes: Vec<(usize, String)> = out
        .find("Route")
        .into_iter()
        .map(|(_, command)| {
            let Command::Route { ids, head, tail } = command else {
                panic!()
            };
            (ids.len(), format!("{head}{tail}"))
        })
        .collect();
    let halves = r#"{"message":{"op":0,"d":{},"t":"HI"},"recipients":[],"origin":"me"}"#;
    assert_eq!(
        routes,
        [(IDS_PER_COMMAND, halves.to_owned()), (1, halves.to_owned())]
    );
    let published = out.find("Publish");
    let [(_, Command::Publish { channel, payload })] = published.as_slice() else {
        panic!("{published:?}")
    };
    assert_eq!(channel, "ws");
    assert!(payload.contains(r#""recipients":["*"]"#), "{payload}");
    // An envelope routed here is delivered like one on `ws`.
    assert!(replica.channels(0).contains(&"mesa_replica:me".to_owned()));
    let bob = open_as(&mut replica, "bob");
    drain(&mut replica);
    let routed = format!(
        "{}\"bob\"{}",
        r#"{"message":{"op":0,"d":{},"t":"HI"},"recipients":["#, "]}"
    );
    replica.handle_pubsub(t0(), "mesa_replica:me", &routed);
    let out = drain(&mut replica);
    assert_eq!(out.deliveries.len(), 1);
    assert_eq!(out.deliveries[0].targets, [bob]);
}

#[test]
fn routing_by_interest_needs_presence() {
    let config = ReplicaConfig {
        legacy_bus: false,
        presence: false,
        ..config()
    };
    assert_eq!(
        Replica::new(config, "me", 7, t0()).unwrap_err(),
        mesa_core::ConfigError::RoutingWithoutPresence
    );
}

#[test]
fn a_store_too_few_redis_replicas_acknowledged_is_reported_and_never_done_again() {
    let wait = StoreWait {
        replicas: 1,
        timeout: Duration::from_millis(100),
    };
    let mut replica = linked(ReplicaConfig {
        store_wait: Some(wait),
        ..config()
    });
    let message = Message::dispatch("HI", json!({}));
    let mut store_once = |acknowledged: i64| {
        let to_bob = Recipients::Ids(vec!["bob".into()]);
        replica.handle_send(t0(), &message, None, &to_bob).unwrap();
        let out = drain(&mut replica);
        let (check, _) = out.find("CheckPresence")[0];
        let offline = RedisValue::Array(vec![RedisValue::Int(0)]);
        replica.handle_reply(t0(), *check, Ok(vec![offline]));
        let out = drain(&mut replica);
        let (store, command) = out.find("StoreMany")[0];
        let calls = command.calls(replica.keys());
        assert!(matches!(&calls[1], Call::Plain { name: "WAIT", args } if args == &["1", "100"]));
        let stored = RedisValue::Array(vec![RedisValue::Int(1), RedisValue::Int(0)]);
        let waited = RedisValue::Int(acknowledged);
        replica.handle_reply(t0(), *store, Ok(vec![stored, waited]));
        drain(&mut replica)
    };
    let stored = |unreplicated| ReplicaEvent::Stored {
        stored: 1,
        dropped: 0,
        unreplicated,
    };
    assert_eq!(store_once(1).events, [stored(0)]);
    // No Redis replica acknowledged it in time: stored all the same, and said so;
    // nothing is done again (a store is not idempotent) and the link stays.
    let out = store_once(0);
    assert_eq!(out.events, [stored(1)]);
    assert!(out.commands.is_empty() && replica.is_linked());
}

/// A round cut short after Redis answered its appends to the ids' streams is done
/// again without them: appended twice, the message would take a second offset and
/// reach the ids' connections twice. The append whose answer was lost is made again.
#[test]
fn a_send_done_again_does_not_append_again_what_redis_answered() {
    let mut replica = linked(ReplicaConfig {
        recovery: Some(mesa_core::recovery::RecoveryConfig {
            users: true,
            ..mesa_core::recovery::RecoveryConfig::default()
        }),
        ..config()
    });
    let message = Message::dispatch("X", json!({"n": 1}));
    let to = Recipients::Ids(ids(&["a", "b", "c"]));
    replica.handle_send(t0(), &message, None, &to).unwrap();
    let out = drain(&mut replica);
    let appends: Vec<&(Token, Command)> = out.find("StreamPublish");
    let streams = |out: &Out| -> Vec<String> {
        out.find("StreamPublish")
            .into_iter()
            .map(|(_, command)| match command {
                Command::StreamPublish { room, .. } => room.clone(),
                _ => unreachable!(),
            })
            .collect()
    };
    assert_eq!(streams(&out), ["~user:a", "~user:b", "~user:c"]);
    assert_eq!(out.find("CheckPresence").len(), 1);
    // Redis answers the first two appends; the link fails before the rest.
    for (token, command) in &appends[..2] {
        replica.handle_reply(t0(), *token, Ok(ok(command)));
    }
    replica.handle_link_down(t0(), 0, "cut");
    drain(&mut replica);
    let at = replica.poll_timeout().unwrap();
    replica.handle_timeout(at);
    drain(&mut replica);
    replica.handle_link_up(at, 0, "run1");
    let out = answer_all(&mut replica, at);
    assert_eq!(
        streams(&out),
        ["~user:c"],
        "only the unanswered append again"
    );
    assert_eq!(
        out.find("CheckPresence").len(),
        1,
        "the send itself is done again"
    );
}
