//! `mesa-bench storm`: C clients of the `mesa_tokio` client library (reconnection
//! with jittered exponential backoff, re-authentication) are connected to a server the
//! generator started itself (`--server-cmd`); the server is killed (SIGKILL) and
//! started again at once. Reported: how long until every client is authenticated
//! again, and the largest share of the reconnections that fell in one 100 ms window
//! (without jitter, nearly all would).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use mesa_tokio::mesa_driver::{self, ClientEvents, Runtime};
use mesa_tokio::{ClientEvent, Tokio};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::{
    Probe, Target, cpu_secs, emit, exit_code, human_secs, print_errors, round3, socket_for,
};
use crate::Failure;

/// The width of the windows in which reconnections are counted.
const WINDOW: Duration = Duration::from_millis(100);

/// How long a started server gets until it accepts connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the clients get to leave at the end before the server is stopped.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The client library's default backoff cap (`BackoffConfig::default().cap`).
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Options of `mesa-bench storm`.
#[derive(Debug, clap::Args)]
pub(super) struct StormArgs {
    /// The URL the server listens on, `ws://host:port/path` or `wss://...` (a fixed
    /// port: the restarted server must listen on it again).
    #[arg(long)]
    url: String,

    /// Also trust the certificates of this PEM file for a `wss://` URL (a test CA).
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,

    /// How many clients; client `i` authenticates as `u<i>`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// The command that starts the server (run with `sh -c 'exec CMD'`, so that its
    /// pid is the server's); it is started, killed with SIGKILL, and started again.
    #[arg(long)]
    server_cmd: String,

    /// Clients being set up at once (connect, handshake, authentication).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// Seconds all clients together get to connect and authenticate.
    #[arg(long, default_value_t = 300)]
    setup_timeout_secs: u64,

    /// Seconds to hold the connections before the server is killed.
    #[arg(long, default_value_t = 1)]
    hold_secs: u64,

    /// Seconds the clients get to come back after the kill.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// The tokio runtime, except that connections are spread over the loopback source
/// addresses (10,000 clients of one server would otherwise strain one address's
/// ephemeral ports, reconnections included).
#[derive(Debug, Clone, Default)]
struct Spread {
    /// The index of the next connection.
    next: Arc<AtomicU32>,
}

impl Runtime for Spread {
    type TcpStream = Compat<TcpStream>;
    type TcpListener = TcpListener;
    type Sleep = tokio::time::Sleep;

    fn now(&self) -> std::time::Instant {
        Tokio.now()
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Self::Sleep {
        Tokio.sleep_until(deadline)
    }

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Tokio.spawn(future);
    }

    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<TcpListener>> + Send {
        Tokio.bind(addr)
    }

    fn local_addr(&self, listener: &TcpListener) -> io::Result<SocketAddr> {
        Tokio.local_addr(listener)
    }

    fn accept(
        &self,
        listener: &TcpListener,
    ) -> impl Future<Output = io::Result<(Compat<TcpStream>, SocketAddr)>> + Send {
        Tokio.accept(listener)
    }

    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Compat<TcpStream>>> + Send {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let addr = addr.to_owned();
        async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr.as_str()).await?.collect();
            let addr = addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or_else(|| addrs.first())
                .copied()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let spread = addr.is_ipv4() && addr.ip().is_loopback();
            let stream = socket_for(addr, index, spread)?.connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream.compat())
        }
    }
}

/// The server process the generator runs.
struct Server {
    /// The command line, for `sh -c 'exec ...'`.
    command: String,
    /// The running process.
    child: Child,
}

impl Server {
    /// Start the server and wait until `addr` accepts connections.
    async fn start(command: &str, addr: SocketAddr) -> Result<Self, Failure> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot start `{command}`: {error}"))?;
        let mut server = Server {
            command: command.to_owned(),
            child,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("the server `{command}` exited: {status}").into());
            }
            if let Ok(Ok(_)) = timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                server.kill();
                return Err(format!("the server `{command}` did not listen on {addr}").into());
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// The process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill it (SIGKILL) and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            tracing::debug!(command = %self.command, "stopping the server");
            self.kill();
        }
    }
}

/// Times (microseconds since the kill) of what one client saw after the kill.
#[derive(Default)]
struct Seen {
    /// Transports opened by automatic reconnection.
    reconnected: Vec<u64>,
    /// Authentications completed.
    authenticated: Vec<u64>,
    /// Disconnections: the kill's, and every failed attempt.
    disconnected: u64,
}

