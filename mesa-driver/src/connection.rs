//! One connection: the handle the application holds, and the driver loop that feeds
//! the core's [`ServerSession`] and executes its outputs (quinn's `ConnectionDriver`
//! shape). The loop decides nothing about the protocol.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_channel::oneshot;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::FutureExt;
use mesa_core::{
    Close, CloseCode, ConnId, Message, PortalEventKind, ServerSession, SessionEvent, Transmit,
};
use serde_json::Value;

use crate::cluster::Job;
use crate::handler::{AuthError, BoxFuture, Handler};
use crate::io::Io;
use crate::outbox::{Drained, Outbound, Refused};
use crate::router::{Admission, ConnShared, Identity, Router, ServerHandle};
use crate::runtime::Runtime;
use crate::server::Inner;
use crate::transport::{ReadFailure, close_frame, core_close, read_failure, text};

/// Frames written but not yet flushed before the outbox stops being drained: the
/// outbox's byte cap, not this queue, absorbs a slow reader.
const WRITE_BACKLOG: usize = 32;

/// A connection as the application sees it. Cloning is cheap; every method works
/// from any task.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<ConnShared>,
    router: Arc<Router>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("conn", &self.shared.conn)
            .field("id", &self.id())
            .finish()
    }
}

/// Why a connection (or, for too many recipients, a server) did not take a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// The connection's outbound queue is full; it is being closed as a slow consumer.
    #[error("the connection's outbound queue is full")]
    Overflow,
    /// A send addressed more distinct ids than `Limits::max_recipients`; nothing of it
    /// was delivered, published or stored.
    #[error(transparent)]
    TooManyRecipients(#[from] mesa_core::TooManyRecipients),
}

impl From<Refused> for SendError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Closed => SendError::Closed,
            Refused::Overflow => SendError::Overflow,
        }
    }
}

impl Connection {
    /// The connection's handle inside this server.
    pub fn conn_id(&self) -> ConnId {
        self.shared.conn
    }

    /// The peer's address, when known.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.shared.remote
    }

    /// The authenticated id.
    pub fn id(&self) -> Option<String> {
        self.identity().map(|i| i.id)
    }

    /// The authenticated user object.
    pub fn user(&self) -> Option<Value> {
        self.identity().map(|i| i.user)
    }

    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.identity().is_some()
    }

    fn identity(&self) -> Option<Identity> {
        self.shared
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Send `message` to this connection only.
    pub fn send(&self, message: &Message) -> Result<(), SendError> {
        Ok(self.shared.outbox.push(Outbound::Frame(message.encode()))?)
    }

    /// Close the connection with `close`.
    pub fn disconnect(&self, close: Close) -> Result<(), SendError> {
        Ok(self.shared.outbox.push(Outbound::Close(close))?)
    }

    /// Replace the user object (no frame is sent, as upstream).
    pub fn update_user(&self, user: Value) -> Result<(), SendError> {
        if let Some(identity) = self
            .shared
            .identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            identity.user = user.clone();
        }
        Ok(self.shared.outbox.push(Outbound::UpdateUser(user))?)
    }

    /// A handle for sending to other connections.
    pub fn server(&self) -> ServerHandle {
        ServerHandle {
            router: self.router.clone(),
        }
    }
}

/// What woke the driver loop.
enum Wake {
    Read(Option<Result<WsMessage, WsError>>),
    WriteFailed(WsError),
    Outbox(Drained),
    Timer,
    Auth(Result<(String, Value), AuthError>),
    /// The stored messages the cluster loaded (none if it dropped the job).
    Load(Vec<Message>),
}

/// Drive one upgraded connection until it closes. Its `admission` slot (if any) is
/// given back once the connection is registered, and so counted as open.
///
/// The stream goes to the heap before the loop's future exists: an async fn keeps
/// its arguments for its whole life beside the locals made from them, so taking the
/// stream by value would hold it twice in every connection's task (~700 bytes).
pub(crate) fn drive<R, S, H>(
    inner: Arc<Inner<R, H>>,
    ws: WebSocketStream<S>,
    remote: Option<SocketAddr>,
    admission: Option<Admission>,
) -> impl Future<Output = ()> + Send
where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    run(inner, Box::new(Io::new(ws)), remote, admission)
}

