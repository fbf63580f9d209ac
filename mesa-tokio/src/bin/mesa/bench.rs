//! `mesa bench`: a lean load generator that measures a Mesa server from the outside,
//! ours or any other that speaks the protocol (e.g. upstream `@cryb/mesa` with the
//! relay behaviour and development authentication).
//!
//! ```text
//! mesa bench idle   --url ws://127.0.0.1:4000/ --connections 10000 [--server-pid PID] [--hold-secs 5]
//! mesa bench fanout --url ws://127.0.0.1:4000/ --connections 1000 --messages 2000 [--window 10] [--server-pid PID]
//! ```
//!
//! The generator speaks raw WebSocket frames (async-tungstenite on tokio), not through
//! [`mesa_tokio::Client`], so that it costs as little as possible. On a loopback server
//! the connections are spread over the source addresses 127.0.0.2..=127.0.0.254 (each
//! socket is bound before it connects), so that ephemeral ports do not run out. Every
//! connection reads the hello, authenticates with `{"op":2,"d":{"token":"u<i>"}}`,
//! waits for op 22, then answers each heartbeat (op 1) with op 11.
//!
//! Each run prints one human-readable line and then one JSON line (`{"scenario":...}`)
//! on stdout; errors go to stderr. Every phase is bounded in time, and every connection
//! is closed at the end.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
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
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::Failure;

/// How long one connection gets for its closing handshake at the end of a run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the end of a run waits for all connection tasks to finish.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the fanout run waits for a delivery before it stops waiting for the rest.
const QUIET_TIMEOUT: Duration = Duration::from_secs(3);

/// Linux reports process CPU times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports (the value `sysconf(_SC_CLK_TCK)` returns).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// The error kinds printed on stderr when connections fail.
const ERRORS_SHOWN: usize = 5;

/// A connection of the generator.
type Ws = WebSocketStream<Compat<TcpStream>>;

/// Options of `mesa bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
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
}

/// Options of every scenario.
#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// The server's URL, `ws://host:port/path`.
    #[arg(long)]
    url: String,

    /// How many connections to open; connection `i` authenticates as `u<i>`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// The server's process id: its memory (VmRSS) and CPU time are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,

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

/// Options of `mesa bench idle`.
#[derive(Debug, clap::Args)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Seconds to hold the connections, once all are authenticated, before the server's
    /// memory is read.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

/// Options of `mesa bench fanout`.
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

    /// Seconds the publishing phase may take, deliveries included.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Run the chosen scenario.
