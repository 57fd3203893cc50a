//! The `Origin` allowlist: which web pages may open WebSocket connections to the gateway.
//!
//! Browsers send `Origin` with every WebSocket handshake and let any page connect anywhere, so
//! without a check a foreign page can open connections in a visitor's name (cross-site
//! WebSocket hijacking). Clients that are not browsers usually send no `Origin` at all; they
//! are always let through, since they could put any value there anyway.
//!
//! Patterns are `scheme://host[:port]`, compared case-insensitively, with default ports
//! (80 for http, 443 for https) made explicit. A host may start with `*.` to allow every
//! subdomain (`https://*.example.com` allows `https://a.example.com` and
//! `https://a.b.example.com`, not `https://example.com`). `*` alone allows every origin, and
//! `null` allows the literal `Origin: null` that sandboxed frames and `file:` pages send.

use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

/// A parsed `scheme://host:port` origin.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses an `Origin` header value or allowlist entry. Anything but a bare
    /// `scheme://host[:port]` (a path, a query, credentials) is refused. Hosts come out
    /// lower-cased (and internationalised names as punycode), ports made explicit.
    fn parse(text: &str) -> Option<Origin> {
        if text.len() > 300 {
            return None;
        }
        let url = url::Url::parse(text).ok()?;
        let bare = matches!(url.path(), "" | "/")
            && url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.password().is_none();
        if !bare {
            return None;
        }
        Some(Origin {
            scheme: url.scheme().to_owned(),
            host: url.host_str()?.to_owned(),
            // Schemes without a default port (browser extensions, app shells) match exactly.
            port: url.port_or_known_default().unwrap_or(0),
        })
    }
}

/// The port a request for `host` (a `Host` header) went to, over `scheme`.
fn host_and_port(host: &str, scheme: &str) -> Option<(String, u16)> {
    let authority: axum::http::uri::Authority = host.parse().ok()?;
    let default = match scheme {
        "https" => 443,
        _ => 80,
    };
    Some((
        authority.host().to_ascii_lowercase(),
        authority.port_u16().unwrap_or(default),
    ))
}

/// One allowed origin: exact, or every subdomain of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `*`: every origin.
    Any,
    /// `null`: the opaque origin.
    Null,
    /// `scheme://host:port`, exactly.
    Exact(Origin),
    /// `scheme://*.suffix:port`: any host ending in `.suffix`.
    Subdomains {
        scheme: String,
        suffix: String,
        port: u16,
    },
}

impl Pattern {
    fn matches(&self, origin: &Origin) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Null => false,
            Pattern::Exact(allowed) => allowed == origin,
            Pattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && origin.host.len() > suffix.len() + 1
                    && origin.host.ends_with(suffix.as_str())
                    && origin.host.as_bytes()[origin.host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

/// An allowlist entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid allowed origin `{0}`: expected scheme://host[:port], scheme://*.domain[:port], `*` or `null`"
)]
pub struct InvalidOrigin(pub String);

/// Parses one allowlist entry (as given to `--allowed-origins`).
fn parse_pattern(text: &str) -> Result<Pattern, InvalidOrigin> {
    let invalid = || InvalidOrigin(text.to_owned());
    let trimmed = text.trim().trim_end_matches('/');
    match trimmed {
        "*" => return Ok(Pattern::Any),
        "null" => return Ok(Pattern::Null),
        _ => {}
    }
    let origin = Origin::parse(trimmed).ok_or_else(invalid)?;
    match origin.host.strip_prefix("*.") {
        Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => Ok(Pattern::Subdomains {
            scheme: origin.scheme,
            suffix: suffix.to_owned(),
            port: origin.port,
        }),
        Some(_) => Err(invalid()),
        None if origin.host.contains('*') => Err(invalid()),
        None => Ok(Pattern::Exact(origin)),
    }
}

/// Which `Origin` values may open connections.
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// No check (anonymous demo mode without an allowlist).
    AllowAll,
    /// Only pages served from the gateway's own address: `Origin` must name the scheme the
    /// client used and the `Host` the request was sent to (authenticated mode without an
    /// allowlist).
    SameOrigin,
    /// Only the listed origins.
    List(Vec<AllowedOrigin>),
}

/// One parsed entry of the allowlist, kept with its text for logs.
#[derive(Debug, Clone)]
pub struct AllowedOrigin {
    text: String,
    pattern: Pattern,
}

impl AllowedOrigin {
    /// Parses an allowlist entry such as `https://chat.example.com` or `https://*.example.com`.
    pub fn parse(text: &str) -> Result<AllowedOrigin, InvalidOrigin> {
        Ok(AllowedOrigin {
            text: text.trim().to_owned(),
            pattern: parse_pattern(text)?,
        })
    }
}

