//! The remote part of sends, done in bounded [`Round`]s, oldest first: check the
//! presence of the ids (and publish the sends that need no check), store for the ids
//! connected nowhere, then publish to the ids connected elsewhere. Shared by the
//! [`Replica`](super::Replica), which runs it beside its other work, and the
//! [`Dispatch`](super::Dispatch), which runs nothing else.
//!
//! Every transition of a round is in this file: the owner issues the commands it
//! returns, hands back each answer with its [`Step`], and asks to
//! [`advance`](Rounds::advance).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cluster::{Envelope, IDS_PER_COMMAND, RemotePlan, Round, split_by_presence};
use crate::hub::Recipients;
use crate::recovery::Personal;
use crate::rooms::RoomEnvelope;
use crate::sync::encode_stored;
use crate::wire::Message;

use super::command::{Command, RedisValue, StreamKeep};
use super::config::StoreWait;
use super::job::{RemoteSend, Streaming};

/// Which part of a round a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// A presence check of the round's share `share`, from its id `offset` on.
    Check { share: usize, offset: usize },
    /// The round's stores for the message of share `share`.
    Store { share: usize },
    /// An append of share `share`'s message to the stream of its recipient
    /// `through - 1` (its ids in order; a broadcast's one stream is the first).
    Append { share: usize, through: usize },
    /// The publish of share `share`.
    Publish { share: usize },
}

/// Where a round of sends is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Presence checks, and the publishes of sends that need none.
    Checking,
    /// Stores for the ids connected nowhere.
    Storing,
    /// Publishes to the ids connected elsewhere.
    Publishing,
}

/// The round of sends in flight.
#[derive(Debug)]
struct RoundState {
    plan: Round,
    started: Instant,
    phase: Phase,
    /// Commands of the current phase not yet answered.
    waiting: usize,
    shares: Vec<Share>,
}

/// Where one share of a round (a send, or the cut part of one) is.
#[derive(Debug, Default)]
struct Share {
    /// Its commands of the current phase not yet answered.
    open: usize,
    /// How many of its first recipients have the message in their stream (Redis
    /// answers in order, so the answered appends are a prefix).
    appended: usize,
    /// The presence of each of its ids.
    online: Vec<bool>,
    stored: usize,
    dropped: usize,
    /// Of the stored, those too few Redis replicas acknowledged in time.
    unreplicated: usize,
    /// The ids to publish to once the stores are done.
    publish: Vec<String>,
    /// Ids connected nowhere it was not stored for.
    undeliverable: Vec<String>,
}

impl RoundState {
    /// Whether share `index` has nothing left to do: everything it asked in the
    /// current phase was answered, and no later phase has work for it.
    fn share_done(&self, index: usize, plan: &RemotePlan) -> bool {
        let share = &self.shares[index];
        share.open == 0
            && match self.phase {
                Phase::Checking => !matches!(plan, RemotePlan::CheckPresence(_)),
                Phase::Storing => share.publish.is_empty(),
                Phase::Publishing => true,
            }
    }
}

/// What a finished round did.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// Ids a message was stored for, and older stored messages dropped for the cap.
    pub(crate) stored: usize,
    pub(crate) dropped: usize,
    /// Of the stored, those too few Redis replicas acknowledged in time
    /// ([`StoreWait`]): a failover may lose them.
    pub(crate) unreplicated: usize,
    /// Ids connected nowhere for whom a message was not stored.
    pub(crate) undeliverable: Vec<(Message, Vec<String>)>,
    /// How long to wait before the next round (see [`Round::rest`]).
    pub(crate) rest: Duration,
}

/// What to do after an answer.
#[derive(Debug)]
pub(crate) enum Advance {
    /// Answers of the current phase are still due.
    Wait,
    /// The next phase: issue these (never empty).
    Issue(Vec<(Step, Command)>),
    /// The round is done; its sends (or the part of the cut one) left the queue.
    Finished(Finished),
}

/// The queue of remote sends and the round in flight.
#[derive(Debug)]
pub(crate) struct Rounds {
    /// `ns("ws")`.
    channel: String,
    /// Route sends to ids to the replicas that hold them ([`Command::Route`])
    /// instead of publishing them on `ws`; global sends stay on `ws`.
    route: bool,
    /// The `origin` of the envelopes (a replica's name; none for a Dispatcher).
    origin: Option<String>,
    /// Most messages stored per id.
    cap: usize,
    /// Stores wait for Redis replicas.
    wait: Option<StoreWait>,
    /// How much of a stream Redis keeps, when sends append to personal or
    /// broadcast streams.
    keep: Option<StreamKeep>,
    /// Sends not yet done, oldest first; the first may have been cut by a round,
    /// its plan holding the ids still to check.
    sends: VecDeque<RemoteSend>,
    round: Option<RoundState>,
}

