//! A relay server: `ECHO` comes back to its sender, `BROADCAST` goes to everyone (or
//! to `d.to` minus `d.except`), with heartbeats and development authentication.
//!
//! ```sh
//! cargo run -p mesa-tokio --example relay_server            # ws://127.0.0.1:4000/
//! cargo run -p mesa-tokio --example relay_server -- 0.0.0.0:4000
//! ```
//!
//! Then talk to it, e.g. with the `mesa` binary:
//!
//! ```sh
//! cargo mesa client ws://127.0.0.1:4000/ --token alice
//! {"op":0,"t":"BROADCAST","d":{"text":"hello"}}
//! ```
//!
//! `DevAuthenticator` takes any non-empty `token` as the client's id: it proves
//! nothing, so it is for demos and tests only (see `jwt_chat` for real tokens).

use std::net::SocketAddr;
use std::time::Duration;

use mesa_tokio::{DevAuthenticator, Relay};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(addr) => addr.parse().map_err(|error| {
            format!("`{addr}` is not an address such as 127.0.0.1:4000: {error}")
        })?,
        None => ([127, 0, 0, 1], 4000).into(),
    };

    tracing::warn!("DevAuthenticator accepts any token as the user's id: demos only");
    let server = mesa_tokio::server()
        .heartbeat(Duration::from_secs(10), 3)
        .reconnect_interval(Duration::from_secs(5))
        .authenticate(DevAuthenticator)
        .handler(Relay)
        .build()?;
    let listening = server.bind(addr).await?;
    println!(
        "relay server on ws://{}/ (ctrl-c stops it)",
        listening.local_addr()
    );

    tokio::select! {
        outcome = listening.run() => outcome?,
        _ = tokio::signal::ctrl_c() => {
            // Every client is told the server is going away (1001).
            server.shutdown();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
