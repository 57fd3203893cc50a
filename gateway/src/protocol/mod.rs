//! The wire protocol: what clients may send, what the server sends back, and the close and
//! error codes. Pure data and validation: nothing here knows about sockets or brokers.
//!
//! `docs/protocol.md` is the user-facing description of everything in this module.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

pub mod close;

/// Protocol version announced in the `userId` frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 64;

/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;

/// Longest `ref`, as serialized JSON: it is echoed in every reply, so its size multiplies.
pub const MAX_REF_BYTES: usize = 128;

/// Longest client message id (`cid`), in bytes.
pub const MAX_CID_BYTES: usize = 64;

/// Machine-readable error codes carried in `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame is not a JSON object.
    InvalidJson,
    /// A field is missing or has the wrong type.
    InvalidFrame,
    /// `type` names no client frame.
    UnknownType,
    /// A binary frame was sent.
    BinaryUnsupported,
    /// The room name is empty, too long or has forbidden characters.
    InvalidRoom,
    /// Joining would exceed the per-connection room limit.
    TooManyRooms,
    /// The connection is not a member of the room it named.
    NotInRoom,
    /// The chat message is empty.
    EmptyMessage,
    /// The chat message is longer than the configured limit.
    MessageTooLarge,
    /// The broker did not accept the message; it was not sent.
    PublishFailed,
    /// The broker did not confirm in time: the message may or may not have been stored.
    PublishUnknown,
    /// The broker is unavailable for a join or a presence query; try again.
    Unavailable,
    /// An unexpected server-side failure.
    Internal,
    /// The token does not allow this room or sending messages.
    Forbidden,
    /// Over the message rate limit; the frame was dropped.
    RateLimited,
    /// An `auth` frame with a token that was refused (or authentication is off).
    Unauthorized,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidFrame,
        ErrorCode::UnknownType,
        ErrorCode::BinaryUnsupported,
        ErrorCode::InvalidRoom,
        ErrorCode::TooManyRooms,
        ErrorCode::NotInRoom,
        ErrorCode::EmptyMessage,
        ErrorCode::MessageTooLarge,
        ErrorCode::PublishFailed,
        ErrorCode::PublishUnknown,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unauthorized,
    ];

    /// The code as it appears on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::EmptyMessage => "empty_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::PublishFailed => "publish_failed",
            ErrorCode::PublishUnknown => "publish_unknown",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

/// A refusal to send back to the client as an `error` frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {reason}")]
pub struct Refusal {
    /// What kind of problem it is.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub reason: String,
    /// The client's `ref`, echoed back.
    pub reference: Option<Value>,
}

impl Refusal {
    /// A refusal with no `ref` attached yet.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
            reference: None,
        }
    }

    /// Attaches the client's `ref` so the error frame can echo it.
    pub fn with_ref(mut self, reference: Option<Value>) -> Self {
        self.reference = reference;
        self
    }
}

