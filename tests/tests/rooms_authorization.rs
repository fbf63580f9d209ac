//! The room policy of a real server against a model: random requests of an extended
//! client (subscribe with or without a token, unsubscribe, publish) to an authorizer
//! that allows by a rule the model knows, under the rooms limit. Every answer, and
//! what the server's membership is afterwards, must be the model's.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::OnceLock;

use async_tungstenite::tungstenite::Message as WsMessage;
use mesa_core::Limits;
use mesa_tests::ours::serve;
use mesa_tests::runtimes::{Raw, Tokio, next_json, raw};
use mesa_tokio::{
    Connection, DevAuthenticator, RefusalCode, RoomAccess, RoomAccessKind, RoomPolicy, RoomRefusal,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const ROOMS: [&str; 4] = ["a", "b", "c", "d"];
const MAX_ROOMS: usize = 2;

/// The rule of the authorizer: subscribe to a room with the token `<room>-ok`, or
/// to room `a` with none; publish to `a` and `b` only.
fn allowed(room: &str, access: &RoomAccessKind) -> bool {
    match access {
        RoomAccessKind::Subscribe { token } => {
            token.as_deref() == Some(&format!("{room}-ok")) || (room == "a" && token.is_none())
        }
        RoomAccessKind::Publish => room == "a" || room == "b",
    }
}

#[derive(Debug, Clone)]
enum Request {
    Subscribe { room: usize, token: Option<bool> },
    Unsubscribe { room: usize },
    Publish { room: usize },
}

fn request() -> impl Strategy<Value = Request> {
    let room = 0..ROOMS.len();
    prop_oneof![
        (room.clone(), proptest::option::of(any::<bool>()))
            .prop_map(|(room, token)| Request::Subscribe { room, token }),
        room.clone().prop_map(|room| Request::Unsubscribe { room }),
        room.prop_map(|room| Request::Publish { room }),
    ]
}

struct Server {
    addr: SocketAddr,
}

/// One server for every case, on a runtime of its own.
fn server() -> &'static (tokio::runtime::Runtime, Server) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, Server)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let server = runtime.block_on(async {
            let policy = RoomPolicy::authorizer(|_: Connection, access: RoomAccess| async move {
                if allowed(&access.room, &access.kind) {
                    Ok(())
                } else {
                    Err(RoomRefusal::new(RefusalCode::Unauthorized, "no"))
                }
            });
            let limits = Limits {
                max_rooms_per_connection: MAX_ROOMS,
                ..Limits::default()
            };
            let server = mesa_tokio::server()
                .authenticate(DevAuthenticator)
                .rooms(policy)
                .limits(limits)
                .build()
                .expect("a server");
            let addr = serve(&server, "127.0.0.1:0".parse().expect("an address")).await;
            Server { addr }
        });
        (runtime, server)
    })
}

async fn send(ws: &mut Raw<Tokio>, t: &str, d: Value) {
    let frame = json!({"op": 0, "t": t, "d": d}).to_string();
    ws.send(WsMessage::text(frame)).await.expect("sent");
}

/// Run `requests` on a fresh connection: the first answer that differs from the
/// model's, or a final membership that does, is the error.
async fn run(server: &Server, requests: &[Request], id: &str) -> Result<(), String> {
    let mut ws = raw(&Tokio, server.addr).await;
    next_json(&Tokio, &mut ws).await;
    let auth = json!({"op": 2, "d": {"token": id, "mesa": {"caps": ["rooms"]}}});
    ws.send(WsMessage::text(auth.to_string()))
        .await
        .expect("op 2");
    next_json(&Tokio, &mut ws).await;
    let mut model: BTreeSet<usize> = BTreeSet::new();
    for (n, request) in requests.iter().enumerate() {
        // What the model expects: the answer's type and error code, if any.
        let (expected, code): (&str, Option<RefusalCode>) = match request {
            Request::Subscribe { room, token } => {
                let name = ROOMS[*room];
                let token = token.map(|good| {
                    if good {
                        format!("{name}-ok")
                    } else {
                        "bad".to_owned()
                    }
                });
                let mut d = json!({"room": name, "ref": n});
                if let Some(token) = &token {
                    d["token"] = json!(token);
                }
                send(&mut ws, "mesa:subscribe", d).await;
                let kind = RoomAccessKind::Subscribe { token };
                if !allowed(name, &kind) {
                    ("mesa:error", Some(RefusalCode::Unauthorized))
                } else if model.contains(room) || model.len() < MAX_ROOMS {
                    model.insert(*room);
                    ("mesa:subscribed", None)
                } else {
                    ("mesa:error", Some(RefusalCode::TooManyRooms))
                }
            }
            Request::Unsubscribe { room } => {
                send(
                    &mut ws,
                    "mesa:unsubscribe",
                    json!({"room": ROOMS[*room], "ref": n}),
                )
                .await;
                if model.remove(room) {
                    ("mesa:unsubscribed", None)
                } else {
                    ("mesa:error", Some(RefusalCode::NotSubscribed))
                }
            }
            Request::Publish { room } => {
                let name = ROOMS[*room];
                let d = json!({"room": name, "t": "P", "d": {"n": n}, "ref": n});
                send(&mut ws, "mesa:publish", d).await;
                if !allowed(name, &RoomAccessKind::Publish) {
                    ("mesa:error", Some(RefusalCode::Unauthorized))
                } else if model.contains(room) {
                    // A member receives its own publish.
                    ("P", None)
                } else {
                    // Allowed and not a member: nothing comes back (the next
                    // answer checked is the next request's).
                    continue;
                }
            }
        };
        let answer = next_json(&Tokio, &mut ws).await;
        if answer["t"] != expected {
            return Err(format!(
                "request {n} {request:?}: expected {expected}, got {answer}"
            ));
        }
        if let Some(code) = code {
            if answer["d"]["code"] != code.as_str() {
                return Err(format!(
                    "request {n} {request:?}: expected {code:?}, got {answer}"
                ));
            }
        } else if expected.starts_with("mesa:") && answer["d"]["ref"] != n {
            return Err(format!("request {n}: the answer's ref is wrong: {answer}"));
        }
    }
    // The membership the server holds is the model's: leaving each room tells.
    for (room, name) in ROOMS.iter().enumerate() {
        send(
            &mut ws,
            "mesa:unsubscribe",
            json!({"room": name, "ref": "end"}),
        )
        .await;
        let answer = next_json(&Tokio, &mut ws).await;
        let member = answer["t"] == "mesa:unsubscribed";
        if member != model.contains(&room) {
            return Err(format!(
                "room {name}: the server says {answer}, the model {model:?}"
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_server_answers_as_the_model_of_allow_and_deny(
        requests in proptest::collection::vec(request(), 1..24),
        case in any::<u64>(),
    ) {
        let (runtime, server) = server();
        let outcome = runtime.block_on(run(server, &requests, &format!("u{case}")));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
