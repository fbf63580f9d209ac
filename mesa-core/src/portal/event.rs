//! What a [`PortalMember`](super::PortalMember) tells the application and the
//! driver besides commands for its link.

use crate::cluster::PortalEvent;

/// Something the application or the driver must learn.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum PortalMemberEvent {
    /// A client event for the application: addressed to this portal, or any event
    /// with [`report_all_events`](super::PortalMemberConfig::report_all_events).
    Client(PortalEvent),
    /// The link is open (again): the portal registers anew.
    LinkUp,
    /// The portal is in the pool (and announced, when the pool did not hold it):
    /// servers address events to it. Again after every reconnection.
    Joined,
    /// The link failed, or a `Connect` could not open it; a `Connect` follows after
    /// a backoff, unless the portal stops ([`Stopped`](Self::Stopped) follows).
    LinkDown {
        /// Why.
        reason: String,
    },
    /// A message on the subscription could not be read; it was skipped.
    Undecodable {
        /// The channel it came on.
        channel: String,
        /// Why.
        error: String,
    },
    /// The portal stopped: it asks nothing more. Said exactly once.
    Stopped {
        /// `Ok` when it left the pool (or was not in it). `Err` with why when Redis
        /// could not be reached to leave it (servers then keep it in their pool
        /// until they restart), or when its first link failed before it ever joined.
        outcome: Result<(), String>,
    },
}
