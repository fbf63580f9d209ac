//! Limits on everything a peer controls.

/// Bounds applied to what a peer sends and to what we keep for it.
///
/// The defaults are deliberately modest for a chat-style protocol; raise them for
/// applications that move larger documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted text frame, in bytes (close 1009 above it). Default 1 MiB.
    pub max_message_bytes: usize,
    /// Deepest accepted JSON nesting (close 1009 above it). Default 32.
    pub max_json_depth: usize,
    /// Most sends a client keeps while disconnected; more is an error to the caller.
    /// Default 1024.
    pub max_queued_sends: usize,
    /// Most stored messages redelivered to (and kept for) one id. Default 1000.
    pub max_stored_per_id: usize,
    /// Sustained inbound frames per second one connection may send (beyond it and
    /// its burst, `rate_limit_policy` applies). Default 100.
    pub max_messages_per_second: u32,
    /// Inbound frames one connection may send at once above the sustained rate (the
    /// size of its token bucket). Default 200.
    pub max_message_burst: u32,
    /// Most distinct ids one send may address, after `excluding` (a global send is
    /// never refused). Above it a library send is refused with an error, and a client's
    /// relayed `BROADCAST` closes its connection with 1008 `too many recipients: N >
    /// max`: this bounds the work (lookups, presence checks, stored copies) one send
    /// costs. Default 100,000.
    pub max_recipients: usize,
    /// What happens to a connection that sends faster than its rate and burst.
    /// Default [`RateLimitPolicy::Slow`].
    pub rate_limit_policy: RateLimitPolicy,
    /// Most rooms one connection may be in; a join beyond it is refused with
    /// `too_many_rooms`. Default 128.
    pub max_rooms_per_connection: usize,
    /// Longest room name, in bytes (see [`check_room`](crate::rooms::check_room)).
    /// Default 128.
    pub max_room_name_bytes: usize,
    /// Most `mesa:presence` requests of one connection awaiting their answers (each
    /// costs a round trip to Redis); one beyond it is refused with
    /// `too_many_requests`. Default 4.
    pub max_presence_requests: usize,
}

/// What the server does with a connection that outpaces its inbound message rate.
///
/// Our own client keeps up to [`Limits::max_queued_sends`] sends while offline and
/// flushes them at once on reconnect, so a burst is normal, not abuse: by default it
/// is slowed, and closing is the explicit choice for servers that treat a fast
/// sender as hostile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateLimitPolicy {
    /// Stop reading from the connection until its token bucket holds a token again.
    /// TCP carries the backpressure to the sender; every frame read is processed, so
    /// nothing is lost, and other connections are unaffected.
    #[default]
    Slow,
    /// Close with 1008 `rate limit exceeded`; the frame that found the bucket empty
    /// is not processed.
    Close,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_json_depth: 32,
            max_queued_sends: 1024,
            max_stored_per_id: 1000,
            max_messages_per_second: 100,
            max_message_burst: 200,
            max_recipients: 100_000,
            rate_limit_policy: RateLimitPolicy::Slow,
            max_rooms_per_connection: 128,
            max_room_name_bytes: 128,
            max_presence_requests: 4,
        }
    }
}
