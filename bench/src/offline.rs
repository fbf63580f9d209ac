//! `mesa-bench offline`: one send to N ids connected nowhere (sync on), while
//! bystander connections keep doing ECHO round trips. Reported: the memory the send
//! costs (peak VmRSS growth, read every 20 ms), how long until a copy is stored for
//! every id (`HLEN` of the run's `undelivered_messages`, read every 20 ms), the CPU
//! time of this process and of Redis meanwhile, and the bystanders' ECHO latency
//! during a baseline phase without the send and while it is stored (by the time each
//! ECHO was sent), with the ratio of the p99s.
//!
//! The server runs inside the generator's process, built with the library
//! (`mesa_tokio::server()` with a cluster on `--redis` and sync), and the message is
//! sent with `ServerHandle::send_to`: a client's relay BROADCAST would not do, since
//! its stored copy would hold the whole recipient list (`d.to`), and the point is one
//! small message to many ids. So the memory reported is this process's (VmRSS of
//! /proc/self/status): the bystanders' side of it is set up before the first reading
//! and does not grow with the send. The ids list itself is built before that reading
//! too; what grows is the server's work on it.
//!
//! Every run uses a namespace of its own on `--redis` and deletes its keys at the end.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::StreamExt;
use mesa_tokio::BoxError;
use mesa_tokio::SyncConfig;
use mesa_tokio::{ClusterConfig, DevAuthenticator, Limits, Message, Middleware};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep, timeout};

use super::stats::rss_bytes;
use super::{
    CommonArgs, Ctx, Histogram, Kind, Parsed, close, cpu_secs, dispatch_at, emit, heartbeat_ack,
    human_bytes, human_secs, join_all, open, own_cpu_ticks, parse, round3,
};
use crate::Failure;

/// How often the storing phase reads Redis's count of stored ids and the memory.
const POLL: Duration = Duration::from_millis(20);

/// How long the server's Redis link gets to come up.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// An ECHO that goes out later than this after it was due (microseconds) was held up
/// by a stall, not by the timer's resolution.
const HELD_UP_US: u64 = 2_000;

/// How long the ECHOs still in flight get once the storing is done.
const DRAIN: Duration = Duration::from_millis(300);

/// Options of `mesa-bench offline`.
#[derive(Debug, clap::Args)]
pub(super) struct OfflineArgs {
    /// The Redis of the in-process server (a fresh namespace per run, deleted at the end).
    #[arg(long)]
    redis: String,

    /// Ids the one send goes to, none of them connected (`offline<i>`).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    recipients: u32,

    /// Bytes of the message's data (a string of this length).
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,

    /// Bystander connections doing ECHO round trips (`u<i>`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    bystanders: u32,

    /// Milliseconds between two ECHOs of one bystander (an open loop: the bystanders
    /// load the server moderately instead of saturating it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    echo_every_ms: u64,

    /// Seconds of ECHOs without the send, for the baseline latency.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    baseline_secs: u64,

    /// Seconds the copies get to be stored.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// What the in-process server tells the generator.
#[derive(Default)]
struct Observer {
    /// The Redis link is up.
    link_up: AtomicBool,
    /// Copies stored, as the server counted them (`on_stored`).
    stored: AtomicU64,
}

/// Shares an [`Observer`] with the server as its middleware.
#[derive(Clone, Default)]
struct Observe(Arc<Observer>);

impl Middleware for Observe {
    fn on_cluster_link(&self, up: bool) -> Result<(), BoxError> {
        self.0.link_up.store(up, Ordering::SeqCst);
        Ok(())
    }

    fn on_stored(&self, stored: usize, _dropped: usize) -> Result<(), BoxError> {
        self.0.stored.fetch_add(stored as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// Run `mesa-bench offline`.
pub(super) async fn run(args: OfflineArgs) -> Result<ExitCode, Failure> {
    let namespace = format!(
        "bench_offline_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis())
    );
    let client = redis::Client::open(args.redis.as_str())
        .map_err(|error| Failure::usage(format!("invalid --redis `{}`: {error}", args.redis)))?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|error| format!("cannot reach Redis at {}: {error}", args.redis))?;

    let observe = Observe::default();
    let mut cluster = ClusterConfig::new(args.redis.clone());
    cluster.namespace = Some(namespace.clone());
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .authenticate(DevAuthenticator)
        .limits(Limits {
            max_messages_per_second: 1_000_000,
            max_message_burst: 1_000_000,
            ..Limits::default()
        })
        .cluster(cluster)
        .sync(SyncConfig::default())
        .middleware(observe.clone())
        .build()
        .map_err(|error| format!("cannot build the server: {error}"))?;
    let listening = server
        .bind("127.0.0.1:0".parse().expect("a socket address"))
        .await
        .map_err(|error| format!("cannot listen: {error}"))?;
    let url = format!("ws://{}/", listening.local_addr());
    tokio::spawn(listening.run());
    let deadline = Instant::now() + LINK_TIMEOUT;
    while !observe.0.link_up.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            return Err(
                format!("the server's Redis link did not come up in {LINK_TIMEOUT:?}").into(),
            );
        }
        sleep(POLL).await;
    }

