//! Simulated WebSockets between clients and servers: frames in flight with a
//! latency, in order per direction, that a cut or a black hole loses; and a client
//! (a real [`ClientSession`]) that writes to them and reads from them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::client::{ClientEvent, ClientSession, ClientTransmit};
use crate::close::Close;
use crate::hub::ConnId;

/// What travels on a simulated WebSocket.
#[derive(Debug, Clone)]
pub enum Packet {
    /// A text frame.
    Text(String),
    /// A close frame.
    Close(Close),
}

/// One simulated WebSocket between client `client` and connection `conn` of server
/// `server`.
#[derive(Debug)]
pub struct Link {
    /// The client's index.
    pub client: usize,
    /// The server's index (0 for a lone server).
    pub server: usize,
    /// The connection's handle on that server.
    pub conn: ConnId,
    /// Frames on their way to the server, delivered in order at their time.
    pub to_server: VecDeque<(Instant, Packet)>,
    /// Frames on their way to the client.
    pub to_client: VecDeque<(Instant, Packet)>,
    /// Frames vanish without a trace (a half-open TCP connection).
    pub black_hole: bool,
    /// The client stopped reading (it sent or received a close, or was cut).
    pub client_done: bool,
    /// The server stopped reading.
    pub server_done: bool,
}

impl Link {
    /// A new, empty link.
    pub fn new(client: usize, server: usize, conn: ConnId) -> Self {
        Link {
            client,
            server,
            conn,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            black_hole: false,
            client_done: false,
            server_done: false,
        }
    }

    /// The next frame due to the server at `now`, if any.
    pub fn pop_to_server(&mut self, now: Instant) -> Option<Packet> {
        pop_due(&mut self.to_server, now)
    }

    /// The next frame due to the client at `now`, if any.
    pub fn pop_to_client(&mut self, now: Instant) -> Option<Packet> {
        pop_due(&mut self.to_client, now)
    }

    /// Both sides see the transport end: whatever is in flight is lost.
    pub fn cut(&mut self) {
        self.client_done = true;
        self.server_done = true;
        self.to_server = VecDeque::new();
        self.to_client = VecDeque::new();
    }
}

/// The first frame of `queue` if it is due; a queue left empty gives its memory
/// back (most links are idle most of the time, and a million of them add up).
fn pop_due(queue: &mut VecDeque<(Instant, Packet)>, now: Instant) -> Option<Packet> {
    match queue.front() {
        Some((at, _)) if *at <= now => {
            let packet = queue.pop_front().map(|(_, p)| p);
            if queue.is_empty() {
                *queue = VecDeque::new();
            }
            packet
        }
        _ => None,
    }
}

/// What a simulated client keeps of what happens to it.
pub trait ClientRecorder {
    /// The session emitted `event`.
    fn event(&mut self, now: Instant, event: ClientEvent);
    /// The client wrote `frame` (before it travels).
    fn sent(&mut self, _frame: &str) {}
    /// The client started a connection attempt.
    fn connecting(&mut self, _now: Instant) {}
}

/// Everything a client observed: the single-server simulation's log.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// Every event, with its time.
    pub events: Vec<(Instant, ClientEvent)>,
    /// Every frame the client wrote, in order.
    pub sent: Vec<String>,
    /// When each connection attempt started.
    pub connects: Vec<Instant>,
}

impl ClientRecorder for ClientLog {
    fn event(&mut self, now: Instant, event: ClientEvent) {
        self.events.push((now, event));
    }

    fn sent(&mut self, frame: &str) {
        self.sent.push(frame.to_owned());
    }

    fn connecting(&mut self, now: Instant) {
        self.connects.push(now);
    }
}

impl ClientLog {
    /// The application messages received, in order.
    pub fn messages(&self) -> Vec<&crate::wire::Message> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                ClientEvent::Message(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// How many events match `pred`.
    pub fn count(&self, pred: impl Fn(&ClientEvent) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| pred(e)).count()
    }
}

/// What draining a client asks of the simulation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct ClientFlush {
    /// A connection attempt resolves then.
    pub connect_at: Option<Instant>,
    /// A frame was put on this link, due then.
    pub link_due: Option<(usize, Instant)>,
}

/// A simulated client: its session, its current link, and its recorder.
#[derive(Debug)]
pub struct SimClient<R> {
    /// The client's state machine.
    pub session: ClientSession,
    /// What it observed.
    pub log: R,
    /// The link it is connected by, if any.
    pub link: Option<usize>,
    /// A connection attempt resolves at this time.
    pub connecting: Option<Instant>,
}

impl<R: ClientRecorder> SimClient<R> {
    /// A client that has not connected yet.
    pub fn new(session: ClientSession, log: R) -> Self {
        SimClient {
            session,
            log,
            link: None,
            connecting: None,
        }
    }

    /// Drain the session's outputs and execute them: frames go on the current link
    /// (arriving after `latency`), a connect resolves after `latency`.
    pub fn flush(&mut self, now: Instant, latency: Duration, links: &mut [Link]) -> ClientFlush {
        let mut flush = ClientFlush::default();
        while let Some(transmit) = self.session.poll_transmit() {
            match transmit {
                ClientTransmit::Connect => {
                    self.log.connecting(now);
                    self.connecting = Some(now + latency);
                    flush.connect_at = self.connecting;
                }
                ClientTransmit::Text(frame) => {
                    self.log.sent(frame.as_str());
                    if let Some(link) = self.link {
                        let packet = Packet::Text(frame.as_str().into());
                        links[link].to_server.push_back((now + latency, packet));
                        flush.link_due = Some((link, now + latency));
                    }
                }
                ClientTransmit::Close(close) => {
                    self.connecting = None;
                    if let Some(link) = self.link.take() {
                        links[link].client_done = true;
                        let packet = Packet::Close(close);
                        links[link].to_server.push_back((now + latency, packet));
                        flush.link_due = Some((link, now + latency));
                    }
                }
            }
        }
        while let Some(event) = self.session.poll_event() {
            self.log.event(now, event);
        }
        flush
    }

    /// Fire the session's timers if they are due at `now`, then drain.
    pub fn tick(&mut self, now: Instant, latency: Duration, links: &mut [Link]) -> ClientFlush {
        if self.session.poll_timeout().is_none_or(|at| at > now) {
            return ClientFlush::default();
        }
        self.session.handle_timeout(now);
        self.flush(now, latency, links)
    }

    /// A frame arrived on `link` (ignored unless it is the client's current, open
    /// link), then drain.
    pub fn receive(
        &mut self,
        now: Instant,
        latency: Duration,
        links: &mut [Link],
        link: usize,
        packet: Packet,
    ) -> ClientFlush {
        if links[link].black_hole || links[link].client_done || self.link != Some(link) {
            return ClientFlush::default();
        }
        match packet {
            Packet::Text(text) => self.session.handle_frame(now, &text),
            Packet::Close(close) => {
                links[link].client_done = true;
                self.link = None;
                self.session.handle_closed(now, Some(close));
            }
        }
        self.flush(now, latency, links)
    }

    /// The transport dropped (no close frame): the client sees it end.
    pub fn drop_transport(
        &mut self,
        now: Instant,
        latency: Duration,
        links: &mut [Link],
    ) -> ClientFlush {
        if self.link.take().is_none() {
            return ClientFlush::default();
        }
        self.session.handle_closed(now, None);
        self.flush(now, latency, links)
    }
}
