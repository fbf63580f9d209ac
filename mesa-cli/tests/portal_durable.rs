//! `mesa portal --durable` killed with SIGKILL in the middle of a stream of events:
//! a second portal of the group takes its partitions over once their leases expire,
//! gets back what the dead one never acknowledged, and between them every event is
//! printed (0 lost), the dead one's unacknowledged ones at most twice, each client's
//! events in order at the survivor.
//!
//! The events are appended to the durable streams directly, in the servers' format
//! (the servers' side has its own tests). `MESA_TEST_DURABLE_EVENTS` sets how many
//! (default 5 000; the figure in the docs used 100 000):
//! `MESA_TEST_DURABLE_EVENTS=100000 cargo test --release -p mesa-cli --test portal_durable -- --nocapture`.
//! Needs `redis-server` on PATH.
#![cfg(unix)]

mod common;
#[allow(unreachable_pub)]
#[path = "../../tests/src/net.rs"]
mod net;
#[allow(unreachable_pub)]
#[path = "../../tests/src/pki.rs"]
mod pki;
#[allow(unreachable_pub)]
#[path = "../../tests/src/redis.rs"]
mod redis_server;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::Lines;
use redis_server::RedisServer as Redis;
use serde_json::Value;

/// Clients the events come from (each its own order).
const CLIENTS: usize = 100;
/// The portals' visibility timeout (lease time to live) and tick, in ms, unless
/// `MESA_TEST_DURABLE_VISIBILITY_MS` and `MESA_TEST_DURABLE_TICK_MS` say otherwise
/// (the defaults of `mesa portal` are 30 000 and 5 000).
fn timing() -> (u64, u64) {
    let env = |name: &str, default| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        env("MESA_TEST_DURABLE_VISIBILITY_MS", 3500),
        env("MESA_TEST_DURABLE_TICK_MS", 250),
    )
}
/// What a portal hands out unacknowledged at most (the driver's default).
const MAX_OUTSTANDING: usize = 1024;

/// A `mesa portal --durable` process, killed on drop.
struct Portal {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Portal {
    fn start(redis: &Redis, id: &str) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesa"));
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
            command.env_remove(key);
        }
        let (visibility, tick) = timing();
        let (visibility, tick) = (visibility.to_string(), tick.to_string());
        let mut child = command
            .args([
                "portal",
                "--redis",
                &redis.url(),
                "--durable",
                "--group",
                "g",
            ])
            .args([
                "--id",
                id,
                "--visibility-timeout",
                &visibility,
                "--tick",
                &tick,
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mesa binary starts");
        let stdout = Lines::new(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::new(child.stderr.take().expect("piped stderr"));
        stderr.expect("starting", |l| l.contains("durable portal started"));
        Portal {
            child,
            stdout,
            stderr,
        }
    }

    /// Every event printed: (event id, client, n).
    fn printed(&self) -> Vec<(String, String, u64)> {
        self.stdout
            .all()
            .iter()
            .map(|line| {
                let v: Value = serde_json::from_str(line).expect("a JSON line");
                (
                    v["eventId"].as_str().expect("an event id").to_owned(),
                    v["clientId"].as_str().expect("a client").to_owned(),
                    v["message"]["d"]["n"].as_u64().expect("n"),
                )
            })
            .collect()
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Append events `range` to the durable streams, as servers do (`portal_q:<p>`,
/// p the client's partition of 16).
fn produce(conn: &mut redis::Connection, range: std::ops::Range<usize>) {
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let client = format!("c{}", i % CLIENTS);
            let n = i / CLIENTS;
            let partition = mesa_tokio::mesa_core::portal_partition(Some(&client), 16);
            let event = format!(
                r#"{{"type":"message","message":{{"op":0,"d":{{"n":{n}}}}},"clientId":"{client}","portalId":""}}"#
            );
            pipe.cmd("XADD")
                .arg(format!("portal_q:{partition}"))
                .arg("*")
                .arg("event_id")
                .arg(format!("e{i}"))
                .arg("event")
                .arg(event)
                .ignore();
        }
        pipe.exec(conn).expect("the events appended");
    }
}

#[test]
fn a_killed_durable_portal_loses_nothing_and_a_second_takes_over() {
    let events: usize = std::env::var("MESA_TEST_DURABLE_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let redis = Redis::start();
    let mut conn = redis::Client::open(redis.url())
        .and_then(|client| client.get_connection())
        .expect("a Redis connection");
    let mut first = Portal::start(&redis, "A");
    first
        .stderr
        .expect("holding every partition", |l| l.contains("held=[0, 1, 2"));
    let second = Portal::start(&redis, "B");

    produce(&mut conn, 0..events / 2);
    let deadline = Instant::now() + Duration::from_secs(120);
    while first.stdout.len() < events / 10 {
        assert!(Instant::now() < deadline, "the first portal prints nothing");
        thread::sleep(Duration::from_millis(5));
    }
    first.child.kill().expect("kill -9 the first portal");
    let killed = Instant::now();
    first.child.wait().expect("the first portal is gone");
    produce(&mut conn, events / 2..events);

    // Wait until every event was printed by one of them.
    let from_first = first.printed();
    let mut taken_over = None;
    loop {
        let printed = second.stdout.len();
        if printed > 0 && taken_over.is_none() {
            taken_over = Some(killed.elapsed());
        }
        if from_first.len() + printed >= events {
            let seen: HashSet<String> = from_first
                .iter()
                .chain(second.printed().iter())
                .map(|(id, _, _)| id.clone())
                .collect();
            if seen.len() == events {
                break;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(240),
            "events missing after 240 s: {} by A, {printed} by B",
            from_first.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let done = killed.elapsed();
    let (visibility_ms, tick_ms) = timing();
    let from_second = second.printed();
    let taken_over = taken_over.expect("the second portal printed");
    let duplicates = from_first.len() + from_second.len() - events;
    eprintln!(
        "durable portal kill -9: {events} events, {} by the killed portal, {} by the \
         survivor, 0 lost, {duplicates} duplicates, first event at the survivor {:.2} s \
         after the kill (visibility {visibility_ms} ms, tick {tick_ms} ms), all handled \
         {:.2} s after the kill",
        from_first.len(),
        from_second.len(),
        taken_over.as_secs_f64(),
        done.as_secs_f64(),
    );
    assert!(
        duplicates <= MAX_OUTSTANDING,
        "{duplicates} duplicates: more than could be in flight"
    );
    let limit = Duration::from_millis(visibility_ms + 2 * tick_ms) + Duration::from_secs(2);
    assert!(taken_over <= limit, "taken over after {taken_over:?}");
    // The survivor hands each client's events out in order.
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, client, n) in &from_second {
        if let Some(before) = last.insert(client, *n) {
            assert!(*n > before, "{client}: {n} after {before} at the survivor");
        }
    }
}
