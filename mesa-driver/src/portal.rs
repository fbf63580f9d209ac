//! The Portal: receive the client events of a cluster's servers (connections,
//! authentications, messages, disconnections) in any process, wire-compatible with
//! `@cryb/mesa`'s `Portal`.
//!
//! A portal registers its id in `ns("available_portals_pool")`; servers with portals
//! on pick one portal per event (round robin or at random) and publish it on
//! `ns("portal")`. A portal takes the events addressed to it, or every event with
//! [`report_all_events`](PortalBuilder::report_all_events). [`Portal::close`] (or
//! dropping it) leaves the pool. Unlike upstream's, ours notices a dead link,
//! reconnects with backoff and registers again when Redis lost its registration.
//!
//! Every one of those decisions is [`mesa_core::PortalMember`]'s. This module is its
//! shell: it opens the Redis connections, executes the member's commands, feeds back
//! what Redis answered, the subscription's messages and the member's timer, and
//! hands the client events to the application.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use futures_channel::{mpsc, oneshot};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use mesa_core::{
    Call, Namespace, PortalCommand, PortalEvent, PortalMember, PortalMemberConfig,
    PortalMemberEvent, Reply, Token,
};
use redis::{Msg, RedisResult};

use crate::cluster::calls::reply;
use crate::cluster::link::{self, Link, check_ca_pem, commands};
use crate::hooks::BoxFuture;
use crate::redis_failure::RedisFailure;
use crate::runtime::{Runtime, entropy_seed};
use crate::tls::TlsError;

/// Events received and not yet taken; beyond it the portal stops reading Redis.
const CAPACITY: usize = 1024;

/// Why a portal could not start or leave the pool cleanly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortalError {
    /// The Redis URL cannot be parsed.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// Redis is unreachable or failed a command.
    #[error("Redis: {0}")]
    Redis(#[source] RedisFailure),
    /// The CA certificates for `rediss://` cannot be used.
    #[error("Redis CA certificate: {0}")]
    Tls(#[from] TlsError),
    /// The portal's task is gone (its runtime shut down).
    #[error("the portal's task is gone")]
    Gone,
    /// A setting cannot work.
    #[error("invalid setting: {0}")]
    InvalidSetting(#[from] mesa_core::ConfigError),
}

impl From<redis::RedisError> for PortalError {
    fn from(error: redis::RedisError) -> Self {
        PortalError::Redis(error.into())
    }
}

/// Builds a [`Portal`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PortalBuilder<R> {
    runtime: R,
    url: String,
    namespace: Option<String>,
    report_all_events: bool,
    id: Option<String>,
    redis_ca_pem: Option<Vec<u8>>,
}

impl<R: Runtime> PortalBuilder<R> {
    /// A portal of the cluster on the Redis at `url`, its task spawned on `runtime`.
    pub fn new(runtime: R, url: impl Into<String>) -> Self {
        PortalBuilder {
            runtime,
            url: url.into(),
            namespace: None,
            report_all_events: false,
            id: None,
            redis_ca_pem: None,
        }
    }

    /// The cluster's namespace (empty: none).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Take every event, not only those addressed to this portal (upstream's
    /// `reportAllEvents`; default false).
    pub fn report_all_events(mut self, all: bool) -> Self {
        self.report_all_events = all;
        self
    }

    /// Register under this id instead of a random UUID (v4, as upstream's).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// For a `rediss://` URL: trust these PEM certificates (a private CA) instead of
    /// the platform's store ([`ClusterConfig::redis_ca_pem`](crate::ClusterConfig::redis_ca_pem)).
    pub fn redis_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.redis_ca_pem = Some(pem.into());
        self
    }

    /// Connect, subscribe to `ns("portal")`, then join the pool. Returns once the
    /// portal receives events; later link failures are repaired in the background.
    pub async fn start(self) -> Result<Portal, PortalError> {
        if let Some(pem) = &self.redis_ca_pem {
            check_ca_pem(pem)?;
        }
        let target = link::Target::parse(&self.url, self.redis_ca_pem.as_deref())
            .map_err(|error| PortalError::InvalidUrl(error.to_string()))?;
        let config = PortalMemberConfig {
            namespace: Namespace::new(self.namespace),
            report_all_events: self.report_all_events,
            id: self.id,
            ..PortalMemberConfig::default()
        };
        let member = PortalMember::new(config, entropy_seed(), self.runtime.now())?;
        let (events, receiver) = mpsc::channel(CAPACITY);
        let (stop_tx, stop) = oneshot::channel();
        let mut shell = Shell {
            runtime: self.runtime.clone(),
            target,
            member,
            events: Some(events),
            stop: Some(stop),
            reply: None,
            link: None,
            opening: None,
            queue: VecDeque::new(),
            answer: None,
            pings: FuturesUnordered::new(),
            timer: None,
            milestones: VecDeque::new(),
        };
        if let Milestone::Stopped(outcome) = shell.next().await {
            // It stops before joining only when its first link failed.
            outcome.map_err(failure)?;
            return Err(PortalError::Gone);
        }
        let id = shell.member.id().to_owned();
        self.runtime.spawn(shell.serve());
        Ok(Portal {
            id,
            events: receiver,
            stop: Some(stop_tx),
        })
    }
}

