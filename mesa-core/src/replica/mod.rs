//! The cluster as a state machine: one server replica among others on one Redis
//! (quinn-proto's `Endpoint` shape).
//!
//! A [`Replica`] owns the replica's [`Hub`] (who is connected here, as which id) and
//! decides everything the cluster needs: presence (an id's first connection here
//! arrives in `connected_clients`, its last one leaves), the lease that proves the
//! replica alive and the janitor that cleans up after those that died, which client
//! events go to which portal, the remote part of every send (published, or checked
//! for presence and stored for the ids connected nowhere, in bounded [`Round`](crate::Round)s),
//! delivering envelopes to local connections (our own global ones excepted),
//! loading, trimming and clearing stored messages, and what survives a failure of the
//! link to Redis. It performs nothing: Redis work leaves as typed [`Command`]s, each
//! with a [`Token`] its reply is matched by; local deliveries leave as [`LocalDelivery`]s
//! (connection ids and one shared frame); the rest as [`ReplicaEvent`]s.
//!
//! Every transition of the replica is in this file; the other files of the module
//! hold its data types.
//!
#![doc = include_str!("../../docs/replica-run-loop.md")]
//!
//! # What survives a failure of the link
//!
//! Work waits in one bounded buffer (`max_pending`, queued and in flight together)
//! and leaves it only once Redis has answered the command that carried it. When the
//! link fails (an error reply, no reply within `reply_timeout`, or the driver's
//! [`handle_link_down`](Replica::handle_link_down)):
//!
//! | work | fate |
//! |---|---|
//! | a send with sync (presence check, then stores) | kept, in order; done again from its last finished round, unless every command of it in the interrupted round was answered and nothing was left for it to do |
//! | a send without sync (a publish), a room's message, a portal event | lost, reported ([`Loss::Outage`]); a portal event made before the link first opened waits for it instead |
//! | presence (arrive, leave, connection counts) | forgotten: the renewal after the reconnection registers it anew |
//! | a load, a clear, a trim | kept (a load is dropped once its session stopped waiting, a clear once its connection closed) |
//!
//! # Delivery guarantees, and the at-least-once window
//!
//! A message stored for an id (its [`Command::StoreMany`] answered) stays stored
//! until a session wrote it to that id's transport (then the session's redelivery
//! report trims it) or the per-id cap pushed it out (reported in
//! [`ReplicaEvent::Stored`]). A message published to ids connected elsewhere is best
//! effort, as upstream's pub/sub: a replica that loses its subscription meanwhile
//! misses it. An id that connects while a send to it is between its presence check
//! and its store is published to instead of stored for (the store script checks
//! presence again, and a connection's id arrives before it reads its stored
//! messages), so no message waits in the store while its id is connected.
//!
//! A message reaches a connection at most once, except in this window (the
//! at-least-once window):
//! - a command that Redis ran but whose answer the link lost is done again after the
//!   reconnection: a round of a send whose stores or publishes were in flight when
//!   the link failed may store or publish its message twice;
//! - an id that loads its stored messages again before the trim of an earlier
//!   redelivery reached Redis (it reconnected while that trim waited for a link, or
//!   the replica holding the trim crashed) gets them again.
//!
//! Nothing else delivers twice. Each connection of an id redelivers the id's stored
//! messages once (two tabs both get them). A trim removes the entries through the
//! last one redelivered, found by its text among the entries loaded, so trims of two
//! connections redelivering at once, a trim done twice, or entries the cap pushed out
//! meanwhile never remove an entry that was not written; only an entry of exactly the
//! same text stored again after the first was trimmed may be taken for it.
//!
//! # Order
//!
//! Sends leave in the order they were made: one round at a time, and a send cut by
//! a round keeps the head of the queue until it is done. So the messages of one
//! sender reach each connection in order, live ones and redelivered ones alike.
//!
//! # Rooms
//!
//! A room's messages go straight to its channel, best effort as a publish: never
//! stored, never done twice (a publish is not retried), and lost when the link
//! fails before Redis took them. Order is per channel, as in every pub/sub system:
//! a sender's room messages reach each member in order, but a room message may
//! overtake the sender's earlier send to ids, which waits for its presence check.
//!
//! A recoverable room ([`ReplicaConfig::recovery`]) is stronger: its messages are
//! appended to a stream by the script that publishes them, every replica (this one
//! too) forwards them from the channel in the stream's order, and what the channel
//! lost is read from the stream (see `streams.rs`): a member gets every message
//! published after it joined, once, and an extended member that comes back gets
//! what it missed after the position it reports.
//!
//! With personal and broadcast streams ([`RecoveryConfig::users`](crate::recovery::RecoveryConfig::users),
//! [`RecoveryConfig::broadcast`](crate::recovery::RecoveryConfig::broadcast)), an
//! extended connection is in its id's stream and the broadcast's (rooms of their own
//! here, `personal.rs`), and takes those sends from them, as a recoverable room's
//! members do; the envelopes say they were streamed, and skip it. Every id of a send
//! is appended to its stream in the send's round, before its presence check and
//! stores, and again after an outage (at least once: an append Redis ran without
//! answering is made twice, at two offsets); the ids connected here, and a broadcast,
//! in a send of their own. A message stored for an id is so in its stream too: a
//! connection whose resume of its id's stream is complete has its stored messages
//! taken instead of sent again.

//!
//! # Routing by interest
//!
//! With [`ReplicaConfig::legacy_bus`] off, the remote part of a send to ids is not
//! published on `ws`, which every replica parses, but routed ([`Command::Route`]):
//! Redis looks up each id's replicas in the route table (`mesa_routes:<id>`, kept by
//! the presence scripts beside each replica's ids set, and read only while the
//! replica's lease lives) and publishes one envelope per replica on its own channel.
//! A replica then parses only what its connections need. The route is read when the
//! publish runs, after the presence check and the stores, as the `ws` publish is;
//! one difference: a second connection of an id on a replica where the id had none
//! gets routed sends from when its arrival reached Redis (on `ws` it got those
//! published after it authenticated), a round trip later. Global sends stay on `ws`.

//!
//! # Several Redis instances
//!
//! With [`ReplicaConfig::shards`] above 1, each id's and each room's data lives on
//! the instance [`shard_of`] names, the global data on the
//! first, and the replica keeps one link per instance, each with its own lease,
//! presence, janitor, jobs and rounds of sends: everything above holds per instance.
//! A send is split by its ids' instances; each part keeps its order, and a recipient
//! lives on one instance, so a sender's messages still reach each recipient in order.

mod command;
mod config;
mod dispatch;
mod event;
mod job;
mod personal;
mod rounds;
pub mod scripts;
mod shard;
mod streams;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use command::{Call, Command, Keys, RedisValue, Reply, StreamKeep, Token};
pub use config::{DurablePortals, ReplicaConfig, StoreWait};
use dispatch::streaming;
pub use dispatch::{Dispatch, DispatchConfig, DispatchReport};
pub use event::{LocalDelivery, Loss, ReplicaEvent, SendReport};
pub use scripts::Script;

use crate::backoff::Backoff;
use crate::cluster::{
    Envelope, IDS_PER_COMMAND, PortalEvent, PortalEventKind, PortalPool, PortalUpdate,
    QueuedPortalEvent, ROOM_CHANNEL_PREFIX, RemotePlan, plan_remote, portal_partition, shard_of,
};
use crate::config::ConfigError;
use crate::hub::{Action, ConnId, Hub, Recipients, TooManyRecipients, distinct_ids};
use crate::recovery::{Personal, Position, Since};
use crate::room_table::Joined;
use crate::rooms::{
    PresenceChange, RoomEnvelope, RoomNotice, RoomPayload, RoomRefusal, room_frame,
};
use crate::session::{EventInterest, SessionEvent};
use crate::sync::{MessageOptions, stored_entries};
use crate::wire::{Message, Opcode};

use job::{Fate, Job, RemoteSend, Streaming};
use personal::PersonalTable;
use rounds::{Advance, Finished, Rounds};
use shard::{Flight, Link, Sent, Shard, Timer};
use streams::{Out, Streams};

/// Commands of jobs other than sends in flight at once: beyond it, jobs wait (and
/// presence changes coalesce) until Redis answers.
const JOBS_IN_FLIGHT: usize = 512;

/// Channels one `SUBSCRIBE` or `UNSUBSCRIBE` names at most.
pub const CHANNELS_PER_COMMAND: usize = 512;

