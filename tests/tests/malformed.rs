//! Hostile input at scale, on tokio: 100 offender connections send 10,000 bad
//! messages in total (not JSON, JSON but not an object, fields of the wrong type,
//! floods of unknown opcodes and of op 2, huge and deeply nested payloads, binary
//! frames, invalid UTF-8, oversized frame headers, messages before a required
//! authentication) while 100 bystanders keep echoing. The server must not panic or
//! stop, must close each offending connection with its documented code, and every
//! bystander's echo must come back.
//!
//! Each offender is a worker that opens a connection, sends one attack, checks the
//! close code, and starts again with the next attack, until the 10,000 messages are
//! sent. The figures (messages per attack, closes per code, echo latencies) are
//! printed; run with `--nocapture` to see them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use mesa_tests::ours::{serve, url};
use mesa_tests::runtimes::{Tokio, close_code, next_json, raw};
use mesa_tokio::{ClientEvent, DevAuthenticator, Limits, Message, RateLimitPolicy};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Bad messages the offenders send in total.
const BAD_MESSAGES: usize = 10_000;
/// Offender workers, each with one connection at a time.
const OFFENDERS: usize = 100;
/// Bystanders echoing throughout.
const BYSTANDERS: usize = 100;
/// Frames in one flood: past the default burst (200) of the message rate, which the
/// server under attack closes (its rate limit policy is `close`).
const FLOOD: usize = 250;
/// The whole test's bound.
const BOUND: Duration = Duration::from_secs(30);
/// The authentication timeout of the server under attack.
const AUTH_TIMEOUT: Duration = Duration::from_millis(1000);

/// One way to misbehave, with the close code the README documents for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Attack {
    NotJson,
    NotAnObject,
    WrongFieldTypes,
    UnknownOpcodeFlood,
    Huge,
    HugeFrameHeader,
    DeeplyNested,
    Binary,
    InvalidUtf8,
    AuthenticateFlood,
    BadToken,
    BeforeAuthentication,
}

/// The attacks of one message (or a few) per connection.
const SINGLE: [Attack; 10] = [
    Attack::NotJson,
    Attack::NotAnObject,
    Attack::WrongFieldTypes,
    Attack::Huge,
    Attack::HugeFrameHeader,
    Attack::DeeplyNested,
    Attack::Binary,
    Attack::InvalidUtf8,
    Attack::BadToken,
    Attack::BeforeAuthentication,
];

/// The attacks of [`FLOOD`] messages per connection.
const FLOODS: [Attack; 2] = [Attack::UnknownOpcodeFlood, Attack::AuthenticateFlood];

/// Rounds of the schedule: four of every single attack, then each flood once, so
/// that floods do not crowd out the variety of connections.
const SCHEDULE: usize = SINGLE.len() * 4 + FLOODS.len();

/// The attack of round `round`.
fn scheduled(round: usize) -> Attack {
    let at = round % SCHEDULE;
    match at.checked_sub(SINGLE.len() * 4) {
        Some(flood) => FLOODS[flood],
        None => SINGLE[at % SINGLE.len()],
    }
}

impl Attack {
    /// The documented close code.
    fn expected(self) -> u16 {
        match self {
            Attack::NotJson | Attack::NotAnObject | Attack::WrongFieldTypes => 1007,
            Attack::InvalidUtf8 => 1007,
            Attack::Huge | Attack::HugeFrameHeader | Attack::DeeplyNested => 1009,
            Attack::Binary => 1003,
            // Floods pass the message rate; op 2 and unknown opcodes are otherwise
            // legal (unknown opcodes reach the application, which ignores them).
            Attack::UnknownOpcodeFlood | Attack::AuthenticateFlood => 1008,
            Attack::BadToken | Attack::BeforeAuthentication => 1008,
        }
    }

