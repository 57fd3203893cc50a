//! What the server API reads from a request: a JSON object body (declared as JSON, within the
//! size limit) and its fields, each checked exactly as the same field of a client frame is
//! (room names, chat text, display names, `cid`), so the API and WebSocket clients refuse the
//! same input with the same error code.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde_json::{Map, Value};

use super::ApiState;
use super::error::ApiError;
use crate::protocol::{
    ClientId, ErrorCode, Refusal, RoomName, chat_text, is_label, validate_display_name,
};
use crate::security::auth::MAX_SUBJECT_CHARS;

/// The JSON object a request carried.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<ApiState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        read_object(request, state, state.settings.max_body_bytes)
            .await
            .map(JsonObject)
    }
}

/// Reads a request's body as one JSON object: declared as JSON (415 otherwise), at most `limit`
/// bytes (413; the route's `DefaultBodyLimit` enforces it), valid JSON (400). Shared by every
/// JSON endpoint, so each refuses the same body the same way.
pub async fn read_object<S: Send + Sync>(
    request: Request,
    state: &S,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    if !declared_json(&request) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge(limit)
            } else {
                ApiError::BodyUnreadable
            }
        })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(invalid(
            ErrorCode::InvalidJson,
            "the body must be a JSON object",
        )),
        Err(error) => Err(invalid(
            ErrorCode::InvalidJson,
            format!("the body is not valid JSON: {error}"),
        )),
    }
}

/// Whether the request says its body is JSON (`application/json`, parameters allowed).
fn declared_json(request: &Request) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

fn invalid(code: ErrorCode, reason: impl Into<String>) -> ApiError {
    ApiError::Invalid(Refusal::new(code, reason))
}

fn invalid_field(reason: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::InvalidFrame, reason)
}

impl JsonObject {
    /// A field that must be a string when present; `null` counts as absent, as in client frames.
    pub fn optional_str(&self, field: &str) -> Result<Option<&str>, Refusal> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(invalid_field(format!("field `{field}` must be a string"))),
        }
    }

    /// A field that must be present and a string.
    pub fn required_str(&self, field: &str) -> Result<&str, Refusal> {
        self.optional_str(field)?
            .ok_or_else(|| invalid_field(format!("field `{field}` is missing")))
    }

    /// `room`: a room name.
    pub fn room(&self) -> Result<RoomName, Refusal> {
        RoomName::parse(self.required_str("room")?)
    }

    /// `rooms`: 1 to `max` distinct room names.
    pub fn rooms(&self, max: usize) -> Result<Vec<RoomName>, Refusal> {
        let rooms = match self.0.get("rooms") {
            Some(Value::Array(rooms)) => rooms,
            Some(_) => {
                return Err(invalid_field(
                    "field `rooms` must be an array of room names",
                ));
            }
            None => return Err(invalid_field("field `rooms` is missing")),
        };
        if rooms.is_empty() {
            return Err(invalid_field("field `rooms` must name at least one room"));
        }
        if rooms.len() > max {
            return Err(Refusal::new(
                ErrorCode::TooManyRooms,
                format!("a broadcast may name at most {max} rooms"),
            ));
        }
        let mut parsed: Vec<RoomName> = Vec::with_capacity(rooms.len());
        for room in rooms {
            let Value::String(room) = room else {
                return Err(invalid_field(
                    "field `rooms` must be an array of room names",
                ));
            };
            let room = RoomName::parse(room)?;
            if parsed.contains(&room) {
                return Err(invalid_field(format!("room `{room}` is named twice")));
            }
            parsed.push(room);
        }
        Ok(parsed)
    }

    /// `message`: chat text, as for a client's `message` frame.
    pub fn message(&mut self, max_chat_bytes: usize) -> Result<String, Refusal> {
        chat_text(&mut self.0, max_chat_bytes)
    }

    /// `userId` when present: 1 to 128 characters without control characters, as a token's
    /// `sub` must be.
    pub fn user_id(&self) -> Result<Option<String>, Refusal> {
        self.label("userId", MAX_SUBJECT_CHARS)
    }

    /// `userId`, which must be there.
    pub fn required_user_id(&self) -> Result<String, Refusal> {
        self.user_id()?
            .ok_or_else(|| invalid_field("field `userId` is missing"))
    }

    /// `name`: a display name, when present.
    pub fn name(&self) -> Result<Option<String>, Refusal> {
        let Some(name) = self.optional_str("name")? else {
            return Ok(None);
        };
        validate_display_name(name)?;
        Ok(Some(name.to_owned()))
    }

    /// `cid`: a client message id, when present.
    pub fn cid(&self) -> Result<Option<ClientId>, Refusal> {
        self.optional_str("cid")?.map(ClientId::parse).transpose()
    }

    /// `reason` of a disconnect, when present: 1 to 128 characters without control characters.
    pub fn reason(&self) -> Result<Option<String>, Refusal> {
        self.label("reason", MAX_REASON_CHARS)
    }

    /// A field that, when present, is 1 to `max_chars` characters without control characters.
    fn label(&self, field: &str, max_chars: usize) -> Result<Option<String>, Refusal> {
        let Some(text) = self.optional_str(field)? else {
            return Ok(None);
        };
        if !is_label(text, max_chars) {
            return Err(invalid_field(format!(
                "field `{field}` must be 1-{max_chars} characters without control characters"
            )));
        }
        Ok(Some(text.to_owned()))
    }
}