/// One server replica of a cluster, as a state machine.
///
/// Methods come in four groups, as in quinn-proto: getters (`keys`, `channels`, `awaits`,
/// `hub`, `is_linked`, `is_retired`, `pending`), inputs (`handle_*`), commands
/// (`handle_send`, `handle_retire`, which also return what they did), and outputs
/// (`poll_*`). After every input drain [`poll_delivery`](Self::poll_delivery), then
/// [`poll_command`](Self::poll_command), then [`poll_event`](Self::poll_event) until
/// each gives `None`, then re-arm the timer from [`poll_timeout`](Self::poll_timeout).
///
/// With several Redis instances ([`ReplicaConfig::shards`]) each has its own link:
/// a command goes to the instance its token names ([`Token::shard`]), and the
/// link's inputs name theirs.
///
/// A server holds its replica where its connections reach it synchronously (in a
/// mutex, as quinn's shared `Endpoint`): a send delivers to local connections before
/// it returns.
#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    keys: Keys,
    hub: Hub,
    pool: PortalPool,
    /// One per Redis instance.
    shards: Vec<Shard>,
    /// `ns("ws")` and this replica's own channel, named once: every pub/sub message
    /// is matched against them.
    ws_channel: String,
    own_channel: String,
    /// The recoverable rooms with a member here, personal and broadcast streams
    /// included.
    streams: Streams,
    /// The members here of the personal and broadcast streams.
    personal: PersonalTable,
    next_token: u64,
    /// Client events appended to the durable portal streams: the sequence of their
    /// event ids.
    enqueued: u64,
    retiring: bool,
    /// Per connection redelivering its stored messages: the index and text of each
    /// loaded entry that is a message, to trim exactly what it wrote.
    loaded: HashMap<ConnId, Vec<(usize, String)>>,
    commands: VecDeque<(Token, Command)>,
    deliveries: VecDeque<LocalDelivery>,
    events: VecDeque<ReplicaEvent>,
}

impl Replica {
    /// A replica named `replica` (the `origin` of its envelopes, unique in the
    /// cluster), starting at `now`; `seed` drives the portal choice and the reconnect
    /// jitter. Its first commands open the links.
    pub fn new(
        config: ReplicaConfig,
        replica: impl Into<String>,
        seed: u64,
        now: Instant,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let name: String = replica.into();
        let shards = (0..config.shards)
            .map(|index| {
                let backoff = Backoff::new(config.reconnect, seed.rotate_left(17 + index as u32));
                let rounds = Rounds::new(
                    config.namespace.ws_channel(),
                    !config.legacy_bus,
                    Some(name.clone()),
                    config.max_stored_per_id,
                    config.store_wait,
                    config.recovery.as_ref().map(StreamKeep::new),
                );
                Shard::new(backoff, rounds)
            })
            .collect();
        let mut replica = Replica {
            ws_channel: config.namespace.ws_channel(),
            own_channel: config.namespace.replica_channel(&name),
            streams: Streams::default(),
            personal: PersonalTable::default(),
            keys: Keys::new(config.namespace.clone(), name),
            hub: Hub::new(config.auth_required),
            pool: PortalPool::new(config.portals.unwrap_or_default(), seed),
            shards,
            next_token: 0,
            enqueued: 0,
            retiring: false,
            loaded: HashMap::new(),
            commands: VecDeque::new(),
            deliveries: VecDeque::new(),
            events: VecDeque::new(),
            config,
        };
        for shard in 0..replica.shards.len() {
            replica.connect(now, shard);
        }
        Ok(replica)
    }

    // ----- getters -----

    /// Where this replica keeps its data in Redis; [`Command::calls`] needs it.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The pub/sub channels the link to instance `shard` subscribes to: this
    /// replica's own (sends routed to it), and on shard 0 `ws` and the portal pool's
    /// when portals are on (room channels follow, as rooms get members here).
    pub fn channels(&self, shard: usize) -> Vec<String> {
        let mut channels = Vec::new();
        if shard == 0 {
            channels.push(self.ws_channel.clone());
        }
        channels.push(self.own_channel.clone());
        if shard == 0 && self.config.portals.is_some() {
            channels.push(self.keys.namespace().available_portals_pool());
        }
        channels
    }

    /// The local connections and their ids.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The settings.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Whether the link to every Redis instance is open.
    pub fn is_linked(&self) -> bool {
        self.shards.iter().all(Shard::is_linked)
    }

    /// Whether the replica retired.
    pub fn is_retired(&self) -> bool {
        self.shards.iter().all(Shard::is_retired)
    }

    /// Whether the replica still waits for the answer to the command of `token`: a
    /// command polled before its link failed is not, and a driver that has not sent
    /// it yet drops it (done after the reconnection, it would run twice).
    pub fn awaits(&self, token: Token) -> bool {
        self.shards
            .get(token.shard())
            .is_some_and(|shard| shard.flights.contains_key(&token))
    }

    /// Jobs waiting for Redis, queued or in flight: at most `max_pending` sends,
    /// loads, trims, clears and portal events, and as many presence changes.
    pub fn pending(&self) -> usize {
        self.work_pending()
            + self
                .shards
                .iter()
                .map(Shard::presence_pending)
                .sum::<usize>()
    }

    /// The jobs `max_pending` bounds, besides presence changes, over every instance.
    fn work_pending(&self) -> usize {
        self.shards.iter().map(Shard::work_pending).sum()
    }

    /// The instance that holds the data of `key` (an id or a room).
    fn shard_of(&self, key: &str) -> usize {
        shard_of(key, self.shards.len())
    }

    // ----- inputs: connections -----

    /// A connection opened: register it. It counts into `connected_clients_count`
    /// and the portals hear of it.
    pub fn handle_connection_opened(&mut self, now: Instant) -> ConnId {
        let conn = self.hub.connect();
        self.push_job(0, Job::Connections(1));
        self.tell_portals(PortalEventKind::Connection, None);
        self.settle(now);
        conn
    }

    /// The session events [`handle_session_event`](Self::handle_session_event) acts
    /// on: messages only when portals (plain or durable) are on.
    pub fn event_interest(&self) -> EventInterest {
        EventInterest::replica(
            self.config.portals.is_some() || self.config.durable_portals.is_some(),
        )
    }

    /// Act on an event of connection `conn`'s session: authentication (presence,
    /// portals), messages (portals), stored-message loads, clears and trims, and its
    /// close. The others, and those [`event_interest`](Self::event_interest) leaves
    /// out, are ignored: a caller need not pass them.
    pub fn handle_session_event(&mut self, now: Instant, conn: ConnId, event: &SessionEvent) {
        if !self.event_interest().acts_on(event) {
            return;
        }
        match event {
            SessionEvent::Authenticated { id, .. } => {
                self.authenticated(conn, id);
                self.personal_stream(now, conn, id);
            }
            SessionEvent::Extended { since } => self.extended(now, conn, since),
            SessionEvent::Message(message) => {
                let client_id = self.hub.id_of(conn).map(str::to_owned);
                self.tell_portals(PortalEventKind::Message(message.clone()), client_id);
            }
            SessionEvent::LoadUndelivered { id } => {
                let load = Job::Load {
                    conn,
                    id: id.clone(),
                    until: now + self.config.load_timeout,
                };
                let shard = self.shard_of(id);
                if let Some((load, complete)) = self.personal.load(conn, shard, load) {
                    self.load_or_clear(shard, load, complete);
                }
            }
            SessionEvent::ClearUndelivered { id } => {
                let clear = Job::Clear {
                    conn,
                    id: id.clone(),
                };
                self.push_job(self.shard_of(id), clear);
            }
            // Exactly what the session wrote to the transport (or skipped over the
            // cap) leaves the store, found by the text of its last entry; the rest
            // stays for next time.
            SessionEvent::Redelivered {
                id,
                delivered,
                dropped,
            } => {
                let loaded = self.loaded.remove(&conn).unwrap_or_default();
                let done = (delivered + dropped).checked_sub(1);
                if let Some((index, last)) = done.and_then(|i| loaded.into_iter().nth(i)) {
                    let trim = Job::Trim {
                        id: id.clone(),
                        count: index + 1,
                        last,
                    };
                    self.push_job(self.shard_of(id), trim);
                }
            }
            SessionEvent::Closed { .. } => return self.handle_connection_closed(now, conn),
            _ => {}
        }
        self.settle(now);
    }

