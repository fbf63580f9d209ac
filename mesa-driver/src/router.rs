//! The server's shared registry: the core's [`Hub`] plus each connection's outbox.
//! A send locks it briefly (no await inside), asks the hub who receives, and pushes
//! the one encoded frame into each target's outbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use mesa_core::{
    Action, Close, ConnId, Departure, Hub, Message, MessageOptions, Recipients, plan_remote,
};
use serde_json::Value;

use crate::cluster::ClusterHandle;
use crate::connection::SendError;
use crate::middleware::Middlewares;
use crate::outbox::{Outbound, Outbox, Refused};

/// Who a connection is, as the application sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) user: Value,
}

/// The part of a connection other tasks can reach.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) conn: ConnId,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) identity: Mutex<Option<Identity>>,
    pub(crate) outbox: Outbox,
}

#[derive(Debug)]
struct State {
    hub: Hub,
    conns: HashMap<ConnId, Arc<ConnShared>>,
    /// Connections admitted but still in their WebSocket handshake: they count
    /// toward the connection limit, so a burst of upgrades cannot overshoot it.
    handshaking: usize,
}

/// One of a server's connection slots ([`ServerBuilder::max_connections`](crate::ServerBuilder::max_connections)),
/// held from admission until the connection is registered, or until its handshakes
/// fail or time out; dropping it gives the slot back. [`Server::admit`](crate::Server::admit)
/// hands one to code that accepts connections itself.
#[must_use = "the slot is given back as soon as the admission is dropped"]
pub struct Admission {
    router: Arc<Router>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.router.lock();
        state.handshaking = state.handshaking.saturating_sub(1);
    }
}

/// The registry shared by a server's connection tasks and handles.
pub(crate) struct Router {
    state: Mutex<State>,
    pub(crate) middleware: Middlewares,
    outbound_cap: usize,
    /// The most distinct ids one send may address ([`mesa_core::Limits::max_recipients`]).
    max_recipients: usize,
    /// The cluster link, when the server replicates through Redis.
    pub(crate) cluster: OnceLock<ClusterHandle>,
    /// Connection tasks still running, closing handshakes included (a connection
    /// leaves the hub first, then finishes writing its close frame).
    live: AtomicUsize,
}

/// Counts a connection task as running until it is dropped.
pub(crate) struct LiveTask<'a>(&'a Router);

impl Drop for LiveTask<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a send did here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendReport {
    /// Local connections the message was queued for.
    pub delivered: usize,
    /// Explicit recipient ids with no connection here.
    pub absent: Vec<String>,
    /// Connections that were closed instead, for not reading fast enough.
    pub overflowed: usize,
}