/// A validated room name: 1 to 64 bytes of `A-Z a-z 0-9 _ - . :`.
///
/// Cheap to clone, because every member, message and subscription names its room.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` as a room name.
    pub fn parse(name: &str) -> Result<Self, Refusal> {
        if name.is_empty() || name.len() > MAX_ROOM_NAME_BYTES || !name.bytes().all(name_byte) {
            return Err(Refusal::new(
                ErrorCode::InvalidRoom,
                format!(
                    "room name must be 1-{MAX_ROOM_NAME_BYTES} characters of A-Z a-z 0-9 _ - . :"
                ),
            ));
        }
        Ok(RoomName(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomName({:?})", &*self.0)
    }
}

impl Serialize for RoomName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A client's own id for a chat message (`cid`): 1 to 64 bytes of `A-Z a-z 0-9 _ - . :`.
/// The same `cid` from the same user in the same room is stored at most once, so a client may
/// retry a message whose outcome it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Validates `cid`.
    pub fn parse(cid: &str) -> Result<Self, Refusal> {
        if cid.is_empty() || cid.len() > MAX_CID_BYTES || !cid.bytes().all(name_byte) {
            return Err(Refusal::new(
                ErrorCode::InvalidFrame,
                format!("field `cid` must be 1-{MAX_CID_BYTES} characters of A-Z a-z 0-9 _ - . :"),
            ));
        }
        Ok(ClientId(cid.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The bytes allowed in room names and client message ids.
fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// Whether `text` is 1 to `max_chars` characters without control characters: the rule for
/// display names, user ids and what else is shown to people as a line of text.
pub fn is_label(text: &str, max_chars: usize) -> bool {
    let chars = text.chars().count();
    (1..=max_chars).contains(&chars) && !text.chars().any(char::is_control)
}

/// Validates a display name: 1 to 64 characters, no control characters.
pub fn validate_display_name(name: &str) -> Result<(), Refusal> {
    if !is_label(name, MAX_DISPLAY_NAME_CHARS) {
        return Err(Refusal::new(
            ErrorCode::InvalidFrame,
            format!(
                "name must be 1-{MAX_DISPLAY_NAME_CHARS} characters without control characters"
            ),
        ));
    }
    Ok(())
}

/// A frame a client sent, parsed and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{"message": "..."}` with no `type`: a chat message to the default room, not acknowledged.
    Seed {
        /// The chat text.
        message: String,
    },
    /// `{"type":"join","room":R}`.
    Join {
        /// The room to join.
        room: RoomName,
        /// History to replay and presence events wanted.
        options: JoinOptions,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"presence","room":R}`: who is online in a room, across the cluster.
    Presence {
        /// The room asked about.
        room: RoomName,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"leave","room":R}`.
    Leave {
        /// The room to leave.
        room: RoomName,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"message","room":R,"message":"..."}`; `room` absent means the default room.
    Message {
        /// The target room, if named.
        room: Option<RoomName>,
        /// The chat text.
        message: String,
        /// The client's own id for the message, which makes retries safe.
        cid: Option<ClientId>,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"history","room":R,"limit":N}`: a page of a room's stored messages, the newest
    /// `limit` or (with `since`) those after an offset, answered with a `history` frame.
    History {
        /// The room asked about.
        room: RoomName,
        /// What to read: `Replay::Last(limit)` or `Replay::Since`.
        replay: Replay,
        /// Most messages in the answer.
        limit: usize,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"auth","token":T}`: replaces the connection's token before it expires.
    Auth {
        /// The new token.
        token: String,
        /// Echoed in the reply.
        reference: Option<Value>,
    },
    /// `{"type":"ping"}`: an application-level ping.
    Ping {
        /// Echoed in the reply.
        reference: Option<Value>,
    },
}

/// Parses one text frame from a client. `max_chat_bytes` bounds the chat text.
///
/// Never panics, whatever the input: every problem becomes a [`Refusal`] that echoes the
/// frame's `ref` when the frame got far enough to have one.
pub fn parse_client_frame(text: &str, max_chat_bytes: usize) -> Result<ClientFrame, Refusal> {
    let mut object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidJson,
                "frame must be a JSON object",
            ));
        }
        Err(error) => {
            return Err(Refusal::new(
                ErrorCode::InvalidJson,
                format!("frame is not valid JSON: {error}"),
            ));
        }
    };
    let reference = object.remove("ref");
    if let Some(reference) = &reference
        && json_len(reference) > MAX_REF_BYTES
    {
        // Not echoed: bounding what every reply carries is the point.
        return Err(Refusal::new(
            ErrorCode::InvalidFrame,
            format!("field `ref` must be at most {MAX_REF_BYTES} bytes of JSON"),
        ));
    }
    parse_object(&mut object, &reference, max_chat_bytes)
        .map_err(|refusal| refusal.with_ref(reference))
}

/// The length of a value serialized as JSON, without building the text.
pub fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn parse_object(
    object: &mut Map<String, Value>,
    reference: &Option<Value>,
    max_chat_bytes: usize,
) -> Result<ClientFrame, Refusal> {
    let reference = reference.clone();
    let kind = match object.get("type") {
        None => {
            return Ok(ClientFrame::Seed {
                message: chat_text(object, max_chat_bytes)?,
            });
        }
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidFrame,
                "field `type` must be a string",
            ));
        }
    };
    match kind {
        "join" => Ok(ClientFrame::Join {
            room: room_field(object)?,
            options: join_options(object)?,
            reference,
        }),
        "presence" => Ok(ClientFrame::Presence {
            room: room_field(object)?,
            reference,
        }),
        "leave" => Ok(ClientFrame::Leave {
            room: room_field(object)?,
            reference,
        }),
        "message" => {
            let room = match object.get("room") {
                None | Some(Value::Null) => None,
                Some(_) => Some(room_field(object)?),
            };
            let cid = match object.get("cid") {
                None | Some(Value::Null) => None,
                Some(Value::String(cid)) => Some(ClientId::parse(cid)?),
                Some(_) => {
                    return Err(Refusal::new(
                        ErrorCode::InvalidFrame,
                        "field `cid` must be a string",
                    ));
                }
            };
            Ok(ClientFrame::Message {
                room,
                message: chat_text(object, max_chat_bytes)?,
                cid,
                reference,
            })
        }
        "ping" => Ok(ClientFrame::Ping { reference }),
        "history" => history_request(object, reference),
        "auth" => match object.remove("token") {
            Some(Value::String(token)) if !token.is_empty() => {
                Ok(ClientFrame::Auth { token, reference })
            }
            _ => Err(Refusal::new(
                ErrorCode::InvalidFrame,
                "field `token` must be a non-empty string",
            )),
        },
        other => Err(Refusal::new(
            ErrorCode::UnknownType,
            format!("unknown frame type `{}`", truncate_for_reason(other)),
        )),
    }
}

fn join_options(object: &Map<String, Value>) -> Result<JoinOptions, Refusal> {
    let invalid = |reason: &str| Refusal::new(ErrorCode::InvalidFrame, reason);
    let epoch = match object.get("epoch") {
        None | Some(Value::Null) => None,
        Some(Value::String(epoch)) => Some(epoch.clone()),
        Some(_) => return Err(invalid("field `epoch` must be a string")),
    };
    let replay = match (object.get("since"), object.get("last")) {
        (Some(_), Some(_)) => return Err(invalid("`since` and `last` cannot be combined")),
        (Some(since), None) => Replay::Since {
            offset: parse_since(since)?,
            epoch,
        },
        (None, Some(last)) => match last.as_u64() {
            Some(count) if (1..=MAX_REPLAY_LAST as u64).contains(&count) => {
                Replay::Last(count as usize)
            }
            _ => {
                return Err(invalid(&format!(
                    "field `last` must be an integer from 1 to {MAX_REPLAY_LAST}"
                )));
            }
        },
        (None, None) => Replay::None,
    };
    let presence = match object.get("presence") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(presence)) => *presence,
        Some(_) => return Err(invalid("field `presence` must be a boolean")),
    };
    Ok(JoinOptions { replay, presence })
}

/// Messages a `history` frame gets when it names no `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;

/// A `history` frame: `room`, `limit` (1-1000, default 100), and optionally `since` with
/// `epoch`.
fn history_request(
    object: &Map<String, Value>,
    reference: Option<Value>,
) -> Result<ClientFrame, Refusal> {
    let room = room_field(object)?;
    let limit = match object.get("limit") {
        None | Some(Value::Null) => DEFAULT_HISTORY_LIMIT,
        Some(limit) => match limit.as_u64() {
            Some(limit) if (1..=MAX_REPLAY_LAST as u64).contains(&limit) => limit as usize,
            _ => {
                return Err(Refusal::new(
                    ErrorCode::InvalidFrame,
                    format!("field `limit` must be an integer from 1 to {MAX_REPLAY_LAST}"),
                ));
            }
        },
    };
    let epoch = match object.get("epoch") {
        None | Some(Value::Null) => None,
        Some(Value::String(epoch)) => Some(epoch.clone()),
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidFrame,
                "field `epoch` must be a string",
            ));
        }
    };
    let replay = match object.get("since") {
        None | Some(Value::Null) => Replay::Last(limit),
        Some(since) => Replay::Since {
            offset: parse_since(since)?,
            epoch,
        },
    };
    Ok(ClientFrame::History {
        room,
        replay,
        limit,
        reference,
    })
}

/// Parses a `since` value: an offset string such as `"1732532000123-0"`.
pub fn parse_since(since: &Value) -> Result<Offset, Refusal> {
    since.as_str().and_then(Offset::parse).ok_or_else(|| {
        Refusal::new(
            ErrorCode::InvalidFrame,
            "field `since` must be an offset such as \"1732532000123-0\"",
        )
    })
}

fn room_field(object: &Map<String, Value>) -> Result<RoomName, Refusal> {
    match object.get("room") {
        Some(Value::String(room)) => RoomName::parse(room),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidFrame,
            "field `room` must be a string",
        )),
        None => Err(Refusal::new(
            ErrorCode::InvalidFrame,
            "field `room` is missing",
        )),
    }
}

