//! Node peers: the scripts of `tests/node`, spawned with tokio and driven over their
//! JSON line protocol.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use crate::WAIT;

/// How much of a peer's stderr is kept for failure reports (the tail).
const STDERR_KEPT: usize = 16 * 1024;
/// How many recent events a failure report shows.
const EVENTS_SHOWN: usize = 30;

/// `tests/node`, where the Node scripts and their `node_modules` live.
pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// Check once that `node` runs and that `tests/node/node_modules` holds the published
/// packages; panic with what to do otherwise. Returns `node --version`.
pub fn require_node() -> &'static str {
    static CHECKED: OnceLock<Result<String, String>> = OnceLock::new();
    match CHECKED.get_or_init(check_node) {
        Ok(version) => version,
        Err(problem) => panic!("the interop tests cannot run: {problem}"),
    }
}

fn check_node() -> Result<String, String> {
    let output = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("`node` could not be started ({e}); install Node.js 18 or later on PATH")
        })?;
    if !output.status.success() {
        return Err(format!("`node --version` failed with {}", output.status));
    }
    let modules = node_dir().join("node_modules");
    for package in ["@cryb/mesa", "mesa-js-client", "ws"] {
        if !modules.join(package).join("package.json").is_file() {
            return Err(format!(
                "{} has no `{package}`: run `npm ci --prefix tests/node`",
                modules.display()
            ));
        }
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Which upstream client a [`NodePeer::client`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// `@cryb/mesa`'s Node `Client` (`client.js`).
    Node,
    /// The browser client `mesa-js-client` on `ws` (`browser-client.js`).
    Browser,
}

impl ClientKind {
    /// The script that drives this client.
    pub fn script(self) -> &'static str {
        match self {
            ClientKind::Node => "client.js",
            ClientKind::Browser => "browser-client.js",
        }
    }
}

