//! Rooms on the wire, for the clients that opt in (see `docs/protocol.md`).
//!
//! The published clients hand every frame but ops 1, 10 and 22 to the application
//! and read only `op`, `d`, `t`, `s`, so rooms are built to go unnoticed by them:
//! the hello announces the `"rooms"` rule, a client opts in inside its op 2 data
//! (`"mesa": {"caps": ["rooms"]}`, removed before the application's authenticator
//! sees the credentials), and only a connection that opted in (an *extended* one)
//! ever receives a control dispatch (`t` starting with `mesa:`) or a top-level
//! `room` field. Everyone else receives a room's messages as ordinary dispatches.
//!
//! This module holds the shapes: room names and their limits, the requests an
//! extended client makes, the notices the server answers with, and room messages.

use serde_json::{Map, Value, json};

use crate::limits::Limits;
use crate::recovery::{Personal, Position, Since};
use crate::wire::{DecodeError, Frame, Message, Opcode};

/// The hello rule a server with rooms announces.
pub const ROOMS_RULE: &str = "rooms";

/// The key of op 2's data a client opts in with (`{"caps": ["rooms"]}`).
pub const OPT_IN_KEY: &str = "mesa";

/// The capability of rooms, inside the opt-in's `caps`.
pub const ROOMS_CAP: &str = "rooms";

/// The prefix of every control dispatch type, reserved as Pusher reserves `pusher:`.
pub const CONTROL_PREFIX: &str = "mesa:";

/// Take the opt-in out of op 2's data: `Some` when the client asked for rooms, with
/// the positions it reports in its personal and broadcast streams (`"since"`). The
/// key is removed whatever it holds, so the application never sees it.
pub fn take_opt_in(credentials: &mut Value) -> Option<Since> {
    let opt_in = credentials
        .as_object_mut()
        .and_then(|object| object.remove(OPT_IN_KEY))?;
    let rooms = opt_in
        .get("caps")
        .and_then(Value::as_array)
        .is_some_and(|caps| caps.iter().any(|cap| cap == ROOMS_CAP));
    rooms.then(|| Since::from_value(opt_in.get("since")))
}

/// The opt-in a client adds to its op 2 data, reporting where it stood in its
/// personal and broadcast streams.
pub fn opt_in(since: &Since) -> Value {
    let mut opt_in = json!({ "caps": [ROOMS_CAP] });
    if let Some(since) = since.to_value() {
        opt_in["since"] = since;
    }
    opt_in
}

/// Why a room request was refused, as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The request is malformed (a field missing or of the wrong type).
    BadRequest,
    /// The room name is empty, too long, or has a character outside the allowed set.
    InvalidRoom,
    /// The server's authorization denied it.
    Unauthorized,
    /// The connection is in the most rooms it may be in.
    TooManyRooms,
    /// An unsubscribe from, or a presence request about, a room the connection is
    /// not in.
    NotSubscribed,
    /// More presence requests than [`Limits::max_presence_requests`] await their
    /// answers on the connection.
    TooManyRequests,
    /// The server cannot answer now (a presence request while Redis is unreachable).
    Unavailable,
}

impl RefusalCode {
    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::InvalidRoom => "invalid_room",
            RefusalCode::Unauthorized => "unauthorized",
            RefusalCode::TooManyRooms => "too_many_rooms",
            RefusalCode::NotSubscribed => "not_subscribed",
            RefusalCode::TooManyRequests => "too_many_requests",
            RefusalCode::Unavailable => "unavailable",
        }
    }

    fn parse(code: &str) -> Option<RefusalCode> {
        [
            RefusalCode::BadRequest,
            RefusalCode::InvalidRoom,
            RefusalCode::Unauthorized,
            RefusalCode::TooManyRooms,
            RefusalCode::NotSubscribed,
            RefusalCode::TooManyRequests,
            RefusalCode::Unavailable,
        ]
        .into_iter()
        .find(|known| known.as_str() == code)
    }
}

/// A refused room request: a code for programs, a reason for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({})", code.as_str())]
pub struct RoomRefusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// Why, in words.
    pub reason: String,
}

impl RoomRefusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        RoomRefusal {
            code,
            reason: reason.into(),
        }
    }
}

/// Who may subscribe and publish to rooms without asking the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomGate {
    /// Every client, authenticated or not: for demos only.
    Open,
    /// Every authenticated client.
    Authenticated,
    /// The application's authorization decides each request (it denies by default).
    Ask,
}

