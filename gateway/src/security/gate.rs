//! The security gate: every WebSocket handshake passes it before anything is upgraded, and
//! every connection it lets through carries a [`ConnectionGuard`] that the session consults
//! for each message, join and publish.
//!
//! Handshake checks, cheapest first: connections per client address (429), connections per
//! node (503), `Origin` allowlist (403), token (401), default room allowed by the token (403).
//! See `docs/security.md` for what each one stops.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::Quota;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::protocol::close::Disconnect;
use crate::protocol::{ErrorCode, MAX_REF_BYTES, Refusal, RoomName, json_len, to_json};
use crate::security::auth::{
    AuthArgs, AuthSetupError, Authenticator, Grants, TokenError, handshake_token,
};
use crate::security::limits::{
    ConnectLimiter, ConnectionCap, ConnectionSlot, LimitArgs, MessageBudget, TrustedProxies,
    UserLimiters, Verdict, quota,
};
use crate::security::origin::{AllowedOrigin, OriginPolicy};

/// `Retry-After` sent with 503 when the node is full, in seconds.
const FULL_RETRY_AFTER_SECS: u64 = 5;

/// How often forgotten per-address buckets are swept.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Every security flag: authentication, origins, limits.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// Authentication.
    #[command(flatten)]
    pub auth: AuthArgs,

    /// Origins allowed to open WebSocket connections, comma-separated: exact
    /// (https://chat.example.com) or subdomain wildcards (https://*.example.com). Requests
    /// without Origin (non-browser clients) are always allowed. [default: anonymous mode
    /// allows every origin; with authentication on, only the gateway's own origin]
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<AllowedOrigin>,

    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Why the gate could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// Authentication is misconfigured.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// The handshake timeout is zero.
    #[error("--handshake-timeout must be greater than zero")]
    ZeroHandshakeTimeout,
}

/// What the gate knows of a handshake: headers, the TCP peer and the query's `token`.
#[derive(Debug)]
pub struct Handshake {
    headers: HeaderMap,
    peer: Option<SocketAddr>,
    query_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0);
        let query_token = Query::<TokenParam>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|query| query.0.token);
        Ok(Handshake {
            headers: parts.headers.clone(),
            peer,
            query_token,
        })
    }
}

/// A handshake the gate let through: who it is and its place under the connection cap.
#[derive(Debug)]
pub struct Admission {
    principal: Option<crate::security::auth::Principal>,
    slot: ConnectionSlot,
}

impl Admission {
    /// The user id the token names; `None` in anonymous mode.
    pub fn user_id(&self) -> Option<&str> {
        self.principal
            .as_ref()
            .map(|principal| principal.user_id.as_str())
    }
}

/// The node's gate, shared by every handshake.
pub struct Gate {
    auth: Option<Arc<Authenticator>>,
    origins: OriginPolicy,
    trusted: TrustedProxies,
    connects: ConnectLimiter,
    cap: ConnectionCap,
    users: Arc<UserLimiters>,
    connection_quota: Option<Quota>,
    strikes_quota: Option<Quota>,
}

impl Gate {
    /// The gate the flags describe.
    pub fn new(args: &SecurityArgs) -> Result<Gate, SecurityError> {
        let limits = &args.limits;
        if limits.handshake_timeout.is_zero() {
            return Err(SecurityError::ZeroHandshakeTimeout);
        }
        let auth = Authenticator::from_args(&args.auth)?.map(Arc::new);
        let strikes = std::num::NonZeroU32::new(limits.rate_limit_strikes)
            .map(|strikes| Quota::per_second(std::num::NonZeroU32::MIN).allow_burst(strikes));
        Ok(Gate {
            origins: OriginPolicy::new(&args.allowed_origins, auth.is_some()),
            auth,
            trusted: TrustedProxies::new(limits.trusted_proxies.clone()),
            connects: ConnectLimiter::new(quota(limits.ip_connect_rate, limits.ip_connect_burst)),
            cap: ConnectionCap::new(limits.max_connections as usize),
            users: UserLimiters::new(quota(limits.user_message_rate, limits.user_message_burst)),
            connection_quota: quota(limits.conn_message_rate, limits.conn_message_burst),
            strikes_quota: strikes,
        })
    }

