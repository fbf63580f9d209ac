//! The Portal: receive the client events of a cluster's servers (connections,
//! authentications, messages, disconnections) in any process, wire-compatible with
//! `@cryb/mesa`'s `Portal`.
//!
//! A portal registers its id in `ns("available_portals_pool")` (the set, and a
//! `{"id","ready":true}` on the same-named channel); servers with portals on pick one
//! portal per event (round robin or at random) and publish it on `ns("portal")`. A
//! portal takes the events addressed to it, or every event with
//! [`report_all_events`](PortalBuilder::report_all_events). [`Portal::close`] (or
//! dropping it) leaves the pool.
//!
//! Unlike upstream's (ioredis resubscribes but never registers again), ours detects a
//! dead link with its own PING timeout, reconnects with backoff, resubscribes, and
//! registers again when Redis lost its registration (a restart).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::future::{Either, select};
use futures_util::{Stream, StreamExt};
use mesa_core::rng::Rng;
use mesa_core::{Backoff, BackoffConfig, Namespace, PortalEvent, PortalUpdate};
use redis::{Msg, RedisResult};

use crate::cluster::link::{self, Link, bounded, check_ca_pem, commands};
use crate::runtime::{Runtime, entropy_seed};

/// How often a live link is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);
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
    Redis(#[source] crate::RedisFailure),
    /// The CA certificates for `rediss://` cannot be used.
    #[error("Redis CA certificate: {0}")]
    Tls(#[from] crate::TlsError),
    /// The portal's task is gone (its runtime shut down).
    #[error("the portal's task is gone")]
    Gone,
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
        let client = link::client(&self.url, self.redis_ca_pem.as_deref())
            .map_err(|error| PortalError::InvalidUrl(error.to_string()))?;
        let seed = entropy_seed();
        let id = self.id.unwrap_or_else(|| uuid_v4(seed));
        let (events, receiver) = mpsc::channel(CAPACITY);
        let (stop_tx, stop) = oneshot::channel();
        let mut task = PortalTask {
            runtime: self.runtime.clone(),
            client,
            ns: Namespace::new(self.namespace),
            id: id.clone(),
            all: self.report_all_events,
            events,
            stop,
            backoff: Backoff::new(
                BackoffConfig {
                    base: Duration::from_millis(100),
                    cap: Duration::from_secs(5),
                    base_is_fixed: true,
                },
                seed,
            ),
        };
        let link = task.connect().await?;
        self.runtime.spawn(task.run(link));
        Ok(Portal {
            id,
            events: receiver,
            stop: Some(stop_tx),
        })
    }
}

/// Asks the task to leave the pool and stop; it answers on the enclosed channel.
type Stop = oneshot::Sender<Result<(), PortalError>>;

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

