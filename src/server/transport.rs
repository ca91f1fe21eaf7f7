//! The peer transport: QUIC (quinn) with mutual TLS (rustls). One connection per peer, one
//! bidirectional stream per request: a kind byte and a body go out, the stream is finished, the
//! reply is read to its end. A node accepts a peer only if the cluster CA signed its certificate
//! and the certificate names a current member; refusals are logged with the reason.
//!
//! The only module that imports quinn.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::TlsFiles;

/// Application protocol name negotiated on every connection.
const ALPN: &[u8] = b"geolock-peer/1";

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file of the member's peer identity cannot be read.
    #[error("peer TLS: {path}: {source}")]
    TlsFile { path: PathBuf, source: rustls::pki_types::pem::Error },
    /// rustls refused the identity or the settings.
    #[error("peer TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("peer TLS: client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer TLS: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("peer transport: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("refused peer {remote}: {reason}")]
    Refused { remote: SocketAddr, reason: String },
    #[error("peer message of {len} bytes is over peer_message_bytes_max ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("peer connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("peer stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("peer stream: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    #[error("peer stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// A message that is not the postcard of what its kind carries.
    #[error("undecodable peer message: {0}")]
    Undecodable(#[from] postcard::Error),
    #[error("peer request of unknown kind {kind}")]
    UnknownKind { kind: u8 },
    /// A request kind that opens a stream of frames, sent as a single request.
    #[error("peer request of kind {kind} must open a stream")]
    NotACall { kind: u8 },
    #[error("snapshot of {total} bytes is over peer_snapshot_bytes_max {max}")]
    SnapshotTooLarge { total: u64, max: usize },
    #[error("snapshot piece at offset {offset} out of order")]
    SnapshotOutOfOrder { offset: u64 },
    /// A witness's snapshot, which has no data, offered to a member that holds the key space:
    /// installing it would erase the key space.
    #[error("refused: a snapshot without data (a witness's) would erase this member's key space")]
    SnapshotWithoutData,
}

fn pem_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TransportError + '_ {
    move |source| TransportError::TlsFile { path: path.to_path_buf(), source }
}

/// A bound QUIC endpoint that both accepts and dials peers. Its identity, CA bundle and
/// revocation lists are read again by [`Transport::reload`]: new handshakes use them,
/// connections already up stay.
pub struct Transport {
    endpoint: quinn::Endpoint,
    tls: TlsFiles,
    /// The settings dialing uses, and the contents of the files they were made from.
    client: std::sync::RwLock<(Vec<Vec<u8>>, quinn::ClientConfig)>,
}

/// An authenticated connection to a peer.
pub type Connection = quinn::Connection;

/// The contents of the peer TLS files, in the order [`configs`] reads them.
fn read_files(tls: &TlsFiles) -> Result<Vec<Vec<u8>>, TransportError> {
    [Some(&tls.ca), Some(&tls.cert), Some(&tls.key), tls.crl.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| {
            std::fs::read(path).map_err(|e| TransportError::TlsFile {
                path: path.clone(),
                source: rustls::pki_types::pem::Error::Io(e),
            })
        })
        .collect()
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("idle timeout fits")));
    t.receive_window(geolock_core::limits::PEER_RECEIVE_WINDOW_BYTES.into());
    t.stream_receive_window(geolock_core::limits::PEER_STREAM_RECEIVE_WINDOW_BYTES.into());
    Arc::new(t)
}

/// The accepting and dialing settings made from the files' `contents`: mutual TLS 1.3, peers
/// checked against the CA bundle and, both ways, the revocation lists.
fn configs(tls: &TlsFiles, contents: &[Vec<u8>]) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&contents[0]) {
        roots.add(ca.map_err(pem_err(&tls.ca))?)?;
    }
    let certs =
        CertificateDer::pem_slice_iter(&contents[1]).collect::<Result<Vec<_>, _>>().map_err(pem_err(&tls.cert))?;
    let key = PrivateKeyDer::from_pem_slice(&contents[2]).map_err(pem_err(&tls.key))?;
    let crls = match &tls.crl {
        None => Vec::new(),
        Some(path) => {
            let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&contents[3])
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_err(path))?;
            // A file caught half-written (truncated before it is filled again) holds none:
            // taking that as "nothing revoked" would let a revoked peer in meanwhile.
            if crls.is_empty() {
                return Err(pem_err(path)(rustls::pki_types::pem::Error::NoItemsFound));
            }
            crls
        }
    };
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let dialer =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).with_crls(crls).build()?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(dialer)
        .with_client_auth_cert(certs, key)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server)?));
    server.transport_config(transport_config());
    let mut client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client)?));
    client.transport_config(transport_config());
    Ok((server, client))
}

