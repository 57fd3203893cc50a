//! The fallback transport for networks that let no WebSocket through: server frames as an SSE
//! stream (`GET /sse`), client frames as POSTs (`POST /sse/send`) that any node takes.
//!
//! Owns the event stream of a session ([`stream`]: frames as SSE events, the response body,
//! the bounded buffer between them), the session task that drives the connection core
//! ([`session`], the sibling of `transport::websocket`), and the routing of a POST to the node
//! and session its token names ([`relay`], through the broker). Knows nothing of rooms or
//! what a frame means, as the WebSocket transport does not: the core, rooms and broker are the
//! same for both.

pub mod relay;
pub mod session;
pub mod stream;

pub use relay::{Outcome, Registration, Relay};
pub use stream::{EventBody, EventStream};

/// Most client frames one POST may carry.
pub const MAX_FRAMES_PER_POST: usize = 32;
