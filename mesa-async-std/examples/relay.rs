//! A relay server on smol or async-std, chosen at run time: `ECHO` comes back to its
//! sender, `BROADCAST` goes to everyone (or to `d.to` minus `d.except`), with
//! heartbeats every 10 s (3 misses allowed).
//!
//! ```sh
//! cargo run -p mesa-async-std --example relay --all-features -- --runtime smol
//! cargo run -p mesa-async-std --example relay --all-features -- \
//!     --runtime async-std --listen 127.0.0.1:4000 --auth dev
//! ```
//!
//! Then talk to it, e.g. with `cargo mesa client ws://127.0.0.1:4000/ --token alice`.
//! `--auth dev` takes any non-empty `token` as the client's id: it proves nothing, so
//! it is for demos and tests only. Ctrl-c closes every client with 1001 and exits.

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesa_async_std::mesa_driver::{Runtime, Server};
use mesa_async_std::{DevAuthenticator, Relay};

/// The runtimes this build has (`--all-features` has both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeChoice {
    /// smol (the default; async-std's successor).
    #[cfg(feature = "smol")]
    Smol,
    /// async-std (discontinued upstream, RUSTSEC-2025-0052).
    #[cfg(feature = "async-std")]
    AsyncStd,
}

impl RuntimeChoice {
    /// smol when this build has it.
    fn preferred() -> Self {
        #[cfg(feature = "smol")]
        return RuntimeChoice::Smol;
        #[cfg(not(feature = "smol"))]
        return RuntimeChoice::AsyncStd;
    }
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthChoice {
    /// No authentication: op 2 is not answered.
    None,
    /// Any non-empty `token` is the client's id (demos and tests only).
    Dev,
}

/// A Mesa relay server on smol or async-std.
#[derive(Debug, Parser)]
struct Args {
    /// The runtime to serve on.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::preferred())]
    runtime: RuntimeChoice,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// How clients authenticate.
    #[arg(long, value_enum, default_value_t = AuthChoice::None)]
    auth: AuthChoice,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    match args.runtime {
        #[cfg(feature = "smol")]
        RuntimeChoice::Smol => smol::block_on(relay(mesa_async_std::Smol, &args)),
        #[cfg(feature = "async-std")]
        RuntimeChoice::AsyncStd => {
            async_std::task::block_on(relay(mesa_async_std::AsyncStd, &args))
        }
    }
}

/// Serve the relay on `runtime` until ctrl-c.
async fn relay<R: Runtime>(runtime: R, args: &Args) -> Result<(), Box<dyn Error>> {
    let builder = Server::builder(runtime.clone())
        .heartbeat(Duration::from_secs(10), 3)
        .reconnect_interval(Duration::from_secs(5));
    let builder = match args.auth {
        AuthChoice::None => builder,
        AuthChoice::Dev => {
            eprintln!("--auth dev accepts any non-empty token as the user's id: demos only");
            builder.authenticate(DevAuthenticator)
        }
    };
    let server = builder.handler(Relay).build()?;
    let listening = server.bind(args.listen).await?;
    println!(
        "relay server on ws://{}/ ({:?} runtime; ctrl-c stops it)",
        listening.local_addr(),
        args.runtime
    );
    let stopper = server.clone();
    // Every client is told the server is going away (1001), then `run` returns.
    ctrlc::set_handler(move || stopper.shutdown())?;
    listening.run().await?;
    // Give the close frames a moment to leave.
    runtime
        .sleep_until(runtime.now() + Duration::from_millis(200))
        .await;
    Ok(())
}
