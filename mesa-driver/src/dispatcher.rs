//! The Dispatcher: send to the clients of a cluster from any process (a worker, a
//! cron job, another service) without running a server, wire-compatible with
//! `@cryb/mesa`'s `Dispatcher`.
//!
//! A dispatch publishes one envelope on `ns("ws")`, which every replica (ours or
//! upstream's) delivers to its local connections among the recipients. With sync on,
//! the recipients are first checked against `ns("connected_clients")` and the message
//! is stored for the offline ones in `ns("undelivered_messages")`, in upstream's
//! format but appended atomically and capped per id (upstream's read-modify-write
//! loses concurrent appends). What to ask Redis is decided by `mesa_core::Dispatch`,
//! in the rounds a server's replica uses (presence checks and stores pipelined, one
//! PUBLISH per dispatch, per round of a few thousand ids for a dispatch to more);
//! this shell only executes it.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use mesa_core::rooms::RoomRefusal;
use mesa_core::{
    Dispatch, DispatchConfig, DispatchReport, Limits, Message, MessageOptions, Namespace, Opcode,
    Recipients, TooManyRecipients,
};
use redis::aio::MultiplexedConnection;
use serde_json::json;

use crate::cluster::calls::{Batch, ScriptHashes, load_scripts};
use crate::cluster::link::{self, check_ca_pem, commands};
use crate::redis_failure::RedisFailure;

