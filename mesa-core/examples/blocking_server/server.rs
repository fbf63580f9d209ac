//! A Mesa relay server on blocking sockets: `std::net`, one thread per connection and
//! tungstenite's blocking API, with no async runtime anywhere.
//!
//! Every protocol decision is made by `mesa-core`; this file only moves frames, keeps
//! the clock and wakes up on time:
//!
//! - **One thread per connection** owns its [`WebSocket`] and its [`ServerSession`].
//!   It blocks in `read` with a read timeout equal to the time left until
//!   [`ServerSession::poll_timeout`], capped at [`Options::poll_interval`], and calls
//!   [`ServerSession::handle_timeout`] once the deadline has passed. While the session
//!   pauses reading for the message rate ([`ServerSession::read_paused_until`]) it
//!   sleeps instead of reading.
//! - **Routing** goes through one [`Hub`] behind an `Arc<Mutex<_>>`, next to a bounded
//!   `std::sync::mpsc` outbox per connection. A broadcast is encoded once by
//!   [`Hub::send`]; each target's outbox receives a clone of the same [`Action`] (so of
//!   the same shared `Frame`), and the target's own thread hands it to its session the
//!   next time it wakes (within one poll interval). Only the owning thread ever writes
//!   to a socket.
//! - The lock is held only to register, route or leave: never across socket IO.
//!
//! Authentication uses [`mesa_core::dev_authenticate`], which accepts any non-empty
//! token as the id. It exists **for demos and tests only**.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use mesa_core::{
    Action, AuthConfig, Close, CloseCode, ConfigError, ConnId, DecodeError, HeartbeatConfig, Hub,
    Message, ServerConfig, ServerSession, SessionEvent, Transmit,
};
use tungstenite::error::CapacityError;
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message as WsMessage, Utf8Bytes, WebSocket};

/// Longest a client may take to complete the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one socket write may block before the peer counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest we wait for the peer's close reply after sending our close frame.
const LINGER: Duration = Duration::from_secs(2);
/// A read timeout of zero means "block forever" to the OS; never ask for less than this.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// Most bytes of a close reason on the wire (a control frame carries at most 125 bytes).
const MAX_CLOSE_REASON: usize = 123;

/// How the example server runs.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Time between heartbeats (op 1). Default 10 s.
    pub(crate) heartbeat_interval: Duration,
    /// Consecutive missed heartbeats tolerated before closing with 1001. Default 3.
    pub(crate) heartbeat_max_attempts: u32,
    /// Longest a connection thread blocks in `read` before it looks at its outbox, i.e.
    /// the worst-case latency a broadcast from another connection adds. Default 25 ms.
    pub(crate) poll_interval: Duration,
    /// Frames that may wait in one connection's outbox; a connection that falls this
    /// far behind is closed with 1013 rather than buffered without bound. Default 1024.
    pub(crate) outbox_capacity: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat_interval: HeartbeatConfig::default().interval,
            heartbeat_max_attempts: HeartbeatConfig::default().max_attempts,
            poll_interval: Duration::from_millis(25),
            outbox_capacity: 1024,
        }
    }
}

impl Options {
    /// The validated session configuration: heartbeats and authentication on.
    pub(crate) fn server_config(&self) -> Result<ServerConfig, ConfigError> {
        ServerConfig::builder()
            .heartbeat(HeartbeatConfig {
                interval: self.heartbeat_interval,
                max_attempts: self.heartbeat_max_attempts,
            })
            .authentication(AuthConfig::default())
            .build()
    }
}

/// Serve Mesa clients accepted on `listener`, one thread each, until accepting fails
/// for good. Returns early only when `options` do not make a valid configuration.
pub(crate) fn serve(listener: TcpListener, options: Options) -> io::Result<()> {
    let config = options
        .server_config()
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let config = Arc::new(config);
    let shared = Arc::new(Mutex::new(Shared {
        hub: Hub::new(config.authentication_required()),
        outboxes: HashMap::new(),
    }));
    println!(
        "mesa blocking_server: DEVELOPMENT authentication (any non-empty token is accepted as \
         the id): for demos only, never in production"
    );
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Usually transient (a connection reset before accept, too many open
                // files): report it, give the system a moment, keep serving.
                eprintln!("accept failed: {error}");
                pause(Duration::from_millis(50));
                continue;
            }
        };
        let (config, shared, options) = (Arc::clone(&config), Arc::clone(&shared), options.clone());
        let spawned = thread::Builder::new()
            .name("mesa-connection".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(error) = run_connection(stream, config, shared, &options) {
                    eprintln!("{peer:?}: {error}");
                }
            });
        if let Err(error) = spawned {
            eprintln!("cannot start a connection thread: {error}");
        }
    }
    Ok(())
}