/// One Node process running a script of `tests/node`.
///
/// Its stdout events (one JSON object per line) are collected as they come; the
/// `expect*` methods wait for one that matches and leave the others for later waits.
/// The process is killed when the peer is dropped.
pub struct NodePeer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Events received and not yet taken by an `expect`.
    pending: VecDeque<Value>,
    /// Every event received, in order.
    history: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl std::fmt::Debug for NodePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePeer")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl NodePeer {
    /// Run `node <script> <args>` in `tests/node` with extra environment `env`; `name`
    /// labels it in failure reports. Must be called inside a tokio runtime.
    pub fn spawn(name: &str, script: &str, args: &[&str], env: &[(&str, &str)]) -> NodePeer {
        require_node();
        let dir = node_dir();
        let mut command = Command::new("node");
        command
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot spawn `node {script}`: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");

        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let event = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| json!({"event": "unparsed", "line": line}));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr_pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let mut kept = sink.lock().unwrap_or_else(|p| p.into_inner());
                kept.push_str(&line);
                kept.push('\n');
                if kept.len() > 2 * STDERR_KEPT {
                    let mut cut = kept.len() - STDERR_KEPT;
                    while !kept.is_char_boundary(cut) {
                        cut += 1;
                    }
                    kept.drain(..cut);
                }
            }
        });
        NodePeer {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            pending: VecDeque::new(),
            history: Vec::new(),
            stderr,
        }
    }

    /// Start `server.js` (the published `@cryb/mesa` server) on 127.0.0.1:`port` (0 =
    /// any) with these server options, and wait until it listens. A port still in
    /// use (a server that was just killed) is tried again until [`WAIT`] passes.
    /// Returns the peer and its port.
    pub async fn server(name: &str, port: u16, options: &Value) -> (NodePeer, u16) {
        let deadline = Instant::now() + WAIT;
        let (port_arg, options_arg) = (port.to_string(), options.to_string());
        loop {
            let mut server = NodePeer::spawn(
                name,
                "server.js",
                &[&port_arg, &options_arg],
                &[("HOST", "127.0.0.1")],
            );
            let event = server
                .expect(
                    "`listening` (or EADDRINUSE)",
                    |e| e["event"] == "listening" || e["code"] == "EADDRINUSE",
                    deadline.saturating_duration_since(Instant::now()),
                )
                .await;
            if event["event"] == "listening" {
                let port = event["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                let port = port.unwrap_or_else(|| panic!("{name}: bad listening event {event}"));
                return (server, port);
            }
            if Instant::now() >= deadline {
                panic!("{name}: port {port} stayed in use\n{}", server.report());
            }
            drop(server);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Start an upstream client of `kind` connecting to `url` (`ws://host:port`).
    /// It connects by itself; wait for its `connected` event before sending commands
    /// (upstream loses sends queued before the socket opens).
    pub fn client(name: &str, kind: ClientKind, url: &str) -> NodePeer {
        NodePeer::spawn(name, kind.script(), &[url], &[])
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Write one command (a JSON object with `cmd`) as a line on the peer's stdin.
    pub async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        let written = match self.stdin.as_mut() {
            Some(stdin) => match stdin.write_all(line.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            },
            None => Err(std::io::Error::other("stdin already closed")),
        };
        if let Err(error) = written {
            self.fail(&format!("cannot write command {command}: {error}"));
        }
    }

    /// `{"cmd":"authenticate","data":{"token":token}}` for an upstream client.
    pub async fn authenticate(&mut self, token: &str) {
        self.send(json!({"cmd": "authenticate", "data": {"token": token}}))
            .await;
    }

    /// `{"cmd":"send","op":0,"t":t,"d":d}` for an upstream client.
    pub async fn dispatch(&mut self, t: &str, d: Value) {
        self.send(json!({"cmd": "send", "op": 0, "t": t, "d": d}))
            .await;
    }

    /// Wait up to `timeout` for an event matching `pred` and take it; other events
    /// stay for later waits. Panics, with the peer's recent events and stderr, when
    /// the time passes, when the peer exits first, or when it reports a `crash`.
    pub async fn expect(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        self.poll();
        if let Some(index) = self.pending.iter().position(&mut pred) {
            return self.pending.remove(index).expect("index in range");
        }
        loop {
            if let Some(crash) = self.pending.iter().find(|e| e["event"] == "crash").cloned() {
                self.fail(&format!("crashed while we waited for {what}: {crash}"));
            }
            match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(event)) => {
                    self.history.push(event.clone());
                    if pred(&event) {
                        return event;
                    }
                    self.pending.push_back(event);
                }
                Ok(None) => {
                    // Give the exit status a moment to be known, for the report.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), self.child.wait()).await;
                    self.fail(&format!("exited while we waited for {what}"));
                }
                Err(_) => self.fail(&format!("no {what} within {timeout:?}")),
            }
        }
    }

    /// Wait up to [`WAIT`] for the next event named `event` and take it.
    pub async fn expect_event(&mut self, event: &str) -> Value {
        self.expect(&format!("`{event}` event"), |e| e["event"] == event, WAIT)
            .await
    }

    /// Wait up to [`WAIT`] for a `message` event of type `t` whose `d` is `d`.
    pub async fn expect_message(&mut self, t: &str, d: &Value) -> Value {
        self.expect(
            &format!("message {t} {d}"),
            |e| e["event"] == "message" && e["t"] == t && e["d"] == *d,
            WAIT,
        )
        .await
    }

    /// Move every event that has arrived into the pending list and the history.
    pub fn poll(&mut self) {
        while let Ok(event) = self.lines.try_recv() {
            self.history.push(event.clone());
            self.pending.push_back(event);
        }
    }

    /// Every event received so far, taken or not.
    pub fn history(&mut self) -> &[Value] {
        self.poll();
        &self.history
    }

    /// How many events received so far match `pred`.
    pub fn count(&mut self, pred: impl FnMut(&&Value) -> bool) -> usize {
        self.history().iter().filter(pred).count()
    }

    /// Panic (with a report) if any event received so far matches `pred`.
    pub fn assert_none(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) {
        let found = self.history().iter().find(|e| pred(e)).cloned();
        if let Some(event) = found {
            self.fail(&format!("unexpected {what}: {event}"));
        }
    }

    /// Kill the process (SIGKILL) and wait until it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(WAIT, self.child.wait()).await.is_err() {
            panic!("{}: still running after SIGKILL", self.name);
        }
    }

    /// Close the peer's stdin (EOF makes every script exit) and wait up to [`WAIT`]
    /// for it to exit.
    pub async fn close(&mut self) -> ExitStatus {
        self.stdin = None;
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => panic!("{}: cannot wait for exit: {error}", self.name),
            Err(_) => self.fail("still running after EOF on stdin"),
        }
    }

    /// What the peer wrote on stderr (the tail).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Panic with `problem` and a [`report`](Self::report).
    pub fn fail(&mut self, problem: &str) -> ! {
        let report = self.report();
        panic!("{}: {problem}\n{report}", self.name)
    }

    /// A failure report: exit status, recent events (heartbeats counted, not shown)
    /// and the tail of stderr.
    pub fn report(&mut self) -> String {
        self.poll();
        let mut report = String::new();
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".to_owned(),
            Err(error) => format!("unknown ({error})"),
        };
        let _ = writeln!(
            report,
            "--- {} (pid {:?}): {status}",
            self.name,
            self.child.id()
        );
        let noisy = |e: &Value| e["event"] == "heartbeat" || e["event"] == "heartbeat_ack";
        let beats = self.history.iter().filter(|e| noisy(e)).count();
        let shown: Vec<&Value> = self.history.iter().filter(|e| !noisy(e)).collect();
        let _ = writeln!(
            report,
            "--- {} events ({beats} heartbeats not shown), the last {}:",
            self.history.len(),
            shown.len().min(EVENTS_SHOWN)
        );
        for event in &shown[shown.len().saturating_sub(EVENTS_SHOWN)..] {
            let _ = writeln!(report, "    {event}");
        }
        let _ = writeln!(report, "--- stderr:\n{}", self.stderr());
        report
    }
}
