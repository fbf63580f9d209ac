//! TLS for `wss://`, written once for every runtime: rustls with its `ring` provider
//! over `futures-io` streams (futures-rustls), so tokio, smol and async-std clients
//! and servers all get it from the same code.
//!
//! Verification is never optional: a client checks the server's certificate chain
//! against its trusted roots and the URL's host name (sent as SNI). Nothing here can
//! turn that off; an application with exotic needs passes a whole
//! [`rustls::ClientConfig`] of its own ([`ClientBuilder::tls_config`](crate::ClientBuilder::tls_config)).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use futures_rustls::{TlsAcceptor, TlsConnector};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS settings could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The PEM input holds no certificate.
    #[error("no certificate found in the PEM input")]
    NoCertificate,
    /// The PEM input holds no private key (PKCS #8, PKCS #1 or SEC1).
    #[error("no private key found in the PEM input")]
    NoPrivateKey,
    /// The PEM input could not be parsed.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// rustls refused the certificate, the key or a root.
    #[error("{0}")]
    Rejected(String),
    /// Neither the bundled roots nor the platform's store gave a trusted root.
    #[error("no trusted root certificates: {0}")]
    NoRoots(String),
}

/// The crypto provider of every configuration built here: ring (no C toolchain
/// beyond a C compiler, no OpenSSL).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM input (a chain, or a bundle of roots).
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem(error.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certificates)
}

/// A server configuration from a PEM certificate chain (leaf first) and its PEM
/// private key, with the ring provider and rustls's safe defaults (TLS 1.2 and 1.3,
/// no client certificates).
pub fn server_config_from_pem(
    certificate_chain: &[u8],
    private_key: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates_from_pem(certificate_chain)?;
    let key = PrivateKeyDer::from_pem_slice(private_key).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey,
        other => TlsError::Pem(other.to_string()),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Rejected(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Rejected(error.to_string()))?;
    Ok(Arc::new(config))
}

/// A server's TLS settings, replaceable while it runs: every new connection's
/// handshake uses the configuration current when it was accepted, and connections
/// already open keep theirs (a certificate renewal drops nobody). Clones share the
/// configuration.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<TlsAcceptor>>,
}

impl ServerTls {
    /// Serve TLS with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        ServerTls {
            current: Arc::new(RwLock::new(TlsAcceptor::from(config))),
        }
    }

    /// Serve TLS with a PEM certificate chain and private key
    /// ([`server_config_from_pem`]).
    pub fn from_pem(certificate_chain: &[u8], private_key: &[u8]) -> Result<Self, TlsError> {
        server_config_from_pem(certificate_chain, private_key).map(ServerTls::new)
    }

    /// Use `config` for the connections accepted from now on.
    pub fn reload(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = TlsAcceptor::from(config);
    }

    /// Use a new PEM certificate chain and key from now on; on error the current
    /// configuration stays.
    pub fn reload_pem(&self, certificate_chain: &[u8], private_key: &[u8]) -> Result<(), TlsError> {
        self.reload(server_config_from_pem(certificate_chain, private_key)?);
        Ok(())
    }

    /// The TLS handshake of an accepted connection with the current configuration,
    /// for an application that serves HTTP itself (unbounded: the caller sets the
    /// time limit).
    pub async fn accept<S>(&self, stream: S) -> io::Result<futures_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        acceptor.accept(stream).await
    }
}

impl From<Arc<ServerConfig>> for ServerTls {
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls::new(config)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// What a client trusts: the defaults plus extra roots, or a whole configuration.
#[derive(Default)]
pub(crate) struct ClientTls {
    /// Roots added to the defaults ([`ClientBuilder::add_root_pem`](crate::ClientBuilder::add_root_pem)).
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
    /// The first PEM input that failed to parse, reported by `build`.
    pub(crate) error: Option<TlsError>,
    /// A configuration that replaces everything else.
    pub(crate) config: Option<Arc<ClientConfig>>,
}

impl ClientTls {
    /// The connector: the given configuration, or the default roots plus the extra
    /// ones with the ring provider.
    pub(crate) fn connector(&self) -> Result<TlsConnector, TlsError> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let config = match &self.config {
            Some(config) => config.clone(),
            None => client_config(&self.extra_roots)?,
        };
        Ok(TlsConnector::from(config))
    }
}

/// The configuration a client uses for `wss://` unless given one: the ring provider,
/// rustls's safe defaults, and as roots the Mozilla roots (plus the platform's store
/// with the `native-roots` feature) and `extra_roots`. For other code that speaks TLS
/// to the same servers (a load generator) and should trust what a client trusts.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = default_roots()?;
    for root in extra_roots {
        roots
            .add(root.clone())
            .map_err(|error| TlsError::Rejected(format!("root certificate: {error}")))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Rejected(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The Mozilla roots bundled by webpki-roots, plus the platform's store with the
/// `native-roots` feature (additive, as Cargo features must be).
fn default_roots() -> Result<RootCertStore, TlsError> {
    #[allow(unused_mut)]
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    #[cfg(feature = "native-roots")]
    {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 && !native.errors.is_empty() {
            let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
            return Err(TlsError::NoRoots(errors.join("; ")));
        }
    }
    Ok(roots)
}

/// The TLS name a client verifies: a DNS name, or an IP address literal.
pub(crate) fn server_name(host: &url::Host<&str>) -> Result<ServerName<'static>, TlsError> {
    match host {
        url::Host::Domain(domain) => ServerName::try_from(domain.to_string())
            .map_err(|error| TlsError::Rejected(format!("host name `{domain}`: {error}"))),
        url::Host::Ipv4(ip) => Ok(ServerName::IpAddress(std::net::IpAddr::V4(*ip).into())),
        url::Host::Ipv6(ip) => Ok(ServerName::IpAddress(std::net::IpAddr::V6(*ip).into())),
    }
}

/// A connection's byte stream: plain TCP, or TLS over it (boxed: rustls's state is
/// large, and a plain connection should not pay for it).
pub(crate) enum MaybeTls<S> {
    /// `ws://`.
    Plain(S),
    /// `wss://`, either side.
    Tls(Box<futures_rustls::TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    /// Wrap a finished TLS handshake.
    pub(crate) fn tls(stream: impl Into<futures_rustls::TlsStream<S>>) -> Self {
        MaybeTls::Tls(Box::new(stream.into()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_close(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_close(cx),
        }
    }
}