/// The adapter owns the clock; `mesa-core` only ever receives `now` as an argument.
#[allow(clippy::disallowed_methods)]
fn clock() -> Instant {
    Instant::now()
}

/// Sleep briefly; blocking is the adapter's business, never the core's.
#[allow(clippy::disallowed_methods)]
fn pause(duration: Duration) {
    thread::sleep(duration);
}

/// Routing state shared by every connection thread.
struct Shared {
    /// Who is connected and as which id.
    hub: Hub,
    /// Each connection's outbox. Removing an entry drops the only sender, which tells
    /// that connection's thread its outbox overflowed.
    outboxes: HashMap<ConnId, SyncSender<Action>>,
}

/// Lock the shared state. A panicking connection thread cannot leave the hub
/// half-updated (every change is one call), so a poisoned lock is still usable.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Handshake, register, run the session to its close, then leave the hub.
fn run_connection(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    shared: Arc<Mutex<Shared>>,
    options: &Options,
) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // Bound what tungstenite buffers. Twice the core's limit lets the core itself judge
    // (and close with 1009) a frame that is only somewhat too big; anything larger is
    // refused by tungstenite before it is read, and reported to the session.
    let max = config.limits().max_message_bytes.saturating_mul(2);
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let ws = tungstenite::accept_with_config(stream, Some(ws_config))
        .map_err(|error| io::Error::other(format!("handshake failed: {error}")))?;

    let (outbox, inbox) = mpsc::sync_channel(options.outbox_capacity.max(1));
    let conn = {
        let mut shared = lock(&shared);
        let conn = shared.hub.connect();
        shared.outboxes.insert(conn, outbox);
        conn
    };
    eprintln!("{peer}: connected as {conn:?}");
    let mut connection = Connection {
        max_recipients: config.limits().max_recipients,
        session: ServerSession::new(config, clock()),
        ws,
        conn,
        peer,
        shared,
        inbox,
        poll_interval: options.poll_interval.max(MIN_WAIT),
        writable: true,
        readable: true,
        closed: false,
        left: false,
    };
    connection.run();
    connection.linger();
    Ok(())
    // Dropping `connection` leaves the hub (if the session did not already) and closes
    // the socket.
}

/// One connection: its socket, its session and its place in the hub.
struct Connection {
    ws: WebSocket<TcpStream>,
    session: ServerSession,
    conn: ConnId,
    peer: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    inbox: Receiver<Action>,
    /// The most ids a relayed `BROADCAST` may address.
    max_recipients: usize,
    poll_interval: Duration,
    /// False once a write failed: the transport is gone.
    writable: bool,
    /// False once tungstenite's reader failed: its state is no longer trustworthy.
    readable: bool,
    /// True once the session reported `Closed`.
    closed: bool,
    /// True once removed from the hub.
    left: bool,
}

impl Connection {
    /// The run loop: fire due timers, drain the session's outputs, take routed frames
    /// (including any this connection just routed to itself) and drain again, then block
    /// in `read` until a frame, the next deadline or the next poll.
    fn run(&mut self) {
        loop {
            let now = clock();
            if self.session.poll_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.drain(now);
            self.take_inbox();
            self.drain(now);
            if self.closed {
                return;
            }
            self.read();
        }
    }

