//! A durable portal as a state machine: a consumer of the durable portal streams
//! that servers with [`DurablePortals`](crate::replica::DurablePortals) on append
//! every client event to, handling each at least once.
//!
//! A [`DurablePortal`] decides everything such a portal does with Redis:
//! - the consumer group (`XGROUP CREATE .. 0 MKSTREAM` on each partition's stream,
//!   an existing group kept), its consumer name (the portal id);
//! - which partitions it reads: one lease per partition,
//!   `ns("portal_lease:<group>:<p>")`, taken when free and renewed every `tick`,
//!   living `visibility_timeout`. Only the lease holder reads a partition, so the
//!   events of one client (one partition) are handed out in stream order by one
//!   portal at a time. A portal takes every free partition: a second portal of the
//!   group is a hot standby until partitions free up;
//! - reading (`XREADGROUP ..  >`, polled every `poll_interval` when idle, at once
//!   while entries keep coming), bounded by `max_outstanding` events handed out and
//!   not settled;
//! - acknowledging (`XACK`, batched) what the application settled as handled;
//! - taking over: a partition whose lease it just took is first swept with min-idle
//!   0 (the events its dead holder never acknowledged come back, before any new
//!   one), then read; every `tick` the held partitions are swept for events pending
//!   longer than `visibility_timeout` (a failed handler's, a slow one's);
//! - poison: a sweep moves an event delivered `max_deliveries` times to the
//!   dead-letter stream `ns("portal_dlq")` and acknowledges it; an entry that cannot
//!   be read at all goes there at once. Nothing unreadable stops the portal.
//!
//! It performs nothing: work leaves as typed [`DurableCommand`]s, each with a
//! [`Token`] its reply is matched by, the rest as [`DurablePortalEvent`]s.
//!
//! # Guarantees
//!
//! - At least once: an event leaves its stream's pending list only when the
//!   application settled it as handled, or in the dead-letter stream. A portal
//!   killed mid-way leaves its events pending; the portal that takes its partition
//!   (within `visibility_timeout` plus `tick` of its last renewal) gets them back
//!   first. Duplicates are bounded by what was handed out and not yet acknowledged
//!   (`max_outstanding`, plus the acknowledgements in flight).
//! - Order per client: events of one partition are handed out in stream order,
//!   those reclaimed from a dead holder before new ones. A failed event is delivered
//!   again after `visibility_timeout`, after the events behind it; events handed to
//!   an old holder that lost its lease (it stalled for longer than the lease) may be
//!   handled at the same time as the new holder's.
//! - Duplicates carry the same `event_id`; an event id acknowledged lately
//!   (`dedupe_window`) is acknowledged again without handing it out.
//!
//! Every transition of the portal is in this file; the other files of the module
//! hold its data types.

mod command;
mod config;
mod event;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

pub use command::{DurableCommand, DurableKeys};
pub use config::DurablePortalConfig;
pub use event::{DurableDelivery, DurablePortalEvent};

use crate::backoff::Backoff;
use crate::cluster::QueuedPortalEvent;
use crate::config::ConfigError;
use crate::replica::{RedisValue, Reply, Token};
use crate::timer::TimerTable;

use super::id;

#[derive(Debug, Clone, Copy)]
enum Timer {
    /// Renew the leases, sweep the held partitions.
    Tick,
    /// Read again (after a read that found less than a batch).
    Poll,
    /// Reopen the link.
    Reconnect,
    /// The oldest command (or the Connect) waits no longer.
    Reply,
}
const TIMERS: usize = 4;

/// Acknowledgements per `XACK` at most.
const ACKS_PER_COMMAND: usize = 1000;

/// The link to Redis.
#[derive(Debug)]
enum Link {
    /// No link; the Reconnect timer is armed. `reason`: why the last one failed.
    Down { reason: String },
    /// A [`DurableCommand::Connect`] is out, due by `deadline`. With `leave`, the
    /// portal was closed meanwhile.
    Connecting { deadline: Instant, leave: bool },
    /// Open; the group exists once `ready`.
    Up { ready: bool },
    /// Open, acknowledging what is settled and giving the leases back: done once
    /// every command is answered.
    Leaving,
    /// Stopped: nothing more is asked.
    Stopped,
}

