//! TLS on the client port (etcd's `--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`, on every `https://` client URL), terminated here with tokio-rustls
//! rather than by tonic, whose TLS settings are fixed once it serves: every handshake here
//! uses the configuration loaded last, so replacing the certificate, its key or the CA
//! bundle takes effect on the next connection, without a restart, and connections already
//! open (a watch stream, say) go on as they were.
//!
//! The files are read again every [`crate::reload::RELOAD_CHECK_EVERY`]; a set that does not make a valid
//! configuration (a key that does not match its certificate, a half-written file) is logged
//! and the configuration in use stays.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::Stream;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// TLS handshakes under way at once on one listener; connections past this wait to be
/// accepted (each handshake costs a signature, about 1 ms of CPU with a P-256 key).
pub const TLS_HANDSHAKES_IN_FLIGHT_MAX: usize = 1024;

/// A client that has not finished its handshake by then is dropped, so a client that sends
/// nothing cannot hold a handshake slot.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client TLS files, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are checked against this bundle when given.
    pub ca: Option<PathBuf>,
    /// A client certificate is required (and `ca` is set).
    pub client_cert_auth: bool,
}

/// Why the client TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("client TLS: {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("client TLS: {path}: {why}")]
    Pem { path: PathBuf, why: String },
    #[error("client TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client TLS: the CA bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The contents of the files a configuration was made from, to tell when they change.
type Contents = Vec<Vec<u8>>;

/// The configuration client handshakes use now, and how to make it again.
pub struct ClientTls {
    files: ClientTlsFiles,
    current: RwLock<(Contents, Arc<ServerConfig>)>,
}

impl ClientTls {
    /// Load the files; an error names the file that was wrong.
    pub fn load(files: ClientTlsFiles) -> Result<Arc<ClientTls>, ClientTlsError> {
        let contents = read_all(&files)?;
        let config = build(&files, &contents)?;
        Ok(Arc::new(ClientTls { files, current: RwLock::new((contents, Arc::new(config))) }))
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("client TLS lock poisoned").1.clone()
    }

    /// Make a new configuration if the files changed: `Ok(true)` when one took effect,
    /// `Ok(false)` when nothing changed, the error when the new files do not make one (the
    /// configuration in use stays).
    pub fn reload(&self) -> Result<bool, ClientTlsError> {
        let contents = read_all(&self.files)?;
        if self.current.read().expect("client TLS lock poisoned").0 == contents {
            return Ok(false);
        }
        let config = build(&self.files, &contents)?;
        *self.current.write().expect("client TLS lock poisoned") = (contents, Arc::new(config));
        Ok(true)
    }

    /// The connections accepted on `listener` once their handshake is done, each with the
    /// configuration in use when it arrived; handshakes run concurrently, at most
    /// [`TLS_HANDSHAKES_IN_FLIGHT_MAX`] at once, and those that fail or time out are dropped.
    pub fn incoming(
        self: &Arc<ClientTls>,
        listener: TcpListener,
    ) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(TLS_HANDSHAKES_IN_FLIGHT_MAX));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors, say: wait rather than spin.
                        tracing::warn!("accepting a client connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("client TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("client TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn read_all(files: &ClientTlsFiles) -> Result<Contents, ClientTlsError> {
    [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| std::fs::read(path).map_err(|source| ClientTlsError::Read { path: path.clone(), source }))
        .collect()
}

/// Reload the files every second while `tls` serves (see [`crate::reload::watch`]).
pub fn watch(tls: &Arc<ClientTls>) {
    crate::reload::watch(tls, "client TLS settings", ClientTls::reload);
}

fn build(files: &ClientTlsFiles, contents: &Contents) -> Result<ServerConfig, ClientTlsError> {
    let pem = |path: &PathBuf, why: String| ClientTlsError::Pem { path: path.clone(), why };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents[0])
        .collect::<Result<_, _>>()
        .map_err(|e| pem(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem(&files.cert, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| pem(&files.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&contents[2]) {
                roots.add(c.map_err(|e| pem(ca, e.to_string()))?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            // Without --client-cert-auth a certificate is checked if one is sent, and names
            // nobody (etcd's VerifyClientCertIfGiven).
            let verifier = if files.client_cert_auth { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build()?)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    // gRPC clients (grpc-go among them) insist on h2 by ALPN; /metrics and the health paths
    // are also served over HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The subject common name of a DER certificate, `""` when it has none (etcd takes an empty
/// one as no user).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok().map(str::to_string));
    Some(cn.unwrap_or_default())
}
