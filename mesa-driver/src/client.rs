//! The client: a task that drives the core's [`ClientSession`] over reconnections,
//! a cloneable [`Client`] handle for commands, and a stream of [`ClientEvent`]s.
//! `ws://` and `wss://` URLs (TLS from [`crate::tls`]) on every runtime. Rooms
//! (subscriptions kept across reconnections, room messages with their room) are the
//! session's; the task only matches a subscribe's answer to its caller.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_channel::{mpsc, oneshot};
use futures_rustls::TlsConnector;
use futures_util::future::{Either, select};
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use mesa_core::recovery::{Position, Since};
use mesa_core::rooms::RoomRefusal;
use mesa_core::{
    BackoffConfig, ClientConfig, ClientEvent, ClientSession, ClientTransmit, Close, CloseCode,
    ConfigError, Hello, Limits, Message, Reference,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use url::Url;

use crate::handle::RoomMember;
use crate::hooks::BoxFuture;
use crate::io::Io;
use crate::runtime::{Runtime, entropy_seed};
use crate::tls::{ClientTls, MaybeTls, TlsError, certificates_from_pem, server_name};
use crate::transport::{ReadFailure, TransportConfig, close_frame, core_close, read_failure, text};

/// Events buffered for an application that reads them slowly; past this the client
/// stops reading the socket (the server then sees backpressure, not a lost message).
const EVENT_BUFFER: usize = 256;

/// Why a client command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The session refused the command (queue full, already connected, ...).
    #[error(transparent)]
    Session(#[from] mesa_core::ClientError),
    /// The connection ended for good before the server answered; the close is the
    /// cause.
    #[error("disconnected before the server answered: {0}")]
    Disconnected(#[source] Close),
    /// The client's task has stopped.
    #[error("the client has stopped")]
    Stopped,
    /// The server refused the room request (its authorization, or a limit).
    #[error("the server refused: {0}")]
    Refused(#[source] RoomRefusal),
}

/// Why a client could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The URL is not `ws://` or `wss://` with a host (and no user name or
    /// password: credentials go in [`Client::authenticate`]).
    #[error("unsupported URL `{url}`: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings are unusable (a root that does not parse, no trusted roots).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Builds a [`Client`].
#[must_use]
pub struct ClientBuilder<R> {
    runtime: R,
    url: String,
    config: ClientConfig,
    transport: TransportConfig,
    auto_connect: bool,
    seed: Option<u64>,
    tls: ClientTls,
}

impl<R: Runtime> ClientBuilder<R> {
    pub(crate) fn new(runtime: R, url: impl Into<String>) -> Self {
        ClientBuilder {
            runtime,
            url: url.into(),
            config: ClientConfig::default(),
            transport: TransportConfig::default(),
            auto_connect: true,
            seed: None,
            tls: ClientTls::default(),
        }
    }

    /// Reconnect automatically after the connection is lost (default true).
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.config.reconnect = reconnect;
        self
    }

    /// Backoff bounds for reconnection (default base 1 s, or the server's interval; cap 30 s).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Heartbeats the server may skip before it is declared dead (default 3).
    pub fn heartbeat_max_attempts(mut self, attempts: u32) -> Self {
        self.config.heartbeat_max_attempts = attempts;
        self
    }

    /// The version announced when the server enforces equal versions.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.config.version = Some(version.into());
        self
    }

    /// Limits on frames from the server, on the offline send queue and on
    /// subscriptions.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Opt in to rooms on servers that announce them (default true); off, no frame of
    /// the client mentions rooms and room commands fail (see [`ClientConfig::rooms`]).
    pub fn rooms(mut self, on: bool) -> Self {
        self.config.rooms = on;
        self
    }

    /// Transport settings (connect/handshake timeout, buffers).
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = transport;
        self
    }

    /// Connect as soon as the client is built (default true); otherwise call
    /// [`Client::connect`].
    pub fn auto_connect(mut self, auto: bool) -> Self {
        self.auto_connect = auto;
        self
    }

    /// Fix the backoff jitter's seed (tests); by default it comes from the OS.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Trust the certificates of a PEM input for `wss://`, beside the default roots
    /// (a private CA, a self-signed server). A PEM that does not parse fails
    /// [`build`](Self::build).
    pub fn add_root_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        match certificates_from_pem(pem.as_ref()) {
            Ok(roots) => self.tls.extra_roots.extend(roots),
            Err(error) => {
                self.tls.error.get_or_insert(error);
            }
        }
        self
    }

    /// Trust a DER certificate for `wss://`, beside the default roots.
    pub fn add_root_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.tls.extra_roots.push(CertificateDer::from(der.into()));
        self
    }

    /// Use this rustls configuration for `wss://` instead of the defaults (the
    /// Mozilla roots, plus the platform's store with the `native-roots` feature, plus
    /// the roots added here): for client certificates, pinned roots or a provider
    /// of the application's choosing. The URL's host is still sent as SNI and
    /// verified by the configuration's verifier.
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls.config = Some(config);
        self
    }

    /// Start the client's task.
    pub fn build(self) -> Result<(Client, ClientEvents), BuildError> {
        let target = Target::parse(&self.url, &self.tls)?;
        let seed = self.seed.unwrap_or_else(entropy_seed);
        let mut session = ClientSession::new(self.config.clone(), seed)?;
        if self.auto_connect {
            // A new session is idle, so connecting cannot be refused.
            let _ = session.connect(self.runtime.now());
        }
        let (command_tx, command_rx) = mpsc::channel(64);
        let (event_tx, event_rx) = mpsc::channel(EVENT_BUFFER);
        let task = Task {
            ws_config: self.transport.websocket(&self.config.limits),
            runtime: self.runtime.clone(),
            target,
            transport: self.transport,
            limits: self.config.limits,
            session,
            commands: command_rx,
            events: event_tx,
            hello_waiters: Vec::new(),
            auth_waiters: Vec::new(),
            subscribe_waiters: Vec::new(),
            presence_waiters: Vec::new(),
            disconnect_reply: None,
            io: None,
            opening: None,
            timer: None,
            outgoing: VecDeque::new(),
            stopping: false,
        };
        self.runtime.spawn(task.run());
        Ok((
            Client {
                commands: command_tx,
            },
            ClientEvents { events: event_rx },
        ))
    }
}