    /// Logs the security settings at start-up, loudly when the node is open to any web page.
    pub fn log_settings(&self, args: &SecurityArgs) {
        let auth = match &self.auth {
            Some(auth) => format!("{:?} JWT", auth.algorithm()),
            None => "off (anonymous)".to_owned(),
        };
        let limits = &args.limits;
        tracing::info!(
            auth,
            origins = self.origins.describe(),
            trusted_proxies = limits.trusted_proxies.len(),
            max_connections = limits.max_connections,
            conn_message_rate = limits.conn_message_rate,
            user_message_rate = limits.user_message_rate,
            ip_connect_rate = limits.ip_connect_rate,
            handshake_timeout = ?limits.handshake_timeout,
            "security settings"
        );
        if matches!(self.origins, OriginPolicy::AllowAll) {
            tracing::warn!(
                "ANONYMOUS DEMO MODE: authentication is off and every web page may open \
                 connections to this node (no --allowed-origins). Do not expose it like this; \
                 see docs/security.md"
            );
        }
    }

    /// Sweeps forgotten per-address buckets until shutdown.
    pub fn spawn_upkeep(self: &Arc<Self>, shutdown: CancellationToken) {
        let gate = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => gate.connects.upkeep(),
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Checks a handshake; the `Err` is answered as is and nothing is upgraded.
    pub fn admit(&self, handshake: &Handshake) -> Result<Admission, Refused> {
        let client = handshake
            .peer
            .map(|peer| self.trusted.client_ip(peer.ip(), &handshake.headers));
        if let Some(ip) = client
            && let Err(wait) = self.connects.check(ip)
        {
            tracing::debug!(client = %ip, "handshake refused: too many connections from this address");
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(Refused::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many new connections from this address; retry later",
            )
            .retry_after(seconds.max(1)));
        }
        let Some(slot) = self.cap.try_acquire() else {
            tracing::debug!(
                open = self.cap.open(),
                "handshake refused: node at its connection limit"
            );
            return Err(Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_full",
                "node is at its connection limit; retry later",
            )
            .retry_after(FULL_RETRY_AFTER_SECS));
        };
        if !self.allows_origin(handshake) {
            tracing::debug!(
                client = ?client,
                origin = ?handshake.headers.get(header::ORIGIN),
                "handshake refused: origin not allowed"
            );
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "origin",
                "origin not allowed",
            ));
        }
        let principal = match &self.auth {
            None => None,
            Some(auth) => {
                let verified =
                    handshake_token(&handshake.headers, handshake.query_token.as_deref())
                        .ok_or(TokenError::Missing)
                        .and_then(|token| auth.verify(token));
                match verified {
                    Ok(principal) => Some(principal),
                    Err(error) => {
                        tracing::debug!(client = ?client, %error, "handshake refused: token");
                        return Err(Refused::new(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            error.to_string(),
                        ));
                    }
                }
            }
        };
        Ok(Admission { principal, slot })
    }

    /// Whether the request's `Origin` may talk to this node (as a connection, or as the POSTs
    /// of one).
    pub fn allows_origin(&self, handshake: &Handshake) -> bool {
        let scheme = handshake.peer.map_or("http", |peer| {
            self.trusted.scheme(peer.ip(), &handshake.headers)
        });
        self.origins.allows(&handshake.headers, scheme)
    }

    /// The guard for an admitted connection that will send as `user_id` and join
    /// `default_room` first; `Err` (403) when the token does not allow that room.
    pub fn guard(
        &self,
        admission: Admission,
        user_id: &str,
        default_room: &RoomName,
    ) -> Result<ConnectionGuard, Refused> {
        let (grants, expires_at) = match admission.principal {
            Some(principal) => (principal.grants, Some(principal.expires_at)),
            None => (Grants::all(), None),
        };
        if !grants.may_join(default_room) {
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "room",
                format!("the token does not allow room `{default_room}`"),
            ));
        }
        let expiry = match (&self.auth, expires_at) {
            (Some(auth), Some(expires_at)) => {
                Some(Box::pin(tokio::time::sleep(auth.time_left(expires_at))))
            }
            _ => None,
        };
        Ok(ConnectionGuard {
            user_id: user_id.to_owned(),
            grants,
            authenticator: self.auth.clone(),
            expiry,
            budget: MessageBudget::new(
                self.connection_quota,
                self.users.bucket(user_id),
                self.strikes_quota,
            ),
            _slot: Some(admission.slot),
        })
    }
}

/// A refused handshake: an HTTP status with a short plain-text reason, counted in
/// `chat_handshakes_refused_total` under its label when it is sent.
#[derive(Debug)]
pub struct Refused {
    status: StatusCode,
    label: &'static str,
    reason: Cow<'static, str>,
    retry_after: Option<u64>,
}

