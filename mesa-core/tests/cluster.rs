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
