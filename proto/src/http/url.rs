//! `http://` and `https://` URLs as operators write them for webhooks and
//! checks: parsed once at configuration time into what a request needs (the
//! address to dial, the Host header, the TLS server name, the request path)
//! and a redacted form for messages. Credentials in a URL are refused, and
//! the query is never shown: both are where secrets live.

use std::fmt;

use hyper::Uri;

use crate::names::quoted_prefix;

/// Longest URL accepted: longer ones are mistakes or attacks, not endpoints.
pub const MAX_URL_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("URL {0} is longer than {MAX_URL_BYTES} bytes")]
    TooLong(String),
    #[error("URL {url} is not http(s)://host[:port][/path]: {reason}")]
    Malformed { url: String, reason: &'static str },
    #[error("URL {0} carries credentials (user@host); they are not supported there")]
    Credentials(String),
}

/// Whether a URL is dialled in the clear or over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: Scheme,
    /// Host as written: a DNS name, an IPv4 address or `[v6]`.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
}

impl HttpUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        if text.len() > MAX_URL_BYTES {
            return Err(UrlError::TooLong(quoted_prefix(text)));
        }
        let malformed = |reason| UrlError::Malformed {
            url: quoted_prefix(text),
            reason,
        };
        let uri: Uri = text.parse().map_err(|_| {
            malformed("it does not parse (no \"://\", spaces, or characters to escape?)")
        })?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(malformed("the scheme must be http or https")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| malformed("there is no host"))?;
        if authority.as_str().contains('@') {
            // Quoting only what follows the credentials keeps them out of logs.
            let (_, after) = authority.as_str().rsplit_once('@').unwrap_or_default();
            return Err(UrlError::Credentials(quoted_prefix(after)));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(malformed("there is no host"));
        }
        // `Uri` lets "h:" and "h:name" through; a port of 0 is no place to
        // send anything either.
        let written_port = authority.as_str()[host.len()..].strip_prefix(':');
        let port = match written_port.map(str::parse::<u16>) {
            None => match scheme {
                Scheme::Http => 80,
                Scheme::Https => 443,
            },
            Some(Ok(0)) => return Err(malformed("port 0 is not a port")),
            Some(Ok(port)) => port,
            Some(Err(_)) => return Err(malformed("the port is not a number up to 65535")),
        };
        let path_and_query = match uri.path_and_query() {
            Some(path) if path.as_str().starts_with('/') => path.as_str().to_owned(),
            Some(path) if path.as_str().is_empty() => "/".to_owned(),
            Some(path) if path.as_str().starts_with('?') => format!("/{}", path.as_str()),
            Some(_) => return Err(malformed("the path must start with /")),
            None => "/".to_owned(),
        };
        Ok(HttpUrl {
            scheme,
            host: host.to_owned(),
            port,
            path_and_query,
        })
    }

    /// `host:port` to dial.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The Host header: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        match (self.scheme, self.port) {
            (Scheme::Http, 80) | (Scheme::Https, 443) => self.host.clone(),
            _ => self.address(),
        }
    }

    /// The host as a TLS server name (an IPv6 address without brackets).
    pub fn tls_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(path, _)| path)
    }
}

/// The URL for messages and logs: scheme, host, port and path; a query is
/// shown as `?…` because that is where tokens usually are.
impl fmt::Display for HttpUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let query = if self.path_and_query.contains('?') {
            "?…"
        } else {
            ""
        };
        write!(
            formatter,
            "{scheme}://{}{}{query}",
            self.host_header(),
            self.path()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_is_dialled_and_sent() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!(url.address(), "127.0.0.1:8080");
        assert_eq!(url.path_and_query, "/health?x=1");
        assert_eq!(url.host_header(), "127.0.0.1:8080");
        let url = HttpUrl::parse("https://hooks.example.com").unwrap();
        assert_eq!(
            (
                url.scheme,
                url.address().as_str(),
                url.path_and_query.as_str()
            ),
            (Scheme::Https, "hooks.example.com:443", "/")
        );
        assert_eq!(url.host_header(), "hooks.example.com");
        let url = HttpUrl::parse("https://[::1]:9/x").unwrap();
        assert_eq!((url.address().as_str(), url.tls_host()), ("[::1]:9", "::1"));
        let url = HttpUrl::parse("http://example.com?token=1").unwrap();
        assert_eq!(url.path_and_query, "/?token=1");
    }

    #[test]
    fn refuses_what_cannot_be_dialled_and_names_why() {
        for (bad, reason) in [
            ("ftp://x/", "scheme"),
            ("http://", "does not parse"),
            ("http://:80/", "no host"),
            ("http://h:port/", "not a number"),
            ("http://h:/", "not a number"),
            ("http://h:0/", "port 0"),
            ("/just/a/path", "scheme"),
            ("http://h/a b", "does not parse"),
        ] {
            let error = HttpUrl::parse(bad).unwrap_err().to_string();
            assert!(error.contains(reason), "{bad}: {error}");
        }
        let too_long = format!("http://h/{}", "a".repeat(MAX_URL_BYTES));
        assert!(matches!(
            HttpUrl::parse(&too_long),
            Err(UrlError::TooLong(_))
        ));
    }

    #[test]
    fn credentials_are_refused_without_being_repeated() {
        let error = HttpUrl::parse("https://alice:s3cret@hooks.example.com/x")
            .unwrap_err()
            .to_string();
        assert!(error.contains("credentials"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        assert!(error.contains("hooks.example.com"), "{error}");
    }

    #[test]
    fn the_display_form_hides_the_query() {
        let url = HttpUrl::parse("https://h.example:8443/services/a?token=s3cret").unwrap();
        assert_eq!(url.to_string(), "https://h.example:8443/services/a?…");
        let url = HttpUrl::parse("http://h.example/plain").unwrap();
        assert_eq!(url.to_string(), "http://h.example/plain");
    }
}