/// Takes the chat text out of a frame's `message` field: a string, not only whitespace, at
/// most `max_chat_bytes` long. Shared by every way a message comes in (client frames, the
/// server API), so each refuses the same text with the same code.
pub fn chat_text(
    object: &mut Map<String, Value>,
    max_chat_bytes: usize,
) -> Result<String, Refusal> {
    match object.remove("message") {
        Some(Value::String(text)) if text.trim().is_empty() => Err(Refusal::new(
            ErrorCode::EmptyMessage,
            "field `message` is empty",
        )),
        Some(Value::String(text)) if text.len() > max_chat_bytes => Err(Refusal::new(
            ErrorCode::MessageTooLarge,
            format!(
                "message is {} bytes; the limit is {max_chat_bytes}",
                text.len()
            ),
        )),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidFrame,
            "field `message` must be a string",
        )),
        None => Err(Refusal::new(
            ErrorCode::InvalidFrame,
            "field `message` is missing",
        )),
    }
}

/// Keeps client-chosen text in a reason short, on a character boundary.
fn truncate_for_reason(text: &str) -> &str {
    const MAX: usize = 32;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

/// Most messages a join may ask for with `last`.
pub const MAX_REPLAY_LAST: usize = 1000;

/// A position in a room's history, `<ms>-<seq>` like a Redis stream id. Offsets of one room
/// increase with every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl Offset {
    /// The offset before any message.
    pub const ZERO: Offset = Offset { ms: 0, seq: 0 };

    /// Parses `<ms>-<seq>` (or a bare `<ms>`, meaning sequence 0).
    pub fn parse(text: &str) -> Option<Offset> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(Offset {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Which history a join replays before live messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Nothing: live messages only.
    None,
    /// Everything after `offset`, if `epoch` (when given) is still the room's history.
    Since {
        /// The last offset the client saw.
        offset: Offset,
        /// The epoch that offset belongs to.
        epoch: Option<String>,
    },
    /// The last N messages.
    Last(usize),
}

/// What a join asks for besides membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOptions {
    /// History to replay.
    pub replay: Replay,
    /// Whether to receive `presence_event` frames for the room.
    pub presence: bool,
}

impl JoinOptions {
    /// A plain join: no replay, no presence events.
    pub const PLAIN: JoinOptions = JoinOptions {
        replay: Replay::None,
        presence: false,
    };
}

/// Adds `offset` and `epoch` to a serialized chat message (a JSON object). Done once per node
/// per message: the offset is only known after the broker stored the message.
pub fn with_offset(frame: &str, offset: Offset, epoch: Epoch) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let separator = if body.ends_with('{') { "" } else { "," };
    format!(r#"{body}{separator}"offset":"{offset}","epoch":"{epoch}"}}"#)
}

/// Longest history epoch, in bytes.
pub const MAX_EPOCH_BYTES: usize = 32;

/// The name of one room history: a fresh random one whenever a history starts (first message,
/// expiry, or Redis lost its data), so an offset from another history is never taken for one
/// of this history. Alphanumeric, so it is spliced into JSON unescaped; stored inline, because
/// every delivered message carries one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    len: u8,
    bytes: [u8; MAX_EPOCH_BYTES],
}