/// Asks the task to leave the pool and stop; it answers on the enclosed channel.
pub(crate) type Stop = oneshot::Sender<Result<(), PortalError>>;

/// Receives the client events of a cluster's servers: a [`Stream`] of
/// [`PortalEvent`]s (or [`next`](Portal::next)), until [`close`](Portal::close).
/// Dropping it leaves the pool too, in the background.
#[derive(Debug)]
pub struct Portal {
    id: String,
    events: mpsc::Receiver<PortalEvent>,
    stop: Option<oneshot::Sender<Stop>>,
}

impl Portal {
    /// Start building a portal of the cluster on the Redis at `url`.
    pub fn builder<R: Runtime>(runtime: R, url: impl Into<String>) -> PortalBuilder<R> {
        PortalBuilder::new(runtime, url)
    }

    /// The id servers address this portal's events to.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next event (`None` once closed).
    pub async fn next(&mut self) -> Option<PortalEvent> {
        self.events.next().await
    }

    /// Leave the pool (SREM, then `{"id","ready":false}`) and stop. Fails when Redis
    /// is unreachable (servers then drop this portal only when they restart).
    pub async fn close(mut self) -> Result<(), PortalError> {
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        stop.send(reply).map_err(|_| PortalError::Gone)?;
        answer.await.unwrap_or(Err(PortalError::Gone))
    }
}

impl Stream for Portal {
    type Item = PortalEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PortalEvent>> {
        self.events.poll_next_unpin(cx)
    }
}

/// Why the portal stopped, as its owner learns it: the member's reason, shown as is.
pub(crate) fn failure(reason: String) -> PortalError {
    redis::RedisError::from(std::io::Error::other(reason)).into()
}

/// What the portal said that its owner acts on.
enum Milestone {
    /// It is in the pool (again).
    Joined,
    /// It stopped: it left the pool, or why not.
    Stopped(Result<(), String>),
}

/// A link being opened.
type Opening = BoxFuture<'static, RedisResult<Link>>;

/// A command in flight, or a ping, answered.
type Answer = BoxFuture<'static, (Token, Reply)>;

