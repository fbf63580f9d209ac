//! What a [`DurablePortal`](super::DurablePortal) tells the application and the
//! driver besides commands for its link.

use crate::cluster::PortalEvent;

/// One client event handed to the application: settle it with
/// [`DurablePortal::handle_settled`](super::DurablePortal::handle_settled), `true`
/// once handled (it is acknowledged), `false` when the handler failed (it is
/// delivered again after the visibility timeout, or dead-lettered).
#[derive(Debug, Clone, PartialEq)]
pub struct DurableDelivery {
    /// The partition (stream) it came from.
    pub partition: usize,
    /// Its entry id in that stream: what settles it.
    pub entry_id: String,
    /// The event id the server gave it: the same on every delivery, and on a second
    /// entry of the same event, for the application to drop what it handled.
    pub event_id: String,
    /// The client event, `portal_id` this portal's id.
    pub event: PortalEvent,
    /// How often it was delivered, this time included (1 the first time).
    pub deliveries: u64,
}

/// Something the application or the driver must learn.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum DurablePortalEvent {
    /// A client event to handle, then settle.
    Delivery(DurableDelivery),
    /// The link is open (again): the portal makes sure its group exists.
    LinkUp,
    /// The group exists: the portal takes partitions and reads. Again after every
    /// reconnection.
    Ready,
    /// The partitions this portal reads changed: these are held now.
    Partitions {
        /// Held partitions, ascending.
        held: Vec<usize>,
    },
    /// Entries went to the dead-letter stream `ns("portal_dlq")` and were
    /// acknowledged: delivered too often, or unreadable.
    DeadLettered {
        /// The partition they came from.
        partition: usize,
        /// How many.
        count: usize,
        /// Why (for unreadable entries, what is wrong with the last one).
        reason: String,
    },
    /// Entries pending for too long were gone from the stream (trimmed by `MAXLEN`
    /// before any portal handled them): they are lost.
    Lost {
        /// The partition.
        partition: usize,
        /// How many.
        count: usize,
    },
    /// A second entry of an event acknowledged lately (a server appended it again
    /// after losing Redis's answer): acknowledged without handing it out.
    Duplicate {
        /// Its event id.
        event_id: String,
    },
    /// The link failed, or a `Connect` could not open it; a `Connect` follows after
    /// a backoff, unless the portal stops ([`Stopped`](Self::Stopped) follows).
    /// Partitions are held no more until the link is back.
    LinkDown {
        /// Why.
        reason: String,
    },
    /// The portal stopped: it asks nothing more. Said exactly once.
    Stopped {
        /// `Ok` when it gave its partitions back; `Err` with why when Redis could
        /// not be reached (its leases then expire by themselves), or when its first
        /// link failed before it was ever ready.
        outcome: Result<(), String>,
    },
}
