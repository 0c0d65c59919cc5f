//! A real HTTP or HTTPS endpoint for the tests of Flotte's HTTP client
//! (webhooks, checks): hyper serving each connection on 127.0.0.1:0, over
//! rustls with a certificate for `127.0.0.1` and `localhost` from a test CA
//! made by rcgen. It records what it is sent and answers by path:
//!
//! | path | answer |
//! | --- | --- |
//! | `/ok` and anything unlisted | 200 `ok` |
//! | `/chunked` | 200, a body in [`CHUNKS`] chunks without a length (chunked encoding) |
//! | `/redirect` | 302 to `/ok` |
//! | `/never` | nothing, ever (the client's timeout must end it) |
//! | `/large` | 200, [`LARGE_BODY_BYTES`] bytes |
//! | `/refuse` | 503 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;

/// Chunks of the `/chunked` answer, each [`CHUNK`].
pub const CHUNKS: usize = 5;
pub const CHUNK: &str = "chunk of a chunked body\n";
/// Size of the `/large` answer.
pub const LARGE_BODY_BYTES: usize = 1024 * 1024;
/// Request bodies kept at most.
const MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;

/// A certificate authority of its own, whose certificate is in `ca_file`,
/// and the server configuration of a certificate it signed.
#[derive(Debug)]
pub struct TestCa {
    pub ca_file: PathBuf,
    server_config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// Makes the CA and a server certificate; writes the CA's PEM in `directory`.
    pub fn new(directory: &Path) -> Self {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "flotte test CA");
        let ca_certificate = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        let server_certificate = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        let ca_file = directory.join("test-ca.pem");
        std::fs::write(&ca_file, ca_certificate.pem()).expect("write the CA file");
        let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
            .expect("server key DER");
        let config =
            rustls::ServerConfig::builder_with_provider(flotte_proto::transport::crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(vec![server_certificate.der().clone()], key)
                .expect("server TLS configuration");
        TestCa {
            ca_file,
            server_config: Arc::new(config),
        }
    }
}

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

type Received = Arc<Mutex<Vec<ReceivedRequest>>>;

/// The running endpoint; stops when dropped.
#[derive(Debug)]
pub struct TestEndpoint {
    pub address: SocketAddr,
    scheme: &'static str,
    received: Received,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestEndpoint {
    /// Serves HTTPS with a certificate of `ca`.
    pub fn https(ca: &TestCa) -> Self {
        Self::start(Some(tokio_rustls::TlsAcceptor::from(Arc::clone(
            &ca.server_config,
        ))))
    }

    /// Serves plain HTTP.
    pub fn http() -> Self {
        Self::start(None)
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("endpoint runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the endpoint");
        let address = listener.local_addr().expect("endpoint address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let received = Received::default();
        let sink = Arc::clone(&received);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    _ = stopped => {}
                    () = accept_loop(listener, tls, sink) => {}
                }
            });
        });
        TestEndpoint {
            address,
            scheme,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `scheme://127.0.0.1:port` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.address)
    }

    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.received.lock().expect("received lock").clone()
    }

    /// The bodies received on `path`, parsed as JSON (others are skipped).
    pub fn received_json(&self, path: &str) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|request| request.path == path)
            .filter_map(|request| serde_json::from_slice(&request.body).ok())
            .collect()
    }
}

impl Drop for TestEndpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    received: Received,
) {
    // The runtime's end (at drop) ends the connection tasks too.
    while let Ok((stream, _)) = listener.accept().await {
        let tls = tls.clone();
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| answer(request, Arc::clone(&received)));
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    // A client that refuses our certificate ends here.
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

async fn answer(
    request: Request<Incoming>,
    received: Received,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let body = Limited::new(request.into_body(), MAX_REQUEST_BODY_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes().to_vec())
        .unwrap_or_default();
    received
        .lock()
        .expect("received lock")
        .push(ReceivedRequest {
            method,
            path: path.clone(),
            content_type,
            body,
        });
    Ok(match path.as_str() {
        "/chunked" => {
            let frames = (0..CHUNKS).map(|_| Ok(Frame::data(Bytes::from_static(CHUNK.as_bytes()))));
            Response::new(BodyExt::boxed(StreamBody::new(tokio_stream::iter(frames))))
        }
        "/redirect" => {
            let mut response = full(StatusCode::FOUND, "");
            response.headers_mut().insert(
                hyper::header::LOCATION,
                hyper::header::HeaderValue::from_static("/ok"),
            );
            response
        }
        "/never" => std::future::pending().await,
        "/large" => full(StatusCode::OK, vec![b'x'; LARGE_BODY_BYTES]),
        "/refuse" => full(StatusCode::SERVICE_UNAVAILABLE, "refused\n"),
        _ => full(StatusCode::OK, "ok\n"),
    })
}
