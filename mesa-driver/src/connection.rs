//! One connection: the handle the application holds, and the driver loop that feeds
//! the core's [`ServerSession`] and executes its outputs (quinn's `ConnectionDriver`
//! shape). The loop decides nothing about the protocol.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
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

/// How long a redelivery waits for the stored messages before going on without them.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

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
    drive_io(inner, Box::new(Io::new(ws)), remote, admission)
}

/// The loop of [`drive`], on a boxed stream.
async fn drive_io<R, S, H>(
    inner: Arc<Inner<R, H>>,
    mut io: Box<Io<S>>,
    remote: Option<SocketAddr>,
    admission: Option<Admission>,
) where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let runtime = &inner.runtime;
    let router = inner.router.clone();
    let _live = router.live_task();
    let shared = router.register(remote);
    drop(admission);
    let conn = Connection {
        shared: shared.clone(),
        router: router.clone(),
    };
    let mut session = ServerSession::new(inner.config.clone(), runtime.now());
    let cluster = router.cluster.get();
    let presence = inner
        .config
        .authentication()
        .is_none_or(|a| a.store_connected_users);
    let submit = |job: Job| {
        if let Some(cluster) = cluster {
            if !cluster.submit(job) {
                router
                    .middleware
                    .report("cluster queue full: a job was refused");
            }
        }
    };
    let portals = cluster.is_some_and(|c| c.portals);
    let to_portal = |kind: PortalEventKind, client_id: Option<String>| {
        if portals {
            submit(Job::Portal { kind, client_id });
        }
    };
    submit(Job::Connections(1));
    to_portal(PortalEventKind::Connection, None);
    router.middleware.emit(|m| m.on_connection(&conn));
    inner.handler.on_connect(&conn).await;

    let mut timer: Option<(Instant, Pin<Box<R::Sleep>>)> = None;
    let mut auth: Option<BoxFuture<'static, Result<(String, Value), AuthError>>> = None;

    let close = loop {
        let (mut sent_frames, mut sent_bytes) = (0, 0);
        let closed = loop {
            while let Some(transmit) = session.poll_transmit() {
                io.pending.push_back(match transmit {
                    Transmit::Text(frame) => {
                        sent_frames += 1;
                        sent_bytes += frame.len();
                        text(frame)
                    }
                    Transmit::Close(close) => WsMessage::Close(Some(close_frame(&close))),
                });
            }
            let Some(event) = session.poll_event() else {
                break None;
            };
            match event {
                SessionEvent::AuthenticationRequested { credentials, .. } => {
                    auth = inner
                        .authenticator
                        .as_ref()
                        .map(|a| a.authenticate(credentials));
                }
                SessionEvent::Authenticated { id, user, .. } => {
                    if let Some(departure) = router.authenticate(shared.conn, &id) {
                        if departure.last && presence {
                            submit(Job::Leave(departure.id));
                        }
                    }
                    if presence {
                        submit(Job::Arrive(id.clone()));
                    }
                    to_portal(PortalEventKind::Authentication, Some(id.clone()));
                    *shared.identity.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Identity { id, user });
                    router.middleware.emit(|m| m.on_authenticated(&conn));
                    inner.handler.on_authenticated(&conn).await;
                }
                SessionEvent::Message(message) => {
                    if portals {
                        to_portal(PortalEventKind::Message(message.clone()), conn.id());
                    }
                    router
                        .middleware
                        .emit(|m| m.on_message_received(&conn, &message));
                    inner.handler.on_message(&conn, message).await;
                }
                SessionEvent::LoadUndelivered { id } => {
                    let (reply, stored) = futures_channel::oneshot::channel();
                    submit(Job::Load { id, reply });
                    // Redis unreachable for long: the messages stay stored for the
                    // next authentication, and this connection goes on meanwhile.
                    let deadline = runtime.now() + LOAD_TIMEOUT;
                    let timeout = Box::pin(runtime.sleep_until(deadline));
                    let stored = match futures_util::future::select(stored, timeout).await {
                        futures_util::future::Either::Left((Ok(stored), _)) => stored,
                        _ => Vec::new(),
                    };
                    let _ = session.handle_undelivered(runtime.now(), stored);
                }
                SessionEvent::ClearUndelivered { id } => submit(Job::Clear { id }),
                SessionEvent::Redelivered {
                    id,
                    delivered,
                    dropped,
                } => {
                    if delivered + dropped > 0 {
                        submit(Job::Trim {
                            id,
                            count: delivered + dropped,
                        });
                    }
                    if delivered > 0 {
                        router
                            .middleware
                            .emit(|m| m.on_redelivered(&conn, delivered));
                    }
                }
                SessionEvent::HeartbeatMissed { misses } => {
                    router
                        .middleware
                        .emit(|m| m.on_heartbeat_missed(&conn, misses));
                }
                SessionEvent::Closed { close, .. } => break Some(close),
            }
        };
        if sent_frames > 0 {
            router
                .middleware
                .emit(|m| m.on_frames_sent(&conn, sent_frames, sent_bytes));
        }
        if let Some(close) = closed {
            break close;
        }

        let deadline = session.poll_timeout();
        if timer.as_ref().map(|(at, _)| *at) != deadline {
            timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }

        let wake = poll_fn(|cx| {
            if let Poll::Ready(Err(error)) = io.poll_write(cx) {
                return Poll::Ready(Wake::WriteFailed(error));
            }
            if let Some(future) = auth.as_mut() {
                if let Poll::Ready(outcome) = future.poll_unpin(cx) {
                    auth = None;
                    return Poll::Ready(Wake::Auth(outcome));
                }
            }
            let take_items = io.pending.len() < WRITE_BACKLOG;
            if let Poll::Ready(drained) = shared.outbox.poll_drain(cx, take_items) {
                return Poll::Ready(Wake::Outbox(drained));
            }
            if let Some((_, sleep)) = timer.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    timer = None;
                    return Poll::Ready(Wake::Timer);
                }
            }
            io.poll_read(cx).map(Wake::Read)
        })
        .await;

        let now = runtime.now();
        match wake {
            Wake::Read(Some(Ok(WsMessage::Text(text)))) => {
                router
                    .middleware
                    .emit(|m| m.on_frames_received(&conn, 1, text.len()));
                session.handle_frame(now, &text)
            }
            Wake::Read(Some(Ok(WsMessage::Binary(_)))) => session.handle_binary(now),
            Wake::Read(Some(Ok(WsMessage::Close(frame)))) => {
                session.handle_peer_closed(now, Some(core_close(frame)))
            }
            Wake::Read(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {
                session.handle_control(now)
            }
            Wake::Read(Some(Ok(WsMessage::Frame(_)))) => {}
            Wake::Read(Some(Err(error))) => match read_failure(error, inner.config.limits()) {
                ReadFailure::Invalid(error) => session.handle_invalid(now, error),
                ReadFailure::Violation(close) => {
                    let _ = session.disconnect(close);
                }
                ReadFailure::Gone(close) => session.handle_peer_closed(now, Some(close)),
            },
            Wake::Read(None) => session.handle_peer_closed(now, None),
            Wake::WriteFailed(error) => {
                let close = Close::new(CloseCode::ABNORMAL, error.to_string());
                session.handle_peer_closed(now, Some(close));
            }
            Wake::Auth(Ok((id, user))) => {
                let _ = session.accept(now, id, user);
            }
            Wake::Auth(Err(error)) => {
                let _ = session.reject(now, &error.0);
            }
            Wake::Timer => session.handle_timeout(now),
            Wake::Outbox(drained) => {
                if drained.overflowed {
                    router.middleware.emit(|m| m.on_queue_overflow(&conn));
                    let reason = "slow consumer: outbound queue full";
                    let _ = session.disconnect(Close::new(CloseCode::TRY_AGAIN_LATER, reason));
                }
                for item in drained.items {
                    let _ = match item {
                        Outbound::Frame(frame) => session.send(frame),
                        Outbound::Close(close) => session.disconnect(close),
                        Outbound::UpdateUser(user) => session.update_user(user),
                    };
                }
            }
        }
    };

    if let Some(departure) = router.unregister(shared.conn) {
        if departure.last && presence {
            submit(Job::Leave(departure.id));
        }
    }
    submit(Job::Connections(-1));
    to_portal(PortalEventKind::Disconnection, conn.id());
    let linger = runtime.sleep_until(runtime.now() + inner.transport.close_timeout);
    futures_util::future::select(Box::pin(io.linger()), Box::pin(linger)).await;
    tracing::debug!(conn = shared.conn.0, code = close.code.0, reason = %close.reason, "closed");
    router
        .middleware
        .emit(|m| m.on_disconnection(&conn, &close));
    inner.handler.on_disconnect(&conn, &close).await;
}
