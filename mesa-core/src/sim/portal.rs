//! One [`PortalMember`] driven against the model of Redis through a link that fails
//! at will, its invariants checked after every step: the rig shared by the property
//! tests and the `portal` fuzz target, which only choose the steps.
//!
//! The rig plays the driver: a `Connect` opens the link when a step says so,
//! commands run on the model in the order they were sent (the command connection)
//! and a `PING` apart (the subscription), each answered rightly, wrongly, with an
//! error, or lost (Redis ran it, the answer never came).
//!
//! Checked after every step (a broken invariant panics with what broke):
//! - tokens are unique; nothing but `Connect` and `Disconnect` is asked without a
//!   link, and nothing at all once stopped; at most one `PING` is out;
//! - a client event is addressed to the portal (unless `report_all_events`), and
//!   arrives only while it is in or joining the pool;
//! - an announcement follows the set: `ready:true` right after an `SADD` that added
//!   the id, `ready:false` right after an `SREM` that removed it;
//! - `Joined` means Redis holds the id; the portal leaves (`SREM`) at most once and
//!   says `Stopped` exactly once, `Ok` only when Redis no longer holds the id;
//! - after a failure, the next attempt is due within the backoff's cap;
//! - `handle_timeout` at the deadline leaves the next deadline later, and called
//!   twice does nothing more.
//!
//! [`PortalRig::heal`] then lets the link work: a portal that was not closed is back
//! in the pool, and one that was has stopped.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::redis::RedisModel;
use crate::cluster::{PortalEvent, PortalEventKind};
use crate::portal::{PortalCommand, PortalMember, PortalMemberConfig, PortalMemberEvent};
use crate::replica::{RedisValue, Reply, Token};

/// How Redis answers a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// What the model answers (it runs the command).
    Right,
    /// A value of the wrong shape (the command does not run).
    Wrong,
    /// An error reply (the command does not run).
    Error,
    /// The model runs the command; its answer never comes.
    Lost,
}

/// One step of the rig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The `Connect` out opens the link; with `restarted`, Redis restarted first and
    /// lost every key.
    LinkUp {
        /// Redis lost every key.
        restarted: bool,
    },
    /// The driver notices the link failed.
    LinkDown,
    /// Redis answers the oldest command out (the `PING`, with `ping`).
    Answer {
        /// Answer the `PING` instead of the oldest command.
        ping: bool,
        /// How.
        how: Answer,
    },
    /// An answer to a token nobody waits for.
    Stale {
        /// The token.
        token: u64,
    },
    /// A server publishes a client event, addressed to this portal or another.
    Event {
        /// Addressed to this portal.
        to_me: bool,
    },
    /// Bytes arrive on the portal channel, or on another one.
    Garbage {
        /// On another channel.
        elsewhere: bool,
        /// The payload.
        bytes: Vec<u8>,
    },
    /// Time passes; timers due by then fire.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
    /// The application closes the portal.
    Close,
}

/// A portal, the model of Redis and the link between them.
#[derive(Debug)]
pub struct PortalRig {
    member: PortalMember,
    redis: RedisModel,
    now: Instant,
    tokens: BTreeSet<Token>,
    /// A `Connect` is out.
    connecting: bool,
    linked: bool,
    /// Commands out on the command connection, oldest first, and the `PING`.
    commands: Vec<(Token, PortalCommand)>,
    ping: Option<Token>,
    /// Commands whose answers were lost: the portal still waits for them.
    lost: BTreeSet<Token>,
    /// The set change the last answer made (`SADD` added: true, `SREM` removed: false).
    changed: Option<bool>,
    closed: bool,
    leaves: usize,
    stopped: Option<Result<(), String>>,
    /// Client events the portal took.
    pub taken: usize,
}

