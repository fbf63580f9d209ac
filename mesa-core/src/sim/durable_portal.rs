//! A rig that plays the driver and a small model of Redis streams against one
//! [`DurablePortal`], for the property tests and the fuzz target: entries appended
//! (readable or not), partitions leased by another portal or freed, the link
//! opening or failing, Redis answering the oldest command rightly, wrongly, with an
//! error, or running it and losing the answer, the application settling events, time passing, closing.
//!
//! Invariants checked after every step (a panic names the broken one): an entry is
//! never handed out while it is still outstanding; only entries the application
//! settled as handled are acknowledged; reads name only held partitions; one read
//! and one lease renewal in flight at most; outstanding events stay within
//! `max_outstanding` plus one batch per partition; nothing is asked after
//! `Stopped`, which is said once. [`heal`](DurableRig::heal) then lets everything
//! work and checks that nothing was lost: every readable entry ends acknowledged,
//! every unreadable one dead-lettered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::cluster::{Namespace, PortalEvent, PortalEventKind, QueuedPortalEvent};
use crate::portal::durable::{
    DurableCommand, DurablePortal, DurablePortalConfig, DurablePortalEvent,
};
use crate::replica::{RedisValue, Reply, Token};

pub use super::portal::Answer;

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A server appends an entry to `partition` (mod the partitions), readable or not.
    Append {
        /// The partition.
        partition: u8,
        /// A well-formed event, or junk fields.
        readable: bool,
    },
    /// Another portal takes the lease of `partition` (when free).
    Steal {
        /// The partition.
        partition: u8,
    },
    /// Every lease of another portal expires.
    FreeLeases,
    /// The pending Connect succeeds.
    LinkUp,
    /// The link fails.
    LinkDown,
    /// The oldest command in flight is answered.
    Answer(Answer),
    /// The application settles the `index`th outstanding event (mod their number).
    Settle {
        /// Which.
        index: u16,
        /// Handled, or failed.
        ok: bool,
    },
    /// Time passes.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
    /// The application closes the portal.
    Close,
}

/// A stream entry of the model: its id and its fields and values.
type Entry = (String, Vec<String>);

/// Partitions of the rig's portal.
const PARTITIONS: usize = 4;

/// The portal, the driver's view of its link, and the model of Redis.
#[derive(Debug)]
pub struct DurableRig {
    portal: DurablePortal,
    now: Instant,
    connecting: bool,
    in_flight: VecDeque<(Token, DurableCommand)>,
    /// Per partition: every entry, and how many the group delivered.
    streams: Vec<(Vec<Entry>, usize)>,
    /// Pending entries: (partition, id) → deliveries.
    pending: BTreeMap<(usize, String), u64>,
    /// Lease holders: `Some(true)` this portal, `Some(false)` another.
    leases: Vec<Option<bool>>,
    acked: BTreeSet<(usize, String)>,
    dead: BTreeSet<(usize, String)>,
    /// Handed to the application and not settled.
    outstanding: Vec<(usize, String)>,
    settled_ok: BTreeSet<(usize, String)>,
    stopped: Option<Result<(), String>>,
    next_entry: u64,
}

impl DurableRig {
    /// A portal of seed `seed` starting at `now`, with short timings.
    pub fn new(seed: u64, now: Instant) -> Self {
        let config = DurablePortalConfig {
            namespace: Namespace::default(),
            id: Some("me".into()),
            partitions: PARTITIONS,
            batch: 3,
            max_outstanding: 6,
            visibility_timeout: Duration::from_millis(1000),
            tick: Duration::from_millis(200),
            reply_timeout: Duration::from_millis(300),
            max_deliveries: 3,
            dedupe_window: 4,
            ..DurablePortalConfig::default()
        };
        let portal = DurablePortal::new(config, seed, now).expect("a valid config");
        let mut rig = DurableRig {
            portal,
            now,
            connecting: false,
            in_flight: VecDeque::new(),
            streams: vec![(Vec::new(), 0); PARTITIONS],
            pending: BTreeMap::new(),
            leases: vec![None; PARTITIONS],
            acked: BTreeSet::new(),
            dead: BTreeSet::new(),
            outstanding: Vec::new(),
            settled_ok: BTreeSet::new(),
            stopped: None,
            next_entry: 0,
        };
        rig.drain();
        rig
    }

    /// How the portal stopped, if it did.
    pub fn stopped(&self) -> Option<&Result<(), String>> {
        self.stopped.as_ref()
    }

