//! The server: a typed builder over the core's configuration, the accept loop, the
//! WebSocket handshake, and handing each connection to its driver loop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::StatusCode;
use async_tungstenite::tungstenite::protocol::Role;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::future::{Either, select};
use mesa_core::{
    AuthConfig, Close, CloseCode, ConfigError, HeartbeatConfig, Limits, PortalChoice, ServerConfig,
    ServerConfigBuilder, SyncConfig,
};

use crate::cluster::{self, ClusterConfig, Job};
use crate::runtime::entropy_seed;

use crate::connection::drive;
use crate::handler::{Authenticator, Handler, Relay};
use crate::middleware::{Middleware, Middlewares};
use crate::router::{Router, ServerHandle};
use crate::runtime::Runtime;
use crate::transport::TransportConfig;

/// What every connection task shares.
pub(crate) struct Inner<R, H> {
    pub(crate) runtime: R,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) transport: TransportConfig,
    pub(crate) path: String,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    pub(crate) handler: H,
    pub(crate) router: Arc<Router>,
    shutdown: Shutdown,
}

/// Builds a [`Server`]. Every option of `@cryb/mesa`'s server, with its documented
/// defaults; [`build`](Self::build) validates them once.
#[must_use]
pub struct ServerBuilder<R, H = Relay> {
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
}

impl<R: Runtime> ServerBuilder<R, Relay> {
    pub(crate) fn new(runtime: R) -> Self {
        ServerBuilder {
            runtime,
            core: ServerConfig::builder(),
            auth: None,
            limits: Limits::default(),
            transport: TransportConfig::default(),
            path: "/".to_owned(),
            authenticator: None,
            handler: Relay,
            middleware: Vec::new(),
            cluster: None,
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

    /// Every cluster setting at once (namespace, lease, portals, retry buffer).
    pub fn cluster(mut self, cluster: ClusterConfig) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Isolate this cluster from others on the same Redis (needs [`redis`](Self::redis)).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        if let Some(cluster) = &mut self.cluster {
            cluster.namespace = Some(namespace.into());
        }
        self
    }

    /// Forward client events to portals, choosing one per event (needs
    /// [`redis`](Self::redis)).
    pub fn portals(mut self, choice: PortalChoice) -> Self {
        if let Some(cluster) = &mut self.cluster {
            cluster.portals = Some(choice);
        }
        self
    }

    /// Store messages for offline ids and redeliver them when they authenticate
    /// (needs [`redis`](Self::redis)).
    pub fn sync(mut self, sync: SyncConfig) -> Self {
        self.core = self.core.sync(sync);
        self
    }

    /// Register an observer.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Handle connections and messages with `handler` (the default is [`Relay`]).
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
        if config.sync().is_some() && self.cluster.is_none() {
            return Err(ConfigError::SyncWithoutStore);
        }
        let router = Arc::new(Router::new(
            config.authentication_required(),
            Middlewares::new(self.middleware),
            self.transport.max_outbound_bytes,
        ));
        if let Some(cluster) = self.cluster {
            let handle = cluster::spawn(
                &self.runtime,
                cluster,
                config.sync().is_some(),
                config.limits().max_stored_per_id,
                Arc::downgrade(&router),
                entropy_seed(),
            );
            let _ = router.cluster.set(handle);
        }
        Ok(Server {
            inner: Arc::new(Inner {
                runtime: self.runtime,
                config: Arc::new(config),
                transport: self.transport,
                path: self.path,
                authenticator: self.authenticator,
                handler: self.handler,
                router,
                shutdown: Shutdown::default(),
            }),
        })
    }
}

/// A Mesa server: accept connections, upgrade them, and drive each one.
pub struct Server<R, H = Relay> {
    inner: Arc<Inner<R, H>>,
}