/// Where the portal stands with one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    /// Another portal's, or nobody's.
    Free,
    /// Just taken: sweeping what its last holder left (after this entry id) before
    /// reading.
    TakingOver { after: Option<String> },
    /// Held and read.
    Reading,
}

/// One partition.
#[derive(Debug, Clone)]
struct Partition {
    hold: Hold,
    /// A sweep for overdue events is due, going on after this entry id.
    sweep: Option<Option<String>>,
    /// A reclaim of it is in flight.
    reclaiming: bool,
}

/// A command in flight, and when it was sent.
#[derive(Debug)]
struct Sent {
    command: DurableCommand,
    at: Instant,
}

/// One durable portal, as a state machine.
///
/// Methods come in three groups, as in quinn-proto: getters (`keys`, `id`,
/// `config`, `held`, `outstanding`, `is_ready`, `is_stopped`), inputs (`handle_*`),
/// and outputs (`poll_*`). After every input drain
/// [`poll_command`](Self::poll_command), then [`poll_event`](Self::poll_event)
/// until each gives `None`, then re-arm the timer from
/// [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct DurablePortal {
    config: DurablePortalConfig,
    keys: DurableKeys,
    backoff: Backoff,
    link: Link,
    timers: TimerTable<TIMERS>,
    next_token: u64,
    /// Ready at least once: from then on failures are repaired.
    ever_ready: bool,
    partitions: Vec<Partition>,
    flights: BTreeMap<Token, Sent>,
    /// Handed out and not settled: (partition, entry id) → event id.
    outstanding: HashMap<(usize, String), String>,
    /// Settled as handled, not yet acknowledged, per partition.
    acks: BTreeMap<usize, Vec<String>>,
    /// Event ids acknowledged lately, oldest first (at most `dedupe_window`).
    done: VecDeque<String>,
    done_set: HashSet<String>,
    commands: VecDeque<(Token, DurableCommand)>,
    events: VecDeque<DurablePortalEvent>,
}

impl DurablePortal {
    /// A portal starting at `now`; `seed` draws its id (unless configured) and the
    /// reconnect jitter. Its first command opens the link.
    pub fn new(config: DurablePortalConfig, seed: u64, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let id = config.id.clone().unwrap_or_else(|| id::uuid_v4(seed));
        let keys = DurableKeys::new(&config.namespace, &config.group, id, config.partitions);
        let partition = Partition {
            hold: Hold::Free,
            sweep: None,
            reclaiming: false,
        };
        let mut portal = DurablePortal {
            keys,
            backoff: Backoff::new(config.reconnect, seed.rotate_left(17)),
            link: Link::Down {
                reason: String::new(),
            },
            timers: TimerTable::new(),
            next_token: 0,
            ever_ready: false,
            partitions: vec![partition; config.partitions],
            flights: BTreeMap::new(),
            outstanding: HashMap::new(),
            acks: BTreeMap::new(),
            done: VecDeque::new(),
            done_set: HashSet::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            config,
        };
        portal.connect(now);
        portal.settle(now);
        Ok(portal)
    }

    // ----- getters -----

    /// Its id, group, streams and leases; [`DurableCommand::calls`] needs them.
    pub fn keys(&self) -> &DurableKeys {
        &self.keys
    }

    /// The consumer name.
    pub fn id(&self) -> &str {
        self.keys.id()
    }

    /// The settings.
    pub fn config(&self) -> &DurablePortalConfig {
        &self.config
    }

    /// The partitions it holds now, ascending.
    pub fn held(&self) -> Vec<usize> {
        (0..self.partitions.len())
            .filter(|p| self.partitions[*p].hold != Hold::Free)
            .collect()
    }

    /// Events handed out and not settled.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether the group exists and the link is up.
    pub fn is_ready(&self) -> bool {
        matches!(self.link, Link::Up { ready: true })
    }

