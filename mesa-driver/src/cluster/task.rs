//! The cluster task: owns the Redis connections of one server and executes jobs.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use mesa_core::sync::decode_stored;
use mesa_core::{
    Backoff, BackoffConfig, Envelope, Namespace, PortalEvent, PortalPool, PortalUpdate, Recipients,
    RemotePlan,
};
use redis::{Msg, RedisResult};

use super::link::{self, Link, bounded, commands};
use super::scripts::{APPEND_MANY, JANITOR, LEAVE, RENEW, TRIM};
use super::{ClusterConfig, ClusterHandle, Job, RemoteSend, send_round};
use crate::router::Router;
use crate::runtime::Runtime;

/// Jobs other than sends executed in one pipelined round trip at most, and jobs
/// taken from the channel at one wake-up at most (sends are cut into rounds by
/// `mesa_core::Round`).
const BATCH: usize = 512;

/// Start the cluster task of a server; the router reaches it through the handle.
pub(crate) fn spawn<R: Runtime>(
    runtime: &R,
    config: ClusterConfig,
    sync: bool,
    max_stored: usize,
    router: Weak<Router>,
    seed: u64,
) -> ClusterHandle {
    let (tx, rx) = mpsc::channel(config.max_pending);
    let replica: Arc<str> = format!("{seed:016x}").into();
    let handle = ClusterHandle {
        jobs: tx,
        middleware: router
            .upgrade()
            .map(|router| router.middleware.clone())
            .unwrap_or_default(),
        sync,
        portals: config.portals.is_some(),
    };
    let task = Task {
        runtime: runtime.clone(),
        ns: Namespace::new(config.namespace.clone()),
        pool: PortalPool::new(config.portals.unwrap_or_default(), seed),
        backoff: Backoff::new(
            BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                base_is_fixed: true,
            },
            seed,
        ),
        sends: VecDeque::new(),
        others: VecDeque::new(),
        retiring: None,
        lost: 0,
        run_id: String::new(),
        config,
        replica,
        max_stored,
        router,
        jobs: rx,
    };
    runtime.spawn(task.run());
    handle
}

struct Task<R> {
    runtime: R,
    config: ClusterConfig,
    ns: Namespace,
    replica: Arc<str>,
    max_stored: usize,
    router: Weak<Router>,
    jobs: mpsc::Receiver<Job>,
    /// Remote sends received and not yet done, oldest first. The first may have been
    /// cut (`mesa_core::Round`): its plan holds the ids still to check.
    sends: VecDeque<RemoteSend>,
    /// The other jobs received and not yet done, oldest first.
    ///
    /// With `sends`, the one buffer of what is left to do, bounded by `max_pending`.
    /// A job leaves it only once Redis has answered the round trip that carried it, so
    /// a failure of the link loses nothing that must be kept (see [`Task::outage`]);
    /// a round trip whose commands reached Redis but whose answer did not is done
    /// again after the reconnection (at least once).
    others: VecDeque<Job>,
    /// The reply of a Retire job: answered once everything received before it is done.
    retiring: Option<oneshot::Sender<()>>,
    /// Best-effort jobs (sends without sync, portal events) lost to an outage since
    /// the last report.
    lost: usize,
    /// The run id of the Redis process of the current link: leases hold it.
    run_id: String,
    pool: PortalPool,
    backoff: Backoff,
}

enum Wake {
    /// There are jobs to do.
    Work,
    /// Everything received before the Retire job is done.
    Retire,
    /// No job will come any more (the server is gone).
    JobsClosed,
    Message(Option<Msg>),
    Tick,
}

/// Whether a job is kept through a failure of the link, to be done after the
/// reconnection.
fn must_keep(job: &Job) -> bool {
    match job {
        // With sync, a send to ids elsewhere stores for the offline ones: kept, in
        // order. Without, it is best effort, as upstream's publish: delivered late,
        // after an outage, it would arrive out of order with what came since.
        Job::Send(send) => kept_send(send),
        // Re-derived, so not kept: the renewal that follows every reconnection
        // registers this replica's ids from the hub (removing those that left) and
        // reconciles its share of the connection count; replayed after it, these
        // would be stale.
        Job::Arrive(_) | Job::Leave(_) | Job::Connections(_) => false,
        // An event about a moment that has passed; best effort, as upstream's.
        Job::Portal { .. } => false,
        // A connection waits (briefly) for its stored messages, a client that asked
        // for none must not get them later, and what a redelivery wrote to the
        // socket must leave the store, or it is redelivered again.
        Job::Trim { .. } | Job::Clear { .. } | Job::Load { .. } => true,
        // Kept apart, in `Task::retiring`.
        Job::Retire { .. } => false,
    }
}

