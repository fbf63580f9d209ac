//! One test per decision of the portal's state machine, [`PortalMember`]: its id,
//! the link and its subscription, registering and announcing, which client events
//! it takes, what it reports, the dead-link check, reconnecting and registering
//! anew, giving up before it ever joined, and leaving once; then property tests of
//! its invariants over random faults ([`PortalRig`]).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mesa_core::sim::PortalRig;
use mesa_core::sim::portal::{Answer, Step};
use mesa_core::{
    Call, ConfigError, Namespace, PortalCommand, PortalEvent, PortalEventKind, PortalMember,
    PortalMemberConfig, PortalMemberEvent, PortalUpdate, RedisValue, Token,
};
use proptest::prelude::*;

/// The one clock read of these tests; every other instant is an offset from it.
fn t0() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

fn at(ms: u64) -> Instant {
    t0() + Duration::from_millis(ms)
}

#[derive(Default, Debug)]
struct Out {
    commands: Vec<(Token, PortalCommand)>,
    events: Vec<PortalMemberEvent>,
}

impl Out {
    fn commands(&self) -> Vec<&PortalCommand> {
        self.commands.iter().map(|(_, command)| command).collect()
    }

    fn token(&self, command: &PortalCommand) -> Token {
        let found = self.commands.iter().find(|(_, c)| c == command);
        found
            .map(|(token, _)| *token)
            .expect("the command was asked")
    }
}

fn drain(portal: &mut PortalMember) -> Out {
    let mut out = Out::default();
    while let Some(command) = portal.poll_command() {
        out.commands.push(command);
    }
    while let Some(event) = portal.poll_event() {
        out.events.push(event);
    }
    out
}

fn config() -> PortalMemberConfig {
    PortalMemberConfig {
        namespace: Namespace::new(Some("prod".into())),
        id: Some("p1".into()),
        ..PortalMemberConfig::default()
    }
}

fn int(n: i64) -> Result<Vec<RedisValue>, String> {
    Ok(vec![RedisValue::Int(n)])
}

/// A portal whose link opened at `at(0)`: its `SADD` is out.
fn linked(config: PortalMemberConfig) -> (PortalMember, Token) {
    let mut portal = PortalMember::new(config, 7, at(0)).unwrap();
    drain(&mut portal);
    portal.handle_link_up(at(0));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Register]);
    (portal, out.token(&PortalCommand::Register))
}

/// A portal in the pool since `at(0)`.
fn joined(config: PortalMemberConfig) -> PortalMember {
    let (mut portal, register) = linked(config);
    portal.handle_reply(at(0), register, int(0));
    assert_eq!(drain(&mut portal).events, [PortalMemberEvent::Joined]);
    portal
}

fn event_to(portal_id: &str) -> PortalEvent {
    PortalEvent {
        kind: PortalEventKind::Authentication,
        client_id: Some("alice".into()),
        portal_id: portal_id.into(),
    }
}

/// The link fails at `at(ms)`: the portal drops it and says why; what it says next.
fn link_down(portal: &mut PortalMember, ms: u64, reason: &str) -> Vec<PortalMemberEvent> {
    portal.handle_link_down(at(ms), reason);
    let mut out = drain(portal);
    assert_eq!(out.commands(), [&PortalCommand::Disconnect]);
    let reason = reason.to_owned();
    assert_eq!(out.events.remove(0), PortalMemberEvent::LinkDown { reason });
    out.events
}

/// Fail the link of a portal in the pool at `at(ms)`; returns when it reconnects.
fn fail(portal: &mut PortalMember, ms: u64) -> Instant {
    assert!(link_down(portal, ms, "cut").is_empty());
    portal.poll_timeout().expect("a reconnection is due")
}

/// Stopped, failing for `reason`.
fn stopped(reason: &str) -> PortalMemberEvent {
    let outcome = Err(reason.to_owned());
    PortalMemberEvent::Stopped { outcome }
}

/// Fail the link of a portal in the pool at `at(ms)`, and let it try again: its
/// Connect is out at the returned instant.
fn reconnecting(portal: &mut PortalMember, ms: u64) -> Instant {
    let due = fail(portal, ms);
    portal.handle_timeout(due);
    let out = drain(portal);
    assert!(matches!(
        out.commands()[..],
        [PortalCommand::Connect { .. }]
    ));
    due
}

/// Answer `token` with `n`: the portal asks `next` and nothing else, and says
/// nothing; the token of `next`.
fn answer_then(portal: &mut PortalMember, token: Token, n: i64, next: PortalCommand) -> Token {
    portal.handle_reply(at(1), token, int(n));
    let out = drain(portal);
    assert_eq!(out.commands(), [&next]);
    assert!(out.events.is_empty(), "{:?}", out.events);
    out.token(&next)
}