    let common = CommonArgs {
        urls: vec![url],
        connections: args.bystanders,
        server_pids: Vec::new(),
        bare: false,
        concurrency: 200,
        connect_timeout_secs: 30,
        setup_timeout_secs: 300,
        ca_cert: None,
    };
    let (ctx, _reports) = Ctx::new(&common).await?;
    let (stop, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let every = Duration::from_millis(args.echo_every_ms);
    let mut tasks = JoinSet::new();
    for index in 0..args.bystanders {
        let (ctx, stop, ready) = (ctx.clone(), stop_rx.clone(), ready_tx.clone());
        let offset = every * index / args.bystanders;
        tasks.spawn(bystander(ctx, index, every, offset, stop, ready));
    }
    drop(ready_tx);
    let mut connected = 0;
    while let Some(outcome) = ready.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(error) => eprintln!("mesa-bench: a bystander failed: {error}"),
        }
        if connected == args.bystanders {
            break;
        }
    }
    if connected < args.bystanders {
        let _ = stop.send(true);
        join_all(tasks).await;
        return Err(format!(
            "only {connected} of {} bystanders connected",
            args.bystanders
        )
        .into());
    }

    let text = "x".repeat(args.message_bytes);
    let message = Message::dispatch("NOTE", json!({ "text": text }));
    let ids: Vec<String> = (0..args.recipients)
        .map(|i| format!("offline{i}"))
        .collect();
    let key = format!("undelivered_messages_{namespace}");
    let recipients = u64::from(args.recipients);

    let baseline_cpu_before = own_cpu_ticks();
    sleep(Duration::from_secs(args.baseline_secs)).await;
    let me = std::process::id();
    let redis_cpu_before = redis_cpu(&mut redis).await;
    let cpu_before = own_cpu_ticks();
    let baseline_cpu = cpu_secs(baseline_cpu_before, cpu_before);
    let rss_before = rss_bytes(me);
    let mut rss_peak = rss_before;
    let send_at = ctx.now_us();
    let started = Instant::now();
    // On a worker thread, as an application's task (or a connection's, relaying a
    // client's message) would call it. The caller's share of the work is routing
    // the ids: the local connections among them, and the absent ones.
    let handle = server.handle();
    let send_call = tokio::spawn(async move {
        let called = Instant::now();
        let _ = handle.send_to(&message, ids, &[]);
        called.elapsed().as_secs_f64()
    })
    .await
    .map_err(|error| format!("the send panicked: {error}"))?;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut stored = 0_u64;
    let mut read_errors = 0_u64;
    while stored < recipients && Instant::now() < deadline {
        sleep(POLL).await;
        rss_peak = rss_peak.max(rss_bytes(me));
        match redis::cmd("HLEN")
            .arg(&key)
            .query_async::<u64>(&mut redis)
            .await
        {
            Ok(count) => stored = count,
            Err(_) => read_errors += 1,
        }
    }
    let store_secs = started.elapsed().as_secs_f64();
    let stored_at = ctx.now_us();
    let rss_after = rss_bytes(me);
    let cpu = cpu_secs(cpu_before, own_cpu_ticks());
    let redis_cpu = match (redis_cpu_before, redis_cpu(&mut redis).await) {
        (Some(before), Some(after)) => Some(round3(after - before)),
        _ => None,
    };
    sleep(DRAIN).await;
    let _ = stop.send(true);
    let samples = join_all(tasks).await;

    let (mut baseline, mut during) = (Histogram::default(), Histogram::default());
    let mut dropped = 0_u64;
    for outcome in samples {
        let Ok(samples) = outcome else {
            dropped += 1;
            continue;
        };
        for (sent, rtt) in samples {
            if sent < send_at {
                baseline.record(rtt);
            } else if sent < stored_at {
                during.record(rtt);
            }
        }
    }
    let sample_ok = match redis::cmd("HGET")
        .arg(&key)
        .arg(format!("offline{}", args.recipients - 1))
        .query_async::<Option<String>>(&mut redis)
        .await
    {
        Ok(Some(raw)) => serde_json::from_str::<serde_json::Value>(&raw)
            .ok()
            .and_then(|array| array.get(0).cloned())
            .is_some_and(|first| {
                first["d"]["text"].as_str().map(str::len) == Some(args.message_bytes)
            }),
        _ => false,
    };
    server.shutdown_gracefully(Duration::from_secs(5)).await;
    forget(&mut redis, &namespace).await;