/// A Mesa client. Cloning is cheap; when every clone is dropped the client
/// disconnects and its task ends.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

/// The client's events: connected, authenticated, messages, rooms (answers and room
/// messages with their room), disconnected.
#[derive(Debug)]
pub struct ClientEvents {
    events: mpsc::Receiver<ClientEvent>,
}

impl ClientEvents {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.events.next().await
    }
}

impl Stream for ClientEvents {
    type Item = ClientEvent;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<ClientEvent>> {
        self.events.poll_next_unpin(cx)
    }
}

enum Command {
    Connect(oneshot::Sender<Result<(), ClientError>>),
    Authenticate(Value, bool, oneshot::Sender<Result<Value, ClientError>>),
    Send(Message, oneshot::Sender<Result<(), ClientError>>),
    Disconnect(Close, oneshot::Sender<Result<(), ClientError>>),
    Hello(oneshot::Sender<Hello>),
    Positions(oneshot::Sender<Vec<(String, Option<Position>)>>),
    StreamPositions(oneshot::Sender<Since>),
    ResumeStreams(Since, oneshot::Sender<()>),
    Subscribe(Subscribe, oneshot::Sender<Result<(), ClientError>>),
    Presence(
        String,
        oneshot::Sender<Result<Vec<RoomMember>, ClientError>>,
    ),
    Unsubscribe(String, oneshot::Sender<Result<(), ClientError>>),
    Publish(String, Message, oneshot::Sender<Result<(), ClientError>>),
}

impl Client {
    /// Start connecting (when built with `auto_connect(false)`, or after `disconnect`).
    pub async fn connect(&self) -> Result<(), ClientError> {
        self.call(Command::Connect).await?
    }

    /// Authenticate with `credentials` (a JSON object such as `{"token": ..}`) and
    /// wait for the server's answer: the user object (or `{}`). `should_sync` asks for
    /// messages stored while offline. The credentials are sent again after every
    /// automatic reconnection.
    pub async fn authenticate(
        &self,
        credentials: Value,
        should_sync: bool,
    ) -> Result<Value, ClientError> {
        self.call(|tx| Command::Authenticate(credentials, should_sync, tx))
            .await?
    }

