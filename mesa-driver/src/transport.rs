//! WebSocket framing settings and conversions between tungstenite's types and the
//! core's. Nothing here decides anything about the Mesa protocol.

use std::time::Duration;

use async_tungstenite::tungstenite::error::ProtocolError;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::protocol::frame::CloseFrame;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use mesa_core::{Close, CloseCode, DecodeError, Frame, Limits};

#[cfg(doc)]
use crate::read_pool::PooledRead;

/// Bytes of frames gathered before tungstenite writes to the socket (the driver
/// flushes every batch anyway).
const WRITE_GATHER: usize = 16 * 1024;

/// Capacity of a server connection's own read buffer, where tungstenite assembles a
/// frame: bytes come from the pooled buffer of [`PooledRead`], so this one only
/// needs to hold a frame header and a small frame, and it is kept while idle.
const FRAME_BUFFER: usize = 64;

/// Transport settings the driver applies to every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// Bytes read from the socket at a time. tungstenite's default (128 KiB, a
    /// buffer allocated eagerly and kept) would dominate the memory of an idle
    /// connection: a client keeps a buffer of this size, while a server connection
    /// borrows one from a per-thread pool only while it holds unread bytes (Mesa
    /// frames are small; a larger frame is assembled in a buffer that grows on
    /// demand). Default 512 bytes.
    pub read_buffer_bytes: usize,
    /// Bytes of frames waiting for a connection that does not read fast enough;
    /// past it the connection is closed with 1013 (slow consumer). Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// Time a connection has to finish its handshakes: TLS (for `wss://`) and
    /// WebSocket together, on the server and in the client. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time to wait for the peer's close frame after sending ours. Default 2 s.
    pub close_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            read_buffer_bytes: 512,
            max_outbound_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
        }
    }
}

impl TransportConfig {
    /// tungstenite's settings: small buffers, writes gathered up to 16 KiB so that a
    /// batch of frames leaves in one system call (the driver flushes after each
    /// batch), and a frame limit just above the core's message limit so that the
    /// core, not the framing, answers an oversized message.
    pub fn websocket(&self, limits: &Limits) -> WebSocketConfig {
        let max = limits.max_message_bytes.saturating_add(1);
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            .write_buffer_size(WRITE_GATHER)
            .max_write_buffer_size(self.max_outbound_bytes.saturating_add(max))
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }

    /// [`websocket`](Self::websocket)'s settings for a server connection, whose
    /// socket is read through a [`PooledRead`]: its own read buffer only assembles
    /// frames.
    pub(crate) fn server_websocket(&self, limits: &Limits) -> WebSocketConfig {
        self.websocket(limits).read_buffer_size(FRAME_BUFFER)
    }
}

/// A core frame as a tungstenite text message, sharing its bytes (no copy). Frames
/// hold JSON text, so the UTF-8 check tungstenite asks for never fails.
pub(crate) fn text(frame: Frame) -> WsMessage {
    let text = Utf8Bytes::try_from(frame.into_bytes());
    WsMessage::Text(text.unwrap_or_else(|_| Utf8Bytes::from_static("")))
}

/// A core close as a tungstenite close frame.
pub(crate) fn close_frame(close: &Close) -> CloseFrame {
    CloseFrame {
        code: WsCloseCode::from(close.code.0),
        reason: Utf8Bytes::from(close.reason.as_ref()),
    }
}

/// A tungstenite close frame as a core close (1005 when the peer sent no code).
pub(crate) fn core_close(frame: Option<CloseFrame>) -> Close {
    match frame {
        Some(frame) => Close::new(CloseCode(u16::from(frame.code)), frame.reason.to_string()),
        None => Close::new(CloseCode::NO_STATUS, "closed without a code"),
    }
}

/// What a transport error means for the session.
pub(crate) enum ReadFailure {
    /// The peer sent something the core must answer with a close code.
    Invalid(DecodeError),
    /// The peer broke the WebSocket protocol (a reserved bit or opcode, an unmasked or
    /// fragmented control frame, a bad continuation): answer with this close (1002)
    /// rather than dropping the socket, then stop reading.
    Violation(Close),
    /// The transport is gone.
    Gone(Close),
}

/// Classify a read error.
pub(crate) fn read_failure(error: WsError, limits: &Limits) -> ReadFailure {
    match error {
        WsError::Capacity(_) => ReadFailure::Invalid(DecodeError::TooBig {
            len: limits.max_message_bytes.saturating_add(1),
            max: limits.max_message_bytes,
        }),
        WsError::Utf8(_) => ReadFailure::Invalid(DecodeError::InvalidUtf8),
        WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => ReadFailure::Gone(Close::new(CloseCode::ABNORMAL, error.to_string())),
        WsError::Protocol(error) => ReadFailure::Violation(Close::truncated(
            CloseCode::PROTOCOL_ERROR,
            error.to_string(),
        )),
        other => ReadFailure::Gone(Close::new(CloseCode::ABNORMAL, other.to_string())),
    }
}
