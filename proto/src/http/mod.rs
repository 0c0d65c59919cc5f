//! HTTP/1.1 on hyper for the plain-text needs beside gRPC: the client of
//! webhook POSTs and health-check probes (`http://` and `https://` with
//! rustls, one request per connection, no redirect ever followed, every
//! exchange bounded in time and bytes) and the server loop of `/metrics`
//! endpoints and the dashboard (bounded connections and request heads).
//!
//! Nothing here parses HTTP by hand: hyper does the framing (chunked bodies
//! included) and rustls the TLS. Nothing here decides what to send or what a
//! status means either: callers do.

pub mod client;
pub mod server;
pub mod url;

pub use client::{request, ClientError, HttpEndpoint, HttpResponse, OutgoingRequest, TlsTrust};
pub use url::{HttpUrl, UrlError};
