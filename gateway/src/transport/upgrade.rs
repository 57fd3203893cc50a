//! The WebSocket opening handshake (RFC 6455 §4.2) over hyper's HTTP upgrade, handing the
//! session the TCP socket itself.
//!
//! Sessions write frames straight to their socket from whichever task produced them (see
//! `outbox`), which needs the `TcpStream` rather than a stream type that owns it; this module
//! checks the request, answers `101 Switching Protocols`, and recovers the socket and any bytes
//! the client sent right behind its request.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::headers::header_list;

/// A valid WebSocket upgrade request, not yet answered.
pub struct WebSocketRequest {
    accept_key: HeaderValue,
    offered_protocols: Option<HeaderValue>,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket handshake this server can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRejection {
    /// The handshake must be a GET.
    #[error("a WebSocket handshake must be a GET request")]
    MethodNotGet,
    /// `Connection` does not include `upgrade`, or `Upgrade` is not `websocket`.
    #[error(
        "not a WebSocket upgrade request: expected `Connection: upgrade` and `Upgrade: websocket`"
    )]
    NotAnUpgrade,
    /// Only version 13 exists.
    #[error("unsupported WebSocket version: expected `Sec-WebSocket-Version: 13`")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing.
    #[error("`Sec-WebSocket-Key` header missing")]
    MissingKey,
    /// `Sec-WebSocket-Key` is not one base64-encoded 16-byte value.
    #[error("`Sec-WebSocket-Key` must be one base64-encoded 16-byte value")]
    InvalidKey,
    /// The connection cannot be upgraded (HTTP/2, or no upgrade support on this connection).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRejection::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRejection::UnsupportedVersion | UpgradeRejection::NotUpgradable => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeRejection::NotAnUpgrade
            | UpgradeRejection::MissingKey
            | UpgradeRejection::InvalidKey => StatusCode::BAD_REQUEST,
        };
        let mut response = (status, self.to_string()).into_response();
        if self == UpgradeRejection::UnsupportedVersion {
            // RFC 6455 §4.4: tell the client which version to use.
            response
                .headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
        }
        response
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketRequest {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeRejection::MethodNotGet);
        }
        let headers = &parts.headers;
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(UpgradeRejection::NotAnUpgrade);
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(UpgradeRejection::UnsupportedVersion);
        }
        let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = keys.next().ok_or(UpgradeRejection::MissingKey)?;
        if keys.next().is_some() || !is_valid_key(key.as_bytes()) {
            return Err(UpgradeRejection::InvalidKey);
        }
        let accept_key =
            HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(key.as_bytes()))
                .map_err(|_| UpgradeRejection::InvalidKey)?;
        let offered_protocols = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRejection::NotUpgradable)?;
        Ok(WebSocketRequest {
            accept_key,
            offered_protocols,
            on_upgrade,
        })
    }
}

impl WebSocketRequest {
    /// Whether the client offered `protocol` in `Sec-WebSocket-Protocol`.
    pub fn offers_protocol(&self, protocol: &str) -> bool {
        header_list(&self.offered_protocols).any(|candidate| candidate == protocol)
    }

    /// Answers `101 Switching Protocols` (echoing `protocol` when given) and runs `session`
    /// with the socket once hyper hands the connection over, along with any bytes the client
    /// sent after its request.
    pub fn accept<F, Fut>(self, protocol: Option<&'static str>, session: F) -> Response
    where
        F: FnOnce(TcpStream, Vec<u8>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    tracing::debug!(%error, "websocket upgrade failed");
                    return;
                }
            };
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    // Copied out so hyper's whole read buffer, which `read_buf` points into,
                    // is freed now rather than held for the life of the connection.
                    let pipelined = parts.read_buf.to_vec();
                    drop(parts.read_buf);
                    // A task of its own, sized for the session alone: this one, which
                    // also held the upgrade, ends here.
                    tokio::spawn(session(parts.io.into_inner(), pipelined));
                }
                Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
            }
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept_key);
        if let Some(protocol) = protocol {
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// Whether a `Sec-WebSocket-Key` is what RFC 6455 §4.1 says a client sends: a random 16-byte
/// value, base64-encoded.
fn is_valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|nonce| nonce.len() == 16)
}

/// Whether a comma-separated header contains `token`, ignoring case.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    header_list(headers.get_all(name)).any(|candidate| candidate.eq_ignore_ascii_case(token))
}
