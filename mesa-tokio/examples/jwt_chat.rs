//! An authenticated chat server: clients authenticate with a JWT (HS256) sent as
//! `{"token": ...}`; a custom [`Handler`] relays `CHAT` messages to everyone with the
//! sender's id added, and answers `WHO` with the ids online.
//!
//! ```sh
//! MESA_JWT_SECRET=change-me cargo run -p mesa-tokio --example jwt_chat   # ws://127.0.0.1:4001/
//! ```
//!
//! At startup it prints a token for `alice` and one for `bob` (valid one hour), to try:
//!
//! ```sh
//! cargo mesa client ws://127.0.0.1:4001/ --token <alice's token>
//! {"op":0,"t":"CHAT","d":{"text":"hi all"}}
//! {"op":0,"t":"WHO","d":{}}
//! ```
//!
//! Everyone authenticated then receives
//! `{"op":0,"d":{"text":"hi all","from":"alice"},"t":"CHAT"}`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mesa_tokio::{AuthError, Close, Connection, Handler, Message};
use serde_json::{Value, json};

/// The secret used when `MESA_JWT_SECRET` is not set: fine on a laptop, never elsewhere.
const DEMO_SECRET: &str = "mesa-demo-secret-do-not-use-in-production";

/// The chat: `CHAT` to everyone with `from` added, `WHO` answered with the online ids.
struct Chat;

impl Handler for Chat {
    async fn on_authenticated(&self, conn: &Connection) {
        if let Some(id) = conn.id() {
            println!("{id} joined");
        }
    }

    async fn on_message(&self, conn: &Connection, message: Message) {
        // With `auth_required`, broadcasts already skip anonymous connections; their
        // own messages are refused here.
        let Some(id) = conn.id() else {
            let refusal = json!({"reason": "authenticate first"});
            let _ = conn.send(&Message::dispatch("ERROR", refusal));
            return;
        };
        match message.t.as_deref() {
            Some("CHAT") => {
                let mut data = match message.d {
                    Value::Object(data) => data,
                    other => [("text".to_owned(), other)].into_iter().collect(),
                };
                data.insert("from".to_owned(), Value::String(id));
                conn.server()
                    .broadcast(&Message::dispatch("CHAT", Value::Object(data)));
            }
            Some("WHO") => {
                let mut online = conn.server().online_ids();
                online.sort();
                let _ = conn.send(&Message::dispatch("WHO", json!({ "online": online })));
            }
            _ => {}
        }
    }

    async fn on_disconnect(&self, conn: &Connection, close: &Close) {
        if let Some(id) = conn.id() {
            println!("{id} left: {close}");
        }
    }
}

/// Verify `{"token": <JWT>}` with HS256: the `sub` claim is the id, the claims are the user.
fn verify(key: &DecodingKey, credentials: &Value) -> Result<(String, Value), AuthError> {
    let token = credentials
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::new("a string `token` is required"))?;
    // Validation::new requires and checks `exp`.
    let claims = jsonwebtoken::decode::<Value>(token, key, &Validation::new(Algorithm::HS256))
        .map_err(|error| AuthError::new(format!("invalid token: {error}")))?
        .claims;
    match claims.get("sub").and_then(Value::as_str) {
        Some(sub) if !sub.is_empty() => Ok((sub.to_owned(), claims)),
        _ => Err(AuthError::new("the token has no `sub` claim")),
    }
}

/// A token for `sub`, valid one hour: what a login endpoint would hand out.
fn token_for(secret: &[u8], sub: &str) -> Result<String, Box<dyn std::error::Error>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = json!({"sub": sub, "name": sub, "exp": now + 3600});
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("MESA_JWT_SECRET").unwrap_or_else(|_| {
        eprintln!("warning: MESA_JWT_SECRET is not set; using a public demo secret");
        DEMO_SECRET.to_owned()
    });
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(addr) => addr.parse()?,
        None => ([127, 0, 0, 1], 4001).into(),
    };

    let key = DecodingKey::from_secret(secret.as_bytes());
    let server = mesa_tokio::server()
        .heartbeat(Duration::from_secs(10), 3)
        .authenticate(move |credentials: Value| {
            let outcome = verify(&key, &credentials);
            async move { outcome }
        })
        .auth_timeout(Duration::from_secs(10))
        .auth_required(true)
        .handler(Chat)
        .build()?;
    let listening = server.bind(addr).await?;
    let url = format!("ws://{}/", listening.local_addr());
    println!("chat server on {url} (ctrl-c stops it)");
    for user in ["alice", "bob"] {
        let token = token_for(secret.as_bytes(), user)?;
        println!("  {user}: cargo mesa client {url} --token {token}");
    }

    tokio::select! {
        outcome = listening.run() => outcome?,
        _ = tokio::signal::ctrl_c() => {
            server.shutdown();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
