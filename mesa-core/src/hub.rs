//! Server-wide routing decisions: which local connections a send reaches.
//!
//! One id may hold several connections (tabs, devices); a send to an id reaches all
//! of them. The hub only decides; the adapter executes the returned [`Delivery`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::close::{Close, CloseCode};
use crate::room_table::{Joined, RoomTable};
use crate::rooms::{PresenceChange, RefusalCode, RoomRefusal};
use crate::session::{EventInterest, SessionEvent};
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
    /// The order of the rest is kept; the cost is linear in both lists.
    pub fn excluding(self, excluding: &[String]) -> Self {
        match self {
            Recipients::Ids(ids) if !excluding.is_empty() => {
                let excluded: HashSet<&str> = excluding.iter().map(String::as_str).collect();
                Recipients::Ids(
                    ids.into_iter()
                        .filter(|id| !excluded.contains(id.as_str()))
                        .collect(),
                )
            }
            recipients => recipients,
        }
    }

    /// Refuse an explicit list that addresses more than `max` distinct ids, so one
    /// send's work (lookups, presence checks, stored copies) stays bounded. Ids listed
    /// twice count once; a global send is never refused.
    pub fn at_most(&self, max: usize) -> Result<(), TooManyRecipients> {
        match self {
            // Distinct ids are never more than the list: count only a longer list.
            Recipients::Ids(ids) if ids.len() > max => match first_seen(ids).count() {
                count if count > max => Err(TooManyRecipients { count, max }),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// Each id of `ids` once, in the order of its first appearance.
pub fn distinct_ids(ids: &[String]) -> Vec<String> {
    first_seen(ids).cloned().collect()
}

/// The ids of `ids` not seen before them: a hash set, so linear in the list.
fn first_seen(ids: &[String]) -> impl Iterator<Item = &String> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().filter(move |id| seen.insert(id.as_str()))
}

/// A send addressed more distinct ids than [`Limits::max_recipients`](crate::Limits::max_recipients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many recipients: {count} > {max}")]
pub struct TooManyRecipients {
    /// The distinct ids the send addressed.
    pub count: usize,
    /// The limit.
    pub max: usize,
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
    /// Each connection's id, and each id's connections: one shared copy of the id.
    connections: BTreeMap<ConnId, Option<Arc<str>>>,
    by_id: HashMap<Arc<str>, ConnSet>,
    rooms: RoomTable,
    /// The hub decides room presence changes itself (a server alone; in a cluster,
    /// Redis's scripts do): they wait in `changes` for [`poll_presence`](Hub::poll_presence).
    decides_presence: bool,
    changes: VecDeque<PresenceChange>,
}

/// The connections of one id here: one inline (most ids have one; a set of one
/// would cost every connection a hundred bytes), more in a set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnSet {
    One(ConnId),
    Many(BTreeSet<ConnId>),
}

impl ConnSet {
    fn len(&self) -> usize {
        match self {
            ConnSet::One(_) => 1,
            ConnSet::Many(conns) => conns.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = ConnId> + '_ {
        let (one, many) = match self {
            ConnSet::One(conn) => (Some(*conn), None),
            ConnSet::Many(conns) => (None, Some(conns)),
        };
        one.into_iter().chain(many.into_iter().flatten().copied())
    }

    fn insert(&mut self, conn: ConnId) {
        match self {
            ConnSet::One(one) if *one == conn => {}
            ConnSet::One(one) => *self = ConnSet::Many(BTreeSet::from([*one, conn])),
            ConnSet::Many(conns) => drop(conns.insert(conn)),
        }
    }

    /// Take `conn` out; whether none is left.
    fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            ConnSet::One(one) => *one == conn,
            ConnSet::Many(conns) => {
                conns.remove(&conn);
                let empty = conns.is_empty();
                if let (1, Some(&only)) = (conns.len(), conns.first()) {
                    *self = ConnSet::One(only);
                }
                empty
            }
        }
    }
}

impl Hub {
    /// An empty hub; with `auth_required`, global sends skip unauthenticated connections.
    pub fn new(auth_required: bool) -> Self {
        Hub {
            auth_required,
            ..Hub::default()
        }
    }

    /// A hub that decides room presence itself, for a server alone: each id's first
    /// connection in a room and its last one leaving become [`PresenceChange`]s
    /// (anonymous connections have no id and change nothing).
    pub fn deciding_presence(auth_required: bool) -> Self {
        Hub {
            decides_presence: true,
            ..Hub::new(auth_required)
        }
    }

