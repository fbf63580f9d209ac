//! A deterministic simulation of Mesa servers and clients (quinn's `Pair`, str0m's
//! `progress`): real `ServerSession`s and `ClientSession`s joined by an in-memory,
//! seeded link with latency, disconnects and black holes, on a virtual clock that
//! jumps straight to the next deadline. No sockets, no sleeps.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesa_core::rng::Rng;
use mesa_core::rooms::{RefusalCode, RoomNotice, RoomRefusal, RoomRequest};
pub use mesa_core::sim::net::ClientLog;
use mesa_core::sim::net::{Link, Packet, SimClient};
use mesa_core::{
    Action, ClientConfig, ClientSession, Close, ConnId, Hub, Message, Recipients, ServerConfig,
    ServerSession, SessionEvent, Transmit, dev_authenticate, relay,
};

/// What the server side observed for one connection.
#[derive(Debug, Default)]
pub struct ConnLog {
    pub client: usize,
    pub transmits: Vec<Transmit>,
    pub events: Vec<SessionEvent>,
    /// Frames the session transmitted after its close (must stay empty).
    pub after_close: usize,
}

pub struct Sim {
    pub now: Instant,
    pub start: Instant,
    rng: Rng,
    pub latency: Duration,
    pub server_up: bool,
    config: Arc<ServerConfig>,
    pub hub: Hub,
    pub sessions: BTreeMap<ConnId, ServerSession>,
    pub conn_logs: BTreeMap<ConnId, ConnLog>,
    /// The sync store ("Redis"): messages waiting for offline ids, oldest first.
    pub store: HashMap<String, Vec<Message>>,
    /// Whether sends to absent ids are stored (sync on).
    pub sync: bool,
    pub clients: Vec<SimClient<ClientLog>>,
    links: Vec<Link>,
    /// Number of times `drive_bounded` hit its bound.
    pub steps: usize,
}

