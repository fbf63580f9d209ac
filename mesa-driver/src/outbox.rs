//! A connection's inbox of work from other tasks (frames to write, a close), bounded by bytes so that a client that stops reading cannot grow the
//! server's memory without limit.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use mesa_core::{Close, Frame};

/// One piece of work for a connection's task.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Frame),
    Close(Close),
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The byte cap was reached: the connection will be closed as a slow consumer.
    Overflow,
    /// The connection is gone.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outbound>,
    bytes: usize,
    overflowed: bool,
    closed: bool,
}

/// A bounded multi-producer, single-consumer queue with one waker.
#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    cap: usize,
    waker: AtomicWaker,
    /// The consumer is running and drains before it sleeps, so a push need not wake
    /// it. Most pushes to a busy connection come from its own task (the handler's
    /// reply), and waking a running task makes the runtime poll it once more for
    /// nothing.
    draining: AtomicBool,
}

/// What the connection task takes out in one go.
pub(crate) struct Drained {
    pub(crate) items: VecDeque<Outbound>,
    pub(crate) overflowed: bool,
}

impl Outbox {
    pub(crate) fn new(cap: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            cap,
            waker: AtomicWaker::new(),
            draining: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain data behind.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue work; frames count against the byte cap.
    pub(crate) fn push(&self, item: Outbound) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.overflowed {
            return Err(Refused::Overflow);
        }
        if let Outbound::Frame(frame) = &item {
            if state.bytes + frame.len() > self.cap {
                state.overflowed = true;
                drop(state);
                self.wake();
                return Err(Refused::Overflow);
            }
            state.bytes += frame.len();
        }
        state.items.push_back(item);
        drop(state);
        self.wake();
        Ok(())
    }

    /// Wake the consumer, unless it is running and will drain before it sleeps.
    /// A push whose item went in before [`poll_drain`](Self::poll_drain) cleared the
    /// flag is drained by it; one after that finds the flag cleared (the lock orders
    /// them) and wakes.
    fn wake(&self) {
        if !self.draining.load(Ordering::SeqCst) {
            self.waker.wake();
        }
    }

    /// The consumer's task is running and will call [`poll_drain`](Self::poll_drain)
    /// before it sleeps: pushes until then need not wake it.
    pub(crate) fn will_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Take everything queued (or, when `take_items` is false because the writer is
    /// backed up, only report an overflow), or register to be woken.
    /// The caller drains again before it sleeps when this is `Ready`.
    pub(crate) fn poll_drain(&self, cx: &mut Context<'_>, take_items: bool) -> Poll<Drained> {
        self.draining.store(false, Ordering::SeqCst);
        self.waker.register(cx.waker());
        let mut state = self.lock();
        let has_items = take_items && !state.items.is_empty();
        if !has_items && !state.overflowed {
            return Poll::Pending;
        }
        self.draining.store(true, Ordering::SeqCst);
        let overflowed = std::mem::take(&mut state.overflowed);
        let items = if take_items {
            state.bytes = 0;
            std::mem::take(&mut state.items)
        } else {
            VecDeque::new()
        };
        Poll::Ready(Drained { items, overflowed })
    }

    /// Whether it refuses everything (the connection is gone).
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuse everything from now on.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::task::{Wake, Waker};
    use std::thread;
    use std::time::Duration;

    use mesa_core::{Frame, Message, Opcode};
    use serde_json::json;

    use super::*;

    /// Counts its wakes; with a thread, unparks it.
    #[derive(Default)]
    struct Counting {
        wakes: AtomicUsize,
        thread: Option<thread::Thread>,
    }

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            if let Some(thread) = &self.thread {
                thread.unpark();
            }
        }
    }

    fn frame(n: u64) -> Outbound {
        Outbound::Frame(Message::new(Opcode::Dispatch, json!(n)).encode())
    }

    fn frames(drained: Drained) -> Vec<Frame> {
        let frames = drained.items.into_iter().filter_map(|item| match item {
            Outbound::Frame(frame) => Some(frame),
            Outbound::Close(_) => None,
        });
        frames.collect()
    }

    #[test]
    fn a_push_wakes_the_consumer_unless_it_drains_before_it_sleeps() {
        let outbox = Outbox::new(1 << 20);
        let counting = Arc::new(Counting::default());
        let waker = Waker::from(counting.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || counting.wakes.load(Ordering::SeqCst);

        // Asleep: a push wakes it.
        assert!(outbox.poll_drain(&mut cx, true).is_pending());
        outbox.push(frame(1)).unwrap();
        assert_eq!(wakes(), 1);
        assert_eq!(frames(ready(outbox.poll_drain(&mut cx, true))).len(), 1);

        // Running, and it drains before it sleeps (as after a `Ready` drain): pushes
        // do not wake it, and the drain takes them.
        outbox.push(frame(2)).unwrap();
        outbox.will_drain();
        outbox.push(frame(3)).unwrap();
        assert_eq!(wakes(), 1);
        assert_eq!(frames(ready(outbox.poll_drain(&mut cx, true))).len(), 2);

        // A drain that found nothing: the next push wakes it again.
        assert!(outbox.poll_drain(&mut cx, true).is_pending());
        outbox.push(frame(4)).unwrap();
        assert_eq!(wakes(), 2);

        // An overflow is reported by the drain even when it woke nobody.
        outbox.will_drain();
        let big =
            Outbound::Frame(Message::new(Opcode::Dispatch, json!("x".repeat(1 << 20))).encode());
        assert_eq!(outbox.push(big), Err(Refused::Overflow));
        assert_eq!(wakes(), 2);
        assert!(ready(outbox.poll_drain(&mut cx, true)).overflowed);
    }

    /// Producers on other threads race a consumer that marks itself running at every
    /// poll (the connection loop's order): every item arrives, none waits for a wake
    /// that was skipped.
    #[test]
    fn no_wake_is_lost_to_a_consumer_that_drains_before_it_sleeps() {
        const PRODUCERS: u64 = 4;
        const EACH: u64 = 20_000;
        let outbox = Arc::new(Outbox::new(usize::MAX));
        let (done, finished) = mpsc::channel();
        let consumer = {
            let outbox = outbox.clone();
            thread::spawn(move || {
                let counting = Arc::new(Counting {
                    wakes: AtomicUsize::new(0),
                    thread: Some(thread::current()),
                });
                let waker = Waker::from(counting.clone());
                let mut cx = Context::from_waker(&waker);
                let mut received = 0;
                while received < PRODUCERS * EACH {
                    let seen = counting.wakes.load(Ordering::SeqCst);
                    outbox.will_drain();
                    match outbox.poll_drain(&mut cx, true) {
                        Poll::Ready(drained) => received += drained.items.len() as u64,
                        // Sleep until woken (a park may also return spuriously).
                        Poll::Pending => {
                            while counting.wakes.load(Ordering::SeqCst) == seen {
                                thread::park();
                            }
                        }
                    }
                }
                let _ = done.send(received);
            })
        };
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let outbox = outbox.clone();
                thread::spawn(move || {
                    for n in 0..EACH {
                        outbox.push(frame(n)).unwrap();
                        if n % 64 == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.join().unwrap();
        }
        // A lost wake leaves the consumer parked for good: bounded, it fails.
        let received = finished.recv_timeout(Duration::from_secs(60));
        assert_eq!(received, Ok(PRODUCERS * EACH), "the consumer missed a wake");
        consumer.join().unwrap();
    }

    fn ready(poll: Poll<Drained>) -> Drained {
        match poll {
            Poll::Ready(drained) => drained,
            Poll::Pending => panic!("expected a drain"),
        }
    }
}
