//! A simulated cluster at scale: N replicas and many clients on the model of Redis,
//! in virtual time (`mesa_core::sim`), to reason about 100 replicas before running
//! them.
//!
//! ```text
//! cargo run --release -p mesa-core --features sim --example cluster_sim -- \
//!     --replicas 100 --clients 1000000 --seed 1 [--storm] [--redis-restart] [--sync-load 0.1]
//! ```
//!
//! Phases: the clients connect (spread over `--ramp-secs`); with `--sync-load S` a
//! share S of them goes offline; `--messages` messages are sent, each from a random
//! client to `--fanout` random ids, over `--send-secs`, while faults strike: with
//! `--storm` 10 replicas crash halfway through and their clients reconnect to the
//! others, with `--redis-restart` Redis restarts at three quarters (with
//! persistence, down 2 s); the offline clients come back and get their stored
//! messages; the cluster settles for 20 s. Prints a table, then one JSON line.

use std::time::{Duration, Instant};

use mesa_core::sim::{ClusterSim, SimConfig};

struct Args {
    replicas: usize,
    clients: usize,
    seed: u64,
    messages: usize,
    fanout: usize,
    ramp_secs: u64,
    send_secs: u64,
    storm: bool,
    redis_restart: bool,
    sync_load: f64,
    heartbeat_secs: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        replicas: 3,
        clients: 1000,
        seed: 1,
        messages: 0,
        fanout: 3,
        ramp_secs: 10,
        send_secs: 10,
        storm: false,
        redis_restart: false,
        sync_load: 0.0,
        heartbeat_secs: 10,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let mut value = || given.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| text.parse::<u64>().map_err(|e| format!("{text}: {e}"));
        match flag.as_str() {
            "--replicas" => args.replicas = number(value()?)? as usize,
            "--clients" => args.clients = number(value()?)? as usize,
            "--seed" => args.seed = number(value()?)?,
            "--messages" => args.messages = number(value()?)? as usize,
            "--fanout" => args.fanout = number(value()?)? as usize,
            "--ramp-secs" => args.ramp_secs = number(value()?)?,
            "--send-secs" => args.send_secs = number(value()?)?.max(1),
            "--heartbeat-secs" => args.heartbeat_secs = number(value()?)?.max(1),
            "--storm" => args.storm = true,
            "--redis-restart" => args.redis_restart = true,
            "--sync-load" => {
                let text = value()?;
                args.sync_load = text.parse().map_err(|e| format!("{text}: {e}"))?;
            }
            "--help" | "-h" => {
                return Err(
                    "usage: cluster_sim [--replicas N] [--clients N] [--seed N] \
                     [--messages N] [--fanout N] [--ramp-secs S] [--send-secs S] \
                     [--heartbeat-secs S] [--storm] [--redis-restart] [--sync-load SHARE]"
                        .into(),
                );
            }
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    if args.messages == 0 {
        args.messages = (args.clients / 10).max(10);
    }
    if args.replicas == 0 || args.clients == 0 {
        return Err("--replicas and --clients must be at least 1".into());
    }
    if args.storm && args.replicas <= 10 {
        return Err("--storm kills 10 replicas: give more than 10".into());
    }
    Ok(args)
}

/// One row of the table: a phase, when it ended (virtual), what it took (wall).
struct Row {
    phase: &'static str,
    virtual_s: f64,
    wall_s: f64,
    note: String,
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    // The example is the adapter: it reads the clock, once for the virtual start and
    // for the wall times of its phases.
    #[allow(clippy::disallowed_methods)]
    let wall = Instant::now;
    let started = wall();

    let mut config = SimConfig::new(args.replicas, args.clients, args.seed);
    config.server = mesa_core::ServerConfig::builder()
        .heartbeat(mesa_core::HeartbeatConfig {
            interval: Duration::from_secs(args.heartbeat_secs),
            max_attempts: 3,
        })
        .authentication(mesa_core::AuthConfig::default())
        .sync(mesa_core::SyncConfig::default())
        .build()
        .expect("a valid configuration");
    let mut sim = ClusterSim::new(config, started);
    let mut rng = mesa_core::rng::Rng::new(args.seed ^ 0x5eed);
    let mut rows = Vec::new();
    let mut row = |sim: &ClusterSim, phase, note: String| {
        rows.push(Row {
            phase,
            virtual_s: sim.elapsed().as_secs_f64(),
            wall_s: started.elapsed().as_secs_f64(),
            note,
        });
    };

    // Connect, spread over the ramp.
    let ramp = Duration::from_secs(args.ramp_secs);
    for c in 0..args.clients {
        let at = ramp.mul_f64(c as f64 / args.clients as f64);
        sim.connect_at(c, sim.now + at);
    }
    run_while(&mut sim, ramp + Duration::from_secs(60), |sim| {
        sim.authenticated < args.clients
    });
    let note = format!("{} of {} authenticated", sim.authenticated, args.clients);
    row(&sim, "connect", note);

    // Sync load: a share of the clients goes away; messages to them are stored.
    let offline: Vec<usize> = (0..args.clients)
        .filter(|_| (rng.next_u64() as f64 / u64::MAX as f64) < args.sync_load)
        .collect();
    for c in &offline {
        sim.disconnect(*c);
    }
    sim.run_for(Duration::from_secs(2));
    row(
        &sim,
        "offline",
        format!("{} clients offline", offline.len()),
    );

