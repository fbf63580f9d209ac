//! `mesa`: run a Mesa server, or talk to one from the terminal.
//!
//! ```text
//! mesa serve  [--listen 127.0.0.1:4000] [--auth none|dev|jwt] ...
//! mesa serve  --tls-cert server.crt --tls-key server.key    (wss://, reloaded on SIGHUP)
//! mesa client ws://127.0.0.1:4000/ [--token T] [--no-sync] [--ca-cert ca.crt] [--subscribe ROOM]...
//! mesa dispatch --redis redis[s]://127.0.0.1:6379/ [--sync] --type T --data JSON [--to a,b]
//! mesa portal --redis redis[s]://127.0.0.1:6379/ [--all]
//! mesa portal --redis redis[s]://127.0.0.1:6379/ --durable [--group G]   (at least once;
//!   servers need --durable-portals)
//!   (serve, dispatch and portal: --redis-ca-cert ca.crt trusts a private CA for rediss://)
//! ```
//!
//! Every flag can also be set through the environment variable named in `--help`
//! (`MESA_LISTEN`, `MESA_AUTH`, `MESA_JWT_SECRET`, ...); a flag on the command line
//! wins. Logs go to stderr (levels from `RUST_LOG`, default `info`); stdout carries
//! only what other programs parse: the server's `mesa listening on ws://...` line and
//! the client's received messages, one JSON object per line (a room's with its
//! `"room"`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failure::Failure;

mod auth;
mod bus;
mod client;
mod demo;
mod dispatch;
mod failure;
mod http;
mod logging;
mod portal;
mod serve;
mod signals;
mod state;
mod tls;

/// Mesa real-time messaging (the protocol of `@cryb/mesa` 1.5.8) from the command line.
#[derive(Debug, Parser)]
#[command(name = "mesa", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "MESA_LOG_FORMAT",
        value_enum,
        default_value_t = logging::LogFormat::Text
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Mesa server (relay behaviour: ECHO and BROADCAST) until SIGTERM or ctrl-c.
    Serve(serve::ServeArgs),
    /// Connect to a Mesa server: print received messages as JSON lines on stdout (a
    /// room's with its "room") and send each stdin line (a Mesa JSON message, or
    /// {"room":"R","t":"TYPE","d":{...}} to publish to room R).
    Client(client::ClientArgs),
    /// Send one message to the clients of a cluster through its Redis (like
    /// @cryb/mesa's Dispatcher) and print a JSON report line.
    Dispatch(dispatch::DispatchArgs),
    /// Receive the client events of a cluster's servers (like @cryb/mesa's Portal) as
    /// JSON lines on stdout, until SIGTERM or ctrl-c; with --durable, from the durable
    /// streams, each acknowledged once printed.
    Portal(portal::PortalArgs),
}

/// mimalloc instead of glibc's malloc: with a connection's allocations made on
/// whichever worker thread runs it, glibc's per-thread arenas keep freed memory
/// scattered (about 10% more RSS per idle connection, BENCHMARKS.md "Memory per
/// idle connection").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(cli.log_format) {
        eprintln!("mesa: error: cannot set up logging: {error}");
        return ExitCode::FAILURE;
    }
    failure::run_to_exit("mesa", async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Client(args) => client::run(args, cli.log_format).await,
            Command::Dispatch(args) => dispatch::run(args).await,
            Command::Portal(args) => portal::run(args).await,
        }
    })
}
