//! `mesa-bench echo`: every connection keeps K ECHOs in flight for S seconds; the
//! server's cost of a round trip (decode, relay, encode, write) without any fanout.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::{
    CommonArgs, CpuMeter, Ctx, Histogram, Phase, Probe, Role, emit, exit_code, human_cpu, join_all,
    report, round3, spawn_connections, wait_setup,
};
use crate::Failure;

/// How long the answers still in flight get once the measured phase is over.
const DRAIN: Duration = Duration::from_millis(500);

/// Options of `mesa-bench echo`.
#[derive(Debug, clap::Args)]
pub(super) struct EchoArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// ECHOs each connection keeps in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,

    /// Seconds of the measured phase.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
}

/// Run `mesa-bench echo`.
pub(super) async fn run(args: EchoArgs) -> Result<ExitCode, Failure> {
    let common = &args.common;
    let probe = Probe::new(&common.server_pids)?;
    let (ctx, mut ready) = Ctx::new(common).await?;
    let (phase, phase_rx) = watch::channel(Phase::Setup);
    let tasks = spawn_connections(&ctx, common, &phase_rx, |_| {
        Role::Echo(args.in_flight, Histogram::default())
    });
    let setup = wait_setup(&mut ready, common).await;

    let meter = CpuMeter::start(&probe);
    let started = Instant::now();
    let _ = phase.send(Phase::Run);
    sleep(Duration::from_secs(args.secs)).await;
    let round_trips = ctx.received.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let _ = phase.send(Phase::Drain);
    let cpu = meter.read(&probe);
    let rss_after = probe.rss();
    sleep(DRAIN).await;
    let _ = phase.send(Phase::Stop);
    let outcomes = join_all(tasks).await;
    let dropped = outcomes.iter().filter(|o| o.dropped).count() as u64;
    let mut latency = Histogram::default();
    for histogram in outcomes.iter().filter_map(|o| o.latency.as_ref()) {
        latency.merge(histogram);
    }

    let rate = round_trips as f64 / elapsed.max(1e-9);
    let (server_cpu, gen_cpu) = (cpu.server, cpu.generator);
    let per_cpu = server_cpu
        .filter(|&secs| secs > 0.0)
        .map(|secs| round_trips as f64 / secs);
    emit(&format!(
        "echo    {} in-flight={}  {:.0} round trips/s in {:.2}s  {}  {}",
        setup.human(common, dropped),
        args.in_flight,
        rate,
        elapsed,
        latency.human(),
        human_cpu(server_cpu, per_cpu, "round trips", gen_cpu),
    ));
    let report = report(
        "echo",
        common,
        &probe,
        &setup,
        dropped,
        &[
            json!({
                "in_flight": args.in_flight,
                "elapsed_secs": round3(elapsed),
                "round_trips": round_trips,
                "round_trips_per_sec": rate.round(),
                "server_cpu_secs": server_cpu,
                "round_trips_per_server_cpu_sec": per_cpu.map(f64::round),
                "generator_cpu_secs": gen_cpu,
                "rss_after_bytes": rss_after,
            }),
            latency.fields(),
        ],
    );
    emit(&report.to_string());
    Ok(exit_code(setup.ok))
}
