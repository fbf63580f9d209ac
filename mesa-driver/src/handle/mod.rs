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

/// An id in a room, with its connections there over the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMember {
    /// The id.
    pub id: String,
    /// Its connections in the room, on every replica.
    pub connections: u64,
}

/// Why who is in a room could not be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PresenceError {
    /// The room name is not valid.
    #[error(transparent)]
    InvalidRoom(#[from] mesa_core::rooms::RoomRefusal),
    /// The cluster's Redis could not answer.
    #[error("room presence unavailable: {0}")]
    Unavailable(String),
}

impl From<Refused> for SendError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Closed => SendError::Closed,
            Refused::Overflow => SendError::Overflow,
        }
    }
}
