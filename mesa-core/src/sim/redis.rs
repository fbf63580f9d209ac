//! An in-memory model of Redis for exactly the commands and scripts the cluster uses
//! (see [`Command::calls`](crate::Command::calls) and
//! [`PortalCommand::calls`](crate::PortalCommand::calls)): strings with a time to live,
//! counters, sets, hashes of upstream's JSON-array text, pub/sub with one delivery
//! per subscriber, and our Lua scripts implemented natively, reading their `KEYS` and
//! `ARGV` exactly as the Lua does.
//!
//! Where it is simpler than Redis: one process, every call atomic and instant (the
//! simulation adds the latency); no memory limit, eviction, replication or cluster
//! mode; keys expire exactly at their deadline; `PUBLISH` hands its message to the
//! simulation, which delivers it to each subscriber (and loses it for a subscriber
//! whose link is down); a restart keeps every key (persistence on, as an
//! append-only file that lost nothing) or none, and always changes the run id.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Namespace;
use crate::replica::{Call, RedisValue, Script};
use crate::rooms::PresenceChange;
use crate::sync::split_first_entry as split_first;

/// What the model answers a call that cannot work (a wrong type, a bad argument).
pub type CallError = String;

/// A message `PUBLISH` handed over, for the simulation to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel.
    pub channel: String,
    /// The payload.
    pub payload: String,
    /// The subscribers it goes to.
    pub subscribers: Vec<usize>,
}

/// What happened to stored messages, for the checks of the simulation: every entry
/// appended to, trimmed from, dropped from or cleared from `undelivered_messages`.
#[derive(Debug, Default, Clone)]
pub struct StoreLog {
    /// `(field, entry)` for each append.
    pub appended: Vec<(String, String)>,
    /// `(field, entry)` removed by a trim (a redelivery done).
    pub trimmed: Vec<(String, String)>,
    /// `(field, entry)` pushed out by the per-id cap.
    pub dropped: Vec<(String, String)>,
    /// `(field, entries)` deleted whole (`HDEL`: the client declined them).
    pub cleared: Vec<(String, String)>,
}

/// The model.
#[derive(Debug)]
pub struct RedisModel {
    strings: BTreeMap<String, (String, Option<Instant>)>,
    sets: BTreeMap<String, BTreeSet<String>>,
    hashes: BTreeMap<String, BTreeMap<String, String>>,
    subscriptions: BTreeMap<String, BTreeSet<usize>>,
    /// Recoverable rooms' streams: each entry's offset and message. They never
    /// expire here (the size bounds them).
    streams: BTreeMap<String, BTreeMap<u64, String>>,
    run: u64,
    run_id: String,
    published: Vec<Published>,
    /// Calls executed, scripts counting one each.
    pub calls: u64,
    /// What happened to stored messages.
    pub log: StoreLog,
    /// Keep the store log (off for long runs, where it would only grow).
    pub logging: bool,
}

impl Default for RedisModel {
    fn default() -> Self {
        RedisModel::new()
    }
}

impl RedisModel {
    /// An empty Redis, first run.
    pub fn new() -> Self {
        RedisModel {
            strings: BTreeMap::new(),
            sets: BTreeMap::new(),
            hashes: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            streams: BTreeMap::new(),
            run: 1,
            run_id: run_id(1),
            published: Vec::new(),
            calls: 0,
            log: StoreLog::default(),
            logging: true,
        }
    }

    /// The run id `INFO server` reports: new at every start.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Restart: subscriptions end; every key survives when `persist`, none otherwise;
    /// the run id changes.
    pub fn restart(&mut self, persist: bool) {
        self.subscriptions.clear();
        if !persist {
            self.strings.clear();
            self.sets.clear();
            self.hashes.clear();
            self.streams.clear();
        }
        self.run += 1;
        self.run_id = run_id(self.run);
    }

    /// Subscribe `subscriber` to `channel`.
    pub fn subscribe(&mut self, subscriber: usize, channel: &str) {
        self.subscriptions
            .entry(channel.to_owned())
            .or_default()
            .insert(subscriber);
    }

