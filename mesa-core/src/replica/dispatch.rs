//! One dispatch as a state machine: a send from a process that runs no server
//! (upstream's `Dispatcher`), done in the [`Round`](crate::Round)s a replica uses:
//! presence checked, the message stored for the ids connected nowhere, one envelope
//! published to the others. It has no connection of its own, so every id is
//! elsewhere, and no origin, so every replica delivers its envelopes.
//!
#![doc = include_str!("../../docs/dispatch-run-loop.md")]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::cluster::{Namespace, RemotePlan, plan_remote, shard_of};
use crate::config::ConfigError;
use crate::hub::{Recipients, TooManyRecipients, distinct_ids};
use crate::limits::Limits;
use crate::recovery::RecoveryConfig;
use crate::rooms::{RoomEnvelope, RoomRefusal, check_room};
use crate::sync::MessageOptions;
use crate::wire::{Message, Opcode};

use super::command::{Command, Keys, Reply, StreamKeep, Token};
use super::config::StoreWait;
use super::job::{RemoteSend, Streaming};
use super::rounds::{Advance, Rounds, Step};

/// How a dispatcher sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchConfig {
    /// The cluster's namespace.
    pub namespace: Namespace,
    /// Store messages for ids connected nowhere. Default off, as upstream's.
    pub sync: bool,
    /// Most messages stored per id. Default 1000.
    pub max_stored_per_id: usize,
    /// Most distinct ids one dispatch may address. Default: [`Limits::max_recipients`].
    pub max_recipients: usize,
    /// Publish sends to ids on the shared `ws` channel, which every replica (Node ones
    /// too) reads. Off, they are routed to the replicas that hold the ids
    /// ([`Command::Route`]): only mesa-rs replicas get them. Default on.
    pub legacy_bus: bool,
    /// Redis instances the cluster's data is spread over
    /// ([`ReplicaConfig::shards`](super::ReplicaConfig::shards)). Default 1.
    pub shards: usize,
    /// Stores wait for Redis replicas
    /// ([`ReplicaConfig::store_wait`](super::ReplicaConfig::store_wait)); the report
    /// counts those not acknowledged in time. Default `None`.
    pub store_wait: Option<StoreWait>,
    /// Rooms that keep a stream
    /// ([`ReplicaConfig::recovery`](super::ReplicaConfig::recovery)): a dispatch to
    /// one appends to it. Default `None`.
    pub recovery: Option<RecoveryConfig>,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            namespace: Namespace::default(),
            sync: false,
            max_stored_per_id: 1000,
            max_recipients: Limits::default().max_recipients,
            legacy_bus: true,
            shards: 1,
            store_wait: None,
            recovery: None,
        }
    }
}

impl DispatchConfig {
    /// Check the settings once, before dispatches use them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_stored_per_id == 0 {
            return Err(ConfigError::ZeroCount("max stored messages per id"));
        }
        if self.max_recipients == 0 {
            return Err(ConfigError::ZeroCount("max recipients"));
        }
        if !(1..=Token::MAX_SHARDS).contains(&self.shards) {
            return Err(ConfigError::Shards(self.shards));
        }
        if self.shards > 1 && self.legacy_bus {
            return Err(ConfigError::ShardingWithLegacyBus);
        }
        Ok(())
    }
}

/// What one dispatch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// The message went to every connection of every replica (`["*"]`).
    pub global: bool,
    /// Ids the envelope was published to: with sync, those found connected; without,
    /// every recipient (after `excluding`). 0 for a global dispatch.
    pub published: usize,
    /// Offline ids for whom the message was stored (sync only).
    pub stored: usize,
    /// Older stored messages dropped to keep those ids under `max_stored_per_id`.
    pub dropped: usize,
    /// Of the stored, those too few Redis replicas acknowledged in time
    /// ([`DispatchConfig::store_wait`]): a failover may lose them.
    pub unreplicated: usize,
    /// Offline ids for whom nothing was stored: the message said `sync: false`, or the
    /// id is blank (as upstream).
    pub undeliverable: Vec<String>,
    /// The room it was published to (a room's message reaches its members on every
    /// replica, best effort: nothing is stored).
    pub room: Option<String>,
}

/// One dispatch, as a state machine.
///
/// Inputs: [`handle_reply`](Self::handle_reply). Outputs:
/// [`poll_command`](Self::poll_command) (drain it after every input) and, once it has
/// nothing more, [`finish`](Self::finish). Nothing is retried: an
/// error ends the dispatch, which may then have been published or stored in part.
#[derive(Debug)]
pub struct Dispatch {
    keys: Keys,
    /// One per Redis instance: each id's part goes to its instance.
    rounds: Vec<Rounds>,
    next_token: u64,
    flights: BTreeMap<Token, Step>,
    commands: VecDeque<(Token, Command)>,
    report: DispatchReport,
    /// The ids the presence check covers, to count those published to.
    checked: Option<usize>,
    /// Commands outside the rounds, in flight: the publish of a dispatch to a room,
    /// the appends to personal or broadcast streams.
    one_shots: BTreeSet<Token>,
    outcome: Option<Result<DispatchReport, String>>,
}

