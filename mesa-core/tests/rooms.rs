//! Rooms in the core: what a server session negotiates and reads, and what a
//! replica decides (channels subscribed only while a member is here, deliveries with
//! and without the room, envelopes across replicas).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mesa_core::recovery::Since;
use mesa_core::rooms::{
    PresenceChange, RefusalCode, RoomEnvelope, RoomNotice, RoomRefusal, RoomRequest, room_frame,
};
use mesa_core::sim::redis::RedisModel;
use mesa_core::{
    Action, AuthConfig, Command, ConnId, Keys, Message, Namespace, RedisValue, Replica,
    ReplicaConfig, ReplicaEvent, ServerConfig, ServerSession, SessionEvent, Transmit,
};
use serde_json::{Value, json};

fn t0() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

fn config(rooms: bool, auth: bool) -> Arc<ServerConfig> {
    let mut builder = ServerConfig::builder().rooms(rooms);
    if auth {
        builder = builder.authentication(AuthConfig::default());
    }
    Arc::new(builder.build().unwrap())
}

fn drain(session: &mut ServerSession) -> (Vec<String>, Vec<SessionEvent>) {
    let frames = std::iter::from_fn(|| session.poll_transmit())
        .filter_map(|t| match t {
            Transmit::Text(frame) => Some(frame.as_str().to_owned()),
            Transmit::Close(_) => None,
        })
        .collect();
    (
        frames,
        std::iter::from_fn(|| session.poll_event()).collect(),
    )
}

