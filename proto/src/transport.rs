//! Client side of the wire: a tonic `Channel` over a caller-built rustls
//! `ClientConfig`, and the translation of TLS failures into causes a person can act on.
//!
//! tonic's own TLS settings cannot carry a custom certificate verifier (needed
//! for CA pinning during enrollment), so every Flotte client dials TCP, runs
//! rustls itself and hands the stream to tonic. Nothing here chooses *which*
//! certificates to trust: callers pass the finished `ClientConfig`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what} is not valid PEM: {message}")]
    Pem { what: String, message: String },
    #[error("TLS client configuration is invalid: {0}")]
    Tls(#[from] rustls::Error),
    #[error("server address {0:?} is not host:port")]
    BadAddress(String),
    #[error("cannot connect to {address}: {cause}")]
    Connect { address: String, cause: String },
}

fn pem_error(what: &str) -> impl FnOnce(rustls::pki_types::pem::Error) -> TransportError + '_ {
    move |error| TransportError::Pem {
        what: what.to_owned(),
        message: error.to_string(),
    }
}

/// Parses every certificate in a PEM text.
pub fn certificates_from_pem(
    what: &str,
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(what))?;
    if certificates.is_empty() {
        return Err(TransportError::Pem {
            what: what.to_owned(),
            message: "no certificate found".to_owned(),
        });
    }
    Ok(certificates)
}

/// Parses a PEM private key.
pub fn private_key_from_pem(
    what: &str,
    pem: &str,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TransportError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(pem_error(what))
}

/// The ring provider, passed explicitly everywhere so that no process depends
/// on a globally installed default.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting only `ca_pem`, presenting `client` (PEM
/// certificate chain and key) when given. TLS 1.3 and HTTP/2 only.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates_from_pem("CA certificate", ca_pem)? {
        roots.add(certificate)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((certificate_pem, key_pem)) => builder.with_client_auth_cert(
            certificates_from_pem("client certificate", certificate_pem)?,
            private_key_from_pem("client key", key_pem)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Splits `host:port` (or `[v6]:port`) and returns the host as a TLS server name.
/// How long one address of several may take to accept a connection before
/// the next is tried.
const PER_ADDRESS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn server_name_of(address: &str) -> Result<ServerName<'static>, TransportError> {
    let bad = || TransportError::BadAddress(address.to_owned());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| bad())
}

/// The last I/O or TLS failure seen on a channel's connections.
///
/// Under TLS 1.3 a refused client certificate shows up as an alert on the
/// first read after the handshake, and hyper reports it to the caller only
/// as "connection closed". The connector records the real error here so that
/// [`explain_status_with`] can name the cause.
#[derive(Debug, Clone, Default)]
pub struct TlsDiagnostics(Arc<Mutex<Vec<String>>>);

/// How rustls names the `certificate_revoked` alert in its errors (lower case).
const REVOKED_ALERT: &str = "certificaterevoked";

/// Distinct errors kept per channel: the alert that explains a failure is
/// often followed by consequences ("broken pipe") that must not hide it.
const DIAGNOSTICS_KEPT: usize = 4;

impl TlsDiagnostics {
    fn record(&self, error: &std::io::Error) {
        if let Ok(mut errors) = self.0.lock() {
            let text = error.to_string();
            if !errors.contains(&text) {
                if errors.len() == DIAGNOSTICS_KEPT {
                    errors.remove(0);
                }
                errors.push(text);
            }
        }
    }

    /// True when the server refused our certificate as revoked (the TLS
    /// `certificate_revoked` alert): for a machine, decommissioned; for an
    /// operator, revoked. Either way no retry will succeed.
    pub fn certificate_revoked(&self) -> bool {
        self.recorded_errors()
            .is_some_and(|errors| errors.to_ascii_lowercase().contains(REVOKED_ALERT))
    }

    /// The recorded errors, oldest first, joined for display.
    pub fn recorded_errors(&self) -> Option<String> {
        let errors = self.0.lock().ok()?;
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

/// A client TLS stream that records its I/O errors in [`TlsDiagnostics`].
struct DiagnosedStream {
    inner: tokio_rustls::client::TlsStream<TcpStream>,
    diagnostics: TlsDiagnostics,
}

impl DiagnosedStream {
    fn observe<T>(&self, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(error)) = &poll {
            self.diagnostics.record(error);
        }
        poll
    }
}

impl AsyncRead for DiagnosedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.observe(poll)
    }
}