impl Dispatch {
    /// Plan the dispatch of `message` to `recipients`, at `now`. An op 5 event is
    /// never stored (redelivered later, it would disconnect the client). A list of
    /// more distinct ids than `max_recipients` is refused before anything is done.
    pub fn new(
        config: &DispatchConfig,
        message: Message,
        options: Option<MessageOptions>,
        recipients: &Recipients,
        now: Instant,
    ) -> Result<Self, TooManyRecipients> {
        recipients.at_most(config.max_recipients)?;
        let message = Message { s: None, ..message };
        let sync = config.sync && message.op != Opcode::Internal;
        let mut report = DispatchReport::default();
        let plan = match recipients {
            Recipients::All => {
                report.global = true;
                plan_remote(recipients, Vec::new(), sync)
            }
            // No connection of its own: every id is elsewhere.
            Recipients::Ids(ids) => plan_remote(recipients, distinct_ids(ids), sync),
        };
        let streaming = config
            .recovery
            .as_ref()
            .map_or(Streaming::Off, |r| streaming(r, &message, recipients));
        let mut checked = None;
        match &plan {
            RemotePlan::Publish(Recipients::Ids(ids)) => report.published = ids.len(),
            RemotePlan::CheckPresence(ids) => checked = Some(ids.len()),
            RemotePlan::Publish(Recipients::All) | RemotePlan::Nothing => {}
        }
        let namespace = config.namespace.clone();
        let mut rounds: Vec<Rounds> = (0..config.shards)
            .map(|_| {
                Rounds::new(
                    namespace.ws_channel(),
                    !config.legacy_bus,
                    None,
                    config.max_stored_per_id,
                    config.store_wait,
                    config.recovery.as_ref().map(StreamKeep::new),
                )
            })
            .collect();
        let nothing = plan == RemotePlan::Nothing;
        for (shard, plan) in plan.by_shard(config.shards) {
            rounds[shard].push(RemoteSend {
                message: message.clone(),
                options: options.clone(),
                plan,
                streaming,
                appended: 0,
            });
        }
        // A broadcast's append is a send of its own (the envelope's is best effort).
        if streaming != Streaming::Off && *recipients == Recipients::All {
            rounds[0].push(RemoteSend {
                message: message.clone(),
                options: None,
                plan: RemotePlan::Publish(Recipients::All),
                streaming: Streaming::Only,
                appended: 0,
            });
        }
        let mut dispatch = Dispatch {
            // A dispatcher is no replica: none of its commands uses a replica's keys.
            keys: Keys::new(namespace, ""),
            rounds,
            next_token: 0,
            flights: BTreeMap::new(),
            commands: VecDeque::new(),
            report,
            checked,
            one_shots: BTreeSet::new(),
            outcome: None,
        };
        if nothing {
            dispatch.outcome = Some(Ok(dispatch.report.clone()));
        } else {
            for shard in 0..config.shards {
                dispatch.start_round(now, shard);
            }
        }
        Ok(dispatch)
    }

    /// Plan the dispatch of `message` to the members of `room`, on every replica: one
    /// publish on the room's channel (in a recoverable room, appended to its stream
    /// and published by one script). Refused for an invalid room name.
    pub fn to_room(
        config: &DispatchConfig,
        message: Message,
        room: &str,
    ) -> Result<Self, RoomRefusal> {
        check_room(room, &Limits::default())?;
        let namespace = config.namespace.clone();
        let envelope = RoomEnvelope {
            room: room.to_owned(),
            message: Message { s: None, ..message },
            origin: None,
            position: None,
        };
        let publish = match config.recovery.as_ref().filter(|r| r.covers(room)) {
            Some(recovery) => stream_publish(recovery, envelope),
            None => Command::Publish {
                channel: namespace.room_channel(room),
                payload: envelope.encode(),
            },
        };
        let mut dispatch = Dispatch {
            rounds: Vec::new(),
            keys: Keys::new(namespace, ""),
            next_token: 0,
            flights: BTreeMap::new(),
            commands: VecDeque::new(),
            report: DispatchReport {
                room: Some(room.to_owned()),
                ..DispatchReport::default()
            },
            checked: None,
            one_shots: BTreeSet::new(),
            outcome: None,
        };
        dispatch.one_shot(shard_of(room, config.shards), publish);
        Ok(dispatch)
    }

