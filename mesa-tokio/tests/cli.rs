//! End-to-end tests of the `mesa` binary: `mesa serve` and `mesa client` run as real
//! processes that talk over loopback. Every wait is bounded, and every child process
//! is killed when its handle drops, so a failing test leaves nothing behind.
//!
//! Needs the `cli` feature: `cargo test -p mesa-tokio --features cli --test cli`.
#![cfg(unix)]

mod common;

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
        assert!(url.starts_with("ws://127.0.0.1:"), "unexpected URL {url}");
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
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
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
