//! Metrics and health checks: `mesa serve --metrics-listen` scraped after a known
//! workload (connections, messages, a 1008 close, a reconnection), `/readyz` while
//! the Redis link is down (to any of several instances), and heartbeat misses counted
//! by the library's middleware;
//! and the pages of `mesa serve --demo` (the browser itself is `browser.rs`'s).
//!
//! `cargo test -p mesa-cli --test metrics`.
#![cfg(unix)]

#[allow(unreachable_pub)]
#[path = "../../tests/src/net.rs"]
mod net;
#[allow(unreachable_pub)]
#[path = "../../tests/src/pki.rs"]
mod pki;
#[allow(unreachable_pub)]
#[path = "../../tests/src/redis.rs"]
mod redis_server;
// Only its `ServeProcess` is used here (with this crate's `mesa`).
#[allow(unreachable_pub, dead_code)]
#[path = "../../tests/src/process.rs"]
mod process;

use process::ServeProcess;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::StreamExt;
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{Client, ClientEvent, ClientEvents, Close, CloseCode, DevAuthenticator, Message};
use serde_json::json;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// The longest any single expectation waits.
const WAIT: Duration = Duration::from_secs(15);

/// Start `mesa serve ARGS` (killed when the process is dropped; no `MESA_*` variable
/// from the environment) and wait for its two announcements: the metrics address and
/// the WebSocket URL.
fn serve(args: &[&str]) -> (ServeProcess, String, String) {
    let process = ServeProcess::spawn(Path::new(env!("CARGO_BIN_EXE_mesa")), args);
    let mut metrics = None;
    let mut url = None;
    let deadline = Instant::now() + WAIT;
    while metrics.is_none() || url.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = process
            .lines
            .recv_timeout(left)
            .expect("mesa serve announces itself");
        if let Some(rest) = line.strip_prefix("mesa metrics on http://") {
            metrics = rest.strip_suffix("/metrics").map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("mesa listening on ") {
            url = Some(rest.to_owned());
        }
    }
    (process, metrics.expect("metrics"), url.expect("url"))
}

/// `GET path` on `addr` (HTTP/1.1, one request per connection): status, headers, body.
fn get(addr: &str, path: &str) -> (u16, String, String) {
    get_with(addr, path, "")
}

/// [`get`] with extra header lines (each ending in `\r\n`).
fn get_with(addr: &str, path: &str, headers: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("write the request");
    // Read to the end, except after a 101: then the connection speaks WebSocket.
    let mut response = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read the response");
        response.extend_from_slice(&chunk[..n]);
        let switched =
            response.starts_with(b"HTTP/1.1 101") && response.windows(4).any(|w| w == b"\r\n\r\n");
        if n == 0 || switched {
            break;
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, head.to_owned(), body.to_owned())
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// Scrape until every expectation holds (the server counts a close only after its
/// closing handshake); panic with the last scrape otherwise.
fn scrape_until(addr: &str, expected: &[(&str, f64)]) -> String {
    scrape_until_ok(addr, |text| {
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(series, value)| sample(text, series) != Some(*value))
            .map(|(series, value)| {
                format!("{series}: want {value}, got {:?}", sample(text, series))
            })
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("{wrong:#?}"))
        }
    })
}

