//! A connection slot, held from admission until the connection is registered.

use std::sync::Arc;

use crate::registry::Registry;

/// One of a server's connection slots ([`ServerBuilder::max_connections`](crate::ServerBuilder::max_connections)),
/// held from admission until the connection is registered, or until its handshakes
/// fail or time out; dropping it gives the slot back. [`Server::admit`](crate::Server::admit)
/// hands one to code that accepts connections itself.
#[must_use = "the slot is given back as soon as the admission is dropped"]
pub struct Admission {
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.release_admission();
    }
}

impl Admission {
    /// Take a slot when fewer than `max` connections are open or handshaking
    /// (always, without a limit); `None` when the server is full.
    pub(crate) fn take(registry: &Arc<Registry>, max: Option<usize>) -> Option<Self> {
        registry.try_admit(max).then(|| Admission {
            registry: registry.clone(),
        })
    }
}
