//! Connect, authenticate, disconnect and route against a `Hub`, compared with a
//! plain map from connection to id.
//!
//! Invariants:
//! - connection handles are never reused;
//! - `authenticate` and `disconnect` report a departure exactly when the model says,
//!   with `last` true exactly when no other connection holds the id;
//! - `route(Ids)` returns exactly the connections whose id is listed, sorted and
//!   unique, and the listed ids with no connection, once each, in list order;
//! - `route(All)` returns every connection (only authenticated ones when
//!   authentication is required), sorted;
//! - `send` encodes the message once and routes `from_ids(..).excluding(..)` as
//!   upstream does (`*` anywhere means everyone; excluding leaves a global send whole);
//! - `len`, `is_empty`, `is_online`, `online_ids` and `id_of` agree with the model.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::{Action, CloseCode, ConnId, Departure, Hub, Message, Opcode, Recipients};
use serde_json::json;

const POOL: [&str; 5] = ["alice", "bob", "carol", "", " "];

#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8),
    Star,
    Custom(String),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Pool(i) => POOL[usize::from(*i) % POOL.len()].to_owned(),
            Name::Star => "*".to_owned(),
            Name::Custom(name) => name.clone(),
        }
    }
}

fn names(list: &[Name]) -> Vec<String> {
    list.iter().map(Name::get).collect()
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Authenticate {
        conn: u8,
        id: Name,
    },
    Disconnect {
        conn: u8,
    },
    Route {
        ids: Vec<Name>,
    },
    RouteAll,
    Send {
        ids: Vec<Name>,
        excluding: Vec<Name>,
        global: bool,
        kind: Kind,
    },
}

/// The message a send carries: what a delivery does depends on it.
#[derive(Arbitrary, Debug)]
enum Kind {
    Dispatch,
    DisconnectClient,
    OtherInternal,
}

#[derive(Arbitrary, Debug)]
struct Input {
    auth_required: bool,
    ops: Vec<Op>,
}

struct Model {
    auth_required: bool,
    /// Every handle ever returned, in order.
    created: Vec<ConnId>,
    live: BTreeMap<ConnId, Option<String>>,
}

impl Model {
    /// A handle from the ones created so far, or one the hub never returned.
    fn pick(&self, index: u8) -> ConnId {
        let index = usize::from(index) % (self.created.len() + 1);
        self.created.get(index).copied().unwrap_or(ConnId(u64::MAX))
    }

    fn holds(&self, id: &str) -> bool {
        self.live.values().any(|held| held.as_deref() == Some(id))
    }

    fn route(&self, recipients: &Recipients) -> (Vec<ConnId>, Vec<String>) {
        match recipients {
            Recipients::All => {
                let targets = self
                    .live
                    .iter()
                    .filter(|(_, id)| !self.auth_required || id.is_some())
                    .map(|(conn, _)| *conn)
                    .collect();
                (targets, Vec::new())
            }
            Recipients::Ids(ids) => {
                let targets = self
                    .live
                    .iter()
                    .filter(|(_, id)| id.as_ref().is_some_and(|id| ids.contains(id)))
                    .map(|(conn, _)| *conn)
                    .collect();
                let mut absent: Vec<String> = Vec::new();
                for id in ids {
                    if !self.holds(id) && !absent.contains(id) {
                        absent.push(id.clone());
                    }
                }
                (targets, absent)
            }
        }
    }
}

fn check_route(hub: &Hub, model: &Model, recipients: &Recipients) {
    let (targets, absent) = hub.route(recipients);
    let sorted_unique: Vec<ConnId> = targets
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(targets, sorted_unique, "targets not sorted and unique");
    assert_eq!(
        (targets, absent),
        model.route(recipients),
        "route({recipients:?})"
    );
}

