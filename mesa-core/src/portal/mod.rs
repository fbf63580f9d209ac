//! A portal as a state machine: a member of a cluster's portal pool that receives
//! the client events of its servers (connections, authentications, messages,
//! disconnections), wire-compatible with `@cryb/mesa`'s `Portal`.
//!
//! A [`PortalMember`] decides everything a portal does with Redis: its id (the
//! configured one, or a UUID v4 drawn from the seed), opening the link subscribed to
//! `ns("portal")`, registering in `ns("available_portals_pool")` (`SADD`, and a
//! `{"id","ready":true}` on the same-named channel when the set did not hold it),
//! which client events to take (those addressed to it, or all with
//! `report_all_events`), noticing a dead link (a `PING` every `ping_interval`, and
//! no answer within `reply_timeout`), reconnecting with backoff and registering
//! anew (a Redis restart lost the registration), and leaving the pool once (`SREM`,
//! and a `{"id","ready":false}` when the set held it). It performs nothing: work for
//! the link leaves as typed [`PortalCommand`]s, each with a [`Token`] its reply is
//! matched by, the rest as [`PortalMemberEvent`]s.
//!
//! Every transition of the portal is in this file; the other files of the module
//! hold its data types.
//!
//! Unlike upstream's portal (ioredis resubscribes, but never registers again), ours
//! comes back to the pool after any failure of the link once it has joined. Until it
//! first joins, a failure stops it ([`PortalMemberEvent::Stopped`] with the reason):
//! whoever started it learns at once that Redis is unreachable or refused it.
//!
//! Announcements follow the set: `ready:true` only when `SADD` added the id,
//! `ready:false` only when `SREM` removed it. An upstream server appends every
//! announcement to its list (a duplicate skews its round robin) and, told of a
//! portal it does not know, removes the last one of its list instead.
//!
#![doc = include_str!("../../docs/portal-run-loop.md")]

mod command;
mod config;
pub mod durable;
mod event;
mod id;

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

pub use command::{PortalCommand, PortalKeys};
pub use config::PortalMemberConfig;
pub use event::PortalMemberEvent;

use crate::backoff::Backoff;
use crate::cluster::PortalEvent;
use crate::config::ConfigError;
use crate::replica::{RedisValue, Reply, Token};
use crate::timer::TimerTable;

#[derive(Debug, Clone, Copy)]
enum Timer {
    /// Ping the live link.
    Tick,
    /// Reopen the link.
    Reconnect,
    /// The oldest command (or the Connect) waits no longer.
    Reply,
}
const TIMERS: usize = 3;

/// The link to Redis, and where the portal stands in the pool.
#[derive(Debug)]
enum Link {
    /// No link; the Reconnect timer is armed. `reason`: why the last one failed.
    Down { reason: String },
    /// A [`PortalCommand::Connect`] is out, due by `deadline`. With `leave`, the
    /// portal was closed meanwhile: the link opens only to leave the pool.
    Connecting { deadline: Instant, leave: bool },
    /// Open; in the pool once `joined`.
    Up { joined: bool },
    /// Open, leaving the pool: done once every command is answered.
    Leaving,
    /// Stopped: nothing more is asked.
    Stopped,
}

/// A command in flight, and when it was sent.
#[derive(Debug)]
struct Sent {
    command: PortalCommand,
    at: Instant,
}

/// One portal of a cluster, as a state machine.
///
/// Methods come in three groups, as in quinn-proto: getters (`keys`, `id`,
/// `config`, `is_joined`, `is_stopped`), inputs (`handle_*`), and outputs (`poll_*`). After
/// every input drain [`poll_command`](Self::poll_command), then
/// [`poll_event`](Self::poll_event) until each gives `None`, then re-arm the timer
/// from [`poll_timeout`](Self::poll_timeout). An input yields at most one
/// [`PortalMemberEvent::Client`], so a driver that reads the subscription only when
/// its application can take one more event never has to drop one.
#[derive(Debug)]
pub struct PortalMember {
    config: PortalMemberConfig,
    keys: PortalKeys,
    backoff: Backoff,
    link: Link,
    timers: TimerTable<TIMERS>,
    next_token: u64,
    /// Joined the pool at least once: from then on failures are repaired.
    ever_joined: bool,
    /// Commands sent and not answered, oldest first (at most one of each kind).
    flights: BTreeMap<Token, Sent>,
    commands: VecDeque<(Token, PortalCommand)>,
    events: VecDeque<PortalMemberEvent>,
}

impl PortalMember {
    /// A portal starting at `now`; `seed` draws its id (unless configured) and the
    /// reconnect jitter. Its first command opens the link.
    pub fn new(config: PortalMemberConfig, seed: u64, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let id = config.id.clone().unwrap_or_else(|| id::uuid_v4(seed));
        let mut member = PortalMember {
            keys: PortalKeys::new(&config.namespace, id),
            backoff: Backoff::new(config.reconnect, seed.rotate_left(17)),
            link: Link::Down {
                reason: String::new(),
            },
            timers: TimerTable::new(),
            next_token: 0,
            ever_joined: false,
            flights: BTreeMap::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            config,
        };
        member.connect(now);
        member.settle();
        Ok(member)
    }

