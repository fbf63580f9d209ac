//! The `axum` example's app, served in-process: its HTTP route and the Mesa endpoint
//! share one axum server, and the hand-made WebSocket handshake works with Mesa's
//! own client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesa_tokio::mesa_driver::BoxError;
use mesa_tokio::{ClientEvent, CloseCode, Connection, DevAuthenticator, Message, Middleware};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

// Only the example's `app` is used, not its `main`; its `pub` is for readers.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum.rs"]
mod example;

/// Bound on every step.
const STEP: Duration = Duration::from_secs(10);

/// Remembers the peer address of every Mesa connection.
#[derive(Clone, Default)]
struct Remotes(Arc<Mutex<Vec<Option<SocketAddr>>>>);

impl Middleware for Remotes {
    fn on_connection(&self, conn: &Connection) -> Result<(), BoxError> {
        self.0
            .lock()
            .map_err(|_| "poisoned")?
            .push(conn.remote_addr());
        Ok(())
    }
}

/// `GET path` over a fresh connection; the whole response as text.
async fn get(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra_headers}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    String::from_utf8(response).expect("UTF-8 response")
}

#[tokio::test]
async fn http_routes_and_mesa_share_the_axum_app() {
    let remotes = Remotes::default();
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .authenticate(DevAuthenticator)
        .middleware(remotes.clone())
        .build()
        .expect("valid settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let service = example::app(server.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });

    // Plain HTTP.
    let health = timeout(STEP, get(addr, "/health", ""))
        .await
        .expect("in time");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("\r\n\r\nok"), "{health}");
    let not_an_upgrade = timeout(STEP, get(addr, "/ws", "")).await.expect("in time");
    assert!(
        not_an_upgrade.starts_with("HTTP/1.1 426"),
        "{not_an_upgrade}"
    );
    let old_version = "Upgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n";
    let refused = timeout(STEP, get(addr, "/ws", old_version))
        .await
        .expect("in time");
    assert!(refused.starts_with("HTTP/1.1 426"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{refused}"
    );

    // Mesa over the upgraded stream.
    let (client, mut events) = mesa_tokio::client(format!("ws://{addr}/ws"))
        .build()
        .expect("client");
    let user = timeout(STEP, client.authenticate(json!({"token": "alice"}), true))
        .await
        .expect("in time")
        .expect("authenticated");
    assert_eq!(user, json!({"id": "alice"}));
    assert_eq!(server.handle().online_ids(), ["alice"]);
    client
        .send(Message::dispatch("ECHO", json!({"n": 1})))
        .await
        .expect("queued");
    let echo = timeout(STEP, async {
        loop {
            match events.next().await {
                Some(ClientEvent::Message(message)) => return message,
                Some(_) => {}
                None => panic!("the client stopped"),
            }
        }
    })
    .await
    .expect("echo in time");
    assert_eq!(echo, Message::dispatch("ECHO", json!({"n": 1})));

    // The peer's address came through axum's ConnectInfo.
    let seen = remotes.0.lock().expect("lock").clone();
    assert!(
        matches!(seen.as_slice(), [Some(remote)] if remote.ip().is_loopback()),
        "{seen:?}"
    );

    // Shutting Mesa down closes its connections with 1001.
    server.shutdown();
    let close = timeout(STEP, async {
        loop {
            match events.next().await {
                Some(ClientEvent::Disconnected { close, .. }) => return close,
                Some(_) => {}
                None => panic!("the client stopped"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close.code, CloseCode::GOING_AWAY);
}