/// A random UUID v4 in upstream's format (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
fn uuid_v4(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.next_u64().to_be_bytes());
    bytes[8..].copy_from_slice(&rng.next_u64().to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The background half of a portal: owns its Redis connections.
struct PortalTask<R> {
    runtime: R,
    client: redis::Client,
    ns: Namespace,
    id: String,
    all: bool,
    events: mpsc::Sender<PortalEvent>,
    stop: oneshot::Receiver<Stop>,
    backoff: Backoff,
}

enum Wake {
    /// Asked to stop (`None`: the portal was dropped).
    Stop(Option<Stop>),
    /// The portal no longer takes events.
    Dropped,
    Message(Option<Msg>),
    Tick,
}

impl<R: Runtime> PortalTask<R> {
    async fn run(mut self, link: Link) {
        let mut link = Some(link);
        loop {
            let live = match link.take() {
                Some(live) => live,
                None => match self.connect().await {
                    Ok(live) => {
                        tracing::info!(portal = %self.id, "portal link up");
                        self.backoff.reset();
                        live
                    }
                    Err(error) => {
                        tracing::warn!(portal = %self.id, %error, "portal link down: cannot reach Redis");
                        if let Some(stop) = self.wait_backoff().await {
                            // Redis is unreachable: nothing to leave.
                            if let Some(reply) = stop {
                                let _ = reply.send(Err(error));
                            }
                            return;
                        }
                        continue;
                    }
                },
            };
            match self.serve(live).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(portal = %self.id, %error, "portal link down");
                    if let Some(stop) = self.wait_backoff().await {
                        if let Some(reply) = stop {
                            let _ = reply.send(Err(error.into()));
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Sleep before reconnecting; `Some` when asked to stop meanwhile.
    async fn wait_backoff(&mut self) -> Option<Option<Stop>> {
        let until = self.runtime.now() + self.backoff.next_delay();
        let sleep = Box::pin(self.runtime.sleep_until(until));
        match select(sleep, &mut self.stop).await {
            Either::Left(((), _)) => None,
            Either::Right((stop, _)) => Some(stop.ok()),
        }
    }

    /// Connect, subscribe, and join the pool.
    async fn connect(&mut self) -> Result<Link, PortalError> {
        let mut conn = commands(&self.client).await?;
        let pubsub = bounded(&self.runtime, self.client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        bounded(&self.runtime, sink.subscribe(self.ns.portal_channel())).await?;
        // Subscribed first, so no event addressed to us is published before we listen.
        // Announce only when the set did not hold us: an upstream server appends every
        // announcement to its list (a duplicate skews its round robin).
        let pool = self.ns.available_portals_pool();
        let added: i64 = redis::cmd("SADD")
            .arg(&pool)
            .arg(&self.id)
            .query_async(&mut conn)
            .await?;
        if added == 1 {
            let update = PortalUpdate {
                id: self.id.clone(),
                ready: true,
            };
            redis::cmd("PUBLISH")
                .arg(&pool)
                .arg(update.encode())
                .query_async::<i64>(&mut conn)
                .await?;
        }
        Ok(Link {
            conn,
            sink,
            messages: Box::pin(stream),
        })
    }

    /// Forward events until asked to stop (`Ok`) or the link fails (`Err`).
    async fn serve(&mut self, mut link: Link) -> RedisResult<()> {
        let mut tick = Box::pin(self.runtime.sleep_until(self.runtime.now() + PING_EVERY));
        loop {
            let wake = poll_fn(|cx| {
                if let Poll::Ready(stop) = Pin::new(&mut self.stop).poll(cx) {
                    return Poll::Ready(Wake::Stop(stop.ok()));
                }
                if tick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Tick);
                }
                // Read Redis only when the portal can take an event (backpressure).
                match self.events.poll_ready(cx) {
                    Poll::Ready(Ok(())) => link.messages.poll_next_unpin(cx).map(Wake::Message),
                    Poll::Ready(Err(_)) => Poll::Ready(Wake::Dropped),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match wake {
                Wake::Stop(reply) => {
                    let outcome = self.leave(&mut link).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome.map_err(PortalError::from));
                    }
                    return Ok(());
                }
                Wake::Dropped => {
                    let _ = self.leave(&mut link).await;
                    return Ok(());
                }
                Wake::Tick => {
                    tick = Box::pin(self.runtime.sleep_until(self.runtime.now() + PING_EVERY));
                    // In subscribed mode the reply is an array, not +PONG: any answer will do.
                    bounded(&self.runtime, link.sink.ping::<redis::Value>()).await?;
                }
                Wake::Message(Some(message)) => self.on_message(&message),
                Wake::Message(None) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "the pub/sub connection closed",
                    )));
                }
            }
        }
    }

    fn on_message(&mut self, message: &Msg) {
        let Ok(payload) = message.get_payload::<String>() else {
            return;
        };
        match PortalEvent::decode(&payload) {
            Ok(event) if self.all || event.portal_id == self.id => {
                // Room was checked before reading: this cannot be full.
                let _ = self.events.try_send(event);
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(portal = %self.id, %error, "undecodable portal event"),
        }
    }

    /// Leave the pool: SREM, then announce it (only when we were still in the set, so
    /// that an upstream server never hears of a portal it did not know: it would
    /// remove the last one of its list instead).
    async fn leave(&self, link: &mut Link) -> RedisResult<()> {
        let pool = self.ns.available_portals_pool();
        let removed: i64 = redis::cmd("SREM")
            .arg(&pool)
            .arg(&self.id)
            .query_async(&mut link.conn)
            .await?;
        if removed == 1 {
            let update = PortalUpdate {
                id: self.id.clone(),
                ready: false,
            };
            redis::cmd("PUBLISH")
                .arg(&pool)
                .arg(update.encode())
                .query_async::<i64>(&mut link.conn)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_upstreams_uuids() {
        let id = uuid_v4(42);
        assert_eq!(id.len(), 36);
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"));
        assert_ne!(uuid_v4(1), uuid_v4(2));
    }
}