    /// Whether the portal stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self.link, Link::Stopped)
    }

    // ----- inputs -----

    /// The link opened, in answer to [`DurableCommand::Connect`]: create the group
    /// (or stop, when closed meanwhile). Ignored unless a Connect is out.
    pub fn handle_link_up(&mut self, now: Instant) {
        let Link::Connecting { leave, .. } = self.link else {
            return;
        };
        self.events.push_back(DurablePortalEvent::LinkUp);
        if leave {
            self.link = Link::Leaving;
        } else {
            self.link = Link::Up { ready: false };
            self.issue(now, DurableCommand::CreateGroups);
        }
        self.settle(now);
    }

    /// The link failed, or a Connect could not open it: reconnect after a backoff
    /// (or stop, see [`DurablePortalEvent::Stopped`]).
    pub fn handle_link_down(&mut self, now: Instant, reason: &str) {
        self.fail(now, reason);
        self.settle(now);
    }

    /// Redis answered the command of `token`. An error fails the link, as does an
    /// answer of the wrong shape; an answer to a command of a failed link is ignored.
    pub fn handle_reply(&mut self, now: Instant, token: Token, reply: Reply) {
        let Some(sent) = self.flights.remove(&token) else {
            return;
        };
        match reply {
            Err(error) => self.fail(now, &format!("Redis: {error}")),
            Ok(values) => {
                if let Err(what) = self.answered(now, sent.command, values) {
                    self.fail(now, &format!("unexpected reply to {what}"));
                }
            }
        }
        self.settle(now);
    }

    /// The application settled the event of `entry_id` in `partition`: handled
    /// (`ok`: it is acknowledged), or its handler failed (it stays pending, and is
    /// delivered again after the visibility timeout, or dead-lettered). Returns
    /// false, doing nothing, for an event not outstanding (settled already, or never
    /// handed out).
    pub fn handle_settled(
        &mut self,
        now: Instant,
        partition: usize,
        entry_id: &str,
        ok: bool,
    ) -> bool {
        let Some(event_id) = self.outstanding.remove(&(partition, entry_id.to_owned())) else {
            return false;
        };
        if ok {
            self.acks
                .entry(partition)
                .or_default()
                .push(entry_id.to_owned());
            self.remember(event_id);
        }
        self.settle(now);
        true
    }

    /// Fire every timer that is due at `now`: give up on a command Redis did not
    /// answer in time, reopen the link, renew the leases and sweep, read again.
    /// Calling early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.expire(Timer::Reply as usize, now) {
            self.fail(now, "Redis did not answer in time");
        }
        if self.timers.expire(Timer::Reconnect as usize, now) {
            self.connect(now);
        }
        // An expired poll lets the next settle read.
        self.timers.expire(Timer::Poll as usize, now);
        if self.timers.expire(Timer::Tick as usize, now) && self.is_ready() {
            self.timers
                .set(Timer::Tick as usize, now + self.config.tick);
            self.renew(now);
            for partition in &mut self.partitions {
                if partition.hold == Hold::Reading && partition.sweep.is_none() {
                    partition.sweep = Some(None);
                }
            }
        }
        self.settle(now);
    }

    /// Acknowledge what is settled, give the leases back and stop
    /// ([`DurablePortalEvent::Stopped`] once it is done). Events handed out and not
    /// settled by then stay pending, for the next holder of their partition. Without
    /// a link it stops at once, failing with why the link is down. A second call
    /// does nothing.
    pub fn handle_close(&mut self, now: Instant) {
        match &mut self.link {
            Link::Up { .. } => {
                self.link = Link::Leaving;
                self.timers.stop(Timer::Tick as usize);
                self.timers.stop(Timer::Poll as usize);
                self.flush_acks(now);
                self.issue(now, DurableCommand::Leases { ttl: None });
            }
            Link::Connecting { leave, .. } => *leave = true,
            Link::Down { reason } => {
                let reason = std::mem::take(reason);
                self.stop(Err(reason));
            }
            Link::Leaving | Link::Stopped => {}
        }
        self.settle(now);
    }

    // ----- outputs -----

    /// The next command for the link, and the token to answer it with.
    pub fn poll_command(&mut self) -> Option<(Token, DurableCommand)> {
        self.commands.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DurablePortalEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ----- transitions -----

    /// Act on the answer to one command; `Err` names a command whose answer had the
    /// wrong shape.
    fn answered(
        &mut self,
        now: Instant,
        command: DurableCommand,
        values: Vec<RedisValue>,
    ) -> Result<(), &'static str> {
        let mut values = values.into_iter();
        match command {
            DurableCommand::CreateGroups => {
                if !matches!(values.next(), Some(RedisValue::Int(_))) {
                    return Err("XGROUP CREATE");
                }
                if let Link::Up { ready } = &mut self.link {
                    *ready = true;
                    self.ever_ready = true;
                    self.backoff.reset();
                    self.events.push_back(DurablePortalEvent::Ready);
                    self.renew(now);
                    self.timers
                        .set(Timer::Tick as usize, now + self.config.tick);
                }
            }
            DurableCommand::Leases { ttl: Some(_) } => {
                let held = ints(values.next()).ok_or("the leases")?;
                if held.len() != self.partitions.len() {
                    return Err("the leases");
                }
                self.leases(&held);
            }
            DurableCommand::Leases { ttl: None } | DurableCommand::Ack { .. } => {}
            DurableCommand::DeadLetter { .. } => {}
            DurableCommand::Read { count, .. } => {
                let read = self.read(now, values.next()).ok_or("XREADGROUP")?;
                if read < count && self.is_ready() {
                    self.timers
                        .set(Timer::Poll as usize, now + self.config.poll_interval);
                }
            }
            DurableCommand::Reclaim {
                partition,
                min_idle,
                count,
                ..
            } => {
                self.partitions[partition].reclaiming = false;
                let (scanned, last) = self
                    .reclaimed(now, partition, values.next())
                    .ok_or("a reclaim")?;
                let part = &mut self.partitions[partition];
                // A full scan goes on after its last entry; else it is done.
                let more = (scanned >= count).then_some(last);
                match (&part.hold, min_idle.is_zero()) {
                    (Hold::TakingOver { .. }, true) => {
                        part.hold = match more {
                            Some(after) => Hold::TakingOver { after: Some(after) },
                            None => Hold::Reading,
                        };
                    }
                    (Hold::Reading, false) => part.sweep = more.map(Some),
                    _ => {}
                }
            }
            DurableCommand::Connect | DurableCommand::Disconnect => {}
        }
        Ok(())
    }

    /// The leases' answer: take over partitions newly held, drop those lost.
    fn leases(&mut self, held: &[i64]) {
        let mut changed = false;
        for (partition, holds) in self.partitions.iter_mut().zip(held) {
            match (*holds == 1, &partition.hold) {
                (true, Hold::Free) => {
                    partition.hold = Hold::TakingOver { after: None };
                    changed = true;
                }
                (false, Hold::TakingOver { .. } | Hold::Reading) => {
                    partition.hold = Hold::Free;
                    partition.sweep = None;
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            let held = self.held();
            self.events
                .push_back(DurablePortalEvent::Partitions { held });
        }
    }

    /// Hand out the entries of `XREADGROUP`'s answer; how many there were.
    fn read(&mut self, now: Instant, value: Option<RedisValue>) -> Option<usize> {
        let streams = match value? {
            RedisValue::Nil => return Some(0),
            RedisValue::Array(streams) => streams,
            _ => return None,
        };
        let mut read = 0;
        for stream in streams {
            let RedisValue::Array(pair) = stream else {
                return None;
            };
            let [RedisValue::Text(name), RedisValue::Array(entries)] =
                <[_; 2]>::try_from(pair).ok()?
            else {
                return None;
            };
            let partition = self.keys.partition_of(&name)?;
            for entry in entries {
                read += 1;
                self.entry(now, partition, entry, 1);
            }
        }
        Some(read)
    }

    /// Act on a reclaim's answer; `Some((scanned, last id scanned))`.
    fn reclaimed(
        &mut self,
        now: Instant,
        partition: usize,
        value: Option<RedisValue>,
    ) -> Option<(usize, String)> {
        let RedisValue::Array(items) = value? else {
            return None;
        };
        let [scanned, dead, lost, last, claimed, delivered] = <[_; 6]>::try_from(items).ok()?;
        let (RedisValue::Int(scanned), RedisValue::Int(dead), RedisValue::Int(lost)) =
            (scanned, dead, lost)
        else {
            return None;
        };
        let last = match last {
            RedisValue::Text(last) => last,
            _ => String::new(),
        };
        let claimed = match claimed {
            RedisValue::Array(claimed) => claimed,
            _ => Vec::new(),
        };
        let delivered = ints(Some(delivered)).unwrap_or_default();
        if dead > 0 {
            let reason = format!("delivered {} times", self.config.max_deliveries);
            self.events.push_back(DurablePortalEvent::DeadLettered {
                partition,
                count: dead as usize,
                reason,
            });
        }
        if lost > 0 {
            self.events.push_back(DurablePortalEvent::Lost {
                partition,
                count: lost as usize,
            });
        }
        for (index, entry) in claimed.into_iter().enumerate() {
            let deliveries = delivered.get(index).copied().unwrap_or(1).max(1) as u64;
            self.entry(now, partition, entry, deliveries);
        }
        Some((scanned.max(0) as usize, last))
    }

    /// One stream entry, `[id, [field, value, ..]]`: hand it out, acknowledge it as
    /// a duplicate, or dead-letter it when it cannot be read.
    fn entry(&mut self, now: Instant, partition: usize, entry: RedisValue, deliveries: u64) {
        let (id, fields) = match entry {
            RedisValue::Array(parts) => match <[_; 2]>::try_from(parts) {
                Ok([RedisValue::Text(id), RedisValue::Array(fields)]) => {
                    let fields: Option<Vec<String>> = fields
                        .into_iter()
                        .map(|f| match f {
                            RedisValue::Text(text) => Some(text),
                            _ => None,
                        })
                        .collect();
                    (id, fields)
                }
                Ok([RedisValue::Text(id), _]) => (id, None),
                _ => return self.unreadable(now, partition, None, Vec::new(), "not an entry"),
            },
            _ => return self.unreadable(now, partition, None, Vec::new(), "not an entry"),
        };
        let key = (partition, id);
        if self.outstanding.contains_key(&key) {
            return;
        }
        let (_, id) = key;
        let Some(fields) = fields else {
            return self.unreadable(now, partition, Some(id), Vec::new(), "fields are not text");
        };
        match QueuedPortalEvent::decode(&fields) {
            Err(reason) => self.unreadable(now, partition, Some(id), fields, &reason),
            Ok(queued) if self.done_set.contains(&queued.event_id) => {
                self.acks.entry(partition).or_default().push(id);
                let event_id = queued.event_id;
                self.events
                    .push_back(DurablePortalEvent::Duplicate { event_id });
            }
            Ok(QueuedPortalEvent {
                event_id,
                mut event,
            }) => {
                event.portal_id = self.keys.id().to_owned();
                self.outstanding
                    .insert((partition, id.clone()), event_id.clone());
                self.events
                    .push_back(DurablePortalEvent::Delivery(DurableDelivery {
                        partition,
                        entry_id: id,
                        event_id,
                        event,
                        deliveries,
                    }));
            }
        }
    }

    /// An entry that cannot be read: to the dead-letter stream (when its id is
    /// known: without one, nothing can acknowledge it, and it is only reported).
    fn unreadable(
        &mut self,
        now: Instant,
        partition: usize,
        id: Option<String>,
        fields: Vec<String>,
        why: &str,
    ) {
        self.events.push_back(DurablePortalEvent::DeadLettered {
            partition,
            count: 1,
            reason: why.to_owned(),
        });
        if let Some(id) = id {
            let command = DurableCommand::DeadLetter {
                partition,
                id,
                fields,
                reason: why.to_owned(),
                dead_maxlen: self.config.dead_letter_maxlen,
            };
            self.issue(now, command);
        }
    }

    /// Remember an acknowledged event id (at most `dedupe_window`).
    fn remember(&mut self, event_id: String) {
        if self.done_set.insert(event_id.clone()) {
            self.done.push_back(event_id);
            if self.done.len() > self.config.dedupe_window {
                if let Some(old) = self.done.pop_front() {
                    self.done_set.remove(&old);
                }
            }
        }
    }

    /// Renew the leases (one renewal at a time).
    fn renew(&mut self, now: Instant) {
        if !self.in_flight(|c| matches!(c, DurableCommand::Leases { .. })) {
            let ttl = Some(self.config.visibility_timeout);
            self.issue(now, DurableCommand::Leases { ttl });
        }
    }

    /// Acknowledge what is settled: one `XACK` per partition, unless one is in
    /// flight (they batch meanwhile).
    fn flush_acks(&mut self, now: Instant) {
        if self.in_flight(|c| matches!(c, DurableCommand::Ack { .. })) {
            return;
        }
        for (partition, mut ids) in std::mem::take(&mut self.acks) {
            while !ids.is_empty() {
                let rest = ids.split_off(ids.len().min(ACKS_PER_COMMAND));
                self.issue(now, DurableCommand::Ack { partition, ids });
                ids = rest;
            }
        }
    }

    /// Events the reads and reclaims in flight may still hand out, at most.
    fn incoming(&self) -> usize {
        self.flights
            .values()
            .map(|sent| match &sent.command {
                DurableCommand::Read { partitions, count } => partitions.len() * count,
                DurableCommand::Reclaim { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    /// Events that may still be handed out: `max_outstanding` less those handed out
    /// and those the commands in flight may bring.
    fn room(&self) -> usize {
        self.config
            .max_outstanding
            .saturating_sub(self.outstanding.len() + self.incoming())
    }

    /// Whether there is room for `more` events.
    fn room_for(&self, more: usize) -> bool {
        more <= self.room()
    }

    /// With the group ready: acknowledge, take over, sweep and read what is due.
    fn pump(&mut self, now: Instant) {
        match self.link {
            Link::Up { ready: true } => {}
            Link::Leaving => return self.flush_acks(now),
            _ => return,
        }
        self.flush_acks(now);
        let batch = self.config.batch;
        for partition in 0..self.partitions.len() {
            if !self.room_for(batch) {
                break;
            }
            let part = &self.partitions[partition];
            if part.reclaiming {
                continue;
            }
            let (min_idle, after) = match (&part.hold, &part.sweep) {
                (Hold::TakingOver { after }, _) => (Duration::ZERO, after.clone()),
                (Hold::Reading, Some(after)) => (self.config.visibility_timeout, after.clone()),
                _ => continue,
            };
            let part = &mut self.partitions[partition];
            part.reclaiming = true;
            part.sweep = None;
            let command = DurableCommand::Reclaim {
                partition,
                min_idle,
                after,
                count: batch,
                max_deliveries: self.config.max_deliveries,
                dead_maxlen: self.config.dead_letter_maxlen,
            };
            self.issue(now, command);
        }
        let reading: Vec<usize> = (0..self.partitions.len())
            .filter(|p| self.partitions[*p].hold == Hold::Reading)
            .collect();
        let idle = self.timers.get(Timer::Poll as usize).is_some();
        if reading.is_empty()
            || idle
            || self.in_flight(|c| matches!(c, DurableCommand::Read { .. }))
        {
            return;
        }
        // Each partition read may answer `count` entries: all of them fit.
        let count = batch.min(self.room() / reading.len());
        if count == 0 {
            return;
        }
        let command = DurableCommand::Read {
            partitions: reading,
            count,
        };
        self.issue(now, command);
    }

    /// Open a link, unless one is open or opening.
    fn connect(&mut self, now: Instant) {
        if !matches!(self.link, Link::Down { .. }) {
            return;
        }
        self.push_command(DurableCommand::Connect);
        self.link = Link::Connecting {
            deadline: now + self.config.reply_timeout,
            leave: false,
        };
    }

    /// The link failed: drop it (partitions are held no more; acknowledgements in
    /// flight are sent again), and reconnect after a backoff, or stop when the
    /// portal was leaving or never ready.
    fn fail(&mut self, now: Instant, reason: &str) {
        if matches!(self.link, Link::Down { .. } | Link::Stopped) {
            return;
        }
        let leaving = matches!(
            self.link,
            Link::Leaving | Link::Connecting { leave: true, .. }
        );
        self.events.push_back(DurablePortalEvent::LinkDown {
            reason: reason.to_owned(),
        });
        if leaving || !self.ever_ready {
            return self.stop(Err(reason.to_owned()));
        }
        self.push_command(DurableCommand::Disconnect);
        self.drop_flights();
        self.timers.stop_all();
        self.link = Link::Down {
            reason: reason.to_owned(),
        };
        let delay = self.backoff.next_delay();
        self.timers.set(Timer::Reconnect as usize, now + delay);
    }

    /// Forget the commands in flight, keeping their acknowledgements for the next
    /// link, and every partition (the leases are taken anew).
    fn drop_flights(&mut self) {
        for sent in std::mem::take(&mut self.flights).into_values() {
            if let DurableCommand::Ack { partition, ids } = sent.command {
                self.acks.entry(partition).or_default().extend(ids);
            }
        }
        let was_holding = !self.held().is_empty();
        for partition in &mut self.partitions {
            *partition = Partition {
                hold: Hold::Free,
                sweep: None,
                reclaiming: false,
            };
        }
        if was_holding {
            self.events
                .push_back(DurablePortalEvent::Partitions { held: Vec::new() });
        }
    }

    /// Stop for good: drop the link, if any, and say how it ended.
    fn stop(&mut self, outcome: Result<(), String>) {
        if !matches!(self.link, Link::Down { .. }) {
            self.push_command(DurableCommand::Disconnect);
        }
        self.drop_flights();
        self.timers.stop_all();
        self.link = Link::Stopped;
        self.events
            .push_back(DurablePortalEvent::Stopped { outcome });
    }

    /// After every input: send what is due, and arm the reply timer for the Connect
    /// out, or for the oldest command in flight.
    fn settle(&mut self, now: Instant) {
        self.pump(now);
        if matches!(self.link, Link::Leaving) && self.flights.is_empty() {
            self.stop(Ok(()));
        }
        let deadline = match &self.link {
            Link::Connecting { deadline, .. } => Some(*deadline),
            Link::Up { .. } | Link::Leaving => self
                .flights
                .values()
                .map(|sent| sent.at)
                .min()
                .map(|at| at + self.config.reply_timeout),
            Link::Down { .. } | Link::Stopped => None,
        };
        match deadline {
            Some(at) => self.timers.set(Timer::Reply as usize, at),
            None => self.timers.stop(Timer::Reply as usize),
        }
    }

    fn in_flight(&self, matches: impl Fn(&DurableCommand) -> bool) -> bool {
        self.flights.values().any(|sent| matches(&sent.command))
    }

    /// Send a command Redis answers, and remember it.
    fn issue(&mut self, now: Instant, command: DurableCommand) {
        let token = self.push_command(command.clone());
        self.flights.insert(token, Sent { command, at: now });
    }

    fn push_command(&mut self, command: DurableCommand) -> Token {
        self.next_token += 1;
        let token = Token(self.next_token);
        self.commands.push_back((token, command));
        token
    }
}

/// An array of integers.
fn ints(value: Option<RedisValue>) -> Option<Vec<i64>> {
    match value? {
        RedisValue::Array(items) => items
            .into_iter()
            .map(|item| match item {
                RedisValue::Int(n) => Some(n),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}
