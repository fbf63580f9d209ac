//! `mesa client`: received messages as JSON lines on stdout (a room's with its
//! `"room"`), stdin lines sent to the server (a line with a `"room"` is published to
//! it), state changes reported on stderr.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use mesa_tokio::recovery::Position;
use mesa_tokio::rooms::{self, RoomNotice, check_room};
use mesa_tokio::{Client, ClientError, ClientEvent, Close, CloseCode, Limits, Message};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Failure;
use crate::logging::LogFormat;
use crate::signals::Signals;
use crate::state::State;

/// How long the closing handshake gets before the process exits. The driver finishes
/// it on a detached task that cannot be awaited, so this is a grace period.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Options of `mesa client`.
#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    /// The server's URL, `ws://host:port/path` or `wss://host:port/path`.
    #[arg(env = "MESA_URL")]
    url: String,

    /// Also trust the certificates of this PEM file for `wss://` (a private CA or a
    /// self-signed server), beside the Mozilla roots.
    #[arg(long, env = "MESA_CA_CERT")]
    ca_cert: Option<PathBuf>,

    /// Authenticate with `{"token": TOKEN}` (sent again after every reconnection).
    #[arg(long, env = "MESA_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Do not ask for the messages stored while offline (`shouldSync: false`).
    #[arg(
        long,
        env = "MESA_NO_SYNC",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    no_sync: bool,

    /// Exit when the connection is lost (code 0 after a normal close, 1 otherwise)
    /// instead of reconnecting with backoff.
    #[arg(
        long,
        env = "MESA_NO_RECONNECT",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    no_reconnect: bool,

    /// Milliseconds to keep running after stdin ends: time for a connection to send
    /// what was queued while disconnected, and for replies to be printed.
    #[arg(long, env = "MESA_LINGER", default_value_t = 1_000)]
    linger: u64,

    /// Subscribe to ROOM (repeatable; comma-separated in the environment variable),
    /// on a server with rooms, again after every reconnection. Its messages print
    /// with a `"room"` field; a stdin line `{"room":"R","t":"TYPE","d":{...}}`
    /// publishes to room R.
    #[arg(
        long = "subscribe",
        value_name = "ROOM",
        env = "MESA_SUBSCRIBE",
        value_delimiter = ',',
        value_parser = parse_room
    )]
    subscribe: Vec<String>,

    /// With --subscribe: also hear who joins and leaves each room (per id, over the
    /// cluster); each change prints as its notice,
    /// `{"op":0,"d":{"room":"R","id":"ID"},"t":"mesa:join"}` or `"mesa:leave"`.
    #[arg(long, env = "MESA_PRESENCE", requires = "subscribe")]
    presence: bool,

    /// Keep the rooms and, in recoverable rooms, the position of the last message
    /// received in FILE (JSON, rewritten as they change): started again with the
    /// same FILE, the client subscribes to them again from there and the server
    /// replays what it missed. Each resume prints its `mesa:subscribed` line, whose
    /// `"recovered"` says whether the replay was complete.
    #[arg(long, env = "MESA_STATE", value_name = "FILE")]
    state: Option<PathBuf>,
}

/// A room name, checked as the server checks it.
fn parse_room(room: &str) -> Result<String, String> {
    check_room(room, &Limits::default())
        .map(|()| room.to_owned())
        .map_err(|refusal| refusal.reason)
}

/// One line of stdin, as the reader thread hands it over.
type Line = Result<String, String>;

