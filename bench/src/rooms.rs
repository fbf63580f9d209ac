//! `mesa-bench rooms`: room members spread over the replicas of a cluster (see
//! [`Membership`]), and messages published at a fixed rate, one per room in turn,
//! either to the room (`--send rooms`: the room's own channel, which only replicas
//! with a member subscribe to) or to the room's members' ids (`--send ids`: the one
//! channel every replica reads, today's way without rooms). Reported per replica from
//! its metrics: the share of the envelopes it received from Redis that were for
//! nobody there (unneeded), beside the share the membership predicts for the shared
//! channel; and deliveries per server CPU-second, latency (from when each message
//! was due), and the servers' memory per room membership (VmRSS with every member in
//! its rooms minus before any subscribed).
//!
//! By default the messages go through a [`Dispatcher`] on the cluster's Redis rather
//! than a client's `mesa:publish` (`--via replicas`, see [`Publisher`]): one PUBLISH
//! per message on one multiplexed connection costs the generator (which shares the
//! cores) less than WebSocket publishers, the servers' CPU is then the delivery alone,
//! the same for both kinds of send and any number of replicas, and an envelope
//! without an origin is judged by interest alone (a replica gets its own room
//! publishes back from Redis and counts them as unneeded).
//!
//! `--legacy-bus off` has the Dispatcher route sends to ids by interest (replicas
//! started with `mesa serve --legacy-bus off`), and several `--redis` shard the
//! cluster over them (`mesa serve --redis A,B`); every run reports Redis's commands
//! per send and its CPU time (`INFO`), and deliveries per Redis CPU-second.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesa_tokio::Dispatcher;
use mesa_tokio::recovery::RecoveryConfig;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use super::membership::Membership;
use super::publisher::{Publication, Publisher, Via};
use super::redis_info;
use super::scrape::{ClusterFigures, cluster_figures};
use super::stats::human_bytes;
use super::{
    CommonArgs, CpuMeter, Ctx, Delivered, Phase, Probe, QUIET_TIMEOUT, Role, Tally, emit,
    exit_code, join_all, report, round3, spawn_connections, wait_deliveries, wait_setup,
};
use crate::Failure;

/// How often the subscription phase looks at the confirmations and Redis's channels.
const POLL: Duration = Duration::from_millis(20);

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum SendTo {
    /// The room: its channel reaches the replicas with a member.
    Rooms,
    /// The members' ids, over the channel every replica reads.
    Ids,
}

impl SendTo {
    /// The option's value, for the report.
    fn name(self) -> &'static str {
        match self {
            SendTo::Rooms => "rooms",
            SendTo::Ids => "ids",
        }
    }
}

/// Options of `mesa-bench rooms`.
#[derive(Debug, clap::Args)]
pub(super) struct RoomsArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// The cluster's Redis: messages are published there (a `Dispatcher`), and the
    /// replicas' room subscriptions are awaited there (`PUBSUB NUMSUB`). Several
    /// (repeated, or comma-separated, in the replicas' order) shard the cluster.
    #[arg(long, required = true, value_delimiter = ',')]
    redis: Vec<String>,

    /// `on`: the Dispatcher publishes sends to ids on the shared channel; `off`:
    /// only to the replicas that hold them (which need `mesa serve --legacy-bus off`).
    #[arg(
        long = "legacy-bus",
        value_name = "on|off",
        default_value = "on",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    legacy_bus: bool,

    /// A replica's metrics (`mesa serve --metrics-listen`), e.g.
    /// `http://127.0.0.1:9001/metrics`: one per --url, in the same order.
    #[arg(long = "metrics", required = true)]
    metrics: Vec<String>,

    /// How many rooms.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    rooms: u32,

    /// Members per room; a connection is in about rooms × members / connections rooms.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    members: u32,

    /// Room `r` has members on `1 + r mod N` replicas (default: every replica count,
    /// in equal numbers; 1 keeps each room on one replica).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_spread: Option<u32>,

    /// Send each message to its room, or to the room's members' ids.
    #[arg(long, value_enum, default_value_t = SendTo::Rooms)]
    send: SendTo,

    /// Publish through a Dispatcher on --redis, or through a client on each replica
    /// (`mesa:publish`, or a relay BROADCAST with `d.to`; needs `mesa serve --rooms
    /// open` and no rate limit in the way).
    #[arg(long, value_enum, default_value_t = Via::Dispatcher)]
    via: Via,

    /// How many messages (message `i` goes to room `i mod rooms`).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,

    /// Messages per second (an open loop).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,

    /// Seconds to let the servers settle before each memory reading.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,

    /// Rooms that keep their last messages (`mesa serve --recover-rooms`, the same
    /// patterns): the Dispatcher appends each message to its room's stream and
    /// publishes it with its position (the `STREAM_PUBLISH` script).
    #[arg(long = "recover-rooms", value_name = "PATTERN", value_delimiter = ',')]
    recover_rooms: Vec<String>,

    /// Seconds the publishing phase may take, deliveries included.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Run `mesa-bench rooms`.
