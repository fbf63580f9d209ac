//! A `mesa serve` process of the `mesa` binary built beside the tests, for the
//! trials that kill a replica for real (`SIGKILL`, as `kill -9`): nothing of it
//! runs on, no goodbye to its clients, nothing left in Redis cleaned up.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running `mesa serve`, killed with `SIGKILL` on drop.
pub struct MesaServe {
    child: Child,
    addr: SocketAddr,
}

impl MesaServe {
    /// `mesa serve --listen 127.0.0.1:0 ARGS`, once it announces its URL. No
    /// `MESA_*` variable of the environment reaches it: only ARGS configure it.
    pub fn start(args: &[String]) -> MesaServe {
        let mut command = Command::new(mesa_binary());
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MESA_")) {
            command.env_remove(key);
        }
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the mesa binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        // Read on after the announcement, so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr = line
                    .strip_prefix("mesa listening on ws://")
                    .and_then(|rest| rest.trim_end_matches('/').parse().ok());
                if let Some(addr) = addr {
                    let _ = addr_tx.send(addr);
                }
            }
        });
        let addr = addr_rx.recv_timeout(crate::WAIT).unwrap_or_else(|_| {
            panic!("mesa serve {args:?} announced no URL in {:?}", crate::WAIT)
        });
        MesaServe { child, addr }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MesaServe {
    fn drop(&mut self) {
        // `Child::kill` sends SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
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
