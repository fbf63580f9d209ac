//! What a [`Replica`](super::Replica) tells the application, its middleware and the
//! driver besides Redis commands and local deliveries.

use std::time::Duration;

use crate::hub::{Action, ConnId};
use crate::wire::Message;

/// A message for local connections: a send made here, or an envelope another
/// replica published.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDelivery {
    /// The message, for observers (the frame of `action` is its encoding).
    pub message: Message,
    /// What to do to every target (never [`Action::Ignore`]).
    pub action: Action,
    /// The local connections, in connection order, without repeats.
    pub targets: Vec<ConnId>,
}

/// Something the application, its middleware or the driver must learn.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum ReplicaEvent {
    /// The link to Redis instance `shard` is open (again): presence is being
    /// registered anew there.
    LinkUp {
        /// Which instance (0 with one Redis).
        shard: usize,
        /// The links to every instance are up now (with several, the cluster is
        /// whole only then: a gauge of the link follows this, not each instance).
        all_up: bool,
    },
    /// The link to Redis instance `shard` failed; a
    /// [`Command::Connect`](super::Command::Connect) follows after a backoff.
    LinkDown {
        /// Which instance (0 with one Redis).
        shard: usize,
        /// Why.
        reason: String,
    },
    /// A `PING` went to Redis and back in this time.
    Latency(Duration),
    /// The stored messages of `id` for connection `conn`, oldest first: hand them to
    /// its session (`ServerSession::handle_undelivered`).
    Loaded {
        /// The connection that asked.
        conn: ConnId,
        /// Its id.
        id: String,
        /// The messages (entries that are not messages are skipped).
        messages: Vec<Message>,
    },
    /// Messages were stored for ids connected nowhere.
    Stored {
        /// Ids a message was stored for.
        stored: usize,
        /// Older stored messages dropped to respect the per-id limit.
        dropped: usize,
        /// Of the stored, those too few Redis replicas acknowledged in time (with
        /// [`ReplicaConfig::store_wait`](super::ReplicaConfig::store_wait); 0
        /// without): a failover may lose them.
        unreplicated: usize,
    },
    /// Ids connected nowhere for whom `message` was not stored (sync off,
    /// `sync: false`, an op 5 event, or a blank id).
    Undeliverable {
        /// The message.
        message: Message,
        /// The ids.
        ids: Vec<String>,
    },
    /// Work for Redis was given up, never silently.
    JobsLost {
        /// How many jobs.
        count: usize,
        /// Why.
        reason: Loss,
    },
    /// A portal joined the pool.
    PortalJoined {
        /// Its id.
        id: String,
    },
    /// A portal left the pool.
    PortalLeft {
        /// Its id.
        id: String,
    },
    /// An envelope (of a send or of a room) arrived from Redis, for `local`
    /// connections here (0: it was not needed here).
    Received {
        /// Local connections it was delivered to.
        local: usize,
    },
    /// The answer to [`Replica::handle_room_members`](super::Replica::handle_room_members):
    /// the ids in `room` over the cluster, with their connections, or why Redis could
    /// not tell.
    RoomMembers {
        /// The query's number.
        query: u64,
        /// The room.
        room: String,
        /// Each id and its connections in the room, by id.
        members: Result<Vec<(String, u64)>, String>,
    },
    /// A member of a recoverable room (or a connection of a personal or the
    /// broadcast stream) that reported a position caught up: with everything it
    /// missed (`recovered`), or with nothing, the stream no longer holding it all.
    Resumed {
        /// Whether the replay was complete.
        recovered: bool,
    },
    /// Messages of recoverable rooms that the channel lost (while the link to Redis
    /// was down, or before a subscription was confirmed) were read from the streams
    /// and forwarded.
    Repaired {
        /// How many.
        messages: usize,
    },
    /// Offsets of a recoverable room that neither the channel nor the stream had
    /// any more (trimmed, expired) were skipped; the extended members were told
    /// `recovered: false`.
    Skipped {
        /// How many offsets.
        messages: usize,
    },
    /// A pub/sub message could not be decoded; it was skipped.
    Undecodable {
        /// The channel it came on.
        channel: String,
        /// Why.
        error: String,
    },
    /// The replica left the cluster (its lease and presence given up, or left to
    /// expire when Redis was unreachable); it asks nothing more of Redis.
    Retired,
}

/// Why jobs were given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Loss {
    /// The buffer of pending jobs was full (`max_pending`): a new job was refused.
    #[error("the buffer of jobs waiting for Redis is full")]
    Full,
    /// Best-effort jobs (sends without sync, portal events) were queued or in flight
    /// when the link failed.
    #[error("Redis unreachable: best-effort jobs (sends without sync, portal events) dropped")]
    Outage,
    /// The replica retired, or the connection that needed the job closed, before
    /// Redis could be reached.
    #[error("abandoned before Redis could be reached")]
    Abandoned,
}

/// What [`Replica::handle_send`](super::Replica::handle_send) did with a send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendReport {
    /// Local connections the message goes to (one [`LocalDelivery`]).
    pub local: usize,
    /// Explicit recipient ids with no connection here.
    pub absent: Vec<String>,
    /// The remote part was queued for Redis (false: there was none, or it was
    /// refused, see [`ReplicaEvent::JobsLost`]).
    pub queued: bool,
}