impl PortalRig {
    /// A portal with seed `seed` starting at `now`, in the pool once its first link
    /// worked.
    pub fn new(report_all_events: bool, seed: u64, now: Instant) -> Self {
        let config = PortalMemberConfig {
            report_all_events,
            ..PortalMemberConfig::default()
        };
        let mut rig = PortalRig {
            member: PortalMember::new(config, seed, now).expect("the defaults are valid"),
            redis: RedisModel::new(),
            now,
            tokens: BTreeSet::new(),
            connecting: false,
            linked: false,
            commands: Vec::new(),
            ping: None,
            lost: BTreeSet::new(),
            changed: None,
            closed: false,
            leaves: 0,
            stopped: None,
            taken: 0,
        };
        rig.drain();
        rig.heal();
        assert!(rig.member.is_joined(), "the first link works");
        rig
    }

    /// The portal.
    pub fn member(&self) -> &PortalMember {
        &self.member
    }

    /// Whether Redis holds the portal's id in the pool.
    pub fn registered(&self) -> bool {
        let keys = self.member.keys();
        self.redis.is_member(keys.pool(), keys.id())
    }

    /// How the portal stopped, once it has.
    pub fn stopped(&self) -> Option<&Result<(), String>> {
        self.stopped.as_ref()
    }

    /// Apply one step, then check the invariants.
    pub fn step(&mut self, step: Step) {
        let now = self.now;
        match step {
            Step::LinkUp { restarted } => {
                if self.connecting {
                    if restarted {
                        self.redis.restart(false);
                    }
                    self.connecting = false;
                    self.linked = true;
                    self.member.handle_link_up(now);
                }
            }
            Step::LinkDown => self.member.handle_link_down(now, "rigged"),
            Step::Answer { ping, how } => self.answer(ping, how),
            Step::Stale { token } => {
                let token = Token(token);
                let out = self.ping == Some(token)
                    || self.lost.contains(&token)
                    || self.commands.iter().any(|(t, _)| *t == token);
                if !out {
                    let before = self.member.poll_timeout();
                    self.member
                        .handle_reply(now, token, Ok(vec![RedisValue::Nil]));
                    assert_eq!(
                        self.member.poll_timeout(),
                        before,
                        "a stale answer did something"
                    );
                }
            }
            Step::Event { to_me } => {
                let portal_id = if to_me {
                    self.member.id().to_owned()
                } else {
                    "another portal".to_owned()
                };
                let event = PortalEvent {
                    kind: PortalEventKind::Connection,
                    client_id: None,
                    portal_id,
                };
                let channel = self.member.keys().channel().to_owned();
                self.member
                    .handle_pubsub(now, &channel, event.encode().as_bytes());
            }
            Step::Garbage { elsewhere, bytes } => {
                let channel = if elsewhere {
                    "elsewhere".to_owned()
                } else {
                    self.member.keys().channel().to_owned()
                };
                self.member.handle_pubsub(now, &channel, &bytes);
            }
            Step::Advance { ms } => return self.advance(Duration::from_millis(u64::from(ms))),
            Step::Close => {
                self.closed = true;
                self.member.handle_close(now);
            }
        }
        self.drain();
    }

    /// Let the link work (it opens, Redis answers everything rightly, time runs to
    /// each deadline) until the portal is back in the pool, or has stopped once
    /// closed; then check that it is, or did.
    pub fn heal(&mut self) {
        for _ in 0..64 {
            let done = if self.closed {
                self.stopped.is_some()
            } else {
                self.member.is_joined()
            };
            if done {
                break;
            }
            if self.connecting {
                self.step(Step::LinkUp { restarted: false });
            } else if !self.commands.is_empty() || self.ping.is_some() {
                let ping = self.commands.is_empty();
                self.step(Step::Answer {
                    ping,
                    how: Answer::Right,
                });
            } else {
                let due = self
                    .member
                    .poll_timeout()
                    .expect("a portal waits for something");
                self.advance(due.saturating_duration_since(self.now));
            }
        }
        if self.closed {
            assert!(self.stopped.is_some(), "closed, yet it did not stop");
        } else {
            assert!(self.member.is_joined(), "not back in the pool");
            assert!(self.registered(), "joined, but Redis does not hold the id");
        }
    }

