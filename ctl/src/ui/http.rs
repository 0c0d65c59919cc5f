//! The dashboard's HTTP server: hyper's HTTP/1.1 on the listener, every
//! request bounded (connections, header bytes and time, form bytes, event
//! streams), checked by `guard` (host, secret, origin) and only then routed
//! to a page, an event stream, an action or an embedded asset. Every
//! response carries the same security headers (a Content-Security-Policy
//! without inline scripts, no referrer — the first URL holds the secret —,
//! no framing, no caching).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotte_proto::http::server::{serve_http1, ServerLimits};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use maud::Markup;
use tokio::net::TcpListener;

use super::guard::{is_own_host, is_same_origin, secret_proof, SecretProof, SECRET_PARAMETER};
use super::{live, pages, Dashboard};

/// The body of every response: a whole page, or a stream of events.
pub type Body = BoxBody<Bytes, Infallible>;

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes hyper buffers for one request's head (its minimum is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Bytes of a form (the only request bodies the dashboard reads).
pub const MAX_FORM_BYTES: usize = 16 * 1024;
/// Bytes of an id in a path (machine ids, hostnames, rollout ids).
const MAX_ID_BYTES: usize = 256;

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");

/// Why a request got no page; each has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("this dashboard answers only on its own address (Host {0:?})")]
    ForeignHost(String),
    #[error("open the URL flottectl ui printed: it carries the dashboard's secret")]
    NoSecret,
    #[error("wrong secret: open the URL flottectl ui printed")]
    WrongSecret,
    #[error("refused: a change must come from a page of this dashboard (same origin)")]
    CrossOrigin,
    #[error("the form is over {MAX_FORM_BYTES} bytes")]
    FormTooLarge,
    #[error("{0}")]
    BadRequest(String),
    #[error("no such page: {0}")]
    NotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("too many live pages open at once ({0}); close some")]
    TooManyStreams(usize),
    /// A failed admin RPC, already explained; its code picks the status.
    #[error("{message}")]
    Rpc { code: tonic::Code, message: String },
}

impl UiError {
    pub fn status(&self) -> StatusCode {
        match self {
            UiError::ForeignHost(_) => StatusCode::MISDIRECTED_REQUEST,
            UiError::NoSecret => StatusCode::UNAUTHORIZED,
            UiError::WrongSecret | UiError::CrossOrigin => StatusCode::FORBIDDEN,
            UiError::FormTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            UiError::NotFound(_) => StatusCode::NOT_FOUND,
            UiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UiError::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            UiError::Rpc { code, .. } => match code {
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                    StatusCode::FORBIDDEN
                }
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
                tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
                | tonic::Code::Aborted => StatusCode::CONFLICT,
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::BAD_GATEWAY,
            },
        }
    }
}

/// The decoded pairs of a query string or a form.
#[derive(Debug, Default)]
pub struct Parameters(Vec<(String, String)>);

impl Parameters {
    pub fn parse(text: &[u8]) -> Self {
        Parameters(form_urlencoded::parse(text).into_owned().collect())
    }

    /// The first value of `name`, or "".
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map_or("", |(_, value)| value.as_str())
    }

    /// Every non-empty value of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.clone())
            .collect()
    }
}

/// `path?query` with the given pairs (percent-encoded), or `path` alone.
pub fn with_query<'pair>(
    path: &str,
    pairs: impl IntoIterator<Item = (&'pair str, &'pair str)>,
) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    let query = serializer.finish();
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A whole page.
pub fn html(markup: Markup) -> Response<Body> {
    full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        markup.into_string(),
    )
}