pub(super) async fn run(args: RoomsArgs) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let replicas = common.urls.len();
    if args.metrics.len() != replicas {
        return Err(Failure::usage(
            "mesa-bench rooms needs one --metrics per --url, in the same order",
        ));
    }
    let max_spread = args.max_spread.map_or(replicas, |n| n as usize);
    let plan = Membership::new(
        common.connections,
        args.rooms,
        args.members,
        replicas,
        max_spread,
    )
    .map_err(Failure::usage)?;
    let probe = Probe::new(&common.server_pids)?;
    let mut builder = Dispatcher::builder(args.redis[0].clone())
        .shard_urls(args.redis[1..].iter().cloned())
        .legacy_bus(args.legacy_bus);
    if !args.recover_rooms.is_empty() {
        builder = builder.recovery(RecoveryConfig {
            rooms: args.recover_rooms.clone(),
            ..RecoveryConfig::default()
        });
    }
    let dispatcher = builder
        .connect()
        .await
        .map_err(|error| format!("cannot reach Redis at {:?}: {error}", args.redis))?;
    let dispatcher = Arc::new(dispatcher);
    let subscribing = args.send == SendTo::Rooms;
    let messages = u64::from(args.messages);

    let (ctx, mut ready) = Ctx::opting_in(common, true).await?;
    let (phase, phase_rx) = watch::channel(Phase::Setup);
    let tasks = spawn_connections(&ctx, common, &phase_rx, |conn| {
        let rooms = if subscribing {
            plan.rooms_of(conn)
                .iter()
                .map(|room| Membership::name(*room))
                .collect()
        } else {
            Vec::new()
        };
        Role::Member(rooms, Tally::new(messages, true))
    });
    let setup = wait_setup(&mut ready, common).await;

    // Memory per membership: every connection set up, then every member in its rooms
    // and every replica subscribed to the channels of its rooms.
    let mut memory = None;
    let mut subscribe_secs = None;
    if subscribing {
        sleep(Duration::from_secs(args.settle_secs)).await;
        let before = probe.rss();
        let started = Instant::now();
        let _ = phase.send(Phase::Subscribe);
        let deadline = started + Duration::from_secs(common.setup_timeout_secs);
        if let Err(error) = subscribed(&ctx, &plan, &dispatcher, &args.redis, deadline).await {
            let _ = phase.send(Phase::Stop);
            join_all(tasks).await;
            return Err(error.into());
        }
        subscribe_secs = Some(started.elapsed().as_secs_f64());
        sleep(Duration::from_secs(args.settle_secs)).await;
        memory = Some((before, probe.rss()));
    }
    let confirmed = ctx.subscribed.load(Ordering::Relaxed);

    let publisher = match args.via {
        Via::Dispatcher => Ok(Publisher::dispatcher(dispatcher.clone())),
        Via::Replicas => Publisher::replicas(&ctx, common.connections).await,
    };
    let publisher = match publisher {
        Ok(publisher) => publisher,
        Err(error) => {
            let _ = phase.send(Phase::Stop);
            join_all(tasks).await;
            return Err(error.into());
        }
    };

    // The measured phase: publish at the rate, then wait for the members.
    let figures_before = figures(&args.metrics).await?;
    let redis_before = redis_info::read(&args.redis).await?;
    let meter = CpuMeter::start(&probe);
    let start_us = ctx.now_us();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let failed = publish(&ctx, publisher, &plan, &args, deadline).await;
    let expected = messages * u64::from(args.members);
    wait_deliveries(&ctx, expected, deadline).await;
    let cpu = meter.read(&probe);
    let redis = redis_info::read(&args.redis).await?.since(&redis_before);
    // A replica with nobody to deliver to may still be reading the last envelopes.
    let missing = missing_members(&plan, messages, replicas);
    let envelopes: Vec<u64> = if args.send == SendTo::Ids && args.legacy_bus {
        vec![messages; replicas]
    } else {
        missing.iter().map(|m| messages - m).collect()
    };
    let figures_after = figures_reaching(&args.metrics, &figures_before, &envelopes).await?;

    let _ = phase.send(Phase::Stop);
    let outcomes = join_all(tasks).await;
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;
    let mut total = Tally::new(messages, true);
    for tally in outcomes.into_iter().filter_map(|o| o.tally) {
        total.merge(tally);
    }

    let changed: Vec<ClusterFigures> = figures_after
        .iter()
        .zip(&figures_before)
        .map(|(after, before)| after.since(*before))
        .collect();
    let shares: Vec<Option<f64>> = changed
        .iter()
        .map(|f| (f.received > 0.0).then(|| f.unneeded / f.received))
        .collect();
    let worst = shares.iter().flatten().copied().reduce(f64::max);
    let (all_received, all_unneeded) = changed
        .iter()
        .fold((0.0, 0.0), |(r, u), f| (r + f.received, u + f.unneeded));
    let share_all = (all_received > 0.0).then(|| all_unneeded / all_received);
    let predicted: Vec<f64> = missing
        .iter()
        .map(|m| *m as f64 / messages as f64)
        .collect();
    let delivered = Delivered::new(total, expected, start_us, cpu);
    let per_membership = match memory {
        Some((Some(before), Some(after))) if confirmed > 0 => {
            Some((after as f64 - before as f64) / confirmed as f64)
        }
        _ => None,
    };
    let percent =
        |share: Option<f64>| share.map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0));
    let per_send = |count: u64| round3(count as f64 / messages as f64);
    let redis_cpu = redis.cpu_total();
    let per_redis_cpu =
        |secs: f64| (secs > 0.0).then(|| (delivered.total.received as f64 / secs).round());
    // What a cluster bound by Redis could pass is set by its busiest instance.
    let busiest = redis.cpu_secs.iter().copied().fold(0.0, f64::max);

    emit(&format!(
        "rooms   {} send={} replicas={replicas} rooms={} members={} subscribed={confirmed} \
         legacy_bus={} redis={} msgs={messages} rate={}/s  {}  unneeded: {} (worst {}, shared channel {})  \
         {} /membership  redis: {} commands/send ({} of the sends), cpu={:.2}s ({} deliveries/cpu-s)",
        setup.human(common, dropped),
        args.send.name(),
        args.rooms,
        args.members,
        if args.legacy_bus { "on" } else { "off" },
        args.redis.len(),
        args.rate,
        delivered.human(),
        shares
            .iter()
            .map(|s| percent(*s))
            .collect::<Vec<_>>()
            .join(" "),
        percent(worst),
        predicted
            .iter()
            .map(|s| percent(Some(*s)))
            .collect::<Vec<_>>()
            .join(" "),
        human_bytes(per_membership),
        per_send(redis.commands),
        per_send(redis.sends),
        redis_cpu,
        per_redis_cpu(redis_cpu).map_or("-".to_owned(), |r| r.to_string()),
    ));
    let line = report(
        "rooms",
        common,
        &probe,
        &setup,
        dropped,
        &[
            json!({
                "send": args.send.name(),
                "recover_rooms": args.recover_rooms.join(","),
                "replicas": replicas,
                "rooms": args.rooms,
                "members_per_room": args.members,
                "rooms_by_spread": plan.spreads(),
                "memberships": plan.memberships(),
                "subscribed": confirmed,
                "refused": ctx.refused.load(Ordering::Relaxed),
                "server_memberships": changed.iter().map(|f| f.memberships).sum::<f64>(),
                "subscribe_secs": subscribe_secs.map(round3),
                "rss_before_rooms_bytes": memory.and_then(|m| m.0),
                "rss_in_rooms_bytes": memory.and_then(|m| m.1),
                "bytes_per_membership": per_membership.map(f64::round),
                "messages": messages,
                "rate": args.rate,
                "via": args.via.name(),
                "legacy_bus": args.legacy_bus,
                "redis_instances": args.redis.len(),
                "publish_failed": failed,
                "cluster_received": changed.iter().map(|f| f.received).collect::<Vec<_>>(),
                "cluster_unneeded": changed.iter().map(|f| f.unneeded).collect::<Vec<_>>(),
                "unneeded_share": shares.iter().map(|s| s.map(round4)).collect::<Vec<_>>(),
                "unneeded_share_max": worst.map(round4),
                "unneeded_share_all": share_all.map(round4),
                "shared_channel_unneeded_share": predicted.iter().copied().map(round4).collect::<Vec<_>>(),
                "shared_channel_unneeded_share_all": round4(
                    missing.iter().sum::<u64>() as f64 / (messages * replicas as u64) as f64
                ),
                "redis_commands_per_send": per_send(redis.commands),
                "redis_send_commands_per_send": per_send(redis.sends),
                "redis_scripts_per_send": per_send(redis.scripts),
                "redis_publish_per_send": per_send(redis.publish),
                "redis_cpu_secs": round3(redis_cpu),
                "redis_cpu_secs_each": redis.cpu_secs.iter().copied().map(round3).collect::<Vec<_>>(),
                "deliveries_per_redis_cpu_sec": per_redis_cpu(redis_cpu),
                "deliveries_per_busiest_redis_cpu_sec": per_redis_cpu(busiest),
            }),
            delivered.fields(),
        ],
    );
    emit(&line.to_string());
    Ok(exit_code(setup.ok))
}

