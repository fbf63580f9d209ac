//! [`RedisFailure`]: a Redis error kept as the cause of a dispatcher's or a portal's
//! error.

use std::fmt;
use std::sync::Arc;

/// Redis was unreachable or failed a command: redis-rs's error, shared so that the
/// errors holding it stay `Clone`, and reached through [`source`](std::error::Error::source).
/// Two failures are equal when their messages are.
#[derive(Debug, Clone)]
pub struct RedisFailure(Arc<redis::RedisError>);

impl RedisFailure {
    /// Redis answered a command with an error reply, or with a reply of the wrong
    /// shape.
    pub(crate) fn refused(detail: String) -> Self {
        let kind = redis::ErrorKind::Extension;
        RedisFailure(Arc::new((kind, "Redis refused a command", detail).into()))
    }

    /// The redis-rs error.
    pub fn redis_error(&self) -> &redis::RedisError {
        &self.0
    }
}

impl From<redis::RedisError> for RedisFailure {
    fn from(error: redis::RedisError) -> Self {
        RedisFailure(Arc::new(error))
    }
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for RedisFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl PartialEq for RedisFailure {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for RedisFailure {}