impl RoomGate {
    /// The decision the gate makes alone about a subscribe or a publish: `None` when
    /// the application's authorization decides.
    pub fn decide(self, authenticated: bool) -> Option<Result<(), RoomRefusal>> {
        match self {
            RoomGate::Open => Some(Ok(())),
            RoomGate::Authenticated if authenticated => Some(Ok(())),
            RoomGate::Authenticated => Some(Err(RoomRefusal::new(
                RefusalCode::Unauthorized,
                "authenticate first",
            ))),
            RoomGate::Ask => None,
        }
    }
}

/// Check a room name: 1 to `max_room_name_bytes` bytes of ASCII letters, digits and
/// `_ - . : @ / # = +` (no spaces, no quotes, nothing a log or a Redis key would
/// need escaped).
pub fn check_room(room: &str, limits: &Limits) -> Result<(), RoomRefusal> {
    if room.is_empty() || room.len() > limits.max_room_name_bytes {
        let reason = format!(
            "a room name has 1 to {} bytes, not {}",
            limits.max_room_name_bytes,
            room.len()
        );
        return Err(RoomRefusal::new(RefusalCode::InvalidRoom, reason));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:@/#=+".contains(c);
    match room.chars().find(|c| !allowed(*c)) {
        None => Ok(()),
        Some(c) => Err(RoomRefusal::new(
            RefusalCode::InvalidRoom,
            format!("{c:?} is not allowed in a room name"),
        )),
    }
}

/// What an extended client asks of the server.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomRequest {
    /// `mesa:subscribe`: join `room`, with an optional token for the authorization.
    Subscribe {
        /// The room.
        room: String,
        /// Echoed in the answer.
        reference: Value,
        /// Handed to the server's authorization.
        token: Option<String>,
        /// `"presence": true`: hear `mesa:join` and `mesa:leave` of the room's ids.
        presence: bool,
        /// `"since": {"epoch", "offset"}`: the last position the client got in a
        /// recoverable room, to get what it missed after it.
        since: Option<Position>,
    },
    /// `mesa:unsubscribe`: leave `room`.
    Unsubscribe {
        /// The room.
        room: String,
        /// Echoed in the answer.
        reference: Value,
    },
    /// `mesa:publish`: send `message` (its `t` and `d`) to the members of `room`.
    Publish {
        /// The room.
        room: String,
        /// The message.
        message: Message,
        /// Echoed in a refusal (nothing answers a publish that went through).
        reference: Value,
    },
    /// `mesa:presence`: who is in `room` (a room the connection is in), answered by
    /// [`RoomNotice::Members`].
    Presence {
        /// The room.
        room: String,
        /// Echoed in the answer.
        reference: Value,
    },
}