/// A session past its hello, authenticated with the opt-in when `opt_in`.
fn session(rooms: bool, opt_in: bool) -> ServerSession {
    let mut session = ServerSession::new(config(rooms, true), t0());
    let (hello, _) = drain(&mut session);
    assert_eq!(hello[0].contains(r#""rooms""#), rooms, "{hello:?}");
    let d = if opt_in {
        json!({"token": "t", "mesa": {"caps": ["rooms"]}})
    } else {
        json!({"token": "t"})
    };
    session.handle_frame(t0(), &json!({"op": 2, "d": d}).to_string());
    let (_, events) = drain(&mut session);
    let credentials = events.iter().find_map(|e| match e {
        SessionEvent::AuthenticationRequested { credentials, .. } => Some(credentials.clone()),
        _ => None,
    });
    // With rooms on, the application never sees the opt-in (off, the key is not
    // ours: it stays).
    let mut sent = d.clone();
    if rooms {
        sent.as_object_mut().unwrap().remove("mesa");
    }
    assert_eq!(credentials, Some(sent));
    assert_eq!(
        events.contains(&SessionEvent::Extended {
            since: Since::default()
        }),
        rooms && opt_in,
        "{events:?}"
    );
    session.accept(t0(), "alice".into(), json!({})).unwrap();
    drain(&mut session);
    session
}

#[test]
fn an_extended_client_s_requests_are_events_and_its_answers_frames() {
    let mut s = session(true, true);
    assert!(s.is_extended());
    s.handle_frame(
        t0(),
        r#"{"op":0,"t":"mesa:subscribe","d":{"room":"lobby","ref":1,"token":"k"}}"#,
    );
    let (_, events) = drain(&mut s);
    let expected = RoomRequest::Subscribe {
        room: "lobby".into(),
        reference: json!(1),
        token: Some("k".into()),
        presence: false,
        since: None,
    };
    assert_eq!(events, [SessionEvent::Room(Box::new(expected))]);
    s.room_notice(RoomNotice::Subscribed {
        room: "lobby".into(),
        reference: json!(1),
        position: None,
        recovered: None,
    })
    .unwrap();
    let (frames, _) = drain(&mut s);
    assert_eq!(
        frames,
        [r#"{"op":0,"d":{"room":"lobby","ref":1},"t":"mesa:subscribed"}"#]
    );
    // A malformed request is answered by the session itself, never closed.
    s.handle_frame(
        t0(),
        r#"{"op":0,"t":"mesa:subscribe","d":{"room":"a b","ref":2}}"#,
    );
    let (frames, events) = drain(&mut s);
    assert!(events.is_empty());
    let error: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(error["t"], "mesa:error");
    assert_eq!(error["d"]["code"], RefusalCode::InvalidRoom.as_str());
    assert_eq!(error["d"]["ref"], 2);
    assert!(!s.is_closed());
    // An ordinary dispatch stays a message.
    s.handle_frame(t0(), r#"{"op":0,"t":"CHAT","d":{}}"#);
    assert!(matches!(drain(&mut s).1[..], [SessionEvent::Message(_)]));
}

#[test]
fn an_old_client_sees_nothing_new_and_its_mesa_dispatches_are_messages() {
    for (rooms, opt_in) in [(true, false), (false, true)] {
        let mut s = session(rooms, opt_in);
        assert!(!s.is_extended());
        s.handle_frame(
            t0(),
            r#"{"op":0,"t":"mesa:subscribe","d":{"room":"lobby"}}"#,
        );
        assert!(matches!(drain(&mut s).1[..], [SessionEvent::Message(_)]));
        s.room_notice(RoomNotice::Subscribed {
            room: "lobby".into(),
            reference: Value::Null,
            position: None,
            recovered: None,
        })
        .unwrap();
        assert!(drain(&mut s).0.is_empty(), "a notice reached an old client");
    }
}

#[test]
fn without_authentication_op_2_only_opts_in() {
    let mut s = ServerSession::new(config(true, false), t0());
    drain(&mut s);
    s.handle_frame(t0(), r#"{"op":2,"d":{"mesa":{"caps":["rooms"]}}}"#);
    let (frames, events) = drain(&mut s);
    assert!(frames.is_empty());
    assert_eq!(
        events,
        [SessionEvent::Extended {
            since: Since::default()
        }]
    );
    assert!(s.is_extended());
}

// ----- the replica -----

fn linked() -> Replica {
    let mut replica = Replica::new(ReplicaConfig::default(), "me", 1, t0()).unwrap();
    drain_replica(&mut replica);
    replica.handle_link_up(t0(), 0, "run");
    answer(&mut replica);
    replica
}

/// Answer every command; returns them.
fn answer(replica: &mut Replica) -> Vec<Command> {
    let mut all = Vec::new();
    while let Some((token, command)) = replica.poll_command() {
        let value = match &command {
            Command::LoadPortals => RedisValue::Array(Vec::new()),
            _ => RedisValue::Int(1),
        };
        replica.handle_reply(t0(), token, Ok(vec![value]));
        all.push(command);
    }
    all
}

fn drain_replica(replica: &mut Replica) -> Vec<Command> {
    std::iter::from_fn(|| replica.poll_command())
        .map(|(_, c)| c)
        .collect()
}

fn member(replica: &mut Replica, extended: bool) -> ConnId {
    let conn = replica.handle_connection_opened(t0());
    if extended {
        replica.handle_session_event(
            t0(),
            conn,
            &SessionEvent::Extended {
                since: Since::default(),
            },
        );
    }
    answer(replica);
    conn
}

#[test]
fn a_replica_subscribes_to_a_room_while_a_member_is_here() {
    let mut replica = linked();
    let (a, b) = (member(&mut replica, false), member(&mut replica, false));
    let channel = "mesa_room:lobby".to_owned();
    replica.handle_join(t0(), a, "lobby").unwrap();
    assert_eq!(
        answer(&mut replica),
        [Command::Subscribe {
            channels: vec![channel.clone()]
        }]
    );
    replica.handle_join(t0(), b, "lobby").unwrap();
    assert!(answer(&mut replica).is_empty(), "one subscription per room");
    assert!(replica.handle_leave(t0(), a, "lobby"));
    assert!(answer(&mut replica).is_empty());
    replica.handle_connection_closed(t0(), b);
    let commands = answer(&mut replica);
    assert!(commands.contains(&Command::Unsubscribe {
        channels: vec![channel.clone()]
    }));
    // Joined then left: asked in that order, so the channel ends unsubscribed.
    let c = member(&mut replica, false);
    replica.handle_join(t0(), c, "quick").unwrap();
    replica.handle_leave(t0(), c, "quick");
    let quick = vec!["mesa_room:quick".to_owned()];
    assert_eq!(
        drain_replica(&mut replica),
        [
            Command::Subscribe {
                channels: quick.clone()
            },
            Command::Unsubscribe { channels: quick }
        ]
    );
    // Over the limit.
    let config = ReplicaConfig {
        max_rooms_per_connection: 1,
        ..ReplicaConfig::default()
    };
    let mut small = Replica::new(config, "me", 1, t0()).unwrap();
    let d = small.handle_connection_opened(t0());
    small.handle_join(t0(), d, "one").unwrap();
    let refused = small.handle_join(t0(), d, "two").unwrap_err();
    assert_eq!(refused.code, RefusalCode::TooManyRooms);
}

#[test]
fn a_new_link_subscribes_to_every_room_with_a_member_here() {
    let mut replica = linked();
    let a = member(&mut replica, false);
    replica.handle_join(t0(), a, "x").unwrap();
    answer(&mut replica);
    replica.handle_link_down(t0(), 0, "gone");
    replica.handle_join(t0(), a, "y").unwrap();
    replica.handle_timeout(t0() + std::time::Duration::from_secs(10));
    assert_eq!(drain_replica(&mut replica), [Command::Connect]);
    replica.handle_link_up(t0(), 0, "run2");
    let commands = answer(&mut replica);
    let subscribed: Vec<&Vec<String>> = commands
        .iter()
        .filter_map(|c| match c {
            Command::Subscribe { channels } => Some(channels),
            _ => None,
        })
        .collect();
    assert_eq!(subscribed.len(), 1);
    let mut channels = subscribed[0].clone();
    channels.sort();
    assert_eq!(channels, ["mesa_room:x", "mesa_room:y"]);
}

#[test]
fn room_messages_reach_members_here_at_once_until_the_channel_brings_them_back() {
    let mut replica = linked();
    let (old, new, outside) = (
        member(&mut replica, false),
        member(&mut replica, true),
        member(&mut replica, true),
    );
    replica.handle_join(t0(), old, "lobby").unwrap();
    replica.handle_join(t0(), new, "lobby").unwrap();
    // Before Redis confirmed the subscription: here at once, skipped when it comes.
    let message = Message::dispatch("CHAT", json!({"x": 1}));
    assert_eq!(replica.handle_room_send(t0(), &message, "lobby"), 2);
    let deliveries: Vec<_> = std::iter::from_fn(|| replica.poll_delivery()).collect();
    assert_eq!(deliveries.len(), 2);
    assert_eq!(
        deliveries[0].action,
        Action::Write(room_frame(&message, "lobby", None))
    );
    assert_eq!(deliveries[0].targets, [new]);
    assert_eq!(deliveries[1].action, Action::Write(message.encode()));
    assert_eq!(deliveries[1].targets, [old]);
    let published = answer(&mut replica);
    let Some(Command::Publish { channel, payload }) = published
        .iter()
        .find(|c| matches!(c, Command::Publish { .. }))
    else {
        panic!("{published:?}")
    };
    assert_eq!(channel, "mesa_room:lobby");
    let envelope = RoomEnvelope::decode(payload).unwrap();
    assert_eq!(envelope.origin.as_deref(), Some("me"));
    replica.handle_pubsub(t0(), channel, payload);
    assert!(replica.poll_delivery().is_none(), "delivered already");

    // Confirmed: what it publishes comes back, and its members get it from there,
    // as another replica's (or a Dispatcher's).
    assert_eq!(replica.handle_room_send(t0(), &message, "lobby"), 0);
    assert!(replica.poll_delivery().is_none());
    let published = answer(&mut replica);
    let Some(Command::Publish { payload, .. }) = published.first() else {
        panic!("{published:?}")
    };
    let echoed = RoomEnvelope::decode(payload).unwrap();
    assert_eq!(echoed.origin, None);
    replica.handle_pubsub(t0(), channel, payload);
    let targets: Vec<ConnId> = std::iter::from_fn(|| replica.poll_delivery())
        .flat_map(|d| d.targets)
        .collect();
    assert_eq!(targets, [new, old]);
    assert!(!targets.contains(&outside));
}

/// A change of room presence: room, id, connections.
type Entry = (String, String, i64);

#[test]
fn a_replica_counts_its_members_in_room_presence_by_id() {
    let mut replica = linked();
    let alice = member(&mut replica, false);
    replica.handle_session_event(t0(), alice, &authenticated("alice"));
    answer(&mut replica);
    // An unauthenticated member has no id to count.
    let anon = member(&mut replica, false);
    replica.handle_join(t0(), anon, "lobby").unwrap();
    replica.handle_join(t0(), alice, "lobby").unwrap();
    let rooms = |commands: &[Command]| -> Vec<(bool, Vec<Entry>)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Rooms { clear, entries } => Some((*clear, entries.clone())),
                _ => None,
            })
            .collect()
    };
    let entry = |by: i64| ("lobby".to_owned(), "alice".to_owned(), by);
    assert_eq!(rooms(&answer(&mut replica)), [(false, vec![entry(1)])]);
    // Authenticating later counts the rooms it is in.
    replica.handle_session_event(t0(), anon, &authenticated("bob"));
    let bob = ("lobby".to_owned(), "bob".to_owned(), 1);
    assert_eq!(rooms(&answer(&mut replica)), [(false, vec![bob])]);
    replica.handle_leave(t0(), alice, "lobby");
    assert_eq!(rooms(&answer(&mut replica)), [(false, vec![entry(-1)])]);
    replica.handle_join(t0(), alice, "lobby").unwrap();
    answer(&mut replica);
    // A new link clears what Redis held and registers every membership here.
    replica.handle_link_down(t0(), 0, "gone");
    replica.handle_timeout(t0() + std::time::Duration::from_secs(10));
    drain_replica(&mut replica);
    replica.handle_link_up(t0(), 0, "run2");
    let anew = rooms(&answer(&mut replica));
    let bob = ("lobby".to_owned(), "bob".to_owned(), 1);
    assert_eq!(anew, [(true, vec![entry(1), bob])]);
    // Closing leaves.
    replica.handle_connection_closed(t0(), alice);
    assert_eq!(rooms(&answer(&mut replica)), [(false, vec![entry(-1)])]);
}

#[test]
fn who_is_in_a_room_is_asked_of_redis_and_answered_by_query() {
    let mut replica = linked();
    replica.handle_room_members(t0(), 7, "lobby");
    let (token, command) = replica.poll_command().unwrap();
    assert_eq!(
        command,
        Command::RoomMembers {
            room: "lobby".into()
        }
    );
    let text = |s: &str| RedisValue::Text(s.into());
    let reply = RedisValue::Array(vec![text("bob"), text("2"), text("alice"), text("1")]);
    replica.handle_reply(t0(), token, Ok(vec![reply]));
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| replica.poll_event()).collect();
    let members = vec![("alice".to_owned(), 1), ("bob".to_owned(), 2)];
    assert!(events.contains(&ReplicaEvent::RoomMembers {
        query: 7,
        room: "lobby".into(),
        members: Ok(members),
    }));
    // Asked, then the link fails: answered, saying so.
    replica.handle_room_members(t0(), 9, "lobby");
    replica.handle_link_down(t0(), 0, "gone");
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| replica.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(
        e,
        ReplicaEvent::RoomMembers {
            query: 9,
            members: Err(_),
            ..
        }
    )));
    // Without a link: an answer at once, saying so.
    replica.handle_room_members(t0(), 8, "lobby");
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| replica.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(
        e,
        ReplicaEvent::RoomMembers {
            query: 8,
            members: Err(_),
            ..
        }
    )));
}

