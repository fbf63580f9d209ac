//! Real `redis-server` processes for the cluster tests: each test starts its own on
//! a free port, and can kill and restart it to test faults; one can also serve TLS
//! with a certificate of the tests' own CA. They stop on drop. A [`CuttingProxy`] in
//! front of one plays a network that fails mid-pipeline.
//!
//! The `mesa` binary's tests include this file by path, with `net.rs` and `pki.rs`
//! beside it as `crate::net` and `crate::pki`.
// Each test file uses its own part of this module.
#![allow(dead_code)]

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

use crate::net::free_port;
use crate::pki::{TempDir, TestCa};

/// One `redis-server` on 127.0.0.1, keeping nothing on disk (unless
/// [`persistent`](RedisServer::start_persistent)).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// The directory of the append-only file of a persistent server.
    dir: Option<PathBuf>,
    /// The TLS port of a server [started with TLS](RedisServer::start_tls).
    tls: Option<Tls>,
    /// The port of the primary a [replica](RedisServer::start_replica_of) follows.
    primary: Option<u16>,
    /// The working directory of a server that is not persistent: a replica writes
    /// the data it receives there (`dump.rdb`), which a server started in the same
    /// directory would load.
    scratch: TempDir,
}

/// The TLS side of a [`RedisServer`]: its port, and the files of its certificate.
#[derive(Debug)]
struct Tls {
    port: u16,
    /// The test CA's certificate, what clients trust.
    ca_pem: String,
    /// `ca.crt`, `redis.crt` and `redis.key`.
    files: TempDir,
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers PING.
    pub fn start() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: None,
            tls: None,
            primary: None,
            scratch: TempDir::new(),
        };
        server.restart();
        server
    }

    /// Start a replica of `primary` (`--replicaof`), which Sentinel can promote.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: None,
            tls: None,
            primary: Some(primary.port),
            scratch: TempDir::new(),
        };
        server.restart();
        server
    }

    /// Start a server that also serves TLS (`--tls-port`, no client certificates)
    /// with a certificate for `localhost` and 127.0.0.1 signed by a CA of its own
    /// ([`ca_pem`](Self::ca_pem)); the plain port stays for assertions.
    pub fn start_tls() -> Self {
        let files = TempDir::new();
        let ca = TestCa::new("redis test CA");
        let ca_pem = ca.pem();
        files.file("ca.crt", &ca_pem);
        ca.server(&["localhost", "127.0.0.1"])
            .write(files.path(), "redis");
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: None,
            tls: Some(Tls {
                port: free_port(),
                ca_pem,
                files,
            }),
            primary: None,
            scratch: TempDir::new(),
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
            tls: None,
            primary: None,
            scratch: TempDir::new(),
        };
        server.restart();
        server
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The URL of the TLS port, `rediss://localhost:PORT/` (a server
    /// [started with TLS](Self::start_tls) only).
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}/", self.tls().port)
    }

    /// The PEM certificate of the CA that signed the TLS port's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.tls().ca_pem
    }

    /// The file of [`ca_pem`](Self::ca_pem), for `--redis-ca-cert`.
    pub fn ca_file(&self) -> PathBuf {
        self.tls().files.path().join("ca.crt")
    }

    fn tls(&self) -> &Tls {
        self.tls
            .as_ref()
            .expect("a redis-server started with RedisServer::start_tls")
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

    /// Freeze the server (SIGSTOP): connections stay open but nothing is answered, so
    /// a command hangs instead of failing, like a Redis stuck on a slow disk.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Let a [frozen](Self::freeze) server go on (SIGCONT); it answers what waited.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the redis-server runs");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill {signal} failed: {status}");
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
            None => command
                .args(["--appendonly", "no", "--dir"])
                .arg(self.scratch.path()),
        };
        if let Some(primary) = self.primary {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let Some(tls) = &self.tls {
            let file = |name: &str| tls.files.path().join(name);
            command
                .args(["--tls-port", &tls.port.to_string()])
                .arg("--tls-cert-file")
                .arg(file("redis.crt"))
                .arg("--tls-key-file")
                .arg(file("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.crt"))
                .args(["--tls-auth-clients", "no"]);
        }
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
    /// Blocking, so that scenarios on any runtime can use it.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command_on(self.port, args)
    }

    /// Poll `args` until Redis answers exactly `expected` (raw RESP), for at most 10 s;
    /// blocking, for tests that are not async.
    pub fn wait_reply(&self, args: &[&str], expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = self.command(args);
            if reply.as_deref() == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{args:?} answered {reply:?}, not {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An integer reply (`SISMEMBER`, `HLEN`, `SCARD`, ...); `None` if Redis gave none.
    pub fn integer(&self, args: &[&str]) -> Option<i64> {
        self.command(args)?
            .strip_prefix(':')?
            .trim_end()
            .parse()
            .ok()
    }

    /// Clients subscribed to `channel` (`PUBSUB NUMSUB`): the replicas listening on
    /// a cluster's channel.
    pub fn subscribers(&self, channel: &str) -> usize {
        let reply = self
            .command(&["PUBSUB", "NUMSUB", channel])
            .unwrap_or_default();
        let count = reply.rsplit(':').next().unwrap_or_default().trim_end();
        count.parse().unwrap_or(0)
    }

    /// The messages stored for `id` in the hash `key` (upstream's JSON array text).
    pub fn stored(&self, key: &str, id: &str) -> Vec<serde_json::Value> {
        let reply = self.command(&["HGET", key, id]).unwrap_or_default();
        let text = reply.split_once("\r\n").map_or("", |(_, body)| body);
        serde_json::from_str(text.trim_end()).unwrap_or_default()
    }
}

/// The length of the first complete RESP value at the start of `buf`, if there is one.
/// Send one command in RESP to the server on `port` and return its raw reply.
fn command_on(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    while resp_end(&reply).is_none() {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(n) => reply.extend_from_slice(&buffer[..n]),
        }
    }
    Some(String::from_utf8_lossy(&reply).into_owned())
}

