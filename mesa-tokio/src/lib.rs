//! Mesa real-time messaging on [tokio]: a server and a client that speak the
//! protocol of `@cryb/mesa` 1.5.8, so its JavaScript clients and servers interoperate
//! with these.
//!
//! This crate only teaches [`mesa_driver`]'s loop how to use tokio's sockets, timers
//! and spawner ([`Tokio`]); every protocol decision lives in [`mesa_core`].
//!
//! # A server
//!
//! ```no_run
//! use std::time::Duration;
//! use mesa_tokio::{AuthError, Relay};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = mesa_tokio::server()
//!     .heartbeat(Duration::from_secs(10), 3)
//!     .authenticate(|credentials: serde_json::Value| async move {
//!         match credentials["token"].as_str() {
//!             Some("secret") => Ok(("alice".to_owned(), json!({"name": "Alice"}))),
//!             _ => Err(AuthError::new("bad token")),
//!         }
//!     })
//!     .handler(Relay)
//!     .build()?;
//! let listening = server.bind("127.0.0.1:4000".parse()?).await?;
//! println!("listening on {}", listening.local_addr());
//! listening.run().await?;
//! # Ok(()) }
//! ```
//!
//! # A client
//!
//! ```no_run
//! use mesa_tokio::{ClientEvent, Message};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (client, mut events) = mesa_tokio::client("ws://127.0.0.1:4000/").build()?;
//! let user = client.authenticate(json!({"token": "secret"}), true).await?;
//! client.send(Message::dispatch("ECHO", json!({"hello": user}))).await?;
//! while let Some(event) = events.next().await {
//!     if let ClientEvent::Message(message) = event {
//!         println!("{message:?}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Durable portals
//!
//! [`durable_portal`] consumes the client events that servers with
//! [`ClusterConfig::durable_portals`] append to Redis streams, at least once: each
//! [`DurableEvent`] is [`ack`](DurableEvent::ack)ed once handled, comes back after
//! the visibility timeout when its handler [`fail`](DurableEvent::fail)s or the
//! portal dies, and goes to the dead-letter stream after too many deliveries
//! (`mesa portal --durable` on the command line).
//!
//! # TLS
//!
//! `wss://` URLs are verified against the Mozilla roots (and the platform's store
//! with the `native-roots` feature) plus any root added; a server serves TLS with a
//! [`ServerTls`] it can reload while running (see [`mesa_driver::tls`]). The TLS
//! handshake holds a slot of `max_connections`; an HTTP framework that does the
//! handshake itself takes one with [`Server::admit`].
//! `rediss://` Redis URLs trust the platform's store, or the PEM certificates of
//! [`ClusterConfig::redis_ca_pem`] (and the same option of the Dispatcher and Portal
//! builders).
//!
//! ```no_run
//! use mesa_tokio::ServerTls;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = ServerTls::from_pem(&std::fs::read("server.crt")?, &std::fs::read("server.key")?)?;
//! let server = mesa_tokio::server().tls(tls.clone()).build()?;
//! let listening = server.bind("127.0.0.1:4443".parse()?).await?;
//! tokio::spawn(listening.run());
//!
//! let (client, _events) = mesa_tokio::client("wss://localhost:4443/")
//!     .add_root_pem(std::fs::read("ca.crt")?)
//!     .build()?;
//! // Later, after a renewal: new connections get the new certificate.
//! tls.reload_pem(&std::fs::read("server.crt")?, &std::fs::read("server.key")?)?;
//! # drop(client); Ok(()) }
//! ```
//!
//! # Sending from outside the servers
//!
//! A [`Dispatcher`] reaches the clients of every replica on one Redis (ours and
//! `@cryb/mesa`'s); with sync on, messages to ids connected nowhere are stored for them.
//!
//! ```no_run
//! use mesa_tokio::{Dispatcher, Message, Recipients};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dispatcher = Dispatcher::builder("redis://127.0.0.1:6379/")
//!     .sync(true)
//!     .connect()
//!     .await?;
//! let to = Recipients::Ids(vec!["alice".into(), "bob".into()]);
//! let report = dispatcher
//!     .dispatch(Message::dispatch("NOTICE", json!({"text": "hi"})), None, to, &[])
//!     .await?;
//! println!("stored for {} offline ids", report.stored);
//!
//! // A Redis behind TLS, its certificate signed by a private CA:
//! let secure = Dispatcher::builder("rediss://redis.internal:6380/")
//!     .sync(true)
//!     .redis_ca_pem(std::fs::read("redis-ca.crt")?)
//!     .connect()
//!     .await?;
//! # drop(secure);
//! # Ok(()) }
//! ```
#![warn(missing_docs, unreachable_pub)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// The sans-IO core (wire codec, sessions, hub, cluster decisions): for driving the
/// protocol from an event loop of your own. Everything a server or client needs is
/// also at this crate's root.
pub use mesa_core;
/// The runtime-agnostic driver this crate instantiates; for implementing a
/// [`Runtime`] of your own. Everything a server or client needs is at this crate's root.
pub use mesa_driver;
// Every type a user names, the same in every runtime crate.
mesa_driver::root_exports!();

#[cfg(feature = "axum")]
pub mod axum;
/// Prometheus metrics of a server, as a middleware (feature `metrics`).
#[cfg(feature = "metrics")]
pub use mesa_driver::metrics;

/// Pending connections the kernel queues for a listener.
const LISTEN_BACKLOG: u32 = 1024;

/// The tokio runtime, as [`mesa_driver`] needs it. Its clock is
/// [`tokio::time::Instant`], so paused-time tests work.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

impl mesa_driver::Runtime for Tokio {
    type TcpStream = Compat<TcpStream>;
    type TcpListener = TcpListener;
    type Sleep = tokio::time::Sleep;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(future);
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // The default backlog (128) drops connection attempts in reconnect storms.
        socket.listen(LISTEN_BACKLOG)
    }

    fn local_addr(&self, listener: &TcpListener) -> io::Result<SocketAddr> {
        listener.local_addr()
    }

    async fn accept(&self, listener: &TcpListener) -> io::Result<(Compat<TcpStream>, SocketAddr)> {
        let (stream, remote) = listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream.compat(), remote))
    }

    async fn connect(&self, addr: &str) -> io::Result<Compat<TcpStream>> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream.compat())
    }
}

mesa_driver::runtime_api!(Tokio, "tokio");

/// The README's examples, compiled (and the runnable ones run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The user guide's chapters (`docs/guide`), compiled (and the runnable examples run)
/// as doctests.
#[cfg(doctest)]
mod guide {
    macro_rules! chapters {
        ($($name:ident = $file:literal),* $(,)?) => {$(
            #[doc = include_str!(concat!("../../docs/guide/src/", $file))]
            pub struct $name;
        )*};
    }
    chapters! {
        QuickStart = "quick-start.md",
        Authentication = "authentication.md",
        Handlers = "handlers.md",
        Sending = "sending.md",
        Rooms = "rooms.md",
        Cluster = "cluster.md",
        Tls = "tls.md",
        Operations = "operations.md",
        Migrating = "migrating.md",
    }
}
