//! The cluster task: executes the replica's Redis commands and feeds back what
//! Redis answered, the pub/sub messages, and the replica's timer. It decides
//! nothing: when to connect, what to send, what a failure costs are the replica's.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_channel::mpsc;
use futures_util::{FutureExt, Stream, StreamExt};
use mesa_core::{Command, Keys, RedisValue, Reply, Token};
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{Msg, RedisResult};

use super::ClusterConfig;
use super::calls::{Batch, ScriptHashes, load_scripts};
use super::link::{self, commands};
use crate::hooks::BoxFuture;
use crate::registry::{LinkWork, Registry};
use crate::runtime::Runtime;

/// Commands pipelined in one round trip at most.
const BATCH: usize = 512;

/// Start the cluster task of a server's replica, which executes `inbox`.
pub(crate) fn spawn<R: Runtime>(
    runtime: &R,
    config: ClusterConfig,
    registry: Weak<Registry>,
    inbox: mpsc::UnboundedReceiver<LinkWork>,
) {
    let Some(keys) = registry.upgrade().and_then(|registry| registry.keys()) else {
        return;
    };
    let slots = config.urls().map(|_| Slot::default()).collect();
    let task = Task {
        runtime: runtime.clone(),
        config,
        keys,
        hashes: ScriptHashes::new(),
        registry,
        inbox,
        slots,
        timer: None,
    };
    runtime.spawn(task.run());
}

/// An open link: commands, and the subscription's sink and messages.
struct Link {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    messages: Pin<Box<dyn Stream<Item = Msg> + Send>>,
}

/// A link being opened: the link and the run id of its Redis process.
type Opening = BoxFuture<'static, RedisResult<(Link, String)>>;

/// Commands in flight, answered together.
type Answers = BoxFuture<'static, Vec<(Token, Reply)>>;

/// The link to one Redis instance (a shard of the cluster's data) and its work.
#[derive(Default)]
struct Slot {
    link: Option<Link>,
    connecting: Option<Opening>,
    /// Commands received and not yet sent, oldest first.
    queue: VecDeque<(Token, Command)>,
    /// The pipeline in flight: one at a time, so Redis runs commands in their order.
    batch: Option<Answers>,
    /// Pings, subscribes and unsubscribes for the subscription connection, oldest
    /// first, and the one in flight (one at a time, so they run in their order).
    sink_queue: VecDeque<(Token, Command)>,
    sink_op: Option<Answers>,
}

struct Task<R: Runtime> {
    runtime: R,
    config: ClusterConfig,
    keys: Keys,
    hashes: ScriptHashes,
    registry: Weak<Registry>,
    inbox: mpsc::UnboundedReceiver<LinkWork>,
    /// One per Redis instance, in the order of their URLs.
    slots: Vec<Slot>,
    /// The sleep armed for the replica's deadline, with that deadline.
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
}

/// What woke the task; `usize` names the Redis instance.
enum Wake {
    Inbox(Option<LinkWork>),
    Opened(usize, RedisResult<(Link, String)>),
    Answers(Vec<(Token, Reply)>),
    Message(usize, Option<Msg>),
    Timer,
}

impl<R: Runtime> Task<R> {
    /// Execute until the server is gone.
    async fn run(mut self) {
        loop {
            let Some(registry) = self.registry.upgrade() else {
                return;
            };
            for shard in 0..self.slots.len() {
                self.send_batch(&registry, shard);
                self.send_sink_op(shard);
            }
            self.arm_timer(&registry);
            drop(registry);
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            let Some(registry) = self.registry.upgrade() else {
                return;
            };
            match wake {
                Wake::Inbox(None) => return,
                Wake::Inbox(Some(LinkWork::Rearm)) => {}
                Wake::Inbox(Some(LinkWork::Command(token, command))) => {
                    let Some(slot) = self.slots.get_mut(token.shard()) else {
                        continue;
                    };
                    match command {
                        Command::Connect => self.open(&registry, token.shard()),
                        Command::Ping | Command::Subscribe { .. } | Command::Unsubscribe { .. } => {
                            slot.sink_queue.push_back((token, command));
                        }
                        command => slot.queue.push_back((token, command)),
                    }
                }
                Wake::Opened(shard, Ok((link, run_id))) => {
                    self.slots[shard].link = Some(link);
                    registry.feed(|replica, now| replica.handle_link_up(now, shard, &run_id));
                }
                Wake::Opened(shard, Err(error)) => {
                    let reason = format!("cannot reach Redis: {error}");
                    registry.feed(|replica, now| replica.handle_link_down(now, shard, &reason));
                }
                Wake::Answers(answers) => {
                    registry.feed(|replica, now| {
                        for (token, reply) in answers {
                            replica.handle_reply(now, token, reply);
                        }
                    });
                }
                Wake::Message(_, Some(message)) => {
                    let channel = message.get_channel_name();
                    if let Ok(payload) = message.get_payload::<String>() {
                        registry.feed(|replica, now| replica.handle_pubsub(now, channel, &payload));
                    }
                }
                Wake::Message(shard, None) => {
                    self.slots[shard].link = None;
                    let reason = "the pub/sub connection closed";
                    registry.feed(|replica, now| replica.handle_link_down(now, shard, reason));
                }
                Wake::Timer => {
                    self.timer = None;
                    registry.feed(|replica, now| replica.handle_timeout(now));
                }
            }
        }
    }

