//! TCP on async-net, shared by every runtime of this crate. Mesa frames are small and
//! latency-bound, so every stream turns Nagle's algorithm off.

use std::io;
use std::net::SocketAddr;

use async_net::{TcpListener, TcpStream};

/// Accept one connection, without Nagle's delay.
pub(crate) async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, remote) = listener.accept().await?;
    stream.set_nodelay(true)?;
    Ok((stream, remote))
}

/// Connect to `host:port`, without Nagle's delay.
pub(crate) async fn connect(addr: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
