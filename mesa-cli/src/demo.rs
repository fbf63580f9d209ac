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
//! | room | `ONLINE` | `{"room", "replica", "ids", "ttl"}` | who is in the room on one replica |
//!
//! Who is online per room is kept by each replica from the `JOIN`s, `LEAVE`s and
//! disconnections it sees, and published to the room (so to every replica's members)
//! on every change and every [`REFRESH`]; a page shows the union of the replicas' lists
//! and drops one not refreshed within its `ttl`. Best effort: cluster-wide room
//! presence in Redis is future work. `JOIN` is taken at its word, as nicknames are.
//!
//! Room messages are not stored for offline members (rooms have no sync). So with
//! `--redis --sync`, a `CHAT` is also sent by id to the room's members that joined here
//! and are not connected here, so that the offline ones get it stored and redelivered
//! when they come back; the page drops the copies it already has.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use mesa_tokio::{Close, ConnId, Connection, Handler, Message, Recipients, ServerHandle};
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
/// How often each replica publishes who is in its rooms, for pages that joined after
/// its last change (on other replicas, they never saw it).
const REFRESH: Duration = Duration::from_secs(3);
/// How long a page keeps a replica's list without a refresh.
const TTL: Duration = Duration::from_secs(10);

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
    /// Whether messages are stored for offline members (`--sync`).
    sync: bool,
    /// Who is in which room, shared with the refresher.
    rooms: Arc<Mutex<Rooms>>,
    /// The task publishing presence every [`REFRESH`], started with the first
    /// authenticated connection (the first moment a server handle is at hand).
    refresher: OnceLock<()>,
}

/// The rooms as this replica sees them.
struct Rooms {
    /// This replica's name in `ONLINE`, so that pages keep one list per replica.
    replica: String,
    /// Per room, the connections here in it and their ids.
    present: HashMap<String, HashMap<ConnId, String>>,
    /// Per room, the ids that joined here and did not leave, oldest first.
    members: HashMap<String, VecDeque<String>>,
}

impl Rooms {
    /// `ONLINE` for `room`: the sorted, distinct ids in it here.
    fn online(&self, room: &str) -> Message {
        let mut ids: Vec<&String> = self
            .present
            .get(room)
            .into_iter()
            .flat_map(HashMap::values)
            .collect();
        ids.sort();
        ids.dedup();
        let ttl = u64::try_from(TTL.as_millis()).unwrap_or(u64::MAX);
        Message::dispatch(
            "ONLINE",
            json!({ "room": room, "replica": self.replica, "ids": ids, "ttl": ttl }),
        )
    }

    fn join(&mut self, room: &str, conn: ConnId, id: &str) {
        self.present
            .entry(room.to_owned())
            .or_default()
            .insert(conn, id.to_owned());
        if self.members.len() >= MAX_ROOMS && !self.members.contains_key(room) {
            return;
        }
        let members = self.members.entry(room.to_owned()).or_default();
        members.retain(|m| m != id);
        if members.len() >= MAX_MEMBERS {
            members.pop_front();
        }
        members.push_back(id.to_owned());
    }

    /// Take `conn` out of `room`; with `forget`, its id stops being a member too.
    fn leave(&mut self, room: &str, conn: ConnId, forget: bool) -> Option<String> {
        let present = self.present.get_mut(room)?;
        let id = present.remove(&conn)?;
        if present.is_empty() {
            self.present.remove(room);
        }
        if let Some(members) = self.members.get_mut(room).filter(|_| forget) {
            members.retain(|m| *m != id);
            if members.is_empty() {
                self.members.remove(room);
            }
        }
        Some(id)
    }

    /// The rooms `conn` is in.
    fn rooms_of(&self, conn: ConnId) -> Vec<String> {
        self.present
            .iter()
            .filter(|(_, conns)| conns.contains_key(&conn))
            .map(|(room, _)| room.clone())
            .collect()
    }
}

