//! How a [`Replica`](super::Replica) behaves: its cluster settings, and what it takes
//! from the server's configuration.

use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::cluster::{Namespace, PortalChoice};
use crate::config::{ConfigError, ServerConfig};
use crate::recovery::RecoveryConfig;

/// Stores that wait for Redis replicas (`WAIT` after each store): a message stored
/// for an offline id survives a failover to a replica once `replicas` of them have
/// it. The sends wait for it (at most `timeout` per store), so a later send's store
/// never overtakes it; stores that too few replicas acknowledged in time stay stored
/// on the primary and are reported
/// ([`ReplicaEvent::Stored`](super::ReplicaEvent::Stored)`::unreplicated`), never
/// retried (a store is not idempotent: it would be stored twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreWait {
    /// Redis replicas that must have each store.
    pub replicas: usize,
    /// How long Redis waits for them.
    pub timeout: Duration,
}

impl StoreWait {
    /// Check it against the time Redis has to answer a command: a wait as long would
    /// fail the link instead of reporting the store.
    pub fn check(&self, reply_timeout: Duration) -> Result<(), ConfigError> {
        if self.replicas == 0 {
            return Err(ConfigError::ZeroCount("replicas a store waits for"));
        }
        if self.timeout.is_zero() || self.timeout >= reply_timeout {
            return Err(ConfigError::StoreWait(reply_timeout));
        }
        Ok(())
    }
}

/// Durable portal queues: every client event is also appended (`XADD .. MAXLEN ~`)
/// to the stream of its client's partition, `ns("portal_q:<p>")`, where durable
/// portals read it through a consumer group and acknowledge it once handled
/// (at least once), instead of the pub/sub publish that a dead portal misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurablePortals {
    /// Streams the events are spread over by client id (1 to
    /// [`MAX_PORTAL_PARTITIONS`](Self::MAX_PORTAL_PARTITIONS)); the durable portals
    /// must use the same number. Default
    /// [`DEFAULT_PORTAL_PARTITIONS`](crate::cluster::DEFAULT_PORTAL_PARTITIONS).
    pub partitions: usize,
    /// Entries each stream keeps, about (`MAXLEN ~`): a bound on Redis memory when no
    /// portal reads. Default 1 000 000.
    pub maxlen: usize,
}

impl DurablePortals {
    /// Partitions at most: every portal read names each of its streams.
    pub const MAX_PORTAL_PARTITIONS: usize = 1024;

    /// Check the settings.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(1..=Self::MAX_PORTAL_PARTITIONS).contains(&self.partitions) {
            return Err(ConfigError::PortalPartitions(self.partitions));
        }
        if self.maxlen == 0 {
            return Err(ConfigError::ZeroCount("durable portal stream length"));
        }
        Ok(())
    }
}

impl Default for DurablePortals {
    fn default() -> Self {
        DurablePortals {
            partitions: crate::cluster::DEFAULT_PORTAL_PARTITIONS,
            maxlen: 1_000_000,
        }
    }
}

