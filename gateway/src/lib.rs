//! A horizontally scalable chat gateway: stateless nodes hold WebSocket connections and share
//! chat rooms through a broker (in-process for one node, Redis pub/sub for a cluster).
//!
//! Layers, each apart from the others: [`protocol`] (frames), [`session`] (one WebSocket),
//! [`fanout`] (local rooms), [`broker`] (in-process or Redis), joined by [`hub`] and served by
//! [`server`].

pub mod broker;
pub mod config;
pub mod fanout;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
