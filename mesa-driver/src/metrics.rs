//! Prometheus metrics of a server: a [`Middleware`] that counts what it observes, and
//! renders the figures in the text exposition format (OpenMetrics 1.0, which
//! Prometheus scrapes natively) through [`prometheus_client`].
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use mesa_driver::metrics::Metrics;
//!
//! let metrics = Metrics::new();
//! // let server = mesa_tokio::server().middleware(metrics.clone()).build()?;
//! let text = metrics.render(); // serve it at GET /metrics with Metrics::CONTENT_TYPE
//! assert!(text.contains("# TYPE mesa_connections gauge"));
//! assert!(text.ends_with("# EOF\n"));
//! # Ok(()) }
//! ```
//!
//! Every name starts with `mesa_`; counters end in `_total`; sizes are in bytes and
//! durations in seconds.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `mesa_connections` | gauge | open connections |
//! | `mesa_connections_authenticated` | gauge | open connections that have authenticated |
//! | `mesa_connections_opened_total` | counter | connections opened (WebSocket handshake done) |
//! | `mesa_authentications_total` | counter | connections that authenticated (re-authentications not counted) |
//! | `mesa_reconnections_total` | counter | authentications that are reconnections (see below) |
//! | `mesa_closes_total{code}` | counter | closed connections, by close code (1006: dropped without a close frame) |
//! | `mesa_messages_received_total` | counter | Mesa messages (frames) received, every opcode |
//! | `mesa_messages_sent_total` | counter | Mesa messages (frames) written: hello, heartbeats, op 22, sends, redeliveries |
//! | `mesa_received_bytes_total` | counter | bytes of those received messages (JSON text) |
//! | `mesa_sent_bytes_total` | counter | bytes of those written messages (JSON text) |
//! | `mesa_send_deliveries` | histogram | local connections reached per send that reached any |
//! | `mesa_heartbeat_misses_total` | counter | heartbeats left unanswered |
//! | `mesa_queue_overflows_total` | counter | connections closed (1013) because their outbound queue overflowed |
//! | `mesa_undeliverable_total` | counter | recipient ids of sends that could be neither delivered nor stored |
//! | `mesa_sync_stored_total` | counter | messages stored for offline ids (one per id and message) |
//! | `mesa_sync_dropped_total` | counter | stored messages dropped to respect the per-id limit |
//! | `mesa_sync_redelivered_total` | counter | stored messages redelivered to a connection |
//! | `mesa_redis_link_up` | gauge | 1 while the cluster's Redis links are up (to every instance), else 0 (0 without a cluster) |
//! | `mesa_redis_link_failures_total` | counter | times the Redis link went down |
//! | `mesa_redis_ping_seconds` | histogram | round trip of the Redis liveness ping (every third of the lease) |
//! | `mesa_cluster_jobs_dropped_total` | counter | work for Redis given up (queue or retry buffer full, best effort lost to an outage, left at exit); presence changes not counted |
//! | `mesa_rooms` | gauge | rooms with a member on this server |
//! | `mesa_room_memberships` | gauge | room memberships on this server, over all rooms |
//! | `mesa_cluster_messages_received_total` | counter | envelopes (of sends and of rooms) received from Redis |
//! | `mesa_cluster_messages_unneeded_total` | counter | of those, the ones with no local recipient |
//! | `mesa_room_resumes_total` | counter | members of recoverable rooms, and connections of personal and broadcast streams, that came back with a position and caught up |
//! | `mesa_room_resumes_incomplete_total` | counter | of those, the ones told `recovered: false` (the stream no longer held all they missed) |
//! | `mesa_room_messages_repaired_total` | counter | messages of recoverable rooms Redis's pub/sub lost, read from their streams |
//! | `mesa_room_messages_skipped_total` | counter | offsets of recoverable rooms neither pub/sub nor the stream had any more |
//! | `mesa_errors_total` | counter | errors reported to middleware (Redis faults, refused cluster jobs, ...) |
//!
//! **Reconnections.** A connection that authenticates (for the first time on that
//! connection) as an id one of whose connections closed on this server less than
//! the reconnect window before (5 minutes unless
//! [`with_reconnect_window`](Metrics::with_reconnect_window) says otherwise) counts
//! one reconnection; each close is matched at most once, so a client with two tabs
//! that both reconnect counts two. A client that comes back through another replica
//! is counted by neither. At most 65 536 recently departed ids are remembered.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesa_core::{Close, ConnId, Message};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::handle::Connection;
use crate::hooks::{BoxError, Middleware};