/// Run the client until stdin ends (and the linger time passed), a signal, or, with
/// `--no-reconnect`, the end of the connection.
pub(crate) async fn run(args: ClientArgs, format: LogFormat) -> Result<ExitCode, Failure> {
    let report = Reporter { format };
    // Connected once the positions of the state are in, so its first credentials
    // report them.
    let mut builder = mesa_tokio::client(args.url.clone())
        .reconnect(!args.no_reconnect)
        .auto_connect(false);
    if let Some(path) = &args.ca_cert {
        builder = builder.add_root_pem(crate::failure::read(path, "--ca-cert")?);
    }
    let (client, mut events) = builder
        .build()
        .map_err(|error| Failure::usage(error.to_string()))?;
    let mut state = match &args.state {
        Some(path) => State::load(path)?,
        None => State::default(),
    };
    let started = async {
        client.resume_streams(state.streams().clone()).await?;
        client.connect().await
    };
    started
        .await
        .map_err(|error| format!("the client did not start: {error}"))?;
    let mut signals = Signals::new().map_err(|error| format!("cannot handle signals: {error}"))?;
    let mut lines = stdin_lines()?;

    // Authenticate before any stdin line is sent: the future's first poll queues the
    // credentials, and `biased` polls it first.
    let mut auth_pending = args.token.is_some();
    let auth_client = client.clone();
    let should_sync = !args.no_sync;
    let token = args.token.clone();
    let mut auth = std::pin::pin!(async move {
        match token {
            Some(token) => auth_client
                .authenticate(json!({ "token": token }), should_sync)
                .await
                .map(drop),
            None => Ok(()),
        }
    });

    // Subscribe before any stdin line is published, as for the credentials; the
    // answers (and those after every reconnection) are reported as events.
    let rooms = state.rooms_with(&args.subscribe);
    let mut subscribes_pending = !rooms.is_empty();
    let mut subscribes = std::pin::pin!(subscribe_all(
        client.clone(),
        rooms,
        args.presence,
        report.format
    ));

    // With --token, the first hello says whether the server authenticates at all: ours
    // announces an authentication timeout exactly when authentication is on.
    let mut hello_checked = args.token.is_none();
    let mut connected = false;
    let mut stdin_open = true;
    let mut linger_until: Option<Instant> = None;
    let mut line_number = 0u64;
    loop {
        let linger = async {
            match linger_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            outcome = auth.as_mut(), if auth_pending => {
                auth_pending = false;
                if let Err(error) = outcome {
                    report.event("authentication_failed", [("error", json!(error.to_string()))]);
                }
            }
            () = subscribes.as_mut(), if subscribes_pending => subscribes_pending = false,
            event = events.next() => {
                let Some(event) = event else {
                    return Err("the client stopped unexpectedly".to_owned().into());
                };
                let first = !hello_checked && matches!(event, ClientEvent::Connected { .. });
                let moved = state.follow(&event);
                if let Some(code) = handle(event, &report, &mut connected)? {
                    return Ok(code);
                }
                // After the line is printed: a process killed in between gets the
                // message again when it resumes, never loses it.
                if let (true, Some(path)) = (moved, &args.state) {
                    state.save(path)?;
                }
                // After `connected` is printed, so the notice never comes before it.
                if first {
                    hello_checked = true;
                    tokio::spawn(warn_without_authentication(client.clone(), report.format));
                }
            }
            line = lines.recv(), if stdin_open => match line {
                Some(Ok(line)) => {
                    line_number += 1;
                    send_line(&client, &line, line_number, &report).await;
                }
                Some(Err(error)) => {
                    line_number += 1;
                    report.event("bad_input", [("line", json!(line_number)), ("error", json!(error))]);
                }
                None => {
                    stdin_open = false;
                    linger_until = Some(Instant::now() + Duration::from_millis(args.linger));
                }
            },
            () = linger => break,
            signal = signals.recv() => {
                report.event("interrupted", [("signal", json!(signal))]);
                break;
            }
        }
    }

    if !connected {
        report.event(
            "not_connected",
            [(
                "note",
                json!("exiting while disconnected: messages queued since are not sent"),
            )],
        );
    }
    let _ = client
        .disconnect(Close::new(CloseCode::NORMAL, "client closed"))
        .await;
    // Report the last events (our own `disconnected`) and let the close frame go out.
    let deadline = Instant::now() + CLOSE_GRACE;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        handle(event, &report, &mut connected)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Say on stderr when the server announces no authentication: `--token` would then
/// never be answered.
async fn warn_without_authentication(client: Client, format: LogFormat) {
    if let Ok(hello) = client.hello().await {
        if hello.authentication_timeout.is_none() {
            Reporter { format }.event(
                "authentication_unavailable",
                [(
                    "note",
                    json!(
                        "the server announces no authentication (no c_authentication_timeout \
                         in its hello): --token is sent but nobody answers it; start the \
                         server with --auth dev or --auth jwt"
                    ),
                )],
            );
        }
    }
}

/// Print or report one client event; `Some(code)` when the process should exit
/// because the connection ended for good.
fn handle(
    event: ClientEvent,
    report: &Reporter,
    connected: &mut bool,
) -> Result<Option<ExitCode>, String> {
    match event {
        ClientEvent::Connected {
            is_initial_connection,
            is_initial_session_connection,
            is_automatic_reconnection,
        } => {
            *connected = true;
            report.event(
                "connected",
                [
                    ("is_initial_connection", json!(is_initial_connection)),
                    (
                        "is_initial_session_connection",
                        json!(is_initial_session_connection),
                    ),
                    (
                        "is_automatic_reconnection",
                        json!(is_automatic_reconnection),
                    ),
                ],
            );
        }
        ClientEvent::Authenticated { user } => report.event("authenticated", [("user", user)]),
        ClientEvent::Message(message) => print_message(&message)?,
        ClientEvent::Disconnected {
            close,
            reconnect_at,
        } => {
            *connected = false;
            let retry = match reconnect_at {
                Some(at) => {
                    let wait = at.saturating_duration_since(std::time::Instant::now());
                    json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
                }
                None => Value::Null,
            };
            report.event(
                "disconnected",
                [
                    ("code", json!(close.code.0)),
                    ("reason", json!(close.reason)),
                    ("reconnect_in_ms", retry),
                ],
            );
            // Only the last events after our own `disconnect` get here deliberately;
            // in the main loop this is the end of the connection for good.
            if reconnect_at.is_none() {
                let normal = matches!(close.code, CloseCode::NORMAL | CloseCode::GOING_AWAY);
                return Ok(Some(if normal {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }));
            }
        }
        ClientEvent::InvalidFrame(error) => {
            report.event("invalid_frame", [("error", json!(error.to_string()))]);
        }
        ClientEvent::RoomMessage {
            room,
            message,
            position,
        } => print_line(rooms::room_frame(&message, &room, position.as_ref()).as_str())?,
        ClientEvent::MemberJoined { room, id } => {
            print_line(RoomNotice::Join { room, id }.encode().as_str())?
        }
        ClientEvent::MemberLeft { room, id } => {
            print_line(RoomNotice::Leave { room, id }.encode().as_str())?
        }
        // This command asks no presence request; positions go to the state.
        ClientEvent::Members { .. } | ClientEvent::StreamPosition { .. } => {}
        ClientEvent::Resumed {
            stream,
            position,
            recovered,
        } => {
            let notice = RoomNotice::Subscribed {
                room: stream.stream(""),
                reference: Value::Null,
                position,
                recovered,
            };
            print_line(notice.encode().as_str())?
        }
        ClientEvent::Subscribed {
            room,
            reference,
            position,
            recovered: Some(recovered),
        } => {
            let reference = reference.map_or(Value::Null, |r| json!(r.get()));
            let notice = RoomNotice::Subscribed {
                room,
                reference,
                position,
                recovered: Some(recovered),
            };
            print_line(notice.encode().as_str())?
        }
        ClientEvent::Subscribed {
            room, reference, ..
        } => report.event(
            "subscribed",
            [
                ("room", json!(room)),
                ("by_server", json!(reference.is_none())),
            ],
        ),
        ClientEvent::Unsubscribed { room, reference } => report.event(
            "unsubscribed",
            [
                ("room", json!(room)),
                ("by_server", json!(reference.is_none())),
            ],
        ),
        ClientEvent::RoomRefused { room, refusal, .. } => report.event(
            "room_refused",
            [
                ("room", json!(room)),
                ("code", json!(refusal.code.as_str())),
                ("reason", json!(refusal.reason)),
            ],
        ),
        ClientEvent::RoomsUnavailable { dropped } => {
            let rooms: Vec<&str> = dropped.iter().map(|(_, room)| room.as_str()).collect();
            rooms_unavailable(report, &rooms);
        }
    }
    Ok(None)
}

/// Report subscribes the server cannot answer: it has no rooms.
fn rooms_unavailable(report: &Reporter, rooms: &[&str]) {
    report.event(
        "rooms_unavailable",
        [
            ("dropped", json!(rooms)),
            (
                "note",
                json!(
                    "the server has no rooms (no `rooms` rule in its hello): start it with --rooms"
                ),
            ),
        ],
    );
}

/// Subscribe to every room of `--subscribe`. Only what no event reports is reported
/// here: the client's own refusals (a refused or unavailable subscribe is an event).
async fn subscribe_all(
    client: Client,
    rooms: Vec<(String, Option<Position>)>,
    presence: bool,
    format: LogFormat,
) {
    let subscribes = rooms.into_iter().map(|(room, since)| {
        let client = client.clone();
        async move {
            let subscribed = match since {
                Some(since) => client.subscribe_since(room.clone(), presence, since).await,
                None if presence => client.subscribe_with_presence(room.clone(), None).await,
                None => client.subscribe(room.clone()).await,
            };
            match subscribed {
                // Asked after a hello without rooms: no event reports it, so it is
                // reported as the event would have (one asked before is dropped by
                // the hello, and reported as ClientEvent::RoomsUnavailable).
                Err(ClientError::Session(mesa_tokio::ClientSessionError::NoRooms)) => {
                    rooms_unavailable(&Reporter { format }, &[room.as_str()]);
                }
                Err(ClientError::Session(error)) => {
                    Reporter { format }.event(
                        "subscribe_failed",
                        [("room", json!(room)), ("error", json!(error.to_string()))],
                    );
                }
                _ => {}
            }
        }
    });
    futures_util::future::join_all(subscribes).await;
}

/// What a stdin line asks for.
#[derive(Debug, PartialEq)]
enum Input {
    /// Send a Mesa message.
    Send(Message),
    /// Publish `{"t","d"}` to a room.
    Publish(String, Message),
}

/// Read a stdin line: a Mesa message, or `{"room":"R","t":"TYPE","d":{...}}`.
fn parse_line(line: &str) -> Result<Input, String> {
    let mut value: Value =
        serde_json::from_str(line).map_err(|error| format!("not JSON: {error}"))?;
    let Some(room) = value.as_object_mut().and_then(|line| line.remove("room")) else {
        return Message::decode(line, &Limits::default())
            .map(Input::Send)
            .map_err(|error| format!("not a Mesa message: {error}"));
    };
    let (Value::String(room), Some(Value::String(t))) = (room, value.get("t").cloned()) else {
        return Err("a room line has a string `room` and a string `t`".to_owned());
    };
    let d = value.get("d").cloned().unwrap_or_else(|| json!({}));
    Ok(Input::Publish(room, Message::dispatch(t, d)))
}

/// Decode one stdin line and send or publish it; errors are reported, never fatal.
async fn send_line(client: &Client, line: &str, number: u64, report: &Reporter) {
    let line = line.trim();
    if line.is_empty() {
        return;
    }
    let (event, error) = match parse_line(line) {
        Ok(input) => {
            let sent = match input {
                Input::Send(message) => client.send(message).await,
                Input::Publish(room, message) => client.publish(room, message).await,
            };
            match sent {
                Ok(()) => return,
                Err(error) => ("send_failed", error.to_string()),
            }
        }
        Err(error) => ("bad_input", error),
    };
    report.event(event, [("line", json!(number)), ("error", json!(error))]);
}

/// Write `message` as one JSON line on stdout.
fn print_message(message: &Message) -> Result<(), String> {
    print_line(&message.to_value().to_string())
}

/// Write `line` on stdout.
fn print_line(line: &str) -> Result<(), String> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|error| format!("cannot write to stdout: {error}"))
}

