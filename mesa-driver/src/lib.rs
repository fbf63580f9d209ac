//! The runtime-agnostic driver of [`mesa_core`]: the per-connection loop, the server's
//! shared registry, and the client task, written once and generic over a small
//! [`Runtime`] trait and `futures-io` streams. Runtime crates (`mesa-tokio`,
//! `mesa-async-std`) implement [`Runtime`] and re-export these types, the generic
//! ones with their runtime filled in.
//!
//! The driver decides nothing about the protocol: it feeds frames, timer expiries and
//! the application's answers to the core's state machines and executes what they
//! output. Framing is async-tungstenite's, with small buffers (see
//! [`TransportConfig`]); TLS (`wss://`, both sides) is rustls's over the same
//! `futures-io` streams (see [`tls`]), so every runtime gets it from this crate.
#![warn(missing_docs, unreachable_pub)]

#[cfg(not(any(feature = "tokio", feature = "smol")))]
compile_error!(
    "mesa-driver needs a runtime for its Redis IO: enable its `tokio` or `smol` feature \
     (mesa-tokio and mesa-async-std do)"
);

mod accept;
mod api;
mod client;
mod cluster;
mod connection_loop;
mod context;
mod dispatcher;
mod durable_portal;
#[cfg(feature = "test-echo")]
#[doc(hidden)]
pub mod echo;
mod handle;
mod hooks;
mod io;
#[cfg(feature = "metrics")]
pub mod metrics;
mod outbox;
mod portal;
mod read_pool;
mod redis_failure;
mod registry;
mod runtime;
mod server;
pub mod tls;
mod transport;

pub use client::{BuildError, Client, ClientBuilder, ClientError, ClientEvents};
pub use cluster::ClusterConfig;
pub use dispatcher::{DispatchError, Dispatcher, DispatcherBuilder};
pub use durable_portal::{DurableEvent, DurablePortal, DurablePortalBuilder};
pub use handle::{Admission, Connection, PresenceError, RoomMember, SendError, ServerHandle};
pub use hooks::{
    AuthError, Authenticator, BoxError, BoxFuture, DevAuthenticator, Handler, Ignore, Middleware,
    Relay, RoomAccess, RoomAccessKind, RoomAuthorizer, RoomPolicy,
};
pub use mesa_core::DispatchReport;
pub use portal::{Portal, PortalBuilder, PortalError};
pub use redis_failure::RedisFailure;
pub use registry::SendReport;
pub use runtime::Runtime;
pub use server::{Listening, Refusal, Server, ServerBuilder};
pub use tls::{ServerTls, TlsError};
pub use transport::TransportConfig;

pub use async_tungstenite::tungstenite;
/// The IO traits of the streams a server drives ([`Server::serve_stream`]) and of a
/// [`Runtime`]'s sockets.
pub use futures_io;
/// The futures-io TLS streams of `wss://` ([`ServerTls::accept`] returns one).
pub use futures_rustls;
pub use mesa_core;
/// The TLS library of `wss://`, for [`ClientBuilder::tls_config`] and
/// [`ServerBuilder::tls`] (its `ring` provider is enabled).
pub use rustls;

/// Start building a client of `url` (`ws://host[:port]/path` or `wss://...`, TLS
/// verified against the Mozilla roots unless told otherwise) on `runtime`.
pub fn client<R: Runtime>(runtime: R, url: impl Into<String>) -> ClientBuilder<R> {
    ClientBuilder::new(runtime, url)
}
