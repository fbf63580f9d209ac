//! Faults of the simulated cluster (and replicas joining it): replicas crashing and
//! restarting, partitions between a replica and Redis, slow answers, Redis
//! restarting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{ClusterSim, Event, RedisLink, SimReplica};
use crate::replica::{Keys, Replica};

impl ClusterSim {
    /// Crash replica `r`: its connections drop, its state is gone; its keys stay in
    /// Redis until its lease expires.
    pub fn crash(&mut self, r: usize) {
        let Some(_) = self.replicas[r].replica.take() else {
            return;
        };
        self.uncertain(r, None);
        let replica = &mut self.replicas[r];
        replica
            .redis_links
            .iter_mut()
            .for_each(|link| link.linked = false);
        replica.timer = None;
        self.redis
            .iter_mut()
            .for_each(|redis| redis.unsubscribe_all(r));
        let conns = std::mem::take(&mut self.replicas[r].conns);
        for (_, conn) in conns {
            if let Some(id) = &conn.id {
                self.track.leave(self.now, id);
            }
            let c = self.links[conn.link].client;
            self.drop_client_link(c, conn.link);
        }
        self.settle();
    }

    /// Start replica `r` again, as a new replica (a new name), after a crash.
    pub fn restart(&mut self, r: usize) {
        if self.replicas[r].replica.is_some() {
            return;
        }
        let replica = &mut self.replicas[r];
        replica.incarnation += 1;
        replica.name = format!("r{r}.{}", replica.incarnation);
        replica.keys = Arc::new(Keys::new(
            self.config.replica.namespace.clone(),
            replica.name.clone(),
        ));
        let seed = self.rng.next_u64();
        let name = replica.name.clone();
        replica.replica = Some(
            Replica::new(self.config.replica.clone(), name, seed, self.now)
                .expect("a valid replica configuration"),
        );
        self.dirty_replicas.push(r);
        self.settle();
    }

    /// Add a replica; returns its index.
    pub fn add_replica(&mut self) -> usize {
        let r = self.replicas.len();
        let name = format!("r{r}.0");
        let seed = self.rng.next_u64();
        let replica = Replica::new(self.config.replica.clone(), name.clone(), seed, self.now)
            .expect("a valid replica configuration");
        self.replicas.push(SimReplica {
            keys: Arc::new(Keys::new(
                self.config.replica.namespace.clone(),
                name.clone(),
            )),
            name,
            replica: Some(replica),
            incarnation: 0,
            conns: BTreeMap::new(),
            redis_links: vec![RedisLink::default(); self.config.replica.shards],
            partitioned_until: None,
            slow: None,
            timer: None,
            outstanding: BTreeMap::new(),
            inbound: Vec::new(),
        });
        self.dirty_replicas.push(r);
        r
    }

    /// Partition replica `r` from Redis for `duration`: its link dies silently.
    pub fn partition(&mut self, r: usize, duration: Duration) {
        let replica = &mut self.replicas[r];
        replica.partitioned_until = Some(self.now + duration);
        for link in &mut replica.redis_links {
            link.killed = link.epoch;
        }
        self.redis
            .iter_mut()
            .for_each(|redis| redis.unsubscribe_all(r));
    }

    /// Redis answers replica `r` `extra` later than usual for `duration`.
    pub fn slow_replies(&mut self, r: usize, extra: Duration, duration: Duration) {
        self.replicas[r].slow = Some((self.now + duration, extra));
    }

    /// Restart Redis (every instance): every link resets now, Redis is back after
    /// `down_for`, with its keys when `persist`.
    pub fn restart_redis(&mut self, persist: bool, down_for: Duration) {
        if !persist && self.config.record {
            let erased = self.stored_now();
            self.track.wiped.extend(erased);
        }
        if !persist {
            self.presence_told.clear();
        }
        self.redis
            .iter_mut()
            .for_each(|redis| redis.restart(persist));
        self.redis_up = false;
        for r in 0..self.replicas.len() {
            let replica = &mut self.replicas[r];
            for (shard, link) in replica.redis_links.iter_mut().enumerate() {
                link.killed = link.epoch;
                if link.linked {
                    link.linked = false;
                    if let Some(machine) = replica.replica.as_mut() {
                        machine.handle_link_down(self.now, shard, "connection reset");
                        self.dirty_replicas.push(r);
                    }
                }
            }
        }
        self.schedule.push(self.now + down_for, Event::RedisUp);
        self.settle();
    }
}