    /// The next room presence change (only a hub that decides presence makes any).
    pub fn poll_presence(&mut self) -> Option<PresenceChange> {
        self.changes.pop_front()
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

    /// How many connections `id` has here.
    pub fn connections_of(&self, id: &str) -> usize {
        self.by_id.get(id).map_or(0, ConnSet::len)
    }

    /// Whether `conn` is an open connection here.
    pub fn contains(&self, conn: ConnId) -> bool {
        self.connections.contains_key(&conn)
    }

    /// The ids with at least one connection here.
    pub fn online_ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(|id| &**id)
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

    /// Learn from an event of `conn`'s session what a hub on its own needs: its id
    /// and whether it opted in to rooms (the events [`EventInterest::HUB`] names).
    pub fn handle_session_event(&mut self, conn: ConnId, event: &SessionEvent) {
        match event {
            SessionEvent::Authenticated { id, .. } => drop(self.authenticate(conn, id)),
            SessionEvent::Extended { .. } => self.extend(conn),
            _ => debug_assert!(!EventInterest::HUB.acts_on(event)),
        }
    }

    /// Record that `conn` authenticated as `id` (a re-authentication may change it).
    /// Returns the departure from a previous id, if the id changed.
    pub fn authenticate(&mut self, conn: ConnId, id: &str) -> Option<Departure> {
        let slot = self.connections.get_mut(&conn)?;
        if slot.as_deref() == Some(id) {
            return None;
        }
        let known = self
            .by_id
            .get_key_value(id)
            .map(|(shared, _)| shared.clone());
        let shared = match known {
            Some(shared) => {
                if let Some(conns) = self.by_id.get_mut(id) {
                    conns.insert(conn);
                }
                shared
            }
            None => {
                let shared: Arc<str> = Arc::from(id);
                self.by_id.insert(shared.clone(), ConnSet::One(conn));
                shared
            }
        };
        let previous = slot.replace(shared);
        let rooms = self.rooms_of(conn);
        let departure = previous.map(|previous| self.forget(conn, &previous));
        if let Some(departure) = &departure {
            self.presence_changed(&departure.id, &rooms, false);
        }
        self.presence_changed(id, &rooms, true);
        departure
    }

    /// Remove a closed connection (and its room memberships: see
    /// [`leave_rooms`](Self::leave_rooms) to learn which rooms it empties); reports
    /// its id's presence change, if it had one.
    pub fn disconnect(&mut self, conn: ConnId) -> Option<Departure> {
        self.leave_rooms(conn);
        let id = self.connections.remove(&conn)??;
        Some(self.forget(conn, &id))
    }

    /// The connections of `id` here.
    pub fn conns_of(&self, id: &str) -> Vec<ConnId> {
        self.by_id
            .get(id)
            .map(|conns| conns.iter().collect())
            .unwrap_or_default()
    }

    /// The room memberships of the connections here.
    pub fn rooms(&self) -> &RoomTable {
        &self.rooms
    }

    /// `conn` opted in to rooms.
    pub fn extend(&mut self, conn: ConnId) {
        if self.contains(conn) {
            self.rooms.extend(conn);
        }
    }

    /// Put `conn` in `room`, unless it is in `max` rooms already (or closed).
    pub fn join(&mut self, conn: ConnId, room: &str, max: usize) -> Result<Joined, RoomRefusal> {
        if !self.contains(conn) {
            let reason = "the connection is closed";
            return Err(RoomRefusal::new(RefusalCode::BadRequest, reason));
        }
        let joined = self.rooms.join(conn, room, max)?;
        if !joined.already {
            self.conn_presence_changed(conn, &[room.to_owned()], true);
        }
        Ok(joined)
    }

    /// Whether member `conn` hears `room`'s presence notices (see
    /// [`RoomTable::watch`]); returns whether it does now.
    pub fn watch(&mut self, conn: ConnId, room: &str, on: bool) -> bool {
        self.rooms.watch(conn, room, on)
    }

    /// Take `conn` out of `room`: `None` when it was not in it, else whether the room
    /// has no member here any more.
    pub fn leave(&mut self, conn: ConnId, room: &str) -> Option<bool> {
        let left = self.rooms.leave(conn, room);
        if left.is_some() {
            self.conn_presence_changed(conn, &[room.to_owned()], false);
        }
        left
    }

    /// Take `conn` out of every room; returns the rooms left with no member here.
    pub fn leave_rooms(&mut self, conn: ConnId) -> Vec<String> {
        let rooms = self.rooms_of(conn);
        let emptied = self.rooms.leave_all(conn);
        self.conn_presence_changed(conn, &rooms, false);
        emptied
    }

    /// Who is in `room` here: each id with its connections in it, by id (anonymous
    /// members have no id and are not counted).
    pub fn room_members(&self, room: &str) -> Vec<(String, u64)> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for conn in self.rooms.members(room) {
            if let Some(id) = self.id_of(conn) {
                *counts.entry(id.to_owned()).or_default() += 1;
            }
        }
        counts.into_iter().collect()
    }

    /// Refuse a request that needs `conn` in `room` (a presence request) when it is
    /// not.
    pub fn check_member(&self, conn: ConnId, room: &str) -> Result<(), RoomRefusal> {
        if self.rooms.is_member(conn, room) {
            return Ok(());
        }
        Err(RoomRefusal::new(
            RefusalCode::NotSubscribed,
            "not in the room",
        ))
    }

    /// The rooms `conn` is in.
    fn rooms_of(&self, conn: ConnId) -> Vec<String> {
        self.rooms.rooms_of(conn).map(str::to_owned).collect()
    }