impl RoomRequest {
    /// Read a request from a dispatch of an extended client: `None` when its type is
    /// not a control type (an ordinary message), a refusal (to answer with) when it is
    /// one but malformed or names an invalid room.
    pub fn parse(message: &Message, limits: &Limits) -> Option<Result<RoomRequest, Box<Refused>>> {
        if message.op != Opcode::Dispatch {
            return None;
        }
        let kind = message.t.as_deref()?.strip_prefix(CONTROL_PREFIX)?;
        let d = &message.d;
        let reference = d.get("ref").cloned().unwrap_or(Value::Null);
        let refused = |code, reason: &str| {
            Err(Box::new(Refused {
                room: d.get("room").and_then(Value::as_str).map(str::to_owned),
                reference: reference.clone(),
                refusal: RoomRefusal::new(code, reason),
            }))
        };
        let Some(room) = d.get("room").and_then(Value::as_str) else {
            return Some(refused(
                RefusalCode::BadRequest,
                "a string `room` is needed",
            ));
        };
        if let Err(refusal) = check_room(room, limits) {
            return Some(refused(refusal.code, &refusal.reason));
        }
        let room = room.to_owned();
        let request = match kind {
            "subscribe" => {
                let token = match d.get("token") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(token)) => Some(token.clone()),
                    Some(_) => {
                        return Some(refused(RefusalCode::BadRequest, "`token` is a string"));
                    }
                };
                let presence = match d.get("presence") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(presence)) => *presence,
                    Some(_) => {
                        return Some(refused(RefusalCode::BadRequest, "`presence` is a boolean"));
                    }
                };
                let since = match d.get("since") {
                    None | Some(Value::Null) => None,
                    Some(since) => match Position::from_value(since) {
                        Some(since) => Some(since),
                        None => {
                            let reason = "`since` is {\"epoch\": a string, \"offset\": a number}";
                            return Some(refused(RefusalCode::BadRequest, reason));
                        }
                    },
                };
                RoomRequest::Subscribe {
                    room,
                    reference,
                    token,
                    presence,
                    since,
                }
            }
            "unsubscribe" => RoomRequest::Unsubscribe { room, reference },
            "presence" => RoomRequest::Presence { room, reference },
            "publish" => {
                let Some(t) = d.get("t").and_then(Value::as_str) else {
                    return Some(refused(RefusalCode::BadRequest, "a string `t` is needed"));
                };
                if t.starts_with(CONTROL_PREFIX) {
                    let reason = "`mesa:` types are reserved";
                    return Some(refused(RefusalCode::BadRequest, reason));
                }
                let data = d.get("d").cloned().unwrap_or_else(|| json!({}));
                RoomRequest::Publish {
                    room,
                    message: Message::dispatch(t, data),
                    reference,
                }
            }
            other => {
                let reason = format!("unknown request `{CONTROL_PREFIX}{other}`");
                return Some(refused(RefusalCode::BadRequest, &reason));
            }
        };
        Some(Ok(request))
    }

    /// The request as the client sends it.
    pub fn encode(&self) -> Frame {
        let (kind, mut d) = match self {
            RoomRequest::Subscribe {
                room,
                reference,
                token,
                presence,
                since,
            } => {
                let mut d = json!({ "room": room, "ref": reference });
                if let Some(token) = token {
                    d["token"] = Value::from(token.as_str());
                }
                if *presence {
                    d["presence"] = Value::Bool(true);
                }
                if let Some(since) = since {
                    d["since"] = since.to_value();
                }
                ("subscribe", d)
            }
            RoomRequest::Unsubscribe { room, reference } => {
                ("unsubscribe", json!({ "room": room, "ref": reference }))
            }
            RoomRequest::Presence { room, reference } => {
                ("presence", json!({ "room": room, "ref": reference }))
            }
            RoomRequest::Publish {
                room,
                message,
                reference,
            } => {
                let t = message.t.clone().unwrap_or_default();
                let d = json!({ "room": room, "t": t, "d": message.d, "ref": reference });
                ("publish", d)
            }
        };
        if d.get("ref").is_some_and(Value::is_null) {
            if let Some(object) = d.as_object_mut() {
                object.remove("ref");
            }
        }
        Message::dispatch(format!("{CONTROL_PREFIX}{kind}"), d).encode()
    }
}

/// A malformed request, as answered: the room and reference it named, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The room the request named, if it named one.
    pub room: Option<String>,
    /// The request's reference.
    pub reference: Value,
    /// Why.
    pub refusal: RoomRefusal,
}

/// What the server tells an extended client about its rooms.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomNotice {
    /// `mesa:subscribed`: the connection is in `room`. For a personal or the
    /// broadcast stream ([`Personal::stream`]'s names) it is told as `mesa:resumed`,
    /// by the stream's kind; parsed back, a personal stream's name has no id.
    Subscribed {
        /// The room, or the personal or broadcast stream.
        room: String,
        /// The request's reference (null when the server joined it on its own).
        reference: Value,
        /// In a recoverable room: the position the connection's messages continue
        /// from (the last one it got, replayed ones included).
        position: Option<Position>,
        /// In a recoverable room, answering a subscribe with `since` (or telling
        /// that what a member missed is lost): whether everything after `since`
        /// was replayed before this notice.
        recovered: Option<bool>,
    },
    /// `mesa:unsubscribed`: the connection left `room`.
    Unsubscribed {
        /// The room.
        room: String,
        /// The request's reference (null when the server removed it on its own).
        reference: Value,
    },
    /// `mesa:error`: a request was refused.
    Refused(Refused),
    /// `mesa:join`: `id` has its first connection in `room` (over the cluster); sent
    /// to the members that subscribed with `"presence": true`.
    Join {
        /// The room.
        room: String,
        /// The id that joined.
        id: String,
    },
    /// `mesa:leave`: `id`'s last connection in `room` left it (over the cluster).
    Leave {
        /// The room.
        room: String,
        /// The id that left.
        id: String,
    },
    /// `mesa:presence`: the answer to [`RoomRequest::Presence`].
    Members {
        /// The room.
        room: String,
        /// The request's reference.
        reference: Value,
        /// Each id in the room with its connections in it, by id.
        members: Vec<(String, u64)>,
    },
}