    /// Connection `conn` closed: forget it (its id leaves presence with its last
    /// connection here). Called by [`handle_session_event`](Self::handle_session_event)
    /// on `Closed`; a second call does nothing.
    pub fn handle_connection_closed(&mut self, now: Instant, conn: ConnId) {
        self.loaded.remove(&conn);
        if !self.hub.contains(conn) {
            return;
        }
        let client_id = self.hub.id_of(conn).map(str::to_owned);
        let rooms: Vec<String> = self.hub.rooms().rooms_of(conn).map(str::to_owned).collect();
        for room in &rooms {
            self.streams.leave(conn, room);
        }
        self.room_presence(conn, rooms, -1);
        for room in self.hub.leave_rooms(conn) {
            self.streams.close(&room);
            self.subscription(&room, false);
        }
        for stream in self.personal.close(conn) {
            self.leave_stream(conn, &stream);
        }
        if let Some(departure) = self.hub.disconnect(conn) {
            if departure.last && self.config.presence {
                let shard = self.shard_of(&departure.id);
                self.push_job(shard, Job::Leave(departure.id));
            }
        }
        self.push_job(0, Job::Connections(-1));
        self.tell_portals(PortalEventKind::Disconnection, client_id);
        self.settle(now);
    }

    // ----- inputs: Redis -----

    /// The link to instance `shard` opened (in answer to [`Command::Connect`]) to
    /// the Redis process with this `run_id` (`INFO server`; empty when unknown).
    /// Presence is registered anew, then the kept work resumes. Ignored unless a
    /// Connect is out.
    pub fn handle_link_up(&mut self, now: Instant, shard: usize, run_id: &str) {
        let Some(link) = self.shards.get_mut(shard) else {
            return;
        };
        if !matches!(link.link, Link::Connecting { .. }) {
            return;
        }
        link.link = Link::Up {
            run_id: run_id.to_owned(),
        };
        link.ever_linked = true;
        link.backoff.reset();
        // The rooms of this instance with a member here, whatever was asked on an
        // earlier link.
        let ns = self.keys.namespace();
        let count = self.shards.len();
        let mut subscribe: Vec<String> = self
            .hub
            .rooms()
            .rooms()
            .chain(self.personal.streams())
            .filter(|room| shard_of(room, count) == shard)
            .map(|room| ns.room_channel(room))
            .collect();
        // In a stable order, so that a seeded run repeats exactly.
        subscribe.sort_unstable();
        self.streams.linked(|room| shard_of(room, count) == shard);
        self.streams_out(now);
        let link = &mut self.shards[shard];
        link.subscribe = subscribe;
        link.unsubscribe.clear();
        link.rooms_dirty = link.rooms_registered;
        let all_up = self.shards.iter().all(Shard::is_linked);
        self.events
            .push_back(ReplicaEvent::LinkUp { shard, all_up });
        if shard == 0 && self.config.portals.is_some() {
            self.issue(now, 0, Flight::LoadPortals, Command::LoadPortals);
            self.shards[0].portals_loading = true;
        }
        // Before anything is decided on presence: forget the leases (and so the ids)
        // of replicas that have not renewed since Redis restarted.
        self.janitor(now, shard, false);
        self.renew(now, shard);
        self.rooms_anew(now, shard);
        self.shards[shard]
            .timers
            .set(Timer::Tick as usize, now + self.config.lease / 3);
        self.settle(now);
    }

    /// The link to instance `shard` failed, or a Connect could not open it: keep what
    /// must not be lost and reconnect after a backoff. Ignored when there is no link.
    pub fn handle_link_down(&mut self, now: Instant, shard: usize, reason: &str) {
        if shard < self.shards.len() {
            self.outage(now, shard, reason);
        }
        self.settle(now);
    }

    /// Redis answered the command of `token`. An error fails its link, as does an
    /// answer of the wrong shape; an answer to a command of a failed link is ignored.
    pub fn handle_reply(&mut self, now: Instant, token: Token, reply: Reply) {
        let shard = token.shard();
        if !self.awaits(token) {
            return;
        }
        let values = match reply {
            Ok(values) => values,
            Err(error) => {
                self.outage(now, shard, &format!("Redis: {error}"));
                return self.settle(now);
            }
        };
        let Some(sent) = self.shards[shard].flights.remove(&token) else {
            return;
        };
        if let Err(what) = self.answered(now, shard, sent, values) {
            self.outage(now, shard, &format!("unexpected reply to {what}"));
        }
        self.settle(now);
    }

    /// A message arrived on a subscribed channel: an envelope for local connections,
    /// or a change of the portal pool.
    ///
    /// An envelope this replica published is delivered too, unless it is global: a
    /// list names only ids that had no connection here when the message was sent
    /// (they were served then), so it reaches those that connected here since, at the
    /// moment every other replica delivers it. Delivered any later (say when the
    /// replica learns its publish succeeded), it would reach twice an id that was
    /// served elsewhere and moved here meanwhile.
    ///
    /// An envelope routed to this replica (on its own channel) names the ids that
    /// Redis found here when it routed it: it is delivered as a `ws` one that lists
    /// ids.
    pub fn handle_pubsub(&mut self, now: Instant, channel: &str, payload: &str) {
        let ns = self.keys.namespace();
        if channel == self.ws_channel || channel == self.own_channel {
            match Envelope::decode(payload) {
                // Our own global send: its local part was delivered when it was made.
                Ok(envelope)
                    if envelope.recipients == Recipients::All
                        && envelope.origin.as_deref() == Some(self.keys.replica()) =>
                {
                    self.received(0);
                }
                // Our own list names only ids absent here when it was sent: those that
                // connected here since get it now, when every other replica delivers.
                Ok(envelope) => {
                    let local =
                        self.deliver(envelope.message, &envelope.recipients, envelope.streamed);
                    self.received(local);
                }
                Err(error) => self.undecodable(channel, error.to_string()),
            }
        } else if channel.starts_with(ROOM_CHANNEL_PREFIX) {
            match RoomPayload::decode(payload) {
                // A recoverable room's: forwarded in the stream's order.
                Ok(RoomPayload::Message(RoomEnvelope {
                    room,
                    message,
                    position: Some(position),
                    ..
                })) => {
                    self.streams.arrived(&room, position, message);
                    let local = self.streams_out(now);
                    self.received(local);
                }
                // Our own: its members here got it when it was sent.
                Ok(RoomPayload::Message(envelope))
                    if envelope.origin.as_deref() == Some(self.keys.replica()) =>
                {
                    self.received(0);
                }
                Ok(RoomPayload::Message(envelope)) => {
                    let local = self.deliver_room(envelope.message, &envelope.room);
                    self.received(local);
                }
                // Published by Redis's scripts, so every replica's members (ours too)
                // hear a room's changes in one order. Not an envelope: not counted
                // as one received.
                Ok(RoomPayload::Presence(change)) => self.deliver_presence(&change),
                Err(error) => self.undecodable(channel, error.to_string()),
            }
        } else if channel == ns.available_portals_pool() && self.config.portals.is_some() {
            match PortalUpdate::decode(payload) {
                Ok(update) if self.pool.update(&update) => {
                    let id = update.id;
                    self.events.push_back(if update.ready {
                        ReplicaEvent::PortalJoined { id }
                    } else {
                        ReplicaEvent::PortalLeft { id }
                    });
                }
                Ok(_) => {}
                Err(error) => self.undecodable(channel, error.to_string()),
            }
        }
        self.settle(now);
    }

