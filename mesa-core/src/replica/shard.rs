//! What a [`Replica`](super::Replica) keeps per Redis instance (shard): the link,
//! its timers, and the work waiting for that instance. Only data: the transitions
//! are the replica's.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::backoff::Backoff;
use crate::timer::TimerTable;

use super::command::Token;
use super::job::Job;
use super::rounds::{Rounds, Step};

#[derive(Debug, Clone, Copy)]
pub(super) enum Timer {
    /// Ping, renew the lease and run the janitor (every third of the lease).
    Tick,
    /// Reopen the link.
    Reconnect,
    /// The oldest command (or the Connect) waits no longer.
    Reply,
    /// The next round of sends may start (after a full round, see [`Round::rest`](crate::Round::rest)).
    Rest,
}
pub(super) const TIMERS: usize = 4;

/// The link to one Redis instance.
#[derive(Debug)]
pub(super) enum Link {
    /// No link; the Reconnect timer is armed.
    Down,
    /// A [`Command::Connect`](super::Command::Connect) is out, due by then.
    Connecting { deadline: Instant },
    /// Open to the Redis process with this run id.
    Up { run_id: String },
    /// Retired: nothing more is asked of this instance.
    Retired,
}

/// What a command in flight was for.
#[derive(Debug)]
pub(super) enum Flight {
    /// A job other than a send.
    Job(Job),
    /// A command of the round of sends in flight.
    Round(Step),
    Ping,
    LoadPortals,
    /// A `SUBSCRIBE` of room channels, each with the number it was asked under.
    Subscribe(Vec<(String, u64)>),
    /// An `UNSUBSCRIBE` of room channels, each with the number it was asked under.
    Unsubscribe(Vec<(String, u64)>),
    /// A read of a recoverable room's stream after `after`, for `reader`.
    StreamRead {
        room: String,
        after: Option<u64>,
        reader: super::streams::Reader,
    },
    /// This replica's presence in rooms registered anew (a new link).
    RoomsAnew,
    /// Who is in a room, for query `query`.
    Members {
        query: u64,
        room: String,
    },
    Renew,
    Janitor,
    /// The janitor that retires this replica from the instance.
    Retire,
}

/// A command in flight.
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) flight: Flight,
    pub(super) at: Instant,
}

/// One Redis instance as a replica sees it. Every key and channel of an id or a room
/// lives on the instance [`shard_of`](crate::cluster::shard_of) names; the global
/// ones (`ws`, portals, the connection counter) on shard 0. Each instance has its
/// own lease, presence and janitor, so a failure of one link costs only the work of
/// that instance.
#[derive(Debug)]
pub(super) struct Shard {
    pub(super) backoff: Backoff,
    pub(super) link: Link,
    pub(super) timers: TimerTable<TIMERS>,
    /// The link was up once: before, portal events wait for it.
    pub(super) ever_linked: bool,
    /// The portal pool is being read: portal events wait for it (shard 0).
    pub(super) portals_loading: bool,
    /// Room channels to subscribe to and to unsubscribe from, not yet asked (never
    /// the same channel in both).
    pub(super) subscribe: Vec<String>,
    pub(super) unsubscribe: Vec<String>,
    /// Room channels whose subscription Redis confirmed on this link, with no
    /// unsubscribe asked since: what this replica publishes there comes back to it.
    pub(super) confirmed: HashSet<String>,
    /// Per room channel, the number of the last `SUBSCRIBE` or `UNSUBSCRIBE` asked
    /// of it on this link (until that one is answered): an answer counts only for
    /// the last one asked.
    pub(super) asked: HashMap<String, u64>,
    /// Subscribes and unsubscribes asked on this link.
    pub(super) asks: u64,
    /// Room presence must be registered anew: it was registered on an earlier link
    /// (what Redis holds may be stale), or a change of it was given up (the buffer
    /// was full). A server without rooms asks nothing of the kind.
    pub(super) rooms_dirty: bool,
    /// Room presence was ever registered here.
    pub(super) rooms_registered: bool,
    /// Remote sends not yet done, and the round in flight.
    pub(super) rounds: Rounds,
    /// Other jobs not yet sent, oldest first.
    pub(super) jobs: VecDeque<Job>,
    /// Presence changes not yet sent, oldest first (sent before the other jobs, so
    /// that an id arrives before its connection loads its stored messages).
    pub(super) presence: VecDeque<Job>,
    /// Commands sent and not answered, oldest first.
    pub(super) flights: BTreeMap<Token, Sent>,
    /// Jobs among `flights`: presence changes, and the others.
    pub(super) presence_in_flight: usize,
    pub(super) jobs_in_flight: usize,
}

impl Shard {
    pub(super) fn new(backoff: Backoff, rounds: Rounds) -> Self {
        Shard {
            backoff,
            link: Link::Down,
            timers: TimerTable::new(),
            ever_linked: false,
            portals_loading: false,
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            confirmed: HashSet::new(),
            asked: HashMap::new(),
            asks: 0,
            rooms_dirty: false,
            rooms_registered: false,
            rounds,
            jobs: VecDeque::new(),
            presence: VecDeque::new(),
            flights: BTreeMap::new(),
            presence_in_flight: 0,
            jobs_in_flight: 0,
        }
    }

    pub(super) fn is_linked(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    pub(super) fn is_retired(&self) -> bool {
        matches!(self.link, Link::Retired)
    }

    /// Whether the link is down or reopening.
    pub(super) fn unlinked(&self) -> bool {
        matches!(self.link, Link::Down | Link::Connecting { .. })
    }

    /// The jobs `max_pending` bounds, besides presence changes.
    pub(super) fn work_pending(&self) -> usize {
        self.rounds.len() + self.jobs.len() + self.jobs_in_flight
    }

    /// Presence changes queued or in flight.
    pub(super) fn presence_pending(&self) -> usize {
        self.presence.len() + self.presence_in_flight
    }

    /// Nothing queued or in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.rounds.is_empty()
            && self.jobs.is_empty()
            && self.presence.is_empty()
            && self.flights.is_empty()
    }

    /// Number a `SUBSCRIBE` (or, `off`, an `UNSUBSCRIBE`) of `channels` about to be
    /// asked: each channel with its number. An unsubscribe ends a confirmation at
    /// once (what is published now may no longer come back).
    pub(super) fn ask(&mut self, channels: &[String], off: bool) -> Vec<(String, u64)> {
        channels
            .iter()
            .map(|channel| {
                self.asks += 1;
                self.asked.insert(channel.clone(), self.asks);
                if off {
                    self.confirmed.remove(channel);
                }
                (channel.clone(), self.asks)
            })
            .collect()
    }

    /// The run id of the Redis process of the link ("" without one).
    pub(super) fn run_id(&self) -> String {
        match &self.link {
            Link::Up { run_id } => run_id.clone(),
            _ => String::new(),
        }
    }
}
