//! `mesa-bench redis-cost`: what recovery costs Redis. Many connections send
//! pipelined batches of what a replica issues for a room message, straight to Redis
//! (no server in between), to rooms `room:0..N` in turn, for a fixed time: with
//! `--mode stream` the [`Command::StreamPublish`] of a recoverable room (the
//! `STREAM_PUBLISH` script: number, append to the capped stream, publish with the
//! position), with `--mode publish` the plain `PUBLISH` of the same envelope that a
//! room without recovery gets. The calls are the core's own ([`Command::calls`]),
//! so the keys, arguments and script are exactly those of `mesa serve`.
//!
//! Run both modes on the same Redis, one after the other (bench/run alternates
//! them): the report's ratio is stream over publish, per wall-clock second and per
//! Redis CPU-second (`INFO cpu`). Nobody subscribes to the rooms' channels, so
//! neither mode pays for deliveries: the difference is the recovery's own work.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesa_tokio::Message;
use mesa_tokio::mesa_core::cluster::Namespace;
use mesa_tokio::mesa_core::replica::{Call, Command, Keys, StreamKeep};
use mesa_tokio::mesa_core::rooms::RoomEnvelope;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::redis_info;
use super::stats::{cpu_secs, emit, own_cpu_ticks, round3};
use crate::Failure;

/// What each call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Mode {
    /// `STREAM_PUBLISH` (`EVALSHA`): a recoverable room's message.
    Stream,
    /// `PUBLISH` of the envelope: a room's message without recovery.
    Publish,
}

impl Mode {
    /// The option's value, for the report.
    fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Publish => "publish",
        }
    }
}

/// Options of `mesa-bench redis-cost`.
#[derive(Debug, clap::Args)]
pub(super) struct RedisCostArgs {
    /// The Redis to measure, e.g. `redis://127.0.0.1:6380/` (flush it first: the
    /// stream mode leaves a stream per room).
    #[arg(long)]
    redis: String,

    /// What each call does.
    #[arg(long, value_enum)]
    mode: Mode,

    /// How many rooms the calls go to, in turn.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    rooms: u32,

    /// Connections to Redis, each sending one batch at a time.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Calls per batch (pipelined: one round trip).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pipeline: u32,

    /// The size of the envelope published, in bytes (about: the message's text is
    /// padded to it).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,

    /// Entries each room's stream keeps (`--recovery-size`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,

    /// Seconds of calls.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
}

/// The Redis command of one call, as the driver would send it (`EVALSHA` with the
/// script's hash for a script).
fn command(call: &Call, sha: &str) -> redis::Cmd {
    match call {
        Call::Plain { name, args } => {
            let mut cmd = redis::cmd(name);
            cmd.arg(args);
            cmd
        }
        Call::Script { keys, args, .. } => {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(sha).arg(keys.len()).arg(keys).arg(args);
            cmd
        }
    }
}

/// The calls a message to `room` stands for in `mode`, with a text of `pad` bytes.
fn calls(mode: Mode, keys: &Keys, room: &str, pad: usize, keep: &StreamKeep) -> Vec<Call> {
    let message = Message::dispatch("BENCH", json!({ "text": "x".repeat(pad) }));
    let command = match mode {
        Mode::Stream => Command::StreamPublish {
            room: room.to_owned(),
            head: RoomEnvelope {
                room: room.to_owned(),
                message: message.clone(),
                origin: None,
                position: None,
            }
            .head(),
            entry: message.to_value().to_string(),
            keep: *keep,
            // As a replica's link names its Redis process (the meta record's
            // writer is checked and kept on every append).
            run_id: "bench".to_owned(),
        },
        Mode::Publish => Command::Publish {
            channel: keys.namespace().room_channel(room),
            payload: RoomEnvelope {
                room: room.to_owned(),
                message,
                origin: Some(keys.replica().to_owned()),
                position: None,
            }
            .encode(),
        },
    };
    command.calls(keys)
}

