//! `mesa-bench`: a lean load generator that measures a Mesa server from the outside,
//! ours or any other that speaks the protocol (e.g. upstream `@cryb/mesa` with the
//! relay behaviour and development authentication), or a bare WebSocket relay that
//! speaks no Mesa at all (`--bare`: the transport floor).
//!
//! ```text
//! mesa-bench idle    --url ws://127.0.0.1:4000/ --connections 10000 [--server-pid PID] [--hold-secs 5]
//! mesa-bench idle    --url wss://localhost:4443/ --ca-cert ca.crt ...   (the same over TLS)
//! mesa-bench fanout  --url ws://127.0.0.1:4000/ --connections 1000 --messages 2000 [--window 10]
//! mesa-bench fanout  --url ws://127.0.0.1:4000/ --connections 5000 --messages 200 --rate 20
//! mesa-bench echo    --url ws://127.0.0.1:4000/ --connections 100 [--in-flight 4] [--secs 5]
//! mesa-bench storm   --url ws://127.0.0.1:4000/ --connections 10000 --server-cmd 'mesa serve ...'
//! mesa-bench storm   --url wss://localhost:4443/ --ca-cert ca.crt ...   (the same over TLS)
//! mesa-bench cluster --url ws://127.0.0.1:4001/ --url ws://127.0.0.1:4002/ --redis redis://127.0.0.1:6379/ ...
//! mesa-bench offline --redis redis://127.0.0.1:6379/ [--recipients 100000] [--bystanders 100]
//! mesa-bench rooms   --url ws://127.0.0.1:4001/ --metrics http://127.0.0.1:9001/metrics ... --redis redis://127.0.0.1:6379/ [--send rooms|ids]
//! mesa-bench rooms   ... --redis redis://127.0.0.1:6379/,redis://127.0.0.1:6380/ --send ids --legacy-bus off   (routed, sharded)
//! mesa-bench rooms   ... --recover-rooms '*'   (the Dispatcher appends to the rooms' streams; `mesa serve --recover-rooms '*'`)
//! mesa-bench redis-cost --redis redis://127.0.0.1:6379/ --mode stream|publish [--rooms 10000] [--connections 50] [--pipeline 16]
//! ```
//!
//! The generator speaks raw WebSocket frames (async-tungstenite on tokio), not through
//! [`mesa_tokio::Client`], so that it costs as little as possible; only `storm` uses
//! the client library, because its backoff is what it measures, only `offline`
//! runs a server itself (its send needs the server API), and only `rooms` publishes
//! through a `mesa_tokio::Dispatcher` (see there why). On a loopback server
//! the connections are spread over the source addresses 127.0.0.2..=127.0.0.254 (each
//! socket is bound before it connects), so that ephemeral ports do not run out. Every
//! connection reads the hello, authenticates with `{"op":2,"d":{"token":"u<i>"}}`,
//! waits for op 22, then answers each heartbeat (op 1) with op 11.
//!
//! Each run prints one human-readable line and then one JSON line (`{"scenario":...}`)
//! on stdout; errors go to stderr. Every phase is bounded in time, and every connection
//! is closed at the end. With `--server-pid` (repeatable: the replicas of a cluster)
//! every run reports the server's CPU time, and memory where it means something.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use async_tungstenite::tungstenite::http::Uri;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use futures_util::future::Either;
use futures_util::{SinkExt, StreamExt};
use mesa_tokio::tls::futures_rustls::TlsConnector;
use mesa_tokio::tls::futures_rustls::client::TlsStream;
use mesa_tokio::tls::rustls::ClientConfig;
use mesa_tokio::tls::rustls::pki_types::ServerName;
use mesa_tokio::tls::{certificates_from_pem, client_config};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use failure::{Failure, read};

mod echo;
#[path = "../../mesa-cli/src/failure.rs"]
mod failure;
mod membership;
mod offline;
mod publisher;
mod redis_cost;
mod redis_info;
mod rooms;
mod scrape;
mod stats;
mod storm;

fn main() -> ExitCode {
    use clap::Parser;
    let args = BenchArgs::parse();
    // Logs (of `offline`'s in-process server, of the client library) go to stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    failure::run_to_exit("mesa-bench", run(args))
}

use stats::{
    CpuMeter, Delivered, Histogram, Probe, Tally, cpu_secs, emit, exit_code, human_bytes,
    human_cpu, human_secs, own_cpu_ticks, round3,
};

/// How long one connection gets for its closing handshake at the end of a run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the end of a run waits for all connection tasks to finish.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the fanout run waits for a delivery before it stops waiting for the rest.
const QUIET_TIMEOUT: Duration = Duration::from_secs(3);

/// The error kinds printed on stderr when connections fail.
const ERRORS_SHOWN: usize = 5;

/// A connection of the generator: plain TCP or TLS (`wss://`).
type Ws = WebSocketStream<Either<Compat<TcpStream>, TlsStream<Compat<TcpStream>>>>;

