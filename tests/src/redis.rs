//! Real `redis-server` processes for the cluster tests: each test starts its own on
//! a free port, and can kill and restart it to test faults. They stop on drop. A
//! [`CuttingProxy`] in front of one plays a network that fails mid-pipeline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream as TokioStream};
use tokio::sync::watch;

use crate::node::free_port;

/// One `redis-server` on 127.0.0.1, keeping nothing on disk (unless
/// [`persistent`](RedisServer::start_persistent)).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// The directory of the append-only file of a persistent server.
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers PING.
    pub fn start() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: None,
        };
        server.restart();
        server
    }

    /// Start a server that keeps its data in an append-only file, fsync'd on every
    /// write: killed and restarted, it comes back with everything it acknowledged,
    /// like a production Redis with persistence.
    pub fn start_persistent() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("mesa-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the append-only file");
        let mut server = RedisServer {
            port,
            child: None,
            dir: Some(dir),
        };
        server.restart();
        server
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client connection for assertions, patient enough for a loaded machine (a
    /// busy Redis may take seconds to answer while replicas run their scripts).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let settings = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        redis::Client::open(self.url())
            .expect("a valid Redis URL")
            .get_multiplexed_async_connection_with_config(&settings)
            .await
            .expect("a connection to the test's redis-server")
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kill the server at once (SIGKILL), like a crash: its data is gone, unless it
    /// is persistent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"]);
        match &self.dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            None => command.args(["--appendonly", "no"]),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}); the cluster tests need it: \
                     apt-get install redis-server"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .command(&["PING"])
                .is_some_and(|reply| reply.starts_with("+PONG"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    /// Send one command in RESP and return the raw reply (for assertions on the data).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buffer = [0u8; 64 * 1024];
        // Read until the reply looks complete (a short pause with nothing more).
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .ok()?;
        let started = Instant::now();
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buffer[..n]),
                Err(_) if !reply.is_empty() => break,
                Err(_) if started.elapsed() > Duration::from_secs(5) => return None,
                Err(_) => {}
            }
        }
        Some(String::from_utf8_lossy(&reply).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A TCP proxy in front of a [`RedisServer`] that can cut the link while a client's
/// commands are on their way, as a network failing in the middle of a pipeline: after
/// [`cut_at_next_command`](Self::cut_at_next_command), the next bytes any client sends
/// are dropped (Redis never sees those commands) and every connection open then is
/// closed (the client sees its connection end). Later connections pass. Runs on the
/// test's tokio runtime.
#[derive(Debug)]
pub struct CuttingProxy {
    port: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<watch::Sender<u64>>,
}

impl CuttingProxy {
    /// Listen on a free port, forwarding every connection to `target`'s port.
    pub async fn start(target: &RedisServer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(watch::channel(0).0);
        let upstream = target.port();
        let (trap, cutter) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, upstream, trap.clone(), cutter.clone()));
            }
        });
        CuttingProxy { port, armed, cuts }
    }

    /// The proxy's URL, for the client under test.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Cut at the next bytes a client sends (see the type).
    pub fn cut_at_next_command(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many cuts happened.
    pub fn cuts(&self) -> u64 {
        *self.cuts.borrow()
    }
}

/// Carry one connection between `client` and Redis on `upstream` until either side
/// closes, or a cut: this connection's (when `armed` at its next bytes), or another's.
async fn forward(
    client: TokioStream,
    upstream: u16,
    armed: Arc<AtomicBool>,
    cuts: Arc<watch::Sender<u64>>,
) {
    let Ok(server) = TokioStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let mut cut = cuts.subscribe();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            _ = cut.changed() => return,
            read = client_read.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) if armed.swap(false, Ordering::SeqCst) => {
                    cuts.send_modify(|count| *count += 1);
                    return;
                }
                Ok(n) => {
                    if server_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            read = server_read.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if client_write.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}
