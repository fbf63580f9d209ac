//! The Redis contract shared with upstream replicas, as pure encode/decode: key and
//! channel names, the `ws` envelope, and portal events.

use serde_json::{Map, Value, json};

use crate::hub::Recipients;
use crate::sync::MessageOptions;
use crate::wire::{DecodeError, Message};

/// Key and channel names: `ns(x)` is `x`, or `x_<namespace>` when one is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace(Option<String>);

impl Namespace {
    /// A namespace; an empty string means none, as in upstream (`if (namespace)`).
    pub fn new(namespace: Option<String>) -> Self {
        Namespace(namespace.filter(|ns| !ns.is_empty()))
    }

    /// `ns(prefix)`.
    pub fn key(&self, prefix: &str) -> String {
        match &self.0 {
            Some(ns) => format!("{prefix}_{ns}"),
            None => prefix.to_owned(),
        }
    }

    /// The pub/sub channel every replica delivers from.
    pub fn ws_channel(&self) -> String {
        self.key("ws")
    }

    /// The set of authenticated connected ids.
    pub fn connected_clients(&self) -> String {
        self.key("connected_clients")
    }

    /// The connection counter.
    pub fn connected_clients_count(&self) -> String {
        self.key("connected_clients_count")
    }

    /// The hash of messages waiting for offline ids.
    pub fn undelivered_messages(&self) -> String {
        self.key("undelivered_messages")
    }

    /// The channel carrying client events to portals.
    pub fn portal_channel(&self) -> String {
        self.key("portal")
    }

    /// The set (and channel) of available portal ids.
    pub fn available_portals_pool(&self) -> String {
        self.key("available_portals_pool")
    }
}

/// A message published on `ns("ws")`: every replica delivers it to its local
/// connections among `recipients`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The message, without a sequence number.
    pub message: Message,
    /// Options a Dispatcher attached (`o`), if any.
    pub options: Option<MessageOptions>,
    /// Who receives it.
    pub recipients: Recipients,
}

impl Envelope {
    /// `{"message": {"op","d","t"[,"o"]}, "recipients": [..] | ["*"]}`.
    pub fn encode(&self) -> String {
        let mut message = match self.message.to_value() {
            Value::Object(object) => object,
            _ => Map::new(),
        };
        message.remove("s");
        if let Some(options) = &self.options {
            message.insert("o".into(), Value::Object(options.raw.clone()));
        }
        let recipients = match &self.recipients {
            Recipients::All => vec![Value::from("*")],
            Recipients::Ids(ids) => ids.iter().cloned().map(Value::from).collect(),
        };
        json!({"message": message, "recipients": recipients}).to_string()
    }

    /// Parse an envelope published by any replica or Dispatcher.
    pub fn decode(json: &str) -> Result<Envelope, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        let mut raw = object
            .remove("message")
            .ok_or(DecodeError::BadField("message"))?;
        let options = match raw.as_object_mut().and_then(|m| m.remove("o")) {
            None | Some(Value::Null) => None,
            Some(Value::Object(raw)) => Some(MessageOptions { raw }),
            Some(_) => return Err(DecodeError::BadField("o")),
        };
        let message = Message {
            s: None,
            ..Message::from_value(raw)?
        };
        let recipients = object
            .get("recipients")
            .and_then(Value::as_array)
            .ok_or(DecodeError::BadField("recipients"))?
            .iter()
            .map(|id| id.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .ok_or(DecodeError::BadField("recipients"))?;
        Ok(Envelope {
            message,
            options,
            recipients: Recipients::from_ids(recipients),
        })
    }
}

/// What a portal is told about a client.
#[derive(Debug, Clone, PartialEq)]
pub enum PortalEventKind {
    /// A connection opened.
    Connection,
    /// A connection authenticated.
    Authentication,
    /// A connection sent a message.
    Message(Message),
    /// A connection closed.
    Disconnection,
}

/// One event on `ns("portal")`, addressed to one portal.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalEvent {
    /// What happened.
    pub kind: PortalEventKind,
    /// The client's id, when it had authenticated.
    pub client_id: Option<String>,
    /// The portal chosen to handle it.
    pub portal_id: String,
}

