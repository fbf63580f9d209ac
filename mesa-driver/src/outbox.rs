//! A connection's inbox of work from other tasks (frames to write, a close), bounded by bytes so that a client that stops reading cannot grow the
//! server's memory without limit.

use std::collections::VecDeque;
use std::sync::Mutex;
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
                self.waker.wake();
                return Err(Refused::Overflow);
            }
            state.bytes += frame.len();
        }
        state.items.push_back(item);
        drop(state);
        self.waker.wake();
        Ok(())
    }

    /// Take everything queued (or, when `take_items` is false because the writer is
    /// backed up, only report an overflow), or register to be woken.
    pub(crate) fn poll_drain(&self, cx: &mut Context<'_>, take_items: bool) -> Poll<Drained> {
        self.waker.register(cx.waker());
        let mut state = self.lock();
        let has_items = take_items && !state.items.is_empty();
        if !has_items && !state.overflowed {
            return Poll::Pending;
        }
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
