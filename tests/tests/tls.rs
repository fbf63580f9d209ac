//! `wss://` on every runtime: our client and our server over TLS, with certificates
//! the tests make ([`mesa_tests::pki`]): a test CA signing a certificate for
//! `localhost` and 127.0.0.1, one for a wrong name, an expired one. Each scenario runs
//! on tokio, smol and async-std (the conformance suite's `conformance!` macro), over
//! real loopback sockets; every wait is bounded and waits for a condition.
//!
//! The reasons a client reports for a failed certificate check (in its
//! `Disconnected` event, `connection failed: TLS handshake failed: invalid peer
//! certificate: ...`) are asserted here, so the README's list of them stays true.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::io::{AsyncReadExt, AsyncWriteExt};
use mesa_core::{BackoffConfig, ClientEvent, Close, CloseCode};
use mesa_driver::{
    ClientBuilder, DevAuthenticator, Runtime, Server, ServerBuilder, ServerTls, TransportConfig,
};
use mesa_tests::conformance;
use mesa_tests::pki::{ServerCert, TestCa};
use mesa_tests::runtimes::{event, message, say, signed_in_with, start, until, within};
use serde_json::json;

conformance!(
    wss_to_localhost_and_to_127_0_0_1_echoes,
    an_unknown_issuer_is_a_failed_attempt_that_backs_off,
    a_certificate_for_another_name_is_refused,
    an_expired_certificate_is_refused,
    a_plaintext_client_is_dropped_and_hurts_nobody,
    a_stalled_tls_handshake_holds_a_slot_until_its_timeout,
    a_reloaded_certificate_serves_new_connections_and_keeps_old_ones,
);

/// A development server (relay, dev authentication) serving TLS with `cert`.
fn tls_server<R: Runtime>(rt: &R, cert: &ServerCert) -> ServerBuilder<R, mesa_driver::Relay> {
    let tls = ServerTls::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
        .expect("the test certificate loads");
    Server::builder(rt.clone())
        .handler(mesa_driver::Relay)
        .authenticate(DevAuthenticator)
        .tls(tls)
}

/// A client of `wss://HOST:PORT/` trusting `ca`, retrying every 50 ms at most.
fn client<R: Runtime>(rt: &R, host: &str, addr: SocketAddr, ca: &TestCa) -> ClientBuilder<R> {
    untrusting(rt, host, addr).add_root_pem(ca.pem())
}

/// A client of `wss://HOST:PORT/` with the default roots only.
fn untrusting<R: Runtime>(rt: &R, host: &str, addr: SocketAddr) -> ClientBuilder<R> {
    let url = format!("wss://{host}:{}/", addr.port());
    mesa_driver::client(rt.clone(), url).backoff(BackoffConfig {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(50),
        base_is_fixed: true,
    })
}

/// The reason of the next two failed attempts of a client that cannot connect;
/// both must say they will be retried (the backoff goes on).
async fn failed_attempts<R: Runtime>(rt: &R, builder: ClientBuilder<R>) -> String {
    let (_client, mut events) = builder.build().expect("the client builds");
    let mut reasons = Vec::new();
    for attempt in ["first", "second"] {
        match event(rt, &mut events, &format!("{attempt} failed attempt"), |e| {
            matches!(
                e,
                ClientEvent::Disconnected { .. } | ClientEvent::Connected { .. }
            )
        })
        .await
        {
            ClientEvent::Disconnected {
                close,
                reconnect_at,
            } => {
                assert_eq!(close.code, CloseCode::ABNORMAL, "{close}");
                assert!(
                    reconnect_at.is_some(),
                    "{attempt} attempt not retried: {close}"
                );
                reasons.push(close.reason.to_string());
            }
            other => panic!("the client connected: {other:?}"),
        }
    }
    // The same failure each time, up to the numbers in it (an expired certificate's
    // reason carries the verification time, which moves on between attempts).
    let shape = |reason: &str| reason.replace(|c: char| c.is_ascii_digit(), "");
    assert_eq!(
        shape(&reasons[0]),
        shape(&reasons[1]),
        "the same failure each time: {reasons:?}"
    );
    reasons.remove(0)
}

