//! The hello (op 10): the client settings the server announces on every connection.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::wire::{Message, Opcode};

/// A rule announced in the hello's `rules` array.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `enforce_equal_versions`: the client must send `CLIENT_VERSION`.
    EnforceEqualVersions,
    /// `store_messages`: the peers keep message history.
    StoreMessages,
    /// `sends_user_object`: op 22 carries the user object.
    SendsUserObject,
    /// `rooms` (ours): clients may opt in to rooms (see `docs/protocol.md`).
    Rooms,
    /// A rule this version does not know.
    Other(String),
}

impl Rule {
    /// The rule's name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Rule::EnforceEqualVersions => "enforce_equal_versions",
            Rule::StoreMessages => "store_messages",
            Rule::SendsUserObject => "sends_user_object",
            Rule::Rooms => crate::rooms::ROOMS_RULE,
            Rule::Other(name) => name,
        }
    }

    fn parse(name: &str) -> Rule {
        match name {
            "enforce_equal_versions" => Rule::EnforceEqualVersions,
            "store_messages" => Rule::StoreMessages,
            "sends_user_object" => Rule::SendsUserObject,
            crate::rooms::ROOMS_RULE => Rule::Rooms,
            other => Rule::Other(other.to_owned()),
        }
    }
}

/// The hello's data. Each setting is present only when the feature is on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// `c_heartbeat_interval`: time between server heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// `c_reconnect_interval`: the reconnect interval the server suggests.
    pub reconnect_interval: Option<Duration>,
    /// `c_authentication_timeout`: time the client has to authenticate.
    pub authentication_timeout: Option<Duration>,
    /// `rules`, in upstream's order.
    pub rules: Vec<Rule>,
}

impl Hello {
    /// Whether the hello announces `rule`.
    pub fn has_rule(&self, rule: &Rule) -> bool {
        self.rules.contains(rule)
    }

    /// The op 10 message, with upstream's key order. `rules` is always present
    /// (upstream's clients call `rules.indexOf` unconditionally).
    pub fn to_message(&self) -> Message {
        let mut d = Map::new();
        let millis = |d: Duration| Value::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(interval) = self.heartbeat_interval {
            d.insert("c_heartbeat_interval".into(), millis(interval));
        }
        if let Some(interval) = self.reconnect_interval {
            d.insert("c_reconnect_interval".into(), millis(interval));
        }
        if let Some(timeout) = self.authentication_timeout {
            d.insert("c_authentication_timeout".into(), millis(timeout));
        }
        let rules = self
            .rules
            .iter()
            .map(|r| Value::String(r.as_str().to_owned()))
            .collect();
        d.insert("rules".into(), Value::Array(rules));
        Message::new(Opcode::Hello, Value::Object(d))
    }

    /// Read a hello's data leniently: a setting of the wrong type counts as absent,
    /// as it does in upstream's client.
    pub fn from_data(d: &Value) -> Hello {
        let millis = |key: &str| {
            d.get(key)
                .and_then(Value::as_u64)
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
        };
        let rules = d
            .get("rules")
            .and_then(Value::as_array)
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(Value::as_str)
                    .map(Rule::parse)
                    .collect()
            })
            .unwrap_or_default();
        Hello {
            heartbeat_interval: millis("c_heartbeat_interval"),
            reconnect_interval: millis("c_reconnect_interval"),
            authentication_timeout: millis("c_authentication_timeout"),
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_upstream_bytes() {
        let hello = Hello {
            heartbeat_interval: Some(Duration::from_secs(10)),
            reconnect_interval: Some(Duration::from_secs(5)),
            authentication_timeout: Some(Duration::from_secs(10)),
            rules: vec![Rule::EnforceEqualVersions, Rule::SendsUserObject],
        };
        assert_eq!(
            hello.to_message().encode().as_str(),
            r#"{"op":10,"d":{"c_heartbeat_interval":10000,"c_reconnect_interval":5000,"c_authentication_timeout":10000,"rules":["enforce_equal_versions","sends_user_object"]}}"#
        );
        assert_eq!(Hello::from_data(&hello.to_message().d), hello);
    }
}
