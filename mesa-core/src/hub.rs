//! Server-wide routing decisions: which local connections a send reaches.
//!
//! One id may hold several connections (tabs, devices); a send to an id reaches all
//! of them. The hub only decides; the adapter executes the returned [`Delivery`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::close::{Close, CloseCode};
use crate::wire::{Frame, Message, Opcode};

/// A connection's handle inside one server process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Who a send is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// Every connection (upstream's global send, or `["*"]`).
    All,
    /// The connections authenticated as these ids.
    Ids(Vec<String>),
}

impl Recipients {
    /// Read upstream's recipient list: any `"*"` makes it global.
    pub fn from_ids(ids: Vec<String>) -> Self {
        if ids.iter().any(|id| id == "*") {
            Recipients::All
        } else {
            Recipients::Ids(ids)
        }
    }

    /// Remove `excluding` from an explicit list; a global send is left whole, as upstream.
    pub fn excluding(self, excluding: &[String]) -> Self {
        if excluding.is_empty() {
            return self;
        }
        // A set: both lists may hold many thousands of ids.
        let excluding: HashSet<&String> = excluding.iter().collect();
        match self {
            Recipients::Ids(ids) => Recipients::Ids(
                ids.into_iter()
                    .filter(|id| !excluding.contains(id))
                    .collect(),
            ),
            Recipients::All => Recipients::All,
        }
    }
}

/// What a delivery does to each target connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this frame (encoded once, shared by every target).
    Write(Frame),
    /// Close the connection: op 5 `DISCONNECT_CLIENT` closes with 1000.
    Close(Close),
    /// Nothing: an internal event (op 5) this version does not know is never
    /// forwarded to a client.
    Ignore,
}

impl Action {
    /// Decide what `message` does to a recipient connection.
    pub fn for_message(message: &Message) -> Action {
        match (message.op, message.t.as_deref()) {
            (Opcode::Internal, Some("DISCONNECT_CLIENT")) => {
                Action::Close(Close::new(CloseCode::NORMAL, "disconnected by the server"))
            }
            (Opcode::Internal, _) => Action::Ignore,
            _ => Action::Write(message.encode()),
        }
    }
}

/// A routing decision: apply `action` to each of `targets`.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Delivery {
    /// What to do to every target.
    pub action: Action,
    /// The local connections to write it to, in connection order, without repeats.
    pub targets: Vec<ConnId>,
    /// Explicit recipient ids with no connection here (candidates for the cluster and sync).
    pub absent: Vec<String>,
}

/// How a departure changed an id's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    /// The id the connection was authenticated as.
    pub id: String,
    /// True when it was the id's last connection here.
    pub last: bool,
}

/// The registry of local connections and the ids they authenticated as.
#[derive(Debug, Default)]
pub struct Hub {
    next: u64,
    auth_required: bool,
    connections: BTreeMap<ConnId, Option<String>>,
    by_id: HashMap<String, BTreeSet<ConnId>>,
}

