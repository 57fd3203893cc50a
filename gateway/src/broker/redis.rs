//! The cluster broker: rooms shared through Redis pub/sub.
//!
//! Two connections, as Redis requires: a regular client publishes, a `SubscriberClient`
//! receives. Every message, also one for members on the publishing node, comes back through
//! Redis, so all members of a room see its messages in the order Redis published them.
//!
//! The subscriber's messages are read straight from `message_rx()` rather than through fred's
//! `on_message` helper, which stops for good on the first lag. A lag (the node fell behind and
//! the broadcast channel dropped messages) is counted and logged, and reading goes on.

use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use fred::types::config::{PerformanceConfig, ReconnectPolicy};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::{BrokerError, SharedInbox, decode_envelope, encode_envelope, now_micros};
use crate::metrics;
use crate::protocol::RoomName;

/// Prefix of every room's pub/sub channel: room `lobby` is channel `chat:room:lobby`.
pub const CHANNEL_PREFIX: &str = "chat:room:";

/// How to reach Redis and how much slack the subscriber gets.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` URL.
    pub url: String,
    /// Messages the subscriber may hold before it counts as lagging (fred's default is 32).
    pub subscriber_capacity: usize,
    /// How long a publish may take before it is reported as failed.
    pub command_timeout: Duration,
}

/// Redis pub/sub broker.
pub struct RedisBroker {
    publisher: Client,
    subscriber: SubscriberClient,
    tasks: Vec<JoinHandle<()>>,
}

impl RedisBroker {
    /// Starts both connections and the receive loop. Returns without waiting for Redis: a node
    /// whose Redis is down starts anyway, reports not ready, and keeps retrying with backoff.
    pub fn start(settings: &RedisSettings, inbox: SharedInbox) -> Result<Self, BrokerError> {
        let config = Config::from_url(&settings.url)?;
        // Retry forever: 100 ms doubling up to 5 s between attempts.
        let policy = ReconnectPolicy::new_exponential(0, 100, 5_000, 2);
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(policy)
            .with_performance_config(|perf: &mut PerformanceConfig| {
                perf.default_command_timeout = settings.command_timeout;
                perf.broadcast_channel_capacity = settings.subscriber_capacity;
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = settings.command_timeout;
                connection.internal_command_timeout = settings.command_timeout;
                // A command in flight when the connection drops fails rather than being
                // replayed later, so its sender hears about it now.
                connection.max_command_attempts = 1;
            });
        let publisher = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;

        let mut tasks = vec![
            receive_loop(subscriber.message_rx(), inbox),
            subscriber.manage_subscriptions(),
        ];
        tasks.push(log_connection_events("publisher", &publisher));
        tasks.push(log_connection_events("subscriber", &subscriber));
        drop(publisher.connect());
        drop(subscriber.connect());
        Ok(RedisBroker {
            publisher,
            subscriber,
            tasks,
        })
    }

    pub(super) async fn publish(&self, room: &RoomName, frame: &str) -> Result<(), BrokerError> {
        if !self.publisher.is_connected() {
            return Err(BrokerError::Unavailable("redis is not connected"));
        }
        let started = Instant::now();
        let envelope = encode_envelope(now_micros(), frame);
        let _receivers: i64 = self.publisher.publish(channel(room), envelope).await?;
        metrics::message_published(started.elapsed());
        Ok(())
    }

    pub(super) async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        if !self.subscriber.is_connected() {
            return Err(BrokerError::Unavailable("redis is not connected"));
        }
        Ok(self.subscriber.subscribe(channel(room)).await?)
    }

    pub(super) async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        Ok(self.subscriber.unsubscribe(channel(room)).await?)
    }

    pub(super) fn is_ready(&self) -> bool {
        let ready = self.publisher.is_connected() && self.subscriber.is_connected();
        metrics::set_redis_connected(ready);
        ready
    }

    pub(super) async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        // Best effort: the process is exiting either way.
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.quit().await;
    }
}

fn channel(room: &RoomName) -> String {
    format!("{CHANNEL_PREFIX}{room}")
}

/// Reads every pub/sub message and hands it to the inbox, surviving lag.
fn receive_loop(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    inbox: SharedInbox,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match messages.recv().await {
                Ok(message) => {
                    let Some(room) = message.channel.strip_prefix(CHANNEL_PREFIX) else {
                        continue;
                    };
                    match message.value.into_bytes().and_then(decode_envelope) {
                        Some((published_at, frame)) => inbox.deliver(room, frame, published_at),
                        None => {
                            tracing::warn!(room, "ignored a malformed message on a room channel")
                        }
                    }
                }
                Err(RecvError::Lagged(skipped)) => {
                    metrics::broker_lagged(skipped);
                    tracing::warn!(skipped, "redis subscriber lagged; messages were skipped");
                }
                Err(RecvError::Closed) => break,
            }
        }
    })
}

/// Logs connection losses and reconnects, and keeps the `redis_connected` gauge current.
fn log_connection_events<C: EventInterface + ClientLike>(
    role: &'static str,
    client: &C,
) -> JoinHandle<()> {
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                error = errors.recv() => match error {
                    Ok((error, _)) => {
                        metrics::set_redis_connected(false);
                        tracing::warn!(role, %error, "redis connection lost; retrying");
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
                server = reconnects.recv() => match server {
                    Ok(server) => tracing::info!(role, %server, "redis connected"),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
            }
        }
    })
}
