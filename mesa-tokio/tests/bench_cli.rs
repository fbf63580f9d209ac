//! End-to-end test of `mesa bench`: a real `mesa serve` process measured by real
//! `mesa bench idle` and `mesa bench fanout` processes over loopback. Every wait is
//! bounded, and every child process is killed when its handle drops.
//!
//! Needs the `cli` feature: `cargo test -p mesa-tokio --features cli --test bench_cli`.
#![cfg(unix)]

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

/// `mesa ARGS` with no `MESA_*` variable from the environment.
fn mesa(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesa"));
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
        command.env_remove(key);
    }
    command.args(args).env("RUST_LOG", "warn");
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

/// Start `mesa serve` with dev authentication; return it with its URL and pid.
fn serve() -> (Killed, String) {
    let mut child = mesa(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--auth",
        "dev",
        "--heartbeat-interval",
        "10000",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("mesa serve starts");
    let stdout = lines(child.stdout.take().expect("piped stdout"));
    let server = Killed(child);
    let line = stdout
        .recv_timeout(WAIT)
        .expect("mesa serve announces its URL");
    let url = line
        .strip_prefix("mesa listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line}"))
        .to_owned();
    (server, url)
}

/// Run `mesa bench ARGS` to its end (bounded) and return its JSON line.
fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let mut child = mesa(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mesa bench starts");
    let stdout = lines(child.stdout.take().expect("piped stdout"));
    let stderr = lines(child.stderr.take().expect("piped stderr"));
    let mut child = Killed(child);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for mesa bench") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mesa bench {args:?} still running after {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (drain(&stdout), drain(&stderr));
    assert!(
        status.success(),
        "mesa bench {args:?} failed: {status}\nstdout: {out:#?}\nstderr: {err:#?}"
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
    let (server, url) = serve();
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