/// The portal's member and its Redis connections: the background half of a portal.
struct Shell<R: Runtime> {
    runtime: R,
    /// Where the cluster's Redis is (resolved anew at every connection).
    target: link::Target,
    member: PortalMember,
    /// Where client events go (`None` once the portal was dropped).
    events: Option<mpsc::Sender<PortalEvent>>,
    /// [`Portal::close`]'s request (`None` once it came, or the portal was dropped).
    stop: Option<oneshot::Receiver<Stop>>,
    /// Where the outcome of [`Portal::close`] goes.
    reply: Option<Stop>,
    link: Option<Link>,
    opening: Option<Opening>,
    /// Commands received and not yet sent, with their calls, oldest first.
    queue: VecDeque<(Token, Vec<Call>)>,
    /// The command in flight: one at a time, so Redis runs them in their order.
    answer: Option<Answer>,
    /// Pings on the subscription connection.
    pings: FuturesUnordered<Answer>,
    /// The sleep armed for the member's deadline, with that deadline.
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
    milestones: VecDeque<Milestone>,
}

/// What woke the shell.
enum Wake {
    /// [`Portal::close`] (`None`: the portal was dropped).
    Stop(Option<Stop>),
    /// The application no longer takes events.
    Dropped,
    Opened(RedisResult<Link>),
    Answer((Token, Reply)),
    Message(Option<Msg>),
    Timer,
}

impl<R: Runtime> Shell<R> {
    /// Serve until the member stops, then answer [`Portal::close`].
    async fn serve(mut self) {
        loop {
            if let Milestone::Stopped(outcome) = self.next().await {
                if let Some(reply) = self.reply.take() {
                    let _ = reply.send(outcome.map_err(failure));
                }
                return;
            }
        }
    }

    /// Execute, feed and forward until the member joins the pool or stops.
    async fn next(&mut self) -> Milestone {
        loop {
            self.drain();
            if let Some(milestone) = self.milestones.pop_front() {
                return milestone;
            }
            self.send_next();
            self.arm_timer();
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            let now = self.runtime.now();
            let member = &mut self.member;
            match wake {
                Wake::Stop(reply) => {
                    self.reply = reply;
                    member.handle_close(now);
                }
                Wake::Dropped => {
                    self.events = None;
                    member.handle_close(now);
                }
                Wake::Opened(Ok(link)) => {
                    self.link = Some(link);
                    member.handle_link_up(now);
                }
                Wake::Opened(Err(error)) => member.handle_link_down(now, &error.to_string()),
                Wake::Answer((token, reply)) => member.handle_reply(now, token, reply),
                Wake::Message(Some(message)) => {
                    let channel = message.get_channel_name();
                    member.handle_pubsub(now, channel, message.get_payload_bytes());
                }
                Wake::Message(None) => {
                    member.handle_link_down(now, "the pub/sub connection closed");
                }
                Wake::Timer => {
                    self.timer = None;
                    member.handle_timeout(now);
                }
            }
        }
    }

    /// Execute the member's commands, then act on its events.
    fn drain(&mut self) {
        while let Some((token, command)) = self.member.poll_command() {
            self.execute(token, command);
        }
        while let Some(event) = self.member.poll_event() {
            let id = self.member.id();
            match event {
                PortalMemberEvent::Client(event) => {
                    if let Some(events) = &mut self.events {
                        // Room was reserved before reading (one event per message at
                        // most); a failure means the application is gone, which the
                        // next wake reports.
                        let _ = events.try_send(event);
                    }
                }
                PortalMemberEvent::LinkUp => tracing::info!(portal = %id, "portal link up"),
                PortalMemberEvent::LinkDown { reason } => {
                    tracing::warn!(portal = %id, %reason, "portal link down");
                }
                PortalMemberEvent::Undecodable { channel, error } => {
                    tracing::debug!(portal = %id, %channel, %error, "undecodable portal message");
                }
                PortalMemberEvent::Joined => {
                    tracing::info!(portal = %id, "portal in the pool");
                    self.milestones.push_back(Milestone::Joined);
                }
                PortalMemberEvent::Stopped { outcome } => {
                    self.milestones.push_back(Milestone::Stopped(outcome));
                }
            }
        }
    }

