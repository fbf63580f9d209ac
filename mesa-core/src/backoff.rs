//! Reconnection backoff: exponential with full jitter.
//!
//! Upstream clients retry at a fixed interval with no jitter, so when a server restarts
//! every client comes back in the same instant. Full jitter (AWS architecture blog,
//! "Exponential Backoff And Jitter") spreads attempt `n` uniformly over
//! `[0, min(cap, base · 2^n)]`.

use std::time::Duration;

use crate::rng::Rng;

/// Backoff bounds. `base` is the ceiling of the first delay, `cap` of every delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first delay; the server's `c_reconnect_interval` replaces it
    /// unless [`BackoffConfig::base_is_fixed`] is set.
    pub base: Duration,
    /// Ceiling of every delay.
    pub cap: Duration,
    /// Keep `base` even when the server announces a reconnect interval.
    pub base_is_fixed: bool,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            base_is_fixed: false,
        }
    }
}

/// The backoff state: how many attempts failed in a row, and the PRNG for jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    rng: Rng,
}

impl Backoff {
    /// A fresh backoff drawing jitter from `seed`.
    pub fn new(config: BackoffConfig, seed: u64) -> Self {
        Backoff {
            config,
            attempt: 0,
            rng: Rng::new(seed),
        }
    }

    /// Attempts failed since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The current configuration (base possibly adopted from the server).
    pub fn config(&self) -> BackoffConfig {
        self.config
    }

    /// The ceiling of the delay for attempt `n`: `min(cap, base · 2^n)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// Draw the next delay and count the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let max_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.below_or_equal(max_ms))
    }

    /// A connection succeeded: start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Adopt the server's announced reconnect interval as the base, unless fixed.
    pub fn adopt_base(&mut self, base: Duration) {
        if !self.config.base_is_fixed && !base.is_zero() {
            self.config.base = base.min(self.config.cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let backoff = Backoff::new(
            BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_millis(1000),
                base_is_fixed: false,
            },
            7,
        );
        let ceilings: Vec<u128> = (0..6).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.ceiling(u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut backoff = Backoff::new(BackoffConfig::default(), 1);
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                backoff.reset();
                backoff.next_delay()
            })
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 40,
            "full jitter should rarely repeat: {delays:?}"
        );
    }
}