/// The settings of one replica, with the driver's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Isolates clusters sharing one Redis.
    pub namespace: Namespace,
    /// How long this replica's presence survives without renewal; renewed every
    /// third of it. Default 10 s.
    pub lease: Duration,
    /// Forward client events to portals, picking one per event this way. Default off.
    pub portals: Option<PortalChoice>,
    /// Also append every client event to the durable portal streams
    /// ([`DurablePortals`]); with `portals` off, only there. Default off.
    pub durable_portals: Option<DurablePortals>,
    /// Most jobs (sends, loads, trims, clears, portal events) waiting for Redis,
    /// queued or in flight; beyond it new jobs are refused and reported
    /// ([`ReplicaEvent::JobsLost`](super::ReplicaEvent::JobsLost)). As many presence
    /// changes may wait besides; beyond that they wait for the next renewal, which
    /// registers the ids connected here anew. Default 10 000.
    pub max_pending: usize,
    /// Messages to ids connected nowhere are stored for them. Default: the server's
    /// sync setting.
    pub sync: bool,
    /// Authenticated ids go to `connected_clients` (upstream's `storeConnectedUsers`).
    /// Default: the server's setting (true).
    pub presence: bool,
    /// Global sends skip unauthenticated connections. Default: the server's setting.
    pub auth_required: bool,
    /// Most messages stored per id. Default: the server's limit (1000).
    pub max_stored_per_id: usize,
    /// Most distinct ids one send may address. Default: the server's limit (100 000).
    pub max_recipients: usize,
    /// Most rooms one connection may be in. Default: the server's limit (128).
    pub max_rooms_per_connection: usize,
    /// How long a connection waits for its stored messages; a load still queued
    /// after it is dropped (the session went on without). Default: the server's (5 s).
    pub load_timeout: Duration,
    /// Time Redis has to answer a command (or the link to open) before the link
    /// counts as broken. Default 3 s.
    pub reply_timeout: Duration,
    /// Delays between attempts to reopen the link. Default 100 ms to 5 s, full jitter.
    pub reconnect: BackoffConfig,
    /// Publish sends to ids on the shared `ws` channel, which every replica reads
    /// (Node replicas too: a mixed cluster needs it). Off, a send is routed to the
    /// replicas that hold its ids ([`Command::Route`](super::Command::Route)), so a
    /// replica parses only what its connections need; Node replicas then never get
    /// our sends to ids. Global sends stay on `ws` either way, and every replica
    /// delivers what comes on `ws` and on its own channel, so replicas of either
    /// setting and upstream's Dispatchers work together. Needs `presence` (the route
    /// table is kept with it). Default on.
    pub legacy_bus: bool,
    /// Redis instances the cluster's data is spread over (1 to
    /// [`Token::MAX_SHARDS`](super::Token::MAX_SHARDS)): each id's and each room's
    /// keys and channels on the one [`shard_of`](crate::cluster::shard_of) names,
    /// the global ones (`ws`, portals, the connection counter) on the first. Every
    /// replica links to each. More than one needs the legacy bus off: Node replicas
    /// know one Redis. Default 1.
    pub shards: usize,
    /// Stores wait for Redis replicas ([`StoreWait`]). Default `None`: a store counts
    /// once the primary has it, and a failover may lose the last ones it had not
    /// passed on.
    pub store_wait: Option<StoreWait>,
    /// Rooms that keep a stream of their last messages, so a client that comes
    /// back gets what it missed ([`RecoveryConfig`]). Every replica and Dispatcher
    /// of a cluster needs the same. Default `None`.
    pub recovery: Option<RecoveryConfig>,
}

impl ReplicaConfig {
    /// The defaults, with what the server's configuration decides (sync, presence,
    /// limits, the load timeout).
    pub fn new(server: &ServerConfig) -> Self {
        let auth = server.authentication();
        ReplicaConfig {
            namespace: Namespace::default(),
            lease: Duration::from_secs(10),
            portals: None,
            durable_portals: None,
            max_pending: 10_000,
            sync: server.sync().is_some(),
            presence: auth.is_none_or(|a| a.store_connected_users),
            auth_required: server.authentication_required(),
            max_stored_per_id: server.limits().max_stored_per_id,
            max_recipients: server.limits().max_recipients,
            max_rooms_per_connection: server.limits().max_rooms_per_connection,
            load_timeout: server
                .sync()
                .map_or(Duration::from_secs(5), |s| s.load_timeout),
            reply_timeout: Duration::from_secs(3),
            reconnect: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                base_is_fixed: true,
            },
            legacy_bus: true,
            shards: 1,
            store_wait: None,
            recovery: None,
        }
    }

    /// Check the settings once, before a replica uses them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            (self.lease, "lease"),
            (self.load_timeout, "sync load timeout"),
            (self.reply_timeout, "Redis reply timeout"),
        ];
        crate::config::check_link_timing(&durations, &self.reconnect)?;
        if !self.legacy_bus && !self.presence {
            return Err(ConfigError::RoutingWithoutPresence);
        }
        if !(1..=super::Token::MAX_SHARDS).contains(&self.shards) {
            return Err(ConfigError::Shards(self.shards));
        }
        if self.shards > 1 && self.legacy_bus {
            return Err(ConfigError::ShardingWithLegacyBus);
        }
        if let Some(wait) = self.store_wait {
            wait.check(self.reply_timeout)?;
        }
        if self
            .recovery
            .as_ref()
            .is_some_and(|recovery| recovery.size == 0)
        {
            return Err(ConfigError::ZeroCount("recovery stream size"));
        }
        if let Some(durable) = self.durable_portals {
            durable.check()?;
        }
        let counts = [
            (self.max_pending, "max pending cluster jobs"),
            (self.max_stored_per_id, "max stored messages per id"),
            (self.max_recipients, "max recipients"),
        ];
        match counts.into_iter().find(|(value, _)| *value == 0) {
            Some((_, name)) => Err(ConfigError::ZeroCount(name)),
            None => Ok(()),
        }
    }
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig::new(&ServerConfig::default())
    }
}