impl RoomNotice {
    /// The refusal of a request about `room`.
    pub fn refused(room: String, reference: Value, refusal: RoomRefusal) -> RoomNotice {
        RoomNotice::Refused(Refused {
            room: Some(room),
            reference,
            refusal,
        })
    }

    /// The notice's frame.
    pub fn encode(&self) -> Frame {
        self.to_message().encode()
    }

    /// The notice as a dispatch (a delivery to many members encodes it once).
    pub fn to_message(&self) -> Message {
        let (kind, d) = match self {
            RoomNotice::Subscribed {
                room,
                reference,
                position,
                recovered,
            } => {
                // A personal stream is no room the client asked for: where it stands
                // is told as `mesa:resumed`, by the stream's kind.
                let personal = Personal::of_stream(room);
                let mut d = match personal {
                    Some(kind) => json!({ "stream": kind.as_str() }),
                    None => json!({ "room": room, "ref": reference }),
                };
                if let Some(position) = position {
                    d["epoch"] = Value::from(position.epoch.as_str());
                    d["offset"] = Value::from(position.offset);
                }
                if let Some(recovered) = recovered {
                    d["recovered"] = Value::Bool(*recovered);
                }
                (
                    if personal.is_some() {
                        "resumed"
                    } else {
                        "subscribed"
                    },
                    d,
                )
            }
            RoomNotice::Unsubscribed { room, reference } => {
                ("unsubscribed", json!({ "room": room, "ref": reference }))
            }
            RoomNotice::Refused(refused) => (
                "error",
                json!({
                    "room": refused.room,
                    "ref": refused.reference,
                    "code": refused.refusal.code.as_str(),
                    "reason": refused.refusal.reason,
                }),
            ),
            RoomNotice::Join { room, id } => ("join", json!({ "room": room, "id": id })),
            RoomNotice::Leave { room, id } => ("leave", json!({ "room": room, "id": id })),
            RoomNotice::Members {
                room,
                reference,
                members,
            } => {
                let members: Map<String, Value> = members
                    .iter()
                    .map(|(id, count)| (id.clone(), Value::from(*count)))
                    .collect();
                (
                    "presence",
                    json!({ "room": room, "ref": reference, "members": members }),
                )
            }
        };
        Message::dispatch(format!("{CONTROL_PREFIX}{kind}"), d)
    }

    /// Read a notice from a dispatch the server sent (`None`: not a notice).
    pub fn parse(message: &Message) -> Option<RoomNotice> {
        if message.op != Opcode::Dispatch {
            return None;
        }
        let kind = message.t.as_deref()?.strip_prefix(CONTROL_PREFIX)?;
        let d = &message.d;
        let room = d.get("room").and_then(Value::as_str).map(str::to_owned);
        let reference = d.get("ref").cloned().unwrap_or(Value::Null);
        match kind {
            "subscribed" => Some(RoomNotice::Subscribed {
                room: room?,
                reference,
                position: Position::from_value(d),
                recovered: d.get("recovered").and_then(Value::as_bool),
            }),
            "resumed" => {
                let kind = Personal::parse(d.get("stream").and_then(Value::as_str)?)?;
                Some(RoomNotice::Subscribed {
                    room: kind.stream(""),
                    reference: Value::Null,
                    position: Position::from_value(d),
                    recovered: d.get("recovered").and_then(Value::as_bool),
                })
            }
            "unsubscribed" => Some(RoomNotice::Unsubscribed {
                room: room?,
                reference,
            }),
            "error" => {
                let code = d.get("code").and_then(Value::as_str)?;
                let reason = d.get("reason").and_then(Value::as_str).unwrap_or_default();
                Some(RoomNotice::Refused(Refused {
                    room,
                    reference,
                    refusal: RoomRefusal::new(RefusalCode::parse(code)?, reason),
                }))
            }
            "join" | "leave" => {
                let (room, id) = (room?, d.get("id").and_then(Value::as_str)?.to_owned());
                Some(if kind == "join" {
                    RoomNotice::Join { room, id }
                } else {
                    RoomNotice::Leave { room, id }
                })
            }
            "presence" => {
                let members = d
                    .get("members")?
                    .as_object()?
                    .iter()
                    .map(|(id, count)| Some((id.clone(), count.as_u64()?)))
                    .collect::<Option<Vec<_>>>()?;
                Some(RoomNotice::Members {
                    room: room?,
                    reference,
                    members,
                })
            }
            _ => None,
        }
    }
}

