//! The handles the application holds: a connection, the server's sending handle,
//! a connection slot, and why a send was refused. They reach the server through its
//! registry; the loops that drive connections and the cluster live elsewhere.

mod admission;
mod connection;
mod server;

pub use admission::Admission;
pub use connection::Connection;
pub use server::ServerHandle;

use crate::outbox::Refused;

/// Why a connection (or, for too many recipients, a server) did not take a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// The connection's outbound queue is full; it is being closed as a slow consumer.
    #[error("the connection's outbound queue is full")]
    Overflow,
    /// A send addressed more distinct ids than `Limits::max_recipients`; nothing of it
    /// was delivered, published or stored.
    #[error(transparent)]
    TooManyRecipients(#[from] mesa_core::TooManyRecipients),
}

impl From<Refused> for SendError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Closed => SendError::Closed,
            Refused::Overflow => SendError::Overflow,
        }
    }
}
