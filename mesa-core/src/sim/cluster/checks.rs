//! What the simulated cluster checks and measures over its records.

use std::collections::BTreeMap;

use std::time::Duration;

use super::ClusterSim;
use crate::cluster::shard_of;
use crate::sim::redis::{RedisModel, StoreLog};
use crate::sim::track::{self, Violation};

impl ClusterSim {
    /// Every property over the records, as violations (empty when all hold). Call
    /// it once the cluster settled (no fault for a while).
    pub fn check(&self) -> Vec<Violation> {
        let mut violations = self.violations.clone();
        let stored_now = self.stored_now();
        violations.extend(track::check_stored(
            &self.track,
            &self.store_log(),
            &stored_now,
        ));
        let clients = || {
            self.clients
                .iter()
                .enumerate()
                .map(|(c, client)| (self.id_of(c), &client.log))
        };
        violations.extend(track::check_duplicates(&self.track, clients()));
        violations.extend(track::check_order(&self.track, clients()));
        violations
    }

    /// What became of every message relayed (needs `record`).
    pub fn summary(&self) -> track::Summary {
        let clients = self
            .clients
            .iter()
            .enumerate()
            .map(|(c, client)| (self.id_of(c), &client.log));
        track::summarize(&self.track, clients, &self.stored_now())
    }

    /// Every entry stored now, as `(id, entry text)`.
    pub fn stored_now(&self) -> Vec<(String, String)> {
        let key = self.config.replica.namespace.undelivered_messages();
        let hash = self
            .redis
            .iter()
            .flat_map(|redis| redis.hash(&key))
            .flatten();
        hash.flat_map(|(id, raw)| {
            let entries = crate::sync::stored_entries(raw).unwrap_or_default();
            entries.into_iter().map(|e| (id.clone(), e.to_owned()))
        })
        .collect()
    }

    /// Ids in `connected_clients` that lost their last connection at least
    /// `bound` ago (and at least `bound` after Redis came back).
    pub fn check_presence(&self, bound: Duration) -> Vec<Violation> {
        let key = self.config.replica.namespace.connected_clients();
        track::check_presence(
            &self.track,
            self.redis.iter().flat_map(|redis| redis.members(&key)),
            self.now,
            bound,
            self.redis_since,
        )
    }

    /// What a settled cluster must show in the keys Node replicas read:
    /// `connected_clients` holds exactly the ids connected somewhere, and
    /// `connected_clients_count` counts every open connection.
    pub fn check_settled_keys(&self) -> Vec<Violation> {
        let ns = &self.config.replica.namespace;
        let mut violations = Vec::new();
        let key = ns.connected_clients();
        let mut members: Vec<&str> = self
            .redis
            .iter()
            .flat_map(|redis| redis.members(&key))
            .collect();
        members.sort_unstable();
        let mut online: Vec<&str> = self.track.online.keys().map(String::as_str).collect();
        online.sort_unstable();
        if members != online {
            violations.push(format!(
                "connected_clients {members:?} but online {online:?}"
            ));
        }
        let count = self.redis[0].get(self.now, &ns.connected_clients_count());
        let open = self.open_connections();
        if count.and_then(|c| c.parse::<usize>().ok()).unwrap_or(0) != open {
            violations.push(format!("connected_clients_count {count:?} but {open} open"));
        }
        violations.extend(self.check_room_presence());
        violations.extend(self.check_routes());
        violations
    }

    /// Each id's route table entry names exactly the live replicas holding a
    /// connection of it.
    fn check_routes(&self) -> Vec<Violation> {
        let ns = &self.config.replica.namespace;
        let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for replica in self.replicas.iter().filter_map(|r| r.replica.as_ref()) {
            for id in replica.hub().online_ids() {
                let name = replica.keys().replica().to_owned();
                expected.entry(id.to_owned()).or_default().push(name);
            }
        }
        let mut violations = Vec::new();
        for id in (0..self.config.ids).map(|i| format!("u{i}")) {
            let mut held: Vec<&str> = self.redis_of(&id).members(&ns.routes(&id));
            held.sort_unstable();
            let mut want = expected.remove(&id).unwrap_or_default();
            want.sort_unstable();
            if held != want {
                violations.push(format!(
                    "routes of {id}: Redis holds {held:?}, the replicas {want:?}"
                ));
            }
        }
        violations
    }