impl Transport {
    /// Bind `addr` with this node's identity.
    pub fn bind(addr: SocketAddr, tls: &TlsFiles) -> Result<Transport, TransportError> {
        let contents = read_files(tls)?;
        let (server, client) = configs(tls, &contents)?;
        let endpoint = quinn::Endpoint::server(server, addr)?;
        Ok(Transport { endpoint, tls: tls.clone(), client: std::sync::RwLock::new((contents, client)) })
    }

    /// Make new settings if the files changed: `Ok(true)` once they took effect, `Ok(false)`
    /// if nothing changed, the error if the new files do not make settings (the old stay).
    pub fn reload(&self) -> Result<bool, TransportError> {
        let contents = read_files(&self.tls)?;
        if self.client.read().expect("peer TLS lock poisoned").0 == contents {
            return Ok(false);
        }
        let (server, client) = configs(&self.tls, &contents)?;
        self.endpoint.set_server_config(Some(server));
        *self.client.write().expect("peer TLS lock poisoned") = (contents, client);
        Ok(true)
    }

    /// The bound address (tests bind port 0).
    #[cfg(test)]
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Dial the member `name` at `addr`; its certificate must chain to the CA and name it.
    pub async fn connect(&self, addr: SocketAddr, name: &str) -> Result<Connection, TransportError> {
        let err = |reason: String| TransportError::Connect { peer: format!("{name} at {addr}"), reason };
        let config = self.client.read().expect("peer TLS lock poisoned").1.clone();
        let connecting = self.endpoint.connect_with(config, addr, name).map_err(|e| err(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(3), connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(err(e.to_string())),
            Err(_) => Err(err("handshake timed out".into())),
        }
    }

    /// The next peer that completed the handshake and names one of `members` (its name is
    /// returned with it). Peers that fail either check are refused, logged, and skipped.
    /// `None` once the endpoint is closed.
    pub async fn accept(&self, members: impl Fn() -> Vec<String>) -> Option<(Connection, String)> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{}", TransportError::Refused { remote, reason: format!("handshake failed: {e}") });
                    continue;
                }
            };
            match member_of(&conn, &members()) {
                Ok(name) => return Some((conn, name)),
                Err(reason) => {
                    tracing::warn!("{}", TransportError::Refused { remote, reason: reason.clone() });
                    conn.close(1u32.into(), reason.as_bytes());
                }
            }
        }
    }

    /// Stop accepting and close every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// The member a connection's client certificate names.
fn member_of(conn: &Connection, members: &[String]) -> Result<String, String> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty certificate chain")?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unreadable certificate: {e}"))?;
    for m in members {
        let Ok(name) = ServerName::try_from(m.as_str()) else { continue };
        if cert.verify_is_valid_for_subject_name(&name).is_ok() {
            return Ok(m.clone());
        }
    }
    Err(format!("its certificate names no current member (members: {})", members.join(", ")))
}

/// Send one request (`kind`, `body`) on a new stream and read the whole reply.
pub async fn call(conn: &Connection, kind: u8, body: &[u8], max_reply: usize) -> Result<Vec<u8>, TransportError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[kind]).await?;
    send.write_all(body).await?;
    send.finish()?;
    recv.read_to_end(max_reply).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => TransportError::TooLarge { len: max_reply + 1, max: max_reply },
        other => other.into(),
    })
}

/// A request read from a peer, and where its reply goes.
pub struct Request {
    pub kind: u8,
    pub body: Vec<u8>,
    reply: quinn::SendStream,
}

