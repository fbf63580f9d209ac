//! Our Rust client's rooms against our server: subscribe answered (or refused with
//! its code and reason), room messages with their room, publishes, subscriptions
//! restored after the server drops the connection, a server without authentication
//! (the opt-in alone), and a server without rooms.

use std::net::SocketAddr;
use std::time::Duration;

use mesa_core::{ClientError as SessionError, Opcode};
use mesa_tests::WAIT;
use mesa_tests::ours::{eventually, next_event, serve, url};
use mesa_tokio::{
    Client, ClientError, ClientEvent, ClientEvents, DevAuthenticator, Message, Recipients,
    RefusalCode, RoomAccess, RoomPolicy, RoomRefusal, ServerHandle,
};
use serde_json::json;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A client of `addr` signed in as `id` (when `Some`), with reconnections 50 ms apart.
async fn client(addr: SocketAddr, id: Option<&str>) -> (Client, ClientEvents) {
    let backoff = mesa_tokio::BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(100),
        base_is_fixed: true,
    };
    let (client, events) = mesa_tokio::client(url(addr))
        .backoff(backoff)
        .build()
        .unwrap();
    if let Some(id) = id {
        client
            .authenticate(json!({ "token": id }), false)
            .await
            .unwrap();
    }
    (client, events)
}

/// A server with development authentication and rooms under `policy`.
async fn authenticating(policy: RoomPolicy) -> (ServerHandle, SocketAddr) {
    let server = mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .rooms(policy)
        .build()
        .unwrap();
    (server.handle(), serve(&server, any_port()).await)
}

/// Once the server holds `members` memberships, a message it publishes to `room`
/// reaches `events` with its room.
async fn server_publish_reaches(
    handle: &ServerHandle,
    events: &mut ClientEvents,
    room: &str,
    members: usize,
) {
    eventually("the memberships", WAIT, || async {
        handle.membership_count() == members
    })
    .await;
    let news = Message::dispatch("NEWS", json!({ "room": room }));
    handle.publish(room, &news).unwrap();
    assert_eq!(room_message(events).await, (room.to_owned(), news));
}

/// The next room message, with its room.
async fn room_message(events: &mut ClientEvents) -> (String, Message) {
    let event = next_event(
        events,
        "a room message",
        |e| matches!(e, ClientEvent::RoomMessage { .. }),
        WAIT,
    )
    .await;
    let ClientEvent::RoomMessage { room, message, .. } = event else {
        unreachable!()
    };
    (room, message)
}

#[tokio::test]
async fn members_hear_publishes_with_their_room() {
    let (handle, addr) = authenticating(RoomPolicy::Authenticated).await;
    let (alice, mut alice_events) = client(addr, Some("alice")).await;
    let (bob, mut bob_events) = client(addr, Some("bob")).await;
    alice.subscribe("lobby").await.unwrap();
    bob.subscribe("lobby").await.unwrap();
    let hi = Message::dispatch("CHAT", json!({"text": "hi"}));
    alice.publish("lobby", hi.clone()).await.unwrap();
    for events in [&mut alice_events, &mut bob_events] {
        assert_eq!(room_message(events).await, ("lobby".to_owned(), hi.clone()));
    }
    server_publish_reaches(&handle, &mut bob_events, "lobby", 2).await;

    bob.unsubscribe("lobby").await.unwrap();
    let _ = next_event(
        &mut bob_events,
        "Unsubscribed",
        |e| matches!(e, ClientEvent::Unsubscribed { room, reference: Some(_) } if room == "lobby"),
        WAIT,
    )
    .await;
    assert_eq!(handle.membership_count(), 1);
}

#[tokio::test]
async fn a_refusal_carries_the_server_s_code_and_reason() {
    let only_public = |_conn, access: RoomAccess| async move {
        if access.room.starts_with("public:") {
            Ok(())
        } else {
            Err(RoomRefusal::new(
                RefusalCode::Unauthorized,
                "public rooms only",
            ))
        }
    };
    let (_, addr) = authenticating(RoomPolicy::authorizer(only_public)).await;
    let (alice, mut events) = client(addr, Some("alice")).await;
    assert_eq!(
        alice.subscribe("secret").await,
        Err(ClientError::Refused(RoomRefusal::new(
            RefusalCode::Unauthorized,
            "public rooms only"
        )))
    );
    alice.subscribe("public:1").await.unwrap();
    // A refused publish is an event with the server's reason.
    alice
        .publish("secret", Message::dispatch("CHAT", json!({})))
        .await
        .unwrap();
    let refused = next_event(
        &mut events,
        "the publish refused",
        |e| matches!(e, ClientEvent::RoomRefused { room: Some(room), .. } if room == "secret"),
        WAIT,
    )
    .await;
    assert!(
        matches!(&refused, ClientEvent::RoomRefused { refusal, .. } if refusal.code == RefusalCode::Unauthorized),
        "{refused:?}"
    );
    // The client checks names itself.
    assert!(matches!(
        alice.subscribe("two words").await,
        Err(ClientError::Session(SessionError::InvalidRoom(_)))
    ));
}

