//! Who a client is: the application's authenticator (async, may call a database),
//! its refusals, and the development authenticator of demos and tests.

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

/// A boxed future, as the authenticator returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an authentication was refused: the reason goes into the 1008 close frame (the
/// client sees it), the cause, if any, stays on the server ([`source`](std::error::Error::source),
/// for logs and middleware).
#[derive(Debug, Clone)]
pub struct AuthError {
    reason: String,
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl AuthError {
    /// Refuse with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        AuthError {
            reason: reason.into(),
            source: None,
        }
    }

    /// Refuse with `reason` (for the client), caused by `source` (for the server:
    /// a token library's error, a database failure).
    pub fn with_source(
        reason: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        AuthError {
            reason: reason.into(),
            source: Some(std::sync::Arc::from(source.into())),
        }
    }

    /// The reason the client is told.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Two refusals are equal when their reasons are (causes are not compared).
impl PartialEq for AuthError {
    fn eq(&self, other: &Self) -> bool {
        self.reason == other.reason
    }
}

impl Eq for AuthError {}

/// Decides who a client is from its op 2 data: `Ok((id, user))` or an error.
pub trait Authenticator: Send + Sync + 'static {
    /// Check `credentials` (the op 2 data, including `shouldSync`).
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>>;
}

impl<F, Fut> Authenticator for F
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(String, Value), AuthError>> + Send + 'static,
{
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>> {
        Box::pin(self(credentials))
    }
}

/// Development authentication (any non-empty `token` is the id): for demos and tests
/// only, it proves nothing about who the client is.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevAuthenticator;

impl Authenticator for DevAuthenticator {
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>> {
        let outcome = mesa_core::dev_authenticate(&credentials).map_err(AuthError::new);
        Box::pin(std::future::ready(outcome))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::AuthError;

    #[test]
    fn an_auth_error_keeps_its_cause_apart_from_the_reason() {
        let cause = std::io::Error::other("the user database is down");
        let error = AuthError::with_source("try again later", cause);
        assert_eq!(error.to_string(), "try again later");
        assert_eq!(error.reason(), "try again later");
        let source = error.source().expect("a source");
        assert_eq!(source.to_string(), "the user database is down");
        assert!(AuthError::new("no").source().is_none());
        assert_eq!(error, AuthError::new("try again later"));
    }
}