    /// End `subscriber`'s subscription to `channel`.
    pub fn unsubscribe(&mut self, subscriber: usize, channel: &str) {
        if let Some(subscribers) = self.subscriptions.get_mut(channel) {
            subscribers.remove(&subscriber);
            if subscribers.is_empty() {
                self.subscriptions.remove(channel);
            }
        }
    }

    /// End every subscription of `subscriber` (its connection closed).
    pub fn unsubscribe_all(&mut self, subscriber: usize) {
        for subscribers in self.subscriptions.values_mut() {
            subscribers.remove(&subscriber);
        }
    }

    /// The messages published since the last call.
    pub fn take_published(&mut self) -> Vec<Published> {
        std::mem::take(&mut self.published)
    }

    // ----- inspection -----

    /// The members of a set (empty when absent).
    pub fn members(&self, key: &str) -> Vec<&str> {
        self.sets
            .get(key)
            .map(|set| set.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Whether `member` is in set `key`.
    pub fn is_member(&self, key: &str, member: &str) -> bool {
        self.sets.get(key).is_some_and(|set| set.contains(member))
    }

    /// A string's value, unless it expired by `now`.
    pub fn get(&self, now: Instant, key: &str) -> Option<&str> {
        self.live(now, key)
    }

    /// A hash's fields and values.
    pub fn hash(&self, key: &str) -> Option<&BTreeMap<String, String>> {
        self.hashes.get(key)
    }

    /// Whether the keys upstream reads have the types and formats a Node replica
    /// expects: `connected_clients` a set, `connected_clients_count` an integer,
    /// `undelivered_messages` a hash whose every value is a JSON array of
    /// `{"op": number, "d", "t"?}` objects.
    pub fn check_upstream_contract(&self, now: Instant, ns: &Namespace) -> Result<(), String> {
        let count = ns.connected_clients_count();
        if self.sets.contains_key(&count) || self.hashes.contains_key(&count) {
            return Err(format!("{count} is not a string"));
        }
        if let Some(value) = self.live(now, &count) {
            value
                .parse::<i64>()
                .map_err(|_| format!("{count} is not an integer: {value}"))?;
        }
        let clients = ns.connected_clients();
        if self.strings.contains_key(&clients) || self.hashes.contains_key(&clients) {
            return Err(format!("{clients} is not a set"));
        }
        let stored = ns.undelivered_messages();
        if self.strings.contains_key(&stored) || self.sets.contains_key(&stored) {
            return Err(format!("{stored} is not a hash"));
        }
        for (field, value) in self.hashes.get(&stored).into_iter().flatten() {
            let parsed: Value = serde_json::from_str(value)
                .map_err(|_| format!("{stored}[{field}] is not JSON: {value}"))?;
            let Value::Array(entries) = parsed else {
                return Err(format!("{stored}[{field}] is not an array: {value}"));
            };
            let message = |entry: &Value| {
                entry.get("op").is_some_and(Value::is_u64)
                    && entry.get("d").is_some()
                    && entry.get("t").is_none_or(Value::is_string)
            };
            if entries.is_empty() || !entries.iter().all(message) {
                return Err(format!("{stored}[{field}] holds a non-message: {value}"));
            }
        }
        Ok(())
    }

    // ----- execution -----

    /// Execute `calls` (one command's round trip): one value per call, or the
    /// first error.
    pub fn execute(&mut self, now: Instant, calls: &[Call]) -> Result<Vec<RedisValue>, CallError> {
        calls.iter().map(|call| self.call(now, call)).collect()
    }

    /// Execute one call.
    pub fn call(&mut self, now: Instant, call: &Call) -> Result<RedisValue, CallError> {
        self.calls += 1;
        match call {
            Call::Plain { name, args } => self.plain(now, name, args),
            Call::Script { script, keys, args } => match script {
                Script::AppendMany => self.append_many(keys, args),
                Script::Trim => self.trim(keys, args),
                Script::Leave => self.leave(now, &Scope::new(keys, args)?, arg(args, 5)?),
                Script::Renew => self.renew(now, &Scope::new(keys, args)?, args),
                Script::Janitor => self.janitor(now, &Scope::new(keys, args)?, args),
                Script::Rooms => self.rooms(keys, args),
                Script::Arrive => self.arrive(&Scope::new(keys, args)?, &args[5..]),
                Script::Route => self.route(now, &Scope::new(keys, args)?, args),
                Script::StreamPublish => self.stream_publish(now, keys, args),
                Script::StreamRead => self.stream_read(now, keys, args),
                // Streams are not modelled: durable portals run against real Redis.
                Script::PortalGroups | Script::PortalLeases | Script::PortalReclaim => {
                    Err(format!("{script:?} is not modelled"))
                }
            },
        }
    }

    fn plain(
        &mut self,
        now: Instant,
        name: &str,
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let key = || arg(args, 0);
        Ok(match name {
            "PING" => RedisValue::Text("PONG".into()),
            // Replication is perfect here: every replica asked for has the write.
            "WAIT" => RedisValue::Int(int(arg(args, 0)?)?),
            // Subscriptions belong to a connection, which calls here do not name: the
            // cluster simulation applies them per replica (`subscribe`, `unsubscribe`).
            "SUBSCRIBE" | "UNSUBSCRIBE" => RedisValue::Nil,
            "PUBLISH" => {
                let channel = key()?.to_owned();
                RedisValue::Int(self.publish(channel, arg(args, 1)?.to_owned()))
            }
            "SADD" => RedisValue::Int(self.sadd(key()?, &args[1..]) as i64),
            "SREM" => {
                let key = key()?;
                RedisValue::Int(args[1..].iter().filter(|m| self.srem(key, m)).count() as i64)
            }
            "SMEMBERS" => RedisValue::Array(
                self.members(key()?)
                    .into_iter()
                    .map(|m| RedisValue::Text(m.to_owned()))
                    .collect(),
            ),
            "SMISMEMBER" => {
                let set = self.sets.get(key()?);
                RedisValue::Array(
                    args[1..]
                        .iter()
                        .map(|m| RedisValue::Int(set.is_some_and(|s| s.contains(m)).into()))
                        .collect(),
                )
            }
            "INCRBY" => RedisValue::Int(self.incrby(now, key()?, int(arg(args, 1)?)?)?),
            "HGETALL" => RedisValue::Array(
                self.hashes
                    .get(key()?)
                    .into_iter()
                    .flatten()
                    .flat_map(|(field, value)| {
                        [
                            RedisValue::Text(field.clone()),
                            RedisValue::Text(value.clone()),
                        ]
                    })
                    .collect(),
            ),
            "HGET" => match self.hashes.get(key()?).and_then(|h| h.get(args.get(1)?)) {
                Some(value) => RedisValue::Text(value.clone()),
                None => RedisValue::Nil,
            },
            "HDEL" => {
                let field = arg(args, 1)?;
                let removed = self.hdel(key()?, field);
                if let (Some(value), true) = (&removed, self.logging) {
                    self.log.cleared.push((field.to_owned(), value.clone()));
                }
                RedisValue::Int(removed.is_some().into())
            }
            other => return Err(format!("ERR the model does not know {other}")),
        })
    }

    fn live(&self, now: Instant, key: &str) -> Option<&str> {
        match self.strings.get(key) {
            Some((value, expiry)) if expiry.is_none_or(|at| at > now) => Some(value),
            _ => None,
        }
    }

    /// A counter's value (0 when absent), as `tonumber(GET or '0')`.
    fn counter(&self, now: Instant, key: &str) -> Result<i64, CallError> {
        self.live(now, key).map_or(Ok(0), int)
    }

    fn exists(&self, now: Instant, key: &str) -> bool {
        self.live(now, key).is_some()
            || self.sets.contains_key(key)
            || self.hashes.contains_key(key)
    }

    fn del(&mut self, key: &str) {
        self.strings.remove(key);
        self.sets.remove(key);
        self.hashes.remove(key);
    }

    fn sadd(&mut self, key: &str, members: &[String]) -> usize {
        let set = self.sets.entry(key.to_owned()).or_default();
        members.iter().filter(|m| set.insert((*m).clone())).count()
    }

    /// Whether `member` was in the set.
    fn srem(&mut self, key: &str, member: &str) -> bool {
        let Some(set) = self.sets.get_mut(key) else {
            return false;
        };
        let removed = set.remove(member);
        if set.is_empty() {
            self.sets.remove(key);
        }
        removed
    }

    fn incrby(&mut self, now: Instant, key: &str, by: i64) -> Result<i64, CallError> {
        let current = self.counter(now, key)?;
        let next = current + by;
        // INCRBY keeps an existing time to live.
        let expiry = self
            .strings
            .get(key)
            .and_then(|(_, e)| *e)
            .filter(|at| *at > now);
        self.strings
            .insert(key.to_owned(), (next.to_string(), expiry));
        Ok(next)
    }

    fn hset(&mut self, key: &str, field: &str, value: String) {
        self.hashes
            .entry(key.to_owned())
            .or_default()
            .insert(field.to_owned(), value);
    }

    /// `PUBLISH`: hand `payload` to the subscribers of `channel`; how many.
    fn publish(&mut self, channel: String, payload: String) -> i64 {
        let subscribers: Vec<usize> = self
            .subscriptions
            .get(&channel)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let receivers = subscribers.len() as i64;
        self.published.push(Published {
            channel,
            payload,
            subscribers,
        });
        receivers
    }

    /// `HINCRBY` (a field that is no number counts as 0).
    fn hincrby(&mut self, key: &str, field: &str, by: i64) -> i64 {
        let current = self
            .hashes
            .get(key)
            .and_then(|h| h.get(field))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        self.hset(key, field, (current + by).to_string());
        current + by
    }

    /// The fields and values of a hash.
    fn entries(&self, key: &str) -> Vec<(String, String)> {
        self.hashes
            .get(key)
            .map(|h| h.iter().map(|(f, v)| (f.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn hdel(&mut self, key: &str, field: &str) -> Option<String> {
        let hash = self.hashes.get_mut(key)?;
        let removed = hash.remove(field);
        if hash.is_empty() {
            self.hashes.remove(key);
        }
        removed
    }

    // ----- the scripts, natively -----

    /// [`Script::AppendMany`].
    fn append_many(&mut self, keys: &[String], args: &[String]) -> Result<RedisValue, CallError> {
        let hash = arg(keys, 0)?.to_owned();
        let clients = arg(keys, 1)?;
        let entry = arg(args, 0)?;
        let cap = int(arg(args, 1)?)?;
        let mut dropped = 0;
        let mut online = Vec::new();
        for field in &args[2..] {
            if self.is_member(clients, field) {
                online.push(RedisValue::Text(field.clone()));
                continue;
            }
            let current = self.hashes.get(&hash).and_then(|h| h.get(field)).cloned();
            let (mut body, mut count) = match current {
                None => (String::new(), 0),
                Some(raw) => match array_body(&raw) {
                    Some(parsed) => parsed,
                    None => {
                        self.hset(&hash, &format!("{field}:corrupt"), raw);
                        (String::new(), 0)
                    }
                },
            };
            while count >= cap && !body.is_empty() {
                let (first, rest) = split_first(&body);
                if self.logging {
                    self.log.dropped.push((field.clone(), first.to_owned()));
                }
                body = rest.to_owned();
                count -= 1;
                dropped += 1;
            }
            if body.is_empty() {
                body = entry.to_owned();
            } else {
                body = format!("{body},{entry}");
            }
            self.hset(&hash, field, format!("[{body}]"));
            if self.logging {
                self.log.appended.push((field.clone(), entry.to_owned()));
            }
        }
        let stored = (args.len() - 2 - online.len()) as i64;
        let mut reply = vec![RedisValue::Int(stored), RedisValue::Int(dropped)];
        reply.extend(online);
        Ok(RedisValue::Array(reply))
    }

    /// [`Script::Trim`].
    fn trim(&mut self, keys: &[String], args: &[String]) -> Result<RedisValue, CallError> {
        let hash = arg(keys, 0)?.to_owned();
        let field = arg(args, 0)?;
        let n = int(arg(args, 1)?)?;
        let last = arg(args, 2)?;
        let Some(raw) = self.hashes.get(&hash).and_then(|h| h.get(field)).cloned() else {
            return Ok(RedisValue::Int(0));
        };
        let mut cursor = lua_inner(&raw).unwrap_or_default();
        let (mut seen, mut removed, mut rest) = (0, 0, None);
        while seen < n && !cursor.is_empty() {
            let (entry, after) = split_first(cursor);
            seen += 1;
            if entry == last {
                removed = seen;
                rest = Some(after);
            }
            cursor = after;
        }
        let Some(rest) = rest else {
            return Ok(RedisValue::Int(0));
        };
        if self.logging {
            let body = lua_inner(&raw).unwrap_or_default();
            let gone = &body[..body.len() - rest.len()];
            let gone = gone.strip_suffix(',').unwrap_or(gone);
            for entry in crate::sync::stored_entries(&format!("[{gone}]")).unwrap_or_default() {
                self.log.trimmed.push((field.to_owned(), entry.to_owned()));
            }
        }
        if rest.is_empty() {
            self.hdel(&hash, field);
        } else {
            let rest = format!("[{rest}]");
            self.hset(&hash, field, rest);
        }
        Ok(RedisValue::Int(removed))
    }

    /// [`Script::Leave`].
    fn leave(&mut self, now: Instant, scope: &Scope, id: &str) -> Result<RedisValue, CallError> {
        self.srem(&scope.ids(&scope.me), id);
        self.srem(&scope.routes(id), &scope.me);
        if self.held_elsewhere(now, scope, &scope.me, id) {
            return Ok(RedisValue::Int(0));
        }
        self.srem(&scope.clients, id);
        Ok(RedisValue::Int(1))
    }

    fn held_elsewhere(&self, now: Instant, scope: &Scope, me: &str, id: &str) -> bool {
        self.members(&scope.replicas).into_iter().any(|r| {
            r != me && self.exists(now, &scope.lease(r)) && self.is_member(&scope.ids(r), id)
        })
    }

    /// [`Script::Renew`].
    fn renew(
        &mut self,
        now: Instant,
        scope: &Scope,
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let me = scope.me.clone();
        let lease = Duration::from_millis(int(arg(args, 5)?)?.max(0) as u64);
        let connections = int(arg(args, 6)?)?;
        let run_id = arg(args, 7)?.to_owned();
        self.strings
            .insert(scope.lease(&me), (run_id, Some(now + lease)));
        self.sadd(&scope.replicas, std::slice::from_ref(&me));
        let ids_key = scope.ids(&me);
        let before: BTreeSet<String> = self
            .members(&ids_key)
            .into_iter()
            .map(str::to_owned)
            .collect();
        self.del(&ids_key);
        let ids = &args[8..];
        if !ids.is_empty() {
            self.sadd(&ids_key, ids);
            self.sadd(&scope.clients, ids);
        }
        for id in ids.iter().filter(|id| !before.contains(*id)) {
            self.sadd(&scope.routes(id), std::slice::from_ref(&me));
        }
        for id in before {
            if self.is_member(&ids_key, &id) {
                continue;
            }
            self.srem(&scope.routes(&id), &me);
            if !self.held_elsewhere(now, scope, &me, &id) {
                self.srem(&scope.clients, &id);
            }
        }
        let conns_key = scope.conns(&me);
        let counted = self.counter(now, &conns_key)?;
        if counted != connections {
            self.incrby(now, &scope.count, connections - counted)?;
            self.strings
                .insert(conns_key, (connections.to_string(), None));
        }
        Ok(RedisValue::Int(1))
    }

    /// [`Script::Janitor`].
    fn janitor(
        &mut self,
        now: Instant,
        scope: &Scope,
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let me = scope.me.clone();
        if arg(args, 5)? == "retire" {
            self.del(&scope.lease(&me));
        }
        let run_id = arg(args, 6)?;
        let replicas: Vec<String> = self
            .members(&scope.replicas)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !run_id.is_empty() {
            for r in &replicas {
                let lease = scope.lease(r);
                let held = self.live(now, &lease);
                if *r != me && held.is_some_and(|held| held != run_id) {
                    self.del(&lease);
                }
            }
        }
        let mut removed = 0;
        for r in &replicas {
            if self.exists(now, &scope.lease(r)) {
                continue;
            }
            let ids: Vec<String> = self
                .members(&scope.ids(r))
                .into_iter()
                .map(str::to_owned)
                .collect();
            for id in ids {
                self.srem(&scope.routes(&id), r);
                if !self.held_elsewhere(now, scope, r, &id) {
                    self.srem(&scope.clients, &id);
                    removed += 1;
                }
            }
            let counted = self.counter(now, &scope.conns(r))?;
            if counted != 0 {
                self.incrby(now, &scope.count, -counted)?;
            }
            // Its room memberships leave each room's presence.
            let held = format!("mesa_replica_rooms:{r}{}", scope.suffix);
            for (field, count) in self.entries(&held) {
                if let Some((room, id)) = field.split_once(' ') {
                    let members = format!("mesa_room_members:{room}{}", scope.suffix);
                    if self.hincrby(&members, id, -int(&count)?) <= 0 {
                        self.hdel(&members, id);
                        self.publish_presence(&scope.suffix, room, id, false);
                    }
                }
            }
            self.del(&held);
            self.del(&scope.ids(r));
            self.del(&scope.conns(r));
            self.srem(&scope.replicas, r);
        }
        Ok(RedisValue::Int(removed))
    }
}

impl RedisModel {
    /// [`Script::Arrive`].
    fn arrive(&mut self, scope: &Scope, ids: &[String]) -> Result<RedisValue, CallError> {
        self.sadd(&scope.clients, ids);
        self.sadd(&scope.ids(&scope.me), ids);
        for id in ids {
            self.sadd(&scope.routes(id), std::slice::from_ref(&scope.me));
        }
        Ok(RedisValue::Int(ids.len() as i64))
    }

    /// [`Script::Route`].
    /// The entries of a recoverable room's stream, oldest first.
    pub fn stream(&self, key: &str) -> impl Iterator<Item = &str> {
        self.streams
            .get(key)
            .into_iter()
            .flat_map(|stream| stream.values().map(String::as_str))
    }

    /// The meta record of [`STREAM_PUBLISH`](crate::replica::scripts::STREAM_PUBLISH)
    /// and [`STREAM_READ`](crate::replica::scripts::STREAM_READ): its epoch, a new one
    /// (from the run and the epoch counter, with an empty stream) when missing or
    /// written by another Redis process than the caller's (`run`).
    fn stream_epoch(
        &mut self,
        now: Instant,
        keys: &[String],
        run: &str,
    ) -> Result<String, CallError> {
        let meta = arg(keys, 1)?;
        let held = self.hashes.get(meta);
        let writer = held.and_then(|h| h.get("r"));
        let epoch = held
            .and_then(|h| h.get("e"))
            .filter(|_| run.is_empty() || writer.is_none_or(|w| w == run))
            .cloned();
        let epoch = match epoch {
            Some(epoch) => epoch,
            None => {
                let count = self.incrby(now, arg(keys, 2)?, 1)?;
                let epoch = format!("{:x}-{count}", self.run);
                self.streams.remove(arg(keys, 0)?);
                let hash = self.hashes.entry(meta.to_owned()).or_default();
                hash.insert("e".into(), epoch.clone());
                hash.insert("s".into(), "0".into());
                epoch
            }
        };
        if !run.is_empty() {
            let hash = self.hashes.entry(meta.to_owned()).or_default();
            hash.insert("r".into(), run.to_owned());
        }
        Ok(epoch)
    }

    fn stream_publish(
        &mut self,
        now: Instant,
        keys: &[String],
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let epoch = self.stream_epoch(now, keys, arg(args, 5)?)?;
        let (entry, size, head) = (arg(args, 1)?, int(arg(args, 2)?)?, arg(args, 4)?);
        let hash = self.hashes.entry(arg(keys, 1)?.to_owned()).or_default();
        let offset = int(hash.get("s").map_or("0", String::as_str))? + 1;
        hash.insert("s".into(), offset.to_string());
        let stream = self.streams.entry(arg(keys, 0)?.to_owned()).or_default();
        stream.insert(offset as u64, entry.to_owned());
        while stream.len() as i64 > size {
            stream.pop_first();
        }
        let payload = format!("{head},\"epoch\":\"{epoch}\",\"offset\":{offset}}}");
        self.publish(arg(keys, 3)?.to_owned(), payload);
        Ok(RedisValue::Array(vec![
            RedisValue::Text(epoch),
            RedisValue::Int(offset),
        ]))
    }

    fn stream_read(
        &mut self,
        now: Instant,
        keys: &[String],
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let epoch = self.stream_epoch(now, keys, arg(args, 3)?)?;
        let top = self
            .hashes
            .get(arg(keys, 1)?)
            .and_then(|h| h.get("s"))
            .map_or(Ok(0), |s| int(s))?;
        let count = usize::try_from(int(arg(args, 2)?)?).unwrap_or(0);
        let entries = match arg(args, 1)? {
            "" => Vec::new(),
            after => {
                let after = int(after)? as u64;
                self.streams
                    .get(arg(keys, 0)?)
                    .into_iter()
                    .flat_map(|stream| stream.range(after + 1..))
                    .take(count)
                    .map(|(offset, entry)| {
                        RedisValue::Array(vec![
                            RedisValue::Text(format!("{offset}-0")),
                            RedisValue::Array(vec![
                                RedisValue::Text("m".into()),
                                RedisValue::Text(entry.clone()),
                            ]),
                        ])
                    })
                    .collect()
            }
        };
        Ok(RedisValue::Array(vec![
            RedisValue::Text(epoch),
            RedisValue::Int(top),
            RedisValue::Array(entries),
        ]))
    }

    fn route(
        &mut self,
        now: Instant,
        scope: &Scope,
        args: &[String],
    ) -> Result<RedisValue, CallError> {
        let (head, tail) = (arg(args, 5)?, arg(args, 6)?);
        let mut shares: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut nowhere = 0;
        for id in &args[7..] {
            let live: Vec<String> = self
                .members(&scope.routes(id))
                .into_iter()
                .filter(|r| self.exists(now, &scope.lease(r)))
                .map(str::to_owned)
                .collect();
            if live.is_empty() {
                nowhere += 1;
            }
            for r in live {
                shares
                    .entry(r)
                    .or_default()
                    .push(Value::from(id.as_str()).to_string());
            }
        }
        let published = shares.len() as i64;
        for (r, ids) in shares {
            let channel = format!("mesa_replica:{r}{}", scope.suffix);
            let payload = format!("{head}{}{tail}", ids.join(","));
            self.plain(now, "PUBLISH", &[channel, payload])?;
        }
        Ok(RedisValue::Array(vec![
            RedisValue::Int(published),
            RedisValue::Int(nowhere),
        ]))
    }

    /// [`Script::Rooms`].
    fn rooms(&mut self, keys: &[String], args: &[String]) -> Result<RedisValue, CallError> {
        let mine = arg(keys, 0)?.to_owned();
        let suffix = arg(args, 0)?.to_owned();
        let mut triples = Vec::new();
        for triple in args[2..].chunks(3) {
            let [room, id, by] = triple else {
                return Err("ERR rooms: triples of room, id and count".into());
            };
            triples.push((format!("{room} {id}"), int(by)?));
        }
        // `clear` changes only the difference with what the hash holds.
        if arg(args, 1)? == "clear" {
            let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
            for (field, by) in triples.drain(..) {
                *wanted.entry(field).or_default() += by;
            }
            for (field, count) in self.entries(&mine) {
                let want = wanted.remove(&field).unwrap_or(0);
                triples.push((field, want - int(&count)?));
            }
            triples.extend(wanted);
        }
        let mut changed = 0;
        for (field, by) in triples {
            match field.split_once(' ') {
                Some((room, id)) => changed += self.apply_room(&mine, &suffix, room, id, by),
                None => drop(self.hdel(&mine, &field)),
            }
        }
        Ok(RedisValue::Int(changed))
    }

    /// Add `by` connections of `id` in `room` here, and to the room's members,
    /// publishing the change when the id's count there leaves or reaches 0.
    fn apply_room(&mut self, mine: &str, suffix: &str, room: &str, id: &str, by: i64) -> i64 {
        let field = format!("{room} {id}");
        let held = self
            .hashes
            .get(mine)
            .and_then(|h| h.get(&field))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        // A leave the hash never saw removes nothing.
        let by = by.max(-held);
        if by == 0 {
            return 0;
        }
        if held + by == 0 {
            self.hdel(mine, &field);
        } else {
            self.hset(mine, &field, (held + by).to_string());
        }
        let members = format!("mesa_room_members:{room}{suffix}");
        let now = self.hincrby(&members, id, by);
        if now <= 0 {
            self.hdel(&members, id);
            self.publish_presence(suffix, room, id, false);
        } else if now == by {
            self.publish_presence(suffix, room, id, true);
        }
        1
    }

    /// Publish a change of `id`'s presence in `room`, as the scripts do.
    fn publish_presence(&mut self, suffix: &str, room: &str, id: &str, joined: bool) {
        let change = PresenceChange {
            room: room.to_owned(),
            id: id.to_owned(),
            joined,
        };
        self.publish(format!("mesa_room:{room}{suffix}"), change.encode());
    }
}

/// The keys and prefixes every presence script starts with (see
/// [`LEAVE`](crate::replica::scripts::LEAVE)).
struct Scope {
    clients: String,
    replicas: String,
    count: String,
    me: String,
    ids_prefix: String,
    lease_prefix: String,
    conns_prefix: String,
    suffix: String,
}

impl Scope {
    fn new(keys: &[String], args: &[String]) -> Result<Scope, CallError> {
        Ok(Scope {
            clients: arg(keys, 0)?.to_owned(),
            replicas: arg(keys, 1)?.to_owned(),
            count: arg(keys, 2)?.to_owned(),
            me: arg(args, 0)?.to_owned(),
            ids_prefix: arg(args, 1)?.to_owned(),
            lease_prefix: arg(args, 2)?.to_owned(),
            conns_prefix: arg(args, 3)?.to_owned(),
            suffix: arg(args, 4)?.to_owned(),
        })
    }

    fn ids(&self, r: &str) -> String {
        format!("{}{r}{}", self.ids_prefix, self.suffix)
    }

    fn lease(&self, r: &str) -> String {
        format!("{}{r}{}", self.lease_prefix, self.suffix)
    }

    fn conns(&self, r: &str) -> String {
        format!("{}{r}{}", self.conns_prefix, self.suffix)
    }

    /// The route table's entry of `id`.
    fn routes(&self, id: &str) -> String {
        format!("mesa_routes:{id}{}", self.suffix)
    }
}

fn run_id(run: u64) -> String {
    format!("{run:040x}")
}

fn arg(args: &[String], index: usize) -> Result<&str, CallError> {
    args.get(index)
        .map(String::as_str)
        .ok_or_else(|| format!("ERR missing argument {}", index + 1))
}

fn int(text: &str) -> Result<i64, CallError> {
    text.trim()
        .parse()
        .map_err(|_| format!("ERR value is not an integer: {text}"))
}

/// `string.match(raw, '^%s*%[(.*)%]%s*$')`.
fn lua_inner(raw: &str) -> Option<&str> {
    raw.trim()
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
}

/// The body and length of a stored JSON array, as the store script reads it
/// (`cjson.decode` succeeds on a table, and the text is bracketed); `None` for a
/// corrupt value.
fn array_body(raw: &str) -> Option<(String, i64)> {
    let inner = lua_inner(raw)?;
    match serde_json::from_str::<Value>(raw).ok()? {
        Value::Array(items) => Some((inner.to_owned(), items.len() as i64)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_arrays_as_the_store_script_does() {
        assert_eq!(array_body(" [1,2] "), Some(("1,2".into(), 2)));
        assert_eq!(array_body("{}"), None);
        assert_eq!(array_body("[1,"), None);
    }
}
