//! Server configuration: a typed builder with the documented defaults of
//! `PROTOCOL.md`, validated once.

use std::time::Duration;

use crate::hello::{Hello, Rule};
use crate::limits::Limits;

/// Heartbeat settings: the server sends op 1 every `interval` and closes a client
/// that missed more than `max_attempts` beats in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between heartbeats. Default 10 s.
    pub interval: Duration,
    /// Consecutive missed beats tolerated. Default 3.
    pub max_attempts: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_millis(10_000),
            max_attempts: 3,
        }
    }
}

/// Authentication settings; present when the application authenticates clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    /// Time a client has to authenticate, enforced with close 1008. Default 10 s.
    pub timeout: Duration,
    /// Server-wide sends skip unauthenticated connections. Default false.
    pub required: bool,
    /// Op 22 carries the user object (rule `sends_user_object`). Default true.
    pub send_user_object: bool,
    /// A rejected authentication closes the connection with 1008. Default true.
    pub disconnect_on_fail: bool,
    /// Authenticated ids are published to the cluster's presence set. Default true.
    pub store_connected_users: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            timeout: Duration::from_millis(10_000),
            required: false,
            send_user_object: true,
            disconnect_on_fail: true,
            store_connected_users: true,
        }
    }
}

/// Message sync (redelivery to ids that were offline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Pause between two redelivered messages. Default zero (as fast as the socket takes them).
    pub redelivery_interval: Duration,
    /// How long a connection waits for its stored messages before going on without
    /// them (they stay stored for its next authentication): a store that does not
    /// answer holds back this connection's live messages no longer than this.
    /// Default 5 s.
    pub load_timeout: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            redelivery_interval: Duration::ZERO,
            load_timeout: Duration::from_secs(5),
        }
    }
}

/// Everything a server session needs to know, validated by [`ServerConfigBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerConfig {
    pub(crate) heartbeat: Option<HeartbeatConfig>,
    pub(crate) reconnect_interval: Option<Duration>,
    pub(crate) authentication: Option<AuthConfig>,
    pub(crate) version: Option<String>,
    pub(crate) store_messages: bool,
    pub(crate) sync: Option<SyncConfig>,
    pub(crate) limits: Limits,
    pub(crate) rooms: bool,
}

impl ServerConfig {
    /// Start a builder with every feature off and the default limits.
    pub fn builder() -> ServerConfigBuilder {
        ServerConfigBuilder {
            config: ServerConfig::default(),
        }
    }

    /// Heartbeat settings, when heartbeats are on.
    pub fn heartbeat(&self) -> Option<HeartbeatConfig> {
        self.heartbeat
    }

    /// Authentication settings, when the application authenticates.
    pub fn authentication(&self) -> Option<AuthConfig> {
        self.authentication
    }

    /// Sync settings, when message sync is on.
    pub fn sync(&self) -> Option<SyncConfig> {
        self.sync
    }

    /// The version clients must match, when `enforce_equal_versions` is on.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The limits applied to every connection.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether clients may opt in to rooms (the hello's `rooms` rule).
    pub fn rooms(&self) -> bool {
        self.rooms
    }

    /// Whether server-wide sends skip unauthenticated connections.
    pub fn authentication_required(&self) -> bool {
        self.authentication.is_some_and(|auth| auth.required)
    }

    /// The hello every connection receives first.
    pub fn hello(&self) -> Hello {
        let mut rules = Vec::new();
        if self.version.is_some() {
            rules.push(Rule::EnforceEqualVersions);
        }
        if self.store_messages {
            rules.push(Rule::StoreMessages);
        }
        if self
            .authentication
            .is_some_and(|auth| auth.send_user_object)
        {
            rules.push(Rule::SendsUserObject);
        }
        if self.rooms {
            rules.push(Rule::Rooms);
        }
        Hello {
            heartbeat_interval: self.heartbeat.map(|h| h.interval),
            reconnect_interval: self.reconnect_interval,
            authentication_timeout: self.authentication.map(|a| a.timeout),
            rules,
        }
    }
}

