//! Who may subscribe and publish to which rooms: a server's room policy, and the
//! application's authorization behind it (which denies unless it says yes).

use std::future::Future;
use std::sync::Arc;

use mesa_core::rooms::{RefusalCode, RoomGate, RoomRefusal};

use super::auth::BoxFuture;
use crate::handle::Connection;

/// What a client asks of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomAccess {
    /// The room.
    pub room: String,
    /// A subscribe (with the client's token, if it sent one), or a publish.
    pub kind: RoomAccessKind,
}

/// The kind of a [`RoomAccess`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomAccessKind {
    /// Join the room, with the token the client sent.
    Subscribe {
        /// The client's token, if any (a signature your server issued, say).
        token: Option<String>,
    },
    /// Publish a message to the room.
    Publish,
}

/// The application's authorization of room requests: `Ok(())` allows, an error
/// refuses with its code and reason (the client sees both).
pub trait RoomAuthorizer: Send + Sync + 'static {
    /// Decide `access` for `conn`.
    fn authorize(
        &self,
        conn: &Connection,
        access: RoomAccess,
    ) -> BoxFuture<'static, Result<(), RoomRefusal>>;
}

impl<F, Fut> RoomAuthorizer for F
where
    F: Fn(Connection, RoomAccess) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), RoomRefusal>> + Send + 'static,
{
    fn authorize(
        &self,
        conn: &Connection,
        access: RoomAccess,
    ) -> BoxFuture<'static, Result<(), RoomRefusal>> {
        Box::pin(self(conn.clone(), access))
    }
}

/// Who may subscribe and publish to rooms ([`ServerBuilder::rooms`](crate::ServerBuilder::rooms)).
/// Without one, rooms are off: the hello announces nothing and `mesa:` dispatches are
/// ordinary messages. The server itself may always put connections in rooms and
/// publish to them.
#[derive(Clone)]
pub enum RoomPolicy {
    /// Any client, authenticated or not, may subscribe to and publish in any room:
    /// for demos only.
    Open,
    /// Any authenticated client may subscribe to and publish in any room.
    Authenticated,
    /// The authorizer decides each request.
    Authorizer(Arc<dyn RoomAuthorizer>),
}

impl RoomPolicy {
    /// The policy of an authorizer.
    pub fn authorizer(authorizer: impl RoomAuthorizer) -> Self {
        RoomPolicy::Authorizer(Arc::new(authorizer))
    }

    /// The core's decision for this policy.
    pub(crate) fn gate(&self) -> RoomGate {
        match self {
            RoomPolicy::Open => RoomGate::Open,
            RoomPolicy::Authenticated => RoomGate::Authenticated,
            RoomPolicy::Authorizer(_) => RoomGate::Ask,
        }
    }

    /// Ask the authorizer (a policy without one decides alone: see [`gate`](Self::gate)).
    pub(crate) fn ask(
        &self,
        conn: &Connection,
        access: RoomAccess,
    ) -> BoxFuture<'static, Result<(), RoomRefusal>> {
        match self {
            RoomPolicy::Authorizer(authorizer) => authorizer.authorize(conn, access),
            _ => Box::pin(std::future::ready(Err(RoomRefusal::new(
                RefusalCode::Unauthorized,
                "rooms are not authorized here",
            )))),
        }
    }
}

impl std::fmt::Debug for RoomPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoomPolicy::Open => f.write_str("Open"),
            RoomPolicy::Authenticated => f.write_str("Authenticated"),
            RoomPolicy::Authorizer(_) => f.write_str("Authorizer(..)"),
        }
    }
}
