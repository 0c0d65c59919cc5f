//! Who may talk to the dashboard: the pure checks every request passes
//! before anything reaches the Flotte API.
//!
//! The dashboard listens on a local port that any process (and any web page
//! the operator's browser opens) can reach, while it acts with the
//! operator's certificate. So every request must carry the random secret
//! printed with the URL (as `?secret=` once, then as an HttpOnly
//! SameSite=Strict cookie), and every state-changing request must be a POST
//! whose `Origin` (or, failing that, `Sec-Fetch-Site`) says it came from the
//! dashboard itself. Nothing here does I/O; the secret's random bytes come
//! from the caller.

use std::fmt::Write as _;

/// Start of the name of the cookie that carries the secret after the first
/// request; the port follows, because browsers keep cookies per host, not
/// per port, and two dashboards on one host must not overwrite each other's.
const SECRET_COOKIE_PREFIX: &str = "flotte_ui_";
/// Name of the query parameter of the printed URL.
pub const SECRET_PARAMETER: &str = "secret";
/// Bytes of randomness in a secret (128 bits or more, as any session token).
pub const SECRET_BYTES: usize = 32;
const _: () = assert!(
    SECRET_BYTES * 8 >= 128,
    "a secret must have 128 bits or more"
);

/// The secret of one `flottectl ui` run, as lowercase hex, and the name of
/// the cookie that carries it.
#[derive(Clone)]
pub struct Secret {
    value: String,
    cookie_name: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(…)")
    }
}

impl Secret {
    /// The secret of a dashboard listening on `port`.
    pub fn from_random_bytes(bytes: &[u8; SECRET_BYTES], port: u16) -> Self {
        Secret {
            value: hex::encode(bytes),
            cookie_name: format!("{SECRET_COOKIE_PREFIX}{port}"),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Compares in time independent of where the first difference is, so a
    /// local attacker cannot find the secret a byte at a time.
    pub fn matches(&self, offered: &str) -> bool {
        let expected = self.value.as_bytes();
        let offered = offered.as_bytes();
        if expected.len() != offered.len() {
            return false;
        }
        expected
            .iter()
            .zip(offered)
            .fold(0u8, |difference, (left, right)| difference | (left ^ right))
            == 0
    }

    /// The `Set-Cookie` value that lets the browser come back without the
    /// secret in the address bar.
    pub fn cookie(&self) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie_name, self.value
        )
    }
}

/// How a request proved (or did not prove) that it knows the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretProof {
    /// The cookie carries it.
    Cookie,
    /// The query carries it (the printed URL): answered with the cookie and
    /// a redirect to the same page without it.
    Query,
    Missing,
    Wrong,
}

/// Checks the secret in the `Cookie` header values and the query string.
pub fn secret_proof<'header>(
    secret: &Secret,
    cookie_headers: impl IntoIterator<Item = &'header str>,
    query: Option<&str>,
) -> SecretProof {
    let mut offered_any = false;
    for header in cookie_headers {
        for (name, value) in header
            .split(';')
            .filter_map(|pair| pair.trim().split_once('='))
        {
            if name == secret.cookie_name {
                if secret.matches(value) {
                    return SecretProof::Cookie;
                }
                offered_any = true;
            }
        }
    }
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name == SECRET_PARAMETER {
            if secret.matches(&value) {
                return SecretProof::Query;
            }
            offered_any = true;
        }
    }
    if offered_any {
        SecretProof::Wrong
    } else {
        SecretProof::Missing
    }
}

/// Whether a state-changing request comes from a page of the dashboard
/// itself. `Origin` must be exactly `http://HOST` where HOST is the `Host`
/// the browser used. A browser sends `Origin: null` (or none) when the
/// referrer policy hides it — the dashboard's own `no-referrer` does, so its
/// own forms arrive that way — and then `Sec-Fetch-Site`, which pages cannot
/// set, must say `same-origin`. With neither, the request is refused.
pub fn is_same_origin(host: Option<&str>, origin: Option<&str>, fetch_site: Option<&str>) -> bool {
    match (origin, host) {
        (None | Some("null"), _) => fetch_site == Some("same-origin"),
        (Some(origin), Some(host)) => {
            let mut expected = String::with_capacity(host.len() + 7);
            let _ = write!(expected, "http://{host}");
            origin == expected
        }
        (Some(_), None) => false,
    }
}