    /// Play one step, then check the invariants.
    pub fn step(&mut self, step: Step) {
        match step {
            Step::Append {
                partition,
                readable,
            } => {
                self.next_entry += 1;
                let fields = if readable {
                    QueuedPortalEvent {
                        event_id: format!("e{}", self.next_entry),
                        event: PortalEvent {
                            kind: PortalEventKind::Connection,
                            client_id: None,
                            portal_id: String::new(),
                        },
                    }
                    .fields()
                } else {
                    vec!["junk".into()]
                };
                let id = format!("{}-0", self.next_entry);
                self.streams[usize::from(partition) % PARTITIONS]
                    .0
                    .push((id, fields));
            }
            Step::Steal { partition } => {
                let lease = &mut self.leases[usize::from(partition) % PARTITIONS];
                if lease.is_none() {
                    *lease = Some(false);
                }
            }
            Step::FreeLeases => {
                for lease in &mut self.leases {
                    if *lease == Some(false) {
                        *lease = None;
                    }
                }
            }
            Step::LinkUp if self.connecting => {
                self.connecting = false;
                self.portal.handle_link_up(self.now);
            }
            Step::LinkUp => {}
            Step::LinkDown => self.portal.handle_link_down(self.now, "cut"),
            Step::Answer(how) => self.answer(how),
            Step::Settle { index, ok } if !self.outstanding.is_empty() => {
                let entry = self
                    .outstanding
                    .remove(usize::from(index) % self.outstanding.len());
                if ok {
                    self.settled_ok.insert(entry.clone());
                }
                assert!(
                    self.portal.handle_settled(self.now, entry.0, &entry.1, ok),
                    "an outstanding event settles"
                );
            }
            Step::Settle { .. } => {}
            Step::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.portal.handle_timeout(self.now);
            }
            Step::Close => self.portal.handle_close(self.now),
        }
        self.drain();
    }

    /// Let everything work for a while (the other portal dies, Redis answers,
    /// the application handles every event), then check that nothing was lost.
    /// Skipped for a closed portal.
    pub fn heal(&mut self) {
        for _ in 0..200 {
            if self.stopped.is_some() {
                return;
            }
            self.step(Step::FreeLeases);
            self.step(Step::LinkUp);
            while !self.in_flight.is_empty() {
                self.step(Step::Answer(Answer::Right));
            }
            while !self.outstanding.is_empty() {
                self.step(Step::Settle { index: 0, ok: true });
            }
            while !self.in_flight.is_empty() {
                self.step(Step::Answer(Answer::Right));
            }
            let all_done = self.streams.iter().enumerate().all(|(p, (entries, _))| {
                entries.iter().all(|(id, _)| {
                    let key = (p, id.clone());
                    self.acked.contains(&key) || self.dead.contains(&key)
                })
            });
            if all_done {
                for (p, (entries, _)) in self.streams.iter().enumerate() {
                    for (id, fields) in entries {
                        let key = (p, id.clone());
                        // A readable entry may have failed too often: dead-lettered.
                        if QueuedPortalEvent::decode(fields).is_err() {
                            assert!(!self.acked.contains(&key), "{key:?} acknowledged");
                        }
                    }
                }
                return;
            }
            self.step(Step::Advance { ms: 250 });
        }
        panic!(
            "entries neither acknowledged nor dead-lettered after healing: pending {:?}",
            self.pending
        );
    }

    fn answer(&mut self, how: Answer) {
        let Some((token, command)) = self.in_flight.pop_front() else {
            return;
        };
        let reply: Reply = match how {
            Answer::Lost => {
                self.execute(&command);
                return;
            }
            Answer::Error => Err("ERR injected".into()),
            Answer::Wrong => Ok(vec![RedisValue::Text("?".into())]),
            Answer::Right => Ok(self.execute(&command)),
        };
        self.portal.handle_reply(self.now, token, reply);
    }

    /// Run a command on the model.
    fn execute(&mut self, command: &DurableCommand) -> Vec<RedisValue> {
        let entry = |id: &str, fields: &[String]| {
            RedisValue::Array(vec![
                RedisValue::Text(id.to_owned()),
                RedisValue::Array(fields.iter().cloned().map(RedisValue::Text).collect()),
            ])
        };
        match command {
            DurableCommand::Connect | DurableCommand::Disconnect => Vec::new(),
            DurableCommand::CreateGroups => vec![RedisValue::Int(PARTITIONS as i64)],
            DurableCommand::Leases { ttl } => {
                let held = self
                    .leases
                    .iter_mut()
                    .map(|lease| {
                        let mine = match (ttl, *lease) {
                            (None, Some(true)) => {
                                *lease = None;
                                false
                            }
                            (Some(_), None | Some(true)) => {
                                *lease = Some(true);
                                true
                            }
                            _ => false,
                        };
                        RedisValue::Int(i64::from(mine))
                    })
                    .collect();
                vec![RedisValue::Array(held)]
            }
            DurableCommand::Read { partitions, count } => {
                let mut streams = Vec::new();
                for &p in partitions {
                    let (entries, delivered) = &mut self.streams[p];
                    let new: Vec<_> = entries.iter().skip(*delivered).take(*count).collect();
                    *delivered += new.len();
                    if new.is_empty() {
                        continue;
                    }
                    let name = self.portal.keys().streams()[p].clone();
                    let mut items = Vec::new();
                    for (id, fields) in new {
                        self.pending.insert((p, id.clone()), 1);
                        items.push(entry(id, fields));
                    }
                    streams.push(RedisValue::Array(vec![
                        RedisValue::Text(name),
                        RedisValue::Array(items),
                    ]));
                }
                if streams.is_empty() {
                    vec![RedisValue::Nil]
                } else {
                    vec![RedisValue::Array(streams)]
                }
            }
            DurableCommand::Reclaim {
                partition,
                after,
                count,
                max_deliveries,
                ..
            } => {
                // Idle times are not modelled: every pending entry counts as idle.
                let scan: Vec<(String, u64)> = self
                    .pending
                    .iter()
                    .filter(|((p, id), _)| {
                        *p == *partition && after.as_ref().is_none_or(|a| later(id, a))
                    })
                    .take(*count)
                    .map(|((_, id), d)| (id.clone(), *d))
                    .collect();
                let (mut dead, mut claimed, mut counts) = (0, Vec::new(), Vec::new());
                for (id, deliveries) in &scan {
                    let key = (*partition, id.clone());
                    if deliveries >= max_deliveries {
                        self.pending.remove(&key);
                        self.dead.insert(key);
                        dead += 1;
                    } else {
                        self.pending.insert(key, deliveries + 1);
                        let fields = &self.streams[*partition]
                            .0
                            .iter()
                            .find(|(e, _)| e == id)
                            .expect("a pending entry exists")
                            .1;
                        claimed.push(entry(id, fields));
                        counts.push(RedisValue::Int(*deliveries as i64 + 1));
                    }
                }
                let last = scan.last().map(|(id, _)| id.clone()).unwrap_or_default();
                vec![RedisValue::Array(vec![
                    RedisValue::Int(scan.len() as i64),
                    RedisValue::Int(dead),
                    RedisValue::Int(0),
                    RedisValue::Text(last),
                    RedisValue::Array(claimed),
                    RedisValue::Array(counts),
                ])]
            }
            DurableCommand::Ack { partition, ids } => {
                for id in ids {
                    let key = (*partition, id.clone());
                    assert!(
                        self.settled_ok.contains(&key),
                        "{key:?} acknowledged without being handled"
                    );
                    self.pending.remove(&key);
                    self.acked.insert(key);
                }
                vec![RedisValue::Int(ids.len() as i64)]
            }
            DurableCommand::DeadLetter { partition, id, .. } => {
                let key = (*partition, id.clone());
                self.pending.remove(&key);
                self.dead.insert(key);
                vec![RedisValue::Text("1-0".into()), RedisValue::Int(1)]
            }
        }
    }

    /// Execute the portal's outputs, checking the invariants.
    fn drain(&mut self) {
        while let Some((token, command)) = self.portal.poll_command() {
            assert!(self.stopped.is_none(), "{command:?} asked after Stopped");
            match &command {
                DurableCommand::Connect => self.connecting = true,
                DurableCommand::Disconnect => {
                    self.connecting = false;
                    self.in_flight.clear();
                }
                DurableCommand::Read { partitions, .. } => {
                    let held = self.portal.held();
                    assert!(
                        partitions.iter().all(|p| held.contains(p)),
                        "reads a partition not held"
                    );
                    self.in_flight.push_back((token, command));
                }
                _ => self.in_flight.push_back((token, command)),
            }
        }
        let reads = self
            .in_flight
            .iter()
            .filter(|(_, c)| matches!(c, DurableCommand::Read { .. }))
            .count();
        let leases = self
            .in_flight
            .iter()
            .filter(|(_, c)| matches!(c, DurableCommand::Leases { ttl: Some(_) }))
            .count();
        assert!(
            reads <= 1 && leases <= 1,
            "{reads} reads, {leases} renewals in flight"
        );
        while let Some(event) = self.portal.poll_event() {
            match event {
                DurablePortalEvent::Delivery(delivery) => {
                    let key = (delivery.partition, delivery.entry_id);
                    assert!(!self.outstanding.contains(&key), "{key:?} handed out twice");
                    self.outstanding.push(key);
                }
                DurablePortalEvent::Stopped { outcome } => {
                    assert!(self.stopped.is_none(), "Stopped twice");
                    self.stopped = Some(outcome);
                }
                _ => {}
            }
        }
        // What the reads and reclaims in flight may bring counts against the bound
        // before they are made.
        assert!(
            self.portal.outstanding() <= self.portal.config().max_outstanding,
            "outstanding beyond its bound"
        );
        assert_eq!(self.portal.outstanding(), self.outstanding.len());
    }
}

/// Whether entry id `id` comes after `after` (ids are `<n>-0`).
fn later(id: &str, after: &str) -> bool {
    let n = |id: &str| {
        id.split('-')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    n(id) > n(after)
}