/// Stopped, having left the pool.
const LEFT: PortalMemberEvent = PortalMemberEvent::Stopped { outcome: Ok(()) };

/// Whether the last event says it stopped, failing.
fn stopped_failing(events: &[PortalMemberEvent]) -> bool {
    matches!(
        events.last(),
        Some(PortalMemberEvent::Stopped { outcome: Err(_) })
    )
}

#[test]
fn its_id_is_the_configured_one_or_a_uuid_drawn_from_the_seed() {
    let fixed = PortalMember::new(config(), 1, at(0)).unwrap();
    assert_eq!(fixed.id(), "p1");
    let drawn = |seed| {
        let config = PortalMemberConfig::default();
        PortalMember::new(config, seed, at(0))
            .unwrap()
            .id()
            .to_owned()
    };
    assert_eq!(drawn(5), drawn(5));
    assert_ne!(drawn(5), drawn(6));
    assert_eq!(drawn(5).len(), 36);
    assert_eq!(&drawn(5)[14..15], "4", "a version 4 UUID");
}

#[test]
fn settings_are_checked_once() {
    let zero = PortalMemberConfig {
        ping_interval: Duration::ZERO,
        ..config()
    };
    assert_eq!(
        PortalMember::new(zero, 1, at(0)).unwrap_err(),
        ConfigError::ZeroDuration("portal ping interval")
    );
    let mut inverted = config();
    inverted.reconnect.cap = inverted.reconnect.base / 2;
    assert_eq!(inverted.validate(), Err(ConfigError::BackoffCapBelowBase));
}

#[test]
fn it_opens_the_link_subscribed_to_the_portal_channel_then_registers() {
    let mut portal = PortalMember::new(config(), 1, at(0)).unwrap();
    let out = drain(&mut portal);
    let channel = "portal_prod".to_owned();
    assert_eq!(out.commands(), [&PortalCommand::Connect { channel }]);
    assert_eq!(
        portal.poll_timeout(),
        Some(at(3000)),
        "the Connect's deadline"
    );
    portal.handle_link_up(at(10));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Register]);
    assert_eq!(out.events, [PortalMemberEvent::LinkUp]);
    assert!(!portal.is_joined(), "not before Redis answers");
}

#[test]
fn commands_stand_for_upstreams_keys_and_updates() {
    let portal = PortalMember::new(config(), 1, at(0)).unwrap();
    let keys = portal.keys();
    let plain = |name: &'static str, args: &[&str]| Call::Plain {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let pool = "available_portals_pool_prod";
    assert_eq!(
        PortalCommand::Register.calls(keys),
        [plain("SADD", &[pool, "p1"])]
    );
    assert_eq!(
        PortalCommand::Leave.calls(keys),
        [plain("SREM", &[pool, "p1"])]
    );
    let update = PortalUpdate {
        id: "p1".into(),
        ready: false,
    };
    assert_eq!(
        PortalCommand::Announce { ready: false }.calls(keys),
        [plain("PUBLISH", &[pool, &update.encode()])]
    );
    assert_eq!(PortalCommand::Ping.calls(keys), [plain("PING", &[])]);
    assert!(PortalCommand::Disconnect.calls(keys).is_empty());
}

#[test]
fn a_new_registration_is_announced_and_a_known_one_is_not() {
    let (mut portal, register) = linked(config());
    // Joined once the servers are told.
    let announce = answer_then(
        &mut portal,
        register,
        1,
        PortalCommand::Announce { ready: true },
    );
    portal.handle_reply(at(2), announce, int(3));
    assert_eq!(drain(&mut portal).events, [PortalMemberEvent::Joined]);
    assert!(portal.is_joined());

    // Already in the set: no announcement (an upstream server would list it twice).
    let (mut known, register) = linked(config());
    known.handle_reply(at(1), register, int(0));
    let out = drain(&mut known);
    assert!(out.commands.is_empty());
    assert_eq!(out.events, [PortalMemberEvent::Joined]);
}

#[test]
fn it_takes_only_the_events_addressed_to_it() {
    let mut portal = joined(config());
    for to in ["p2", "p1", ""] {
        portal.handle_pubsub(at(1), "portal_prod", event_to(to).encode().as_bytes());
    }
    let out = drain(&mut portal);
    assert_eq!(out.events, [PortalMemberEvent::Client(event_to("p1"))]);
}

