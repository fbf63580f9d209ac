//! The cluster simulator (`mesa_core::sim`): deterministic scenarios first, then
//! property tests over random schedules of faults.

use std::time::{Duration, Instant};

use mesa_core::sim::{ClusterSim, SimConfig};

fn start() -> Instant {
    // The one clock read of these tests; every other instant is an offset.
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

fn settled(replicas: usize, clients: usize, seed: u64) -> ClusterSim {
    let mut config = SimConfig::new(replicas, clients, seed);
    config.check_contract = true;
    let mut sim = ClusterSim::new(config, start());
    for c in 0..clients {
        sim.connect(c);
    }
    sim.run_for(Duration::from_secs(2));
    sim
}

#[test]
fn a_quiet_cluster_connects_everyone_and_delivers_everything_once() {
    let mut sim = settled(3, 12, 1);
    assert_eq!(sim.authenticated, 12);
    for c in 0..12 {
        let to = vec![sim.id_of((c + 1) % 12), sim.id_of((c + 5) % 12)];
        sim.send(c, &to);
    }
    sim.run_for(Duration::from_secs(2));
    let received: u64 = sim.clients.iter().map(|c| c.log.count).sum();
    assert_eq!(received, 24);
    assert_eq!(sim.check(), Vec::<String>::new());
    assert_eq!(sim.check_presence(Duration::from_secs(15)), Vec::<String>::new());
}

fn no_violations(violations: Vec<String>) {
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn a_message_to_an_offline_id_is_stored_then_redelivered_once_and_trimmed() {
    let mut sim = settled(2, 4, 2);
    sim.disconnect(3);
    sim.run_for(Duration::from_secs(1));
    no_violations(sim.check_settled_keys());
    let to = vec![sim.id_of(3)];
    sim.send(0, &to);
    sim.send(1, &to);
    sim.run_for(Duration::from_secs(1));
    let stored = sim.config().replica.namespace.undelivered_messages();
    assert_eq!(sim.redis.hash(&stored).map(|h| h.len()), Some(1));
    sim.connect(3);
    sim.run_for(Duration::from_secs(2));
    let got: Vec<_> = sim.clients[3].log.receptions.iter().map(|r| (r.key, r.redelivered)).collect();
    assert_eq!(got, [((0, 1), true), ((1, 1), true)]);
    assert_eq!(sim.redis.hash(&stored), None, "trimmed to nothing");
    no_violations(sim.check());
    no_violations(sim.check_settled_keys());
}

#[test]
fn a_crashed_replica_s_ids_leave_presence_within_the_lease() {
    let mut sim = settled(3, 30, 3);
    let r = 1;
    let held: Vec<usize> = (0..30).filter(|c| sim.replica_of(*c) == Some(r)).collect();
    assert!(!held.is_empty());
    // Its clients do not come back (they disconnect for good when the replica dies).
    sim.crash(r);
    for c in &held {
        sim.disconnect(*c);
    }
    sim.run_for(Duration::from_secs(1));
    assert!(
        !sim.check_settled_keys().is_empty(),
        "right after the crash its ids are still registered"
    );
    let bound = Duration::from_secs(10) + Duration::from_secs(10) / 3 + Duration::from_secs(1);
    sim.run_for(bound);
    no_violations(sim.check_presence(bound));
    no_violations(sim.check_settled_keys());
    no_violations(sim.check());
}

#[test]
fn a_partitioned_replica_keeps_its_synced_sends_and_delivers_them_after() {
    let mut sim = settled(2, 6, 4);
    sim.disconnect(5);
    sim.run_for(Duration::from_secs(1));
    let sender_replica = sim.replica_of(0).expect("connected");
    sim.partition(sender_replica, Duration::from_secs(8));
    let to = vec![sim.id_of(5)];
    for _ in 0..3 {
        sim.send(0, &to);
    }
    sim.run_for(Duration::from_secs(12));
    assert!(sim.counters.link_downs > 0);
    sim.connect(5);
    sim.run_for(Duration::from_secs(3));
    let got: Vec<_> = sim.clients[5].log.receptions.iter().map(|r| r.key).collect();
    assert_eq!(got, [(0, 1), (0, 2), (0, 3)]);
    no_violations(sim.check());
    no_violations(sim.check_settled_keys());
}

#[test]
fn after_a_redis_restart_presence_and_counts_are_rebuilt() {
    for persist in [true, false] {
        let mut sim = settled(3, 9, 5);
        sim.restart_redis(persist, Duration::from_secs(2));
        sim.run_for(Duration::from_secs(15));
        no_violations(sim.check_settled_keys());
        let to = vec![sim.id_of(4)];
        sim.send(0, &to);
        sim.run_for(Duration::from_secs(1));
        assert_eq!(sim.clients[4].log.count, 1, "persist {persist}");
        no_violations(sim.check());
    }
}
