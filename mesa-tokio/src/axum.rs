//! Mount a Mesa endpoint on a route of an [axum] 0.8 app, beside ordinary
//! HTTP routes (feature `axum`).
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get};
//! use mesa_tokio::{DevAuthenticator, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server: Server = mesa_tokio::server().authenticate(DevAuthenticator).build()?;
//! let app = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .route("/ws", get(mesa_tokio::axum::upgrade))
//!     .with_state(server);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4002").await?;
//! // With connect info, Mesa learns each peer's address.
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! axum's own `WebSocketUpgrade` would hand over a socket of its own WebSocket
//! implementation; Mesa's driver wants the raw upgraded byte stream instead, so the
//! handshake is answered here: check the request (RFC 6455, section 4.2.1), reply
//! `101 Switching Protocols` with `Sec-WebSocket-Accept`, and give the stream that
//! `hyper::upgrade::on` yields to [`Server::serve_upgraded`].

use std::net::SocketAddr;

use ::axum::body::Body;
use ::axum::extract::{ConnectInfo, Request, State};
use ::axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use ::axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use mesa_driver::Handler;
use mesa_driver::tungstenite::handshake::derive_accept_key;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::Server;

/// An axum handler: answer a WebSocket handshake and hand the upgraded stream to the
/// Mesa server in the router's state. The route decides the endpoint's path; the
/// server's admission rules still apply: an `Origin` that is not allowed gets 403,
/// a full server 503 (see [`Server::check_upgrade`]).
/// Requests that are not WebSocket handshakes get 426 (or 400, 505) with a short
/// reason.
pub async fn upgrade<H: Handler>(
    State(server): State<Server<H>>,
    mut request: Request,
) -> Response {
    let accept = match accept_key(request.version(), request.headers()) {
        Ok(accept) => accept,
        Err(refusal) => return refusal,
    };
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|origin| origin.to_str().ok());
    if let Err(refusal) = server.check_upgrade(origin) {
        let status =
            StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return (status, refusal.to_string()).into_response();
    }
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

/// Check a WebSocket handshake request and compute its `Sec-WebSocket-Accept`, or the
/// response that refuses it.
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
    // Base64 is always a valid header value.
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key"))
}
