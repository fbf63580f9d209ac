//! The `blocking_server` example over real loopback sockets, driven by tungstenite's
//! blocking client: hello, authentication, heartbeats, ECHO and BROADCAST relay, and the
//! close codes. Every wait is bounded by a read timeout, so a failure never hangs.

#[path = "../examples/blocking_server/server.rs"]
mod server;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message as WsMessage, WebSocket};

/// The longest any single expected frame may take to arrive.
const WAIT: Duration = Duration::from_secs(5);

/// The test owns its clock (the clippy ban on `Instant::now` is for the core).
#[allow(clippy::disallowed_methods)]
fn clock() -> Instant {
    Instant::now()
}

/// Start the example server on a free port in a background thread.
fn start_server(heartbeat: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = listener.local_addr().expect("local address");
    let options = server::Options {
        heartbeat_interval: heartbeat,
        ..server::Options::default()
    };
    thread::spawn(move || server::serve(listener, options));
    addr
}

/// What a client saw next.
#[derive(Debug)]
enum Received {
    /// A Mesa frame other than a heartbeat.
    Frame(Value),
    /// The server's close frame, with its code if it had one.
    Closed(Option<u16>),
}

/// A blocking test client.
struct Client {
    name: &'static str,
    ws: WebSocket<TcpStream>,
    /// Answer each op 1 with op 11, as a live client does.
    answer_heartbeats: bool,
    /// The `d` of every heartbeat received, in order.
    heartbeats: Vec<Value>,
}

impl Client {
    /// Connect (the handshake bounded by a timeout) and read the hello.
    fn connect(addr: SocketAddr, name: &'static str) -> (Client, Value) {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("read timeout");
        tcp.set_write_timeout(Some(WAIT)).expect("write timeout");
        let (ws, _) = tungstenite::client(format!("ws://{addr}/"), tcp).expect("handshake");
        let mut client = Client {
            name,
            ws,
            answer_heartbeats: true,
            heartbeats: Vec::new(),
        };
        let hello = client.expect_frame();
        assert_eq!(hello["op"], 10, "{name}: the first frame is the hello");
        (client, hello)
    }

    /// Connect and authenticate as `name`, checking op 22.
    fn authenticated(addr: SocketAddr, name: &'static str) -> Client {
        let (mut client, _) = Client::connect(addr, name);
        client.send(&json!({"op": 2, "d": {"token": name}}).to_string());
        assert_eq!(
            client.expect_frame(),
            json!({"op": 22, "d": {"id": name}}),
            "{name}: authenticated"
        );
        client
    }

    fn send(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text))
            .unwrap_or_else(|error| panic!("{}: send failed: {error}", self.name));
    }

    /// Read until a frame other than a heartbeat (answering those if live) or the close
    /// arrives; `None` when `until` passes first.
    fn next_until(&mut self, until: Instant) -> Option<Received> {
        loop {
            let left = until.saturating_duration_since(clock());
            if left.is_zero() {
                return None;
            }
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(WsMessage::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|_| panic!("{}: not JSON: {text}", self.name));
                    if frame["op"] != 1 {
                        return Some(Received::Frame(frame));
                    }
                    self.heartbeats.push(frame["d"].clone());
                    if self.answer_heartbeats {
                        self.send(r#"{"op":11,"d":{}}"#);
                    }
                }
                Ok(WsMessage::Close(frame)) => {
                    return Some(Received::Closed(frame.map(|f| u16::from(f.code))));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(error))
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(error) => panic!("{}: read failed without a close frame: {error}", self.name),
            }
        }
    }

    fn next(&mut self) -> Received {
        self.next_until(clock() + WAIT)
            .unwrap_or_else(|| panic!("{}: nothing arrived within {WAIT:?}", self.name))
    }

    fn expect_frame(&mut self) -> Value {
        match self.next() {
            Received::Frame(frame) => frame,
            Received::Closed(code) => panic!("{}: closed ({code:?}), expected a frame", self.name),
        }
    }

    fn expect_close(&mut self) -> Option<u16> {
        match self.next() {
            Received::Closed(code) => code,
            Received::Frame(frame) => panic!("{}: got {frame}, expected the close", self.name),
        }
    }

    /// Stay connected for `duration`, answering heartbeats; nothing else may arrive.
    fn idle(&mut self, duration: Duration) {
        if let Some(received) = self.next_until(clock() + duration) {
            panic!("{}: expected only heartbeats, got {received:?}", self.name);
        }
    }

    /// Send an ECHO and expect it back unchanged.
    fn echo(&mut self, d: Value) {
        let echo = json!({"op": 0, "d": d, "t": "ECHO"});
        self.send(&echo.to_string());
        assert_eq!(
            self.expect_frame(),
            echo,
            "{}: ECHO comes back unchanged",
            self.name
        );
    }
}

fn broadcast(d: Value) -> Value {
    json!({"op": 0, "d": d, "t": "BROADCAST"})
}

