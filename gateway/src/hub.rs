//! The hub ties local fan-out to the broker: it keeps this node subscribed to exactly the rooms
//! that have a local member, and routes what the broker delivers to those members.
//!
//! Subscriptions are reference-counted by room membership: the first local member subscribes
//! the node to the room's channel, the last one to leave unsubscribes it. Changes for one room
//! are serialized by that room's subscription lock, so a leave racing a join can never leave
//! the node unsubscribed from a room that has members.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

use crate::broker::{
    Broker, BrokerError, InProcessBroker, Inbox, RedisBroker, RedisSettings, now_micros,
};
use crate::fanout::{ConnId, Outbox, Registry};
use crate::metrics;
use crate::protocol::RoomName;

/// Hands broker deliveries to the local registry and records fan-out metrics.
struct FanoutInbox(Arc<Registry>);

impl Inbox for FanoutInbox {
    fn deliver(&self, room: &str, frame: Utf8Bytes, published_at_micros: u64) {
        let recipients = self.0.deliver(room, &frame);
        let latency = Duration::from_micros(now_micros().saturating_sub(published_at_micros));
        metrics::fanned_out(recipients, latency);
    }
}

/// The node's rooms and broker, shared by every session.
pub struct Hub {
    registry: Arc<Registry>,
    broker: Broker,
}

impl Hub {
    /// A hub with the in-process broker (single node).
    pub fn in_process() -> Self {
        let registry = Arc::new(Registry::default());
        let broker = Broker::InProcess(InProcessBroker::new(Arc::new(FanoutInbox(
            registry.clone(),
        ))));
        Hub { registry, broker }
    }

    /// A hub sharing rooms through Redis. Returns at once; see [`RedisBroker::start`].
    pub fn redis(settings: &RedisSettings) -> Result<Self, BrokerError> {
        let registry = Arc::new(Registry::default());
        let broker = Broker::Redis(RedisBroker::start(
            settings,
            Arc::new(FanoutInbox(registry.clone())),
        )?);
        Ok(Hub { registry, broker })
    }

    /// Adds a connection to a room, subscribing this node to it first if needed. When this
    /// returns `Ok`, the connection receives every message published to the room from now on.
    pub async fn join(
        &self,
        room: &RoomName,
        conn: ConnId,
        outbox: Outbox,
    ) -> Result<(), BrokerError> {
        loop {
            let entry = self.registry.entry(room);
            let mut subscription = entry.subscription.lock().await;
            if subscription.retired {
                // A leave removed this entry while we waited; the registry holds a newer one.
                continue;
            }
            if !subscription.subscribed {
                if let Err(error) = self.broker.subscribe(room).await {
                    if entry.members.is_empty() {
                        subscription.retired = true;
                        self.registry.remove(room, &entry);
                    }
                    return Err(error);
                }
                subscription.subscribed = true;
            }
            entry.members.insert(conn, outbox);
            return Ok(());
        }
    }

    /// Removes a connection from a room, unsubscribing this node when it was the last local member.
    pub async fn leave(&self, room: &RoomName, conn: ConnId) {
        let Some(entry) = self.registry.get(room.as_str()) else {
            return;
        };
        let mut subscription = entry.subscription.lock().await;
        if subscription.retired || !entry.members.remove(conn) {
            return;
        }
        // Unsubscribe before the entry leaves the registry: a join for this room waits on the
        // lock we hold, then subscribes on a fresh entry strictly after this unsubscribe.
        if subscription.subscribed {
            if let Err(error) = self.broker.unsubscribe(room).await {
                tracing::warn!(%room, %error, "unsubscribe failed");
            }
            subscription.subscribed = false;
        }
        subscription.retired = true;
        self.registry.remove(room, &entry);
    }

    /// Publishes a chat message frame to the room on every node.
    pub async fn publish(&self, room: &RoomName, frame: String) -> Result<(), BrokerError> {
        self.broker.publish(room, frame).await
    }

    /// Whether the broker is usable (the node is ready for traffic).
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready()
    }

    /// Which broker this hub uses, for logs.
    pub fn broker_kind(&self) -> &'static str {
        self.broker.kind()
    }

    /// Closes broker connections at shutdown.
    pub async fn close(&self) {
        self.broker.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_publish_reaches_every_member_including_the_sender() {
        let hub = Hub::in_process();
        let room = RoomName::parse("lobby").unwrap();
        let (a, mut a_rx) = Outbox::channel(8);
        let (b, mut b_rx) = Outbox::channel(8);
        hub.join(&room, 1, a).await.unwrap();
        hub.join(&room, 2, b).await.unwrap();
        hub.publish(&room, r#"{"type":"message"}"#.into())
            .await
            .unwrap();
        assert_eq!(a_rx.try_recv().as_deref(), Some(r#"{"type":"message"}"#));
        assert_eq!(b_rx.try_recv().as_deref(), Some(r#"{"type":"message"}"#));
    }

    #[tokio::test]
    async fn leaving_stops_delivery_and_forgets_empty_rooms() {
        let hub = Hub::in_process();
        let room = RoomName::parse("lobby").unwrap();
        let (a, mut a_rx) = Outbox::channel(8);
        hub.join(&room, 1, a).await.unwrap();
        hub.leave(&room, 1).await;
        assert!(hub.registry.get("lobby").is_none());
        hub.publish(&room, "{}".into()).await.unwrap();
        assert_eq!(a_rx.try_recv(), None);
    }
}