impl Epoch {
    /// Validates an epoch: 1 to 32 ASCII letters and digits.
    pub fn parse(text: &str) -> Option<Epoch> {
        let valid = !text.is_empty()
            && text.len() <= MAX_EPOCH_BYTES
            && text.bytes().all(|b| b.is_ascii_alphanumeric());
        if !valid {
            return None;
        }
        let mut bytes = [0; MAX_EPOCH_BYTES];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Some(Epoch {
            len: text.len() as u8,
            bytes,
        })
    }

    /// A fresh random epoch.
    pub fn random() -> Epoch {
        let random = uuid::Uuid::new_v4().simple().to_string();
        Epoch::parse(&random[..12]).unwrap_or(Epoch {
            len: 0,
            bytes: [0; MAX_EPOCH_BYTES],
        })
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII alphanumerics are ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.as_str())
    }
}

impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A chat message's place in its room's history: its offset within one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The offset within the history.
    pub offset: Offset,
    /// The history it belongs to.
    pub epoch: Epoch,
}

/// The JSON text of one server frame, shared: a room's message is serialized once per node and
/// the same bytes go to every member. Made only from `String`s, so always UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameText(bytes::Bytes);

impl FrameText {
    /// The text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text (validated again: for the rare reader that needs a `str`).
    pub fn to_text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl From<String> for FrameText {
    fn from(text: String) -> Self {
        FrameText(bytes::Bytes::from(text))
    }
}

impl From<&'static str> for FrameText {
    fn from(text: &'static str) -> Self {
        FrameText(bytes::Bytes::from_static(text.as_bytes()))
    }
}

