//! The conformance suite's harness: the runtimes it runs on, and servers, bounded
//! waits and a raw WebSocket peer written against [`mesa_driver::Runtime`] alone, so
//! that one scenario serves tokio, smol and async-std. Every wait runs on the
//! scenario's own runtime timer and is bounded by [`WAIT`].

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use mesa_core::{ClientEvent, Message};
use mesa_driver::{ClientEvents, Handler, Runtime, Server};
use serde_json::{Value, json};

pub use mesa_async_std::{AsyncStd, Smol};
pub use mesa_tokio::Tokio;

use crate::WAIT;
use crate::ours::url;

/// Run `future` to completion on a new multi-threaded tokio runtime (two workers),
/// as the tokio case of a scenario.
pub fn block_on_tokio<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Sleep for `duration` on `rt`'s timer.
pub async fn sleep<R: Runtime>(rt: &R, duration: Duration) {
    rt.sleep_until(rt.now() + duration).await;
}

/// `future`'s output, or `None` when `limit` passes first on `rt`'s timer.
pub async fn timeout<R: Runtime, T>(
    rt: &R,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Option<T> {
    let deadline = rt.sleep_until(rt.now() + limit);
    match select(pin!(future), pin!(deadline)).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(((), _)) => None,
    }
}

/// Await `future` for at most [`WAIT`]; panic naming `what` when it takes longer.
pub async fn within<R: Runtime, T>(rt: &R, what: &str, future: impl Future<Output = T>) -> T {
    timeout(rt, WAIT, future)
        .await
        .unwrap_or_else(|| panic!("{what}: not done within {WAIT:?}"))
}

