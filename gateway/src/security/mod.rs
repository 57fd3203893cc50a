//! Security: who may connect and what a connection may do.
//!
//! Owns the handshake gate and each connection's guard ([`gate`]), JWT verification and
//! grants ([`auth`]), the `Origin` allowlist ([`origin`]) and the abuse limits: token buckets,
//! the connection cap and trusted proxies ([`limits`]); the signed SSE session and reconnect
//! tokens ([`tokens`]). Knows nothing of room membership,
//! brokers or sockets: it decides, the transports and the connection core act on it.

pub mod auth;
pub mod gate;
pub mod limits;
pub mod origin;
pub mod tokens;