impl std::str::FromStr for AllowedOrigin {
    type Err = InvalidOrigin;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AllowedOrigin::parse(text)
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl OriginPolicy {
    /// The policy for a configuration: the allowlist when one is given; otherwise every origin
    /// in anonymous mode and same-origin only with authentication on.
    pub fn new(allowed: &[AllowedOrigin], authenticated: bool) -> OriginPolicy {
        if !allowed.is_empty() {
            OriginPolicy::List(allowed.to_vec())
        } else if authenticated {
            OriginPolicy::SameOrigin
        } else {
            OriginPolicy::AllowAll
        }
    }

    /// Whether a handshake with these headers may go on. Requests without `Origin` (clients
    /// that are not browsers) always may. `scheme` is how the client reached the gateway
    /// (`http`, or `https` through a TLS-terminating proxy): a same-origin page shares it.
    pub fn allows(&self, headers: &HeaderMap, scheme: &str) -> bool {
        let Some(origin) = headers.get(ORIGIN) else {
            return true;
        };
        if matches!(self, OriginPolicy::AllowAll) {
            return true;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        if origin == "null" {
            return match self {
                OriginPolicy::List(allowed) => allowed
                    .iter()
                    .any(|entry| matches!(entry.pattern, Pattern::Null | Pattern::Any)),
                _ => false,
            };
        }
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        match self {
            OriginPolicy::AllowAll => true,
            OriginPolicy::SameOrigin => {
                origin.scheme == scheme
                    && headers
                        .get(HOST)
                        .and_then(|host| host.to_str().ok())
                        .and_then(|host| host_and_port(host, scheme))
                        .is_some_and(|(host, port)| host == origin.host && port == origin.port)
            }
            OriginPolicy::List(allowed) => {
                allowed.iter().any(|entry| entry.pattern.matches(&origin))
            }
        }
    }

    /// A short description for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            OriginPolicy::AllowAll => "any origin".to_owned(),
            OriginPolicy::SameOrigin => "same origin only".to_owned(),
            OriginPolicy::List(allowed) => allowed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    fn list(entries: &[&str]) -> OriginPolicy {
        let allowed: Vec<AllowedOrigin> = entries.iter().map(|e| e.parse().unwrap()).collect();
        OriginPolicy::new(&allowed, true)
    }

    #[test]
    fn exact_origins_match_scheme_host_and_port() {
        let policy = list(&["https://chat.example.com", "http://localhost:8080"]);
        let allowed = |origin| policy.allows(&headers(Some(origin), "gw:8080"), "http");
        assert!(allowed("https://chat.example.com"));
        assert!(allowed("https://CHAT.example.com:443"));
        assert!(allowed("http://localhost:8080"));
        assert!(!allowed("http://chat.example.com"));
        assert!(!allowed("https://chat.example.com:8443"));
        assert!(!allowed("https://chat.example.com.evil.net"));
        assert!(!allowed("http://localhost:8081"));
        assert!(!allowed("http://localhost"));
        assert!(!allowed("garbage"));
        assert!(!allowed("null"));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let policy = list(&["https://*.example.com"]);
        let allowed = |origin| policy.allows(&headers(Some(origin), "gw"), "https");
        assert!(allowed("https://a.example.com"));
        assert!(allowed("https://a.b.example.com"));
        assert!(!allowed("https://example.com"));
        assert!(!allowed("https://badexample.com"));
        assert!(!allowed("https://a.example.com.evil.net"));
        assert!(!allowed("http://a.example.com"));
    }

    #[test]
    fn requests_without_origin_are_always_allowed() {
        assert!(list(&["https://a.example"]).allows(&headers(None, "gw"), "http"));
        assert!(OriginPolicy::SameOrigin.allows(&headers(None, "gw"), "http"));
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let policy = OriginPolicy::new(&[], true);
        let allowed = |origin, host, scheme| policy.allows(&headers(Some(origin), host), scheme);
        assert!(allowed("http://gw.local:8080", "gw.local:8080", "http"));
        assert!(allowed("https://gw.local", "gw.local", "https"));
        assert!(allowed("https://gw.local:443", "gw.local", "https"));
        assert!(!allowed("http://evil.example", "gw.local:8080", "http"));
        assert!(!allowed("http://gw.local:9999", "gw.local:8080", "http"));
        // Same host and port, another scheme: another origin.
        assert!(!allowed("https://gw.local:8080", "gw.local:8080", "http"));
        assert!(!allowed("http://gw.local", "gw.local", "https"));
        assert!(!allowed("ws://gw.local:8080", "gw.local:8080", "http"));
    }

    #[test]
    fn anonymous_mode_without_a_list_allows_everything() {
        let policy = OriginPolicy::new(&[], false);
        assert!(policy.allows(&headers(Some("http://evil.example"), "gw"), "http"));
        assert!(policy.allows(&headers(Some("not even an origin"), "gw"), "http"));
    }

    #[test]
    fn null_and_star_are_explicit_choices() {
        assert!(list(&["null"]).allows(&headers(Some("null"), "gw"), "http"));
        assert!(list(&["*"]).allows(&headers(Some("https://any.where"), "gw"), "http"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://a.*.com",
            "https://*.",
            "ftp//x",
            "https://x:99999",
            "https://a.example/path",
            "https://user@a.example",
            "https://a.example?q",
        ] {
            assert!(AllowedOrigin::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowedOrigin::parse("https://chat.example.com/").is_ok());
    }
}
