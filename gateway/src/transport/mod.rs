//! Transports: how bytes get between a client and its connection core.
//!
//! Owns the listening socket and accept loop ([`listener`]), the RFC 6455 handshake
//! ([`upgrade`]), server frames as wire bytes ([`wire`]), a connection's outgoing side written
//! straight to its socket ([`outbox`]), the WebSocket session task ([`websocket`]) and the SSE +
//! POST fallback ([`sse`]), which drives the same connection core through the same outbox.
//! Knows nothing of rooms, brokers or what a client frame means: parsed frames go to the
//! connection core (`crate::connection`), and what the core answers comes back through the
//! outbox.

pub mod listener;
pub mod outbox;
pub mod sse;
pub mod upgrade;
pub mod websocket;
pub mod wire;