/// Builds a [`ServerConfig`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone)]
#[must_use]
pub struct ServerConfigBuilder {
    config: ServerConfig,
}

impl ServerConfigBuilder {
    /// Turn heartbeats on.
    pub fn heartbeat(mut self, heartbeat: HeartbeatConfig) -> Self {
        self.config.heartbeat = Some(heartbeat);
        self
    }

    /// Announce a reconnect interval to clients (`c_reconnect_interval`).
    pub fn reconnect_interval(mut self, interval: Duration) -> Self {
        self.config.reconnect_interval = Some(interval);
        self
    }

    /// Authenticate clients: op 2 becomes an authentication request the
    /// application answers, and the timeout is enforced.
    pub fn authentication(mut self, auth: AuthConfig) -> Self {
        self.config.authentication = Some(auth);
        self
    }

    /// Require clients to announce exactly this version (`enforce_equal_versions`).
    pub fn enforce_equal_versions(mut self, version: impl Into<String>) -> Self {
        self.config.version = Some(version.into());
        self
    }

    /// Announce the `store_messages` rule.
    pub fn store_messages(mut self, on: bool) -> Self {
        self.config.store_messages = on;
        self
    }

    /// Let clients opt in to rooms: the hello announces the `rooms` rule, and the
    /// connections that opt in may send room requests (see `docs/protocol.md`).
    pub fn rooms(mut self, on: bool) -> Self {
        self.config.rooms = on;
        self
    }

    /// Turn message sync on.
    pub fn sync(mut self, sync: SyncConfig) -> Self {
        self.config.sync = Some(sync);
        self
    }

    /// Replace the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Validate and finish.
    pub fn build(self) -> Result<ServerConfig, ConfigError> {
        let config = self.config;
        if let Some(heartbeat) = config.heartbeat {
            if heartbeat.interval.is_zero() {
                return Err(ConfigError::ZeroDuration("heartbeat interval"));
            }
            if heartbeat.max_attempts == 0 {
                return Err(ConfigError::ZeroCount("heartbeat max attempts"));
            }
        }
        if config.reconnect_interval.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("reconnect interval"));
        }
        if config.authentication.is_some_and(|a| a.timeout.is_zero()) {
            return Err(ConfigError::ZeroDuration("authentication timeout"));
        }
        if config.sync.is_some_and(|s| s.load_timeout.is_zero()) {
            return Err(ConfigError::ZeroDuration("sync load timeout"));
        }
        if config.version.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptyVersion);
        }
        validate_limits(&config.limits)?;
        Ok(config)
    }
}

