//! What a server's connection tasks share: its settings, the application's hooks,
//! the registry, who may connect, and the shutdown signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use mesa_core::ServerConfig;

use crate::hooks::{Authenticator, Middlewares, RoomPolicy};
use crate::registry::Registry;
use crate::tls::ServerTls;
use crate::transport::TransportConfig;

/// What a server's connection tasks share.
pub(crate) struct ServerContext<R, H> {
    pub(crate) runtime: R,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) transport: TransportConfig,
    pub(crate) path: String,
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    pub(crate) handler: H,
    pub(crate) middleware: Middlewares,
    pub(crate) registry: Arc<Registry>,
    pub(crate) admission: AdmissionPolicy,
    pub(crate) tls: Option<ServerTls>,
    /// Who may subscribe and publish to rooms; `None`: rooms are off.
    pub(crate) rooms: Option<RoomPolicy>,
    pub(crate) shutdown: Shutdown,
}

/// Who may open a WebSocket: checked while the upgrade request is answered.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdmissionPolicy {
    /// Most connections open or handshaking at once (HTTP 503 past it).
    pub(crate) max_connections: Option<usize>,
    /// Accepted `Origin` values, lowercase and without a trailing `/` (HTTP 403 for
    /// any other); `None` accepts every origin.
    pub(crate) allowed_origins: Option<Vec<String>>,
}

impl AdmissionPolicy {
    /// Whether a request with this `Origin` header may upgrade. A request without
    /// one is accepted: browsers always send it on a WebSocket handshake, and
    /// cross-site WebSocket hijacking needs a browser.
    pub(crate) fn allows_origin(&self, origin: Option<&[u8]>) -> bool {
        match (&self.allowed_origins, origin) {
            (None, _) | (Some(_), None) => true,
            (Some(allowed), Some(origin)) => {
                let origin = origin.strip_suffix(b"/").unwrap_or(origin);
                allowed
                    .iter()
                    .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin))
            }
        }
    }
}

/// A one-shot, many-waiter shutdown signal.
#[derive(Default)]
pub(crate) struct Shutdown {
    triggered: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Shutdown {
    pub(crate) fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        wakers.into_iter().for_each(Waker::wake);
    }

    pub(crate) fn wait(&self) -> impl std::future::Future<Output = ()> + Unpin + '_ {
        std::future::poll_fn(move |cx| {
            if self.triggered.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            if self.triggered.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}
