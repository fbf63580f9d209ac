//! End-to-end smoke test of `mesa dispatch` and `mesa portal` with `mesa serve` and
//! `mesa client`, on a `redis-server` process of its own. Every wait is bounded and
//! every child process is killed when its handle drops.
//!
//! Needs `redis-server` on PATH:
//! `cargo test -p mesa-cli --test cli_cluster`.
#![cfg(unix)]

mod common;
#[allow(unreachable_pub)]
#[path = "../../tests/src/net.rs"]
mod net;
#[allow(unreachable_pub)]
#[path = "../../tests/src/pki.rs"]
mod pki;
#[allow(unreachable_pub)]
#[path = "../../tests/src/redis.rs"]
mod redis_server;

use common::{Lines, WAIT};
use redis_server::RedisServer as Redis;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A long-running `mesa` process, killed on drop.
struct Mesa {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

/// `mesa ARGS` with `env` and no other `MESA_*` variable.
fn mesa(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesa"));
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
        command.env_remove(key);
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info");
    command
}

impl Mesa {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = mesa(args, env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the mesa binary starts");
        let stdout = Lines::new(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::new(child.stderr.take().expect("piped stderr"));
        Mesa {
            child,
            stdout,
            stderr,
        }
    }

    /// `mesa serve` with dev authentication and round-robin portals (and `extra`)
    /// on a free port; returns it with the URL it announces.
    fn serve(extra: &[&str], env: &[(&str, &str)]) -> (Self, String) {
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "dev",
            "--portals",
            "round-robin",
        ];
        args.extend_from_slice(extra);
        let server = Mesa::start(&args, env);
        let line = server.stdout.expect("announcing the URL", |l| {
            l.starts_with("mesa listening on ")
        });
        let url = line["mesa listening on ".len()..].to_owned();
        (server, url)
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {WAIT:?}");
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

/// Run `mesa dispatch ARGS` to the end (bounded).
fn dispatch(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec!["dispatch"];
    all.extend_from_slice(args);
    let mut child = mesa(&all, env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the mesa binary starts");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mesa dispatch {args:?} still running after {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("its output")
}

/// The one JSON report line of a successful `mesa dispatch`.
fn report(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mesa dispatch failed: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not one JSON line: {stdout}"))
}

#[test]
fn dispatch_and_portal_work_with_a_cluster_server_and_a_client() {
    let redis = Redis::start();
    let url = redis.url();
    let cluster = [("MESA_REDIS", url.as_str()), ("MESA_NAMESPACE", "ns1")];

    // The portal joins the pool first, so that the server finds it when it connects.
    let mut portal = Mesa::start(&["portal", "--id", "cli-portal"], &cluster);
    portal
        .stderr
        .expect("joining the pool", |l| l.contains("portal joined the pool"));
    assert_eq!(
        redis.command(&["SMEMBERS", "available_portals_pool_ns1"]),
        Some("*1\r\n$10\r\ncli-portal\r\n".to_owned())
    );

    // Sends to ids routed to the replicas that hold them (the shared `ws` bus off).
    let (_server, ws_url) = Mesa::serve(&["--sync", "--legacy-bus", "off"], &cluster);
    let mut alice = Mesa::start(
        &["client", &ws_url, "--token", "alice", "--no-reconnect"],
        &[],
    );
    alice
        .stderr
        .expect("authenticated as alice", |l| l.contains(r#""id":"alice""#));

    // The portal prints the server's events in upstream's format.
    let opened = portal
        .stdout
        .expect_json("a connection event", |e| e["type"] == "connection");
    assert_eq!(
        opened,
        json!({"type": "connection", "portalId": "cli-portal"})
    );
    let authenticated = portal
        .stdout
        .expect_json("an authentication event", |e| e["type"] == "authentication");
    assert_eq!(
        authenticated,
        json!({"type": "authentication", "clientId": "alice", "portalId": "cli-portal"})
    );

    // A dispatch with sync: alice (online) gets it, bob (offline) has it stored.
    redis.wait_reply(&["SISMEMBER", "connected_clients_ns1", "alice"], ":1\r\n");
    let sent = report(&dispatch(
        &[
            "--sync",
            "--type",
            "NOTE",
            "--data",
            r#"{"n":1}"#,
            "--to",
            "alice,bob,carol",
            "--except",
            "carol",
        ],
        &cluster,
    ));
    assert_eq!(
        sent,
        json!({"type": "NOTE", "global": false, "published": 1, "stored": 1, "dropped": 0, "undeliverable": []})
    );
    let note = alice.stdout.expect_json("the NOTE", |m| m["t"] == "NOTE");
    assert_eq!(note, json!({"op": 0, "d": {"n": 1}, "t": "NOTE"}));
    let stored = r#"[{"op":0,"d":{"n":1},"t":"NOTE"}]"#;
    assert_eq!(
        redis.command(&["HGET", "undelivered_messages_ns1", "bob"]),
        Some(format!("${}\r\n{stored}\r\n", stored.len()))
    );

    // Past --max-recipients the dispatch is refused, with the reason, and nothing sent.
    let refused = dispatch(
        &[
            "--type",
            "NOTE",
            "--to",
            "bob,carol,dave",
            "--max-recipients",
            "2",
        ],
        &cluster,
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("too many recipients: 3 > 2"), "{stderr}");

    // Every flag reads the environment too; an op 5 event, routed, disconnects alice
    // (1000).
    let kicked = report(&dispatch(
        &[],
        &[
            ("MESA_REDIS", url.as_str()),
            ("MESA_NAMESPACE", "ns1"),
            ("MESA_LEGACY_BUS", "off"),
            ("MESA_EVENT", "DISCONNECT_CLIENT"),
            ("MESA_TO", "alice"),
        ],
    ));
    assert_eq!(kicked["event"], "DISCONNECT_CLIENT");
    assert_eq!(kicked["published"], 1);
    let status = alice.wait();
    assert!(status.success(), "alice was closed normally: {status}");
    portal
        .stdout
        .expect_json("a disconnection event", |e| e["type"] == "disconnection");

    // SIGTERM: the portal leaves the pool and exits cleanly.
    portal.terminate();
    let status = portal.wait();
    assert!(status.success(), "mesa portal exited with {status}");
    portal
        .stderr
        .expect("leaving the pool", |l| l.contains("portal left the pool"));
    assert_eq!(
        redis.command(&["SMEMBERS", "available_portals_pool_ns1"]),
        Some("*0\r\n".to_owned())
    );
}

#[test]
fn dispatch_reports_usage_and_redis_errors() {
    let unreachable = dispatch(&["--redis", "redis://127.0.0.1:1/", "--type", "X"], &[]);
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(stderr.contains("cannot reach the cluster"), "{stderr}");

    let conflicting = dispatch(
        &[
            "--redis",
            "redis://127.0.0.1:1/",
            "--event",
            "X",
            "--data",
            "1",
        ],
        &[],
    );
    assert_eq!(conflicting.status.code(), Some(2));
    let bad_bus = dispatch(
        &[
            "--redis",
            "redis://127.0.0.1:1/",
            "--legacy-bus",
            "sometimes",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&bad_bus.stderr);
    assert!(stderr.contains("--legacy-bus"), "{stderr}");
    // Several Redis instances need the legacy bus off.
    let sharded = dispatch(
        &[
            "--redis",
            "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
            "--type",
            "X",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&sharded.stderr);
    assert!(stderr.contains("legacy bus off"), "{stderr}");
    let missing = dispatch(&["--redis", "redis://127.0.0.1:1/"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    let not_json = dispatch(
        &[
            "--redis",
            "redis://127.0.0.1:1/",
            "--type",
            "X",
            "--data",
            "{",
        ],
        &[],
    );
    assert_eq!(not_json.status.code(), Some(2));
}

#[test]
fn serve_dispatch_and_portal_reach_their_redis_over_tls() {
    let redis = Redis::start_tls();
    let url = redis.tls_url();
    let ca_file = redis.ca_file();
    let ca = ca_file.to_str().unwrap();
    // The CA comes from the environment, like every flag.
    let env = [("MESA_REDIS", url.as_str()), ("MESA_REDIS_CA_CERT", ca)];
    let mut portal = Mesa::start(&["portal", "--id", "tls-portal"], &env);
    portal
        .stderr
        .expect("joining the pool", |l| l.contains("portal joined the pool"));
    let (_server, ws_url) = Mesa::serve(&[], &env);
    let bob = Mesa::start(&["client", &ws_url, "--token", "bob"], &[]);
    bob.stderr
        .expect("authenticated as bob", |l| l.contains(r#""id":"bob""#));
    // The server's presence and its portal events went through the TLS link.
    redis.wait_reply(&["SISMEMBER", "connected_clients", "bob"], ":1\r\n");
    let authenticated = portal
        .stdout
        .expect_json("an authentication event", |e| e["type"] == "authentication");
    assert_eq!(authenticated["clientId"], "bob");

    let sent = report(&dispatch(
        &["--type", "NOTE", "--to", "bob", "--redis-ca-cert", ca],
        &[("MESA_REDIS", url.as_str())],
    ));
    assert_eq!(sent["published"], 1, "{sent}");
    let note = bob.stdout.expect_json("the NOTE", |m| m["t"] == "NOTE");
    assert_eq!(note["t"], "NOTE");

    // Without the CA, the dispatcher cannot verify Redis's certificate.
    let refused = dispatch(&["--type", "NOTE"], &[("MESA_REDIS", url.as_str())]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot reach the cluster"), "{stderr}");
    // A CA for a plaintext URL is a usage error.
    let plain = dispatch(
        &["--type", "NOTE", "--redis-ca-cert", ca],
        &[("MESA_REDIS", redis.url().as_str())],
    );
    assert_eq!(plain.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("needs a rediss:// URL"), "{stderr}");

    portal.terminate();
    assert!(portal.wait().success());
    portal
        .stderr
        .expect("leaving the pool", |l| l.contains("portal left the pool"));
}

/// Wait until the state file at `path` holds `needle`: the client writes it after it
/// printed what moved it, and says nothing when it did.
fn wait_for_state(path: &std::path::Path, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "the state file never held {needle}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `mesa client --state FILE`: a client process killed with SIGKILL and started
/// again with the same FILE resumes its rooms where it was: it prints what it missed,
/// in order, then the resume's `mesa:subscribed` line with `"recovered": true`.
#[test]
fn a_client_killed_and_restarted_with_its_state_file_resumes_where_it_was() {
    let redis = Redis::start();
    let url = redis.url();
    let cluster = [
        ("MESA_REDIS", url.as_str()),
        ("MESA_RECOVER_ROOMS", "chat:*"),
    ];
    let (_server, ws_url) = Mesa::serve(&["--rooms", "authenticated"], &cluster);
    let dir = pki::TempDir::new();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().expect("a UTF-8 path");
    let client_args = [
        "client",
        ws_url.as_str(),
        "--token",
        "alice",
        "--subscribe",
        "chat:1",
        "--state",
        state_arg,
    ];
    let publish = |n: u64| {
        let data = json!({ "n": n }).to_string();
        report(&dispatch(
            &["--room", "chat:1", "--type", "N", "--data", &data],
            &cluster,
        ))
    };

    let mut first = Mesa::start(&client_args, &[]);
    first
        .stderr
        .expect("subscribed", |l| l.starts_with("subscribed"));
    for n in 0..3 {
        publish(n);
        let got = first
            .stdout
            .expect_json("a room message", |m| m["t"] == "N");
        assert_eq!(
            (got["d"]["n"].as_u64(), got["offset"].as_u64()),
            (Some(n), Some(n + 1))
        );
    }
    // Saved after it printed the third.
    wait_for_state(&state, r#""offset":3"#);
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");

    for n in 3..6 {
        publish(n);
    }
    let second = Mesa::start(&client_args, &[]);
    for n in 3..6 {
        let got = second
            .stdout
            .expect_json("a missed message", |m| m["t"] == "N");
        assert_eq!(
            (got["d"]["n"].as_u64(), got["offset"].as_u64()),
            (Some(n), Some(n + 1))
        );
    }
    let resumed = second
        .stdout
        .expect_json("the resume", |m| m["t"] == "mesa:subscribed");
    assert_eq!(resumed["d"]["recovered"], true, "{resumed}");
    assert_eq!(resumed["d"]["offset"], 6);
}

/// `mesa serve --recover-users` with `mesa client --state FILE`: the sends to the
/// client's id that a killed client process missed (stored, since its id was
/// connected nowhere, and in its id's stream) come once, in order, when it starts
/// again with the same FILE, then the `mesa:resumed` line with `"recovered": true`.
#[test]
fn a_client_restarted_with_its_state_file_gets_the_sends_to_its_id_once() {
    let redis = Redis::start();
    let url = redis.url();
    let cluster = [("MESA_REDIS", url.as_str())];
    let (_server, ws_url) = Mesa::serve(
        &["--rooms", "authenticated", "--sync", "--recover-users"],
        &cluster,
    );
    let dir = pki::TempDir::new();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().expect("a UTF-8 path");
    let client_args = [
        "client",
        ws_url.as_str(),
        "--token",
        "alice",
        "--state",
        state_arg,
    ];
    let send = |n: u64| {
        let data = json!({ "n": n }).to_string();
        report(&dispatch(
            &[
                "--to",
                "alice",
                "--type",
                "N",
                "--data",
                &data,
                "--sync",
                "--recover-users",
            ],
            &cluster,
        ))
    };

    let mut first = Mesa::start(&client_args, &[]);
    let fresh = first
        .stdout
        .expect_json("where the stream stands", |m| m["t"] == "mesa:resumed");
    assert_eq!(fresh["d"]["stream"], "user", "{fresh}");
    let start = fresh["d"]["offset"].as_u64().expect("an offset");
    for n in 0..3 {
        send(n);
        let got = first.stdout.expect_json("a message", |m| m["t"] == "N");
        assert_eq!(got["d"]["n"].as_u64(), Some(n));
    }
    wait_for_state(&state, &format!(r#""offset":{}"#, start + 3));
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    redis.wait_reply(&["SISMEMBER", "connected_clients", "alice"], ":0\r\n");

    for n in 3..6 {
        let sent = send(n);
        assert_eq!(sent["stored"], 1, "{sent}");
    }
    let second = Mesa::start(&client_args, &[]);
    let mut missed = Vec::new();
    let resumed = loop {
        let line = second
            .stdout
            .expect_json("the missed messages and the resume", |m| {
                m["t"] == "N" || m["t"] == "mesa:resumed"
            });
        if line["t"] == "mesa:resumed" {
            break line;
        }
        missed.push(line["d"]["n"].as_u64().expect("numbered"));
    };
    assert_eq!(missed, [3, 4, 5], "each missed message once, in order");
    assert_eq!(resumed["d"]["recovered"], true, "{resumed}");
    assert_eq!(resumed["d"]["offset"].as_u64(), Some(start + 6));
    // The stored copies were taken, not sent: the next line is the next send.
    send(6);
    let next = second
        .stdout
        .expect_json("the next message", |m| m["t"] == "N");
    assert_eq!(next["d"]["n"].as_u64(), Some(6), "{next}");
}

/// `kill -9` of the `mesa serve` a client was on: the client reconnects to the
/// replica that takes its place (a new process on the same address) and gets what
/// was sent to its id and published to its room meanwhile, once, in order in each
/// stream, then both resumes with `"recovered": true`.
#[test]
fn a_client_whose_replica_was_killed_resumes_on_the_next_one() {
    let redis = Redis::start();
    let url = redis.url();
    let cluster = [
        ("MESA_REDIS", url.as_str()),
        ("MESA_RECOVER_ROOMS", "chat:*"),
        ("MESA_RECONNECT_INTERVAL", "100"),
    ];
    let serve = |listen: &str| {
        let args = [
            "serve",
            "--listen",
            listen,
            "--auth",
            "dev",
            "--rooms",
            "authenticated",
            "--recover-users",
        ];
        let server = Mesa::start(&args, &cluster);
        let line = server.stdout.expect("announcing the URL", |l| {
            l.starts_with("mesa listening on ")
        });
        let url = line["mesa listening on ".len()..].to_owned();
        (server, url)
    };
    let (mut first, ws_url) = serve("127.0.0.1:0");
    let addr = ws_url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let client = Mesa::start(
        &[
            "client",
            &ws_url,
            "--token",
            "alice",
            "--subscribe",
            "chat:1",
        ],
        &[],
    );
    // Room messages are numbered even, sends to alice odd.
    let send = |n: u64| {
        let data = json!({ "n": n }).to_string();
        let to = if n % 2 == 0 {
            ["--room", "chat:1"]
        } else {
            ["--to", "alice"]
        };
        report(&dispatch(
            &[
                to[0],
                to[1],
                "--type",
                "N",
                "--data",
                &data,
                "--recover-users",
            ],
            &cluster,
        ))
    };
    let lines = |mesa: &Mesa, done: &dyn Fn(&[Value]) -> bool| {
        let mut seen = Vec::new();
        while !done(&seen) {
            seen.push(mesa.stdout.expect_json("a message or a resume", |m| {
                m["t"] == "N" || m["t"] == "mesa:resumed" || m["t"] == "mesa:subscribed"
            }));
        }
        seen
    };
    let numbers = |seen: &[Value]| -> Vec<u64> {
        seen.iter()
            .filter(|m| m["t"] == "N")
            .filter_map(|m| m["d"]["n"].as_u64())
            .collect()
    };
    client
        .stderr
        .expect("subscribed", |l| l.starts_with("subscribed"));
    for n in 0..4 {
        send(n);
    }
    let live = lines(&client, &|seen| numbers(seen).len() == 4);
    assert_eq!(numbers(&live), [0, 1, 2, 3]);

    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    for n in 4..10 {
        send(n);
    }
    let (_next, _) = serve(&addr);
    let resumed = |seen: &[Value], t: &str| {
        seen.iter()
            .find(|m| m["t"] == t && m["d"]["ref"].is_null() == (t == "mesa:resumed"))
            .map(|m| m["d"]["recovered"].clone())
    };
    let after = lines(&client, &|seen| {
        resumed(seen, "mesa:resumed").is_some()
            && resumed(seen, "mesa:subscribed").is_some()
            && numbers(seen).len() >= 6
    });
    // In order in each stream (a room's and the id's are two).
    let got = numbers(&after);
    let room: Vec<u64> = got.iter().copied().filter(|n| n % 2 == 0).collect();
    let id: Vec<u64> = got.iter().copied().filter(|n| n % 2 == 1).collect();
    assert_eq!((room, id), (vec![4, 6, 8], vec![5, 7, 9]), "{after:?}");
    assert_eq!(
        resumed(&after, "mesa:resumed"),
        Some(json!(true)),
        "{after:?}"
    );
    assert_eq!(
        resumed(&after, "mesa:subscribed"),
        Some(json!(true)),
        "{after:?}"
    );
}
