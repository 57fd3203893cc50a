//! Prometheus metrics: every name the gateway exports, in one place, behind small functions so
//! call sites cannot misspell a name or a label.
//!
//! The recorder is installed once by the binary; without it (unit tests) every call is a no-op.
//! Process metrics (`process_*`: memory, CPU, open files, threads) are read from the operating
//! system at each scrape by `metrics-process`.

use std::sync::LazyLock;
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge, histogram};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::protocol::ErrorCode;
use crate::protocol::close::Disconnect;
use crate::security::limits::Scope;

const CONNECTIONS_OPEN: &str = "chat_connections_open";
const CONNECTIONS_ACCEPTED: &str = "chat_connections_accepted_total";
const MESSAGES_RECEIVED: &str = "chat_messages_received_total";
const MESSAGES_PUBLISHED: &str = "chat_messages_published_total";
const MESSAGES_DELIVERED: &str = "chat_messages_delivered_total";
const BROKER_PUBLISH_SECONDS: &str = "chat_broker_publish_seconds";
const FANOUT_LATENCY_SECONDS: &str = "chat_fanout_latency_seconds";
const SLOW_CONSUMER_DISCONNECTS: &str = "chat_slow_consumer_disconnects_total";
const ROOMS_LOCAL: &str = "chat_rooms_local";
const REDIS_CONNECTED: &str = "chat_redis_connected";
const READY: &str = "chat_ready";
const BROKER_LAG_EVENTS: &str = "chat_broker_lag_events_total";
const BROKER_LAGGED_MESSAGES: &str = "chat_broker_lagged_messages_total";
const CLIENT_ERRORS: &str = "chat_client_errors_total";
const HANDSHAKES_REFUSED: &str = "chat_handshakes_refused_total";
const RATE_LIMITED: &str = "chat_rate_limited_messages_total";
const POLICY_CLOSES: &str = "chat_policy_closes_total";
const PANICS: &str = "chat_panics_total";
const BROKER_REPAIRS: &str = "chat_broker_repairs_total";
const BYTES_RECEIVED: &str = "chat_bytes_received_total";
const BYTES_SENT: &str = "chat_bytes_sent_total";
const CLOSES: &str = "chat_closes_total";
const OUTBOX_BACKLOG_BYTES: &str = "chat_outbox_backlog_bytes";

/// Reasons a handshake is refused before the gate sees it, because of the node's own state.
const NOT_READY: &str = "not_ready";
const SHUTTING_DOWN: &str = "shutting_down";

static PROCESS: LazyLock<metrics_process::Collector> =
    LazyLock::new(metrics_process::Collector::default);
const API_REQUESTS: &str = "chat_api_requests_total";
const API_REQUEST_SECONDS: &str = "chat_api_request_seconds";

