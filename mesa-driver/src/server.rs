//! The server: a typed builder over the core's configuration, the accept loop, the
//! TLS and WebSocket handshakes, and handing each connection to its driver loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{StatusCode, header};
use async_tungstenite::tungstenite::protocol::Role;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::future::select;
use mesa_core::{
    AuthConfig, Close, CloseCode, ConfigError, HeartbeatConfig, Limits, PortalChoice, Replica,
    ReplicaConfig, ServerConfig, ServerConfigBuilder, SyncConfig,
};

use crate::accept::{accept_loop, handshake};
use crate::cluster::{self, ClusterConfig};
use crate::connection_loop::drive;
use crate::context::{AdmissionPolicy, ServerContext, Shutdown};
use crate::handle::{Admission, ServerHandle};
use crate::hooks::{Authenticator, Handler, Ignore, Middleware, Middlewares, RoomPolicy};
use crate::read_pool::PooledRead;
use crate::registry::{Registry, Settings};
use crate::runtime::{Runtime, entropy_seed};
use crate::tls::{MaybeTls, ServerTls};
use crate::transport::TransportConfig;

/// Why an upgrade request was refused, as the HTTP answer it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request was not for the Mesa endpoint's path (404).
    #[error("no Mesa endpoint here")]
    WrongPath,
    /// The `Origin` is not among the allowed origins (403).
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// The server has its maximum number of connections (503).
    #[error("too many connections: try again later")]
    Full,
}

impl Refusal {
    /// The HTTP status that answers the upgrade request.
    pub fn status(self) -> u16 {
        match self {
            Refusal::WrongPath => 404,
            Refusal::OriginNotAllowed => 403,
            Refusal::Full => 503,
        }
    }
}

/// Builds a [`Server`]. Every option of `@cryb/mesa`'s server, with its documented
/// defaults; [`build`](Self::build) validates them once.
#[must_use]
pub struct ServerBuilder<R, H = Ignore> {
    runtime: R,
    core: ServerConfigBuilder,
    auth: Option<AuthConfig>,
    limits: Limits,
    transport: TransportConfig,
    path: String,
    authenticator: Option<Arc<dyn Authenticator>>,
    handler: H,
    middleware: Vec<Arc<dyn Middleware>>,
    cluster: Option<ClusterConfig>,
    /// Set by `namespace()` and `portals()` in any order with `redis()`/`cluster()`,
    /// applied by `build()`.
    namespace: Option<String>,
    portals: Option<PortalChoice>,
    admission: AdmissionPolicy,
    tls: Option<ServerTls>,
    rooms: Option<RoomPolicy>,
}

impl<R: Runtime> ServerBuilder<R, Ignore> {
    pub(crate) fn new(runtime: R) -> Self {
        ServerBuilder {
            runtime,
            core: ServerConfig::builder(),
            auth: None,
            limits: Limits::default(),
            transport: TransportConfig::default(),
            path: "/".to_owned(),
            authenticator: None,
            handler: Ignore,
            middleware: Vec::new(),
            cluster: None,
            namespace: None,
            portals: None,
            admission: AdmissionPolicy::default(),
            tls: None,
            rooms: None,
        }
    }
}

impl<R: Runtime, H: Handler> ServerBuilder<R, H> {
    /// Serve WebSocket upgrades on this path only (default `/`); others get 404.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Send heartbeats every `interval`; close a client that misses more than
    /// `max_attempts` in a row (upstream documents 10 s and 3).
    pub fn heartbeat(mut self, interval: Duration, max_attempts: u32) -> Self {
        self.core = self.core.heartbeat(HeartbeatConfig {
            interval,
            max_attempts,
        });
        self
    }

    /// Announce a reconnect interval to clients (`c_reconnect_interval`).
    pub fn reconnect_interval(mut self, interval: Duration) -> Self {
        self.core = self.core.reconnect_interval(interval);
        self
    }

    /// Authenticate clients with `authenticator` (an async closure from the op 2 data
    /// to `Ok((id, user))` or an [`AuthError`](crate::AuthError)).
    pub fn authenticate(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticator = Some(Arc::new(authenticator));
        self.auth.get_or_insert_with(AuthConfig::default);
        self
    }

