//! The public API a runtime crate exposes, generated once for every runtime so that
//! `mesa-tokio` and `mesa-async-std` cannot drift apart.

/// Generate a runtime crate's API for the unit-struct runtime `$runtime` (named
/// `$name` in the docs): the `Server`, `ServerBuilder`, `Listening`, `Client`,
/// `ClientBuilder` and `PortalBuilder` aliases and the `server()`, `client(url)` and
/// `portal(url)` constructors. An implementation detail of the runtime crates, hidden
/// from the docs: users meet the items it generates there, not the macro.
#[doc(hidden)]
#[macro_export]
macro_rules! runtime_api {
    ($runtime:ident, $name:literal) => {
        #[doc = concat!("A Mesa server on ", $name, "; `H` handles connections and messages (by default [`Ignore`]: client messages reach only middleware; `.handler(Relay)` for the relay).")]
        pub type Server<H = $crate::Ignore> = $crate::Server<$runtime, H>;
        /// Builds a [`Server`].
        pub type ServerBuilder<H = $crate::Ignore> = $crate::ServerBuilder<$runtime, H>;
        /// A bound [`Server`], ready to run.
        pub type Listening<H = $crate::Ignore> = $crate::Listening<$runtime, H>;
        #[doc = concat!("A Mesa client on ", $name, ".")]
        pub type Client = $crate::Client;
        /// Builds a [`Client`].
        pub type ClientBuilder = $crate::ClientBuilder<$runtime>;
        #[doc = concat!("Builds a portal whose task runs on ", $name, ".")]
        pub type PortalBuilder = $crate::PortalBuilder<$runtime>;

        /// Start building a server.
        pub fn server() -> ServerBuilder {
            $crate::Server::builder($runtime)
        }

        /// Start building a client of `url` (`ws://host:port/path` or `wss://...`).
        pub fn client(url: impl Into<String>) -> ClientBuilder {
            $crate::client($runtime, url)
        }

        /// Start building a portal of the cluster on the Redis at `url`: it receives
        /// the client events the servers forward (see `ServerBuilder::portals`).
        pub fn portal(url: impl Into<String>) -> PortalBuilder {
            $crate::PortalBuilder::new($runtime, url)
        }
    };
}

/// Re-export at a runtime crate's root every type its users name (from `mesa_core`
/// and `mesa_driver`) and a `tls` module, one list for every runtime crate. An
/// implementation detail of the runtime crates, hidden from the docs.
#[doc(hidden)]
#[macro_export]
macro_rules! root_exports {
    () => {
        pub use $crate::mesa_core::{
            BackoffConfig, ClientEvent, Close, CloseCode, ConfigError, ConnId, DecodeError, Hello,
            Limits, Message, MessageOptions, Namespace, Opcode, PortalChoice, PortalEvent,
            PortalEventKind, RateLimitPolicy, Recipients, Redelivery, Rule, SyncConfig,
            TooManyRecipients,
        };
        pub use $crate::{
            Admission, AuthError, Authenticator, BoxError, BoxFuture, BuildError, ClientError,
            ClientEvents, ClusterConfig, Connection, DevAuthenticator, DispatchError,
            DispatchReport, Dispatcher, DispatcherBuilder, Handler, Ignore, Middleware, Portal,
            PortalError, RedisFailure, Refusal, Relay, Runtime, SendError, SendReport,
            ServerHandle, ServerTls, TlsError, TransportConfig,
        };
        /// TLS: certificates from PEM, rustls configurations, and the rustls crates
        /// themselves.
        pub mod tls {
            pub use $crate::tls::*;
            pub use $crate::{futures_rustls, rustls};
        }
    };
}
