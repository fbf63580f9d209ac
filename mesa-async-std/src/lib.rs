//! Mesa real-time messaging on [smol] and [async-std]: the same server and client as
//! `mesa-tokio`, speaking the protocol of `@cryb/mesa` 1.5.8, for applications that do
//! not run tokio.
//!
//! This crate only teaches [`mesa_driver`]'s loop how to use [async-io]'s timers and
//! [async-net]'s sockets (shared by both runtimes) and where to spawn tasks; every
//! protocol decision lives in [`mesa_core`], every loop in [`mesa_driver`].
//!
//! # Choosing a runtime
//!
//! Each runtime has a type, enabled by the feature of the same name, and a module
//! with what depends on the runtime: `server()`, `client(url)` and `portal(url)`
//! with their `ServerBuilder`, `Server`, `Listening`, `ClientBuilder` and
//! `PortalBuilder` (`mesa-tokio` has them at its root). Everything else, `Client`
//! included, is at this crate's root.
//!
//! | feature | runtime type | module | spawns with |
//! |---|---|---|---|
//! | `smol` (default) | `Smol` | `smol` | `smol::spawn(..).detach()` |
//! | `async-std` | `AsyncStd` | `async_std` | `async_std::task::spawn` |
//!
//! **async-std is discontinued upstream** ([RUSTSEC-2025-0052]); its maintainers
//! recommend smol, which is why smol is the default feature. The `async-std` feature
//! stays for applications that still run it. Both features can be enabled in one
//! build: the runtimes are separate types, so one never changes the meaning of the
//! other (the workspace's conformance suite runs every scenario on both).
//!
//! The cluster through Redis (replication, sync, presence, `Dispatcher` and
//! `Portal`, re-exported here with `ClusterConfig`) runs on both runtimes through
//! redis-rs's `smol-comp`, over TLS too (`rediss://`, its `smol-rustls-comp`; a
//! private CA through `ClusterConfig::redis_ca_pem`, `DispatcherBuilder::redis_ca_pem`
//! or `PortalBuilder::redis_ca_pem`).
//!
//! # A server and a client on smol
//!
//! ```
//! use std::time::Duration;
//! use mesa_async_std::{ClientEvent, DevAuthenticator, Message};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let server = mesa_async_std::smol::server().handler(mesa_async_std::Relay)
//!         .heartbeat(Duration::from_secs(10), 3)
//!         .authenticate(DevAuthenticator)
//!         .build()?;
//!     let listening = server.bind("127.0.0.1:0".parse()?).await?;
//!     let url = format!("ws://{}/", listening.local_addr());
//!     smol::spawn(listening.run()).detach();
//!
//!     let (client, mut events) = mesa_async_std::smol::client(url).build()?;
//!     let user = client.authenticate(json!({"token": "alice"}), true).await?;
//!     assert_eq!(user, json!({"id": "alice"}));
//!     client.send(Message::dispatch("ECHO", json!({"hi": 1}))).await?;
//!     while let Some(event) = events.next().await {
//!         if let ClientEvent::Message(message) = event {
//!             assert_eq!(message.d, json!({"hi": 1}));
//!             break;
//!         }
//!     }
//!     server.shutdown();
//!     Ok(())
//! })
//! # }
//! ```
//!
//! # The README's examples
//!
//! A relay server on smol:
//!
//! ```no_run
//! use std::time::Duration;
//! use mesa_async_std::{DevAuthenticator, Relay};
//!
//! smol::block_on(async {
//!     let server = mesa_async_std::smol::server()
//!         .heartbeat(Duration::from_secs(10), 3)
//!         .authenticate(DevAuthenticator)
//!         .handler(Relay)
//!         .build()?;
//!     server.bind("127.0.0.1:4000".parse()?).await?.run().await?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! The same on async-std (feature `async-std`):
//!
//! ```no_run
//! # #[cfg(feature = "async-std")] {
//! use std::time::Duration;
//! use mesa_async_std::{DevAuthenticator, Relay};
//!
//! async_std::task::block_on(async {
//!     let server = mesa_async_std::async_std::server()
//!         .heartbeat(Duration::from_secs(10), 3)
//!         .authenticate(DevAuthenticator)
//!         .handler(Relay)
//!         .build()?;
//!     server.bind("127.0.0.1:4000".parse()?).await?.run().await?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # }
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! `cargo run -p mesa-async-std --example relay --all-features -- --runtime smol`
//! serves the relay behaviour with heartbeats on either runtime.
//!
//! [smol]: https://docs.rs/smol
//! [async-std]: https://docs.rs/async-std
//! [async-io]: https://docs.rs/async-io
//! [async-net]: https://docs.rs/async-net
//! [RUSTSEC-2025-0052]: https://rustsec.org/advisories/RUSTSEC-2025-0052.html
#![warn(missing_docs, unreachable_pub)]

#[cfg(not(any(feature = "smol", feature = "async-std")))]
compile_error!(
    "mesa-async-std needs a runtime: enable the `smol` feature (default), `async-std`, or both"
);

mod net;
#[macro_use]
mod runtime;
mod timer;

/// The sans-IO core (wire codec, sessions, hub, cluster decisions): for driving the
/// protocol from an event loop of your own. Everything a server or client needs is
/// also at this crate's root.
pub use mesa_core;
/// The runtime-agnostic driver this crate instantiates; for implementing a
/// [`Runtime`] of your own. Everything a server or client needs is at this crate's root.
pub use mesa_driver;
// Every type a user names, the same in every runtime crate.
mesa_driver::root_exports!();
pub use timer::Sleep;

runtime! {
    /// The smol runtime, as [`mesa_driver`] needs it: async-io's timers and sockets,
    /// tasks on smol's global executor.
    feature = "smol",
    runtime = Smol,
    module = smol,
    name = "smol",
    spawn = |future| ::smol::spawn(future).detach(),
}

runtime! {
    /// The async-std runtime, as [`mesa_driver`] needs it: async-io's timers and
    /// sockets, tasks on async-std's executor. async-std is discontinued upstream
    /// (RUSTSEC-2025-0052): prefer smol (feature `smol`) for new code.
    feature = "async-std",
    runtime = AsyncStd,
    module = async_std,
    name = "async-std",
    spawn = |future| drop(::async_std::task::spawn(future)),
}

/// The user guide's chapter on runtimes (`docs/guide/src/runtimes.md`), compiled (and
/// its runnable examples run) as doctests; the other chapters are doctests of
/// `mesa-tokio`.
#[cfg(doctest)]
#[doc = include_str!("../../docs/guide/src/runtimes.md")]
pub struct GuideRuntimes;
