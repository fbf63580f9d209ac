//! End-to-end tests of the `mesa` binary: `mesa serve` and `mesa client` run as real
//! processes that talk over loopback. Every wait is bounded, and every child process
//! is killed when its handle drops, so a failing test leaves nothing behind.
//!
//! The TLS tests (`mesa serve --tls-cert/--tls-key`) make their certificates with the
//! workspace tests' PKI (`tests/src/pki.rs`) and run the published Node clients
//! (`tests/node`, `npm ci` there first) trusting the test CA through
//! `NODE_EXTRA_CA_CERTS`.
//!
//! `cargo test -p mesa-cli --test cli`.
#![cfg(unix)]

mod common;
#[allow(unreachable_pub)]
#[path = "../../tests/src/pki.rs"]
mod pki;

use common::{Lines, WAIT};
use std::io::Write;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

/// A running `mesa` process, killed when dropped.
struct Mesa {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
}

impl Mesa {
    /// Start `mesa ARGS` with `env` and no other `MESA_*` variable.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesa"));
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
            command.env_remove(key);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mesa binary starts");
        let stdin = child.stdin.take();
        let stdout = Lines::new(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::new(child.stderr.take().expect("piped stderr"));
        Mesa {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Start `mesa serve ARGS` and return it with the URL it announces.
    fn serve(args: &[&str], env: &[(&str, &str)]) -> (Self, String) {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let server = Mesa::start(&all, env);
        let line = server.stdout.expect("announcing the URL", |l| {
            l.starts_with("mesa listening on ")
        });
        let url = line["mesa listening on ".len()..].to_owned();
        assert!(
            url.starts_with("ws://127.0.0.1:") || url.starts_with("wss://127.0.0.1:"),
            "unexpected URL {url}"
        );
        (server, url)
    }

    /// Start `mesa client URL ARGS` and wait until it reports `ready` on stderr.
    fn client(url: &str, args: &[&str], ready: &str) -> Self {
        let mut all = vec!["client", url];
        all.extend_from_slice(args);
        let client = Mesa::start(&all, &[]);
        client
            .stderr
            .expect(&format!("starting with `{ready}`"), |l| {
                l.starts_with(ready)
            });
        client
    }

    /// Write one line to the process's stdin.
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to stdin");
    }

    /// The next message printed on stdout, as JSON.
    fn expect_message(&self, t: &str) -> Value {
        let line = self.stdout.expect(&format!("with a {t} message"), |line| {
            serde_json::from_str::<Value>(line).is_ok_and(|m| m["t"] == t)
        });
        serde_json::from_str(&line).expect("JSON line")
    }

    /// Send SIGTERM.
    fn terminate(&self) {
        self.signal("TERM");
    }

    /// Send the signal `name` (`TERM`, `HUP`).
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Wait for the process to exit, at most [`WAIT`].
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {WAIT:?}; stderr: {:#?}",
                self.stderr.all()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mesa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn clients_relay_through_a_dev_server_which_stops_cleanly_on_sigterm() {
    let (mut server, url) = Mesa::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "dev",
            "--heartbeat-interval",
            "200",
        ],
        &[],
    );
    server
        .stderr
        .expect("warning about dev auth", |l| l.contains("for demos"));

    let mut bob = Mesa::client(&url, &["--token", "bob"], "connected");
    bob.stderr
        .expect("authenticated as bob", |l| l.contains(r#""id":"bob""#));
    let mut alice = Mesa::client(&url, &["--token", "alice"], "connected");
    alice
        .stderr
        .expect("authenticated as alice", |l| l.contains(r#""id":"alice""#));

    // A broadcast reaches everyone, the sender included.
    alice.send(r#"{"op":0,"t":"BROADCAST","d":{"text":"hi from alice"}}"#);
    let expected = json!({"op": 0, "t": "BROADCAST", "d": {"text": "hi from alice"}});
    assert_eq!(bob.expect_message("BROADCAST"), expected);
    assert_eq!(alice.expect_message("BROADCAST"), expected);

    // A bad line is reported and is not fatal; an echo comes back to its sender only.
    alice.send("this is not JSON");
    alice.stderr.expect("reporting the bad line", |l| {
        l.starts_with("bad_input line=2")
    });
    alice.send(r#"{"op":0,"t":"ECHO","d":{"n":1}}"#);
    assert_eq!(
        alice.expect_message("ECHO"),
        json!({"op": 0, "t": "ECHO", "d": {"n": 1}})
    );

    // Five heartbeat intervals later both clients are still there (they answer beats).
    thread::sleep(Duration::from_millis(1_000));
    bob.send(r#"{"op":0,"t":"ECHO","d":{"n":2}}"#);
    assert_eq!(bob.expect_message("ECHO")["d"]["n"], 2);
    assert!(
        !bob.stdout.all().iter().any(|l| l.contains(r#""n":1"#)),
        "bob got alice's echo"
    );
    for client in [&alice, &bob] {
        let stderr = client.stderr.all();
        assert!(
            !stderr.iter().any(|l| l.starts_with("disconnected")),
            "{stderr:#?}"
        );
    }

    // End of stdin: alice leaves with a normal close and exits 0.
    drop(alice.stdin.take());
    assert!(alice.wait().success(), "{:#?}", alice.stderr.all());
    alice.stderr.expect("its own disconnect", |l| {
        l.starts_with("disconnected code=1000")
    });
    server.stderr.expect("logging alice's close", |l| {
        l.contains("disconnected") && l.contains(r#"id="alice""#) && l.contains("code=1000")
    });

    // SIGTERM: bob is told the server goes away (1001), and the server exits 0.
    server.terminate();
    let status = server.wait();
    assert!(status.success(), "{status:?}: {:#?}", server.stderr.all());
    bob.stderr
        .expect("going away", |l| l.starts_with("disconnected code=1001"));
    bob.terminate();
    assert!(bob.wait().success(), "{:#?}", bob.stderr.all());
}

/// `mesa client --token` says on stderr when the server authenticates nobody, and
/// not when it does.
#[test]
fn a_token_for_a_server_without_authentication_is_reported() {
    let (_open, url) = Mesa::serve(&["--listen", "127.0.0.1:0"], &[]);
    let alice = Mesa::client(&url, &["--token", "alice"], "connected");
    alice.stderr.expect("the notice", |l| {
        l.starts_with("authentication_unavailable") && l.contains("--auth dev")
    });

    let (_dev, url) = Mesa::serve(&["--listen", "127.0.0.1:0", "--auth", "dev"], &[]);
    let bob = Mesa::client(&url, &["--token", "bob"], "connected");
    bob.stderr
        .expect("authenticated as bob", |l| l.contains(r#""id":"bob""#));
    let stderr = bob.stderr.all();
    assert!(
        !stderr
            .iter()
            .any(|l| l.starts_with("authentication_unavailable")),
        "{stderr:#?}"
    );
}

#[test]
fn a_jwt_server_accepts_valid_tokens_and_rejects_others_with_1008() {
    let secret = "a-test-secret-that-is-long-enough-for-hs256";
    // The listen address and the secret come from the environment this time.
    let (mut server, url) = Mesa::serve(
        &["--auth", "jwt"],
        &[("MESA_JWT_SECRET", secret), ("MESA_LISTEN", "127.0.0.1:0")],
    );
    let token = |claims: Value, key: &str| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .expect("encode a token")
    };

    let valid = token(json!({"sub": "carol", "name": "Carol"}), secret);
    let carol = Mesa::client(&url, &["--token", &valid], "connected");
    let line = carol
        .stderr
        .expect("authenticated", |l| l.starts_with("authenticated"));
    let user: Value =
        serde_json::from_str(line.trim_start_matches("authenticated user=")).expect("user JSON");
    assert_eq!(user, json!({"sub": "carol", "name": "Carol"}));

    let forged = token(json!({"sub": "mallory"}), "another-secret");
    let mallory = Mesa::client(&url, &["--token", &forged], "connected");
    let line = mallory
        .stderr
        .expect("rejected", |l| l.starts_with("disconnected"));
    assert!(
        line.starts_with("disconnected code=1008") && line.contains("bad signature"),
        "{line}"
    );

    server.terminate();
    assert!(server.wait().success(), "{:#?}", server.stderr.all());
}

#[test]
fn bad_flags_and_unreachable_servers_fail_with_a_message() {
    let mut missing_secret = Mesa::start(&["serve", "--auth", "jwt"], &[]);
    assert_eq!(missing_secret.wait().code(), Some(2));
    missing_secret
        .stderr
        .expect("naming the missing flag", |l| l.contains("--jwt-secret"));

    let mut bad_number = Mesa::start(&["serve", "--heartbeat-interval", "soon"], &[]);
    assert_eq!(bad_number.wait().code(), Some(2));

    let mut bad_policy = Mesa::start(&["serve", "--rate-limit-policy", "drop"], &[]);
    assert_eq!(bad_policy.wait().code(), Some(2));
    bad_policy
        .stderr
        .expect("listing the policies", |l| l.contains("slow, close"));

    let mut bad_url = Mesa::start(&["client", "http://example.invalid/"], &[]);
    assert_eq!(bad_url.wait().code(), Some(2));
    bad_url
        .stderr
        .expect("explaining the URL", |l| l.contains("ws://"));

    // Nothing listens on a port we just released: without reconnection, exit 1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("ws://127.0.0.1:{port}/");
    let mut refused = Mesa::start(&["client", &url, "--no-reconnect"], &[]);
    refused.stderr.expect("a failed connection", |l| {
        l.starts_with("disconnected code=1006")
    });
    assert_eq!(refused.wait().code(), Some(1));
}

/// A WebSocket handshake with `mesa serve` at `url`, with this `Origin` if any: the
/// socket, or the HTTP status that refused it.
fn upgrade(
    url: &str,
    origin: Option<&str>,
) -> Result<tungstenite::WebSocket<std::net::TcpStream>, u16> {
    use tungstenite::client::IntoClientRequest;
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let stream = std::net::TcpStream::connect(addr).expect("TCP connect");
    stream.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let mut request = url.into_client_request().expect("a request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("an Origin value"));
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("the handshake failed without an HTTP answer: {error}"),
    }
}

/// The code of the close frame the server sends next, reading past other frames.
fn close_code(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> u16 {
    loop {
        match ws.read().expect("a frame before the close") {
            tungstenite::Message::Close(frame) => return frame.map_or(1005, |f| f.code.into()),
            _ => continue,
        }
    }
}

#[test]
fn limit_flags_refuse_upgrades_and_close_offenders_with_their_codes() {
    let (mut server, url) = Mesa::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "1",
            "--allowed-origin",
            "https://app.example.com",
            "--allowed-origin",
            "https://admin.example.com",
            "--max-message-bytes",
            "64",
            "--max-messages-per-second",
            "5",
        ],
        &[
            ("MESA_MAX_JSON_DEPTH", "3"),
            ("MESA_MAX_MESSAGE_BURST", "2"),
            ("MESA_MAX_RECIPIENTS", "2"),
            ("MESA_RATE_LIMIT_POLICY", "close"),
        ],
    );
    let first = upgrade(&url, Some("https://admin.example.com")).expect("the first connection");
    assert_eq!(
        upgrade(&url, None).err(),
        Some(503),
        "past --max-connections"
    );
    assert_eq!(
        upgrade(&url, Some("https://evil.example.com")).err(),
        Some(403),
        "an origin not allowed"
    );
    drop(first);

    // Each offender takes the one slot once the previous one left.
    let offend = |frames: &[&str]| {
        let deadline = Instant::now() + WAIT;
        let mut ws = loop {
            match upgrade(&url, Some("https://app.example.com")) {
                Ok(ws) => break ws,
                Err(503) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(status) => panic!("upgrade refused with {status}"),
            }
        };
        for frame in frames {
            if ws.send(tungstenite::Message::text(*frame)).is_err() {
                break;
            }
        }
        close_code(&mut ws)
    };
    let long = format!(r#"{{"op":0,"t":"ECHO","d":"{}"}}"#, "x".repeat(64));
    assert_eq!(offend(&[&long]), 1009, "past --max-message-bytes");
    assert_eq!(
        offend(&[r#"{"op":0,"d":[[[1]]]}"#]),
        1009,
        "past MESA_MAX_JSON_DEPTH"
    );
    let ack = r#"{"op":11}"#;
    assert_eq!(
        offend(&[ack, ack, ack]),
        1008,
        "past the rate and its burst, under MESA_RATE_LIMIT_POLICY=close"
    );
    assert_eq!(
        offend(&[r#"{"op":0,"t":"BROADCAST","d":{"to":["a","b","c"]}}"#]),
        1008,
        "past MESA_MAX_RECIPIENTS"
    );

    server.terminate();
    assert!(server.wait().success(), "{:#?}", server.stderr.all());
}

/// A Node peer of `tests/node` (`client.js` or `browser-client.js` connected to a
/// URL, or `server.js`), killed when dropped.
struct NodePeer {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines,
}

impl NodePeer {
    /// Run `script` with `args` and the environment `env` (`NODE_EXTRA_CA_CERTS` to
    /// trust a CA).
    fn start(script: &str, args: &[&str], env: &[(&str, &std::path::Path)]) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
        assert!(
            dir.join("node_modules/@cryb/mesa").is_dir(),
            "run `npm ci --prefix tests/node` first"
        );
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("`node` starts (install Node.js 20)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = Lines::new(child.stdout.take().expect("piped stdout"));
        NodePeer {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, command: Value) {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .expect("write to node");
    }

    /// The next event named `event`.
    fn expect(&self, event: &str) -> Value {
        self.stdout
            .expect_json(&format!("a `{event}` event"), |v| v["event"] == event)
    }
}

impl Drop for NodePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_over_tls_to_our_client_and_the_published_node_clients() {
    let dir = pki::TempDir::new();
    let ca = pki::TestCa::new("mesa test CA");
    let ca_file = dir.file("ca.crt", &ca.pem());
    let (cert, key) = ca
        .server(&["localhost", "127.0.0.1"])
        .write(dir.path(), "server");
    // The certificate and key come from the environment, like every flag.
    let (mut server, url) = Mesa::serve(
        &["--listen", "127.0.0.1:0", "--auth", "dev"],
        &[
            ("MESA_TLS_CERT", cert.to_str().unwrap()),
            ("MESA_TLS_KEY", key.to_str().unwrap()),
        ],
    );
    assert!(url.starts_with("wss://"), "{url}");
    let url = url.replace("127.0.0.1", "localhost");
    let ca_path = ca_file.to_str().unwrap();

    // Our client, trusting the test CA.
    let mut alice = Mesa::client(
        &url,
        &["--ca-cert", ca_path, "--token", "alice"],
        "connected",
    );
    alice.send(r#"{"op":0,"t":"ECHO","d":{"over":"tls"}}"#);
    assert_eq!(alice.expect_message("ECHO")["d"]["over"], "tls");

    // Without the CA: the documented reason, and exit 1 without reconnection.
    let mut stranger = Mesa::start(&["client", &url, "--no-reconnect"], &[]);
    stranger.stderr.expect("an unknown issuer", |l| {
        l.starts_with("disconnected code=1006")
            && l.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer")
    });
    assert_eq!(stranger.wait().code(), Some(1));

    // A plaintext HTTP request to the TLS port: no HTTP answer, the socket closed.
    let addr = url
        .trim_start_matches("wss://localhost")
        .trim_end_matches('/');
    let mut plain = std::net::TcpStream::connect(format!("127.0.0.1{addr}")).expect("connect");
    plain.set_read_timeout(Some(WAIT)).expect("a read timeout");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut plain, &mut answer).expect("the server closes the socket");
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");

    // The published Node client and mesa-js-client (on `ws`), trusting the CA.
    for (script, token) in [("client.js", "node"), ("browser-client.js", "js")] {
        let env = [("NODE_EXTRA_CA_CERTS", ca_file.as_path())];
        let mut peer = NodePeer::start(script, &[&url], &env);
        peer.expect("connected");
        peer.send(json!({"cmd": "authenticate", "data": {"token": token}}));
        peer.expect("authenticated");
        peer.send(json!({"cmd": "send", "op": 0, "t": "ECHO", "d": {"from": token}}));
        assert_eq!(peer.expect("message")["d"], json!({"from": token}));
    }

    // Alice saw none of it.
    alice.send(r#"{"op":0,"t":"ECHO","d":{"n":2}}"#);
    assert_eq!(alice.expect_message("ECHO")["d"]["n"], 2);
    server.terminate();
    assert!(server.wait().success(), "{:#?}", server.stderr.all());
}

/// `--subscribe` on a server with rooms: a room line of one client reaches every
/// member, printed with its room.
#[test]
fn subscribers_print_room_messages_with_their_room() {
    let (mut server, url) = Mesa::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "dev",
            "--rooms",
            "authenticated",
        ],
        &[],
    );
    let subscribed = |room: &str| format!("subscribed room=\"{room}\" by_server=false");
    let mut alice = Mesa::client(
        &url,
        &["--token", "alice", "--subscribe", "lobby"],
        "connected",
    );
    let bob = Mesa::client(
        &url,
        &[
            "--token",
            "bob",
            "--subscribe",
            "lobby",
            "--subscribe",
            "news",
        ],
        "connected",
    );
    alice
        .stderr
        .expect("alice in the lobby", |l| l == subscribed("lobby"));
    for room in ["lobby", "news"] {
        bob.stderr
            .expect(&format!("bob in {room}"), |l| l == subscribed(room));
    }
    alice.send(r#"{"room":"lobby","t":"CHAT","d":{"text":"hi"}}"#);
    for client in [&alice, &bob] {
        assert_eq!(
            client.expect_message("CHAT"),
            json!({"op": 0, "d": {"text": "hi"}, "t": "CHAT", "room": "lobby"})
        );
    }
    // A line without a room is sent as before.
    alice.send(r#"{"op":0,"t":"ECHO","d":{"n":1}}"#);
    assert_eq!(
        alice.expect_message("ECHO"),
        json!({"op": 0, "d": {"n": 1}, "t": "ECHO"})
    );
    server.terminate();
    assert!(server.wait().success(), "{:#?}", server.stderr.all());
}

/// `--subscribe` against the published server, which has no rooms: said on stderr,
/// as is a room line; everything else works as before.
#[test]
fn rooms_on_a_server_without_them_are_reported() {
    let theirs = NodePeer::start("server.js", &["0", "{}"], &[]);
    let port = theirs.expect("listening")["port"].clone();
    let url = format!("ws://127.0.0.1:{port}/");
    let mut alice = Mesa::client(
        &url,
        &["--token", "alice", "--subscribe", "lobby"],
        "connected",
    );
    alice.stderr.expect("the rooms dropped", |l| {
        l.starts_with("rooms_unavailable dropped=[\"lobby\"]")
    });
    alice.send(r#"{"room":"lobby","t":"CHAT","d":{}}"#);
    alice.stderr.expect("the publish refused", |l| {
        l.starts_with("send_failed line=1") && l.contains("no rooms")
    });
    alice.send(r#"{"op":0,"t":"ECHO","d":{"n":1}}"#);
    assert_eq!(alice.expect_message("ECHO")["d"]["n"], 1);
    let bad = Mesa::start(&["client", &url, "--subscribe", "two words"], &[]);
    bad.stderr
        .expect("the invalid room refused", |l| l.contains("--subscribe"));
}

/// Run `future` on `runtime` for at most [`WAIT`]; panic naming `what` past it.
fn block_within<T>(
    runtime: &tokio::runtime::Runtime,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    runtime.block_on(async {
        tokio::time::timeout(WAIT, future)
            .await
            .unwrap_or_else(|_| panic!("{what}: not done within {WAIT:?}"))
    })
}

/// A two-worker tokio runtime for the tests that drive our client library.
fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Our client of `url` trusting `ca`, retrying every 20 to 50 ms.
fn tls_client(url: &str, ca: &pki::TestCa) -> mesa_tokio::ClientBuilder {
    mesa_tokio::client(url)
        .add_root_pem(ca.pem())
        .backoff(mesa_tokio::BackoffConfig {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(50),
            base_is_fixed: true,
        })
}

/// The next event of our client that `pred` accepts, dropping the others (bounded).
fn next_event(
    runtime: &tokio::runtime::Runtime,
    events: &mut mesa_tokio::ClientEvents,
    what: &str,
    mut pred: impl FnMut(&mesa_tokio::ClientEvent) -> bool,
) -> mesa_tokio::ClientEvent {
    block_within(runtime, what, async {
        loop {
            match events.next().await {
                Some(event) if pred(&event) => break event,
                Some(_) => {}
                None => panic!("the client stopped before {what}"),
            }
        }
    })
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_100_connections() {
    use mesa_tokio::ClientEvent;

    const OPEN: usize = 100;
    let dir = pki::TempDir::new();
    let old_ca = pki::TestCa::new("old CA");
    let (cert, key) = old_ca.server(&["localhost"]).write(dir.path(), "server");
    let (server, url) = Mesa::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "dev",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let url = url.replace("127.0.0.1", "localhost");
    let runtime = tokio_runtime();
    let client = |ca: &pki::TestCa| tls_client(&url, ca);
    let _guard = runtime.enter();
    let mut open = Vec::new();
    for n in 0..OPEN {
        let (client, events) = client(&old_ca).build().expect("a client");
        let token = format!("c{n}");
        block_within(
            &runtime,
            "authenticating",
            client.authenticate(json!({ "token": token }), false),
        )
        .expect("authenticated");
        open.push((client, events));
    }

    // A renewal half written (the new certificate with a key that is not its own)
    // is refused and the current certificate stays.
    let new_ca = pki::TestCa::new("new CA");
    let renewed = new_ca.server(&["localhost"]);
    std::fs::write(&cert, &renewed.cert_pem).expect("write the certificate");
    server.signal("HUP");
    server.stderr.expect("refusing the mismatched pair", |l| {
        l.contains("TLS certificate not reloaded")
    });
    // The whole renewal: new connections get the new certificate.
    std::fs::write(&key, &renewed.key_pem).expect("write the key");
    server.signal("HUP");
    server
        .stderr
        .expect("reloading", |l| l.contains("TLS certificate reloaded"));
    let (fresh, _fresh_events) = client(&new_ca).build().expect("a client");
    block_within(
        &runtime,
        "a new connection with the new certificate",
        fresh.authenticate(json!({"token": "fresh"}), false),
    )
    .expect("authenticated");
    let (_stale, mut stale_events) = client(&old_ca).build().expect("a client");
    let refused = next_event(&runtime, &mut stale_events, "the old CA refused", |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    });
    let ClientEvent::Disconnected { close, .. } = refused else {
        unreachable!("the predicate matched a disconnection")
    };
    assert!(close.reason.ends_with("UnknownIssuer"), "{close}");

    // Every connection opened before the reload is still open and answers.
    for (n, (client, events)) in open.iter_mut().enumerate() {
        block_within(
            &runtime,
            "an echo",
            client.send(mesa_tokio::Message::dispatch("ECHO", json!({ "n": n }))),
        )
        .expect("sent");
        let echoed = block_within(&runtime, "the echo", async {
            loop {
                match events.next().await {
                    Some(ClientEvent::Message(message)) => break message,
                    Some(ClientEvent::Disconnected { close, .. }) => {
                        panic!("connection {n} was dropped: {close}")
                    }
                    Some(_) => {}
                    None => panic!("client {n} stopped"),
                }
            }
        });
        assert_eq!(echoed.d, json!({ "n": n }));
    }
}

#[test]
fn the_demo_over_tls_counts_tls_handshakes_against_max_connections() {
    use mesa_tokio::ClientEvent;

    let dir = pki::TempDir::new();
    let ca = pki::TestCa::new("mesa test CA");
    let (cert, key) = ca.server(&["localhost"]).write(dir.path(), "server");
    let (_server, url) = Mesa::serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--demo",
            "--max-connections",
            "2",
            "--handshake-timeout",
            "3000",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let addr = url
        .trim_start_matches("wss://")
        .trim_end_matches("/ws")
        .to_owned();
    let url = url.replace("127.0.0.1", "localhost");

    // Two peers connect and never send a ClientHello: each holds a slot from its
    // accept on, long before any WebSocket upgrade.
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).expect("TCP connect"))
        .collect();

    // A third client, accepted after them, finishes its TLS handshake and has its
    // upgrade refused with 503 while they stall.
    let runtime = tokio_runtime();
    let _guard = runtime.enter();
    let (_client, mut events) = tls_client(&url, &ca).build().expect("a client");
    let first = next_event(&runtime, &mut events, "the first attempt", |e| {
        matches!(
            e,
            ClientEvent::Connected { .. } | ClientEvent::Disconnected { .. }
        )
    });
    match first {
        ClientEvent::Disconnected { close, .. } => {
            assert!(close.reason.contains("503"), "{close}")
        }
        other => panic!("connected past --max-connections: {other:?}"),
    }

    // The handshake timeout closes the stalled peers and gives their slots back: the
    // client, still retrying, gets in.
    for mut peer in stalled {
        peer.set_read_timeout(Some(WAIT)).expect("a read timeout");
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut peer, &mut rest)
            .expect("the server closes the stalled peer");
    }
    let _connected = next_event(
        &runtime,
        &mut events,
        "connecting once the slots are free",
        |e| matches!(e, ClientEvent::Connected { .. }),
    );
}