/// How many recently departed ids the reconnection count remembers at most.
const MAX_DEPARTED: usize = 65_536;

/// The label set of `mesa_closes_total`.
type CodeLabel = Vec<(&'static str, String)>;

/// A server's Prometheus metrics: register a clone with
/// `ServerBuilder::middleware`, then [`render`](Self::render) them on each scrape.
/// Clones share the same figures.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("connections", &self.inner.connections.get())
            .field("cluster_link_up", &self.cluster_link_up())
            .finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    connections: Gauge,
    authenticated: Gauge,
    opened: Counter,
    authentications: Counter,
    reconnections: Counter,
    closes: Family<CodeLabel, Counter>,
    messages_received: Counter,
    messages_sent: Counter,
    bytes_received: Counter,
    bytes_sent: Counter,
    deliveries: Histogram,
    heartbeat_misses: Counter,
    overflows: Counter,
    undeliverable: Counter,
    stored: Counter,
    dropped: Counter,
    redelivered: Counter,
    link_up: Gauge,
    link_failures: Counter,
    ping: Histogram,
    jobs_dropped: Counter,
    rooms: Gauge,
    memberships: Gauge,
    cluster_received: Counter,
    cluster_unneeded: Counter,
    resumes: Counter,
    resumes_incomplete: Counter,
    repaired: Counter,
    skipped: Counter,
    errors: Counter,
    /// 0: no report yet (or no cluster), 1: up, 2: down.
    link: AtomicU8,
    reconnect_window: Duration,
    state: Mutex<State>,
}

/// What the reconnection count and the authenticated gauge remember.
#[derive(Default)]
struct State {
    /// Connections counted in `mesa_connections_authenticated`.
    authenticated: HashSet<ConnId>,
    /// Ids whose connections closed recently: how many closes are still unmatched,
    /// and when the latest happened.
    departed: HashMap<String, (u32, Instant)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The content type of [`render`](Self::render)'s text.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Fresh metrics, every figure at zero.
    pub fn new() -> Self {
        Metrics::with_reconnect_window(Duration::from_secs(300))
    }

    /// Fresh metrics that count an authentication as a reconnection when a
    /// connection of the same id closed less than `window` before.
    pub fn with_reconnect_window(window: Duration) -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        let authenticated = Gauge::default();
        let opened = Counter::default();
        let authentications = Counter::default();
        let reconnections = Counter::default();
        let closes = Family::<CodeLabel, Counter>::default();
        let messages_received = Counter::default();
        let messages_sent = Counter::default();
        let bytes_received = Counter::default();
        let bytes_sent = Counter::default();
        let deliveries = Histogram::new([
            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 10000.0,
        ]);
        let heartbeat_misses = Counter::default();
        let overflows = Counter::default();
        let undeliverable = Counter::default();
        let stored = Counter::default();
        let dropped = Counter::default();
        let redelivered = Counter::default();
        let link_up = Gauge::default();
        let link_failures = Counter::default();
        // 0.25 ms to about 4 s.
        let ping = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        let jobs_dropped = Counter::default();
        let rooms = Gauge::default();
        let memberships = Gauge::default();
        let cluster_received = Counter::default();
        let cluster_unneeded = Counter::default();
        let resumes = Counter::default();
        let resumes_incomplete = Counter::default();
        let repaired = Counter::default();
        let skipped = Counter::default();
        let errors = Counter::default();

