//! The public API a runtime crate exposes, generated once for every runtime so that
//! `mesa-tokio` and `mesa-async-std` cannot drift apart.
//!
//! A runtime crate's `Server`, `ServerBuilder`, `Listening`, `ClientBuilder` and
//! `PortalBuilder` are newtypes over the driver's types with the runtime filled in,
//! not type aliases: rustdoc renders an alias's page without the aliased type's
//! methods (only a script adds the driver's generic impls, `R` parameters and
//! unresolved links included), so a user reading `mesa-tokio`'s docs could not see
//! what a server can do. Each method delegates to the driver's and carries a doc
//! written for the runtime crate; a method added to one of those driver types is
//! added here too.

/// Generate a runtime crate's API for the unit-struct runtime `$runtime` (named
/// `$name` in the docs): the `Server`, `ServerBuilder`, `Listening`, `ClientBuilder`
/// and `PortalBuilder` types and the `server()`, `client(url)` and `portal(url)`
/// constructors. An implementation detail of the runtime crates, hidden from the
/// docs: users meet the items it generates there, not the macro. Doc links name the
/// crate's root re-exports as `crate::…`, so that they resolve wherever the items are
/// generated (a module of `mesa-async-std`).
#[doc(hidden)]
#[macro_export]
macro_rules! runtime_api {
    ($runtime:ident, $name:literal) => {
        #[doc = concat!("Builds a [`Server`] on ", $name, ".")]
        ///
        /// Every option of `@cryb/mesa`'s server, with its documented defaults;
        /// [`build`](Self::build) validates them once.
        #[must_use]
        pub struct ServerBuilder<H = $crate::Ignore>($crate::ServerBuilder<$runtime, H>);

        impl<H: $crate::Handler> ServerBuilder<H> {
            $crate::runtime_api! { @options
                /// Serve WebSocket upgrades on this path only (default `/`); others get 404.
                path(path: impl Into<String>);
                /// Send heartbeats every `interval`; close a client that misses more than
                /// `max_attempts` in a row (upstream documents 10 s and 3).
                heartbeat(interval: ::std::time::Duration, max_attempts: u32);
                /// Announce a reconnect interval to clients (`c_reconnect_interval`).
                reconnect_interval(interval: ::std::time::Duration);
                /// Authenticate clients with `authenticator` (an async closure from the op 2
                /// data to `Ok((id, user))` or an [`AuthError`](crate::AuthError)).
                authenticate(authenticator: impl $crate::Authenticator);
                /// Time a client has to authenticate (default 10 s), enforced with close 1008.
                auth_timeout(timeout: ::std::time::Duration);
                /// Server-wide sends skip unauthenticated connections (default false).
                auth_required(required: bool);
                /// Op 22 carries the user object (default true).
                send_user_object(send: bool);
                /// A rejected authentication closes with 1008 (default true).
                disconnect_on_fail(disconnect: bool);
                /// Require clients to announce exactly `version` (`enforce_equal_versions`).
                enforce_equal_versions(version: impl Into<String>);
                /// Announce the `store_messages` rule.
                store_messages(on: bool);
                /// Replace the limits on what peers send.
                limits(limits: $crate::mesa_core::Limits);
                /// Replace the transport settings (buffers, outbound cap, handshake timeout).
                transport(transport: $crate::TransportConfig);
                /// Refuse WebSocket upgrades with HTTP 503 while `max` connections are open
                /// or in their handshake (default: no limit). Streams handed to
                /// [`Server::serve_upgraded`] past the limit are closed with 1013 instead.
                max_connections(max: usize);
            }

            /// Accept WebSocket upgrades only from pages of these origins
            /// (`https://app.example.com`, compared without case), refusing others with
            /// HTTP 403: a defence against cross-site WebSocket hijacking, where a page of
            /// another site opens a socket with the visitor's cookies. Requests without an
            /// `Origin` header (non-browser clients) are accepted. Default: off, every
            /// origin.
            pub fn allowed_origins<I, S>(self, origins: I) -> Self
            where
                I: IntoIterator<Item = S>,
                S: Into<String>,
            {
                Self(self.0.allowed_origins(origins))
            }

            $crate::runtime_api! { @options
                /// Serve `wss://`: every accepted connection does a TLS handshake with this
                /// configuration (an `Arc<rustls::ServerConfig>` or a
                /// [`ServerTls`](crate::ServerTls)) before its WebSocket handshake, both
                /// within the transport's handshake timeout and while holding a slot of
                /// [`max_connections`](Self::max_connections). A client that does not speak
                /// TLS (a plaintext request) fails its handshake and is dropped. Keep a clone
                /// of the `ServerTls` to [`reload`](crate::ServerTls::reload) the certificate
                /// while the server runs; open connections keep theirs.
                tls(tls: impl Into<$crate::ServerTls>);
                /// Replicate through the Redis at `url` (upstream's layout: replicas of ours
                /// and of `@cryb/mesa` deliver each other's sends).
                redis(url: impl Into<String>);
                /// Every cluster setting at once (namespace, lease, portals, retry buffer);
                /// [`namespace`](Self::namespace) and [`portals`](Self::portals), called
                /// before or after, override its namespace and portals.
                cluster(cluster: $crate::ClusterConfig);
                /// Isolate this cluster from others on the same Redis. Needs
                /// [`redis`](Self::redis) or [`cluster`](Self::cluster), called before or
                /// after: without either, [`build`](Self::build) fails with
                /// [`ConfigError::ClusterSettingWithoutRedis`](crate::ConfigError::ClusterSettingWithoutRedis).
                namespace(namespace: impl Into<String>);
                /// Forward client events to portals, choosing one per event. Needs
                /// [`redis`](Self::redis) or [`cluster`](Self::cluster), called before or
                /// after: without either, [`build`](Self::build) fails with
                /// [`ConfigError::ClusterSettingWithoutRedis`](crate::ConfigError::ClusterSettingWithoutRedis).
                portals(choice: $crate::mesa_core::PortalChoice);
                /// Store messages for offline ids and redeliver them when they authenticate
                /// (needs [`redis`](Self::redis)).
                sync(sync: $crate::mesa_core::SyncConfig);
                /// Turn rooms on with `policy` deciding who may subscribe and publish
                /// (`docs/protocol.md`): the hello announces them, and clients that opt in
                /// may subscribe. The server itself may always put connections in rooms and
                /// publish to them. Off by default.
                rooms(policy: $crate::RoomPolicy);
                /// Register an observer.
                middleware(middleware: impl $crate::Middleware);
            }

            /// Handle connections and messages with `handler`. The default,
            /// [`Ignore`](crate::Ignore), leaves client messages to middleware;
            /// [`Relay`](crate::Relay) is the ECHO/BROADCAST relay.
            pub fn handler<H2: $crate::Handler>(self, handler: H2) -> ServerBuilder<H2> {
                ServerBuilder(self.0.handler(handler))
            }

            /// Validate and build.
            pub fn build(self) -> Result<Server<H>, $crate::mesa_core::ConfigError> {
                self.0.build().map(Server)
            }
        }

        #[doc = concat!(
            "A Mesa server on ", $name, ": accepts connections, upgrades them and drives each one."
        )]
        ///
        /// Built by [`server()`]. `H` handles connections and messages: by default
        /// [`Ignore`](crate::Ignore) (client messages reach only middleware);
        /// `.handler(Relay)` for the relay. Clones are handles to the same server.
        pub struct Server<H = $crate::Ignore>($crate::Server<$runtime, H>);

        impl<H> Clone for Server<H> {
            fn clone(&self) -> Self {
                Server(self.0.clone())
            }
        }

        impl<H: $crate::Handler> Server<H> {
            /// A handle for sending to connections from anywhere.
            pub fn handle(&self) -> $crate::ServerHandle {
                self.0.handle()
            }

            /// The validated core configuration.
            pub fn config(&self) -> &$crate::mesa_core::ServerConfig {
                self.0.config()
            }

            /// The path of the WebSocket endpoint ([`ServerBuilder::path`]).
            pub fn path(&self) -> &str {
                self.0.path()
            }

            /// Bind `addr`; [`Listening::run`] then serves until
            /// [`shutdown`](Self::shutdown). [`Listening::local_addr`] tells the port when
            /// `addr` asked for port 0.
            pub async fn bind(
                &self,
                addr: ::std::net::SocketAddr,
            ) -> ::std::io::Result<Listening<H>> {
                self.0.bind(addr).await.map(Listening)
            }

            #[doc = concat!(
                "Accept on `listener`, a ", $name, " listener the application bound itself, until ",
                "[`shutdown`](Self::shutdown), one task per connection."
            )]
            pub async fn serve(
                &self,
                listener: <$runtime as $crate::Runtime>::TcpListener,
            ) -> ::std::io::Result<()> {
                self.0.serve(listener).await
            }

            /// Whether an upgrade request with this `Origin` header would be admitted now
            /// (allowed origins, maximum connections), for an HTTP framework that routes
            /// the request and answers the upgrade itself before
            /// [`serve_upgraded`](Self::serve_upgraded). Answer a refusal with its
            /// [`status`](crate::Refusal::status).
            pub fn check_upgrade(&self, origin: Option<&str>) -> Result<(), $crate::Refusal> {
                self.0.check_upgrade(origin)
            }

            /// Take one of the [`max_connections`](ServerBuilder::max_connections) slots
            /// for a connection accepted outside the server, before work that should count
            /// against the limit: a TLS handshake done by an HTTP framework's listener,
            /// which the limit would otherwise only see at the WebSocket upgrade. The slot
            /// counts like a connection in its handshake until the
            /// [`Admission`](crate::Admission) is dropped. `None` when the server is full
            /// (always `Some` without a limit).
            pub fn admit(&self) -> Option<$crate::Admission> {
                self.0.admit()
            }

            /// The transport settings ([`ServerBuilder::transport`]): an application that
            /// does a handshake itself bounds it by their `handshake_timeout`.
            pub fn transport(&self) -> &$crate::TransportConfig {
                self.0.transport()
            }

            /// Perform the TLS handshake (with [`ServerBuilder::tls`]) and the WebSocket
            /// handshake on an accepted stream (`futures-io`), then drive it. The request
            /// is refused with 404 off the endpoint's path, 403 from an origin that is not
            /// allowed, and 503 when the server is full.
            pub fn serve_stream<S>(
                &self,
                stream: S,
                remote: Option<::std::net::SocketAddr>,
            ) -> impl ::std::future::Future<Output = ()> + Send + use<H, S>
            where
                S: $crate::futures_io::AsyncRead + $crate::futures_io::AsyncWrite + Unpin + Send + 'static,
            {
                self.0.serve_stream(stream, remote)
            }

            /// Drive a stream (`futures-io`) whose WebSocket handshake was already done
            /// elsewhere (an axum or hyper upgrade). Past
            /// [`max_connections`](ServerBuilder::max_connections) the connection is closed
            /// at once with 1013.
            pub async fn serve_upgraded<S>(&self, stream: S, remote: Option<::std::net::SocketAddr>)
            where
                S: $crate::futures_io::AsyncRead + $crate::futures_io::AsyncWrite + Unpin + Send + 'static,
            {
                self.0.serve_upgraded(stream, remote).await
            }

            /// Stop accepting and close every connection with 1001.
            pub fn shutdown(&self) {
                self.0.shutdown()
            }

            /// Shut down within `drain`: stop accepting, close every connection with 1001,
            /// wait for them to finish, then leave the cluster (flush what is queued for
            /// Redis, give up the lease and this replica's presence).
            pub async fn shutdown_gracefully(&self, drain: ::std::time::Duration) {
                self.0.shutdown_gracefully(drain).await
            }
        }

        /// A bound [`Server`], ready to [`run`](Listening::run).
        pub struct Listening<H = $crate::Ignore>($crate::Listening<$runtime, H>);

        impl<H: $crate::Handler> Listening<H> {
            /// The bound address.
            pub fn local_addr(&self) -> ::std::net::SocketAddr {
                self.0.local_addr()
            }

            /// Serve until [`Server::shutdown`].
            pub async fn run(self) -> ::std::io::Result<()> {
                self.0.run().await
            }
        }

        #[doc = concat!("Builds a [`Client`](crate::Client) whose task runs on ", $name, ".")]
        #[must_use]
        pub struct ClientBuilder($crate::ClientBuilder<$runtime>);

        impl ClientBuilder {
            $crate::runtime_api! { @options
                /// Reconnect automatically after the connection is lost (default true).
                reconnect(reconnect: bool);
                /// Backoff bounds for reconnection (default base 1 s, or the server's
                /// interval; cap 30 s).
                backoff(backoff: $crate::mesa_core::BackoffConfig);
                /// Heartbeats the server may skip before it is declared dead (default 3).
                heartbeat_max_attempts(attempts: u32);
                /// The version announced when the server enforces equal versions.
                version(version: impl Into<String>);
                /// Limits on frames from the server, on the offline send queue and on
                /// subscriptions.
                limits(limits: $crate::mesa_core::Limits);
                /// Opt in to rooms on servers that announce them (default true); off, no
                /// frame of the client mentions rooms and room commands fail (see
                /// [`ClientConfig::rooms`](crate::mesa_core::ClientConfig::rooms)).
                rooms(on: bool);
                /// Transport settings (connect/handshake timeout, buffers).
                transport(transport: $crate::TransportConfig);
                /// Connect as soon as the client is built (default true); otherwise call
                /// [`Client::connect`](crate::Client::connect).
                auto_connect(auto: bool);
                /// Fix the backoff jitter's seed (tests); by default it comes from the OS.
                seed(seed: u64);
                /// Trust the certificates of a PEM input for `wss://`, beside the default
                /// roots (a private CA, a self-signed server). A PEM that does not parse
                /// fails [`build`](Self::build).
                add_root_pem(pem: impl AsRef<[u8]>);
                /// Trust a DER certificate for `wss://`, beside the default roots.
                add_root_der(der: impl Into<Vec<u8>>);
                /// Use this rustls configuration for `wss://` instead of the defaults (the
                /// Mozilla roots, plus the platform's store with the `native-roots` feature,
                /// plus the roots added here): for client certificates, pinned roots or a
                /// provider of the application's choosing. The URL's host is still sent as
                /// SNI and verified by the configuration's verifier.
                tls_config(config: ::std::sync::Arc<$crate::rustls::ClientConfig>);
            }

            /// Start the client's task.
            pub fn build(
                self,
            ) -> Result<($crate::Client, $crate::ClientEvents), $crate::BuildError> {
                self.0.build()
            }
        }

        #[doc = concat!("Builds a [`Portal`](crate::Portal) whose task runs on ", $name, ".")]
        #[derive(Debug, Clone)]
        #[must_use]
        pub struct PortalBuilder($crate::PortalBuilder<$runtime>);

        impl PortalBuilder {
            $crate::runtime_api! { @options
                /// The cluster's namespace (empty: none).
                namespace(namespace: impl Into<String>);
                /// Take every event, not only those addressed to this portal (upstream's
                /// `reportAllEvents`; default false).
                report_all_events(all: bool);
                /// Register under this id instead of a random UUID (v4, as upstream's).
                id(id: impl Into<String>);
                /// For a `rediss://` URL: trust these PEM certificates (a private CA) instead
                /// of the platform's store
                /// ([`ClusterConfig::redis_ca_pem`](crate::ClusterConfig::redis_ca_pem)).
                redis_ca_pem(pem: impl Into<Vec<u8>>);
            }

            /// Connect, subscribe to `ns("portal")`, then join the pool. Returns once the
            /// portal receives events; later link failures are repaired in the background.
            pub async fn start(self) -> Result<$crate::Portal, $crate::PortalError> {
                self.0.start().await
            }
        }

        #[doc = concat!("Builds a [`DurablePortal`](crate::DurablePortal) whose task runs on ", $name, ".")]
        #[derive(Debug, Clone)]
        #[must_use]
        pub struct DurablePortalBuilder($crate::DurablePortalBuilder<$runtime>);

        impl DurablePortalBuilder {
            $crate::runtime_api! { @options
                /// The cluster's namespace (empty: none).
                namespace(namespace: impl Into<String>);
                /// Consume under this name instead of a random UUID: a portal restarted
                /// under its old id takes its unfinished events back at once.
                id(id: impl Into<String>);
                /// Streams the servers spread events over (as their setting; default 16).
                partitions(partitions: usize);
                /// How long an event may stay unacknowledged before it is delivered
                /// again, and the partition leases' time to live (default 30 s).
                visibility_timeout(timeout: ::std::time::Duration);
                /// How often leases are renewed and overdue events reclaimed (default
                /// 5 s; below the visibility timeout).
                tick(tick: ::std::time::Duration);
                /// Deliveries of one event before it goes to the dead-letter stream
                /// (default 5).
                max_deliveries(deliveries: u64);
                /// Every setting at once (the group and namespace included).
                config(config: $crate::mesa_core::DurablePortalConfig);
                /// For a `rediss://` URL: trust these PEM certificates (a private CA)
                /// instead of the platform's store.
                redis_ca_pem(pem: impl Into<Vec<u8>>);
            }

            /// Connect and make sure the group exists. Returns once the portal is ready
            /// to take partitions; later link failures are repaired in the background.
            pub async fn start(self) -> Result<$crate::DurablePortal, $crate::PortalError> {
                self.0.start().await
            }
        }

        /// Start building a durable portal of consumer group `group` of the cluster on
        /// the Redis at `url`: it handles, at least once, the client events that
        /// servers with durable portals on append to Redis streams
        /// ([`ClusterConfig::durable_portals`](crate::ClusterConfig::durable_portals)).
        pub fn durable_portal(url: impl Into<String>, group: impl Into<String>) -> DurablePortalBuilder {
            DurablePortalBuilder($crate::DurablePortalBuilder::new($runtime, url, group))
        }

        /// Start building a server.
        pub fn server() -> ServerBuilder {
            ServerBuilder($crate::Server::builder($runtime))
        }

        /// Start building a client of `url` (`ws://host:port/path` or `wss://...`).
        pub fn client(url: impl Into<String>) -> ClientBuilder {
            ClientBuilder($crate::client($runtime, url))
        }

        /// Start building a portal of the cluster on the Redis at `url`: it receives
        /// the client events the servers forward (see [`ServerBuilder::portals`]).
        pub fn portal(url: impl Into<String>) -> PortalBuilder {
            PortalBuilder($crate::PortalBuilder::new($runtime, url))
        }
    };

    // A builder's options: each delegates to the driver builder's method of the same
    // name and gives back the wrapped builder.
    (@options $($(#[$doc:meta])* $option:ident($($arg:ident: $ty:ty),*);)*) => {$(
        $(#[$doc])*
        pub fn $option(self, $($arg: $ty),*) -> Self {
            Self(self.0.$option($($arg),*))
        }
    )*};
}

/// Re-export at a runtime crate's root every type its users name (from `mesa_core`
/// and `mesa_driver`) and a `tls` module, one list for every runtime crate. An
/// implementation detail of the runtime crates, hidden from the docs.
#[doc(hidden)]
#[macro_export]
macro_rules! root_exports {
    () => {
        /// Why the client's session refused a command (inside [`ClientError::Session`]).
        pub use $crate::mesa_core::ClientError as ClientSessionError;
        pub use $crate::mesa_core::rooms::{RefusalCode, RoomRefusal};
        pub use $crate::mesa_core::{
            BackoffConfig, ClientEvent, Close, CloseCode, ConfigError, ConnId,
            DEFAULT_PORTAL_PARTITIONS, DecodeError, DurablePortalConfig, DurablePortals, Hello,
            Limits, Message, MessageOptions, Namespace, Opcode, PortalChoice, PortalEvent,
            PortalEventKind, RateLimitPolicy, Recipients, Redelivery, Reference, Rule, StoreWait,
            SyncConfig, TooManyRecipients,
        };
        pub use $crate::{
            Admission, AuthError, Authenticator, BoxError, BoxFuture, BuildError, Client,
            ClientError, ClientEvents, ClusterConfig, Connection, DevAuthenticator, DispatchError,
            DispatchReport, Dispatcher, DispatcherBuilder, DurableEvent, DurablePortal, Handler,
            Ignore, Middleware, Portal, PortalError, PresenceError, RedisFailure, Refusal, Relay,
            RoomAccess, RoomAccessKind, RoomAuthorizer, RoomMember, RoomPolicy, Runtime, SendError,
            SendReport, ServerHandle, ServerTls, TlsError, TransportConfig,
        };
        /// Rooms on the wire (`docs/protocol.md`): room names and their check, requests,
        /// notices and room messages.
        pub mod rooms {
            pub use $crate::mesa_core::rooms::*;
        }
        /// Recovery by position (`docs/protocol.md`, "Recovery"): which rooms keep a
        /// stream, and the positions clients resume from.
        pub mod recovery {
            pub use $crate::mesa_core::recovery::*;
        }
        /// TLS: certificates from PEM, rustls configurations, and the rustls crates
        /// themselves.
        pub mod tls {
            pub use $crate::tls::*;
            pub use $crate::{futures_rustls, rustls};
        }
    };
}
