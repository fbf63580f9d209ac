//! Accepting connections and answering their TLS and WebSocket handshakes, shared
//! by the server and the Autobahn echo harness.

use std::net::SocketAddr;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::server::Callback;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::future::{Either, select};
use mesa_core::Limits;

use crate::read_pool::PooledRead;
use crate::runtime::Runtime;
use crate::tls::{MaybeTls, ServerTls};
use crate::transport::TransportConfig;

/// Accept connections on `listener` until `stop` completes, handing each to
/// `serve` in a task of its own. Accept errors (running out of file descriptors)
/// pause the loop briefly instead of ending it.
pub(crate) async fn accept_loop<R, F, Fut>(
    runtime: &R,
    listener: &R::TcpListener,
    stop: impl std::future::Future<Output = ()> + Unpin,
    serve: F,
) where
    R: Runtime,
    F: Fn(R::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = stop;
    loop {
        let accept = Box::pin(runtime.accept(listener));
        match select(accept, &mut stop).await {
            Either::Left((Ok((stream, remote)), _)) => runtime.spawn(serve(stream, remote)),
            Either::Left((Err(error), _)) => {
                tracing::warn!(%error, "accept failed");
                let pause = runtime.now() + Duration::from_millis(50);
                runtime.sleep_until(pause).await;
            }
            Either::Right(((), _)) => return,
        }
    }
}

/// Answer the TLS handshake (with `tls`) and the WebSocket upgrade on `stream`
/// with the driver's framing settings ([`TransportConfig::websocket`]), both within
/// `transport.handshake_timeout`, asking `check` whether to accept the request.
/// `None` when a handshake failed, was refused or timed out (the stream is then
/// dropped: a plaintext request to a TLS port ends here).
pub(crate) async fn handshake<R, S, C>(
    runtime: &R,
    stream: S,
    tls: Option<&ServerTls>,
    transport: &TransportConfig,
    limits: &Limits,
    check: C,
) -> Option<WebSocketStream<PooledRead<MaybeTls<S>>>>
where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Callback + Unpin + Send + 'static,
{
    let config = transport.server_websocket(limits);
    let chunk = transport.read_buffer_bytes;
    let tls = tls.cloned();
    let handshake = Box::pin(async move {
        let stream = match tls {
            None => MaybeTls::Plain(stream),
            Some(tls) => MaybeTls::tls(
                tls.accept(stream)
                    .await
                    .map_err(|error| format!("TLS handshake failed: {error}"))?,
            ),
        };
        async_tungstenite::accept_hdr_async_with_config(
            PooledRead::new(stream, chunk),
            check,
            Some(config),
        )
        .await
        .map_err(|error| error.to_string())
    });
    let deadline = runtime.now() + transport.handshake_timeout;
    let timeout = Box::pin(runtime.sleep_until(deadline));
    match select(handshake, timeout).await {
        Either::Left((Ok(ws), _)) => Some(ws),
        Either::Left((Err(error), _)) => {
            tracing::debug!(%error, "handshake failed");
            None
        }
        Either::Right(_) => {
            tracing::debug!("handshake timed out");
            None
        }
    }
}