/// What the client watchers share.
struct Shared {
    /// The clock of the run.
    epoch: Instant,
    /// When the server was killed, in microseconds since the epoch (`u64::MAX` before).
    killed_at: AtomicU64,
    /// Clients authenticated again since the kill.
    back: AtomicU64,
}

impl Shared {
    /// Microseconds since the kill, or `None` before it.
    fn since_kill(&self) -> Option<u64> {
        let killed = self.killed_at.load(Ordering::SeqCst);
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        (killed != u64::MAX).then(|| now.saturating_sub(killed))
    }
}

/// Read a client's events until it stops, noting what happened after the kill.
async fn watch(mut events: ClientEvents, shared: Arc<Shared>) -> Seen {
    let mut seen = Seen::default();
    let mut back = false;
    while let Some(event) = events.next().await {
        let Some(at) = shared.since_kill() else {
            continue;
        };
        match event {
            ClientEvent::Connected { .. } => seen.reconnected.push(at),
            ClientEvent::Authenticated { .. } => {
                seen.authenticated.push(at);
                if !back {
                    back = true;
                    shared.back.fetch_add(1, Ordering::SeqCst);
                }
            }
            ClientEvent::Disconnected { .. } => seen.disconnected += 1,
            _ => {}
        }
    }
    seen
}

/// Run `mesa-bench storm`.
pub(super) async fn run(args: StormArgs) -> Result<ExitCode, Failure> {
    let target = Target::resolve(&args.url, args.ca_cert.as_deref()).await?;
    let mut server = Server::start(&args.server_cmd, target.addr).await?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        killed_at: AtomicU64::new(u64::MAX),
        back: AtomicU64::new(0),
    });

    // Setup: every client connects and authenticates, a bounded number at once.
    let setup_started = Instant::now();
    let runtime = Spread::default();
    let permits = Arc::new(Semaphore::new(args.concurrency as usize));
    let mut setups = JoinSet::new();
    let mut watchers = JoinSet::new();
    for index in 0..args.connections {
        let mut builder =
            mesa_driver::client(runtime.clone(), args.url.clone()).auto_connect(false);
        // One configuration for every client: the roots are parsed once.
        if let Some((config, _)) = &target.tls {
            builder = builder.tls_config(config.clone());
        }
        let (client, events) = match builder.build() {
            Ok(built) => built,
            Err(error) => return Err(Failure::usage(format!("invalid --url: {error}"))),
        };
        watchers.spawn(watch(events, shared.clone()));
        let permits = permits.clone();
        setups.spawn(async move {
            let Ok(_permit) = permits.acquire().await else {
                return (client, Err("stopped".to_owned()));
            };
            let credentials = json!({"token": format!("u{index}")});
            let authenticated = async {
                client.connect().await.map_err(|e| e.to_string())?;
                client
                    .authenticate(credentials, false)
                    .await
                    .map_err(|e| e.to_string())
            };
            let outcome = match timeout(Duration::from_secs(30), authenticated).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_) => Err("timed out connecting and authenticating".to_owned()),
            };
            (client, outcome)
        });
    }
    let mut clients = Vec::with_capacity(args.connections as usize);
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut ok = 0_u64;
    let setup_deadline = setup_started + Duration::from_secs(args.setup_timeout_secs);
    while let Ok(Some(joined)) = tokio::time::timeout_at(setup_deadline, setups.join_next()).await {
        let Ok((client, outcome)) = joined else {
            continue;
        };
        match outcome {
            Ok(()) => ok += 1,
            Err(error) => *errors.entry(error).or_default() += 1,
        }
        clients.push(client);
    }
    setups.abort_all();
    print_errors(errors);
    let setup_secs = setup_started.elapsed().as_secs_f64();
    sleep(Duration::from_secs(args.hold_secs)).await;

    // The storm: kill, start again at once, wait for every client to be back.
    let first_pid = server.pid();
    let killed_at = u64::try_from(shared.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared.killed_at.store(killed_at, Ordering::SeqCst);
    server.kill();
    drop(server);
    let mut server = Server::start(&args.server_cmd, target.addr).await?;
    let restart_secs = shared.since_kill().unwrap_or_default() as f64 / 1e6;
    let probe = Probe::new(&[server.pid()])?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while shared.back.load(Ordering::SeqCst) < ok && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let back = shared.back.load(Ordering::SeqCst);
    let waited_secs = shared.since_kill().unwrap_or_default() as f64 / 1e6;
    // Only the restarted server's CPU (since it started) and memory.
    let server_cpu = cpu_secs(Some(0), probe.cpu_ticks());
    let rss_after = probe.rss();

    // The end: the clients leave, then the server is stopped.
    drop(clients);
    let mut seen = Vec::with_capacity(args.connections as usize);
    let leave = tokio::time::Instant::now() + LEAVE_TIMEOUT;
    while let Ok(Some(joined)) = tokio::time::timeout_at(leave, watchers.join_next()).await {
        if let Ok(client) = joined {
            seen.push(client);
        }
    }
    watchers.abort_all();
    server.kill();

    let report = Storm::of(&seen, ok);
    let recovered = back >= ok && ok > 0;
    let recovery_secs = recovered.then_some(report.last_back_us as f64 / 1e6);
    let within_cap = recovery_secs.map(|secs| secs <= 2.0 * BACKOFF_CAP.as_secs_f64());
    emit(&format!(
        "storm   conns={:<6} ok={:<6} setup={:.2}s  server back after {:.2}s  {} of {} clients back in {}  reconnects={} failed attempts={}  peak 100ms window={} ({:.1}%)  server cpu={}",
        args.connections,
        ok,
        setup_secs,
        restart_secs,
        back,
        ok,
        recovery_secs.map_or(format!("> {waited_secs:.1}s"), |secs| format!("{secs:.2}s")),
        report.reconnects,
        report.failed_attempts,
        report.peak,
        report.peak_share * 100.0,
        human_secs(server_cpu),
    ));
    let line = json!({
        "scenario": "storm",
        "url": [args.url],
        "server_pid": [first_pid, probe.pids()[0]],
        "connections": args.connections,
        "authenticated": ok,
        "failed": u64::from(args.connections) - ok,
        "setup_secs": round3(setup_secs),
        "restart_secs": round3(restart_secs),
        "back": back,
        "recovery_secs": recovery_secs.map(round3),
        "backoff_cap_secs": BACKOFF_CAP.as_secs_f64(),
        "recovered_within_twice_cap": within_cap,
        "reconnects": report.reconnects,
        "failed_attempts": report.failed_attempts,
        "peak_window_reconnects": report.peak,
        "peak_window_share": round3(report.peak_share),
        "windows_used": report.windows,
        "server_cpu_secs": server_cpu,
        "rss_after_bytes": rss_after,
    });
    emit(&line.to_string());
    Ok(exit_code(ok))
}

