//! The load of `scripts/soak` (not a test): publishers and sync recipients on two
//! replicas of a cluster, counting every message sent to an offline recipient and
//! every message it received, live or redelivered.
//!
//! ```text
//! soak --servers ws://127.0.0.1:4101/,ws://127.0.0.1:4102/ --publishers 1000 \
//!      --recipients 50 --interval-ms 2000 --duration-secs 1740 --report soak.json
//! ```
//!
//! - Publisher `i` (id `p<i>`) connects to replica `i % 2`, authenticates, and every
//!   `interval` sends `BROADCAST {"to": ["s<k>"], "id": n}` to a random recipient `k`
//!   that is offline (the relay handler delivers it, through Redis, or stores it).
//! - Recipient `k` (id `s<k>`) stays offline, and every 20 to 40 s collects: it stops
//!   being a target, waits a second for sends in flight, connects (alternating
//!   replicas) with `shouldSync`, takes the redelivered messages until 3 s pass without
//!   one, disconnects, and waits 2 s more (presence leaves Redis) before it becomes a
//!   target again.
//! - At the end the publishers stop, every recipient collects once more, and a JSON
//!   report (sent, received, lost, duplicated, disconnections) is written; the exit
//!   status is non-zero when a message was lost.
//!
//! Every phase is bounded in time, so the tool always stops by itself.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesa_core::rng::Rng;
use mesa_tokio::{ClientEvent, Close, CloseCode, Message};
use serde_json::json;
use tokio::time::{sleep, timeout};

