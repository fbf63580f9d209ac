//! `mesa serve --demo`: a multi-room chat in the browser. The page and its client (the
//! browser client package `clients/js`, linked as `mesa-cli/demo/mesa-client.js`) are
//! compiled into the binary. The demo turns rooms on (`--rooms authenticated` unless
//! given): the page subscribes to the rooms it joins with the client's `subscribe`.
//!
//! The chat's protocol, on top of Mesa dispatches (op 0):
//!
//! | from | `t` | `d` | what |
//! |---|---|---|---|
//! | client | `JOIN` | `{"room"}` | subscribed to a room (again after every reconnection) |
//! | client | `LEAVE` | `{"room"}` | about to unsubscribe from a room |
//! | client | `CHAT` | `{"room", "text"}` | say something in a room |
//! | client | `TYPING` | `{"room", "typing": bool}` | started or stopped typing |
//! | room | `CHAT` | `{"room", "from", "text", "at"}` | someone said something (`at`: ms since the epoch) |
//! | room | `TYPING` | `{"room", "from", "typing"}` | someone typing, or not any more |
//!
//! Who is online per room is Mesa's room presence (docs/protocol.md): the page
//! subscribes with `presence`, asks `mesa:presence` after each subscription and follows
//! `mesa:join` and `mesa:leave`; the server adds nothing to it.
//!
//! Room messages are not stored for offline members (rooms have no sync), and presence
//! forgets an id once its last connection is gone. So with `--redis --sync`, the
//! server remembers the ids that `JOIN`ed a room here and did not `LEAVE` it, and a
//! `CHAT` is also sent by id to those not connected here, so that the offline ones get
//! it stored and redelivered when they come back; the page drops the copies it already
//! has. `JOIN` is taken at its word, as nicknames are.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use mesa_tokio::{Connection, Handler, Message, Recipients, ServerHandle};
use serde_json::{Value, json};

/// The page, with `{{MESA_PATH}}` standing for the WebSocket endpoint's path.
const INDEX: &str = include_str!("../demo/index.html");
/// The page's logic.
const CHAT_JS: &str = include_str!("../demo/chat.js");
/// The Mesa client module the page uses (`clients/js/index.js`).
const CLIENT_JS: &str = include_str!("../demo/mesa-client.js");

/// Nicknames remembered per room as recipients of its stored messages, at most.
const MAX_MEMBERS: usize = 1000;
/// Rooms whose members are remembered, at most; past it, a new room's messages are
/// not stored for its offline members.
const MAX_ROOMS: usize = 256;
/// Characters of a chat message kept, at most.
const MAX_TEXT: usize = 2000;

/// The paths of the demo's own routes.
pub(crate) const PAGES: [&str; 3] = ["/", "/chat.js", "/mesa-client.js"];

/// The demo's routes, for an app whose state is `S`: `/` and its two scripts.
pub(crate) fn pages<S: Clone + Send + Sync + 'static>(path: &str) -> Router<S> {
    let index = INDEX.replace("{{MESA_PATH}}", path);
    let javascript = |body: &'static str| {
        get(move || async move {
            (
                [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                body,
            )
        })
    };
    Router::new()
        .route(
            "/",
            get(move || async move {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], index).into_response()
            }),
        )
        .route("/chat.js", javascript(CHAT_JS))
        .route("/mesa-client.js", javascript(CLIENT_JS))
}

/// The chat's behaviour.
pub(crate) struct DemoChat {
    /// Whether messages are stored for offline members (`--sync`); without it, `JOIN`
    /// and `LEAVE` change nothing.
    sync: bool,
    /// The rooms' members as this replica heard of them.
    members: Mutex<Members>,
}

/// Per room, the ids that joined it here and did not leave, oldest first: the
/// recipients of its stored messages.
#[derive(Default)]
struct Members(HashMap<String, VecDeque<String>>);