    fn answer(&mut self, ping: bool, how: Answer) {
        let out = if ping {
            self.ping.take().map(|token| (token, PortalCommand::Ping))
        } else if self.commands.is_empty() {
            None
        } else {
            Some(self.commands.remove(0))
        };
        let Some((token, command)) = out else {
            return;
        };
        let reply: Reply = match how {
            Answer::Right | Answer::Lost => {
                let calls = command.calls(self.member.keys());
                let values = self
                    .redis
                    .execute(self.now, &calls)
                    .unwrap_or_else(|error| panic!("{command:?} failed on Redis: {error}"));
                let _ = self.redis.take_published();
                self.changed = match (&command, values.first()) {
                    (PortalCommand::Register, Some(RedisValue::Int(1))) => Some(true),
                    (PortalCommand::Leave, Some(RedisValue::Int(1))) => Some(false),
                    _ => None,
                };
                if how == Answer::Lost {
                    self.lost.insert(token);
                    return;
                }
                Ok(values)
            }
            Answer::Wrong => Ok(vec![RedisValue::Array(vec![RedisValue::Nil])]),
            Answer::Error => Err("ERR rigged".to_owned()),
        };
        self.member.handle_reply(self.now, token, reply);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        if self.member.poll_timeout().is_some_and(|at| at <= now) {
            self.member.handle_timeout(now);
            self.drain();
            self.member.handle_timeout(now);
            assert!(
                self.member.poll_command().is_none(),
                "a second timeout did more"
            );
            let next = self.member.poll_timeout();
            assert!(next.is_none_or(|at| at > now), "due after firing");
        }
    }

    /// Drain the portal and check what it asks and says.
    fn drain(&mut self) {
        while let Some((token, command)) = self.member.poll_command() {
            assert!(self.stopped.is_none(), "{command:?} after stopping");
            assert!(self.tokens.insert(token), "token {token:?} reused");
            match command {
                PortalCommand::Connect { .. } => {
                    assert!(!self.linked && !self.connecting, "Connect while linked");
                    self.connecting = true;
                }
                PortalCommand::Disconnect => {
                    self.linked = false;
                    self.connecting = false;
                    self.commands.clear();
                    self.ping = None;
                }
                PortalCommand::Ping => {
                    assert!(self.linked, "PING without a link");
                    assert!(self.ping.replace(token).is_none(), "two PINGs out");
                }
                command => {
                    assert!(self.linked, "{command:?} without a link");
                    if let PortalCommand::Announce { ready } = command {
                        let changed = self.changed.take();
                        assert_eq!(changed, Some(ready), "announced without a change");
                    }
                    if command == PortalCommand::Leave {
                        self.leaves += 1;
                        assert_eq!(self.leaves, 1, "left twice");
                    }
                    self.commands.push((token, command));
                }
            }
        }
        self.changed = None;
        while let Some(event) = self.member.poll_event() {
            assert!(self.stopped.is_none(), "{event:?} after stopping");
            match event {
                PortalMemberEvent::Client(event) => {
                    let mine = event.portal_id == self.member.id();
                    assert!(
                        mine || self.member.config().report_all_events,
                        "not addressed to it"
                    );
                    assert!(
                        self.linked && !self.closed,
                        "an event while not in the pool"
                    );
                    self.taken += 1;
                }
                PortalMemberEvent::Joined => {
                    assert!(self.registered(), "joined, but Redis does not hold the id")
                }
                PortalMemberEvent::Stopped { outcome } => {
                    // It joined first: from then on only closing stops it.
                    assert!(self.closed, "stopped unasked: {outcome:?}");
                    assert!(
                        outcome.is_err() || !self.registered(),
                        "left, but Redis holds the id"
                    );
                    self.stopped = Some(outcome);
                }
                PortalMemberEvent::LinkDown { .. } => {
                    let cap = self.member.config().reconnect.cap;
                    let due = self.member.poll_timeout();
                    let stopping = self.member.is_stopped();
                    assert!(
                        stopping || due.is_some_and(|at| at <= self.now + cap),
                        "the next attempt beyond the backoff's cap"
                    );
                }
                PortalMemberEvent::LinkUp | PortalMemberEvent::Undecodable { .. } => {}
            }
        }
        if self.stopped.is_some() {
            assert!(
                self.member.poll_timeout().is_none(),
                "a timer after stopping"
            );
        }
    }
}