    // Send; the faults strike while messages flow: the storm halfway through, the
    // Redis restart at three quarters.
    let slices = args.send_secs * 100;
    let expected = args.clients - offline.len();
    let mut sent = 0;
    let mut crash_at = None;
    let mut storm_all_back_s = None;
    let mut victims = 0;
    for slice in 0..slices {
        if args.storm && slice == slices / 2 {
            victims = (1..=10).map(|r| sim.replicas[r].connections()).sum();
            for r in 1..=10 {
                sim.crash(r);
            }
            crash_at = Some(sim.now);
        }
        if args.redis_restart && slice == slices * 3 / 4 {
            sim.restart_redis(true, Duration::from_secs(2));
        }
        let due = (args.messages as u64 * (slice + 1) / slices) as usize;
        while sent < due {
            let from = rng.below_or_equal(args.clients as u64 - 1) as usize;
            let to: Vec<String> = (0..args.fanout)
                .map(|_| sim.id_of(rng.below_or_equal(args.clients as u64 - 1) as usize))
                .collect();
            sim.send(from, &to);
            sent += 1;
        }
        sim.run_for(Duration::from_millis(10));
        if let (Some(at), None) = (crash_at, storm_all_back_s) {
            if sim.authenticated >= expected {
                storm_all_back_s = Some((sim.now - at).as_secs_f64());
            }
        }
    }
    if let (Some(at), None) = (crash_at, storm_all_back_s) {
        run_while(&mut sim, Duration::from_secs(300), |sim| {
            sim.authenticated < expected
        });
        storm_all_back_s = Some((sim.now - at).as_secs_f64());
    }
    sim.run_for(Duration::from_secs(2));
    let note = format!("{sent} messages, {} stored", sim.counters.stored);
    row(&sim, "send", note);
    if let Some(back) = storm_all_back_s {
        let note = format!("{victims} clients of 10 crashed replicas back in {back:.2} s");
        row(&sim, "storm", note);
    }
    if args.redis_restart {
        let note = format!("{} link failures", sim.counters.link_downs);
        row(&sim, "redis restart", note);
    }

    // The offline clients come back for their stored messages; then everything
    // settles (leases, janitors, redeliveries).
    for c in &offline {
        sim.connect(*c);
    }
    sim.run_for(Duration::from_secs(20));
    let note = format!("{} events, {} waiting", sim.steps, sim.scheduled());
    row(&sim, "settle", note);

    let summary = sim.summary();
    // The properties of the tests, over this run's records: nothing stored lost,
    // duplicates only in the at-least-once window, each sender's order.
    let violations = sim.check();
    let calls = &sim.counters.redis_calls;
    let peak = calls.iter().copied().max().unwrap_or(0);
    let mean = calls.iter().sum::<u64>() as f64 / calls.len().max(1) as f64;
    let wall_s = started.elapsed().as_secs_f64();

    println!("{:<14} {:>10} {:>8}  what", "phase", "virtual s", "wall s");
    for row in &rows {
        println!(
            "{:<14} {:>10.1} {:>8.1}  {}",
            row.phase, row.virtual_s, row.wall_s, row.note
        );
    }
    println!();
    println!("messages sent            {}", sim.counters.sent);
    println!("(message, id) pairs      {}", summary.addressed);
    println!("  delivered              {}", summary.delivered);
    println!("  still stored           {}", summary.stored);
    println!("  lost                   {}", summary.lost);
    println!("  duplicated receptions  {}", summary.duplicated);
    println!("redis commands/s         peak {peak}, mean {mean:.0}");
    println!("busiest replica inbound  {}/s", sim.busiest_inbound_per_s());
    println!("link failures            {}", sim.counters.link_downs);
    println!("jobs lost (reported)     {}", sim.counters.jobs_lost);
    println!("property violations      {}", violations.len());
    for violation in violations.iter().take(10) {
        println!("  {violation}");
    }
    let storm = storm_all_back_s.map_or("null".to_owned(), |s| format!("{s:.3}"));
    println!(
        "{{\"replicas\":{},\"clients\":{},\"sent\":{},\"delivered\":{},\"lost\":{},\"duplicated\":{},\"redis_commands_per_s_peak\":{},\"redis_commands_per_s_mean\":{:.0},\"busiest_replica_inbound_per_s\":{},\"storm_all_back_s\":{},\"violations\":{},\"wall_s\":{:.1}}}",
        args.replicas,
        args.clients,
        sim.counters.sent,
        summary.delivered,
        summary.lost,
        summary.duplicated,
        peak,
        mean,
        sim.busiest_inbound_per_s(),
        storm,
        violations.len(),
        wall_s
    );
}

/// Run in steps of 100 ms while `busy` holds, at most `limit` of virtual time.
fn run_while(sim: &mut ClusterSim, limit: Duration, busy: impl Fn(&ClusterSim) -> bool) {
    let until = sim.now + limit;
    while busy(sim) && sim.now < until {
        sim.run_for(Duration::from_millis(100));
    }
}
