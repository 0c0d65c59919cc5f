//! The server's TLS front door: a hand-built rustls `ServerConfig` (client
//! certificates optional so that enrollment works without one), an accept
//! loop that handshakes concurrently and drops failures, and the peer facts
//! (identity URI, serial) attached to every connection for per-RPC checks.
//!
//! Authorisation never happens here: the handshake only proves the client
//! holds a key certified by our CA. Each RPC decides what that identity may do
//! (see `auth`). Revocation does happen here too: a certificate on the deny
//! list is refused during the handshake (alert `certificate_revoked`), every
//! identified connection is registered with `revocation` so that revoking its
//! identity closes it, and session resumption is off so that every
//! connection's certificate goes through that check.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flotte_proto::identity::Identity;
use flotte_proto::transport::crypto_provider;
use futures::FutureExt;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::ca::certificate_facts_from_der;
use crate::live::revocation::{ConnectionTicket, Revocations};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections waiting for tonic to pick them up; beyond this, accept pauses.
const ACCEPT_BACKLOG: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS configuration is invalid: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier cannot be built: {0}")]
    Verifier(String),
    #[error(transparent)]
    Pem(#[from] flotte_proto::transport::TransportError),
}

/// Who is on the other end of a connection, as proven by the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCertificate {
    /// No client certificate (only enrollment and health are open to these).
    Anonymous,
    /// A certificate from our CA with a well-formed identity.
    Verified {
        identity: Identity,
        serial_hex: String,
        not_after_unix: i64,
    },
    /// A certificate from our CA without a usable identity URI.
    Unusable(String),
}

#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_address: SocketAddr,
    pub certificate: PeerCertificate,
}

/// A TLS connection with the facts of its peer, handed to tonic. An
/// identified connection ends (reads and writes fail) as soon as its identity
/// is revoked, which makes hyper drop it with every stream it carries.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Keeps the connection registered under its identity while it lives.
    _ticket: Option<ConnectionTicket>,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl TlsConnection {
    /// An error once the identity was revoked. Polling the cancellation also
    /// registers this task's waker, so a revocation wakes an idle connection.
    fn revocation_error(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let revoked = self.revoked.as_mut()?;
        revoked.poll_unpin(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's identity was revoked",
            )
        })
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.revocation_error(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.revocation_error(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.revocation_error(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Our CA's client verifier, followed by the deny list: a revoked serial or
/// identity fails the handshake with the `certificate_revoked` alert, which
/// the client reports as such.
#[derive(Debug)]
struct DenyListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for DenyListVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Ok(facts) = certificate_facts_from_der(end_entity) {
            let identity = facts.identity_uri.unwrap_or_default();
            if let Some(reason) = self.revocations.refusal(&identity, &facts.serial_hex) {
                tracing::warn!(%identity, serial = %facts.serial_hex, %reason, "revoked certificate refused at the handshake");
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked,
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls12_signature(message, certificate, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's rustls configuration: our certificate chain (leaf + CA, so
/// that an enrolling agent can pin the CA by fingerprint), client certificates
/// verified against our CA and the deny list but optional, HTTP/2 only, and
/// no session resumption (a resumed session skips the certificate check).
pub fn server_config(
    ca_der: &[u8],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Arc<Revocations>,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let provider = crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .map_err(|error| TlsSetupError::Verifier(error.to_string()))?;
    let verifier = Arc::new(DenyListVerifier { inner, revocations });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn peer_certificate(stream: &TlsStream<TcpStream>, trust_domain: &str) -> PeerCertificate {
    let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
    else {
        return PeerCertificate::Anonymous;
    };
    let facts = match certificate_facts_from_der(leaf) {
        Ok(facts) => facts,
        Err(error) => return PeerCertificate::Unusable(error.to_string()),
    };
    let Some(uri) = facts.identity_uri else {
        return PeerCertificate::Unusable("certificate carries no identity URI".into());
    };
    match uri.parse::<Identity>() {
        Ok(identity) if identity.trust_domain == trust_domain => PeerCertificate::Verified {
            identity,
            serial_hex: facts.serial_hex,
            not_after_unix: facts.not_after_unix,
        },
        Ok(identity) => PeerCertificate::Unusable(format!(
            "identity {identity} is not in trust domain {trust_domain}"
        )),
        Err(error) => PeerCertificate::Unusable(error.to_string()),
    }
}

/// Registers an identified connection for revocation, then checks the deny
/// list once more: an identity revoked between the verifier and the
/// registration would otherwise slip through (registering first means a
/// revocation after this check still finds and cuts the connection).
fn admit(
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    revocations: &Arc<Revocations>,
) -> Option<TlsConnection> {
    let PeerCertificate::Verified {
        identity,
        serial_hex,
        ..
    } = &peer.certificate
    else {
        return Some(TlsConnection {
            stream,
            peer,
            _ticket: None,
            revoked: None,
        });
    };
    let identity_uri = identity.uri();
    let ticket = revocations.track(&identity_uri);
    if let Some(reason) = revocations.refusal(&identity_uri, serial_hex) {
        tracing::warn!(identity = %identity_uri, %reason, "connection of a revoked identity dropped");
        return None;
    }
    let revoked = Box::pin(ticket.cancel.clone().cancelled_owned());
    Some(TlsConnection {
        stream,
        peer,
        _ticket: Some(ticket),
        revoked: Some(revoked),
    })
}

/// How long a refused connection is drained before it is dropped.
const REFUSAL_DRAIN: Duration = Duration::from_millis(500);

/// Closes a connection whose handshake failed so that the client can read
/// our alert. Under TLS 1.3 the client has already sent application data when
/// we refuse its certificate; dropping the socket with that data unread makes
/// the kernel send a reset, which discards the alert on the client side and
/// leaves it with a bare "broken pipe".
async fn close_gently(mut tcp: TcpStream) {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        while matches!(tcp.read(&mut sink).await, Ok(read) if read > 0) {}
    })
    .await;
}

/// Accepts TCP connections, runs each TLS handshake in its own task (a slow
/// client never delays others) and yields finished connections. Handshake
/// failures are logged and dropped: an error yielded here would stop tonic.
pub fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    trust_domain: String,
    revocations: Arc<Revocations>,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
    let (sender, receiver) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_address) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let trust_domain = trust_domain.clone();
            let revocations = Arc::clone(&revocations);
            tokio::spawn(async move {
                let handshake = acceptor.accept(tcp).into_fallible();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => {
                        let certificate = peer_certificate(&stream, &trust_domain);
                        let peer = PeerInfo {
                            remote_address,
                            certificate,
                        };
                        if let Some(connection) = admit(stream, peer, &revocations) {
                            let _ = sender.send(Ok(connection)).await;
                        }
                    }
                    Ok(Err((error, tcp))) => {
                        tracing::info!(%remote_address, %error, "TLS handshake refused");
                        close_gently(tcp).await;
                    }
                    Err(_) => {
                        tracing::info!(%remote_address, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    receiver
}
