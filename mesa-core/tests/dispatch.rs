//! The Dispatcher's decisions, as [`Dispatch`] makes them: what it publishes and
//! stores, op 5 never stored, rounds for big lists, errors, and its report.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Instant;

use mesa_core::cluster::IDS_PER_ROUND;
use mesa_core::{
    Command, Dispatch, DispatchConfig, Envelope, Message, Opcode, Recipients, RedisValue, Token,
};
use proptest::prelude::*;
use serde_json::json;

fn t0() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("u{i}")).collect()
}

fn synced() -> DispatchConfig {
    DispatchConfig {
        sync: true,
        ..DispatchConfig::default()
    }
}

/// A Redis where the ids in `online` are connected (and `arrive` connect between
/// the presence check and the store): runs a dispatch to its end, returning every
/// command it asked and the envelopes it published.
struct Redis {
    online: BTreeSet<String>,
    arrive: BTreeSet<String>,
    commands: Vec<Command>,
    published: Vec<Envelope>,
    stored: Vec<String>,
}

impl Redis {
    fn new(online: &[String], arrive: &[String]) -> Self {
        Redis {
            online: online.iter().cloned().collect(),
            arrive: arrive.iter().cloned().collect(),
            commands: Vec::new(),
            published: Vec::new(),
            stored: Vec::new(),
        }
    }

    fn answer(&mut self, command: &Command) -> Vec<RedisValue> {
        self.commands.push(command.clone());
        match command {
            Command::CheckPresence { ids } => vec![RedisValue::Array(
                ids.iter()
                    .map(|id| RedisValue::Int(i64::from(self.online.contains(id))))
                    .collect(),
            )],
            Command::StoreMany { ids, .. } => {
                let (now_online, offline): (Vec<_>, Vec<_>) =
                    ids.iter().cloned().partition(|id| self.arrive.contains(id));
                self.stored.extend(offline.iter().cloned());
                let mut reply = vec![RedisValue::Int(offline.len() as i64), RedisValue::Int(0)];
                reply.extend(now_online.into_iter().map(RedisValue::Text));
                vec![RedisValue::Array(reply)]
            }
            Command::Publish { payload, .. } => {
                self.published.push(Envelope::decode(payload).unwrap());
                vec![RedisValue::Int(1)]
            }
            other => panic!("a dispatch asked {other:?}"),
        }
    }

    /// Answer every command, a round trip at a time, until the dispatch is over.
    fn run(&mut self, mut dispatch: Dispatch) -> Result<mesa_core::DispatchReport, String> {
        loop {
            let batch: Vec<(Token, Command)> =
                std::iter::from_fn(|| dispatch.poll_command()).collect();
            if batch.is_empty() {
                return dispatch.finish();
            }
            for (token, command) in batch {
                let answer = self.answer(&command);
                dispatch.handle_reply(t0(), token, Ok(answer));
            }
        }
    }
}

fn dispatch(config: &DispatchConfig, message: Message, to: &Recipients) -> Dispatch {
    Dispatch::new(config, message, None, to, t0()).unwrap()
}

#[test]
fn a_global_dispatch_is_one_publish_with_no_origin_even_with_sync() {
    let hi = Message::dispatch("HI", json!({}));
    let mut redis = Redis::new(&[], &[]);
    let report = redis
        .run(dispatch(&synced(), hi, &Recipients::All))
        .unwrap();
    assert!(report.global);
    assert_eq!(redis.commands.len(), 1);
    assert_eq!(redis.published[0].recipients, Recipients::All);
    assert_eq!(redis.published[0].origin, None);
}

#[test]
fn with_sync_the_offline_are_stored_for_and_the_online_published_to() {
    let to = Recipients::Ids(ids(4));
    let mut redis = Redis::new(&ids(2), &[]);
    let hi = Message::dispatch("HI", json!({}));
    let report = redis.run(dispatch(&synced(), hi, &to)).unwrap();
    assert_eq!((report.published, report.stored), (2, 2));
    assert_eq!(redis.stored, ["u2", "u3"]);
    assert_eq!(redis.published[0].recipients, Recipients::Ids(ids(2)));
}

#[test]
fn an_id_that_connects_between_the_check_and_the_store_is_published_to() {
    let to = Recipients::Ids(ids(3));
    let late = vec!["u2".to_owned()];
    let mut redis = Redis::new(&[], &late);
    let hi = Message::dispatch("HI", json!({}));
    let report = redis.run(dispatch(&synced(), hi, &to)).unwrap();
    assert_eq!((report.published, report.stored), (1, 2));
    assert_eq!(redis.published[0].recipients, Recipients::Ids(late));
}

#[test]
fn without_sync_or_for_op_5_nothing_is_stored() {
    let to = Recipients::Ids(ids(3));
    let kick = Message {
        t: Some("DISCONNECT_CLIENT".into()),
        ..Message::new(Opcode::Internal, json!({}))
    };
    for (config, message) in [
        (
            DispatchConfig::default(),
            Message::dispatch("HI", json!({})),
        ),
        (synced(), kick),
    ] {
        let mut redis = Redis::new(&[], &[]);
        let report = redis.run(dispatch(&config, message, &to)).unwrap();
        assert_eq!((report.published, report.stored), (3, 0));
        assert!(redis.stored.is_empty());
        assert!(matches!(redis.commands[..], [Command::Publish { .. }]));
    }
}

