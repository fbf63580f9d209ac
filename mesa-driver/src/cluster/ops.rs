//! The Redis side of sending, shared by a server's cluster link and the Dispatcher:
//! sending to recipients elsewhere (presence check, atomic store, one PUBLISH per
//! send, all pipelined) in rounds of bounded size.

use std::collections::VecDeque;

use mesa_core::cluster::IDS_PER_COMMAND;
use mesa_core::sync::encode_stored;
use mesa_core::{
    Envelope, Message, MessageOptions, Namespace, Recipients, RemotePlan, Round, split_by_presence,
};
use redis::aio::MultiplexedConnection;
use redis::{Pipeline, RedisResult};

use super::scripts::APPEND_MANY;

/// One send's remote part, as the cluster link or a Dispatcher executes it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteSend {
    pub(crate) message: Message,
    pub(crate) options: Option<MessageOptions>,
    pub(crate) plan: RemotePlan,
}

/// What a batch of remote sends did.
#[derive(Debug, Default)]
pub(crate) struct BatchOutcome {
    /// Messages stored for offline ids, and the oldest dropped to respect the cap.
    pub(crate) stored: usize,
    pub(crate) dropped: usize,
    /// Ids that were offline and for whom nothing could be stored.
    pub(crate) undeliverable: Vec<(Message, Vec<String>)>,
    /// Ids found online by the presence check, per message: published, and to be
    /// delivered to those now connected to this replica too (they were not when the
    /// message was sent, or the check would not have been needed, and a replica
    /// ignores its own envelopes).
    pub(crate) published_after_check: Vec<(Message, Vec<String>)>,
}

impl BatchOutcome {
    /// Add what a later round did.
    pub(crate) fn merge(&mut self, later: BatchOutcome) {
        self.stored += later.stored;
        self.dropped += later.dropped;
        self.undeliverable.extend(later.undeliverable);
        self.published_after_check
            .extend(later.published_after_check);
    }
}

/// Execute the next round of the queued remote sends (oldest first; see [`Round`]),
/// and remove from the queue what it did; returns what it did and the round.
/// Nothing is removed when it fails: the queue holds exactly what is left to do.
pub(crate) async fn send_round(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    origin: Option<&str>,
    max_stored: usize,
    queue: &mut VecDeque<RemoteSend>,
) -> RedisResult<(BatchOutcome, Round)> {
    let round = Round::plan(queue.iter().map(|send| &send.plan));
    let cut = queue
        .get(round.whole)
        .filter(|_| round.part > 0)
        .map(|send| (send, &send.plan.checked()[..round.part]));
    let shares: Vec<(&RemoteSend, &[String])> = queue
        .iter()
        .take(round.whole)
        .map(|send| (send, send.plan.checked()))
        .chain(cut)
        .collect();
    let outcome = execute(conn, ns, origin, max_stored, &shares).await?;
    queue.drain(..round.whole);
    if let Some(rest) = queue.front_mut() {
        rest.plan.advance(round.part);
    }
    Ok((outcome, round))
}

/// Execute the shares of one round (each send, with the ids of its presence check
/// that this round carries) in two pipelined round trips at most: presence checks
/// (and direct publishes), then stores and the publishes that needed the check. Each
/// share is one PUBLISH, whatever its number of recipients.
async fn execute(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    origin: Option<&str>,
    max_stored: usize,
    shares: &[(&RemoteSend, &[String])],
) -> RedisResult<BatchOutcome> {
    let channel = ns.ws_channel();
    let publish = |pipe: &mut Pipeline, send: &RemoteSend, recipients: Recipients| {
        let envelope = Envelope {
            message: send.message.clone(),
            options: send.options.clone(),
            recipients,
            origin: origin.map(str::to_owned),
        };
        pipe.cmd("PUBLISH")
            .arg(&channel)
            .arg(envelope.encode())
            .ignore();
    };

    let mut first = redis::pipe();
    let mut checks = Vec::new();
    for &(send, ids) in shares {
        match &send.plan {
            RemotePlan::Nothing => {}
            RemotePlan::Publish(recipients) => publish(&mut first, send, recipients.clone()),
            RemotePlan::CheckPresence(_) => {
                for chunk in ids.chunks(IDS_PER_COMMAND) {
                    first
                        .cmd("SMISMEMBER")
                        .arg(ns.connected_clients())
                        .arg(chunk);
                }
                checks.push((send, ids));
            }
        }
    }
    let answers: Vec<Vec<bool>> = if first.cmd_iter().next().is_some() {
        first.query_async(conn).await?
    } else {
        Vec::new()
    };

    let mut outcome = BatchOutcome::default();
    let mut second = redis::pipe();
    let mut answers = answers.into_iter();
    for (send, ids) in checks {
        let mut online = Vec::with_capacity(ids.len());
        for _ in ids.chunks(IDS_PER_COMMAND) {
            online.extend(answers.next().unwrap_or_default());
        }
        let split = split_by_presence(ids.to_vec(), &online, send.options.as_ref());
        if !split.publish.is_empty() {
            publish(&mut second, send, Recipients::Ids(split.publish.clone()));
            outcome
                .published_after_check
                .push((send.message.clone(), split.publish));
        }
        if !split.store.is_empty() {
            let stored = encode_stored(&send.message);
            for chunk in split.store.chunks(IDS_PER_COMMAND) {
                let mut invocation = APPEND_MANY.prepare_invoke();
                invocation
                    .key(ns.undelivered_messages())
                    .arg(&stored)
                    .arg(max_stored)
                    .arg(chunk);
                second.invoke_script(&invocation);
            }
        }
        if !split.undeliverable.is_empty() {
            outcome
                .undeliverable
                .push((send.message.clone(), split.undeliverable));
        }
    }
    if second.cmd_iter().next().is_some() {
        let results: Vec<(usize, usize)> = second.query_async(conn).await?;
        outcome.stored = results.iter().map(|(stored, _)| stored).sum();
        outcome.dropped = results.iter().map(|(_, dropped)| dropped).sum();
    }
    Ok(outcome)
}
