//! The HTTP/1.1 server loop shared by the `/metrics` endpoints of the server
//! and the agent and by flottectl's dashboard: hyper serves each connection;
//! this loop bounds how many are served at once, how long a client may take
//! to send a request head and how large that head may be.
//!
//! What a request gets is the caller's handler; [`serve_metrics`] is the one
//! the `/metrics` endpoints use.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What one server accepts at most.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more wait in the listen queue.
    pub max_connections: usize,
    /// Time a client has to send a request head (also between requests of a
    /// kept-alive connection).
    pub header_read_timeout: Duration,
    /// Bytes hyper buffers for one request head (at least 8 KiB).
    pub max_head_bytes: usize,
}

/// Pause after a failed accept (out of descriptors, usually) so that
/// connections being served can finish and free some.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Serves `handler` on `listener` until `shutdown` completes. A failed
/// accept is given to `on_accept_error` (each program logs its own way).
pub async fn serve_http1<H, F, B>(
    listener: TcpListener,
    limits: ServerLimits,
    handler: H,
    on_accept_error: impl Fn(&std::io::Error),
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                on_accept_error(&error);
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => continue,
                }
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_head_bytes)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// Prometheus' scrapers are few: a handful of connections is plenty.
const METRICS_LIMITS: ServerLimits = ServerLimits {
    max_connections: 16,
    header_read_timeout: Duration::from_secs(10),
    max_head_bytes: 16 * 1024,
};

const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The text of a scrape, gathered asynchronously (the server reads some of
/// it from its store).
pub type MetricsText = Pin<Box<dyn Future<Output = String> + Send>>;

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The refusal of anything but `GET /metrics`: 404 on any other path, 405
/// for any other method.
pub fn metrics_refusal(method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if path != "/metrics" {
        Some(text_response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".to_owned(),
        ))
    } else if method != Method::GET {
        Some(text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_owned(),
        ))
    } else {
        None
    }
}

/// Serves `encode()`'s text on `GET /metrics` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    encode: Arc<dyn Fn() -> MetricsText + Send + Sync>,
    shutdown: CancellationToken,
) {
    let handler = move |request: Request<Incoming>| {
        let refusal = metrics_refusal(request.method(), request.uri().path());
        let encode = Arc::clone(&encode);
        async move {
            match refusal {
                Some(refusal) => refusal,
                None => text_response(StatusCode::OK, OPENMETRICS_TEXT, encode().await),
            }
        }
    };
    serve_http1(
        listener,
        METRICS_LIMITS,
        handler,
        |error| tracing::warn!(%error, "/metrics: accept failed"),
        shutdown.cancelled_owned(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::client::{request, HttpEndpoint, OutgoingRequest};

    #[test]
    fn only_get_metrics_is_answered() {
        assert!(metrics_refusal(&Method::GET, "/metrics").is_none());
        let refused =
            |method, path| metrics_refusal(&method, path).map(|response| response.status());
        assert_eq!(refused(Method::GET, "/other"), Some(StatusCode::NOT_FOUND));
        assert_eq!(
            refused(Method::POST, "/metrics"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[tokio::test]
    async fn the_client_reads_what_the_metrics_server_serves_and_shutdown_closes_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(
            listener,
            Arc::new(|| -> MetricsText { Box::pin(async { "flotte_up 1\n".to_owned() }) }),
            shutdown.clone(),
        ));
        let endpoint =
            HttpEndpoint::from_settings(&format!("http://{address}/metrics"), None).unwrap();
        let get = OutgoingRequest::get();
        let response = request(&endpoint, get.clone(), Duration::from_secs(5), 1024)
            .await
            .unwrap();
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, b"flotte_up 1\n".as_slice())
        );
        let bounded = request(&endpoint, get.clone(), Duration::from_secs(5), 4)
            .await
            .unwrap();
        assert_eq!(
            (bounded.body.as_slice(), bounded.truncated),
            (b"flot".as_slice(), true)
        );
        shutdown.cancel();
        server.await.unwrap();
        let refused = request(&endpoint, get, Duration::from_secs(5), 1024)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("cannot connect to http://127.0.0.1:"),
            "{refused}"
        );
    }
}