impl<R, H> Clone for Server<R, H> {
    fn clone(&self) -> Self {
        Server {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Runtime> Server<R, Relay> {
    /// Start building a server on `runtime`.
    pub fn builder(runtime: R) -> ServerBuilder<R, Relay> {
        ServerBuilder::new(runtime)
    }
}

impl<R: Runtime, H: Handler> Server<R, H> {
    /// A handle for sending to connections from anywhere.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            router: self.inner.router.clone(),
        }
    }

    /// The validated core configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
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
        loop {
            let accept = Box::pin(self.inner.runtime.accept(&listener));
            match select(accept, self.inner.shutdown.wait()).await {
                Either::Left((Ok((stream, remote)), _)) => {
                    let server = self.clone();
                    self.inner.runtime.spawn(async move {
                        server.serve_stream(stream, Some(remote)).await;
                    });
                }
                Either::Left((Err(error), _)) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(%error, "accept failed");
                    let pause = self.inner.runtime.now() + Duration::from_millis(50);
                    self.inner.runtime.sleep_until(pause).await;
                }
                Either::Right(((), _)) => return Ok(()),
            }
        }
    }

    /// Perform the WebSocket handshake on an accepted stream, then drive it.
    pub async fn serve_stream<S>(&self, stream: S, remote: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let path = self.inner.path.clone();
        // tungstenite fixes this callback's signature, large error type included.
        #[allow(clippy::result_large_err)]
        let check_path = move |request: &Request, response: Response| {
            if request.uri().path() == path {
                Ok(response)
            } else {
                let mut error = ErrorResponse::new(Some("no Mesa endpoint here".to_owned()));
                *error.status_mut() = StatusCode::NOT_FOUND;
                Err(error)
            }
        };
        let ws_config = self.inner.transport.websocket(self.inner.config.limits());
        let handshake = Box::pin(async_tungstenite::accept_hdr_async_with_config(
            stream,
            check_path,
            Some(ws_config),
        ));
        let deadline = self.inner.runtime.now() + self.inner.transport.handshake_timeout;
        let timeout = Box::pin(self.inner.runtime.sleep_until(deadline));
        match select(handshake, timeout).await {
            Either::Left((Ok(ws), _)) => drive(self.inner.clone(), ws, remote).await,
            Either::Left((Err(error), _)) => tracing::debug!(%error, "handshake failed"),
            Either::Right(_) => tracing::debug!("handshake timed out"),
        }
    }

    /// Drive a stream whose WebSocket handshake was already done elsewhere (an axum
    /// or hyper upgrade).
    pub async fn serve_upgraded<S>(&self, stream: S, remote: Option<SocketAddr>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ws_config = self.inner.transport.websocket(self.inner.config.limits());
        let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config)).await;
        drive(self.inner.clone(), ws, remote).await;
    }

    /// Stop accepting and close every connection with 1001.
    pub fn shutdown(&self) {
        self.inner.shutdown.trigger();
        let close = Close::new(CloseCode::GOING_AWAY, "server shutting down");
        self.inner.router.close_all(&close);
    }

    /// Shut down within `drain`: stop accepting, close every connection with 1001,
    /// wait for them to finish, then leave the cluster (flush what is queued for
    /// Redis, give up the lease and this replica's presence).
    pub async fn shutdown_gracefully(&self, drain: Duration) {
        let runtime = &self.inner.runtime;
        let deadline = runtime.now() + drain;
        self.shutdown();
        while self.inner.router.connection_count() > 0 && runtime.now() < deadline {
            runtime
                .sleep_until(runtime.now() + Duration::from_millis(10))
                .await;
        }
        if let Some(cluster) = self.inner.router.cluster.get() {
            let (reply, retired) = futures_channel::oneshot::channel();
            if cluster.submit(Job::Retire { reply }) {
                let timeout = Box::pin(runtime.sleep_until(deadline.max(runtime.now())));
                let _ = select(retired, timeout).await;
            }
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

/// A one-shot, many-waiter shutdown signal.
#[derive(Default)]
struct Shutdown {
    triggered: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Shutdown {
    fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        wakers.into_iter().for_each(Waker::wake);
    }

    fn wait(&self) -> impl std::future::Future<Output = ()> + Unpin + '_ {
        std::future::poll_fn(move |cx| {
            if self.triggered.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            if self.triggered.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}