pub(crate) async fn run(args: BenchArgs) -> Result<ExitCode, Failure> {
    match args.scenario {
        Scenario::Idle(args) => idle(args).await,
        Scenario::Fanout(args) => fanout(args).await,
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// `mesa bench idle`.
async fn idle(args: IdleArgs) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let target = Target::resolve(&common.url).await?;
    let pid = common.server_pid;
    let rss_before = pid.and_then(rss_bytes);
    if pid.is_some() && rss_before.is_none() {
        return Err(format!("cannot read /proc/{}/status", pid.unwrap_or_default()).into());
    }

    let (ctx, mut ready) = Ctx::new(target, common);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for index in 0..common.connections {
        let (ctx, stop_rx) = (ctx.clone(), stop_rx.clone());
        tasks.spawn(connection(ctx, index, stop_rx, None));
    }
    let setup = wait_setup(&mut ready, common).await;
    if setup.ok > 0 {
        sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let alive = setup.ok.saturating_sub(ctx.dropped.load(Ordering::Relaxed));
    let rss_after = pid.and_then(rss_bytes);
    let _ = stop.send(true);
    let outcomes = join_all(tasks).await;
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;

    let per_conn = match (rss_before, rss_after) {
        (Some(before), Some(after)) if alive > 0 => {
            Some((after as f64 - before as f64) / alive as f64)
        }
        _ => None,
    };
    emit(&format!(
        "idle    conns={:<6} ok={:<6} failed={:<5} dropped={:<5} setup={:>6.2}s ({:.0} conns/s)  rss {} -> {} = {} /conn",
        common.connections,
        setup.ok,
        setup.failed,
        dropped,
        setup.secs,
        setup.ok as f64 / setup.secs.max(1e-9),
        human_bytes(rss_before.map(|b| b as f64)),
        human_bytes(rss_after.map(|b| b as f64)),
        human_bytes(per_conn),
    ));
    let report = json!({
        "scenario": "idle",
        "url": common.url,
        "server_pid": pid,
        "connections": common.connections,
        "authenticated": setup.ok,
        "failed": setup.failed,
        "dropped": dropped,
        "setup_secs": round3(setup.secs),
        "hold_secs": args.hold_secs,
        "rss_baseline_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_conn": per_conn.map(f64::round),
    });
    emit(&report.to_string());
    Ok(exit_code(setup.ok))
}

/// `mesa bench fanout`.
async fn fanout(args: FanoutArgs) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let target = Target::resolve(&common.url).await?;
    let pid = common.server_pid;
    if let Some(pid) = pid {
        if cpu_ticks(&pid.to_string()).is_none() {
            return Err(format!("cannot read /proc/{pid}/stat").into());
        }
    }
    let messages = u64::from(args.messages);

    let (ctx, mut ready) = Ctx::new(target, common);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for index in 0..common.connections {
        let (ctx, stop_rx) = (ctx.clone(), stop_rx.clone());
        let tally = Tally::new(messages, true);
        tasks.spawn(connection(ctx, index, stop_rx, Some(tally)));
    }
    let setup = wait_setup(&mut ready, common).await;
    let publisher = timeout(
        Duration::from_secs(common.connect_timeout_secs),
        open(&ctx.target, common.connections, "publisher"),
    )
    .await
    .map_err(|_| "the publisher timed out connecting".to_owned())
    .and_then(|opened| opened.map_err(|error| format!("the publisher failed: {error}")));
    let mut publisher = match publisher {
        Ok(ws) => ws,
        Err(error) => {
            let _ = stop.send(true);
            join_all(tasks).await;
            return Err(error.into());
        }
    };

    // The measured phase: publish, then wait for the subscribers to catch up.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let cpu_before = pid.and_then(|pid| cpu_ticks(&pid.to_string()));
    let gen_cpu_before = cpu_ticks("self");
    let start_us = ctx.now_us();
    let mut own = Tally::new(messages, false);
    let published = publish(&ctx, &mut publisher, &mut own, &args, deadline).await;
    let expected = (setup.ok + 1) * messages;
    let mut last_progress = (ctx.received.load(Ordering::Relaxed), Instant::now());
    loop {
        let received = ctx.received.load(Ordering::Relaxed);
        if received >= expected || Instant::now() >= deadline {
            break;
        }
        if received != last_progress.0 {
            last_progress = (received, Instant::now());
        } else if last_progress.1.elapsed() >= QUIET_TIMEOUT {
            break;
        }
        sleep(Duration::from_millis(2)).await;
    }
    let cpu_after = pid.and_then(|pid| cpu_ticks(&pid.to_string()));
    let gen_cpu_after = cpu_ticks("self");
    let rss_after = pid.and_then(rss_bytes);

    let _ = stop.send(true);
    let ((), outcomes) = tokio::join!(close(&mut publisher), join_all(tasks));
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;
    let mut total = own;
    for tally in outcomes.into_iter().filter_map(|o| o.tally) {
        total.merge(tally);
    }

    let elapsed = total.last_us.saturating_sub(start_us) as f64 / 1e6;
    let rate = if elapsed > 0.0 {
        total.received as f64 / elapsed
    } else {
        0.0
    };
    let lost = expected.saturating_sub(total.received);
    let server_cpu = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / CLOCK_TICKS_PER_SEC)
        }
        _ => None,
    };
    let gen_cpu = match (gen_cpu_before, gen_cpu_after) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / CLOCK_TICKS_PER_SEC)
        }
        _ => None,
    };
    let per_cpu = server_cpu
        .filter(|&secs| secs > 0.0)
        .map(|secs| total.received as f64 / secs);
    let (p50, p99, max) = (
        total.latency.quantile(0.50),
        total.latency.quantile(0.99),
        total.latency.max(),
    );
    emit(&format!(
        "fanout  conns={:<6} ok={:<6} failed={:<5} dropped={:<5} msgs={} window={} published={}  {:.0} deliveries/s in {:.2}s  lost={} dup={}  latency p50={} p99={} max={}  server cpu={} ({} deliveries/cpu-s)  generator cpu={}",
        common.connections,
        setup.ok,
        setup.failed,
        dropped,
        messages,
        args.window,
        published,
        rate,
        elapsed,
        lost,
        total.duplicated,
        human_micros(p50),
        human_micros(p99),
        human_micros(max),
        server_cpu.map_or("-".to_owned(), |secs| format!("{secs:.2}s")),
        per_cpu.map_or("-".to_owned(), |rate| format!("{rate:.0}")),
        gen_cpu.map_or("-".to_owned(), |secs| format!("{secs:.2}s")),
    ));
    let report = json!({
        "scenario": "fanout",
        "url": common.url,
        "server_pid": pid,
        "connections": common.connections,
        "authenticated": setup.ok,
        "failed": setup.failed,
        "dropped": dropped,
        "setup_secs": round3(setup.secs),
        "messages": messages,
        "window": args.window,
        "published": published,
        "expected": expected,
        "received": total.received,
        "lost": lost,
        "duplicated": total.duplicated,
        "unexpected": total.unexpected,
        "elapsed_secs": round3(elapsed),
        "deliveries_per_sec": rate.round(),
        "latency_p50_us": p50,
        "latency_p99_us": p99,
        "latency_max_us": max,
        "server_cpu_secs": server_cpu,
        "deliveries_per_server_cpu_sec": per_cpu.map(f64::round),
        "generator_cpu_secs": gen_cpu,
        "rss_after_bytes": rss_after,
    });
    emit(&report.to_string());
    Ok(exit_code(setup.ok))
}

