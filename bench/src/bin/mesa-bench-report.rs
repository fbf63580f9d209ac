//! `mesa-bench-report`: turns the JSON lines that `bench/run` collected (one line per
//! `mesa-bench` run, tagged with `server` and `rep`, and `variant` where one server
//! runs several ways, and one `machine` line) into
//! `BENCHMARKS.md` (medians, ratios to both baselines, targets, the machine) and an
//! SVG chart drawn with plotters.
//!
//! ```text
//! mesa-bench-report RESULTS.jsonl BENCHMARKS.md docs/bench.svg [NOTES.md]
//! ```
//!
//! `NOTES.md`, when given, is appended as it is (the analysis of the figures).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use plotters::prelude::*;
use serde_json::Value;

/// The servers, in the order of the tables: ours first, then the two baselines.
const SERVERS: [(&str, &str); 3] = [
    ("ours", "mesa-rs"),
    ("upstream", "@cryb/mesa 1.5.8"),
    ("bare", "bare tokio-tungstenite"),
];

/// The variants of `rooms` (ours alone, several ways), in the order of its table: its
/// columns. A variant not listed here gets a column after these, named by its tag.
const ROOM_VARIANTS: &[(&str, &str)] = &[
    ("rooms-3", "rooms, 3 replicas"),
    ("ids-3", "ids on the shared channel, 3 replicas"),
    ("ids-routed-3", "ids routed by interest, 3 replicas"),
    ("rooms-clients-3", "rooms, published by clients, 3 replicas"),
    ("ids-clients-3", "ids, sent by clients, 3 replicas"),
    ("rooms-1", "rooms, 1 replica"),
    ("ids-1", "ids on the shared channel, 1 replica"),
    ("rooms-clients-1", "rooms, published by a client, 1 replica"),
    ("ids-clients-1", "ids, sent by a client, 1 replica"),
    ("ids-routed-1", "ids routed by interest, 1 replica"),
];

/// The replica counts of `replicas`, each measured with the legacy bus on and off.
const REPLICA_COUNTS: [u32; 3] = [1, 2, 4];

/// The variants of `replicas`: the legacy bus on (`legacy-N`) and off (`routed-N`) for
/// each of [`REPLICA_COUNTS`].
const REPLICA_VARIANTS: &[(&str, &str)] = &[
    ("legacy-1", "shared channel, 1 replica"),
    ("routed-1", "routed, 1 replica"),
    ("legacy-2", "shared channel, 2 replicas"),
    ("routed-2", "routed, 2 replicas"),
    ("legacy-4", "shared channel, 4 replicas"),
    ("routed-4", "routed, 4 replicas"),
];

/// The variants of `shards`: two Redis instances, compared with one.
const SHARD_VARIANTS: &[(&str, &str)] = &[("redis-2", "2 Redis"), ("redis-1", "1 Redis")];

/// The variants of `redis-cost`, the recovery's first.
const REDIS_COST_VARIANTS: &[(&str, &str)] = &[
    ("stream", "recovery on (STREAM_PUBLISH)"),
    ("publish", "recovery off (PUBLISH)"),
];

/// The variants of `recovery`, recovery on first.
const RECOVERY_VARIANTS: &[(&str, &str)] = &[
    ("on-1", "recovery on, 1 replica"),
    ("off-1", "recovery off, 1 replica"),
    ("on-3", "recovery on, 3 replicas"),
    ("off-3", "recovery off, 3 replicas"),
];

/// Whether more or less of a metric is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    /// Throughput.
    Higher,
    /// Memory, latency, time.
    Lower,
}

/// One row of a scenario's table.
struct Metric {
    /// The scenario of the runs it reads.
    scenario: &'static str,
    /// The row's label.
    label: &'static str,
    /// The field of the JSON line.
    field: &'static str,
    /// The field's value is divided by this for display.
    scale: f64,
    /// Digits after the point.
    decimals: usize,
    /// Which direction is better.
    better: Better,
}

