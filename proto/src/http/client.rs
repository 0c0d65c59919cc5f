//! The HTTP client of webhooks and health checks: one request per connection
//! over TCP, or TLS by rustls (ring) trusting either the system's CA store
//! (loaded once per process, at the first `https://` request) or the CA
//! certificates of a configured file.
//!
//! Every exchange is bounded: connect, TLS, request and the whole response
//! share one timeout; the response head is at most [`MAX_HEAD_BYTES`] and the
//! body is read up to the caller's limit and then the connection is dropped.
//! Redirects are never followed: a 3xx is the answer, with its `Location`.
//! Errors name the URL without its query (see [`HttpUrl`]'s `Display`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

use super::url::{HttpUrl, Scheme, UrlError};
use crate::names::quoted_prefix;
use crate::transport::{certificates_from_pem, crypto_provider};

/// Largest response head accepted (hyper refuses less than 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest CA file read: a bundle of every public root is about 200 KiB.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;
const USER_AGENT: &str = concat!("flotte/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("ca_file is set but {0} is not an https:// URL")]
    CaFileWithoutTls(String),
    #[error("CA file {path}: {cause}")]
    CaFile { path: String, cause: String },
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("TLS with {url} failed: {cause}")]
    Tls { url: String, cause: String },
    #[error("no system CA certificates to check {url} with ({cause}); install ca-certificates or set ca_file")]
    SystemRoots { url: String, cause: String },
    #[error("HTTP exchange with {url} failed: {cause}")]
    Exchange { url: String, cause: String },
    #[error("{url} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
}

/// Which certificate authorities an `https://` endpoint is checked against.
#[derive(Debug, Clone)]
pub enum TlsTrust {
    /// The system's store (`SSL_CERT_FILE`/`SSL_CERT_DIR` or the
    /// distribution's bundle), loaded at the first request that needs it.
    System,
    /// Only the certificates of this PEM file, read once when the settings
    /// are validated.
    CaFile {
        path: PathBuf,
        config: Arc<rustls::ClientConfig>,
    },
}

/// Two trusts are the same when they come from the same place.
impl PartialEq for TlsTrust {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TlsTrust::System, TlsTrust::System) => true,
            (TlsTrust::CaFile { path, .. }, TlsTrust::CaFile { path: other, .. }) => path == other,
            _ => false,
        }
    }
}

impl Eq for TlsTrust {}

fn tls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The system store's client configuration, or why there is none. Loaded
/// once: parsing every root again for each probe would cost CPU and memory.
static SYSTEM_TRUST: tokio::sync::OnceCell<Result<Arc<rustls::ClientConfig>, String>> =
    tokio::sync::OnceCell::const_new();

fn load_system_trust() -> Result<Arc<rustls::ClientConfig>, String> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(loaded
            .errors
            .first()
            .map_or_else(|| "the store is empty".to_owned(), ToString::to_string));
    }
    tls_config(roots)
        .map(Arc::new)
        .map_err(|error| error.to_string())
}

impl TlsTrust {
    /// Reads a PEM file of CA certificates (at most 1 MiB).
    pub fn from_ca_file(path: &Path) -> Result<Self, ClientError> {
        let failed = |cause: String| ClientError::CaFile {
            path: path.display().to_string(),
            cause,
        };
        // Non-blocking, and only a regular file: a FIFO named here (by a
        // mistake, or by a signed image's check) must not hang the agent.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(|error| failed(error.to_string()))?;
        let metadata = file.metadata().map_err(|error| failed(error.to_string()))?;
        if !metadata.is_file() {
            return Err(failed("not a regular file".to_owned()));
        }
        let mut pem = String::new();
        file.take(MAX_CA_FILE_BYTES + 1)
            .read_to_string(&mut pem)
            .map_err(|error| failed(error.to_string()))?;
        if pem.len() as u64 > MAX_CA_FILE_BYTES {
            return Err(failed(format!("larger than {MAX_CA_FILE_BYTES} bytes")));
        }
        let mut roots = rustls::RootCertStore::empty();
        for certificate in
            certificates_from_pem("it", &pem).map_err(|error| failed(error.to_string()))?
        {
            roots
                .add(certificate)
                .map_err(|error| failed(error.to_string()))?;
        }
        let config = tls_config(roots).map_err(|error| failed(error.to_string()))?;
        Ok(TlsTrust::CaFile {
            path: path.to_owned(),
            config: Arc::new(config),
        })
    }