#[test]
fn report_all_events_takes_every_event() {
    let mut portal = joined(PortalMemberConfig {
        report_all_events: true,
        ..config()
    });
    for to in ["p2", "p1"] {
        portal.handle_pubsub(at(1), "portal_prod", event_to(to).encode().as_bytes());
    }
    let taken = drain(&mut portal).events;
    let expected = ["p2", "p1"].map(|to| PortalMemberEvent::Client(event_to(to)));
    assert_eq!(taken, expected);
}

#[test]
fn events_count_from_the_link_up_until_it_leaves() {
    let (mut portal, _) = linked(config());
    let event = event_to("p1").encode();
    // Subscribed before registering: an event may come before Redis answers.
    portal.handle_pubsub(at(1), "portal_prod", event.as_bytes());
    assert_eq!(drain(&mut portal).events.len(), 1);
    portal.handle_close(at(2));
    drain(&mut portal);
    portal.handle_pubsub(at(3), "portal_prod", event.as_bytes());
    assert!(
        drain(&mut portal).events.is_empty(),
        "closed: nobody reads it"
    );

    let mut down = joined(config());
    fail(&mut down, 5);
    down.handle_pubsub(at(6), "portal_prod", event.as_bytes());
    assert!(
        drain(&mut down).events.is_empty(),
        "a message of a dropped link"
    );
}

#[test]
fn unreadable_messages_are_reported_never_dropped() {
    let mut portal = joined(config());
    let text = event_to("p1").encode();
    portal.handle_pubsub(at(1), "portal_prod", b"{not json");
    portal.handle_pubsub(at(1), "portal_prod", &[0xff, 0xfe]);
    portal.handle_pubsub(at(1), "portal_prod", br#"{"type":"nope","portalId":"p1"}"#);
    portal.handle_pubsub(at(1), "ws_prod", text.as_bytes());
    let out = drain(&mut portal);
    let channels: Vec<&str> = out
        .events
        .iter()
        .map(|event| match event {
            PortalMemberEvent::Undecodable { channel, .. } => channel.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        channels,
        ["portal_prod", "portal_prod", "portal_prod", "ws_prod"]
    );
}

#[test]
fn it_pings_the_live_link_one_ping_at_a_time() {
    let mut portal = joined(config());
    assert_eq!(portal.poll_timeout(), Some(at(5000)));
    portal.handle_timeout(at(4999));
    assert!(drain(&mut portal).commands.is_empty(), "early: nothing");
    portal.handle_timeout(at(5000));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Ping]);
    let ping = out.token(&PortalCommand::Ping);
    portal.handle_timeout(at(5000));
    assert!(
        drain(&mut portal).commands.is_empty(),
        "twice: nothing more"
    );
    // Any answer will do (subscribed, Redis answers an array).
    let pong = vec![RedisValue::Array(vec![RedisValue::Text("pong".into())])];
    portal.handle_reply(at(5001), ping, Ok(pong));
    assert!(drain(&mut portal).events.is_empty());
    assert_eq!(portal.poll_timeout(), Some(at(10_000)));
}

#[test]
fn an_unanswered_command_fails_the_link_at_its_deadline() {
    let mut portal = joined(config());
    portal.handle_timeout(at(5000));
    drain(&mut portal);
    // Ping out at 5 s: Redis has 3 s to answer.
    assert_eq!(portal.poll_timeout(), Some(at(8000)));
    portal.handle_timeout(at(8000));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Disconnect]);
    let reason = "Redis did not answer in time".to_owned();
    assert_eq!(out.events, [PortalMemberEvent::LinkDown { reason }]);
    assert!(!portal.is_joined());
}

#[test]
fn error_replies_and_answers_of_the_wrong_shape_fail_the_link() {
    let (mut portal, register) = linked(config());
    portal.handle_reply(at(1), register, int(0));
    drain(&mut portal);
    portal.handle_timeout(at(5000));
    let ping = drain(&mut portal).token(&PortalCommand::Ping);
    portal.handle_reply(at(5001), ping, Err("LOADING".into()));
    let reason = "Redis: LOADING".to_owned();
    assert!(
        drain(&mut portal)
            .events
            .contains(&PortalMemberEvent::LinkDown { reason })
    );

    let (mut wrong, register) = linked(config());
    wrong.handle_reply(at(1), register, Ok(vec![RedisValue::Text("OK".into())]));
    let reason = "unexpected reply to SADD".to_owned();
    assert!(
        drain(&mut wrong)
            .events
            .contains(&PortalMemberEvent::LinkDown { reason })
    );
}

