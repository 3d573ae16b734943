//! TLS settings from PEM files that are re-read when they change
//! (cert-manager rotates Secrets in place): the edge's `wss://`, the gRPC
//! API's TLS with client certificates (`--grpc-tls-cert`, `--grpc-tls-key`,
//! `--grpc-client-ca`), and the client side a service uses to call
//! another's gRPC API over (m)TLS. New handshakes get what the files hold
//! now; open connections keep what they were made with. Files that no
//! longer load keep the settings read before, and the log says why.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How often the files are compared with what is loaded. Reading a few
/// small files costs nothing, and comparing their bytes sees every kind of
/// replacement (a write in place, a rename, a symlink swap like a
/// Kubernetes Secret volume's) where modification times may not.
pub const RELOAD_POLL: Duration = Duration::from_secs(3);

/// How long a peer may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// gRPC handshakes in progress at once, at most; connections beyond are
/// closed at once, so that peers that stall their handshakes cannot use up
/// the process's file descriptors.
const MAX_HANDSHAKES: usize = 1024;

/// ALPN of gRPC: HTTP/2 only.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];

/// Why a certificate, key or CA could not be used. Each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)", .0.display())]
    NoKey(PathBuf),
    #[error("{} is not valid PEM", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key in {} is not the key of the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the key in {} cannot be used with the certificate in {}", .key.display(), .cert.display())]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA certificates in {} cannot be used", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A server's TLS settings, re-read when their files change.
pub type ServerTls = Reloadable<ServerConfig>;

/// A client's TLS settings, re-read when their files change.
pub type ClientTls = Reloadable<ClientConfig>;

/// How a set of files' contents becomes a setting.
type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, TlsError> + Send + Sync;

/// A setting built from files, rebuilt when they change. Cheap to clone.
pub struct Reloadable<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Reloadable {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.inner.what)
            .field("paths", &self.inner.paths)
            .finish()
    }
}

struct Inner<T> {
    paths: Vec<PathBuf>,
    build: Box<Build<T>>,
    current: RwLock<Arc<T>>,
    /// The files' bytes as last read, built or not: a change is tried once.
    seen: Mutex<Vec<Vec<u8>>>,
    /// What the setting is, for the log ("TLS certificate").
    what: &'static str,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Reloadable<T>, TlsError> {
        let files = paths
            .iter()
            .map(|p| read(p))
            .collect::<Result<Vec<_>, _>>()?;
        let current = build(&files)?;
        Ok(Reloadable {
            inner: Arc::new(Inner {
                paths,
                build: Box::new(build),
                current: RwLock::new(Arc::new(current)),
                seen: Mutex::new(files),
                what,
            }),
        })
    }

    /// What new handshakes use.
    pub fn current(&self) -> Arc<T> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The first file (the certificate), for start-up lines.
    pub fn path(&self) -> &Path {
        &self.inner.paths[0]
    }

    /// Re-reads the files; `Ok(true)` when they changed and what they hold
    /// now is in use. On an error what was loaded before stays.
    pub async fn refresh(&self) -> Result<bool, TlsError> {
        let inner = &self.inner;
        let mut files = Vec::with_capacity(inner.paths.len());
        for path in &inner.paths {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|source| TlsError::Read {
                    path: path.clone(),
                    source,
                })?;
            files.push(bytes);
        }
        {
            let mut seen = inner.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == files {
                return Ok(false);
            }
            seen.clone_from(&files);
        }
        let new = (inner.build)(&files)?;
        *inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        Ok(true)
    }

    /// Checks the files every [`RELOAD_POLL`] until `stop`.
    pub fn watch(&self, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let what = this.inner.what;
            let mut last_warning = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_POLL) => {}
                    _ = stop.cancelled() => return,
                }
                match this.refresh().await {
                    Ok(false) => {}
                    Ok(true) => {
                        last_warning = None;
                        tracing::info!(
                            "{what} reloaded from {}: new connections get it, open ones keep theirs",
                            this.files()
                        );
                    }
                    Err(e) => {
                        let text = herald_broker::chain(&e).to_string();
                        // Once per problem, not every few seconds.
                        if last_warning.as_ref() != Some(&text) {
                            tracing::warn!(
                                "{what} not reloaded, still using the previous one: {text}"
                            );
                            last_warning = Some(text);
                        }
                    }
                }
            }
        });
    }

    fn files(&self) -> String {
        let names: Vec<String> = self
            .inner
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.join(", ")
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS: its certificate chain (its own first) and key, offering
/// `alpn`, and when `client_ca` is given, taking only clients that present
/// a certificate that CA signed (mutual TLS).
pub fn server(
    cert: &Path,
    key: &Path,
    alpn: &'static [&'static [u8]],
    client_ca: Option<&Path>,
) -> Result<Reloadable<ServerConfig>, TlsError> {
    let (cert_path, key_path) = (cert.to_path_buf(), key.to_path_buf());
    let ca_path = client_ca.map(Path::to_path_buf);
    let mut paths = vec![cert_path.clone(), key_path.clone()];
    paths.extend(ca_path.clone());
    let what = if client_ca.is_some() {
        "TLS certificate and client CA"
    } else {
        "TLS certificate"
    };
    Reloadable::load(what, paths, move |files| {
        let provider = provider();
        let certified = certified(&cert_path, &files[0], &key_path, &files[1], &provider)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let builder = match &ca_path {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots(ca, &files[2])?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::BadCa {
                            path: ca.clone(),
                            source: Box::new(e),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    })
}

/// A client's TLS: trusting the CA certificates in `ca`, presenting
/// `identity` (certificate chain, key) to servers that ask for one.
pub fn client(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &'static [&'static [u8]],
) -> Result<Reloadable<ClientConfig>, TlsError> {
    let ca_path = ca.to_path_buf();
    let identity = identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
    let mut paths = vec![ca_path.clone()];
    if let Some((c, k)) = &identity {
        paths.extend([c.clone(), k.clone()]);
    }
    let what = if identity.is_some() {
        "client certificate and CA"
    } else {
        "CA"
    };
    Reloadable::load(what, paths, move |files| {
        let provider = provider();
        let roots = roots(&ca_path, &files[0])?;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots);
        let mut config = match &identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certified = certified(cert, &files[1], key, &files[2], &provider)?;
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    certified,
                )))
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
    }
    Ok(roots)
}