    /// Where the dispatch's data is in Redis; [`Command::calls`] needs it.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Redis answered the command of `token`: an error (or an answer of the wrong
    /// shape) ends the dispatch.
    pub fn handle_reply(&mut self, now: Instant, token: Token, reply: Reply) {
        if self.one_shots.remove(&token) {
            return match reply {
                Ok(_) => self.done_if_finished(),
                Err(error) => self.fail(error),
            };
        }
        let Some(step) = self.flights.remove(&token) else {
            return;
        };
        let shard = token.shard();
        let answered = match reply {
            Ok(values) => self.rounds[shard]
                .answered(step, values)
                .map_err(|what| format!("unexpected reply to {what}")),
            Err(error) => Err(error),
        };
        match answered {
            Ok(()) => self.advance(now, shard),
            Err(error) => self.fail(error),
        }
    }

    /// The next command for Redis, and the token to answer it with.
    pub fn poll_command(&mut self) -> Option<(Token, Command)> {
        self.commands.pop_front()
    }

    /// What the dispatch did, once [`poll_command`](Self::poll_command) has nothing
    /// more after every reply: its report, or the error that ended it (a dispatch
    /// whose commands were not all answered reports that instead).
    pub fn finish(self) -> Result<DispatchReport, String> {
        self.outcome.unwrap_or_else(|| {
            let unanswered = self.flights.len() + self.one_shots.len();
            Err(format!(
                "the dispatch ended with {unanswered} commands unanswered"
            ))
        })
    }

    fn start_round(&mut self, now: Instant, shard: usize) {
        if self.rounds[shard].is_empty() {
            return;
        }
        let commands = self.rounds[shard].start(now);
        self.issue(shard, commands);
        self.advance(now, shard);
    }

    /// Go on once the current phase of instance `shard`'s round was answered; done
    /// once every instance is.
    fn advance(&mut self, now: Instant, shard: usize) {
        match self.rounds[shard].advance(now) {
            Advance::Wait => {}
            Advance::Issue(commands) => self.issue(shard, commands),
            Advance::Finished(done) => {
                self.report.stored += done.stored;
                self.report.dropped += done.dropped;
                self.report.unreplicated += done.unreplicated;
                let undeliverable = done.undeliverable.into_iter().flat_map(|(_, ids)| ids);
                self.report.undeliverable.extend(undeliverable);
                // Back to back: a dispatch has nothing else to let through.
                if !self.rounds[shard].is_empty() {
                    self.start_round(now, shard);
                } else {
                    self.done_if_finished();
                }
            }
        }
    }

    fn issue(&mut self, shard: usize, commands: Vec<(Step, Command)>) {
        for (step, command) in commands {
            self.next_token += 1;
            let token = Token::new(self.next_token, shard);
            self.flights.insert(token, step);
            self.commands.push_back((token, command));
        }
    }

    /// Send a command outside the rounds to instance `shard`.
    fn one_shot(&mut self, shard: usize, command: Command) {
        self.next_token += 1;
        let token = Token::new(self.next_token, shard);
        self.one_shots.insert(token);
        self.commands.push_back((token, command));
    }

    /// Done once every round and every command outside them was answered.
    fn done_if_finished(&mut self) {
        if self.one_shots.is_empty() && self.rounds.iter().all(Rounds::is_empty) {
            self.done();
        }
    }

    fn done(&mut self) {
        if let Some(checked) = self.checked {
            let elsewhere = self.report.stored + self.report.undeliverable.len();
            self.report.published = checked.saturating_sub(elsewhere);
        }
        self.outcome = Some(Ok(std::mem::take(&mut self.report)));
    }

    fn fail(&mut self, error: String) {
        self.flights.clear();
        self.commands.clear();
        self.outcome = Some(Err(error));
    }
}

/// What a send of `message` to `recipients` does with the personal and broadcast
/// streams `recovery` keeps: only a dispatch (op 0; another op is no message a client
/// keeps a position of) to ids when ids keep streams, or to everyone when the
/// broadcast does, goes beside them.
pub(crate) fn streaming(
    recovery: &RecoveryConfig,
    message: &Message,
    recipients: &Recipients,
) -> Streaming {
    let streamed = match recipients {
        Recipients::All => recovery.broadcast,
        Recipients::Ids(_) => recovery.users,
    };
    if streamed && message.op == Opcode::Dispatch {
        Streaming::Beside
    } else {
        Streaming::Off
    }
}

/// The script that appends `envelope`'s message to its room's stream and publishes it.
fn stream_publish(recovery: &RecoveryConfig, envelope: RoomEnvelope) -> Command {
    Command::StreamPublish {
        room: envelope.room.clone(),
        head: envelope.head(),
        entry: envelope.message.to_value().to_string(),
        keep: StreamKeep::new(recovery),
        // A dispatcher does not know which Redis process it reaches: the
        // replicas' appends and reads start a new epoch after a failover.
        run_id: String::new(),
    }
}
