//! End-to-end test of `mesa-bench`: real `mesa serve` processes measured by real
//! `mesa-bench` processes over loopback, every scenario briefly (idle, fanout, echo,
//! storm, and cluster, offline and rooms on a `redis-server` of their own, rooms routed
//! by interest over two). Every wait is bounded, and every
//! child process is killed when its handle drops.
//!
//! Needs `redis-server` on PATH and the `mesa` binary of `mesa-cli` built beside
//! `mesa-bench` (`cargo test --workspace` builds both; alone:
//! `cargo build -p mesa-cli && cargo test -p mesa-bench`), or its path in `MESA_BIN`.
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

use net::free_port;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single process or expectation may take.
const WAIT: Duration = Duration::from_secs(60);

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `mesa` binary (`mesa-cli`): `MESA_BIN`, or the one built beside `mesa-bench`.
fn mesa_bin() -> std::path::PathBuf {
    let path = std::env::var_os("MESA_BIN").map_or_else(
        || std::path::Path::new(env!("CARGO_BIN_EXE_mesa-bench")).with_file_name("mesa"),
        std::path::PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no `mesa` binary at {}: build it first (`cargo build -p mesa-cli`) or set MESA_BIN",
        path.display()
    );
    path
}

/// `mesa ARGS` (`mesa-bench ARGS` when the first is `bench`) with no `MESA_*` variable
/// from the environment.
fn mesa(args: &[&str]) -> Command {
    let mut command = match args.split_first() {
        Some((&"bench", rest)) => {
            let mut command = Command::new(env!("CARGO_BIN_EXE_mesa-bench"));
            command.args(rest);
            command
        }
        _ => {
            let mut command = Command::new(mesa_bin());
            command.args(args);
            command
        }
    };
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
        command.env_remove(key);
    }
    command.env("RUST_LOG", "warn");
    command
}

/// Read `stream` line by line on a thread.
fn lines(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Every line until the stream ends (bounded: the process has exited).
fn drain(lines: &Receiver<String>) -> Vec<String> {
    let mut all = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        all.push(line);
    }
    all
}

/// The options of every `mesa serve` here: dev authentication, and no inbound rate
/// limit in the way of the echo scenario.
const SERVE: [&str; 8] = [
    "--auth",
    "dev",
    "--heartbeat-interval",
    "10000",
    "--max-messages-per-second",
    "1000000",
    "--max-message-burst",
    "1000000",
];

/// Start `mesa serve` (on a free port, plus `extra` options); return it with its URL.
fn serve(extra: &[&str]) -> (Killed, String) {
    let (server, url, _) = serve_announcing(extra);
    (server, url)
}

/// [`serve`], and the URL of its metrics when `extra` asks for them
/// (`--metrics-listen`, announced before the WebSocket URL).
fn serve_announcing(extra: &[&str]) -> (Killed, String, Option<String>) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(&SERVE);
    args.extend_from_slice(extra);
    let mut child = mesa(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mesa serve starts");
    let stdout = lines(child.stdout.take().expect("piped stdout"));
    let server = Killed(child);
    let mut metrics = None;
    loop {
        let line = stdout
            .recv_timeout(WAIT)
            .expect("mesa serve announces its URL");
        if let Some(url) = line.strip_prefix("mesa metrics on ") {
            metrics = Some(url.to_owned());
        } else if let Some(url) = line.strip_prefix("mesa listening on ") {
            return (server, url.to_owned(), metrics);
        } else {
            panic!("unexpected line {line}");
        }
    }
}

/// Run `mesa-bench ARGS` to its end (bounded) and return its JSON line.
fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let mut child = mesa(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mesa-bench starts");
    let stdout = lines(child.stdout.take().expect("piped stdout"));
    let stderr = lines(child.stderr.take().expect("piped stderr"));
    let mut child = Killed(child);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for mesa-bench") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mesa-bench {args:?} still running after {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (drain(&stdout), drain(&stderr));
    assert!(
        status.success(),
        "mesa-bench {args:?} failed: {status}\nstdout: {out:#?}\nstderr: {err:#?}"
    );
    assert_eq!(
        out.len(),
        2,
        "a human line and a JSON line: {out:#?} {err:#?}"
    );
    serde_json::from_str(&out[1]).expect("the second line is JSON")
}