/// Measure a Mesa server (ours or another) with a lean load generator.
#[derive(Debug, clap::Parser)]
#[command(name = "mesa-bench", version)]
struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

/// What to measure.
#[derive(Debug, clap::Subcommand)]
enum Scenario {
    /// Open and authenticate many idle connections; report the server's memory per
    /// connection (VmRSS after minus before, with --server-pid).
    Idle(IdleArgs),
    /// Subscribers receive every BROADCAST of one publisher: report deliveries per
    /// second, losses, duplicates, latency, and the server's CPU time (with --server-pid).
    Fanout(FanoutArgs),
    /// Each connection keeps ECHOs in flight for a while: report round trips per
    /// second, latency, and the server's CPU time (with --server-pid).
    Echo(echo::EchoArgs),
    /// Connect clients of the `mesa_tokio` client library, kill the server (started by
    /// the generator with --server-cmd) and start it again: report how long until all
    /// are back and the peak reconnection rate per 100 ms (the backoff's jitter).
    Storm(storm::StormArgs),
    /// Fanout over the replicas of a cluster (one --url and --server-pid per
    /// replica): deliveries across replicas, and the PUBLISH commands Redis counted
    /// per message sent.
    Cluster(ClusterArgs),
    /// One send to many ids connected nowhere, from a server running in this process
    /// with a cluster and sync, while bystanders do ECHO round trips: this process's
    /// memory growth, the time until every copy is stored, the bystanders' latency.
    Offline(offline::OfflineArgs),
    /// Room members spread over the replicas of a cluster (one --url, --metrics and
    /// --server-pid per replica), messages published to rooms (or, --send ids, to the
    /// members' ids over the shared channel, or routed with --legacy-bus off) at a
    /// fixed rate: each replica's share of unneeded envelopes, deliveries per server
    /// and per Redis CPU-second, Redis commands per send, memory per membership.
    Rooms(rooms::RoomsArgs),
    /// What recovery costs Redis: pipelined room messages straight to Redis, as the
    /// `STREAM_PUBLISH` script of a recoverable room (--mode stream) or a plain
    /// PUBLISH of the same envelope (--mode publish): calls per second and per Redis
    /// CPU-second.
    RedisCost(redis_cost::RedisCostArgs),
}

/// Options of every scenario that uses the raw generator.
#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// The server's URL, `ws://host:port/path` or `wss://...`; repeat it to spread
    /// the connections over several servers (connection `i` goes to the `i mod n`-th).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,

    /// Also trust the certificates of this PEM file for `wss://` URLs (a test CA).
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,

    /// How many connections to open; connection `i` authenticates as `u<i>`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// The server's process id: its memory (VmRSS) and CPU time are read from /proc.
    /// Repeat it for the replicas of a cluster (their figures are summed).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,

    /// The server speaks no Mesa (a bare WebSocket relay): no hello, no
    /// authentication, no heartbeats; a connection is set up after its handshake.
    #[arg(long)]
    bare: bool,

    /// Connections being set up at once (connect, handshake, authentication).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// Seconds one connection gets to connect and authenticate.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,

    /// Seconds all connections together get to connect and authenticate.
    #[arg(long, default_value_t = 300)]
    setup_timeout_secs: u64,
}

/// Options of `mesa-bench idle`.
#[derive(Debug, clap::Args)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Seconds to hold the connections, once all are authenticated, before the server's
    /// memory is read.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

/// Options of `mesa-bench fanout`.
#[derive(Debug, clap::Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// How many BROADCAST messages the publisher sends.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,

    /// Messages the publisher has in flight at most (sent, not yet received back).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,

    /// Send at this fixed rate (messages per second) instead of a window: an open
    /// loop, where a closed one would hide latency behind throughput. Each message
    /// is stamped with the time it was due, so a late send counts in its latency.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,

    /// Seconds the publishing phase may take, deliveries included.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Options of `mesa-bench cluster`.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    #[command(flatten)]
    fanout: FanoutArgs,

    /// The cluster's Redis: the PUBLISH commands of the run are read from its
    /// `INFO commandstats` (the difference before and after).
    #[arg(long)]
    redis: String,
}

/// Run the chosen scenario.
async fn run(args: BenchArgs) -> Result<ExitCode, Failure> {
    match args.scenario {
        Scenario::Idle(args) => idle(args).await,
        Scenario::Fanout(args) => fanout(args, None).await,
        Scenario::Echo(args) => echo::run(args).await,
        Scenario::Storm(args) => storm::run(args).await,
        Scenario::Cluster(args) => {
            if args.fanout.common.urls.len() < 2 {
                return Err(Failure::usage(
                    "mesa-bench cluster needs one --url per replica (at least two)",
                ));
            }
            let replicas = args.fanout.common.urls.len() as u64;
            replicas_listening(&args.redis, replicas).await?;
            fanout(args.fanout, Some(&args.redis)).await
        }
        Scenario::Offline(args) => offline::run(args).await,
        Scenario::Rooms(args) => rooms::run(args).await,
        Scenario::RedisCost(args) => redis_cost::run(args).await,
    }
}