impl Request {
    /// Send the reply and finish the stream.
    pub async fn reply(mut self, body: &[u8]) -> Result<(), TransportError> {
        self.reply.write_all(body).await?;
        Ok(self.reply.finish()?)
    }
}

/// What a peer opened a stream for.
pub enum Incoming {
    /// One request, answered with one reply.
    Call(Request),
    /// A long-lived stream of frames each way (replication); the caller reads requests from
    /// `frames` and writes replies, in order, to `replies`.
    Duplex { frames: FrameReader, replies: FrameWriter },
}

/// The next request on `conn`; `None` when the peer closes it. A stream whose kind byte is
/// `duplex_kind` is handed over as it is, to carry many frames.
pub async fn next_request(conn: &Connection, max: usize, duplex_kind: u8) -> Option<Result<Incoming, TransportError>> {
    let (send, mut recv) = conn.accept_bi().await.ok()?;
    let mut kind = [0u8; 1];
    if let Err(e) = recv.read_exact(&mut kind).await {
        return Some(Err(e.into()));
    }
    if kind[0] == duplex_kind {
        return Some(Ok(Incoming::Duplex { frames: FrameReader(recv), replies: FrameWriter(send) }));
    }
    Some(match recv.read_to_end(max).await {
        Ok(body) => Ok(Incoming::Call(Request { kind: kind[0], body, reply: send })),
        Err(quinn::ReadToEndError::TooLong) => Err(TransportError::TooLarge { len: max + 1, max }),
        Err(e) => Err(e.into()),
    })
}

/// Open a duplex stream of `kind` to a peer.
pub async fn open_duplex(conn: &Connection, kind: u8) -> Result<(FrameWriter, FrameReader), TransportError> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&[kind]).await?;
    Ok((FrameWriter(send), FrameReader(recv)))
}

/// Writes length-prefixed frames on a stream.
pub struct FrameWriter(quinn::SendStream);

impl FrameWriter {
    /// Write one frame.
    pub async fn write(&mut self, body: &[u8]) -> Result<(), TransportError> {
        let len = u32::try_from(body.len())
            .map_err(|_| TransportError::TooLarge { len: body.len(), max: u32::MAX as usize })?;
        self.0.write_all(&len.to_be_bytes()).await?;
        Ok(self.0.write_all(body).await?)
    }

    /// End the stream.
    pub fn finish(mut self) {
        let _ = self.0.finish();
    }
}

/// Reads length-prefixed frames from a stream.
pub struct FrameReader(quinn::RecvStream);