#[tokio::test]
async fn subscriptions_come_back_after_the_server_drops_the_connection() {
    let (handle, addr) = authenticating(RoomPolicy::Authenticated).await;
    let (alice, mut events) = client(addr, Some("alice")).await;
    alice.subscribe("a").await.unwrap();
    alice.subscribe("b").await.unwrap();

    let mut kick = Message::new(Opcode::Internal, json!({}));
    kick.t = Some("DISCONNECT_CLIENT".into());
    handle
        .send(&kick, &Recipients::Ids(vec!["alice".into()]))
        .unwrap();
    let _ = next_event(
        &mut events,
        "Disconnected",
        |e| {
            matches!(
                e,
                ClientEvent::Disconnected {
                    reconnect_at: Some(_),
                    ..
                }
            )
        },
        WAIT,
    )
    .await;
    for room in ["a", "b"] {
        let _ = next_event(
            &mut events,
            &format!("{room} restored"),
            |e| matches!(e, ClientEvent::Subscribed { room: r, reference: Some(_), .. } if r == room),
            WAIT,
        )
        .await;
    }
    // The old connection's rooms are gone; the new one's hear the server.
    server_publish_reaches(&handle, &mut events, "b", 2).await;
}

#[tokio::test]
async fn without_authentication_the_client_opts_in_alone() {
    let server = mesa_tokio::server()
        .rooms(RoomPolicy::Open)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = serve(&server, any_port()).await;
    let (anonymous, mut events) = client(addr, None).await;
    anonymous.subscribe("lobby").await.unwrap();
    server_publish_reaches(&handle, &mut events, "lobby", 1).await;
}

#[tokio::test]
async fn a_server_without_rooms_says_so() {
    let server = mesa_tokio::server()
        .authenticate(DevAuthenticator)
        .build()
        .unwrap();
    let addr = serve(&server, any_port()).await;
    let (alice, _events) = client(addr, Some("alice")).await;
    let no_rooms = Err(ClientError::Session(SessionError::NoRooms));
    assert_eq!(alice.subscribe("lobby").await, no_rooms);
    let chat = Message::dispatch("CHAT", json!({}));
    assert_eq!(alice.publish("lobby", chat).await, no_rooms);
}

/// A subscription with presence hears who joins and leaves (two tabs of bob: one of
/// each) and asks who is there; a presence request about a room the client is not in
/// is refused.
#[tokio::test]
async fn a_subscription_with_presence_hears_ids_join_and_leave_and_asks_who_is_there() {
    let (_, addr) = authenticating(RoomPolicy::Authenticated).await;
    let (alice, mut events) = client(addr, Some("alice")).await;
    alice.subscribe_with_presence("lobby", None).await.unwrap();
    let mut tabs = Vec::new();
    for _ in 0..2 {
        let (bob, bob_events) = client(addr, Some("bob")).await;
        bob.subscribe("lobby").await.unwrap();
        tabs.push((bob, bob_events));
    }
    let members = alice.presence("lobby").await.unwrap();
    let members: Vec<(&str, u64)> = members
        .iter()
        .map(|m| (m.id.as_str(), m.connections))
        .collect();
    assert_eq!(members, [("alice", 1), ("bob", 2)]);
    let joined = |e: &ClientEvent| matches!(e, ClientEvent::MemberJoined { id, .. } if id == "bob");
    let _ = next_event(&mut events, "bob joined", joined, WAIT).await;
    for (bob, _) in &tabs {
        bob.unsubscribe("lobby").await.unwrap();
    }
    let left = next_event(
        &mut events,
        "bob left",
        |e| {
            matches!(
                e,
                ClientEvent::MemberLeft { .. } | ClientEvent::MemberJoined { .. }
            )
        },
        WAIT,
    )
    .await;
    assert_eq!(
        left,
        ClientEvent::MemberLeft {
            room: "lobby".into(),
            id: "bob".into()
        },
        "one join, then one leave"
    );
    let refused = alice.presence("elsewhere").await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused(r) if r.code == RefusalCode::NotSubscribed),
        "{refused:?}"
    );
}
