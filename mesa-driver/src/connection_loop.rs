//! One connection's driver loop: it feeds the core's [`ServerSession`] and executes
//! its outputs (quinn's `ConnectionDriver` shape), and hands the session's events to
//! the registry (the cluster's replica decides presence, portals and stored
//! messages), the middleware and the application. It decides nothing.

use std::collections::VecDeque;
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
use mesa_core::rooms::{RefusalCode, RoomNotice, RoomRefusal, RoomRequest};
use mesa_core::{Close, CloseCode, Message, ServerSession, SessionEvent, Transmit};
use serde_json::Value;

use crate::context::ServerContext;
use crate::handle::{Admission, Connection};
use crate::hooks::{AuthError, BoxFuture, Handler, RoomAccess, RoomAccessKind};
use crate::io::{Io, poll_send_from};
use crate::outbox::{Drained, Outbound};
use crate::registry::{ConnShared, Identity, Members, lock};
use crate::runtime::Runtime;
use crate::transport::{ReadFailure, close_frame, core_close, read_failure, text};

/// Frames the sink has not taken yet (they wait in the session) before the outbox
/// stops being drained: the outbox's byte cap, not the session's queue, absorbs a
/// slow reader.
const WRITE_BACKLOG: usize = 32;

/// What woke the driver loop.
enum Wake {
    Read(Option<Result<WsMessage, WsError>>),
    WriteFailed(WsError),
    Outbox(Drained),
    Timer,
    Auth(Result<(String, Value), AuthError>),
    /// The stored messages the cluster loaded (none if it dropped the load).
    Load(Vec<Message>),
    /// The application's hook in progress returned (an authorization, with its
    /// request and decision).
    Handled(Option<Authorized>),
    /// The answer to a presence request: its room and reference, and the members
    /// (or why there are none to tell).
    Presence(String, Value, Result<Vec<(String, u64)>, RoomRefusal>),
}

/// A presence request awaiting the cluster's answer: its room and reference.
type PendingPresence = (String, Value, oneshot::Receiver<Members>);

/// A room request and the authorization's decision.
type Authorized = (Box<RoomRequest>, Result<(), RoomRefusal>);

/// Drive one upgraded connection until it closes: open, loop, leave. Its
/// `admission` slot (if any) is given back once the connection is registered, and
/// so counted as open.
///
/// The connection is registered and its driver built before the loop's future
/// exists, which captures only the driver: an async fn keeps its arguments for its
/// whole life beside the locals made from them, so the stream, the address and the
/// admission would each keep room in every connection's task (the stream twice).
pub(crate) fn drive<R, S, H>(
    inner: Arc<ServerContext<R, H>>,
    ws: WebSocketStream<S>,
    remote: Option<SocketAddr>,
    admission: Option<Admission>,
) -> impl Future<Output = ()> + Send
where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let registry = inner.registry.clone();
    let shared = registry.register(remote);
    drop(admission);
    let mut driver = Driver::new(inner, Box::new(Io::new(ws)), shared);
    async move {
        let _live = registry.live_task();
        // Opening and finishing await the application's hooks, once each: boxed,
        // their state takes memory only while they run, not in every task.
        Box::pin(driver.open()).await;
        let close = driver.run().await;
        Box::pin(driver.finish(close)).await;
    }
}

/// A call of the application's handler or room authorization, waiting its turn.
enum AppCall {
    Authenticated,
    Message(Message),
    Authorize(Box<RoomRequest>),
}

/// One connection's loop (quinn's `ConnectionDriver`): the session, the socket, and
/// the inputs the loop waits on besides the socket. Every input is polled, never
/// awaited inside the drain step, so that nothing (the application's
/// authentication or handler, a Redis load) holds back writing and heartbeats.
struct Driver<R: Runtime, S, H> {
    inner: Arc<ServerContext<R, H>>,
    conn: Connection,
    session: ServerSession,
    io: Box<Io<S>>,
    /// The sleep armed for the session's next deadline, with that deadline.
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
    /// The application's answer to the pending authentication.
    auth: Option<BoxFuture<'static, Result<(String, Value), AuthError>>>,
    /// The cluster's answer to the pending load of stored messages.
    load: Option<oneshot::Receiver<Vec<Message>>>,
    /// The handler's hook in progress, and the calls waiting behind it, in the
    /// order the session produced them. Reading waits while either is there: a
    /// slow handler slows its own client down, never the heartbeats.
    hook: Option<BoxFuture<'static, Option<Authorized>>>,
    calls: VecDeque<AppCall>,
    /// Presence requests awaiting their answers (the session bounds them).
    presence: Vec<PendingPresence>,
}