async fn wss_to_localhost_and_to_127_0_0_1_echoes<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let cert = ca.server(&["localhost", "127.0.0.1"]);
    let addr = start(&rt, &tls_server(&rt, &cert).build().unwrap()).await;
    for (host, token) in [("localhost", "alice"), ("127.0.0.1", "bob")] {
        let (client, mut events) = signed_in_with(&rt, client(&rt, host, addr, &ca), token).await;
        say(&client, "ECHO", json!({"over": host})).await;
        let echoed = message(&rt, &mut events).await;
        assert_eq!(echoed.d, json!({"over": host}));
        client
            .disconnect(Close::new(CloseCode::NORMAL, "done"))
            .await
            .unwrap();
    }
}

async fn an_unknown_issuer_is_a_failed_attempt_that_backs_off<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let addr = start(
        &rt,
        &tls_server(&rt, &ca.server(&["localhost"])).build().unwrap(),
    )
    .await;
    let reason = failed_attempts(&rt, untrusting(&rt, "localhost", addr)).await;
    assert_eq!(
        reason,
        "connection failed: TLS handshake failed: invalid peer certificate: UnknownIssuer"
    );
    // Trusting another CA is no better.
    let other = TestCa::new("another CA");
    let reason = failed_attempts(&rt, client(&rt, "localhost", addr, &other)).await;
    assert!(reason.ends_with("UnknownIssuer"), "{reason}");
}

async fn a_certificate_for_another_name_is_refused<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let cert = ca.server(&["wrong.example"]);
    let addr = start(&rt, &tls_server(&rt, &cert).build().unwrap()).await;
    let reason = failed_attempts(&rt, client(&rt, "localhost", addr, &ca)).await;
    assert!(
        reason.starts_with(
            "connection failed: TLS handshake failed: invalid peer certificate: \
             certificate not valid for name \"localhost\""
        ),
        "{reason}"
    );
    // The IP address is checked too, against the certificate's IP names.
    let reason = failed_attempts(&rt, client(&rt, "127.0.0.1", addr, &ca)).await;
    assert!(
        reason.contains("not valid for name \"127.0.0.1\""),
        "{reason}"
    );
}

async fn an_expired_certificate_is_refused<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let cert = ca.expired_server(&["localhost"]);
    let addr = start(&rt, &tls_server(&rt, &cert).build().unwrap()).await;
    let reason = failed_attempts(&rt, client(&rt, "localhost", addr, &ca)).await;
    assert!(
        reason.starts_with(
            "connection failed: TLS handshake failed: invalid peer certificate: \
             certificate expired"
        ),
        "{reason}"
    );
}

async fn a_plaintext_client_is_dropped_and_hurts_nobody<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let addr = start(
        &rt,
        &tls_server(&rt, &ca.server(&["localhost"])).build().unwrap(),
    )
    .await;
    let (alice, mut alice_events) =
        signed_in_with(&rt, client(&rt, "localhost", addr, &ca), "alice").await;

    // A plaintext HTTP request: the TLS handshake fails and the socket is closed
    // (after at most a TLS alert, never an HTTP answer).
    let mut plain = rt.connect(&addr.to_string()).await.expect("TCP connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("the request is written");
    let answer = within(&rt, "the server closing the plaintext socket", async {
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        answer
    })
    .await;
    assert!(
        !answer.starts_with(b"HTTP"),
        "an HTTP answer over TLS: {answer:?}"
    );

    // Our client with a ws:// URL fails its attempts the same way.
    let plain_url = format!("ws://localhost:{}/", addr.port());
    let (_plain, mut plain_events) = mesa_driver::client(rt.clone(), plain_url).build().unwrap();
    let _ = event(&rt, &mut plain_events, "a failed plaintext attempt", |e| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reconnect_at: Some(_),
                ..
            }
        )
    })
    .await;

    // Alice never noticed.
    say(&alice, "ECHO", json!({"still": "here"})).await;
    assert_eq!(
        message(&rt, &mut alice_events).await.d,
        json!({"still": "here"})
    );
}