    /// Time a client has to authenticate (default 10 s), enforced with close 1008.
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.auth.get_or_insert_with(AuthConfig::default).timeout = timeout;
        self
    }

    /// Server-wide sends skip unauthenticated connections (default false).
    pub fn auth_required(mut self, required: bool) -> Self {
        self.auth.get_or_insert_with(AuthConfig::default).required = required;
        self
    }

    /// Op 22 carries the user object (default true).
    pub fn send_user_object(mut self, send: bool) -> Self {
        self.auth
            .get_or_insert_with(AuthConfig::default)
            .send_user_object = send;
        self
    }

    /// A rejected authentication closes with 1008 (default true).
    pub fn disconnect_on_fail(mut self, disconnect: bool) -> Self {
        self.auth
            .get_or_insert_with(AuthConfig::default)
            .disconnect_on_fail = disconnect;
        self
    }

    /// Require clients to announce exactly `version` (`enforce_equal_versions`).
    pub fn enforce_equal_versions(mut self, version: impl Into<String>) -> Self {
        self.core = self.core.enforce_equal_versions(version);
        self
    }

    /// Announce the `store_messages` rule.
    pub fn store_messages(mut self, on: bool) -> Self {
        self.core = self.core.store_messages(on);
        self
    }

    /// Replace the limits on what peers send.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Replace the transport settings (buffers, outbound cap, handshake timeout).
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = transport;
        self
    }

    /// Refuse WebSocket upgrades with HTTP 503 while `max` connections are open or
    /// in their handshake (default: no limit). Streams handed to
    /// [`Server::serve_upgraded`] past the limit are closed with 1013 instead.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.admission.max_connections = Some(max);
        self
    }

    /// Accept WebSocket upgrades only from pages of these origins
    /// (`https://app.example.com`, compared without case), refusing others with HTTP
    /// 403: a defence against cross-site WebSocket hijacking, where a page of another
    /// site opens a socket with the visitor's cookies. Requests without an `Origin`
    /// header (non-browser clients) are accepted. Default: off, every origin.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let origins = origins.into_iter().map(|origin| {
            let origin: String = origin.into();
            origin.trim_end_matches('/').to_ascii_lowercase()
        });
        self.admission.allowed_origins = Some(origins.collect());
        self
    }

    /// Serve `wss://`: every accepted connection does a TLS handshake with this
    /// configuration (an `Arc<rustls::ServerConfig>` or a [`ServerTls`]) before its
    /// WebSocket handshake, both within the transport's handshake timeout and while
    /// holding a slot of [`max_connections`](Self::max_connections). A client that
    /// does not speak TLS (a plaintext request) fails its handshake and is dropped.
    /// Keep a clone of the [`ServerTls`] to [`reload`](ServerTls::reload) the
    /// certificate while the server runs; open connections keep theirs.
    pub fn tls(mut self, tls: impl Into<ServerTls>) -> Self {
        self.tls = Some(tls.into());
        self
    }

    /// Replicate through the Redis at `url` (upstream's layout: replicas of ours and
    /// of `@cryb/mesa` deliver each other's sends).
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        match &mut self.cluster {
            Some(cluster) => cluster.url = url,
            None => self.cluster = Some(ClusterConfig::new(url)),
        }
        self
    }

    /// Every cluster setting at once (namespace, lease, portals, retry buffer);
    /// [`namespace`](Self::namespace) and [`portals`](Self::portals), called before or
    /// after, override its namespace and portals.
    pub fn cluster(mut self, cluster: ClusterConfig) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Isolate this cluster from others on the same Redis. Needs [`redis`](Self::redis)
    /// or [`cluster`](Self::cluster), called before or after: without either,
    /// [`build`](Self::build) fails with [`ConfigError::ClusterSettingWithoutRedis`].
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Forward client events to portals, choosing one per event. Needs
    /// [`redis`](Self::redis) or [`cluster`](Self::cluster), called before or after:
    /// without either, [`build`](Self::build) fails with
    /// [`ConfigError::ClusterSettingWithoutRedis`].
    pub fn portals(mut self, choice: PortalChoice) -> Self {
        self.portals = Some(choice);
        self
    }

    /// Store messages for offline ids and redeliver them when they authenticate
    /// (needs [`redis`](Self::redis)).
    pub fn sync(mut self, sync: SyncConfig) -> Self {
        self.core = self.core.sync(sync);
        self
    }

    /// Turn rooms on with `policy` deciding who may subscribe and publish (see
    /// `docs/protocol.md`): the hello announces them, and clients that opt in may
    /// subscribe. The server itself may always put connections in rooms and publish
    /// to them ([`ServerHandle::join`], [`ServerHandle::publish`]). Off by default.
    pub fn rooms(mut self, policy: RoomPolicy) -> Self {
        self.core = self.core.rooms(true);
        self.rooms = Some(policy);
        self
    }

    /// Register an observer.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Handle connections and messages with `handler`. The default, [`Ignore`], leaves
    /// client messages to middleware; [`Relay`](crate::Relay) is the ECHO/BROADCAST relay.
    pub fn handler<H2: Handler>(self, handler: H2) -> ServerBuilder<R, H2> {
        ServerBuilder {
            runtime: self.runtime,
            core: self.core,
            auth: self.auth,
            limits: self.limits,
            transport: self.transport,
            path: self.path,
            authenticator: self.authenticator,
            handler,
            middleware: self.middleware,
            cluster: self.cluster,
            namespace: self.namespace,
            portals: self.portals,
            admission: self.admission,
            tls: self.tls,
            rooms: self.rooms,
        }
    }

    /// Validate and build.
    pub fn build(self) -> Result<Server<R, H>, ConfigError> {
        let mut core = self.core.limits(self.limits);
        if let Some(auth) = self.auth {
            if self.authenticator.is_none() {
                return Err(ConfigError::MissingAuthenticator);
            }
            core = core.authentication(auth);
        }
        let config = core.build()?;
        if self.transport.max_outbound_bytes == 0 || self.transport.read_buffer_bytes == 0 {
            return Err(ConfigError::ZeroCount("transport buffer"));
        }
        if self.admission.max_connections == Some(0) {
            return Err(ConfigError::ZeroCount("max connections"));
        }
        if config.sync().is_some() && self.cluster.is_none() {
            return Err(ConfigError::SyncWithoutStore);
        }
        let cluster = match self.cluster {
            Some(mut cluster) => {
                if let Some(namespace) = self.namespace {
                    cluster.namespace = Some(namespace);
                }
                if let Some(portals) = self.portals {
                    cluster.portals = Some(portals);
                }
                Some(cluster)
            }
            None if self.namespace.is_some() => {
                return Err(ConfigError::ClusterSettingWithoutRedis("a namespace"));
            }
            None if self.portals.is_some() => {
                return Err(ConfigError::ClusterSettingWithoutRedis(
                    "forwarding to portals",
                ));
            }
            None => None,
        };
        let streams = cluster
            .as_ref()
            .and_then(|cluster| cluster.recovery.as_ref())
            .is_some_and(|recovery| recovery.users || recovery.broadcast);
        if streams && self.rooms.is_none() {
            return Err(ConfigError::StreamsWithoutRooms);
        }
        let middleware = Middlewares::new(self.middleware);
        let replica = match &cluster {
            Some(cluster) => Some(replica(&self.runtime, &config, cluster)?),
            None => None,
        };
        let clock = self.runtime.clone();
        let settings = Settings {
            auth_required: config.authentication_required(),
            outbound_cap: self.transport.max_outbound_bytes,
            limits: config.limits().clone(),
            observer: Arc::new(middleware.clone()),
            clock: Box::new(move || clock.now()),
        };
        let (registry, inbox) = Registry::new(settings, replica);
        let registry = Arc::new(registry);
        if let (Some(cluster), Some(inbox)) = (cluster, inbox) {
            cluster::spawn(&self.runtime, cluster, Arc::downgrade(&registry), inbox);
        }
        Ok(Server {
            inner: Arc::new(ServerContext {
                runtime: self.runtime,
                config: Arc::new(config),
                transport: self.transport,
                path: self.path,
                authenticator: self.authenticator,
                handler: self.handler,
                middleware,
                registry,
                admission: self.admission,
                tls: self.tls,
                rooms: self.rooms,
                shutdown: Shutdown::default(),
            }),
        })
    }
}

