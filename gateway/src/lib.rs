//! A horizontally scalable chat gateway: stateless nodes hold WebSocket connections and share
//! chat rooms through a broker (in-process for one node, Redis pub/sub for a cluster).
//!
//! Layers, each apart from the others: [`protocol`] (frames), [`session`] (one WebSocket),
//! [`fanout`] (local rooms), [`broker`] (in-process or Redis), joined by [`hub`] and served by
//! [`server`].

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod gate;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod session;
pub mod upgrade;
pub mod wire;

/// The items of comma-separated header values (`Connection`, `Sec-WebSocket-Protocol`,
/// `X-Forwarded-For`, ...), trimmed, in order; values that are not text are skipped.
pub(crate) fn header_list<'a>(
    values: impl IntoIterator<Item = &'a axum::http::HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    values
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}
