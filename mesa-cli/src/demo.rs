//! `mesa serve --demo`: a chat room in the browser. The page and its client (our own
//! Mesa client module, `mesa-cli/demo/mesa-client.js`) are compiled into the binary.
//!
//! The room's protocol, on top of Mesa dispatches (op 0):
//!
//! | from | `t` | `d` | what |
//! |---|---|---|---|
//! | client | `CHAT` | `{"text"}` | say something |
//! | client | `TYPING` | `{"typing": bool}` | started or stopped typing |
//! | client | `WHO` | `{}` | ask who is online |
//! | server | `CHAT` | `{"from", "text", "at"}` | someone said something (`at`: ms since the epoch) |
//! | server | `TYPING` | `{"from", "typing"}` | to everyone else online, with `sync: false` |
//! | server | `ONLINE` | `{"ids": [...]}` | who is online here, after every change and in answer to `WHO` |
//!
//! With `--redis --sync`, `CHAT` goes to every nickname seen so far (not to
//! everyone), so that those offline get it stored and redelivered when they come
//! back; `TYPING` goes with `sync: false`, so it is never stored.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use mesa_tokio::MessageOptions;
use mesa_tokio::{Close, Connection, Handler, Message, Recipients, ServerHandle};
use serde_json::{Value, json};

/// The page, with `{{MESA_PATH}}` standing for the WebSocket endpoint's path.
const INDEX: &str = include_str!("../demo/index.html");
/// The page's logic.
const CHAT_JS: &str = include_str!("../demo/chat.js");
/// The Mesa client module the page uses.
const CLIENT_JS: &str = include_str!("../demo/mesa-client.js");

/// Nicknames remembered as recipients of the room's messages, at most.
const MAX_MEMBERS: usize = 1000;
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

/// The chat room's behaviour.
pub(crate) struct DemoChat {
    /// Whether messages are stored for offline members (`--sync`).
    sync: bool,
    /// Nicknames seen, oldest first.
    members: Mutex<VecDeque<String>>,
}

impl DemoChat {
    /// A room; with `sync`, chat messages are addressed to every member so that the
    /// offline ones get them later.
    pub(crate) fn new(sync: bool) -> Self {
        DemoChat {
            sync,
            members: Mutex::new(VecDeque::new()),
        }
    }

    fn remember(&self, id: &str) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(position) = members.iter().position(|m| m == id) {
            members.remove(position);
        }
        if members.len() >= MAX_MEMBERS {
            members.pop_front();
        }
        members.push_back(id.to_owned());
    }

    fn members(&self) -> Vec<String> {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.iter().cloned().collect()
    }
}

/// `ONLINE` with the sorted, distinct ids online here.
fn online(server: &ServerHandle) -> Message {
    let mut ids = server.online_ids();
    ids.sort();
    ids.dedup();
    Message::dispatch("ONLINE", json!({ "ids": ids }))
}

/// Tell everyone who is online; worthless later, so never stored.
fn announce_online(server: &ServerHandle) {
    // A global send is never refused for its number of recipients.
    let _ = server.send_with(
        &online(server),
        &MessageOptions::no_sync(),
        &Recipients::All,
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Handler for DemoChat {
    async fn on_authenticated(&self, conn: &Connection) {
        if let Some(id) = conn.id() {
            self.remember(&id);
        }
        announce_online(&conn.server());
    }

    async fn on_message(&self, conn: &Connection, message: Message) {
        // Authentication is required: nothing is said anonymously.
        let Some(from) = conn.id() else { return };
        let server = conn.server();
        match message.t.as_deref() {
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
                    json!({ "from": from, "text": text, "at": now_ms() }),
                );
                let room = if self.sync {
                    Recipients::from_ids(self.members())
                } else {
                    Recipients::All
                };
                // Refused only when --max-recipients is below the room's size.
                if let Err(error) = server.send(&chat, &room) {
                    tracing::warn!(%error, "a chat message was not sent");
                }
            }
            Some("TYPING") => {
                let typing = message.d.get("typing").and_then(Value::as_bool) == Some(true);
                let others: Vec<String> = server
                    .online_ids()
                    .into_iter()
                    .filter(|id| *id != from)
                    .collect();
                if !others.is_empty() {
                    let note =
                        Message::dispatch("TYPING", json!({ "from": from, "typing": typing }));
                    // Past --max-recipients a typing note is not worth a warning.
                    let _ = server.send_with(
                        &note,
                        &MessageOptions::no_sync(),
                        &Recipients::from_ids(others),
                    );
                }
            }
            Some("WHO") => {
                let _ = conn.send(&online(&server));
            }
            _ => {}
        }
    }

    async fn on_disconnect(&self, conn: &Connection, _close: &Close) {
        announce_online(&conn.server());
    }
}
