//! How the server API says no: an HTTP status and `{"error":{"code","reason"}}`, with the
//! protocol's error codes wherever one fits (`invalid_room`, `empty_message`, `publish_unknown`,
//! ...) and a few of its own for what only HTTP has (`body_too_large`, ...).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::broker::BrokerError;
use crate::protocol::{ErrorCode, Refusal};

/// Why an API call was refused or did not work.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Something the caller sent is invalid (400), as a client frame with it would be.
    #[error(transparent)]
    Invalid(#[from] Refusal),
    /// No key, or not the right one (401).
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    /// No API key is configured: the server API is off (404).
    #[error("the server API is off: the node has no API key (--api-key)")]
    Off,
    /// No such endpoint (404).
    #[error("no such endpoint; see /api/openapi.json")]
    NotFound,
    /// The endpoint does not take this method (405).
    #[error("this endpoint does not take this method; see /api/openapi.json")]
    MethodNotAllowed,
    /// The body is larger than the node reads (413).
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The body is not declared as JSON (415).
    #[error("the request body must be JSON: Content-Type: application/json")]
    UnsupportedMediaType,
    /// The body could not be read (400).
    #[error("the request body could not be read")]
    BodyUnreadable,
    /// The broker is unavailable: nothing was done (503).
    #[error("the broker is unavailable; nothing was done: {0}")]
    Unavailable(BrokerError),
    /// The message was not published: the broker is unavailable (503).
    #[error("the message was not sent: the broker is unavailable: {0}")]
    PublishFailed(BrokerError),
    /// The broker did not confirm the message in time: it may or may not have been stored and
    /// delivered (504). A retry with the same `cid` is safe.
    #[error(
        "the broker did not confirm the message in time: it may or may not have been sent; \
         retry with the same cid"
    )]
    PublishUnknown(BrokerError),
}

impl ApiError {
    /// A failed publish: unknown outcome or not sent, as the client path tells them apart.
    /// Logged here: the answer keeps the broker's words from the caller.
    pub fn publish(error: BrokerError) -> ApiError {
        tracing::warn!(%error, "publish through the server API failed");
        if error.outcome_unknown() {
            ApiError::PublishUnknown(error)
        } else {
            ApiError::PublishFailed(error)
        }
    }

    /// A read or a command the broker could not carry out (logged, as a publish is).
    pub fn unavailable(error: BrokerError) -> ApiError {
        tracing::warn!(%error, "server API call failed: the broker is unavailable");
        ApiError::Unavailable(error)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::BodyUnreadable => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Off | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) | ApiError::PublishFailed(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::PublishUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(refusal) => refusal.code.as_str(),
            ApiError::Unauthorized => ErrorCode::Unauthorized.as_str(),
            ApiError::Off | ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::BodyUnreadable => ErrorCode::InvalidJson.as_str(),
            ApiError::Unavailable(_) => ErrorCode::Unavailable.as_str(),
            ApiError::PublishFailed(_) => ErrorCode::PublishFailed.as_str(),
            ApiError::PublishUnknown(_) => ErrorCode::PublishUnknown.as_str(),
        }
    }

    /// The human-readable reason: what the caller can act on. Broker details stay in the
    /// node's log.
    fn reason(&self) -> String {
        match self {
            ApiError::Invalid(refusal) => refusal.reason.clone(),
            ApiError::Unavailable(_) => "the broker is unavailable; try again".to_owned(),
            ApiError::PublishFailed(_) => {
                "the message was not sent: the broker is unavailable; it may be retried".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The error as an object for a per-room result of a broadcast.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code(),
            reason: self.reason(),
        }
    }
}

/// The `error` object of a refusal.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub reason: String,
}

#[derive(Serialize)]
struct Envelope {
    error: ErrorBody,
}

/// An answer `{"error":{"code","reason"}}` with `status`: the one shape every JSON endpoint
/// refuses with (the server API, the SSE transport's POSTs).
pub fn error_response(
    status: StatusCode,
    code: &'static str,
    reason: impl Into<String>,
) -> Response {
    let error = ErrorBody {
        code,
        reason: reason.into(),
    };
    (status, Json(Envelope { error })).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = self.body();
        let mut response = error_response(status, body.code, body.reason);
        let headers = response.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
