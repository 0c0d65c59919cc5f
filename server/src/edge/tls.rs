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
//!
//! Everything before authentication is bounded here ([`ConnectionLimits`]):
//! handshakes in flight and their duration, connections without a client
//! certificate (how many, and how long they may stay silent), and
//! unauthenticated connections per source address. Nobody gets a task, a
//! buffer or a slot for free just by opening a socket.

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
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::ca::certificate_facts_from_der;
use crate::limits::rate::{PerSourceCounter, SourceSlot};
use crate::limits::LimitSettings;
use crate::live::revocation::{ConnectionTicket, Revocations};

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
        /// The raw subject public key (renewals must keep this key).
        public_key_raw: Vec<u8>,
    },
    /// A certificate from our CA without a usable identity URI.
    Unusable(String),
}

#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_address: SocketAddr,
    pub certificate: PeerCertificate,
}

/// The accept loop's bounds (see `[limits]` in the settings).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// TLS handshakes in progress; the loop stops accepting while none is free.
    pub handshakes: Arc<Semaphore>,
    pub handshake_timeout: Duration,
    /// Open connections without a usable client certificate.
    pub anonymous: Arc<Semaphore>,
    pub anonymous_idle_timeout: Duration,
    /// Handshaking or anonymous connections per source address.
    pub per_source: PerSourceCounter,
}

impl ConnectionLimits {
    pub fn from_settings(settings: &LimitSettings) -> Self {
        ConnectionLimits {
            handshakes: Arc::new(Semaphore::new(settings.max_handshakes_in_flight)),
            handshake_timeout: settings.handshake_timeout,
            anonymous: Arc::new(Semaphore::new(settings.max_anonymous_connections)),
            anonymous_idle_timeout: settings.anonymous_idle_timeout,
            per_source: PerSourceCounter::new(settings.max_unauthenticated_connections_per_source),
        }
    }
}

/// Closes a connection that received nothing for `timeout`.
struct IdleDeadline {
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

/// What an anonymous connection holds while it lives: its place under the
/// anonymous cap and under its source address's cap, and its idle deadline.
struct AnonymousAllowance {
    _permit: OwnedSemaphorePermit,
    _source_slot: SourceSlot,
    idle: IdleDeadline,
}

/// A TLS connection with the facts of its peer, handed to tonic. An
/// identified connection ends (reads and writes fail) as soon as its identity
/// is revoked, which makes hyper drop it with every stream it carries; an
/// anonymous one ends when it stays silent past its idle timeout.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Keeps the connection registered under its identity while it lives.
    _ticket: Option<ConnectionTicket>,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    anonymous: Option<AnonymousAllowance>,
}

impl TlsConnection {
    /// An error once an anonymous connection was silent for too long. Polling
    /// the deadline registers this task's waker, so an idle connection wakes.
    fn idle_error(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let idle = &mut self.anonymous.as_mut()?.idle;
        idle.deadline.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection without a client certificate was idle too long",
            )
        })
    }

    /// Pushes the idle deadline back after bytes were received.
    fn received_bytes(&mut self) {
        if let Some(anonymous) = self.anonymous.as_mut() {
            let idle = &mut anonymous.idle;
            idle.deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + idle.timeout);
        }
    }

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
        if let Some(error) = self.revocation_error(cx).or_else(|| self.idle_error(cx)) {
            return Poll::Ready(Err(error));
        }
        let filled_before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > filled_before {
            self.received_bytes();
        }
        read
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
            public_key_raw: facts.public_key_raw,
        },
        Ok(identity) => PeerCertificate::Unusable(format!(
            "identity {identity} is not in trust domain {trust_domain}"
        )),
        Err(error) => PeerCertificate::Unusable(error.to_string()),
    }
}

/// Admits a connection without a usable client certificate if the anonymous
/// cap has room; it keeps its source slot and gets an idle deadline.
fn admit_anonymous(
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    limits: &ConnectionLimits,
    source_slot: SourceSlot,
) -> Option<TlsConnection> {
    let Ok(permit) = Arc::clone(&limits.anonymous).try_acquire_owned() else {
        // Logged at debug level only: a flood must not become a log flood.
        tracing::debug!(remote = %peer.remote_address, "connection without a client certificate closed: too many open");
        return None;
    };
    let timeout = limits.anonymous_idle_timeout;
    Some(TlsConnection {
        stream,
        peer,
        _ticket: None,
        revoked: None,
        anonymous: Some(AnonymousAllowance {
            _permit: permit,
            _source_slot: source_slot,
            idle: IdleDeadline {
                timeout,
                deadline: Box::pin(tokio::time::sleep(timeout)),
            },
        }),
    })
}

/// Registers an identified connection for revocation, then checks the deny
/// list once more: an identity revoked between the verifier and the
/// registration would otherwise slip through (registering first means a
/// revocation after this check still finds and cuts the connection).
/// Connections without an identity go through [`admit_anonymous`].
fn admit(
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    revocations: &Arc<Revocations>,
    limits: &ConnectionLimits,
    source_slot: SourceSlot,
) -> Option<TlsConnection> {
    let PeerCertificate::Verified {
        identity,
        serial_hex,
        ..
    } = &peer.certificate
    else {
        return admit_anonymous(stream, peer, limits, source_slot);
    };
    // An authenticated connection no longer counts against its address.
    drop(source_slot);
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
        anonymous: None,
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
/// Accepting waits while `limits.handshakes` are all taken (new connections
/// then wait in the kernel's backlog); a source address over its cap is
/// closed at once.
pub fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    trust_domain: String,
    revocations: Arc<Revocations>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
    let (sender, receiver) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(async move {
        loop {
            let handshake_permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&limits.handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // never closed; nothing left to do if it were
                },
            };
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
            let Some(source_slot) = limits.per_source.try_acquire(remote_address.ip()) else {
                tracing::debug!(%remote_address, limit = limits.per_source.limit(), "connection closed: too many unauthenticated connections from this address");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let trust_domain = trust_domain.clone();
            let revocations = Arc::clone(&revocations);
            let limits = limits.clone();
            tokio::spawn(async move {
                let handshake = acceptor.accept(tcp).into_fallible();
                let finished = tokio::time::timeout(limits.handshake_timeout, handshake).await;
                drop(handshake_permit);
                match finished {
                    Ok(Ok(stream)) => {
                        let certificate = peer_certificate(&stream, &trust_domain);
                        let peer = PeerInfo {
                            remote_address,
                            certificate,
                        };
                        if let Some(connection) =
                            admit(stream, peer, &revocations, &limits, source_slot)
                        {
                            let _ = sender.send(Ok(connection)).await;
                        }
                    }
                    Ok(Err((error, tcp))) => {
                        tracing::info!(%remote_address, %error, "TLS handshake refused");
                        drop(source_slot);
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
