//! Timers as data: a table of optional deadlines (quinn-proto's `TimerTable`).

use std::time::Instant;

/// A table of `N` optional deadlines indexed by a timer enum.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable<const N: usize> {
    deadlines: [Option<Instant>; N],
}

impl<const N: usize> TimerTable<N> {
    pub(crate) fn new() -> Self {
        TimerTable {
            deadlines: [None; N],
        }
    }

    pub(crate) fn set(&mut self, timer: usize, at: Instant) {
        self.deadlines[timer] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: usize) {
        self.deadlines[timer] = None;
    }

    pub(crate) fn stop_all(&mut self) {
        self.deadlines = [None; N];
    }

    /// The deadline of one timer, if armed.
    pub(crate) fn get(&self, timer: usize) -> Option<Instant> {
        self.deadlines[timer]
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Disarm and report a timer that is due at `now`; `None` if it is not.
    pub(crate) fn expire(&mut self, timer: usize, now: Instant) -> bool {
        match self.deadlines[timer] {
            Some(at) if at <= now => {
                self.deadlines[timer] = None;
                true
            }
            _ => false,
        }
    }
}
