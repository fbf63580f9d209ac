//! Mesa inside an axum 0.8 app: ordinary HTTP routes (`GET /health`) beside a `/ws`
//! route whose WebSocket upgrade is taken over by the Mesa server.
//!
//! ```sh
//! cargo run -p mesa-tokio --example axum                  # http://127.0.0.1:4002
//! curl http://127.0.0.1:4002/health                       # ok
//! cargo mesa client ws://127.0.0.1:4002/ws --token alice  # a Mesa relay
//! ```
//!
//! axum's own `WebSocketUpgrade` would hand over a socket of its own WebSocket
//! implementation; Mesa's driver wants the raw upgraded byte stream instead, so the
//! handshake is answered here by hand: check the request, reply `101 Switching
//! Protocols` with `Sec-WebSocket-Accept`, and give the stream that
//! `hyper::upgrade::on` yields to [`mesa_tokio::Server::serve_upgraded`].

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use mesa_tokio::{DevAuthenticator, Server};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// The application: `GET /health` answers `ok`, `/ws` is the Mesa endpoint of `server`.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that Mesa
/// learns each peer's address (it works without, the address is then unknown).
pub fn app(server: Server) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ws", get(upgrade))
        .with_state(server)
}

/// `GET /health`.
async fn health() -> &'static str {
    "ok"
}

/// Answer a WebSocket handshake and hand the upgraded stream to the Mesa server.
async fn upgrade(State(server): State<Server>, mut request: Request) -> Response {
    let accept = match accept_key(request.version(), request.headers()) {
        Ok(accept) => accept,
        Err(refusal) => return refusal,
    };
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    // Resolves once the 101 below has been written and hyper let go of the stream.
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            // hyper's stream -> tokio's AsyncRead/AsyncWrite -> futures-io's.
            Ok(upgraded) => {
                let stream = TokioIo::new(upgraded).compat();
                server.serve_upgraded(stream, remote).await;
            }
            Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
        }
    });

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Check a WebSocket handshake request (RFC 6455, section 4.2.1) and compute its
/// `Sec-WebSocket-Accept`, or the response that refuses it.
// The refusal is the response itself: it is not worth boxing.
#[allow(clippy::result_large_err)]
fn accept_key(version: Version, headers: &HeaderMap) -> Result<HeaderValue, Response> {
    let refuse = |status: StatusCode, reason: &'static str| (status, reason).into_response();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    };
    if version != Version::HTTP_11 {
        return Err(refuse(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "WebSocket needs HTTP/1.1",
        ));
    }
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint",
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        let mut response = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(response);
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    // Base64 is always a valid header value.
    HeaderValue::from_str(&accept)
        .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key"))
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