    async fn client_config(&self, url: &HttpUrl) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        match self {
            TlsTrust::CaFile { config, .. } => Ok(Arc::clone(config)),
            TlsTrust::System => SYSTEM_TRUST
                .get_or_init(|| async {
                    tokio::task::spawn_blocking(load_system_trust)
                        .await
                        .unwrap_or_else(|error| Err(error.to_string()))
                })
                .await
                .clone()
                .map_err(|cause| ClientError::SystemRoots {
                    url: url.to_string(),
                    cause,
                }),
        }
    }
}

/// Where requests go: a URL and, for `https://`, whom to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    pub url: HttpUrl,
    pub trust: TlsTrust,
}

impl HttpEndpoint {
    /// Validates a configured `url` with its optional `ca_file`.
    pub fn from_settings(url: &str, ca_file: Option<&Path>) -> Result<Self, ClientError> {
        let url = HttpUrl::parse(url)?;
        let trust = match ca_file {
            None => TlsTrust::System,
            Some(_) if url.scheme == Scheme::Http => {
                return Err(ClientError::CaFileWithoutTls(url.to_string()))
            }
            Some(path) => TlsTrust::from_ca_file(path)?,
        };
        Ok(HttpEndpoint { url, trust })
    }
}

/// A response: its status, where a redirect pointed, and the first bytes of
/// its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// The `Location` header, as sent (untrusted: quote it to show it).
    pub location: Option<String>,
    pub body: Vec<u8>,
    /// The body went on past the caller's limit and was not read further.
    pub truncated: bool,
}

impl HttpResponse {
    /// "HTTP 302 (a redirect to "…", not followed)" or "HTTP 200".
    pub fn status_line(&self) -> String {
        match &self.location {
            Some(location) if (300..400).contains(&self.status) => format!(
                "HTTP {} (a redirect to {}, not followed)",
                self.status,
                quoted_prefix(location)
            ),
            _ => format!("HTTP {}", self.status),
        }
    }
}

/// What to send: a method and, for a POST, a typed body.
#[derive(Debug, Clone)]
pub struct OutgoingRequest {
    pub method: Method,
    pub body: Option<(&'static str, Bytes)>,
}

impl OutgoingRequest {
    pub fn get() -> Self {
        OutgoingRequest {
            method: Method::GET,
            body: None,
        }
    }

    pub fn post(content_type: &'static str, body: impl Into<Bytes>) -> Self {
        OutgoingRequest {
            method: Method::POST,
            body: Some((content_type, body.into())),
        }
    }
}

/// Sends `outgoing` to `endpoint` and returns the status and at most
/// `max_body_bytes` of body, all within `timeout`.
pub async fn request(
    endpoint: &HttpEndpoint,
    outgoing: OutgoingRequest,
    timeout: Duration,
    max_body_bytes: usize,
) -> Result<HttpResponse, ClientError> {
    tokio::time::timeout(timeout, exchange(endpoint, outgoing, max_body_bytes))
        .await
        .map_err(|_| ClientError::Timeout {
            url: endpoint.url.to_string(),
            timeout,
        })?
}

/// An error with its sources, which hyper and rustls keep the detail in.
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn tls_cause(error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            "its certificate is not signed by a CA trusted here (the system's, or ca_file's when set)"
                .to_owned()
        }
        Some(rustls::Error::InvalidCertificate(cause)) => {
            format!("its certificate is refused: {cause:?}")
        }
        _ => with_sources(error),
    }
}

