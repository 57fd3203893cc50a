//! The node-wide channels: shard channels that are no room's, each kept subscribed on a
//! connection of its own. Two of them: the command channel ([`KeySpace::control_channel`]),
//! which every node subscribes to and on which any node publishes the commands of the
//! application's backend (see [`Command`]); and each node's own inbox
//! ([`KeySpace::node_channel`]), on which other nodes send what is for this node alone (see
//! `broker::direct`). Both with `SPUBLISH`, in every topology as for rooms.
//!
//! One command channel, not one per room or user: every node must hear every command anyway,
//! so spreading them over slots would not spare a node any traffic, and commands are rare
//! (moderation, not chat). A node's inbox is its own, so a message for one node costs no other
//! node anything. In a Redis Cluster each channel lives on the shard that owns its slot.
//!
//! A subscription is kept in place here, as a partition keeps its rooms' (see
//! [`super::subscriber`]): made again after every reconnect and, in a cluster, after the slot
//! moved to another primary (checked every second). The node is not ready while it is not
//! subscribed. Pub/sub keeps nothing: a message published while a node is cut off never
//! reaches it, which the publisher learns from the count of receivers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface};
use fred::types::Message;
use fred::types::config::Server;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

/// What a listener hands every message on its channel to.
pub(super) type PayloadHandler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// How often the subscription is checked (connected, subscribed, on the slot's primary).
const CHECK: Duration = Duration::from_secs(1);

/// A node's subscription to one node-wide channel.
pub(super) struct Listener {
    client: SubscriberClient,
    /// Whether Redis confirmed the subscription on the current connection.
    subscribed: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listener {
    /// Subscribes `client` to `channel` (now and after every reconnect or slot move) and hands
    /// every message received on it to `handler`. `role` names the channel in logs.
    pub(super) fn start(
        role: &'static str,
        client: SubscriberClient,
        channel: String,
        cluster: bool,
        handler: PayloadHandler,
    ) -> Listener {
        let subscription = Subscription {
            client: client.clone(),
            slot: fred::util::redis_keyslot(channel.as_bytes()),
            channel: channel.clone(),
            cluster,
            role,
            subscribed: Arc::new(AtomicBool::new(false)),
        };
        let subscribed = subscription.subscribed.clone();
        let tasks = vec![
            receive(role, client.message_rx(), channel, handler),
            keep_subscribed(subscription),
            super::keep_connected(role, &client),
        ];
        Listener {
            client,
            subscribed,
            tasks,
        }
    }

    /// The subscriber connection that carries the channel, for watching it.
    pub(super) fn client(&self) -> &SubscriberClient {
        &self.client
    }

    /// Whether the channel's messages reach this node now: connected and subscribed.
    pub(super) fn is_listening(&self) -> bool {
        self.client.is_connected() && self.subscribed.load(Ordering::Acquire)
    }

    pub(super) async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        // Best effort: the process is exiting either way.
        let _ = self.client.quit().await;
    }
}

/// Hands every message on `channel` to `handler`.
fn receive(
    role: &'static str,
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    channel: String,
    handler: PayloadHandler,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match messages.recv().await {
                Ok(message) if *message.channel == *channel => match message.value.as_bytes() {
                    Some(payload) => handler(payload),
                    None => tracing::warn!(role, "ignored a message that is not a string"),
                },
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    tracing::warn!(role, skipped, "the subscriber fell behind; messages lost");
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}

/// A channel's subscription on one subscriber connection.
struct Subscription {
    client: SubscriberClient,
    channel: String,
    slot: u16,
    cluster: bool,
    role: &'static str,
    subscribed: Arc<AtomicBool>,
}

impl Subscription {
    /// The primary that owns the channel's slot, as this client last saw the cluster (`None`
    /// outside a cluster).
    async fn owner(&self) -> Result<Option<Server>, fred::error::Error> {
        if !self.cluster {
            return Ok(None);
        }
        self.client.sync_cluster().await?;
        Ok(self
            .client
            .cached_cluster_state()
            .and_then(|state| state.get_server(self.slot).cloned()))
    }
}

/// Subscribes whenever the connection is new (a first connect, a reconnect, a failover) or, in a
/// cluster, the channel's slot now belongs to another primary than the one subscribed on.
/// fred's `ssubscribe` returns once Redis confirmed it, so `subscribed` never runs ahead.
fn keep_subscribed(subscription: Subscription) -> JoinHandle<()> {
    let mut reconnects = subscription.client.reconnect_rx();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The primary subscribed on; `None` until subscribed on this connection.
        let mut subscribed_on: Option<Option<Server>> = None;
        loop {
            tokio::select! {
                event = reconnects.recv() => match event {
                    Err(RecvError::Closed) => return,
                    // A lagged receiver still means "reconnected".
                    _ => subscribed_on = None,
                },
                _ = tick.tick() => {}
            }
            if subscribed_on.is_none() {
                subscription.subscribed.store(false, Ordering::Release);
            }
            if !subscription.client.is_connected() {
                continue;
            }
            let Ok(owner) = subscription.owner().await else {
                continue;
            };
            if subscribed_on.as_ref() == Some(&owner) {
                continue;
            }
            if subscribed_on.is_some() {
                tracing::info!(
                    role = subscription.role,
                    "the channel's slot moved; subscribing where it went"
                );
                subscription.subscribed.store(false, Ordering::Release);
            }
            match subscription
                .client
                .ssubscribe(subscription.channel.clone())
                .await
            {
                Ok(()) => {
                    subscribed_on = Some(owner);
                    subscription.subscribed.store(true, Ordering::Release);
                }
                Err(error) => {
                    tracing::warn!(role = subscription.role, %error, "could not subscribe");
                }
            }
        }
    })
}
