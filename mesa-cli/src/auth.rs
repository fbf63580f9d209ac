//! Authentication modes of `mesa serve`, and the JWT (HS256) authenticator.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mesa_tokio::BoxFuture;
use mesa_tokio::{AuthError, Authenticator};
use serde_json::Value;

/// How `mesa serve` authenticates clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AuthMode {
    /// No authentication: op 2 is not answered and nobody has an id.
    None,
    /// Any non-empty `token` is the id. For demos and tests only.
    Dev,
    /// `token` is a JWT signed with HS256 and `--jwt-secret`.
    Jwt,
}

/// Verifies `{"token": "<JWT>"}` with HS256: the `sub` (or `id`) claim is the id,
/// and every claim is the user object.
///
/// `exp` and `nbf` are checked when the token has them (a token without `exp` never
/// expires); audience and issuer are not checked.
pub(crate) struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
}

impl JwtAuthenticator {
    /// Verify tokens signed with HS256 and `secret`.
    pub(crate) fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        validation.validate_nbf = true;
        JwtAuthenticator {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Decide who the credentials (op 2's data) are; the error is the close reason.
    pub(crate) fn verify(&self, credentials: &Value) -> Result<(String, Value), AuthError> {
        let token = credentials
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::new("a string `token` is required"))?;
        let claims = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation)
            .map_err(|error| AuthError::with_source(reason(error.kind()), error))?
            .claims;
        let id = match (claims.get("sub"), claims.get("id")) {
            (Some(Value::String(sub)), _) if !sub.is_empty() => sub.clone(),
            (_, Some(Value::String(id))) if !id.is_empty() => id.clone(),
            (_, Some(Value::Number(id))) => id.to_string(),
            _ => return Err(AuthError::new("the token has no `sub` or `id` claim")),
        };
        Ok((id, claims))
    }
}

impl Authenticator for JwtAuthenticator {
    fn authenticate(
        &self,
        credentials: Value,
    ) -> BoxFuture<'static, Result<(String, Value), AuthError>> {
        Box::pin(std::future::ready(self.verify(&credentials)))
    }
}

/// A short close reason (close frames hold at most 123 bytes of reason).
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "invalid token: bad signature",
        ErrorKind::ExpiredSignature => "invalid token: expired",
        ErrorKind::ImmatureSignature => "invalid token: not valid yet",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "invalid token: the algorithm must be HS256"
        }
        ErrorKind::Json(_) => "invalid token: the claims are not a JSON object",
        _ => "invalid token: malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn token(claims: &Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encodable claims")
    }

    #[test]
    fn accepts_sub_or_id_and_returns_every_claim() {
        let auth = JwtAuthenticator::hs256(b"secret");
        let claims = json!({"sub": "alice", "name": "Alice"});
        let (id, user) = auth
            .verify(&json!({"token": token(&claims, b"secret"), "shouldSync": true}))
            .expect("valid token");
        assert_eq!((id.as_str(), user), ("alice", claims));

        let claims = json!({"id": 42});
        let (id, _) = auth
            .verify(&json!({"token": token(&claims, b"secret")}))
            .expect("valid token");
        assert_eq!(id, "42");
    }

    #[test]
    fn rejects_with_a_reason() {
        let auth = JwtAuthenticator::hs256(b"secret");
        let wrong_key = token(&json!({"sub": "alice"}), b"other");
        let no_id = token(&json!({"name": "Alice"}), b"secret");
        let expired = token(&json!({"sub": "alice", "exp": 1}), b"secret");
        let reason =
            |credentials: Value| auth.verify(&credentials).unwrap_err().reason().to_owned();
        assert_eq!(
            reason(json!({"token": wrong_key})),
            "invalid token: bad signature"
        );
        assert_eq!(
            reason(json!({"token": no_id})),
            "the token has no `sub` or `id` claim"
        );
        assert_eq!(reason(json!({"token": expired})), "invalid token: expired");
        assert_eq!(
            reason(json!({"token": "not.a.jwt"})),
            "invalid token: malformed"
        );
        assert_eq!(reason(json!({})), "a string `token` is required");
    }
}
