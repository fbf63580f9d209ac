//! A Mesa relay server with a custom event loop: `std::net`, one thread per
//! connection and tungstenite's blocking API; no async runtime. It shows that
//! `mesa-core` makes every protocol decision and the loop around it stays thin.
//!
//! ```text
//! cargo run -p mesa-core --example blocking_server -- [--listen ADDR] [--heartbeat-ms N]
//! ```
//!
//! `--listen` (or `MESA_LISTEN`) defaults to `127.0.0.1:4000`; `--heartbeat-ms` (or
//! `MESA_HEARTBEAT_MS`) defaults to 10000. Clients authenticate with
//! `{"op":2,"d":{"token":"<id>"}}`: development authentication, for demos only.
//! `{"op":0,"t":"ECHO","d":..}` comes back to its sender; `{"op":0,"t":"BROADCAST",
//! "d":{..}}` goes to everyone, or to `d.to` minus `d.except`.

mod server;

use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

/// Where the server listens unless told otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:4000";

const USAGE: &str = "usage: blocking_server [--listen ADDR] [--heartbeat-ms N]
  --listen ADDR      address to listen on (env MESA_LISTEN; default 127.0.0.1:4000)
  --heartbeat-ms N   heartbeat interval in ms, > 0 (env MESA_HEARTBEAT_MS; default 10000)";

fn main() -> ExitCode {
    let (listen, options) = match parse_args(std::env::args().skip(1)) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("mesa blocking_server listening on ws://{addr}"),
        Err(_) => println!("mesa blocking_server listening on ws://{listen}"),
    }
    println!(
        "heartbeat every {} ms, {} missed beats tolerated",
        options.heartbeat_interval.as_millis(),
        options.heartbeat_max_attempts
    );
    match server::serve(listener, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("server failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Read the listen address and options from the arguments, falling back to the
/// environment; `Ok(None)` when help was asked for.
fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> Result<Option<(String, server::Options)>, String> {
    let mut listen = std::env::var("MESA_LISTEN").ok();
    let mut heartbeat_ms = std::env::var("MESA_HEARTBEAT_MS").ok();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--heartbeat-ms" => heartbeat_ms = Some(value("--heartbeat-ms")?),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mut options = server::Options::default();
    if let Some(ms) = heartbeat_ms {
        match ms.parse::<u64>() {
            Ok(ms) if ms > 0 => options.heartbeat_interval = Duration::from_millis(ms),
            _ => {
                return Err(format!(
                    "heartbeat interval must be a positive integer, got {ms:?}"
                ));
            }
        }
    }
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    Ok(Some((listen, options)))
}
