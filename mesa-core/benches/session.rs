//! A server session handling one client frame and draining its outputs, as the driver
//! does for every frame: an application dispatch (decoded, surfaced as an event) and
//! a heartbeat ACK (consumed by the core).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use mesa_core::{AuthConfig, HeartbeatConfig, ServerConfig, ServerSession, SessionEvent};

/// An authenticated session with heartbeats on, at `now`.
fn authenticated(config: &Arc<ServerConfig>, now: Instant) -> ServerSession {
    let mut session = ServerSession::new(config.clone(), now);
    session.handle_frame(now, r#"{"op":2,"d":{"token":"alice"}}"#);
    while let Some(event) = session.poll_event() {
        if let SessionEvent::AuthenticationRequested { .. } = event {
            let user = serde_json::json!({"id": "alice"});
            session.accept(now, "alice".into(), user).expect("pending");
        }
    }
    while session.poll_transmit().is_some() {}
    session
}

/// Feed `frame` and drain every output; returns how many outputs there were.
fn handle(session: &mut ServerSession, now: Instant, frame: &str) -> usize {
    session.handle_frame(now, frame);
    let mut outputs = 0;
    while session.poll_transmit().is_some() {
        outputs += 1;
    }
    while let Some(event) = session.poll_event() {
        drop(black_box(event));
        outputs += 1;
    }
    outputs
}

// A benchmark reads the clock once, as a starting point; the session gets it as an argument.
#[allow(clippy::disallowed_methods)]
fn session(c: &mut Criterion) {
    let config = Arc::new(
        ServerConfig::builder()
            .heartbeat(HeartbeatConfig {
                interval: Duration::from_secs(10),
                max_attempts: 3,
            })
            .authentication(AuthConfig::default())
            .build()
            .expect("valid config"),
    );
    let frames = [
        (
            "dispatch",
            r#"{"op":0,"t":"ECHO","d":{"ts":1700000000000,"seq":42,"text":"hello"}}"#,
        ),
        ("heartbeat_ack", r#"{"op":11,"d":{}}"#),
    ];
    let mut group = c.benchmark_group("session_handle_frame");
    for (name, frame) in frames {
        group.bench_function(name, |b| {
            let mut now = Instant::now();
            let mut session = authenticated(&config, now);
            b.iter(|| {
                // Time moves on (a second a frame), so no rate limit or timeout trips.
                now += Duration::from_secs(1);
                if session.is_closed() {
                    session = authenticated(&config, now);
                }
                handle(&mut session, now, black_box(frame))
            });
        });
    }
    group.finish();
}

/// The benchmark group (a private module: the macro's function has no docs).
mod group {
    criterion::criterion_group!(benches, super::session);
}
criterion::criterion_main!(group::benches);