        let r = &mut registry;
        r.register("mesa_connections", "Open connections", connections.clone());
        r.register(
            "mesa_connections_authenticated",
            "Open connections that have authenticated",
            authenticated.clone(),
        );
        r.register(
            "mesa_connections_opened",
            "Connections opened",
            opened.clone(),
        );
        r.register(
            "mesa_authentications",
            "Connections that authenticated (re-authentications not counted)",
            authentications.clone(),
        );
        r.register(
            "mesa_reconnections",
            "Authentications as an id one of whose connections closed here within the reconnect window",
            reconnections.clone(),
        );
        r.register(
            "mesa_closes",
            "Closed connections by close code",
            closes.clone(),
        );
        r.register(
            "mesa_messages_received",
            "Mesa messages (frames) received",
            messages_received.clone(),
        );
        r.register(
            "mesa_messages_sent",
            "Mesa messages (frames) written",
            messages_sent.clone(),
        );
        r.register_with_unit(
            "mesa_received",
            "Bytes of Mesa messages received",
            Unit::Bytes,
            bytes_received.clone(),
        );
        r.register_with_unit(
            "mesa_sent",
            "Bytes of Mesa messages written",
            Unit::Bytes,
            bytes_sent.clone(),
        );
        r.register(
            "mesa_send_deliveries",
            "Local connections reached per send",
            deliveries.clone(),
        );
        r.register(
            "mesa_heartbeat_misses",
            "Heartbeats left unanswered",
            heartbeat_misses.clone(),
        );
        r.register(
            "mesa_queue_overflows",
            "Connections closed because their outbound queue overflowed",
            overflows.clone(),
        );
        r.register(
            "mesa_undeliverable",
            "Recipient ids that could be neither delivered to nor stored for",
            undeliverable.clone(),
        );
        r.register(
            "mesa_sync_stored",
            "Messages stored for offline ids",
            stored.clone(),
        );
        r.register(
            "mesa_sync_dropped",
            "Stored messages dropped to respect the per-id limit",
            dropped.clone(),
        );
        r.register(
            "mesa_sync_redelivered",
            "Stored messages redelivered",
            redelivered.clone(),
        );
        r.register(
            "mesa_redis_link_up",
            "Whether the cluster's Redis link is up",
            link_up.clone(),
        );
        r.register(
            "mesa_redis_link_failures",
            "Times the cluster's Redis link went down",
            link_failures.clone(),
        );
        r.register_with_unit(
            "mesa_redis_ping",
            "Round trip of the Redis liveness ping",
            Unit::Seconds,
            ping.clone(),
        );
        r.register(
            "mesa_cluster_jobs_dropped",
            "Work for the cluster's Redis given up",
            jobs_dropped.clone(),
        );
        r.register("mesa_rooms", "Rooms with a member here", rooms.clone());
        r.register(
            "mesa_room_memberships",
            "Room memberships here, over all rooms",
            memberships.clone(),
        );
        r.register(
            "mesa_cluster_messages_received",
            "Envelopes received from Redis",
            cluster_received.clone(),
        );
        r.register(
            "mesa_cluster_messages_unneeded",
            "Envelopes received from Redis with no local recipient",
            cluster_unneeded.clone(),
        );
        r.register(
            "mesa_room_resumes",
            "Members of recoverable rooms and connections of personal or broadcast streams that came back with a position and caught up",
            resumes.clone(),
        );
        r.register(
            "mesa_room_resumes_incomplete",
            "Resumes told recovered: false (the stream no longer held all they missed)",
            resumes_incomplete.clone(),
        );
        r.register(
            "mesa_room_messages_repaired",
            "Messages of recoverable rooms lost by pub/sub and read from their streams",
            repaired.clone(),
        );
        r.register(
            "mesa_room_messages_skipped",
            "Offsets of recoverable rooms neither pub/sub nor the stream had any more",
            skipped.clone(),
        );
        r.register(
            "mesa_errors",
            "Errors reported to middleware",
            errors.clone(),
        );

