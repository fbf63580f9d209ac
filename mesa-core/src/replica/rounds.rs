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
use crate::sync::encode_stored;
use crate::wire::Message;

use super::command::{Command, RedisValue};
use super::job::RemoteSend;

/// Which part of a round a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// A presence check of the round's share `share`, from its id `offset` on.
    Check { share: usize, offset: usize },
    /// The round's stores for the message of share `share`.
    Store { share: usize },
    /// One publish of the round.
    Publish,
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
    /// Per share: the presence of each of its ids.
    online: Vec<Vec<bool>>,
    stored: usize,
    dropped: usize,
    /// Per share: the ids to publish to once the stores are done.
    publish: Vec<Vec<String>>,
    /// Learned from the checks, reported when the round is done.
    undeliverable: Vec<(Message, Vec<String>)>,
}

/// What a finished round did.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// Ids a message was stored for, and older stored messages dropped for the cap.
    pub(crate) stored: usize,
    pub(crate) dropped: usize,
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
    /// The `origin` of the envelopes (a replica's name; none for a Dispatcher).
    origin: Option<String>,
    /// Most messages stored per id.
    cap: usize,
    /// Sends not yet done, oldest first; the first may have been cut by a round,
    /// its plan holding the ids still to check.
    sends: VecDeque<RemoteSend>,
    round: Option<RoundState>,
}

impl Rounds {
    pub(crate) fn new(channel: String, origin: Option<String>, cap: usize) -> Self {
        Rounds {
            channel,
            origin,
            cap,
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

    /// The link failed: forget the round in flight (its sends stay, to be done
    /// again from their last finished round) and keep only the sends `keep` keeps;
    /// returns how many were let go.
    pub(crate) fn interrupt(&mut self, keep: impl FnMut(&RemoteSend) -> bool) -> usize {
        self.round = None;
        let before = self.sends.len();
        self.sends.retain(keep);
        before - self.sends.len()
    }

    /// The commands of the next round's first phase (presence checks, and the
    /// publishes that need none); then [`advance`](Self::advance), which moves on
    /// at once when there are none.
    pub(crate) fn start(&mut self, now: Instant) -> Vec<(Step, Command)> {
        let plan = Round::plan(self.sends.iter().map(|send| &send.plan));
        let shares = plan.whole + usize::from(plan.part > 0);
        let mut commands = Vec::new();
        let mut online = Vec::with_capacity(shares);
        for share in 0..shares {
            let send = &self.sends[share];
            let ids = self.share_ids(plan, share);
            online.push(vec![false; ids.len()]);
            match &send.plan {
                RemotePlan::Nothing => {}
                RemotePlan::Publish(recipients) => {
                    commands.push((Step::Publish, self.envelope(send, recipients.clone())));
                }
                RemotePlan::CheckPresence(_) => {
                    for (chunk, ids) in ids.chunks(IDS_PER_COMMAND).enumerate() {
                        let step = Step::Check {
                            share,
                            offset: chunk * IDS_PER_COMMAND,
                        };
                        let ids = ids.to_vec();
                        commands.push((step, Command::CheckPresence { ids }));
                    }
                }
            }
        }
        self.round = Some(RoundState {
            plan,
            started: now,
            phase: Phase::Checking,
            publish: vec![Vec::new(); shares],
            waiting: commands.len(),
            online,
            stored: 0,
            dropped: 0,
            undeliverable: Vec::new(),
        });
        commands
    }

    /// Take the answer to one command of the round; `Err` names a command whose
    /// answer had the wrong shape.
    pub(crate) fn answered(
        &mut self,
        step: Step,
        value: Option<RedisValue>,
    ) -> Result<(), &'static str> {
        match step {
            Step::Check { share, offset } => {
                let online = bools(value).ok_or("a presence check")?;
                let round = self.round.as_mut().ok_or("a presence check")?;
                let answers = round.online.get_mut(share).ok_or("a presence check")?;
                for (slot, online) in answers.iter_mut().skip(offset).zip(online) {
                    *slot = online;
                }
                round.waiting -= 1;
            }
            Step::Store { share } => {
                let (stored, dropped, online) = store_reply(value).ok_or("a store")?;
                let round = self.round.as_mut().ok_or("a store")?;
                round.stored += stored;
                round.dropped += dropped;
                round.waiting -= 1;
                // Connected since the check: published to instead, with the others.
                round
                    .publish
                    .get_mut(share)
                    .ok_or("a store")?
                    .extend(online);
            }
            Step::Publish => {
                let round = self.round.as_mut().ok_or("a publish")?;
                round.waiting -= 1;
            }
        }
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

    fn envelope(&self, send: &RemoteSend, recipients: Recipients) -> Command {
        let envelope = Envelope {
            message: send.message.clone(),
            options: send.options.clone(),
            recipients,
            origin: self.origin.clone(),
        };
        Command::Publish {
            channel: self.channel.clone(),
            payload: envelope.encode(),
        }
    }

    /// Split each checked share by presence: the connected ids wait to be published
    /// to, the others are stored for (the stores go first).
    fn stores(&self, round: &mut RoundState) -> Vec<(Step, Command)> {
        let mut commands = Vec::new();
        for (share, online) in round.online.iter().enumerate() {
            let send = &self.sends[share];
            if !matches!(send.plan, RemotePlan::CheckPresence(_)) {
                continue;
            }
            let ids = self.share_ids(round.plan, share).to_vec();
            let split = split_by_presence(ids, online, send.options.as_ref());
            round.publish[share] = split.publish;
            let text = encode_stored(&send.message);
            for ids in split.store.chunks(IDS_PER_COMMAND) {
                let command = Command::StoreMany {
                    ids: ids.to_vec(),
                    text: text.clone(),
                    cap: self.cap,
                };
                commands.push((Step::Store { share }, command));
            }
            if !split.undeliverable.is_empty() {
                round
                    .undeliverable
                    .push((send.message.clone(), split.undeliverable));
            }
        }
        commands
    }

    /// One publish per checked share to its connected ids (those the check found,
    /// and those the stores found connected since), in the order of the sends, so a
    /// later send never reaches an id before an earlier one.
    fn publishes(&self, round: &mut RoundState) -> Vec<(Step, Command)> {
        let publish = std::mem::take(&mut round.publish);
        publish
            .into_iter()
            .enumerate()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(share, ids)| {
                let command = self.envelope(&self.sends[share], Recipients::Ids(ids));
                (Step::Publish, command)
            })
            .collect()
    }

    /// Everything of the round was answered: its sends (or the part of the cut one)
    /// leave the queue.
    fn finish(&mut self, now: Instant, round: RoundState) -> Finished {
        self.sends.drain(..round.plan.whole);
        if let Some(rest) = self.sends.front_mut().filter(|_| round.plan.part > 0) {
            rest.plan.advance(round.plan.part);
        }
        Finished {
            stored: round.stored,
            dropped: round.dropped,
            undeliverable: round.undeliverable,
            rest: round
                .plan
                .rest(now.saturating_duration_since(round.started)),
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
