//! The SSE fallback's two routes: `GET /sse` opens a session (the same parameters and the same
//! refusals as a WebSocket handshake; the answer is the event stream), and `POST /sse/send`
//! hands client frames to a session, on whichever node holds it. What each answers is in
//! `docs/protocol.md` (*SSE + POST*).

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracing::Instrument;

use super::api::{error_response, read_object};
use super::{AppState, ConnectParams, admit, connect};
use crate::connection::TransportKind;
use crate::protocol::{ErrorCode, Offset};
use crate::security::gate::Handshake;
use crate::transport::listener::ConnectionAbort;
use crate::transport::sse::{EventStream, MAX_FRAMES_PER_POST, Outcome, session};

/// Opens an SSE session: the gate's checks, then the stream, which starts with the `userId`
/// frame and its session token. A `Last-Event-ID` (what an EventSource sends when it
/// reconnects by itself) resumes the default room as `since`/`epoch` would; `since` wins.
pub async fn open(
    State(state): State<Arc<AppState>>,
    Query(mut params): Query<ConnectParams>,
    handshake: Handshake,
    headers: HeaderMap,
    abort: Option<Extension<ConnectionAbort>>,
) -> Response {
    if params.since.is_none()
        && let Some(last) = headers.get("last-event-id")
    {
        match resume_point(last) {
            Ok(Some((epoch, offset))) => {
                params.since = Some(offset);
                params.epoch = Some(epoch);
            }
            Ok(None) => {}
            Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
        }
    }
    let admission = match admit(&state, &handshake) {
        Ok(admission) => admission,
        Err(refused) => return refused.into_response(),
    };
    let (token, registration) = match state.relay.open() {
        Ok(opened) => opened,
        Err(error) => {
            tracing::error!(%error, "could not open an SSE session");
            return (StatusCode::SERVICE_UNAVAILABLE, "could not open a session").into_response();
        }
    };
    let transport = TransportKind::Sse { session: token };
    let (identity, guard) = match connect(&state, params, admission, transport) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let stream = EventStream::new(identity.default_room.clone());
    let body = Body::from_stream(stream.body());
    let abort = move || {
        if let Some(Extension(abort)) = abort {
            abort.abort();
        }
    };
    let session = session::serve(
        stream,
        registration,
        identity,
        state.node.clone(),
        guard,
        state.meters.clone(),
        abort,
    );
    state.sessions.spawn(session.in_current_span());
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Tells nginx (and proxies that honour it) not to buffer this response, whatever its
    // configuration says.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Reads a `Last-Event-ID`: `<epoch>:<offset>` as the stream's ids are; an empty one means
/// none.
fn resume_point(value: &HeaderValue) -> Result<Option<(String, String)>, &'static str> {
    const INVALID: &str = "invalid Last-Event-ID: expected <epoch>:<offset> as the stream sent it";
    let text = value.to_str().map_err(|_| INVALID)?.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let (epoch, offset) = text.split_once(':').ok_or(INVALID)?;
    if epoch.is_empty() || Offset::parse(offset).is_none() {
        return Err(INVALID);
    }
    Ok(Some((epoch.to_owned(), offset.to_owned())))
}

/// Hands a POST's frames to the session its token names, on whichever node that is.
pub async fn send(
    State(state): State<Arc<AppState>>,
    handshake: Handshake,
    request: Request,
) -> Response {
    if !state.gate.allows_origin(&handshake) {
        return error_response(StatusCode::FORBIDDEN, "forbidden", "origin not allowed");
    }
    let body = match read_object(request, &(), state.max_post_bytes).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let (session, frames) = match post_body(&body) {
        Ok(read) => read,
        Err(reason) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidFrame.as_str(),
                reason,
            );
        }
    };
    match state.relay.post(session, frames).await {
        Outcome::Accepted(accepted) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "accepted": accepted })),
        )
            .into_response(),
        Outcome::Forbidden => error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the session token is not valid",
        ),
        Outcome::UnknownSession => error_response(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "no such session: its stream has ended or its node is gone; reconnect",
        ),
        Outcome::Busy => retry_shortly(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many frames are waiting for this session; retry shortly",
        ),
        Outcome::Unavailable => retry_shortly(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the session's node could not be reached; retry shortly",
        ),
    }
}

/// A refusal the client should retry in a second, with the same frames.
fn retry_shortly(status: StatusCode, code: ErrorCode, reason: &'static str) -> Response {
    let mut response = error_response(status, code.as_str(), reason);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The session token and the frames (each as JSON text) of a POST body.
fn post_body(body: &serde_json::Map<String, Value>) -> Result<(&str, Vec<String>), String> {
    let Some(Value::String(session)) = body.get("session") else {
        return Err("field `session` must be the session token from the userId frame".into());
    };
    let frames = match body.get("frames") {
        Some(Value::Array(frames)) if (1..=MAX_FRAMES_PER_POST).contains(&frames.len()) => frames,
        _ => {
            return Err(format!(
                "field `frames` must be an array of 1-{MAX_FRAMES_PER_POST} client frames"
            ));
        }
    };
    if !frames.iter().all(Value::is_object) {
        return Err("every one of `frames` must be a JSON object (a client frame)".into());
    }
    Ok((session, frames.iter().map(Value::to_string).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_post_body_names_a_session_and_1_to_32_frames() {
        let body = |value: Value| value.as_object().unwrap().clone();
        let good = body(json!({"session":"s1.x","frames":[{"type":"ping"},{"message":"hi"}]}));
        let (session, frames) = post_body(&good).unwrap();
        assert_eq!(session, "s1.x");
        assert_eq!(frames, [r#"{"type":"ping"}"#, r#"{"message":"hi"}"#]);
        let too_many: Vec<Value> = (0..33).map(|_| json!({"type":"ping"})).collect();
        for bad in [
            json!({"frames":[{"type":"ping"}]}),
            json!({"session":7,"frames":[{"type":"ping"}]}),
            json!({"session":"s","frames":[]}),
            json!({"session":"s","frames":"ping"}),
            json!({"session":"s","frames":[1]}),
            json!({"session":"s","frames":too_many}),
        ] {
            assert!(post_body(&body(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_last_event_id_is_the_place_the_stream_gave() {
        let read = |text: &'static str| resume_point(&HeaderValue::from_static(text));
        assert_eq!(
            read("3f9c2a71b0de:1732532000125-0"),
            Ok(Some(("3f9c2a71b0de".into(), "1732532000125-0".into())))
        );
        assert_eq!(read(""), Ok(None));
        for bad in ["nocolon", ":1-0", "ep:x-1"] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}
