//! Routing sends whose explicit lists are long (issue 11: one BROADCAST listing 20,000
//! ids, half of them excluded, stalled a server): `excluding` then `route` with a
//! list twice as long as the excluded ids, and `route` of ids all absent here. Each
//! runs at two sizes, so a cost linear in the number of ids shows as a time that
//! doubles with the size (a quadratic one quadruples).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use mesa_core::{Hub, Recipients};

/// Connections in the hub, each authenticated as its own id (`u0`..).
const CONNECTIONS: usize = 10_000;

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i}")).collect()
}

fn routing(c: &mut Criterion) {
    let mut hub = Hub::new(false);
    for id in ids("u", CONNECTIONS) {
        let conn = hub.connect();
        let _ = hub.authenticate(conn, &id);
    }

    let mut group = c.benchmark_group("routing");
    group.sampling_mode(SamplingMode::Flat);
    for listed in [10_000, 20_000] {
        // Half the list is excluded; of the rest, the ids below CONNECTIONS are here.
        let to = ids("u", listed);
        let except = ids("u", listed / 2);
        group.throughput(Throughput::Elements(listed as u64));
        group.bench_function(format!("excluding_half_of/{listed}"), |b| {
            b.iter_batched(
                || Recipients::Ids(to.clone()),
                |recipients| hub.route(&recipients.excluding(black_box(&except))),
                BatchSize::LargeInput,
            )
        });
    }
    for absent in [50_000, 100_000] {
        let nobody = Recipients::Ids(ids("offline", absent));
        group.throughput(Throughput::Elements(absent as u64));
        group.bench_function(format!("absent/{absent}"), |b| {
            b.iter(|| hub.route(black_box(&nobody)))
        });
    }
    group.finish();
}

/// The benchmark group (a private module: the macro's function has no docs). Ten
/// samples of a few seconds: before issue 11 one iteration took seconds.
mod group {
    criterion::criterion_group! {
        name = benches;
        config = criterion::Criterion::default()
            .sample_size(10)
            .warm_up_time(super::Duration::from_secs(1))
            .measurement_time(super::Duration::from_secs(3));
        targets = super::routing
    }
}
criterion::criterion_main!(group::benches);
