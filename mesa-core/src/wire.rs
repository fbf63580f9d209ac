//! The wire codec: one Mesa message per WebSocket text frame, as a JSON object.
//!
//! Decoding is where a hostile peer first touches us, so it checks the size and the
//! nesting depth *before* building a JSON tree, and every failure is a typed
//! [`DecodeError`] that knows the close code the server answers with.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::close::CloseCode;
use crate::limits::Limits;

/// A Mesa opcode. Unknown opcodes stay representable so that a newer peer's
/// messages reach the application instead of failing the decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// `0`: application messages, both directions.
    Dispatch,
    /// `1`: server heartbeat.
    Heartbeat,
    /// `2`: client credentials.
    Authenticate,
    /// `5`: internal event between server processes (e.g. `DISCONNECT_CLIENT`).
    Internal,
    /// `10`: the first frame a server sends.
    Hello,
    /// `11`: the client's answer to a heartbeat.
    HeartbeatAck,
    /// `22`: authentication succeeded.
    Authenticated,
    /// Any other non-negative integer.
    Other(u64),
}

impl Opcode {
    /// The integer written on the wire.
    pub fn code(self) -> u64 {
        match self {
            Opcode::Dispatch => 0,
            Opcode::Heartbeat => 1,
            Opcode::Authenticate => 2,
            Opcode::Internal => 5,
            Opcode::Hello => 10,
            Opcode::HeartbeatAck => 11,
            Opcode::Authenticated => 22,
            Opcode::Other(code) => code,
        }
    }
}

impl From<u64> for Opcode {
    fn from(code: u64) -> Self {
        match code {
            0 => Opcode::Dispatch,
            1 => Opcode::Heartbeat,
            2 => Opcode::Authenticate,
            5 => Opcode::Internal,
            10 => Opcode::Hello,
            11 => Opcode::HeartbeatAck,
            22 => Opcode::Authenticated,
            other => Opcode::Other(other),
        }
    }
}

/// One Mesa message: `{"op": .., "d": .., "t"?: .., "s"?: ..}`.
///
/// `d` is `Value::Null` when the frame had no `d`; such a message encodes without `d`,
/// exactly as upstream's `JSON.stringify` drops an `undefined` field.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The opcode.
    pub op: Opcode,
    /// The data; `{}` when there is nothing to say.
    pub d: Value,
    /// The message type, e.g. `"STATUS_UPDATE"`.
    pub t: Option<String>,
    /// The sequence number of a redelivered message (1-based).
    pub s: Option<u64>,
}

impl Message {
    /// Build a message with `d` and no type or sequence.
    pub fn new(op: Opcode, d: Value) -> Self {
        Message {
            op,
            d,
            t: None,
            s: None,
        }
    }

    /// Build an application dispatch (op 0) of type `t`.
    pub fn dispatch(t: impl Into<String>, d: Value) -> Self {
        Message {
            op: Opcode::Dispatch,
            d,
            t: Some(t.into()),
            s: None,
        }
    }

    /// Decode one text frame, enforcing `limits` before any JSON tree is built.
    pub fn decode(text: &str, limits: &Limits) -> Result<Message, DecodeError> {
        check_size_and_depth(text, limits)?;
        // The frame's own object is read field by field (every frame a server reads
        // passes here: no map, no key copies, no hashing); only the values are trees.
        match serde_json::from_str::<Fields>(text) {
            Ok(fields) => fields.into_message(),
            // Not an object, or not JSON: parsed again to tell which (the peer is
            // closed for it, so this costs nothing that matters).
            Err(_) => {
                let value: Value = serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?;
                Message::from_value(value)
            }
        }
    }

    /// Interpret an already parsed JSON value (used for Redis payloads too).
    pub fn from_value(value: Value) -> Result<Message, DecodeError> {
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        Fields {
            op: object.remove("op"),
            d: object.remove("d"),
            t: object.remove("t"),
            s: object.remove("s"),
        }
        .into_message()
    }

    /// The JSON object of this message, with upstream's field order (`op`, `d`, `t`, `s`).
    pub fn to_value(&self) -> Value {
        let mut object = Map::new();
        object.insert("op".into(), Value::from(self.op.code()));
        if !self.d.is_null() {
            object.insert("d".into(), self.d.clone());
        }
        if let Some(t) = &self.t {
            object.insert("t".into(), Value::String(t.clone()));
        }
        if let Some(s) = self.s {
            object.insert("s".into(), Value::from(s));
        }
        Value::Object(object)
    }