/// A room's message as an extended connection receives it: the dispatch with a
/// top-level `room`, and in a recoverable room its `epoch` and `offset`. A personal
/// stream's names its kind instead (`"stream": "user"`).
pub fn room_frame(message: &Message, room: &str, position: Option<&Position>) -> Frame {
    let mut value = message.to_value();
    if let Value::Object(object) = &mut value {
        match Personal::of_stream(room) {
            Some(kind) => object.insert("stream".into(), Value::from(kind.as_str())),
            None => object.insert("room".into(), Value::from(room)),
        };
        if let Some(position) = position {
            object.insert("epoch".into(), Value::from(position.epoch.as_str()));
            object.insert("offset".into(), Value::from(position.offset));
        }
    }
    Frame::from_json(serde_json::to_vec(&value).unwrap_or_default())
}

/// A room's message between replicas, on the room's channel:
/// `{"room": R, "message": {"op","d","t"}, "origin": replica}`, and in a recoverable
/// room `"epoch"` and `"offset"` instead of the origin.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEnvelope {
    /// The room.
    pub room: String,
    /// The message.
    pub message: Message,
    /// The replica that published it and delivered it to its own members at once
    /// (before Redis confirmed its subscription to the room), so it skips the
    /// message when it comes back; none for a Dispatcher's, for a replica's once
    /// confirmed, and in a recoverable room (every replica delivers from the
    /// channel).
    pub origin: Option<String>,
    /// Its position in a recoverable room's stream, given by the script that
    /// appended it.
    pub position: Option<Position>,
}

impl RoomEnvelope {
    /// The payload to publish.
    pub fn encode(&self) -> String {
        let mut message = self.message.to_value();
        if let Value::Object(object) = &mut message {
            object.remove("s");
        }
        let mut envelope = json!({ "room": self.room, "message": message });
        if let Some(origin) = &self.origin {
            envelope["origin"] = Value::from(origin.as_str());
        }
        if let Some(position) = &self.position {
            envelope["epoch"] = Value::from(position.epoch.as_str());
            envelope["offset"] = Value::from(position.offset);
        }
        envelope.to_string()
    }

    /// The payload without its closing brace: the script that appends a message to
    /// a recoverable room's stream completes it with `,"epoch":E,"offset":O}`.
    pub fn head(&self) -> String {
        let mut payload = self.encode();
        payload.pop();
        payload
    }

    /// Read a payload of a room channel.
    pub fn decode(payload: &str) -> Result<RoomEnvelope, DecodeError> {
        let value: Value = serde_json::from_str(payload).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        let room = match object.remove("room") {
            Some(Value::String(room)) => room,
            _ => return Err(DecodeError::BadField("room")),
        };
        let raw = object
            .remove("message")
            .ok_or(DecodeError::BadField("message"))?;
        let message = Message {
            s: None,
            ..Message::from_value(raw)?
        };
        let origin = match object.remove("origin") {
            None | Some(Value::Null) => None,
            Some(Value::String(origin)) => Some(origin),
            Some(_) => return Err(DecodeError::BadField("origin")),
        };
        let position = match (object.get("epoch"), object.get("offset")) {
            (None, None) => None,
            _ => Some(
                Position::from_value(&Value::Object(object))
                    .ok_or(DecodeError::BadField("offset"))?,
            ),
        };
        Ok(RoomEnvelope {
            room,
            message,
            origin,
            position,
        })
    }
}

/// An id's presence in a room changed over the cluster: its first connection
/// joined (`joined`) or its last one left. The `ROOMS` and `JANITOR` scripts publish
/// it on the room's channel, as `{"room": R, "join": id}` or `{"room": R, "leave": id}`,
/// at the moment the id's count in the room's hash of members goes from 0 or to 0;
/// a server alone decides it from its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The room.
    pub room: String,
    /// The id.
    pub id: String,
    /// Its first connection joined (else its last one left).
    pub joined: bool,
}

impl PresenceChange {
    /// The payload to publish (the simulator's model of Redis publishes what the
    /// scripts do).
    pub fn encode(&self) -> String {
        let kind = if self.joined { "join" } else { "leave" };
        json!({ "room": self.room, kind: self.id }).to_string()
    }

    /// The notice the room's members that asked for presence receive.
    pub fn notice(&self) -> RoomNotice {
        let (room, id) = (self.room.clone(), self.id.clone());
        if self.joined {
            RoomNotice::Join { room, id }
        } else {
            RoomNotice::Leave { room, id }
        }
    }
}