/// Longest `reason` of a disconnect, in characters.
pub const MAX_REASON_CHARS: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> JsonObject {
        match value {
            Value::Object(object) => JsonObject(object),
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn fields_are_checked_as_in_client_frames() {
        let mut body = object(json!({"room":"lobby","message":"hi","cid":"c-1","name":null}));
        assert_eq!(body.room().unwrap().as_str(), "lobby");
        assert_eq!(body.message(10).unwrap(), "hi");
        assert_eq!(body.cid().unwrap().unwrap().as_str(), "c-1");
        assert_eq!(body.name().unwrap(), None);
        assert_eq!(body.user_id().unwrap(), None);

        let code = |result: Result<(), Refusal>| result.unwrap_err().code;
        let bad = object(json!({"room":"no spaces","userId":"","cid":"x y","name":7}));
        assert_eq!(code(bad.room().map(drop)), ErrorCode::InvalidRoom);
        assert_eq!(code(bad.user_id().map(drop)), ErrorCode::InvalidFrame);
        assert_eq!(code(bad.cid().map(drop)), ErrorCode::InvalidFrame);
        assert_eq!(code(bad.name().map(drop)), ErrorCode::InvalidFrame);
        assert_eq!(
            code(object(json!({"message":"  "})).message(10).map(drop)),
            ErrorCode::EmptyMessage
        );
        assert_eq!(
            code(
                object(json!({"message":"too long!!!"}))
                    .message(10)
                    .map(drop)
            ),
            ErrorCode::MessageTooLarge
        );
        assert_eq!(
            code(object(json!({})).room().map(drop)),
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn broadcast_rooms_are_bounded_distinct_and_valid() {
        let rooms = |value: Value| object(json!({ "rooms": value })).rooms(2);
        assert_eq!(rooms(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(
            rooms(json!(["a", "b", "c"])).unwrap_err().code,
            ErrorCode::TooManyRooms
        );
        assert_eq!(
            rooms(json!(["a", "a"])).unwrap_err().code,
            ErrorCode::InvalidFrame
        );
        assert_eq!(rooms(json!([])).unwrap_err().code, ErrorCode::InvalidFrame);
        assert_eq!(
            rooms(json!(["a b"])).unwrap_err().code,
            ErrorCode::InvalidRoom
        );
        assert_eq!(rooms(json!("a")).unwrap_err().code, ErrorCode::InvalidFrame);
    }
}
