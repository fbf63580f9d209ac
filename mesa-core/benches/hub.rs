//! Routing one send through the hub to 10,000 local connections: to everyone, and to
//! 10,000 explicit ids (each id looked up, targets sorted and deduplicated).

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use mesa_core::{Hub, Message, Recipients};
use serde_json::json;

/// Connections in the hub, each authenticated as its own id.
const CONNECTIONS: usize = 10_000;

fn hub(c: &mut Criterion) {
    let mut hub = Hub::new(false);
    let ids: Vec<String> = (0..CONNECTIONS).map(|i| format!("u{i}")).collect();
    for id in &ids {
        let conn = hub.connect();
        let _ = hub.authenticate(conn, id);
    }
    let message = Message::dispatch("BROADCAST", json!({"text": "hello"}));
    let everyone = Recipients::All;
    let listed = Recipients::Ids(ids);

    let mut group = c.benchmark_group("hub_send_10k");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("all", |b| {
        b.iter(|| hub.send(black_box(&message), black_box(&everyone)))
    });
    group.bench_function("ids", |b| {
        b.iter(|| hub.send(black_box(&message), black_box(&listed)))
    });
    group.finish();
}

/// The benchmark group (a private module: the macro's function has no docs).
mod group {
    criterion::criterion_group!(benches, super::hub);
}
criterion::criterion_main!(group::benches);
