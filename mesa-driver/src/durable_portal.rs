//! The durable portal: receive the client events of a cluster's servers from the
//! Redis streams they append them to (servers with
//! [`ClusterConfig::durable_portals`](crate::ClusterConfig::durable_portals)), each
//! handled at least once: an event is acknowledged only when the application
//! [`ack`](DurableEvent::ack)s it, comes back after the visibility timeout when its
//! handler [`fail`](DurableEvent::fail)s (or the portal dies), and goes to the
//! dead-letter stream `ns("portal_dlq")` after too many deliveries.
//!
//! Every decision is [`mesa_core::DurablePortal`]'s (see its docs for the
//! guarantees). This module is its shell: it opens the Redis connection, executes
//! the portal's commands, feeds back what Redis answered, the application's
//! settlements and the portal's timer, and hands the events to the application.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_channel::{mpsc, oneshot};
use futures_util::{Stream, StreamExt};
use mesa_core::{
    Call, DurableCommand, DurableDelivery, DurablePortalConfig, DurablePortalEvent, Namespace,
    PortalEvent, Reply, Token,
};
use redis::RedisResult;
use redis::aio::MultiplexedConnection;

use crate::cluster::link::{self, check_ca_pem, commands};
use crate::hooks::BoxFuture;
use crate::portal::{PortalError, Stop, failure, poll_once, run};
use crate::runtime::{Runtime, entropy_seed};

type Machine = mesa_core::DurablePortal;

/// Builds a [`DurablePortal`].
#[derive(Debug, Clone)]
#[must_use]
pub struct DurablePortalBuilder<R> {
    runtime: R,
    url: String,
    config: DurablePortalConfig,
    redis_ca_pem: Option<Vec<u8>>,
}

impl<R: Runtime> DurablePortalBuilder<R> {
    /// A portal of consumer group `group` of the cluster on the Redis at `url`, its
    /// task spawned on `runtime`.
    pub fn new(runtime: R, url: impl Into<String>, group: impl Into<String>) -> Self {
        DurablePortalBuilder {
            runtime,
            url: url.into(),
            config: DurablePortalConfig {
                group: group.into(),
                ..DurablePortalConfig::default()
            },
            redis_ca_pem: None,
        }
    }

    /// The cluster's namespace (empty: none).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = Namespace::new(Some(namespace.into()));
        self
    }

    /// Consume under this name instead of a random UUID: a portal restarted under
    /// its old id takes its unfinished events back at once.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.config.id = Some(id.into());
        self
    }

    /// Streams the servers spread events over (as their setting; default 16).
    pub fn partitions(mut self, partitions: usize) -> Self {
        self.config.partitions = partitions;
        self
    }

    /// How long an event may stay unacknowledged before it is delivered again, and
    /// the partition leases' time to live (default 30 s).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.config.visibility_timeout = timeout;
        self
    }

    /// How often leases are renewed and overdue events reclaimed (default 5 s; below
    /// the visibility timeout).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.config.tick = tick;
        self
    }

    /// Deliveries of one event before it goes to the dead-letter stream (default 5).
    pub fn max_deliveries(mut self, deliveries: u64) -> Self {
        self.config.max_deliveries = deliveries;
        self
    }

    /// Every setting at once (the group and namespace included).
    pub fn config(mut self, config: DurablePortalConfig) -> Self {
        self.config = config;
        self
    }

    /// For a `rediss://` URL: trust these PEM certificates (a private CA) instead of
    /// the platform's store.
    pub fn redis_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.redis_ca_pem = Some(pem.into());
        self
    }

    /// Connect and make sure the group exists. Returns once the portal is ready to
    /// take partitions; later link failures are repaired in the background.
    pub async fn start(self) -> Result<DurablePortal, PortalError> {
        if let Some(pem) = &self.redis_ca_pem {
            check_ca_pem(pem)?;
        }
        let target = link::Target::parse(&self.url, self.redis_ca_pem.as_deref())
            .map_err(|error| PortalError::InvalidUrl(error.to_string()))?;
        let machine = Machine::new(self.config, entropy_seed(), self.runtime.now())?;
        let (events, receiver) = mpsc::unbounded();
        let (settle, settled) = mpsc::unbounded();
        let (stop_tx, stop) = oneshot::channel();
        let mut shell = Shell {
            runtime: self.runtime.clone(),
            target,
            machine,
            events,
            settle: settle.clone(),
            settled,
            stop: Some(stop),
            reply: None,
            conn: None,
            opening: None,
            queue: VecDeque::new(),
            answer: None,
            timer: None,
            milestones: VecDeque::new(),
        };
        if let Milestone::Stopped(outcome) = shell.next().await {
            outcome.map_err(failure)?;
            return Err(PortalError::Gone);
        }
        let id = shell.machine.id().to_owned();
        self.runtime.spawn(shell.serve());
        Ok(DurablePortal {
            id,
            events: receiver,
            stop: Some(stop_tx),
        })
    }
}