/// Wait until every membership is confirmed (or refused) and Redis counts one
/// subscriber per replica with a member on every room's channel (summed over the
/// instances: a room's channel lives on one); an error at `deadline`.
async fn subscribed(
    ctx: &Ctx,
    plan: &Membership,
    dispatcher: &Dispatcher,
    redis: &[String],
    deadline: Instant,
) -> Result<(), String> {
    let wanted = plan.memberships();
    while ctx.subscribed.load(Ordering::Relaxed) + ctx.refused.load(Ordering::Relaxed) < wanted {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {wanted} memberships confirmed at the deadline",
                ctx.subscribed.load(Ordering::Relaxed)
            ));
        }
        sleep(POLL).await;
    }
    let mut conns = Vec::with_capacity(redis.len());
    for url in redis {
        let client =
            redis::Client::open(url.as_str()).map_err(|error| format!("--redis: {error}"))?;
        conns.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|error| format!("cannot reach Redis at {url}: {error}"))?,
        );
    }
    let channels: Vec<String> = (0..plan.rooms())
        .map(|room| dispatcher.namespace().room_channel(&Membership::name(room)))
        .collect();
    let wanted: u64 = (0..plan.rooms())
        .map(|room| plan.replicas_of(room).count() as u64)
        .sum();
    loop {
        let mut subscribers = 0;
        for conn in &mut conns {
            let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channels)
                .query_async(conn)
                .await
                .map_err(|error| format!("PUBSUB NUMSUB failed: {error}"))?;
            subscribers += counts.iter().map(|(_, n)| n).sum::<u64>();
        }
        if subscribers >= wanted {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{subscribers} of {wanted} room subscriptions in Redis at the deadline"
            ));
        }
        sleep(POLL).await;
    }
}