impl AsRef<[u8]> for FrameText {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for FrameText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameText({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// A frame for the members of one room, as the broker hands it over.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// A chat message with its place in the history, or a presence event.
    pub kind: DeliveryKind,
    /// The frame exactly as clients receive it.
    pub frame: FrameText,
    /// The publishing node's clock when it published, in µs since the Unix epoch.
    pub published_at_micros: u64,
}

/// The two kinds of room traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// A chat message stored in the room's history at this position.
    Chat(Position),
    /// A presence event (`presence_event` frame), not part of the history.
    Presence,
}

/// One user online in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresentUser {
    /// The user's id.
    #[serde(rename = "userId")]
    pub user_id: String,
    /// Display name, if the user set one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A user came online in a room or left it (all their connections closed or their node died).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "presence_event")]
pub struct PresenceEvent<'a> {
    /// The room.
    pub room: &'a str,
    /// `join` or `leave`.
    pub event: &'a str,
    /// The user's id.
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    /// Display name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
}

/// A chat message as every member of its room receives it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "message")]
pub struct ChatMessage<'a> {
    /// The room it was sent to.
    pub room: &'a RoomName,
    /// UUIDv7: unique across the cluster, sortable by time.
    pub id: uuid::Uuid,
    /// The sender's user id.
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    /// The sender's display name, if it set one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// The chat text.
    pub message: &'a str,
    /// The sending node's clock, Unix milliseconds.
    pub ts: u64,
}