    let growth = match (rss_before, rss_peak) {
        (Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    let p99 = |h: &Histogram| h.quantile(0.99);
    let ratio = match (p99(&baseline), p99(&during)) {
        (Some(base), Some(now)) if base > 0 => Some(now as f64 / base as f64),
        _ => None,
    };
    let reported = observe.0.stored.load(Ordering::SeqCst);
    let complete = stored == recipients;
    emit(&format!(
        "offline recipients={} message={}B bystanders={} (every {}ms)  send_to {:.0}ms  stored={}{} in {:.2}s  cpu: process {} redis {}  rss +{} (peak)  echo baseline {}  during {}  p99 x{}",
        args.recipients,
        args.message_bytes,
        args.bystanders,
        args.echo_every_ms,
        send_call * 1000.0,
        stored,
        if complete { "" } else { " (incomplete)" },
        store_secs,
        human_secs(cpu),
        human_secs(redis_cpu),
        human_bytes(growth.map(|b| b as f64)),
        baseline.human(),
        during.human(),
        ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
    ));
    emit(
        &json!({
            "scenario": "offline",
            "recipients": args.recipients,
            "message_bytes": args.message_bytes,
            "bystanders": args.bystanders,
            "echo_every_ms": args.echo_every_ms,
            "dropped": dropped,
            "stored": stored,
            "stored_reported": reported,
            "complete": complete,
            "sample_ok": sample_ok,
            "send_call_secs": round3(send_call),
            "store_secs": round3(store_secs),
            "redis_read_errors": read_errors,
            "baseline_secs": args.baseline_secs,
            "baseline_process_cpu_secs": baseline_cpu,
            "process_cpu_secs": cpu,
            "redis_cpu_secs": redis_cpu,
            "rss_before_bytes": rss_before,
            "rss_peak_bytes": rss_peak,
            "rss_after_bytes": rss_after,
            "rss_growth_bytes": growth,
            "baseline_p50_us": baseline.quantile(0.50),
            "baseline_p99_us": p99(&baseline),
            "during_p50_us": during.quantile(0.50),
            "during_p99_us": p99(&during),
            "during_max_us": during.max(),
            "during_samples": during.count(),
            "p99_ratio": ratio.map(round3),
        })
        .to_string(),
    );
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        eprintln!("mesa-bench: {stored} of {recipients} copies stored in time");
        ExitCode::FAILURE
    })
}

/// One bystander: connect as `u<index>`, then send an ECHO every `every` (the first
/// after `offset`, so that the bystanders' ECHOs spread over the period) until told
/// to stop. Returns (due time, round trip from it) of every ECHO answered, in
/// microseconds.
async fn bystander(
    ctx: Arc<Ctx>,
    index: u32,
    every: Duration,
    offset: Duration,
    mut stop: watch::Receiver<bool>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
) -> Result<Vec<(u64, u64)>, String> {
    let opened = timeout(ctx.connect_timeout, open(&ctx, index, &format!("u{index}"))).await;
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            let _ = ready.send(Err(error.clone()));
            return Err(error);
        }
        Err(_) => {
            let error = "timed out connecting and authenticating".to_owned();
            let _ = ready.send(Err(error.clone()));
            return Err(error);
        }
    };
    let _ = ready.send(Ok(()));
    // The ECHOs a stall held up go out at once when it ends, stamped with the time
    // they were due: a stall of this process (the server's, too) shows in the
    // latency instead of in fewer samples. The others are stamped when they go out,
    // which leaves the timer's resolution (1 ms) out of the figures.
    let mut ticks = tokio::time::interval_at(Instant::now() + offset, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut samples = Vec::new();
    let mut seq = 0_u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            due = ticks.tick() => {
                let due = u64::try_from(due.saturating_duration_since(ctx.epoch).as_micros())
                    .unwrap_or(u64::MAX);
                let now = ctx.now_us();
                let stamp = if now > due + HELD_UP_US { due } else { now };
                if ws.send(dispatch_at("ECHO", stamp, seq)).await.is_err() {
                    return Err("the connection failed while sending".to_owned());
                }
                seq += 1;
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(WsMessage::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    _ => return Err("the server closed the connection".to_owned()),
                };
                match parse(text.as_str()) {
                    Parsed::Heartbeat if ws.send(heartbeat_ack()).await.is_err() => {
                        return Err("the connection failed while sending".to_owned());
                    }
                    Parsed::Dispatch { kind: Kind::Echo, ts, .. } => {
                        samples.push((ts, ctx.now_us().saturating_sub(ts)));
                    }
                    _ => {}
                }
            }
        }
    }
    close(&mut ws).await;
    Ok(samples)
}

/// The CPU time Redis has used (`INFO cpu`: user plus system), in seconds.
async fn redis_cpu(redis: &mut redis::aio::MultiplexedConnection) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(redis)
        .await
        .ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Delete every key of `namespace` (`<key>_<namespace>`) on the bench's Redis.
async fn forget(redis: &mut redis::aio::MultiplexedConnection, namespace: &str) {
    let pattern = format!("*_{namespace}");
    let mut cursor = 0_u64;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await
        else {
            eprintln!("mesa-bench: cannot list the run's keys in Redis (namespace {namespace})");
            return;
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(redis).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