/// Whether the `Host` a browser used names the dashboard's own listener
/// (its address, or `localhost` with its port). Any other name means a page
/// reached it through DNS rebinding: refused before the secret is looked at.
pub fn is_own_host(host: Option<&str>, listen: std::net::SocketAddr) -> bool {
    let Some(host) = host else {
        return false;
    };
    host == listen.to_string() || host == format!("localhost:{}", listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_random_bytes(&[7; SECRET_BYTES], 4242)
    }

    #[test]
    fn a_secret_has_at_least_128_bits_and_hides_in_debug() {
        let secret = secret();
        assert_eq!(secret.as_str().len(), SECRET_BYTES * 2);
        assert!(!format!("{secret:?}").contains(secret.as_str()));
    }

    #[test]
    fn the_secret_is_accepted_from_the_cookie_or_the_query_only_when_exact() {
        let secret = secret();
        let good = secret.as_str().to_owned();
        let cookie = format!("flotte_ui_4243={good}x; flotte_ui_4242={good}");
        assert_eq!(
            secret_proof(&secret, [cookie.as_str()], None),
            SecretProof::Cookie
        );
        let query = format!("selector=a%3Db&{SECRET_PARAMETER}={good}");
        assert_eq!(secret_proof(&secret, [], Some(&query)), SecretProof::Query);
        assert_eq!(secret_proof(&secret, [], None), SecretProof::Missing);
        assert_eq!(
            secret_proof(&secret, ["other=1"], Some("selector=x")),
            SecretProof::Missing
        );
        let mut wrong = good.clone();
        wrong.replace_range(0..1, if good.starts_with('0') { "1" } else { "0" });
        let wrong_cookie = format!("flotte_ui_4242={wrong}");
        assert_eq!(
            secret_proof(&secret, [wrong_cookie.as_str()], None),
            SecretProof::Wrong
        );
        let prefix = format!("{SECRET_PARAMETER}={}", &good[..good.len() - 1]);
        assert_eq!(secret_proof(&secret, [], Some(&prefix)), SecretProof::Wrong);
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site_strict() {
        let cookie = secret().cookie();
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    }

    #[test]
    fn only_the_dashboards_own_origin_may_change_state() {
        let host = Some("127.0.0.1:4242");
        assert!(is_same_origin(host, Some("http://127.0.0.1:4242"), None));
        assert!(!is_same_origin(host, Some("http://127.0.0.1:4243"), None));
        assert!(!is_same_origin(host, Some("https://127.0.0.1:4242"), None));
        assert!(!is_same_origin(host, Some("http://evil.example"), None));
        assert!(is_same_origin(host, Some("null"), Some("same-origin")));
        assert!(!is_same_origin(host, Some("null"), Some("cross-site")));
        assert!(!is_same_origin(host, Some("null"), None));
        assert!(!is_same_origin(
            host,
            Some("http://evil.example"),
            Some("same-origin")
        ));
        assert!(!is_same_origin(None, Some("http://127.0.0.1:4242"), None));
        assert!(is_same_origin(host, None, Some("same-origin")));
        assert!(!is_same_origin(host, None, Some("cross-site")));
        assert!(!is_same_origin(host, None, Some("same-site")));
        assert!(!is_same_origin(host, None, None));
    }

    #[test]
    fn only_the_listeners_own_host_names_are_served() {
        let listen: std::net::SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert!(is_own_host(Some("127.0.0.1:4242"), listen));
        assert!(is_own_host(Some("localhost:4242"), listen));
        assert!(!is_own_host(Some("evil.example:4242"), listen));
        assert!(!is_own_host(Some("127.0.0.1:4243"), listen));
        assert!(!is_own_host(None, listen));
    }
}
