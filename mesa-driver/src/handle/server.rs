//! The handle an application sends with, from anywhere.

use std::sync::Arc;

use mesa_core::{Message, MessageOptions, Recipients};

use crate::registry::{Registry, SendReport};

use super::SendError;

/// A cheap, cloneable handle for sending from anywhere in the application.
#[derive(Clone)]
pub struct ServerHandle {
    registry: Arc<Registry>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl ServerHandle {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        ServerHandle { registry }
    }

    /// Send `message` to `recipients` (everyone, or ids). It is encoded once; with a
    /// cluster, recipients elsewhere get it through one PUBLISH, and with sync the
    /// offline ones get it stored.
    ///
    /// A list addressing more distinct ids than [`max_recipients`](Self::max_recipients)
    /// is refused with [`SendError::TooManyRecipients`]: nothing of it is delivered,
    /// published or stored.
    pub fn send(
        &self,
        message: &Message,
        recipients: &Recipients,
    ) -> Result<SendReport, SendError> {
        Ok(self.registry.send(message, None, recipients)?)
    }

    /// [`send`](Self::send) with options, e.g. [`MessageOptions::no_sync`] for
    /// messages worthless later (typing indicators).
    pub fn send_with(
        &self,
        message: &Message,
        options: &MessageOptions,
        recipients: &Recipients,
    ) -> Result<SendReport, SendError> {
        Ok(self.registry.send(message, Some(options), recipients)?)
    }

    /// Send to every connection (only authenticated ones when authentication is
    /// required). Never refused: the recipient limit bounds explicit lists only.
    pub fn broadcast(&self, message: &Message) -> SendReport {
        // A global send is never over the recipient limit.
        self.registry
            .send(message, None, &Recipients::All)
            .unwrap_or_default()
    }

    /// Send to every connection of these ids, minus `excluding`; refused like
    /// [`send`](Self::send) when more than [`max_recipients`](Self::max_recipients)
    /// distinct ids remain after `excluding`.
    pub fn send_to<I, S>(
        &self,
        message: &Message,
        ids: I,
        excluding: &[String],
    ) -> Result<SendReport, SendError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let ids = ids.into_iter().map(Into::into).collect();
        self.send(message, &Recipients::from_ids(ids).excluding(excluding))
    }

    /// The most distinct ids one send may address ([`mesa_core::Limits::max_recipients`],
    /// set on the server builder): handlers that route their own messages check against it.
    pub fn max_recipients(&self) -> usize {
        self.registry.max_recipients()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.registry.connection_count()
    }

    /// Whether `id` has a connection here.
    pub fn is_online(&self, id: &str) -> bool {
        self.registry.is_online(id)
    }

    /// The ids with a connection here.
    pub fn online_ids(&self) -> Vec<String> {
        self.registry.online_ids()
    }
}
