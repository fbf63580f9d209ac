//! The wire decoder on arbitrary text, under the default limits and under small ones.
//!
//! Invariants:
//! - every decode error maps to close code 1003, 1007 or 1009;
//! - `TooBig` is reported exactly when the frame is longer than the limit (it is
//!   checked first);
//! - a decoded message re-encodes to a frame that decodes to the same message;
//! - tightening the limits never changes what a successful decode returns.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesa_core::{DecodeError, Limits, Message};

fn limits(max_message_bytes: usize, max_json_depth: usize) -> Limits {
    Limits {
        max_message_bytes,
        max_json_depth,
        ..Limits::default()
    }
}

fn check(text: &str, limits: &Limits) -> Result<Message, DecodeError> {
    let result = Message::decode(text, limits);
    match &result {
        Ok(message) => {
            let frame = message.encode();
            let again = Message::decode(frame.as_str(), &Limits::default());
            assert_eq!(
                again.as_ref(),
                Ok(message),
                "re-decoding {frame:?} (encoded from {text:?}) changed the message"
            );
            // Encoding is deterministic, so a second round is byte-identical.
            assert_eq!(again.unwrap().encode(), frame, "encoding is not stable");
        }
        Err(error) => {
            let code = error.close_code().0;
            assert!(
                matches!(code, 1003 | 1007 | 1009),
                "{error:?} maps to close code {code}"
            );
            assert!(
                !matches!(error, DecodeError::Binary),
                "a text frame decoded as binary"
            );
        }
    }
    assert_eq!(
        matches!(result, Err(DecodeError::TooBig { .. })),
        text.len() > limits.max_message_bytes,
        "size limit {} misapplied to {} bytes",
        limits.max_message_bytes,
        text.len()
    );
    if let Err(DecodeError::TooDeep { max }) = &result {
        assert_eq!(*max, limits.max_json_depth);
    }
    result
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let full = check(&text, &Limits::default());
    for small in [limits(64, 2), limits(256, 4), limits(1024, 8)] {
        if let Ok(message) = check(&text, &small) {
            // Whatever passes the small limits passes the default ones, unchanged.
            assert_eq!(full.as_ref(), Ok(&message), "limits changed the result");
        }
    }
});