impl Members {
    /// Remember `id` in `room`, as its newest member.
    fn join(&mut self, room: &str, id: &str) {
        if self.0.len() >= MAX_ROOMS && !self.0.contains_key(room) {
            return;
        }
        let members = self.0.entry(room.to_owned()).or_default();
        members.retain(|m| m != id);
        if members.len() >= MAX_MEMBERS {
            members.pop_front();
        }
        members.push_back(id.to_owned());
    }

    /// Forget `id` in `room`.
    fn leave(&mut self, room: &str, id: &str) {
        if let Some(members) = self.0.get_mut(room) {
            members.retain(|m| m != id);
            if members.is_empty() {
                self.0.remove(room);
            }
        }
    }

    /// The members of `room` for whom `offline` holds.
    fn offline(&self, room: &str, offline: impl Fn(&str) -> bool) -> Vec<String> {
        self.0
            .get(room)
            .into_iter()
            .flatten()
            .filter(|id| offline(id))
            .cloned()
            .collect()
    }
}

impl DemoChat {
    /// A chat; with `sync`, chat messages are also addressed to the offline members so
    /// that they get them later.
    pub(crate) fn new(sync: bool) -> Self {
        DemoChat {
            sync,
            members: Mutex::new(Members::default()),
        }
    }

    /// The members; a panic elsewhere leaves them usable.
    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish `chat` to `room`, and with sync send it to the room's members not
    /// connected here, so that the offline ones get it stored.
    fn say(&self, server: &ServerHandle, room: &str, chat: &Message) {
        if let Err(error) = server.publish(room, chat) {
            tracing::debug!(%error, room, "a chat message was not published");
            return;
        }
        if !self.sync {
            return;
        }
        let elsewhere = self.members().offline(room, |id| !server.is_online(id));
        if elsewhere.is_empty() {
            return;
        }
        // Refused only when --max-recipients is below the room's size.
        if let Err(error) = server.send(chat, &Recipients::from_ids(elsewhere)) {
            tracing::warn!(%error, "a chat message was not stored for offline members");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Handler for DemoChat {
    async fn on_message(&self, conn: &Connection, message: Message) {
        // Authentication is required: nothing is said anonymously.
        let Some(from) = conn.id() else { return };
        let Some(room) = message.d.get("room").and_then(Value::as_str) else {
            return;
        };
        let server = conn.server();
        match message.t.as_deref() {
            Some("JOIN") if self.sync => self.members().join(room, &from),
            Some("LEAVE") if self.sync => self.members().leave(room, &from),
            Some("CHAT") => {
                let Some(text) = message.d.get("text").and_then(Value::as_str) else {
                    return;
                };
                let text: String = text.trim().chars().take(MAX_TEXT).collect();
                if text.is_empty() {
                    return;
                }
                let chat = Message::dispatch(
                    "CHAT",
                    json!({ "room": room, "from": from, "text": text, "at": now_ms() }),
                );
                self.say(&server, room, &chat);
            }
            Some("TYPING") => {
                let typing = message.d.get("typing").and_then(Value::as_bool) == Some(true);
                let note = Message::dispatch(
                    "TYPING",
                    json!({ "room": room, "from": from, "typing": typing }),
                );
                let _ = server.publish(room, &note);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_kept_once_newest_last_until_it_leaves() {
        let mut members = Members::default();
        members.join("general", "alice");
        members.join("general", "bob");
        members.join("general", "alice");
        members.join("rust", "bob");
        assert_eq!(members.offline("general", |_| true), ["bob", "alice"]);
        assert_eq!(members.offline("general", |id| id != "bob"), ["alice"]);

        members.leave("rust", "bob");
        assert!(!members.0.contains_key("rust"));
        members.leave("general", "bob");
        members.leave("general", "carol");
        assert_eq!(members.offline("general", |_| true), ["alice"]);
        assert!(members.offline("lounge", |_| true).is_empty());
    }
}
