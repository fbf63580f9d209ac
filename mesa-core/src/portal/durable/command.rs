//! What a [`DurablePortal`](super::DurablePortal) asks of its link: typed commands,
//! and the exact Redis calls each one stands for.

use std::time::Duration;

use crate::cluster::Namespace;
use crate::replica::{Call, Script};

/// Where a durable portal works: its id (the consumer name and lease owner), its
/// group, and each partition's stream and lease, in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableKeys {
    id: String,
    group: String,
    streams: Vec<String>,
    leases: Vec<String>,
    dead_letters: String,
}

impl DurableKeys {
    /// The keys of portal `id` of `group` over `partitions` streams in namespace `ns`.
    pub fn new(ns: &Namespace, group: &str, id: impl Into<String>, partitions: usize) -> Self {
        DurableKeys {
            id: id.into(),
            group: group.to_owned(),
            streams: (0..partitions).map(|p| ns.portal_queue(p)).collect(),
            leases: (0..partitions).map(|p| ns.portal_lease(group, p)).collect(),
            dead_letters: ns.portal_dead_letters(),
        }
    }

    /// The consumer name, and the owner written in the leases it holds.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// `ns("portal_q:<p>")` of each partition `p`.
    pub fn streams(&self) -> &[String] {
        &self.streams
    }

    /// `ns("portal_dlq")`.
    pub fn dead_letters(&self) -> &str {
        &self.dead_letters
    }

    /// The partition whose stream is `stream`.
    pub(crate) fn partition_of(&self, stream: &str) -> Option<usize> {
        self.streams.iter().position(|s| s == stream)
    }
}

/// One piece of work for the link. Those with [`calls`](DurableCommand::calls) are
/// executed in the order they are polled, on one command connection, and answered
/// with [`DurablePortal::handle_reply`](super::DurablePortal::handle_reply): one
/// [`RedisValue`](crate::RedisValue) per call, or the error of the round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum DurableCommand {
    /// Open the link: a command connection. Answered with
    /// [`handle_link_up`](super::DurablePortal::handle_link_up), or
    /// [`handle_link_down`](super::DurablePortal::handle_link_down); it has no calls.
    Connect,
    /// Drop the link and whatever is in flight on it. Not answered; no calls.
    Disconnect,
    /// [`Script::PortalGroups`]: create the group on every stream (from the first
    /// entry), keeping one that exists.
    CreateGroups,
    /// [`Script::PortalLeases`]: take or renew every free or own partition lease for
    /// `ttl`, or give them all back (`None`). Answers one 0/1 per partition.
    Leases {
        /// The leases' time to live; `None` to give them back.
        ttl: Option<Duration>,
    },
    /// `XREADGROUP GROUP g id COUNT count STREAMS s.. > ..`: new entries of the held
    /// partitions.
    Read {
        /// Partitions to read, ascending.
        partitions: Vec<usize>,
        /// Entries at most per stream.
        count: usize,
    },
    /// [`Script::PortalReclaim`]: claim the entries of `partition` pending for at
    /// least `min_idle` (0 when taking over a partition whose lease expired),
    /// dead-lettering those delivered `max_deliveries` times.
    Reclaim {
        /// The partition.
        partition: usize,
        /// Idle time at least.
        min_idle: Duration,
        /// Scan after this entry id (exclusive); `None` from the start.
        after: Option<String>,
        /// Entries scanned at most.
        count: usize,
        /// Deliveries after which an entry is dead-lettered.
        max_deliveries: u64,
        /// Entries the dead-letter stream keeps, about.
        dead_maxlen: usize,
    },
    /// `XACK stream group ids..`: these entries were handled.
    Ack {
        /// The partition.
        partition: usize,
        /// Entry ids.
        ids: Vec<String>,
    },
    /// `XADD ns(portal_dlq) MAXLEN ~ n * stream s id i reason r fields..`, then
    /// `XACK`: an entry that cannot be read goes aside.
    DeadLetter {
        /// The partition.
        partition: usize,
        /// Its entry id.
        id: String,
        /// Its fields and values, as read.
        fields: Vec<String>,
        /// What is wrong with it.
        reason: String,
        /// Entries the dead-letter stream keeps, about.
        dead_maxlen: usize,
    },
}

fn plain(name: &'static str, args: Vec<String>) -> Call {
    Call::Plain { name, args }
}

impl DurableCommand {
    /// The Redis calls this command stands for, with every key and argument decided
    /// here (the driver adds nothing).
    pub fn calls(&self, keys: &DurableKeys) -> Vec<Call> {
        let stream = |p: &usize| keys.streams.get(*p).cloned().unwrap_or_default();
        match self {
            DurableCommand::Connect | DurableCommand::Disconnect => Vec::new(),
            DurableCommand::CreateGroups => vec![Call::Script {
                script: Script::PortalGroups,
                keys: keys.streams.clone(),
                args: vec![keys.group.clone()],
            }],
            DurableCommand::Leases { ttl } => {
                let ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1));
                vec![Call::Script {
                    script: Script::PortalLeases,
                    keys: keys.leases.clone(),
                    args: vec![keys.id.clone(), ms.to_string()],
                }]
            }
            DurableCommand::Read { partitions, count } => {
                let mut args = vec![
                    "GROUP".to_owned(),
                    keys.group.clone(),
                    keys.id.clone(),
                    "COUNT".to_owned(),
                    count.to_string(),
                    "STREAMS".to_owned(),
                ];
                args.extend(partitions.iter().map(stream));
                args.extend(partitions.iter().map(|_| ">".to_owned()));
                vec![plain("XREADGROUP", args)]
            }
            DurableCommand::Reclaim {
                partition,
                min_idle,
                after,
                count,
                max_deliveries,
                dead_maxlen,
            } => vec![Call::Script {
                script: Script::PortalReclaim,
                keys: vec![stream(partition), keys.dead_letters.clone()],
                args: vec![
                    keys.group.clone(),
                    keys.id.clone(),
                    min_idle.as_millis().to_string(),
                    count.to_string(),
                    max_deliveries.to_string(),
                    dead_maxlen.to_string(),
                    after.clone().unwrap_or_else(|| "-".to_owned()),
                ],
            }],
            DurableCommand::Ack { partition, ids } => {
                let mut args = vec![stream(partition), keys.group.clone()];
                args.extend(ids.iter().cloned());
                vec![plain("XACK", args)]
            }
            DurableCommand::DeadLetter {
                partition,
                id,
                fields,
                reason,
                dead_maxlen,
            } => {
                let mut args = vec![
                    keys.dead_letters.clone(),
                    "MAXLEN".to_owned(),
                    "~".to_owned(),
                    dead_maxlen.to_string(),
                    "*".to_owned(),
                    "stream".to_owned(),
                    stream(partition),
                    "id".to_owned(),
                    id.clone(),
                    "reason".to_owned(),
                    reason.clone(),
                ];
                // An odd list (a field without its value) is kept whole as one value.
                if fields.len() % 2 == 0 {
                    args.extend(fields.iter().cloned());
                } else {
                    args.extend(["fields".to_owned(), fields.join("\u{1f}")]);
                }
                let ack = vec![stream(partition), keys.group.clone(), id.clone()];
                vec![plain("XADD", args), plain("XACK", ack)]
            }
        }
    }
}
