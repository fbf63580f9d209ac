//! How a [`DurablePortal`](super::DurablePortal) behaves.

use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::cluster::{DEFAULT_PORTAL_PARTITIONS, Namespace};
use crate::config::ConfigError;
use crate::replica::DurablePortals;

/// The settings of one durable portal, with the driver's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurablePortalConfig {
    /// The cluster's namespace.
    pub namespace: Namespace,
    /// The consumer group: portals of one group share the events (each is handled
    /// by one of them); another group gets every event again. Default `portals`.
    pub group: String,
    /// The consumer name, and the owner of the partition leases. Default `None`: a
    /// UUID v4 drawn from the seed. A portal restarted under its old id takes its
    /// unfinished events back at once instead of after the visibility timeout.
    pub id: Option<String>,
    /// Streams the servers spread events over; must match the servers'
    /// ([`DurablePortals::partitions`]). Default 16.
    pub partitions: usize,
    /// Entries asked for per read (`XREADGROUP COUNT`) and per reclaim. Default 100.
    pub batch: usize,
    /// Events handed to the application and not yet settled, at most: beyond it the
    /// portal reads nothing more (backpressure). At least `batch`. Default 1024.
    pub max_outstanding: usize,
    /// How long an idle portal waits before reading again when a read found fewer
    /// entries than `batch`. Default 100 ms.
    pub poll_interval: Duration,
    /// How long an event may stay unacknowledged before it is delivered again (to the
    /// partition's holder), and the time to live of a partition lease: a dead
    /// portal's partitions and events are taken over within about this plus `tick`.
    /// Default 30 s.
    pub visibility_timeout: Duration,
    /// How often leases are renewed and overdue events reclaimed. Below
    /// `visibility_timeout`. Default 5 s.
    pub tick: Duration,
    /// Deliveries of one event at most: one delivered this often and still not
    /// acknowledged goes to the dead-letter stream `ns("portal_dlq")`. Default 5.
    pub max_deliveries: u64,
    /// Entries the dead-letter stream keeps, about (`MAXLEN ~`). Default 100 000.
    pub dead_letter_maxlen: usize,
    /// Event ids of acknowledged events remembered, to acknowledge a second entry
    /// of the same event (an append a server retried) without handing it out
    /// again. Default 10 000.
    pub dedupe_window: usize,
    /// Time Redis has to answer a command (or the link to open) before the link
    /// counts as broken. Default 3 s.
    pub reply_timeout: Duration,
    /// Delays between attempts to reopen the link. Default 100 ms to 5 s, full jitter.
    pub reconnect: BackoffConfig,
}

impl Default for DurablePortalConfig {
    fn default() -> Self {
        DurablePortalConfig {
            namespace: Namespace::default(),
            group: "portals".to_owned(),
            id: None,
            partitions: DEFAULT_PORTAL_PARTITIONS,
            batch: 100,
            max_outstanding: 1024,
            poll_interval: Duration::from_millis(100),
            visibility_timeout: Duration::from_secs(30),
            tick: Duration::from_secs(5),
            max_deliveries: 5,
            dead_letter_maxlen: 100_000,
            dedupe_window: 10_000,
            reply_timeout: Duration::from_secs(3),
            reconnect: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                base_is_fixed: true,
            },
        }
    }
}

impl DurablePortalConfig {
    /// Check the settings once, before a portal uses them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        DurablePortals {
            partitions: self.partitions,
            maxlen: self.dead_letter_maxlen,
        }
        .check()?;
        let durations = [
            (self.poll_interval, "durable portal poll interval"),
            (self.tick, "durable portal tick"),
            (self.reply_timeout, "Redis reply timeout"),
        ];
        crate::config::check_link_timing(&durations, &self.reconnect)?;
        if self.tick >= self.visibility_timeout || self.reply_timeout >= self.visibility_timeout {
            return Err(ConfigError::DurablePortalTiming);
        }
        let counts = [
            (self.batch, "durable portal batch"),
            (
                self.max_deliveries as usize,
                "durable portal max deliveries",
            ),
            (self.dedupe_window, "durable portal dedupe window"),
            (self.group.len(), "durable portal group name"),
        ];
        if let Some((_, name)) = counts.into_iter().find(|(value, _)| *value == 0) {
            return Err(ConfigError::ZeroCount(name));
        }
        if self.max_outstanding < self.batch {
            return Err(ConfigError::ZeroCount(
                "durable portal max outstanding beyond its batch",
            ));
        }
        Ok(())
    }
}