fn resp_end(buf: &[u8]) -> Option<usize> {
    let line = buf.windows(2).position(|w| w == b"\r\n")?;
    let head = std::str::from_utf8(&buf[1..line]).ok()?;
    let after = line + 2;
    match buf.first()? {
        b'+' | b'-' | b':' => Some(after),
        b'$' => match head.parse::<i64>().ok()? {
            len if len < 0 => Some(after),
            len => {
                let end = after + usize::try_from(len).ok()? + 2;
                (buf.len() >= end).then_some(end)
            }
        },
        b'*' => {
            let mut at = after;
            for _ in 0..head.parse::<i64>().ok()?.max(0) {
                at += resp_end(&buf[at..])?;
            }
            Some(at)
        }
        _ => None,
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

/// Three `redis-server --sentinel` processes watching one primary as `mymaster`,
/// quick to fail over (down after 500 ms); they stop on drop.
#[derive(Debug)]
pub struct Sentinels {
    ports: Vec<u16>,
    children: Vec<Child>,
    /// Their configuration files, which Sentinel rewrites.
    dir: TempDir,
}

impl Sentinels {
    /// The name of the master they watch.
    pub const MASTER: &'static str = "mymaster";

    /// Start three sentinels watching `primary`; returns once each knows it.
    pub fn start(primary: &RedisServer) -> Self {
        let dir = TempDir::new();
        let mut sentinels = Sentinels {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for index in 0..3 {
            let port = free_port();
            let config = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\n\
                 sentinel monitor {master} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {master} 500\n\
                 sentinel failover-timeout {master} 2000\n\
                 sentinel parallel-syncs {master} 1\n",
                master = Self::MASTER,
                primary = primary.port(),
            );
            let file = sentinels
                .dir
                .file(&format!("sentinel-{index}.conf"), &config);
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| {
                    panic!("cannot start redis-server --sentinel ({error}): apt-get install redis-server")
                });
            sentinels.ports.push(port);
            sentinels.children.push(child);
        }
        for index in 0..3 {
            sentinels.wait_master(index, primary.port());
        }
        sentinels
    }

    /// The cluster URL of their master: `redis+sentinel://...,.../mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), Self::MASTER)
    }

    /// The port of the master sentinel `index` names now, if it answers.
    pub fn master_port(&self, index: usize) -> Option<u16> {
        let text = self.ask(index, "get-master-addr-by-name")?;
        text.lines()
            .filter(|line| !line.starts_with(['*', '$']))
            .nth(1)?
            .parse()
            .ok()
    }

    /// `SENTINEL <what> mymaster` asked of sentinel `index`: its raw reply.
    fn ask(&self, index: usize, what: &str) -> Option<String> {
        command_on(self.ports[index], &["SENTINEL", what, Self::MASTER])
    }

    /// The flags sentinel `index` gives the replica on `port` of its master
    /// (`slave`, `s_down,slave`, ...), if it knows it.
    pub fn replica_flags(&self, index: usize, port: u16) -> Option<String> {
        let text = self.ask(index, "replicas")?;
        let name = format!("127.0.0.1:{port}");
        // Each replica is a flat list of fields and values, opening with its name;
        // the lines alternate lengths (`$N`) and texts.
        let texts: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with(['*', '$']))
            .collect();
        let at = texts.iter().position(|t| *t == name)?;
        let flags = texts[at..].iter().position(|t| *t == "flags")?;
        texts.get(at + flags + 1).map(|t| (*t).to_owned())
    }

    /// Wait (at most 10 s) until sentinel `index` names the master on `port`.
    pub fn wait_master(&self, index: usize, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.master_port(index) != Some(port) {
            assert!(
                Instant::now() < deadline,
                "sentinel {index} does not name 127.0.0.1:{port} as the master"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