fn authenticated(id: &str) -> SessionEvent {
    SessionEvent::Authenticated {
        id: id.into(),
        user: json!({}),
        initial: true,
    }
}

#[test]
fn presence_requests_are_bounded_per_connection_and_answered_by_the_session() {
    let mut s = session(true, true);
    let ask = |s: &mut ServerSession, n: u64| {
        let frame = json!({"op":0,"t":"mesa:presence","d":{"room":"lobby","ref":n}});
        s.handle_frame(t0(), &frame.to_string());
        drain(s)
    };
    let max = mesa_core::Limits::default().max_presence_requests as u64;
    for n in 0..max {
        let (frames, events) = ask(&mut s, n);
        assert!(frames.is_empty());
        let request = RoomRequest::Presence {
            room: "lobby".into(),
            reference: json!(n),
        };
        assert_eq!(events, [SessionEvent::Room(Box::new(request))]);
    }
    // One more awaits no Redis: refused at once, with a reason.
    let (frames, events) = ask(&mut s, 99);
    assert!(events.is_empty());
    let error: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(error["d"]["code"], "too_many_requests");
    assert_eq!(error["d"]["ref"], 99);
    // An answer (members, or a refusal) makes room for the next.
    let members = vec![("alice".to_owned(), 2), ("bob".to_owned(), 1)];
    s.presence_answer("lobby".into(), json!(0), Ok(members))
        .unwrap();
    let (frames, _) = drain(&mut s);
    assert_eq!(
        frames,
        [
            r#"{"op":0,"d":{"room":"lobby","ref":0,"members":{"alice":2,"bob":1}},"t":"mesa:presence"}"#
        ]
    );
    let unavailable = RoomRefusal::new(RefusalCode::Unavailable, "Redis is unreachable");
    s.presence_answer("lobby".into(), json!(1), Err(unavailable))
        .unwrap();
    let (frames, _) = drain(&mut s);
    assert!(frames[0].contains(r#""code":"unavailable""#), "{frames:?}");
    let (frames, events) = ask(&mut s, 100);
    assert!(frames.is_empty() && events.len() == 1);
}

#[test]
fn presence_changes_on_a_room_channel_reach_only_the_members_that_asked() {
    let mut replica = linked();
    let (old, quiet, watcher, outside) = (
        member(&mut replica, false),
        member(&mut replica, true),
        member(&mut replica, true),
        member(&mut replica, true),
    );
    for conn in [old, quiet, watcher] {
        replica.handle_join(t0(), conn, "lobby").unwrap();
    }
    replica.handle_join(t0(), outside, "elsewhere").unwrap();
    assert!(!replica.handle_watch(old, "lobby", true), "an old client");
    assert!(
        !replica.handle_watch(outside, "lobby", true),
        "not a member"
    );
    assert!(replica.handle_watch(watcher, "lobby", true));
    answer(&mut replica);
    let change = PresenceChange {
        room: "lobby".into(),
        id: "alice".into(),
        joined: true,
    };
    replica.handle_pubsub(t0(), "mesa_room:lobby", &change.encode());
    let deliveries: Vec<_> = std::iter::from_fn(|| replica.poll_delivery()).collect();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].targets, [watcher]);
    let notice = RoomNotice::Join {
        room: "lobby".into(),
        id: "alice".into(),
    };
    assert_eq!(deliveries[0].action, Action::Write(notice.encode()));
    // Not an envelope of a message: the metrics of envelopes do not count it.
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| replica.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Received { .. }))
    );
    // Left the room: it hears nothing more.
    replica.handle_leave(t0(), watcher, "lobby");
    replica.handle_pubsub(t0(), "mesa_room:lobby", &change.encode());
    assert!(replica.poll_delivery().is_none());
}

