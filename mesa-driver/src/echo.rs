//! A WebSocket echo server on exactly the transport layer of a Mesa server: the same
//! handshake (with its timeout), the same tungstenite settings
//! ([`TransportConfig::websocket`]), the same mapping of framing errors to close
//! codes, the same writer and closing linger. It exists for protocol conformance
//! suites such as the Autobahn TestSuite's fuzzing client, which expect a peer that
//! echoes every text and binary message; a Mesa server does not echo, and its
//! session rules (JSON, authentication, message rate) are not what such a suite
//! checks.
//!
//! Test support (feature `test-echo`), not part of the API. The `autobahn_echo`
//! examples of `mesa-tokio` and `mesa-async-std` are this module
//! on each runtime, with [`EchoOptions`] as their command line:
//!
//! ```no_run
//! # async fn run<R: mesa_driver::Runtime>(runtime: R) -> std::io::Result<()> {
//! use mesa_driver::{TransportConfig, echo::Echo};
//! use mesa_driver::mesa_core::Limits;
//!
//! let echo = Echo::new(runtime, TransportConfig::default(), Limits::default());
//! let listening = echo.bind("127.0.0.1:9001".parse().unwrap()).await?;
//! println!("echoing on ws://{}/", listening.local_addr());
//! listening.run().await
//! # }
//! ```

use std::future::{pending, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::task::Poll;

use async_tungstenite::tungstenite::handshake::server::{Request, Response};
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::future::select;
use mesa_core::{Close, DecodeError, Limits};

use crate::accept::{accept_loop, handshake};
use crate::io::Io;
use crate::runtime::Runtime;
use crate::transport::{ReadFailure, TransportConfig, close_frame, read_failure};

/// The command line of the `autobahn_echo` examples:
/// `[--listen HOST:PORT] [--max-message-bytes N]` (defaults `127.0.0.1:9001` and
/// the default [`Limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoOptions {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The limits (`max_message_bytes` set from the command line).
    pub limits: Limits,
}

impl EchoOptions {
    /// Parse the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut options = EchoOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            limits: Limits::default(),
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |error: &dyn std::fmt::Display| format!("{flag} {value}: {error}");
            match flag.as_str() {
                "--listen" => options.listen = value.parse().map_err(|e| bad(&e))?,
                "--max-message-bytes" => {
                    let max: usize = value.parse().map_err(|e| bad(&e))?;
                    if max == 0 {
                        return Err(bad(&"must be at least 1"));
                    }
                    options.limits.max_message_bytes = max;
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(options)
    }

    /// Bind, print `echo listening on ws://ADDR/` on stdout, and echo until the
    /// process ends.
    pub async fn serve<R: Runtime>(self, runtime: R) -> io::Result<()> {
        let echo = Echo::new(runtime, TransportConfig::default(), self.limits);
        let listening = echo.bind(self.listen).await?;
        println!("echo listening on ws://{}/", listening.local_addr());
        listening.run().await
    }
}

/// Frames read but not yet written back before reading pauses: a peer that sends
/// without reading the echoes is not buffered without bound.
const ECHO_BACKLOG: usize = 32;

/// An echo server with a Mesa server's transport settings and message limits.
#[derive(Debug, Clone)]
pub struct Echo<R> {
    runtime: R,
    transport: TransportConfig,
    limits: Limits,
}

/// A bound [`Echo`] server, ready to [`run`](EchoListening::run).
pub struct EchoListening<R: Runtime> {
    echo: Echo<R>,
    listener: R::TcpListener,
    local: SocketAddr,
}

impl<R: Runtime> Echo<R> {
    /// An echo server on `runtime` with these transport settings and limits (only
    /// `max_message_bytes` applies: larger messages are closed with 1009).
    pub fn new(runtime: R, transport: TransportConfig, limits: Limits) -> Self {
        Echo {
            runtime,
            transport,
            limits,
        }
    }