    /// Fire every timer that is due at `now`: renew the leases, run the janitors and
    /// ping; give up on a command Redis did not answer in time; reopen a link; start
    /// the next round of sends after a rest. Calling early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        for shard in 0..self.shards.len() {
            let timers = &mut self.shards[shard].timers;
            if timers.expire(Timer::Reply as usize, now) {
                self.outage(now, shard, "Redis did not answer in time");
            }
            if self.shards[shard]
                .timers
                .expire(Timer::Reconnect as usize, now)
            {
                self.connect(now, shard);
            }
            let link = &mut self.shards[shard];
            if link.timers.expire(Timer::Tick as usize, now) && link.is_linked() {
                self.issue(now, shard, Flight::Ping, Command::Ping);
                self.renew(now, shard);
                self.janitor(now, shard, false);
                // A change of room presence was given up: register it anew.
                if self.shards[shard].rooms_dirty {
                    self.rooms_anew(now, shard);
                }
                self.shards[shard]
                    .timers
                    .set(Timer::Tick as usize, now + self.config.lease / 3);
            }
            self.shards[shard].timers.expire(Timer::Rest as usize, now);
        }
        self.settle(now);
    }

    // ----- commands -----

    /// Send `message` to `recipients`: local connections get it at once (one
    /// [`LocalDelivery`]), the rest is queued for Redis (published to ids elsewhere, with
    /// sync stored for ids connected nowhere), each id's part on its instance. A list
    /// of more distinct ids than `max_recipients` is refused before anything is done.
    /// An op 5 event is never stored: redelivered later, it would disconnect the
    /// client.
    pub fn handle_send(
        &mut self,
        now: Instant,
        message: &Message,
        options: Option<&MessageOptions>,
        recipients: &Recipients,
    ) -> Result<SendReport, TooManyRecipients> {
        recipients.at_most(self.config.max_recipients)?;
        let message = Message {
            s: None,
            ..message.clone()
        };
        let (mut targets, absent) = self.hub.route(recipients);
        let streaming = self
            .config
            .recovery
            .as_ref()
            .map_or(Streaming::Off, |r| streaming(r, &message, recipients));
        // The connections here that take the send from their stream get it from
        // there. The ids connected here (which the remote part leaves out), or the
        // broadcast, are appended to their streams in a send of its own: their
        // extended connections elsewhere take it from there too.
        let appended_here = match (streaming, recipients) {
            (Streaming::Off, _) => None,
            (_, Recipients::All) => Some(Recipients::All),
            (_, Recipients::Ids(ids)) => {
                let here: Vec<String> = distinct_ids(ids)
                    .into_iter()
                    .filter(|id| !absent.contains(id))
                    .collect();
                (!here.is_empty()).then_some(Recipients::Ids(here))
            }
        };
        if streaming != Streaming::Off {
            self.skip_streamed(&mut targets, recipients);
        }
        let action = Action::for_message(&message);
        let mut report = SendReport {
            local: 0,
            absent: absent.clone(),
            queued: false,
        };
        if !targets.is_empty() && action != Action::Ignore {
            report.local = targets.len();
            self.deliveries.push_back(LocalDelivery {
                message: message.clone(),
                action,
                targets,
            });
        }
        let sync = self.config.sync && message.op != Opcode::Internal;
        let plan = plan_remote(recipients, absent, sync);
        for (shard, plan) in plan.by_shard(self.shards.len()) {
            let send = RemoteSend {
                message: message.clone(),
                options: options.cloned(),
                plan,
                streaming,
                appended: 0,
            };
            report.queued |= self.push_send(shard, send);
        }
        let shards = self.shards.len();
        let appends = appended_here.map(RemotePlan::Publish).into_iter();
        for (shard, plan) in appends.flat_map(|plan| plan.by_shard(shards)) {
            let send = RemoteSend {
                message: message.clone(),
                options: None,
                plan,
                streaming: Streaming::Only,
                appended: 0,
            };
            report.queued |= self.push_send(shard, send);
        }
        self.settle(now);
        Ok(report)
    }

    /// Put connection `conn` in `room` (whoever asked was authorized): the room's
    /// first member here subscribes the replica to its channel. Refused when the
    /// connection is in `max_rooms_per_connection` rooms already, or closed. An
    /// extended connection in a recoverable room is told `mesa:subscribed` with its
    /// position by the replica ([`Joined::deferred`]), once it knows it.
    pub fn handle_join(
        &mut self,
        now: Instant,
        conn: ConnId,
        room: &str,
    ) -> Result<Joined, RoomRefusal> {
        self.handle_subscribe(now, conn, room, serde_json::Value::Null, None)
    }

    /// [`handle_join`](Self::handle_join) for an extended client's `mesa:subscribe`
    /// with `reference` and, in a recoverable room, the position `since` it reports:
    /// there the replica replays what it missed after it, then answers
    /// (`mesa:subscribed` with its position and whether the replay is complete) as
    /// local deliveries ([`Joined::deferred`]); elsewhere the caller answers.
    pub fn handle_subscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        room: &str,
        reference: serde_json::Value,
        since: Option<Position>,
    ) -> Result<Joined, RoomRefusal> {
        let mut joined = self
            .hub
            .join(conn, room, self.config.max_rooms_per_connection)?;
        let recoverable = self.recoverable(room);
        if recoverable && joined.first_here {
            let linked = self.shards[self.shard_of(room)].is_linked();
            self.streams.open(room, linked);
        }
        if joined.first_here {
            self.subscription(room, true);
        }
        if !joined.already {
            self.room_presence(conn, [room.to_owned()], 1);
        }
        if recoverable {
            let extended = self.hub.rooms().is_extended(conn);
            let answer = extended.then_some(reference);
            self.streams.subscribe(conn, room, answer, since);
            joined.deferred = extended;
        }
        self.streams_out(now);
        self.settle(now);
        Ok(joined)
    }

    /// Take connection `conn` out of `room` (whether it was in it): the room's last
    /// member here unsubscribes the replica from its channel.
    pub fn handle_leave(&mut self, now: Instant, conn: ConnId, room: &str) -> bool {
        if self.hub.rooms().is_member(conn, room) {
            self.room_presence(conn, [room.to_owned()], -1);
            self.streams.leave(conn, room);
        }
        let left = self.hub.leave(conn, room);
        if left == Some(true) {
            self.streams.close(room);
            self.subscription(room, false);
        }
        self.settle(now);
        left.is_some()
    }

    /// Whether member `conn` of `room` hears who joins and leaves it over the
    /// cluster (`mesa:join`, `mesa:leave`); only an extended connection can. Returns
    /// whether it does now. Needs presence on (`ReplicaConfig::presence`): without
    /// it no replica counts room presence, and no change is published.
    pub fn handle_watch(&mut self, conn: ConnId, room: &str, on: bool) -> bool {
        self.hub.watch(conn, room, on)
    }

    /// Ask who is in `room` over the cluster: answered by
    /// [`ReplicaEvent::RoomMembers`] with `query` (at once, with an error, without a
    /// link to the room's instance).
    pub fn handle_room_members(&mut self, now: Instant, query: u64, room: &str) {
        let room = room.to_owned();
        let shard = self.shard_of(&room);
        if self.shards[shard].is_linked() {
            let command = Command::RoomMembers { room: room.clone() };
            self.issue(now, shard, Flight::Members { query, room }, command);
        } else {
            self.unanswered(query, room, "Redis is unreachable");
        }
        self.settle(now);
    }

    /// Send `message` to the members of `room` through the room's channel, best
    /// effort as a publish; its members here get it when it comes back (the extended
    /// ones see the room), or at once while Redis has not confirmed this replica's
    /// subscription to the room. Returns the local connections it went to at once. In
    /// a recoverable room it is appended to the room's stream, which numbers it, and
    /// every replica (this one too) delivers it from the channel.
    pub fn handle_room_send(&mut self, now: Instant, message: &Message, room: &str) -> usize {
        let message = Message {
            s: None,
            ..message.clone()
        };
        if self.recoverable(room) {
            let entry = message.to_value().to_string();
            let envelope = RoomEnvelope {
                room: room.to_owned(),
                message,
                origin: None,
                position: None,
            };
            let job = Job::StreamPublish {
                room: room.to_owned(),
                head: envelope.head(),
                entry,
            };
            self.push_job(self.shard_of(room), job);
            self.settle(now);
            return 0;
        }
        // Once Redis confirmed this replica's subscription to the room, the publish
        // comes back to it: its members get it from there, in the channel's order
        // (and the replica parses nothing it does not need). Before, they get it at
        // once, and the envelope's origin makes the replica skip it when it comes.
        let channel = self.keys.namespace().room_channel(room);
        let echoed = self.shards[self.shard_of(room)]
            .confirmed
            .contains(&channel);
        let local = if echoed {
            0
        } else {
            self.deliver_room(message.clone(), room)
        };
        let envelope = RoomEnvelope {
            room: room.to_owned(),
            message,
            origin: (!echoed).then(|| self.keys.replica().to_owned()),
            position: None,
        };
        let publish = Job::Publish {
            channel: self.keys.namespace().room_channel(room),
            payload: envelope.encode(),
        };
        self.push_job(self.shard_of(room), publish);
        self.settle(now);
        local
    }

    /// Leave the cluster: take no more work, finish what is queued, then give up the
    /// leases and this replica's presence ([`ReplicaEvent::Retired`]). Without a link
    /// there is nothing to give up: the lease expires by itself.
    pub fn handle_retire(&mut self, now: Instant) {
        self.retiring = true;
        for shard in 0..self.shards.len() {
            let link = &self.shards[shard];
            if !link.is_linked() && !link.is_retired() {
                self.retire(shard);
            }
        }
        self.settle(now);
    }

    // ----- outputs -----

    /// The next local delivery: apply its action to each target connection. A
    /// connection waiting for its stored messages
    /// (`ServerSession::awaits_undelivered`) holds its deliveries back until they came.
    pub fn poll_delivery(&mut self) -> Option<LocalDelivery> {
        self.deliveries.pop_front()
    }

    /// The next command for Redis, and the token to answer it with; the token names
    /// the instance it goes to ([`Token::shard`]).
    pub fn poll_command(&mut self) -> Option<(Token, Command)> {
        self.commands.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ReplicaEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.shards.iter().filter_map(|s| s.timers.next()).min()
    }

    // ----- transitions -----

    fn authenticated(&mut self, conn: ConnId, id: &str) {
        // The connection's rooms count for its id: another id's presence ends.
        let rooms: Vec<String> = self.hub.rooms().rooms_of(conn).map(str::to_owned).collect();
        let changed = self.hub.id_of(conn) != Some(id);
        if changed {
            self.room_presence(conn, rooms.clone(), -1);
        }
        let departure = self.hub.authenticate(conn, id);
        if changed {
            self.room_presence(conn, rooms, 1);
        }
        if self.config.presence {
            if let Some(departure) = departure.filter(|d| d.last) {
                let shard = self.shard_of(&departure.id);
                self.push_job(shard, Job::Leave(departure.id));
            }
            if self.hub.connections_of(id) == 1 && self.hub.id_of(conn) == Some(id) {
                self.push_job(self.shard_of(id), Job::Arrive(vec![id.to_owned()]));
            }
        }
        self.tell_portals(PortalEventKind::Authentication, Some(id.to_owned()));
    }

    /// Connection `conn` opted in, reporting `since`: it takes the broadcasts from
    /// the broadcast stream now, and its id's sends from its id's stream once it
    /// has an id.
    fn extended(&mut self, now: Instant, conn: ConnId, since: &Since) {
        self.hub.extend(conn);
        let Some(recovery) = &self.config.recovery else {
            return;
        };
        let (users, broadcast) = (recovery.users, recovery.broadcast);
        if users {
            self.personal.reported(conn, since.user.clone());
        }
        if broadcast {
            // A connection that heard broadcasts the legacy way before it opted in
            // would get them again from a replay: told `recovered: false` instead
            // (a position of no epoch matches none).
            let since = match since.broadcast.clone() {
                Some(_) if self.personal.took_plain_broadcasts(conn) => Some(Position {
                    epoch: String::new(),
                    offset: 0,
                }),
                since => since,
            };
            self.join_stream(now, conn, &Personal::Broadcast.stream(""), since);
        }
    }

    /// Extended connection `conn` is (now) `id`'s: it takes `id`'s sends from its
    /// stream, leaving another id's it was in.
    fn personal_stream(&mut self, now: Instant, conn: ConnId, id: &str) {
        let users = self.config.recovery.as_ref().is_some_and(|r| r.users);
        if !users || !self.hub.rooms().is_extended(conn) || id.is_empty() {
            return;
        }
        let stream = Personal::User.stream(id);
        match self.personal.stream_of(conn, Personal::User) {
            Some(old) if old == stream => return,
            Some(old) => {
                let old = old.to_owned();
                self.leave_stream(conn, &old);
            }
            None => {}
        }
        let since = self.personal.take_reported(conn);
        self.join_stream(now, conn, &stream, since);
    }

    /// Put `conn` in personal or broadcast `stream` from `since`: where the stream
    /// stands, or what it missed after `since`, is read and told (`mesa:resumed`).
    fn join_stream(&mut self, now: Instant, conn: ConnId, stream: &str, since: Option<Position>) {
        let Some(first) = self.personal.join(conn, stream) else {
            return;
        };
        if first {
            let linked = self.shards[self.shard_of(stream)].is_linked();
            self.streams.open(stream, linked);
            self.subscription(stream, true);
        }
        self.streams
            .subscribe(conn, stream, Some(serde_json::Value::Null), since);
        self.streams_out(now);
    }

    /// Ask for the stored messages of `load`, unless a complete resume of its id's
    /// stream replayed them (`complete`): then they are taken, not sent (an empty
    /// load answers the session).
    fn load_or_clear(&mut self, shard: usize, load: Job, complete: Option<bool>) {
        match load {
            Job::Load { conn, id, .. } if complete == Some(true) => {
                let clear = Job::Clear {
                    conn,
                    id: id.clone(),
                };
                self.push_job(shard, clear);
                let messages = Vec::new();
                self.events
                    .push_back(ReplicaEvent::Loaded { conn, id, messages });
            }
            load => self.push_job(shard, load),
        }
    }

    /// Take `conn` out of personal or broadcast `stream`: the stream's last member
    /// here gives up its channel.
    fn leave_stream(&mut self, conn: ConnId, stream: &str) {
        self.streams.leave(conn, stream);
        if self.personal.leave(conn, stream) == Some(true) {
            self.streams.close(stream);
            self.subscription(stream, false);
        }
    }

    /// Take out of `targets` (connections among `recipients`) those that get the
    /// send from their personal or broadcast stream; a broadcast the others get is
    /// remembered (see [`PersonalTable::broadcast_plain`]).
    fn skip_streamed(&mut self, targets: &mut Vec<ConnId>, recipients: &Recipients) {
        let kind = match recipients {
            Recipients::All => Personal::Broadcast,
            Recipients::Ids(_) => Personal::User,
        };
        targets.retain(|conn| !self.personal.takes(*conn, kind));
        if kind == Personal::Broadcast {
            for conn in targets.iter() {
                self.personal.broadcast_plain(*conn);
            }
        }
    }

    fn tell_portals(&mut self, kind: PortalEventKind, client_id: Option<String>) {
        if let Some(durable) = self.config.durable_portals {
            self.enqueued += 1;
            let partition = portal_partition(client_id.as_deref(), durable.partitions);
            let queued = QueuedPortalEvent {
                event_id: format!("{}:{}", self.keys.replica(), self.enqueued),
                event: PortalEvent {
                    kind: kind.clone(),
                    client_id: client_id.clone(),
                    portal_id: String::new(),
                },
            };
            let stream = self.keys.namespace().portal_queue(partition);
            let (maxlen, event) = (durable.maxlen, queued.fields());
            self.push_job(
                0,
                Job::Enqueue {
                    stream,
                    maxlen,
                    event,
                },
            );
        }
        if self.config.portals.is_some() {
            self.push_job(0, Job::Portal { kind, client_id });
        }
    }

    fn undecodable(&mut self, channel: &str, error: String) {
        self.events.push_back(ReplicaEvent::Undecodable {
            channel: channel.to_owned(),
            error,
        });
    }

    /// Answer a room presence query that Redis cannot answer: nobody waits forever.
    fn unanswered(&mut self, query: u64, room: String, reason: &str) {
        self.events.push_back(ReplicaEvent::RoomMembers {
            query,
            room,
            members: Err(reason.to_owned()),
        });
    }

    /// Count `conn` in (`by` 1) or out of (`by` -1) the presence of `rooms`, by its id
    /// (an unauthenticated connection has none to count), each room on its instance.
    fn room_presence(&mut self, conn: ConnId, rooms: impl IntoIterator<Item = String>, by: i64) {
        if !self.config.presence {
            return;
        }
        let Some(id) = self.hub.id_of(conn).map(str::to_owned) else {
            return;
        };
        let mut by_shard: BTreeMap<usize, Vec<(String, String, i64)>> = BTreeMap::new();
        for room in rooms {
            let entry = (room, id.clone(), by);
            by_shard
                .entry(self.shard_of(&entry.0))
                .or_default()
                .push(entry);
        }
        for (shard, entries) in by_shard {
            self.shards[shard].rooms_registered = true;
            self.push_job(shard, Job::Rooms(entries));
        }
    }

    /// A new link to `shard`, or a change of room presence that was given up: take
    /// out what Redis holds of this replica's room presence there (it may be stale,
    /// or lost), then register every membership here in that instance's rooms, by
    /// id.
    fn rooms_anew(&mut self, now: Instant, shard: usize) {
        let link = &mut self.shards[shard];
        if !self.config.presence || !link.rooms_dirty {
            return;
        }
        link.rooms_dirty = false;
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        let count = self.shards.len();
        for room in self.hub.rooms().rooms() {
            if shard_of(room, count) != shard {
                continue;
            }
            for conn in self.hub.rooms().members(room) {
                if let Some(id) = self.hub.id_of(conn) {
                    *counts.entry((room.to_owned(), id.to_owned())).or_default() += 1;
                }
            }
        }
        let entries: Vec<(String, String, i64)> = counts
            .into_iter()
            .map(|((room, id), count)| (room, id, count))
            .collect();
        let mut chunks = entries.chunks(IDS_PER_COMMAND);
        let first = chunks.next().unwrap_or_default().to_vec();
        let clear = Command::Rooms {
            clear: true,
            entries: first,
        };
        self.issue(now, shard, Flight::RoomsAnew, clear);
        for chunk in chunks {
            let add = Command::Rooms {
                clear: false,
                entries: chunk.to_vec(),
            };
            self.issue(now, shard, Flight::RoomsAnew, add);
        }
    }

    /// Ask for (or give up) a room's channel on its instance, cancelling the opposite
    /// request not asked yet. Without a link nothing is asked: the next link
    /// subscribes to every room of its instance with a member here.
    fn subscription(&mut self, room: &str, on: bool) {
        let channel = self.keys.namespace().room_channel(room);
        let shard = self.shard_of(room);
        let link = &mut self.shards[shard];
        if !link.is_linked() {
            return;
        }
        let (ask, cancel) = if on {
            (&mut link.subscribe, &mut link.unsubscribe)
        } else {
            (&mut link.unsubscribe, &mut link.subscribe)
        };
        match cancel.iter().position(|pending| *pending == channel) {
            Some(index) => drop(cancel.swap_remove(index)),
            None => ask.push(channel),
        }
    }

    /// Whether `room` keeps a stream ([`ReplicaConfig::recovery`]).
    fn recoverable(&self, room: &str) -> bool {
        self.config
            .recovery
            .as_ref()
            .is_some_and(|recovery| recovery.covers(room))
    }

    /// Carry out what the recoverable rooms decided: reads of their streams,
    /// deliveries and notices. Returns the connections forwarded to.
    fn streams_out(&mut self, now: Instant) -> usize {
        let mut local = 0;
        let outs: Vec<Out> = self.streams.drain().collect();
        for out in outs {
            match out {
                Out::Read {
                    room,
                    after,
                    reader,
                } => {
                    let Some(recovery) = &self.config.recovery else {
                        continue;
                    };
                    let keep = StreamKeep::new(recovery);
                    let shard = self.shard_of(&room);
                    if !self.shards[shard].is_linked() {
                        continue;
                    }
                    let command = Command::StreamRead {
                        room: room.clone(),
                        after,
                        keep,
                        run_id: self.shards[shard].run_id(),
                    };
                    let flight = Flight::StreamRead {
                        room,
                        after,
                        reader,
                    };
                    self.issue(now, shard, flight, command);
                }
                Out::Forward {
                    room,
                    position,
                    message,
                    targets,
                } => {
                    let deliveries = self
                        .hub
                        .rooms()
                        .deliveries_at(&message, &room, &position, targets);
                    for (action, targets) in deliveries {
                        local += targets.len();
                        self.deliveries.push_back(LocalDelivery {
                            message: message.clone(),
                            action,
                            targets,
                        });
                    }
                }
                Out::Replay {
                    conn,
                    room,
                    position,
                    message,
                } => {
                    if Action::for_message(&message) == Action::Ignore {
                        continue;
                    }
                    let action = match Action::for_message(&message) {
                        Action::Write(_) => {
                            Action::Write(room_frame(&message, &room, Some(&position)))
                        }
                        other => other,
                    };
                    self.deliveries.push_back(LocalDelivery {
                        message,
                        action,
                        targets: vec![conn],
                    });
                }
                Out::Resumed { recovered } => {
                    self.events.push_back(ReplicaEvent::Resumed { recovered });
                }
                Out::Repaired { messages } => {
                    self.events.push_back(ReplicaEvent::Repaired { messages });
                }
                Out::Skipped { messages } => {
                    self.events.push_back(ReplicaEvent::Skipped { messages });
                }
                // An old client is never told: it knows nothing of rooms.
                Out::Notice { conn, .. } if !self.hub.rooms().is_extended(conn) => {}
                Out::Notice { conn, notice } => {
                    // A resume of an id's stream decides the stored messages.
                    if let RoomNotice::Subscribed {
                        room,
                        recovered: Some(complete),
                        ..
                    } = &notice
                    {
                        let parked = (Personal::of_stream(room) == Some(Personal::User))
                            .then(|| self.personal.answered(conn, *complete))
                            .flatten();
                        if let Some((shard, load)) = parked {
                            self.load_or_clear(shard, load, Some(*complete));
                        }
                    }
                    let message = notice.to_message();
                    self.deliveries.push_back(LocalDelivery {
                        action: Action::for_message(&message),
                        message,
                        targets: vec![conn],
                    });
                }
            }
        }
        local
    }

    /// Deliver `message` to the members of `room` here; how many.
    fn deliver_room(&mut self, message: Message, room: &str) -> usize {
        let mut count = 0;
        for (action, targets) in self.hub.rooms().deliveries(&message, room) {
            count += targets.len();
            self.deliveries.push_back(LocalDelivery {
                message: message.clone(),
                action,
                targets,
            });
        }
        count
    }

    /// Tell the members of `change`'s room here that asked for presence.
    fn deliver_presence(&mut self, change: &PresenceChange) {
        if let Some((message, targets)) = self.hub.rooms().presence_delivery(change) {
            self.deliveries.push_back(LocalDelivery {
                action: Action::for_message(&message),
                message,
                targets,
            });
        }
    }

    /// Deliver to the local connections among `recipients` (but those that take it
    /// from a personal or the broadcast stream, when it was `streamed`); how many.
    fn deliver(&mut self, message: Message, recipients: &Recipients, streamed: bool) -> usize {
        let mut delivery = self.hub.send(&message, recipients);
        if streamed {
            self.skip_streamed(&mut delivery.targets, recipients);
        }
        if delivery.targets.is_empty() || delivery.action == Action::Ignore {
            return 0;
        }
        let local = delivery.targets.len();
        self.deliveries.push_back(LocalDelivery {
            message,
            action: delivery.action,
            targets: delivery.targets,
        });
        local
    }

    /// An envelope arrived for `local` connections here.
    fn received(&mut self, local: usize) {
        self.events.push_back(ReplicaEvent::Received { local });
    }

    fn lost(&mut self, count: usize, reason: Loss) {
        if count > 0 {
            self.events
                .push_back(ReplicaEvent::JobsLost { count, reason });
        }
    }

    /// Queue a job for instance `shard`, coalescing presence changes with the last
    /// queued one; refuse it when the buffer is full or the replica retires.
    fn push_job(&mut self, shard: usize, job: Job) {
        let unlinked = self.shards[shard].unlinked();
        if self.shards[shard].is_retired() || self.retiring || unlinked {
            match self.fate(shard, &job) {
                Fate::Forget => return,
                Fate::Lost(reason) if unlinked && !self.retiring => {
                    return self.lost(1, reason);
                }
                Fate::Keep if !self.retiring => {}
                _ => return self.lost(1, Loss::Abandoned),
            }
        }
        if job.counted() {
            if self.work_pending() >= self.config.max_pending {
                return self.lost(1, Loss::Full);
            }
            return self.shards[shard].jobs.push_back(job);
        }
        let presence: usize = self.shards.iter().map(Shard::presence_pending).sum();
        let link = &mut self.shards[shard];
        // Beyond the bound a presence change waits for the next renewal (a third of
        // the lease at most), which registers exactly the ids connected here, and
        // room presence anew.
        if presence >= self.config.max_pending {
            if matches!(job, Job::Rooms(_)) {
                link.rooms_dirty = true;
            }
            return;
        }
        match (link.presence.back_mut(), job) {
            (Some(Job::Arrive(ids)), Job::Arrive(more)) if ids.len() < IDS_PER_COMMAND => {
                ids.extend(more);
            }
            (Some(Job::Connections(delta)), Job::Connections(more)) => *delta += more,
            (Some(Job::Rooms(entries)), Job::Rooms(more)) if entries.len() < IDS_PER_COMMAND => {
                entries.extend(more);
            }
            (_, job) => link.presence.push_back(job),
        }
    }

    /// Queue the remote part of a send for instance `shard`; false when it was
    /// refused.
    fn push_send(&mut self, shard: usize, send: RemoteSend) -> bool {
        let unlinked = self.shards[shard].unlinked();
        if self.retiring || self.shards[shard].is_retired() {
            self.lost(1, Loss::Abandoned);
            return false;
        }
        if let (true, Fate::Lost(reason)) = (unlinked, send.fate()) {
            self.lost(1, reason);
            return false;
        }
        if self.work_pending() >= self.config.max_pending {
            self.lost(1, Loss::Full);
            return false;
        }
        self.shards[shard].rounds.push(send);
        true
    }

    /// A job's fate now: a portal event made before the link first opened waits for
    /// it (bounded by `max_pending`), as upstream's offline queue does at startup.
    /// Not a publish to clients: delivered late, it could reach a member twice,
    /// once here and once after it moved (the properties found it).
    fn fate(&self, shard: usize, job: &Job) -> Fate {
        match job {
            Job::Portal { .. } if !self.shards[shard].ever_linked => Fate::Keep,
            job => job.fate(),
        }
    }

    fn token(&mut self, shard: usize) -> Token {
        self.next_token += 1;
        Token::new(self.next_token, shard)
    }

    /// Send a command to instance `shard` and remember what it was for.
    fn issue(&mut self, now: Instant, shard: usize, flight: Flight, mut command: Command) {
        let token = self.token(shard);
        let link = &mut self.shards[shard];
        // An append names the Redis process it expects (a round's learns it here).
        if let Command::StreamPublish { run_id, .. } = &mut command {
            *run_id = link.run_id();
        }
        match &flight {
            Flight::Job(job) if job.counted() => link.jobs_in_flight += 1,
            Flight::Job(_) => link.presence_in_flight += 1,
            _ => {}
        }
        link.flights.insert(token, Sent { flight, at: now });
        self.commands.push_back((token, command));
    }

    fn connect(&mut self, now: Instant, shard: usize) {
        if !matches!(self.shards[shard].link, Link::Down) {
            return;
        }
        let token = self.token(shard);
        self.commands.push_back((token, Command::Connect));
        self.shards[shard].link = Link::Connecting {
            deadline: now + self.config.reply_timeout,
        };
    }

    /// Renew the lease on instance `shard`, with the ids of that instance connected
    /// here (the connection count goes to shard 0 only).
    fn renew(&mut self, now: Instant, shard: usize) {
        let count = self.shards.len();
        let mut ids: Vec<String> = if self.config.presence {
            self.hub
                .online_ids()
                .filter(|id| shard_of(id, count) == shard)
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        // In a stable order, so that a seeded run repeats exactly.
        ids.sort_unstable();
        let command = Command::Renew {
            lease_ms: u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX),
            connections: if shard == 0 { self.hub.len() } else { 0 },
            run_id: self.shards[shard].run_id(),
            ids,
        };
        self.issue(now, shard, Flight::Renew, command);
    }

    fn janitor(&mut self, now: Instant, shard: usize, retire: bool) {
        let command = Command::Janitor {
            retire,
            run_id: self.shards[shard].run_id(),
        };
        let flight = if retire {
            Flight::Retire
        } else {
            Flight::Janitor
        };
        self.issue(now, shard, flight, command);
    }

    /// The link to instance `shard` failed: keep what must be kept, in order, report
    /// what is lost, and reconnect after a backoff (or retire, when retiring).
    fn outage(&mut self, now: Instant, shard: usize, reason: &str) {
        if matches!(self.shards[shard].link, Link::Down | Link::Retired) {
            return;
        }
        let mut outage = 0;
        let mut kept = VecDeque::new();
        let flights = std::mem::take(&mut self.shards[shard].flights);
        for sent in flights.into_values() {
            if let Flight::Members { query, room } = sent.flight {
                self.unanswered(query, room, reason);
                continue;
            }
            if let Flight::Job(job) = sent.flight {
                match self.fate(shard, &job) {
                    Fate::Keep => kept.push_back(job),
                    Fate::Forget => {}
                    Fate::Lost(_) => outage += 1,
                }
            }
        }
        for job in std::mem::take(&mut self.shards[shard].jobs) {
            match self.fate(shard, &job) {
                Fate::Keep => kept.push_back(job),
                Fate::Forget => {}
                Fate::Lost(_) => outage += 1,
            }
        }
        let link = &mut self.shards[shard];
        link.jobs = kept;
        link.jobs_in_flight = 0;
        link.presence.clear();
        link.presence_in_flight = 0;
        let (let_go, done) = link.rounds.interrupt(|send| send.fate() == Fate::Keep);
        outage += let_go;
        link.portals_loading = false;
        link.subscribe.clear();
        link.unsubscribe.clear();
        link.confirmed.clear();
        link.asked.clear();
        for timer in [Timer::Tick, Timer::Reply, Timer::Rest] {
            link.timers.stop(timer as usize);
        }
        link.link = Link::Down;
        let count = self.shards.len();
        self.streams
            .unsubscribed(|room| shard_of(room, count) == shard);
        self.report_round(done);
        self.events.push_back(ReplicaEvent::LinkDown {
            shard,
            reason: reason.to_owned(),
        });
        self.lost(outage, Loss::Outage);
        if self.retiring {
            return self.retire(shard);
        }
        let link = &mut self.shards[shard];
        let delay = link.backoff.next_delay();
        link.timers.set(Timer::Reconnect as usize, now + delay);
    }

    /// Retire from instance `shard` at once: without a link, the lease expires by
    /// itself.
    fn retire(&mut self, shard: usize) {
        let link = &mut self.shards[shard];
        let (let_go, done) = link.rounds.interrupt(|_| false);
        let left = let_go + link.jobs.iter().filter(|j| j.counted()).count();
        link.jobs.clear();
        link.presence.clear();
        link.flights.clear();
        link.jobs_in_flight = 0;
        link.presence_in_flight = 0;
        link.timers.stop_all();
        link.link = Link::Retired;
        self.report_round(done);
        self.lost(left, Loss::Abandoned);
        self.retired();
    }

    /// Once retired from every instance, say so.
    fn retired(&mut self) {
        if self.is_retired() {
            self.events.push_back(ReplicaEvent::Retired);
        }
    }

    /// Act on the answer to one command of instance `shard`; `Err` names a command
    /// whose answer had the wrong shape.
    fn answered(
        &mut self,
        now: Instant,
        shard: usize,
        sent: Sent,
        values: Vec<RedisValue>,
    ) -> Result<(), &'static str> {
        // A round's store may have its `WAIT` besides; other commands have one call.
        let mut values = values.into_iter();
        match sent.flight {
            Flight::Job(job) => {
                let link = &mut self.shards[shard];
                if job.counted() {
                    link.jobs_in_flight -= 1;
                } else {
                    link.presence_in_flight -= 1;
                }
                if let Job::Load { conn, id, .. } = job {
                    let raw = match values.next() {
                        Some(RedisValue::Text(raw)) => raw,
                        Some(RedisValue::Nil) => String::new(),
                        _ => return Err("a load"),
                    };
                    // A connection that closed meanwhile needs nothing.
                    if self.hub.contains(conn) {
                        let (messages, entries) = loaded_messages(&raw);
                        if !entries.is_empty() {
                            self.loaded.insert(conn, entries);
                        }
                        let loaded = ReplicaEvent::Loaded { conn, id, messages };
                        self.events.push_back(loaded);
                    }
                }
            }
            Flight::Round(step) => self.shards[shard].rounds.answered(step, values.collect())?,
            Flight::Ping => {
                let latency = now.saturating_duration_since(sent.at);
                self.events.push_back(ReplicaEvent::Latency(latency));
            }
            Flight::LoadPortals => {
                self.shards[shard].portals_loading = false;
                let portals = texts(values.next()).ok_or("the portal pool")?;
                self.pool.reset(portals);
            }
            Flight::Renew | Flight::Janitor | Flight::RoomsAnew => {}
            Flight::Subscribe(channels) => {
                for (channel, ask) in channels {
                    let link = &mut self.shards[shard];
                    // A later unsubscribe (or subscribe) asked of it decides.
                    if link.asked.get(&channel) != Some(&ask) {
                        continue;
                    }
                    link.asked.remove(&channel);
                    let room = self.keys.namespace().room_of_channel(&channel);
                    if let Some(room) = room.filter(|room| self.recoverable(room)) {
                        self.streams.subscribed(room);
                    }
                    self.shards[shard].confirmed.insert(channel);
                }
                self.streams_out(now);
            }
            Flight::Unsubscribe(channels) => {
                let link = &mut self.shards[shard];
                for (channel, ask) in channels {
                    if link.asked.get(&channel) == Some(&ask) {
                        link.asked.remove(&channel);
                    }
                }
            }
            Flight::StreamRead {
                room,
                after,
                reader,
            } => {
                let history = streams::history(values.next()).ok_or("a stream's read")?;
                self.streams.answered(&room, after, reader, history);
                self.streams_out(now);
            }
            Flight::Members { query, room } => {
                let mut members = room_members(values.next()).ok_or("a room's members")?;
                members.sort_unstable();
                self.events.push_back(ReplicaEvent::RoomMembers {
                    query,
                    room,
                    members: Ok(members),
                });
            }
            Flight::Retire => {
                let link = &mut self.shards[shard];
                link.link = Link::Retired;
                link.timers.stop_all();
                self.retired();
            }
        }
        self.advance_rounds(now, shard);
        Ok(())
    }

    /// After every input: send what can be sent, and arm the reply timers.
    fn settle(&mut self, now: Instant) {
        for shard in 0..self.shards.len() {
            if self.shards[shard].is_linked() {
                self.pump(now, shard);
            }
            let link = &mut self.shards[shard];
            let deadline = match &link.link {
                Link::Connecting { deadline } => Some(*deadline),
                Link::Up { .. } => link
                    .flights
                    .values()
                    .next()
                    .map(|sent| sent.at + self.config.reply_timeout),
                Link::Down | Link::Retired => None,
            };
            match deadline {
                Some(at) => link.timers.set(Timer::Reply as usize, at),
                None => link.timers.stop(Timer::Reply as usize),
            }
        }
    }

    /// Send the queued jobs of instance `shard` (up to [`JOBS_IN_FLIGHT`]), start its
    /// next round of sends when none is in flight and no rest is due, and retire
    /// from it once everything is done.
    fn pump(&mut self, now: Instant, shard: usize) {
        let subscribe = std::mem::take(&mut self.shards[shard].subscribe);
        let unsubscribe = std::mem::take(&mut self.shards[shard].unsubscribe);
        for chunk in subscribe.chunks(CHANNELS_PER_COMMAND) {
            let asked = self.shards[shard].ask(chunk, false);
            let command = Command::Subscribe {
                channels: chunk.to_vec(),
            };
            self.issue(now, shard, Flight::Subscribe(asked), command);
        }
        for chunk in unsubscribe.chunks(CHANNELS_PER_COMMAND) {
            let asked = self.shards[shard].ask(chunk, true);
            let command = Command::Unsubscribe {
                channels: chunk.to_vec(),
            };
            self.issue(now, shard, Flight::Unsubscribe(asked), command);
        }
        loop {
            let link = &mut self.shards[shard];
            if link.jobs_in_flight + link.presence_in_flight >= JOBS_IN_FLIGHT {
                break;
            }
            let job = match link.presence.pop_front() {
                Some(job) => job,
                // A portal event waits for the pool, which the link's opening reads.
                None if link.portals_loading
                    && matches!(link.jobs.front(), Some(Job::Portal { .. })) =>
                {
                    break;
                }
                None => match link.jobs.pop_front() {
                    Some(job) => job,
                    None => break,
                },
            };
            match job {
                // The session stopped waiting: the messages stay stored.
                Job::Load { conn, until, .. } if until <= now || !self.hub.contains(conn) => {}
                Job::Clear { conn, .. } if !self.hub.contains(conn) => {
                    self.lost(1, Loss::Abandoned)
                }
                job => self.issue_job(now, shard, job),
            }
        }
        let link = &self.shards[shard];
        let resting = link.timers.get(Timer::Rest as usize).is_some();
        if !link.rounds.in_round() && !resting && !link.rounds.is_empty() {
            self.start_round(now, shard);
        }
        if self.retiring && self.shards[shard].is_idle() {
            self.janitor(now, shard, true);
        }
    }

    fn issue_job(&mut self, now: Instant, shard: usize, job: Job) {
        let ns = self.keys.namespace();
        let command = match &job {
            Job::Arrive(ids) => Command::Arrive { ids: ids.clone() },
            Job::Leave(id) => Command::Leave { id: id.clone() },
            Job::Connections(0) => return,
            Job::Connections(delta) => Command::ConnectionsDelta { delta: *delta },
            Job::Rooms(entries) => Command::Rooms {
                clear: false,
                entries: entries.clone(),
            },
            Job::Load { id, .. } => Command::Load { id: id.clone() },
            Job::Trim { id, count, last } => Command::Trim {
                id: id.clone(),
                count: *count,
                last: last.clone(),
            },
            Job::Clear { id, .. } => Command::Clear { id: id.clone() },
            Job::Publish { channel, payload } => Command::Publish {
                channel: channel.clone(),
                payload: payload.clone(),
            },
            Job::StreamPublish { room, head, entry } => {
                let Some(recovery) = &self.config.recovery else {
                    return;
                };
                Command::StreamPublish {
                    room: room.clone(),
                    head: head.clone(),
                    entry: entry.clone(),
                    keep: StreamKeep::new(recovery),
                    run_id: self.shards[shard].run_id(),
                }
            }
            Job::Enqueue {
                stream,
                maxlen,
                event,
            } => Command::Enqueue {
                stream: stream.clone(),
                maxlen: *maxlen,
                event: event.clone(),
            },
            Job::Portal { kind, client_id } => {
                // No portal known: nobody to tell.
                let Some(portal) = self.pool.pick() else {
                    return;
                };
                let event = PortalEvent {
                    kind: kind.clone(),
                    client_id: client_id.clone(),
                    portal_id: portal.to_owned(),
                };
                Command::Publish {
                    channel: ns.portal_channel(),
                    payload: event.encode(),
                }
            }
        };
        self.issue(now, shard, Flight::Job(job), command);
    }

    /// Start the next round of sends of instance `shard`.
    fn start_round(&mut self, now: Instant, shard: usize) {
        for (step, command) in self.shards[shard].rounds.start(now) {
            self.issue(now, shard, Flight::Round(step), command);
        }
        self.advance_rounds(now, shard);
    }

    /// Go on with the round in flight on instance `shard` once its phase was
    /// answered: issue the next phase, or report what the finished round did and rest
    /// before the next.
    fn advance_rounds(&mut self, now: Instant, shard: usize) {
        match self.shards[shard].rounds.advance(now) {
            Advance::Wait => {}
            Advance::Issue(commands) => {
                for (step, command) in commands {
                    self.issue(now, shard, Flight::Round(step), command);
                }
            }
            Advance::Finished(done) => {
                if done.rest > Duration::ZERO {
                    self.shards[shard]
                        .timers
                        .set(Timer::Rest as usize, now + done.rest);
                }
                self.report_round(done);
            }
        }
    }

    /// Report what (the finished part of) a round did.
    fn report_round(&mut self, done: Finished) {
        if done.stored > 0 {
            self.events.push_back(ReplicaEvent::Stored {
                stored: done.stored,
                dropped: done.dropped,
                unreplicated: done.unreplicated,
            });
        }
        for (message, ids) in done.undeliverable {
            self.events
                .push_back(ReplicaEvent::Undeliverable { message, ids });
        }
    }
}

