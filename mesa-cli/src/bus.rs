//! `--legacy-bus` of `mesa serve` and `mesa dispatch`: how sends to ids travel
//! between replicas.

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