#[test]
fn idle_and_fanout_report_clean_runs() {
    let (server, url) = serve(&[]);
    let pid = server.0.id().to_string();

    let idle = bench(&[
        "idle",
        "--url",
        &url,
        "--connections",
        "20",
        "--hold-secs",
        "1",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(idle["scenario"], "idle", "{idle}");
    assert_eq!(idle["authenticated"], 20, "{idle}");
    assert_eq!(idle["failed"], 0, "{idle}");
    assert_eq!(idle["dropped"], 0, "{idle}");
    assert!(
        idle["rss_baseline_bytes"].as_u64().is_some_and(|b| b > 0),
        "{idle}"
    );
    assert!(idle["bytes_per_conn"].is_number(), "{idle}");

    let fanout = bench(&[
        "fanout",
        "--url",
        &url,
        "--connections",
        "20",
        "--messages",
        "50",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(fanout["scenario"], "fanout", "{fanout}");
    assert_eq!(fanout["failed"], 0, "{fanout}");
    assert_eq!(fanout["published"], 50, "{fanout}");
    // 20 subscribers and the publisher itself receive every message.
    assert_eq!(fanout["expected"], 21 * 50, "{fanout}");
    assert_eq!(fanout["received"], 21 * 50, "{fanout}");
    assert_eq!(fanout["lost"], 0, "{fanout}");
    assert_eq!(fanout["duplicated"], 0, "{fanout}");
    assert!(
        fanout["deliveries_per_sec"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "{fanout}"
    );
    assert!(fanout["latency_p50_us"].is_u64(), "{fanout}");
    assert!(fanout["latency_p99_us"].is_u64(), "{fanout}");
    assert!(fanout["server_cpu_secs"].is_number(), "{fanout}");
}

#[test]
fn echo_reports_round_trips() {
    let (server, url) = serve(&[]);
    let pid = server.0.id().to_string();
    let echo = bench(&[
        "echo",
        "--url",
        &url,
        "--connections",
        "5",
        "--in-flight",
        "2",
        "--secs",
        "1",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(echo["scenario"], "echo", "{echo}");
    assert_eq!(echo["authenticated"], 5, "{echo}");
    assert_eq!(echo["dropped"], 0, "{echo}");
    assert!(
        echo["round_trips"].as_u64().is_some_and(|n| n > 0),
        "{echo}"
    );
    assert!(echo["latency_p99_us"].is_u64(), "{echo}");
    assert!(echo["server_cpu_secs"].is_number(), "{echo}");
}

/// Run `mesa-bench storm` (20 clients, `BENCH` options) against `mesa serve SERVE`
/// on a free port of `host` (`ws://` or, with `tls`, `wss://`), and check that every
/// client came back.
fn storm(host: &str, tls: bool, serve: &[&str], bench_options: &[&str]) {
    let port = free_port();
    let mut command = format!(
        "{} serve --listen 127.0.0.1:{port} --reconnect-interval 200",
        mesa_bin().display()
    );
    for option in SERVE.iter().chain(serve) {
        command.push(' ');
        command.push_str(option);
    }
    let url = format!("{}://{host}:{port}/", if tls { "wss" } else { "ws" });
    let mut args = vec![
        "storm",
        "--url",
        &url,
        "--connections",
        "20",
        "--hold-secs",
        "0",
        "--timeout-secs",
        "20",
        "--server-cmd",
        &command,
    ];
    args.extend_from_slice(bench_options);
    let storm = bench(&args);
    assert_eq!(storm["scenario"], "storm", "{storm}");
    assert_eq!(storm["authenticated"], 20, "{storm}");
    assert_eq!(storm["back"], 20, "{storm}");
    assert_eq!(storm["reconnects"].as_u64(), Some(20), "{storm}");
    assert_eq!(storm["recovered_within_twice_cap"], true, "{storm}");
    assert!(storm["peak_window_share"].is_number(), "{storm}");
    assert!(storm["server_cpu_secs"].is_number(), "{storm}");
}

#[test]
fn storm_restarts_the_server_and_every_client_comes_back() {
    storm("127.0.0.1", false, &[], &[]);
}

#[test]
fn storm_over_tls_trusts_its_ca_cert() {
    let dir = pki::TempDir::new();
    let ca = pki::TestCa::new("bench test CA");
    let ca_file = dir.file("ca.crt", &ca.pem());
    let (cert, key) = ca.server(&["localhost"]).write(dir.path(), "server");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    storm(
        "localhost",
        true,
        &["--tls-cert", cert, "--tls-key", key],
        &["--ca-cert", ca_file.to_str().unwrap()],
    );
}

#[test]
fn cluster_publishes_once_per_message() {
    let redis = redis_server::RedisServer::start();
    let redis_url = redis.url();
    let (a, url_a) = serve(&["--redis", &redis_url]);
    let (b, url_b) = serve(&["--redis", &redis_url]);
    let (pid_a, pid_b) = (a.0.id().to_string(), b.0.id().to_string());
    let cluster = bench(&[
        "cluster",
        "--url",
        &url_a,
        "--url",
        &url_b,
        "--server-pid",
        &pid_a,
        "--server-pid",
        &pid_b,
        "--redis",
        &redis_url,
        "--connections",
        "20",
        "--messages",
        "20",
    ]);
    assert_eq!(cluster["scenario"], "cluster", "{cluster}");
    assert_eq!(cluster["authenticated"], 20, "{cluster}");
    // 20 subscribers over both replicas and the publisher receive every message.
    assert_eq!(cluster["received"], 21 * 20, "{cluster}");
    assert_eq!(cluster["lost"], 0, "{cluster}");
    assert_eq!(cluster["redis_publish_calls"], 20, "{cluster}");
    assert_eq!(cluster["publish_per_send"], 1.0, "{cluster}");
    drop((a, b, redis));
}

#[test]
fn offline_stores_a_copy_for_every_id() {
    let redis = redis_server::RedisServer::start();
    let redis_url = redis.url();
    let offline = bench(&[
        "offline",
        "--redis",
        &redis_url,
        "--recipients",
        "2500",
        "--message-bytes",
        "100",
        "--bystanders",
        "5",
        "--baseline-secs",
        "1",
        "--timeout-secs",
        "30",
    ]);
    assert_eq!(offline["scenario"], "offline", "{offline}");
    assert_eq!(offline["stored"], 2500, "{offline}");
    assert_eq!(offline["stored_reported"], 2500, "{offline}");
    assert_eq!(offline["complete"], true, "{offline}");
    assert_eq!(offline["sample_ok"], true, "{offline}");
    assert_eq!(offline["dropped"], 0, "{offline}");
    assert!(offline["rss_growth_bytes"].is_u64(), "{offline}");
    assert!(offline["baseline_p99_us"].is_u64(), "{offline}");
    drop(redis);
}

/// Three replicas of `mesa serve --redis REDIS --rooms open` (plus `extra`) with their
/// metrics, and the options of a tiny `mesa-bench rooms` over them: 30 connections in
/// 18 rooms of 5 members, 180 messages.
fn rooms_cluster(redis: &str, extra: &[&str]) -> (Vec<Killed>, Vec<String>) {
    let mut replicas = Vec::new();
    let mut args = vec!["rooms".to_owned(), "--redis".to_owned(), redis.to_owned()];
    for _ in 0..3 {
        let mut options = vec!["--redis", redis, "--rooms", "open"];
        options.extend(["--metrics-listen", "127.0.0.1:0"]);
        options.extend_from_slice(extra);
        let (server, url, metrics) = serve_announcing(&options);
        let metrics = metrics.expect("metrics announced");
        let pid = server.0.id().to_string();
        args.extend(["--url".to_owned(), url, "--metrics".to_owned(), metrics]);
        args.extend(["--server-pid".to_owned(), pid]);
        replicas.push(server);
    }
    for option in [
        "--connections",
        "30",
        "--rooms",
        "18",
        "--members",
        "5",
        "--messages",
        "180",
        "--rate",
        "600",
        "--settle-secs",
        "0",
        "--setup-timeout-secs",
        "20",
        "--timeout-secs",
        "20",
    ] {
        args.push(option.to_owned());
    }
    (replicas, args)
}

#[test]
fn rooms_reports_unneeded_shares_for_rooms_and_for_ids() {
    let redis = redis_server::RedisServer::start();
    let (replicas, args) = rooms_cluster(&redis.url(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for (send, via) in [
        ("rooms", "dispatcher"),
        ("ids", "dispatcher"),
        ("rooms", "replicas"),
    ] {
        let mut with_send = args.clone();
        with_send.extend(["--send", send, "--via", via]);
        let rooms = bench(&with_send);
        assert_eq!(rooms["scenario"], "rooms", "{rooms}");
        assert_eq!(rooms["send"], send, "{rooms}");
        assert_eq!(rooms["via"], via, "{rooms}");
        assert_eq!(rooms["authenticated"], 30, "{rooms}");
        assert_eq!(rooms["dropped"], 0, "{rooms}");
        // 18 rooms with members on 1, 2 and 3 replicas, six of each.
        assert_eq!(
            rooms["rooms_by_spread"],
            serde_json::json!([6, 6, 6]),
            "{rooms}"
        );
        assert_eq!(rooms["publish_failed"], 0, "{rooms}");
        assert_eq!(rooms["expected"], 180 * 5, "{rooms}");
        assert_eq!(rooms["received"], 180 * 5, "{rooms}");
        assert_eq!(rooms["duplicated"], 0, "{rooms}");
        assert!(
            rooms["deliveries_per_server_cpu_sec"].is_number(),
            "{rooms}"
        );
        assert!(rooms["latency_p99_us"].is_u64(), "{rooms}");
        let shares = rooms["unneeded_share"].as_array().expect("one per replica");
        assert_eq!(shares.len(), 3, "{rooms}");
        // Each message's room misses 2, 1 or 0 of the 3 replicas: a third of the
        // shared channel is for nobody on a replica, on average.
        let predicted = rooms["shared_channel_unneeded_share"]
            .as_array()
            .expect("one per replica");
        assert!(
            predicted
                .iter()
                .all(|s| (s.as_f64().unwrap() - 1.0 / 3.0).abs() < 0.01),
            "{rooms}"
        );
        if via == "replicas" {
            // A replica gets back from Redis the room messages its own client
            // published, and its members get them from there: nothing unneeded
            // once Redis confirmed its subscriptions (before, its members get them
            // at once and the echo is skipped: at most the first few).
            assert_eq!(rooms["subscribed"], 90, "{rooms}");
            assert!(
                rooms["unneeded_share_max"]
                    .as_f64()
                    .is_some_and(|s| s < 0.05),
                "{rooms}"
            );
        } else if send == "rooms" {
            assert_eq!(rooms["subscribed"], 90, "{rooms}");
            // The replicas' gauge is told after their lock is released, so it may lag.
            assert!(rooms["server_memberships"].is_number(), "{rooms}");
            assert_eq!(rooms["unneeded_share_max"], 0.0, "{rooms}");
            assert!(rooms["bytes_per_membership"].is_number(), "{rooms}");
        } else {
            assert_eq!(rooms["subscribed"], 0, "{rooms}");
            // Every replica reads every envelope of the shared channel.
            assert!(
                rooms["cluster_received"]
                    .as_array()
                    .expect("one per replica")
                    .iter()
                    .all(|n| n == 180.0),
                "{rooms}"
            );
            assert_eq!(
                rooms["unneeded_share"], rooms["shared_channel_unneeded_share"],
                "{rooms}"
            );
        }
    }
    drop((replicas, redis));
}

#[test]
fn rooms_routes_ids_by_interest_over_two_redis_instances() {
    let (a, b) = (
        redis_server::RedisServer::start(),
        redis_server::RedisServer::start(),
    );
    let redis = format!("{},{}", a.url(), b.url());
    let (replicas, args) = rooms_cluster(&redis, &["--legacy-bus", "off"]);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--send", "ids", "--legacy-bus", "off"]);
    let rooms = bench(&args);
    assert_eq!(rooms["legacy_bus"], false, "{rooms}");
    assert_eq!(rooms["redis_instances"], 2, "{rooms}");
    assert_eq!(rooms["publish_failed"], 0, "{rooms}");
    assert_eq!(rooms["received"], 180 * 5, "{rooms}");
    // Each send reaches only the replicas holding its ids.
    assert_eq!(rooms["unneeded_share_max"], 0.0, "{rooms}");
    // At least one ROUTE script per send, on the instance of its ids.
    assert!(
        rooms["redis_scripts_per_send"]
            .as_f64()
            .is_some_and(|n| n >= 1.0),
        "{rooms}"
    );
    assert!(rooms["redis_commands_per_send"].is_number(), "{rooms}");
    let each = rooms["redis_cpu_secs_each"]
        .as_array()
        .expect("one per instance");
    assert_eq!(each.len(), 2, "{rooms}");
    drop((replicas, a, b));
}