/// The messages of a stored array (oldest first; entries that are not messages
/// skipped), and the index and text of the entry each came from.
fn loaded_messages(raw: &str) -> (Vec<Message>, Vec<(usize, String)>) {
    let mut messages = Vec::new();
    let mut entries = Vec::new();
    for (index, text) in stored_entries(raw)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let parsed = serde_json::from_str(text).ok();
        if let Some(message) = parsed.and_then(|value| Message::from_value(value).ok()) {
            messages.push(Message { s: None, ..message });
            entries.push((index, text.to_owned()));
        }
    }
    (messages, entries)
}

/// `HGETALL`'s answer of a room's members: each id with its connections.
fn room_members(value: Option<RedisValue>) -> Option<Vec<(String, u64)>> {
    let RedisValue::Array(items) = value? else {
        return None;
    };
    items
        .chunks(2)
        .map(|pair| match pair {
            [RedisValue::Text(id), RedisValue::Text(count)] => {
                Some((id.clone(), count.parse().ok()?))
            }
            _ => None,
        })
        .collect()
}

/// `SMEMBERS`'s answer.
pub(crate) fn texts(value: Option<RedisValue>) -> Option<Vec<String>> {
    match value? {
        RedisValue::Array(items) => items
            .into_iter()
            .map(|item| match item {
                RedisValue::Text(text) => Some(text),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}