/// A `303 See Other` to a path of the dashboard (after a POST, or to drop
/// the secret from the address bar).
pub fn redirect(location: &str) -> Response<Body> {
    let mut response = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn add_security_headers(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

fn header_text(request: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// Serves the dashboard until the task is dropped.
pub async fn serve(listener: TcpListener, dashboard: Arc<Dashboard>) {
    let limits = ServerLimits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_head_bytes: MAX_HEAD_BYTES,
    };
    let handler = move |request| answer(Arc::clone(&dashboard), request);
    serve_http1(
        listener,
        limits,
        handler,
        |error| crate::output::note_line!("dashboard: accept failed: {error}"),
        std::future::pending(),
    )
    .await;
}

async fn answer(dashboard: Arc<Dashboard>, request: Request<Incoming>) -> Response<Body> {
    let mut response = match route(&dashboard, request).await {
        Ok(response) => response,
        Err(error) => {
            let mut response = html(pages::error_page(&dashboard.operator, &error));
            *response.status_mut() = error.status();
            response
        }
    };
    add_security_headers(&mut response);
    response
}

async fn route(
    dashboard: &Arc<Dashboard>,
    request: Request<Incoming>,
) -> Result<Response<Body>, UiError> {
    let host = header_text(&request, header::HOST);
    if !is_own_host(host, dashboard.listen) {
        let shown: String = host.unwrap_or_default().chars().take(64).collect();
        return Err(UiError::ForeignHost(shown));
    }
    let cookies = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok());
    match secret_proof(&dashboard.secret, cookies, request.uri().query()) {
        SecretProof::Cookie => {}
        SecretProof::Query if request.method() == Method::GET => {
            return Ok(secret_accepted(dashboard, &request));
        }
        SecretProof::Query | SecretProof::Missing => return Err(UiError::NoSecret),
        SecretProof::Wrong => return Err(UiError::WrongSecret),
    }
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .collect();
    if segments.iter().any(|segment| segment.len() > MAX_ID_BYTES) {
        return Err(UiError::BadRequest(format!(
            "a path segment is over {MAX_ID_BYTES} bytes"
        )));
    }
    let query = Parameters::parse(request.uri().query().unwrap_or_default().as_bytes());
    match *request.method() {
        Method::GET => get(dashboard, &segments, &query).await,
        Method::POST => {
            let same_origin = is_same_origin(
                header_text(&request, header::HOST),
                header_text(&request, header::ORIGIN),
                request
                    .headers()
                    .get("sec-fetch-site")
                    .and_then(|value| value.to_str().ok()),
            );
            if !same_origin {
                return Err(UiError::CrossOrigin);
            }
            let form = read_form(request.into_body()).await?;
            post(dashboard, &segments, &form).await
        }
        ref method => Err(UiError::MethodNotAllowed(method.to_string())),
    }
}

/// The printed URL's secret was right: set the cookie and send the browser
/// to the same page without the secret in its address.
fn secret_accepted(dashboard: &Dashboard, request: &Request<Incoming>) -> Response<Body> {
    let query = Parameters::parse(request.uri().query().unwrap_or_default().as_bytes());
    let kept = query
        .0
        .iter()
        .filter(|(name, _)| name != SECRET_PARAMETER)
        .map(|(name, value)| (name.as_str(), value.as_str()));
    let mut response = redirect(&with_query(request.uri().path(), kept));
    if let Ok(cookie) = HeaderValue::from_str(&dashboard.secret.cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn read_form(body: Incoming) -> Result<Parameters, UiError> {
    let bytes = Limited::new(body, MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| UiError::FormTooLarge)?
        .to_bytes();
    Ok(Parameters::parse(&bytes))
}

async fn get(
    dashboard: &Arc<Dashboard>,
    segments: &[&str],
    query: &Parameters,
) -> Result<Response<Body>, UiError> {
    match segments {
        [] => pages::fleet::page(dashboard, query).await,
        ["machines", id] => pages::machine::page(dashboard, id).await,
        ["machines", id, "forensics"] => pages::machine::forensics(dashboard, id).await,
        ["rollouts"] => pages::rollouts::list(dashboard).await,
        ["rollouts", id] => pages::rollouts::page(dashboard, id).await,
        ["access"] => pages::access::page(dashboard).await,
        ["dr"] => pages::dr::page(dashboard, query).await,
        ["audit"] => pages::audit::page(dashboard, query).await,
        ["events", "fleet"] => live::fleet(dashboard, query.get("selector")),
        ["events", "rollouts", id] => live::rollout(dashboard, id),
        ["assets", "dashboard.js"] => Ok(full(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            SCRIPT,
        )),
        ["assets", "dashboard.css"] => Ok(full(StatusCode::OK, "text/css; charset=utf-8", STYLE)),
        _ => Err(UiError::NotFound(segments.join("/"))),
    }
}

async fn post(
    dashboard: &Arc<Dashboard>,
    segments: &[&str],
    form: &Parameters,
) -> Result<Response<Body>, UiError> {
    match segments {
        ["rollouts", "stop-all"] => pages::rollouts::stop_all(dashboard).await,
        ["rollouts", id, command] => pages::rollouts::command(dashboard, id, command).await,
        ["machines", id, "quarantine"] => {
            pages::machine::quarantine(dashboard, id, form.get("reason")).await
        }
        ["machines", id, "release"] => pages::machine::release(dashboard, id).await,
        _ => Err(UiError::NotFound(segments.join("/"))),
    }
}

/// A streamed response (server-sent events, a download) fed by a task.
pub fn streamed(
    content_type: &'static str,
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
) -> Response<Body> {
    use tokio_stream::StreamExt;
    let frames = tokio_stream::wrappers::ReceiverStream::new(receiver)
        .map(|bytes| Ok::<_, Infallible>(hyper::body::Frame::data(bytes)));
    let mut response = Response::new(http_body_util::StreamBody::new(frames).boxed());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_rebuilt_percent_encoded() {
        let parameters = Parameters::parse(b"zones=dc1&zones=&zones=dc%202&by=role");
        assert_eq!(parameters.all("zones"), vec!["dc1", "dc 2"]);
        assert_eq!(parameters.get("by"), "role");
        assert_eq!(parameters.get("missing"), "");
        assert_eq!(
            with_query("/", [("selector", "env=prod&x")]),
            "/?selector=env%3Dprod%26x"
        );
        assert_eq!(with_query("/rollouts", []), "/rollouts");
    }

    #[test]
    fn refusals_of_the_guard_are_401_and_403_and_api_refusals_keep_their_meaning() {
        assert_eq!(UiError::NoSecret.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(UiError::WrongSecret.status(), StatusCode::FORBIDDEN);
        assert_eq!(UiError::CrossOrigin.status(), StatusCode::FORBIDDEN);
        let denied = UiError::Rpc {
            code: tonic::Code::PermissionDenied,
            message: "needs operator".into(),
        };
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    }
}
