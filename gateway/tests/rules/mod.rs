//! What the client frame parser and the name validators may accept, written from the protocol
//! documentation rather than from the code under test, so the property tests and the fuzz
//! targets check the implementation against the documented rules, not against itself.
// Each user needs only some of the rules.
#![allow(dead_code)]

use gateway::protocol::{ClientFrame, MAX_DISPLAY_NAME_CHARS, MAX_REF_BYTES, MAX_ROOM_NAME_BYTES};
use serde_json::Value;

/// A room name: 1 to `MAX_ROOM_NAME_BYTES` bytes of `A-Z a-z 0-9 _ - . :`.
pub fn room_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// A display name: 1 to `MAX_DISPLAY_NAME_CHARS` characters, none of them control characters.
pub fn display_name_ok(name: &str) -> bool {
    let chars = name.chars().count();
    (1..=MAX_DISPLAY_NAME_CHARS).contains(&chars) && !name.chars().any(char::is_control)
}

/// The `ref` an answer echoes: the client's, if it serializes to at most `MAX_REF_BYTES` bytes
/// of JSON; a larger one makes the frame refused and is not echoed.
pub fn echoed_ref(reference: Option<Value>) -> Option<Value> {
    reference.filter(|reference| reference.to_string().len() <= MAX_REF_BYTES)
}

/// Panics unless an accepted frame obeys the rules for its kind, with chat messages limited to
/// `limit` bytes.
pub fn check_accepted(frame: &ClientFrame, limit: usize) {
    match frame {
        ClientFrame::Seed { message, .. } | ClientFrame::Message { message, .. } => {
            assert!(!message.is_empty(), "an empty message was accepted");
            assert!(message.len() <= limit, "an oversize message was accepted");
        }
        ClientFrame::Join { room, .. } | ClientFrame::Leave { room, .. } => {
            assert!(room_name_ok(room.as_str()), "an invalid room was accepted");
        }
        ClientFrame::Auth { token, .. } => {
            assert!(!token.is_empty(), "an empty token was accepted")
        }
        _ => {}
    }
}
