//! Transports: how bytes get between a client and its connection core.
//!
//! Owns the listening socket and accept loop ([`listener`]), the RFC 6455 handshake
//! ([`upgrade`]), server frames as wire bytes ([`wire`]), a connection's outgoing side written
//! straight to its socket ([`outbox`]) and the WebSocket session task ([`websocket`]). Knows
//! nothing of rooms, brokers or what a client frame means: parsed frames go to the connection
//! core (`crate::connection`), and what the core answers comes back through the outbox.
//!
//! A new transport (the SSE + POST fallback) lives here beside `websocket`: it drives the same
//! connection core and hands it the same outbox.

pub mod listener;
pub mod outbox;
pub mod upgrade;
pub mod websocket;
pub mod wire;