#[test]
fn hello_authentication_echo_and_broadcasts() {
    // A long heartbeat: clients that are not being read must not die mid-test.
    let addr = start_server(Duration::from_secs(2));

    let (mut alice, hello) = Client::connect(addr, "alice");
    assert_eq!(hello["d"]["c_heartbeat_interval"], 2000);
    assert_eq!(hello["d"]["c_authentication_timeout"], 10_000);
    let rules = hello["d"]["rules"].as_array().expect("rules is an array");
    assert!(rules.contains(&json!("sends_user_object")), "{hello}");
    alice.send(r#"{"op":2,"d":{"token":"alice"}}"#);
    assert_eq!(
        alice.expect_frame(),
        json!({"op": 22, "d": {"id": "alice"}})
    );

    let mut bob = Client::authenticated(addr, "bob");
    let mut carol = Client::authenticated(addr, "carol");

    alice.echo(json!({"n": 1, "nested": {"list": [1, "two", null]}, "text": "héllo"}));

    // Everyone, the sender included.
    let to_all = broadcast(json!({"text": "hi all"}));
    bob.send(&to_all.to_string());
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(
            client.expect_frame(),
            to_all,
            "{} gets the broadcast",
            client.name
        );
    }

    // Only alice. Each connection receives in order, so a marker that bob and carol
    // get afterwards proves the targeted broadcast did not reach them.
    let to_alice = broadcast(json!({"to": ["alice"], "text": "just alice"}));
    bob.send(&to_alice.to_string());
    assert_eq!(alice.expect_frame(), to_alice);
    let marker = broadcast(json!({"to": ["bob", "carol"], "text": "marker"}));
    bob.send(&marker.to_string());
    assert_eq!(
        bob.expect_frame(),
        marker,
        "bob must not get alice's broadcast"
    );
    assert_eq!(
        carol.expect_frame(),
        marker,
        "carol must not get alice's broadcast"
    );

    // `to` minus `except`.
    let except_bob = broadcast(json!({"to": ["alice", "bob"], "except": ["bob"], "n": 2}));
    carol.send(&except_bob.to_string());
    assert_eq!(alice.expect_frame(), except_bob);
    bob.echo(json!({"after": "except"}));
    carol.echo(json!({"after": "except"}));

    // A second connection of one id receives sends to that id too.
    let mut alice2 = Client::authenticated(addr, "alice");
    let to_alice_again = broadcast(json!({"to": ["alice"], "n": 3}));
    carol.send(&to_alice_again.to_string());
    assert_eq!(alice.expect_frame(), to_alice_again);
    assert_eq!(alice2.expect_frame(), to_alice_again);
}

#[test]
fn heartbeats_keep_live_clients_and_close_silent_ones() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let addr = start_server(INTERVAL);

    let (mut alice, hello) = Client::connect(addr, "alice");
    assert_eq!(hello["d"]["c_heartbeat_interval"], 200);
    alice.send(r#"{"op":2,"d":{"token":"alice"}}"#);
    assert_eq!(
        alice.expect_frame(),
        json!({"op": 22, "d": {"id": "alice"}})
    );

    let (mut silent, _) = Client::connect(addr, "silent");
    silent.answer_heartbeats = false;

    // Alice answers every beat across many intervals (the silent client dies after five)
    // and stays connected.
    alice.idle(INTERVAL * 8);
    assert!(
        alice.heartbeats.len() >= 4,
        "alice saw {} heartbeats in 8 intervals",
        alice.heartbeats.len()
    );
    alice.echo(json!({"still": "here"}));

    // The silent client was warned with the attempt count, then closed with 1001.
    assert_eq!(silent.expect_close(), Some(1001));
    assert_eq!(
        silent.heartbeats,
        [
            json!({}),
            json!({"tries": 1, "max": 3}),
            json!({"tries": 2, "max": 3}),
            json!({"tries": 3, "max": 3}),
        ]
    );
}

#[test]
fn bad_clients_are_closed_with_their_code_while_others_carry_on() {
    // Alice is not read while the bad clients are handled: a long heartbeat keeps her.
    let addr = start_server(Duration::from_secs(2));
    let mut alice = Client::authenticated(addr, "alice");

    let (mut empty_token, _) = Client::connect(addr, "empty token");
    empty_token.send(r#"{"op":2,"d":{"token":""}}"#);
    assert_eq!(empty_token.expect_close(), Some(1008));

    let (mut no_token, _) = Client::connect(addr, "no token");
    no_token.send(r#"{"op":2,"d":{"password":"alice"}}"#);
    assert_eq!(no_token.expect_close(), Some(1008));

    let (mut garbage, _) = Client::connect(addr, "garbage");
    garbage.send("this is not JSON");
    assert_eq!(garbage.expect_close(), Some(1007));

    let (mut not_object, _) = Client::connect(addr, "not an object");
    not_object.send("[1,2,3]");
    assert_eq!(not_object.expect_close(), Some(1007));

    let (mut binary, _) = Client::connect(addr, "binary");
    binary.ws.send(WsMessage::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(binary.expect_close(), Some(1003));

    let (mut too_big, _) = Client::connect(addr, "too big");
    too_big.send(&"x".repeat(mesa_core::Limits::default().max_message_bytes + 1));
    assert_eq!(too_big.expect_close(), Some(1009));

    // Far too big: the transport refuses it unread, and the session still closes with 1009.
    let (mut way_too_big, _) = Client::connect(addr, "way too big");
    way_too_big.send(&"x".repeat(3 * mesa_core::Limits::default().max_message_bytes));
    assert_eq!(way_too_big.expect_close(), Some(1009));

    // The server and the other connections carry on.
    alice.echo(json!({"still": "here"}));
    let mut dave = Client::authenticated(addr, "dave");
    let to_all = broadcast(json!({"text": "after the bad ones"}));
    alice.send(&to_all.to_string());
    assert_eq!(alice.expect_frame(), to_all);
    assert_eq!(dave.expect_frame(), to_all);
}