impl Sim {
    pub fn new(config: ServerConfig, seed: u64) -> Self {
        // The one clock read of the simulation: every later instant is `start + offset`.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        Sim {
            now: start,
            start,
            rng: Rng::new(seed),
            latency: Duration::from_millis(5),
            server_up: true,
            sync: config.sync().is_some(),
            config: Arc::new(config),
            hub: Hub::deciding_presence(false),
            sessions: BTreeMap::new(),
            conn_logs: BTreeMap::new(),
            store: HashMap::new(),
            clients: Vec::new(),
            links: Vec::new(),
            steps: 0,
        }
    }

    pub fn with_auth_required(mut self) -> Self {
        self.hub = Hub::deciding_presence(true);
        self
    }

    /// Add a client (not yet connected); returns its index.
    pub fn add_client(&mut self, config: ClientConfig) -> usize {
        let seed = self.rng.next_u64();
        let session = ClientSession::new(config, seed).expect("valid client config");
        self.clients
            .push(SimClient::new(session, ClientLog::default()));
        self.clients.len() - 1
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    // ----- driving clients -----

    pub fn connect(&mut self, c: usize) {
        self.clients[c].session.connect(self.now).expect("connect");
        self.flush_client(c);
    }

    pub fn authenticate(&mut self, c: usize, token: &str, should_sync: bool) {
        let credentials = serde_json::json!({ "token": token });
        self.clients[c]
            .session
            .authenticate(self.now, credentials, should_sync)
            .expect("auth");
        self.flush_client(c);
    }

    pub fn send(&mut self, c: usize, message: Message) -> Result<(), mesa_core::ClientError> {
        let result = self.clients[c].session.send(self.now, message);
        self.flush_client(c);
        result
    }

    /// Run a command on client `c`'s session now, then carry out what it decided.
    pub fn command<T>(
        &mut self,
        c: usize,
        command: impl FnOnce(&mut ClientSession, Instant) -> T,
    ) -> T {
        let result = command(&mut self.clients[c].session, self.now);
        self.flush_client(c);
        result
    }

    pub fn disconnect(&mut self, c: usize, close: Close) {
        self.clients[c]
            .session
            .disconnect(self.now, close)
            .expect("disconnect");
        self.flush_client(c);
    }

    /// Send a raw frame from client `c` on its current link (bypassing its session).
    pub fn inject(&mut self, c: usize, text: &str) {
        let link = self.clients[c].link.expect("client has a link");
        let at = self.now + self.latency;
        self.links[link]
            .to_server
            .push_back((at, Packet::Text(text.to_owned())));
    }

    // ----- faults -----

    /// Whether client `c` has frames on the way to or from the server.
    pub fn in_flight(&self, c: usize) -> bool {
        self.clients[c].connecting.is_some()
            || self.clients[c].link.is_some_and(|l| {
                !self.links[l].to_server.is_empty() || !self.links[l].to_client.is_empty()
            })
    }

    /// Bring a crashed server back.
    pub fn restart_server(&mut self) {
        self.server_up = true;
    }

    /// Drop client `c`'s connection: both sides see the transport end (no close frame).
    pub fn cut(&mut self, c: usize) {
        if let Some(link) = self.clients[c].link {
            let conn = self.links[link].conn;
            self.links[link].cut();
            let _ = self.clients[c].drop_transport(self.now, self.latency, &mut self.links);
            if let Some(session) = self.sessions.get_mut(&conn) {
                session.handle_peer_closed(self.now, None);
            }
            self.flush_server(conn);
        }
    }

    /// Make client `c`'s connection a black hole: frames vanish, nobody is told.
    pub fn black_hole(&mut self, c: usize) {
        if let Some(link) = self.clients[c].link {
            self.links[link].black_hole = true;
        }
    }

    /// Stop the server: every connection drops and new ones are refused.
    pub fn crash_server(&mut self) {
        self.server_up = false;
        for c in 0..self.clients.len() {
            self.cut(c);
        }
    }

    // ----- the clock -----

    fn next_deadline(&self) -> Option<Instant> {
        // A server paused for its message rate reads nothing before its own timer.
        let links = self.links.iter().flat_map(|l| {
            l.to_server
                .front()
                .filter(|_| !self.reading_paused(l.conn))
                .map(|(t, _)| *t)
                .into_iter()
                .chain(l.to_client.front().map(|(t, _)| *t))
        });
        let sessions = self
            .sessions
            .values()
            .filter_map(ServerSession::poll_timeout);
        let clients = self
            .clients
            .iter()
            .flat_map(|c| c.session.poll_timeout().into_iter().chain(c.connecting));
        links.chain(sessions).chain(clients).min()
    }

    /// Advance to the next deadline (no further than `limit`) and process everything due.
    /// Returns false when nothing is scheduled before `limit`.
    pub fn step(&mut self, limit: Instant) -> bool {
        let Some(next) = self.next_deadline() else {
            self.now = self.now.max(limit);
            return false;
        };
        if next > limit {
            self.now = self.now.max(limit);
            return false;
        }
        self.now = self.now.max(next);
        self.process_due();
        true
    }

    /// Run the simulation for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let limit = self.now + duration;
        let mut guard = 0;
        while self.step(limit) {
            guard += 1;
            assert!(
                guard < 1_000_000,
                "livelock: over a million steps in {duration:?}"
            );
        }
    }

    /// Step until `done` holds, at most `max_steps` steps (a livelock guard) and at most
    /// `max_time` of virtual time. Returns whether `done` held.
    pub fn drive_bounded(
        &mut self,
        max_steps: usize,
        max_time: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let limit = self.now + max_time;
        for _ in 0..max_steps {
            if done(self) {
                return true;
            }
            if !self.step(limit) {
                return done(self);
            }
        }
        self.steps += 1;
        done(self)
    }

    fn process_due(&mut self) {
        let now = self.now;
        // Connection attempts that resolve now.
        for c in 0..self.clients.len() {
            if self.clients[c].connecting.is_some_and(|t| t <= now) {
                self.clients[c].connecting = None;
                self.resolve_connect(c);
            }
        }
        // Frames due now, in order per link; a server paused for its message rate
        // leaves them in flight, as a real one leaves them in TCP.
        for link in 0..self.links.len() {
            while !self.reading_paused(self.links[link].conn)
                && self.links[link]
                    .to_server
                    .front()
                    .is_some_and(|(t, _)| *t <= now)
            {
                let (_, packet) = self.links[link].to_server.pop_front().expect("front");
                self.deliver_to_server(link, packet);
            }
            while self.links[link]
                .to_client
                .front()
                .is_some_and(|(t, _)| *t <= now)
            {
                let (_, packet) = self.links[link].to_client.pop_front().expect("front");
                self.deliver_to_client(link, packet);
            }
        }
        // Timers.
        let due: Vec<ConnId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
            .map(|(c, _)| *c)
            .collect();
        for conn in due {
            self.sessions
                .get_mut(&conn)
                .expect("session")
                .handle_timeout(now);
            self.flush_server(conn);
        }
        for c in 0..self.clients.len() {
            let _ = self.clients[c].tick(now, self.latency, &mut self.links);
        }
    }

    /// Whether the server side of `conn` has paused reading for its message rate.
    fn reading_paused(&self, conn: ConnId) -> bool {
        self.sessions
            .get(&conn)
            .is_some_and(|s| s.read_paused_until().is_some())
    }

    fn resolve_connect(&mut self, c: usize) {
        if !self.server_up {
            self.clients[c]
                .session
                .handle_connect_failed(self.now, "refused")
                .expect("connecting");
            self.flush_client(c);
            return;
        }
        let conn = self.hub.connect();
        self.links.push(Link::new(c, 0, conn));
        let link = self.links.len() - 1;
        self.clients[c].link = Some(link);
        self.sessions
            .insert(conn, ServerSession::new(self.config.clone(), self.now));
        self.conn_logs.insert(
            conn,
            ConnLog {
                client: c,
                ..ConnLog::default()
            },
        );
        self.flush_server(conn);
        self.clients[c]
            .session
            .handle_connected(self.now)
            .expect("connecting");
        self.flush_client(c);
    }

    fn deliver_to_server(&mut self, link: usize, packet: Packet) {
        let (conn, black_hole) = (self.links[link].conn, self.links[link].black_hole);
        if black_hole || self.links[link].server_done {
            return;
        }
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        match packet {
            Packet::Text(text) => session.handle_frame(self.now, &text),
            Packet::Close(close) => {
                self.links[link].server_done = true;
                session.handle_peer_closed(self.now, Some(close));
            }
        }
        self.flush_server(conn);
    }

    fn deliver_to_client(&mut self, link: usize, packet: Packet) {
        let c = self.links[link].client;
        let _ = self.clients[c].receive(self.now, self.latency, &mut self.links, link, packet);
    }

    /// Drain a client's outputs and execute them.
    fn flush_client(&mut self, c: usize) {
        let _ = self.clients[c].flush(self.now, self.latency, &mut self.links);
    }

    /// Drain a server session's outputs and execute them (the adapter's job).
    fn flush_server(&mut self, conn: ConnId) {
        let now = self.now;
        let link = self.links.iter().rposition(|l| l.conn == conn);
        loop {
            let Some(session) = self.sessions.get_mut(&conn) else {
                return;
            };
            if let Some(transmit) = session.poll_transmit() {
                let log = self.conn_logs.get_mut(&conn).expect("log");
                if log
                    .transmits
                    .iter()
                    .any(|t| matches!(t, Transmit::Close(_)))
                {
                    log.after_close += 1;
                }
                log.transmits.push(transmit.clone());
                if let Some(link) = link {
                    let packet = match transmit {
                        Transmit::Text(frame) => Packet::Text(frame.as_str().into()),
                        Transmit::Close(close) => {
                            self.links[link].server_done = true;
                            Packet::Close(close)
                        }
                    };
                    self.links[link]
                        .to_client
                        .push_back((now + self.latency, packet));
                }
                continue;
            }
            let Some(event) = session.poll_event() else {
                return;
            };
            self.conn_logs
                .get_mut(&conn)
                .expect("log")
                .events
                .push(event.clone());
            self.handle_session_event(conn, event);
            self.tell_presence(Some(conn));
        }
    }

    /// Deliver the room presence changes the hub decided.
    fn tell_presence(&mut self, from: Option<ConnId>) {
        while let Some(change) = self.hub.poll_presence() {
            if let Some((message, targets)) = self.hub.rooms().presence_delivery(&change) {
                self.apply(from, &Action::for_message(&message), &targets);
            }
        }
    }

    /// The application and the adapter's hub/sync work: dev auth, relay, a sync store.
    fn handle_session_event(&mut self, conn: ConnId, event: SessionEvent) {
        let now = self.now;
        match event {
            SessionEvent::AuthenticationRequested { credentials, .. } => {
                let session = self.sessions.get_mut(&conn).expect("session");
                match dev_authenticate(&credentials) {
                    Ok((id, user)) => session.accept(now, id, user).expect("pending"),
                    Err(reason) => session.reject(now, reason).expect("pending"),
                }
            }
            SessionEvent::Authenticated { id, .. } => {
                let _ = self.hub.authenticate(conn, &id);
            }
            SessionEvent::Message(message) => {
                let action = relay(message, self.config.limits().max_recipients);
                let session = self.sessions.get_mut(&conn).expect("session");
                if let Some((message, recipients)) = action.and_then(|a| a.answer(session)) {
                    self.deliver(Some(conn), &message, &recipients);
                }
            }
            SessionEvent::LoadUndelivered { id } => {
                let stored = self.store.get(&id).cloned().unwrap_or_default();
                let session = self.sessions.get_mut(&conn).expect("session");
                session
                    .handle_undelivered(now, stored)
                    .expect("sync pending");
            }
            SessionEvent::ClearUndelivered { id } => {
                self.store.remove(&id);
            }
            SessionEvent::Redelivered {
                id,
                delivered,
                dropped,
            } => {
                if let Some(stored) = self.store.get_mut(&id) {
                    stored.drain(..(delivered + dropped).min(stored.len()));
                    if stored.is_empty() {
                        self.store.remove(&id);
                    }
                }
            }
            SessionEvent::HeartbeatMissed { .. } => {}
            SessionEvent::Extended { .. } => self.hub.extend(conn),
            SessionEvent::Room(request) => self.room_request(conn, *request),
            SessionEvent::Closed { .. } => {
                let _ = self.hub.disconnect(conn);
                self.sessions.remove(&conn);
            }
        }
    }

    /// An open rooms policy: every subscribe and publish is allowed.
    fn room_request(&mut self, conn: ConnId, request: RoomRequest) {
        let max = self.config.limits().max_rooms_per_connection;
        let refused = RoomNotice::refused;
        let notice = match request {
            RoomRequest::Subscribe {
                room,
                reference,
                presence,
                ..
            } => match self.hub.join(conn, &room, max) {
                Ok(_) => {
                    self.hub.watch(conn, &room, presence);
                    RoomNotice::Subscribed {
                        room,
                        reference,
                        position: None,
                        recovered: None,
                    }
                }
                Err(refusal) => refused(room, reference, refusal),
            },
            RoomRequest::Presence { room, reference } => {
                let members = self.hub.check_member(conn, &room);
                let members = members.map(|()| self.hub.room_members(&room));
                let session = self.sessions.get_mut(&conn).expect("session");
                let _ = session.presence_answer(room, reference, members);
                return;
            }
            RoomRequest::Unsubscribe { room, reference } => match self.hub.leave(conn, &room) {
                Some(_) => RoomNotice::Unsubscribed { room, reference },
                None => {
                    let refusal = RoomRefusal::new(RefusalCode::NotSubscribed, "not in the room");
                    refused(room, reference, refusal)
                }
            },
            RoomRequest::Publish { room, message, .. } => {
                return self.publish(Some(conn), &message, &room);
            }
        };
        let session = self.sessions.get_mut(&conn).expect("session");
        let _ = session.room_notice(notice);
    }

    /// Publish to a room from the "application", as `ServerHandle::publish` would.
    pub fn server_publish(&mut self, message: &Message, room: &str) {
        self.publish(None, message, room);
    }

    fn publish(&mut self, from: Option<ConnId>, message: &Message, room: &str) {
        for (action, targets) in self.hub.rooms().deliveries(message, room) {
            self.apply(from, &action, &targets);
        }
    }

    /// Put every connection of `id` in `room`, as `ServerHandle::join_id` would.
    pub fn server_join_id(&mut self, id: &str, room: &str) {
        let max = self.config.limits().max_rooms_per_connection;
        for conn in self.hub.conns_of(id) {
            if self.hub.join(conn, room, max).is_ok() {
                let session = self.sessions.get_mut(&conn).expect("session");
                let notice = RoomNotice::Subscribed {
                    room: room.to_owned(),
                    reference: serde_json::Value::Null,
                    position: None,
                    recovered: None,
                };
                let _ = session.room_notice(notice);
                self.flush_server(conn);
            }
        }
    }

    /// Send from the "application" on the server side, as `Server::send` would.
    pub fn server_send(&mut self, message: &Message, recipients: &Recipients) {
        self.deliver(None, message, recipients);
    }

    /// Apply `action` to `targets`; `from` is the connection whose flush is in progress.
    fn apply(&mut self, from: Option<ConnId>, action: &Action, targets: &[ConnId]) {
        for target in targets {
            if let Some(session) = self.sessions.get_mut(target) {
                let _ = match action {
                    Action::Write(frame) => session.send(frame.clone()),
                    Action::Close(close) => session.disconnect(close.clone()),
                    Action::Ignore => Ok(()),
                };
            }
            if from != Some(*target) {
                self.flush_server(*target);
            }
        }
    }

    /// Execute a hub decision; `from` is the connection whose flush is in progress.
    fn deliver(&mut self, from: Option<ConnId>, message: &Message, recipients: &Recipients) {
        let delivery = self.hub.send(message, recipients);
        self.apply(from, &delivery.action, &delivery.targets);
        if self.sync {
            for id in delivery.absent {
                if mesa_core::sync::should_store(&id, None) {
                    self.store.entry(id).or_default().push(message.clone());
                }
            }
        }
    }
}