/// The TLS and WebSocket handshakes of an accepted stream, refusing a request off
/// the endpoint's path (404), from an origin that is not allowed (403), or when the
/// server is `full` (503); `None` when the connection ends there.
async fn accept<R: Runtime, H, S>(
    inner: Arc<ServerContext<R, H>>,
    stream: S,
    full: bool,
) -> Option<WebSocketStream<PooledRead<MaybeTls<S>>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let path = inner.path.clone();
    let policy = inner.admission.clone();
    // tungstenite fixes this callback's signature, large error type included.
    #[allow(clippy::result_large_err)]
    let check = move |request: &Request, response: Response| {
        let origin = request.headers().get(header::ORIGIN).map(|v| v.as_bytes());
        let refusal = if request.uri().path() != path {
            Some(Refusal::WrongPath)
        } else if !policy.allows_origin(origin) {
            Some(Refusal::OriginNotAllowed)
        } else if full {
            Some(Refusal::Full)
        } else {
            None
        };
        match refusal {
            None => Ok(response),
            Some(refusal) => Err(refuse(refusal)),
        }
    };
    handshake(
        &inner.runtime,
        stream,
        inner.tls.as_ref(),
        &inner.transport,
        inner.config.limits(),
        check,
    )
    .await
}

/// The cluster's replica of a server: the server's settings, the cluster's, a new
/// name and seed.
fn replica<R: Runtime>(
    runtime: &R,
    config: &ServerConfig,
    cluster: &ClusterConfig,
) -> Result<Replica, ConfigError> {
    let seed = entropy_seed();
    let settings = ReplicaConfig {
        namespace: mesa_core::Namespace::new(cluster.namespace.clone()),
        lease: cluster.lease,
        portals: cluster.portals,
        durable_portals: cluster.durable_portals,
        max_pending: cluster.max_pending,
        legacy_bus: cluster.legacy_bus,
        shards: 1 + cluster.shard_urls.len(),
        store_wait: cluster.store_wait,
        recovery: cluster.recovery.clone(),
        ..ReplicaConfig::new(config)
    };
    Replica::new(settings, format!("{seed:016x}"), seed, runtime.now())
}