    /// Send `message` now, or queue it while disconnected (bounded: a full queue is
    /// an error, never a silent drop).
    pub async fn send(&self, message: Message) -> Result<(), ClientError> {
        self.call(|tx| Command::Send(message, tx)).await?
    }

    /// Subscribe to `room` and wait for the server's answer: `Ok` once the
    /// connection is in it (or once the room was left again before the answer came),
    /// [`ClientError::Refused`] with the server's code and reason,
    /// `Session(NoRooms)` when the server has no rooms. While no connection carries
    /// rooms the request waits for one. The client keeps the subscription and makes
    /// it again after every reconnection; room messages arrive as
    /// [`ClientEvent::RoomMessage`], and the answers to those later subscribes as
    /// events too.
    pub async fn subscribe(&self, room: impl Into<String>) -> Result<(), ClientError> {
        self.subscribe_with(room.into(), None, false).await
    }

    /// [`subscribe`](Self::subscribe) with `"presence": true` (and `token`, if any,
    /// for the server's authorization): the connection also hears who joins and
    /// leaves the room over the cluster, as [`ClientEvent::MemberJoined`] and
    /// [`ClientEvent::MemberLeft`] (per id: its first connection in the room, its
    /// last one gone). Pair it with [`presence`](Self::presence) for who is there
    /// already.
    pub async fn subscribe_with_presence(
        &self,
        room: impl Into<String>,
        token: Option<String>,
    ) -> Result<(), ClientError> {
        self.subscribe_with(room.into(), token, true).await
    }

    /// Who is in `room` (a room the connection is in) over the cluster: each id with
    /// its connections there, by id. Asked of the current connection only:
    /// `Session(NotCarryingRooms)` without one that carries rooms,
    /// [`ClientError::Refused`] when the server refuses (`not_subscribed`,
    /// `unavailable` while its Redis is unreachable, `too_many_requests`), and
    /// [`ClientError::Disconnected`] when the connection drops first.
    pub async fn presence(&self, room: impl Into<String>) -> Result<Vec<RoomMember>, ClientError> {
        let room = room.into();
        self.call(|tx| Command::Presence(room, tx)).await?
    }

    /// [`subscribe`](Self::subscribe) with a token for the server's authorization
    /// (kept, and sent again with every later subscribe of the room).
    pub async fn subscribe_with_token(
        &self,
        room: impl Into<String>,
        token: impl Into<String>,
    ) -> Result<(), ClientError> {
        self.subscribe_with(room.into(), Some(token.into()), false)
            .await
    }

    /// Leave `room`: the client stops holding the subscription at once, and the
    /// server's answer arrives as a [`ClientEvent::Unsubscribed`] (or a
    /// [`ClientEvent::RoomRefused`] for a room the connection was not in).
    pub async fn unsubscribe(&self, room: impl Into<String>) -> Result<(), ClientError> {
        let room = room.into();
        self.call(|tx| Command::Unsubscribe(room, tx)).await?
    }

    /// Publish `message` (a dispatch: its `t` and `d`) to the members of `room`: now
    /// if the connection carries rooms, else queued like [`send`](Self::send). Nothing
    /// answers a publish that went through; a refusal arrives as a
    /// [`ClientEvent::RoomRefused`].
    pub async fn publish(
        &self,
        room: impl Into<String>,
        message: Message,
    ) -> Result<(), ClientError> {
        let room = room.into();
        self.call(|tx| Command::Publish(room, message, tx)).await?
    }

    async fn subscribe_with(
        &self,
        room: String,
        token: Option<String>,
        presence: bool,
    ) -> Result<(), ClientError> {
        let subscribe = Subscribe {
            room,
            token,
            presence,
            since: None,
        };
        self.call(|tx| Command::Subscribe(subscribe, tx)).await?
    }