impl Refused {
    fn new(status: StatusCode, label: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Refused {
            status,
            label,
            reason: reason.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        metrics::handshake_refused(self.label);
        let mut response = (self.status, self.reason).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// What to do with one message a client sent, as far as the rate limits are concerned.
#[derive(Debug)]
pub enum Throttle {
    /// Handle it.
    Pass,
    /// Drop it, answering with this `rate_limited` error (none for a control frame, which
    /// has no `ref` and whose pong already answers it).
    Refuse(Option<Refusal>),
    /// Close the connection.
    Close(Disconnect),
}

/// A frame a client sent, as far as the rate limits care.
#[derive(Debug, Clone, Copy)]
pub enum Inbound<'a> {
    /// A text frame: its `ref` is echoed when it is refused.
    Text(&'a str),
    /// A binary frame.
    Binary,
    /// A ping or pong: counted like any frame, since each ping costs a pong.
    Control,
}

/// Per-connection security state: what the token allows, when it expires, and the message
/// budget. The session asks it before each message, join and publish.
pub struct ConnectionGuard {
    user_id: String,
    grants: Grants,
    authenticator: Option<Arc<Authenticator>>,
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    budget: MessageBudget,
    _slot: Option<ConnectionSlot>,
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("user_id", &self.user_id)
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref")]
    reference: Option<Value>,
}

/// Reply to a successful `auth` frame.
#[derive(Serialize)]
#[serde(tag = "type", rename = "authenticated")]
struct Authenticated<'a> {
    #[serde(rename = "userId")]
    user_id: &'a str,
    exp: u64,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Value>,
}

impl ConnectionGuard {
    /// A guard that allows everything and never expires, for a connection outside any gate.
    #[cfg(any(test, feature = "test-util"))]
    pub fn unrestricted(user_id: &str) -> ConnectionGuard {
        ConnectionGuard {
            user_id: user_id.to_owned(),
            grants: Grants::all(),
            authenticator: None,
            expiry: None,
            budget: MessageBudget::new(None, None, None),
            _slot: None,
        }
    }

    /// Spends one message of the budget on `frame`.
    pub fn throttle(&self, frame: Inbound<'_>) -> Throttle {
        let scope = match self.budget.check() {
            Verdict::Allowed => return Throttle::Pass,
            Verdict::Abusive(scope) => {
                metrics::rate_limited(scope.as_str());
                metrics::policy_close(metrics::PolicyClose::RateLimit);
                return Throttle::Close(Disconnect::PolicyViolation);
            }
            Verdict::Limited(scope) => scope,
        };
        metrics::rate_limited(scope.as_str());
        let text = match frame {
            Inbound::Text(text) => Some(text),
            Inbound::Binary => None,
            Inbound::Control => return Throttle::Refuse(None),
        };
        let reference = text
            .and_then(|text| serde_json::from_str::<RefOnly>(text).ok())
            .and_then(|frame| frame.reference)
            .filter(|reference| json_len(reference) <= MAX_REF_BYTES);
        Throttle::Refuse(Some(
            Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "too many messages ({} limit); this one was dropped, slow down",
                    scope.as_str()
                ),
            )
            .with_ref(reference),
        ))
    }