/// Why a dispatch (or connecting a [`Dispatcher`]) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The Redis URL cannot be parsed.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// A setting is out of range (e.g. a zero `max_stored`).
    #[error("invalid setting: {0}")]
    InvalidSetting(&'static str),
    /// The CA certificates for `rediss://` cannot be used.
    #[error("Redis CA certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The dispatch addressed more distinct ids than
    /// [`max_recipients`](Dispatcher::max_recipients); nothing was published or stored.
    #[error(transparent)]
    TooManyRecipients(#[from] TooManyRecipients),
    /// The room name is not valid (see `mesa_core::rooms::check_room`).
    #[error("invalid room: {0}")]
    InvalidRoom(#[from] RoomRefusal),
    /// Redis is unreachable or failed a command. Nothing is retried: the dispatch may
    /// have been published or stored in part. The next dispatch reconnects.
    #[error("Redis: {0}")]
    Redis(#[source] RedisFailure),
}

impl From<redis::RedisError> for DispatchError {
    fn from(error: redis::RedisError) -> Self {
        DispatchError::Redis(error.into())
    }
}

/// Sends to the clients of a cluster through its Redis, from any process.
///
/// Cheap to share (`&self` methods; wrap it in an `Arc` to share it between tasks):
/// concurrent dispatches share one multiplexed Redis connection. It needs no timer
/// of its own, so it runs on whichever runtime redis-rs was built for (mesa-driver's
/// `tokio` or `smol` feature).
pub struct Dispatcher {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    config: DispatchConfig,
    hashes: ScriptHashes,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Dispatcher`]: [`Dispatcher::builder`], the settings, then
/// [`connect`](Self::connect).
#[derive(Clone)]
#[must_use]
pub struct DispatcherBuilder {
    url: String,
    namespace: Option<String>,
    sync: bool,
    max_stored: usize,
    max_recipients: usize,
    redis_ca_pem: Option<Vec<u8>>,
    legacy_bus: bool,
}

impl std::fmt::Debug for DispatcherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .field("sync", &self.sync)
            .field("max_stored", &self.max_stored)
            .field("max_recipients", &self.max_recipients)
            .field("redis_ca_pem", &self.redis_ca_pem.is_some())
            .field("legacy_bus", &self.legacy_bus)
            .finish()
    }
}

impl DispatcherBuilder {
    /// The cluster's namespace (default none; empty is none too).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Store messages to ids connected nowhere for them (default false).
    pub fn sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// Keep at most `max` stored messages per id, the oldest going first (default
    /// 1000, the servers' default).
    pub fn max_stored(mut self, max: usize) -> Self {
        self.max_stored = max;
        self
    }

    /// Allow at most `max` distinct ids per dispatch (after `excluding`), like the
    /// servers' `Limits::max_recipients` (100,000 by default): a longer list is
    /// refused with [`DispatchError::TooManyRecipients`]. Zero is an invalid setting.
    pub fn max_recipients(mut self, max: usize) -> Self {
        self.max_recipients = max;
        self
    }

    /// For a `rediss://` URL: trust these PEM certificates (a private CA) instead of
    /// the platform's store ([`ClusterConfig::redis_ca_pem`](crate::ClusterConfig::redis_ca_pem)).
    pub fn redis_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.redis_ca_pem = Some(pem.into());
        self
    }

    /// Publish dispatches to ids on the shared `ws` channel, which every replica reads
    /// (default true: @cryb/mesa's replicas need it). False routes each to the
    /// mesa-rs replicas that hold its ids
    /// ([`ClusterConfig::legacy_bus`](crate::ClusterConfig::legacy_bus)).
    pub fn legacy_bus(mut self, on: bool) -> Self {
        self.legacy_bus = on;
        self
    }

    /// Validate the settings and connect (the connection is opened now, so that an
    /// unreachable Redis fails here).
    pub async fn connect(self) -> Result<Dispatcher, DispatchError> {
        if self.max_stored == 0 {
            return Err(DispatchError::InvalidSetting(
                "max_stored must be at least 1",
            ));
        }
        if self.max_recipients == 0 {
            return Err(DispatchError::InvalidSetting(
                "max_recipients must be at least 1",
            ));
        }
        let config = DispatchConfig {
            namespace: Namespace::new(self.namespace),
            sync: self.sync,
            max_stored_per_id: self.max_stored,
            max_recipients: self.max_recipients,
            legacy_bus: self.legacy_bus,
        };
        if let Some(pem) = &self.redis_ca_pem {
            check_ca_pem(pem)?;
        }
        let client = link::client(&self.url, self.redis_ca_pem.as_deref())
            .map_err(|error| DispatchError::InvalidUrl(error.to_string()))?;
        let dispatcher = Dispatcher {
            client,
            conn: Mutex::new(None),
            config,
            hashes: ScriptHashes::new(),
        };
        dispatcher.connection().await?;
        Ok(dispatcher)
    }
}

impl Dispatcher {
    /// Start building a Dispatcher of the cluster on the Redis at `url` (e.g.
    /// `redis://127.0.0.1:6379/`, or `rediss://` for TLS).
    pub fn builder(url: impl Into<String>) -> DispatcherBuilder {
        DispatcherBuilder {
            url: url.into(),
            namespace: None,
            sync: false,
            max_stored: 1000,
            max_recipients: Limits::default().max_recipients,
            redis_ca_pem: None,
            legacy_bus: true,
        }
    }

    /// The most distinct ids one dispatch may address.
    pub fn max_recipients(&self) -> usize {
        self.config.max_recipients
    }

    /// Whether messages to offline ids are stored.
    pub fn sync(&self) -> bool {
        self.config.sync
    }

    /// The key and channel names this Dispatcher uses.
    pub fn namespace(&self) -> &Namespace {
        &self.config.namespace
    }

    /// Send `message` to `recipients` (minus `excluding`, which only filters an
    /// explicit list, as upstream) on every replica, with per-message `options`
    /// (e.g. [`MessageOptions::no_sync`]) carried in the envelope's `o`.
    ///
    /// A global dispatch is published unchanged, even with sync. With sync, the
    /// recipients are checked for presence: the connected ones get the message, the
    /// others have it stored. Each id is counted once (upstream stores twice for an id
    /// listed twice). An op 5 message is never stored (upstream would store it, and
    /// its redelivery would then disconnect the client); see
    /// [`dispatch_event`](Self::dispatch_event). A list of more distinct ids than
    /// [`max_recipients`](Self::max_recipients) is refused before Redis is asked.
    pub async fn dispatch(
        &self,
        message: Message,
        options: Option<MessageOptions>,
        recipients: Recipients,
        excluding: &[String],
    ) -> Result<DispatchReport, DispatchError> {
        self.send(message, options, recipients.excluding(excluding))
            .await
    }

    /// Send an internal event (op 5, upstream's `DispatchEvent`: `{"op":5,"d":{},
    /// "t":action}`) to `recipients` minus `excluding`. Replicas act on it and never
    /// forward it: `DISCONNECT_CLIENT` closes those clients' connections with 1000.
    /// Never stored.
    pub async fn dispatch_event(
        &self,
        action: &str,
        recipients: Recipients,
        excluding: &[String],
    ) -> Result<DispatchReport, DispatchError> {
        let mut message = Message::new(Opcode::Internal, json!({}));
        message.t = Some(action.to_owned());
        self.send(message, None, recipients.excluding(excluding))
            .await
    }

    /// Send `message` to the members of `room` on every replica (one publish on the
    /// room's channel; best effort, nothing is stored). Refused for an invalid room
    /// name before Redis is asked.
    pub async fn dispatch_room(
        &self,
        room: &str,
        message: Message,
    ) -> Result<DispatchReport, DispatchError> {
        let dispatch = Dispatch::to_room(&self.config, message, room)?;
        self.execute(dispatch).await
    }

    async fn send(
        &self,
        message: Message,
        options: Option<MessageOptions>,
        recipients: Recipients,
    ) -> Result<DispatchReport, DispatchError> {
        let now = Instant::now();
        let dispatch = Dispatch::new(&self.config, message, options, &recipients, now)?;
        self.execute(dispatch).await
    }

    /// Execute what `mesa_core::Dispatch` plans, one pipelined round trip per step of
    /// its rounds.
    async fn execute(&self, mut dispatch: Dispatch) -> Result<DispatchReport, DispatchError> {
        let mut conn = None;
        loop {
            let commands: Vec<_> = std::iter::from_fn(|| dispatch.poll_command()).collect();
            if commands.is_empty() {
                break;
            }
            let conn = match &mut conn {
                Some(conn) => conn,
                None => conn.insert(self.connection().await?),
            };
            let batch = Batch::new(commands, dispatch.keys(), &self.hashes);
            let replies = batch.execute(conn).await.inspect_err(|_| self.forget())?;
            let now = Instant::now();
            for (token, reply) in replies {
                dispatch.handle_reply(now, token, reply);
            }
        }
        dispatch
            .finish()
            .map_err(|refused| DispatchError::Redis(RedisFailure::refused(refused)))
    }

    fn slot(&self) -> MutexGuard<'_, Option<MultiplexedConnection>> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The shared connection, opened (with the store script loaded) when there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, DispatchError> {
        if let Some(conn) = self.slot().clone() {
            return Ok(conn);
        }
        let mut conn = commands(&self.client).await?;
        load_scripts(&mut conn).await?;
        Ok(self.slot().get_or_insert(conn).clone())
    }

    /// Drop a connection that failed; the next dispatch opens a new one.
    fn forget(&self) {
        *self.slot() = None;
    }
}
