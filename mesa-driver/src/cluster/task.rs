//! The cluster task: owns the Redis connections of one server and executes jobs.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use mesa_core::{
    Backoff, BackoffConfig, Envelope, Namespace, PortalEvent, PortalPool, PortalUpdate, Recipients,
};
use redis::{Msg, RedisResult};

use super::link::{self, Link, bounded, commands};
use super::scripts::{APPEND, JANITOR, LEAVE, RENEW, TRIM};
use super::{ClusterConfig, ClusterHandle, Job, RemoteSend, clear, execute, load, trim};
use crate::router::Router;
use crate::runtime::Runtime;

/// Jobs executed in one pipelined batch at most.
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
        pending: VecDeque::new(),
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
    /// Jobs that must not be lost, kept while Redis is unreachable (bounded).
    pending: VecDeque<Job>,
    /// The run id of the Redis process of the current link: leases hold it.
    run_id: String,
    pool: PortalPool,
    backoff: Backoff,
}

enum Wake {
    Jobs(Vec<Job>),
    JobsClosed,
    Message(Option<Msg>),
    Tick,
}

impl<R: Runtime> Task<R> {
    async fn run(mut self) {
        let mut retiring = None;
        loop {
            let link = match self.connect().await {
                Ok(link) => link,
                Err(error) => {
                    tracing::warn!(%error, "cluster link down: cannot reach Redis");
                    if !self.wait_backoff(&mut retiring).await {
                        return;
                    }
                    continue;
                }
            };
            self.backoff.reset();
            self.report(true, None);
            match self.serve(link, &mut retiring).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "cluster link down");
                    self.report(false, Some(error.to_string()));
                    if !self.wait_backoff(&mut retiring).await {
                        return;
                    }
                }
            }
        }
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

    /// Wait before reconnecting, keeping jobs that must not be lost. Returns false
    /// when the server is gone or retired meanwhile.
    async fn wait_backoff(&mut self, retiring: &mut Option<Job>) -> bool {
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
                None => return self.router.strong_count() > 0,
                Some(None) => return false,
                Some(Some(Job::Retire { reply })) => {
                    // Redis is unreachable: nothing to retire from; our lease expires.
                    let _ = reply.send(());
                    *retiring = None;
                    return false;
                }
                Some(Some(job)) => self.keep(job),
            }
        }
    }

    /// Keep a job for after the reconnection, if it must not be lost.
    fn keep(&mut self, job: Job) {
        let must_keep = match &job {
            Job::Send(send) => matches!(send.plan, mesa_core::RemotePlan::CheckPresence(_)),
            // Presence and counts are re-registered from the hub at every renewal.
            Job::Arrive(_) | Job::Leave(_) | Job::Connections(_) | Job::Portal { .. } => false,
            // A redelivery waits (briefly, see the connection) for Redis to come back.
            Job::Trim { .. } | Job::Clear { .. } | Job::Load { .. } => true,
            Job::Retire { .. } => false,
        };
        if !must_keep {
            return;
        }
        if self.pending.len() >= self.config.max_pending {
            if let Some(router) = self.router.upgrade() {
                router
                    .middleware
                    .report("cluster link down and its retry buffer is full");
            }
            return;
        }
        self.pending.push_back(job);
    }

    async fn connect(&mut self) -> RedisResult<Link> {
        let client = link::client(&self.config.url, self.config.redis_ca_pem.as_deref())?;
        let mut conn = commands(&client).await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        self.run_id = run_id(&info);
        for script in [&*APPEND, &*TRIM, &*LEAVE, &*RENEW, &*JANITOR] {
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
    async fn serve(&mut self, mut link: Link, retiring: &mut Option<Job>) -> RedisResult<()> {
        let pending: Vec<Job> = self.pending.drain(..).collect();
        self.process(&mut link, pending).await?;
        let period = self.config.lease / 3;
        let mut tick_at = self.runtime.now() + period;
        let mut tick = Box::pin(self.runtime.sleep_until(tick_at));
        loop {
            let wake = poll_fn(|cx| {
                if tick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Tick);
                }
                if let Poll::Ready(message) = link.messages.poll_next_unpin(cx) {
                    return Poll::Ready(Wake::Message(message));
                }
                match self.jobs.poll_next_unpin(cx) {
                    Poll::Ready(Some(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            match self.jobs.poll_next_unpin(cx) {
                                Poll::Ready(Some(job)) => batch.push(job),
                                _ => break,
                            }
                        }
                        Poll::Ready(Wake::Jobs(batch))
                    }
                    Poll::Ready(None) => Poll::Ready(Wake::JobsClosed),
                    Poll::Pending => Poll::Pending,
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
                Wake::Jobs(batch) => {
                    if let Some(position) =
                        batch.iter().position(|j| matches!(j, Job::Retire { .. }))
                    {
                        let mut batch = batch;
                        let retire = batch.remove(position);
                        self.process(&mut link, batch).await?;
                        *retiring = Some(retire);
                        return self.retire(&mut link, retiring).await;
                    }
                    self.process(&mut link, batch).await?;
                }
                Wake::JobsClosed => return Ok(()),
            }
            if self.router.strong_count() == 0 {
                return Ok(());
            }
        }
    }

    /// Give up the lease and this replica's presence, then answer the retire job.
    async fn retire(&mut self, link: &mut Link, retiring: &mut Option<Job>) -> RedisResult<()> {
        let outcome = self.janitor(link, true).await.map(drop);
        if let Some(Job::Retire { reply }) = retiring.take() {
            let _ = reply.send(());
        }
        outcome
    }

    /// Execute a batch; on failure keep what must not be lost, and fail the link.
    async fn process(&mut self, link: &mut Link, batch: Vec<Job>) -> RedisResult<()> {
        let mut sends: Vec<RemoteSend> = Vec::new();
        let mut pipe = redis::pipe();
        let mut rest = Vec::new();
        for job in batch {
            match job {
                Job::Send(send) => sends.push(send),
                Job::Arrive(id) => {
                    pipe.cmd("SADD")
                        .arg(self.ns.connected_clients())
                        .arg(&id)
                        .ignore();
                    pipe.cmd("SADD")
                        .arg(self.ns.replica_ids(&self.replica))
                        .arg(&id)
                        .ignore();
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
                            kind,
                            client_id,
                            portal_id: portal.to_owned(),
                        };
                        pipe.cmd("PUBLISH")
                            .arg(self.ns.portal_channel())
                            .arg(event.encode())
                            .ignore();
                    }
                }
                other => rest.push(other),
            }
        }
        if !sends.is_empty() {
            let origin = Some(&*self.replica);
            match execute(&mut link.conn, &self.ns, origin, self.max_stored, &sends).await {
                Ok(outcome) => self.observe(outcome),
                Err(error) => {
                    sends
                        .into_iter()
                        .for_each(|send| self.keep(Job::Send(send)));
                    rest.into_iter().for_each(|job| self.keep(job));
                    return Err(error);
                }
            }
        }
        if pipe.cmd_iter().next().is_some() {
            pipe.query_async::<()>(&mut link.conn).await?;
        }
        let mut jobs = rest.into_iter();
        while let Some(job) = jobs.next() {
            let outcome = match &job {
                Job::Leave(id) => self.leave(link, id).await,
                Job::Load { id, .. } => match load(&mut link.conn, &self.ns, id).await {
                    Ok(messages) => {
                        if let Job::Load { reply, .. } = job {
                            let _ = reply.send(messages);
                        }
                        continue;
                    }
                    Err(error) => Err(error),
                },
                Job::Trim { id, count } => trim(&mut link.conn, &self.ns, id, *count).await,
                Job::Clear { id } => clear(&mut link.conn, &self.ns, id).await,
                _ => Ok(()),
            };
            if let Err(error) = outcome {
                self.keep(job);
                jobs.for_each(|job| self.keep(job));
                return Err(error);
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

    async fn leave(&self, link: &mut Link, id: &str) -> RedisResult<()> {
        let mut invocation = LEAVE.prepare_invoke();
        self.replica_args(&mut invocation);
        invocation.arg(id);
        invocation
            .invoke_async::<i64>(&mut link.conn)
            .await
            .map(drop)
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
