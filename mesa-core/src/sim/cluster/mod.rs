//! A deterministic cluster: N replicas (each a [`Replica`] with real
//! [`ServerSession`]s, running the relay of [`relay`]), many [`ClientSession`]s, and
//! the [`RedisModel`], on a virtual clock that jumps from one event to the next.
//!
//! Faults: a client's connection cut, a replica crashed (and restarted as a new
//! replica), a partition between one replica and Redis (its link dies silently:
//! commands, answers and pub/sub messages are lost until the replica notices by its
//! reply timeout, and it cannot reconnect until the partition heals), slow answers
//! from Redis to one replica, and a Redis restart with or without persistence (every
//! link resets, pub/sub messages in flight are lost, the run id changes).

mod checks;
mod faults;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{ClientConfig, ClientSession};
use crate::config::ServerConfig;
use crate::hub::{Action, ConnId};
use crate::relay::{dev_authenticate, relay};
use crate::replica::{Command, Keys, Replica, ReplicaConfig, ReplicaEvent, Reply, Token};
use crate::rng::Rng;
use crate::rooms::RoomPayload;
use crate::session::{ServerSession, SessionEvent, Transmit};
use crate::sim::net::{ClientFlush, Link, Packet, SimClient};
use crate::sim::redis::RedisModel;
use crate::sim::schedule::Schedule;
use crate::sim::track::{self, MessageKey, Received, Relayed, Track, Violation, message_key};
use crate::wire::{Message, Opcode};

/// The type of a simulated client's message to the members of its room.
pub const ROOM_SEND: &str = "ROOM_SEND";

/// The room of id `u<i>` among `rooms` (none when there are no rooms).
fn room_of(rooms: usize, id: &str) -> Option<String> {
    let index: usize = id.strip_prefix('u')?.parse().ok()?;
    (rooms > 0).then(|| format!("room{}", index % rooms))
}

/// How a simulated cluster is built.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Replicas at the start.
    pub replicas: usize,
    /// Clients.
    pub clients: usize,
    /// Distinct ids; client `c` authenticates as `u{c % ids}`. Default: one per client.
    pub ids: usize,
    /// Seeds every random choice.
    pub seed: u64,
    /// Every replica's server configuration (sync should be on).
    pub server: ServerConfig,
    /// Every replica's cluster configuration.
    pub replica: ReplicaConfig,
    /// Every client's configuration.
    pub client: ClientConfig,
    /// One way, client to replica.
    pub ws_latency: Duration,
    /// One way, replica to Redis.
    pub redis_latency: Duration,
    /// Record every message (for the checks); off for a million clients.
    pub record: bool,
    /// Check the keys Node replicas read after every event.
    pub check_contract: bool,
    /// Rooms: each connection of id `u<i>` joins room `room<i % rooms>` when it
    /// authenticates (as an application puts old clients in rooms). 0: none.
    pub rooms: usize,
}

impl SimConfig {
    /// `replicas` replicas and `clients` clients with sync on, heartbeats and the
    /// default limits.
    pub fn new(replicas: usize, clients: usize, seed: u64) -> Self {
        let server = ServerConfig::builder()
            .heartbeat(crate::config::HeartbeatConfig::default())
            .authentication(crate::config::AuthConfig::default())
            .sync(crate::config::SyncConfig::default())
            .build()
            .expect("a valid configuration");
        let replica = ReplicaConfig::new(&server);
        SimConfig {
            replicas,
            clients,
            ids: clients,
            seed,
            server,
            replica,
            client: ClientConfig::default(),
            ws_latency: Duration::from_millis(5),
            redis_latency: Duration::from_millis(1),
            record: true,
            check_contract: false,
            rooms: 0,
        }
    }
}

/// A scheduled event.
#[derive(Debug)]
enum Event {
    /// Frames of this link may be due.
    Link(usize),
    /// A client's timer or connection attempt may be due.
    Client(usize),
    /// A client connects (see [`ClusterSim::connect_at`]).
    Connect(usize),
    /// A session's timer may be due.
    Session(usize, ConnId),
    /// A replica's timer may be due.
    Replica(usize),
    /// A command reaches Redis (the instance its token names).
    Command {
        replica: usize,
        epoch: u64,
        token: Token,
        command: Box<Command>,
        /// The keys of the replica that sent it (a restarted one has others).
        keys: Arc<Keys>,
    },
    /// Redis's answer reaches the replica.
    Reply {
        replica: usize,
        epoch: u64,
        token: Token,
        reply: Reply,
    },
    /// A connection attempt to Redis instance `shard` resolves.
    Opened {
        replica: usize,
        shard: usize,
        epoch: u64,
    },
    /// A pub/sub message of instance `shard` reaches a replica.
    PubSub {
        replica: usize,
        shard: usize,
        epoch: u64,
        /// Shared by every subscriber's copy.
        message: Arc<(String, String)>,
    },
    /// Redis accepts connections again.
    RedisUp,
}