/// Read stdin on a thread of its own (a blocking read cannot be cancelled, and must
/// not hold up the exit); the channel closes at the end of stdin.
fn stdin_lines() -> Result<mpsc::Receiver<Line>, String> {
    let (tx, rx) = mpsc::channel::<Line>(64);
    std::thread::Builder::new()
        .name("stdin".to_owned())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                let line = match stdin.read_until(b'\n', &mut buffer) {
                    Ok(0) => return,
                    Ok(_) => String::from_utf8(std::mem::take(&mut buffer))
                        .map_err(|_| "the line is not UTF-8".to_owned()),
                    Err(error) => {
                        let _ = tx.blocking_send(Err(format!("cannot read stdin: {error}")));
                        return;
                    }
                };
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
        })
        .map_err(|error| format!("cannot start the stdin reader: {error}"))?;
    Ok(rx)
}

/// Writes the client's state changes on stderr, as `event key=value ...` or as JSON.
struct Reporter {
    format: LogFormat,
}

impl Reporter {
    /// Report `event` with its fields (strings are written JSON-quoted in text).
    fn event<const N: usize>(&self, event: &str, fields: [(&str, Value); N]) {
        let line = match self.format {
            LogFormat::Text => {
                let mut line = event.to_owned();
                for (key, value) in fields {
                    line.push_str(&format!(" {key}={value}"));
                }
                line
            }
            LogFormat::Json => {
                let mut object = Map::new();
                object.insert("event".to_owned(), json!(event));
                for (key, value) in fields {
                    object.insert(key.to_owned(), value);
                }
                Value::Object(object).to_string()
            }
        };
        let _ = writeln!(io::stderr().lock(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_with_a_room_is_a_publish_and_others_are_messages() {
        assert_eq!(
            parse_line(r#"{"room":"chat:1","t":"CHAT","d":{"text":"hi"}}"#),
            Ok(Input::Publish(
                "chat:1".into(),
                Message::dispatch("CHAT", json!({"text": "hi"}))
            ))
        );
        assert_eq!(
            parse_line(r#"{"room":"r","t":"PING"}"#),
            Ok(Input::Publish(
                "r".into(),
                Message::dispatch("PING", json!({}))
            ))
        );
        assert_eq!(
            parse_line(r#"{"op":0,"t":"ECHO","d":{"hi":1}}"#),
            Ok(Input::Send(Message::dispatch("ECHO", json!({"hi": 1}))))
        );
        for bad in [
            r#"{"room":"r","d":{}}"#,
            r#"{"room":1,"t":"X"}"#,
            r#"{"t":"X"}"#,
            "not json",
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subscribe_flags_name_valid_rooms() {
        assert_eq!(parse_room("chat:42"), Ok("chat:42".to_owned()));
        assert!(parse_room("two words").is_err());
        assert!(parse_room("").is_err());
    }
}
