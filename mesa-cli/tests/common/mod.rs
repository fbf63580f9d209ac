//! What the binary's end-to-end tests share: reading a child's output lines.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single expectation waits (CI machines are small).
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// The lines one output stream of a child printed: new ones, and all so far.
pub(crate) struct Lines {
    new: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    /// Read `stream` line by line on a thread.
    pub(crate) fn new(stream: impl Read + Send + 'static) -> Self {
        let (tx, new) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                log.lock().expect("log lock").push(line.clone());
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { new, seen }
    }

    /// Wait for a new line that satisfies `matches`; panic with everything seen on timeout.
    pub(crate) fn expect(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.new.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line {what} within {WAIT:?}; saw: {:#?}", self.all()),
            }
        }
    }

    /// The next JSON line satisfying `matches`.
    pub(crate) fn expect_json(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let line = self.expect(what, |line| {
            serde_json::from_str::<Value>(line).is_ok_and(|value| matches(&value))
        });
        serde_json::from_str(&line).expect("a JSON line")
    }

    /// How many lines so far.
    pub(crate) fn len(&self) -> usize {
        self.seen.lock().expect("log lock").len()
    }

    /// Every line so far.
    pub(crate) fn all(&self) -> Vec<String> {
        self.seen.lock().expect("log lock").clone()
    }
}