/// One server connection.
#[derive(Debug)]
struct Conn {
    session: ServerSession,
    link: usize,
    /// Deliveries held while the session waits for its stored messages.
    held: Vec<Action>,
    timer: Option<Instant>,
    /// Its id, as the simulation counts presence.
    id: Option<String>,
}

/// A command sent to Redis and not answered.
#[derive(Debug)]
struct Outstanding {
    command: Command,
    executed: bool,
}

/// One replica of the simulated cluster.
#[derive(Debug)]
pub struct SimReplica {
    /// Its name now (a restarted replica is a new one).
    pub name: String,
    /// The state machine; `None` while crashed.
    pub replica: Option<Replica>,
    keys: Arc<Keys>,
    incarnation: u32,
    conns: BTreeMap<ConnId, Conn>,
    /// Its link to each Redis instance.
    redis_links: Vec<RedisLink>,
    partitioned_until: Option<Instant>,
    slow: Option<(Instant, Duration)>,
    timer: Option<Instant>,
    outstanding: BTreeMap<Token, Outstanding>,
    /// Pub/sub messages received, per second of the run.
    inbound: Vec<u32>,
}

/// A replica's link to one Redis instance.
#[derive(Debug, Default, Clone)]
struct RedisLink {
    /// The current link; links up to `killed` are dead (a partition or a Redis
    /// restart): nothing on them arrives.
    epoch: u64,
    killed: u64,
    /// The replica believes the link up and subscribed.
    linked: bool,
    /// When the replica last learned the link up.
    linked_at: Option<Instant>,
    /// The link and the time of its last reply: one connection answers in order, so
    /// a reply never overtakes an earlier slow one.
    reply_floor: Option<(u64, Instant)>,
}

impl SimReplica {
    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

/// What the run counted.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Messages the clients handed to their sessions.
    pub sent: u64,
    /// Messages the relay handed to a replica.
    pub relayed: u64,
    /// Redis calls, per second of the run.
    pub redis_calls: Vec<u64>,
    /// Link failures the replicas reported.
    pub link_downs: u64,
    /// Jobs the replicas reported lost.
    pub jobs_lost: u64,
    /// Messages stored (per id), and dropped by the cap.
    pub stored: u64,
    /// Stored messages pushed out by the per-id cap.
    pub dropped: u64,
    /// Ids nothing could be stored for.
    pub undeliverable: u64,
    /// Sends a client refused (its queue full).
    pub refused: u64,
    /// Envelopes the replicas received from Redis.
    pub envelopes: u64,
    /// Envelopes among them for no connection of the replica that received them.
    pub unneeded: u64,
}

/// The cluster.
#[derive(Debug)]
pub struct ClusterSim {
    /// The virtual time.
    pub now: Instant,
    start: Instant,
    config: SimConfig,
    server: Arc<ServerConfig>,
    rng: Rng,
    schedule: Schedule<Event>,
    /// Redis.
    /// The Redis instances (one per shard).
    pub redis: Vec<RedisModel>,
    redis_up: bool,
    /// When Redis last came up.
    redis_since: Instant,
    /// The replicas.
    pub replicas: Vec<SimReplica>,
    /// The clients.
    pub clients: Vec<SimClient<Received>>,
    client_timers: Vec<Option<Instant>>,
    links: Vec<Link>,
    dirty_sessions: Vec<(usize, ConnId)>,
    dirty_replicas: Vec<usize>,
    /// Messages sent per client (the next `n` is one more).
    numbers: Vec<u32>,
    /// Clients authenticated now.
    pub authenticated: usize,
    /// What the run counted.
    pub counters: Counters,
    /// The records the checks read.
    pub track: Track,
    /// Broken contracts seen along the way (keys Node replicas read, room presence
    /// changes published out of turn).
    pub violations: Vec<Violation>,
    /// The last presence change Redis published of each room and id (forgotten
    /// with Redis's data).
    presence_told: BTreeMap<(String, String), bool>,
    /// Events processed.
    pub steps: u64,
}

