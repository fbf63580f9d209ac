//! The HTTP side of `mesa serve`: Prometheus metrics and health checks on
//! `--metrics-listen`, and the chat demo's page beside the WebSocket endpoint.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use mesa_tokio::Runtime;
use mesa_tokio::metrics::Metrics;
use mesa_tokio::{Handler, Server, ServerTls, Tokio};

use crate::tls::TlsListener;

/// A server's accept loop, however it is served.
pub(crate) type Run = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// What `mesa serve` serves over HTTP besides the Mesa endpoint.
pub(crate) struct Http {
    /// Metrics and health checks, on their own address.
    pub(crate) metrics: Option<(SocketAddr, Metrics)>,
    /// The chat demo on the Mesa endpoint's address.
    pub(crate) demo: bool,
    /// What `/readyz` checks.
    pub(crate) health: Health,
}

/// What readiness depends on: the server accepting connections, and the Redis link
/// when the server replicates through one.
#[derive(Clone)]
pub(crate) struct Health {
    accepting: Arc<AtomicBool>,
    redis: bool,
}

impl Health {
    /// Not accepting yet; `redis` says whether the Redis link counts.
    pub(crate) fn new(redis: bool) -> Self {
        Health {
            accepting: Arc::new(AtomicBool::new(false)),
            redis,
        }
    }

    /// The server started (`true`) or stopped (`false`) accepting connections.
    pub(crate) fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    fn ready(&self, metrics: &Metrics) -> Result<(), &'static str> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err("not accepting connections");
        }
        if self.redis && metrics.cluster_link_up() != Some(true) {
            return Err("the Redis link is down");
        }
        Ok(())
    }
}

/// Bind `addr` and serve `GET /metrics`, `GET /healthz` and `GET /readyz` there in the
/// background; returns the bound address.
pub(crate) async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| format!("cannot listen on --metrics-listen {addr}: {error}"))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("--metrics-listen {addr}: {error}"))?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state((metrics, health));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(local)
}

/// `GET /metrics`: every metric in the text exposition format.
async fn render(State((metrics, _)): State<(Metrics, Health)>) -> Response {
    (
        [(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
        metrics.render(),
    )
        .into_response()
}

/// `GET /readyz`: 200 when ready, else 503 with the reason.
async fn ready(State((metrics, health)): State<(Metrics, Health)>) -> Response {
    match health.ready(&metrics) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Bind `addr` and prepare an axum app that serves the chat demo's page at `/` and
/// the Mesa endpoint of `server` at `path` (over TLS with `tls`: `https://` and
/// `wss://`); returns the bound address and the loop.
pub(crate) async fn serve_demo<H: Handler>(
    server: &Server<H>,
    addr: SocketAddr,
    path: &str,
    tls: Option<ServerTls>,
) -> Result<(SocketAddr, Run), String> {
    // The runtime's own bind: SO_REUSEADDR and a long listen backlog.
    let listener = Tokio
        .bind(addr)
        .await
        .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
    let app = crate::demo::pages(path)
        .route(path, get(mesa_tokio::axum::upgrade::<H>))
        .with_state(server.clone());
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let run: Run = match tls {
        None => Box::pin(async move { axum::serve(listener, service).await }),
        Some(tls) => {
            // `tap_io` is how axum gives a custom listener's address to `ConnectInfo`.
            let listener = TlsListener::new(listener, tls, server.clone())
                .map_err(|error| format!("cannot listen on {addr}: {error}"))?
                .tap_io(|_| {});
            Box::pin(async move { axum::serve(listener, service).await })
        }
    };
    Ok((local, run))
}