/// Wait until `replicas` subscribers listen on the cluster's `ws` channel at
/// `redis`: a replica announces its URL before its link to Redis is up, and what is
/// published before it subscribed never reaches its clients.
async fn replicas_listening(redis: &str, replicas: u64) -> Result<(), Failure> {
    let client = redis::Client::open(redis).map_err(|error| format!("--redis: {error}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|error| format!("cannot reach Redis at {redis}: {error}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("ws")
            .query_async(&mut conn)
            .await
            .map_err(|error| format!("PUBSUB NUMSUB failed: {error}"))?;
        let listening = counts.first().map_or(0, |(_, n)| *n);
        if listening >= replicas {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let error = format!("{listening} of {replicas} replicas subscribed to ws in 30 s");
            return Err(error.into());
        }
        sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// `mesa-bench idle`.
async fn idle(args: IdleArgs) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let probe = Probe::new(&common.server_pids)?;
    let rss_before = probe.rss();
    let cpu_before = probe.cpu_ticks();

    let (ctx, mut ready) = Ctx::new(common).await?;
    let (phase, phase_rx) = watch::channel(Phase::Setup);
    let tasks = spawn_connections(&ctx, common, &phase_rx, |_| Role::Idle);
    let setup = wait_setup(&mut ready, common).await;
    if setup.ok > 0 {
        sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let alive = setup.ok.saturating_sub(ctx.dropped.load(Ordering::Relaxed));
    let rss_after = probe.rss();
    // Setting up the connections, then holding them (heartbeats).
    let server_cpu = cpu_secs(cpu_before, probe.cpu_ticks());
    let _ = phase.send(Phase::Stop);
    let outcomes = join_all(tasks).await;
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;

    let per_conn = match (rss_before, rss_after) {
        (Some(before), Some(after)) if alive > 0 => {
            Some((after as f64 - before as f64) / alive as f64)
        }
        _ => None,
    };
    emit(&format!(
        "idle    {}  rss {} -> {} = {} /conn  server cpu={}",
        setup.human(common, dropped),
        human_bytes(rss_before.map(|b| b as f64)),
        human_bytes(rss_after.map(|b| b as f64)),
        human_bytes(per_conn),
        human_secs(server_cpu),
    ));
    let report = report(
        "idle",
        common,
        &probe,
        &setup,
        dropped,
        &[json!({
            "hold_secs": args.hold_secs,
            "rss_baseline_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "bytes_per_conn": per_conn.map(f64::round),
            "server_cpu_secs": server_cpu,
        })],
    );
    emit(&report.to_string());
    Ok(exit_code(setup.ok))
}

/// `mesa-bench fanout`, and `mesa-bench cluster` (with the cluster's Redis).
async fn fanout(args: FanoutArgs, redis: Option<&str>) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let probe = Probe::new(&common.server_pids)?;
    let messages = u64::from(args.messages);

    let (ctx, mut ready) = Ctx::new(common).await?;
    let (phase, phase_rx) = watch::channel(Phase::Setup);
    let tasks = spawn_connections(&ctx, common, &phase_rx, |_| {
        Role::Subscriber(Tally::new(messages, true))
    });
    let setup = wait_setup(&mut ready, common).await;
    let publisher = timeout(
        Duration::from_secs(common.connect_timeout_secs),
        open(&ctx, common.connections, "publisher"),
    )
    .await
    .map_err(|_| "the publisher timed out connecting".to_owned())
    .and_then(|opened| opened.map_err(|error| format!("the publisher failed: {error}")));
    let mut publisher = match publisher {
        Ok(ws) => ws,
        Err(error) => {
            let _ = phase.send(Phase::Stop);
            join_all(tasks).await;
            return Err(error.into());
        }
    };
    let redis: Option<Vec<String>> = redis.map(|url| vec![url.to_owned()]);
    let publishes_before = match &redis {
        Some(urls) => Some(redis_info::read(urls).await?.publish),
        None => None,
    };

    // The measured phase: publish, then wait for the subscribers to catch up.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let meter = CpuMeter::start(&probe);
    let start_us = ctx.now_us();
    let mut own = Tally::new(messages, false);
    let published = publish(&ctx, &mut publisher, &mut own, &args, deadline).await;
    let expected = (setup.ok + 1) * messages;
    wait_deliveries(&ctx, expected, deadline).await;
    let cpu = meter.read(&probe);
    let rss_after = probe.rss();
    let publishes = match (&redis, publishes_before) {
        (Some(urls), Some(before)) => {
            Some(redis_info::read(urls).await?.publish.saturating_sub(before))
        }
        _ => None,
    };

    let _ = phase.send(Phase::Stop);
    let ((), outcomes) = tokio::join!(close(&mut publisher), join_all(tasks));
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;
    let mut total = own;
    for tally in outcomes.into_iter().filter_map(|o| o.tally) {
        total.merge(tally);
    }
    let delivered = Delivered::new(total, expected, start_us, cpu);
    let per_send = publishes.map(|calls| calls as f64 / published.max(1) as f64);
    let scenario = match (redis, args.rate) {
        (Some(_), _) => "cluster",
        (None, Some(_)) => "rate",
        (None, None) => "fanout",
    };
    emit(&format!(
        "{scenario:<7} {} msgs={} {} published={}  {}{}",
        setup.human(common, dropped),
        messages,
        args.rate
            .map_or(format!("window={}", args.window), |r| format!("rate={r}/s")),
        published,
        delivered.human(),
        per_send.map_or(String::new(), |n| format!("  PUBLISH per send={n:.2}")),
    ));
    let report = report(
        scenario,
        common,
        &probe,
        &setup,
        dropped,
        &[
            json!({
                "messages": messages,
                "window": args.rate.map_or(Some(args.window), |_| None),
                "rate": args.rate,
                "published": published,
                "rss_after_bytes": rss_after,
                "redis_publish_calls": publishes,
                "publish_per_send": per_send.map(round3),
            }),
            delivered.fields(),
        ],
    );
    emit(&report.to_string());
    Ok(exit_code(setup.ok))
}

/// Wait until the connections received `expected` messages, none came for
/// [`QUIET_TIMEOUT`], or `deadline`.
async fn wait_deliveries(ctx: &Ctx, expected: u64, deadline: Instant) {
    let mut last_progress = (ctx.received.load(Ordering::Relaxed), Instant::now());
    loop {
        let received = ctx.received.load(Ordering::Relaxed);
        if received >= expected || Instant::now() >= deadline {
            return;
        }
        if received != last_progress.0 {
            last_progress = (received, Instant::now());
        } else if last_progress.1.elapsed() >= QUIET_TIMEOUT {
            return;
        }
        sleep(Duration::from_millis(2)).await;
    }
}

/// Send `args.messages` BROADCASTs with at most `args.window` in flight, or at
/// `args.rate` per second; a message is completed when the publisher receives it
/// back. Returns how many were sent.
async fn publish(
    ctx: &Ctx,
    ws: &mut Ws,
    own: &mut Tally,
    args: &FanoutArgs,
    deadline: Instant,
) -> u64 {
    let (messages, window) = (u64::from(args.messages), u64::from(args.window));
    let start_us = ctx.now_us();
    // When message `i` is due at a fixed rate (microseconds since the epoch).
    let due_us = |i: u64| {
        args.rate
            .map(|rate| start_us + i * 1_000_000 / u64::from(rate))
    };
    let (mut sent, mut in_flight) = (0_u64, 0_u64);
    while own.received < messages {
        let mut fed = false;
        while sent < messages {
            let stamp = match due_us(sent) {
                Some(due) if due <= ctx.now_us() => due,
                None if in_flight < window => ctx.now_us(),
                _ => break,
            };
            if ws
                .feed(dispatch_at("BROADCAST", stamp, sent))
                .await
                .is_err()
            {
                eprintln!("mesa-bench: the publisher's connection failed while sending");
                return sent;
            }
            sent += 1;
            in_flight += 1;
            fed = true;
        }
        if fed && ws.flush().await.is_err() {
            eprintln!("mesa-bench: the publisher's connection failed while sending");
            return sent;
        }
        // Wait for a frame, or until the next message is due.
        let next = due_us(sent).filter(|_| sent < messages);
        let wake = next.map_or(deadline, |due| deadline.min(ctx.at_us(due)));
        let frame = match timeout_at(wake, ws.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => {
                eprintln!("mesa-bench: the publisher's connection ended");
                return sent;
            }
            Err(_) if Instant::now() < deadline => continue,
            Err(_) => {
                eprintln!("mesa-bench: the publishing phase timed out");
                return sent;
            }
        };
        let WsMessage::Text(text) = frame else {
            continue;
        };
        match parse(text.as_str()) {
            Parsed::Heartbeat => {
                if ws.send(heartbeat_ack()).await.is_err() {
                    return sent;
                }
            }
            Parsed::Dispatch {
                kind: Kind::Broadcast,
                seq,
                ts,
            } => {
                if own.record(ctx, seq, ts) {
                    in_flight = in_flight.saturating_sub(1);
                }
            }
            Parsed::Dispatch { .. } | Parsed::Subscribed | Parsed::RoomError | Parsed::Other(_) => {
            }
        }
    }
    sent
}

// ---------------------------------------------------------------------------------------
// Connections

/// Where to connect.
struct Target {
    /// The URL of the WebSocket handshake.
    url: String,
    /// The server's address.
    addr: SocketAddr,
    /// Whether to spread the connections over the loopback source addresses.
    spread: bool,
    /// For `wss://`: what the client trusts (the default roots and `--ca-cert`) and
    /// the name the certificate must be valid for.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Target {
    /// Resolve `url` (`ws://host:port/path` or `wss://`, trusting `ca` too),
    /// preferring an IPv4 address.
    async fn resolve(url: &str, ca: Option<&std::path::Path>) -> Result<Self, Failure> {
        let uri: Uri = url
            .parse()
            .map_err(|error| Failure::usage(format!("invalid --url `{url}`: {error}")))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => {
                return Err(Failure::usage(format!(
                    "--url `{url}` must start with ws:// or wss://"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| Failure::usage(format!("--url `{url}` has no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let roots = match ca {
                Some(path) => certificates_from_pem(&read(path, "--ca-cert")?)
                    .map_err(|error| format!("--ca-cert {}: {error}", path.display()))?,
                None => Vec::new(),
            };
            let config = client_config(&roots).map_err(|error| format!("TLS: {error}"))?;
            let name = ServerName::try_from(host.to_owned())
                .map_err(|error| Failure::usage(format!("--url `{url}`: {error}")))?;
            Some((config, name))
        } else {
            None
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|error| format!("cannot resolve `{host}`: {error}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|addr| addr.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("`{host}` resolves to no address"))?;
        Ok(Target {
            url: url.to_owned(),
            addr,
            spread: addr.is_ipv4() && addr.ip().is_loopback(),
            tls,
        })
    }
}

/// The source address of connection `index` on loopback (127.0.0.2..=127.0.0.254).
fn source(index: u32) -> Ipv4Addr {
    // The remainder is below 253, so the octet is at most 254.
    Ipv4Addr::new(127, 0, 0, 2 + (index % 253) as u8)
}

/// A TCP socket bound to the loopback source address of `index` when `spread`.
fn socket_for(addr: SocketAddr, index: u32, spread: bool) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    if spread {
        socket.bind(SocketAddr::from((source(index), 0)))?;
    }
    Ok(socket)
}

/// The phases of a run, announced to every connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connecting and authenticating; then holding.
    Setup,
    /// Room members subscribe to their rooms.
    Subscribe,
    /// The measured phase (echo: keep ECHOs in flight).
    Run,
    /// The measured phase is over: send nothing new, let the answers arrive.
    Drain,
    /// Close and report.
    Stop,
}

/// What the tasks share with the scenario.
struct Ctx {
    /// Where to connect: connection `i` goes to `targets[i % len]`.
    targets: Vec<Target>,
    /// The server speaks no Mesa.
    bare: bool,
    /// Connections opt in to rooms (`"mesa":{"caps":["rooms"]}` in op 2).
    rooms: bool,
    /// Bounds the connections being set up at once.
    setup: Semaphore,
    /// How long one connection gets to connect and authenticate.
    connect_timeout: Duration,
    /// Each connection reports here once: authenticated, or why not.
    ready: mpsc::UnboundedSender<Result<(), String>>,
    /// Distinct BROADCASTs received (fanout), or round trips completed while the
    /// phase was `Run` (echo), over all connections.
    received: AtomicU64,
    /// Connections that the server closed (or that failed) after authenticating.
    dropped: AtomicU64,
    /// Room subscriptions the server confirmed (`mesa:subscribed`).
    subscribed: AtomicU64,
    /// Room requests the server refused (`mesa:error`).
    refused: AtomicU64,
    /// The shared clock of the message timestamps.
    epoch: Instant,
}

impl Ctx {
    /// The shared state, and the receiving end of the setup reports.
    async fn new(
        common: &CommonArgs,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Result<(), String>>), Failure> {
        Self::opting_in(common, false).await
    }

    /// [`Ctx::new`], the connections opting in to rooms when `rooms`.
    async fn opting_in(
        common: &CommonArgs,
        rooms: bool,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Result<(), String>>), Failure> {
        let mut targets = Vec::with_capacity(common.urls.len());
        for url in &common.urls {
            targets.push(Target::resolve(url, common.ca_cert.as_deref()).await?);
        }
        let (ready, reports) = mpsc::unbounded_channel();
        let ctx = Ctx {
            targets,
            bare: common.bare,
            rooms,
            setup: Semaphore::new(common.concurrency as usize),
            connect_timeout: Duration::from_secs(common.connect_timeout_secs),
            ready,
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        Ok((Arc::new(ctx), reports))
    }

    /// The instant `us` microseconds after the epoch.
    fn at_us(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    /// Microseconds since the epoch.
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// What a connection does once set up.
enum Role {
    /// Hold the connection, answering heartbeats.
    Idle,
    /// Count the BROADCASTs received (fanout, cluster).
    Subscriber(Tally),
    /// Subscribe to these rooms when the phase becomes `Subscribe`, then count the
    /// BROADCASTs received like a subscriber (rooms).
    Member(Vec<String>, Tally),
    /// Keep this many ECHOs in flight while the phase is `Run`, and time them.
    Echo(u32, Histogram),
}

/// How one connection ended.
struct Outcome {
    /// It authenticated, then the server closed it or it failed before the end.
    dropped: bool,
    /// What it received (fanout only).
    tally: Option<Tally>,
    /// Its round-trip times (echo only).
    latency: Option<Histogram>,
}

/// Spawn `common.connections` connection tasks, the role of each from `role(index)`.
fn spawn_connections(
    ctx: &Arc<Ctx>,
    common: &CommonArgs,
    phase: &watch::Receiver<Phase>,
    role: impl Fn(u32) -> Role,
) -> JoinSet<Outcome> {
    let mut tasks = JoinSet::new();
    for index in 0..common.connections {
        tasks.spawn(connection(ctx.clone(), index, phase.clone(), role(index)));
    }
    tasks
}

/// Connect, authenticate, then play `role` until the phase is `Stop` (answering
/// heartbeats), then close.
async fn connection(
    ctx: Arc<Ctx>,
    index: u32,
    mut phase: watch::Receiver<Phase>,
    mut role: Role,
) -> Outcome {
    let failed = Outcome {
        dropped: false,
        tally: None,
        latency: None,
    };
    let opened = {
        let Ok(_permit) = ctx.setup.acquire().await else {
            return failed;
        };
        timeout(ctx.connect_timeout, open(&ctx, index, &format!("u{index}"))).await
    };
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            let _ = ctx.ready.send(Err(error));
            return failed;
        }
        Err(_) => {
            let _ = ctx
                .ready
                .send(Err("timed out connecting and authenticating".into()));
            return failed;
        }
    };
    // The phase as seen before reporting ready: the scenario moves on only after
    // every report, so the next phase is always a change this loop sees.
    let mut now_in = *phase.borrow_and_update();
    let _ = ctx.ready.send(Ok(()));

    let mut seq = 0_u64;
    let mut dropped = false;
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                let next = *phase.borrow_and_update();
                if changed.is_err() || next == Phase::Stop {
                    break;
                }
                let opening: Vec<WsMessage> = match (&role, now_in, next) {
                    (Role::Echo(in_flight, _), Phase::Setup, Phase::Run) => (0..*in_flight)
                        .map(|i| dispatch("ECHO", &ctx, seq + u64::from(i)))
                        .collect(),
                    (Role::Member(rooms, _), Phase::Setup, Phase::Subscribe) => rooms
                        .iter()
                        .enumerate()
                        .map(|(i, room)| subscribe(room, i))
                        .collect(),
                    _ => Vec::new(),
                };
                if !opening.is_empty() {
                    if let Role::Echo(..) = role {
                        seq += opening.len() as u64;
                    }
                    for frame in opening {
                        let _ = ws.feed(frame).await;
                    }
                    if ws.flush().await.is_err() {
                        dropped = true;
                        break;
                    }
                }
                now_in = next;
            }
            frame = ws.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let reply = match (parse(text.as_str()), &mut role) {
                        (Parsed::Heartbeat, _) => Some(heartbeat_ack()),
                        (Parsed::Dispatch { kind: Kind::Broadcast, seq, ts }, Role::Subscriber(tally) | Role::Member(_, tally)) => {
                            tally.record(&ctx, seq, ts);
                            None
                        }
                        (Parsed::Subscribed, _) => {
                            ctx.subscribed.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                        (Parsed::RoomError, _) => {
                            ctx.refused.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                        (Parsed::Dispatch { kind: Kind::Echo, ts, .. }, Role::Echo(_, latency)) if now_in == Phase::Run => {
                            latency.record(ctx.now_us().saturating_sub(ts));
                            ctx.received.fetch_add(1, Ordering::Relaxed);
                            seq += 1;
                            Some(dispatch("ECHO", &ctx, seq))
                        }
                        _ => None,
                    };
                    if let Some(reply) = reply {
                        if ws.send(reply).await.is_err() {
                            dropped = true;
                            break;
                        }
                    }
                }
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => {
                    dropped = true;
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    if dropped {
        ctx.dropped.fetch_add(1, Ordering::Relaxed);
    } else {
        close(&mut ws).await;
    }
    let (tally, latency) = match role {
        Role::Idle => (None, None),
        Role::Subscriber(tally) | Role::Member(_, tally) => (Some(tally), None),
        Role::Echo(_, latency) => (None, Some(latency)),
    };
    Outcome {
        dropped,
        tally,
        latency,
    }
}

/// Connect connection `index` (from its loopback source address), then, unless the
/// server is bare, read the hello, authenticate with `token` and wait for op 22.
async fn open(ctx: &Ctx, index: u32, token: &str) -> Result<Ws, String> {
    let target = &ctx.targets[index as usize % ctx.targets.len()];
    let socket = socket_for(target.addr, index, target.spread)
        .map_err(|error| format!("socket: {error}"))?;
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_nodelay(true)
        .map_err(|error| format!("nodelay: {error}"))?;
    // Small buffers: the generator holds many connections that read little.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let stream = match &target.tls {
        None => Either::Left(stream.compat()),
        Some((config, name)) => Either::Right(
            TlsConnector::from(config.clone())
                .connect(name.clone(), stream.compat())
                .await
                .map_err(|error| format!("TLS: {error}"))?,
        ),
    };
    let (mut ws, _) =
        async_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(config))
            .await
            .map_err(|error| format!("handshake: {error}"))?;
    if ctx.bare {
        return Ok(ws);
    }

    match next_parsed(&mut ws).await? {
        Parsed::Other(10) => {}
        other => return Err(format!("expected the hello (op 10) first, got {other:?}")),
    }
    let auth = if ctx.rooms {
        json!({"op": 2, "d": {"token": token, "mesa": {"caps": ["rooms"]}}})
    } else {
        json!({"op": 2, "d": {"token": token}})
    };
    let auth = auth.to_string();
    ws.send(WsMessage::text(auth))
        .await
        .map_err(|error| format!("sending op 2: {error}"))?;
    loop {
        match next_parsed(&mut ws).await? {
            Parsed::Other(22) => return Ok(ws),
            Parsed::Heartbeat => ws
                .send(heartbeat_ack())
                .await
                .map_err(|error| format!("sending op 11: {error}"))?,
            _ => {}
        }
    }
}

/// The next text frame, parsed; an error when the connection ends.
async fn next_parsed(ws: &mut Ws) -> Result<Parsed, String> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => return Ok(parse(text.as_str())),
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(match frame {
                    Some(frame) => format!("closed by the server: {}", frame.code),
                    None => "closed by the server".to_owned(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(format!("receiving: {error}")),
            None => return Err("the connection ended".to_owned()),
        }
    }
}

/// Close `ws` with 1000 and wait (a bounded time) for the server's answer.
async fn close(ws: &mut Ws) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if ws.close(Some(normal)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The heartbeat ACK (op 11).
fn heartbeat_ack() -> WsMessage {
    WsMessage::text(r#"{"op":11,"d":{}}"#)
}

/// A timestamped dispatch of type `t` (`ECHO` or `BROADCAST`) with sequence number `seq`.
fn dispatch(t: &str, ctx: &Ctx, seq: u64) -> WsMessage {
    dispatch_at(t, ctx.now_us(), seq)
}

/// The request to subscribe to `room` (`reference` is echoed in the answer).
fn subscribe(room: &str, reference: usize) -> WsMessage {
    let request = json!({"op": 0, "t": "mesa:subscribe", "d": {"room": room, "ref": reference}});
    WsMessage::text(request.to_string())
}

/// [`dispatch`] stamped `ts` (microseconds since the generator's epoch).
fn dispatch_at(t: &str, ts: u64, seq: u64) -> WsMessage {
    WsMessage::text(format!(
        r#"{{"op":0,"t":"{t}","d":{{"ts":{ts},"seq":{seq}}}}}"#
    ))
}

/// What the generator sees set up so far.
struct Setup {
    /// Connections that authenticated.
    ok: u64,
    /// Connections that did not (in time).
    failed: u64,
    /// Seconds the setup phase took.
    secs: f64,
}

impl Setup {
    /// The start of a run's human-readable line: connections and how they fared.
    fn human(&self, common: &CommonArgs, dropped: u64) -> String {
        format!(
            "conns={:<6} ok={:<6} failed={:<5} dropped={:<5} setup={:.2}s",
            common.connections, self.ok, self.failed, dropped, self.secs
        )
    }
}

/// A run's JSON line: the fields every scenario of the raw generator reports, then
/// the scenario's own (`fields`, objects).
fn report(
    scenario: &str,
    common: &CommonArgs,
    probe: &Probe,
    setup: &Setup,
    dropped: u64,
    fields: &[serde_json::Value],
) -> serde_json::Value {
    let mut line = json!({
        "scenario": scenario,
        "url": common.urls,
        "server_pid": probe.pids(),
        "bare": common.bare,
        "connections": common.connections,
        "authenticated": setup.ok,
        "failed": setup.failed,
        "dropped": dropped,
        "setup_secs": round3(setup.secs),
    });
    if let Some(line) = line.as_object_mut() {
        for more in fields.iter().filter_map(serde_json::Value::as_object) {
            line.extend(more.clone());
        }
    }
    line
}

/// Wait until every connection reported (or the setup deadline), then print the most
/// common errors on stderr.
async fn wait_setup(
    reports: &mut mpsc::UnboundedReceiver<Result<(), String>>,
    common: &CommonArgs,
) -> Setup {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(common.setup_timeout_secs);
    let mut ok = 0_u64;
    let mut errors: HashMap<String, u64> = HashMap::new();
    let total = u64::from(common.connections);
    let mut reported = 0_u64;
    while reported < total {
        match timeout_at(deadline, reports.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(error))) => *errors.entry(error).or_default() += 1,
            Ok(None) => break,
            Err(_) => {
                let pending = total - reported;
                eprintln!("mesa-bench: {pending} connections still not set up at the deadline");
                break;
            }
        }
        reported += 1;
    }
    print_errors(errors);
    Setup {
        ok,
        failed: total - ok,
        secs: started.elapsed().as_secs_f64(),
    }
}

/// Print the most common of `errors` (message and count) on stderr.
fn print_errors(errors: HashMap<String, u64>) {
    let mut errors: Vec<(String, u64)> = errors.into_iter().collect();
    errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (error, count) in errors.iter().take(ERRORS_SHOWN) {
        eprintln!("mesa-bench: {count} connections failed: {error}");
    }
}

/// Wait (a bounded time) for every connection task, then abort the rest.
async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut outcomes = Vec::with_capacity(tasks.len());
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while let Ok(Some(joined)) = timeout_at(deadline, tasks.join_next()).await {
        if let Ok(outcome) = joined {
            outcomes.push(outcome);
        }
    }
    if !tasks.is_empty() {
        eprintln!(
            "mesa-bench: {} connections did not close in time",
            tasks.len()
        );
        tasks.abort_all();
    }
    outcomes
}

// ---------------------------------------------------------------------------------------
// Frames

/// A received Mesa message, as far as the generator cares.
#[derive(Debug)]
enum Parsed {
    /// Op 1.
    Heartbeat,
    /// A timestamped dispatch of the generator's (op 0 with `d.seq` and `d.ts`).
    Dispatch {
        /// Its type.
        kind: Kind,
        /// The sender's sequence number.
        seq: u64,
        /// When it was sent, in microseconds since the generator's epoch.
        ts: u64,
    },
    /// `mesa:subscribed`: a room subscription confirmed.
    Subscribed,
    /// `mesa:error`: a room request refused.
    RoomError,
    /// Any other opcode (or -1 when the frame is not a Mesa message).
    Other(i64),
}

/// The types of the generator's dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A fanout's message.
    Broadcast,
    /// An echo's round trip.
    Echo,
}

/// The fields of a Mesa message that the generator reads; the rest is skipped.
#[derive(Deserialize)]
struct Frame<'a> {
    /// The opcode.
    op: i64,
    /// The type of a dispatch.
    #[serde(default, borrow)]
    t: Option<Cow<'a, str>>,
    /// The data, when it has the shape of the generator's dispatches.
    #[serde(default)]
    d: Option<TimedData>,
}

/// The data of the generator's dispatches.
#[derive(Deserialize)]
struct TimedData {
    /// When it was sent.
    ts: Option<u64>,
    /// The sender's sequence number.
    seq: Option<u64>,
}

/// Only the opcode, for the messages whose `d` has another shape.
#[derive(Deserialize)]
struct OpOnly {
    /// The opcode.
    op: i64,
}

/// Read what the generator needs from one text frame.
fn parse(text: &str) -> Parsed {
    match serde_json::from_str::<Frame<'_>>(text) {
        Ok(Frame { op: 1, .. }) => Parsed::Heartbeat,
        Ok(Frame {
            op: 0,
            t: Some(t),
            d:
                Some(TimedData {
                    ts: Some(ts),
                    seq: Some(seq),
                }),
        }) if t == "BROADCAST" || t == "ECHO" => Parsed::Dispatch {
            kind: if t == "ECHO" {
                Kind::Echo
            } else {
                Kind::Broadcast
            },
            seq,
            ts,
        },
        Ok(Frame {
            op: 0, t: Some(t), ..
        }) if t == "mesa:subscribed" => Parsed::Subscribed,
        Ok(Frame {
            op: 0, t: Some(t), ..
        }) if t == "mesa:error" => Parsed::RoomError,
        Ok(frame) => Parsed::Other(frame.op),
        Err(_) => match serde_json::from_str::<OpOnly>(text) {
            Ok(OpOnly { op: 1 }) => Parsed::Heartbeat,
            Ok(OpOnly { op }) => Parsed::Other(op),
            Err(_) => Parsed::Other(-1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_needs() {
        assert!(matches!(parse(r#"{"op":1,"d":{}}"#), Parsed::Heartbeat));
        assert!(matches!(
            parse(r#"{"op":0,"t":"BROADCAST","d":{"ts":5,"seq":7}}"#),
            Parsed::Dispatch {
                kind: Kind::Broadcast,
                seq: 7,
                ts: 5
            }
        ));
        assert!(matches!(
            parse(r#"{"op":0,"d":{"ts":5,"seq":7},"t":"ECHO"}"#),
            Parsed::Dispatch {
                kind: Kind::Echo,
                seq: 7,
                ts: 5
            }
        ));
        assert!(matches!(
            parse(r#"{"op":10,"d":{"rules":["a"],"c_heartbeat_interval":10000}}"#),
            Parsed::Other(10)
        ));
        assert!(matches!(parse(r#"{"op":22,"d":"x"}"#), Parsed::Other(22)));
        assert!(matches!(
            parse(r#"{"op":0,"t":"mesa:subscribed","d":{"room":"r","ref":1}}"#),
            Parsed::Subscribed
        ));
        assert!(matches!(
            parse(r#"{"op":0,"t":"mesa:error","d":{"room":"r","ref":1,"code":"x","reason":"y"}}"#),
            Parsed::RoomError
        ));
        assert!(matches!(
            parse(r#"{"op":0,"d":{"ts":5,"seq":7},"t":"BROADCAST","room":"r"}"#),
            Parsed::Dispatch {
                kind: Kind::Broadcast,
                ..
            }
        ));
        assert!(matches!(parse("nope"), Parsed::Other(-1)));
    }
}
