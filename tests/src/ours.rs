//! Bounded waits on our own server and client (`mesa-tokio`).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use mesa_tokio::{ClientEvent, ClientEvents, Handler, Message, Server};
use tokio::time::{Instant, timeout_at};

use crate::WAIT;

/// `ws://addr/`.
pub fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

/// The value of the sample `series` (name and labels, exactly as exposed) in a
/// rendering of `mesa_tokio::metrics::Metrics`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// Bind `server` to `addr` and run it in a task; returns the bound address. A port
/// still held by a server that was just shut down is tried again until [`WAIT`]
/// passes.
pub async fn serve<H: Handler>(server: &Server<H>, addr: SocketAddr) -> SocketAddr {
    let deadline = Instant::now() + WAIT;
    let listening = loop {
        match server.bind(addr).await {
            Ok(listening) => break listening,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot bind our server to {addr}: {error}"),
        }
    };
    let local = listening.local_addr();
    tokio::spawn(listening.run());
    local
}

/// Wait up to `timeout` for the client event matching `pred`, dropping the others;
/// panics with the skipped events when the time passes or the stream ends.
pub async fn next_event(
    events: &mut ClientEvents,
    what: &str,
    mut pred: impl FnMut(&ClientEvent) -> bool,
    timeout: Duration,
) -> ClientEvent {
    let deadline = Instant::now() + timeout;
    let mut skipped = Vec::new();
    loop {
        match timeout_at(deadline, StreamExt::next(events)).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("our client stopped before {what}; events: {skipped:#?}"),
            Err(_) => panic!("our client: no {what} within {timeout:?}; events: {skipped:#?}"),
        }
    }
}

/// Add the events `keep` selects to `seen`, in order, until an event (of any kind)
/// satisfies `done`; each waits at most [`WAIT`].
pub async fn gather(
    events: &mut ClientEvents,
    seen: &mut Vec<ClientEvent>,
    what: &str,
    keep: impl Fn(&ClientEvent) -> bool,
    done: impl Fn(&ClientEvent) -> bool,
) {
    loop {
        let event = next_event(events, what, |_| true, WAIT).await;
        let finished = done(&event);
        if keep(&event) {
            seen.push(event);
        }
        if finished {
            return;
        }
    }
}

/// Wait until `count` replicas registered in `redis` (the default namespace): their
/// links are up.
pub async fn replicas_linked(redis: &crate::RedisServer, count: i64) {
    eventually("the replicas linked", WAIT, || async {
        redis.integer(&["SCARD", "mesa_replicas"]) == Some(count)
    })
    .await;
}

/// Wait up to [`WAIT`] for the next application message of type `t` from our client.
pub async fn next_message(events: &mut ClientEvents, t: &str) -> Message {
    let event = next_event(
        events,
        &format!("message {t}"),
        |e| matches!(e, ClientEvent::Message(m) if m.t.as_deref() == Some(t)),
        WAIT,
    )
    .await;
    match event {
        ClientEvent::Message(message) => message,
        _ => unreachable!("the predicate matched a message"),
    }
}

/// The events our client has already produced, without waiting.
pub fn ready_events(events: &mut ClientEvents) -> Vec<ClientEvent> {
    std::iter::from_fn(|| StreamExt::next(events).now_or_never().flatten()).collect()
}

/// Poll `check` every 20 ms until it holds, at most `timeout`; returns the time taken,
/// or panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

/// A server on a runtime of its own, so that [`crash`](Self::crash) drops it with
/// everything it runs: no goodbye to its clients, nothing left in Redis cleaned up.
pub struct Crashable {
    addr: SocketAddr,
    crash: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Crashable {
    /// Build a server with `build` on a new runtime and serve it on a free port.
    pub fn start<H: Handler>(build: impl FnOnce() -> Server<H> + Send + 'static) -> Crashable {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (crash, crash_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let server = build();
                let listening = server
                    .bind("127.0.0.1:0".parse().expect("an address"))
                    .await
                    .expect("bound");
                addr_tx
                    .send(listening.local_addr())
                    .expect("the test waits");
                tokio::spawn(listening.run());
                let _ = tokio::task::spawn_blocking(move || crash_rx.recv()).await;
            });
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().expect("the server's address");
        Crashable {
            addr,
            crash,
            thread,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drop the server's runtime at once.
    pub fn crash(self) {
        let _ = self.crash.send(());
        let _ = self.thread.join();
    }
}