/// Send `args.messages` BROADCASTs with at most `args.window` in flight; a message is
/// completed when the publisher receives it back. Returns how many were sent.
async fn publish(
    ctx: &Ctx,
    ws: &mut Ws,
    own: &mut Tally,
    args: &FanoutArgs,
    deadline: Instant,
) -> u64 {
    let (messages, window) = (u64::from(args.messages), u64::from(args.window));
    let (mut sent, mut in_flight) = (0_u64, 0_u64);
    while own.received < messages {
        if in_flight < window && sent < messages {
            while in_flight < window && sent < messages {
                let text = format!(
                    r#"{{"op":0,"t":"BROADCAST","d":{{"ts":{},"seq":{sent}}}}}"#,
                    ctx.now_us()
                );
                if ws.feed(WsMessage::text(text)).await.is_err() {
                    eprintln!("mesa bench: the publisher's connection failed while sending");
                    return sent;
                }
                sent += 1;
                in_flight += 1;
            }
            if ws.flush().await.is_err() {
                eprintln!("mesa bench: the publisher's connection failed while sending");
                return sent;
            }
        }
        let frame = match timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => {
                eprintln!("mesa bench: the publisher's connection ended");
                return sent;
            }
            Err(_) => {
                eprintln!("mesa bench: the publishing phase timed out");
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
            Parsed::Broadcast { seq, ts } => {
                if own.record(ctx, seq, ts) {
                    in_flight = in_flight.saturating_sub(1);
                }
            }
            Parsed::Other(_) => {}
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
}

impl Target {
    /// Resolve `url` (`ws://host:port/path`), preferring an IPv4 address.
    async fn resolve(url: &str) -> Result<Self, Failure> {
        let uri: Uri = url
            .parse()
            .map_err(|error| Failure::usage(format!("invalid --url `{url}`: {error}")))?;
        if uri.scheme_str() != Some("ws") {
            return Err(Failure::usage(format!(
                "--url `{url}` must start with ws:// (the generator does not speak TLS)"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| Failure::usage(format!("--url `{url}` has no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
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
        })
    }

    /// The source address of connection `index` (127.0.0.2..=127.0.0.254).
    fn source(index: u32) -> Ipv4Addr {
        // The remainder is below 253, so the octet is at most 254.
        Ipv4Addr::new(127, 0, 0, 2 + (index % 253) as u8)
    }
}

/// What the connection tasks share with the scenario.
struct Ctx {
    /// Where to connect.
    target: Target,
    /// Bounds the connections being set up at once.
    setup: Semaphore,
    /// How long one connection gets to connect and authenticate.
    connect_timeout: Duration,
    /// Each connection reports here once: authenticated, or why not.
    ready: mpsc::UnboundedSender<Result<(), String>>,
    /// Distinct BROADCASTs received, over all connections (the fanout's progress).
    received: AtomicU64,
    /// Connections that the server closed (or that failed) after authenticating.
    dropped: AtomicU64,
    /// The shared clock of the message timestamps.
    epoch: Instant,
}

impl Ctx {
    /// The shared state, and the receiving end of the setup reports.
    fn new(
        target: Target,
        common: &CommonArgs,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Result<(), String>>) {
        let (ready, reports) = mpsc::unbounded_channel();
        let ctx = Ctx {
            target,
            setup: Semaphore::new(common.concurrency as usize),
            connect_timeout: Duration::from_secs(common.connect_timeout_secs),
            ready,
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        (Arc::new(ctx), reports)
    }

    /// Microseconds since the epoch.
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// How one connection ended.
struct Outcome {
    /// It authenticated, then the server closed it or it failed before the end.
    dropped: bool,
    /// What it received (fanout only).
    tally: Option<Tally>,
}

/// Connect, authenticate, then idle until `stop` (answering heartbeats, counting
/// BROADCASTs into `tally`), then close.
async fn connection(
    ctx: Arc<Ctx>,
    index: u32,
    mut stop: watch::Receiver<bool>,
    mut tally: Option<Tally>,
) -> Outcome {
    let failed = Outcome {
        dropped: false,
        tally: None,
    };
    let opened = {
        let Ok(_permit) = ctx.setup.acquire().await else {
            return failed;
        };
        timeout(
            ctx.connect_timeout,
            open(&ctx.target, index, &format!("u{index}")),
        )
        .await
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
    let _ = ctx.ready.send(Ok(()));

    let mut dropped = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            frame = ws.next() => match frame {
                Some(Ok(WsMessage::Text(text))) => match parse(text.as_str()) {
                    Parsed::Heartbeat => {
                        if ws.send(heartbeat_ack()).await.is_err() {
                            dropped = true;
                            break;
                        }
                    }
                    Parsed::Broadcast { seq, ts } => {
                        if let Some(tally) = tally.as_mut() {
                            tally.record(&ctx, seq, ts);
                        }
                    }
                    Parsed::Other(_) => {}
                },
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
    Outcome { dropped, tally }
}

/// Connect (from the source address of `index` on loopback), read the hello,
/// authenticate with `token` and wait for op 22.
async fn open(target: &Target, index: u32, token: &str) -> Result<Ws, String> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|error| format!("socket: {error}"))?;
    if target.spread {
        socket
            .bind(SocketAddr::from((Target::source(index), 0)))
            .map_err(|error| format!("bind: {error}"))?;
    }
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
    let (mut ws, _) = async_tungstenite::client_async_with_config(
        target.url.as_str(),
        stream.compat(),
        Some(config),
    )
    .await
    .map_err(|error| format!("handshake: {error}"))?;

    match next_parsed(&mut ws).await? {
        Parsed::Other(10) => {}
        other => return Err(format!("expected the hello (op 10) first, got {other:?}")),
    }
    let auth = json!({"op": 2, "d": {"token": token}}).to_string();
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

/// What the generator sees set up so far.
struct Setup {
    /// Connections that authenticated.
    ok: u64,
    /// Connections that did not (in time).
    failed: u64,
    /// Seconds the setup phase took.
    secs: f64,
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
                eprintln!("mesa bench: {pending} connections still not set up at the deadline");
                break;
            }
        }
        reported += 1;
    }
    let mut errors: Vec<(String, u64)> = errors.into_iter().collect();
    errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (error, count) in errors.iter().take(ERRORS_SHOWN) {
        eprintln!("mesa bench: {count} connections failed: {error}");
    }
    Setup {
        ok,
        failed: total - ok,
        secs: started.elapsed().as_secs_f64(),
    }
}

/// Wait (a bounded time) for every connection task, then abort the rest.
async fn join_all(mut tasks: JoinSet<Outcome>) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(tasks.len());
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while let Ok(Some(joined)) = timeout_at(deadline, tasks.join_next()).await {
        if let Ok(outcome) = joined {
            outcomes.push(outcome);
        }
    }
    if !tasks.is_empty() {
        eprintln!(
            "mesa bench: {} connections did not close in time",
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
    /// A BROADCAST of the fanout (op 0 with `d.seq` and `d.ts`).
    Broadcast {
        /// The publisher's sequence number.
        seq: u64,
        /// When it was sent, in microseconds since the generator's epoch.
        ts: u64,
    },
    /// Any other opcode (or -1 when the frame is not a Mesa message).
    Other(i64),
}

/// The fields of a Mesa message that the generator reads; the rest is skipped.
#[derive(Deserialize)]
struct Frame<'a> {
    /// The opcode.
    op: i64,
    /// The type of a dispatch.
    #[serde(default, borrow)]
    t: Option<Cow<'a, str>>,
    /// The data, when it has the fanout's shape.
    #[serde(default)]
    d: Option<FanoutData>,
}

/// The data of a fanout BROADCAST.
#[derive(Deserialize)]
struct FanoutData {
    /// When it was sent.
    ts: Option<u64>,
    /// The publisher's sequence number.
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
                Some(FanoutData {
                    ts: Some(ts),
                    seq: Some(seq),
                }),
        }) if t == "BROADCAST" => Parsed::Broadcast { seq, ts },
        Ok(frame) => Parsed::Other(frame.op),
        Err(_) => match serde_json::from_str::<OpOnly>(text) {
            Ok(OpOnly { op: 1 }) => Parsed::Heartbeat,
            Ok(OpOnly { op }) => Parsed::Other(op),
            Err(_) => Parsed::Other(-1),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Counting

/// What one connection of the fanout received.
struct Tally {
    /// The messages of the run.
    messages: u64,
    /// Which sequence numbers arrived (a bit set).
    seen: Vec<u64>,
    /// Distinct sequence numbers received.
    received: u64,
    /// Sequence numbers received again.
    duplicated: u64,
    /// Sequence numbers out of range.
    unexpected: u64,
    /// When the last message arrived, in microseconds since the epoch.
    last_us: u64,
    /// Whether to record latencies (the publisher's round trips are not).
    record_latency: bool,
    /// Receive time minus send time.
    latency: Histogram,
}

impl Tally {
    /// An empty tally for a run of `messages`.
    fn new(messages: u64, record_latency: bool) -> Self {
        Tally {
            messages,
            seen: Vec::new(),
            received: 0,
            duplicated: 0,
            unexpected: 0,
            last_us: 0,
            record_latency,
            latency: Histogram::default(),
        }
    }

    /// Count message `seq` sent at `ts`; whether it was new.
    fn record(&mut self, ctx: &Ctx, seq: u64, ts: u64) -> bool {
        let now = ctx.now_us();
        self.last_us = self.last_us.max(now);
        if seq >= self.messages {
            self.unexpected += 1;
            return false;
        }
        if self.seen.is_empty() {
            self.seen = vec![0; self.messages.div_ceil(64) as usize];
        }
        let (word, bit) = ((seq / 64) as usize, 1_u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
            return false;
        }
        self.seen[word] |= bit;
        self.received += 1;
        ctx.received.fetch_add(1, Ordering::Relaxed);
        if self.record_latency {
            self.latency.record(now.saturating_sub(ts));
        }
        true
    }

    /// Add `other`'s counts to these.
    fn merge(&mut self, other: Tally) {
        self.received += other.received;
        self.duplicated += other.duplicated;
        self.unexpected += other.unexpected;
        self.last_us = self.last_us.max(other.last_us);
        self.latency.merge(&other.latency);
    }
}

/// Bits of the sub-bucket within a power of two: 32 sub-buckets, about 3% precision.
const SUB_BITS: u32 = 5;

/// Values below this are counted exactly.
const EXACT: u64 = 2 << SUB_BITS;

/// A log-linear histogram of microseconds: exact below 64, then 32 buckets per power
/// of two; allocated at the first value.
#[derive(Default)]
struct Histogram {
    /// The counts per bucket.
    counts: Vec<u64>,
    /// How many values.
    total: u64,
    /// The largest value.
    max: u64,
}

impl Histogram {
    /// The bucket of `value`.
    fn index(value: u64) -> usize {
        if value < EXACT {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros(); // at least SUB_BITS + 1
        let shift = exponent - SUB_BITS;
        let top = value >> shift; // in 32..64
        (EXACT + u64::from(shift - 1) * (1 << SUB_BITS) + (top - (1 << SUB_BITS))) as usize
    }

    /// The middle of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT {
            return index;
        }
        let shift = (index - EXACT) / (1 << SUB_BITS) + 1;
        let top = (index - EXACT) % (1 << SUB_BITS) + (1 << SUB_BITS);
        (top << shift) + (1 << (shift - 1))
    }

    /// Count `value`.
    fn record(&mut self, value: u64) {
        let index = Self::index(value);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Add `other`'s values.
    fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), or `None` when empty.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::value(index).min(self.max));
            }
        }
        Some(self.max)
    }

    /// The largest value, or `None` when empty.
    fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }
}

