//! What the application plugs in: an authenticator (async, may call a database) and
//! a handler for connections and their messages.

use std::future::Future;
use std::pin::Pin;

use mesa_core::{Close, Message, RelayAction};
use serde_json::Value;

use crate::connection::Connection;

/// A boxed future, as the authenticator returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an authentication was refused; the reason goes into the 1008 close frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

impl AuthError {
    /// Refuse with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        AuthError(reason.into())
    }
}

/// Decides who a client is from its op 2 data: `Ok((id, user))` or an error.
pub trait Authenticator: Send + Sync + 'static {
    /// Check `credentials` (the op 2 data, including `shouldSync`).
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>>;
}

impl<F, Fut> Authenticator for F
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(String, Value), AuthError>> + Send + 'static,
{
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>> {
        Box::pin(self(credentials))
    }
}

/// Development authentication (any non-empty `token` is the id): for demos and tests
/// only, it proves nothing about who the client is.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevAuthenticator;

impl Authenticator for DevAuthenticator {
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>> {
        let outcome = mesa_core::dev_authenticate(&credentials).map_err(AuthError::new);
        Box::pin(std::future::ready(outcome))
    }
}

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
        match mesa_core::relay(&message, server.max_recipients()) {
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