async fn exchange(
    endpoint: &HttpEndpoint,
    outgoing: OutgoingRequest,
    max_body_bytes: usize,
) -> Result<HttpResponse, ClientError> {
    let url = &endpoint.url;
    let stream = TcpStream::connect(url.address())
        .await
        .map_err(|error| ClientError::Connect {
            url: url.to_string(),
            cause: error.to_string(),
        })?;
    let request = build_request(url, outgoing)?;
    match url.scheme {
        Scheme::Http => send(TokioIo::new(stream), request, url, max_body_bytes).await,
        Scheme::Https => {
            let tls_error = |cause: String| ClientError::Tls {
                url: url.to_string(),
                cause,
            };
            let config = endpoint.trust.client_config(url).await?;
            let server_name = ServerName::try_from(url.tls_host().to_owned())
                .map_err(|_| tls_error("the host is not a valid TLS server name".to_owned()))?;
            let stream = TlsConnector::from(config)
                .connect(server_name, stream)
                .await
                .map_err(|error| tls_error(tls_cause(&error)))?;
            send(TokioIo::new(stream), request, url, max_body_bytes).await
        }
    }
}

fn build_request(
    url: &HttpUrl,
    outgoing: OutgoingRequest,
) -> Result<Request<Full<Bytes>>, ClientError> {
    let mut builder = Request::builder()
        .method(outgoing.method)
        .uri(url.path_and_query.as_str())
        .header(header::HOST, url.host_header())
        .header(header::USER_AGENT, USER_AGENT)
        // One request per connection: nothing is pooled between alerts or probes.
        .header(header::CONNECTION, "close");
    let body = match outgoing.body {
        Some((content_type, body)) => {
            builder = builder.header(header::CONTENT_TYPE, content_type);
            body
        }
        None => Bytes::new(),
    };
    builder
        .body(Full::new(body))
        .map_err(|error| ClientError::Exchange {
            url: url.to_string(),
            cause: error.to_string(),
        })
}

async fn send<T>(
    io: T,
    request: Request<Full<Bytes>>,
    url: &HttpUrl,
    max_body_bytes: usize,
) -> Result<HttpResponse, ClientError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let failed = |error: hyper::Error| ClientError::Exchange {
        url: url.to_string(),
        cause: with_sources(&error),
    };
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake(io)
        .await
        .map_err(failed)?;
    // The connection runs in its own task and ends with this exchange, also
    // when the caller's timeout drops it halfway.
    let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let response = sender.send_request(request).await.map_err(failed)?;
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get(header::LOCATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let (body, truncated) = read_bounded(response.into_body(), max_body_bytes)
        .await
        .map_err(failed)?;
    Ok(HttpResponse {
        status,
        location,
        body,
        truncated,
    })
}

/// Reads at most `limit` bytes of `body`; past it, stops reading.
async fn read_bounded(mut body: Incoming, limit: usize) -> Result<(Vec<u8>, bool), hyper::Error> {
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let room = limit - kept.len();
        if data.len() > room {
            kept.extend_from_slice(&data[..room]);
            return Ok((kept, true));
        }
        kept.extend_from_slice(&data);
    }
    Ok((kept, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_needs_an_https_url_and_a_readable_pem() {
        let error = HttpEndpoint::from_settings("http://h/x", Some(Path::new("/etc/hostname")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not an https:// URL"), "{error}");
        let error =
            HttpEndpoint::from_settings("https://h/x", Some(Path::new("/nonexistent/ca.pem")))
                .unwrap_err()
                .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let directory = std::env::temp_dir().join(format!("flotte-ca-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let fifo = directory.join("fifo.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let error = HttpEndpoint::from_settings("https://h/x", Some(&fifo))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a regular file"), "{error}");
        let not_pem = directory.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let error = HttpEndpoint::from_settings("https://h/x", Some(&not_pem))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no certificate found"), "{error}");
        std::fs::remove_dir_all(&directory).unwrap();
        assert_eq!(
            HttpEndpoint::from_settings("https://h/x", None)
                .unwrap()
                .trust,
            TlsTrust::System
        );
    }

    #[test]
    fn a_redirect_is_said_to_be_not_followed_and_its_location_quoted() {
        let response = HttpResponse {
            status: 302,
            location: Some("https://elsewhere/\u{1b}[2J".to_owned()),
            body: Vec::new(),
            truncated: false,
        };
        let line = response.status_line();
        assert!(
            line.starts_with("HTTP 302 (a redirect to \"https://elsewhere/"),
            "{line}"
        );
        assert!(line.contains("not followed"), "{line}");
        assert!(!line.contains('\u{1b}'), "{line}");
        let ok = HttpResponse {
            status: 200,
            ..response
        };
        assert_eq!(ok.status_line(), "HTTP 200");
    }
}