impl ClusterSim {
    /// A cluster at `start` (the caller's one clock read); the replicas start
    /// linking to Redis, the clients are created but not connected.
    pub fn new(config: SimConfig, start: Instant) -> Self {
        let mut rng = Rng::new(config.seed);
        let clients = (0..config.clients)
            .map(|_| {
                let session = ClientSession::new(config.client.clone(), rng.next_u64())
                    .expect("a valid client configuration");
                let received = Received {
                    record: config.record,
                    ..Received::default()
                };
                SimClient::new(session, received)
            })
            .collect();
        let redis = (0..config.replica.shards)
            .map(|_| {
                let mut redis = RedisModel::new();
                redis.logging = config.record;
                redis
            })
            .collect();
        let mut sim = ClusterSim {
            now: start,
            start,
            server: Arc::new(config.server.clone()),
            rng,
            schedule: Schedule::default(),
            redis,
            redis_up: true,
            redis_since: start,
            replicas: Vec::new(),
            client_timers: vec![None; config.clients],
            numbers: vec![0; config.clients],
            clients,
            links: Vec::new(),
            dirty_sessions: Vec::new(),
            dirty_replicas: Vec::new(),
            authenticated: 0,
            counters: Counters::default(),
            track: Track::default(),
            violations: Vec::new(),
            presence_told: BTreeMap::new(),
            steps: 0,
            config,
        };
        for _ in 0..sim.config.replicas {
            sim.add_replica();
        }
        sim.settle();
        sim
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The id client `c` authenticates as.
    pub fn id_of(&self, c: usize) -> String {
        format!("u{}", c % self.config.ids.max(1))
    }

    // ----- the clock -----

    /// Process every event due by `until`, then stand at `until`.
    pub fn run_until(&mut self, until: Instant) {
        while let Some((at, event)) = self.schedule.pop_due(until) {
            self.now = self.now.max(at);
            self.steps += 1;
            self.handle(at, event);
            self.settle();
            if self.config.check_contract {
                let ns = self.config.replica.namespace.clone();
                for redis in &self.redis {
                    if let Err(broken) = redis.check_upstream_contract(self.now, &ns) {
                        self.violations
                            .push(format!("at {:?}: {broken}", self.elapsed()));
                    }
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Run for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(self.now + duration);
    }

    /// Events waiting in the agenda.
    pub fn scheduled(&self) -> usize {
        self.schedule.len()
    }

    /// When the next event is due.
    pub fn next_event(&self) -> Option<Instant> {
        self.schedule.next()
    }

    // ----- clients -----

    /// Connect client `c` and authenticate it as [`id_of`](Self::id_of)`(c)` (with
    /// `shouldSync`), now and after every reconnection.
    pub fn connect(&mut self, c: usize) {
        let id = self.id_of(c);
        let session = &mut self.clients[c].session;
        if session.connect(self.now).is_ok() {
            let _ = session.authenticate(self.now, json!({ "token": id }), true);
        }
        self.flush_client(c);
        self.settle();
    }

    /// Connect client `c` at `at`, as [`connect`](Self::connect).
    pub fn connect_at(&mut self, c: usize, at: Instant) {
        self.schedule.push(at, Event::Connect(c));
    }

    /// Client `c` sends a message to the clients of ids `to` (relayed as a
    /// `BROADCAST`); returns its key.
    pub fn send(&mut self, c: usize, to: &[String]) -> MessageKey {
        self.client_send(c, "BROADCAST", json!({"to": to}))
    }

    /// Client `c` sends a message to the members of its room (relayed by its
    /// replica); returns its key. Needs [`SimConfig::rooms`].
    pub fn room_send(&mut self, c: usize) -> MessageKey {
        self.client_send(c, ROOM_SEND, json!({}))
    }

    /// Client `c` sends a `t` message with data `d` and its key (`from`, `n`).
    fn client_send(&mut self, c: usize, t: &str, mut d: serde_json::Value) -> MessageKey {
        self.numbers[c] += 1;
        let key = (c as u32, self.numbers[c]);
        d["from"] = json!(key.0);
        d["n"] = json!(key.1);
        self.counters.sent += 1;
        let message = Message::dispatch(t, d);
        if self.clients[c].session.send(self.now, message).is_err() {
            self.counters.refused += 1;
        }
        self.flush_client(c);
        self.settle();
        key
    }

    /// The room the connections of `id` join (see [`SimConfig::rooms`]).
    pub fn room_of(&self, id: &str) -> Option<String> {
        room_of(self.config.rooms, id)
    }

    /// The replica client `c` is connected to.
    pub fn replica_of(&self, c: usize) -> Option<usize> {
        self.clients[c].link.map(|link| self.links[link].server)
    }

    /// Client `c` disconnects deliberately (close 1000) and stays offline until
    /// [`connect`](Self::connect)ed again.
    pub fn disconnect(&mut self, c: usize) {
        let close = crate::close::Close::new(crate::close::CloseCode::NORMAL, "bye");
        let _ = self.clients[c].session.disconnect(self.now, close);
        self.flush_client(c);
        self.settle();
    }

    /// Cut client `c`'s connection: both sides see the transport drop.
    pub fn cut(&mut self, c: usize) {
        let Some(link) = self.clients[c].link else {
            return;
        };
        let (r, conn) = (self.links[link].server, self.links[link].conn);
        self.drop_client_link(c, link);
        let now = self.now;
        if let Some(session) = self.conn_mut(r, conn) {
            session.session.handle_peer_closed(now, None);
            self.dirty_sessions.push((r, conn));
        }
        self.settle();
    }

    // ----- events -----

    fn handle(&mut self, at: Instant, event: Event) {
        let now = self.now;
        let taken = |armed: &mut Option<Instant>| {
            if *armed == Some(at) {
                *armed = None;
            }
        };
        match event {
            Event::Link(link) => self.link_due(link),
            Event::Connect(c) => self.connect(c),
            Event::Client(c) => {
                taken(&mut self.client_timers[c]);
                if self.clients[c].connecting.is_some_and(|at| at <= now) {
                    self.clients[c].connecting = None;
                    self.resolve_connect(c);
                }
                let before = self.clients[c].log.authenticated;
                let flush = self.clients[c].tick(now, self.config.ws_latency, &mut self.links);
                self.count_authenticated(c, before);
                self.after_client_flush(c, flush);
            }
            Event::Session(r, conn) => {
                let Some(entry) = self.replicas[r].conns.get_mut(&conn) else {
                    return;
                };
                taken(&mut entry.timer);
                if entry.session.poll_timeout().is_some_and(|at| at <= now) {
                    entry.session.handle_timeout(now);
                    // Frames held back for the message rate may be readable now.
                    let link = entry.link;
                    if !self.links[link].to_server.is_empty() {
                        self.schedule.push(now, Event::Link(link));
                    }
                }
                self.dirty_sessions.push((r, conn));
            }
            Event::Replica(r) => {
                taken(&mut self.replicas[r].timer);
                if let Some(replica) = self.replicas[r].replica.as_mut() {
                    if replica.poll_timeout().is_some_and(|at| at <= now) {
                        replica.handle_timeout(now);
                    }
                    self.dirty_replicas.push(r);
                }
            }
            Event::Command {
                replica,
                epoch,
                token,
                command,
                keys,
            } => self.execute(replica, epoch, token, *command, &keys),
            Event::Reply {
                replica: r,
                epoch,
                token,
                reply,
            } => {
                if !self.reaches(r, token.shard(), epoch) {
                    return;
                }
                self.replicas[r].outstanding.remove(&token);
                if let Some(replica) = self.replicas[r].replica.as_mut() {
                    replica.handle_reply(now, token, reply);
                    self.dirty_replicas.push(r);
                }
            }
            Event::Opened {
                replica: r,
                shard,
                epoch,
            } => self.opened(r, shard, epoch),
            Event::PubSub {
                replica: r,
                shard,
                epoch,
                message,
            } => {
                let (channel, payload) = &*message;
                if !self.reaches(r, shard, epoch) {
                    return;
                }
                let second = self.second();
                let inbound = &mut self.replicas[r].inbound;
                if inbound.len() <= second {
                    inbound.resize(second + 1, 0);
                }
                inbound[second] += 1;
                if let Some(replica) = self.replicas[r].replica.as_mut() {
                    replica.handle_pubsub(now, channel, payload);
                    self.dirty_replicas.push(r);
                }
            }
            Event::RedisUp => {
                self.redis_up = true;
                self.redis_since = now;
            }
        }
    }

    fn second(&self) -> usize {
        self.elapsed().as_secs() as usize
    }

    /// Whether something sent on link `epoch` of replica `r` to instance `shard`
    /// reaches it now.
    fn reaches(&self, r: usize, shard: usize, epoch: u64) -> bool {
        let replica = &self.replicas[r];
        let link = &replica.redis_links[shard];
        link.linked
            && epoch == link.epoch
            && epoch > link.killed
            && replica.replica.is_some()
            && !self.partitioned(r)
    }

    fn partitioned(&self, r: usize) -> bool {
        self.replicas[r]
            .partitioned_until
            .is_some_and(|until| until > self.now)
    }

    /// Whether each id's sends keep a stream.
    fn streams_users(&self) -> bool {
        self.config
            .replica
            .recovery
            .as_ref()
            .is_some_and(|r| r.users)
    }

    /// A command reaches Redis: run it, answer, and hand out what it published.
    fn execute(&mut self, r: usize, epoch: u64, token: Token, command: Command, keys: &Keys) {
        let now = self.now;
        let shard = token.shard();
        let killed = self.replicas[r].redis_links[shard].killed;
        if epoch <= killed || !self.redis_up || self.partitioned(r) {
            return;
        }
        let calls = command.calls(keys);
        let second = self.second();
        if self.counters.redis_calls.len() <= second {
            self.counters.redis_calls.resize(second + 1, 0);
        }
        self.counters.redis_calls[second] += calls.len() as u64;
        match &command {
            Command::Trim { id, .. } => {
                if let Some(pending) = self.track.trims_pending.get_mut(id) {
                    *pending = pending.saturating_sub(1);
                }
            }
            Command::Load { id } if self.track.trims_pending.get(id).is_some_and(|n| *n > 0) => {
                self.track.uncertain_ids.insert(id.clone());
            }
            // Stored for an id Redis counted as connected nowhere while a connection
            // of it was open (Redis lost the presence): with personal streams, that
            // connection got it from the stream, and the id's next fresh connection
            // loads it again (the at-least-once window of a Redis that lost data).
            // The store may run after that connection closed (the sender's answers
            // were slow): what tells is that a connection of the id got it.
            Command::StoreMany { ids, text, .. } if self.streams_users() => {
                let connected = self.replicas.iter().filter(|r| r.replica.is_some());
                let mut ids_open =
                    connected.flat_map(|r| r.conns.values().filter_map(|c| c.id.as_ref()));
                let open = ids_open.any(|open| ids.contains(open));
                if let Some(key) = track::entry_key(text) {
                    let reached = (0..self.clients.len()).any(|c| {
                        ids.contains(&self.id_of(c))
                            && self.clients[c].log.receptions.iter().any(|r| r.key == key)
                    });
                    if open || reached {
                        self.track.uncertain_messages.insert(key);
                    }
                }
            }
            _ => {}
        }
        match &command {
            Command::Subscribe { channels } => {
                let redis = &mut self.redis[shard];
                channels.iter().for_each(|c| redis.subscribe(r, c));
            }
            Command::Unsubscribe { channels } => {
                let redis = &mut self.redis[shard];
                channels.iter().for_each(|c| redis.unsubscribe(r, c));
            }
            _ => {}
        }
        let reply = self.redis[shard].execute(now, &calls);
        // (A command of a crashed incarnation is no command of the current one.)
        let current = epoch == self.replicas[r].redis_links[shard].epoch;
        if let Some(outstanding) = self.replicas[r].outstanding.get_mut(&token) {
            outstanding.executed |= current;
        }
        for published in self.redis[shard].take_published() {
            self.presence_published(&published.payload);
            let message = Arc::new((published.channel, published.payload));
            for subscriber in published.subscribers {
                let epoch = self.replicas[subscriber].redis_links[shard].epoch;
                self.schedule.push(
                    now + self.config.redis_latency,
                    Event::PubSub {
                        replica: subscriber,
                        shard,
                        epoch,
                        message: message.clone(),
                    },
                );
            }
        }
        let slow = match self.replicas[r].slow {
            Some((until, extra)) if until > now => extra,
            _ => Duration::ZERO,
        };
        let mut at = now + self.config.redis_latency + slow;
        let link = &mut self.replicas[r].redis_links[shard];
        if let Some((floor_epoch, floor)) = link.reply_floor {
            if floor_epoch == epoch {
                at = at.max(floor);
            }
        }
        link.reply_floor = Some((epoch, at));
        self.schedule.push(
            at,
            Event::Reply {
                replica: r,
                epoch,
                token,
                reply,
            },
        );
    }

    /// A connection attempt of replica `r` to Redis instance `shard` resolves.
    fn opened(&mut self, r: usize, shard: usize, epoch: u64) {
        if epoch != self.replicas[r].redis_links[shard].epoch || self.partitioned(r) {
            // A partition: the attempt hangs until the replica gives up on it.
            return;
        }
        let now = self.now;
        let Some(replica) = self.replicas[r].replica.as_mut() else {
            return;
        };
        if !self.redis_up {
            replica.handle_link_down(now, shard, "connection refused");
            self.dirty_replicas.push(r);
            return;
        }
        for channel in replica.channels(shard) {
            self.redis[shard].subscribe(r, &channel);
        }
        self.replicas[r].redis_links[shard].linked = true;
        self.replicas[r].redis_links[shard].linked_at = Some(now);
        let run_id = self.redis[shard].run_id().to_owned();
        if let Some(replica) = self.replicas[r].replica.as_mut() {
            replica.handle_link_up(now, shard, &run_id);
        }
        self.dirty_replicas.push(r);
    }

    /// Record what a failed link to instance `shard` (every instance: `None`) leaves
    /// uncertain: stores and publishes Redis ran without the answer arriving may be
    /// done again.
    fn uncertain(&mut self, r: usize, shard: Option<usize>) {
        let outstanding = &mut self.replicas[r].outstanding;
        let failed: Vec<Token> = outstanding
            .keys()
            .filter(|token| shard.is_none_or(|shard| token.shard() == shard))
            .copied()
            .collect();
        for token in failed {
            let Some(sent) = self.replicas[r].outstanding.remove(&token) else {
                continue;
            };
            if !sent.executed {
                continue;
            }
            let key = match &sent.command {
                Command::StoreMany { text, .. } => track::entry_key(text),
                Command::Publish { payload, .. } => crate::cluster::Envelope::decode(payload)
                    .ok()
                    .and_then(|e| message_key(&e.message)),
                // The envelope with no recipients between its halves.
                Command::Route { head, tail, .. } => {
                    crate::cluster::Envelope::decode(&format!("{head}{tail}"))
                        .ok()
                        .and_then(|e| message_key(&e.message))
                }
                // An append to an id's stream is made again after the outage.
                Command::StreamPublish { entry, .. } => {
                    Message::from_value(serde_json::from_str(entry).unwrap_or_default())
                        .ok()
                        .and_then(|m| message_key(&m))
                }
                _ => None,
            };
            if let Some(key) = key {
                self.track.uncertain_messages.insert(key);
            }
        }
    }

    /// Deliver the frames of `link` that are due.
    fn link_due(&mut self, link: usize) {
        let now = self.now;
        let (r, conn) = (self.links[link].server, self.links[link].conn);
        loop {
            let paused = self.replicas[r]
                .conns
                .get(&conn)
                .and_then(|c| c.session.read_paused_until());
            if let Some(until) = paused {
                if self.links[link]
                    .to_server
                    .front()
                    .is_some_and(|(at, _)| *at <= now)
                {
                    self.schedule.push(until.max(now), Event::Link(link));
                }
                break;
            }
            let Some(packet) = self.links[link].pop_to_server(now) else {
                break;
            };
            if self.links[link].black_hole || self.links[link].server_done {
                continue;
            }
            let Some(entry) = self.replicas[r].conns.get_mut(&conn) else {
                continue;
            };
            match packet {
                Packet::Text(text) => entry.session.handle_frame(now, &text),
                Packet::Close(close) => {
                    self.links[link].server_done = true;
                    entry.session.handle_peer_closed(now, Some(close));
                }
            }
            self.dirty_sessions.push((r, conn));
            self.settle();
        }
        let c = self.links[link].client;
        while let Some(packet) = self.links[link].pop_to_client(now) {
            self.clients[c].log.link = link as u32;
            let before = self.clients[c].log.authenticated;
            let flush =
                self.clients[c].receive(now, self.config.ws_latency, &mut self.links, link, packet);
            self.count_authenticated(c, before);
            self.after_client_flush(c, flush);
        }
    }

    /// Client `c`'s `link` drops: both ends stop, the client sees its transport end.
    fn drop_client_link(&mut self, c: usize, link: usize) {
        self.links[link].cut();
        let before = self.clients[c].log.authenticated;
        let flush =
            self.clients[c].drop_transport(self.now, self.config.ws_latency, &mut self.links);
        self.count_authenticated(c, before);
        self.after_client_flush(c, flush);
    }

    fn resolve_connect(&mut self, c: usize) {
        let now = self.now;
        let live: Vec<usize> = (0..self.replicas.len())
            .filter(|r| self.replicas[*r].replica.is_some())
            .collect();
        if live.is_empty() {
            let _ = self.clients[c]
                .session
                .handle_connect_failed(now, "refused");
            self.flush_client(c);
            return;
        }
        let r = live[self.rng.below_or_equal(live.len() as u64 - 1) as usize];
        let replica = self.replicas[r].replica.as_mut().expect("live");
        let conn = replica.handle_connection_opened(now);
        self.dirty_replicas.push(r);
        let link = self.links.len();
        self.links.push(Link::new(c, r, conn));
        let session = ServerSession::new(self.server.clone(), now);
        self.replicas[r].conns.insert(
            conn,
            Conn {
                session,
                link,
                held: Vec::new(),
                timer: None,
                id: None,
            },
        );
        self.dirty_sessions.push((r, conn));
        self.clients[c].link = Some(link);
        let _ = self.clients[c].session.handle_connected(now);
        self.flush_client(c);
    }

    fn count_authenticated(&mut self, c: usize, before: bool) {
        match (before, self.clients[c].log.authenticated) {
            (false, true) => self.authenticated += 1,
            (true, false) => self.authenticated -= 1,
            _ => {}
        }
    }

    fn flush_client(&mut self, c: usize) {
        let before = self.clients[c].log.authenticated;
        let flush = self.clients[c].flush(self.now, self.config.ws_latency, &mut self.links);
        self.count_authenticated(c, before);
        self.after_client_flush(c, flush);
    }

    fn after_client_flush(&mut self, c: usize, flush: ClientFlush) {
        if let Some((link, at)) = flush.link_due {
            self.schedule.push(at, Event::Link(link));
        }
        if let Some(at) = flush.connect_at {
            self.schedule.push(at, Event::Client(c));
        }
        self.arm_client(c);
    }

    fn arm_client(&mut self, c: usize) {
        let deadline = self.clients[c].session.poll_timeout();
        if let Some(at) = rearm(&mut self.client_timers[c], deadline) {
            self.schedule.push(at, Event::Client(c));
        }
    }

    fn conn_mut(&mut self, r: usize, conn: ConnId) -> Option<&mut Conn> {
        self.replicas[r].conns.get_mut(&conn)
    }

    // ----- draining outputs -----

    /// Drain every dirty session and replica until nothing moves.
    fn settle(&mut self) {
        loop {
            if let Some((r, conn)) = self.dirty_sessions.pop() {
                self.flush_session(r, conn);
            } else if let Some(r) = self.dirty_replicas.pop() {
                self.flush_replica(r);
            } else {
                return;
            }
        }
    }

    /// Execute a session's outputs: frames to its link, events to the replica and
    /// to the application (development authentication, the relay).
    fn flush_session(&mut self, r: usize, conn: ConnId) {
        let now = self.now;
        let latency = self.config.ws_latency;
        loop {
            let Some(entry) = self.replicas[r].conns.get_mut(&conn) else {
                return;
            };
            let link = entry.link;
            if let Some(transmit) = entry.session.poll_transmit() {
                let packet = match transmit {
                    Transmit::Text(frame) => {
                        if self.config.record && frame.as_str().contains("\"s\":") {
                            record_written(&mut self.track, entry.session.id(), frame.as_str());
                        }
                        Packet::Text(frame.as_str().into())
                    }
                    Transmit::Close(close) => {
                        self.links[link].server_done = true;
                        Packet::Close(close)
                    }
                };
                if !self.links[link].client_done || matches!(packet, Packet::Close(_)) {
                    self.links[link]
                        .to_client
                        .push_back((now + latency, packet));
                    self.schedule.push(now + latency, Event::Link(link));
                }
                continue;
            }
            if !entry.held.is_empty() && !entry.session.awaits_undelivered() {
                for action in std::mem::take(&mut entry.held) {
                    apply(&mut entry.session, action);
                }
                continue;
            }
            let Some(event) = entry.session.poll_event() else {
                break;
            };
            self.session_event(r, conn, event);
        }
        if let Some(entry) = self.replicas[r].conns.get_mut(&conn) {
            if let Some(at) = rearm(&mut entry.timer, entry.session.poll_timeout()) {
                self.schedule.push(at, Event::Session(r, conn));
            }
        }
    }

    fn session_event(&mut self, r: usize, conn: ConnId, event: SessionEvent) {
        let now = self.now;
        if let Some(replica) = self.replicas[r].replica.as_mut() {
            replica.handle_session_event(now, conn, &event);
            self.dirty_replicas.push(r);
        }
        if let SessionEvent::Redelivered {
            id,
            delivered,
            dropped,
        } = &event
        {
            if delivered + dropped > 0 {
                *self.track.trims_pending.entry(id.clone()).or_default() += 1;
            }
        }
        let Some(entry) = self.replicas[r].conns.get_mut(&conn) else {
            return;
        };
        match event {
            SessionEvent::AuthenticationRequested { credentials, .. } => {
                // With personal or broadcast streams, every client opts in (as our
                // client does on a server with rooms), reporting no position.
                let streams = self.config.replica.recovery.as_ref();
                if streams.is_some_and(|r| r.users || r.broadcast) {
                    if let Some(replica) = self.replicas[r].replica.as_mut() {
                        let since = crate::recovery::Since::default();
                        replica.handle_session_event(now, conn, &SessionEvent::Extended { since });
                        self.dirty_replicas.push(r);
                    }
                }
                let Some(entry) = self.replicas[r].conns.get_mut(&conn) else {
                    return;
                };
                let _ = match dev_authenticate(&credentials) {
                    Ok((id, user)) => entry.session.accept(now, id, user),
                    Err(reason) => entry.session.reject(now, reason),
                };
            }
            SessionEvent::Authenticated { id, .. } => {
                let previous = entry.id.replace(id.clone());
                let link = entry.link as u32;
                if let Some(previous) = previous {
                    self.track.leave(now, &previous);
                }
                self.track.arrive(&id);
                self.track.auth_at.entry(link).or_insert(now);
                if let (Some(room), Some(replica)) = (
                    room_of(self.config.rooms, &id),
                    self.replicas[r].replica.as_mut(),
                ) {
                    let _ = replica.handle_join(now, conn, &room);
                    self.dirty_replicas.push(r);
                }
            }
            SessionEvent::Message(message) if message.t.as_deref() == Some(ROOM_SEND) => {
                let link = entry.link as u32;
                let rooms = self.config.rooms;
                let room = entry.id.as_deref().and_then(|id| room_of(rooms, id));
                if let (Some(room), Some(key)) = (room, message_key(&message)) {
                    self.track.relayed.insert(
                        key,
                        Relayed {
                            at: now,
                            sender_link: link,
                            to: Vec::new(),
                            room: true,
                        },
                    );
                    if let Some(replica) = self.replicas[r].replica.as_mut() {
                        let _ = replica.handle_room_send(now, &message, &room);
                        self.dirty_replicas.push(r);
                    }
                }
            }
            SessionEvent::Message(message) => {
                let link = entry.link as u32;
                let max = self.config.server.limits().max_recipients;
                let action = relay(message, max);
                if let Some((message, recipients)) =
                    action.and_then(|a| a.answer(&mut entry.session))
                {
                    self.relay_send(r, link, &message, &recipients);
                }
            }
            SessionEvent::Closed { .. } => {
                if let Some(entry) = self.replicas[r].conns.remove(&conn) {
                    if let Some(id) = entry.id {
                        self.track.leave(now, &id);
                    }
                }
            }
            _ => {}
        }
    }

    fn relay_send(
        &mut self,
        r: usize,
        link: u32,
        message: &Message,
        recipients: &crate::hub::Recipients,
    ) {
        let now = self.now;
        self.counters.relayed += 1;
        if let (true, Some(key)) = (self.config.record, message_key(message)) {
            let to = match recipients {
                crate::hub::Recipients::Ids(ids) => ids.clone(),
                crate::hub::Recipients::All => Vec::new(),
            };
            self.track.relayed.insert(
                key,
                Relayed {
                    at: now,
                    sender_link: link,
                    to,
                    room: false,
                },
            );
        }
        if let Some(replica) = self.replicas[r].replica.as_mut() {
            let _ = replica.handle_send(now, message, None, recipients);
            self.dirty_replicas.push(r);
        }
    }

    /// A room's presence changes alternate: an id joins, then leaves, then joins.
    fn presence_published(&mut self, payload: &str) {
        if let Ok(RoomPayload::Presence(change)) = RoomPayload::decode(payload) {
            let key = (change.room, change.id);
            if self.presence_told.get(&key) == Some(&change.joined) {
                let (room, id) = &key;
                let what = if change.joined { "joined" } else { "left" };
                let violation = format!("{id} {what} {room} twice in a row");
                self.violations.push(violation);
            }
            self.presence_told.insert(key, change.joined);
        }
    }

    /// Execute a replica's outputs.
    fn flush_replica(&mut self, r: usize) {
        loop {
            let Some(replica) = self.replicas[r].replica.as_mut() else {
                return;
            };
            if let Some(delivery) = replica.poll_delivery() {
                for target in delivery.targets {
                    if let Some(entry) = self.replicas[r].conns.get_mut(&target) {
                        if entry.session.awaits_undelivered() {
                            entry.held.push(delivery.action.clone());
                        } else {
                            apply(&mut entry.session, delivery.action.clone());
                        }
                        self.dirty_sessions.push((r, target));
                    }
                }
                continue;
            }
            if let Some((token, command)) = replica.poll_command() {
                self.command(r, token, command);
                continue;
            }
            let Some(event) = replica.poll_event() else {
                break;
            };
            self.replica_event(r, event);
        }
        let deadline = self.replicas[r]
            .replica
            .as_ref()
            .and_then(Replica::poll_timeout);
        if let Some(at) = rearm(&mut self.replicas[r].timer, deadline) {
            self.schedule.push(at, Event::Replica(r));
        }
    }

    fn command(&mut self, r: usize, token: Token, command: Command) {
        let now = self.now;
        let latency = self.config.redis_latency;
        let replica = &mut self.replicas[r];
        let shard = token.shard();
        if command == Command::Connect {
            let link = &mut replica.redis_links[shard];
            link.epoch += 1;
            link.linked = false;
            self.redis[shard].unsubscribe_all(r);
            let epoch = link.epoch;
            let opened = Event::Opened {
                replica: r,
                shard,
                epoch,
            };
            self.schedule.push(now + 2 * latency, opened);
            return;
        }
        replica.outstanding.insert(
            token,
            Outstanding {
                command: command.clone(),
                executed: false,
            },
        );
        let epoch = replica.redis_links[shard].epoch;
        self.schedule.push(
            now + latency,
            Event::Command {
                replica: r,
                epoch,
                token,
                command: Box::new(command),
                keys: replica.keys.clone(),
            },
        );
    }

    fn replica_event(&mut self, r: usize, event: ReplicaEvent) {
        let now = self.now;
        match event {
            ReplicaEvent::LinkDown { shard, .. } => {
                self.counters.link_downs += 1;
                self.uncertain(r, Some(shard));
                self.replicas[r].redis_links[shard].linked = false;
                self.redis[shard].unsubscribe_all(r);
            }
            ReplicaEvent::Loaded { conn, messages, .. } => {
                if let Some(entry) = self.replicas[r].conns.get_mut(&conn) {
                    let _ = entry.session.handle_undelivered(now, messages);
                    self.dirty_sessions.push((r, conn));
                }
            }
            ReplicaEvent::Stored {
                stored, dropped, ..
            } => {
                self.counters.stored += stored as u64;
                self.counters.dropped += dropped as u64;
            }
            ReplicaEvent::Undeliverable { ids, .. } => {
                self.counters.undeliverable += ids.len() as u64;
            }
            ReplicaEvent::JobsLost { count, .. } => self.counters.jobs_lost += count as u64,
            ReplicaEvent::Received { local } => {
                self.counters.envelopes += 1;
                self.counters.unneeded += u64::from(local == 0);
            }
            _ => {}
        }
    }
}

/// When to schedule a wake-up for a `deadline`, given the one `armed` (scheduled
/// and not yet taken): only when none is armed, or the deadline moved earlier. An
/// armed wake-up that comes early finds nothing due and arms the next: so each
/// timer keeps one or two entries in the agenda, however often its deadline moves.
fn rearm(armed: &mut Option<Instant>, deadline: Option<Instant>) -> Option<Instant> {
    match (deadline, *armed) {
        (Some(at), Some(pending)) if at >= pending => None,
        (Some(at), _) => {
            *armed = Some(at);
            Some(at)
        }
        (None, _) => None,
    }
}

/// Apply a delivery's action to one session.
fn apply(session: &mut ServerSession, action: Action) {
    let _ = match action {
        Action::Write(frame) => session.send(frame),
        Action::Close(close) => session.disconnect(close),
        Action::Ignore => Ok(()),
    };
}

/// A redelivered frame was written to a transport of `id`.
fn record_written(track: &mut Track, id: Option<&str>, frame: &str) {
    let (Some(id), Ok(message)) = (
        id,
        Message::decode(frame, &crate::limits::Limits::default()),
    ) else {
        return;
    };
    if message.op != Opcode::Dispatch || message.s.is_none() {
        return;
    }
    if let Some(key) = message_key(&message) {
        track.written.entry(id.to_owned()).or_default().insert(key);
    }
}
