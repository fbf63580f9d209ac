//! The small trait an async runtime implements to run Mesa: a clock, a timer, a
//! spawner and TCP. Everything else is written once, in this crate.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};

/// An async runtime, as Mesa needs it.
///
/// `now` must read the same clock `sleep_until` waits on, so that paused-time tests
/// (tokio's `start_paused`) work.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// A connected TCP stream, as `futures-io` traits.
    type TcpStream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A bound TCP listener.
    type TcpListener: Send + Sync + 'static;
    /// The future returned by [`sleep_until`](Runtime::sleep_until).
    type Sleep: Future<Output = ()> + Send + 'static;

    /// The current time on the runtime's clock.
    fn now(&self) -> Instant;

    /// A future that completes at `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep;

    /// Run `future` in the background.
    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static;

    /// Bind a TCP listener.
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::TcpListener>> + Send;

    /// The address a listener is bound to.
    fn local_addr(&self, listener: &Self::TcpListener) -> io::Result<SocketAddr>;

    /// Accept one connection.
    fn accept(
        &self,
        listener: &Self::TcpListener,
    ) -> impl Future<Output = io::Result<(Self::TcpStream, SocketAddr)>> + Send;

    /// Connect to `host:port`.
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::TcpStream>> + Send;
}

/// A seed from the OS's randomness (the standard library's hasher keys).
pub(crate) fn entropy_seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x6d65_7361);
    hasher.finish()
}
