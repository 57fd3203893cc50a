//! The wall clock as the protocol uses it: message timestamps and publish times travel between
//! nodes, so they are Unix time, not a monotonic instant.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch on this node's clock (0 if the clock is before 1970).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}