// ---------------------------------------------------------------------------------------
// The server process and the output

/// The resident memory of process `pid` (VmRSS in /proc/PID/status), in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU time of process `pid` (a number or `self`), user plus system, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces and parentheses) start
    // with field 3 (state); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Print `line` on stdout and flush it; a closed stdout is not worth a panic.
fn emit(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Exit 1 when no connection could be set up: nothing was measured.
fn exit_code(ok: u64) -> ExitCode {
    if ok == 0 {
        eprintln!("mesa bench: no connection was set up");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Round to three decimals (for the JSON line).
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `12.3 MiB`, or `-` when unknown.
fn human_bytes(bytes: Option<f64>) -> String {
    match bytes {
        None => "-".to_owned(),
        Some(bytes) if bytes.abs() >= 1024.0 * 1024.0 => {
            format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
        }
        Some(bytes) if bytes.abs() >= 1024.0 => format!("{:.1} KiB", bytes / 1024.0),
        Some(bytes) => format!("{bytes:.0} B"),
    }
}

/// `1.23ms`, or `-` when unknown.
fn human_micros(micros: Option<u64>) -> String {
    match micros {
        None => "-".to_owned(),
        Some(us) if us >= 1000 => format!("{:.2}ms", us as f64 / 1000.0),
        Some(us) => format!("{us}us"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_ordered_and_close() {
        let mut previous = 0;
        for value in [
            0,
            1,
            63,
            64,
            65,
            100,
            1000,
            12_345,
            1 << 20,
            u64::from(u32::MAX),
        ] {
            let index = Histogram::index(value);
            assert!(index >= previous, "{value}");
            previous = index;
            let middle = Histogram::value(index);
            let error = (middle as f64 - value as f64).abs() / (value.max(1) as f64);
            assert!(error <= 0.04, "{value} -> {middle}");
        }
    }

    #[test]
    fn quantiles() {
        let mut histogram = Histogram::default();
        for value in 1..=1000 {
            histogram.record(value);
        }
        let p50 = histogram.quantile(0.5).unwrap_or_default();
        assert!((485..=515).contains(&p50), "{p50}");
        assert_eq!(histogram.max(), Some(1000));
    }

    #[test]
    fn parses_what_it_needs() {
        assert!(matches!(parse(r#"{"op":1,"d":{}}"#), Parsed::Heartbeat));
        assert!(matches!(
            parse(r#"{"op":0,"t":"BROADCAST","d":{"ts":5,"seq":7}}"#),
            Parsed::Broadcast { seq: 7, ts: 5 }
        ));
        assert!(matches!(
            parse(r#"{"op":10,"d":{"rules":["a"],"c_heartbeat_interval":10000}}"#),
            Parsed::Other(10)
        ));
        assert!(matches!(parse(r#"{"op":22,"d":"x"}"#), Parsed::Other(22)));
        assert!(matches!(parse("nope"), Parsed::Other(-1)));
    }
}
