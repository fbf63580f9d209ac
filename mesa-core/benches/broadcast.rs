//! A broadcast to 1,000 recipients: encoded once and shared (what the hub does) against
//! encoded once per recipient. Prints the ratio of the two after criterion's report.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use mesa_core::{Frame, Message};
use serde_json::json;

/// Recipients of the broadcast.
const RECIPIENTS: usize = 1000;

fn message() -> Message {
    Message::dispatch(
        "BROADCAST",
        json!({"text": "hello everyone", "from": "alice", "ts": 1_700_000_000_000_u64}),
    )
}

/// Encode once, then give every recipient a clone of the shared frame.
fn encode_once(message: &Message) -> Vec<Frame> {
    let frame = message.encode();
    vec![frame; RECIPIENTS]
}

/// Encode again for every recipient.
fn encode_each(message: &Message) -> Vec<Frame> {
    (0..RECIPIENTS).map(|_| message.encode()).collect()
}

fn broadcast(c: &mut Criterion) {
    let message = message();
    let mut group = c.benchmark_group("broadcast_1000");
    group.throughput(Throughput::Elements(RECIPIENTS as u64));
    group.bench_function("encode_once_shared", |b| {
        b.iter(|| encode_once(black_box(&message)))
    });
    group.bench_function("encode_per_recipient", |b| {
        b.iter(|| encode_each(black_box(&message)))
    });
    group.finish();
    print_ratio(&message);
}

/// Time both variants over the same number of rounds and print how many times faster
/// encoding once is (criterion reports each alone).
// A benchmark reads the clock; the core's own code never does.
#[allow(clippy::disallowed_methods)]
fn print_ratio(message: &Message) {
    let time = |f: &dyn Fn(&Message) -> Vec<Frame>| {
        let started = Instant::now();
        let mut rounds = 0_u32;
        while started.elapsed() < Duration::from_millis(300) {
            black_box(f(black_box(message)));
            rounds += 1;
        }
        started.elapsed().as_secs_f64() / f64::from(rounds)
    };
    let (once, each) = (time(&encode_once), time(&encode_each));
    println!(
        "broadcast_1000: encode once + share {:.1} us, encode per recipient {:.1} us: {:.1}x faster",
        once * 1e6,
        each * 1e6,
        each / once
    );
}

/// The benchmark group (a private module: the macro's function has no docs).
mod group {
    criterion::criterion_group!(benches, super::broadcast);
}
criterion::criterion_main!(group::benches);