    /// Encode to a shareable frame. Encode a broadcast once and clone the [`Frame`].
    pub fn encode(&self) -> Frame {
        // The bytes of `to_value`'s JSON, written straight from the fields: no tree
        // is built and `d` is not copied (the echo's hot path). Writing JSON into
        // memory cannot fail: keys are strings and numbers finite. Numbers go through
        // serde_json's integer writer, not `fmt`.
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"{\"op\":");
        let _ = serde_json::to_writer(&mut out, &self.op.code());
        if !self.d.is_null() {
            out.extend_from_slice(b",\"d\":");
            let _ = serde_json::to_writer(&mut out, &self.d);
        }
        if let Some(t) = &self.t {
            out.extend_from_slice(b",\"t\":");
            let _ = serde_json::to_writer(&mut out, t);
        }
        if let Some(s) = self.s {
            out.extend_from_slice(b",\"s\":");
            let _ = serde_json::to_writer(&mut out, &s);
        }
        out.push(b'}');
        Frame::from_json(out)
    }
}

/// The fields of a message's JSON object as parsed, before their types are checked;
/// any other field is parsed and dropped. A field given twice keeps its last value,
/// as in a parsed object (and in JavaScript's `JSON.parse`).
#[derive(Default)]
struct Fields {
    op: Option<Value>,
    d: Option<Value>,
    t: Option<Value>,
    s: Option<Value>,
}

impl Fields {
    /// The message, or the first field (in the order `op`, `t`, `s`) of the wrong type.
    fn into_message(self) -> Result<Message, DecodeError> {
        let op = self
            .op
            .as_ref()
            .and_then(Value::as_u64)
            .map(Opcode::from)
            .ok_or(DecodeError::BadField("op"))?;
        let t = match self.t {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t),
            Some(_) => return Err(DecodeError::BadField("t")),
        };
        let s = match self.s {
            None | Some(Value::Null) => None,
            Some(s) => Some(s.as_u64().ok_or(DecodeError::BadField("s"))?),
        };
        let d = self.d.unwrap_or(Value::Null);
        Ok(Message { op, d, t, s })
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Reads a JSON object into [`Fields`]; anything else is refused.
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            // Every value is parsed as a tree, the dropped ones too, so that a frame
            // is valid exactly when it is as a whole JSON value.
            let value = map.next_value::<Value>()?;
            let slot = match key {
                Key::Op => &mut fields.op,
                Key::D => &mut fields.d,
                Key::T => &mut fields.t,
                Key::S => &mut fields.s,
                Key::Other => continue,
            };
            *slot = Some(value);
        }
        Ok(fields)
    }
}

/// A key of a message's object, compared without being copied.
enum Key {
    Op,
    D,
    T,
    S,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// Reads a key (escaped or not) into a [`Key`].
struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "op" => Key::Op,
            "d" => Key::D,
            "t" => Key::T,
            "s" => Key::S,
            _ => Key::Other,
        })
    }
}

/// An encoded text frame: JSON text in shared bytes. Cloning shares them, so a
/// broadcast to many connections is serialized once, and an adapter hands them to
/// its transport as they are ([`into_bytes`](Self::into_bytes)): encoding a message
/// allocates once, for its text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Frame(Bytes);

impl Frame {
    /// The frame of the JSON text serde_json wrote into `json` (UTF-8, as all it
    /// writes). Shrunk to fit, the buffer becomes the shared bytes as it is: the
    /// allocator shrinks in place, and only a clone (a broadcast) adds a reference
    /// count, once.
    pub(crate) fn from_json(json: Vec<u8>) -> Frame {
        Frame(Bytes::from(json.into_boxed_slice()))
    }

