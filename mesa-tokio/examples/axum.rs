//! Mesa inside an axum 0.8 app: ordinary HTTP routes (`GET /health`) beside a `/ws`
//! route whose WebSocket upgrade is taken over by the Mesa server.
//!
//! ```sh
//! cargo run -p mesa-tokio --example axum                  # http://127.0.0.1:4002
//! curl http://127.0.0.1:4002/health                       # ok
//! cargo mesa client ws://127.0.0.1:4002/ws --token alice  # a Mesa relay
//! ```
//!
//! [`mesa_tokio::axum::upgrade`] answers the WebSocket handshake by hand (axum's own
//! `WebSocketUpgrade` would hand over a socket of its own WebSocket implementation)
//! and gives the raw upgraded stream to [`mesa_tokio::Server::serve_upgraded`].

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use mesa_tokio::{DevAuthenticator, Relay, Server};

/// The application: `GET /health` answers `ok`, `/ws` is the Mesa endpoint of `server`.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that Mesa
/// learns each peer's address (it works without, the address is then unknown).
pub fn app(server: Server<Relay>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ws", get(mesa_tokio::axum::upgrade))
        .with_state(server)
}

/// `GET /health`.
async fn health() -> &'static str {
    "ok"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(addr) => addr.parse()?,
        None => ([127, 0, 0, 1], 4002).into(),
    };

    tracing::warn!("DevAuthenticator accepts any token as the user's id: demos only");
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(Duration::from_secs(10), 3)
        .authenticate(DevAuthenticator)
        .build()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("http://{local}/health, Mesa on ws://{local}/ws (ctrl-c stops it)");

    let service = app(server.clone()).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // HTTP stops accepting; Mesa closes its connections with 1001.
            server.shutdown();
        })
        .await?;
    Ok(())
}