impl AsyncWrite for DiagnosedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.observe(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.observe(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Silence after which a client pings the server (see [`channel_with_diagnostics`]).
pub const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens a lazily-connected HTTP/2 channel to `addresses` (`host:port`, or
/// several separated by commas: the replicas of one server) over TLS.
///
/// A partition is silence, not a reset: only a ping that goes unanswered
/// tells a client its connection is dead. The server sends an agent nothing
/// while nothing changes, so pings go out every [`KEEP_ALIVE_INTERVAL`] of
/// silence and a connection is given up [`KEEP_ALIVE_TIMEOUT`] later:
/// an agent cut off from its server knows within 10 s, starts its
/// fail-closed clock and tries another replica (measured in
/// `tests/tests/partitions.rs`).
///
/// The channel connects on first use; connection and TLS errors surface on the
/// first RPC and should go through [`explain_status_with`] with the returned
/// diagnostics.
pub fn channel_with_diagnostics(
    addresses: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(Channel, TlsDiagnostics), TransportError> {
    // Several replicas: "a:7443,b:7443,c:7443". Each connection tries them
    // in turn from the one that worked last, so a lost replica costs one
    // failed connect, not a failed command.
    let targets: Arc<Vec<(String, ServerName<'static>)>> = Arc::new(
        addresses
            .split(',')
            .map(str::trim)
            .filter(|address| !address.is_empty())
            .map(|address| Ok((address.to_owned(), server_name_of(address)?)))
            .collect::<Result<_, TransportError>>()?,
    );
    let Some((first, _)) = targets.first() else {
        return Err(TransportError::BadAddress(addresses.to_owned()));
    };
    let endpoint = Endpoint::from_shared(format!("http://{first}"))
        .map_err(|_| TransportError::BadAddress(first.clone()))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connector = TlsConnector::from(tls);
    let diagnostics = TlsDiagnostics::default();
    let connection_diagnostics = diagnostics.clone();
    let next_target = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let targets = Arc::clone(&targets);
        let next_target = Arc::clone(&next_target);
        let diagnostics = connection_diagnostics.clone();
        async move {
            let start = next_target.load(std::sync::atomic::Ordering::Relaxed);
            // Each address's failure, named: the one error a caller sees
            // must say which server it could not reach, and why.
            let mut failures: Vec<(std::io::ErrorKind, String)> = Vec::new();
            for offset in 0..targets.len() {
                let index = (start + offset) % targets.len();
                let (address, server_name) = &targets[index];
                let tcp = match tokio::time::timeout(
                    PER_ADDRESS_CONNECT_TIMEOUT,
                    TcpStream::connect(address),
                )
                .await
                {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(error)) => {
                        failures.push((error.kind(), format!("{address}: {error}")));
                        continue;
                    }
                    Err(_) => {
                        failures.push((
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "{address}: no answer within {}s",
                                PER_ADDRESS_CONNECT_TIMEOUT.as_secs()
                            ),
                        ));
                        continue;
                    }
                };
                next_target.store(index, std::sync::atomic::Ordering::Relaxed);
                tcp.set_nodelay(true)?;
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|error| {
                        diagnostics.record(&error);
                        std::io::Error::new(
                            error.kind(),
                            format!("TLS handshake with {address} failed: {error}"),
                        )
                    })?;
                return Ok::<_, std::io::Error>(TokioIo::new(DiagnosedStream {
                    inner: tls,
                    diagnostics,
                }));
            }
            Err(connect_failure(&failures))
        }
    });
    Ok((endpoint.connect_with_connector_lazy(service), diagnostics))
}

/// One error for every address that could not be reached: "cannot connect
/// to ADDRESS: CAUSE", the causes of several addresses joined.
fn connect_failure(failures: &[(std::io::ErrorKind, String)]) -> std::io::Error {
    let kind = failures
        .last()
        .map_or(std::io::ErrorKind::NotConnected, |(kind, _)| *kind);
    let described: Vec<&str> = failures.iter().map(|(_, text)| text.as_str()).collect();
    std::io::Error::new(kind, format!("cannot connect to {}", described.join("; ")))
}