/// Latency buckets in seconds: fine below 10 ms, where a healthy cluster lives, then coarse.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A Prometheus recorder for node `node_id` (every series carries `node="<node_id>"`), not yet
/// installed: the binary installs it globally, in-process test nodes each use their own.
pub fn recorder(node_id: &str) -> Result<PrometheusRecorder, BuildError> {
    Ok(PrometheusBuilder::new()
        .add_global_label("node", node_id)
        .set_buckets_for_metric(
            Matcher::Full(BROKER_PUBLISH_SECONDS.into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(FANOUT_LATENCY_SECONDS.into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(API_REQUEST_SECONDS.into()), LATENCY_BUCKETS)?
        .build_recorder())
}

/// Installs the global Prometheus recorder for node `node_id` and registers every metric.
pub fn install(node_id: &str) -> Result<PrometheusHandle, BuildError> {
    let recorder = recorder(node_id)?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    register();
    Ok(handle)
}

/// Describes every metric and creates the rarely moving ones at zero, through the recorder in
/// effect (the global one, or a thread's local one).
pub fn register() {
    describe();
    register_at_zero();
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    PROCESS.describe();
    describe_gauge!(CONNECTIONS_OPEN, "WebSocket connections open on this node");
    describe_counter!(CONNECTIONS_ACCEPTED, "WebSocket connections accepted");
    describe_counter!(MESSAGES_RECEIVED, "Chat messages received from clients");
    describe_counter!(MESSAGES_PUBLISHED, "Chat messages the broker accepted");
    describe_counter!(
        MESSAGES_DELIVERED,
        "Frames fan-out wrote (or queued) to local clients"
    );
    describe_histogram!(
        BROKER_PUBLISH_SECONDS,
        metrics::Unit::Seconds,
        "Time for the broker to accept a publish"
    );
    describe_histogram!(
        FANOUT_LATENCY_SECONDS,
        metrics::Unit::Seconds,
        "From publish on any node to queued for local sockets on this node"
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Connections closed because their outgoing queue was full"
    );
    describe_gauge!(ROOMS_LOCAL, "Rooms with at least one member on this node");
    describe_gauge!(REDIS_CONNECTED, "1 while both Redis connections are up");
    describe_gauge!(
        READY,
        "1 while the node is ready for traffic (broker usable, not shutting down)"
    );
    describe_counter!(
        BROKER_LAG_EVENTS,
        "Times the Redis subscriber fell behind and skipped messages"
    );
    describe_counter!(
        BROKER_LAGGED_MESSAGES,
        "Messages skipped by a lagging Redis subscriber"
    );
    describe_counter!(CLIENT_ERRORS, "Error frames sent to clients, by code");
    describe_counter!(
        HANDSHAKES_REFUSED,
        "WebSocket handshakes refused, by reason: the security gate's, or not_ready and \
         shutting_down (503 before the upgrade)"
    );
    describe_counter!(
        BYTES_RECEIVED,
        metrics::Unit::Bytes,
        "WebSocket bytes read from clients after the handshake"
    );
    describe_counter!(
        BYTES_SENT,
        metrics::Unit::Bytes,
        "WebSocket bytes written to clients after the handshake"
    );
    describe_counter!(
        CLOSES,
        "Connections ended, by close code (1006: the connection broke, no close frame)"
    );
    describe_gauge!(
        OUTBOX_BACKLOG_BYTES,
        metrics::Unit::Bytes,
        "Bytes waiting in connections' backlogs because their sockets could not take them"
    );
    describe_counter!(
        RATE_LIMITED,
        "Client messages dropped by a rate limit, by scope (connection or user)"
    );
    describe_counter!(
        POLICY_CLOSES,
        "Connections closed by a security policy, by reason (rate_limit, token_expired)"
    );
    describe_counter!(
        BROKER_REPAIRS,
        "Gap repairs of a room from history, by outcome: repaired, failed (retried), resync \
         (members closed with 4002 to resume)"
    );
    describe_counter!(
        API_REQUESTS,
        "Server API calls, by route template and HTTP status"
    );
    describe_histogram!(
        API_REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a server API call, by route template"
    );
    describe_counter!(
        PANICS,
        "Panics in the node's tasks: each is a bug that ended a connection or a background task"
    );
}

/// Creates the series that only move on rare events, so dashboards and `rate()` see them from
/// the start instead of from their first increment.
fn register_at_zero() {
    for name in [
        CONNECTIONS_ACCEPTED,
        MESSAGES_RECEIVED,
        MESSAGES_PUBLISHED,
        MESSAGES_DELIVERED,
        SLOW_CONSUMER_DISCONNECTS,
        BROKER_LAG_EVENTS,
        BROKER_LAGGED_MESSAGES,
        PANICS,
        BYTES_RECEIVED,
        BYTES_SENT,
    ] {
        counter!(name).absolute(0);
    }
    for outcome in ["repaired", "failed", "resync"] {
        counter!(BROKER_REPAIRS, "outcome" => outcome).absolute(0);
    }
    for reason in Disconnect::ALL {
        counter!(CLOSES, "code" => reason.code().to_string()).absolute(0);
    }
    for reason in [NOT_READY, SHUTTING_DOWN] {
        counter!(HANDSHAKES_REFUSED, "reason" => reason).absolute(0);
    }
    for code in ErrorCode::ALL {
        counter!(CLIENT_ERRORS, "code" => code.as_str()).absolute(0);
    }
    for scope in [Scope::Connection, Scope::User] {
        counter!(RATE_LIMITED, "scope" => scope.as_str()).absolute(0);
    }
    for reason in PolicyClose::ALL {
        counter!(POLICY_CLOSES, "reason" => reason.label()).absolute(0);
    }
    gauge!(CONNECTIONS_OPEN).set(0.0);
    gauge!(ROOMS_LOCAL).set(0.0);
    gauge!(OUTBOX_BACKLOG_BYTES).set(0.0);
}

/// Reads the process metrics, for a scrape.
pub fn collect_process() {
    PROCESS.collect();
}

/// The series the transports move on every read and write, looked up once per node: `counter!`
/// by name hashes the name and searches the registry on every call, which a path taken for
/// each frame should not pay.
pub struct TransportMeters {
    bytes_received: Counter,
    bytes_sent: Counter,
    backlog_bytes: Gauge,
}

impl TransportMeters {
    /// Handles in the recorder in effect (the global one, or this thread's local one; without
    /// a recorder, handles that count nothing).
    pub fn new() -> TransportMeters {
        TransportMeters {
            bytes_received: counter!(BYTES_RECEIVED),
            bytes_sent: counter!(BYTES_SENT),
            backlog_bytes: gauge!(OUTBOX_BACKLOG_BYTES),
        }
    }

    /// `bytes` were read from a client.
    pub fn received(&self, bytes: usize) {
        self.bytes_received.increment(bytes as u64);
    }

    /// `bytes` were written to a client.
    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.increment(bytes as u64);
    }

    /// A connection's backlog went from `before` to `after` bytes.
    pub fn backlog_changed(&self, before: usize, after: usize) {
        if after > before {
            self.backlog_bytes.increment((after - before) as f64);
        } else {
            self.backlog_bytes.decrement((before - after) as f64);
        }
    }
}

impl Default for TransportMeters {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection was accepted and is now open.
pub fn connection_opened() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

/// A connection ended with `reason`.
pub fn connection_closed(reason: Disconnect) {
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
    counter!(CLOSES, "code" => reason.code().to_string()).increment(1);
}

/// A client sent a chat message.
pub fn message_received() {
    counter!(MESSAGES_RECEIVED).increment(1);
}

/// The broker stored `count` messages in one call that took `elapsed`.
pub fn messages_published(count: usize, elapsed: Duration) {
    counter!(MESSAGES_PUBLISHED).increment(count as u64);
    histogram!(BROKER_PUBLISH_SECONDS).record(elapsed.as_secs_f64());
}

/// Fan-out queued one message for `recipients` local clients, `latency` after it was published.
pub fn fanned_out(recipients: usize, latency: Duration) {
    counter!(MESSAGES_DELIVERED).increment(recipients as u64);
    histogram!(FANOUT_LATENCY_SECONDS).record(latency.as_secs_f64());
}

/// A connection was closed because its outgoing queue was full.
pub fn slow_consumer_disconnect() {
    counter!(SLOW_CONSUMER_DISCONNECTS).increment(1);
}

/// The number of rooms with a local member changed.
pub fn set_local_rooms(count: usize) {
    gauge!(ROOMS_LOCAL).set(count as f64);
}

/// Whether the node is ready for traffic.
pub fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

/// Whether both Redis connections are up.
pub fn set_redis_connected(connected: bool) {
    gauge!(REDIS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

/// The Redis subscriber fell behind and skipped `skipped` messages.
pub fn broker_lagged(skipped: u64) {
    counter!(BROKER_LAG_EVENTS).increment(1);
    counter!(BROKER_LAGGED_MESSAGES).increment(skipped);
}

/// A room's gap repair ended with `outcome` (`repaired`, `failed`, `resync`).
pub fn repair(outcome: &'static str) {
    counter!(BROKER_REPAIRS, "outcome" => outcome).increment(1);
}

/// An error frame with `code` was sent to a client.
pub fn client_error(code: &'static str) {
    counter!(CLIENT_ERRORS, "code" => code).increment(1);
}

/// The security gate refused a handshake for `reason`.
pub fn handshake_refused(reason: &'static str) {
    counter!(HANDSHAKES_REFUSED, "reason" => reason).increment(1);
}

/// A handshake was answered 503 because the node is not ready (`shutting_down`: because it is
/// draining).
pub fn handshake_unavailable(shutting_down: bool) {
    handshake_refused(if shutting_down {
        SHUTTING_DOWN
    } else {
        NOT_READY
    });
}

/// A client message was dropped by the `scope` rate limit.
pub fn rate_limited(scope: &'static str) {
    counter!(RATE_LIMITED, "scope" => scope).increment(1);
}

/// Why a security policy closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyClose {
    /// The client kept sending over the rate limits.
    RateLimit,
    /// The client's token expired.
    TokenExpired,
}

impl PolicyClose {
    const ALL: [PolicyClose; 2] = [PolicyClose::RateLimit, PolicyClose::TokenExpired];

    fn label(self) -> &'static str {
        match self {
            PolicyClose::RateLimit => "rate_limit",
            PolicyClose::TokenExpired => "token_expired",
        }
    }
}

/// A connection was closed by a security policy.
pub fn policy_close(reason: PolicyClose) {
    counter!(POLICY_CLOSES, "reason" => reason.label()).increment(1);
}

/// A task panicked.
pub fn panicked() {
    counter!(PANICS).increment(1);
}

/// A server API call to `route` (its template, e.g. `/api/rooms/{room}/history`) was answered
/// with `status` after `elapsed`.
pub fn api_request(route: &str, status: u16, elapsed: Duration) {
    counter!(API_REQUESTS, "route" => route.to_owned(), "status" => status.to_string())
        .increment(1);
    histogram!(API_REQUEST_SECONDS, "route" => route.to_owned()).record(elapsed.as_secs_f64());
}
