//! What the application plugs in for connections and their messages: its handler,
//! and the two handlers the crate ships (the relay, and one that does nothing).

use std::future::Future;

use mesa_core::{Close, Message, RelayAction};

use crate::handle::Connection;

/// The application's view of connections. Hooks run on the connection's own task, in
/// order: a slow hook delays only that connection.
#[allow(unused_variables)]
pub trait Handler: Send + Sync + 'static {
    /// A connection opened.
    fn on_connect(&self, conn: &Connection) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// A connection authenticated (the first time, or again).
    fn on_authenticated(&self, conn: &Connection) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// An application message arrived.
    fn on_message(&self, conn: &Connection, message: Message) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// A connection closed.
    fn on_disconnect(&self, conn: &Connection, close: &Close) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The relay behaviour of the examples and `mesa serve`: `ECHO` back to its sender,
/// `BROADCAST` to everyone or to `d.to` minus `d.except` (see [`mesa_core::relay()`]).
/// A `BROADCAST` addressing more distinct ids than `Limits::max_recipients` is not
/// sent: its sender is closed with 1008 `too many recipients: N > max`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relay;

impl Handler for Relay {
    async fn on_message(&self, conn: &Connection, message: Message) {
        let server = conn.server();
        match mesa_core::relay(message, server.max_recipients()) {
            Some(RelayAction::Reply(message)) => {
                let _ = conn.send(&message);
            }
            Some(RelayAction::Send {
                message,
                recipients,
            }) => {
                // Within the limit: the relay checked it, the same check as `send`'s.
                let _ = server.send(&message, &recipients);
            }
            Some(RelayAction::Refuse(close)) => {
                let _ = conn.disconnect(close);
            }
            None => {}
        }
    }
}

/// A handler that does nothing: messages reach only middleware.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ignore;

impl Handler for Ignore {}