/// Every replica's figures once each has received its count of `envelopes` since
/// `before` (or, failing that, after [`QUIET_TIMEOUT`]).
async fn figures_reaching(
    urls: &[String],
    before: &[ClusterFigures],
    envelopes: &[u64],
) -> Result<Vec<ClusterFigures>, String> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    loop {
        let now = figures(urls).await?;
        let reached = now
            .iter()
            .zip(before)
            .zip(envelopes)
            .all(|((now, before), wanted)| now.since(*before).received >= *wanted as f64);
        if reached || Instant::now() >= deadline {
            return Ok(now);
        }
        sleep(POLL).await;
    }
}

/// Every replica's figures, in the order of `urls`.
async fn figures(urls: &[String]) -> Result<Vec<ClusterFigures>, String> {
    let mut all = Vec::with_capacity(urls.len());
    for url in urls {
        all.push(cluster_figures(url).await?);
    }
    Ok(all)
}

/// Publish `args.messages` at `args.rate` per second, message `i` to room `i mod
/// rooms` (or its members' ids), each stamped with when it was due; how many
/// publishes failed (or were not made by `deadline`).
async fn publish(
    ctx: &Ctx,
    mut publisher: Publisher,
    plan: &Membership,
    args: &RoomsArgs,
    deadline: Instant,
) -> u64 {
    let start_us = ctx.now_us();
    let mut late = 0;
    for seq in 0..u64::from(args.messages) {
        let due_us = start_us + seq * 1_000_000 / u64::from(args.rate);
        if ctx.at_us(due_us) >= deadline {
            eprintln!("mesa-bench: the publishing phase timed out");
            late = u64::from(args.messages) - seq;
            break;
        }
        sleep_until(ctx.at_us(due_us)).await;
        let room = (seq % u64::from(plan.rooms())) as u32;
        let ids = (args.send == SendTo::Ids).then(|| {
            plan.members(room)
                .iter()
                .map(|conn| format!("u{conn}"))
                .collect()
        });
        publisher
            .publish(Publication {
                data: json!({"ts": due_us, "seq": seq}),
                room: Membership::name(room),
                ids,
            })
            .await;
    }
    let failed = late + publisher.finish().await;
    if failed > 0 {
        eprintln!("mesa-bench: {failed} publishes failed");
    }
    failed
}

/// Per replica, how many of the messages have no member there: what a replica
/// reading the shared channel receives for nobody (none when each room's channel
/// reaches only the replicas with a member).
fn missing_members(plan: &Membership, messages: u64, replicas: usize) -> Vec<u64> {
    let mut unneeded = vec![0_u64; replicas];
    let rooms = u64::from(plan.rooms());
    for seq in 0..messages {
        let holders: Vec<usize> = plan.replicas_of((seq % rooms) as u32).collect();
        for (replica, count) in unneeded.iter_mut().enumerate() {
            if !holders.contains(&replica) {
                *count += 1;
            }
        }
    }
    unneeded
}

/// Round to four decimals (a share, for the JSON line).
fn round4(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}