    // ----- getters -----

    /// Its id, pool and channel; [`PortalCommand::calls`] needs them.
    pub fn keys(&self) -> &PortalKeys {
        &self.keys
    }

    /// The id servers address this portal's events to.
    pub fn id(&self) -> &str {
        self.keys.id()
    }

    /// The settings.
    pub fn config(&self) -> &PortalMemberConfig {
        &self.config
    }

    /// Whether the portal is in the pool, on a live link.
    pub fn is_joined(&self) -> bool {
        matches!(self.link, Link::Up { joined: true })
    }

    /// Whether the portal stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self.link, Link::Stopped)
    }

    // ----- inputs -----

    /// The link opened, in answer to [`PortalCommand::Connect`]: register (or leave,
    /// when closed meanwhile). Ignored unless a Connect is out.
    pub fn handle_link_up(&mut self, now: Instant) {
        let Link::Connecting { leave, .. } = self.link else {
            return;
        };
        self.events.push_back(PortalMemberEvent::LinkUp);
        if leave {
            self.leave(now);
        } else {
            self.link = Link::Up { joined: false };
            self.issue(now, PortalCommand::Register);
            self.timers
                .set(Timer::Tick as usize, now + self.config.ping_interval);
        }
        self.settle();
    }

    /// The link failed, or a Connect could not open it: reconnect after a backoff
    /// (or stop, see [`PortalMemberEvent::Stopped`]). Ignored when there is no link.
    pub fn handle_link_down(&mut self, now: Instant, reason: &str) {
        self.fail(now, reason);
        self.settle();
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
                if let Err(what) = self.answered(now, &sent.command, values.first()) {
                    self.fail(now, &format!("unexpected reply to {what}"));
                }
            }
        }
        self.settle();
    }

    /// A message arrived on the subscription: a client event, taken when it is
    /// addressed to this portal (or with `report_all_events`), reported when it
    /// cannot be read. Ignored unless the link is up and the portal is not leaving
    /// (a message of a link already dropped, or one the closed application would
    /// never read).
    ///
    /// It takes `now` as every input does; no timer depends on a message.
    pub fn handle_pubsub(&mut self, _now: Instant, channel: &str, payload: &[u8]) {
        if !matches!(self.link, Link::Up { .. }) {
            return;
        }
        let decoded = if channel != self.keys.channel() {
            Err("not the portal channel".to_owned())
        } else {
            std::str::from_utf8(payload)
                .map_err(|error| error.to_string())
                .and_then(|text| PortalEvent::decode(text).map_err(|error| error.to_string()))
        };
        match decoded {
            Ok(event) if self.config.report_all_events || event.portal_id == self.keys.id() => {
                self.events.push_back(PortalMemberEvent::Client(event));
            }
            // Addressed to another portal of the pool.
            Ok(_) => {}
            Err(error) => self.events.push_back(PortalMemberEvent::Undecodable {
                channel: channel.to_owned(),
                error,
            }),
        }
    }

    /// Fire every timer that is due at `now`: give up on a command Redis did not
    /// answer in time, reopen the link, ping the live link. Calling early or twice
    /// does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.expire(Timer::Reply as usize, now) {
            self.fail(now, "Redis did not answer in time");
        }
        if self.timers.expire(Timer::Reconnect as usize, now) {
            self.connect(now);
        }
        if self.timers.expire(Timer::Tick as usize, now) && matches!(self.link, Link::Up { .. }) {
            // One ping at a time: an unanswered one fails the link at its deadline.
            if !self.in_flight(&PortalCommand::Ping) {
                self.issue(now, PortalCommand::Ping);
            }
            self.timers
                .set(Timer::Tick as usize, now + self.config.ping_interval);
        }
        self.settle();
    }

    /// Leave the pool and stop ([`PortalMemberEvent::Stopped`] once it is done).
    /// Without a link it stops at once, failing with why the link is down: nothing
    /// could be left. A second call does nothing.
    pub fn handle_close(&mut self, now: Instant) {
        match &mut self.link {
            Link::Up { .. } => self.leave(now),
            Link::Connecting { leave, .. } => *leave = true,
            Link::Down { reason } => {
                let reason = std::mem::take(reason);
                self.stop(Err(reason));
            }
            Link::Leaving | Link::Stopped => {}
        }
        self.settle();
    }

    // ----- outputs -----

    /// The next command for the link, and the token to answer it with.
    pub fn poll_command(&mut self) -> Option<(Token, PortalCommand)> {
        self.commands.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PortalMemberEvent> {
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
        command: &PortalCommand,
        first: Option<&RedisValue>,
    ) -> Result<(), &'static str> {
        match (command, first) {
            // Any answer proves the subscription alive (in subscribed mode it is an
            // array, not `PONG`).
            (PortalCommand::Ping, _) => {}
            // Added: announce it, even when leaving since (the `ready:false` that
            // follows must reach servers that know the portal).
            (PortalCommand::Register, Some(RedisValue::Int(1))) => {
                self.issue(now, PortalCommand::Announce { ready: true });
            }
            (PortalCommand::Register, Some(RedisValue::Int(0)))
            | (PortalCommand::Announce { ready: true }, Some(RedisValue::Int(_))) => {
                self.joined();
            }
            (PortalCommand::Leave, Some(RedisValue::Int(1))) => {
                self.issue(now, PortalCommand::Announce { ready: false });
            }
            (PortalCommand::Leave, Some(RedisValue::Int(0)))
            | (PortalCommand::Announce { ready: false }, Some(RedisValue::Int(_))) => {}
            (PortalCommand::Register, _) => return Err("SADD"),
            (PortalCommand::Leave, _) => return Err("SREM"),
            _ => return Err("PUBLISH"),
        }
        if matches!(self.link, Link::Leaving) && self.flights.is_empty() {
            self.stop(Ok(()));
        }
        Ok(())
    }

    /// Registered (and announced when new): in the pool, unless leaving since.
    fn joined(&mut self) {
        if let Link::Up { joined } = &mut self.link {
            *joined = true;
            self.ever_joined = true;
            self.backoff.reset();
            self.events.push_back(PortalMemberEvent::Joined);
        }
    }

    /// Open a link, unless one is open or opening.
    fn connect(&mut self, now: Instant) {
        if !matches!(self.link, Link::Down { .. }) {
            return;
        }
        let channel = self.keys.channel().to_owned();
        self.push_command(PortalCommand::Connect { channel });
        self.link = Link::Connecting {
            deadline: now + self.config.reply_timeout,
            leave: false,
        };
    }

    /// Leave the pool: no more pings, and the SREM goes after whatever is in flight
    /// (a registration included, so that Redis runs it last).
    fn leave(&mut self, now: Instant) {
        self.link = Link::Leaving;
        self.timers.stop(Timer::Tick as usize);
        self.issue(now, PortalCommand::Leave);
    }

    /// The link failed: drop it, and reconnect after a backoff, or stop when the
    /// portal was leaving or never joined.
    fn fail(&mut self, now: Instant, reason: &str) {
        if matches!(self.link, Link::Down { .. } | Link::Stopped) {
            return;
        }
        let leaving = matches!(
            self.link,
            Link::Leaving | Link::Connecting { leave: true, .. }
        );
        self.events.push_back(PortalMemberEvent::LinkDown {
            reason: reason.to_owned(),
        });
        if leaving || !self.ever_joined {
            return self.stop(Err(reason.to_owned()));
        }
        self.push_command(PortalCommand::Disconnect);
        self.flights.clear();
        self.timers.stop_all();
        self.link = Link::Down {
            reason: reason.to_owned(),
        };
        let delay = self.backoff.next_delay();
        self.timers.set(Timer::Reconnect as usize, now + delay);
    }

    /// Stop for good: drop the link, if any, and say how it ended.
    fn stop(&mut self, outcome: Result<(), String>) {
        if !matches!(self.link, Link::Down { .. }) {
            self.push_command(PortalCommand::Disconnect);
        }
        self.flights.clear();
        self.timers.stop_all();
        self.link = Link::Stopped;
        self.events
            .push_back(PortalMemberEvent::Stopped { outcome });
    }

    /// After every input: arm the reply timer for the Connect out, or for the oldest
    /// command in flight.
    fn settle(&mut self) {
        let deadline = match &self.link {
            Link::Connecting { deadline, .. } => Some(*deadline),
            Link::Up { .. } | Link::Leaving => self
                .flights
                .values()
                .next()
                .map(|sent| sent.at + self.config.reply_timeout),
            Link::Down { .. } | Link::Stopped => None,
        };
        match deadline {
            Some(at) => self.timers.set(Timer::Reply as usize, at),
            None => self.timers.stop(Timer::Reply as usize),
        }
    }

    fn in_flight(&self, command: &PortalCommand) -> bool {
        self.flights.values().any(|sent| sent.command == *command)
    }

    /// Send a command Redis answers, and remember it.
    fn issue(&mut self, now: Instant, command: PortalCommand) {
        let token = self.push_command(command.clone());
        self.flights.insert(token, Sent { command, at: now });
    }

    fn push_command(&mut self, command: PortalCommand) -> Token {
        self.next_token += 1;
        let token = Token(self.next_token);
        self.commands.push_back((token, command));
        token
    }
}