    /// [`subscribe`](Self::subscribe) (with presence notices if asked) to a
    /// recoverable room, resuming after `since`, the last position a previous run
    /// received there ([`positions`](Self::positions)): the server replays what came
    /// after it before answering, and the answer ([`ClientEvent::Subscribed`]) says
    /// whether that was everything (`recovered`). Positions are kept from then on,
    /// and every later subscribe of the room (after a reconnection) resumes from the
    /// last one received.
    pub async fn subscribe_since(
        &self,
        room: impl Into<String>,
        presence: bool,
        since: Position,
    ) -> Result<(), ClientError> {
        let subscribe = Subscribe {
            room: room.into(),
            token: None,
            presence,
            since: Some(since),
        };
        self.call(|tx| Command::Subscribe(subscribe, tx)).await?
    }

    /// Each room the client holds, oldest first, with the position of the last
    /// message it received there (recoverable rooms only): what a client that keeps
    /// its state across restarts saves, to [`subscribe_since`](Self::subscribe_since)
    /// after one.
    pub async fn positions(&self) -> Result<Vec<(String, Option<Position>)>, ClientError> {
        self.call(Command::Positions).await
    }

    /// The last positions the client received in its personal and broadcast
    /// streams (a server that keeps the sends to ids or the broadcasts in streams):
    /// reported at every authentication, so the server replays what the client
    /// missed ([`ClientEvent::Resumed`] tells whether it could).
    pub async fn stream_positions(&self) -> Result<Since, ClientError> {
        self.call(Command::StreamPositions).await
    }

    /// Report `since` (saved by a previous run from
    /// [`ClientEvent::StreamPosition`]s or [`stream_positions`](Self::stream_positions))
    /// at the next authentication: call it before
    /// [`authenticate`](Self::authenticate).
    pub async fn resume_streams(&self, since: Since) -> Result<(), ClientError> {
        self.call(|tx| Command::ResumeStreams(since, tx)).await
    }

    /// Disconnect deliberately: no reconnection follows. Returns once the close
    /// handshake finished (or the close timeout passed).
    pub async fn disconnect(&self, close: Close) -> Result<(), ClientError> {
        self.call(|tx| Command::Disconnect(close, tx)).await?
    }

    /// The hello (op 10) of the current connection: the settings the server announced
    /// (heartbeat, reconnect interval, authentication timeout, rules). Waits for the
    /// next hello while none has arrived (connecting, backing off, or the transport
    /// open and its hello on the way).
    ///
    /// A server that authenticates nobody announces no authentication timeout (ours
    /// announces one exactly when authentication is on; `@cryb/mesa` always does).
    pub async fn hello(&self) -> Result<Hello, ClientError> {
        self.call(Command::Hello).await
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .clone()
            .send(command(tx))
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)
    }
}