    /// Whether this connection may join `room`.
    pub fn may_join(&self, room: &RoomName) -> Result<(), Refusal> {
        if self.grants.may_join(room) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("your token does not allow room `{room}`"),
            ))
        }
    }

    /// Whether this connection may send chat messages to `room`.
    pub fn may_publish(&self, room: &RoomName) -> Result<(), Refusal> {
        if !self.grants.may_publish() {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "your token does not allow sending messages",
            ));
        }
        self.may_join(room)
    }

    /// Ready once the connection's token has expired (never in anonymous mode).
    pub fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        match &mut self.expiry {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }

    /// Replaces the connection's token with a fresh one for the same user; returns the
    /// `authenticated` reply frame.
    pub fn refresh(&mut self, token: &str, reference: Option<&Value>) -> Result<String, Refusal> {
        let unauthorized = |reason: String| Refusal::new(ErrorCode::Unauthorized, reason);
        let Some(auth) = &self.authenticator else {
            return Err(unauthorized(
                "authentication is not enabled on this server".to_owned(),
            ));
        };
        let principal = auth
            .verify(token)
            .map_err(|error| unauthorized(error.to_string()))?;
        if principal.user_id != self.user_id {
            return Err(unauthorized(
                "the token is for another user; reconnect to change users".to_owned(),
            ));
        }
        let deadline = tokio::time::Instant::now() + auth.time_left(principal.expires_at);
        match &mut self.expiry {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.expiry = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.grants = principal.grants;
        Ok(to_json(&Authenticated {
            user_id: &self.user_id,
            exp: principal.expires_at,
            reference,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        security: SecurityArgs,
    }

    fn gate(flags: &[&str]) -> Gate {
        let flags =
            Flags::try_parse_from(std::iter::once("gw").chain(flags.iter().copied())).unwrap();
        Gate::new(&flags.security).unwrap()
    }

    fn handshake(peer: &str, headers: &[(&str, &str)]) -> Handshake {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        Handshake {
            headers: map,
            peer: Some(peer.parse().unwrap()),
            query_token: None,
        }
    }

    #[test]
    fn defaults_are_anonymous_and_open() {
        let gate = gate(&[]);
        assert!(gate.auth.is_none());
        assert!(matches!(gate.origins, OriginPolicy::AllowAll));
        let admission = gate
            .admit(&handshake(
                "127.0.0.1:5000",
                &[("origin", "https://anywhere.example")],
            ))
            .unwrap();
        assert_eq!(admission.user_id(), None);

        // The abuse limits are on by default: 40 messages at once, then `rate_limited`.
        assert_eq!(gate.connection_quota, quota(20, 40));
        assert!(gate.strikes_quota.is_some());
        let guard = gate
            .guard(admission, "u-1", &RoomName::parse("lobby").unwrap())
            .unwrap();
        for _ in 0..40 {
            assert!(matches!(
                guard.throttle(Inbound::Text("{}")),
                Throttle::Pass
            ));
        }
        match guard.throttle(Inbound::Text(r#"{"ref":9}"#)) {
            Throttle::Refuse(Some(refusal)) => {
                assert_eq!(refusal.code, ErrorCode::RateLimited);
                assert_eq!(refusal.reference, Some(serde_json::json!(9)));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Pings count too, and are dropped without an error frame.
        assert!(matches!(
            guard.throttle(Inbound::Control),
            Throttle::Refuse(None)
        ));
    }

    #[test]
    fn refusals_have_the_documented_statuses() {
        let gate = gate(&[
            "--max-connections",
            "1",
            "--allowed-origins",
            "https://ok.example",
        ]);
        let foreign = gate.admit(&handshake(
            "127.0.0.1:1",
            &[("origin", "https://evil.example")],
        ));
        assert_eq!(foreign.unwrap_err().status(), StatusCode::FORBIDDEN);
        let held = gate.admit(&handshake("127.0.0.1:1", &[])).unwrap();
        let full = gate
            .admit(&handshake("127.0.0.1:1", &[]))
            .unwrap_err()
            .into_response();
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(full.headers().contains_key(header::RETRY_AFTER));
        drop(held);
        assert!(gate.admit(&handshake("127.0.0.1:1", &[])).is_ok());

        let gate = self::gate(&["--ip-connect-rate", "1", "--ip-connect-burst", "1"]);
        assert!(gate.admit(&handshake("10.0.0.1:1", &[])).is_ok());
        let limited = gate
            .admit(&handshake("10.0.0.1:2", &[]))
            .unwrap_err()
            .into_response();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "1");
        assert!(gate.admit(&handshake("10.0.0.2:1", &[])).is_ok());
    }

    #[tokio::test]
    async fn authenticated_gates_want_a_token() {
        let gate = gate(&["--jwt-hs256-secret", "0123456789abcdef0123456789abcdef"]);
        assert!(matches!(gate.origins, OriginPolicy::SameOrigin));
        let refused = gate.admit(&handshake("127.0.0.1:1", &[])).unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let refused = gate
            .admit(&handshake(
                "127.0.0.1:1",
                &[("sec-websocket-protocol", "chat.v1, token.nope")],
            ))
            .unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn an_unrestricted_guard_lets_everything_through() {
        let mut guard = ConnectionGuard::unrestricted("u-1");
        let room = RoomName::parse("any").unwrap();
        assert!(guard.may_join(&room).is_ok());
        assert!(guard.may_publish(&room).is_ok());
        for _ in 0..1000 {
            assert!(matches!(guard.throttle(Inbound::Control), Throttle::Pass));
        }
        let refused = guard.refresh("token", None).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unauthorized);
        let expiry =
            std::future::poll_fn(|cx| std::task::Poll::Ready(guard.poll_expired(cx))).await;
        assert!(expiry.is_pending(), "an anonymous connection never expires");
    }
}