/// The options, from `--name value` pairs.
#[derive(Debug, Clone)]
struct Options {
    servers: Vec<String>,
    publishers: u32,
    recipients: u32,
    interval: Duration,
    duration: Duration,
    report: String,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            servers: Vec::new(),
            publishers: 1000,
            recipients: 50,
            interval: Duration::from_secs(2),
            duration: Duration::from_secs(1740),
            report: "soak-load.json".to_owned(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
            match flag.as_str() {
                "--servers" => options.servers = value.split(',').map(str::to_owned).collect(),
                "--publishers" => options.publishers = number()? as u32,
                "--recipients" => options.recipients = number()?.max(1) as u32,
                "--interval-ms" => options.interval = Duration::from_millis(number()?),
                "--duration-secs" => options.duration = Duration::from_secs(number()?),
                "--report" => options.report = value,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if options.servers.is_empty() {
            return Err("--servers URL[,URL...] is required".to_owned());
        }
        Ok(options)
    }
}

/// What every task shares.
struct Shared {
    options: Options,
    /// Recipient `k` may be sent to (it is offline and settled).
    targetable: Vec<AtomicBool>,
    /// Ids of the messages sent to each recipient.
    sent: Vec<Mutex<Vec<u64>>>,
    /// How often each id reached each recipient.
    received: Vec<Mutex<HashMap<u64, u32>>>,
    next_id: AtomicU64,
    /// Publishing stops when this is set.
    stopping: AtomicBool,
    publishers_ready: AtomicU64,
    publisher_disconnects: AtomicU64,
    send_errors: AtomicU64,
    collections: AtomicU64,
    redelivered: AtomicU64,
    failed_collections: AtomicU64,
}

fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(usage) => {
            eprintln!("soak: {usage}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(options))
}

async fn run(options: Options) -> ExitCode {
    let recipients = options.recipients as usize;
    let shared = Arc::new(Shared {
        targetable: (0..recipients).map(|_| AtomicBool::new(true)).collect(),
        sent: (0..recipients).map(|_| Mutex::new(Vec::new())).collect(),
        received: (0..recipients)
            .map(|_| Mutex::new(HashMap::new()))
            .collect(),
        next_id: AtomicU64::new(1),
        stopping: AtomicBool::new(false),
        publishers_ready: AtomicU64::new(0),
        publisher_disconnects: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        collections: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
        failed_collections: AtomicU64::new(0),
        options,
    });
    let started = Instant::now();
    let end = started + shared.options.duration;

    let mut publishers = Vec::new();
    for index in 0..shared.options.publishers {
        publishers.push(tokio::spawn(publisher(shared.clone(), index, end)));
        if index % 100 == 99 {
            sleep(Duration::from_millis(50)).await;
        }
    }
    let mut collectors = Vec::new();
    for k in 0..recipients {
        collectors.push(tokio::spawn(recipient(shared.clone(), k, end)));
    }
    let mut next_log = started;
    while Instant::now() < end {
        if Instant::now() >= next_log {
            progress(&shared, started);
            next_log += Duration::from_secs(60);
        }
        sleep(Duration::from_secs(1)).await;
    }
    shared.stopping.store(true, Ordering::SeqCst);
    eprintln!("soak: publishing stopped; the last collections follow");
    for collector in collectors {
        let _ = timeout(Duration::from_secs(120), collector).await;
    }
    // The final collection of every recipient, with everything settled.
    sleep(Duration::from_secs(3)).await;
    let finals = (0..recipients).map(|k| {
        let shared = shared.clone();
        tokio::spawn(async move { collect(&shared, k, k + 1).await })
    });
    for handle in finals.collect::<Vec<_>>() {
        let _ = timeout(Duration::from_secs(120), handle).await;
    }
    for publisher in publishers {
        let _ = timeout(Duration::from_secs(30), publisher).await;
    }
    report(&shared, started)
}

/// Print one progress line on stderr.
fn progress(shared: &Shared, started: Instant) {
    let sent: usize = shared.sent.iter().map(|s| s.lock().unwrap().len()).sum();
    let received: usize = shared
        .received
        .iter()
        .map(|r| r.lock().unwrap().len())
        .sum();
    eprintln!(
        "soak: t={:>5}s publishers ready {} sent {} received {} collections {} publisher disconnects {}",
        started.elapsed().as_secs(),
        shared.publishers_ready.load(Ordering::Relaxed),
        sent,
        received,
        shared.collections.load(Ordering::Relaxed),
        shared.publisher_disconnects.load(Ordering::Relaxed),
    );
}

/// One publisher: connect, authenticate, send every interval until the end.
async fn publisher(shared: Arc<Shared>, index: u32, end: Instant) {
    let options = &shared.options;
    let url = &options.servers[index as usize % options.servers.len()];
    let Ok((client, mut events)) = mesa_tokio::client(url.clone()).build() else {
        return;
    };
    let counter = shared.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            // Disconnections before the end (the last one is deliberate).
            let stopping = counter.stopping.load(Ordering::SeqCst);
            if matches!(event, ClientEvent::Disconnected { .. }) && !stopping {
                counter
                    .publisher_disconnects
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let token = json!({"token": format!("p{index}")});
    if timeout(Duration::from_secs(60), client.authenticate(token, false))
        .await
        .is_err()
    {
        eprintln!("soak: publisher {index} did not authenticate within 60 s");
    }
    shared.publishers_ready.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(u64::from(index) + 1);
    // Spread the publishers over the interval.
    let interval = options.interval;
    let offset = rng.below_or_equal(interval.as_millis() as u64);
    sleep(Duration::from_millis(offset)).await;
    let recipients = options.recipients as u64;
    while !shared.stopping.load(Ordering::SeqCst) && Instant::now() < end {
        let k = rng.below_or_equal(recipients - 1) as usize;
        if shared.targetable[k].load(Ordering::SeqCst) {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let message =
                Message::dispatch("BROADCAST", json!({"to": [format!("s{k}")], "id": id}));
            match client.send(message).await {
                Ok(()) => shared.sent[k].lock().unwrap().push(id),
                Err(_) => {
                    shared.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        sleep(interval).await;
    }
    // Let the queued sends leave before the connection goes.
    sleep(Duration::from_secs(2)).await;
    let _ = client
        .disconnect(Close::new(CloseCode::NORMAL, "soak over"))
        .await;
}

/// One sync recipient: offline most of the time, collecting every 20 to 40 s.
async fn recipient(shared: Arc<Shared>, k: usize, end: Instant) {
    let mut rng = Rng::new(10_000 + k as u64);
    let mut round = k;
    loop {
        let wait = Duration::from_millis(20_000 + rng.below_or_equal(20_000));
        if Instant::now() + wait >= end {
            return;
        }
        sleep(wait).await;
        collect(&shared, k, round).await;
        round += 1;
    }
}

/// Collect what waits for recipient `k` on replica `round % replicas`.
async fn collect(shared: &Shared, k: usize, round: usize) {
    shared.targetable[k].store(false, Ordering::SeqCst);
    sleep(Duration::from_secs(1)).await;
    let servers = &shared.options.servers;
    let url = servers[round % servers.len()].clone();
    let collected = timeout(Duration::from_secs(60), take_messages(shared, k, url)).await;
    if !matches!(collected, Ok(true)) {
        shared.failed_collections.fetch_add(1, Ordering::Relaxed);
    }
    shared.collections.fetch_add(1, Ordering::Relaxed);
    sleep(Duration::from_secs(2)).await;
    if !shared.stopping.load(Ordering::SeqCst) {
        shared.targetable[k].store(true, Ordering::SeqCst);
    }
}

/// Connect as `s<k>` with `shouldSync`, record every message until 3 s pass without
/// one, then disconnect. False when the connection or the authentication failed.
async fn take_messages(shared: &Shared, k: usize, url: String) -> bool {
    let Ok((client, mut events)) = mesa_tokio::client(url).reconnect(false).build() else {
        return false;
    };
    let token = json!({"token": format!("s{k}")});
    // Nothing reaches this id's connection before op 22, and the event buffer holds
    // more than the few events before it: read the events afterwards.
    if client.authenticate(token, true).await.is_err() {
        return false;
    }
    loop {
        match timeout(Duration::from_secs(3), events.next()).await {
            Ok(Some(ClientEvent::Message(message))) => {
                if message.s.is_some() {
                    shared.redelivered.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(id) = message.d.get("id").and_then(|id| id.as_u64()) {
                    *shared.received[k].lock().unwrap().entry(id).or_default() += 1;
                }
            }
            Ok(Some(ClientEvent::Disconnected { .. }) | None) => return false,
            Ok(Some(_)) => {}
            // Quiet for 3 s: everything stored was redelivered.
            Err(_) => break,
        }
    }
    let _ = client
        .disconnect(Close::new(CloseCode::NORMAL, "collected"))
        .await;
    true
}

/// Write the JSON report and print its summary; non-zero when a message was lost.
fn report(shared: &Shared, started: Instant) -> ExitCode {
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut lost = Vec::new();
    let mut duplicates = 0u64;
    for k in 0..shared.sent.len() {
        let ids = shared.sent[k].lock().unwrap();
        let got = shared.received[k].lock().unwrap();
        sent += ids.len();
        received += got.len();
        duplicates += got
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum::<u64>();
        lost.extend(
            ids.iter()
                .filter(|id| !got.contains_key(id))
                .map(|id| (k, *id)),
        );
    }
    let report = json!({
        "seconds": started.elapsed().as_secs(),
        "publishers": shared.options.publishers,
        "recipients": shared.options.recipients,
        "publishers_authenticated": shared.publishers_ready.load(Ordering::Relaxed),
        "publisher_disconnects": shared.publisher_disconnects.load(Ordering::Relaxed),
        "send_errors": shared.send_errors.load(Ordering::Relaxed),
        "sent": sent,
        "received_distinct": received,
        "redelivered": shared.redelivered.load(Ordering::Relaxed),
        "lost": lost.len(),
        "lost_sample": lost.iter().take(20).map(|(k, id)| json!({"recipient": k, "id": id})).collect::<Vec<_>>(),
        "duplicates": duplicates,
        "collections": shared.collections.load(Ordering::Relaxed),
        "failed_collections": shared.failed_collections.load(Ordering::Relaxed),
    });
    let text = serde_json::to_string_pretty(&report).expect("JSON");
    if let Err(error) = std::fs::write(&shared.options.report, &text) {
        eprintln!("soak: cannot write {}: {error}", shared.options.report);
    }
    println!("{text}");
    if lost.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