/// Where a client connects, from its URL.
#[derive(Clone)]
struct Target {
    /// The URL of the WebSocket handshake (path and query kept).
    url: String,
    /// `host:port` to connect to (an IPv6 literal in brackets).
    address: String,
    /// For `wss://`: the connector and the name the certificate must be valid for.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    /// Parse a `ws://` or `wss://` URL (default ports 80 and 443).
    fn parse(raw: &str, tls: &ClientTls) -> Result<Self, BuildError> {
        let refuse = |reason: &str| BuildError::Url {
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(raw).map_err(|error| refuse(&error.to_string()))?;
        let secure = match url.scheme() {
            "ws" => false,
            "wss" => true,
            _ => return Err(refuse("expected a ws:// or wss:// URL")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse(
                "user names and passwords do not go in the URL: authenticate instead",
            ));
        }
        let (Some(host), Some(host_str), Some(port)) =
            (url.host(), url.host_str(), url.port_or_known_default())
        else {
            return Err(refuse("no host"));
        };
        let tls = if secure {
            // A client's configuration errors are caught here, not at each attempt.
            Some((tls.connector()?, server_name(&host)?))
        } else {
            tls.error.clone().map_or(Ok(None), Err)?
        };
        Ok(Target {
            address: format!("{host_str}:{port}"),
            url: url.into(),
            tls,
        })
    }
}

enum Wake<S> {
    Opened(Result<WebSocketStream<S>, String>),
    Read(Option<Result<WsMessage, WsError>>),
    WriteFailed,
    Command(Option<Command>),
    Timer,
}

/// What [`Client::subscribe`] and its variants ask.
struct Subscribe {
    room: String,
    token: Option<String>,
    presence: bool,
    since: Option<Position>,
}

/// A caller of [`Client::presence`]: the request's reference, and its reply.
type PresenceWaiter = (
    Reference,
    oneshot::Sender<Result<Vec<RoomMember>, ClientError>>,
);

/// A caller of [`Client::subscribe`]: the request's reference and room, and its reply.
type SubscribeWaiter = (Reference, String, oneshot::Sender<Result<(), ClientError>>);

/// A transport being opened: the WebSocket, or why it could not be.
type Opening<S> = BoxFuture<'static, Result<WebSocketStream<S>, String>>;

/// The client's task (quinn's `ConnectionDriver` shape, like the server's loop): the
/// session, the transport of the moment, and the inputs it waits on.
struct Task<R: Runtime> {
    runtime: R,
    target: Target,
    transport: TransportConfig,
    ws_config: WebSocketConfig,
    limits: Limits,
    session: ClientSession,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ClientEvent>,
    /// Callers of [`Client::hello`] waiting for the next hello.
    hello_waiters: Vec<oneshot::Sender<Hello>>,
    /// Callers of [`Client::authenticate`] waiting for the outcome.
    auth_waiters: Vec<oneshot::Sender<Result<Value, ClientError>>>,
    /// Callers of [`Client::subscribe`] waiting for the answer to their request.
    subscribe_waiters: Vec<SubscribeWaiter>,
    /// Callers of [`Client::presence`] waiting for the answer to their request.
    presence_waiters: Vec<PresenceWaiter>,
    /// Answered when the close handshake of a deliberate disconnect ends.
    disconnect_reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    io: Option<Io<MaybeTls<R::TcpStream>>>,
    opening: Option<Opening<MaybeTls<R::TcpStream>>>,
    /// The sleep armed for the session's next deadline, with that deadline.
    timer: Option<(Instant, Pin<Box<R::Sleep>>)>,
    /// Events the application has not taken yet (its channel is bounded).
    outgoing: VecDeque<ClientEvent>,
    /// Every handle is gone: leave once the session said goodbye.
    stopping: bool,
}

impl<R: Runtime> Task<R> {
    async fn run(mut self) {
        loop {
            self.drain();
            if self.stopping {
                if let Some(io) = self.io.take() {
                    self.linger(io, None);
                }
                return;
            }
            self.arm_timer();
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            self.handle(wake);
        }
    }

    /// Execute the session's transmits, queue its events for the application, and
    /// answer whoever waits on what they decided.
    fn drain(&mut self) {
        while let Some(transmit) = self.session.poll_transmit() {
            match transmit {
                ClientTransmit::Connect => self.opening = Some(Box::pin(self.open())),
                ClientTransmit::Text(frame) => {
                    if let Some(io) = self.io.as_mut() {
                        io.pending.push_back(text(frame));
                    }
                }
                ClientTransmit::Close(close) => {
                    self.opening = None;
                    if let Some(mut old) = self.io.take() {
                        old.pending
                            .push_back(WsMessage::Close(Some(close_frame(&close))));
                        let reply = self.disconnect_reply.take();
                        self.linger(old, reply);
                    }
                }
            }
        }
        while let Some(event) = self.session.poll_event() {
            self.answer_auth(&event);
            self.answer_subscribes(&event);
            self.answer_presence(&event);
            self.outgoing.push_back(event);
        }
        if let Some(reply) = self.disconnect_reply.take() {
            let _ = reply.send(Ok(()));
        }
        if !self.hello_waiters.is_empty() {
            if let Some(hello) = self.session.hello() {
                for waiter in self.hello_waiters.drain(..) {
                    let _ = waiter.send(hello.clone());
                }
            }
        }
    }