/// A Mesa server: accept connections, upgrade them, and drive each one.
pub struct Server<R, H = Ignore> {
    inner: Arc<ServerContext<R, H>>,
}

impl<R, H> Clone for Server<R, H> {
    fn clone(&self) -> Self {
        Server {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Runtime> Server<R, Ignore> {
    /// Start building a server on `runtime`.
    pub fn builder(runtime: R) -> ServerBuilder<R, Ignore> {
        ServerBuilder::new(runtime)
    }
}

impl<R: Runtime, H: Handler> Server<R, H> {
    /// A handle for sending to connections from anywhere.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle::new(self.inner.registry.clone())
    }

    /// The validated core configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The path of the WebSocket endpoint ([`ServerBuilder::path`]).
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Bind `addr`; [`Listening::run`] then serves until [`shutdown`](Self::shutdown).
    /// [`Listening::local_addr`] tells the port when `addr` asked for port 0.
    pub async fn bind(&self, addr: SocketAddr) -> io::Result<Listening<R, H>> {
        let listener = self.inner.runtime.bind(addr).await?;
        let local = self.inner.runtime.local_addr(&listener)?;
        Ok(Listening {
            server: self.clone(),
            listener,
            local,
        })
    }

    /// Accept on `listener` until [`shutdown`](Self::shutdown), one task per connection.
    pub async fn serve(&self, listener: R::TcpListener) -> io::Result<()> {
        let server = self.clone();
        accept_loop(
            &self.inner.runtime,
            &listener,
            self.inner.shutdown.wait(),
            move |stream, remote| server.serve_stream(stream, Some(remote)),
        )
        .await;
        Ok(())
    }

    /// Whether an upgrade request with this `Origin` header would be admitted now
    /// (allowed origins, maximum connections), for an HTTP framework that routes the
    /// request and answers the upgrade itself before
    /// [`serve_upgraded`](Self::serve_upgraded). Answer a refusal with its
    /// [`status`](Refusal::status).
    pub fn check_upgrade(&self, origin: Option<&str>) -> Result<(), Refusal> {
        if !self
            .inner
            .admission
            .allows_origin(origin.map(str::as_bytes))
        {
            return Err(Refusal::OriginNotAllowed);
        }
        self.admit().map(drop).ok_or(Refusal::Full)
    }

    /// Take one of the [`max_connections`](ServerBuilder::max_connections) slots for
    /// a connection accepted outside the server, before work that should count against
    /// the limit: a TLS handshake done by an HTTP framework's listener, which the
    /// limit would otherwise only see at the WebSocket upgrade. The slot counts like
    /// a connection in its handshake until the [`Admission`] is dropped. `None` when
    /// the server is full (always `Some` without a limit).
    pub fn admit(&self) -> Option<Admission> {
        Admission::take(&self.inner.registry, self.inner.admission.max_connections)
    }

    /// The transport settings ([`ServerBuilder::transport`]): an application that
    /// does a handshake itself bounds it by their `handshake_timeout`.
    pub fn transport(&self) -> &TransportConfig {
        &self.inner.transport
    }

    /// Perform the TLS handshake (with [`ServerBuilder::tls`]) and the WebSocket
    /// handshake on an accepted stream, then drive it. The request is refused with
    /// 404 off the endpoint's path, 403 from an origin that is not allowed, and 503
    /// when the server is full.
    ///
    /// The future holds little besides the connection's loop: the handshakes' state is
    /// boxed (memory only while they run), and an `async fn` would keep its arguments
    /// (the stream, the address) in every connection's task for its whole life.
    pub fn serve_stream<S>(
        &self,
        stream: S,
        remote: Option<SocketAddr>,
    ) -> impl Future<Output = ()> + Send + use<R, H, S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let admission = self.admit();
        let handshake = Box::pin(accept(self.inner.clone(), stream, admission.is_none()));
        let inner = self.inner.clone();
        async move {
            // Not `if let`: its scrutinee would stay in this task's state while the
            // connection lives.
            let Some(ws) = handshake.await else { return };
            drive(inner, ws, remote, admission).await;
        }
    }

    /// Drive a stream whose WebSocket handshake was already done elsewhere (an axum
    /// or hyper upgrade). Past [`max_connections`](ServerBuilder::max_connections)
    /// the connection is closed at once with 1013.
    pub async fn serve_upgraded<S>(&self, stream: S, remote: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let transport = &self.inner.transport;
        let ws_config = transport.server_websocket(self.inner.config.limits());
        let stream = PooledRead::new(stream, transport.read_buffer_bytes);
        let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config)).await;
        match self.admit() {
            Some(admission) => drive(self.inner.clone(), ws, remote, Some(admission)).await,
            None => {
                let full = Close::new(CloseCode::TRY_AGAIN_LATER, "too many connections");
                let runtime = &self.inner.runtime;
                let deadline =
                    runtime.sleep_until(runtime.now() + self.inner.transport.close_timeout);
                let close = ws.close(Some(crate::transport::close_frame(&full)));
                let _ = select(Box::pin(close), Box::pin(deadline)).await;
            }
        }
    }

    /// Stop accepting and close every connection with 1001.
    pub fn shutdown(&self) {
        self.inner.shutdown.trigger();
        let close = Close::new(CloseCode::GOING_AWAY, "server shutting down");
        self.inner.registry.close_all(&close);
    }

    /// Shut down within `drain`: stop accepting, close every connection with 1001,
    /// wait for them to finish, then leave the cluster (flush what is queued for
    /// Redis, give up the lease and this replica's presence).
    pub async fn shutdown_gracefully(&self, drain: Duration) {
        let runtime = &self.inner.runtime;
        let deadline = runtime.now() + drain;
        self.shutdown();
        while self.inner.registry.live_tasks() > 0 && runtime.now() < deadline {
            runtime
                .sleep_until(runtime.now() + Duration::from_millis(10))
                .await;
        }
        if let Some(retired) = self.inner.registry.retire() {
            let timeout = Box::pin(runtime.sleep_until(deadline.max(runtime.now())));
            let _ = select(retired, timeout).await;
        }
    }
}

/// A bound server, ready to [`run`](Listening::run).
pub struct Listening<R: Runtime, H> {
    server: Server<R, H>,
    listener: R::TcpListener,
    local: SocketAddr,
}

impl<R: Runtime, H: Handler> Listening<R, H> {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serve until [`Server::shutdown`].
    pub async fn run(self) -> io::Result<()> {
        self.server.serve(self.listener).await
    }
}

/// The HTTP answer to a refused upgrade request.
fn refuse(refusal: Refusal) -> ErrorResponse {
    let mut error = ErrorResponse::new(Some(refusal.to_string()));
    *error.status_mut() =
        StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    error
}
