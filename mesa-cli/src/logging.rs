//! Logging on stderr through `tracing`, and the server middleware that writes one
//! line per connection, authentication and close.

use std::fmt;
use std::io::IsTerminal;

use mesa_tokio::BoxError;
use mesa_tokio::{Close, Connection, Message, Middleware};
use tracing_subscriber::EnvFilter;

/// How log lines (and the client's state reports) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the global subscriber: levels from `RUST_LOG` (default `info`), on stderr.
pub(crate) fn init(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
}

/// Logs every connection's life at `info`: opened (with the peer's address),
/// authenticated (with its id), closed (with the close code and reason); and every
/// application message at `debug`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogConnections;

/// The peer's address, or `unknown`.
struct Remote<'a>(&'a Connection);

impl fmt::Display for Remote<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.remote_addr() {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

impl Middleware for LogConnections {
    fn on_connection(&self, conn: &Connection) -> Result<(), BoxError> {
        tracing::info!(conn = conn.conn_id().0, remote = %Remote(conn), "connected");
        Ok(())
    }

    fn on_authenticated(&self, conn: &Connection) -> Result<(), BoxError> {
        let id = conn.id();
        tracing::info!(conn = conn.conn_id().0, remote = %Remote(conn), id, "authenticated");
        Ok(())
    }

    fn on_message_received(&self, conn: &Connection, message: &Message) -> Result<(), BoxError> {
        tracing::debug!(
            conn = conn.conn_id().0,
            op = message.op.code(),
            t = message.t.as_deref().unwrap_or_default(),
            "message"
        );
        Ok(())
    }

    fn on_disconnection(&self, conn: &Connection, close: &Close) -> Result<(), BoxError> {
        let id = conn.id();
        tracing::info!(
            conn = conn.conn_id().0,
            remote = %Remote(conn),
            id = id.as_deref(),
            code = close.code.0,
            reason = %close.reason,
            "disconnected"
        );
        Ok(())
    }
}
