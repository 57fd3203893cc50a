//! The client frame parser over arbitrary bytes: it must never panic, and what it accepts
//! must obey the documented rules.
#![no_main]

use gateway::protocol::{ClientFrame, MAX_ROOM_NAME_BYTES, parse_client_frame};
use libfuzzer_sys::fuzz_target;

fn valid_room(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chat message limit, so small limits get exercised too.
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let limit = usize::from(limit) * 16;
    let text = String::from_utf8_lossy(rest);
    match parse_client_frame(&text, limit) {
        Ok(ClientFrame::Seed { message, .. }) | Ok(ClientFrame::Message { message, .. }) => {
            assert!(!message.is_empty() && message.len() <= limit);
        }
        Ok(ClientFrame::Join { room, .. }) | Ok(ClientFrame::Leave { room, .. }) => {
            assert!(valid_room(room.as_str()));
        }
        Ok(ClientFrame::Auth { token, .. }) => assert!(!token.is_empty()),
        Ok(_) => {}
        Err(refusal) => assert!(!refusal.reason.is_empty() && refusal.reason.len() < 512),
    }
});