async fn a_stalled_tls_handshake_holds_a_slot_until_its_timeout<R: Runtime>(rt: R) {
    let ca = TestCa::new("mesa test CA");
    let server = tls_server(&rt, &ca.server(&["localhost"]))
        .max_connections(1)
        .transport(TransportConfig {
            handshake_timeout: Duration::from_millis(500),
            ..TransportConfig::default()
        })
        .build()
        .unwrap();
    let addr = start(&rt, &server).await;

    // A peer that connects and never says hello holds the only slot...
    let mut silent = rt.connect(&addr.to_string()).await.expect("TCP connect");
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = closed.clone();
    rt.spawn(async move {
        let mut rest = Vec::new();
        let _ = silent.read_to_end(&mut rest).await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    // ...so a client is turned away with 503 while it does (its TLS handshake is done,
    // and the WebSocket upgrade refused)...
    let (_client, mut events) = client(&rt, "localhost", addr, &ca).build().unwrap();
    let refused = event(&rt, &mut events, "a refused attempt", |e| {
        matches!(
            e,
            ClientEvent::Disconnected { .. } | ClientEvent::Connected { .. }
        )
    })
    .await;
    match refused {
        ClientEvent::Disconnected { close, .. } => {
            assert!(close.reason.contains("503"), "{close}")
        }
        other => panic!("connected past the limit: {other:?}"),
    }
    // ...until the handshake timeout closes the silent peer and frees the slot.
    until(
        &rt,
        "the silent peer closed by the handshake timeout",
        || closed.load(std::sync::atomic::Ordering::SeqCst),
    )
    .await;
    let _ = event(&rt, &mut events, "connecting once the slot is free", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
}

async fn a_reloaded_certificate_serves_new_connections_and_keeps_old_ones<R: Runtime>(rt: R) {
    let old_ca = TestCa::new("old CA");
    let old = old_ca.server(&["localhost"]);
    let tls = ServerTls::from_pem(old.cert_pem.as_bytes(), old.key_pem.as_bytes()).unwrap();
    let server = Server::builder(rt.clone())
        .handler(mesa_driver::Relay)
        .authenticate(DevAuthenticator)
        .tls(tls.clone())
        .build()
        .unwrap();
    let addr = start(&rt, &server).await;
    let (alice, mut alice_events) =
        signed_in_with(&rt, client(&rt, "localhost", addr, &old_ca), "alice").await;

    let new_ca = TestCa::new("new CA");
    let new = new_ca.server(&["localhost"]);
    // A key that does not belong to the certificate is refused; the old one stays.
    assert!(
        tls.reload_pem(new.cert_pem.as_bytes(), old.key_pem.as_bytes())
            .is_err()
    );
    tls.reload_pem(new.cert_pem.as_bytes(), new.key_pem.as_bytes())
        .unwrap();

    let (bob, mut bob_events) =
        signed_in_with(&rt, client(&rt, "localhost", addr, &new_ca), "bob").await;
    let reason = failed_attempts(&rt, client(&rt, "localhost", addr, &old_ca)).await;
    assert!(reason.ends_with("UnknownIssuer"), "{reason}");

    // Alice, connected with the old certificate, is still there.
    say(&alice, "ECHO", json!({"n": 1})).await;
    assert_eq!(message(&rt, &mut alice_events).await.d, json!({"n": 1}));
    say(&bob, "ECHO", json!({"n": 2})).await;
    assert_eq!(message(&rt, &mut bob_events).await.d, json!({"n": 2}));
}