/// The figures of a storm.
#[derive(Debug, PartialEq)]
struct Storm {
    /// Successful reconnections (transports opened after the kill).
    reconnects: u64,
    /// Attempts that failed (every disconnection after the kill but the kill's own).
    failed_attempts: u64,
    /// The most reconnections in one 100 ms window.
    peak: u64,
    /// `peak` as a share of `reconnects`.
    peak_share: f64,
    /// Windows with at least one reconnection.
    windows: usize,
    /// When the last client authenticated again, microseconds after the kill.
    last_back_us: u64,
}

impl Storm {
    /// Sum up what the clients saw; `clients` were connected at the kill.
    fn of(seen: &[Seen], clients: u64) -> Self {
        let mut windows: HashMap<u64, u64> = HashMap::new();
        let window_us = u64::try_from(WINDOW.as_micros()).unwrap_or(u64::MAX);
        let mut reconnects = 0;
        for at in seen.iter().flat_map(|s| &s.reconnected) {
            *windows.entry(at / window_us).or_default() += 1;
            reconnects += 1;
        }
        let peak = windows.values().copied().max().unwrap_or(0);
        let disconnected: u64 = seen.iter().map(|s| s.disconnected).sum();
        Storm {
            reconnects,
            failed_attempts: disconnected.saturating_sub(clients),
            peak,
            peak_share: if reconnects > 0 {
                peak as f64 / reconnects as f64
            } else {
                0.0
            },
            windows: windows.len(),
            last_back_us: seen
                .iter()
                .filter_map(|s| s.authenticated.first())
                .copied()
                .max()
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_windows_and_failed_attempts() {
        let seen = [
            Seen {
                reconnected: vec![10_000, 250_000],
                authenticated: vec![12_000, 260_000],
                disconnected: 2,
            },
            Seen {
                reconnected: vec![50_000],
                authenticated: vec![1_500_000],
                disconnected: 3,
            },
        ];
        let storm = Storm::of(&seen, 2);
        assert_eq!(storm.reconnects, 3);
        assert_eq!(storm.failed_attempts, 3);
        assert_eq!(storm.peak, 2);
        assert_eq!(storm.windows, 2);
        assert!((storm.peak_share - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(storm.last_back_us, 1_500_000);
    }
}
