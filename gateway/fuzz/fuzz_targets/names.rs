//! Room and display name validation over arbitrary strings: never panics, and agrees with the
//! documented rules.
#![no_main]

use gateway::protocol::{
    MAX_DISPLAY_NAME_CHARS, MAX_ROOM_NAME_BYTES, RoomName, validate_display_name,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let room_ok = !text.is_empty()
        && text.len() <= MAX_ROOM_NAME_BYTES
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    match RoomName::parse(text) {
        Ok(room) => {
            assert!(room_ok);
            assert_eq!(room.as_str(), text);
        }
        Err(_) => assert!(!room_ok),
    }
    let chars = text.chars().count();
    let name_ok =
        (1..=MAX_DISPLAY_NAME_CHARS).contains(&chars) && !text.chars().any(char::is_control);
    assert_eq!(validate_display_name(text).is_ok(), name_ok);
});