    /// Bind `addr`; [`EchoListening::run`] then serves until the process ends.
    pub async fn bind(&self, addr: SocketAddr) -> io::Result<EchoListening<R>> {
        let listener = self.runtime.bind(addr).await?;
        let local = self.runtime.local_addr(&listener)?;
        Ok(EchoListening {
            echo: self.clone(),
            listener,
            local,
        })
    }

    /// Answer the WebSocket handshake on `stream` (any path), then echo every text
    /// and binary message until the connection closes.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // tungstenite fixes this callback's signature, large error type included.
        #[allow(clippy::result_large_err)]
        let accept_any = |_: &Request, response: Response| Ok(response);
        let upgraded = handshake(
            &self.runtime,
            stream,
            None,
            &self.transport,
            &self.limits,
            accept_any,
        );
        let Some(ws) = upgraded.await else {
            return;
        };
        let mut io = Io::new(ws);
        self.echo(&mut io).await;
        let runtime = &self.runtime;
        let linger = runtime.sleep_until(runtime.now() + self.transport.close_timeout);
        select(Box::pin(io.linger()), Box::pin(linger)).await;
    }

    /// Echo until the peer closes, the transport fails, or a frame must be refused
    /// (then the close frame is queued for [`Io::linger`] to write).
    async fn echo<S>(&self, io: &mut Io<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let read = poll_fn(|cx| {
                if let Poll::Ready(Err(error)) = io.poll_write(cx) {
                    return Poll::Ready(Some(Err(error)));
                }
                if io.pending.len() >= ECHO_BACKLOG {
                    return Poll::Pending;
                }
                io.poll_read(cx)
            })
            .await;
            let refuse = |error: DecodeError| Close::new(error.close_code(), error.to_string());
            let close = match read {
                Some(Ok(WsMessage::Text(text))) => match self.check_size(text.len()) {
                    Ok(()) => {
                        io.pending.push_back(WsMessage::Text(text));
                        continue;
                    }
                    Err(error) => refuse(error),
                },
                Some(Ok(WsMessage::Binary(data))) => match self.check_size(data.len()) {
                    Ok(()) => {
                        io.pending.push_back(WsMessage::Binary(data));
                        continue;
                    }
                    Err(error) => refuse(error),
                },
                // tungstenite answers pings and close frames by itself.
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                    continue;
                }
                Some(Ok(WsMessage::Close(_))) | None => return,
                Some(Err(WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return;
                }
                Some(Err(error)) => match read_failure(error, &self.limits) {
                    ReadFailure::Invalid(error) => refuse(error),
                    ReadFailure::Violation(close) => close,
                    ReadFailure::Gone(_) => return,
                },
            };
            io.pending
                .push_back(WsMessage::Close(Some(close_frame(&close))));
            return;
        }
    }

    /// A message longer than `max_message_bytes` is refused, as a Mesa session does.
    fn check_size(&self, len: usize) -> Result<(), DecodeError> {
        let max = self.limits.max_message_bytes;
        if len > max {
            return Err(DecodeError::TooBig { len, max });
        }
        Ok(())
    }
}

impl<R: Runtime> EchoListening<R> {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Accept and echo, one task per connection, until the process ends.
    pub async fn run(self) -> io::Result<()> {
        let echo = self.echo.clone();
        accept_loop(
            &self.echo.runtime,
            &self.listener,
            Box::pin(pending::<()>()),
            move |stream, _| {
                let echo = echo.clone();
                async move { echo.serve_stream(stream).await }
            },
        )
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<EchoOptions, String> {
        EchoOptions::parse(args.iter().map(|arg| (*arg).to_owned()))
    }

    #[test]
    fn options_default_and_parse() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 9001)));
        assert_eq!(defaults.limits, Limits::default());
        let set = parse(&["--listen", "0.0.0.0:9", "--max-message-bytes", "16777216"]).unwrap();
        assert_eq!(set.listen, SocketAddr::from(([0, 0, 0, 0], 9)));
        assert_eq!(set.limits.max_message_bytes, 16 << 20);
        for bad in [
            &["--listen"][..],
            &["--listen", "nowhere"],
            &["--max-message-bytes", "0"],
            &["--verbose", "yes"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
