//! The cluster flags `mesa serve` and `mesa dispatch` share: how sends to ids travel
//! between replicas (`--legacy-bus`), whether stores wait for Redis replicas
//! (`--wait-replicas`), and which rooms keep a stream (`--recover-rooms`).

use std::time::Duration;

use mesa_tokio::StoreWait;
use mesa_tokio::recovery::RecoveryConfig;

/// `--legacy-bus on|off`.
#[derive(Debug, clap::Args)]
pub(crate) struct LegacyBus {
    /// `on`: sends to ids go over the shared `ws` channel, which every replica reads,
    /// @cryb/mesa's too (a mixed cluster needs it). `off`: each goes only to the
    /// replicas that hold its ids (routing by interest; mesa-rs replicas only).
    #[arg(
        long = "legacy-bus",
        env = "MESA_LEGACY_BUS",
        value_name = "on|off",
        default_value = "on",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub(crate) on: bool,
}

/// `--wait-replicas N --wait-timeout MS`.
#[derive(Debug, clap::Args)]
pub(crate) struct Durability {
    /// Each store for offline ids waits until this many Redis replicas have it
    /// (`WAIT`), so that a failover to one of them cannot lose it; stores they do not
    /// acknowledge in time are reported (logs, and a dispatch's "unreplicated").
    #[arg(long, env = "MESA_WAIT_REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
    wait_replicas: Option<u32>,

    /// Milliseconds Redis waits for those replicas (below 3000, the time Redis has to
    /// answer any command).
    #[arg(
        long,
        env = "MESA_WAIT_TIMEOUT",
        default_value_t = 1000,
        requires = "wait_replicas",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    wait_timeout: u64,
}

impl Durability {
    /// The stores' wait, when asked for.
    pub(crate) fn store_wait(&self) -> Option<StoreWait> {
        self.wait_replicas.map(|replicas| StoreWait {
            replicas: replicas as usize,
            timeout: Duration::from_millis(self.wait_timeout),
        })
    }
}

/// `--recover-rooms PATTERN,... --recover-users --recover-broadcast --recovery-size N
/// --recovery-ttl SECS`.
#[derive(Debug, clap::Args)]
pub(crate) struct Recovery {
    /// Rooms that keep their last messages in a Redis stream, so a client that comes
    /// back gets exactly what it missed (or is told it cannot): a room name, or a
    /// prefix ending in `*` (`chat:*`; `*` for every room). Repeatable, or
    /// comma-separated. Every replica and dispatcher of the cluster needs the same.
    #[arg(
        long = "recover-rooms",
        value_name = "PATTERN",
        env = "MESA_RECOVER_ROOMS",
        value_delimiter = ',',
        requires = "redis"
    )]
    recover_rooms: Vec<String>,

    /// Each user id keeps the sends to it in a Redis stream (its personal stream),
    /// so an extended client that comes back gets exactly what it missed. Every
    /// replica and dispatcher of the cluster needs the same.
    #[arg(long, env = "MESA_RECOVER_USERS", requires = "redis")]
    recover_users: bool,

    /// The broadcasts (sends to every connection) are kept in a Redis stream, so an
    /// extended client that comes back gets exactly what it missed. Every replica
    /// and dispatcher of the cluster needs the same.
    #[arg(long, env = "MESA_RECOVER_BROADCAST", requires = "redis")]
    recover_broadcast: bool,

    /// Messages each stream (of a room, an id or the broadcast) keeps.
    #[arg(long, env = "MESA_RECOVERY_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    recovery_size: u64,

    /// Seconds a stream lives after its last message.
    #[arg(long, env = "MESA_RECOVERY_TTL", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    recovery_ttl: u64,
}

impl Recovery {
    /// The recovery settings, when some room, the ids or the broadcast keep a
    /// stream.
    pub(crate) fn config(&self) -> Option<RecoveryConfig> {
        let any = !self.recover_rooms.is_empty() || self.recover_users || self.recover_broadcast;
        any.then(|| RecoveryConfig {
            rooms: self.recover_rooms.clone(),
            size: usize::try_from(self.recovery_size).unwrap_or(usize::MAX),
            ttl: Duration::from_secs(self.recovery_ttl),
            users: self.recover_users,
            broadcast: self.recover_broadcast,
            ..RecoveryConfig::default()
        })
    }
}