        Metrics {
            inner: Arc::new(Inner {
                registry,
                connections,
                authenticated,
                opened,
                authentications,
                reconnections,
                closes,
                messages_received,
                messages_sent,
                bytes_received,
                bytes_sent,
                deliveries,
                heartbeat_misses,
                overflows,
                undeliverable,
                stored,
                dropped,
                redelivered,
                link_up,
                link_failures,
                ping,
                jobs_dropped,
                rooms,
                memberships,
                cluster_received,
                cluster_unneeded,
                resumes,
                resumes_incomplete,
                repaired,
                skipped,
                errors,
                link: AtomicU8::new(0),
                reconnect_window: window,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Every metric in the text exposition format, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
    }

    /// The cluster link's last reported state: `None` before any report (or
    /// without a cluster), else whether it is up.
    pub fn cluster_link_up(&self) -> Option<bool> {
        match self.inner.link.load(Ordering::SeqCst) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Open connections.
    pub fn connections(&self) -> i64 {
        self.inner.connections.get()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A size as a gauge's value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Middleware for Metrics {
    fn on_connection(&self, _conn: &Connection) -> Result<(), BoxError> {
        self.inner.opened.inc();
        self.inner.connections.inc();
        Ok(())
    }

    fn on_disconnection(&self, conn: &Connection, close: &Close) -> Result<(), BoxError> {
        let inner = &self.inner;
        inner.connections.dec();
        inner
            .closes
            .get_or_create(&vec![("code", close.code.0.to_string())])
            .inc();
        let mut state = self.state();
        if !state.authenticated.remove(&conn.conn_id()) {
            return Ok(());
        }
        inner.authenticated.dec();
        let Some(id) = conn.id() else {
            return Ok(());
        };
        let now = Instant::now();
        if state.departed.len() >= MAX_DEPARTED && !state.departed.contains_key(&id) {
            let window = inner.reconnect_window;
            state
                .departed
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < window);
            if state.departed.len() >= MAX_DEPARTED {
                return Ok(());
            }
        }
        let entry = state.departed.entry(id).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        Ok(())
    }

    fn on_authenticated(&self, conn: &Connection) -> Result<(), BoxError> {
        let inner = &self.inner;
        let mut state = self.state();
        if !state.authenticated.insert(conn.conn_id()) {
            return Ok(()); // a re-authentication
        }
        inner.authenticated.inc();
        inner.authentications.inc();
        let Some(id) = conn.id() else {
            return Ok(());
        };
        if let Some((unmatched, at)) = state.departed.get_mut(&id) {
            let recent = at.elapsed() < inner.reconnect_window;
            if recent {
                inner.reconnections.inc();
            }
            *unmatched -= 1;
            if *unmatched == 0 || !recent {
                state.departed.remove(&id);
            }
        }
        Ok(())
    }

    fn on_message_sent(&self, _message: &Message, recipients: usize) -> Result<(), BoxError> {
        self.inner.deliveries.observe(recipients as f64);
        Ok(())
    }

    fn on_undeliverable(&self, _message: &Message, ids: &[String]) -> Result<(), BoxError> {
        self.inner.undeliverable.inc_by(count(ids.len()));
        Ok(())
    }

    fn on_redelivered(&self, _conn: &Connection, count_: usize) -> Result<(), BoxError> {
        self.inner.redelivered.inc_by(count(count_));
        Ok(())
    }

    fn on_cluster_link(&self, up: bool) -> Result<(), BoxError> {
        let inner = &self.inner;
        inner.link_up.set(i64::from(up));
        let previous = inner.link.swap(if up { 1 } else { 2 }, Ordering::SeqCst);
        if !up && previous != 2 {
            inner.link_failures.inc();
        }
        Ok(())
    }

    fn on_error(&self, _error: &str) -> Result<(), BoxError> {
        self.inner.errors.inc();
        Ok(())
    }

    fn on_frames_received(
        &self,
        _conn: &Connection,
        frames: usize,
        bytes: usize,
    ) -> Result<(), BoxError> {
        self.inner.messages_received.inc_by(count(frames));
        self.inner.bytes_received.inc_by(count(bytes));
        Ok(())
    }

    fn on_frames_sent(
        &self,
        _conn: &Connection,
        frames: usize,
        bytes: usize,
    ) -> Result<(), BoxError> {
        self.inner.messages_sent.inc_by(count(frames));
        self.inner.bytes_sent.inc_by(count(bytes));
        Ok(())
    }

    fn on_heartbeat_missed(&self, _conn: &Connection, _misses: u32) -> Result<(), BoxError> {
        self.inner.heartbeat_misses.inc();
        Ok(())
    }

    fn on_queue_overflow(&self, _conn: &Connection) -> Result<(), BoxError> {
        self.inner.overflows.inc();
        Ok(())
    }

    fn on_stored(&self, stored: usize, dropped: usize) -> Result<(), BoxError> {
        self.inner.stored.inc_by(count(stored));
        self.inner.dropped.inc_by(count(dropped));
        Ok(())
    }

    fn on_cluster_latency(&self, latency: Duration) -> Result<(), BoxError> {
        self.inner.ping.observe(latency.as_secs_f64());
        Ok(())
    }

    fn on_cluster_jobs_dropped(&self, jobs: usize) -> Result<(), BoxError> {
        self.inner.jobs_dropped.inc_by(count(jobs));
        Ok(())
    }

    fn on_cluster_message(&self, local: usize) -> Result<(), BoxError> {
        self.inner.cluster_received.inc();
        if local == 0 {
            self.inner.cluster_unneeded.inc();
        }
        Ok(())
    }

    fn on_room_resume(&self, recovered: bool) -> Result<(), BoxError> {
        self.inner.resumes.inc();
        if !recovered {
            self.inner.resumes_incomplete.inc();
        }
        Ok(())
    }

    fn on_room_gap(&self, repaired: usize, skipped: usize) -> Result<(), BoxError> {
        self.inner.repaired.inc_by(repaired as u64);
        self.inner.skipped.inc_by(skipped as u64);
        Ok(())
    }

    fn on_rooms(&self, rooms: usize, memberships: usize) -> Result<(), BoxError> {
        self.inner.rooms.set(gauge(rooms));
        self.inner.memberships.set(gauge(memberships));
        Ok(())
    }
}
