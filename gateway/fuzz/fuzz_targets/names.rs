//! Room and display name validation over arbitrary strings: never panics, and agrees with the
//! documented rules.
#![no_main]

use gateway::protocol::{RoomName, validate_display_name};
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/rules/mod.rs"]
mod rules;

fuzz_target!(|text: &str| {
    let room_ok = rules::room_name_ok(text);
    match RoomName::parse(text) {
        Ok(room) => {
            assert!(room_ok);
            assert_eq!(room.as_str(), text);
        }
        Err(_) => assert!(!room_ok),
    }
    assert_eq!(
        validate_display_name(text).is_ok(),
        rules::display_name_ok(text)
    );
});
