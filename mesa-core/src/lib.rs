//! The sans-IO core of Mesa, the real-time messaging protocol of `@cryb/mesa`.
//!
//! **This crate performs no IO.** It opens no sockets, spawns nothing, never reads a
//! clock and draws no global randomness. Every decision of the protocol (the wire
//! codec, a server connection's heartbeats and authentication, a client's
//! reconnection with jittered backoff, routing a send to connections, ordering a
//! redelivery) is a state machine here, driven by inputs and a `now: Instant` the
//! caller passes in. The runtime adapters (one crate per async runtime), and any
//! event loop of your own, only move bytes, arm one timer and execute the outputs.
//!
//! # The run loop
//!
//! Feed an input (`handle_*`), then drain the outputs (`poll_*`) until `None`, then
//! sleep until `poll_timeout()` and call `handle_timeout`. Here a server connection
//! authenticates a client, with the transport played by hand:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use mesa_core::{AuthConfig, HeartbeatConfig, ServerConfig, ServerSession, SessionEvent, Transmit};
//!
//! let config = ServerConfig::builder()
//!     .heartbeat(HeartbeatConfig { interval: Duration::from_secs(10), max_attempts: 3 })
//!     .authentication(AuthConfig::default())
//!     .build()?;
//! let start = Instant::now(); // the adapter's clock, not the core's
//! let mut session = ServerSession::new(Arc::new(config), start);
//!
//! // The hello goes out first.
//! let Some(Transmit::Text(hello)) = session.poll_transmit() else { panic!() };
//! assert!(hello.as_str().starts_with(r#"{"op":10,"#));
//!
//! // A frame from the client becomes an event the application answers.
//! session.handle_frame(start, r#"{"op":2,"d":{"token":"alice"}}"#);
//! while let Some(event) = session.poll_event() {
//!     if let SessionEvent::AuthenticationRequested { credentials, .. } = event {
//!         let (id, user) = mesa_core::dev_authenticate(&credentials).expect("dev token");
//!         session.accept(start, id, user)?;
//!     }
//! }
//! let Some(Transmit::Text(ack)) = session.poll_transmit() else { panic!() };
//! assert_eq!(ack.as_str(), r#"{"op":22,"d":{"id":"alice"}}"#);
//!
//! // Time is an argument: at the deadline, the heartbeat is due.
//! let deadline = session.poll_timeout().expect("heartbeat armed");
//! assert_eq!(deadline, start + Duration::from_secs(10));
//! session.handle_timeout(deadline);
//! let Some(Transmit::Text(beat)) = session.poll_transmit() else { panic!() };
//! assert_eq!(beat.as_str(), r#"{"op":1,"d":{}}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Where things are
//!
//! | module | holds |
//! |---|---|
//! | [`wire`] | `Message`, opcodes, decode with limits, encode once to a shared `Frame` |
//! | [`hello`] | op 10's settings and rules |
//! | [`session`] | the server side of one connection |
//! | [`rate`] | the token bucket of a connection's inbound message rate |
//! | [`client`] | the client side, across reconnections |
//! | [`backoff`] | exponential backoff with full jitter |
//! | [`hub`] | which local connections a send reaches |
//! | [`sync`] | what is stored for offline ids and how it is redelivered |
//! | [`cluster`] | Redis key names, the `ws` envelope, portal events |
//! | [`relay`](mod@relay) | the ECHO/BROADCAST relay and development authentication |
#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
pub mod client;
pub mod close;
pub mod cluster;
pub mod config;
pub mod heartbeat;
pub mod hello;
pub mod hub;
pub mod limits;
pub mod rate;
pub mod relay;
pub mod rng;
pub mod session;
pub mod sync;
mod timer;
pub mod wire;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{ClientConfig, ClientError, ClientEvent, ClientSession, ClientTransmit};
pub use close::{Close, CloseCode};
pub use cluster::{
    Envelope, Namespace, PortalChoice, PortalEvent, PortalEventKind, PortalPool, PortalUpdate,
    PresenceSplit, RemotePlan, plan_remote, split_by_presence,
};
pub use config::{
    AuthConfig, ConfigError, HeartbeatConfig, ServerConfig, ServerConfigBuilder, SyncConfig,
};
pub use hello::{Hello, Rule};
pub use hub::{Action, ConnId, Delivery, Departure, Hub, Recipients};
pub use limits::Limits;
pub use rate::TokenBucket;
pub use relay::{RelayAction, dev_authenticate, relay};
pub use session::{ServerSession, SessionError, SessionEvent, Transmit};
pub use sync::{MessageOptions, Redelivery};
pub use wire::{DecodeError, Frame, Message, Opcode};