#[test]
fn a_big_list_goes_in_rounds_and_each_id_is_counted_once() {
    let mut list = ids(2 * IDS_PER_ROUND + 10);
    list.extend(ids(5));
    let mut redis = Redis::new(&ids(10), &[]);
    let hi = Message::dispatch("HI", json!({}));
    let report = redis
        .run(dispatch(&synced(), hi, &Recipients::Ids(list)))
        .unwrap();
    assert_eq!(report.published, 10);
    assert_eq!(report.stored, 2 * IDS_PER_ROUND);
    assert_eq!(
        redis.published.len(),
        1,
        "the online ids were all in the first round"
    );
    let checked: usize = redis
        .commands
        .iter()
        .map(|c| match c {
            Command::CheckPresence { ids } => ids.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(checked, 2 * IDS_PER_ROUND + 10);
}

#[test]
fn too_many_recipients_are_refused_before_anything() {
    let config = DispatchConfig {
        max_recipients: 2,
        ..synced()
    };
    let hi = Message::dispatch("HI", json!({}));
    let refused = Dispatch::new(&config, hi, None, &Recipients::Ids(ids(3)), t0());
    assert!(refused.is_err());
}

#[test]
fn an_error_or_a_wrong_reply_ends_the_dispatch() {
    let hi = Message::dispatch("HI", json!({}));
    let to = Recipients::Ids(ids(2));
    let mut failing = dispatch(&synced(), hi.clone(), &to);
    let (token, _) = failing.poll_command().unwrap();
    failing.handle_reply(t0(), token, Err("OOM".into()));
    assert!(failing.poll_command().is_none());
    assert_eq!(failing.finish(), Err("OOM".to_owned()));

    let mut confused = dispatch(&synced(), hi.clone(), &to);
    let (token, _) = confused.poll_command().unwrap();
    confused.handle_reply(t0(), token, Ok(vec![RedisValue::Nil]));
    assert!(confused.finish().unwrap_err().contains("presence check"));

    // Cut short: its commands unanswered.
    assert!(dispatch(&synced(), hi, &to).finish().is_err());
}

#[test]
fn a_dispatch_to_a_room_is_one_publish_on_its_channel() {
    let hi = Message::dispatch("HI", json!({}));
    let mut dispatch = Dispatch::to_room(&synced(), hi.clone(), "lobby").unwrap();
    let (token, command) = dispatch.poll_command().unwrap();
    let Command::Publish { channel, payload } = command else {
        panic!("{command:?}")
    };
    assert_eq!(channel, "mesa_room:lobby");
    let envelope = mesa_core::rooms::RoomEnvelope::decode(&payload).unwrap();
    assert_eq!((envelope.room.as_str(), envelope.origin), ("lobby", None));
    assert_eq!(envelope.message, hi);
    dispatch.handle_reply(t0(), token, Ok(vec![RedisValue::Int(2)]));
    assert!(dispatch.poll_command().is_none());
    assert_eq!(dispatch.finish().unwrap().room.as_deref(), Some("lobby"));
    assert!(Dispatch::to_room(&synced(), hi, "not a room").is_err());
}

proptest! {
    /// Whatever presence Redis reports, every distinct id is accounted for exactly
    /// once (published to, stored for or undeliverable), nothing is published to an
    /// id twice, and nothing is stored for a connected one.
    #[test]
    fn every_id_is_accounted_for_once(
        list in proptest::collection::vec(0usize..40, 0..60),
        online in proptest::collection::btree_set(0usize..40, 0..40),
        arrive in proptest::collection::btree_set(0usize..40, 0..10),
        sync in any::<bool>(),
    ) {
        let name = |i: &usize| format!("u{i}");
        let list: Vec<String> = list.iter().map(name).collect();
        let online: Vec<String> = online.iter().map(name).collect();
        let arrive: Vec<String> = arrive.iter().map(name).filter(|id| !online.contains(id)).collect();
        let config = DispatchConfig { sync, ..DispatchConfig::default() };
        let hi = Message::dispatch("HI", json!({}));
        let mut redis = Redis::new(&online, &arrive);
        let report = redis.run(dispatch(&config, hi, &Recipients::Ids(list.clone()))).unwrap();
        let distinct: BTreeSet<&String> = list.iter().collect();
        prop_assert_eq!(report.published + report.stored + report.undeliverable.len(), distinct.len());
        let mut published = Vec::new();
        for envelope in &redis.published {
            let Recipients::Ids(ids) = &envelope.recipients else { panic!() };
            published.extend(ids.iter().cloned());
        }
        let unique: BTreeSet<&String> = published.iter().collect();
        prop_assert_eq!(unique.len(), published.len());
        prop_assert!(redis.stored.iter().all(|id| !online.contains(id) && !arrive.contains(id)));
    }
}
