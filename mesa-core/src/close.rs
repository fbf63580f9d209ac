//! Close codes and reasons: every close in Mesa carries both.

use std::borrow::Cow;
use std::fmt;

/// A WebSocket close code, with the meanings Mesa uses as constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure, and op 5 `DISCONNECT_CLIENT`.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: going away: server shutdown, or the peer stopped answering heartbeats.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error; upstream uses it for a client version mismatch.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: unsupported data (a binary frame).
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: no code was received (what a peer sees when upstream closes without one).
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: the transport dropped without a close frame.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: invalid payload: not JSON, not an object, or a field of the wrong type.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation: authentication failed or timed out, the inbound
    /// message rate was exceeded under [`RateLimitPolicy::Close`](crate::RateLimitPolicy::Close)
    /// (`rate limit exceeded`), or a relayed `BROADCAST` addressed too many ids.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: a message was too big (or nested too deep).
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: the server hit an internal error.
    pub const SERVER_ERROR: CloseCode = CloseCode(1011);
    /// 1013: try again later (overload).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A close with its code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The close code.
    pub code: CloseCode,
    /// Why; at most 123 bytes on the wire (the adapter truncates if needed).
    pub reason: Cow<'static, str>,
}

impl Close {
    /// The most bytes of reason a close frame carries (125 minus the code).
    pub const MAX_REASON_BYTES: usize = 123;

    /// Build a close from a code and a reason.
    pub fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Close {
            code,
            reason: reason.into(),
        }
    }

    /// Build a close whose reason is cut, at a character boundary, to fit in a close
    /// frame ([`MAX_REASON_BYTES`](Self::MAX_REASON_BYTES)).
    pub fn truncated(code: CloseCode, mut reason: String) -> Self {
        if reason.len() > Self::MAX_REASON_BYTES {
            let mut end = Self::MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Close::new(code, reason)
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code, self.reason)
    }
}

/// A close is the cause of errors such as "disconnected before the server answered".
impl std::error::Error for Close {}
