//! A connection as the application holds it: its identity, and sending to it.

use std::net::SocketAddr;
use std::sync::Arc;

use mesa_core::rooms::RoomRefusal;
use mesa_core::{Close, ConnId, Message};
use serde_json::Value;

use crate::outbox::Outbound;
use crate::registry::{ConnShared, Identity, Registry, lock};

use super::{SendError, ServerHandle};

/// A connection as the application sees it. Cloning is cheap; every method works
/// from any task.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<ConnShared>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("conn", &self.shared.conn)
            .field("id", &self.id())
            .finish()
    }
}

impl Connection {
    /// The connection's handle inside this server.
    pub fn conn_id(&self) -> ConnId {
        self.shared.conn
    }

    /// The peer's address, when known.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.shared.remote
    }

    /// The authenticated id.
    pub fn id(&self) -> Option<String> {
        self.shared.id()
    }

    /// The authenticated user object (decoded anew at each call: the connection keeps
    /// it as text, which costs an idle connection far less).
    pub fn user(&self) -> Option<Value> {
        lock(&self.shared.identity).as_ref().map(Identity::user)
    }

    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        lock(&self.shared.identity).is_some()
    }

    /// Send `message` to this connection only.
    pub fn send(&self, message: &Message) -> Result<(), SendError> {
        Ok(self.shared.outbox.push(Outbound::Frame(message.encode()))?)
    }

    /// Close the connection with `close`.
    pub fn disconnect(&self, close: Close) -> Result<(), SendError> {
        Ok(self.shared.outbox.push(Outbound::Close(close))?)
    }

    /// Replace the user object (no frame is sent, as upstream); refused once the
    /// connection closed.
    pub fn update_user(&self, user: Value) -> Result<(), SendError> {
        if self.shared.outbox.is_closed() {
            return Err(SendError::Closed);
        }
        if let Some(identity) = lock(&self.shared.identity).as_mut() {
            identity.set_user(&user);
        }
        Ok(())
    }

    /// Put this connection in `room` (see [`ServerHandle::join`]).
    pub fn join(&self, room: &str) -> Result<(), RoomRefusal> {
        self.server().join(self.shared.conn, room)
    }

    /// Take this connection out of `room`; whether it was in it.
    pub fn leave(&self, room: &str) -> bool {
        self.server().leave(self.shared.conn, room)
    }

    /// A handle for sending to other connections.
    pub fn server(&self) -> ServerHandle {
        ServerHandle::new(self.registry.clone())
    }
}

impl Connection {
    /// The handle of a registered connection.
    pub(crate) fn new(shared: Arc<ConnShared>, registry: Arc<Registry>) -> Self {
        Connection { shared, registry }
    }

    /// What other tasks reach of it.
    pub(crate) fn shared(&self) -> &ConnShared {
        &self.shared
    }
}