fn certified(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert_path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(key_path.to_path_buf()),
        source => TlsError::Pem {
            path: key_path.to_path_buf(),
            source,
        },
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| match source {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            }
        }
        source => TlsError::Unusable {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        },
    })
}

/// The connections of a gRPC listener, plain or over TLS, for
/// `Server::serve_with_incoming*`: [`crate::grpc_incoming`].
pub enum GrpcIncoming {
    Plain(tonic::transport::server::TcpIncoming),
    Tls(tokio_stream::wrappers::ReceiverStream<io::Result<Box<GrpcTlsStream>>>),
}

impl GrpcIncoming {
    pub(crate) fn new(listener: TcpListener, tls: Option<Reloadable<ServerConfig>>) -> Self {
        match tls {
            None => GrpcIncoming::Plain(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
            Some(tls) => GrpcIncoming::Tls(tls_incoming(listener, tls)),
        }
    }
}

impl tokio_stream::Stream for GrpcIncoming {
    type Item = io::Result<GrpcConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            GrpcIncoming::Plain(s) => Pin::new(s)
                .poll_next(cx)
                .map(|c| c.map(|c| c.map(GrpcConn::Plain))),
            GrpcIncoming::Tls(s) => Pin::new(s)
                .poll_next(cx)
                .map(|c| c.map(|c| c.map(GrpcConn::Tls))),
        }
    }
}

/// One gRPC connection, plain or over TLS. Either way its connect info is
/// the peer's TCP address.
pub enum GrpcConn {
    Plain(TcpStream),
    Tls(Box<GrpcTlsStream>),
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            GrpcConn::Plain(tcp) => tcp.connect_info(),
            GrpcConn::Tls(tls) => tls.connect_info(),
        }
    }
}

/// Calls `$method` on whichever stream `$self` holds.
macro_rules! either {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).$method($($arg),*),
            GrpcConn::Tls(s) => Pin::new(&mut s.tls).$method($($arg),*),
        }
    };
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(self, poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either!(self, poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            GrpcConn::Plain(s) => s.is_write_vectored(),
            GrpcConn::Tls(s) => s.tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, poll_shutdown(cx))
    }
}