impl DemoChat {
    /// A chat; with `sync`, chat messages are also addressed to the offline members so
    /// that they get them later.
    pub(crate) fn new(sync: bool) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        DemoChat {
            sync,
            rooms: Arc::new(Mutex::new(Rooms {
                replica: format!("{}-{nanos:x}", std::process::id()),
                present: HashMap::new(),
                members: HashMap::new(),
            })),
            refresher: OnceLock::new(),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Rooms> {
        lock(&self.rooms)
    }

    /// Publish who is in `room` here to the room.
    fn announce(&self, server: &ServerHandle, room: &str) {
        let online = self.rooms().online(room);
        if let Err(error) = server.publish(room, &online) {
            tracing::debug!(%error, room, "presence not published");
        }
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
        let elsewhere: Vec<String> = self
            .rooms()
            .members
            .get(room)
            .into_iter()
            .flatten()
            .filter(|id| !server.is_online(id))
            .cloned()
            .collect();
        if elsewhere.is_empty() {
            return;
        }
        // Refused only when --max-recipients is below the room's size.
        if let Err(error) = server.send(chat, &Recipients::from_ids(elsewhere)) {
            tracing::warn!(%error, "a chat message was not stored for offline members");
        }
    }

    /// Start publishing every room's presence every [`REFRESH`], once.
    fn start_refresher(&self, server: ServerHandle) {
        self.refresher.get_or_init(|| {
            let rooms = Arc::clone(&self.rooms);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(REFRESH);
                loop {
                    ticks.tick().await;
                    let announcements: Vec<(String, Message)> = {
                        let rooms = lock(&rooms);
                        rooms
                            .present
                            .keys()
                            .map(|room| (room.clone(), rooms.online(room)))
                            .collect()
                    };
                    for (room, online) in announcements {
                        let _ = server.publish(&room, &online);
                    }
                }
            });
        });
    }
}

/// Lock `rooms`; a panic elsewhere leaves them usable.
fn lock(rooms: &Mutex<Rooms>) -> std::sync::MutexGuard<'_, Rooms> {
    rooms.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Handler for DemoChat {
    async fn on_authenticated(&self, conn: &Connection) {
        self.start_refresher(conn.server());
    }

    async fn on_message(&self, conn: &Connection, message: Message) {
        // Authentication is required: nothing is said anonymously.
        let Some(from) = conn.id() else { return };
        let Some(room) = message.d.get("room").and_then(Value::as_str) else {
            return;
        };
        let server = conn.server();
        match message.t.as_deref() {
            Some("JOIN") => {
                self.rooms().join(room, conn.conn_id(), &from);
                self.announce(&server, room);
            }
            Some("LEAVE") => {
                let was_in = self.rooms().leave(room, conn.conn_id(), true).is_some();
                if was_in {
                    self.announce(&server, room);
                }
            }
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

    async fn on_disconnect(&self, conn: &Connection, _close: &Close) {
        let server = conn.server();
        let left: Vec<String> = {
            let mut rooms = self.rooms();
            let joined = rooms.rooms_of(conn.conn_id());
            for room in &joined {
                rooms.leave(room, conn.conn_id(), false);
            }
            joined
        };
        for room in left {
            self.announce(&server, &room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms() -> Rooms {
        Rooms {
            replica: "r".to_owned(),
            present: HashMap::new(),
            members: HashMap::new(),
        }
    }

    #[test]
    fn presence_counts_an_id_once_and_a_disconnection_keeps_it_a_member() {
        let mut rooms = rooms();
        rooms.join("general", ConnId(1), "alice");
        rooms.join("general", ConnId(2), "alice");
        rooms.join("general", ConnId(3), "bob");
        rooms.join("rust", ConnId(3), "bob");
        assert_eq!(rooms.online("general").d["ids"], json!(["alice", "bob"]));
        assert_eq!(rooms.rooms_of(ConnId(3)).len(), 2);

        // Disconnected: out of the room, still a recipient of what is stored.
        assert_eq!(
            rooms.leave("rust", ConnId(3), false).as_deref(),
            Some("bob")
        );
        assert!(!rooms.present.contains_key("rust"));
        assert_eq!(rooms.members["rust"], ["bob"]);
        // Left: neither.
        assert_eq!(
            rooms.leave("general", ConnId(3), true).as_deref(),
            Some("bob")
        );
        assert_eq!(rooms.online("general").d["ids"], json!(["alice"]));
        assert_eq!(rooms.members["general"], ["alice"]);
        assert_eq!(rooms.leave("general", ConnId(3), true), None);
    }
}