impl<R, S, H> Driver<R, S, H>
where
    R: Runtime,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    fn new(inner: Arc<ServerContext<R, H>>, io: Box<Io<S>>, shared: Arc<ConnShared>) -> Self {
        let conn = Connection::new(shared, inner.registry.clone());
        let session = ServerSession::new(inner.config.clone(), inner.runtime.now());
        Driver {
            inner,
            conn,
            session,
            io,
            timer: None,
            auth: None,
            load: None,
            hook: None,
            calls: VecDeque::new(),
            presence: Vec::new(),
        }
    }

    fn shared(&self) -> &ConnShared {
        self.conn.shared()
    }

    /// Tell the observers and the application.
    async fn open(&mut self) {
        self.inner.middleware.emit(|m| m.on_connection(&self.conn));
        self.inner.handler.on_connect(&self.conn).await;
    }

    /// Feed inputs to the session and execute its outputs until it closes.
    async fn run(&mut self) -> Close {
        loop {
            if let Some(close) = self.drain() {
                return close;
            }
            self.next_hook();
            self.arm_timer();
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            self.handle(wake);
        }
    }

    /// Act on the session's events until they are drained; the close once the
    /// session closed. Its frames wait in it until the sink takes them
    /// ([`poll_send`](Self::poll_send)).
    fn drain(&mut self) -> Option<Close> {
        while let Some(event) = self.session.poll_event() {
            if let Some(close) = self.handle_event(event) {
                return Some(close);
            }
        }
        None
    }

    /// Hand the sink the session's frames while it takes them, straight from the
    /// session's queue (no queue of the loop's own to fill and free per batch).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.session.queued_transmits() == 0 {
            return Poll::Ready(Ok(()));
        }
        let (mut frames, mut bytes) = (0, 0);
        let session = &mut self.session;
        let sent = poll_send_from(&mut self.io.ws, cx, || {
            let transmit = session.poll_transmit()?;
            Some(ws_message(transmit, &mut frames, &mut bytes))
        });
        self.frames_sent(frames, bytes);
        sent
    }

    /// Tell the middleware about frames handed to the sink.
    fn frames_sent(&self, frames: usize, bytes: usize) {
        if frames > 0 {
            self.inner
                .middleware
                .emit(|m| m.on_frames_sent(&self.conn, frames, bytes));
        }
    }

    /// Act on one event of the session; the close if it was the last. The registry
    /// hears every event first (the cluster's replica acts on authentication,
    /// messages and stored messages).
    fn handle_event(&mut self, event: SessionEvent) -> Option<Close> {
        if let SessionEvent::Closed { close, .. } = event {
            return Some(close);
        }
        if let SessionEvent::LoadUndelivered { .. } = &event {
            // The answer is one more input (`Wake::Load`): op 22 and heartbeats go
            // out meanwhile, and the session's load timeout bounds the wait.
            self.load = Some(self.shared().await_stored());
        }
        let middleware = &self.inner.middleware;
        self.inner
            .registry
            .session_event(self.shared().conn, &event);
        match event {
            SessionEvent::AuthenticationRequested { credentials, .. } => {
                self.auth = self
                    .inner
                    .authenticator
                    .as_ref()
                    .map(|a| a.authenticate(credentials));
            }
            SessionEvent::Authenticated { id, user, .. } => {
                *lock(&self.shared().identity) = Some(Identity::new(&id, &user));
                middleware.emit(|m| m.on_authenticated(&self.conn));
                self.call(AppCall::Authenticated);
            }
            SessionEvent::Message(message) => {
                middleware.emit(|m| m.on_message_received(&self.conn, &message));
                self.call(AppCall::Message(message));
            }
            SessionEvent::Redelivered { delivered, .. } if delivered > 0 => {
                middleware.emit(|m| m.on_redelivered(&self.conn, delivered));
            }
            SessionEvent::HeartbeatMissed { misses } => {
                middleware.emit(|m| m.on_heartbeat_missed(&self.conn, misses));
            }
            SessionEvent::Room(request) => self.room_request(request),
            _ => {}
        }
        None
    }

    /// A room request: an unsubscribe is done at once; a subscribe or a publish as the
    /// room policy decides, or once the application's authorization answered.
    fn room_request(&mut self, request: Box<RoomRequest>) {
        // The session reads room requests only when rooms are on.
        let Some(policy) = &self.inner.rooms else {
            return;
        };
        match *request {
            RoomRequest::Presence { room, reference } => {
                let asked = self
                    .inner
                    .registry
                    .presence_request(self.shared().conn, &room);
                match asked {
                    Ok(members) => self.presence.push((room, reference, members)),
                    Err(refusal) => {
                        drop(self.session.presence_answer(room, reference, Err(refusal)))
                    }
                }
                return;
            }
            RoomRequest::Unsubscribe { room, reference } => {
                let registry = &self.inner.registry;
                let notice = if registry.leave(self.shared().conn, &room, false) {
                    RoomNotice::Unsubscribed { room, reference }
                } else {
                    let refusal = RoomRefusal::new(RefusalCode::NotSubscribed, "not in the room");
                    RoomNotice::refused(room, reference, refusal)
                };
                let _ = self.session.room_notice(notice);
                return;
            }
            RoomRequest::Subscribe { .. } | RoomRequest::Publish { .. } => {}
        }
        match policy.gate().decide(self.session.is_authenticated()) {
            Some(decision) => self.authorized(request, decision),
            None => self.call(AppCall::Authorize(request)),
        }
    }

    /// Carry out a subscribe or a publish the policy decided, and answer it.
    fn authorized(&mut self, request: Box<RoomRequest>, decision: Result<(), RoomRefusal>) {
        let registry = &self.inner.registry;
        let conn = self.shared().conn;
        let notice = match (*request, decision) {
            (
                RoomRequest::Subscribe {
                    room,
                    reference,
                    presence,
                    since,
                    ..
                },
                Ok(()),
            ) => {
                let asked = Some((reference.clone(), since));
                match registry.join(conn, &room, false, presence, asked) {
                    // The replica answers once it read the room's stream.
                    Ok(joined) if joined.deferred => return,
                    Ok(_) => RoomNotice::Subscribed {
                        room,
                        reference,
                        position: None,
                        recovered: None,
                    },
                    Err(refusal) => RoomNotice::refused(room, reference, refusal),
                }
            }
            (
                RoomRequest::Publish {
                    room,
                    message,
                    reference,
                },
                Ok(()),
            ) => {
                match registry.publish(&message, &room) {
                    // A publish that went through is not answered.
                    Ok(_) => return,
                    Err(refusal) => RoomNotice::refused(room, reference, refusal),
                }
            }
            (
                RoomRequest::Subscribe {
                    room, reference, ..
                }
                | RoomRequest::Publish {
                    room, reference, ..
                }
                | RoomRequest::Unsubscribe { room, reference }
                | RoomRequest::Presence { room, reference },
                Err(refusal),
            ) => RoomNotice::refused(room, reference, refusal),
            (RoomRequest::Unsubscribe { .. } | RoomRequest::Presence { .. }, Ok(())) => return,
        };
        let _ = self.session.room_notice(notice);
    }

    /// Start a handler call, or queue it behind the one in progress.
    fn call(&mut self, call: AppCall) {
        if self.hook.is_none() && self.calls.is_empty() {
            self.hook = Some(self.hook_future(call));
        } else {
            self.calls.push_back(call);
        }
    }

    /// Start the next queued handler call when none is in progress.
    fn next_hook(&mut self) {
        if self.hook.is_some() {
            return;
        }
        if let Some(call) = self.calls.pop_front() {
            self.hook = Some(self.hook_future(call));
            if self.calls.is_empty() {
                // Calls queue up only behind a slow handler: an idle connection
                // keeps no queue allocated.
                self.calls = VecDeque::new();
            }
        }
    }

    /// The application's hook for `call`, owning what it borrows.
    fn hook_future(&self, call: AppCall) -> BoxFuture<'static, Option<Authorized>> {
        let inner = self.inner.clone();
        let conn = self.conn.clone();
        if let AppCall::Authorize(request) = call {
            let (room, kind) = match &*request {
                RoomRequest::Subscribe { room, token, .. } => {
                    let token = token.clone();
                    (room.clone(), RoomAccessKind::Subscribe { token })
                }
                RoomRequest::Publish { room, .. }
                | RoomRequest::Unsubscribe { room, .. }
                | RoomRequest::Presence { room, .. } => (room.clone(), RoomAccessKind::Publish),
            };
            let decision = match &inner.rooms {
                Some(policy) => policy.ask(&conn, RoomAccess { room, kind }),
                None => return Box::pin(std::future::ready(None)),
            };
            return Box::pin(async move { Some((request, decision.await)) });
        }
        Box::pin(async move {
            match call {
                AppCall::Authenticated => inner.handler.on_authenticated(&conn).await,
                AppCall::Message(message) => inner.handler.on_message(&conn, message).await,
                AppCall::Authorize(_) => {}
            }
            None
        })
    }

    /// Arm the timer for the session's next deadline, unless it is armed for it.
    fn arm_timer(&mut self) {
        let deadline = self.session.poll_timeout();
        if self.timer.as_ref().map(|(at, _)| *at) != deadline {
            let runtime = &self.inner.runtime;
            self.timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }
    }

    /// Hand the sink what the session wrote, then return the first input that is
    /// ready. Only when none is (every frame available read and answered) does the
    /// batch leave, in one system call.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        // The handler's replies (pushed while its hook is polled below) need no wake:
        // the outbox is drained before this returns `Pending`.
        self.shared().outbox.will_drain();
        if let Poll::Ready(Err(error)) = self.poll_send(cx) {
            return Poll::Ready(Wake::WriteFailed(error));
        }
        if let Poll::Ready(wake) = self.poll_input(cx) {
            return Poll::Ready(wake);
        }
        // Past its message rate, or its handler still busy: the peer waits in TCP.
        if self.session.read_paused_until().is_none() && self.hook.is_none() {
            if self.io.read_batch_full() {
                if let Poll::Ready(Err(error)) = self.io.poll_flush(cx) {
                    return Poll::Ready(Wake::WriteFailed(error));
                }
            }
            if let Poll::Ready(read) = self.io.poll_read(cx) {
                return Poll::Ready(Wake::Read(read));
            }
        }
        match self.io.poll_flush(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Wake::WriteFailed(error)),
            _ => Poll::Pending,
        }
    }

    /// The first input besides the socket's that is ready.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Some(future) = self.auth.as_mut() {
            if let Poll::Ready(outcome) = future.poll_unpin(cx) {
                self.auth = None;
                return Poll::Ready(Wake::Auth(outcome));
            }
        }
        if let Some(stored) = self.load.as_mut() {
            if let Poll::Ready(outcome) = stored.poll_unpin(cx) {
                self.load = None;
                // A load the cluster dropped (it gave up on it) loads nothing.
                return Poll::Ready(Wake::Load(outcome.unwrap_or_default()));
            }
        }
        for index in 0..self.presence.len() {
            if let Poll::Ready(answer) = self.presence[index].2.poll_unpin(cx) {
                let (room, reference, _) = self.presence.swap_remove(index);
                let members = answer
                    .unwrap_or_else(|_| Err("the server is gone".to_owned()))
                    .map_err(|reason| RoomRefusal::new(RefusalCode::Unavailable, reason));
                return Poll::Ready(Wake::Presence(room, reference, members));
            }
        }
        if let Some(hook) = self.hook.as_mut() {
            if let Poll::Ready(outcome) = hook.poll_unpin(cx) {
                self.hook = None;
                return Poll::Ready(Wake::Handled(outcome));
            }
        }
        // Stored messages precede live ones: while they load, live items wait in the
        // outbox (whose overflow is still reported).
        let take_items =
            self.session.queued_transmits() < WRITE_BACKLOG && !self.session.awaits_undelivered();
        if let Poll::Ready(drained) = self.shared().outbox.poll_drain(cx, take_items) {
            return Poll::Ready(Wake::Outbox(drained));
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                self.timer = None;
                return Poll::Ready(Wake::Timer);
            }
        }
        Poll::Pending
    }

    /// Feed one input to the session. The clock is read only for the inputs that
    /// take the time: handing over queued frames and a handler's return (most wakes
    /// of a busy connection) need none.
    fn handle(&mut self, wake: Wake) {
        let now = || self.inner.runtime.now();
        match wake {
            Wake::Read(read) => self.handle_read(now(), read),
            Wake::WriteFailed(error) => {
                let close = Close::new(CloseCode::ABNORMAL, error.to_string());
                self.session.handle_peer_closed(now(), Some(close));
            }
            Wake::Auth(Ok((id, user))) => {
                let _ = self.session.accept(now(), id, user);
            }
            Wake::Presence(room, reference, members) => {
                let _ = self.session.presence_answer(room, reference, members);
            }
            Wake::Auth(Err(error)) => {
                let _ = self.session.reject(now(), error.reason());
            }
            // Refused once the session's load timeout passed: the messages stay stored.
            Wake::Load(stored) => {
                let _ = self.session.handle_undelivered(now(), stored);
            }
            Wake::Timer => {
                self.session.handle_timeout(now());
                if !self.session.awaits_undelivered() {
                    // The session gave up on the load: its answer no longer matters.
                    self.load = None;
                }
            }
            Wake::Outbox(drained) => self.handle_outbox(drained),
            Wake::Handled(Some((request, decision))) => self.authorized(request, decision),
            Wake::Handled(None) => {}
        }
    }

    /// Feed what the socket gave to the session.
    fn handle_read(&mut self, now: Instant, read: Option<Result<WsMessage, WsError>>) {
        let session = &mut self.session;
        match read {
            Some(Ok(WsMessage::Text(text))) => {
                self.inner
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
            self.inner
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
            };
        }
    }

    /// Let the handler finish the calls it was given, leave the registry, finish the
    /// closing handshake (bounded), then tell the observers and the application.
    async fn finish(mut self, close: Close) {
        if let Some(hook) = self.hook.take() {
            hook.await;
        }
        while let Some(call) = self.calls.pop_front() {
            // A room request waiting for its authorization needs no answer any more.
            if !matches!(call, AppCall::Authorize(_)) {
                self.hook_future(call).await;
            }
        }
        self.inner.registry.unregister(self.shared().conn);
        // The last frames (the close among them) are written while lingering.
        let (mut frames, mut bytes) = (0, 0);
        while let Some(transmit) = self.session.poll_transmit() {
            let message = ws_message(transmit, &mut frames, &mut bytes);
            self.io.pending.push_back(message);
        }
        self.frames_sent(frames, bytes);
        let runtime = &self.inner.runtime;
        let linger = runtime.sleep_until(runtime.now() + self.inner.transport.close_timeout);
        futures_util::future::select(Box::pin(self.io.linger()), Box::pin(linger)).await;
        let conn = &self.conn;
        tracing::debug!(conn = conn.conn_id().0, code = close.code.0, reason = %close.reason, "closed");
        self.inner
            .middleware
            .emit(|m| m.on_disconnection(conn, &close));
        self.inner.handler.on_disconnect(conn, &close).await;
    }
}

/// A transmit of the session as a tungstenite message, counting text frames and
/// their bytes.
fn ws_message(transmit: Transmit, frames: &mut usize, bytes: &mut usize) -> WsMessage {
    match transmit {
        Transmit::Text(frame) => {
            *frames += 1;
            *bytes += frame.len();
            text(frame)
        }
        Transmit::Close(close) => WsMessage::Close(Some(close_frame(&close))),
    }
}