impl Router {
    pub(crate) fn new(
        auth_required: bool,
        middleware: Middlewares,
        outbound_cap: usize,
        max_recipients: usize,
    ) -> Self {
        Router {
            state: Mutex::new(State {
                hub: Hub::new(auth_required),
                conns: HashMap::new(),
                handshaking: 0,
            }),
            middleware,
            outbound_cap,
            max_recipients,
            cluster: OnceLock::new(),
            live: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admit one more connection when fewer than `max` are open or handshaking
    /// (always, without a limit); `None` when the server is full.
    pub(crate) fn admit(self: &Arc<Self>, max: Option<usize>) -> Option<Admission> {
        let mut state = self.lock();
        if max.is_some_and(|max| state.conns.len() + state.handshaking >= max) {
            return None;
        }
        state.handshaking += 1;
        Some(Admission {
            router: self.clone(),
        })
    }

    pub(crate) fn register(&self, remote: Option<SocketAddr>) -> Arc<ConnShared> {
        let mut state = self.lock();
        let conn = state.hub.connect();
        let shared = Arc::new(ConnShared {
            conn,
            remote,
            identity: Mutex::new(None),
            outbox: Outbox::new(self.outbound_cap),
        });
        state.conns.insert(conn, shared.clone());
        shared
    }

    pub(crate) fn authenticate(&self, conn: ConnId, id: &str) -> Option<Departure> {
        self.lock().hub.authenticate(conn, id)
    }

    pub(crate) fn unregister(&self, conn: ConnId) -> Option<Departure> {
        let mut state = self.lock();
        if let Some(shared) = state.conns.remove(&conn) {
            shared.outbox.close();
        }
        state.hub.disconnect(conn)
    }

    /// Send to local connections, and hand the rest to the cluster (or report it
    /// undeliverable when there is no cluster); refuse a list over the recipient limit
    /// before anything is delivered or handed on.
    pub(crate) fn send(
        &self,
        message: &Message,
        options: Option<&MessageOptions>,
        recipients: &Recipients,
    ) -> Result<SendReport, SendError> {
        recipients.at_most(self.max_recipients)?;
        Ok(self.deliver(message, options, recipients))
    }

    /// [`send`](Self::send) once the recipient limit is known to hold.
    fn deliver(
        &self,
        message: &Message,
        options: Option<&MessageOptions>,
        recipients: &Recipients,
    ) -> SendReport {
        let report = self.deliver_local(message, recipients);
        match self.cluster.get() {
            Some(cluster) => {
                let plan = plan_remote(recipients, report.absent.clone(), cluster.sync);
                if !cluster.send(message, options, plan) {
                    self.middleware
                        .report("cluster queue full: a remote send was refused");
                }
            }
            None if !report.absent.is_empty() => {
                self.middleware
                    .emit(|m| m.on_undeliverable(message, &report.absent));
            }
            None => {}
        }
        report
    }

    /// Deliver to the local connections among `recipients` only (an envelope from
    /// another replica, or the local half of a send). Never refused for its number of
    /// recipients: the replica or Dispatcher that published it applied its own limit.
    pub(crate) fn deliver_local(&self, message: &Message, recipients: &Recipients) -> SendReport {
        let mut report = SendReport::default();
        {
            let state = self.lock();
            let delivery = state.hub.send(message, recipients);
            report.absent = delivery.absent;
            for target in &delivery.targets {
                let Some(shared) = state.conns.get(target) else {
                    continue;
                };
                let item = match &delivery.action {
                    Action::Write(frame) => Outbound::Frame(frame.clone()),
                    Action::Close(close) => Outbound::Close(close.clone()),
                    Action::Ignore => continue,
                };
                match shared.outbox.push(item) {
                    Ok(()) => report.delivered += 1,
                    Err(Refused::Overflow) => report.overflowed += 1,
                    Err(Refused::Closed) => {}
                }
            }
        }
        if report.delivered > 0 {
            self.middleware
                .emit(|m| m.on_message_sent(message, report.delivered));
        }
        report
    }

    pub(crate) fn close_all(&self, close: &Close) {
        let state = self.lock();
        for shared in state.conns.values() {
            let _ = shared.outbox.push(Outbound::Close(close.clone()));
        }
    }

    /// Count a connection task as running for as long as the guard lives.
    pub(crate) fn live_task(&self) -> LiveTask<'_> {
        self.live.fetch_add(1, Ordering::SeqCst);
        LiveTask(self)
    }

    /// Connection tasks still running, closing handshakes included.
    pub(crate) fn live_tasks(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    pub(crate) fn is_online(&self, id: &str) -> bool {
        self.lock().hub.is_online(id)
    }

    pub(crate) fn online_ids(&self) -> Vec<String> {
        self.lock().hub.online_ids().map(str::to_owned).collect()
    }
}

/// A cheap, cloneable handle for sending from anywhere in the application.
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) router: Arc<Router>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl ServerHandle {
    /// Send `message` to `recipients` (everyone, or ids). It is encoded once; with a
    /// cluster, recipients elsewhere get it through one PUBLISH, and with sync the
    /// offline ones get it stored.
    ///
    /// A list addressing more distinct ids than [`max_recipients`](Self::max_recipients)
    /// is refused with [`SendError::TooManyRecipients`]: nothing of it is delivered,
    /// published or stored.
    pub fn send(
        &self,
        message: &Message,
        recipients: &Recipients,
    ) -> Result<SendReport, SendError> {
        self.router.send(message, None, recipients)
    }

    /// [`send`](Self::send) with options, e.g. [`MessageOptions::no_sync`] for
    /// messages worthless later (typing indicators).
    pub fn send_with(
        &self,
        message: &Message,
        options: &MessageOptions,
        recipients: &Recipients,
    ) -> Result<SendReport, SendError> {
        self.router.send(message, Some(options), recipients)
    }

    /// Send to every connection (only authenticated ones when authentication is
    /// required). Never refused: the recipient limit bounds explicit lists only.
    pub fn broadcast(&self, message: &Message) -> SendReport {
        self.router.deliver(message, None, &Recipients::All)
    }

    /// Send to every connection of these ids, minus `excluding`; refused like
    /// [`send`](Self::send) when more than [`max_recipients`](Self::max_recipients)
    /// distinct ids remain after `excluding`.
    pub fn send_to<I, S>(
        &self,
        message: &Message,
        ids: I,
        excluding: &[String],
    ) -> Result<SendReport, SendError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let ids = ids.into_iter().map(Into::into).collect();
        self.send(message, &Recipients::from_ids(ids).excluding(excluding))
    }

    /// The most distinct ids one send may address ([`mesa_core::Limits::max_recipients`],
    /// set on the server builder): handlers that route their own messages check against it.
    pub fn max_recipients(&self) -> usize {
        self.router.max_recipients
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.router.connection_count()
    }

    /// Whether `id` has a connection here.
    pub fn is_online(&self, id: &str) -> bool {
        self.router.is_online(id)
    }

    /// The ids with a connection here.
    pub fn online_ids(&self) -> Vec<String> {
        self.router.online_ids()
    }
}
