//! A token bucket for the inbound message rate of one connection.
//!
//! The bucket holds at most `burst` tokens and earns one every `1 s / rate`; each
//! frame takes one, and a frame that finds the bucket empty is refused. It is kept in
//! units of time rather than tokens (the generic cell rate algorithm, which is the
//! same bucket): one instant, `full_at`, when the bucket will be full again. That
//! needs no floating point and no refill step, and it guarantees, for every window
//! of length `t`, at most `burst + rate · t` admitted frames.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` of them saved up.
///
/// Time is an argument: the caller passes `now` to every call, as everywhere in the
/// core. A `now` earlier than a previous one finds fewer tokens, never more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// The time it takes to earn one token: `1 s / rate`, rounded up so that
    /// rounding never admits more than `rate` per second.
    cost: Duration,
    /// The time it takes to fill the bucket from empty: `burst · cost`.
    capacity: Duration,
    /// When the bucket is full again; at or before `now`, it is full.
    full_at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now` earning `rate` tokens per second, holding at most
    /// `burst`. A zero `rate` or `burst` is raised to 1 (validated configurations
    /// never pass zero).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let rate = u64::from(rate.max(1));
        let nanos = 1_000_000_000u64.div_ceil(rate);
        let cost = Duration::from_nanos(nanos);
        TokenBucket {
            cost,
            capacity: cost.saturating_mul(burst.max(1)),
            full_at: now,
        }
    }

    /// Take one token at `now`: `true` if one was there, `false` (and nothing
    /// changes) when the bucket is empty.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let base = self.full_at.max(now);
        // Time until full, after taking this token.
        let debt = (base - now) + self.cost;
        if debt > self.capacity {
            return false;
        }
        self.full_at = base + self.cost;
        true
    }

    /// Whether the bucket holds no whole token at `now` (`available(now) == 0`,
    /// without its division: this is asked after every frame read).
    pub fn is_empty(&self, now: Instant) -> bool {
        self.full_at.saturating_duration_since(now) + self.cost > self.capacity
    }

    /// The earliest instant, not before `now`, at which the bucket holds a token:
    /// when a connection slowed for its rate may be read again.
    pub fn next_token_at(&self, now: Instant) -> Instant {
        // A token is there once the debt is at most `capacity - cost`.
        self.full_at
            .checked_sub(self.capacity - self.cost)
            .map_or(now, |at| at.max(now))
    }

    /// The whole tokens in the bucket at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        let debt = self.full_at.saturating_duration_since(now);
        let free = self.capacity.saturating_sub(debt);
        (free.as_nanos() / self.cost.as_nanos()) as u64
    }
}