/// Run `mesa-bench redis-cost`.
pub(super) async fn run(args: RedisCostArgs) -> Result<ExitCode, Failure> {
    let client = redis::Client::open(args.redis.as_str())
        .map_err(|error| format!("--redis `{}`: {error}", args.redis))?;
    let keys = Keys::new(Namespace::new(None), "bench");
    let keep = StreamKeep {
        size: args.keep as usize,
        ttl_secs: 120,
        meta_ttl_secs: 24 * 3600,
    };
    // The envelope's size without text, to pad it to --payload-bytes (a stream
    // envelope gains its position, about 40 bytes, in the script).
    let bare = RoomEnvelope {
        room: "room:0".into(),
        message: Message::dispatch("BENCH", json!({ "text": "" })),
        origin: Some(keys.replica().to_owned()),
        position: None,
    }
    .encode()
    .len();
    let pad = args.payload_bytes.saturating_sub(bare);

    let mut control = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|error| format!("cannot reach Redis at {}: {error}", args.redis))?;
    let mut sha = String::new();
    let mut commands = Vec::with_capacity(args.rooms as usize);
    for room in 0..args.rooms {
        let calls = calls(args.mode, &keys, &format!("room:{room}"), pad, &keep);
        let [call] = calls.as_slice() else {
            return Err(format!("a room message is {} calls, not one", calls.len()).into());
        };
        if let (Call::Script { script, .. }, true) = (call, sha.is_empty()) {
            sha = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script.source())
                .query_async(&mut control)
                .await
                .map_err(|error| format!("SCRIPT LOAD failed: {error}"))?;
        }
        commands.push(command(call, &sha));
    }
    let payload = match &commands[0].args_iter().last() {
        Some(redis::Arg::Simple(bytes)) => bytes.len(),
        _ => 0,
    };
    let commands = Arc::new(commands);

    let mut connections = Vec::with_capacity(args.connections as usize);
    for _ in 0..args.connections {
        connections.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|error| format!("cannot reach Redis at {}: {error}", args.redis))?,
        );
    }
    let urls = [args.redis.clone()];
    let redis_before = redis_info::read(&urls).await?;
    let generator_before = own_cpu_ticks();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.secs);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for mut connection in connections {
        let (commands, next, errors) = (commands.clone(), next.clone(), errors.clone());
        let pipeline = u64::from(args.pipeline);
        tasks.spawn(async move {
            let mut done = 0_u64;
            while Instant::now() < deadline {
                let first = next.fetch_add(pipeline, Ordering::Relaxed);
                let mut pipe = redis::pipe();
                for n in first..first + pipeline {
                    pipe.add_command(commands[(n % commands.len() as u64) as usize].clone());
                }
                match pipe.query_async::<Vec<redis::Value>>(&mut connection).await {
                    Ok(replies) => {
                        let failed = replies
                            .iter()
                            .filter(|reply| matches!(reply, redis::Value::ServerError(_)))
                            .count() as u64;
                        errors.fetch_add(failed, Ordering::Relaxed);
                        done += pipeline - failed;
                    }
                    Err(_) => {
                        errors.fetch_add(pipeline, Ordering::Relaxed);
                    }
                }
            }
            done
        });
    }
    let mut calls = 0;
    while let Some(done) = tasks.join_next().await {
        calls += done.map_err(|error| format!("a connection's task failed: {error}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let generator = cpu_secs(generator_before, own_cpu_ticks());
    let redis = redis_info::read(&urls).await?.since(&redis_before);
    let errors = errors.load(Ordering::Relaxed);
    let redis_cpu = redis.cpu_total();
    let per_sec = calls as f64 / elapsed;
    let per_redis_cpu_sec = (redis_cpu > 0.0).then(|| calls as f64 / redis_cpu);
    emit(&format!(
        "redis-cost {}: {calls} calls in {elapsed:.2}s ({per_sec:.0}/s), Redis CPU {redis_cpu:.2}s \
         ({} per Redis CPU-second), {errors} errors; {} rooms, {} connections x pipeline {}, \
         {payload} B envelopes",
        args.mode.name(),
        per_redis_cpu_sec.map_or("-".to_owned(), |n| format!("{n:.0}")),
        args.rooms,
        args.connections,
        args.pipeline,
    ));
    emit(
        &json!({
            "scenario": "redis-cost",
            "mode": args.mode.name(),
            "rooms": args.rooms,
            "connections": args.connections,
            "pipeline": args.pipeline,
            "payload_bytes": payload,
            "keep": args.keep,
            "secs": round3(elapsed),
            "calls": calls,
            "errors": errors,
            "calls_per_sec": per_sec.round(),
            "redis_cpu_secs": round3(redis_cpu),
            "calls_per_redis_cpu_sec": per_redis_cpu_sec.map(f64::round),
            "redis_cpu_us_per_call": (calls > 0).then(|| round3(redis_cpu * 1e6 / calls as f64)),
            "redis_commands_per_call": (calls > 0).then(|| round3(redis.commands as f64 / calls as f64)),
            "generator_cpu_secs": generator.map(round3),
        })
        .to_string(),
    );
    Ok(if calls > 0 && errors == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("mesa-bench redis-cost: {errors} calls failed");
        ExitCode::FAILURE
    })
}
