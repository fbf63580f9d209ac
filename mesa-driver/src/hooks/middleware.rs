//! Middleware: observers of a server's life, with upstream's hooks. A middleware
//! cannot change what happens; its errors and panics are contained and reported to
//! the others' `on_error`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use mesa_core::{Close, Message, ReplicaEvent};

use crate::handle::Connection;
use crate::registry::Observer;

/// An error a middleware reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server observer. Every hook defaults to doing nothing; hooks run on the
/// connection's task, so keep them quick (hand slow work to a channel).
#[allow(unused_variables)]
pub trait Middleware: Send + Sync + 'static {
    /// A connection opened (before its hello is written).
    fn on_connection(&self, conn: &Connection) -> Result<(), BoxError> {
        Ok(())
    }
    /// A connection closed.
    fn on_disconnection(&self, conn: &Connection, close: &Close) -> Result<(), BoxError> {
        Ok(())
    }
    /// A connection authenticated (also on re-authentication).
    fn on_authenticated(&self, conn: &Connection) -> Result<(), BoxError> {
        Ok(())
    }
    /// An application message arrived from a connection.
    fn on_message_received(&self, conn: &Connection, message: &Message) -> Result<(), BoxError> {
        Ok(())
    }
    /// A message was handed to `recipients` local connections.
    fn on_message_sent(&self, message: &Message, recipients: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// A message had recipients that are connected nowhere here.
    fn on_undeliverable(&self, message: &Message, ids: &[String]) -> Result<(), BoxError> {
        Ok(())
    }
    /// Stored messages were redelivered to a connection.
    fn on_redelivered(&self, conn: &Connection, count: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// A portal joined the pool.
    fn on_portal_join(&self, portal: &str) -> Result<(), BoxError> {
        Ok(())
    }
    /// A portal left the pool.
    fn on_portal_leave(&self, portal: &str) -> Result<(), BoxError> {
        Ok(())
    }
    /// The link to the cluster's Redis went down (`false`) or came (back) up (`true`).
    /// With several Redis instances: down when the link to any one went down, up
    /// once the links to all of them are.
    fn on_cluster_link(&self, up: bool) -> Result<(), BoxError> {
        Ok(())
    }
    /// Another middleware, or the server, reported an error.
    fn on_error(&self, error: &str) -> Result<(), BoxError> {
        Ok(())
    }
    /// `frames` Mesa messages totalling `bytes` bytes of JSON arrived from a connection.
    fn on_frames_received(
        &self,
        conn: &Connection,
        frames: usize,
        bytes: usize,
    ) -> Result<(), BoxError> {
        Ok(())
    }
    /// `frames` Mesa messages totalling `bytes` bytes of JSON (hello, heartbeats and
    /// sends alike) were handed to a connection's socket; reported once per batch.
    fn on_frames_sent(
        &self,
        conn: &Connection,
        frames: usize,
        bytes: usize,
    ) -> Result<(), BoxError> {
        Ok(())
    }
    /// A connection left heartbeat `misses` (1, 2, ...) unanswered in a row; past the
    /// configured maximum it is closed with 1001 right after this call.
    fn on_heartbeat_missed(&self, conn: &Connection, misses: u32) -> Result<(), BoxError> {
        Ok(())
    }
    /// A connection's outbound queue overflowed (it does not read fast enough); it is
    /// being closed with 1013.
    fn on_queue_overflow(&self, conn: &Connection) -> Result<(), BoxError> {
        Ok(())
    }
    /// Sync stored `stored` messages for offline ids (one per id and message) and
    /// dropped the `dropped` oldest to respect the per-id limit.
    fn on_stored(&self, stored: usize, dropped: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// The cluster's Redis answered a liveness ping (sent every third of the lease)
    /// after `latency`.
    fn on_cluster_latency(&self, latency: Duration) -> Result<(), BoxError> {
        Ok(())
    }
    /// `jobs` pieces of work for the cluster's Redis were given up, and reported to
    /// `on_error` with the reason: refused because the cluster's queue was full, kept
    /// beyond the retry buffer while Redis was unreachable, best effort (sends
    /// without sync, portal events) and lost to an outage, or left undone when the
    /// server went away. Presence changes are never counted: every reconnection
    /// re-registers presence from scratch.
    fn on_cluster_jobs_dropped(&self, jobs: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// An envelope (of a send or of a room) arrived from Redis for `local`
    /// connections here (0: this replica did not need it).
    fn on_cluster_message(&self, local: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// A member of a recoverable room that came back with a position caught up:
    /// with everything it missed (`recovered`), or not (the stream no longer held it
    /// all: consider a larger or longer stream).
    fn on_room_resume(&self, recovered: bool) -> Result<(), BoxError> {
        Ok(())
    }
    /// Messages of recoverable rooms that Redis's pub/sub lost were read from their
    /// streams (`repaired`), or were not there any more and were skipped (`skipped`).
    fn on_room_gap(&self, repaired: usize, skipped: usize) -> Result<(), BoxError> {
        Ok(())
    }
    /// Room memberships changed: `rooms` have a member here, with `memberships` over
    /// all of them.
    fn on_rooms(&self, rooms: usize, memberships: usize) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The registered middleware, called in registration order with errors contained.
#[derive(Clone, Default)]
pub(crate) struct Middlewares(Arc<Vec<Arc<dyn Middleware>>>);

impl Middlewares {
    pub(crate) fn new(list: Vec<Arc<dyn Middleware>>) -> Self {
        Middlewares(Arc::new(list))
    }

    /// Call `hook` on every middleware; an error or panic is logged and reported to
    /// the others' `on_error`, and never stops the server.
    pub(crate) fn emit(&self, hook: impl Fn(&dyn Middleware) -> Result<(), BoxError>) {
        for middleware in self.0.iter() {
            let outcome = catch_unwind(AssertUnwindSafe(|| hook(middleware.as_ref())));
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error.to_string(),
                Err(_) => "middleware panicked".to_owned(),
            };
            self.report(&error);
        }
    }

    /// Report an error to every middleware's `on_error` (whose own failures are only logged).
    pub(crate) fn report(&self, error: &str) {
        tracing::warn!(error, "middleware error");
        for middleware in self.0.iter() {
            let _ = catch_unwind(AssertUnwindSafe(|| middleware.on_error(error)));
        }
    }
}

/// The registry's reports, as middleware hooks.
impl Observer for Middlewares {
    fn message_sent(&self, message: &Message, recipients: usize) {
        self.emit(|m| m.on_message_sent(message, recipients));
    }

    fn undeliverable(&self, message: &Message, ids: &[String]) {
        self.emit(|m| m.on_undeliverable(message, ids));
    }

    fn rooms(&self, rooms: usize, memberships: usize) {
        self.emit(|m| m.on_rooms(rooms, memberships));
    }

    fn replica_event(&self, event: &ReplicaEvent) {
        match event {
            ReplicaEvent::LinkUp { shard, all_up } => {
                tracing::info!(shard, "cluster link up");
                // With several Redis instances, up once every link is.
                if *all_up {
                    self.emit(|m| m.on_cluster_link(true));
                }
            }
            ReplicaEvent::LinkDown { shard, reason } => {
                tracing::warn!(shard, %reason, "cluster link down");
                self.emit(|m| m.on_cluster_link(false));
                self.report(&format!("cluster link down: {reason}"));
            }
            ReplicaEvent::Latency(latency) => self.emit(|m| m.on_cluster_latency(*latency)),
            ReplicaEvent::Stored {
                stored,
                dropped,
                unreplicated,
            } => {
                self.emit(|m| m.on_stored(*stored, *dropped));
                if *dropped > 0 {
                    self.report(&format!(
                        "sync: {dropped} oldest stored messages dropped to respect the per-id limit"
                    ));
                }
                if *unreplicated > 0 {
                    self.report(&format!(
                        "sync: {unreplicated} stored messages not acknowledged by enough Redis replicas in time: a failover may lose them"
                    ));
                }
            }
            ReplicaEvent::Undeliverable { message, ids } => self.undeliverable(message, ids),
            ReplicaEvent::JobsLost { count, reason } => {
                tracing::warn!(jobs = count, %reason, "cluster jobs given up");
                self.report(&format!("cluster: {count} jobs given up: {reason}"));
                self.emit(|m| m.on_cluster_jobs_dropped(*count));
            }
            ReplicaEvent::PortalJoined { id } => self.emit(|m| m.on_portal_join(id)),
            ReplicaEvent::PortalLeft { id } => self.emit(|m| m.on_portal_leave(id)),
            ReplicaEvent::Received { local } => self.emit(|m| m.on_cluster_message(*local)),
            ReplicaEvent::Resumed { recovered } => self.emit(|m| m.on_room_resume(*recovered)),
            ReplicaEvent::Repaired { messages } => self.emit(|m| m.on_room_gap(*messages, 0)),
            ReplicaEvent::Skipped { messages } => self.emit(|m| m.on_room_gap(0, *messages)),
            ReplicaEvent::Undecodable { channel, error } => {
                self.report(&format!("undecodable message on {channel}: {error}"));
            }
            // The registry acts on these itself.
            ReplicaEvent::Loaded { .. }
            | ReplicaEvent::Retired
            | ReplicaEvent::RoomMembers { .. } => {}
        }
    }
}