    /// The frame's text. Checked on each call (frames hold bytes so that no copy is
    /// made for the transport); every frame is JSON text, so the check never fails.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The shared bytes (UTF-8), for adapters that hand them to their transport
    /// without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Whether two frames share one allocation (a broadcast encoded once).
    pub fn ptr_eq(&self, other: &Frame) -> bool {
        self.0.as_ptr() == other.0.as_ptr() && self.0.len() == other.0.len()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the frame is empty (never true for an encoded message).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({})", self.as_str())
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<str> for Frame {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame is not valid JSON.
    #[error("frame is not valid JSON")]
    NotJson,
    /// The frame is JSON but not an object.
    #[error("frame is not a JSON object")]
    NotObject,
    /// A field has the wrong type (`op` must be a non-negative integer, `t` a string, `s` an integer).
    #[error("field `{0}` is missing or has the wrong type")]
    BadField(&'static str),
    /// The frame is larger than the configured maximum.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooBig {
        /// Size of the frame.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The JSON nests deeper than the configured maximum.
    #[error("JSON nesting exceeds the limit of {max}")]
    TooDeep {
        /// The configured limit.
        max: usize,
    },
    /// A binary frame arrived; Mesa speaks text frames only.
    #[error("binary frames are not part of the Mesa protocol")]
    Binary,
    /// A text frame was not valid UTF-8 (reported by the transport).
    #[error("text frame is not valid UTF-8")]
    InvalidUtf8,
}

impl DecodeError {
    /// The close code a server answers this error with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::NotJson
            | DecodeError::NotObject
            | DecodeError::BadField(_)
            | DecodeError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            DecodeError::TooBig { .. } | DecodeError::TooDeep { .. } => CloseCode::MESSAGE_TOO_BIG,
            DecodeError::Binary => CloseCode::UNSUPPORTED_DATA,
        }
    }
}

/// Reject JSON nested deeper than `max` with one pass over the bytes, before parsing.
///
/// Brackets inside strings do not count; an unbalanced document is left for the parser
/// to reject.
/// Refuse a frame over the size or nesting limits before parsing it.
pub(crate) fn check_size_and_depth(text: &str, limits: &Limits) -> Result<(), DecodeError> {
    if text.len() > limits.max_message_bytes {
        return Err(DecodeError::TooBig {
            len: text.len(),
            max: limits.max_message_bytes,
        });
    }
    check_depth(text.as_bytes(), limits.max_json_depth)
}

fn check_depth(bytes: &[u8], max: usize) -> Result<(), DecodeError> {
    // Nesting is at most the number of opening brackets, strings included: a frame
    // with no more than `max` of them (nearly every frame) needs no exact pass. The
    // count is one vectorized loop; `b | 0x20` is `{` exactly for `{` and `[`.
    if bytes.iter().filter(|&&byte| byte | 0x20 == b'{').count() <= max {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(DecodeError::TooDeep { max });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn encodes_in_upstream_field_order_without_absent_fields() {
        let hello = Message::new(Opcode::Hello, json!({"rules": []}));
        assert_eq!(hello.encode().as_str(), r#"{"op":10,"d":{"rules":[]}}"#);
        let mut sync = Message::dispatch("CHAT", json!({"x": 1}));
        sync.s = Some(3);
        assert_eq!(
            sync.encode().as_str(),
            r#"{"op":0,"d":{"x":1},"t":"CHAT","s":3}"#
        );
    }

    #[test]
    fn decodes_known_and_unknown_opcodes() {
        let m = Message::decode(r#"{"op":11,"d":{}}"#, &limits()).unwrap();
        assert_eq!(m.op, Opcode::HeartbeatAck);
        let m = Message::decode(r#"{"op":99,"d":{},"extra":true}"#, &limits()).unwrap();
        assert_eq!(m.op, Opcode::Other(99));
    }

    #[test]
    fn maps_each_error_to_its_close_code() {
        let cases = [
            ("nope", DecodeError::NotJson, 1007),
            ("[1]", DecodeError::NotObject, 1007),
            (r#"{"op":-1}"#, DecodeError::BadField("op"), 1007),
            (r#"{"op":"0"}"#, DecodeError::BadField("op"), 1007),
            (r#"{"d":{}}"#, DecodeError::BadField("op"), 1007),
            (r#"{"op":0,"t":5}"#, DecodeError::BadField("t"), 1007),
            (r#"{"op":0,"s":"x"}"#, DecodeError::BadField("s"), 1007),
        ];
        for (text, error, code) in cases {
            let got = Message::decode(text, &limits()).unwrap_err();
            assert_eq!(got, error, "{text}");
            assert_eq!(got.close_code().0, code);
        }
    }

    #[test]
    fn enforces_size_and_depth_before_parsing() {
        let small = Limits {
            max_message_bytes: 16,
            ..Limits::default()
        };
        let err = Message::decode(r#"{"op":0,"d":"0123456789"}"#, &small).unwrap_err();
        assert!(matches!(err, DecodeError::TooBig { .. }));
        assert_eq!(err.close_code().0, 1009);

        let shallow = Limits {
            max_json_depth: 3,
            ..Limits::default()
        };
        assert!(Message::decode(r#"{"op":0,"d":{"a":[1]}}"#, &shallow).is_ok());
        let err = Message::decode(r#"{"op":0,"d":{"a":[[1]]}}"#, &shallow).unwrap_err();
        assert_eq!(err, DecodeError::TooDeep { max: 3 });
        // Brackets inside strings are text, not nesting.
        assert!(Message::decode(r#"{"op":0,"d":"[[[[[\"]]]]"}"#, &shallow).is_ok());
    }
}