/// Every frame the server sends, other than chat messages.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum ServerFrame<'a> {
    /// The first frame of every connection.
    #[serde(rename = "userId")]
    Welcome {
        /// The user id this connection sends as.
        #[serde(rename = "userId")]
        user_id: &'a str,
        /// The node holding the connection.
        node: &'a str,
        /// The connection's default room.
        room: &'a RoomName,
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
        /// `websocket` or `sse`.
        transport: &'a str,
        /// SSE only: the token the client's POSTs carry.
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
        /// Anonymous mode only: handed back as `reconnect=` to keep this `userId`.
        #[serde(rename = "reconnectToken", skip_serializing_if = "Option::is_none")]
        reconnect_token: Option<&'a str>,
    },
    /// Reply to `join`.
    #[serde(rename = "joined")]
    Joined {
        /// The room joined.
        room: &'a RoomName,
        /// For a join with `since`: whether every missed message follows.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The room history's epoch, when replay was asked for.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// Reply to `leave`, or the news that the application removed the connection from a room.
    #[serde(rename = "left")]
    Left {
        /// The room left.
        room: &'a RoomName,
        /// The application removed the user from the room (`POST /api/rooms/{room}/kick`); the
        /// client did not ask.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        kicked: bool,
        /// Said when kicked, for a client that shows `message` of every frame.
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// The application is closing the connection (`POST /api/disconnect` with a reason); the
    /// close (4004) follows.
    #[serde(rename = "disconnect")]
    Disconnect {
        /// The close code that follows.
        code: u16,
        /// The application's words.
        reason: &'a str,
        /// The same words, for a client that shows `message` of every frame.
        message: &'a str,
    },
    /// Reply to `message` once the broker stored it.
    #[serde(rename = "ack")]
    Ack {
        /// The room it was sent to.
        room: &'a RoomName,
        /// The message id.
        id: uuid::Uuid,
        /// Its position in the room's history.
        #[serde(serialize_with = "display")]
        offset: Offset,
        /// The history's epoch.
        epoch: Epoch,
        /// The client's message id, echoed.
        #[serde(skip_serializing_if = "Option::is_none")]
        cid: Option<&'a str>,
        /// A retry of a `cid` already stored: this is the original message's ack.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// Reply to `presence`.
    #[serde(rename = "presence")]
    Presence {
        /// The room asked about.
        room: &'a RoomName,
        /// Everyone online in it, once each however many connections they have.
        users: &'a [PresentUser],
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// Reply to `history`.
    #[serde(rename = "history")]
    History {
        /// The room asked about.
        room: &'a RoomName,
        /// The history's epoch; `null` when the room has no history.
        epoch: Option<Epoch>,
        /// For a request with `since`: whether nothing after it is missing.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The messages, oldest first, as members received them.
        messages: &'a [&'a serde_json::value::RawValue],
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// The last event of an SSE stream the server ends: the close code (and its class) a
    /// WebSocket would have had in its close frame.
    #[serde(rename = "close")]
    Close {
        /// The close code (`protocol::close`).
        code: u16,
        /// Its short reason.
        reason: &'a str,
    },
    /// Reply to `ping`.
    #[serde(rename = "pong")]
    Pong {
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    /// A refusal.
    #[serde(rename = "error")]
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        reason: &'a str,
        /// The same text again: a client that shows `message` of every frame (the seed's)
        /// shows it rather than a blank line.
        message: &'a str,
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
}

impl<'a> From<&'a Refusal> for ServerFrame<'a> {
    fn from(refusal: &'a Refusal) -> Self {
        ServerFrame::Error {
            code: refusal.code,
            reason: &refusal.reason,
            message: &refusal.reason,
            reference: refusal.reference.as_ref(),
        }
    }
}

fn display<T: fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Serializes a frame to JSON text. Serializing these types cannot fail: they hold only
/// strings, numbers and JSON values.
pub fn to_json<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).unwrap_or_else(|error| {
        tracing::error!(%error, "server frame failed to serialize");
        r#"{"type":"error","code":"internal","reason":"serialization failed"}"#.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_error_code_is_listed_once_under_its_wire_name() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    fn parse(text: &str) -> Result<ClientFrame, Refusal> {
        parse_client_frame(text, 16)
    }

    #[test]
    fn seed_frames_parse_with_or_without_user_id() {
        assert_eq!(
            parse(r#"{"message":"hi"}"#),
            Ok(ClientFrame::Seed {
                message: "hi".into()
            })
        );
        assert_eq!(
            parse(r#"{"userId":"u-1","message":"hi"}"#),
            Ok(ClientFrame::Seed {
                message: "hi".into()
            })
        );
    }

    #[test]
    fn typed_frames_carry_their_ref() {
        let frame = parse(r#"{"type":"join","room":"news","ref":7}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::Join {
                room: RoomName::parse("news").unwrap(),
                options: JoinOptions::PLAIN,
                reference: Some(json!(7))
            }
        );
        let frame = parse(r#"{"type":"message","message":"x","ref":"a"}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::Message {
                room: None,
                message: "x".into(),
                cid: None,
                reference: Some(json!("a"))
            }
        );
    }

    #[test]
    fn a_message_may_carry_a_client_id_of_the_documented_shape() {
        let Ok(ClientFrame::Message { cid, .. }) =
            parse(r#"{"type":"message","message":"x","cid":"0192f1c4-5d7a:a_b.c"}"#)
        else {
            panic!("message parses")
        };
        assert_eq!(
            cid.map(|cid| cid.as_str().to_owned()),
            Some("0192f1c4-5d7a:a_b.c".into())
        );
        let too_long = format!(
            r#"{{"type":"message","message":"x","cid":"{}","ref":1}}"#,
            "c".repeat(65)
        );
        for bad in [
            r#"{"type":"message","message":"x","cid":"","ref":1}"#,
            r#"{"type":"message","message":"x","cid":"a b","ref":1}"#,
            r#"{"type":"message","message":"x","cid":7,"ref":1}"#,
            too_long.as_str(),
        ] {
            let refusal = parse(bad).expect_err(bad);
            assert_eq!(
                (refusal.code, refusal.reference),
                (ErrorCode::InvalidFrame, Some(json!(1))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_large_ref_is_refused_without_being_echoed() {
        let fits = format!(
            r#"{{"type":"ping","ref":"{}"}}"#,
            "r".repeat(MAX_REF_BYTES - 2)
        );
        assert!(parse(&fits).is_ok());
        let large = format!(
            r#"{{"type":"ping","ref":"{}"}}"#,
            "r".repeat(MAX_REF_BYTES - 1)
        );
        let refusal = parse(&large).unwrap_err();
        assert_eq!(
            (refusal.code, refusal.reference),
            (ErrorCode::InvalidFrame, None)
        );
        let nested = format!(r#"{{"type":"ping","ref":[{}0]}}"#, "0,".repeat(100));
        assert_eq!(parse(&nested).unwrap_err().reference, None);
    }

    #[test]
    fn every_bad_input_is_refused_with_its_code_and_ref() {
        let cases = [
            ("not json", ErrorCode::InvalidJson),
            ("[1,2]", ErrorCode::InvalidJson),
            (r#"{"type":"dance","ref":1}"#, ErrorCode::UnknownType),
            (r#"{"type":5,"ref":1}"#, ErrorCode::InvalidFrame),
            (r#"{"type":"join","ref":1}"#, ErrorCode::InvalidFrame),
            (
                r#"{"type":"join","room":"a b","ref":1}"#,
                ErrorCode::InvalidRoom,
            ),
            (
                r#"{"type":"join","room":"","ref":1}"#,
                ErrorCode::InvalidRoom,
            ),
            (
                r#"{"type":"message","room":"a","ref":1}"#,
                ErrorCode::InvalidFrame,
            ),
            (
                r#"{"type":"message","message":"","ref":1}"#,
                ErrorCode::EmptyMessage,
            ),
            (
                r#"{"type":"message","message":" \t\n ","ref":1}"#,
                ErrorCode::EmptyMessage,
            ),
            (
                r#"{"type":"message","message":"seventeen bytes!!","ref":1}"#,
                ErrorCode::MessageTooLarge,
            ),
            (r#"{"message":42}"#, ErrorCode::InvalidFrame),
            (r#"{"hello":"world"}"#, ErrorCode::InvalidFrame),
        ];
        for (input, code) in cases {
            let refusal = parse(input).expect_err(input);
            assert_eq!(refusal.code, code, "{input}");
            if input.contains("\"ref\"") {
                assert_eq!(refusal.reference, Some(json!(1)), "{input}");
            }
        }
    }

    #[test]
    fn joins_can_ask_for_replay_and_presence() {
        let Ok(ClientFrame::Join { options, .. }) =
            parse(r#"{"type":"join","room":"a","since":"17-3","epoch":"e1","presence":true}"#)
        else {
            panic!("join parses")
        };
        let since = Replay::Since {
            offset: Offset { ms: 17, seq: 3 },
            epoch: Some("e1".into()),
        };
        assert_eq!(
            options,
            JoinOptions {
                replay: since,
                presence: true
            }
        );
        let Ok(ClientFrame::Join { options, .. }) = parse(r#"{"type":"join","room":"a","last":5}"#)
        else {
            panic!("join parses")
        };
        assert_eq!(options.replay, Replay::Last(5));
        for bad in [
            r#"{"type":"join","room":"a","since":"x-1"}"#,
            r#"{"type":"join","room":"a","since":17}"#,
            r#"{"type":"join","room":"a","last":0}"#,
            r#"{"type":"join","room":"a","last":5,"since":"1-0"}"#,
            r#"{"type":"join","room":"a","presence":"yes"}"#,
        ] {
            assert_eq!(
                parse(bad).map_err(|refusal| refusal.code),
                Err(ErrorCode::InvalidFrame),
                "{bad}"
            );
        }
    }

    #[test]
    fn offsets_order_numerically_and_splice_into_frames() {
        let a = Offset::parse("9-5").unwrap();
        let b = Offset::parse("10-0").unwrap();
        assert!(a < b, "9-5 comes before 10-0");
        assert_eq!(Offset::parse("10"), Some(b));
        assert_eq!(b.to_string(), "10-0");
        let epoch = Epoch::parse("ab12").unwrap();
        let frame = with_offset(r#"{"type":"message","message":"}"}"#, b, epoch);
        let value: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            (value["offset"].as_str(), value["epoch"].as_str()),
            (Some("10-0"), Some("ab12"))
        );
        assert_eq!(value["message"], "}");
        assert_eq!(epoch.as_str(), "ab12");
        for bad in ["a\"b", "", &"e".repeat(MAX_EPOCH_BYTES + 1)] {
            assert!(Epoch::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(Epoch::random().as_str().len(), 12);
    }

    #[test]
    fn room_names_are_bounded_and_restricted() {
        assert!(RoomName::parse(&"a".repeat(64)).is_ok());
        assert!(RoomName::parse(&"a".repeat(65)).is_err());
        assert!(RoomName::parse("team:eng-1.ops_2").is_ok());
        for bad in ["", "a/b", "방", "a\nb", "a*"] {
            assert!(RoomName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chat_messages_serialize_as_the_seed_client_expects() {
        let room = RoomName::parse("lobby").unwrap();
        let id = uuid::Uuid::nil();
        let text = to_json(&ChatMessage {
            room: &room,
            id,
            user_id: "u-1",
            name: None,
            message: "hi",
            ts: 5,
        });
        assert_eq!(
            text,
            r#"{"type":"message","room":"lobby","id":"00000000-0000-0000-0000-000000000000","userId":"u-1","message":"hi","ts":5}"#
        );
    }

    #[test]
    fn error_frames_echo_ref_omit_it_when_absent_and_say_their_reason_as_message() {
        let refusal =
            Refusal::new(ErrorCode::NotInRoom, "not a member").with_ref(Some(json!({"k":1})));
        assert_eq!(
            to_json(&ServerFrame::from(&refusal)),
            r#"{"type":"error","code":"not_in_room","reason":"not a member","message":"not a member","ref":{"k":1}}"#
        );
        let refusal = Refusal::new(ErrorCode::InvalidJson, "bad");
        assert_eq!(
            to_json(&ServerFrame::from(&refusal)),
            r#"{"type":"error","code":"invalid_json","reason":"bad","message":"bad"}"#
        );
    }

    #[test]
    fn a_history_frame_asks_for_the_newest_or_what_follows_an_offset() {
        let frame = parse(r#"{"type":"history","room":"news","ref":1}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::History {
                room: RoomName::parse("news").unwrap(),
                replay: Replay::Last(DEFAULT_HISTORY_LIMIT),
                limit: DEFAULT_HISTORY_LIMIT,
                reference: Some(json!(1)),
            }
        );
        let frame =
            parse(r#"{"type":"history","room":"news","limit":5,"since":"7-1","epoch":"e"}"#)
                .unwrap();
        let ClientFrame::History { replay, limit, .. } = frame else {
            panic!("a history frame");
        };
        assert_eq!(limit, 5);
        assert_eq!(
            replay,
            Replay::Since {
                offset: Offset { ms: 7, seq: 1 },
                epoch: Some("e".into())
            }
        );
        for bad in [
            r#"{"type":"history"}"#,
            r#"{"type":"history","room":"a","limit":0}"#,
            r#"{"type":"history","room":"a","limit":1001}"#,
            r#"{"type":"history","room":"a","since":"x"}"#,
            r#"{"type":"history","room":"a","epoch":5}"#,
        ] {
            assert_eq!(
                parse(bad).unwrap_err().code,
                ErrorCode::InvalidFrame,
                "{bad}"
            );
        }
    }
}