/// [`channel_with_diagnostics`] for callers that only need the channel.
pub fn channel(address: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, TransportError> {
    channel_with_diagnostics(address, tls).map(|(channel, _)| channel)
}

/// Renders a status from a failed RPC, replacing transport noise by the cause.
///
/// Under TLS 1.3 a client whose certificate the server refuses sees the
/// handshake "succeed" and the refusal only as an alert on its first RPC, so
/// the alert name is the only trace of the real cause.
pub fn explain_status(status: &tonic::Status) -> String {
    explain_status_with(status, &TlsDiagnostics::default())
}

/// [`explain_status`], also using what the channel's connections recorded.
pub fn explain_status_with(status: &tonic::Status, diagnostics: &TlsDiagnostics) -> String {
    // The status message, then each cause: tonic repeats the cause in the
    // message and wraps it in a bare "transport error", so a part already
    // said (or saying nothing) is left out.
    let mut chain = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        add_to_chain(&mut chain, &cause.to_string());
        source = cause.source();
    }
    // Only transport failures (a status made here, from a connection
    // error) are explained by the connection's last error and the hints
    // below; a status the server sent (e.g. PermissionDenied, or its
    // database being unreachable) speaks for itself, whatever words it
    // quotes.
    if std::error::Error::source(status).is_none() {
        return chain;
    }
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) {
        if let Some(recorded) = diagnostics.recorded_errors() {
            add_to_chain(&mut chain, &recorded);
        }
    }
    let lower = chain.to_ascii_lowercase();
    let hint = if lower.contains("unknownca") || lower.contains("unknown ca") {
        Some("the server refused our client certificate: it was not issued by the server's CA")
    } else if lower.contains("decrypterror") || lower.contains("decrypt error") {
        Some("the server refused our client certificate: its signature does not verify against the server's CA (issued by another CA?)")
    } else if lower.contains("certificateexpired")
        || lower.contains("expired") && lower.contains("alert")
    {
        Some("the server refused our client certificate: it has expired")
    } else if lower.contains(REVOKED_ALERT) {
        Some("the server refused our client certificate: it was revoked (an admin decommissioned this machine or revoked this operator)")
    } else if lower.contains("badcertificate") || lower.contains("bad certificate") {
        Some("the server refused our client certificate")
    } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        Some("the server's certificate was not issued by the CA we trust (wrong server or CA)")
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        Some("the server's certificate does not name the address we dialled (add it with --san)")
    } else if lower.contains("connection refused") {
        Some("nothing is listening at the server address")
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{hint} ({chain})"),
        None => chain,
    }
}

/// Appends `part` to an error chain unless it adds nothing: already said,
/// or tonic's bare "transport error" wrapper.
fn add_to_chain(chain: &mut String, part: &str) {
    if part.is_empty() || part == "transport error" || chain.contains(part) {
        return;
    }
    if chain.is_empty() {
        chain.push_str(part);
    } else {
        chain.push_str(": ");
        chain.push_str(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_the_server_sent_is_not_explained_as_a_connection_failure() {
        let sent = tonic::Status::unavailable(
            "the server's database is unavailable (PostgreSQL: Connection refused)",
        );
        assert_eq!(explain_status(&sent), sent.message());
        let local = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        )));
        assert!(
            explain_status(&local).starts_with("nothing is listening at the server address"),
            "{}",
            explain_status(&local)
        );
    }

    #[test]
    fn error_chains_say_each_cause_once_and_name_the_address() {
        let refused = connect_failure(&[(
            std::io::ErrorKind::ConnectionRefused,
            "127.0.0.1:1: Connection refused (os error 111)".into(),
        )]);
        assert_eq!(
            explain_status(&tonic::Status::from_error(Box::new(refused))),
            "nothing is listening at the server address (cannot connect to 127.0.0.1:1: \
             Connection refused (os error 111))"
        );
        let both = connect_failure(&[
            (
                std::io::ErrorKind::TimedOut,
                "a:1: no answer within 3s".into(),
            ),
            (std::io::ErrorKind::ConnectionRefused, "b:2: refused".into()),
        ]);
        assert_eq!(both.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            both.to_string(),
            "cannot connect to a:1: no answer within 3s; b:2: refused"
        );
        let mut chain = "a: b".to_owned();
        for part in ["transport error", "b", "", "c", "a: b: c"] {
            add_to_chain(&mut chain, part);
        }
        assert_eq!(chain, "a: b: c");
    }

    #[test]
    fn server_names_from_addresses() {
        assert!(server_name_of("127.0.0.1:7443").is_ok());
        assert!(server_name_of("[::1]:7443").is_ok());
        assert!(server_name_of("flotte.example.com:7443").is_ok());
        assert!(server_name_of("no-port").is_err());
        assert!(server_name_of("host:notaport").is_err());
    }
}