/// What comes on a room's channel: a message, or a change of presence.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomPayload {
    /// A room's message.
    Message(RoomEnvelope),
    /// An id joined or left the room.
    Presence(PresenceChange),
}

impl RoomPayload {
    /// Read a payload of a room channel: one with `message` is a message (and names
    /// no `join` or `leave`), one without names exactly one of `join` and `leave`.
    pub fn decode(payload: &str) -> Result<RoomPayload, DecodeError> {
        let value: Value = serde_json::from_str(payload).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(object) = &value else {
            return Err(DecodeError::NotObject);
        };
        let join = object.get("join");
        let leave = object.get("leave");
        if object.contains_key("message") {
            if join.is_some() || leave.is_some() {
                return Err(DecodeError::BadField("message"));
            }
            return RoomEnvelope::decode(payload).map(RoomPayload::Message);
        }
        let room = match object.get("room") {
            Some(Value::String(room)) => room.clone(),
            _ => return Err(DecodeError::BadField("room")),
        };
        let (id, joined) = match (join, leave) {
            (Some(Value::String(id)), None) => (id.clone(), true),
            (None, Some(Value::String(id))) => (id.clone(), false),
            (None, None) => return Err(DecodeError::BadField("message")),
            _ => return Err(DecodeError::BadField("join")),
        };
        Ok(RoomPayload::Presence(PresenceChange { room, id, joined }))
    }
}

/// Decode a frame from the server, with the room it came from (`None` for a
/// message not sent to a room).
pub fn decode_room_message(text: &str, limits: &Limits) -> Result<RoomFrame, DecodeError> {
    crate::wire::check_size_and_depth(text, limits)?;
    let mut value: Value = serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?;
    let position = Position::from_value(&value);
    let (room, stream) = match value.as_object_mut() {
        Some(object) => {
            object.remove("epoch");
            object.remove("offset");
            let text = |value: Option<Value>| value.and_then(|v| v.as_str().map(str::to_owned));
            let stream = text(object.remove("stream")).and_then(|name| Personal::parse(&name));
            (text(object.remove("room")), stream)
        }
        None => (None, None),
    };
    Ok(RoomFrame {
        message: Message::from_value(value)?,
        position: position.filter(|_| room.is_some() || stream.is_some()),
        room,
        stream,
    })
}

/// A frame from the server, read by [`decode_room_message`].
#[derive(Debug, Clone, PartialEq)]
pub struct RoomFrame {
    /// The message, without the fields below.
    pub message: Message,
    /// The room it was published to (`None`: a message not sent to a room).
    pub room: Option<String>,
    /// The personal or broadcast stream it came from, for a send to the client's id
    /// or to everyone taken from a stream.
    pub stream: Option<Personal>,
    /// Its position in a recoverable room or in that stream.
    pub position: Option<Position>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn parse(text: &str) -> Option<Result<RoomRequest, Box<Refused>>> {
        RoomRequest::parse(&Message::decode(text, &limits()).unwrap(), &limits())
    }

    #[test]
    fn the_gate_decides_alone_except_when_it_asks() {
        assert_eq!(RoomGate::Open.decide(false), Some(Ok(())));
        assert_eq!(RoomGate::Authenticated.decide(true), Some(Ok(())));
        let refused = RoomGate::Authenticated.decide(false).unwrap().unwrap_err();
        assert_eq!(refused.code, RefusalCode::Unauthorized);
        assert_eq!(RoomGate::Ask.decide(true), None);
    }

    #[test]
    fn the_opt_in_is_taken_out_of_the_credentials() {
        let mut credentials = json!({"token": "t", "mesa": {"caps": ["rooms"]}});
        assert_eq!(take_opt_in(&mut credentials), Some(Since::default()));
        assert_eq!(credentials, json!({"token": "t"}));
        let mut other = json!({"token": "t", "mesa": {"caps": ["offsets"]}});
        assert_eq!(take_opt_in(&mut other), None);
        assert_eq!(other, json!({"token": "t"}));
        assert_eq!(take_opt_in(&mut json!({"token": "t"})), None);
        assert_eq!(take_opt_in(&mut json!("not an object")), None);
        let since = Since {
            user: Some(Position {
                epoch: "e".into(),
                offset: 3,
            }),
            broadcast: None,
        };
        let mut resuming = json!({"mesa": opt_in(&since)});
        assert_eq!(take_opt_in(&mut resuming), Some(since));
    }

