//! The client frame parser over arbitrary bytes: it must never panic, and what it accepts
//! must obey the documented rules.
#![no_main]

use gateway::protocol::parse_client_frame;
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/rules/mod.rs"]
mod rules;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chat message limit, so small limits get exercised too.
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let limit = usize::from(limit) * 16;
    let text = String::from_utf8_lossy(rest);
    match parse_client_frame(&text, limit) {
        Ok(frame) => rules::check_accepted(&frame, limit),
        Err(refusal) => assert!(!refusal.reason.is_empty() && refusal.reason.len() < 512),
    }
});