impl FrameReader {
    /// The next frame; `None` once the peer has finished the stream.
    pub async fn read(&mut self, max: usize) -> Result<Option<Vec<u8>>, TransportError> {
        let mut len = [0u8; 4];
        match self.0.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(TransportError::TooLarge { len, max });
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).await?;
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &std::path::Path, name: &str) -> TlsFiles {
        let (cert, key) = geolock_testkit::certs::issue(dir, name, &["127.0.0.1".to_string()]).unwrap();
        TlsFiles { ca: dir.join("ca.crt"), cert, key, crl: None }
    }

    fn any_port() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn members_talk_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        geolock_testkit::certs::init_ca(dir.path()).unwrap();
        let other_ca = tempfile::tempdir().unwrap();
        geolock_testkit::certs::init_ca(other_ca.path()).unwrap();

        let server = Transport::bind(any_port(), &node(dir.path(), "n1")).unwrap();
        let addr = server.local_addr().unwrap();
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = accepted.clone();
        tokio::spawn(async move {
            while let Some((conn, name)) = server.accept(|| vec!["n1".to_string(), "n2".to_string()]).await {
                seen.lock().unwrap().push(name);
                tokio::spawn(async move {
                    while let Some(Ok(Incoming::Call(req))) = next_request(&conn, 1024, u8::MAX).await {
                        let mut echo = vec![req.kind];
                        echo.extend_from_slice(&req.body);
                        let _ = req.reply(&echo).await;
                    }
                });
            }
        });

        // A member with a certificate from the cluster CA.
        let n2 = Transport::bind(any_port(), &node(dir.path(), "n2")).unwrap();
        let conn = n2.connect(addr, "n1").await.unwrap();
        assert_eq!(call(&conn, 7, b"ping", 1024).await.unwrap(), b"\x07ping");
        // A reply over the caller's bound is refused, not buffered.
        let big = vec![b'x'; 2000];
        assert!(matches!(
            call(&conn, 1, &big, 1024).await,
            Err(TransportError::TooLarge { .. } | TransportError::ReadToEnd(_) | TransportError::Connection(_))
        ));

        // A certificate from another CA: the handshake fails.
        let stranger = Transport::bind(any_port(), &node(other_ca.path(), "n2")).unwrap();
        let refused = match stranger.connect(addr, "n1").await {
            Err(_) => true,
            Ok(c) => call(&c, 1, b"x", 1024).await.is_err(),
        };
        assert!(refused, "a peer from another CA was served");

        // The right CA but a name that is not a member: refused after the handshake.
        let outsider = Transport::bind(any_port(), &node(dir.path(), "n9")).unwrap();
        let served = match outsider.connect(addr, "n1").await {
            Err(_) => false,
            Ok(c) => call(&c, 1, b"x", 1024).await.is_ok(),
        };
        assert!(!served, "a non-member was served");
        assert_eq!(*accepted.lock().unwrap(), vec!["n2".to_string()]);
    }

    /// A peer whose certificate is on the revocation list is refused, the list being read
    /// again while the member runs; a new certificate for the same member is let in.
    #[tokio::test]
    async fn a_revoked_peer_is_refused_once_the_list_names_it() {
        let dir = tempfile::tempdir().unwrap();
        geolock_testkit::certs::init_ca(dir.path()).unwrap();
        // An empty list to start with: nobody is revoked.
        let crl = geolock_testkit::certs::revoke(dir.path(), &[]).unwrap();
        let server =
            Arc::new(Transport::bind(any_port(), &TlsFiles { crl: Some(crl), ..node(dir.path(), "n1") }).unwrap());
        let addr = server.local_addr().unwrap();
        let serving = server.clone();
        tokio::spawn(async move {
            while let Some((conn, _)) = serving.accept(|| vec!["n2".to_string()]).await {
                tokio::spawn(async move {
                    while let Some(Ok(Incoming::Call(req))) = next_request(&conn, 1024, u8::MAX).await {
                        let _ = req.reply(b"ok").await;
                    }
                });
            }
        });
        let served = |t: Transport| async move {
            match t.connect(addr, "n1").await {
                Ok(c) => call(&c, 1, b"x", 1024).await.is_ok(),
                Err(_) => false,
            }
        };
        let n2 = node(dir.path(), "n2");
        assert!(served(Transport::bind(any_port(), &n2).unwrap()).await, "before its revocation");
        geolock_testkit::certs::revoke(dir.path(), &["n2"]).unwrap();
        assert!(server.reload().unwrap(), "the new list is taken");
        assert!(!server.reload().unwrap(), "nothing changed since");
        assert!(!served(Transport::bind(any_port(), &n2).unwrap()).await, "a revoked peer was served");
        // The member gets a new certificate, not on the list.
        let renewed = node(dir.path(), "n2");
        assert!(served(Transport::bind(any_port(), &renewed).unwrap()).await, "after its renewal");
        // A malformed list is refused and the one in use stays.
        std::fs::write(
            dir.path().join("revoked.crl"),
            "-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n",
        )
        .unwrap();
        assert!(server.reload().is_err());
        assert!(served(Transport::bind(any_port(), &renewed).unwrap()).await);
    }

    #[tokio::test]
    async fn the_server_name_is_checked_by_the_dialer() {
        let dir = tempfile::tempdir().unwrap();
        geolock_testkit::certs::init_ca(dir.path()).unwrap();
        let server = Transport::bind(any_port(), &node(dir.path(), "n1")).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move { server.accept(|| vec!["n2".to_string()]).await });
        let n2 = Transport::bind(any_port(), &node(dir.path(), "n2")).unwrap();
        // n1's certificate does not name n3.
        assert!(n2.connect(addr, "n3").await.is_err());
    }
}
