//! Scenario tests: real server and client sessions in the deterministic simulator.

mod sim;

use std::sync::Arc;
use std::time::Duration;

use mesa_core::{
    AuthConfig, BackoffConfig, ClientConfig, ClientEvent, Close, CloseCode, HeartbeatConfig,
    Message, Opcode, RateLimitPolicy, Recipients, ServerConfig, ServerSession, SessionEvent,
    SyncConfig, Transmit,
};
use serde_json::{Value, json};
use sim::Sim;

const SECOND: Duration = Duration::from_secs(1);

fn heartbeat(interval_ms: u64, max_attempts: u32) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(interval_ms),
        max_attempts,
    }
}

fn full_config() -> ServerConfig {
    ServerConfig::builder()
        .heartbeat(heartbeat(1000, 3))
        .reconnect_interval(Duration::from_millis(500))
        .authentication(AuthConfig::default())
        .build()
        .unwrap()
}

/// The frames a server connection wrote, decoded.
fn written(sim: &Sim, conn_index: usize) -> Vec<Value> {
    let log = sim.conn_logs.values().nth(conn_index).expect("connection");
    log.transmits
        .iter()
        .filter_map(|t| match t {
            Transmit::Text(frame) => Some(serde_json::from_str(frame.as_str()).unwrap()),
            Transmit::Close(_) => None,
        })
        .collect()
}

fn close_of(sim: &Sim, conn_index: usize) -> Option<Close> {
    let log = sim.conn_logs.values().nth(conn_index).expect("connection");
    log.transmits.iter().find_map(|t| match t {
        Transmit::Close(close) => Some(close.clone()),
        Transmit::Text(_) => None,
    })
}

fn connected(sim: &mut Sim, config: ClientConfig) -> usize {
    let c = sim.add_client(config);
    sim.connect(c);
    sim.run_for(Duration::from_millis(50));
    c
}

#[test]
fn hello_is_the_first_frame_with_the_configured_settings() {
    let mut sim = Sim::new(full_config(), 1);
    let c = connected(&mut sim, ClientConfig::default());
    let frames = written(&sim, 0);
    assert_eq!(
        frames[0],
        json!({"op": 10, "d": {
            "c_heartbeat_interval": 1000,
            "c_reconnect_interval": 500,
            "c_authentication_timeout": 10000,
            "rules": ["sends_user_object"],
        }})
    );
    let hello = sim.clients[c].session.hello().expect("hello adopted");
    assert_eq!(hello.heartbeat_interval, Some(SECOND));
    // The server's reconnect interval became the client's backoff base.
    assert_eq!(
        sim.clients[c].session.backoff().config().base,
        Duration::from_millis(500)
    );
}

#[test]
fn heartbeats_keep_an_answering_client_connected() {
    let mut sim = Sim::new(full_config(), 2);
    let c = connected(&mut sim, ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_secs(60));
    assert!(sim.clients[c].session.is_open());
    let beats = written(&sim, 0)
        .into_iter()
        .filter(|f| f["op"] == 1)
        .collect::<Vec<_>>();
    assert_eq!(beats.len(), 60, "one beat per interval");
    assert!(
        beats.iter().all(|b| b["d"] == json!({})),
        "no misses: {beats:?}"
    );
    assert_eq!(
        sim.clients[c]
            .log
            .count(|e| matches!(e, ClientEvent::Disconnected { .. })),
        0
    );
}

#[test]
fn a_silent_client_is_closed_after_max_attempts_misses() {
    let mut sim = Sim::new(full_config(), 3);
    let c = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_millis(100));
    // The client's frames vanish: the server sees no ack from now on.
    sim.black_hole(c);
    sim.run_for(Duration::from_secs(10));
    let beats: Vec<Value> = written(&sim, 0)
        .into_iter()
        .filter(|f| f["op"] == 1)
        .map(|f| f["d"].clone())
        .collect();
    assert_eq!(
        beats,
        [
            json!({}),
            json!({"tries": 1, "max": 3}),
            json!({"tries": 2, "max": 3}),
            json!({"tries": 3, "max": 3}),
        ]
    );
    let close = close_of(&sim, 0).expect("closed");
    assert_eq!(close.code, CloseCode::GOING_AWAY);
    assert_eq!(close.reason, "heartbeat timeout");
    // Closed at the fifth tick: after the beat with tries = max went unanswered.
    let closed = sim.conn_logs.values().next().unwrap();
    assert!(matches!(
        closed.events.last(),
        Some(SessionEvent::Closed { by_peer: false, .. })
    ));
    assert_eq!(closed.after_close, 0);
    // Every unanswered beat is reported to observers, the fatal one included.
    let misses: Vec<u32> = closed
        .events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::HeartbeatMissed { misses } => Some(*misses),
            _ => None,
        })
        .collect();
    assert_eq!(misses, [1, 2, 3, 4]);
}