    /// Hand what other connections routed here to the session.
    fn take_inbox(&mut self) {
        loop {
            // Both commands fail only when the session is closed, and then there is
            // nothing left to do for this connection anyway.
            match self.inbox.try_recv() {
                Ok(Action::Write(frame)) => {
                    let _ = self.session.send(frame);
                }
                Ok(Action::Close(close)) => {
                    let _ = self.session.disconnect(close);
                }
                Ok(Action::Ignore) => {}
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // A sender found the outbox full and dropped it: this client reads
                    // slower than it is sent to.
                    let close = Close::new(CloseCode::TRY_AGAIN_LATER, "send queue overflowed");
                    let _ = self.session.disconnect(close);
                    return;
                }
            }
        }
    }

    /// Drain the session: every transmit, then one event (which may queue more
    /// transmits), until both are empty; then write the transmits, in order.
    ///
    /// Nothing reaches the socket before every event of the batch is handled. That
    /// matters for op 22: `accept` queues it *before* the `Authenticated` event, and a
    /// client that reacts to op 22 by asking for a send to its own id must find that id
    /// in the hub already.
    fn drain(&mut self, now: Instant) {
        loop {
            let mut batch = Vec::new();
            loop {
                batch.extend(std::iter::from_fn(|| self.session.poll_transmit()));
                match self.session.poll_event() {
                    Some(event) => self.handle_event(now, event),
                    None => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            for transmit in batch {
                self.transmit(now, transmit);
            }
            if self.writable {
                if let Err(error) = self.ws.flush() {
                    self.transport_failed(now, &error);
                }
            }
            // A failed write closed the session: go round once more for its `Closed`.
        }
    }

    /// Write one output of the session to the socket.
    fn transmit(&mut self, now: Instant, transmit: Transmit) {
        if !self.writable {
            return;
        }
        let written = match transmit {
            // One copy into tungstenite's frame; the `Frame` itself stays shared.
            Transmit::Text(frame) => self.ws.write(WsMessage::Text(frame.as_str().into())),
            // `close` queues the close frame and flushes it.
            Transmit::Close(close) => self.ws.close(Some(close_frame(&close))),
        };
        if let Err(error) = written {
            self.transport_failed(now, &error);
        }
    }

    /// A write failed: nothing more can be written, and the session learns the
    /// transport dropped.
    fn transport_failed(&mut self, now: Instant, error: &tungstenite::Error) {
        if self.writable {
            eprintln!("{}: write failed: {error}", self.peer);
        }
        self.writable = false;
        self.session.handle_peer_closed(now, None);
    }

    /// Answer what the session reports.
    fn handle_event(&mut self, now: Instant, event: SessionEvent) {
        match event {
            SessionEvent::AuthenticationRequested { credentials, .. } => {
                let answer = match mesa_core::dev_authenticate(&credentials) {
                    Ok((id, user)) => self.session.accept(now, id, user),
                    Err(reason) => self.session.reject(now, reason),
                };
                if let Err(error) = answer {
                    // Cannot happen: the event means exactly one request is pending.
                    eprintln!("{}: authentication answer refused: {error}", self.peer);
                }
            }
            SessionEvent::Authenticated { id, initial, .. } => {
                lock(&self.shared).hub.authenticate(self.conn, &id);
                if initial {
                    eprintln!("{}: authenticated as {id:?}", self.peer);
                }
            }
            SessionEvent::Message(message) => self.relay(message),
            // Sync is off in this server, so these never come; answering with nothing
            // stored keeps the session correct if it were turned on.
            SessionEvent::LoadUndelivered { .. } => {
                let _ = self.session.handle_undelivered(now, Vec::new());
            }
            // Rooms are off in this example: these never come.
            SessionEvent::ClearUndelivered { .. }
            | SessionEvent::Redelivered { .. }
            | SessionEvent::HeartbeatMissed { .. }
            | SessionEvent::Extended { .. }
            | SessionEvent::Room(_) => {}
            SessionEvent::Closed { close, by_peer } => {
                let side = if by_peer { "peer" } else { "server" };
                eprintln!("{}: closed by {side}: {close}", self.peer);
                self.leave();
                self.closed = true;
            }
        }
    }

    /// ECHO back to the sender; BROADCAST through the hub to every target's outbox.
    fn relay(&mut self, message: Message) {
        // The relay ignores everything but ECHO and BROADCAST.
        let action = mesa_core::relay(message, self.max_recipients);
        let Some((message, recipients)) = action.and_then(|a| a.answer(&mut self.session)) else {
            return;
        };
        let mut shared = lock(&self.shared);
        let delivery = shared.hub.send(&message, &recipients);
        if delivery.action == Action::Ignore {
            return;
        }
        for target in delivery.targets {
            let Some(outbox) = shared.outboxes.get(&target) else {
                continue; // already overflowed, or leaving
            };
            if let Err(TrySendError::Full(_)) = outbox.try_send(delivery.action.clone()) {
                // Dropping the only sender tells the target to close with 1013.
                shared.outboxes.remove(&target);
            }
        }
    }

    /// Block until a frame arrives or it is time to look at timers and the outbox,
    /// and feed what arrived to the session.
    fn read(&mut self) {
        let now = clock();
        let wait = self
            .session
            .poll_timeout()
            .map_or(self.poll_interval, |at| at.saturating_duration_since(now))
            .clamp(MIN_WAIT, self.poll_interval);
        if self.session.read_paused_until().is_some() {
            // Past its message rate: the peer's frames wait in TCP until the run loop
            // fires the session's timer (a deadline no later than `wait`).
            pause(wait);
            return;
        }
        if let Err(error) = self.ws.get_ref().set_read_timeout(Some(wait)) {
            self.transport_failed(now, &error.into());
            return;
        }
        let read = self.ws.read();
        let now = clock();
        if read.as_ref().is_err_and(|error| !is_timeout(error)) {
            // tungstenite's reader is not meant to be used again after an error.
            self.readable = false;
        }
        match read {
            Ok(WsMessage::Text(text)) => self.session.handle_frame(now, text.as_str()),
            Ok(WsMessage::Binary(_)) => self.session.handle_binary(now),
            Ok(WsMessage::Close(frame)) => {
                let close = frame.map(|frame| {
                    let reason = frame.reason.as_str().to_owned();
                    Close::new(CloseCode(u16::from(frame.code)), reason)
                });
                self.session.handle_peer_closed(now, close);
            }
            // tungstenite answers pings itself; they count toward the message rate.
            Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => self.session.handle_control(now),
            Ok(WsMessage::Frame(_)) => {}
            // Nothing arrived before the wake-up; tungstenite keeps any partial frame.
            Err(error) if is_timeout(&error) => {}
            // The session picks the close code (1009, 1007) for what the transport refused.
            Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                let error = DecodeError::TooBig {
                    len: size,
                    max: max_size,
                };
                self.session.handle_invalid(now, error);
            }
            Err(tungstenite::Error::Utf8(_)) => {
                self.session.handle_invalid(now, DecodeError::InvalidUtf8);
            }
            // The peer reset the connection or broke the WebSocket framing.
            Err(_) => {
                self.writable = false;
                self.session.handle_peer_closed(now, None);
            }
        }
    }

    /// After the session closed, finish the closing handshake: send our reply to the
    /// peer's close, or wait (bounded) for the peer's reply to ours, so the close frame
    /// reaches the peer before the socket goes away. Closing a socket with unread input
    /// resets the connection, and a reset can destroy the close frame in flight.
    fn linger(&mut self) {
        if !self.writable {
            return;
        }
        let deadline = clock() + LINGER;
        let mut discard = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(clock());
            if left.is_zero() || self.ws.get_ref().set_read_timeout(Some(left)).is_err() {
                return;
            }
            let more = if self.readable {
                // Anything but an error is a late frame from the peer: discard it.
                self.ws.read().is_ok()
            } else {
                // The frame reader failed (e.g. a frame too big): discard raw bytes.
                matches!(self.ws.get_mut().read(&mut discard), Ok(n) if n > 0)
            };
            if !more {
                return;
            }
        }
    }

    /// Remove this connection from the hub and drop its outbox (once).
    fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        let mut shared = lock(&self.shared);
        shared.hub.disconnect(self.conn);
        shared.outboxes.remove(&self.conn);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Also on a panic: a dead thread must not stay routable.
        self.leave();
    }
}

/// Whether a read error only means the read timeout expired.
fn is_timeout(error: &tungstenite::Error) -> bool {
    matches!(
        error,
        tungstenite::Error::Io(error)
            if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    )
}

/// The WebSocket close frame for a session's close, its reason cut to fit.
fn close_frame(close: &Close) -> CloseFrame {
    CloseFrame {
        code: WsCloseCode::from(close.code.0),
        reason: Utf8Bytes::from(truncate(&close.reason, MAX_CLOSE_REASON)),
    }
}

/// Cut `text` to at most `max` bytes at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