    /// `conn` joined (`joined`) or left `rooms`: see [`presence_changed`](Self::presence_changed).
    fn conn_presence_changed(&mut self, conn: ConnId, rooms: &[String], joined: bool) {
        if let Some(id) = self.id_of(conn).map(str::to_owned) {
            self.presence_changed(&id, rooms, joined);
        }
    }

    /// A connection of `id` joined (`joined`) or left `rooms`: where it is now the
    /// id's only connection, or where none is left, a hub that decides presence
    /// records the change. Linear in the id's connections here.
    fn presence_changed(&mut self, id: &str, rooms: &[String], joined: bool) {
        if !self.decides_presence {
            return;
        }
        for room in rooms {
            let conns = self.by_id.get(id).into_iter().flat_map(ConnSet::iter);
            let here = conns.filter(|c| self.rooms.is_member(*c, room)).count();
            if here == usize::from(joined) {
                self.changes.push_back(PresenceChange {
                    room: room.clone(),
                    id: id.to_owned(),
                    joined,
                });
            }
        }
    }

    fn forget(&mut self, conn: ConnId, id: &str) -> Departure {
        let conns = self.by_id.get_mut(id);
        let last = conns.is_none_or(|conns| conns.remove(conn));
        if last {
            self.by_id.remove(id);
        }
        Departure {
            id: id.to_owned(),
            last,
        }
    }

    /// The local connections `recipients` reach, and the explicit ids absent here (each
    /// once, in list order). Linear in the number of ids.
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
                for id in first_seen(ids) {
                    match self.by_id.get(id.as_str()) {
                        Some(conns) => targets.extend(conns.iter()),
                        None => absent.push(id.clone()),
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
    fn long_lists_route_in_list_order_each_id_once() {
        let mut hub = Hub::new(false);
        let (b, a) = (hub.connect(), hub.connect());
        hub.authenticate(a, "a");
        hub.authenticate(b, "b");
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let to = Recipients::Ids(ids(&["z", "a", "y", "z", "b", "x", "y", "a", "w"]));
        let (targets, absent) = hub.route(&to.clone().excluding(&ids(&["x", "q", "x"])));
        // Targets in connection order, absent ids in first-seen order, no repeats.
        assert_eq!(targets, [b, a]);
        assert_eq!(absent, ids(&["z", "y", "w"]));
        assert_eq!(
            to.clone().excluding(&[]),
            to,
            "nothing excluded leaves the list whole"
        );
        assert_eq!(
            distinct_ids(&ids(&["b", "a", "b", "c", "a"])),
            ids(&["b", "a", "c"])
        );
    }

    #[test]
    fn a_list_over_the_limit_is_refused_counting_distinct_ids() {
        let ids = |n: usize| Recipients::Ids((0..n).map(|i| format!("u{i}")).collect());
        assert_eq!(ids(3).at_most(3), Ok(()));
        assert_eq!(
            ids(4).at_most(3),
            Err(TooManyRecipients { count: 4, max: 3 })
        );
        let repeated = Recipients::Ids(vec!["a".into(); 10]);
        assert_eq!(repeated.at_most(1), Ok(()));
        assert_eq!(Recipients::All.at_most(1), Ok(()));
        assert_eq!(
            TooManyRecipients {
                count: 150_000,
                max: 100_000
            }
            .to_string(),
            "too many recipients: 150000 > 100000"
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
    fn a_hub_alone_decides_room_presence_per_id() {
        let mut hub = Hub::deciding_presence(false);
        let (a1, a2, anon) = (hub.connect(), hub.connect(), hub.connect());
        hub.authenticate(a1, "alice");
        hub.authenticate(a2, "alice");
        let drain = |hub: &mut Hub| -> Vec<(String, bool)> {
            std::iter::from_fn(|| hub.poll_presence())
                .map(|c| (c.id, c.joined))
                .collect()
        };
        assert!(drain(&mut hub).is_empty(), "no room, no change");
        let join = |id: &str| (id.to_owned(), true);
        let leave = |id: &str| (id.to_owned(), false);
        // Two tabs of one id: one join, one leave.
        hub.join(a1, "r", 8).unwrap();
        hub.join(a2, "r", 8).unwrap();
        assert_eq!(drain(&mut hub), [join("alice")]);
        // An anonymous member has no id: nothing, until it authenticates.
        hub.join(anon, "r", 8).unwrap();
        assert!(drain(&mut hub).is_empty());
        hub.authenticate(anon, "bob");
        assert_eq!(drain(&mut hub), [join("bob")]);
        // Another id: bob leaves, carol joins.
        hub.authenticate(anon, "carol");
        assert_eq!(drain(&mut hub), [leave("bob"), join("carol")]);
        hub.leave(a1, "r");
        assert!(drain(&mut hub).is_empty());
        hub.disconnect(a2);
        assert_eq!(drain(&mut hub), [leave("alice")]);
        hub.leave_rooms(anon);
        assert_eq!(drain(&mut hub), [leave("carol")]);
        // A hub inside a replica leaves it to Redis.
        let mut replica_hub = Hub::new(false);
        let c = replica_hub.connect();
        replica_hub.authenticate(c, "dave");
        replica_hub.join(c, "r", 8).unwrap();
        assert!(drain(&mut replica_hub).is_empty());
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