    /// The first input that is ready.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Poll::Ready(work) = self.inbox.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Inbox(work));
        }
        for (shard, slot) in self.slots.iter_mut().enumerate() {
            if let Some(opening) = slot.connecting.as_mut() {
                if let Poll::Ready(opened) = opening.poll_unpin(cx) {
                    slot.connecting = None;
                    return Poll::Ready(Wake::Opened(shard, opened));
                }
            }
            if let Some(batch) = slot.batch.as_mut() {
                if let Poll::Ready(answers) = batch.poll_unpin(cx) {
                    slot.batch = None;
                    return Poll::Ready(Wake::Answers(answers));
                }
            }
            if let Some(op) = slot.sink_op.as_mut() {
                if let Poll::Ready(answers) = op.poll_unpin(cx) {
                    slot.sink_op = None;
                    return Poll::Ready(Wake::Answers(answers));
                }
            }
            if let Some(link) = slot.link.as_mut() {
                if let Poll::Ready(message) = link.messages.poll_next_unpin(cx) {
                    return Poll::Ready(Wake::Message(shard, message));
                }
            }
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        Poll::Pending
    }

    /// Arm the timer for the replica's next deadline, unless it is armed for it.
    fn arm_timer(&mut self, registry: &Registry) {
        let deadline = registry.replica(|replica| replica.poll_timeout()).flatten();
        if self.timer.as_ref().map(|(at, _)| *at) != deadline {
            let runtime = &self.runtime;
            self.timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }
    }

    /// Open a new link to instance `shard`, dropping the old one with whatever it
    /// had in flight.
    fn open(&mut self, registry: &Registry, shard: usize) {
        let channels = registry
            .replica(|replica| replica.channels(shard))
            .unwrap_or_default();
        let url = self.config.urls().nth(shard).unwrap_or_default();
        let target = link::Target::parse(url, self.config.redis_ca_pem.as_deref());
        self.slots[shard] = Slot {
            connecting: Some(Box::pin(open(target, channels))),
            ..Slot::default()
        };
    }

    /// Run the oldest queued operation of instance `shard`'s subscription
    /// connection, unless one is in flight: a ping (any answer proves the connection
    /// alive), a subscribe or an unsubscribe.
    fn send_sink_op(&mut self, shard: usize) {
        let slot = &mut self.slots[shard];
        let Some(link) = &slot.link else {
            return;
        };
        if slot.sink_op.is_some() {
            return;
        }
        let Some((token, command)) = slot.sink_queue.pop_front() else {
            return;
        };
        let mut sink = link.sink.clone();
        slot.sink_op = Some(Box::pin(async move {
            let done = match command {
                Command::Subscribe { channels } => sink.subscribe(channels).await,
                Command::Unsubscribe { channels } => sink.unsubscribe(channels).await,
                _ => sink.ping::<redis::Value>().await.map(drop),
            };
            let reply = done
                .map(|()| Vec::<RedisValue>::new())
                .map_err(|e| e.to_string());
            vec![(token, reply)]
        }));
    }

    /// Pipeline the oldest queued commands of instance `shard` the replica still
    /// waits for, unless a pipeline is in flight there.
    fn send_batch(&mut self, registry: &Registry, shard: usize) {
        let slot = &mut self.slots[shard];
        let Some(link) = &slot.link else {
            return;
        };
        if slot.batch.is_some() || slot.queue.is_empty() {
            return;
        }
        registry.replica(|replica| slot.queue.retain(|(token, _)| replica.awaits(*token)));
        let count = slot.queue.len().min(BATCH);
        let batch = Batch::new(slot.queue.drain(..count), &self.keys, &self.hashes);
        if batch.is_empty() {
            return;
        }
        let tokens: Vec<Token> = batch.tokens().collect();
        let mut conn = link.conn.clone();
        slot.batch = Some(Box::pin(async move {
            match batch.execute(&mut conn).await {
                Ok(replies) => replies,
                Err(error) => tokens
                    .into_iter()
                    .map(|token| (token, Err(error.to_string())))
                    .collect(),
            }
        }));
    }
}

/// Open a link: a command connection (whose Redis process's run id is read and
/// whose scripts are loaded) and a subscription to `channels`.
async fn open(
    target: RedisResult<link::Target>,
    channels: Vec<String>,
) -> RedisResult<(Link, String)> {
    let client = target?.client().await?;
    let mut conn = commands(&client).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    load_scripts(&mut conn).await?;
    let (mut sink, messages) = client.get_async_pubsub().await?.split();
    for channel in channels {
        sink.subscribe(channel).await?;
    }
    let link = Link {
        conn,
        sink,
        messages: Box::pin(messages),
    };
    Ok((link, run_id(&info)))
}

/// The `run_id` of `INFO server`: new every time a Redis process starts ("" when the
/// server does not report one).
fn run_id(info: &str) -> String {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}