fn check_state(hub: &Hub, model: &Model) {
    assert_eq!(hub.len(), model.live.len());
    assert_eq!(hub.is_empty(), model.live.is_empty());
    let online: BTreeSet<&str> = hub.online_ids().collect();
    let expected: BTreeSet<&str> = model.live.values().flatten().map(String::as_str).collect();
    assert_eq!(online, expected, "online ids");
    for id in POOL.iter().chain(&["*"]) {
        assert_eq!(hub.is_online(id), model.holds(id), "is_online({id:?})");
    }
    for conn in &model.created {
        let expected = model.live.get(conn).and_then(|id| id.as_deref());
        assert_eq!(hub.id_of(*conn), expected, "id_of({conn:?})");
    }
    assert_eq!(hub.id_of(ConnId(u64::MAX)), None);
}

fuzz_target!(|input: Input| {
    let mut hub = Hub::new(input.auth_required);
    let mut model = Model {
        auth_required: input.auth_required,
        created: Vec::new(),
        live: BTreeMap::new(),
    };
    for op in input.ops {
        match op {
            Op::Connect => {
                let conn = hub.connect();
                assert!(!model.created.contains(&conn), "handle {conn:?} reused");
                model.created.push(conn);
                model.live.insert(conn, None);
            }
            Op::Authenticate { conn, id } => {
                let conn = model.pick(conn);
                let id = id.get();
                let departure = hub.authenticate(conn, &id);
                let expected = match model.live.get_mut(&conn) {
                    None => None,
                    Some(held) if held.as_deref() == Some(id.as_str()) => None,
                    Some(held) => held.replace(id).map(|previous| {
                        let last = !model.holds(&previous);
                        Departure { id: previous, last }
                    }),
                };
                assert_eq!(departure, expected, "authenticate({conn:?})");
            }
            Op::Disconnect { conn } => {
                let conn = model.pick(conn);
                let departure = hub.disconnect(conn);
                let expected = model.live.remove(&conn).flatten().map(|id| {
                    let last = !model.holds(&id);
                    Departure { id, last }
                });
                assert_eq!(departure, expected, "disconnect({conn:?})");
            }
            Op::Route { ids } => check_route(&hub, &model, &Recipients::Ids(names(&ids))),
            Op::RouteAll => check_route(&hub, &model, &Recipients::All),
            Op::Send {
                ids,
                excluding,
                global,
                kind,
            } => {
                let ids = names(&ids);
                let excluding = names(&excluding);
                let recipients = if global {
                    Recipients::All
                } else {
                    Recipients::from_ids(ids.clone())
                }
                .excluding(&excluding);
                // The model of upstream's recipient rules.
                let expected = if global || ids.iter().any(|id| id == "*") {
                    Recipients::All
                } else {
                    Recipients::Ids(
                        ids.into_iter()
                            .filter(|id| !excluding.contains(id))
                            .collect(),
                    )
                };
                assert_eq!(recipients, expected, "recipients");
                let message = match kind {
                    Kind::Dispatch => Message::dispatch("CHAT", json!({"text": "hi"})),
                    Kind::DisconnectClient => Message {
                        t: Some("DISCONNECT_CLIENT".into()),
                        ..Message::new(Opcode::Internal, json!({}))
                    },
                    Kind::OtherInternal => Message {
                        t: Some("SOMETHING_NEW".into()),
                        ..Message::new(Opcode::Internal, json!({}))
                    },
                };
                let delivery = hub.send(&message, &recipients);
                match (&kind, &delivery.action) {
                    // A message is encoded once; every target shares the frame.
                    (Kind::Dispatch, Action::Write(frame)) => assert_eq!(*frame, message.encode()),
                    (Kind::DisconnectClient, Action::Close(close)) => {
                        assert_eq!(close.code, CloseCode::NORMAL)
                    }
                    (Kind::OtherInternal, Action::Ignore) => {}
                    (kind, action) => panic!("{kind:?} became {action:?}"),
                }
                let (targets, absent) = model.route(&recipients);
                assert_eq!(delivery.targets, targets, "send targets");
                assert_eq!(delivery.absent, absent, "send absent");
                check_route(&hub, &model, &recipients);
            }
        }
        check_state(&hub, &model);
    }
});