impl PortalEvent {
    /// `{"type", "clientId"?, "message"?, "portalId"}`.
    pub fn encode(&self) -> String {
        let mut object = Map::new();
        let kind = match &self.kind {
            PortalEventKind::Connection => "connection",
            PortalEventKind::Authentication => "authentication",
            PortalEventKind::Message(_) => "message",
            PortalEventKind::Disconnection => "disconnection",
        };
        object.insert("type".into(), kind.into());
        if let PortalEventKind::Message(message) = &self.kind {
            object.insert("message".into(), message.to_value());
        }
        if let Some(id) = &self.client_id {
            object.insert("clientId".into(), id.clone().into());
        }
        object.insert("portalId".into(), self.portal_id.clone().into());
        Value::Object(object).to_string()
    }

    /// Parse a portal event from any server.
    pub fn decode(json: &str) -> Result<PortalEvent, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let Value::Object(mut object) = value else {
            return Err(DecodeError::NotObject);
        };
        let kind = match object.get("type").and_then(Value::as_str) {
            Some("connection") => PortalEventKind::Connection,
            Some("authentication") => PortalEventKind::Authentication,
            Some("disconnection") => PortalEventKind::Disconnection,
            Some("message") => PortalEventKind::Message(Message::from_value(
                object
                    .remove("message")
                    .ok_or(DecodeError::BadField("message"))?,
            )?),
            _ => return Err(DecodeError::BadField("type")),
        };
        let text = |object: &Map<String, Value>, key| {
            object.get(key).and_then(Value::as_str).map(str::to_owned)
        };
        Ok(PortalEvent {
            kind,
            client_id: text(&object, "clientId"),
            portal_id: text(&object, "portalId").ok_or(DecodeError::BadField("portalId"))?,
        })
    }
}

/// A portal joining or leaving the pool (`{"id", "ready"}` on `ns("available_portals_pool")`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalUpdate {
    /// The portal's id.
    pub id: String,
    /// True when it joins, false when it leaves.
    pub ready: bool,
}

impl PortalUpdate {
    /// `{"id": .., "ready": ..}`.
    pub fn encode(&self) -> String {
        json!({"id": self.id, "ready": self.ready}).to_string()
    }

    /// Parse a pool update.
    pub fn decode(json: &str) -> Result<PortalUpdate, DecodeError> {
        let value: Value = serde_json::from_str(json).map_err(|_| DecodeError::NotJson)?;
        let id = value
            .get("id")
            .and_then(Value::as_str)
            .ok_or(DecodeError::BadField("id"))?;
        let ready = value.get("ready").and_then(Value::as_bool).unwrap_or(false);
        Ok(PortalUpdate {
            id: id.to_owned(),
            ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_upstream_naming() {
        assert_eq!(Namespace::default().ws_channel(), "ws");
        let ns = Namespace::new(Some("prod".into()));
        assert_eq!(ns.undelivered_messages(), "undelivered_messages_prod");
        assert_eq!(
            Namespace::new(Some(String::new())).portal_channel(),
            "portal"
        );
    }

    #[test]
    fn envelope_matches_upstream_bytes_and_round_trips() {
        let envelope = Envelope {
            message: Message::dispatch("CHAT", json!({"a": 1})),
            options: None,
            recipients: Recipients::All,
        };
        assert_eq!(
            envelope.encode(),
            r#"{"message":{"op":0,"d":{"a":1},"t":"CHAT"},"recipients":["*"]}"#
        );
        assert_eq!(Envelope::decode(&envelope.encode()).unwrap(), envelope);
        let from_dispatcher =
            r#"{"message":{"op":0,"d":{},"t":"X","o":{"sync":false}},"recipients":["a","b"]}"#;
        let decoded = Envelope::decode(from_dispatcher).unwrap();
        assert!(!decoded.options.as_ref().unwrap().allows_sync());
        assert_eq!(
            decoded.recipients,
            Recipients::Ids(vec!["a".into(), "b".into()])
        );
        assert_eq!(decoded.encode(), from_dispatcher);
    }

    #[test]
    fn portal_events_round_trip() {
        let event = PortalEvent {
            kind: PortalEventKind::Message(Message::dispatch("HI", json!({}))),
            client_id: Some("alice".into()),
            portal_id: "p1".into(),
        };
        assert_eq!(
            event.encode(),
            r#"{"type":"message","message":{"op":0,"d":{},"t":"HI"},"clientId":"alice","portalId":"p1"}"#
        );
        assert_eq!(PortalEvent::decode(&event.encode()).unwrap(), event);
        let update = PortalUpdate {
            id: "p1".into(),
            ready: true,
        };
        assert_eq!(PortalUpdate::decode(&update.encode()).unwrap(), update);
    }
}
