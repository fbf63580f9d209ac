//! Redis operations shared by a server's cluster link and the Dispatcher: sending to
//! recipients elsewhere (presence check, atomic store, one PUBLISH per send, all
//! pipelined), and reading or trimming an id's stored messages.

use mesa_core::sync::{decode_stored, encode_stored};
use mesa_core::{
    Envelope, Message, MessageOptions, Namespace, Recipients, RemotePlan, split_by_presence,
};
use redis::aio::MultiplexedConnection;
use redis::{Pipeline, RedisResult};

use super::scripts::{APPEND, TRIM};

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

/// Execute remote sends in two pipelined round trips at most: presence checks (and
/// direct publishes), then stores and the publishes that needed the check. Each send
/// is one PUBLISH, whatever its number of recipients.
pub(crate) async fn execute(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    origin: Option<&str>,
    max_stored: usize,
    sends: &[RemoteSend],
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
    for (index, send) in sends.iter().enumerate() {
        match &send.plan {
            RemotePlan::Nothing => {}
            RemotePlan::Publish(recipients) => publish(&mut first, send, recipients.clone()),
            RemotePlan::CheckPresence(ids) => {
                first.cmd("SMISMEMBER").arg(ns.connected_clients()).arg(ids);
                checks.push(index);
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
    let mut appends = 0;
    for (index, online) in checks.into_iter().zip(answers) {
        let send = &sends[index];
        let RemotePlan::CheckPresence(ids) = &send.plan else {
            continue;
        };
        let split = split_by_presence(ids.clone(), &online, send.options.as_ref());
        if !split.publish.is_empty() {
            publish(&mut second, send, Recipients::Ids(split.publish.clone()));
            outcome
                .published_after_check
                .push((send.message.clone(), split.publish));
        }
        if !split.store.is_empty() {
            let stored = encode_stored(&send.message);
            for id in &split.store {
                let mut invocation = APPEND.prepare_invoke();
                invocation
                    .key(ns.undelivered_messages())
                    .arg(id)
                    .arg(&stored)
                    .arg(max_stored);
                second.invoke_script(&invocation);
                appends += 1;
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
        debug_assert_eq!(results.len(), appends);
        outcome.stored = results.len();
        outcome.dropped = results.iter().map(|(_, dropped)| dropped).sum();
    }
    Ok(outcome)
}

/// The messages stored for `id`, oldest first (entries that are not messages skipped).
pub(crate) async fn load(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    id: &str,
) -> RedisResult<Vec<Message>> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(ns.undelivered_messages())
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(raw
        .and_then(|raw| decode_stored(&raw).ok())
        .map(|(messages, _)| messages)
        .unwrap_or_default())
}

/// Remove the first `count` stored messages of `id`.
pub(crate) async fn trim(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    id: &str,
    count: usize,
) -> RedisResult<()> {
    let mut invocation = TRIM.prepare_invoke();
    invocation.key(ns.undelivered_messages()).arg(id).arg(count);
    invocation.invoke_async::<usize>(conn).await.map(drop)
}

/// Delete every stored message of `id` (`shouldSync: false`).
pub(crate) async fn clear(
    conn: &mut MultiplexedConnection,
    ns: &Namespace,
    id: &str,
) -> RedisResult<()> {
    redis::cmd("HDEL")
        .arg(ns.undelivered_messages())
        .arg(id)
        .query_async(conn)
        .await
}