    #[test]
    fn room_names_are_bounded_and_plain() {
        for ok in ["chat:42", "a", "team/x@y.z#1=2+3_-"] {
            assert_eq!(check_room(ok, &limits()), Ok(()), "{ok}");
        }
        let long = "x".repeat(limits().max_room_name_bytes + 1);
        for bad in ["", "with space", "quo\"te", "é", long.as_str()] {
            let refusal = check_room(bad, &limits()).unwrap_err();
            assert_eq!(refusal.code, RefusalCode::InvalidRoom, "{bad}");
        }
    }

    #[test]
    fn requests_round_trip_and_ordinary_dispatches_are_not_requests() {
        let requests = [
            RoomRequest::Subscribe {
                room: "r".into(),
                reference: json!(1),
                token: Some("tok".into()),
                presence: false,
                since: None,
            },
            RoomRequest::Subscribe {
                room: "r".into(),
                reference: json!(2),
                token: None,
                presence: true,
                since: Some(Position {
                    epoch: "e1".into(),
                    offset: 17,
                }),
            },
            RoomRequest::Presence {
                room: "r".into(),
                reference: json!(7),
            },
            RoomRequest::Unsubscribe {
                room: "r".into(),
                reference: json!("two"),
            },
            RoomRequest::Publish {
                room: "r".into(),
                message: Message::dispatch("CHAT", json!({"x": 1})),
                reference: Value::Null,
            },
        ];
        for request in requests {
            let frame = request.encode();
            assert_eq!(parse(frame.as_str()), Some(Ok(request)));
        }
        assert_eq!(parse(r#"{"op":0,"t":"CHAT","d":{}}"#), None);
        assert_eq!(parse(r#"{"op":2,"t":"mesa:subscribe","d":{}}"#), None);
    }

    #[test]
    fn malformed_requests_are_refused_with_their_reference() {
        let cases = [
            (
                r#"{"op":0,"t":"mesa:subscribe","d":{"ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:subscribe","d":{"room":"a b","ref":7}}"#,
                RefusalCode::InvalidRoom,
            ),
            (
                r#"{"op":0,"t":"mesa:subscribe","d":{"room":"a","token":1,"ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:publish","d":{"room":"a","ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:publish","d":{"room":"a","t":"mesa:x","ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:dance","d":{"room":"a","ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:subscribe","d":{"room":"a","presence":1,"ref":7}}"#,
                RefusalCode::BadRequest,
            ),
            (
                r#"{"op":0,"t":"mesa:presence","d":{"ref":7}}"#,
                RefusalCode::BadRequest,
            ),
        ];
        for (text, code) in cases {
            let refused = parse(text).unwrap().unwrap_err();
            assert_eq!(
                (refused.refusal.code, refused.reference),
                (code, json!(7)),
                "{text}"
            );
        }
    }

    #[test]
    fn notices_round_trip() {
        let notices = [
            RoomNotice::Subscribed {
                room: "r".into(),
                reference: json!(1),
                position: None,
                recovered: None,
            },
            RoomNotice::Unsubscribed {
                room: "r".into(),
                reference: Value::Null,
            },
            RoomNotice::Refused(Refused {
                room: Some("r".into()),
                reference: json!(3),
                refusal: RoomRefusal::new(RefusalCode::TooManyRooms, "128 rooms at most"),
            }),
            RoomNotice::Refused(Refused {
                room: Some("r".into()),
                reference: json!(4),
                refusal: RoomRefusal::new(RefusalCode::Unavailable, "Redis is unreachable"),
            }),
            RoomNotice::Join {
                room: "r".into(),
                id: "alice".into(),
            },
            RoomNotice::Leave {
                room: "r".into(),
                id: "alice".into(),
            },
            RoomNotice::Members {
                room: "r".into(),
                reference: json!(7),
                members: vec![("alice".into(), 2), ("bob".into(), 1)],
            },
        ];
        for notice in notices {
            let message = Message::decode(notice.encode().as_str(), &limits()).unwrap();
            assert_eq!(RoomNotice::parse(&message), Some(notice));
        }
    }

    #[test]
    fn room_envelopes_round_trip_and_garbage_is_refused() {
        let envelope = RoomEnvelope {
            room: "lobby".into(),
            message: Message::dispatch("CHAT", json!({"x": 1})),
            origin: Some("r1".into()),
            position: None,
        };
        assert_eq!(
            RoomEnvelope::decode(&envelope.encode()),
            Ok(envelope.clone())
        );
        let dispatcher = RoomEnvelope {
            origin: None,
            ..envelope
        };
        assert_eq!(
            RoomEnvelope::decode(&dispatcher.encode()),
            Ok(dispatcher.clone())
        );
        // A recoverable room's, completed by the script that numbered it.
        let numbered = format!("{},\"epoch\":\"e1\",\"offset\":5}}", dispatcher.head());
        let positioned = RoomEnvelope {
            position: Some(Position {
                epoch: "e1".into(),
                offset: 5,
            }),
            ..dispatcher
        };
        assert_eq!(RoomEnvelope::decode(&numbered), Ok(positioned.clone()));
        assert_eq!(RoomEnvelope::decode(&positioned.encode()), Ok(positioned));
        for bad in [
            "",
            "[]",
            r#"{"message":{"op":0}}"#,
            r#"{"room":1,"message":{"op":0}}"#,
            r#"{"room":"r","message":{"op":0},"offset":5}"#,
            r#"{"room":"r","message":{"op":0},"epoch":"e","offset":-1}"#,
        ] {
            assert!(RoomEnvelope::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn notices_have_the_documented_shapes() {
        let join = RoomNotice::Join {
            room: "chat:42".into(),
            id: "alice".into(),
        };
        assert_eq!(
            join.encode().as_str(),
            r#"{"op":0,"d":{"room":"chat:42","id":"alice"},"t":"mesa:join"}"#
        );
        let members = RoomNotice::Members {
            room: "chat:42".into(),
            reference: json!(7),
            members: vec![("alice".into(), 2), ("bob".into(), 1)],
        };
        let d = members.to_message().d;
        assert_eq!(
            d,
            json!({"room":"chat:42","ref":7,"members":{"alice":2,"bob":1}})
        );
    }

    #[test]
    fn a_room_channel_carries_messages_and_presence_changes_unambiguously() {
        let change = PresenceChange {
            room: "chat:42".into(),
            id: "al\"ice".into(),
            joined: false,
        };
        assert_eq!(
            RoomPayload::decode(&change.encode()),
            Ok(RoomPayload::Presence(change.clone()))
        );
        assert_eq!(
            change.notice(),
            RoomNotice::Leave {
                room: "chat:42".into(),
                id: "al\"ice".into(),
            }
        );
        // As Redis's cjson writes it (slashes escaped, keys in any order).
        let scripted = r#"{"join":"a\/b","room":"chat\/1"}"#;
        let joined = PresenceChange {
            room: "chat/1".into(),
            id: "a/b".into(),
            joined: true,
        };
        assert_eq!(
            RoomPayload::decode(scripted),
            Ok(RoomPayload::Presence(joined))
        );
        let envelope = RoomEnvelope {
            room: "lobby".into(),
            message: Message::dispatch("CHAT", json!({"x": 1})),
            origin: None,
            position: None,
        };
        assert_eq!(
            RoomPayload::decode(&envelope.encode()),
            Ok(RoomPayload::Message(envelope))
        );
        for bad in [
            r#"{"room":"r"}"#,
            r#"{"room":"r","join":"a","leave":"b"}"#,
            r#"{"room":"r","join":1}"#,
            r#"{"room":"r","join":"a","message":{"op":0}}"#,
            r#"{"join":"a"}"#,
            "[]",
        ] {
            assert!(RoomPayload::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_room_message_carries_its_room_only_in_the_extended_frame() {
        let message = Message::dispatch("CHAT", json!({"x": 1}));
        let frame = room_frame(&message, "lobby", None);
        assert_eq!(
            frame.as_str(),
            r#"{"op":0,"d":{"x":1},"t":"CHAT","room":"lobby"}"#
        );
        let decoded = decode_room_message(frame.as_str(), &limits()).unwrap();
        assert_eq!(
            (decoded.message, decoded.room.as_deref(), decoded.position),
            (message.clone(), Some("lobby"), None)
        );
        let plain = decode_room_message(message.encode().as_str(), &limits()).unwrap();
        assert_eq!((plain.message, plain.room), (message.clone(), None));
        let at = Position {
            epoch: "e1".into(),
            offset: 3,
        };
        let frame = room_frame(&message, "lobby", Some(&at));
        assert_eq!(
            frame.as_str(),
            r#"{"op":0,"d":{"x":1},"t":"CHAT","room":"lobby","epoch":"e1","offset":3}"#
        );
        let decoded = decode_room_message(frame.as_str(), &limits()).unwrap();
        assert_eq!((decoded.message, decoded.position), (message, Some(at)));
    }
}
