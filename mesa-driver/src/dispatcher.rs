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

use futures_util::future::join_all;
use mesa_core::recovery::RecoveryConfig;
use mesa_core::rooms::RoomRefusal;
use mesa_core::{
    Command, Dispatch, DispatchConfig, DispatchReport, Keys, Limits, Message, MessageOptions,
    Namespace, Opcode, Recipients, Reply, StoreWait, Token, TooManyRecipients,
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
    /// One per Redis instance, in shard order, each with its shared connection.
    targets: Vec<link::Target>,
    conns: Mutex<Vec<Option<MultiplexedConnection>>>,
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
    shard_urls: Vec<String>,
    namespace: Option<String>,
    sync: bool,
    max_stored: usize,
    max_recipients: usize,
    redis_ca_pem: Option<Vec<u8>>,
    legacy_bus: bool,
    store_wait: Option<StoreWait>,
    recovery: Option<RecoveryConfig>,
}

impl std::fmt::Debug for DispatcherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("url", &self.url)
            .field("shard_urls", &self.shard_urls)
            .field("namespace", &self.namespace)
            .field("sync", &self.sync)
            .field("max_stored", &self.max_stored)
            .field("max_recipients", &self.max_recipients)
            .field("redis_ca_pem", &self.redis_ca_pem.is_some())
            .field("legacy_bus", &self.legacy_bus)
            .field("store_wait", &self.store_wait)
            .field("recovery", &self.recovery)
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

    /// Stores wait for Redis replicas
    /// ([`ClusterConfig::store_wait`](crate::ClusterConfig::store_wait)): the report's
    /// `unreplicated` counts the stores too few of them acknowledged in time.
    pub fn store_wait(mut self, wait: StoreWait) -> Self {
        self.store_wait = Some(wait);
        self
    }

    /// Rooms that keep a stream
    /// ([`ClusterConfig::recovery`](crate::ClusterConfig::recovery)): a dispatch to
    /// one appends to it, as the servers' publishes do.
    pub fn recovery(mut self, recovery: RecoveryConfig) -> Self {
        self.recovery = Some(recovery);
        self
    }

    /// The cluster's further Redis instances, in the servers' order
    /// ([`ClusterConfig::shard_urls`](crate::ClusterConfig::shard_urls)); needs the
    /// legacy bus off.
    pub fn shard_urls(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.shard_urls = urls.into_iter().map(Into::into).collect();
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
            shards: 1 + self.shard_urls.len(),
            store_wait: self.store_wait,
            recovery: self.recovery,
        };
        if config.validate().is_err() {
            return Err(DispatchError::InvalidSetting(
                "several Redis instances need the legacy bus off, and at most 256",
            ));
        }
        if let Some(wait) = self.store_wait {
            wait.check(link::REDIS_TIMEOUT).map_err(|_| {
                DispatchError::InvalidSetting("a store's wait must be positive and below 3 s")
            })?;
        }
        if let Some(pem) = &self.redis_ca_pem {
            check_ca_pem(pem)?;
        }
        let urls = std::iter::once(&self.url).chain(&self.shard_urls);
        let targets = urls
            .map(|url| link::Target::parse(url, self.redis_ca_pem.as_deref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| DispatchError::InvalidUrl(error.to_string()))?;
        let dispatcher = Dispatcher {
            conns: Mutex::new(vec![None; targets.len()]),
            targets,
            config,
            hashes: ScriptHashes::new(),
        };
        for shard in 0..dispatcher.targets.len() {
            dispatcher.connection(shard).await?;
        }
        Ok(dispatcher)
    }
}

impl Dispatcher {
    /// Start building a Dispatcher of the cluster on the Redis at `url` (e.g.
    /// `redis://127.0.0.1:6379/`, or `rediss://` for TLS).
    pub fn builder(url: impl Into<String>) -> DispatcherBuilder {
        DispatcherBuilder {
            url: url.into(),
            shard_urls: Vec::new(),
            namespace: None,
            sync: false,
            max_stored: 1000,
            max_recipients: Limits::default().max_recipients,
            redis_ca_pem: None,
            legacy_bus: true,
            store_wait: None,
            recovery: None,
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
    /// its rounds, on every Redis instance it asks at once.
    async fn execute(&self, mut dispatch: Dispatch) -> Result<DispatchReport, DispatchError> {
        loop {
            let mut by_shard: Vec<Vec<_>> = vec![Vec::new(); self.targets.len()];
            for (token, command) in std::iter::from_fn(|| dispatch.poll_command()) {
                by_shard[token.shard()].push((token, command));
            }
            if by_shard.iter().all(Vec::is_empty) {
                break;
            }
            let keys = dispatch.keys().clone();
            let rounds = by_shard
                .into_iter()
                .enumerate()
                .filter(|(_, commands)| !commands.is_empty())
                .map(|(shard, commands)| self.round_trip(shard, commands, &keys));
            for replies in join_all(rounds).await {
                let now = Instant::now();
                for (token, reply) in replies? {
                    dispatch.handle_reply(now, token, reply);
                }
            }
        }
        dispatch
            .finish()
            .map_err(|refused| DispatchError::Redis(RedisFailure::refused(refused)))
    }

    /// Pipeline `commands` on instance `shard`'s connection.
    async fn round_trip(
        &self,
        shard: usize,
        commands: Vec<(Token, Command)>,
        keys: &Keys,
    ) -> Result<Vec<(Token, Reply)>, DispatchError> {
        let mut conn = self.connection(shard).await?;
        let batch = Batch::new(commands, keys, &self.hashes);
        Ok(batch
            .execute(&mut conn)
            .await
            .inspect_err(|_| self.forget(shard))?)
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Option<MultiplexedConnection>>> {
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Instance `shard`'s shared connection, opened (with the scripts loaded) when
    /// there is none (through Sentinel, on the primary of now).
    async fn connection(&self, shard: usize) -> Result<MultiplexedConnection, DispatchError> {
        if let Some(conn) = self.slots()[shard].clone() {
            return Ok(conn);
        }
        let client = self.targets[shard].client().await?;
        let mut conn = commands(&client).await?;
        load_scripts(&mut conn).await?;
        Ok(self.slots()[shard].get_or_insert(conn).clone())
    }

    /// Drop a connection that failed; the next dispatch opens a new one.
    fn forget(&self, shard: usize) {
        self.slots()[shard] = None;
    }
}
