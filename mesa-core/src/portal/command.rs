//! What a [`PortalMember`](super::PortalMember) asks of its link: typed commands,
//! and the exact Redis calls each one stands for.

use crate::cluster::{Namespace, PortalUpdate};
use crate::replica::Call;

/// Where a portal is registered: its id, the pool (a set, and the channel of its
/// updates) and the channel of client events, in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalKeys {
    id: String,
    pool: String,
    channel: String,
}

impl PortalKeys {
    /// The keys of portal `id` in namespace `ns`.
    pub fn new(ns: &Namespace, id: impl Into<String>) -> Self {
        PortalKeys {
            id: id.into(),
            pool: ns.available_portals_pool(),
            channel: ns.portal_channel(),
        }
    }

    /// The id servers address this portal's events to.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `ns("available_portals_pool")`: the set of portal ids, and the channel of
    /// their [`PortalUpdate`]s.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// `ns("portal")`: the channel servers publish client events on.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

/// One piece of work for the link. Those with [`calls`](PortalCommand::calls) are
/// executed in the order they are polled, on one command connection (so Redis runs
/// them in that order), and answered with
/// [`PortalMember::handle_reply`](super::PortalMember::handle_reply): one
/// [`RedisValue`](crate::RedisValue) per call, or the error of the round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum PortalCommand {
    /// Open the link: a command connection, and a subscription to `channel` (made
    /// before anything is registered, so no event addressed to the portal is
    /// published before it listens). Answered with
    /// [`handle_link_up`](super::PortalMember::handle_link_up), or
    /// [`handle_link_down`](super::PortalMember::handle_link_down) when it fails; it
    /// has no calls.
    Connect {
        /// `ns("portal")`.
        channel: String,
    },
    /// Drop the link and whatever is in flight on it, a `Connect` under way
    /// included. Not answered; it has no calls.
    Disconnect,
    /// `PING` on the subscription connection (not the command connection): any
    /// answer proves the subscription alive.
    Ping,
    /// `SADD ns(available_portals_pool) id`: join the pool. Answers 1 when the set did
    /// not hold the id (it is then announced), 0 when it did.
    Register,
    /// `PUBLISH ns(available_portals_pool) {"id","ready"}`: tell the servers that
    /// the portal joined (`ready`) or left the pool.
    Announce {
        /// Joined, or left.
        ready: bool,
    },
    /// `SREM ns(available_portals_pool) id`: leave the pool. Answers 1 when the set
    /// held the id (its leaving is then announced), 0 when it did not.
    Leave,
}

impl PortalCommand {
    /// The Redis calls this command stands for, with every key and argument decided
    /// here (the driver adds nothing).
    pub fn calls(&self, keys: &PortalKeys) -> Vec<Call> {
        let (name, args) = match self {
            PortalCommand::Connect { .. } | PortalCommand::Disconnect => return Vec::new(),
            PortalCommand::Ping => ("PING", Vec::new()),
            PortalCommand::Register => ("SADD", vec![keys.pool.clone(), keys.id.clone()]),
            PortalCommand::Announce { ready } => {
                let update = PortalUpdate {
                    id: keys.id.clone(),
                    ready: *ready,
                };
                ("PUBLISH", vec![keys.pool.clone(), update.encode()])
            }
            PortalCommand::Leave => ("SREM", vec![keys.pool.clone(), keys.id.clone()]),
        };
        vec![Call::Plain { name, args }]
    }
}