    /// The text frames of this attack, `variant` picking among equivalent ones.
    fn texts(self, variant: usize) -> Vec<String> {
        let pick = |options: &[&str]| options[variant % options.len()].to_owned();
        match self {
            Attack::NotJson => vec![pick(&["not json", "{\"op\":0", "}{", "", "op=0&d=1"])],
            Attack::NotAnObject => vec![pick(&["[1,2,3]", "\"op\"", "42", "null", "true"])],
            Attack::WrongFieldTypes => vec![pick(&[
                r#"{"op":"zero","d":{}}"#,
                r#"{"op":-1,"d":{}}"#,
                r#"{"op":1.5}"#,
                r#"{"op":0,"t":{},"d":{}}"#,
                r#"{"op":0,"t":"ECHO","s":"one"}"#,
                r#"{"d":{}}"#,
            ])],
            Attack::UnknownOpcodeFlood => vec![r#"{"op":99,"d":{}}"#.to_owned(); FLOOD],
            Attack::AuthenticateFlood => {
                vec![format!(r#"{{"op":2,"d":{{"token":"flood{variant}"}}}}"#); FLOOD]
            }
            Attack::Huge => {
                let max = Limits::default().max_message_bytes;
                let filler = "x".repeat(max + 1 - r#"{"op":0,"d":""}"#.len());
                vec![format!(r#"{{"op":0,"d":"{filler}"}}"#)]
            }
            Attack::DeeplyNested => {
                let depth = [33, 1_000, 100_000][variant % 3];
                vec![format!(
                    r#"{{"op":0,"d":{}{}}}"#,
                    "[".repeat(depth),
                    "]".repeat(depth)
                )]
            }
            Attack::BadToken => vec![pick(&[
                r#"{"op":2,"d":{"token":""}}"#,
                r#"{"op":2,"d":{"token":42}}"#,
                r#"{"op":2,"d":{}}"#,
                r#"{"op":2}"#,
            ])],
            Attack::BeforeAuthentication => (0..5)
                .map(|n| format!(r#"{{"op":0,"t":"ECHO","d":{{"n":{n}}}}}"#))
                .collect(),
            Attack::Binary | Attack::InvalidUtf8 | Attack::HugeFrameHeader => Vec::new(),
        }
    }
}

/// What the offenders did.
#[derive(Default)]
struct Tally {
    sent: BTreeMap<Attack, usize>,
    connections: BTreeMap<Attack, usize>,
    closes: BTreeMap<u16, usize>,
    wrong: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_closed_with_their_codes_while_bystanders_lose_nothing() {
    let panics = Arc::new(AtomicUsize::new(0));
    let previous = std::panic::take_hook();
    {
        let panics = panics.clone();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    }
    let started = Instant::now();
    // Under attack, floods are treated as abuse: the close policy, not the default
    // (slowing them down), so that each flood ends with its documented 1008.
    let limits = Limits {
        rate_limit_policy: RateLimitPolicy::Close,
        ..Limits::default()
    };
    let server = mesa_tokio::server()
        .handler(mesa_tokio::Relay)
        .heartbeat(Duration::from_secs(10), 3)
        .authenticate(DevAuthenticator)
        .auth_timeout(AUTH_TIMEOUT)
        .auth_required(true)
        .limits(limits)
        .build()
        .unwrap();
    let handle = server.handle();
    let addr = serve(&server, "127.0.0.1:0".parse().unwrap()).await;

    // The bystanders: authenticated, each echoing one message at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let mut bystanders = Vec::new();
    for b in 0..BYSTANDERS {
        bystanders.push(tokio::spawn(bystander(addr, b, stop.clone())));
    }
    timeout(Duration::from_secs(10), async {
        while handle.connection_count() < BYSTANDERS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the bystanders connect");

    // The offenders.
    let sent = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let attack_started = Instant::now();
    let mut offenders = Vec::new();
    for worker in 0..OFFENDERS {
        let (sent, tally) = (sent.clone(), tally.clone());
        offenders.push(tokio::spawn(async move {
            // Workers start spread over the schedule, then stride through it.
            let mut round = worker * SCHEDULE / OFFENDERS;
            while sent.load(Ordering::SeqCst) < BAD_MESSAGES {
                let attack = scheduled(round);
                let variant = round / SCHEDULE;
                let (frames, code) = offend(addr, attack, variant).await;
                sent.fetch_add(frames, Ordering::SeqCst);
                let mut tally = tally.lock().unwrap();
                *tally.sent.entry(attack).or_default() += frames;
                *tally.connections.entry(attack).or_default() += 1;
                *tally.closes.entry(code).or_default() += 1;
                if code != attack.expected() {
                    tally.wrong.push(format!(
                        "{attack:?} (variant {variant}) closed with {code}, expected {}",
                        attack.expected()
                    ));
                }
                round += OFFENDERS;
            }
        }));
    }
    for offender in offenders {
        timeout(BOUND, offender)
            .await
            .expect("offenders finish in time")
            .expect("an offender task");
    }
    let attack_time = attack_started.elapsed();

    // The bystanders stop and report; every echo came back.
    stop.store(true, Ordering::SeqCst);
    let mut latencies = Vec::new();
    let mut echoes = 0;
    let mut disconnects = 0;
    for bystander in bystanders {
        let report = timeout(Duration::from_secs(10), bystander)
            .await
            .expect("a bystander stops")
            .expect("a bystander task");
        assert_eq!(report.lost, 0, "bystander {} lost echoes", report.index);
        echoes += report.latencies.len();
        disconnects += report.disconnects;
        latencies.extend(report.latencies);
    }
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

    // The server is still up: only the bystanders (until they leave) and a newcomer.
    timeout(Duration::from_secs(10), async {
        while handle.connection_count() > BYSTANDERS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every offender's connection is gone");
    let (newcomer, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    newcomer
        .authenticate(json!({"token": "newcomer"}), true)
        .await
        .unwrap();
    newcomer
        .send(Message::dispatch("ECHO", json!("after the storm")))
        .await
        .unwrap();
    let echoed = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(ClientEvent::Message(message)) = events.next().await {
                return message;
            }
        }
    })
    .await
    .expect("the newcomer's echo");
    assert_eq!(echoed.d, json!("after the storm"));

    let tally = tally.lock().unwrap();
    let total: usize = tally.sent.values().sum();
    let connections: usize = tally.connections.values().sum();
    eprintln!(
        "malformed input: {total} bad messages over {connections} offender connections \
         ({OFFENDERS} at a time) in {attack_time:.2?}; per attack (messages, connections):"
    );
    for (attack, frames) in &tally.sent {
        eprintln!(
            "  {attack:?}: {frames}, {} (close {})",
            tally.connections[attack],
            attack.expected()
        );
    }
    eprintln!("  closes by code: {:?}", tally.closes);
    eprintln!(
        "  bystanders: {BYSTANDERS}, {echoes} echoes, 0 lost, {disconnects} disconnects; \
         echo latency p50 {:.2?} p99 {:.2?} max {:.2?}",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0)
    );
    eprintln!(
        "  panics: {}; whole test {:.2?}",
        panics.load(Ordering::SeqCst),
        started.elapsed()
    );
    assert!(
        tally.wrong.is_empty(),
        "offenders closed with the wrong code:\n{}",
        tally.wrong.join("\n")
    );
    assert!(total >= BAD_MESSAGES, "{total} bad messages");
    assert_eq!(disconnects, 0, "a bystander was disconnected");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

/// What one bystander saw.
struct BystanderReport {
    index: usize,
    latencies: Vec<Duration>,
    lost: usize,
    disconnects: usize,
}

/// Authenticate as `b<index>`, then ECHO one numbered message at a time (every
/// 20 ms) until `stop`, checking each comes back, in order, within 5 s.
async fn bystander(addr: SocketAddr, index: usize, stop: Arc<AtomicBool>) -> BystanderReport {
    let (client, mut events) = mesa_tokio::client(url(addr)).build().unwrap();
    client
        .authenticate(json!({"token": format!("b{index}")}), true)
        .await
        .unwrap();
    let mut report = BystanderReport {
        index,
        latencies: Vec::new(),
        lost: 0,
        disconnects: 0,
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let sent = Instant::now();
        client
            .send(Message::dispatch("ECHO", json!({"b": index, "n": n})))
            .await
            .unwrap();
        let back = timeout(Duration::from_secs(5), async {
            loop {
                match events.next().await {
                    Some(ClientEvent::Message(message)) => return Some(message),
                    Some(ClientEvent::Disconnected { .. }) => report.disconnects += 1,
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await;
        match back {
            Ok(Some(message)) if message.d == json!({"b": index, "n": n}) => {
                report.latencies.push(sent.elapsed());
            }
            _ => report.lost += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report
}

/// Open a connection, run `attack`, and return the bad messages sent and the close
/// code the server answered with (1006 when the connection dropped without one).
async fn offend(addr: SocketAddr, attack: Attack, variant: usize) -> (usize, u16) {
    match attack {
        Attack::InvalidUtf8 | Attack::HugeFrameHeader => return offend_raw(addr, attack).await,
        _ => {}
    }
    let rt = Tokio;
    let mut ws = raw(&rt, addr).await;
    next_json(&rt, &mut ws).await;
    let mut frames = 0;
    if attack == Attack::Binary {
        let payload = vec![0x4d, 0x65, 0x73, 0x61, 0, 255];
        if ws.send(WsMessage::binary(payload)).await.is_ok() {
            frames += 1;
        }
    }
    for text in attack.texts(variant) {
        if ws.send(WsMessage::text(text)).await.is_err() {
            break;
        }
        frames += 1;
    }
    let code = timeout(AUTH_TIMEOUT * 5, close_code(&rt, &mut ws))
        .await
        .unwrap_or(0);
    (frames, code)
}

/// The attacks tungstenite's client will not send: a text frame of invalid UTF-8,
/// and a frame header announcing 1 GiB. Written by hand on a raw TCP socket after a
/// hand-made handshake.
async fn offend_raw(addr: SocketAddr, attack: Attack) -> (usize, u16) {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed during the handshake");
        received.extend_from_slice(&chunk[..n]);
    };
    assert!(received.starts_with(b"HTTP/1.1 101"), "no upgrade");
    received.drain(..head_end);
    let frame = match attack {
        // "Mesa" then bytes that are never UTF-8, as a masked text frame.
        Attack::InvalidUtf8 => masked(0x1, b"{\"op\":0,\"d\":\"\xff\xfe\xc0\xaf\"}", None),
        _ => masked(0x1, b"{\"op\":0}", Some(1 << 30)),
    };
    socket.write_all(&frame).await.unwrap();
    // Read server frames (unmasked) until the close.
    let code = timeout(Duration::from_secs(5), async {
        loop {
            if let Some((opcode, payload, used)) = parse(&received) {
                received.drain(..used);
                if opcode == 0x8 {
                    return payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                }
                continue;
            }
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return 1006,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or(0);
    (1, code)
}

/// A client frame (FIN set, masked) with `opcode` and `payload`; `declared` replaces
/// the length in the header (the payload is then cut short).
fn masked(opcode: u8, payload: &[u8], declared: Option<u64>) -> Vec<u8> {
    let len = declared.unwrap_or(payload.len() as u64);
    let mut frame = vec![0x80 | opcode];
    match len {
        0..=125 => frame.push(0x80 | len as u8),
        126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&len.to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// One complete server frame at the start of `bytes`: opcode, payload, bytes used.
fn parse(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let (len, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as usize,
            4,
        ),
        127 => {
            let raw: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(raw) as usize, 10)
        }
        short => (short as usize, 2),
    };
    let payload = bytes.get(header..header + len)?.to_vec();
    Some((first & 0x0f, payload, header + len))
}
