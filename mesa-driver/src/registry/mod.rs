//! The server's shared registry: the core that knows who is connected (the
//! [`Hub`], inside the cluster's [`Replica`] when the server is one of a cluster)
//! and each connection's outbox.
//!
//! Every input locks it briefly (no await inside), feeds the core, and executes
//! what the core decided at once: a local delivery's one encoded frame goes into
//! each target's outbox, Redis commands go to the cluster task's inbox, stored
//! messages to the connection waiting for them. What observers must hear is told
//! once the lock is released.

mod conn;
mod newest;
mod observer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures_channel::{mpsc, oneshot};
use mesa_core::recovery::Position;
use mesa_core::room_table::Joined;
use mesa_core::rooms::{RoomNotice, RoomRefusal, check_room};
use mesa_core::{
    Action, Close, Command, ConnId, EventInterest, Hub, Keys, Limits, Message, MessageOptions,
    Recipients, Replica, ReplicaEvent, SessionEvent, Token, TooManyRecipients,
};
use serde_json::Value;

use crate::outbox::{Outbound, Refused};
use newest::Newest;

pub(crate) use conn::{ConnShared, Identity, lock};
pub(crate) use observer::Observer;

/// What the cluster task receives from the registry.
#[derive(Debug)]
pub(crate) enum LinkWork {
    /// Execute this command; its reply goes back with the token.
    Command(Token, Command),
    /// The replica's next deadline changed: re-arm the timer.
    Rearm,
}

/// The core the registry feeds.
enum Core {
    /// A server on its own.
    Alone(Box<Hub>),
    /// A replica of a cluster (it owns the hub), the cluster task's inbox, and the
    /// replica's deadline the task last heard of.
    Cluster {
        replica: Box<Replica>,
        link: mpsc::UnboundedSender<LinkWork>,
        deadline: Option<Instant>,
    },
}

impl Core {
    fn hub(&self) -> &Hub {
        match self {
            Core::Alone(hub) => hub,
            Core::Cluster { replica, .. } => replica.hub(),
        }
    }
}

struct State {
    core: Core,
    conns: HashMap<ConnId, Arc<ConnShared>>,
    /// Connections admitted but still in their handshakes: they count toward the
    /// connection limit, so a burst of upgrades cannot overshoot it.
    handshaking: usize,
    /// The room counts last taken (rooms with a member, memberships).
    rooms_counted: (usize, usize),
}

/// What a send did here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendReport {
    /// Local connections the message was queued for.
    pub delivered: usize,
    /// Explicit recipient ids with no connection here.
    pub absent: Vec<String>,
    /// Connections that were closed instead, for not reading fast enough.
    pub overflowed: usize,
}

/// What an input decided that is acted on once the lock is released.
#[derive(Default)]
struct Effects {
    /// Messages queued for local connections, and for how many.
    sent: Vec<(Message, usize)>,
    /// Connections that overflowed instead (they are being closed).
    overflowed: usize,
    events: Vec<ReplicaEvent>,
    /// The room counts changed: observers are told the newest.
    rooms: bool,
}

impl Effects {
    /// Apply `action` to each target's outbox; `message` (taken only when someone
    /// got it, so a send to nobody here copies nothing) is what observers hear of.
    fn deliver(
        &mut self,
        conns: &HashMap<ConnId, Arc<ConnShared>>,
        message: impl FnOnce() -> Message,
        targets: &[ConnId],
        action: &Action,
    ) {
        let mut delivered = 0;
        for shared in targets.iter().filter_map(|target| conns.get(target)) {
            let item = match action {
                Action::Write(frame) => Outbound::Frame(frame.clone()),
                Action::Close(close) => Outbound::Close(close.clone()),
                Action::Ignore => return,
            };
            match shared.outbox.push(item) {
                Ok(()) => delivered += 1,
                Err(Refused::Overflow) => self.overflowed += 1,
                Err(Refused::Closed) => {}
            }
        }
        if delivered > 0 {
            self.sent.push((message(), delivered));
        }
    }
}

/// How a registry is set up.
pub(crate) struct Settings {
    /// Global sends skip unauthenticated connections (without a cluster; a
    /// replica has the setting in its configuration).
    pub(crate) auth_required: bool,
    /// Each connection's outbox cap, in bytes.
    pub(crate) outbound_cap: usize,
    /// The limits of what a peer controls (recipients, rooms).
    pub(crate) limits: Limits,
    pub(crate) observer: Arc<dyn Observer>,
    /// The runtime's clock.
    pub(crate) clock: Box<dyn Fn() -> Instant + Send + Sync>,
}

