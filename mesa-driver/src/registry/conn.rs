//! The part of a connection other tasks reach: its identity, its outbox, and where
//! its stored messages arrive.

use std::net::SocketAddr;
use std::sync::Mutex;

use futures_channel::oneshot;
use mesa_core::{ConnId, Message};
use serde_json::Value;

use crate::outbox::Outbox;

/// Who a connection is, as the application sees it: its id, then its user object as
/// JSON text, in one allocation.
///
/// Kept as text: a `Value` map costs an idle connection some 360 bytes for
/// `{"id": ..}`, its text a tenth of that; the rare reader
/// ([`Connection::user`](crate::Connection::user)) decodes it.
#[derive(Debug)]
pub(crate) struct Identity {
    text: Box<str>,
    /// Where the id ends in `text`.
    id_len: usize,
}

impl Identity {
    pub(crate) fn new(id: &str, user: &Value) -> Self {
        Identity {
            text: format!("{id}{user}").into_boxed_str(),
            id_len: id.len(),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.text[..self.id_len]
    }

    /// The user object.
    pub(crate) fn user(&self) -> Value {
        // Our own encoding of a `Value` decodes.
        serde_json::from_str(&self.text[self.id_len..]).unwrap_or(Value::Null)
    }

    pub(crate) fn set_user(&mut self, user: &Value) {
        *self = Identity::new(self.id(), user);
    }
}

/// The part of a connection other tasks can reach.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) conn: ConnId,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) identity: Mutex<Option<Identity>>,
    pub(crate) outbox: Outbox,
    /// Where the messages stored for the connection's id go once the cluster read
    /// them (set while the connection waits for them).
    pub(crate) stored: Mutex<Option<oneshot::Sender<Vec<Message>>>>,
}

impl ConnShared {
    pub(crate) fn new(conn: ConnId, remote: Option<SocketAddr>, outbound_cap: usize) -> Self {
        ConnShared {
            conn,
            remote,
            identity: Mutex::new(None),
            outbox: Outbox::new(outbound_cap),
            stored: Mutex::new(None),
        }
    }

    /// The connection's id, if it authenticated.
    pub(crate) fn id(&self) -> Option<String> {
        lock(&self.identity)
            .as_ref()
            .map(|identity| identity.id().to_owned())
    }

    /// Wait for the stored messages of the connection's id.
    pub(crate) fn await_stored(&self) -> oneshot::Receiver<Vec<Message>> {
        let (reply, stored) = oneshot::channel();
        *lock(&self.stored) = Some(reply);
        stored
    }

    /// Hand over the stored messages the connection waits for (dropped when it
    /// stopped waiting).
    pub(crate) fn hand_stored(&self, messages: Vec<Message>) {
        if let Some(reply) = lock(&self.stored).take() {
            let _ = reply.send(messages);
        }
    }
}

/// Lock a mutex of plain data: a panic while holding it leaves nothing half-done.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