/// Whether a remote send is kept through a failure of the link: with sync (a
/// presence check, then stores), yes; see [`must_keep`].
fn kept_send(send: &RemoteSend) -> bool {
    matches!(send.plan, RemotePlan::CheckPresence(_))
}

impl<R: Runtime> Task<R> {
    async fn run(mut self) {
        loop {
            match self.connect().await {
                Ok(link) => {
                    self.backoff.reset();
                    self.report(true, None);
                    match self.serve(link).await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::warn!(%error, "cluster link down");
                            self.report(false, Some(error.to_string()));
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cluster link down: cannot reach Redis"),
            }
            if !self.outage().await {
                break;
            }
        }
        self.shelve();
        let left = self.queued() + self.lost;
        self.dropped(left, "the cluster task ended with jobs Redis never got");
    }

    fn report(&self, up: bool, error: Option<String>) {
        if up {
            tracing::info!(replica = %self.replica, "cluster link up");
        }
        if let Some(router) = self.router.upgrade() {
            router.middleware.emit(|m| m.on_cluster_link(up));
            if let Some(error) = error {
                router
                    .middleware
                    .report(&format!("cluster link down: {error}"));
            }
        }
    }

    /// Report `count` jobs given up (`what` says why): logged, reported to the
    /// middleware and counted by its `on_cluster_jobs_dropped`.
    fn dropped(&self, count: usize, what: &str) {
        if count == 0 {
            return;
        }
        tracing::warn!(jobs = count, "{what}");
        if let Some(router) = self.router.upgrade() {
            router.middleware.report(&format!("{what}: {count} jobs"));
            router.middleware.emit(|m| m.on_cluster_jobs_dropped(count));
        }
    }

    /// Jobs received and not yet done.
    fn queued(&self) -> usize {
        self.sends.len() + self.others.len()
    }

    /// Keep of what is left to do only what must be kept (see [`must_keep`]),
    /// counting the best-effort jobs let go as lost.
    fn shelve(&mut self) {
        let sends = self.sends.len();
        self.sends.retain(kept_send);
        let portal_events = self
            .others
            .iter()
            .filter(|job| matches!(job, Job::Portal { .. }))
            .count();
        self.others.retain(must_keep);
        self.lost += sends - self.sends.len() + portal_events;
    }

    /// The one path after any failure of the link: shelve what is left to do, then
    /// wait before reconnecting, keeping new jobs likewise. Returns false when the
    /// server is gone or retired meanwhile.
    async fn outage(&mut self) -> bool {
        self.shelve();
        if let Some(reply) = self.retiring.take() {
            // Redis is unreachable: nothing to retire from; our lease expires.
            let _ = reply.send(());
            return false;
        }
        let until = self.runtime.now() + self.backoff.next_delay();
        let mut sleep = Box::pin(self.runtime.sleep_until(until));
        loop {
            let next = poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                self.jobs.poll_next_unpin(cx).map(Some)
            })
            .await;
            match next {
                None => break,
                Some(None) => return false,
                Some(Some(Job::Retire { reply })) => {
                    let _ = reply.send(());
                    return false;
                }
                Some(Some(job)) => self.keep(job),
            }
        }
        let lost = std::mem::take(&mut self.lost);
        self.dropped(
            lost,
            "Redis unreachable: best-effort jobs (sends without sync, portal events) dropped",
        );
        self.router.strong_count() > 0
    }

    /// Keep a job received while Redis is unreachable, if it must not be lost and the
    /// buffer has room.
    fn keep(&mut self, job: Job) {
        if !must_keep(&job) {
            if matches!(job, Job::Send(_) | Job::Portal { .. }) {
                self.lost += 1;
            }
            return;
        }
        if self.queued() >= self.config.max_pending {
            self.dropped(1, "cluster link down and its retry buffer is full");
            return;
        }
        match job {
            Job::Send(send) => self.sends.push_back(send),
            other => self.others.push_back(other),
        }
    }

    async fn connect(&mut self) -> RedisResult<Link> {
        let client = link::client(&self.config.url, self.config.redis_ca_pem.as_deref())?;
        let mut conn = commands(&client).await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        self.run_id = run_id(&info);
        for script in [&*APPEND_MANY, &*TRIM, &*LEAVE, &*RENEW, &*JANITOR] {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        let pubsub = bounded(&self.runtime, client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        bounded(&self.runtime, sink.subscribe(self.ns.ws_channel())).await?;
        if self.config.portals.is_some() {
            bounded(
                &self.runtime,
                sink.subscribe(self.ns.available_portals_pool()),
            )
            .await?;
            let portals: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.ns.available_portals_pool())
                .query_async(&mut conn)
                .await?;
            self.pool.reset(portals);
        }
        let mut link = Link {
            conn,
            sink,
            messages: Box::pin(stream),
        };
        // Before anything is decided on presence: forget the leases (and so the ids)
        // of replicas that have not renewed since Redis restarted.
        let _: usize = self.janitor(&mut link, false).await?;
        self.renew(&mut link).await?;
        Ok(link)
    }

    /// Serve a live link until it fails (`Err`) or the server retires or goes (`Ok`).
    /// Between two bounded round trips of work it serves pub/sub messages and the
    /// lease, so a send to many ids holds up neither.
    async fn serve(&mut self, mut link: Link) -> RedisResult<()> {
        let period = self.config.lease / 3;
        let mut tick_at = self.runtime.now() + period;
        let mut tick = Box::pin(self.runtime.sleep_until(tick_at));
        // After a full round of sends, the rest before the next (`Round::rest`).
        let mut resting: Option<Pin<Box<R::Sleep>>> = None;
        loop {
            let wake = poll_fn(|cx| {
                if tick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Tick);
                }
                if let Poll::Ready(message) = link.messages.poll_next_unpin(cx) {
                    return Poll::Ready(Wake::Message(message));
                }
                let closed = self.receive(cx);
                if resting
                    .as_mut()
                    .is_some_and(|rest| rest.as_mut().poll(cx).is_ready())
                {
                    resting = None;
                }
                let sends_due = resting.is_none() && !self.sends.is_empty();
                if sends_due || !self.others.is_empty() {
                    Poll::Ready(Wake::Work)
                } else if self.queued() > 0 {
                    Poll::Pending
                } else if self.retiring.is_some() {
                    Poll::Ready(Wake::Retire)
                } else if closed {
                    Poll::Ready(Wake::JobsClosed)
                } else {
                    Poll::Pending
                }
            })
            .await;
            match wake {
                Wake::Tick => {
                    let now = self.runtime.now();
                    tick_at = (tick_at + period).max(now);
                    tick = Box::pin(self.runtime.sleep_until(tick_at));
                    // In subscribed mode the reply is an array, not +PONG: any answer will do.
                    let sent = self.runtime.now();
                    bounded(&self.runtime, link.sink.ping::<redis::Value>()).await?;
                    let latency = self.runtime.now().saturating_duration_since(sent);
                    if let Some(router) = self.router.upgrade() {
                        router.middleware.emit(|m| m.on_cluster_latency(latency));
                    }
                    self.renew(&mut link).await?;
                    let _: usize = self.janitor(&mut link, false).await?;
                }
                Wake::Message(Some(message)) => self.on_message(&message),
                Wake::Message(None) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the pub/sub connection closed",
                    )));
                }
                Wake::Work => {
                    let rest = self.work(&mut link, resting.is_none()).await?;
                    if !rest.is_zero() {
                        let until = self.runtime.now() + rest;
                        resting = Some(Box::pin(self.runtime.sleep_until(until)));
                    }
                }
                Wake::Retire => return self.retire(&mut link).await,
                Wake::JobsClosed => return Ok(()),
            }
            if self.router.strong_count() == 0 {
                return Ok(());
            }
        }
    }

    /// Take new jobs from the channel (at most [`BATCH`], none after a Retire, and
    /// none beyond the buffer's bound: the channel then holds them, and refuses more).
    /// Returns true when the channel is closed.
    fn receive(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        for _ in 0..BATCH {
            if self.retiring.is_some() || self.queued() >= self.config.max_pending {
                return false;
            }
            match self.jobs.poll_next_unpin(cx) {
                Poll::Ready(Some(Job::Retire { reply })) => self.retiring = Some(reply),
                Poll::Ready(Some(Job::Send(send))) => self.sends.push_back(send),
                Poll::Ready(Some(job)) => self.others.push_back(job),
                Poll::Ready(None) => return true,
                Poll::Pending => return false,
            }
        }
        false
    }

    /// Give up the lease and this replica's presence, then answer the retire job.
    async fn retire(&mut self, link: &mut Link) -> RedisResult<()> {
        let outcome = self.janitor(link, true).await.map(drop);
        if let Some(reply) = self.retiring.take() {
            let _ = reply.send(());
        }
        outcome
    }

    /// Do one bounded round of work: the oldest other jobs (at most [`BATCH`]) in one
    /// pipeline, then, when `sends_due`, one round of the sends. Each leaves its queue
    /// once Redis has answered; on failure the rest stays queued for
    /// [`Task::outage`]. Returns how long to rest before the next round of sends.
    async fn work(&mut self, link: &mut Link, sends_due: bool) -> RedisResult<Duration> {
        if !self.others.is_empty() {
            self.other_jobs(link).await?;
        }
        if !sends_due || self.sends.is_empty() {
            return Ok(Duration::ZERO);
        }
        let started = self.runtime.now();
        let origin = Some(&*self.replica);
        let (outcome, round) = send_round(
            &mut link.conn,
            &self.ns,
            origin,
            self.max_stored,
            &mut self.sends,
        )
        .await?;
        self.observe(outcome);
        Ok(round.rest(self.runtime.now().saturating_duration_since(started)))
    }

    /// The oldest other jobs (at most [`BATCH`]) in one pipelined round trip; the
    /// stored messages read for Load jobs go to their connections.
    async fn other_jobs(&mut self, link: &mut Link) -> RedisResult<()> {
        let count = self.others.len().min(BATCH);
        let mut pipe = redis::pipe();
        for job in self.others.iter().take(count) {
            match job {
                Job::Arrive(id) => {
                    pipe.cmd("SADD")
                        .arg(self.ns.connected_clients())
                        .arg(id)
                        .ignore();
                    pipe.cmd("SADD")
                        .arg(self.ns.replica_ids(&self.replica))
                        .arg(id)
                        .ignore();
                }
                Job::Leave(id) => {
                    let mut invocation = LEAVE.prepare_invoke();
                    self.replica_args(&mut invocation);
                    invocation.arg(id);
                    pipe.invoke_script(&invocation).ignore();
                }
                Job::Connections(delta) => {
                    pipe.cmd("INCRBY")
                        .arg(self.ns.connected_clients_count())
                        .arg(delta)
                        .ignore();
                    pipe.cmd("INCRBY")
                        .arg(self.ns.replica_connections(&self.replica))
                        .arg(delta)
                        .ignore();
                }
                Job::Portal { kind, client_id } => {
                    if let Some(portal) = self.pool.pick() {
                        let event = PortalEvent {
                            kind: kind.clone(),
                            client_id: client_id.clone(),
                            portal_id: portal.to_owned(),
                        };
                        pipe.cmd("PUBLISH")
                            .arg(self.ns.portal_channel())
                            .arg(event.encode())
                            .ignore();
                    }
                }
                // The one command whose answer is read.
                Job::Load { id, .. } => {
                    pipe.cmd("HGET").arg(self.ns.undelivered_messages()).arg(id);
                }
                Job::Trim { id, count } => {
                    let mut invocation = TRIM.prepare_invoke();
                    invocation
                        .key(self.ns.undelivered_messages())
                        .arg(id)
                        .arg(count);
                    pipe.invoke_script(&invocation).ignore();
                }
                // `shouldSync: false`.
                Job::Clear { id } => {
                    pipe.cmd("HDEL")
                        .arg(self.ns.undelivered_messages())
                        .arg(id)
                        .ignore();
                }
                // Never queued here (see `receive`).
                Job::Send(_) | Job::Retire { .. } => {}
            }
        }
        let loaded: Vec<Option<String>> = if pipe.cmd_iter().next().is_some() {
            pipe.query_async(&mut link.conn).await?
        } else {
            Vec::new()
        };
        let mut loaded = loaded.into_iter();
        for job in self.others.drain(..count) {
            if let Job::Load { reply, .. } = job {
                // Entries that are not messages are skipped.
                let messages = loaded
                    .next()
                    .flatten()
                    .and_then(|raw| decode_stored(&raw).ok())
                    .map(|(messages, _)| messages)
                    .unwrap_or_default();
                let _ = reply.send(messages);
            }
        }
        Ok(())
    }

    fn observe(&self, outcome: super::BatchOutcome) {
        let Some(router) = self.router.upgrade() else {
            return;
        };
        // An id absent here when the message was sent may have connected here since
        // (notably while Redis was unreachable and the send waited): our own envelope
        // does not come back to us, so deliver to it directly.
        for (message, ids) in &outcome.published_after_check {
            router.deliver_local(message, &Recipients::Ids(ids.clone()));
        }
        if outcome.stored > 0 {
            router
                .middleware
                .emit(|m| m.on_stored(outcome.stored, outcome.dropped));
        }
        if outcome.dropped > 0 {
            router.middleware.report(&format!(
                "sync: {} oldest stored messages dropped to respect the per-id limit",
                outcome.dropped
            ));
        }
        for (message, ids) in &outcome.undeliverable {
            router.middleware.emit(|m| m.on_undeliverable(message, ids));
        }
    }

    /// The keys and arguments every presence script starts with (see `scripts.rs`).
    fn replica_args(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .key(self.ns.connected_clients())
            .key(self.ns.replicas())
            .key(self.ns.connected_clients_count())
            .arg(&*self.replica)
            .arg("mesa_replica_ids:")
            .arg("mesa_replica_lease:")
            .arg("mesa_replica_conns:")
            .arg(self.ns.key(""));
    }

    async fn renew(&self, link: &mut Link) -> RedisResult<()> {
        let Some(router) = self.router.upgrade() else {
            return Ok(());
        };
        let ids = router.online_ids();
        let connections = router.connection_count();
        let lease = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = RENEW.prepare_invoke();
        self.replica_args(&mut invocation);
        invocation
            .arg(lease)
            .arg(connections)
            .arg(&self.run_id)
            .arg(ids);
        invocation
            .invoke_async::<i64>(&mut link.conn)
            .await
            .map(drop)
    }

    async fn janitor(&self, link: &mut Link, retire: bool) -> RedisResult<usize> {
        let mut invocation = JANITOR.prepare_invoke();
        self.replica_args(&mut invocation);
        invocation
            .arg(if retire { "retire" } else { "" })
            .arg(&self.run_id);
        invocation.invoke_async(&mut link.conn).await
    }

    fn on_message(&mut self, message: &Msg) {
        let Ok(payload) = message.get_payload::<String>() else {
            return;
        };
        if message.get_channel_name() == self.ns.available_portals_pool() {
            if let Ok(update) = PortalUpdate::decode(&payload) {
                if self.pool.update(&update) {
                    if let Some(router) = self.router.upgrade() {
                        if update.ready {
                            router.middleware.emit(|m| m.on_portal_join(&update.id));
                        } else {
                            router.middleware.emit(|m| m.on_portal_leave(&update.id));
                        }
                    }
                }
            }
            return;
        }
        let Some(router) = self.router.upgrade() else {
            return;
        };
        match Envelope::decode(&payload) {
            Ok(envelope) if envelope.origin.as_deref() == Some(&*self.replica) => {}
            Ok(envelope) => {
                router.deliver_local(&envelope.message, &envelope.recipients);
            }
            Err(error) => router
                .middleware
                .report(&format!("undecodable envelope: {error}")),
        }
    }
}

/// The `run_id` of `INFO server`: new every time a Redis process starts ("" when the
/// server does not report one).
fn run_id(info: &str) -> String {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}
