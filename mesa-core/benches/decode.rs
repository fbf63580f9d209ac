//! Decoding one text frame into a [`Message`] (limits checked first), for the frames a
//! server reads most: a heartbeat ACK, a small dispatch, and a 4 KiB dispatch.

use criterion::{Criterion, Throughput};
use mesa_core::{Limits, Message};
use serde_json::json;
use std::hint::black_box;

fn decode(c: &mut Criterion) {
    let limits = Limits::default();
    let large = Message::dispatch("BROADCAST", json!({"text": "x".repeat(4000), "n": 1}));
    let frames = [
        ("heartbeat_ack", r#"{"op":11,"d":{}}"#.to_owned()),
        (
            "dispatch_small",
            r#"{"op":0,"t":"ECHO","d":{"ts":1700000000000,"seq":42,"text":"hello"}}"#.to_owned(),
        ),
        ("dispatch_4k", large.encode().as_str().to_owned()),
    ];
    let mut group = c.benchmark_group("decode");
    for (name, frame) in &frames {
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| Message::decode(black_box(frame), &limits).expect("valid frame"))
        });
    }
    group.finish();
}

/// The benchmark group (a private module: the macro's function has no docs).
mod group {
    criterion::criterion_group!(benches, super::decode);
}
criterion::criterion_main!(group::benches);