/// Receives the client events of a cluster's servers from the durable streams: a
/// [`Stream`] of [`DurableEvent`]s (or [`next`](DurablePortal::next)), each to
/// [`ack`](DurableEvent::ack) once handled, until [`close`](DurablePortal::close).
/// Dropping it closes it too, in the background.
#[derive(Debug)]
pub struct DurablePortal {
    id: String,
    events: mpsc::UnboundedReceiver<DurableEvent>,
    stop: Option<oneshot::Sender<Stop>>,
}

impl DurablePortal {
    /// Start building a durable portal of consumer group `group` of the cluster on
    /// the Redis at `url`.
    pub fn builder<R: Runtime>(
        runtime: R,
        url: impl Into<String>,
        group: impl Into<String>,
    ) -> DurablePortalBuilder<R> {
        DurablePortalBuilder::new(runtime, url, group)
    }

    /// The consumer name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next event (`None` once closed).
    pub async fn next(&mut self) -> Option<DurableEvent> {
        self.events.next().await
    }

    /// Acknowledge what was acked, give the partitions back and stop; events not
    /// settled by then are delivered again, to whoever takes their partition.
    pub async fn close(mut self) -> Result<(), PortalError> {
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        stop.send(reply).map_err(|_| PortalError::Gone)?;
        answer.await.unwrap_or(Err(PortalError::Gone))
    }
}

impl Stream for DurablePortal {
    type Item = DurableEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DurableEvent>> {
        self.events.poll_next_unpin(cx)
    }
}

/// An event's settlement, for the shell: partition, entry id, handled.
type Settle = (usize, String, bool);

/// One client event to handle: [`ack`](Self::ack) it once handled,
/// [`fail`](Self::fail) it when its handler failed. Dropping it unsettled fails it.
#[derive(Debug)]
pub struct DurableEvent {
    delivery: DurableDelivery,
    settle: Option<mpsc::UnboundedSender<Settle>>,
}

impl DurableEvent {
    /// The client event.
    pub fn event(&self) -> &PortalEvent {
        &self.delivery.event
    }

    /// The server's id of the event: the same on every delivery of it, for
    /// dropping what was handled already.
    pub fn event_id(&self) -> &str {
        &self.delivery.event_id
    }

    /// How often it was delivered, this time included.
    pub fn deliveries(&self) -> u64 {
        self.delivery.deliveries
    }

    /// The partition it came from (the same for every event of one client).
    pub fn partition(&self) -> usize {
        self.delivery.partition
    }

    /// Handled: acknowledge it (it is not delivered again).
    pub fn ack(mut self) {
        self.settle(true);
    }

    /// Its handler failed: deliver it again after the visibility timeout (or move it
    /// to the dead-letter stream after too many deliveries).
    pub fn fail(mut self) {
        self.settle(false);
    }

    fn settle(&mut self, ok: bool) {
        if let Some(settle) = self.settle.take() {
            let entry = std::mem::take(&mut self.delivery.entry_id);
            // A closed portal no longer settles: the event stays pending.
            let _ = settle.unbounded_send((self.delivery.partition, entry, ok));
        }
    }
}

impl Drop for DurableEvent {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// What the portal said that its owner acts on.
enum Milestone {
    /// The group exists.
    Ready,
    /// It stopped: it gave its partitions back, or why not.
    Stopped(Result<(), String>),
}

/// The portal's machine and its Redis connection: the background half of a portal.
struct Shell<R: Runtime> {
    runtime: R,
    target: link::Target,
    machine: Machine,
    events: mpsc::UnboundedSender<DurableEvent>,
    /// Given to every event, for settling it.
    settle: mpsc::UnboundedSender<Settle>,
    settled: mpsc::UnboundedReceiver<Settle>,
    stop: Option<oneshot::Receiver<Stop>>,
    reply: Option<Stop>,
    conn: Option<MultiplexedConnection>,
    opening: Option<BoxFuture<'static, RedisResult<MultiplexedConnection>>>,
    /// Commands received and not yet sent, with their calls, oldest first.
    queue: VecDeque<(Token, Vec<Call>)>,
    /// The command in flight: one at a time, so Redis runs them in their order.
    answer: Option<BoxFuture<'static, (Token, Reply)>>,
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
    milestones: VecDeque<Milestone>,
}

/// What woke the shell.
enum Wake {
    /// [`DurablePortal::close`] (`None`: the portal was dropped).
    Stop(Option<Stop>),
    Opened(RedisResult<MultiplexedConnection>),
    Answer((Token, Reply)),
    Settled(Settle),
    Timer,
}

impl<R: Runtime> Shell<R> {
    /// Serve until the machine stops, then answer [`DurablePortal::close`].
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