#[test]
fn it_reconnects_with_backoff_and_registers_anew() {
    let mut portal = joined(config());
    let mut now = 1000;
    // The link fails, then every attempt fails: each waits at most its ceiling.
    let mut due = reconnecting(&mut portal, now);
    let ceilings = [200, 400, 800, 1600, 3200, 5000, 5000];
    assert!(due <= at(now + 100), "the first attempt beyond 100 ms");
    for ceiling in ceilings {
        now = (due - t0()).as_millis() as u64;
        portal.handle_link_down(at(now), "refused");
        drain(&mut portal);
        due = portal.poll_timeout().unwrap();
        assert!(due <= at(now + ceiling), "an attempt beyond {ceiling} ms");
        portal.handle_timeout(due);
        let out = drain(&mut portal);
        assert!(matches!(
            out.commands()[..],
            [PortalCommand::Connect { .. }]
        ));
    }
    // Redis is back, having lost the registration (a restart): registered and
    // announced anew.
    portal.handle_link_up(due);
    let register = drain(&mut portal).token(&PortalCommand::Register);
    let announce = answer_then(
        &mut portal,
        register,
        1,
        PortalCommand::Announce { ready: true },
    );
    portal.handle_reply(due, announce, int(1));
    assert_eq!(drain(&mut portal).events, [PortalMemberEvent::Joined]);

    // Joined: the next failure starts from the base again.
    let now = (due - t0()).as_millis() as u64;
    let again = fail(&mut portal, now);
    assert!(again <= at(now + 100));
}

#[test]
fn it_gives_up_when_its_first_link_fails() {
    let mut portal = PortalMember::new(config(), 1, at(0)).unwrap();
    drain(&mut portal);
    let refused = "Connection refused";
    assert_eq!(link_down(&mut portal, 5, refused), [stopped(refused)]);
    assert!(portal.is_stopped());
    assert_eq!(portal.poll_timeout(), None, "no reconnection");

    // Linked but refused before joining: the same.
    let (mut refused, register) = linked(config());
    refused.handle_reply(at(1), register, Err("NOPERM".into()));
    assert!(stopped_failing(&drain(&mut refused).events));
}

#[test]
fn closing_leaves_the_pool_and_announces_it_once() {
    let mut portal = joined(config());
    portal.handle_close(at(10));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Leave]);
    portal.handle_close(at(11));
    assert!(
        drain(&mut portal).commands.is_empty(),
        "a second close does nothing"
    );
    let leave = out.token(&PortalCommand::Leave);
    let announce = answer_then(
        &mut portal,
        leave,
        1,
        PortalCommand::Announce { ready: false },
    );
    portal.handle_reply(at(13), announce, int(2));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Disconnect]);
    assert_eq!(out.events, [LEFT]);
    assert_eq!(portal.poll_timeout(), None);
    portal.handle_timeout(at(100_000));
    portal.handle_close(at(100_000));
    let out = drain(&mut portal);
    assert!(out.commands.is_empty() && out.events.is_empty(), "stopped");
}

#[test]
fn leaving_a_pool_that_no_longer_holds_it_is_not_announced() {
    let mut portal = joined(config());
    portal.handle_close(at(10));
    let leave = drain(&mut portal).token(&PortalCommand::Leave);
    portal.handle_reply(at(11), leave, int(0));
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Disconnect]);
    assert_eq!(out.events, [LEFT]);
}

#[test]
fn closing_while_registering_pairs_the_announcements() {
    let (mut portal, register) = linked(config());
    portal.handle_close(at(1));
    let leave = drain(&mut portal).token(&PortalCommand::Leave);
    // Redis ran the SADD (it added the id), then the SREM; leaving, it never joins.
    let joined = answer_then(
        &mut portal,
        register,
        1,
        PortalCommand::Announce { ready: true },
    );
    let left = answer_then(
        &mut portal,
        leave,
        1,
        PortalCommand::Announce { ready: false },
    );
    portal.handle_reply(at(4), joined, int(0));
    assert!(
        drain(&mut portal).events.is_empty(),
        "one announcement still out"
    );
    portal.handle_reply(at(5), left, int(0));
    let events = drain(&mut portal).events;
    assert_eq!(events, [LEFT]);
}

#[test]
fn closing_without_redis_fails_at_once() {
    let mut portal = joined(config());
    let due = fail(&mut portal, 10);
    portal.handle_close(at(11));
    let out = drain(&mut portal);
    assert!(out.commands.is_empty(), "the link was dropped already");
    assert_eq!(out.events, [stopped("cut")]);
    portal.handle_timeout(due);
    assert!(drain(&mut portal).commands.is_empty(), "no reconnection");
}