/// Wait until `done()` holds, checking every 20 ms, for at most [`WAIT`].
pub async fn until<R: Runtime>(rt: &R, what: &str, mut done: impl FnMut() -> bool) {
    within(rt, what, async {
        while !done() {
            sleep(rt, Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Let the executor run something else once.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

/// Bind `server` to `addr` and run it in a task on `rt`; returns the bound address.
/// A port still held by a server that was just shut down is tried again until
/// [`WAIT`] passes.
pub async fn serve_on<R: Runtime, H: Handler>(
    rt: &R,
    server: &Server<R, H>,
    addr: SocketAddr,
) -> SocketAddr {
    let listening = within(rt, &format!("binding our server to {addr}"), async {
        loop {
            match server.bind(addr).await {
                Ok(listening) => break listening,
                Err(_) => sleep(rt, Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let local = listening.local_addr();
    rt.spawn(async move {
        let _ = listening.run().await;
    });
    local
}

/// The next event of our client that matches `pred`, dropping the others.
pub async fn event<R: Runtime>(
    rt: &R,
    events: &mut ClientEvents,
    what: &str,
    mut pred: impl FnMut(&ClientEvent) -> bool,
) -> ClientEvent {
    within(rt, &format!("our client's {what}"), async {
        loop {
            match events.next().await {
                Some(event) if pred(&event) => return event,
                Some(_) => {}
                None => panic!("our client stopped before {what}"),
            }
        }
    })
    .await
}

/// The next application message our client received.
pub async fn message<R: Runtime>(rt: &R, events: &mut ClientEvents) -> Message {
    match event(rt, events, "message", |e| {
        matches!(e, ClientEvent::Message(_))
    })
    .await
    {
        ClientEvent::Message(message) => message,
        _ => unreachable!("the predicate matched a message"),
    }
}

/// A raw WebSocket peer over `R`'s own sockets: it sends what no Mesa client would.
pub type Raw<R> = WebSocketStream<<R as Runtime>::TcpStream>;

/// Open a raw WebSocket to our server at `addr` (`ws://addr/`).
pub async fn raw<R: Runtime>(rt: &R, addr: SocketAddr) -> Raw<R> {
    within(rt, "a raw WebSocket handshake", async {
        let stream = rt.connect(&addr.to_string()).await.expect("TCP connect");
        let (ws, _) = async_tungstenite::client_async(url(addr), stream)
            .await
            .expect("WebSocket handshake");
        ws
    })
    .await
}

/// A raw WebSocket to our server at `addr`, past its hello and authenticated as
/// `token` (development authentication: op 22 received).
pub async fn raw_signed_in<R: Runtime>(rt: &R, addr: SocketAddr, token: &str) -> Raw<R> {
    let mut ws = raw(rt, addr).await;
    next_json(rt, &mut ws).await;
    let auth = json!({"op": 2, "d": {"token": token}}).to_string();
    ws.send(WsMessage::text(auth)).await.expect("op 2 sent");
    assert_eq!(
        next_json(rt, &mut ws).await["op"],
        22,
        "{token} authenticated"
    );
    ws
}

/// Try a WebSocket handshake with our server at `addr` (`ws://addr/`), sending this
/// `Origin` header if any: the raw peer, or the HTTP status that refused it.
pub async fn upgrade<R: Runtime>(
    rt: &R,
    addr: SocketAddr,
    origin: Option<&str>,
) -> Result<Raw<R>, u16> {
    within(rt, "a WebSocket handshake", async {
        let stream = rt.connect(&addr.to_string()).await.expect("TCP connect");
        let mut request = url(addr).into_client_request().expect("a request");
        if let Some(origin) = origin {
            let value = origin.parse().expect("an Origin header value");
            request.headers_mut().insert("Origin", value);
        }
        match async_tungstenite::client_async(request, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(response)) => Err(response.status().as_u16()),
            Err(error) => panic!("the handshake failed without an HTTP answer: {error}"),
        }
    })
    .await
}

/// The next frame the raw peer receives; panics when the stream fails or ends.
pub async fn next_frame<R: Runtime>(rt: &R, ws: &mut Raw<R>) -> WsMessage {
    match within(rt, "a frame", ws.next()).await {
        Some(Ok(frame)) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The next text frame as JSON, reading past pings; panics on a close.
pub async fn next_json<R: Runtime>(rt: &R, ws: &mut Raw<R>) -> Value {
    loop {
        match next_frame(rt, ws).await {
            WsMessage::Text(text) => return serde_json::from_str(&text).expect("JSON"),
            WsMessage::Close(frame) => panic!("expected a text frame, got a close: {frame:?}"),
            _ => {}
        }
    }
}

/// The code of the server's close frame, reading past any other frame.
pub async fn close_code<R: Runtime>(rt: &R, ws: &mut Raw<R>) -> u16 {
    loop {
        if let WsMessage::Close(frame) = next_frame(rt, ws).await {
            return frame.map_or(1005, |frame| frame.code.into());
        }
    }
}

/// Bind a built server to any port of 127.0.0.1 and run it on `rt`.
pub async fn start<R: Runtime, H: Handler>(rt: &R, server: &Server<R, H>) -> SocketAddr {
    serve_on(rt, server, "127.0.0.1:0".parse().unwrap()).await
}

/// Our client, authenticated as `token`.
pub async fn signed_in<R: Runtime>(
    rt: &R,
    addr: SocketAddr,
    token: &str,
) -> (mesa_driver::Client, mesa_driver::ClientEvents) {
    signed_in_with(rt, mesa_driver::client(rt.clone(), url(addr)), token).await
}

/// The client `builder` builds, authenticated as `token`.
pub async fn signed_in_with<R: Runtime>(
    rt: &R,
    builder: mesa_driver::ClientBuilder<R>,
    token: &str,
) -> (mesa_driver::Client, mesa_driver::ClientEvents) {
    let (client, events) = builder.build().unwrap();
    let user = within(
        rt,
        &format!("{token} authenticating"),
        client.authenticate(json!({"token": token}), true),
    )
    .await
    .unwrap();
    assert_eq!(user, json!({"id": token}));
    (client, events)
}

/// Send a dispatch of type `t` from our client (queued while it is offline).
pub async fn say(client: &mesa_driver::Client, t: &str, d: Value) {
    client.send(Message::dispatch(t, d)).await.unwrap();
}

/// The most one conformance scenario may take, waits included.
pub const SCENARIO: Duration = Duration::from_secs(60);

/// Run `scenario` on `rt`, bounded by [`SCENARIO`] on the runtime's own timer.
pub async fn run_scenario<R: Runtime, F: Future<Output = ()>>(
    rt: R,
    scenario: impl FnOnce(R) -> F,
) {
    let done = timeout(&rt.clone(), SCENARIO, scenario(rt)).await;
    assert!(done.is_some(), "the scenario took longer than {SCENARIO:?}");
}

/// One test per runtime for each scenario (an `async fn(R)` in scope):
/// `scenario::tokio`, `scenario::smol`, `scenario::async_std`, each blocking on that
/// runtime's own executor, bounded by [`SCENARIO`].
#[macro_export]
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn tokio() {
                $crate::runtimes::block_on_tokio($crate::runtimes::run_scenario(
                    $crate::runtimes::Tokio,
                    super::$scenario,
                ));
            }

            #[test]
            fn smol() {
                ::smol::block_on($crate::runtimes::run_scenario(
                    $crate::runtimes::Smol,
                    super::$scenario,
                ));
            }

            #[test]
            fn async_std() {
                ::async_std::task::block_on($crate::runtimes::run_scenario(
                    $crate::runtimes::AsyncStd,
                    super::$scenario,
                ));
            }
        }
    )*};
}
