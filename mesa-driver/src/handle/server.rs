//! The handle an application sends with, from anywhere.

use std::sync::Arc;

use mesa_core::rooms::RoomRefusal;
use mesa_core::{ConnId, Message, MessageOptions, Recipients};

use crate::registry::{Registry, SendReport};

use super::{PresenceError, RoomMember, SendError};

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

    /// Put connection `conn` in `room`, whatever the room policy says (an extended
    /// client hears `mesa:subscribed`; an old one just receives the room's messages).
    /// Refused for an invalid room name, a closed connection, or one in
    /// `Limits::max_rooms_per_connection` rooms already. The membership hears no
    /// `mesa:join` or `mesa:leave` unless [`set_presence`](Self::set_presence) turns
    /// them on.
    pub fn join(&self, conn: ConnId, room: &str) -> Result<(), RoomRefusal> {
        self.registry.join(conn, room, true, false, None).map(drop)
    }

    /// Whether connection `conn`, a member of `room`, hears who joins and leaves it
    /// (`mesa:join`, `mesa:leave`, as a client's subscribe with `"presence": true`);
    /// returns whether it does now. Only an extended connection can (an old client
    /// never receives a control dispatch): for the others it stays off.
    pub fn set_presence(&self, conn: ConnId, room: &str, on: bool) -> bool {
        self.registry.watch(conn, room, on)
    }

    /// Take connection `conn` out of `room`; whether it was in it.
    pub fn leave(&self, conn: ConnId, room: &str) -> bool {
        self.registry.leave(conn, room, true)
    }

    /// Put every connection of `id` on this server in `room` (the way old clients get
    /// into rooms: call it when they authenticate); how many joined. The first refusal
    /// ends it.
    pub fn join_id(&self, id: &str, room: &str) -> Result<usize, RoomRefusal> {
        let mut joined = 0;
        for conn in self.registry.conns_of(id) {
            if !self.registry.join(conn, room, true, false, None)?.already {
                joined += 1;
            }
        }
        Ok(joined)
    }

    /// Take every connection of `id` on this server out of `room`; how many left.
    pub fn leave_id(&self, id: &str, room: &str) -> usize {
        self.registry
            .conns_of(id)
            .into_iter()
            .filter(|conn| self.registry.leave(*conn, room, true))
            .count()
    }

    /// Send `message` to every member of `room`, on every replica of the cluster:
    /// extended clients receive it with its room, old ones as an ordinary dispatch.
    /// Best effort across replicas, as upstream's publishes (no sync for rooms),
    /// unless the room recovers (`ClusterConfig::recovery`). The report's
    /// `delivered` counts the members written to at once: in a cluster, once Redis
    /// confirmed this replica's subscription to the room (and always in a
    /// recoverable room), its members get the message when it comes back from Redis,
    /// and count 0 here. Refused for an invalid room name.
    pub fn publish(&self, room: &str, message: &Message) -> Result<SendReport, RoomRefusal> {
        self.registry.publish(message, room)
    }

    /// Who is in `room` on every replica of the cluster: each authenticated id in it
    /// with its connections there, by id (read from Redis in one command, O(members);
    /// a replica that crashed leaves it within its lease). A server alone answers
    /// with its own members. Refused for an invalid room name; with the cluster's
    /// Redis unreachable, [`PresenceError::Unavailable`].
    pub async fn room_members(&self, room: &str) -> Result<Vec<RoomMember>, PresenceError> {
        let members = self.registry.room_members(room)?;
        let members = members
            .await
            .map_err(|_| PresenceError::Unavailable("the server is gone".to_owned()))?
            .map_err(PresenceError::Unavailable)?;
        Ok(members
            .into_iter()
            .map(|(id, connections)| RoomMember { id, connections })
            .collect())
    }

    /// Rooms with a member on this server.
    pub fn room_count(&self) -> usize {
        self.registry.room_counts().0
    }

    /// Room memberships on this server, over all rooms.
    pub fn membership_count(&self) -> usize {
        self.registry.room_counts().1
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
