//! Server-side heartbeat bookkeeping, exactly as upstream counts it.
//!
//! On each tick: if an ack (op 11) arrived since the previous beat, or this is the first
//! beat, the miss counter resets and the beat carries `{}`. Otherwise the miss counter
//! grows; past `max_attempts` the connection is dead, else the beat carries
//! `{"tries": n, "max": max_attempts}`.

use serde_json::{Value, json};

use crate::config::HeartbeatConfig;

/// What a heartbeat tick decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Beat {
    /// Send op 1 with this data.
    Send(Value),
    /// The client missed more than `max_attempts` beats: close it.
    Dead,
}

/// Miss counting for one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    beats: u64,
    misses: u32,
    acked: bool,
}

impl Heartbeat {
    /// A counter that has sent nothing yet.
    pub fn new(config: HeartbeatConfig) -> Self {
        Heartbeat {
            config,
            beats: 0,
            misses: 0,
            acked: false,
        }
    }

    /// Consecutive beats that went unanswered.
    pub fn misses(&self) -> u32 {
        self.misses
    }

    /// An op 11 arrived.
    pub fn handle_ack(&mut self) {
        self.acked = true;
    }

    /// The interval elapsed: decide what to send.
    pub fn tick(&mut self) -> Beat {
        let beat = if self.acked || self.beats == 0 {
            self.misses = 0;
            Beat::Send(json!({}))
        } else {
            self.misses += 1;
            if self.misses > self.config.max_attempts {
                return Beat::Dead;
            }
            Beat::Send(json!({"tries": self.misses, "max": self.config.max_attempts}))
        };
        self.acked = false;
        self.beats += 1;
        beat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_misses_like_upstream() {
        let config = HeartbeatConfig {
            interval: Duration::from_secs(1),
            max_attempts: 2,
        };
        let mut heartbeat = Heartbeat::new(config);
        assert_eq!(heartbeat.tick(), Beat::Send(json!({})));
        assert_eq!(heartbeat.tick(), Beat::Send(json!({"tries": 1, "max": 2})));
        heartbeat.handle_ack();
        assert_eq!(heartbeat.tick(), Beat::Send(json!({})));
        assert_eq!(heartbeat.tick(), Beat::Send(json!({"tries": 1, "max": 2})));
        assert_eq!(heartbeat.tick(), Beat::Send(json!({"tries": 2, "max": 2})));
        assert_eq!(heartbeat.tick(), Beat::Dead);
    }
}