    /// Each room's members in Redis are its members on the live replicas: every
    /// id with its connections in the room; and the last presence change published
    /// of each id says whether it is in the room.
    fn check_room_presence(&self) -> Vec<Violation> {
        let ns = &self.config.replica.namespace;
        let mut expected: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for replica in self.replicas.iter().filter_map(|r| r.replica.as_ref()) {
            let hub = replica.hub();
            for room in hub.rooms().rooms() {
                for conn in hub.rooms().members(room) {
                    if let Some(id) = hub.id_of(conn) {
                        let ids = expected.entry(room.to_owned()).or_default();
                        *ids.entry(id.to_owned()).or_default() += 1;
                    }
                }
            }
        }
        let rooms = self.config.rooms;
        let mut violations = Vec::new();
        for room in (0..rooms).map(|i| format!("room{i}")) {
            let held: BTreeMap<String, u64> = self
                .redis_of(&room)
                .hash(&ns.room_members(&room))
                .into_iter()
                .flatten()
                .map(|(id, n)| (id.clone(), n.parse().unwrap_or(0)))
                .collect();
            let want = expected.remove(&room).unwrap_or_default();
            if held != want {
                violations.push(format!(
                    "{room}: Redis holds {held:?}, the replicas {want:?}"
                ));
            }
            // The last change published of each id is its presence now.
            let told = self.presence_told.iter().filter(|((r, _), _)| *r == room);
            for ((_, id), joined) in told {
                if *joined != held.contains_key(id) {
                    violations.push(format!("{room}: {id} last told joined {joined}"));
                }
            }
            for id in held.keys() {
                if !self.presence_told.contains_key(&(room.clone(), id.clone())) {
                    violations.push(format!("{room}: {id} is in it, never told joined"));
                }
            }
        }
        violations
    }

    /// With recoverable rooms ([`ReplicaConfig::recovery`](crate::ReplicaConfig::recovery)):
    /// every message a room's stream holds reached each member of the room that
    /// joined before it was sent and is still connected to a live replica, once,
    /// whatever the links to Redis lost meanwhile (the replica read the holes from
    /// the stream). A member that joined while its replica's link was down starts
    /// from when the link came back (nobody could tell the room's position before).
    /// With personal streams ([`RecoveryConfig::users`](crate::recovery::RecoveryConfig::users)),
    /// the same of each id's stream and its connections. Call it once the cluster
    /// settled.
    pub fn check_room_recovery(&self) -> Vec<Violation> {
        let rooms = self.config.rooms;
        let users = self
            .config
            .replica
            .recovery
            .as_ref()
            .is_some_and(|r| r.users);
        let mut violations = Vec::new();
        for replica in self.replicas.iter().filter(|r| r.replica.is_some()) {
            for conn in replica.conns.values() {
                let Some(id) = conn.id.as_deref() else {
                    continue;
                };
                let personal = users.then(|| crate::recovery::Personal::User.stream(id));
                for room in super::room_of(rooms, id).into_iter().chain(personal) {
                    violations.extend(self.stream_reached(replica, conn.link as u32, &room));
                }
            }
        }
        violations
    }

    /// Whether every message of `room`'s stream sent after `link` joined it (on
    /// `replica`) reached it once: more only where an append Redis ran without
    /// answering was made again (see [`check_room_recovery`](Self::check_room_recovery)).
    fn stream_reached(&self, replica: &super::SimReplica, link: u32, room: &str) -> Vec<Violation> {
        let ns = &self.config.replica.namespace;
        let Some(mut joined) = self.track.auth_at.get(&link).copied() else {
            return Vec::new();
        };
        let shard = shard_of(room, self.redis.len());
        if let Some(linked_at) = replica.redis_links[shard].linked_at {
            joined = joined.max(linked_at);
        }
        let received = |key| {
            self.clients
                .iter()
                .flat_map(|client| &client.log.receptions)
                .filter(|r| r.key == key && r.link == link)
                .count()
        };
        let mut violations = Vec::new();
        for entry in self.redis_of(room).stream(&ns.room_stream(room)) {
            let Some(key) = track::entry_key(entry) else {
                continue;
            };
            let sent_after = self.track.relayed.get(&key).is_some_and(|r| r.at > joined);
            let count = received(key);
            let again = count > 1 && self.track.uncertain_messages.contains(&key);
            if sent_after && count != 1 && !again {
                violations.push(format!(
                    "{room}: message {key:?} reached link {link} {count} times"
                ));
            }
        }
        violations
    }

    /// The Redis instance that holds the keys of `key` (an id or a room).
    pub fn redis_of(&self, key: &str) -> &RedisModel {
        &self.redis[shard_of(key, self.redis.len())]
    }

    /// What happened to stored messages, over every instance.
    pub fn store_log(&self) -> StoreLog {
        let mut log = StoreLog::default();
        for redis in &self.redis {
            log.appended.extend(redis.log.appended.iter().cloned());
            log.trimmed.extend(redis.log.trimmed.iter().cloned());
            log.dropped.extend(redis.log.dropped.iter().cloned());
            log.cleared.extend(redis.log.cleared.iter().cloned());
        }
        log
    }

    /// Open connections on live replicas.
    pub fn open_connections(&self) -> usize {
        self.replicas.iter().map(|r| r.conns.len()).sum()
    }

    /// The busiest replica's most pub/sub messages received in one second.
    pub fn busiest_inbound_per_s(&self) -> u32 {
        self.replicas
            .iter()
            .flat_map(|r| r.inbound.iter().copied())
            .max()
            .unwrap_or(0)
    }
}