/// The life of one connection of [`drive`], on a boxed stream: register, loop, leave.
async fn run<R, S, H>(
    inner: Arc<Inner<R, H>>,
    io: Box<Io<S>>,
    remote: Option<SocketAddr>,
    admission: Option<Admission>,
) where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let router = inner.router.clone();
    let _live = router.live_task();
    let shared = router.register(remote);
    drop(admission);
    let mut driver = Driver::new(inner, io, shared);
    driver.open().await;
    let close = driver.run().await;
    driver.finish(close).await;
}

/// One connection's loop (quinn's `ConnectionDriver`): the session, the socket, and
/// the inputs the loop waits on besides the socket. Every input is polled, never
/// awaited inside the drain step, so that nothing (the application's
/// authentication, a Redis load) holds back writing and heartbeats.
struct Driver<R: Runtime, S, H> {
    inner: Arc<Inner<R, H>>,
    conn: Connection,
    session: ServerSession,
    io: Box<Io<S>>,
    /// The sleep armed for the session's next deadline, with that deadline.
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
    /// The application's answer to the pending authentication.
    auth: Option<BoxFuture<'static, Result<(String, Value), AuthError>>>,
    /// The cluster's answer to the pending load of stored messages.
    load: Option<oneshot::Receiver<Vec<Message>>>,
    /// Authenticated ids go to the cluster's presence set.
    presence: bool,
}