#[test]
fn authentication_answers_op_22_once_and_reauthentication_is_silent() {
    let mut sim = Sim::new(full_config(), 4);
    let c = connected(&mut sim, ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_millis(50));
    sim.authenticate(c, "alice2", true);
    sim.run_for(Duration::from_millis(50));
    let acks: Vec<Value> = written(&sim, 0)
        .into_iter()
        .filter(|f| f["op"] == 22)
        .collect();
    assert_eq!(acks, [json!({"op": 22, "d": {"id": "alice"}})]);
    let authenticated: Vec<(String, bool)> = sim
        .conn_logs
        .values()
        .next()
        .unwrap()
        .events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Authenticated { id, initial, .. } => Some((id.clone(), *initial)),
            _ => None,
        })
        .collect();
    assert_eq!(
        authenticated,
        [("alice".into(), true), ("alice2".into(), false)]
    );
    assert!(sim.hub.is_online("alice2") && !sim.hub.is_online("alice"));
    let user = sim.clients[c].log.events.iter().find_map(|(_, e)| match e {
        ClientEvent::Authenticated { user } => Some(user.clone()),
        _ => None,
    });
    assert_eq!(user, Some(json!({"id": "alice"})));
    // The re-authentication resolved too, without a second op 22.
    let resolved = sim.clients[c]
        .log
        .count(|e| matches!(e, ClientEvent::Authenticated { .. }));
    assert_eq!(resolved, 2);
    assert!(sim.clients[c].session.is_authenticated());
}

#[test]
fn without_send_user_object_op_22_is_empty() {
    let auth = AuthConfig {
        send_user_object: false,
        ..AuthConfig::default()
    };
    let config = ServerConfig::builder()
        .authentication(auth)
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 5);
    let c = connected(&mut sim, ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_millis(50));
    assert_eq!(
        written(&sim, 0)[0],
        json!({"op": 10, "d": {"c_authentication_timeout": 10000, "rules": []}})
    );
    assert_eq!(written(&sim, 0)[1], json!({"op": 22, "d": {}}));
}

#[test]
fn a_rejected_authentication_closes_with_1008() {
    let mut sim = Sim::new(full_config(), 6);
    let c = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    sim.authenticate(c, "", true);
    sim.run_for(Duration::from_millis(50));
    let close = close_of(&sim, 0).expect("closed");
    assert_eq!(close.code, CloseCode::POLICY);
    assert!(close.reason.starts_with("authentication failed"), "{close}");
    let disconnected = sim.clients[c].log.events.iter().find_map(|(_, e)| match e {
        ClientEvent::Disconnected { close, .. } => Some(close.code),
        _ => None,
    });
    assert_eq!(disconnected, Some(CloseCode::POLICY));
}

#[test]
fn without_disconnect_on_fail_a_rejection_waits_for_the_timeout() {
    let auth = AuthConfig {
        disconnect_on_fail: false,
        timeout: Duration::from_secs(3),
        ..AuthConfig::default()
    };
    let config = ServerConfig::builder()
        .authentication(auth)
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 7);
    let c = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    sim.authenticate(c, "", true);
    sim.run_for(Duration::from_secs(2));
    assert!(
        sim.clients[c].session.is_open(),
        "rejected but not disconnected"
    );
    sim.run_for(Duration::from_secs(2));
    let close = close_of(&sim, 0).expect("closed by the timeout");
    assert_eq!(
        (close.code, close.reason.as_ref()),
        (CloseCode::POLICY, "authentication timed out")
    );
}

#[test]
fn the_authentication_timeout_is_enforced() {
    let mut sim = Sim::new(full_config(), 8);
    let c = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    sim.run_for(Duration::from_millis(9_900));
    assert!(sim.clients[c].session.is_open());
    sim.run_for(Duration::from_millis(200));
    let close = close_of(&sim, 0).expect("closed");
    assert_eq!(close.code, CloseCode::POLICY);
    // An authenticated client is never timed out.
    let mut sim = Sim::new(full_config(), 9);
    let c = connected(&mut sim, ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_secs(30));
    assert!(sim.clients[c].session.is_open());
}