#[test]
fn closing_while_connecting_leaves_once_the_link_opens() {
    let mut portal = joined(config());
    let due = reconnecting(&mut portal, 10);
    portal.handle_close(due);
    assert!(drain(&mut portal).commands.is_empty(), "waits for the link");
    portal.handle_link_up(due);
    let out = drain(&mut portal);
    assert_eq!(out.commands(), [&PortalCommand::Leave], "no registration");
    portal.handle_reply(due, out.token(&PortalCommand::Leave), int(0));
    let events = drain(&mut portal).events;
    assert_eq!(events, [LEFT]);

    // The link never opens: it stops when the Connect times out.
    let mut portal = joined(config());
    let due = reconnecting(&mut portal, 10);
    portal.handle_close(due);
    portal.handle_timeout(due + Duration::from_secs(3));
    assert!(stopped_failing(&drain(&mut portal).events));
}

#[test]
fn a_failure_while_leaving_stops_it_with_the_reason() {
    let mut portal = joined(config());
    portal.handle_close(at(10));
    drain(&mut portal);
    assert_eq!(link_down(&mut portal, 11, "reset"), [stopped("reset")]);
    assert_eq!(portal.poll_timeout(), None, "no reconnection to leave");
}

#[test]
fn stale_answers_and_early_timeouts_change_nothing() {
    let (mut portal, register) = linked(config());
    let before = portal.poll_timeout();
    portal.handle_reply(at(1), Token(register.0 + 100), int(1));
    portal.handle_timeout(at(1));
    assert!(drain(&mut portal).commands.is_empty());
    assert_eq!(portal.poll_timeout(), before);
    // A link up with no Connect out is ignored too.
    portal.handle_link_up(at(2));
    assert!(drain(&mut portal).events.is_empty());
    // The answer of a failed link is ignored after the reconnection.
    let mut portal = joined(config());
    portal.handle_timeout(at(5000));
    let ping = drain(&mut portal).token(&PortalCommand::Ping);
    let due = reconnecting(&mut portal, 5001);
    portal.handle_link_up(due);
    drain(&mut portal);
    portal.handle_reply(due, ping, Err("late".into()));
    assert!(drain(&mut portal).events.is_empty(), "not this link's");
}

/// Steps of the rig, weighted toward what happens: answers and time.
fn step() -> impl Strategy<Value = Step> {
    let answer = prop_oneof![
        6 => Just(Answer::Right),
        1 => Just(Answer::Wrong),
        1 => Just(Answer::Error),
        1 => Just(Answer::Lost),
    ];
    prop_oneof![
        3 => any::<bool>().prop_map(|restarted| Step::LinkUp { restarted }),
        1 => Just(Step::LinkDown),
        6 => (any::<bool>(), answer).prop_map(|(ping, how)| Step::Answer { ping, how }),
        1 => (0u64..40).prop_map(|token| Step::Stale { token }),
        3 => any::<bool>().prop_map(|to_me| Step::Event { to_me }),
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(elsewhere, bytes)| Step::Garbage { elsewhere, bytes }),
        3 => (0u16..8000).prop_map(|ms| Step::Advance { ms }),
    ]
}

proptest! {
    /// Whatever the faults, a portal takes only the events addressed to it (unless
    /// it reports all), announces only what changed the pool, and once the link
    /// works again it is back in the pool, Redis holding its id.
    #[test]
    fn after_any_faults_it_registers_again_once_linked(
        steps in prop::collection::vec(step(), 0..60),
        report_all in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rig = PortalRig::new(report_all, seed, t0());
        for step in steps {
            rig.step(step);
        }
        rig.heal();
        prop_assert!(rig.registered());
    }

    /// Closed at any moment of any sequence of faults (and closed again), a portal
    /// leaves at most once and stops exactly once: fine when Redis works, and then Redis no longer
    /// holds its id; nothing is asked after.
    #[test]
    fn it_leaves_exactly_once(
        before in prop::collection::vec(step(), 0..40),
        after in prop::collection::vec(prop_oneof![9 => step(), 1 => Just(Step::Close)], 0..20),
        seed in any::<u64>(),
    ) {
        let mut rig = PortalRig::new(false, seed, t0());
        for step in before {
            rig.step(step);
        }
        rig.step(Step::Close);
        for step in after {
            rig.step(step);
        }
        rig.heal();
        prop_assert!(rig.stopped().is_some());
        if rig.stopped() == Some(&Ok(())) {
            prop_assert!(!rig.registered());
        }
    }
}
