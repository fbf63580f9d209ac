//! How a [`PortalMember`](super::PortalMember) behaves.

use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::cluster::Namespace;
use crate::config::ConfigError;

/// The settings of one portal, with the driver's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalMemberConfig {
    /// The cluster's namespace.
    pub namespace: Namespace,
    /// Take every client event, not only those addressed to this portal (upstream's
    /// `reportAllEvents`). Default false.
    pub report_all_events: bool,
    /// Join under this id. Default `None`: a UUID v4 drawn from the seed, in
    /// upstream's format.
    pub id: Option<String>,
    /// How often a live link is checked with a `PING` on its subscription (a silent
    /// subscription is otherwise never noticed). Default 5 s.
    pub ping_interval: Duration,
    /// Time Redis has to answer a command (or the link to open) before the link
    /// counts as broken. Default 3 s.
    pub reply_timeout: Duration,
    /// Delays between attempts to reopen the link. Default 100 ms to 5 s, full jitter.
    pub reconnect: BackoffConfig,
}

impl Default for PortalMemberConfig {
    fn default() -> Self {
        PortalMemberConfig {
            namespace: Namespace::default(),
            report_all_events: false,
            id: None,
            ping_interval: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(3),
            reconnect: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                base_is_fixed: true,
            },
        }
    }
}

impl PortalMemberConfig {
    /// Check the settings once, before a portal uses them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            (self.ping_interval, "portal ping interval"),
            (self.reply_timeout, "Redis reply timeout"),
        ];
        crate::config::check_link_timing(&durations, &self.reconnect)
    }
}
