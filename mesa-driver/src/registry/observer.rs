//! How the registry tells the server's observers what it did without knowing them:
//! the middleware sits above the registry (its hooks take the handles, which are
//! built on the registry), so the registry reports through this trait instead.

use mesa_core::{Message, ReplicaEvent};

/// What the registry reports, as the middleware hears it.
pub(crate) trait Observer: Send + Sync {
    /// `message` was queued for `recipients` local connections.
    fn message_sent(&self, message: &Message, recipients: usize);

    /// Nothing can be done for these ids of a send: no connection here, no cluster.
    fn undeliverable(&self, message: &Message, ids: &[String]);

    /// Room memberships changed: `rooms` have a member here, `memberships` in all.
    fn rooms(&self, rooms: usize, memberships: usize);

    /// The cluster's replica told something (the registry itself acts on the loads
    /// and the retirement).
    fn replica_event(&self, event: &ReplicaEvent);
}