/// Every row of every table, scenario by scenario: scenario, label, JSON field, the
/// divisor for display, digits after the point, which way is better.
#[rustfmt::skip]
const METRICS: &[Metric] = &[
    metric("fanout", "deliveries per server CPU-second", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("fanout", "deliveries per second (wall clock)", "deliveries_per_sec", 1.0, 0, Better::Higher),
    metric("fanout", "server CPU seconds", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("fanout", "latency p50 (ms)", "latency_p50_us", 1000.0, 1, Better::Lower),
    metric("fanout", "latency p99 (ms)", "latency_p99_us", 1000.0, 1, Better::Lower),
    metric("fanout", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("rate", "latency p50 (ms)", "latency_p50_us", 1000.0, 2, Better::Lower),
    metric("rate", "latency p99 (ms)", "latency_p99_us", 1000.0, 2, Better::Lower),
    metric("rate", "deliveries per second (wall clock)", "deliveries_per_sec", 1.0, 0, Better::Higher),
    metric("rate", "server CPU seconds", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("rate", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("idle", "server RSS per connection (KiB)", "bytes_per_conn", 1024.0, 2, Better::Lower),
    metric("idle", "connections held", "authenticated", 1.0, 0, Better::Higher),
    metric("idle", "setup (connections per second)", "setup_rate", 1.0, 0, Better::Higher),
    metric("idle", "server CPU seconds (setup and hold)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("echo", "round trips per server CPU-second", "round_trips_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("echo", "round trips per second (wall clock)", "round_trips_per_sec", 1.0, 0, Better::Higher),
    metric("echo", "server CPU seconds", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("echo", "latency p50 (ms)", "latency_p50_us", 1000.0, 2, Better::Lower),
    metric("echo", "latency p99 (ms)", "latency_p99_us", 1000.0, 2, Better::Lower),
    metric("storm", "all clients back after the kill (s)", "recovery_secs", 1.0, 2, Better::Lower),
    metric("storm", "server listening again after (s)", "restart_secs", 1.0, 2, Better::Lower),
    metric("storm", "peak 100 ms window (% of reconnections)", "peak_window_share", 0.01, 1, Better::Lower),
    metric("storm", "failed attempts", "failed_attempts", 1.0, 0, Better::Lower),
    metric("storm", "restarted server CPU seconds", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("cluster", "deliveries per server CPU-second (both replicas)", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("cluster", "deliveries per second (wall clock)", "deliveries_per_sec", 1.0, 0, Better::Higher),
    metric("cluster", "server CPU seconds (both replicas)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("cluster", "Redis PUBLISH per message sent", "publish_per_send", 1.0, 2, Better::Lower),
    metric("cluster", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("rooms", "unneeded share, worst replica (%)", "unneeded_share_max", 0.01, 1, Better::Lower),
    metric("rooms", "unneeded share, all replicas (%)", "unneeded_share_all", 0.01, 1, Better::Lower),
    metric("rooms", "the shared channel's unneeded share for these members (%)", "shared_channel_unneeded_share_all", 0.01, 1, Better::Lower),
    metric("rooms", "deliveries per server CPU-second (all replicas)", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("rooms", "deliveries per second (wall clock)", "deliveries_per_sec", 1.0, 0, Better::Higher),
    metric("rooms", "server CPU seconds (all replicas)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("rooms", "latency p50 (ms)", "latency_p50_us", 1000.0, 2, Better::Lower),
    metric("rooms", "latency p99 (ms)", "latency_p99_us", 1000.0, 2, Better::Lower),
    metric("rooms", "server RSS per room membership (B)", "bytes_per_membership", 1.0, 0, Better::Lower),
    metric("rooms", "subscribing every member, until Redis counts every replica's channels (s)", "subscribe_secs", 1.0, 2, Better::Lower),
    metric("rooms", "Redis commands of the sends per message (PUBLISH, scripts and what ROUTE runs)", "redis_send_commands_per_send", 1.0, 2, Better::Lower),
    metric("rooms", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("replicas", "deliveries per server CPU-second (all replicas)", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("replicas", "server CPU seconds (all replicas)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("replicas", "Redis commands of the sends per send (PUBLISH, scripts and what ROUTE runs)", "redis_send_commands_per_send", 1.0, 2, Better::Lower),
    metric("replicas", "Redis commands per send, all (presence upkeep included)", "redis_commands_per_send", 1.0, 2, Better::Lower),
    metric("replicas", "Redis script calls per send", "redis_scripts_per_send", 1.0, 2, Better::Lower),
    metric("replicas", "Redis PUBLISH per send", "redis_publish_per_send", 1.0, 2, Better::Lower),
    metric("replicas", "Redis CPU seconds", "redis_cpu_secs", 1.0, 2, Better::Lower),
    metric("replicas", "unneeded share, all replicas (%)", "unneeded_share_all", 0.01, 1, Better::Lower),
    metric("replicas", "latency p50 (ms)", "latency_p50_us", 1000.0, 2, Better::Lower),
    metric("replicas", "latency p99 (ms)", "latency_p99_us", 1000.0, 2, Better::Lower),
    metric("replicas", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("shards", "deliveries per second (wall clock)", "deliveries_per_sec", 1.0, 0, Better::Higher),
    metric("shards", "deliveries per Redis CPU-second (all instances)", "deliveries_per_redis_cpu_sec", 1.0, 0, Better::Higher),
    metric("shards", "deliveries per Redis CPU-second of the busiest instance", "deliveries_per_busiest_redis_cpu_sec", 1.0, 0, Better::Higher),
    metric("shards", "deliveries per server CPU-second (all replicas)", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("shards", "Redis commands of the sends per send (PUBLISH, scripts and what ROUTE runs)", "redis_send_commands_per_send", 1.0, 2, Better::Lower),
    metric("shards", "Redis commands per send, all (presence upkeep included)", "redis_commands_per_send", 1.0, 2, Better::Lower),
    metric("shards", "Redis script calls per send", "redis_scripts_per_send", 1.0, 2, Better::Lower),
    metric("shards", "Redis CPU seconds (all instances)", "redis_cpu_secs", 1.0, 2, Better::Lower),
    metric("shards", "server CPU seconds (all replicas)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("shards", "generator CPU seconds", "generator_cpu_secs", 1.0, 2, Better::Lower),
    metric("shards", "seconds from the first send to the last delivery", "elapsed_secs", 1.0, 2, Better::Lower),
    metric("shards", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
    metric("redis-cost", "room messages per second (wall clock)", "calls_per_sec", 1.0, 0, Better::Higher),
    metric("redis-cost", "room messages per Redis CPU-second", "calls_per_redis_cpu_sec", 1.0, 0, Better::Higher),
    metric("redis-cost", "Redis CPU per room message (µs)", "redis_cpu_us_per_call", 1.0, 2, Better::Lower),
    metric("redis-cost", "Redis commands per room message (those of the script included)", "redis_commands_per_call", 1.0, 2, Better::Lower),
    metric("redis-cost", "errors", "errors", 1.0, 0, Better::Lower),
    metric("recovery", "deliveries per server CPU-second (all replicas)", "deliveries_per_server_cpu_sec", 1.0, 0, Better::Higher),
    metric("recovery", "deliveries per Redis CPU-second", "deliveries_per_redis_cpu_sec", 1.0, 0, Better::Higher),
    metric("recovery", "server CPU seconds (all replicas)", "server_cpu_secs", 1.0, 2, Better::Lower),
    metric("recovery", "Redis CPU seconds", "redis_cpu_secs", 1.0, 2, Better::Lower),
    metric("recovery", "latency p50 (ms)", "latency_p50_us", 1000.0, 2, Better::Lower),
    metric("recovery", "latency p99 (ms)", "latency_p99_us", 1000.0, 2, Better::Lower),
    metric("recovery", "lost + duplicated", "lost_or_duplicated", 1.0, 0, Better::Lower),
];

/// A row of [`METRICS`].
const fn metric(
    scenario: &'static str,
    label: &'static str,
    field: &'static str,
    scale: f64,
    decimals: usize,
    better: Better,
) -> Metric {
    Metric {
        scenario,
        label,
        field,
        scale,
        decimals,
        better,
    }
}

/// The scenarios, in the order of the report, with what each measures.
const SCENARIOS: &[(&str, &str)] = &[
    (
        "fanout",
        "subscribers receive every BROADCAST of one publisher (window of messages in flight)",
    ),
    (
        "rate",
        "subscribers receive every BROADCAST of one publisher sending at a fixed rate (an open loop: latency is measured from when each message was due)",
    ),
    (
        "idle",
        "authenticated connections held with heartbeats; server RSS after minus before; setup is the rate at which the fresh connections were opened and authenticated",
    ),
    (
        "echo",
        "every client keeps ECHOs in flight for a fixed time",
    ),
    (
        "storm",
        "clients of the mesa-rs client library; the server is killed (SIGKILL) and started again",
    ),
    (
        "cluster",
        "fanout with the clients split over two replicas sharing one Redis",
    ),
    (
        "rooms",
        "room members over the replicas of one Redis (rooms with members on 1, 2 and 3 replicas in equal numbers), messages published at a fixed rate by a Dispatcher (or, where said, by a client on each replica), each to a room in turn, or to the members' ids on the channel every replica reads (or, routed, only to the replicas that hold them: `--legacy-bus off`); the unneeded share is a replica's `mesa_cluster_messages_unneeded_total` over `mesa_cluster_messages_received_total` during the publishing; mesa-rs only",
    ),
    (
        "replicas",
        "the cost across replicas: `mesa-bench rooms --send ids` (each message from a Dispatcher to a room's members' ids, members spread over 1 to N replicas) on 1, 2 and 4 replicas of one Redis, with the legacy bus on (every replica reads every send on the shared channel) and off (routing by interest: a ROUTE script publishes to the replicas holding the ids); Redis's commands (`INFO commandstats`, the commands its scripts run included, the replicas' own lease renewals too) per send; mesa-rs only",
    ),
    (
        "shards",
        "as many sends as the machine passes (the generator's Dispatcher keeps 256 in flight), each to one id held on one of 3 replicas, routed by interest (`--legacy-bus off`), with the cluster on 1 Redis instance and then sharded over 2 (`--redis A,B`); Redis CPU from `INFO cpu` of each instance; mesa-rs only",
    ),
    (
        "redis-cost",
        "what recovery costs Redis: `mesa-bench redis-cost` sends room messages straight to Redis for a fixed time, over many connections, each a pipelined batch at a time, to rooms `room:0..N` in turn, either as a recoverable room's `STREAM_PUBLISH` script (number, append to the capped stream, publish with the position) or as the plain `PUBLISH` of the same envelope, with the calls of the core's own `Command`s; nobody subscribes, so neither pays for deliveries; the two modes alternate on one flushed Redis; Redis CPU from `INFO cpu`; mesa-rs only",
    ),
    (
        "recovery",
        "recovery end to end: `mesa-bench rooms --send rooms` (a Dispatcher publishes at a fixed rate to rooms whose members are on the replicas), with every room recoverable (`--recover-rooms '*'` on the servers and the Dispatcher: each message goes through `STREAM_PUBLISH`, every replica delivers it from the channel in offset order) and without; mesa-rs only",
    ),
];

/// The runs read from the results file: `runs[scenario][column]` holds one JSON object
/// per repetition; the column is the run's `variant`, or else its `server`.
type Runs = BTreeMap<String, BTreeMap<String, Vec<Value>>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: mesa-bench-report RESULTS.jsonl BENCHMARKS.md CHART.svg [NOTES.md]");
        return ExitCode::from(2);
    }
    match report(
        &args[0],
        &args[1],
        &args[2],
        args.get(3).map(String::as_str),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesa-bench-report: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Read `results`, write `markdown` and `svg`.
fn report(results: &str, markdown: &str, svg: &str, notes: Option<&str>) -> Result<(), String> {
    let text =
        std::fs::read_to_string(results).map_err(|error| format!("reading {results}: {error}"))?;
    let (machine, runs) = parse(&text)?;
    let notes = match notes {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|error| format!("reading {path}: {error}"))?
        }
        None => String::new(),
    };
    let chart_link = relative_link(markdown, svg);
    let document = render(&machine, &runs, &chart_link, &notes);
    std::fs::write(markdown, document).map_err(|error| format!("writing {markdown}: {error}"))?;
    if let Some(dir) = std::path::Path::new(svg).parent() {
        std::fs::create_dir_all(dir).map_err(|error| format!("creating {dir:?}: {error}"))?;
    }
    chart(&runs, svg).map_err(|error| format!("drawing {svg}: {error}"))
}

/// The chart's path as seen from the Markdown file's directory.
fn relative_link(markdown: &str, svg: &str) -> String {
    let base = std::path::Path::new(markdown)
        .parent()
        .unwrap_or(std::path::Path::new(""));
    std::path::Path::new(svg)
        .strip_prefix(base)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| svg.to_owned())
}

/// Split the lines into the machine description and the runs; derived fields are added
/// to each run (`lost_or_duplicated`, `setup_rate`).
fn parse(text: &str) -> Result<(Value, Runs), String> {
    let mut machine = Value::Null;
    let mut runs = Runs::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut value: Value = serde_json::from_str(line)
            .map_err(|error| format!("line {}: not JSON: {error}", number + 1))?;
        if let Some(described) = value.get("machine") {
            machine = described.clone();
            continue;
        }
        let scenario = value["scenario"].as_str().unwrap_or_default().to_owned();
        let server = value["server"].as_str().unwrap_or_default().to_owned();
        if scenario.is_empty() || server.is_empty() {
            return Err(format!("line {}: no scenario or server", number + 1));
        }
        let column = value["variant"].as_str().map_or(server, str::to_owned);
        derive(&mut value);
        runs.entry(scenario)
            .or_default()
            .entry(column)
            .or_default()
            .push(value);
    }
    Ok((machine, runs))
}

/// Add the fields computed from others.
fn derive(run: &mut Value) {
    let number = |key: &str| run.get(key).and_then(Value::as_f64);
    let lost = number("lost").zip(number("duplicated")).map(|(l, d)| l + d);
    let setup_rate = number("authenticated")
        .zip(number("setup_secs"))
        .filter(|(_, secs)| *secs > 0.0)
        .map(|(ok, secs)| (ok / secs).round());
    if let Value::Object(object) = run {
        if let Some(lost) = lost {
            object.insert("lost_or_duplicated".into(), lost.into());
        }
        if let Some(rate) = setup_rate {
            object.insert("setup_rate".into(), rate.into());
        }
    }
}

/// The median of `field` over `runs` (the mean of the middle two for an even count).
fn median(runs: &[Value], field: &str) -> Option<f64> {
    let mut values: Vec<f64> = runs
        .iter()
        .filter_map(|run| run.get(field).and_then(Value::as_f64))
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    })
}

/// The median of `field` for `column` (a server or a variant) in `scenario`.
fn value(runs: &Runs, scenario: &str, column: &str, field: &str) -> Option<f64> {
    median(runs.get(scenario)?.get(column)?, field)
}

/// The columns of a scenario's table, keys and names, the first the one the others
/// are compared with: the servers, or the variants of `rooms`.
fn columns(scenario: &str, present: &BTreeMap<String, Vec<Value>>) -> Vec<(String, String)> {
    let known: &[(&str, &str)] = match scenario {
        "rooms" => ROOM_VARIANTS,
        "replicas" => REPLICA_VARIANTS,
        "shards" => SHARD_VARIANTS,
        "redis-cost" => REDIS_COST_VARIANTS,
        "recovery" => RECOVERY_VARIANTS,
        _ => &SERVERS,
    };
    let mut columns: Vec<(String, String)> = known
        .iter()
        .filter(|(key, _)| present.contains_key(*key))
        .map(|(key, name)| ((*key).to_owned(), (*name).to_owned()))
        .collect();
    for key in present.keys() {
        if !known.iter().any(|(known, _)| known == key) {
            columns.push((key.clone(), key.clone()));
        }
    }
    columns
}

/// A number with thousands separators and `decimals` digits.
fn number(value: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, value.abs());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let mut grouped = String::new();
    for (i, digit) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    if fraction.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{fraction}")
    }
}

/// `ours / theirs`, formatted, or `–`.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if theirs != 0.0 => format!("{:.2}x", ours / theirs),
        _ => "–".to_owned(),
    }
}

/// A share as a percentage with one decimal, or `–`.
fn percent(share: Option<f64>) -> String {
    share.map_or("–".to_owned(), |s| format!("{:.1}%", s * 100.0))
}

/// A displayed metric value, or `–`.
fn shown(value: Option<f64>, metric: &Metric) -> String {
    value.map_or("–".to_owned(), |v| {
        number(v / metric.scale, metric.decimals)
    })
}

/// The whole Markdown document.
fn render(machine: &Value, runs: &Runs, chart_link: &str, notes: &str) -> String {
    let mut out = String::new();
    let text = |key: &str| machine[key].as_str().unwrap_or("?").to_owned();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run` ({}, revision {}): every scenario runs against each server \
         in turn, {} times; the tables show medians. Ratios are mesa-rs divided by the \
         baseline (for rows where less is better, below 1.00x means mesa-rs is better). \
         The load generator is `mesa-bench` (see `mesa-bench --help`); server CPU time \
         comes from `/proc/PID/stat`, memory from `/proc/PID/status` (VmRSS).\n",
        text("date"),
        text("revision"),
        machine["reps"].as_u64().unwrap_or(0),
    );
    let _ = writeln!(
        out,
        "![deliveries per second and memory per connection]({chart_link})\n"
    );

    let _ = writeln!(out, "## Headline\n");
    headline(&mut out, runs);

    let _ = writeln!(out, "\n## Targets\n");
    targets(&mut out, runs);

    for (scenario, description) in SCENARIOS {
        let Some(servers) = runs.get(*scenario) else {
            continue;
        };
        let _ = writeln!(out, "\n## {scenario}\n");
        let sizes = servers
            .values()
            .next()
            .and_then(|r| r.first())
            .map(sizes)
            .unwrap_or_default();
        let _ = writeln!(out, "{description}; {sizes}.\n");
        let present = columns(scenario, servers);
        let Some((first, first_name)) = present.first().cloned() else {
            continue;
        };
        let first_name = if first == "ours" {
            "mesa-rs".to_owned()
        } else {
            first_name
        };
        let _ = write!(out, "| metric |");
        for (_, name) in &present {
            let _ = write!(out, " {name} |");
        }
        let baselines = &present[1..];
        for (_, name) in baselines {
            let _ = write!(out, " {first_name} / {name} |");
        }
        let _ = write!(out, "\n|---|");
        for _ in 0..present.len() + baselines.len() {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out);
        for metric in METRICS.iter().filter(|m| m.scenario == *scenario) {
            // Rows no run measured (results of an older generator) are left out.
            if present
                .iter()
                .all(|(key, _)| value(runs, scenario, key, metric.field).is_none())
            {
                continue;
            }
            let arrow = match metric.better {
                Better::Higher => "↑",
                Better::Lower => "↓",
            };
            let _ = write!(out, "| {} {arrow} |", metric.label);
            for (key, _) in &present {
                let _ = write!(
                    out,
                    " {} |",
                    shown(value(runs, scenario, key, metric.field), metric)
                );
            }
            let ours = value(runs, scenario, &first, metric.field);
            for (key, _) in baselines {
                let _ = write!(
                    out,
                    " {} |",
                    ratio(ours, value(runs, scenario, key, metric.field))
                );
            }
            let _ = writeln!(out);
        }
        let Some(first) = METRICS.iter().find(|m| m.scenario == *scenario) else {
            continue;
        };
        let _ = writeln!(out, "\nEvery run ({}):\n", first.label);
        for (key, name) in &present {
            let all: Vec<String> = servers[key]
                .iter()
                .map(|run| shown(run.get(first.field).and_then(Value::as_f64), first))
                .collect();
            let _ = writeln!(out, "- {name}: {}", all.join("; "));
        }
        if *scenario == "replicas" {
            cost_across_replicas(&mut out, runs);
        }
    }

    let _ = writeln!(out, "\n## Machine\n");
    for (label, key) in [
        ("CPU", "cpu"),
        ("cores (nproc)", "nproc"),
        ("memory", "memory"),
        ("kernel", "kernel"),
        ("open files per process", "open_files"),
        ("rustc", "rustc"),
        ("Node.js", "node"),
        ("redis-server", "redis"),
        ("load average at the start (1, 5, 15 min)", "load"),
    ] {
        let shown = match &machine[key] {
            Value::String(s) => s.clone(),
            Value::Null => "?".to_owned(),
            other => other.to_string(),
        };
        let _ = writeln!(out, "- {label}: {shown}");
    }
    let _ = writeln!(
        out,
        "\nThe load generator and the servers share this machine's cores, so wall-clock \
         rates are bounded by the generator too; per-CPU-second figures compare the \
         servers' own cost."
    );
    if !notes.trim().is_empty() {
        let _ = writeln!(out, "\n{}", notes.trim_end());
    }
    out
}

/// The sizes of a run: connections, messages, window, in flight, seconds.
fn sizes(run: &Value) -> String {
    let mut parts = Vec::new();
    for (key, label) in [
        ("connections", "connections"),
        ("rooms", "rooms"),
        ("members_per_room", "members per room"),
        ("messages", "messages"),
        ("window", "in flight (publisher)"),
        ("rate", "messages per second"),
        ("in_flight", "in flight per connection"),
        ("elapsed_secs", "seconds"),
        ("hold_secs", "seconds held"),
        ("pipeline", "calls per round trip"),
        ("payload_bytes", "bytes per envelope"),
        ("keep", "entries per stream at most"),
    ] {
        if key == "elapsed_secs" && run.get("in_flight").is_none() {
            continue;
        }
        if let Some(v) = run.get(key).and_then(Value::as_f64) {
            parts.push(format!("{} {label}", number(v, 0)));
        }
    }
    parts.join(", ")
}

/// The cost across replicas (issue 15, item 5): per replica count, the legacy bus
/// against routing by interest, as a table and as Mermaid charts (bars: the legacy
/// bus; line: routed).
fn cost_across_replicas(out: &mut String, runs: &Runs) {
    let (per_cpu, commands, all) = (
        "deliveries_per_server_cpu_sec",
        "redis_send_commands_per_send",
        "redis_commands_per_send",
    );
    let get = |bus: &str, count: u32, field: &str| {
        value(runs, "replicas", &format!("{bus}-{count}"), field)
    };
    let shown = |v: Option<f64>, decimals| v.map_or("–".to_owned(), |v| number(v, decimals));
    let _ = writeln!(
        out,
        "\nCost across replicas (medians; shared: the legacy bus on, routed: off):\n\n\
         | replicas | deliveries per server CPU-second, shared | routed | routed / shared \
         | Redis commands of the sends per send, shared | routed | all Redis commands per send, \
         shared | routed | unneeded share, shared | routed |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for count in REPLICA_COUNTS {
        let (shared, routed) = (get("legacy", count, per_cpu), get("routed", count, per_cpu));
        let _ = writeln!(
            out,
            "| {count} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            shown(shared, 0),
            shown(routed, 0),
            ratio(routed, shared),
            shown(get("legacy", count, commands), 2),
            shown(get("routed", count, commands), 2),
            shown(get("legacy", count, all), 2),
            shown(get("routed", count, all), 2),
            percent(get("legacy", count, "unneeded_share_all")),
            percent(get("routed", count, "unneeded_share_all")),
        );
    }
    for (field, decimals, title, unit) in [
        (
            per_cpu,
            0,
            "Deliveries per server CPU-second",
            "deliveries/CPU-s",
        ),
        (
            commands,
            2,
            "Redis commands of the sends per send",
            "commands",
        ),
    ] {
        let series = |bus: &str| -> Vec<f64> {
            REPLICA_COUNTS
                .iter()
                .map(|count| get(bus, *count, field).unwrap_or(0.0))
                .collect()
        };
        let (shared, routed) = (series("legacy"), series("routed"));
        let top = shared.iter().chain(&routed).copied().fold(0.0, f64::max);
        if top <= 0.0 {
            continue;
        }
        let list = |values: &[f64]| {
            values
                .iter()
                .map(|v| format!("{v:.decimals$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let axis: Vec<String> = REPLICA_COUNTS.iter().map(|n| format!("\"{n}\"")).collect();
        let _ = writeln!(
            out,
            "\n```mermaid\nxychart-beta\n    title \"{title}: shared channel (bars), routed (line)\"\n    \
             x-axis \"replicas\" [{}]\n    y-axis \"{unit}\" 0 --> {:.decimals$}\n    bar [{}]\n    line [{}]\n```",
            axis.join(", "),
            top * 1.2,
            list(&shared),
            list(&routed),
        );
    }
}

/// The headline table: one row per scenario's main figure.
fn headline(out: &mut String, runs: &Runs) {
    let _ = writeln!(
        out,
        "| scenario | figure | mesa-rs | @cryb/mesa | bare | vs @cryb/mesa | vs bare |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    // The column of ours: the server, or the variant of `rooms` the headline shows.
    for (scenario, ours, field) in [
        ("fanout", "ours", "deliveries_per_server_cpu_sec"),
        ("fanout", "ours", "deliveries_per_sec"),
        ("rate", "ours", "latency_p50_us"),
        ("rate", "ours", "latency_p99_us"),
        ("idle", "ours", "bytes_per_conn"),
        ("idle", "ours", "setup_rate"),
        ("echo", "ours", "round_trips_per_server_cpu_sec"),
        ("storm", "ours", "recovery_secs"),
        ("storm", "ours", "peak_window_share"),
        ("cluster", "ours", "deliveries_per_server_cpu_sec"),
        ("cluster", "ours", "publish_per_send"),
        ("rooms", "rooms-3", "unneeded_share_max"),
        ("rooms", "ids-3", "unneeded_share_max"),
        ("rooms", "ids-routed-3", "unneeded_share_max"),
        ("rooms", "rooms-3", "deliveries_per_server_cpu_sec"),
        ("rooms", "rooms-3", "bytes_per_membership"),
        ("replicas", "legacy-4", "deliveries_per_server_cpu_sec"),
        ("replicas", "routed-4", "deliveries_per_server_cpu_sec"),
        ("shards", "redis-1", "deliveries_per_sec"),
        ("shards", "redis-2", "deliveries_per_sec"),
    ] {
        let Some(metric) = METRICS
            .iter()
            .find(|m| m.scenario == scenario && m.field == field)
        else {
            continue;
        };
        let get = |server| value(runs, scenario, server, field);
        let variants = ROOM_VARIANTS
            .iter()
            .chain(REPLICA_VARIANTS)
            .chain(SHARD_VARIANTS);
        let label = match variants.into_iter().find(|(key, _)| *key == ours) {
            Some((_, variant)) => format!("{}: {variant}", metric.label),
            None => metric.label.to_owned(),
        };
        let _ = writeln!(
            out,
            "| {scenario} | {label} | {} | {} | {} | {} | {} |",
            shown(get(ours), metric),
            shown(get("upstream"), metric),
            shown(get("bare"), metric),
            ratio(get(ours), get("upstream")),
            ratio(get(ours), get("bare")),
        );
    }
}

/// The issue's targets, met or missed, with the measured figures.
fn targets(out: &mut String, runs: &Runs) {
    let per_cpu = "deliveries_per_server_cpu_sec";
    let fanout = value(runs, "fanout", "ours", per_cpu);
    let at_least = |ours: Option<f64>, theirs: Option<f64>, goal: f64| {
        let r = ours.zip(theirs).map(|(o, t)| o / t);
        let text = r.map_or("–".to_owned(), |r| format!("{r:.2}x"));
        (r.map(|r| r >= goal), text)
    };
    let _ = writeln!(out, "| target | measured | verdict |");
    let _ = writeln!(out, "|---|---:|---|");
    let (met, text) = at_least(fanout, value(runs, "fanout", "upstream", per_cpu), 5.0);
    let _ = writeln!(
        out,
        "| fanout: deliveries per server CPU-second >= 5x @cryb/mesa | {text} | {} |",
        verdict(met)
    );
    let (met, text) = at_least(fanout, value(runs, "fanout", "bare", per_cpu), 1.0);
    let _ = writeln!(
        out,
        "| fanout: deliveries per server CPU-second >= 1.0x bare tokio-tungstenite | {text} | {} |",
        verdict(met)
    );
    for (field, label) in [("latency_p50_us", "p50"), ("latency_p99_us", "p99")] {
        let (ours, bare) = (
            value(runs, "rate", "ours", field),
            value(runs, "rate", "bare", field),
        );
        let text = ours.zip(bare).map_or("–".to_owned(), |(o, b)| {
            format!("{:.2} ms vs {:.2} ms", o / 1000.0, b / 1000.0)
        });
        let _ = writeln!(
            out,
            "| rate: latency {label} <= bare tokio-tungstenite's | {text} | {} |",
            verdict(ours.zip(bare).map(|(o, b)| o <= b))
        );
    }
    let idle = value(runs, "idle", "ours", "bytes_per_conn").map(|b| b / 1024.0);
    let _ = writeln!(
        out,
        "| idle: <= 3 KiB server RSS per connection | {} | {} |",
        idle.map_or("–".to_owned(), |k| format!("{k:.2} KiB")),
        verdict(idle.map(|k| k <= 3.0))
    );
    let echo = "round_trips_per_server_cpu_sec";
    for (server, name, goal) in [
        ("bare", "bare tokio-tungstenite", 1.0),
        ("upstream", "@cryb/mesa", 3.0),
    ] {
        let (met, text) = at_least(
            value(runs, "echo", "ours", echo),
            value(runs, "echo", server, echo),
            goal,
        );
        let _ = writeln!(
            out,
            "| echo: round trips per server CPU-second >= {goal}x {name} | {text} | {} |",
            verdict(met)
        );
    }
    share_target(
        out,
        "storm: no 100 ms window holds more than 10% of the reconnections",
        value(runs, "storm", "ours", "peak_window_share"),
        0.10,
    );
    let recovery = value(runs, "storm", "ours", "recovery_secs");
    let cap = runs
        .get("storm")
        .and_then(|s| s.get("ours"))
        .and_then(|r| r.first())
        .and_then(|r| r["backoff_cap_secs"].as_f64())
        .unwrap_or(30.0);
    let _ = writeln!(
        out,
        "| storm: all back within 2x the backoff cap ({} s) | {} | {} |",
        number(2.0 * cap, 0),
        recovery.map_or("–".to_owned(), |s| format!("{s:.2} s")),
        verdict(recovery.map(|s| s <= 2.0 * cap))
    );
    let publishes = value(runs, "cluster", "ours", "publish_per_send");
    let _ = writeln!(
        out,
        "| cluster: one PUBLISH per logical send | {} | {} |",
        publishes.map_or("–".to_owned(), |p| format!("{p:.2}")),
        verdict(publishes.map(|p| (p - 1.0).abs() < 1e-9))
    );
    for (variant, by) in [("rooms-3", "a Dispatcher"), ("rooms-clients-3", "clients")] {
        share_target(
            out,
            &format!(
                "rooms: at most 5% of the room messages a replica receives are unneeded (3 replicas, every replica, published by {by})"
            ),
            value(runs, "rooms", variant, "unneeded_share_max"),
            0.05,
        );
    }
    share_target(
        out,
        "rooms: at most 5% of the sends to ids a replica receives are unneeded, routed by interest (3 replicas, every replica)",
        value(runs, "rooms", "ids-routed-3", "unneeded_share_max"),
        0.05,
    );
    for (field, what) in [
        ("deliveries_per_sec", "wall clock"),
        (
            "deliveries_per_busiest_redis_cpu_sec",
            "per CPU-second of the busiest Redis instance",
        ),
    ] {
        let (met, text) = at_least(
            value(runs, "shards", "redis-2", field),
            value(runs, "shards", "redis-1", field),
            1.8,
        );
        let _ = writeln!(
            out,
            "| shards: cross-replica throughput with 2 Redis instances >= 1.8x that with 1 ({what}) | {text} | {} |",
            verdict(met)
        );
    }
}

/// A target's verdict: met, missed, or not measured.
fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// The row of a target that `share` be at most `limit`.
fn share_target(out: &mut String, label: &str, share: Option<f64>, limit: f64) {
    let _ = writeln!(
        out,
        "| {label} | {} | {} |",
        percent(share),
        verdict(share.map(|s| s <= limit))
    );
}

/// The colours of the servers' bars.
fn colour(server: &str) -> RGBColor {
    match server {
        "ours" => RGBColor(0xd9, 0x5f, 0x02),
        "upstream" => RGBColor(0x75, 0x70, 0xb3),
        _ => RGBColor(0x66, 0x66, 0x66),
    }
}

/// Draw four bar panels: fanout deliveries per second and per server CPU-second, echo
/// round trips per server CPU-second, and idle memory per connection.
fn chart(runs: &Runs, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let specs = [
        (
            "fanout",
            "deliveries_per_sec",
            "fanout: deliveries per second",
            1.0,
        ),
        (
            "fanout",
            "deliveries_per_server_cpu_sec",
            "fanout: deliveries per server CPU-second",
            1.0,
        ),
        (
            "echo",
            "round_trips_per_server_cpu_sec",
            "echo: round trips per server CPU-second",
            1.0,
        ),
        (
            "idle",
            "bytes_per_conn",
            "idle: server memory per connection (KiB)",
            1024.0,
        ),
    ];
    for (panel, (scenario, field, title, scale)) in panels.iter().zip(specs) {
        let bars: Vec<(&str, &str, f64)> = SERVERS
            .iter()
            .filter_map(|(key, name)| {
                let name = name.split(' ').next().unwrap_or(name);
                value(runs, scenario, key, field).map(|v| (*key, name, v / scale))
            })
            .collect();
        let top = bars.iter().map(|b| b.2).fold(0.0_f64, f64::max).max(1e-9) * 1.25;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(10)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..3.0_f64, 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| short(*v))
            .draw()?;
        for (i, (key, name, v)) in bars.iter().enumerate() {
            let x = i as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                colour(key).filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{name}: {}", short(*v)),
                (x + 0.12, v + top * 0.05),
                ("sans-serif", 12),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// `1.2M`, `350k`, `9.1`: a short axis or bar label.
fn short(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        let runs: Vec<Value> = [3.0, 1.0, 2.0]
            .iter()
            .map(|v| serde_json::json!({ "x": v }))
            .collect();
        assert_eq!(median(&runs, "x"), Some(2.0));
        assert_eq!(median(&runs[..2], "x"), Some(2.0));
        assert_eq!(median(&runs, "y"), None);
        assert_eq!(number(1_234_567.0, 0), "1,234,567");
        assert_eq!(number(12.345, 2), "12.35");
        assert_eq!(ratio(Some(10.0), Some(4.0)), "2.50x");
        assert_eq!(ratio(Some(1.0), None), "–");
    }

    #[test]
    fn renders_a_report_from_lines() {
        let lines = [
            r#"{"machine":{"cpu":"X","nproc":2,"date":"d","revision":"r","reps":1}}"#,
            r#"{"scenario":"fanout","server":"ours","rep":1,"deliveries_per_server_cpu_sec":600,"deliveries_per_sec":10,"lost":0,"duplicated":0}"#,
            r#"{"scenario":"fanout","server":"upstream","rep":1,"deliveries_per_server_cpu_sec":100,"deliveries_per_sec":5,"lost":0,"duplicated":0}"#,
            r#"{"scenario":"idle","server":"ours","rep":1,"bytes_per_conn":3072,"authenticated":10,"setup_secs":1}"#,
            r#"{"scenario":"rooms","server":"ours","variant":"rooms-3","rep":1,"unneeded_share_max":0.0,"deliveries_per_server_cpu_sec":300}"#,
            r#"{"scenario":"rooms","server":"ours","variant":"ids-3","rep":1,"unneeded_share_max":0.34,"deliveries_per_server_cpu_sec":200}"#,
            r#"{"scenario":"rooms","server":"ours","variant":"ids-routed-3","rep":1,"unneeded_share_max":0.01,"deliveries_per_server_cpu_sec":250}"#,
            r#"{"scenario":"rooms","server":"ours","variant":"odd-3","rep":1,"unneeded_share_max":0.5,"deliveries_per_server_cpu_sec":125}"#,
            r#"{"scenario":"replicas","server":"ours","variant":"legacy-4","rep":1,"deliveries_per_server_cpu_sec":1000,"redis_send_commands_per_send":1.01,"redis_commands_per_send":4,"unneeded_share_all":0.5}"#,
            r#"{"scenario":"replicas","server":"ours","variant":"routed-4","rep":1,"deliveries_per_server_cpu_sec":1500,"redis_send_commands_per_send":14.5,"redis_commands_per_send":17.5,"unneeded_share_all":0.0}"#,
            r#"{"scenario":"shards","server":"ours","variant":"redis-1","rep":1,"deliveries_per_sec":1000,"deliveries_per_busiest_redis_cpu_sec":100}"#,
            r#"{"scenario":"shards","server":"ours","variant":"redis-2","rep":1,"deliveries_per_sec":1100,"deliveries_per_busiest_redis_cpu_sec":190}"#,
        ]
        .join("\n");
        let (machine, runs) = parse(&lines).expect("valid lines");
        let document = render(&machine, &runs, "docs/bench.svg", "## Notes\n");
        assert!(
            document.contains(
                "| fanout | deliveries per server CPU-second | 600 | 100 | – | 6.00x | – |"
            )
        );
        assert!(document.contains("| idle: <= 3 KiB server RSS per connection | 3.00 KiB | met |"));
        assert!(document.contains("## Notes"));
        assert!(document.contains(
            "| rooms: at most 5% of the room messages a replica receives are unneeded (3 replicas, every replica, published by a Dispatcher) | 0.0% | met |"
        ));
        // Variants are columns, compared with the first; an unknown one comes last.
        assert!(document.contains(
            "| metric | rooms, 3 replicas | ids on the shared channel, 3 replicas | ids routed by interest, 3 replicas | odd-3 | \
             rooms, 3 replicas / ids on the shared channel, 3 replicas | rooms, 3 replicas / ids routed by interest, 3 replicas | rooms, 3 replicas / odd-3 |"
        ));
        assert!(document.contains(
            "| deliveries per server CPU-second (all replicas) ↑ | 300 | 200 | 250 | 125 | 1.50x | 1.20x | 2.40x |"
        ));
        // The cost across replicas: a table per replica count and its charts.
        assert!(document.contains(
            "| 4 | 1,000 | 1,500 | 1.50x | 1.01 | 14.50 | 4.00 | 17.50 | 50.0% | 0.0% |"
        ));
        assert!(document.contains("| 1 | – | – | – | – | – | – | – | – | – |"));
        assert!(document.contains(
            "x-axis \"replicas\" [\"1\", \"2\", \"4\"]\n    y-axis \"deliveries/CPU-s\" 0 --> 1800\n    bar [0, 0, 1000]\n    line [0, 0, 1500]"
        ));
        assert!(document.contains("bar [0.00, 0.00, 1.01]\n    line [0.00, 0.00, 14.50]"));
        assert!(document.contains(
            "| shards: cross-replica throughput with 2 Redis instances >= 1.8x that with 1 (wall clock) | 1.10x | **missed** |"
        ));
        assert!(document.contains(
            "| shards: cross-replica throughput with 2 Redis instances >= 1.8x that with 1 (per CPU-second of the busiest Redis instance) | 1.90x | met |"
        ));
        let dir = std::env::temp_dir().join(format!("mesa-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let svg = dir.join("bench.svg");
        chart(&runs, svg.to_str().expect("utf-8 path")).expect("chart");
        let drawn = std::fs::read_to_string(&svg).expect("svg written");
        assert!(drawn.contains("<svg"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
