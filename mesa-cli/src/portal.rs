//! `mesa portal`: join a cluster's portal pool like `@cryb/mesa`'s `Portal` and print
//! the client events the servers forward, one JSON line each (upstream's event
//! format), until SIGTERM or ctrl-c; then leave the pool.
//!
//! `mesa portal --durable --group G` consumes the durable portal streams instead
//! (servers with `--durable-portals`): each event printed (with its `eventId` and
//! `deliveries` added) is acknowledged once the line is written, so an event is
//! printed at least once, by some portal of the group, even when one is killed.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use crate::Failure;
use crate::signals::Signals;
use crate::tls::RedisCa;

/// Options of `mesa portal`.
#[derive(Debug, clap::Args)]
pub(crate) struct PortalArgs {
    /// The cluster's Redis, e.g. `redis://127.0.0.1:6379/` (`rediss://` for TLS).
    #[arg(long, env = "MESA_REDIS")]
    redis: String,

    #[command(flatten)]
    redis_ca: RedisCa,

    /// The cluster's namespace (as the servers' `--namespace`).
    #[arg(long, env = "MESA_NAMESPACE")]
    namespace: Option<String>,

    /// Print every event, not only those the servers address to this portal
    /// (upstream's `reportAllEvents`).
    #[arg(
        long,
        env = "MESA_ALL",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    all: bool,

    /// Join the pool under this id (default: a random UUID); with --durable, the
    /// consumer name.
    #[arg(long, env = "MESA_PORTAL_ID")]
    id: Option<String>,

    /// Consume the durable portal streams (servers with --durable-portals) at least
    /// once, instead of the pub/sub pool.
    #[arg(
        long,
        env = "MESA_DURABLE",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue,
        conflicts_with = "all"
    )]
    durable: bool,

    /// With --durable: the consumer group (portals of one group share the events).
    #[arg(
        long,
        env = "MESA_PORTAL_GROUP",
        default_value = "portals",
        requires = "durable"
    )]
    group: String,

    /// With --durable: streams the servers spread events over (their
    /// --durable-partitions).
    #[arg(
        long,
        env = "MESA_DURABLE_PARTITIONS",
        default_value_t = mesa_tokio::DEFAULT_PORTAL_PARTITIONS as u64,
        requires = "durable",
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    partitions: u64,

    /// With --durable: milliseconds an event may stay unacknowledged before it is
    /// delivered again; also the partition leases' time to live.
    #[arg(
        long,
        env = "MESA_VISIBILITY_TIMEOUT",
        default_value_t = 30_000,
        requires = "durable",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    visibility_timeout: u64,

    /// With --durable: milliseconds between lease renewals and sweeps for overdue
    /// events (below the visibility timeout).
    #[arg(
        long,
        env = "MESA_PORTAL_TICK",
        default_value_t = 5_000,
        requires = "durable",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    tick: u64,

    /// With --durable: deliveries of one event before it goes to the dead-letter
    /// stream (`portal_dlq`).
    #[arg(
        long,
        env = "MESA_MAX_DELIVERIES",
        default_value_t = 5,
        requires = "durable",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_deliveries: u64,
}

/// Print events until a signal, then leave the pool.
pub(crate) async fn run(args: PortalArgs) -> Result<ExitCode, Failure> {
    let mut signals = Signals::new().map_err(|error| format!("cannot handle signals: {error}"))?;
    let ca = args.redis_ca.load(&args.redis)?;
    if args.durable {
        return durable(args, ca, signals).await;
    }
    let mut builder = mesa_tokio::portal(args.redis).report_all_events(args.all);
    if let Some(pem) = ca {
        builder = builder.redis_ca_pem(pem);
    }
    if let Some(namespace) = args.namespace {
        builder = builder.namespace(namespace);
    }
    if let Some(id) = args.id {
        builder = builder.id(id);
    }
    let mut portal = builder
        .start()
        .await
        .map_err(|error| format!("cannot join the portal pool: {error}"))?;
    tracing::info!(id = portal.id(), all = args.all, "portal joined the pool");
    loop {
        tokio::select! {
            event = portal.next() => {
                let Some(event) = event else {
                    return Err("the portal stopped unexpectedly".to_owned().into());
                };
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{}", event.encode())
                    .and_then(|()| stdout.flush())
                    .map_err(|error| format!("cannot write to stdout: {error}"))?;
            }
            signal = signals.recv() => {
                tracing::info!(signal, "leaving the portal pool");
                break;
            }
        }
    }
    portal
        .close()
        .await
        .map_err(|error| format!("cannot leave the portal pool: {error}"))?;
    tracing::info!("portal left the pool");
    Ok(ExitCode::SUCCESS)
}

/// `--durable`: print and acknowledge events until a signal, then give the
/// partitions back.
async fn durable(
    args: PortalArgs,
    ca: Option<Vec<u8>>,
    mut signals: Signals,
) -> Result<ExitCode, Failure> {
    let mut builder = mesa_tokio::durable_portal(args.redis, args.group)
        .partitions(args.partitions as usize)
        .visibility_timeout(Duration::from_millis(args.visibility_timeout))
        .tick(Duration::from_millis(args.tick))
        .max_deliveries(args.max_deliveries);
    if let Some(pem) = ca {
        builder = builder.redis_ca_pem(pem);
    }
    if let Some(namespace) = args.namespace {
        builder = builder.namespace(namespace);
    }
    if let Some(id) = args.id {
        builder = builder.id(id);
    }
    let mut portal = builder
        .start()
        .await
        .map_err(|error| format!("cannot start the durable portal: {error}"))?;
    tracing::info!(id = portal.id(), "durable portal started");
    loop {
        tokio::select! {
            event = portal.next() => {
                let Some(event) = event else {
                    return Err("the portal stopped unexpectedly".to_owned().into());
                };
                let mut line = serde_json::from_str::<serde_json::Value>(&event.event().encode())
                    .map_err(|error| format!("cannot encode an event: {error}"))?;
                line["eventId"] = event.event_id().into();
                line["deliveries"] = event.deliveries().into();
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .map_err(|error| format!("cannot write to stdout: {error}"))?;
                event.ack();
            }
            signal = signals.recv() => {
                tracing::info!(signal, "closing the durable portal");
                break;
            }
        }
    }
    portal
        .close()
        .await
        .map_err(|error| format!("cannot give the partitions back: {error}"))?;
    tracing::info!("durable portal closed");
    Ok(ExitCode::SUCCESS)
}
