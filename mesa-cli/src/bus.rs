//! The cluster flags `mesa serve` and `mesa dispatch` share: how sends to ids travel
//! between replicas (`--legacy-bus`), and whether stores wait for Redis replicas
//! (`--wait-replicas`).

use std::time::Duration;

use mesa_tokio::StoreWait;

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