/// Run `command` of replica `name` on the model; the presence changes it published.
fn run(redis: &mut RedisModel, name: &str, command: &Command) -> Vec<(String, bool)> {
    let keys = Keys::new(Namespace::default(), name);
    redis.execute(t0(), &command.calls(&keys)).unwrap();
    redis
        .take_published()
        .into_iter()
        .map(
            |p| match mesa_core::rooms::RoomPayload::decode(&p.payload) {
                Ok(mesa_core::rooms::RoomPayload::Presence(change)) => {
                    assert_eq!(p.channel, format!("mesa_room:{}", change.room));
                    (change.id, change.joined)
                }
                other => panic!("{other:?}"),
            },
        )
        .collect()
}

fn rooms(clear: bool, entries: &[(&str, &str, i64)]) -> Command {
    Command::Rooms {
        clear,
        entries: entries
            .iter()
            .map(|(room, id, by)| (room.to_string(), id.to_string(), *by))
            .collect(),
    }
}

#[test]
fn the_rooms_script_publishes_an_id_s_first_join_and_last_leave_over_the_cluster() {
    let mut redis = RedisModel::new();
    let join = |id: &str| vec![(id.to_owned(), true)];
    let leave = |id: &str| vec![(id.to_owned(), false)];
    // Two tabs of alice on two replicas: one join, one leave.
    assert_eq!(
        run(&mut redis, "r1", &rooms(false, &[("lobby", "alice", 1)])),
        join("alice")
    );
    assert!(run(&mut redis, "r2", &rooms(false, &[("lobby", "alice", 1)])).is_empty());
    assert!(run(&mut redis, "r1", &rooms(false, &[("lobby", "alice", -1)])).is_empty());
    // A leave the replica never registered changes nothing.
    assert!(run(&mut redis, "r1", &rooms(false, &[("lobby", "alice", -1)])).is_empty());
    assert_eq!(
        run(&mut redis, "r2", &rooms(false, &[("lobby", "alice", -1)])),
        leave("alice")
    );
    // A new link registering what Redis holds already publishes nothing; only the
    // difference is published.
    run(
        &mut redis,
        "r1",
        &rooms(false, &[("lobby", "bob", 2), ("lobby", "carol", 1)]),
    );
    let anew = rooms(true, &[("lobby", "bob", 1), ("lobby", "dave", 1)]);
    let mut changed = run(&mut redis, "r1", &anew);
    changed.sort();
    assert_eq!(
        changed,
        [("carol".to_owned(), false), ("dave".to_owned(), true)]
    );
    assert!(run(&mut redis, "r1", &anew).is_empty());
}

#[test]
fn room_presence_given_up_on_a_full_buffer_is_registered_anew_at_the_next_tick() {
    let config = ReplicaConfig {
        max_pending: 2,
        ..ReplicaConfig::default()
    };
    let mut replica = Replica::new(config, "me", 1, t0()).unwrap();
    drain_replica(&mut replica);
    replica.handle_link_up(t0(), 0, "run");
    answer(&mut replica);
    let alice = member(&mut replica, false);
    replica.handle_session_event(t0(), alice, &authenticated("alice"));
    answer(&mut replica);
    // Two changes in flight fill the bound: the third is given up (answers come
    // after all three joins).
    for room in ["a", "b", "c"] {
        replica.handle_join(t0(), alice, room).unwrap();
    }
    let sent = answer(&mut replica);
    let registered = |commands: &[Command]| -> Vec<(bool, usize)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Rooms { clear, entries } => Some((*clear, entries.len())),
                _ => None,
            })
            .collect()
    };
    assert_eq!(registered(&sent), [(false, 1), (false, 1)]);
    // The next tick registers every membership here anew.
    let tick = t0() + replica.config().lease / 3;
    replica.handle_timeout(tick);
    assert_eq!(registered(&drain_replica(&mut replica)), [(true, 3)]);
}
