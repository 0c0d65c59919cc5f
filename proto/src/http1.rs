//! A deliberately small HTTP/1.1 client and server for plain-text needs that
//! do not justify a web stack: health-check probes and webhook POSTs (client),
//! and Prometheus `/metrics` endpoints (server).
//!
//! Only `http://` is supported, one request per connection (`Connection:
//! close`), bodies read up to a caller-given limit. Anything fancier (TLS,
//! chunked uploads, keep-alive) belongs to a real HTTP library, not here.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request or response head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("URL {0:?} is not http://host[:port][/path]")]
    BadUrl(String),
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("I/O error talking to {address}: {reason}")]
    Io { address: String, reason: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("malformed HTTP response from {0}")]
    Malformed(String),
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` to dial.
    pub address: String,
    /// Value of the Host header.
    pub host: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = || HttpError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
            return Err(bad());
        }
        let has_port = match authority.rsplit_once(':') {
            // "[::1]" alone has a colon but no port.
            Some((host, port)) if !port.contains(']') => {
                port.parse::<u16>().map_err(|_| bad())?;
                if host.is_empty() {
                    return Err(bad());
                }
                true
            }
            _ => false,
        };
        let address = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpUrl {
            address,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Status and the first bytes of the body of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Finds the end of the head (`\r\n\r\n`) in `buffer`.
fn head_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(4).position(|window| window == b"\r\n\r\n")
}

/// Parses `HTTP/1.x CODE REASON` from a response head.
pub fn parse_status_line(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

async fn exchange(
    url: &HttpUrl,
    request: Vec<u8>,
    max_body_bytes: usize,
) -> Result<HttpResponse, HttpError> {
    let io_error = |error: std::io::Error| HttpError::Io {
        address: url.address.clone(),
        reason: error.to_string(),
    };
    let mut stream =
        TcpStream::connect(&url.address)
            .await
            .map_err(|error| HttpError::Connect {
                address: url.address.clone(),
                reason: error.to_string(),
            })?;
    stream.write_all(&request).await.map_err(io_error)?;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_length = loop {
        if let Some(end) = head_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(HttpError::Malformed(url.address.clone()));
        }
        let read = stream.read(&mut chunk).await.map_err(io_error)?;
        if read == 0 {
            return Err(HttpError::Malformed(url.address.clone()));
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_length]).into_owned();
    let status =
        parse_status_line(&head).ok_or_else(|| HttpError::Malformed(url.address.clone()))?;
    let mut body = buffer[head_length + 4..].to_vec();
    while body.len() < max_body_bytes {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => body.extend_from_slice(&chunk[..read]),
        }
    }
    body.truncate(max_body_bytes);
    Ok(HttpResponse { status, body })
}

/// Sends one request and returns the status and up to `max_body_bytes` of body.
pub async fn request(
    method: &str,
    url: &HttpUrl,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
    max_body_bytes: usize,
) -> Result<HttpResponse, HttpError> {
    let mut request = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: flotte\r\nConnection: close\r\n",
        url.path, url.host
    )
    .into_bytes();
    if let Some((content_type, content)) = body {
        request.extend_from_slice(
            format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                content.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(content);
    } else {
        request.extend_from_slice(b"\r\n");
    }
    tokio::time::timeout(timeout, exchange(url, request, max_body_bytes))
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// A plain-text response from a [`serve`] handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

pub type Handler = Arc<dyn Fn(&str, &str) -> TextResponse + Send + Sync>;

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

async fn answer(mut stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_length = loop {
        if let Some(end) = head_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Ok(());
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_length]);
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let response = handler(&method, &path);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(response.body.as_bytes()).await?;
    stream.shutdown().await
}

/// The answer of a `/metrics` endpoint: the encoded text there, 404 elsewhere.
pub fn metrics_response(path: &str, encode: impl FnOnce() -> String) -> TextResponse {
    if path == "/metrics" {
        TextResponse {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: encode(),
        }
    } else {
        TextResponse {
            status: 404,
            content_type: "text/plain",
            body: "not found; try /metrics\n".to_owned(),
        }
    }
}

/// Serves `handler(method, path)` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, handler: Handler, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, handler)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!(url.address, "127.0.0.1:8080");
        assert_eq!(url.path, "/health?x=1");
        let url = HttpUrl::parse("http://example.com").unwrap();
        assert_eq!(
            (url.address.as_str(), url.path.as_str()),
            ("example.com:80", "/")
        );
        let url = HttpUrl::parse("http://[::1]:9/").unwrap();
        assert_eq!(url.address, "[::1]:9");
        for bad in [
            "https://x/",
            "http://",
            "http://:80/",
            "http://h:port/",
            "ftp://x",
            "http://u@h/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(
            parse_status_line("HTTP/1.1 204 No Content\r\nX: y"),
            Some(204)
        );
        assert_eq!(parse_status_line("HTTP/1.0 500 Oops"), Some(500));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
    }

    #[tokio::test]
    async fn client_and_server_talk() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handler: Handler = Arc::new(|method, path| TextResponse {
            status: if path == "/metrics" { 200 } else { 404 },
            content_type: "text/plain",
            body: format!("{method} {path}"),
        });
        tokio::spawn(serve(listener, handler, shutdown.clone()));
        let url = HttpUrl::parse(&format!("http://{address}/metrics")).unwrap();
        let response = request("GET", &url, None, Duration::from_secs(5), 1024)
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"GET /metrics");
        let url = HttpUrl::parse(&format!("http://{address}/nope")).unwrap();
        let posted = request(
            "POST",
            &url,
            Some(("application/json", b"{}")),
            Duration::from_secs(5),
            3,
        )
        .await
        .unwrap();
        assert_eq!(
            (posted.status, posted.body.as_slice()),
            (404, b"POS".as_slice())
        );
        shutdown.cancel();
    }
}
