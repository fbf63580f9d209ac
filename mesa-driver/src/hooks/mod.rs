//! What the application plugs into a server: its authenticator, its handler, its
//! room policy, and its middleware (observers of everything that happens).

mod auth;
mod handler;
mod middleware;
mod rooms;

pub use auth::{AuthError, Authenticator, BoxFuture, DevAuthenticator};
pub use handler::{Handler, Ignore, Relay};
pub(crate) use middleware::Middlewares;
pub use middleware::{BoxError, Middleware};
pub use rooms::{RoomAccess, RoomAccessKind, RoomAuthorizer, RoomPolicy};