/// The registry shared by a server's connection tasks, handles and cluster task.
pub(crate) struct Registry {
    state: Mutex<State>,
    observer: Arc<dyn Observer>,
    /// The session events the core acts on: the others skip the lock.
    interest: EventInterest,
    clock: Box<dyn Fn() -> Instant + Send + Sync>,
    outbound_cap: usize,
    limits: Limits,
    /// Connection tasks still running, closing handshakes included (a connection
    /// leaves the hub first, then finishes writing its close frame).
    live: AtomicUsize,
    /// Told when the replica retired.
    retired: Mutex<Option<oneshot::Sender<()>>>,
    /// Who waits for which room presence query, and the next query's number.
    queries: Mutex<HashMap<u64, oneshot::Sender<Members>>>,
    next_query: AtomicU64,
    /// The room counts (rooms with a member, memberships) observers hear.
    room_counts: Newest<(usize, usize)>,
}

/// A room's members over the cluster, each id with its connections; or why Redis
/// could not tell.
pub(crate) type Members = Result<Vec<(String, u64)>, String>;

/// Counts a connection task as running until it is dropped.
pub(crate) struct LiveTask<'a>(&'a Registry);

impl Drop for LiveTask<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Registry {
    /// A registry for a server on its own, or for a replica of a cluster: then the
    /// receiver is the inbox its cluster task executes (the replica's first command,
    /// opening the link, is in it already).
    pub(crate) fn new(
        settings: Settings,
        replica: Option<Replica>,
    ) -> (Self, Option<mpsc::UnboundedReceiver<LinkWork>>) {
        let interest = replica
            .as_ref()
            .map_or(EventInterest::HUB, Replica::event_interest);
        let (core, inbox) = match replica {
            None => (
                Core::Alone(Box::new(Hub::deciding_presence(settings.auth_required))),
                None,
            ),
            Some(replica) => {
                let (link, inbox) = mpsc::unbounded();
                let core = Core::Cluster {
                    replica: Box::new(replica),
                    link,
                    deadline: None,
                };
                (core, Some(inbox))
            }
        };
        let registry = Registry {
            state: Mutex::new(State {
                core,
                conns: HashMap::new(),
                handshaking: 0,
                rooms_counted: (0, 0),
            }),
            observer: settings.observer,
            interest,
            clock: settings.clock,
            outbound_cap: settings.outbound_cap,
            limits: settings.limits,
            live: AtomicUsize::new(0),
            retired: Mutex::new(None),
            queries: Mutex::new(HashMap::new()),
            next_query: AtomicU64::new(0),
            room_counts: Newest::new(),
        };
        registry.feed(|_, _| ());
        (registry, inbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    // ----- admission and connections -----

    /// Take a connection slot when fewer than `max` connections are open or
    /// handshaking (always, without a limit).
    pub(crate) fn try_admit(&self, max: Option<usize>) -> bool {
        let mut state = self.lock();
        if max.is_some_and(|max| state.conns.len() + state.handshaking >= max) {
            return false;
        }
        state.handshaking += 1;
        true
    }

    /// Give back a slot [`try_admit`](Self::try_admit) took.
    pub(crate) fn release_admission(&self) {
        let mut state = self.lock();
        state.handshaking = state.handshaking.saturating_sub(1);
    }

    /// A connection opened: the core registers it.
    pub(crate) fn register(&self, remote: Option<SocketAddr>) -> Arc<ConnShared> {
        let now = (self.clock)();
        let mut state = self.lock();
        let conn = match &mut state.core {
            Core::Alone(hub) => hub.connect(),
            Core::Cluster { replica, .. } => replica.handle_connection_opened(now),
        };
        let shared = Arc::new(ConnShared::new(conn, remote, self.outbound_cap));
        state.conns.insert(conn, shared.clone());
        self.settle(state);
        shared
    }

    /// Feed an event of connection `conn`'s session to the core (its close goes
    /// through [`unregister`](Self::unregister)).
    pub(crate) fn session_event(&self, conn: ConnId, event: &SessionEvent) {
        if !self.interest.acts_on(event) {
            return;
        }
        let now = (self.clock)();
        let mut state = self.lock();
        match &mut state.core {
            Core::Alone(hub) => hub.handle_session_event(conn, event),
            Core::Cluster { replica, .. } => replica.handle_session_event(now, conn, event),
        }
        self.settle(state);
    }

    /// Connection `conn` closed: it leaves the core and its outbox refuses more.
    pub(crate) fn unregister(&self, conn: ConnId) {
        let now = (self.clock)();
        let mut state = self.lock();
        if let Some(shared) = state.conns.remove(&conn) {
            shared.outbox.close();
        }
        match &mut state.core {
            Core::Alone(hub) => drop(hub.disconnect(conn)),
            Core::Cluster { replica, .. } => replica.handle_connection_closed(now, conn),
        }
        self.settle(state);
    }

    // ----- sending -----

    /// Send to local connections now, and hand the rest to the cluster (without
    /// one, absent ids are reported undeliverable). A list over the recipient limit
    /// is refused before anything is done.
    pub(crate) fn send(
        &self,
        message: &Message,
        options: Option<&MessageOptions>,
        recipients: &Recipients,
    ) -> Result<SendReport, TooManyRecipients> {
        let now = (self.clock)();
        let mut state = self.lock();
        let (effects, absent) = match &mut state.core {
            Core::Alone(hub) => {
                recipients.at_most(self.limits.max_recipients)?;
                let delivery = hub.send(message, recipients);
                let mut effects = Effects::default();
                effects.deliver(
                    &state.conns,
                    || message.clone(),
                    &delivery.targets,
                    &delivery.action,
                );
                (effects, delivery.absent)
            }
            Core::Cluster { replica, .. } => {
                let sent = replica.handle_send(now, message, options, recipients)?;
                (drain(&mut state), sent.absent)
            }
        };
        let alone = matches!(state.core, Core::Alone(_));
        drop(state);
        let report = SendReport {
            delivered: effects.sent.iter().map(|(_, delivered)| delivered).sum(),
            overflowed: effects.overflowed,
            absent,
        };
        if alone && !report.absent.is_empty() {
            self.observer.undeliverable(message, &report.absent);
        }
        self.act(effects);
        Ok(report)
    }

    /// Close every connection with `close`.
    pub(crate) fn close_all(&self, close: &Close) {
        let state = self.lock();
        for shared in state.conns.values() {
            let _ = shared.outbox.push(Outbound::Close(close.clone()));
        }
    }

    // ----- rooms -----

    /// Put `conn` in `room`, hearing who joins and leaves it when `presence` (an
    /// extended connection only). A join the server decided on its own (`notify`) is
    /// told to an extended connection (`mesa:subscribed` without a ref); one
    /// answering the client's request (`subscribe`: its reference, and the position
    /// it resumes from) is answered by its session, unless the replica answers it
    /// ([`Joined::deferred`]: a recoverable room).
    pub(crate) fn join(
        &self,
        conn: ConnId,
        room: &str,
        notify: bool,
        presence: bool,
        subscribe: Option<(Value, Option<Position>)>,
    ) -> Result<Joined, RoomRefusal> {
        check_room(room, &self.limits)?;
        let now = (self.clock)();
        let max = self.limits.max_rooms_per_connection;
        let mut state = self.lock();
        let joined = match &mut state.core {
            Core::Alone(hub) => {
                let joined = hub.join(conn, room, max)?;
                hub.watch(conn, room, presence);
                joined
            }
            Core::Cluster { replica, .. } => {
                let (reference, since) = subscribe.unwrap_or((Value::Null, None));
                let joined = replica.handle_subscribe(now, conn, room, reference, since)?;
                replica.handle_watch(conn, room, presence);
                joined
            }
        };
        if notify && !joined.already && !joined.deferred {
            tell(&state, conn, room, true);
        }
        self.settle(state);
        Ok(joined)
    }

    /// Whether member `conn` of `room` hears who joins and leaves it (see
    /// [`Hub::watch`]); whether it does now.
    pub(crate) fn watch(&self, conn: ConnId, room: &str, on: bool) -> bool {
        let mut state = self.lock();
        let watching = match &mut state.core {
            Core::Alone(hub) => hub.watch(conn, room, on),
            Core::Cluster { replica, .. } => replica.handle_watch(conn, room, on),
        };
        self.settle(state);
        watching
    }

    /// Take `conn` out of `room`; whether it was in it. A leave the server decided on
    /// its own (`notify`) is told to an extended connection.
    pub(crate) fn leave(&self, conn: ConnId, room: &str, notify: bool) -> bool {
        let now = (self.clock)();
        let mut state = self.lock();
        let left = match &mut state.core {
            Core::Alone(hub) => hub.leave(conn, room).is_some(),
            Core::Cluster { replica, .. } => replica.handle_leave(now, conn, room),
        };
        if notify && left {
            tell(&state, conn, room, false);
        }
        self.settle(state);
        left
    }

    /// The connections of `id` here.
    pub(crate) fn conns_of(&self, id: &str) -> Vec<ConnId> {
        self.lock().core.hub().conns_of(id)
    }

    /// Send `message` to the members of `room`: here at once, on the other replicas
    /// through the room's channel.
    pub(crate) fn publish(&self, message: &Message, room: &str) -> Result<SendReport, RoomRefusal> {
        check_room(room, &self.limits)?;
        let now = (self.clock)();
        let mut state = self.lock();
        let effects = match &mut state.core {
            Core::Alone(hub) => {
                let mut effects = Effects::default();
                for (action, targets) in hub.rooms().deliveries(message, room) {
                    effects.deliver(&state.conns, || message.clone(), &targets, &action);
                }
                effects
            }
            Core::Cluster { replica, .. } => {
                replica.handle_room_send(now, message, room);
                drain(&mut state)
            }
        };
        drop(state);
        let report = SendReport {
            delivered: effects.sent.iter().map(|(_, delivered)| delivered).sum(),
            overflowed: effects.overflowed,
            absent: Vec::new(),
        };
        self.act(effects);
        Ok(report)
    }

    /// Who is in `room`: on a server alone, its members here; in a cluster, Redis's
    /// record of every replica's.
    pub(crate) fn room_members(
        &self,
        room: &str,
    ) -> Result<oneshot::Receiver<Members>, RoomRefusal> {
        check_room(room, &self.limits)?;
        let (reply, members) = oneshot::channel();
        let query = self.next_query.fetch_add(1, Ordering::SeqCst);
        lock(&self.queries).insert(query, reply);
        let asked = self.feed(|replica, now| replica.handle_room_members(now, query, room));
        if asked.is_none() {
            let here = self.lock().core.hub().room_members(room);
            if let Some(reply) = lock(&self.queries).remove(&query) {
                let _ = reply.send(Ok(here));
            }
        }
        Ok(members)
    }

    /// A client's presence request: who is in `room`, asked by member `conn` (else
    /// refused with `not_subscribed`).
    pub(crate) fn presence_request(
        &self,
        conn: ConnId,
        room: &str,
    ) -> Result<oneshot::Receiver<Members>, RoomRefusal> {
        self.lock().core.hub().check_member(conn, room)?;
        self.room_members(room)
    }

    /// Rooms with a member here, and memberships over all of them.
    pub(crate) fn room_counts(&self) -> (usize, usize) {
        let state = self.lock();
        let rooms = state.core.hub().rooms();
        (rooms.len(), rooms.memberships())
    }

    // ----- the cluster -----

    /// Feed one input to the replica (nothing without a cluster) and execute what
    /// it decided; `input` gets the replica and the time.
    pub(crate) fn feed<T>(&self, input: impl FnOnce(&mut Replica, Instant) -> T) -> Option<T> {
        let now = (self.clock)();
        let mut state = self.lock();
        let Core::Cluster { replica, .. } = &mut state.core else {
            return None;
        };
        let output = input(replica, now);
        self.settle(state);
        Some(output)
    }

    /// Read the replica (nothing without a cluster).
    pub(crate) fn replica<T>(&self, read: impl FnOnce(&Replica) -> T) -> Option<T> {
        match &self.lock().core {
            Core::Alone(_) => None,
            Core::Cluster { replica, .. } => Some(read(replica)),
        }
    }

    /// Where the replica keeps its data in Redis.
    pub(crate) fn keys(&self) -> Option<Keys> {
        self.replica(|replica| replica.keys().clone())
    }

    /// Leave the cluster: the receiver completes once the replica retired (`None`
    /// without a cluster).
    pub(crate) fn retire(&self) -> Option<oneshot::Receiver<()>> {
        let (reply, retired) = oneshot::channel();
        *lock(&self.retired) = Some(reply);
        self.feed(|replica, now| replica.handle_retire(now))?;
        Some(retired)
    }

    /// Execute what the last input decided, release the lock, then tell observers.
    fn settle(&self, mut state: MutexGuard<'_, State>) {
        let mut effects = drain(&mut state);
        let rooms = state.core.hub().rooms();
        let counts = (rooms.len(), rooms.memberships());
        if counts != state.rooms_counted {
            state.rooms_counted = counts;
            self.room_counts.set(counts);
            effects.rooms = true;
        }
        drop(state);
        self.act(effects);
    }

    /// Tell the observers, and whoever waits for the retirement.
    fn act(&self, effects: Effects) {
        if effects.rooms {
            let observer = &self.observer;
            self.room_counts
                .tell(|(rooms, memberships)| observer.rooms(rooms, memberships));
        }
        for (message, recipients) in &effects.sent {
            self.observer.message_sent(message, *recipients);
        }
        for event in &effects.events {
            match event {
                ReplicaEvent::Retired => {
                    if let Some(reply) = lock(&self.retired).take() {
                        let _ = reply.send(());
                    }
                }
                ReplicaEvent::RoomMembers { query, members, .. } => {
                    if let Some(reply) = lock(&self.queries).remove(query) {
                        let _ = reply.send(members.clone());
                    }
                }
                event => self.observer.replica_event(event),
            }
        }
    }

    // ----- reading -----

    /// Count a connection task as running for as long as the guard lives.
    pub(crate) fn live_task(&self) -> LiveTask<'_> {
        self.live.fetch_add(1, Ordering::SeqCst);
        LiveTask(self)
    }

    /// Connection tasks still running, closing handshakes included.
    pub(crate) fn live_tasks(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// The most distinct ids one send may address.
    pub(crate) fn max_recipients(&self) -> usize {
        self.limits.max_recipients
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    pub(crate) fn is_online(&self, id: &str) -> bool {
        self.lock().core.hub().is_online(id)
    }

    pub(crate) fn online_ids(&self) -> Vec<String> {
        self.lock()
            .core
            .hub()
            .online_ids()
            .map(str::to_owned)
            .collect()
    }
}

/// Tell an extended connection that the server put it in `room` (`joined`) or took
/// it out.
fn tell(state: &State, conn: ConnId, room: &str, joined: bool) {
    let extended = state.core.hub().rooms().is_extended(conn);
    let Some(shared) = state.conns.get(&conn).filter(|_| extended) else {
        return;
    };
    let (room, reference) = (room.to_owned(), Value::Null);
    let notice = if joined {
        RoomNotice::Subscribed {
            room,
            reference,
            position: None,
            recovered: None,
        }
    } else {
        RoomNotice::Unsubscribed { room, reference }
    };
    let _ = shared.outbox.push(Outbound::Frame(notice.encode()));
}

/// Execute what the core decided (alone, only the room presence changes its hub
/// decided): deliveries into the outboxes,
/// commands into the cluster task's inbox (with a re-arm when the deadline moved),
/// stored messages to their connections; the rest is returned for [`Registry::act`].
fn drain(state: &mut State) -> Effects {
    let mut effects = Effects::default();
    let State { core, conns, .. } = state;
    let (replica, link, deadline) = match core {
        Core::Cluster {
            replica,
            link,
            deadline,
        } => (replica, link, deadline),
        Core::Alone(hub) => {
            while let Some(change) = hub.poll_presence() {
                if let Some((message, targets)) = hub.rooms().presence_delivery(&change) {
                    let action = Action::for_message(&message);
                    effects.deliver(conns, || message, &targets, &action);
                }
            }
            return effects;
        }
    };
    while let Some(delivery) = replica.poll_delivery() {
        let message = delivery.message;
        effects.deliver(conns, || message, &delivery.targets, &delivery.action);
    }
    while let Some((token, command)) = replica.poll_command() {
        // Closed only once the cluster task is gone with the server.
        let _ = link.unbounded_send(LinkWork::Command(token, command));
    }
    while let Some(event) = replica.poll_event() {
        match event {
            ReplicaEvent::Loaded { conn, messages, .. } => {
                if let Some(shared) = conns.get(&conn) {
                    shared.hand_stored(messages);
                }
            }
            event => effects.events.push(event),
        }
    }
    let next = replica.poll_timeout();
    if next != *deadline {
        *deadline = next;
        let _ = link.unbounded_send(LinkWork::Rearm);
    }
    effects
}