#[test]
fn op_2_frames_are_decided_one_at_a_time_and_a_flood_collapses() {
    let config = ServerConfig::builder()
        .authentication(AuthConfig::default())
        .build()
        .unwrap();
    let now = sim_now();
    let mut session = mesa_core::ServerSession::new(config.into(), now);
    for token in ["a", "b", "c", "d"] {
        session.handle_frame(now, &format!(r#"{{"op":2,"d":{{"token":"{token}"}}}}"#));
    }
    let requested = |session: &mut mesa_core::ServerSession| -> Vec<Value> {
        std::iter::from_fn(|| session.poll_event())
            .filter_map(|e| match e {
                SessionEvent::AuthenticationRequested { credentials, .. } => Some(credentials),
                _ => None,
            })
            .collect()
    };
    assert_eq!(requested(&mut session), [json!({"token": "a"})]);
    session.accept(now, "a".into(), json!({})).unwrap();
    // Only the latest of the frames that arrived meanwhile is decided next.
    assert_eq!(requested(&mut session), [json!({"token": "d"})]);
    session.accept(now, "d".into(), json!({})).unwrap();
    assert!(requested(&mut session).is_empty());
    assert_eq!(session.id(), Some("d"));
    let acks = std::iter::from_fn(|| session.poll_transmit())
        .filter(|t| matches!(t, Transmit::Text(f) if f.as_str().starts_with(r#"{"op":22"#)))
        .count();
    assert_eq!(acks, 1, "op 22 once; the re-authentication is silent");
}

fn sim_now() -> std::time::Instant {
    #[allow(clippy::disallowed_methods)]
    std::time::Instant::now()
}

#[test]
fn enforce_equal_versions_closes_a_mismatch_with_1002() {
    let config = ServerConfig::builder()
        .enforce_equal_versions("1.5.8")
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 10);
    let good = ClientConfig {
        version: Some("1.5.8".into()),
        ..ClientConfig::default()
    };
    let bad = ClientConfig {
        version: Some("1.4.0".into()),
        reconnect: false,
        ..ClientConfig::default()
    };
    let g = connected(&mut sim, good);
    let b = connected(&mut sim, bad);
    sim.run_for(SECOND);
    assert!(sim.clients[g].session.is_open());
    assert!(!sim.clients[b].session.is_open());
    assert!(
        sim.clients[g]
            .log
            .sent
            .iter()
            .any(|f| f == r#"{"op":0,"d":{"v":"1.5.8"},"t":"CLIENT_VERSION"}"#)
    );
    let close = close_of(&sim, 1).expect("closed");
    assert_eq!(close.code, CloseCode::PROTOCOL_ERROR);
    assert_eq!(
        close.reason,
        "client version 1.4.0 does not match server version 1.5.8"
    );
}

#[test]
fn disconnect_client_internal_event_closes_with_1000() {
    let mut sim = Sim::new(full_config(), 11);
    let a = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    let b = connected(&mut sim, ClientConfig::default());
    sim.authenticate(a, "alice", true);
    sim.authenticate(b, "bob", true);
    sim.run_for(Duration::from_millis(50));
    let mut internal = Message::new(Opcode::Internal, json!({}));
    internal.t = Some("DISCONNECT_CLIENT".into());
    sim.server_send(&internal, &Recipients::Ids(vec!["alice".into()]));
    sim.run_for(Duration::from_millis(50));
    assert!(!sim.clients[a].session.is_open());
    assert!(sim.clients[b].session.is_open());
    assert_eq!(close_of(&sim, 0).unwrap().code, CloseCode::NORMAL);
    // Internal events never reach a client as a frame.
    assert!(written(&sim, 1).iter().all(|f| f["op"] != 5));
}

#[test]
fn bad_frames_close_only_their_connection_with_the_right_code() {
    let limits = mesa_core::Limits {
        max_message_bytes: 256,
        max_json_depth: 4,
        ..Default::default()
    };
    let config = ServerConfig::builder().limits(limits).build().unwrap();
    let cases: [(&str, u16); 6] = [
        ("not json", 1007),
        ("[1,2]", 1007),
        (r#"{"op":"zero"}"#, 1007),
        (r#"{"op":0,"t":{}}"#, 1007),
        (r#"{"op":0,"d":[[[[[1]]]]]}"#, 1009),
        (&"x".repeat(300), 1009),
    ];
    for (text, code) in cases {
        let mut sim = Sim::new(config.clone(), 12);
        let bystander = connected(&mut sim, ClientConfig::default());
        let offender = connected(
            &mut sim,
            ClientConfig {
                reconnect: false,
                ..ClientConfig::default()
            },
        );
        sim.inject(offender, text);
        sim.run_for(Duration::from_millis(50));
        assert_eq!(close_of(&sim, 1).map(|c| c.code.0), Some(code), "{text}");
        assert!(close_of(&sim, 0).is_none());
        sim.send(
            bystander,
            Message::dispatch("ECHO", json!({"still": "here"})),
        )
        .unwrap();
        sim.run_for(Duration::from_millis(50));
        assert_eq!(sim.clients[bystander].log.messages().len(), 1);
    }
}

#[test]
fn a_flood_past_the_rate_and_burst_is_closed_with_1008_under_the_close_policy() {
    let limits = mesa_core::Limits {
        max_messages_per_second: 10,
        max_message_burst: 5,
        rate_limit_policy: RateLimitPolicy::Close,
        ..Default::default()
    };
    let config = ServerConfig::builder().limits(limits).build().unwrap();
    let mut sim = Sim::new(config, 31);
    let steady = connected(&mut sim, ClientConfig::default());
    let flooder = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    // The burst is admitted at once; the frame after it finds the bucket empty.
    for n in 0..5 {
        sim.inject(flooder, &format!(r#"{{"op":0,"t":"ECHO","d":{n}}}"#));
    }
    sim.run_for(Duration::from_millis(50));
    assert!(close_of(&sim, 1).is_none());
    assert_eq!(sim.clients[flooder].log.messages().len(), 5);
    sim.inject(flooder, r#"{"op":0,"t":"ECHO","d":5}"#);
    sim.run_for(Duration::from_millis(50));
    let close = close_of(&sim, 1).expect("the flooder is closed");
    assert_eq!(
        (close.code, close.reason.as_ref()),
        (CloseCode::POLICY, "rate limit exceeded")
    );
    assert_eq!(sim.clients[flooder].log.messages().len(), 5);

    // A sender at the sustained rate (one frame per 100 ms) is never refused, for
    // far longer than its burst would last.
    for n in 0..100 {
        sim.send(steady, Message::dispatch("ECHO", json!(n)))
            .unwrap();
        sim.run_for(Duration::from_millis(100));
    }
    assert!(close_of(&sim, 0).is_none());
    assert_eq!(sim.clients[steady].log.messages().len(), 100);
}

/// By default a flood is slowed to the rate, not closed: the server reads nothing
/// while its bucket is empty (the frames wait in flight, as in TCP), every frame
/// arrives in order, and the heartbeat answers stuck behind the flood for far longer
/// than the miss limit do not close the connection.
#[test]
fn a_flood_past_the_rate_and_burst_is_slowed_and_loses_nothing() {
    let limits = mesa_core::Limits {
        max_messages_per_second: 10,
        max_message_burst: 5,
        ..Default::default()
    };
    let config = ServerConfig::builder()
        .heartbeat(heartbeat(1000, 1))
        .limits(limits)
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 32);
    let flooder = connected(&mut sim, ClientConfig::default());
    let start = sim.now;
    for n in 0..300 {
        sim.send(flooder, Message::dispatch("ECHO", json!(n)))
            .unwrap();
    }
    let all_back = sim.drive_bounded(100_000, Duration::from_secs(120), |sim| {
        sim.clients[flooder].log.messages().len() == 300
    });
    assert!(
        all_back,
        "echoed {}",
        sim.clients[flooder].log.messages().len()
    );
    let echoed: Vec<Value> = sim.clients[flooder]
        .log
        .messages()
        .iter()
        .map(|m| m.d.clone())
        .collect();
    assert_eq!(echoed, (0..300).map(|n| json!(n)).collect::<Vec<_>>());
    // The first 5 at once, then one per 100 ms.
    let elapsed = sim.now - start;
    assert!(elapsed >= Duration::from_millis(29_500), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(31), "{elapsed:?}");
    assert!(close_of(&sim, 0).is_none());
    sim.run_for(Duration::from_secs(10));
    assert!(close_of(&sim, 0).is_none(), "closed after the flood");
    assert!(sim.clients[flooder].session.is_open());
}

#[test]
fn the_rate_counts_every_frame_and_refills_with_time() {
    let limits = mesa_core::Limits {
        max_messages_per_second: 2,
        max_message_burst: 2,
        rate_limit_policy: RateLimitPolicy::Close,
        ..Default::default()
    };
    let config = Arc::new(
        ServerConfig::builder()
            .heartbeat(heartbeat(60_000, 3))
            .limits(limits)
            .build()
            .unwrap(),
    );
    let start = sim_now();
    let mut session = ServerSession::new(config, start);
    // Two heartbeat acks and a pong take the burst and the token earned in 500 ms...
    session.handle_frame(start, r#"{"op":11}"#);
    session.handle_control(start);
    let later = start + Duration::from_millis(500);
    session.handle_frame(later, r#"{"op":11}"#);
    assert!(!session.is_closed());
    // ...so the next ping at the same instant is one too many.
    session.handle_control(later);
    assert!(session.is_closed());
    let closes: Vec<Close> = std::iter::from_fn(|| session.poll_transmit())
        .filter_map(|t| match t {
            Transmit::Close(close) => Some(close),
            Transmit::Text(_) => None,
        })
        .collect();
    assert_eq!(
        closes,
        [Close::new(CloseCode::POLICY, "rate limit exceeded")]
    );
}

#[test]
fn echo_returns_to_the_sender_and_broadcast_honours_to_and_except() {
    let mut sim = Sim::new(full_config(), 13);
    let ids = ["alice", "bob", "carol"];
    let clients: Vec<usize> = ids
        .iter()
        .map(|_| connected(&mut sim, ClientConfig::default()))
        .collect();
    for (c, id) in clients.iter().zip(ids) {
        sim.authenticate(*c, id, true);
    }
    sim.run_for(Duration::from_millis(50));
    let echo = Message::dispatch("ECHO", json!({"n": 1}));
    sim.send(clients[0], echo.clone()).unwrap();
    sim.send(
        clients[1],
        Message::dispatch(
            "BROADCAST",
            json!({"to": ["alice", "carol"], "except": ["carol"]}),
        ),
    )
    .unwrap();
    sim.send(
        clients[2],
        Message::dispatch("BROADCAST", json!({"all": true})),
    )
    .unwrap();
    sim.run_for(Duration::from_millis(50));
    let types = |c: usize| -> Vec<String> {
        sim.clients[c]
            .log
            .messages()
            .iter()
            .map(|m| format!("{}{}", m.t.as_deref().unwrap(), m.d))
            .collect()
    };
    assert_eq!(
        types(clients[0]),
        [
            r#"ECHO{"n":1}"#,
            r#"BROADCAST{"to":["alice","carol"],"except":["carol"]}"#,
            r#"BROADCAST{"all":true}"#
        ]
    );
    assert_eq!(types(clients[1]), [r#"BROADCAST{"all":true}"#]);
    assert_eq!(types(clients[2]), [r#"BROADCAST{"all":true}"#]);
}

#[test]
fn a_broadcast_is_encoded_once_for_every_recipient() {
    let mut sim = Sim::new(full_config(), 14);
    for _ in 0..5 {
        connected(&mut sim, ClientConfig::default());
    }
    sim.server_send(&Message::dispatch("NEWS", json!({})), &Recipients::All);
    let frames: Vec<mesa_core::Frame> = sim
        .conn_logs
        .values()
        .filter_map(|log| {
            log.transmits.iter().rev().find_map(|t| match t {
                Transmit::Text(f) if f.as_str().contains("NEWS") => Some(f.clone()),
                _ => None,
            })
        })
        .collect();
    assert_eq!(frames.len(), 5);
    assert!(
        frames.iter().all(|f| f.ptr_eq(&frames[0])),
        "one allocation shared by all"
    );
}

#[test]
fn one_id_on_several_connections_receives_on_all() {
    let mut sim = Sim::new(full_config(), 15);
    let tab1 = connected(&mut sim, ClientConfig::default());
    let tab2 = connected(&mut sim, ClientConfig::default());
    sim.authenticate(tab1, "alice", true);
    sim.authenticate(tab2, "alice", true);
    sim.run_for(Duration::from_millis(50));
    sim.server_send(
        &Message::dispatch("DM", json!({})),
        &Recipients::Ids(vec!["alice".into()]),
    );
    sim.run_for(Duration::from_millis(50));
    assert_eq!(sim.clients[tab1].log.messages().len(), 1);
    assert_eq!(sim.clients[tab2].log.messages().len(), 1);
}

// ----- client behaviour -----

#[test]
fn connected_flags_follow_upstream_semantics() {
    let mut sim = Sim::new(full_config(), 16);
    let c = connected(&mut sim, ClientConfig::default());
    sim.cut(c);
    sim.run_for(Duration::from_secs(5));
    sim.disconnect(c, Close::new(CloseCode::NORMAL, "bye"));
    sim.connect(c);
    sim.run_for(Duration::from_millis(50));
    let flags: Vec<(bool, bool, bool)> = sim.clients[c]
        .log
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::Connected {
                is_initial_connection,
                is_initial_session_connection,
                is_automatic_reconnection,
            } => Some((
                *is_initial_connection,
                *is_initial_session_connection,
                *is_automatic_reconnection,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        flags,
        [
            (true, true, false),
            (false, false, true),
            (false, true, false)
        ]
    );
    let will: Vec<bool> = sim.clients[c]
        .log
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Disconnected { .. }))
        .map(|(_, e)| e.will_reconnect())
        .collect();
    assert_eq!(will, [true, false]);
}

#[test]
fn a_deliberate_disconnect_stops_reconnection() {
    let mut sim = Sim::new(full_config(), 17);
    let c = connected(&mut sim, ClientConfig::default());
    sim.disconnect(c, Close::new(CloseCode::NORMAL, "bye"));
    sim.run_for(Duration::from_secs(120));
    assert_eq!(sim.clients[c].log.connects.len(), 1);
    assert!(sim.clients[c].session.poll_timeout().is_none());
    assert_eq!(close_of(&sim, 0), None, "the client closed, not the server");
    let server_saw = sim
        .conn_logs
        .values()
        .next()
        .unwrap()
        .events
        .last()
        .cloned();
    assert!(
        matches!(server_saw, Some(SessionEvent::Closed { by_peer: true, close }) if close.code == CloseCode::NORMAL)
    );
}

#[test]
fn a_silent_server_is_detected_and_the_client_reconnects() {
    let mut sim = Sim::new(full_config(), 18);
    let c = connected(&mut sim, ClientConfig::default());
    sim.authenticate(c, "alice", true);
    sim.run_for(Duration::from_millis(100));
    let cut_at = sim.now;
    sim.black_hole(c);
    let detected = sim.drive_bounded(10_000, Duration::from_secs(30), |sim| {
        sim.clients[c]
            .log
            .count(|e| matches!(e, ClientEvent::Disconnected { .. }))
            == 1
    });
    assert!(detected);
    // Nothing for interval × (max_attempts + 1) = 4 s after the last frame received.
    let elapsed = sim.now - cut_at;
    assert!(
        elapsed <= Duration::from_secs(4) && elapsed > Duration::from_secs(3),
        "{elapsed:?}"
    );
    let back = sim.drive_bounded(10_000, Duration::from_secs(30), |sim| {
        sim.clients[c].session.is_authenticated()
    });
    assert!(back, "reconnected and re-authenticated by itself");
    assert_eq!(sim.clients[c].log.connects.len(), 2);
    let auths = sim.clients[c]
        .log
        .sent
        .iter()
        .filter(|f| f.starts_with(r#"{"op":2"#))
        .count();
    assert_eq!(
        auths, 2,
        "same credentials sent again after the automatic reconnection"
    );
}

#[test]
fn sends_while_disconnected_are_queued_flushed_in_order_and_bounded() {
    let limits = mesa_core::Limits {
        max_queued_sends: 3,
        ..Default::default()
    };
    let mut sim = Sim::new(full_config(), 19);
    let c = sim.add_client(ClientConfig {
        limits,
        ..ClientConfig::default()
    });
    for n in 0..3 {
        sim.send(c, Message::dispatch("ECHO", json!(n))).unwrap();
    }
    assert_eq!(
        sim.send(c, Message::dispatch("ECHO", json!(3))),
        Err(mesa_core::ClientError::QueueFull(3))
    );
    sim.connect(c);
    sim.run_for(Duration::from_millis(100));
    let echoed: Vec<Value> = sim.clients[c]
        .log
        .messages()
        .iter()
        .map(|m| m.d.clone())
        .collect();
    assert_eq!(echoed, [json!(0), json!(1), json!(2)]);
    assert_eq!(sim.clients[c].session.queued(), 0);
}

#[test]
fn reconnection_backs_off_with_jitter_while_the_server_is_down() {
    let mut sim = Sim::new(full_config(), 20);
    let config = ClientConfig {
        backoff: BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            base_is_fixed: true,
        },
        ..ClientConfig::default()
    };
    let clients: Vec<usize> = (0..20)
        .map(|_| connected(&mut sim, config.clone()))
        .collect();
    sim.crash_server();
    sim.run_for(Duration::from_secs(20));
    for &c in &clients {
        let connects = &sim.clients[c].log.connects;
        assert!(connects.len() > 5, "keeps trying: {}", connects.len());
        let gaps: Vec<Duration> = connects.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        // Gap n follows failed attempt n + 1: a delay in [0, min(cap, base·2^(n+1))]
        // plus the time the refused attempt took (the link latency).
        for (n, gap) in gaps.iter().enumerate() {
            let ceiling =
                (Duration::from_millis(100) * 2u32.pow(n as u32 + 1)).min(Duration::from_secs(5));
            assert!(
                *gap <= ceiling + sim.latency,
                "attempt {n}: {gap:?} > {ceiling:?}"
            );
        }
    }
    // Jitter: the clients' first retries are spread, not simultaneous.
    let first_retries: std::collections::HashSet<Duration> = clients
        .iter()
        .map(|&c| sim.clients[c].log.connects[1] - sim.start)
        .collect();
    assert!(first_retries.len() > 15, "{first_retries:?}");
    sim.server_up = true;
    let all_back = sim.drive_bounded(100_000, Duration::from_secs(30), |sim| {
        clients.iter().all(|&c| sim.clients[c].session.is_open())
    });
    assert!(all_back);
}

// ----- sync -----

fn sync_config(redelivery_ms: u64) -> ServerConfig {
    ServerConfig::builder()
        .authentication(AuthConfig::default())
        .sync(SyncConfig {
            redelivery_interval: Duration::from_millis(redelivery_ms),
            ..SyncConfig::default()
        })
        .build()
        .unwrap()
}

fn to_bob(n: u64) -> Message {
    Message::dispatch("BROADCAST", json!({"to": ["bob"], "n": n}))
}

#[test]
fn messages_for_an_offline_id_are_redelivered_in_order_numbered_from_one() {
    let mut sim = Sim::new(sync_config(10), 21);
    let alice = connected(&mut sim, ClientConfig::default());
    sim.authenticate(alice, "alice", true);
    for n in 0..5 {
        sim.send(alice, to_bob(n)).unwrap();
    }
    sim.run_for(Duration::from_millis(50));
    assert_eq!(sim.store["bob"].len(), 5);
    let bob = connected(&mut sim, ClientConfig::default());
    sim.authenticate(bob, "bob", true);
    sim.run_for(SECOND);
    let got: Vec<(Option<u64>, Value)> = sim.clients[bob]
        .log
        .messages()
        .iter()
        .map(|m| (m.s, m.d["n"].clone()))
        .collect();
    assert_eq!(
        got,
        (0..5).map(|n| (Some(n + 1), json!(n))).collect::<Vec<_>>()
    );
    assert!(!sim.store.contains_key("bob"), "removed once written");
    // Paced: the frames went out redelivery_interval apart.
    let times: Vec<_> = sim.clients[bob]
        .log
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Message(_)))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        times
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_millis(10)),
        "{times:?}"
    );
}

/// A store that does not answer holds the connection for `load_timeout` at most:
/// op 22 goes out at once, heartbeats keep their schedule, and at the deadline the
/// session stops waiting (a late answer is refused; the messages stay stored).
#[test]
fn a_load_the_store_does_not_answer_is_given_up_at_its_timeout() {
    let config = ServerConfig::builder()
        .heartbeat(heartbeat(1000, 3))
        .authentication(AuthConfig::default())
        .sync(SyncConfig::default())
        .build()
        .unwrap();
    let start = sim_now();
    let mut session = ServerSession::new(Arc::new(config), start);
    session.handle_frame(start, r#"{"op":2,"d":{"token":"bob"}}"#);
    let _ = std::iter::from_fn(|| session.poll_event()).count();
    session
        .accept(start, "bob".into(), json!({"id": "bob"}))
        .unwrap();
    let ops: Vec<Value> = std::iter::from_fn(|| session.poll_transmit())
        .filter_map(|t| match t {
            Transmit::Text(frame) => serde_json::from_str::<Value>(frame.as_str()).ok(),
            Transmit::Close(_) => None,
        })
        .map(|frame| frame["op"].clone())
        .collect();
    assert_eq!(
        ops,
        [json!(10), json!(22)],
        "op 22 without waiting for the load"
    );
    assert!(
        std::iter::from_fn(|| session.poll_event())
            .any(|e| matches!(e, SessionEvent::LoadUndelivered { .. }))
    );
    assert!(session.awaits_undelivered());
    let deadline = start + SyncConfig::default().load_timeout;
    let mut beats = 0;
    while let Some(at) = session.poll_timeout().filter(|at| *at <= deadline) {
        session.handle_timeout(at);
        beats += std::iter::from_fn(|| session.poll_transmit()).count();
        session.handle_frame(at, r#"{"op":11}"#);
    }
    assert_eq!(beats, 5, "heartbeats went on while the load waited");
    assert!(!session.awaits_undelivered(), "given up at the deadline");
    assert_eq!(
        session.handle_undelivered(deadline, vec![to_bob(1)]),
        Err(mesa_core::SessionError::NoPendingSync)
    );
    assert!(!session.is_closed());
}

#[test]
fn should_sync_false_clears_the_stored_messages() {
    let mut sim = Sim::new(sync_config(0), 22);
    let alice = connected(&mut sim, ClientConfig::default());
    sim.authenticate(alice, "alice", true);
    sim.send(alice, to_bob(1)).unwrap();
    sim.run_for(Duration::from_millis(50));
    let bob = connected(&mut sim, ClientConfig::default());
    sim.authenticate(bob, "bob", false);
    sim.run_for(SECOND);
    assert!(sim.clients[bob].log.messages().is_empty());
    assert!(!sim.store.contains_key("bob"));
}

#[test]
fn a_drop_during_redelivery_keeps_the_rest_for_next_time() {
    let mut sim = Sim::new(sync_config(100), 23);
    let alice = connected(&mut sim, ClientConfig::default());
    sim.authenticate(alice, "alice", true);
    for n in 0..10 {
        sim.send(alice, to_bob(n)).unwrap();
    }
    sim.run_for(Duration::from_millis(50));
    let bob = connected(
        &mut sim,
        ClientConfig {
            reconnect: false,
            ..ClientConfig::default()
        },
    );
    sim.authenticate(bob, "bob", true);
    sim.run_for(Duration::from_millis(350));
    sim.cut(bob);
    let first: Vec<Value> = sim.clients[bob]
        .log
        .messages()
        .iter()
        .map(|m| m.d["n"].clone())
        .collect();
    assert_eq!(first, [json!(0), json!(1), json!(2), json!(3)]);
    assert_eq!(
        sim.store["bob"].len(),
        6,
        "only what was written left the store"
    );
    let again = connected(&mut sim, ClientConfig::default());
    sim.authenticate(again, "bob", true);
    sim.run_for(SECOND);
    let rest: Vec<(Option<u64>, Value)> = sim.clients[again]
        .log
        .messages()
        .iter()
        .map(|m| (m.s, m.d["n"].clone()))
        .collect();
    assert_eq!(
        rest,
        (4..10).map(|n| (Some(n - 3), json!(n))).collect::<Vec<_>>()
    );
}

// ----- rooms -----

/// The room messages client `c` received, with their rooms.
fn room_messages(sim: &Sim, c: usize) -> Vec<(String, Message)> {
    sim.clients[c]
        .log
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::RoomMessage { room, message, .. } => Some((room.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

fn subscribed(sim: &Sim, c: usize, room: &str) -> usize {
    sim.clients[c].log.count(
        |e| matches!(e, ClientEvent::Subscribed { room: r, reference: Some(_), .. } if r == room),
    )
}

#[test]
fn room_members_receive_with_the_room_and_an_old_client_sees_plain_dispatches() {
    let config = ServerConfig::builder()
        .rooms(true)
        .authentication(AuthConfig::default())
        .reconnect_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let mut sim = Sim::new(config, 21);
    let old = ClientConfig {
        rooms: false,
        ..ClientConfig::default()
    };
    let clients = [
        (sim.add_client(ClientConfig::default()), "alice"),
        (sim.add_client(ClientConfig::default()), "bob"),
        (sim.add_client(old), "carol"),
    ];
    let [(alice, _), (bob, _), (carol, _)] = clients;
    for (c, token) in clients {
        sim.authenticate(c, token, false);
        sim.connect(c);
    }
    // Subscribed before the connection exists: sent once the server knows who asks.
    for c in [alice, bob] {
        sim.command(c, |s, now| s.subscribe(now, "lobby", None))
            .unwrap();
    }
    sim.run_for(Duration::from_millis(100));
    assert_eq!(
        (
            subscribed(&sim, alice, "lobby"),
            subscribed(&sim, bob, "lobby")
        ),
        (1, 1)
    );
    sim.server_join_id("carol", "lobby");
    let hi = Message::dispatch("CHAT", json!({"text": "hi"}));
    sim.command(alice, |s, now| s.publish(now, "lobby", hi.clone()))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    for c in [alice, bob] {
        assert_eq!(room_messages(&sim, c), [("lobby".to_owned(), hi.clone())]);
    }
    assert_eq!(sim.clients[carol].log.messages(), [&hi]);
    // Nothing new reached the client that did not opt in.
    let carol_frames: Vec<String> = sim
        .conn_logs
        .values()
        .filter(|log| log.client == carol)
        .flat_map(|log| &log.transmits)
        .filter_map(|t| match t {
            Transmit::Text(frame) => Some(frame.as_str().to_owned()),
            Transmit::Close(_) => None,
        })
        .collect();
    assert!(
        carol_frames
            .iter()
            .all(|f| !f.contains("mesa:") && !f.contains(r#""room""#)),
        "{carol_frames:?}"
    );

    // A reconnection restores bob's subscription by itself.
    sim.cut(bob);
    let restored = sim.drive_bounded(10_000, Duration::from_secs(10), |sim| {
        subscribed(sim, bob, "lobby") == 2
    });
    assert!(restored, "bob subscribed again after reconnecting");
    let again = Message::dispatch("CHAT", json!({"text": "again"}));
    sim.server_publish(&again, "lobby");
    sim.run_for(Duration::from_millis(100));
    assert_eq!(
        room_messages(&sim, bob).last(),
        Some(&("lobby".to_owned(), again))
    );
    assert_eq!(room_messages(&sim, alice).len(), 2);
    assert_eq!(sim.clients[carol].log.messages().len(), 2);
}
