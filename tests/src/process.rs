//! A `mesa serve` process of the `mesa` binary built beside the tests, for the
//! trials that kill a replica for real (`SIGKILL`, as `kill -9`): nothing of it
//! runs on, no goodbye to its clients, nothing left in Redis cleaned up.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};

/// A `mesa serve` process, killed with `SIGKILL` on drop, and the lines it writes
/// on stdout (read on all its life, so the pipe never fills). No `MESA_*` variable
/// of the environment, nor `RUST_LOG`, reaches it: only its arguments configure it.
/// The CLI's own tests use it too (`mesa-cli/tests/metrics.rs`).
pub struct ServeProcess {
    child: Child,
    /// Its stdout, a line at a time.
    pub lines: Receiver<String>,
}

impl ServeProcess {
    /// Start `binary serve ARGS`.
    pub fn spawn(binary: &Path, args: &[&str]) -> ServeProcess {
        let mut command = Command::new(binary);
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
            command.env_remove(key);
        }
        let mut child = command
            .arg("serve")
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the mesa binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ServeProcess { child, lines }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        // `Child::kill` sends SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `mesa serve` of the build the tests run in, killed with `SIGKILL` on
/// drop.
pub struct MesaServe {
    _process: ServeProcess,
    addr: SocketAddr,
}

impl MesaServe {
    /// `mesa serve --listen 127.0.0.1:0 ARGS`, once it announces its URL.
    pub fn start(args: &[String]) -> MesaServe {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend(args.iter().map(String::as_str));
        let process = ServeProcess::spawn(&mesa_binary(), &all);
        let deadline = std::time::Instant::now() + crate::WAIT;
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = process.lines.recv_timeout(left) else {
                panic!("mesa serve {args:?} announced no URL in {:?}", crate::WAIT)
            };
            let addr = line
                .strip_prefix("mesa listening on ws://")
                .and_then(|rest| rest.trim_end_matches('/').parse().ok());
            if let Some(addr) = addr {
                break addr;
            }
        };
        MesaServe {
            _process: process,
            addr,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The `mesa` binary of the build the tests run in (`target/<profile>/mesa`), or
/// `MESA_BIN`.
fn mesa_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESA_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/mesa
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("mesa"))
        .expect("the test binary is in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p mesa-cli`, with --release for a \
         release test binary), or name it with MESA_BIN",
        path.display()
    );
    path
}
