//! `mesa portal`: join a cluster's portal pool like `@cryb/mesa`'s `Portal` and print
//! the client events the servers forward, one JSON line each (upstream's event
//! format), until SIGTERM or ctrl-c; then leave the pool.

use std::io::Write;
use std::process::ExitCode;

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

    /// Join the pool under this id (default: a random UUID).
    #[arg(long, env = "MESA_PORTAL_ID")]
    id: Option<String>,
}

/// Print events until a signal, then leave the pool.
pub(crate) async fn run(args: PortalArgs) -> Result<ExitCode, Failure> {
    let mut signals = Signals::new().map_err(|error| format!("cannot handle signals: {error}"))?;
    let ca = args.redis_ca.load(&args.redis)?;
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