/// Scrape until `check` accepts the scrape; panic with its last complaint and the
/// last scrape otherwise. (An HTTP endpoint tells nothing when it changes: polled.)
fn scrape_until_ok(addr: &str, check: impl Fn(&str) -> Result<(), String>) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        match check(&text) {
            Ok(()) => return text,
            Err(wrong) => assert!(
                Instant::now() < deadline,
                "metrics never matched: {wrong}\n{text}"
            ),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client of `url`, authenticated as `token`, that does not reconnect by itself.
async fn join(url: &str, token: &str) -> (Client, ClientEvents) {
    let (client, events) = mesa_tokio::client(url)
        .reconnect(false)
        .build()
        .expect("client");
    tokio::time::timeout(WAIT, client.authenticate(json!({ "token": token }), true))
        .await
        .expect("authenticated in time")
        .expect("authenticated");
    (client, events)
}

/// Wait for the first event `pick` accepts.
async fn until<T>(events: &mut ClientEvents, mut pick: impl FnMut(ClientEvent) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.next().await.expect("events go on");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("the event came in time")
}

/// Wait for `count` messages of type `t`.
async fn messages(events: &mut ClientEvents, t: &str, count: usize) {
    for _ in 0..count {
        until(events, |event| match event {
            ClientEvent::Message(message) if message.t.as_deref() == Some(t) => Some(()),
            _ => None,
        })
        .await;
    }
}

/// Wait for the disconnection and return its close code.
async fn closed(events: &mut ClientEvents) -> u16 {
    until(events, |event| match event {
        ClientEvent::Disconnected { close, .. } => Some(close.code.0),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_known_workload_has_the_exact_counts() {
    let (_server, metrics, url) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "dev",
        "--metrics-listen",
        "127.0.0.1:0",
        // No heartbeat during the test, so that every frame is the workload's.
        "--heartbeat-interval",
        "60000",
    ]);
    let (status, _, body) = get(&metrics, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = get(&metrics, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // N = 3 clients; M = 5 ECHO from alice, 1 BROADCAST from bob; one rejected
    // authentication (1008); carol leaves (1000) and comes back: a reconnection.
    let (_alice, mut alice_events) = join(&url, "alice").await;
    let (_bob_client, mut bob_events) = join(&url, "bob").await;
    let (carol, mut carol_events) = join(&url, "carol").await;

    let (intruder, mut intruder_events) = mesa_tokio::client(url.as_str())
        .reconnect(false)
        .build()
        .expect("client");
    // Dev authentication refuses an empty token.
    let refused = tokio::time::timeout(WAIT, intruder.authenticate(json!({"token": ""}), true));
    assert!(refused.await.expect("answered in time").is_err());
    assert_eq!(closed(&mut intruder_events).await, 1008);

    for n in 0..5 {
        _alice
            .send(Message::dispatch("ECHO", json!({ "n": n })))
            .await
            .expect("send");
    }
    messages(&mut alice_events, "ECHO", 5).await;

    carol
        .disconnect(Close::new(CloseCode::NORMAL, "bye"))
        .await
        .expect("disconnect");
    assert_eq!(closed(&mut carol_events).await, 1000);
    scrape_until(&metrics, &[(r#"mesa_closes_total{code="1000"}"#, 1.0)]);
    let (_carol_again, mut carol_again_events) = join(&url, "carol").await;

    _bob_client
        .send(Message::dispatch(
            "BROADCAST",
            json!({ "text": "hello all" }),
        ))
        .await
        .expect("send");
    messages(&mut alice_events, "BROADCAST", 1).await;
    messages(&mut bob_events, "BROADCAST", 1).await;
    messages(&mut carol_again_events, "BROADCAST", 1).await;

    let text = scrape_until(
        &metrics,
        &[
            ("mesa_connections", 3.0),
            ("mesa_connections_authenticated", 3.0),
            ("mesa_connections_opened_total", 5.0),
            ("mesa_authentications_total", 4.0),
            ("mesa_reconnections_total", 1.0),
            (r#"mesa_closes_total{code="1008"}"#, 1.0),
            (r#"mesa_closes_total{code="1000"}"#, 1.0),
            // op 2 from each of the 5 connections, 5 ECHO, 1 BROADCAST.
            ("mesa_messages_received_total", 11.0),
            // 5 hellos, 4 op 22, 5 ECHO back, the BROADCAST to 3 connections.
            ("mesa_messages_sent_total", 17.0),
            // One send through the server (the BROADCAST) reaching 3 connections;
            // ECHO answers its sender directly.
            ("mesa_send_deliveries_count", 1.0),
            ("mesa_send_deliveries_sum", 3.0),
            (r#"mesa_send_deliveries_bucket{le="2.0"}"#, 0.0),
            (r#"mesa_send_deliveries_bucket{le="5.0"}"#, 1.0),
            ("mesa_heartbeat_misses_total", 0.0),
            ("mesa_queue_overflows_total", 0.0),
            ("mesa_sync_stored_total", 0.0),
            ("mesa_sync_redelivered_total", 0.0),
            ("mesa_redis_link_up", 0.0),
        ],
    );
    for series in ["mesa_received_bytes_total", "mesa_sent_bytes_total"] {
        assert!(
            sample(&text, series).is_some_and(|bytes| bytes > 100.0),
            "{series}\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
    let (_, head, _) = get(&metrics, "/metrics");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    eprintln!("the scrape checked:\n{text}");
}

#[test]
fn readyz_fails_while_the_redis_link_is_down() {
    // A port nothing listens on: the link never comes up.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let redis = format!("redis://127.0.0.1:{port}/");
    let (_server, metrics, _) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        &redis,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(get(&metrics, "/healthz").0, 200);
    let (status, _, body) = get(&metrics, "/readyz");
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: the Redis link is down\n")
    );
    scrape_until(&metrics, &[("mesa_redis_link_up", 0.0)]);
}

/// With several Redis instances the link counts as up only while every instance's
/// is: the links that come up beside one that is down do not flip the gauge or
/// `/readyz`.
#[test]
fn the_link_is_up_only_while_every_redis_instance_is_linked() {
    let a = redis_server::RedisServer::start();
    let mut b = redis_server::RedisServer::start();
    b.kill();
    let redis = format!("{},{}", a.url(), b.url());
    let (_server, metrics, _) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--redis",
        &redis,
        "--legacy-bus",
        "off",
        "--lease",
        "900",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // A ping answered: the link to `a` is up (b's is not).
    let text = scrape_until_ok(&metrics, |text| {
        match sample(text, "mesa_redis_ping_seconds_count") {
            Some(pings) if pings >= 1.0 => Ok(()),
            pings => Err(format!("no ping answered: {pings:?}")),
        }
    });
    assert_eq!(sample(&text, "mesa_redis_link_up"), Some(0.0), "{text}");
    assert_eq!(get(&metrics, "/readyz").0, 503);
    b.restart();
    scrape_until(&metrics, &[("mesa_redis_link_up", 1.0)]);
    assert_eq!(get(&metrics, "/readyz").0, 200);
    b.kill();
    scrape_until(&metrics, &[("mesa_redis_link_up", 0.0)]);
    assert_eq!(get(&metrics, "/readyz").0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_middleware_counts_heartbeat_misses_and_the_close_they_cause() {
    let metrics = Metrics::new();
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(Duration::from_millis(50), 1)
        .authenticate(DevAuthenticator)
        .middleware(metrics.clone())
        .build()
        .expect("server");
    let listening = server
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listening.local_addr();
    tokio::spawn(listening.run());

    // A peer that never answers a heartbeat.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut ws, _) = async_tungstenite::client_async(format!("ws://{addr}/"), stream.compat())
        .await
        .expect("handshake");
    let close = tokio::time::timeout(WAIT, async {
        while let Some(Ok(frame)) = ws.next().await {
            if let WsMessage::Close(frame) = frame {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("closed in time");
    assert_eq!(close, Some(1001));
    drop(ws);

    // The close is counted when it is sent, the connection when its task ends: wait
    // for both.
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = metrics.render();
        if sample(&text, r#"mesa_closes_total{code="1001"}"#) == Some(1.0)
            && sample(&text, "mesa_connections") == Some(0.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no close counted or connection still open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The first beat is never a miss; then a miss (tries 1), then one past the limit.
    assert_eq!(
        sample(&text, "mesa_heartbeat_misses_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(metrics.connections(), 0);
    server.shutdown();
}

#[test]
fn the_demo_serves_its_page_and_client_module_beside_the_endpoint() {
    let (_server, metrics, url) = serve(&[
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--allowed-origin",
        "http://chat.example",
    ]);
    let addr = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.strip_suffix("/ws"))
        .unwrap_or_else(|| panic!("the demo's endpoint is /ws: {url}"));
    let (status, head, page) = get(addr, "/");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    assert!(
        page.contains(r#"<meta name="mesa-endpoint" content="/ws">"#),
        "{page}"
    );
    assert!(
        page.contains("dev authentication"),
        "the page says it is a demo"
    );
    for script in ["/chat.js", "/mesa-client.js"] {
        let (status, head, _) = get(addr, script);
        assert_eq!(status, 200, "{script}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/javascript"),
            "{head}"
        );
    }
    // The page's client is the browser client package, as it is in the repository.
    let package = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../clients/js/index.js"
    ))
    .expect("clients/js/index.js");
    assert!(
        get(addr, "/mesa-client.js").2 == package,
        "/mesa-client.js is not clients/js/index.js"
    );
    // A plain GET of the endpoint is refused: it only takes WebSocket handshakes.
    assert_eq!(get(addr, "/ws").0, 426);
    // A handshake from a page of another origin is refused (cross-site hijacking).
    let handshake = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let foreign = format!("{handshake}Origin: http://evil.example\r\n");
    assert_eq!(get_with(addr, "/ws", &foreign).0, 403);
    let allowed = format!("{handshake}Origin: http://chat.example\r\n");
    let (status, head, _) = get_with(addr, "/ws", &allowed);
    assert_eq!(status, 101, "{head}");
    assert_eq!(get(&metrics, "/readyz").0, 200);
}