    /// Answer the callers waiting for an authentication, once it is decided.
    fn answer_auth(&mut self, event: &ClientEvent) {
        let outcome = match event {
            ClientEvent::Authenticated { user } => Ok(user.clone()),
            ClientEvent::Disconnected {
                close,
                reconnect_at: None,
            } => Err(ClientError::Disconnected(close.clone())),
            _ => return,
        };
        for waiter in self.auth_waiters.drain(..) {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// Answer the callers waiting for a subscribe that `event` decides.
    fn answer_subscribes(&mut self, event: &ClientEvent) {
        if self.subscribe_waiters.is_empty() {
            return;
        }
        let outcome = |reference: Reference, room: &str| match event {
            ClientEvent::Subscribed {
                reference: Some(answered),
                ..
            } if *answered == reference => Some(Ok(())),
            // The application left the room before the answer came.
            ClientEvent::Unsubscribed {
                room: left,
                reference: Some(_),
            } if left == room => Some(Ok(())),
            ClientEvent::RoomRefused {
                reference: Some(refused),
                refusal,
                ..
            } if *refused == reference => Some(Err(ClientError::Refused(refusal.clone()))),
            ClientEvent::RoomsUnavailable { dropped }
                if dropped.iter().any(|(r, _)| *r == reference) =>
            {
                Some(Err(mesa_core::ClientError::NoRooms.into()))
            }
            ClientEvent::Disconnected {
                close,
                reconnect_at: None,
            } => Some(Err(ClientError::Disconnected(close.clone()))),
            _ => None,
        };
        let waiters = std::mem::take(&mut self.subscribe_waiters);
        for (reference, room, reply) in waiters {
            match outcome(reference, &room) {
                Some(result) => {
                    let _ = reply.send(result);
                }
                None => self.subscribe_waiters.push((reference, room, reply)),
            }
        }
    }

    /// Answer the callers waiting for a presence request that `event` decides: its
    /// answer, its refusal, or the end of the connection it was asked on.
    fn answer_presence(&mut self, event: &ClientEvent) {
        if self.presence_waiters.is_empty() {
            return;
        }
        let outcome = |reference: Reference| match event {
            ClientEvent::Members {
                reference: Some(answered),
                members,
                ..
            } if *answered == reference => Some(Ok(members
                .iter()
                .map(|(id, connections)| RoomMember {
                    id: id.clone(),
                    connections: *connections,
                })
                .collect())),
            ClientEvent::RoomRefused {
                reference: Some(refused),
                refusal,
                ..
            } if *refused == reference => Some(Err(ClientError::Refused(refusal.clone()))),
            ClientEvent::Disconnected { close, .. } => {
                Some(Err(ClientError::Disconnected(close.clone())))
            }
            _ => None,
        };
        let waiters = std::mem::take(&mut self.presence_waiters);
        for (reference, reply) in waiters {
            match outcome(reference) {
                Some(result) => {
                    let _ = reply.send(result);
                }
                None => self.presence_waiters.push((reference, reply)),
            }
        }
    }

    /// Arm the timer for the session's next deadline, unless it is armed for it.
    fn arm_timer(&mut self) {
        let deadline = self.session.poll_timeout();
        if self.timer.as_ref().map(|(at, _)| *at) != deadline {
            let runtime = &self.runtime;
            self.timer = deadline.map(|at| (at, Box::pin(runtime.sleep_until(at))));
        }
    }

    /// Write what can be written, hand events to the application, then return the
    /// first input that is ready. Reading waits while the application is behind.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake<MaybeTls<R::TcpStream>>> {
        if let Some(io) = self.io.as_mut() {
            if let Poll::Ready(Err(_)) = io.poll_write(cx) {
                return Poll::Ready(Wake::WriteFailed);
            }
        }
        while !self.outgoing.is_empty() {
            match self.events.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(event) = self.outgoing.pop_front() {
                        let _ = self.events.start_send(event);
                    }
                }
                // Nobody listens: the events have no reader to reach.
                Poll::Ready(Err(_)) => self.outgoing.clear(),
                Poll::Pending => break,
            }
        }
        if let Some(future) = self.opening.as_mut() {
            if let Poll::Ready(outcome) = future.poll_unpin(cx) {
                self.opening = None;
                return Poll::Ready(Wake::Opened(outcome));
            }
        }
        if let Poll::Ready(command) = self.commands.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Command(command));
        }
        if let Some((_, sleep)) = self.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                self.timer = None;
                return Poll::Ready(Wake::Timer);
            }
        }
        match self.io.as_mut() {
            Some(io) if self.outgoing.is_empty() => io.poll_read(cx).map(Wake::Read),
            _ => Poll::Pending,
        }
    }

    /// Feed one input to the session.
    fn handle(&mut self, wake: Wake<MaybeTls<R::TcpStream>>) {
        let now = self.runtime.now();
        match wake {
            Wake::Opened(Ok(ws)) => {
                self.io = Some(Io::new(ws));
                let _ = self.session.handle_connected(now);
            }
            Wake::Opened(Err(reason)) => {
                let _ = self.session.handle_connect_failed(now, &reason);
            }
            Wake::Read(read) => self.handle_read(now, read),
            Wake::WriteFailed => {
                self.io = None;
                self.session.handle_closed(now, None);
            }
            Wake::Timer => self.session.handle_timeout(now),
            Wake::Command(Some(command)) => self.execute(now, command),
            Wake::Command(None) => {
                // Every handle is gone: leave politely.
                let _ = self
                    .session
                    .disconnect(now, Close::new(CloseCode::NORMAL, "client dropped"));
                self.stopping = true;
            }
        }
    }

    /// Feed what the transport gave to the session.
    fn handle_read(&mut self, now: Instant, read: Option<Result<WsMessage, WsError>>) {
        match read {
            Some(Ok(WsMessage::Text(text))) => self.session.handle_frame(now, &text),
            Some(Ok(WsMessage::Close(frame))) => {
                if let Some(io) = self.io.take() {
                    self.linger(io, None);
                }
                self.session.handle_closed(now, Some(core_close(frame)));
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                self.io = None;
                let close = match read_failure(error, &self.limits) {
                    ReadFailure::Invalid(error) => {
                        Close::new(error.close_code(), error.to_string())
                    }
                    ReadFailure::Violation(close) | ReadFailure::Gone(close) => close,
                };
                self.session.handle_closed(now, Some(close));
            }
            None => {
                self.io = None;
                self.session.handle_closed(now, None);
            }
        }
    }

    /// Act on a command of a [`Client`] handle.
    fn execute(&mut self, now: Instant, command: Command) {
        match command {
            Command::Connect(reply) => {
                let _ = reply.send(self.session.connect(now).map_err(ClientError::from));
            }
            // Answered at the top of the loop, once the session holds a hello.
            Command::Hello(reply) => self.hello_waiters.push(reply),
            Command::StreamPositions(reply) => {
                let _ = reply.send(self.session.stream_positions().clone());
            }
            Command::ResumeStreams(since, reply) => {
                self.session.resume_streams(since);
                let _ = reply.send(());
            }
            Command::Positions(reply) => {
                let positions = self
                    .session
                    .positions()
                    .map(|(room, position)| (room.to_owned(), position.cloned()))
                    .collect();
                let _ = reply.send(positions);
            }
            Command::Authenticate(credentials, should_sync, reply) => {
                match self.session.authenticate(now, credentials, should_sync) {
                    Ok(()) => self.auth_waiters.push(reply),
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::Send(message, reply) => {
                let _ = reply.send(self.session.send(now, message).map_err(ClientError::from));
            }
            Command::Subscribe(subscribe, reply) => {
                let Subscribe {
                    room,
                    token,
                    presence,
                    since,
                } = subscribe;
                let token = token.as_deref();
                let asked = if let Some(since) = since {
                    self.session
                        .subscribe_since(now, &room, token, presence, since)
                } else if presence {
                    self.session.subscribe_with_presence(now, &room, token)
                } else {
                    self.session.subscribe(now, &room, token)
                };
                match asked {
                    Ok(reference) => self.subscribe_waiters.push((reference, room, reply)),
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::Presence(room, reply) => match self.session.presence(now, &room) {
                Ok(reference) => self.presence_waiters.push((reference, reply)),
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                }
            },
            Command::Unsubscribe(room, reply) => {
                let result = self.session.unsubscribe(now, &room);
                let _ = reply.send(result.map(drop).map_err(ClientError::from));
            }
            Command::Publish(room, message, reply) => {
                let result = self.session.publish(now, &room, message);
                let _ = reply.send(result.map(drop).map_err(ClientError::from));
            }
            Command::Disconnect(close, reply) => match self.session.disconnect(now, close) {
                Ok(()) => self.disconnect_reply = Some(reply),
                Err(error) => {
                    let _ = reply.send(Err(error.into()));
                }
            },
        }
    }

    /// Open a transport and do the client handshakes (TLS for `wss://`, then
    /// WebSocket), bounded together by the handshake timeout. A failed certificate
    /// check is a failed attempt like any other: its reason reaches the application
    /// in the `Disconnected` event and the backoff decides the next attempt.
    fn open(
        &self,
    ) -> impl std::future::Future<Output = Result<WebSocketStream<MaybeTls<R::TcpStream>>, String>>
    + Send
    + 'static {
        let runtime = self.runtime.clone();
        let (target, config) = (self.target.clone(), self.ws_config);
        let timeout = self.transport.handshake_timeout;
        async move {
            let attempt = Box::pin(async {
                let stream = runtime
                    .connect(&target.address)
                    .await
                    .map_err(|e| e.to_string())?;
                let stream = match &target.tls {
                    None => MaybeTls::Plain(stream),
                    Some((connector, name)) => MaybeTls::tls(
                        connector
                            .connect(name.clone(), stream)
                            .await
                            .map_err(|e| format!("TLS handshake failed: {e}"))?,
                    ),
                };
                async_tungstenite::client_async_with_config(
                    target.url.as_str(),
                    stream,
                    Some(config),
                )
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| e.to_string())
            });
            let deadline = Box::pin(runtime.sleep_until(runtime.now() + timeout));
            match select(attempt, deadline).await {
                Either::Left((outcome, _)) => outcome,
                Either::Right(_) => Err(format!("no handshake within {timeout:?}")),
            }
        }
    }

    /// Finish a closing transport in the background, bounded by the close timeout,
    /// then answer `reply` (a deliberate disconnect waiting for its handshake).
    fn linger(
        &self,
        mut io: Io<MaybeTls<R::TcpStream>>,
        reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) {
        let runtime = self.runtime.clone();
        let timeout: Duration = self.transport.close_timeout;
        self.runtime.spawn(async move {
            let deadline = Box::pin(runtime.sleep_until(runtime.now() + timeout));
            select(Box::pin(io.linger()), deadline).await;
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{BuildError, ClientTls, Target};

    fn parse(url: &str) -> Result<(String, String, bool), BuildError> {
        Target::parse(url, &ClientTls::default())
            .map(|target| (target.address, target.url, target.tls.is_some()))
    }

    #[test]
    fn parses_ws_and_wss_urls() {
        let ok = |address: &str, url: &str, tls| Ok((address.to_owned(), url.to_owned(), tls));
        assert_eq!(
            parse("ws://127.0.0.1:4000/"),
            ok("127.0.0.1:4000", "ws://127.0.0.1:4000/", false)
        );
        assert_eq!(
            parse("ws://localhost:4000"),
            ok("localhost:4000", "ws://localhost:4000/", false)
        );
        assert_eq!(
            parse("ws://example.com/path?room=1"),
            ok("example.com:80", "ws://example.com/path?room=1", false)
        );
        assert_eq!(
            parse("wss://example.com/"),
            ok("example.com:443", "wss://example.com/", true)
        );
        assert_eq!(
            parse("wss://[::1]:8443/ws"),
            ok("[::1]:8443", "wss://[::1]:8443/ws", true)
        );
        assert_eq!(parse("ws://[::1]/"), ok("[::1]:80", "ws://[::1]/", false));
    }

    #[test]
    fn refuses_other_urls_with_a_reason() {
        for (url, reason) in [
            ("http://example.com/", "ws:// or wss://"),
            ("ws://", "empty host"),
            ("wss://user:secret@example.com/", "authenticate instead"),
            ("not a url", "relative URL"),
        ] {
            match parse(url) {
                Err(BuildError::Url { reason: why, .. }) => {
                    assert!(why.contains(reason), "{url}: {why}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