impl Rounds {
    pub(crate) fn new(
        channel: String,
        route: bool,
        origin: Option<String>,
        cap: usize,
        wait: Option<StoreWait>,
        keep: Option<StreamKeep>,
    ) -> Self {
        Rounds {
            channel,
            route,
            origin,
            cap,
            wait,
            keep,
            sends: VecDeque::new(),
            round: None,
        }
    }

    /// Sends not yet done.
    pub(crate) fn len(&self) -> usize {
        self.sends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sends.is_empty()
    }

    /// Whether a round is in flight.
    pub(crate) fn in_round(&self) -> bool {
        self.round.is_some()
    }

    pub(crate) fn push(&mut self, send: RemoteSend) {
        self.sends.push_back(send);
    }

    /// The link failed: forget the round in flight and keep only the sends `keep`
    /// keeps; returns how many were let go, and what the round finished. A send of
    /// the round whose every command was answered, and that no later phase had work
    /// for, is done and leaves the queue; the others are done again from their last
    /// finished round (at least once), except their appends Redis answered.
    ///
    /// Order holds: a send left to redo whose publish Redis never ran can only be
    /// followed by a finished one that stored (a later publish to the same ids would
    /// have been unanswered too, Redis answering in order); stored messages are
    /// redelivered in the order they were stored.
    pub(crate) fn interrupt(&mut self, keep: impl FnMut(&RemoteSend) -> bool) -> (usize, Finished) {
        let mut finished = Finished::default();
        if let Some(round) = self.round.take() {
            let plan = round.plan;
            let done: Vec<bool> = (0..round.shares.len())
                .map(|index| round.share_done(index, &self.sends[index].plan))
                .collect();
            for (index, share) in round.shares.into_iter().enumerate() {
                if done[index] {
                    finished.add(share, &self.sends[index].message);
                } else if let Some(send) = self.sends.get_mut(index) {
                    // Done again, but not its answered appends.
                    send.appended = send.appended.max(share.appended);
                }
            }
            // The cut send (its first `part` ids) is the last share.
            if plan.part > 0 && done.get(plan.whole) == Some(&true) {
                if let Some(cut) = self.sends.get_mut(plan.whole) {
                    cut.advance(plan.part);
                }
            }
            for index in (0..plan.whole).rev() {
                if done[index] {
                    self.sends.remove(index);
                }
            }
        }
        let before = self.sends.len();
        self.sends.retain(keep);
        (before - self.sends.len(), finished)
    }

    /// The commands of the next round's first phase (presence checks, and the
    /// publishes that need none); then [`advance`](Self::advance), which moves on
    /// at once when there are none.
    pub(crate) fn start(&mut self, now: Instant) -> Vec<(Step, Command)> {
        let plan = Round::plan(self.sends.iter().map(|send| &send.plan));
        let count = plan.whole + usize::from(plan.part > 0);
        let mut commands = Vec::new();
        let mut shares = Vec::with_capacity(count);
        for index in 0..count {
            let send = &self.sends[index];
            let ids = self.share_ids(plan, index);
            let mut share = Share {
                online: vec![false; ids.len()],
                appended: send.appended,
                ..Share::default()
            };
            // First on the link, so Redis runs them before the stores: what is
            // stored for an id is in its stream (the sync of an id that resumes
            // takes it from there).
            let recipients = match &send.plan {
                RemotePlan::CheckPresence(_) => Recipients::Ids(ids.to_vec()),
                RemotePlan::Publish(recipients) => recipients.clone(),
                RemotePlan::Nothing => Recipients::Ids(Vec::new()),
            };
            for (through, command) in self.appends(send, &recipients) {
                commands.push((
                    Step::Append {
                        share: index,
                        through,
                    },
                    command,
                ));
                share.open += 1;
            }
            match &send.plan {
                RemotePlan::Nothing => {}
                RemotePlan::Publish(recipients) => {
                    let step = Step::Publish { share: index };
                    for command in self.envelopes(send, recipients.clone()) {
                        commands.push((step, command));
                        share.open += 1;
                    }
                }
                RemotePlan::CheckPresence(_) => {
                    for (chunk, ids) in ids.chunks(IDS_PER_COMMAND).enumerate() {
                        let step = Step::Check {
                            share: index,
                            offset: chunk * IDS_PER_COMMAND,
                        };
                        let ids = ids.to_vec();
                        commands.push((step, Command::CheckPresence { ids }));
                        share.open += 1;
                    }
                }
            }
            shares.push(share);
        }
        self.round = Some(RoundState {
            plan,
            started: now,
            phase: Phase::Checking,
            waiting: commands.len(),
            shares,
        });
        commands
    }