impl Hub {
    /// An empty hub; with `auth_required`, global sends skip unauthenticated connections.
    pub fn new(auth_required: bool) -> Self {
        Hub {
            auth_required,
            ..Hub::default()
        }
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Whether `id` has at least one connection here.
    pub fn is_online(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// The ids with at least one connection here.
    pub fn online_ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(String::as_str)
    }

    /// The id a connection authenticated as.
    pub fn id_of(&self, conn: ConnId) -> Option<&str> {
        self.connections.get(&conn)?.as_deref()
    }

    /// Register a new connection.
    pub fn connect(&mut self) -> ConnId {
        let conn = ConnId(self.next);
        self.next += 1;
        self.connections.insert(conn, None);
        conn
    }

    /// Record that `conn` authenticated as `id` (a re-authentication may change it).
    /// Returns the departure from a previous id, if the id changed.
    pub fn authenticate(&mut self, conn: ConnId, id: &str) -> Option<Departure> {
        let slot = self.connections.get_mut(&conn)?;
        if slot.as_deref() == Some(id) {
            return None;
        }
        let previous = slot.replace(id.to_owned());
        self.by_id.entry(id.to_owned()).or_default().insert(conn);
        previous.map(|previous| self.forget(conn, previous))
    }

    /// Remove a closed connection; reports its id's presence change, if it had one.
    pub fn disconnect(&mut self, conn: ConnId) -> Option<Departure> {
        let id = self.connections.remove(&conn)??;
        Some(self.forget(conn, id))
    }

    fn forget(&mut self, conn: ConnId, id: String) -> Departure {
        let conns = self.by_id.get_mut(&id);
        let last = conns.is_none_or(|conns| {
            conns.remove(&conn);
            conns.is_empty()
        });
        if last {
            self.by_id.remove(&id);
        }
        Departure { id, last }
    }

    /// The local connections `recipients` reach, and the explicit ids absent here.
    pub fn route(&self, recipients: &Recipients) -> (Vec<ConnId>, Vec<String>) {
        match recipients {
            Recipients::All => {
                let targets = self
                    .connections
                    .iter()
                    .filter(|(_, id)| !self.auth_required || id.is_some())
                    .map(|(conn, _)| *conn)
                    .collect();
                (targets, Vec::new())
            }
            Recipients::Ids(ids) => {
                let mut targets = BTreeSet::new();
                let mut absent = Vec::new();
                // Each absent id once, in order; a set, for sends to many thousands.
                let mut seen = HashSet::new();
                for id in ids {
                    match self.by_id.get(id) {
                        Some(conns) => targets.extend(conns),
                        None if seen.insert(id) => absent.push(id.clone()),
                        None => {}
                    }
                }
                (targets.into_iter().collect(), absent)
            }
        }
    }

    /// Decide a send: encode `message` once and list who gets it.
    pub fn send(&self, message: &Message, recipients: &Recipients) -> Delivery {
        let (targets, absent) = self.route(recipients);
        Delivery {
            action: Action::for_message(message),
            targets,
            absent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_ids_across_connections_and_excludes() {
        let mut hub = Hub::new(false);
        let (a1, a2, b, anon) = (hub.connect(), hub.connect(), hub.connect(), hub.connect());
        hub.authenticate(a1, "alice");
        hub.authenticate(a2, "alice");
        hub.authenticate(b, "bob");
        let to = |ids: &[&str]| Recipients::Ids(ids.iter().map(|s| s.to_string()).collect());

        assert_eq!(hub.route(&to(&["alice"])).0, [a1, a2]);
        assert_eq!(hub.route(&to(&["alice", "carol", "carol"])).1, ["carol"]);
        assert_eq!(hub.route(&Recipients::All).0, [a1, a2, b, anon]);
        let without_alice = to(&["alice", "bob"]).excluding(&["alice".into()]);
        assert_eq!(hub.route(&without_alice).0, [b]);
        assert_eq!(
            Recipients::All.excluding(&["alice".into()]),
            Recipients::All
        );
        assert_eq!(
            Recipients::from_ids(vec!["x".into(), "*".into()]),
            Recipients::All
        );
    }

    #[test]
    fn auth_required_skips_anonymous_connections_in_global_sends() {
        let mut hub = Hub::new(true);
        let (a, anon) = (hub.connect(), hub.connect());
        hub.authenticate(a, "alice");
        let delivery = hub.send(&Message::dispatch("X", json!({})), &Recipients::All);
        assert_eq!(delivery.targets, [a]);
        assert!(hub.id_of(anon).is_none());
    }

    #[test]
    fn internal_events_close_or_stay_internal() {
        let mut disconnect = Message::new(Opcode::Internal, json!({}));
        disconnect.t = Some("DISCONNECT_CLIENT".into());
        let Action::Close(close) = Action::for_message(&disconnect) else {
            panic!()
        };
        assert_eq!(close.code, CloseCode::NORMAL);
        let other = Message::new(Opcode::Internal, json!({}));
        assert_eq!(Action::for_message(&other), Action::Ignore);
    }

    #[test]
    fn presence_ends_with_the_last_connection() {
        let mut hub = Hub::new(false);
        let (a1, a2) = (hub.connect(), hub.connect());
        hub.authenticate(a1, "alice");
        hub.authenticate(a2, "alice");
        assert_eq!(
            hub.disconnect(a1),
            Some(Departure {
                id: "alice".into(),
                last: false
            })
        );
        assert!(hub.is_online("alice"));
        // A re-authentication under another id leaves the old one.
        assert_eq!(
            hub.authenticate(a2, "al"),
            Some(Departure {
                id: "alice".into(),
                last: true
            })
        );
        assert!(!hub.is_online("alice"));
        assert_eq!(
            hub.disconnect(a2),
            Some(Departure {
                id: "al".into(),
                last: true
            })
        );
        assert!(hub.is_empty());
    }
}
