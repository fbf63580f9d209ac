//! What the application plugs into a server: its authenticator, its handler, and
//! its middleware (observers of everything that happens).

mod auth;
mod handler;
mod middleware;

pub use auth::{AuthError, Authenticator, BoxFuture, DevAuthenticator};
pub use handler::{Handler, Ignore, Relay};
pub(crate) use middleware::Middlewares;
pub use middleware::{BoxError, Middleware};