    /// Take the answers to one command of the round (a store's `WAIT` second, see
    /// [`StoreWait`]); `Err` names a command whose answer had the wrong shape.
    pub(crate) fn answered(
        &mut self,
        step: Step,
        values: Vec<RedisValue>,
    ) -> Result<(), &'static str> {
        let mut values = values.into_iter();
        let value = values.next();
        let replicated = match (self.wait, values.next()) {
            (Some(wait), Some(RedisValue::Int(n))) => {
                usize::try_from(n).unwrap_or(0) >= wait.replicas
            }
            (Some(_), _) => false,
            (None, _) => true,
        };
        let (index, what) = match step {
            Step::Check { share, .. } => (share, "a presence check"),
            Step::Store { share } => (share, "a store"),
            Step::Publish { share } => (share, "a publish"),
            Step::Append { share, .. } => (share, "an append"),
        };
        let round = self.round.as_mut().ok_or(what)?;
        let share = round.shares.get_mut(index).ok_or(what)?;
        match step {
            Step::Check { offset, .. } => {
                let online = bools(value).ok_or(what)?;
                for (slot, online) in share.online.iter_mut().skip(offset).zip(online) {
                    *slot = online;
                }
            }
            Step::Store { .. } => {
                let (stored, dropped, online) = store_reply(value).ok_or(what)?;
                share.stored += stored;
                share.dropped += dropped;
                if !replicated {
                    share.unreplicated += stored;
                }
                // Connected since the check: published to instead, with the others.
                share.publish.extend(online);
            }
            Step::Append { through, .. } => share.appended = share.appended.max(through),
            Step::Publish { .. } => {}
        }
        share.open = share.open.saturating_sub(1);
        round.waiting -= 1;
        Ok(())
    }

    /// Once the current phase was answered, go on to the next (phases with nothing
    /// to do are skipped), or finish the round.
    pub(crate) fn advance(&mut self, now: Instant) -> Advance {
        loop {
            let Some(mut round) = self.round.take() else {
                return Advance::Wait;
            };
            if round.waiting > 0 {
                self.round = Some(round);
                return Advance::Wait;
            }
            let commands = match round.phase {
                Phase::Checking => {
                    round.phase = Phase::Storing;
                    self.stores(&mut round)
                }
                Phase::Storing => {
                    round.phase = Phase::Publishing;
                    self.publishes(&mut round)
                }
                Phase::Publishing => return Advance::Finished(self.finish(now, round)),
            };
            round.waiting = commands.len();
            self.round = Some(round);
            if !commands.is_empty() {
                return Advance::Issue(commands);
            }
        }
    }

    /// The ids of share `share` of a round: the whole check of the sends carried
    /// whole, the first `part` of the next one's.
    fn share_ids(&self, plan: Round, share: usize) -> &[String] {
        let ids = self.sends[share].plan.checked();
        if share == plan.whole {
            &ids[..plan.part.min(ids.len())]
        } else {
            ids
        }
    }

    /// The appends of `send`'s message to the streams of `recipients` (those of a
    /// round's share: every id it checks or publishes to), each with how many of the
    /// recipients it completes; none to the first [`RemoteSend::appended`], which a
    /// round cut short appended already.
    fn appends(&self, send: &RemoteSend, recipients: &Recipients) -> Vec<(usize, Command)> {
        let Some(keep) = self.keep else {
            return Vec::new();
        };
        let streams = match (send.streaming, recipients) {
            (Streaming::Off, _) | (Streaming::Beside, Recipients::All) => Vec::new(),
            (_, Recipients::All) => vec![(1, Personal::Broadcast.stream(""))],
            // A blank id is nobody's (upstream stores nothing for it either).
            (_, Recipients::Ids(ids)) => ids
                .iter()
                .enumerate()
                .filter(|(_, id)| !id.is_empty())
                .map(|(index, id)| (index + 1, Personal::User.stream(id)))
                .collect(),
        };
        let entry = send.message.to_value().to_string();
        streams
            .into_iter()
            .filter(|(through, _)| *through > send.appended)
            .map(|(through, room)| {
                let envelope = RoomEnvelope {
                    room,
                    message: send.message.clone(),
                    origin: None,
                    position: None,
                };
                let append = Command::StreamPublish {
                    head: envelope.head(),
                    entry: entry.clone(),
                    room: envelope.room,
                    keep,
                    // Named by the replica as it issues the command.
                    run_id: String::new(),
                };
                (through, append)
            })
            .collect()
    }

    /// The commands that publish `send` to `recipients`: one envelope on `ws`, or,
    /// routing by interest, one route per [`IDS_PER_COMMAND`] ids (each id's
    /// replicas found when Redis runs it); none for a send that only appends.
    fn envelopes(&self, send: &RemoteSend, recipients: Recipients) -> Vec<Command> {
        if send.streaming == Streaming::Only {
            return Vec::new();
        }
        let envelope = Envelope {
            message: send.message.clone(),
            options: send.options.clone(),
            recipients,
            origin: self.origin.clone(),
            streamed: send.streaming != Streaming::Off,
        };
        match &envelope.recipients {
            Recipients::Ids(ids) if self.route => {
                let (head, tail) = envelope.halves();
                ids.chunks(IDS_PER_COMMAND)
                    .map(|ids| Command::Route {
                        ids: ids.to_vec(),
                        head: head.clone(),
                        tail: tail.clone(),
                    })
                    .collect()
            }
            _ => vec![Command::Publish {
                channel: self.channel.clone(),
                payload: envelope.encode(),
            }],
        }
    }

    /// Split each checked share by presence: the connected ids wait to be published
    /// to, the others are stored for (the stores go first).
    fn stores(&self, round: &mut RoundState) -> Vec<(Step, Command)> {
        let mut commands = Vec::new();
        for (index, share) in round.shares.iter_mut().enumerate() {
            let send = &self.sends[index];
            if !matches!(send.plan, RemotePlan::CheckPresence(_)) {
                continue;
            }
            let ids = self.share_ids(round.plan, index).to_vec();
            let split = split_by_presence(ids, &share.online, send.options.as_ref());
            share.publish = split.publish;
            share.undeliverable = split.undeliverable;
            let text = encode_stored(&send.message);
            for ids in split.store.chunks(IDS_PER_COMMAND) {
                let command = Command::StoreMany {
                    ids: ids.to_vec(),
                    text: text.clone(),
                    cap: self.cap,
                    wait: self.wait,
                };
                commands.push((Step::Store { share: index }, command));
                share.open += 1;
            }
        }
        commands
    }

    /// One publish per checked share to its connected ids (those the check found,
    /// and those the stores found connected since), in the order of the sends, so a
    /// later send never reaches an id before an earlier one.
    fn publishes(&self, round: &mut RoundState) -> Vec<(Step, Command)> {
        let mut commands = Vec::new();
        for (index, share) in round.shares.iter_mut().enumerate() {
            if share.publish.is_empty() {
                continue;
            }
            let ids = std::mem::take(&mut share.publish);
            for command in self.envelopes(&self.sends[index], Recipients::Ids(ids)) {
                commands.push((Step::Publish { share: index }, command));
                share.open += 1;
            }
        }
        commands
    }

    /// Everything of the round was answered: its sends (or the part of the cut one)
    /// leave the queue.
    fn finish(&mut self, now: Instant, round: RoundState) -> Finished {
        let mut finished = Finished {
            rest: round
                .plan
                .rest(now.saturating_duration_since(round.started)),
            ..Finished::default()
        };
        for (index, share) in round.shares.into_iter().enumerate() {
            finished.add(share, &self.sends[index].message);
        }
        self.sends.drain(..round.plan.whole);
        if let Some(rest) = self.sends.front_mut().filter(|_| round.plan.part > 0) {
            rest.advance(round.plan.part);
        }
        finished
    }
}

impl Finished {
    /// Count in what a share of `message` did.
    fn add(&mut self, share: Share, message: &Message) {
        self.stored += share.stored;
        self.dropped += share.dropped;
        self.unreplicated += share.unreplicated;
        if !share.undeliverable.is_empty() {
            self.undeliverable
                .push((message.clone(), share.undeliverable));
        }
    }
}

/// `SMISMEMBER`'s answer.
fn bools(value: Option<RedisValue>) -> Option<Vec<bool>> {
    match value? {
        RedisValue::Array(items) => items
            .into_iter()
            .map(|item| match item {
                RedisValue::Int(n) => Some(n != 0),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `APPEND_MANY`'s answer: `{stored, dropped, online...}`.
fn store_reply(value: Option<RedisValue>) -> Option<(usize, usize, Vec<String>)> {
    let RedisValue::Array(items) = value? else {
        return None;
    };
    let mut items = items.into_iter();
    let mut count = || match items.next()? {
        RedisValue::Int(n) => usize::try_from(n).ok(),
        _ => None,
    };
    let (stored, dropped) = (count()?, count()?);
    let online = super::texts(Some(RedisValue::Array(items.collect())))?;
    Some((stored, dropped, online))
}