    fn execute(&mut self, token: Token, command: PortalCommand) {
        match command {
            PortalCommand::Connect { channel } => {
                self.opening = Some(Box::pin(open(self.target.clone(), channel)));
            }
            PortalCommand::Disconnect => {
                self.link = None;
                self.opening = None;
                self.queue.clear();
                self.answer = None;
                self.pings = FuturesUnordered::new();
            }
            PortalCommand::Ping => self.ping(token),
            command => {
                let calls = command.calls(self.member.keys());
                self.queue.push_back((token, calls));
            }
        }
    }

    /// Ping on the subscription connection. Without a link the member's reply
    /// timer answers for Redis.
    fn ping(&mut self, token: Token) {
        let Some(link) = &self.link else {
            return;
        };
        let mut sink = link.sink.clone();
        self.pings.push(Box::pin(async move {
            let answer = match sink.ping::<redis::Value>().await {
                Ok(value) => reply(vec![value]),
                Err(error) => Err(error.to_string()),
            };
            (token, answer)
        }));
    }

    /// Send the oldest queued command, unless one is in flight.
    fn send_next(&mut self) {
        let (Some(link), None) = (&self.link, &self.answer) else {
            return;
        };
        let Some((token, calls)) = self.queue.pop_front() else {
            return;
        };
        self.answer = Some(Box::pin(run(link.conn.clone(), token, calls)));
    }

    /// Arm the timer for the member's next deadline, unless it is armed for it.
    fn arm_timer(&mut self) {
        let deadline = self.member.poll_timeout();
        if self.timer.as_ref().map(|(at, _)| *at) != deadline {
            let runtime = &self.runtime;
            self.timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }
    }

    /// The first input that is ready.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Poll::Ready(stop) = poll_once(&mut self.stop, cx) {
            return Poll::Ready(Wake::Stop(stop.ok()));
        }
        if let Poll::Ready(opened) = poll_once(&mut self.opening, cx) {
            return Poll::Ready(Wake::Opened(opened));
        }
        if let Poll::Ready(answer) = poll_once(&mut self.answer, cx) {
            return Poll::Ready(Wake::Answer(answer));
        }
        if let Poll::Ready(Some(answer)) = self.pings.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Answer(answer));
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        // Read Redis only when the application can take an event (backpressure).
        if let (Some(events), Some(link)) = (self.events.as_mut(), self.link.as_mut()) {
            match events.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Poll::Ready(message) = link.messages.poll_next_unpin(cx) {
                        return Poll::Ready(Wake::Message(message));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Wake::Dropped),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

/// Run one command's calls in one round trip on `conn`: its token and reply.
pub(crate) async fn run(
    mut conn: redis::aio::MultiplexedConnection,
    token: Token,
    calls: Vec<Call>,
) -> (Token, Reply) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        match call {
            Call::Plain { name, args } => pipe.cmd(name).arg(args),
            Call::Script { script, keys, args } => pipe
                .cmd("EVAL")
                .arg(script.source())
                .arg(keys.len())
                .arg(keys)
                .arg(args),
        };
    }
    let answer = match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
        Ok(values) => reply(values),
        Err(error) => Err(error.to_string()),
    };
    (token, answer)
}

/// Poll the future in `slot`, if any, emptying the slot once it is done.
pub(crate) fn poll_once<F: Future + Unpin>(
    slot: &mut Option<F>,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    let Some(future) = slot.as_mut() else {
        return Poll::Pending;
    };
    let output = ready!(future.poll_unpin(cx));
    *slot = None;
    Poll::Ready(output)
}

/// Open a link: a command connection, and a subscription to `channel`.
async fn open(target: link::Target, channel: String) -> RedisResult<Link> {
    let client = target.client().await?;
    let conn = commands(&client).await?;
    let (mut sink, messages) = client.get_async_pubsub().await?.split();
    sink.subscribe(channel).await?;
    Ok(Link {
        conn,
        sink,
        messages: Box::pin(messages),
    })
}
