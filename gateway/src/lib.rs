//! A horizontally scalable chat gateway: stateless nodes hold client connections and share chat
//! rooms through a broker (in-process for one node, Redis pub/sub for a cluster).
//!
//! The layout, from the wire inwards:
//!
//! * [`transport`]: the listener, the WebSocket handshake, wire framing, each connection's
//!   outbox, and the WebSocket session that reads frames;
//! * [`http`]: the routes: WebSocket endpoint, demo page, health, readiness, metrics;
//! * [`security`]: the handshake gate, tokens, origins and abuse limits;
//! * [`connection`]: the connection core, one client's state and the handling of its frames,
//!   whatever the transport;
//! * [`protocol`]: client and server frames, validation, error codes, the close catalog;
//! * [`rooms`]: local rooms and fan-out, and the hub that joins them to the broker;
//! * [`broker`]: getting a message to every node with members in its room (in-process or
//!   Redis), history and presence;
//! * [`server`]: the node's lifecycle; [`config`]: every flag; [`metrics`]: every metric;
//!   [`clock`]: the wall clock as the protocol uses it.

pub mod broker;
pub mod clock;
pub mod config;
pub mod connection;
mod headers;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod rooms;
pub mod security;
pub mod server;
pub mod transport;
