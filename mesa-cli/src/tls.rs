//! TLS in the binary: the PEM files of `mesa serve --tls-cert/--tls-key` (loaded at
//! start, reloaded on SIGHUP), the TLS listener of the demo's HTTP server, the extra
//! root of `--ca-cert`, and the CA of a `rediss://` Redis (`--redis-ca-cert`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::serve::Listener;
use mesa_tokio::Runtime;
use mesa_tokio::tls::certificates_from_pem;
use mesa_tokio::tls::futures_rustls::server::TlsStream;
use mesa_tokio::{Handler, Server, ServerTls, Tokio};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::Failure;
use crate::failure::read;

/// Handshakes finished but not yet taken by the HTTP server.
const READY_BACKLOG: usize = 64;

/// The certificate chain and key files of `mesa serve`, and the TLS settings made
/// from them.
pub(crate) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    /// Shared with the server: a reload reaches every new handshake.
    pub(crate) tls: ServerTls,
}

impl TlsFiles {
    /// Load `cert` (PEM, leaf first) and `key` (PEM).
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let (chain, secret) = read_pair(cert, key)?;
        let tls = ServerTls::from_pem(&chain, &secret).map_err(|error| {
            format!(
                "cannot use --tls-cert {} with --tls-key {}: {error}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            tls,
        })
    }

    /// Read the files again and use them for new connections; on any error the
    /// current certificate stays and the error is logged (a renewal half-written
    /// to disk must not take the server down).
    pub(crate) fn reload(&self) {
        let outcome = read_pair(&self.cert, &self.key).and_then(|(chain, secret)| {
            self.tls
                .reload_pem(&chain, &secret)
                .map_err(|error| error.to_string())
        });
        match outcome {
            Ok(()) => tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded"),
            Err(error) => {
                tracing::error!(%error, "TLS certificate not reloaded: keeping the current one")
            }
        }
    }
}

/// `--redis-ca-cert` of `mesa serve`, `mesa dispatch` and `mesa portal`.
#[derive(Debug, clap::Args)]
pub(crate) struct RedisCa {
    /// Trust the certificates of this PEM file (a private CA) for a `rediss://`
    /// --redis, instead of the platform's store.
    #[arg(long, env = "MESA_REDIS_CA_CERT", requires = "redis")]
    redis_ca_cert: Option<PathBuf>,
}

impl RedisCa {
    /// [`load`](Self::load), checked against every URL of a cluster: `None` without
    /// the flag or without a URL.
    pub(crate) fn load_for(&self, urls: &[String]) -> Result<Option<Vec<u8>>, Failure> {
        let mut pem = None;
        for url in urls {
            pem = self.load(url)?;
        }
        Ok(pem)
    }

    /// The PEM certificates to trust for the Redis at `url`, checked: `None` without
    /// the flag, an error when the file is unreadable, holds no certificate, or `url`
    /// does not speak TLS.
    pub(crate) fn load(&self, url: &str) -> Result<Option<Vec<u8>>, Failure> {
        let Some(path) = &self.redis_ca_cert else {
            return Ok(None);
        };
        if !url.starts_with("rediss://") {
            return Err(Failure::usage(format!(
                "--redis-ca-cert needs a rediss:// URL, not `{url}`"
            )));
        }
        let pem = read(path, "--redis-ca-cert")?;
        certificates_from_pem(&pem)
            .map_err(|error| format!("--redis-ca-cert {}: {error}", path.display()))?;
        Ok(Some(pem))
    }
}

/// The contents of the certificate and key files.
fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    Ok((read(cert, "--tls-cert")?, read(key, "--tls-key")?))
}

/// A TLS stream as tokio's IO traits (hyper's side).
type Tls = Compat<TlsStream<Compat<TcpStream>>>;

/// The demo's listener over TLS: connections are accepted in a task of its own and
/// each handshake runs in its own task, bounded by the server's handshake timeout, so
/// a slow or plaintext client holds up nobody; the HTTP server gets finished
/// handshakes. Like the library's own listener, each connection takes a slot of
/// `--max-connections` as it is accepted and holds it through its TLS handshake
/// (the WebSocket upgrade then takes its own); past the limit the handshake still
/// runs, so that the upgrade is answered 503 rather than cut off.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(Tls, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Start accepting on `listener` with `tls`, admitting connections to `server`.
    pub(crate) fn new<H: Handler>(
        listener: TcpListener,
        tls: ServerTls,
        server: Server<H>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_BACKLOG);
        let timeout = server.transport().handshake_timeout;
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (stream, remote) = match Tokio.accept(&listener).await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Taken here, in accept order, before the next connection is accepted.
                let admission = server.admit();
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(timeout, tls.accept(stream)).await;
                    drop(admission);
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream.compat(), remote)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %remote, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = Tls;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Tls, SocketAddr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
