//! The work a replica keeps for Redis, and what becomes of it when the link fails.

use std::time::Instant;

use crate::cluster::{PortalEventKind, RemotePlan};
use crate::hub::ConnId;
use crate::sync::MessageOptions;
use crate::wire::Message;

use super::event::Loss;

/// The remote part of one send: what is left to do of it (the first queued send may
/// have been cut by a [`Round`](crate::Round), its plan holding the ids still to check).
#[derive(Debug, Clone)]
pub(crate) struct RemoteSend {
    pub(crate) message: Message,
    pub(crate) options: Option<MessageOptions>,
    pub(crate) plan: RemotePlan,
    /// What the send does with the personal and broadcast streams.
    pub(crate) streaming: Streaming,
    /// How many of its first recipients (the ids its plan checks or publishes to, in
    /// order; a broadcast's one stream counts as one) have the message in their
    /// stream already, appended by a round a link failure cut short: the round done
    /// again appends to the others only. An append made twice takes a second offset,
    /// and the id's connections would get the message twice.
    pub(crate) appended: usize,
}

/// What a send does with the personal and broadcast streams
/// ([`RecoveryConfig::users`](crate::recovery::RecoveryConfig::users),
/// [`RecoveryConfig::broadcast`](crate::recovery::RecoveryConfig::broadcast)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Streaming {
    /// Nothing: its envelope reaches every connection of its recipients.
    Off,
    /// Its envelope skips the connections that take its recipients' stream
    /// ([`Envelope::streamed`](crate::cluster::Envelope::streamed)); every id it
    /// checks or publishes to is appended to its personal stream first (those
    /// stored for too).
    Beside,
    /// No envelope: the message is appended to the recipients' streams (the ids
    /// connected here, or the broadcast's), again after an outage.
    Only,
}

/// A job other than a send.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// First connections of these ids here.
    Arrive(Vec<String>),
    /// The last connection of this id here closed.
    Leave(String),
    /// Connections opened minus closed.
    Connections(i64),
    /// Read the stored messages of `id` for `conn`; pointless after `until` (the
    /// session went on without them).
    Load {
        conn: ConnId,
        id: String,
        until: Instant,
    },
    /// Remove the stored messages of `id` through the last entry, among the first
    /// `count`, whose text is `last`.
    Trim {
        id: String,
        count: usize,
        last: String,
    },
    /// Delete the stored messages of `id`: `conn` declined them.
    Clear { conn: ConnId, id: String },
    /// Tell a portal about a client event.
    Portal {
        kind: PortalEventKind,
        client_id: Option<String>,
    },
    /// Append a client event to a durable portal stream keeping about `maxlen`
    /// entries (`event`: the entry's fields and values).
    Enqueue {
        stream: String,
        maxlen: usize,
        event: Vec<String>,
    },
    /// Publish a room's envelope on its channel.
    Publish { channel: String, payload: String },
    /// Append a message to a recoverable room's stream and publish it
    /// ([`Command::StreamPublish`](super::Command::StreamPublish)).
    StreamPublish {
        room: String,
        head: String,
        entry: String,
    },
    /// Changes of this replica's presence in rooms: room, id, connections.
    Rooms(Vec<(String, String, i64)>),
}

/// What becomes of a job when the link fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Kept, in order, for after the reconnection.
    Keep,
    /// Forgotten without a report: re-derived anyway (presence and counts are
    /// registered anew by the renewal that follows every reconnection; replayed
    /// after it, these would be stale).
    Forget,
    /// Given up and reported.
    Lost(Loss),
}

impl Job {
    /// The job's fate at a link failure, whether its command was sent and not
    /// answered (Redis may have run it) or not sent yet.
    pub(crate) fn fate(&self) -> Fate {
        match self {
            Job::Arrive(_) | Job::Leave(_) | Job::Connections(_) | Job::Rooms(_) => Fate::Forget,
            // An event about a moment that has passed, and a room's message, which
            // would arrive out of order with what came since: best effort, as
            // upstream's publishes.
            Job::Portal { .. } | Job::Publish { .. } | Job::StreamPublish { .. } => {
                Fate::Lost(Loss::Outage)
            }
            // A read, a delete of what the client declined, and a trim that finds
            // what it removes by its text: each may run twice.
            Job::Load { .. } | Job::Clear { .. } | Job::Trim { .. } => Fate::Keep,
            // The durable portals' promise: appended again after the outage, with
            // the same event id, so a consumer drops it if the first append landed.
            Job::Enqueue { .. } => Fate::Keep,
        }
    }

    /// Whether the job counts toward `max_pending` (presence is re-registered at
    /// every renewal, so refusing it loses nothing).
    pub(crate) fn counted(&self) -> bool {
        !matches!(
            self,
            Job::Arrive(_) | Job::Leave(_) | Job::Connections(_) | Job::Rooms(_)
        )
    }
}

impl RemoteSend {
    /// A round carried its first `done` checked ids: the rest waits for the next.
    pub(crate) fn advance(&mut self, done: usize) {
        self.plan.advance(done);
        self.appended = self.appended.saturating_sub(done);
    }

    /// A send's fate at a link failure: with sync (a presence check, then stores),
    /// kept, in order, and done again from its last finished round (at least once).
    /// Without, best effort as upstream's publish: delivered after the outage it
    /// would arrive out of order with what came since.
    pub(crate) fn fate(&self) -> Fate {
        match self.plan {
            // Appended again after the outage: a stream keeps its own order.
            _ if self.streaming == Streaming::Only => Fate::Keep,
            RemotePlan::CheckPresence(_) => Fate::Keep,
            RemotePlan::Publish(_) | RemotePlan::Nothing => Fate::Lost(Loss::Outage),
        }
    }
}
