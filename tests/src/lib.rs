//! Shared harness of the workspace tests: Node peers driven over stdin/stdout.
//!
//! [`NodePeer`] runs one of the scripts of `tests/node` (the published `@cryb/mesa`
//! server and Node client, and the `mesa-js-client` browser client) and talks to it in
//! its JSON line protocol (see `tests/node/README.md`): commands go to its stdin, its
//! events come back from its stdout. [`ours`] holds the same kind of bounded waits for
//! our own client's events. Every wait is bounded ([`WAIT`] unless told otherwise) and
//! fails with what the peer said. [`runtimes`] holds the conformance suite's harness:
//! the same waits, servers and a raw WebSocket peer for any [`mesa_driver::Runtime`].
//! [`pki`] makes the certificates of the TLS tests.

use std::time::Duration;

pub mod net;
pub mod node;
pub mod ours;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod runtimes;

pub use net::free_port;
pub use node::{ClientKind, NodePeer, node_dir, require_node};
pub use redis::{CuttingProxy, RedisServer};

/// How long any single wait lasts by default.
pub const WAIT: Duration = Duration::from_secs(10);

/// Await `future` for at most [`WAIT`]; panic naming `what` when it takes longer.
pub async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {WAIT:?}"))
}