/// Reject limits that would refuse every message or keep nothing.
pub(crate) fn validate_limits(limits: &Limits) -> Result<(), ConfigError> {
    let counts = [
        (limits.max_message_bytes, "max message bytes"),
        (limits.max_json_depth, "max JSON depth"),
        (limits.max_queued_sends, "max queued sends"),
        (limits.max_stored_per_id, "max stored messages per id"),
        (
            limits.max_messages_per_second as usize,
            "max messages per second",
        ),
        (limits.max_message_burst as usize, "max message burst"),
        (limits.max_recipients, "max recipients"),
    ];
    match counts.into_iter().find(|(value, _)| *value == 0) {
        Some((_, name)) => Err(ConfigError::ZeroCount(name)),
        None => Ok(()),
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A count that must be positive is zero.
    #[error("{0} must be at least 1")]
    ZeroCount(&'static str),
    /// `enforce_equal_versions` was given an empty version.
    #[error("the enforced client version must not be empty")]
    EmptyVersion,
    /// The backoff cap is below its base.
    #[error("the backoff cap must not be below its base")]
    BackoffCapBelowBase,
    /// Message sync needs a store (a Redis cluster) to keep messages in.
    #[error("message sync needs a store: configure Redis")]
    SyncWithoutStore,
    /// A cluster setting (the namespace, portals) without a cluster to apply it to.
    #[error("{0} needs a cluster: configure Redis")]
    ClusterSettingWithoutRedis(&'static str),
    /// Sends routed by interest (the legacy bus off) need the ids' presence, which
    /// keeps the route table.
    #[error(
        "routing sends by interest (the legacy bus off) needs presence (store_connected_users)"
    )]
    RoutingWithoutPresence,
    /// A cluster spreads its data over 1 to 256 Redis instances.
    #[error("a cluster has 1 to 256 Redis instances, not {0}")]
    Shards(usize),
    /// Several Redis instances with the legacy bus on: Node replicas, which read
    /// `ws`, know one Redis, and a send to ids must go to the instance of each id.
    #[error("several Redis instances need the legacy bus off (routing by interest)")]
    ShardingWithLegacyBus,
    /// A store's wait for Redis replicas must be positive and below the time Redis
    /// has to answer a command.
    #[error("a store's wait for Redis replicas must be positive and below {0:?}")]
    StoreWait(std::time::Duration),
    /// Durable portal queues are spread over 1 to 1024 partitions.
    #[error("durable portals use 1 to 1024 partitions, not {0}")]
    PortalPartitions(usize),
    /// A durable portal renews its leases every tick and must hear Redis answer
    /// before they expire: its tick and reply timeout must be below its visibility
    /// timeout (the leases' time to live).
    #[error("a durable portal's tick and reply timeout must be below its visibility timeout")]
    DurablePortalTiming,
    /// Authentication options were set, but nothing authenticates.
    #[error("authentication options need an authenticator")]
    MissingAuthenticator,
    /// Personal or broadcast streams are taken by extended connections only, which
    /// exist only on a server with rooms.
    #[error("streams of the sends to ids or of the broadcasts need rooms on (clients opt in)")]
    StreamsWithoutRooms,
}

/// The check every machine with a Redis link makes of its timing: each of
/// `durations` positive (named for the error), and `reconnect`'s cap not below its
/// base (which is checked as one of them).
pub(crate) fn check_link_timing(
    durations: &[(Duration, &'static str)],
    reconnect: &crate::backoff::BackoffConfig,
) -> Result<(), ConfigError> {
    let base = (reconnect.base, "reconnect backoff base");
    if let Some((_, name)) = durations
        .iter()
        .chain([&base])
        .find(|(duration, _)| duration.is_zero())
    {
        return Err(ConfigError::ZeroDuration(name));
    }
    if reconnect.cap < reconnect.base {
        return Err(ConfigError::BackoffCapBelowBase);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_once() {
        let zero = HeartbeatConfig {
            interval: Duration::ZERO,
            max_attempts: 3,
        };
        assert_eq!(
            ServerConfig::builder().heartbeat(zero).build(),
            Err(ConfigError::ZeroDuration("heartbeat interval"))
        );
        let limits = Limits {
            max_json_depth: 0,
            ..Limits::default()
        };
        assert_eq!(
            ServerConfig::builder().limits(limits).build(),
            Err(ConfigError::ZeroCount("max JSON depth"))
        );
        assert!(
            ServerConfig::builder()
                .authentication(AuthConfig::default())
                .build()
                .is_ok()
        );
    }

    #[test]
    fn hello_announces_only_what_is_on() {
        let plain = ServerConfig::builder().build().unwrap().hello();
        assert_eq!(
            plain.to_message().encode().as_str(),
            r#"{"op":10,"d":{"rules":[]}}"#
        );
        let full = ServerConfig::builder()
            .heartbeat(HeartbeatConfig::default())
            .authentication(AuthConfig::default())
            .enforce_equal_versions("1.5.8")
            .build()
            .unwrap()
            .hello();
        assert_eq!(full.heartbeat_interval, Some(Duration::from_secs(10)));
        assert_eq!(
            full.rules,
            [Rule::EnforceEqualVersions, Rule::SendsUserObject]
        );
    }
}
