//! The relay behaviour shared by every example, the `mesa` binary and the tests:
//! `ECHO` goes back to its sender, `BROADCAST` goes to everyone or to `d.to` minus
//! `d.except`, and a `BROADCAST` addressing too many ids closes its sender. Also the
//! development authentication the examples use.

use serde_json::{Value, json};

use crate::close::{Close, CloseCode};
use crate::hub::Recipients;
use crate::session::ServerSession;
use crate::wire::{Message, Opcode};

/// What the relay does with a client's message.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum RelayAction {
    /// Send the message back, unchanged, to the connection that sent it.
    Reply(Message),
    /// Send the message, unchanged, to these recipients.
    Send {
        /// The message to send.
        message: Message,
        /// Everyone, or `d.to` minus `d.except`.
        recipients: Recipients,
    },
    /// Send nothing and close the sender's connection with this close: its
    /// `BROADCAST` addressed more ids than allowed (1008 `too many recipients: N > max`).
    Refuse(Close),
}

impl RelayAction {
    /// Carry out the sender's part on its session: a reply is queued to it, a
    /// refusal closes it. A send is handed back, for the hub (or the replica) to
    /// route to its recipients.
    pub fn answer(self, sender: &mut ServerSession) -> Option<(Message, Recipients)> {
        match self {
            RelayAction::Reply(message) => {
                let _ = sender.send(message.encode());
                None
            }
            RelayAction::Refuse(close) => {
                let _ = sender.disconnect(close);
                None
            }
            RelayAction::Send {
                message,
                recipients,
            } => Some((message, recipients)),
        }
    }
}

/// Decide what the relay does with `message`; `None` for anything but an
/// `ECHO` or `BROADCAST` dispatch. A `BROADCAST` whose `d.to` minus `d.except` holds
/// more than `max_recipients` distinct ids ([`Limits::max_recipients`]) is refused:
/// a peer that asks for that much work loses its connection, as for the message rate.
///
/// [`Limits::max_recipients`]: crate::Limits::max_recipients
pub fn relay(message: Message, max_recipients: usize) -> Option<RelayAction> {
    if message.op != Opcode::Dispatch {
        return None;
    }
    // Taken by value: an echo goes back as it came, with no copy of its data.
    match message.t.as_deref()? {
        "ECHO" => Some(RelayAction::Reply(message)),
        "BROADCAST" => {
            let ids = |key: &str| -> Option<Vec<String>> {
                let list = message.d.get(key)?.as_array()?;
                Some(
                    list.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                )
            };
            let recipients = match ids("to") {
                Some(to) => Recipients::from_ids(to).excluding(&ids("except").unwrap_or_default()),
                None => Recipients::All,
            };
            Some(match recipients.at_most(max_recipients) {
                Ok(()) => RelayAction::Send {
                    message,
                    recipients,
                },
                Err(refused) => {
                    RelayAction::Refuse(Close::new(CloseCode::POLICY, refused.to_string()))
                }
            })
        }
        _ => None,
    }
}

/// Development authentication, **for demos and tests only**: any non-empty string
/// `token` is accepted as the id, with the user object `{"id": token}`. It proves
/// nothing about who the client is.
pub fn dev_authenticate(credentials: &Value) -> Result<(String, Value), &'static str> {
    match credentials.get("token").and_then(Value::as_str) {
        Some(token) if !token.is_empty() => Ok((token.to_owned(), json!({ "id": token }))),
        _ => Err("a non-empty string `token` is required"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_and_broadcast() {
        let echo = Message::dispatch("ECHO", json!({"n": 1}));
        assert_eq!(relay(echo.clone(), 2), Some(RelayAction::Reply(echo)));

        let all = Message::dispatch("BROADCAST", json!({"text": "hi"}));
        assert!(matches!(
            relay(all, 2),
            Some(RelayAction::Send {
                recipients: Recipients::All,
                ..
            })
        ));

        let some = Message::dispatch("BROADCAST", json!({"to": ["a", "b"], "except": ["b"]}));
        let Some(RelayAction::Send { recipients, .. }) = relay(some, 2) else {
            panic!()
        };
        assert_eq!(recipients, Recipients::Ids(vec!["a".into()]));

        assert_eq!(relay(Message::dispatch("OTHER", json!({})), 2), None);
        assert_eq!(relay(Message::new(Opcode::Other(7), json!({})), 2), None);
    }

    #[test]
    fn a_broadcast_to_too_many_ids_is_refused_with_1008() {
        let to = |to: Value| Message::dispatch("BROADCAST", json!({"to": to, "except": ["c"]}));
        // Three distinct ids after `except`, a repeat counting once: within a limit of 3.
        let three = to(json!(["a", "b", "c", "d", "a"]));
        assert!(matches!(
            relay(three.clone(), 3),
            Some(RelayAction::Send { .. })
        ));
        assert_eq!(
            relay(three, 2),
            Some(RelayAction::Refuse(Close::new(
                CloseCode::POLICY,
                "too many recipients: 3 > 2"
            )))
        );
        // `*` is everyone, never refused.
        assert!(matches!(
            relay(to(json!(["a", "b", "*"])), 1),
            Some(RelayAction::Send {
                recipients: Recipients::All,
                ..
            })
        ));
    }

    #[test]
    fn dev_auth_accepts_any_non_empty_token() {
        assert_eq!(
            dev_authenticate(&json!({"token": "alice", "shouldSync": true})),
            Ok(("alice".into(), json!({"id": "alice"})))
        );
        assert!(dev_authenticate(&json!({"token": ""})).is_err());
        assert!(dev_authenticate(&json!({"token": 5})).is_err());
        assert!(dev_authenticate(&json!("alice")).is_err());
    }
}