    /// Execute, feed and forward until the machine is ready or stops.
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
            let machine = &mut self.machine;
            match wake {
                Wake::Stop(reply) => {
                    self.reply = reply;
                    machine.handle_close(now);
                }
                Wake::Opened(Ok(conn)) => {
                    self.conn = Some(conn);
                    machine.handle_link_up(now);
                }
                Wake::Opened(Err(error)) => machine.handle_link_down(now, &error.to_string()),
                Wake::Answer((token, reply)) => machine.handle_reply(now, token, reply),
                Wake::Settled((partition, entry, ok)) => {
                    machine.handle_settled(now, partition, &entry, ok);
                }
                Wake::Timer => {
                    self.timer = None;
                    machine.handle_timeout(now);
                }
            }
        }
    }

    /// Execute the machine's commands, then act on its events.
    fn drain(&mut self) {
        while let Some((token, command)) = self.machine.poll_command() {
            match command {
                DurableCommand::Connect => {
                    let target = self.target.clone();
                    self.opening =
                        Some(Box::pin(
                            async move { commands(&target.client().await?).await },
                        ));
                }
                DurableCommand::Disconnect => {
                    self.conn = None;
                    self.opening = None;
                    self.queue.clear();
                    self.answer = None;
                }
                command => {
                    let calls = command.calls(self.machine.keys());
                    self.queue.push_back((token, calls));
                }
            }
        }
        while let Some(event) = self.machine.poll_event() {
            let id = self.machine.id();
            match event {
                DurablePortalEvent::Delivery(delivery) => {
                    let event = DurableEvent {
                        delivery,
                        settle: Some(self.settle.clone()),
                    };
                    // The application is gone when this fails: the event stays
                    // pending, and the dropped portal closes.
                    let _ = self.events.unbounded_send(event);
                }
                DurablePortalEvent::Ready => {
                    tracing::info!(portal = %id, "durable portal ready");
                    self.milestones.push_back(Milestone::Ready);
                }
                DurablePortalEvent::Partitions { held } => {
                    tracing::info!(portal = %id, ?held, "durable portal partitions");
                }
                DurablePortalEvent::DeadLettered {
                    partition,
                    count,
                    reason,
                } => {
                    tracing::warn!(portal = %id, partition, count, %reason, "portal events dead-lettered");
                }
                DurablePortalEvent::Lost { partition, count } => {
                    tracing::error!(portal = %id, partition, count, "portal events trimmed before handled");
                }
                DurablePortalEvent::Duplicate { event_id } => {
                    tracing::debug!(portal = %id, %event_id, "duplicate portal event acknowledged");
                }
                DurablePortalEvent::LinkUp => tracing::info!(portal = %id, "portal link up"),
                DurablePortalEvent::LinkDown { reason } => {
                    tracing::warn!(portal = %id, %reason, "portal link down");
                }
                DurablePortalEvent::Stopped { outcome } => {
                    self.milestones.push_back(Milestone::Stopped(outcome));
                }
            }
        }
    }

    /// Send the oldest queued command, unless one is in flight.
    fn send_next(&mut self) {
        let (Some(conn), None) = (&self.conn, &self.answer) else {
            return;
        };
        if let Some((token, calls)) = self.queue.pop_front() {
            self.answer = Some(Box::pin(run(conn.clone(), token, calls)));
        }
    }

    /// Arm the timer for the machine's next deadline, unless it is armed for it.
    fn arm_timer(&mut self) {
        let deadline = self.machine.poll_timeout();
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
        // The shell holds a sender itself: the stream never ends.
        if let Poll::Ready(Some(settled)) = self.settled.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Settled(settled));
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        Poll::Pending
    }
}