/// One gRPC connection that completed its TLS handshake.
pub struct GrpcTlsStream {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

impl tonic::transport::server::Connected for GrpcTlsStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

/// The connections of `listener` once their TLS handshake (with `tls` as
/// it is at that moment) is done.
/// Handshakes run side by side (at most [`MAX_HANDSHAKES`]), each for at
/// most [`HANDSHAKE_TIMEOUT`], so that a peer that stalls its handshake
/// holds up no one; a peer refused (no client certificate, or one the CA
/// did not sign) is said in the log and never reaches the API. Accepting ends when the server drops the
/// stream.
fn tls_incoming(
    listener: TcpListener,
    tls: Reloadable<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Box<GrpcTlsStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let local = listener.local_addr().ok();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, mostly: let some close.
                        tracing::warn!("gRPC: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "gRPC: {MAX_HANDSHAKES} TLS handshakes already in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(Box::new(GrpcTlsStream { tls, peer, local })))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, "gRPC: TLS handshake refused or failed: {e}");
                    }
                    Err(_) => {
                        tracing::info!(%peer, "gRPC: TLS handshake took over {HANDSHAKE_TIMEOUT:?}; closed");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects a gRPC client (`Endpoint::connect_with_connector_lazy`) over
/// TLS with `tls` as it is at each connect, so that a rotated client
/// certificate or CA is used from the next connection on.
#[derive(Clone)]
pub struct GrpcConnector {
    tls: Reloadable<ClientConfig>,
}

impl GrpcConnector {
    pub fn new(tls: Reloadable<ClientConfig>) -> GrpcConnector {
        GrpcConnector { tls }
    }
}

impl tower_service::Service<http::Uri> for GrpcConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.current();
        Box::pin(async move {
            let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} names no host")))?;
            // An IPv6 address comes bracketed in a URL, bare in a name.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| invalid(format!("{host} is not a host name TLS can check")))?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    /// A CA of the tests' own.
    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        fn pem(&self) -> String {
            self.0.pem()
        }

        /// (cert PEM, key PEM) for 127.0.0.1, good for servers and clients.
        fn leaf(&self) -> (String, String) {
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Files {
            Files(tempfile::tempdir().unwrap())
        }

        fn put(&self, name: &str, pem: &str) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        }

        /// TLS without client certificates, with a certificate `ca` signed.
        fn server_tls(&self, ca: &Ca) -> ServerTls {
            let (cert, key) = ca.leaf();
            super::server(
                &self.put("server.crt", &cert),
                &self.put("server.key", &key),
                ALPN_H2,
                None,
            )
            .unwrap()
        }
    }

    /// A gRPC server (health service only) over `tls`.
    async fn server(tls: ServerTls) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(crate::grpc_incoming(listener, Some(tls))),
        );
        addr
    }

    /// Whether a health check over a new connection with `tls` is answered.
    async fn answered(addr: SocketAddr, tls: ClientTls) -> Result<(), tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .connect_with_connector_lazy(GrpcConnector::new(tls));
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await?;
        assert_eq!(reply.get_ref().status(), ServingStatus::Serving);
        Ok(())
    }

    #[tokio::test]
    async fn mutual_tls_takes_only_clients_the_ca_signed_and_follows_a_new_ca() {
        let (server_ca, clients_ca, other_ca) = (Ca::new(), Ca::new(), Ca::new());
        let files = Files::new();
        let (cert, key) = server_ca.leaf();
        let server_tls = super::server(
            &files.put("server.crt", &cert),
            &files.put("server.key", &key),
            ALPN_H2,
            Some(&files.put("clients-ca.crt", &clients_ca.pem())),
        )
        .unwrap();
        let addr = server(server_tls.clone()).await;
        let trust = files.put("server-ca.crt", &server_ca.pem());
        let client_of = |ca: &Ca, name: &str| {
            let (cert, key) = ca.leaf();
            let cert = files.put(&format!("{name}.crt"), &cert);
            let key = files.put(&format!("{name}.key"), &key);
            client(&trust, Some((&cert, &key)), ALPN_H2).unwrap()
        };
        let signed = client_of(&clients_ca, "signed");
        let stranger = client_of(&other_ca, "stranger");

        answered(addr, signed.clone())
            .await
            .expect("a client with a certificate from the client CA is answered");
        let no_cert = client(&trust, None, ALPN_H2).unwrap();
        assert!(answered(addr, no_cert).await.is_err(), "no certificate");
        assert!(
            answered(addr, stranger.clone()).await.is_err(),
            "a certificate from another CA"
        );
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        assert!(
            HealthClient::new(plain)
                .check(HealthCheckRequest::default())
                .await
                .is_err(),
            "plain text"
        );

        // The client CA is rotated: the other CA's clients get in, the
        // first's no longer do.
        files.put("clients-ca.crt", &other_ca.pem());
        assert!(server_tls.refresh().await.unwrap());
        answered(addr, stranger).await.expect("the new CA's client");
        assert!(answered(addr, signed).await.is_err(), "the old CA's client");

        // A file that no longer loads keeps what was loaded.
        files.put("clients-ca.crt", "not a certificate");
        assert!(matches!(
            server_tls.refresh().await.unwrap_err(),
            TlsError::NoCertificate(_)
        ));
        answered(addr, client_of(&other_ca, "again"))
            .await
            .expect("still the new CA");
    }

    #[tokio::test]
    async fn a_client_that_trusts_another_ca_refuses_the_server() {
        let (server_ca, other_ca) = (Ca::new(), Ca::new());
        let files = Files::new();
        let addr = server(files.server_tls(&server_ca)).await;
        let right = client(&files.put("right.crt", &server_ca.pem()), None, ALPN_H2).unwrap();
        answered(addr, right)
            .await
            .expect("TLS without client certificates");
        let wrong = client(&files.put("wrong.crt", &other_ca.pem()), None, ALPN_H2).unwrap();
        assert!(answered(addr, wrong).await.is_err());
    }

    #[tokio::test]
    async fn a_stalled_handshake_holds_up_no_one() {
        let ca = Ca::new();
        let files = Files::new();
        let addr = server(files.server_tls(&ca)).await;
        // Connected, and silent.
        let _stalled = TcpStream::connect(addr).await.unwrap();
        let tls = client(&files.put("ca.crt", &ca.pem()), None, ALPN_H2).unwrap();
        answered(addr, tls).await.expect("answered meanwhile");
    }
}