impl<R, S, H> Driver<R, S, H>
where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    fn new(inner: Arc<Inner<R, H>>, io: Box<Io<S>>, shared: Arc<ConnShared>) -> Self {
        let conn = Connection {
            shared,
            router: inner.router.clone(),
        };
        let session = ServerSession::new(inner.config.clone(), inner.runtime.now());
        let presence = inner
            .config
            .authentication()
            .is_none_or(|a| a.store_connected_users);
        Driver {
            inner,
            conn,
            session,
            io,
            timer: None,
            auth: None,
            load: None,
            presence,
        }
    }

    fn router(&self) -> &Router {
        &self.conn.router
    }

    /// Hand `job` to the cluster task, if there is one; a full queue is reported,
    /// never waited for.
    fn submit(&self, job: Job) {
        if let Some(cluster) = self.router().cluster.get() {
            if !cluster.submit(job) {
                self.router()
                    .middleware
                    .report("cluster queue full: a job was refused");
            }
        }
    }

    /// Whether client events are forwarded to portals.
    fn portals(&self) -> bool {
        self.router().cluster.get().is_some_and(|c| c.portals)
    }

    /// Tell the portals about a client event, when they are told.
    fn to_portal(&self, kind: PortalEventKind, client_id: Option<String>) {
        if self.portals() {
            self.submit(Job::Portal { kind, client_id });
        }
    }

    /// Count the connection in and tell the observers and the application.
    async fn open(&mut self) {
        self.submit(Job::Connections(1));
        self.to_portal(PortalEventKind::Connection, None);
        self.router()
            .middleware
            .emit(|m| m.on_connection(&self.conn));
        self.inner.handler.on_connect(&self.conn).await;
    }

    /// Feed inputs to the session and execute its outputs until it closes.
    async fn run(&mut self) -> Close {
        loop {
            if let Some(close) = self.drain().await {
                return close;
            }
            self.arm_timer();
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            self.handle(wake);
        }
    }

    /// Queue the session's frames for the writer and act on its events until both
    /// are drained; the close once the session closed.
    async fn drain(&mut self) -> Option<Close> {
        let (mut frames, mut bytes) = (0, 0);
        let closed = loop {
            while let Some(transmit) = self.session.poll_transmit() {
                self.io.pending.push_back(match transmit {
                    Transmit::Text(frame) => {
                        frames += 1;
                        bytes += frame.len();
                        text(frame)
                    }
                    Transmit::Close(close) => WsMessage::Close(Some(close_frame(&close))),
                });
            }
            let Some(event) = self.session.poll_event() else {
                break None;
            };
            if let Some(close) = self.handle_event(event).await {
                break Some(close);
            }
        };
        if frames > 0 {
            self.router()
                .middleware
                .emit(|m| m.on_frames_sent(&self.conn, frames, bytes));
        }
        closed
    }

    /// Act on one event of the session; the close if it was the last.
    async fn handle_event(&mut self, event: SessionEvent) -> Option<Close> {
        match event {
            SessionEvent::AuthenticationRequested { credentials, .. } => {
                self.auth = self
                    .inner
                    .authenticator
                    .as_ref()
                    .map(|a| a.authenticate(credentials));
            }
            SessionEvent::Authenticated { id, user, .. } => {
                if let Some(departure) = self.router().authenticate(self.conn.shared.conn, &id) {
                    if departure.last && self.presence {
                        self.submit(Job::Leave(departure.id));
                    }
                }
                if self.presence {
                    self.submit(Job::Arrive(id.clone()));
                }
                self.to_portal(PortalEventKind::Authentication, Some(id.clone()));
                *self
                    .conn
                    .shared
                    .identity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Identity { id, user });
                self.router()
                    .middleware
                    .emit(|m| m.on_authenticated(&self.conn));
                self.inner.handler.on_authenticated(&self.conn).await;
            }
            SessionEvent::Message(message) => {
                if self.portals() {
                    let kind = PortalEventKind::Message(message.clone());
                    self.to_portal(kind, self.conn.id());
                }
                self.router()
                    .middleware
                    .emit(|m| m.on_message_received(&self.conn, &message));
                self.inner.handler.on_message(&self.conn, message).await;
            }
            SessionEvent::LoadUndelivered { id } => {
                // The answer is one more input (`Wake::Load`): op 22 and heartbeats go
                // out meanwhile, and the session's load timeout bounds the wait.
                let (reply, stored) = oneshot::channel();
                self.submit(Job::Load { id, reply });
                self.load = Some(stored);
            }
            SessionEvent::ClearUndelivered { id } => self.submit(Job::Clear { id }),
            SessionEvent::Redelivered {
                id,
                delivered,
                dropped,
            } => {
                if delivered + dropped > 0 {
                    self.submit(Job::Trim {
                        id,
                        count: delivered + dropped,
                    });
                }
                if delivered > 0 {
                    self.router()
                        .middleware
                        .emit(|m| m.on_redelivered(&self.conn, delivered));
                }
            }
            SessionEvent::HeartbeatMissed { misses } => {
                self.router()
                    .middleware
                    .emit(|m| m.on_heartbeat_missed(&self.conn, misses));
            }
            SessionEvent::Closed { close, .. } => return Some(close),
        }
        None
    }

    /// Arm the timer for the session's next deadline, unless it is armed for it.
    fn arm_timer(&mut self) {
        let deadline = self.session.poll_timeout();
        if self.timer.as_ref().map(|(at, _)| *at) != deadline {
            let runtime = &self.inner.runtime;
            self.timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }
    }

    /// Write what can be written, then return the first input that is ready.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Poll::Ready(Err(error)) = self.io.poll_write(cx) {
            return Poll::Ready(Wake::WriteFailed(error));
        }
        if let Some(future) = self.auth.as_mut() {
            if let Poll::Ready(outcome) = future.poll_unpin(cx) {
                self.auth = None;
                return Poll::Ready(Wake::Auth(outcome));
            }
        }
        if let Some(stored) = self.load.as_mut() {
            if let Poll::Ready(outcome) = stored.poll_unpin(cx) {
                self.load = None;
                // A job the cluster dropped (its queue full, or it stopped) loads nothing.
                return Poll::Ready(Wake::Load(outcome.unwrap_or_default()));
            }
        }
        // Stored messages precede live ones: while they load, live items wait in the
        // outbox (whose overflow is still reported).
        let take_items =
            self.io.pending.len() < WRITE_BACKLOG && !self.session.awaits_undelivered();
        if let Poll::Ready(drained) = self.conn.shared.outbox.poll_drain(cx, take_items) {
            return Poll::Ready(Wake::Outbox(drained));
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                self.timer = None;
                return Poll::Ready(Wake::Timer);
            }
        }
        if self.session.read_paused_until().is_some() {
            // Past its message rate: the peer waits in TCP until the timer resumes us.
            return Poll::Pending;
        }
        self.io.poll_read(cx).map(Wake::Read)
    }

    /// Feed one input to the session.
    fn handle(&mut self, wake: Wake) {
        let now = self.inner.runtime.now();
        match wake {
            Wake::Read(read) => self.handle_read(now, read),
            Wake::WriteFailed(error) => {
                let close = Close::new(CloseCode::ABNORMAL, error.to_string());
                self.session.handle_peer_closed(now, Some(close));
            }
            Wake::Auth(Ok((id, user))) => {
                let _ = self.session.accept(now, id, user);
            }
            Wake::Auth(Err(error)) => {
                let _ = self.session.reject(now, error.reason());
            }
            // Refused once the session's load timeout passed: the messages stay stored.
            Wake::Load(stored) => {
                let _ = self.session.handle_undelivered(now, stored);
            }
            Wake::Timer => {
                self.session.handle_timeout(now);
                if !self.session.awaits_undelivered() {
                    // The session gave up on the load: its answer no longer matters.
                    self.load = None;
                }
            }
            Wake::Outbox(drained) => self.handle_outbox(drained),
        }
    }

    /// Feed what the socket gave to the session.
    fn handle_read(&mut self, now: Instant, read: Option<Result<WsMessage, WsError>>) {
        let session = &mut self.session;
        match read {
            Some(Ok(WsMessage::Text(text))) => {
                self.conn
                    .router
                    .middleware
                    .emit(|m| m.on_frames_received(&self.conn, 1, text.len()));
                session.handle_frame(now, &text)
            }
            Some(Ok(WsMessage::Binary(_))) => session.handle_binary(now),
            Some(Ok(WsMessage::Close(frame))) => {
                session.handle_peer_closed(now, Some(core_close(frame)))
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => session.handle_control(now),
            Some(Ok(WsMessage::Frame(_))) => {}
            Some(Err(error)) => match read_failure(error, self.inner.config.limits()) {
                ReadFailure::Invalid(error) => session.handle_invalid(now, error),
                ReadFailure::Violation(close) => {
                    let _ = session.disconnect(close);
                }
                ReadFailure::Gone(close) => session.handle_peer_closed(now, Some(close)),
            },
            None => session.handle_peer_closed(now, None),
        }
    }

    /// Hand what other tasks queued for this connection to the session.
    fn handle_outbox(&mut self, drained: Drained) {
        if drained.overflowed {
            self.router()
                .middleware
                .emit(|m| m.on_queue_overflow(&self.conn));
            let reason = "slow consumer: outbound queue full";
            let _ = self
                .session
                .disconnect(Close::new(CloseCode::TRY_AGAIN_LATER, reason));
        }
        for item in drained.items {
            let _ = match item {
                Outbound::Frame(frame) => self.session.send(frame),
                Outbound::Close(close) => self.session.disconnect(close),
                Outbound::UpdateUser(user) => self.session.update_user(user),
            };
        }
    }

    /// Leave the hub and the cluster, finish the closing handshake (bounded), then
    /// tell the observers and the application.
    async fn finish(mut self, close: Close) {
        let conn = &self.conn;
        if let Some(departure) = conn.router.unregister(conn.shared.conn) {
            if departure.last && self.presence {
                self.submit(Job::Leave(departure.id));
            }
        }
        self.submit(Job::Connections(-1));
        self.to_portal(PortalEventKind::Disconnection, self.conn.id());
        let runtime = &self.inner.runtime;
        let linger = runtime.sleep_until(runtime.now() + self.inner.transport.close_timeout);
        futures_util::future::select(Box::pin(self.io.linger()), Box::pin(linger)).await;
        let conn = &self.conn;
        tracing::debug!(conn = conn.shared.conn.0, code = close.code.0, reason = %close.reason, "closed");
        conn.router
            .middleware
            .emit(|m| m.on_disconnection(conn, &close));
        self.inner.handler.on_disconnect(conn, &close).await;
    }
}
