//! Random dispatches replayed against a `Dispatch`, with Redis answers given in any
//! order: right (the model of Redis runs the command), of the wrong shape, errors,
//! or never.
//!
//! Invariants:
//! - tokens are unique, and an answer to a token it does not wait for changes nothing;
//! - every command's calls run on the model of Redis without an error, and after
//!   each the keys are what a Node replica expects;
//! - the envelopes published decode and carry no origin;
//! - an op 5 event and a dispatch without sync store nothing;
//! - answered right to the end, the dispatch reports success, accounting for every
//!   distinct id of an explicit list exactly once; any error or wrong answer ends it
//!   with an error, and a dispatch left unanswered never claims success.
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::cluster::{Envelope, shard_of};
use mesa_core::sim::RedisModel;
use mesa_core::{
    Call, Command, Dispatch, DispatchConfig, Message, Opcode, Recipients, RedisValue, StoreWait,
    Token,
};
use serde_json::json;

const IDS: [&str; 5] = ["alice", "bob", "carol", "dave", " "];

#[derive(Arbitrary, Debug)]
struct Input {
    sync: bool,
    legacy_bus: bool,
    /// Two Redis instances (with the legacy bus off).
    sharded: bool,
    /// Stores wait for a Redis replica (the model has them all at once).
    wait: bool,
    global: bool,
    internal: bool,
    ids: Vec<u8>,
    online: Vec<u8>,
    answers: Vec<(u8, How)>,
}

#[derive(Arbitrary, Debug, PartialEq)]
enum How {
    Right,
    Wrong,
    Error,
    Stale,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fuzz_target!(|input: Input| {
    let now = start();
    let shards = if input.sharded && !input.legacy_bus {
        2
    } else {
        1
    };
    let config = DispatchConfig {
        sync: input.sync,
        legacy_bus: input.legacy_bus,
        max_recipients: 8,
        shards,
        store_wait: input.wait.then_some(StoreWait {
            replicas: 1,
            timeout: Duration::from_millis(100),
        }),
        ..DispatchConfig::default()
    };
    config.validate().expect("a valid configuration");
    let mut redis: Vec<RedisModel> = (0..shards).map(|_| RedisModel::new()).collect();
    let ns = config.namespace.clone();
    for index in &input.online {
        let id = IDS[usize::from(*index) % IDS.len()].to_owned();
        let shard = shard_of(&id, shards);
        let add = Call::Plain {
            name: "SADD",
            args: vec![ns.connected_clients(), id],
        };
        redis[shard].execute(now, &[add]).expect("SADD");
    }
    let list: Vec<String> = input
        .ids
        .iter()
        .map(|i| IDS[usize::from(*i) % IDS.len()].to_owned())
        .collect();
    let recipients = if input.global {
        Recipients::All
    } else {
        Recipients::Ids(list.clone())
    };
    let message = if input.internal {
        Message {
            t: Some("DISCONNECT_CLIENT".into()),
            ..Message::new(Opcode::Internal, json!({}))
        }
    } else {
        Message::dispatch("HI", json!({"n": 1}))
    };
    let Ok(mut dispatch) = Dispatch::new(&config, message, None, &recipients, now) else {
        let distinct: BTreeSet<&String> = list.iter().collect();
        assert!(
            distinct.len() > config.max_recipients,
            "refused within the limit"
        );
        return;
    };
    let mut tokens = BTreeSet::new();
    let mut outstanding: Vec<(Token, Command)> = Vec::new();
    let mut failed = false;
    let mut answers = input.answers.into_iter();
    loop {
        while let Some((token, command)) = dispatch.poll_command() {
            assert!(tokens.insert(token), "token {token:?} reused");
            if matches!(command, Command::StoreMany { .. }) {
                assert!(
                    input.sync && !input.internal,
                    "stored without sync: {command:?}"
                );
            }
            outstanding.push((token, command));
        }
        if outstanding.is_empty() {
            break;
        }
        let (which, how) = answers.next().unwrap_or((0, How::Right));
        let index = usize::from(which) % outstanding.len();
        let (token, command) = outstanding.remove(index);
        let reply = match how {
            How::Right | How::Stale => {
                let shard = token.shard();
                assert!(shard < shards, "{token:?} of no instance");
                let redis = &mut redis[shard];
                let values = redis
                    .execute(now, &command.calls(dispatch.keys()))
                    .unwrap_or_else(|error| panic!("{command:?} failed on Redis: {error}"));
                redis
                    .check_upstream_contract(now, &ns)
                    .unwrap_or_else(|broken| panic!("after {command:?}: {broken}"));
                for published in redis.take_published() {
                    let envelope =
                        Envelope::decode(&published.payload).expect("our envelope decodes");
                    assert_eq!(envelope.origin, None);
                }
                Ok(values)
            }
            How::Wrong => Ok(vec![RedisValue::Array(vec![RedisValue::Nil])]),
            How::Error => Err("ERR fuzzed".to_owned()),
        };
        if how == How::Stale {
            dispatch.handle_reply(now, Token(u64::MAX), reply.clone());
        }
        failed |= matches!(how, How::Error)
            || (how == How::Wrong
                && !matches!(command, Command::Publish { .. } | Command::Route { .. }));
        dispatch.handle_reply(now, token, reply);
    }
    match dispatch.finish() {
        Ok(report) => {
            assert!(!failed, "succeeded after an error");
            assert_eq!(
                report.unreplicated, 0,
                "the model's replicas have every store"
            );
            if let Recipients::Ids(_) = recipients {
                let distinct: BTreeSet<&String> = list.iter().collect();
                let accounted = report.published + report.stored + report.undeliverable.len();
                assert_eq!(accounted, distinct.len(), "{report:?}");
            }
        }
        Err(error) => assert!(failed, "failed without a fault: {error}"),
    }
});
