//! The receive side: one subscriber connection per node (in a Redis Cluster, one per primary)
//! read by several receive loops (partitions, by room), so fan-out uses more than one core while
//! each room keeps one order. One connection rather than one per partition: Redis writes a
//! connection's pending messages with one system call each time it runs, so every connection
//! a call's messages reach costs it a write (and a wake-up of the reader).
//!
//! Rooms are shard channels (`SSUBSCRIBE`): in a Redis Cluster each is subscribed on the primary
//! that owns its slot, and a message travels only within that shard. A partition keeps the set
//! of rooms it wants and makes Redis agree after anything that may have lost messages: a lag, a
//! reconnect (a failover, a restart), a slot that moved to another primary (seen by the
//! broker's topology watch). Each time, its rooms hold their live traffic, the subscriptions are restored, and
//! the hub repairs the gap from history.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface};
use fred::types::config::{Options, Server};
use fred::types::{ClusterHash, Message};
use parking_lot::Mutex;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::keys::KeySpace;
use crate::broker::{BrokerError, SharedInbox, decode_envelope, partition_of};
use crate::metrics;
use crate::protocol::RoomName;

/// Most pub/sub messages delivered as one batch before their frames are written.
const MAX_BATCH: usize = 256;

/// How long to wait before trying a failed resubscription again.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(500);

/// The rooms routed to one receive loop, and that loop.
pub(super) struct Partition {
    subscriptions: Arc<Subscriptions>,
    tasks: Vec<JoinHandle<()>>,
}

/// A partition's rooms: the channels it wants (with the primary each was subscribed on, in a
/// cluster) and the commands that make Redis agree.
///
/// The wanted set is kept here rather than taken from fred's tracking, which keeps a channel
/// whose unsubscribe failed (during an outage, say) and would subscribe it again after every
/// reconnect.
struct Subscriptions {
    client: SubscriberClient,
    keys: KeySpace,
    cluster: bool,
    /// Room → the primary its subscription is on (`None` outside a cluster, or not known yet).
    wanted: Mutex<BTreeMap<RoomName, Option<Server>>>,
}

impl Partition {
    /// Starts partition `index` of `count` on `client`, which every partition reads and the
    /// broker keeps connected, delivering this partition's rooms' messages into `inbox`.
    pub(super) fn start(
        index: usize,
        count: usize,
        client: SubscriberClient,
        keys: KeySpace,
        topology: Option<watch::Receiver<u64>>,
        inbox: SharedInbox,
    ) -> Partition {
        let cluster = topology.is_some();
        let subscriptions = Arc::new(Subscriptions {
            client: client.clone(),
            keys: keys.clone(),
            cluster,
            wanted: Mutex::default(),
        });
        let mine = move |room: &str| partition_of(room, count) == index;
        let mut tasks = vec![
            receive_loop(client.message_rx(), keys, inbox.clone(), mine),
            resubscribe_after_reconnects(subscriptions.clone(), inbox.clone(), mine),
        ];
        if let Some(topology) = topology {
            tasks.push(follow_slot_moves(subscriptions.clone(), topology, inbox));
        }
        Partition {
            subscriptions,
            tasks,
        }
    }

    pub(super) async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.subscriptions.add(room).await
    }

    pub(super) async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.subscriptions.remove(room).await
    }

    pub(super) fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Subscriptions {
    /// Subscribes to `room`'s channel, returning once Redis has processed it: fred treats the
    /// `ssubscribe` confirmation as the command's reply, so every message published after it
    /// reaches this node.
    async fn add(&self, room: &RoomName) -> Result<(), BrokerError> {
        if !self.client.is_connected() {
            return Err(BrokerError::Unavailable("redis is not connected"));
        }
        // Wanted before it is sent: a reconnect in between then subscribes it again.
        self.wanted.lock().insert(room.clone(), None);
        match self.subscribe(room).await {
            Ok(owner) => {
                if let Some(wanted) = self.wanted.lock().get_mut(room) {
                    *wanted = owner;
                }
                Ok(())
            }
            Err(error) => {
                self.wanted.lock().remove(room);
                Err(error)
            }
        }
    }

    /// Unsubscribes from `room`'s channel; a failure leaves nothing to retry, since a
    /// reconnect does not subscribe it again.
    async fn remove(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.wanted.lock().remove(room);
        let channel = self.keys.channel(room);
        Ok(self.client.sunsubscribe(channel).await?)
    }

    /// One `SSUBSCRIBE` (fred sends one channel per command: a reply per channel would
    /// otherwise be taken for the replies of the commands behind it); returns the primary it
    /// went to, in a cluster.
    async fn subscribe(&self, room: &RoomName) -> Result<Option<Server>, BrokerError> {
        let channel = self.keys.channel(room);
        self.client.ssubscribe(channel).await?;
        Ok(self.owner(room))
    }

    /// The primary that owns `room`'s slot, as this client last saw the cluster.
    fn owner(&self, room: &RoomName) -> Option<Server> {
        if !self.cluster {
            return None;
        }
        let slot = self.keys.slot(room);
        self.client
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).cloned())
    }

    /// Subscribes the connection(s) again to `rooms`.
    async fn restore(&self, rooms: &[RoomName]) -> Result<(), BrokerError> {
        for room in rooms {
            if !self.wanted.lock().contains_key(room) {
                // Left meanwhile.
                continue;
            }
            let owner = self.subscribe(room).await?;
            if let Some(wanted) = self.wanted.lock().get_mut(room) {
                *wanted = owner;
            }
        }
        // A PING per primary behind them (on a shard connection it waits for every command
        // sent before it), so the restore is in effect when this returns.
        let mut slots: BTreeMap<Option<Server>, u16> = BTreeMap::new();
        for room in rooms {
            slots
                .entry(self.owner(room))
                .or_insert(self.keys.slot(room));
        }
        for slot in slots.into_values() {
            let routed = self.client.with_options(&Options {
                cluster_hash: Some(ClusterHash::Custom(slot)),
                ..Options::default()
            });
            // While subscribed, Redis answers PING with ["pong", ""] rather than PONG.
            let _: fred::types::Value = routed.ping(None).await?;
        }
        Ok(())
    }

    /// Restores `rooms`, retrying while the connection stays up; returns whether it worked.
    async fn restore_while_connected(&self, rooms: &[RoomName]) -> bool {
        loop {
            match self.restore(rooms).await {
                Ok(()) => return true,
                Err(_) if !self.client.is_connected() => return false,
                Err(error) => {
                    tracing::warn!(%error, "could not resubscribe; retrying");
                    tokio::time::sleep(RESUBSCRIBE_RETRY).await;
                }
            }
        }
    }

    fn rooms(&self) -> Vec<RoomName> {
        self.wanted.lock().keys().cloned().collect()
    }

    /// Rooms whose slot now belongs to another primary than the one they were subscribed on.
    fn moved(&self) -> Vec<RoomName> {
        let wanted: Vec<(RoomName, Option<Server>)> = self
            .wanted
            .lock()
            .iter()
            .map(|(room, owner)| (room.clone(), owner.clone()))
            .collect();
        wanted
            .into_iter()
            .filter(|(room, owner)| owner.is_some() && self.owner(room) != *owner)
            .map(|(room, _)| room)
            .collect()
    }
}

/// Reads every pub/sub message of the connection and hands the partition's to the inbox,
/// surviving lag.
/// Whatever has arrived by the time one message is read is delivered with it as one batch.
fn receive_loop(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    keys: KeySpace,
    inbox: SharedInbox,
    mine: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut received = Some(messages.recv().await);
            let mut taken = 0;
            while let Some(result) = received {
                match result {
                    Ok(message) => deliver(&message, &keys, &inbox, &mine),
                    Err(RecvError::Lagged(skipped)) => {
                        metrics::broker_lagged(skipped);
                        tracing::warn!(skipped, "redis subscriber lagged; repairing from history");
                        // Held before anything newer is delivered, so the repair starts from
                        // the last message delivered before the lost ones.
                        inbox.hold(&mine);
                        inbox.repair();
                    }
                    Err(RecvError::Closed) => {
                        inbox.flush();
                        return;
                    }
                }
                taken += 1;
                received = if taken < MAX_BATCH {
                    already_waiting(&mut messages)
                } else {
                    None
                };
            }
            inbox.flush();
        }
    })
}

/// The next message if one is already waiting, as `recv` would have returned it.
fn already_waiting(
    messages: &mut tokio::sync::broadcast::Receiver<Message>,
) -> Option<Result<Message, RecvError>> {
    match messages.try_recv() {
        Ok(message) => Some(Ok(message)),
        Err(TryRecvError::Lagged(skipped)) => Some(Err(RecvError::Lagged(skipped))),
        Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
        Err(TryRecvError::Empty) => None,
    }
}

/// Hands one pub/sub message on a room channel of this partition to the inbox (the connection
/// carries every partition's rooms).
fn deliver(message: &Message, keys: &KeySpace, inbox: &SharedInbox, mine: impl Fn(&str) -> bool) {
    let Some(room) = keys.room_of_channel(&message.channel) else {
        return;
    };
    if !mine(room) {
        return;
    }
    match message.value.as_bytes().and_then(decode_envelope) {
        Some(delivery) => inbox.deliver(room, delivery),
        None => tracing::warn!(room, "ignored a malformed message on a room channel"),
    }
}

/// After every reconnect (of any of a cluster client's connections), holds the partition's
/// rooms, subscribes them again, then has the hub repair what was published meanwhile (in that
/// order, so nothing falls between).
///
/// fred's own `manage_subscriptions` is not used: on every connect it sends `SUBSCRIBE` and
/// `PSUBSCRIBE` without arguments when nothing is tracked, which Redis rejects, and those error
/// replies would be taken as the answer to a confirming `PING` in flight.
fn resubscribe_after_reconnects(
    subscriptions: Arc<Subscriptions>,
    inbox: SharedInbox,
    mine: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> JoinHandle<()> {
    let mut reconnects = subscriptions.client.reconnect_rx();
    tokio::spawn(async move {
        // A lagged receiver still means "reconnected": only a closed one ends the task.
        while !matches!(reconnects.recv().await, Err(RecvError::Closed)) {
            let rooms = subscriptions.rooms();
            if rooms.is_empty() {
                continue;
            }
            // Before the first subscription of the new connection: whatever it delivers must
            // wait until the messages published while it was away are in place.
            inbox.hold(&mine);
            if !subscriptions.restore_while_connected(&rooms).await {
                // Lost again: the next reconnect restores them and repairs the gap.
                continue;
            }
            inbox.repair();
        }
    })
}

/// Whenever the cluster's slot map changes (a reshard, a failover), asks Redis where every
/// slot is now (fred opens a connection for that, so only on a change) and moves the rooms
/// whose slot went to another primary: Redis has dropped their subscription on the old one,
/// and messages go to the new one. The moved rooms hold their traffic, are subscribed where
/// their slot went, and are repaired from history, which moved with the slot.
fn follow_slot_moves(
    subscriptions: Arc<Subscriptions>,
    mut topology: watch::Receiver<u64>,
    inbox: SharedInbox,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while topology.changed().await.is_ok() {
            if !subscriptions.client.is_connected()
                || subscriptions.client.sync_cluster().await.is_err()
            {
                continue;
            }
            let moved = subscriptions.moved();
            if moved.is_empty() {
                continue;
            }
            tracing::info!(
                rooms = moved.len(),
                "room slots moved; subscribing where they went"
            );
            let names: Vec<String> = moved.iter().map(ToString::to_string).collect();
            inbox.hold(&|room: &str| names.iter().any(|name| name == room));
            // Until the moved rooms are subscribed where they went: a connection that drops
            // meanwhile may come back without a reconnect of the whole client, so nothing else
            // would take them up (the hub resyncs rooms held too long, as a last resort).
            while !subscriptions.restore_while_connected(&moved).await {
                tracing::warn!(
                    rooms = moved.len(),
                    "could not subscribe moved rooms while disconnected; retrying"
                );
                tokio::time::sleep(RESUBSCRIBE_RETRY).await;
            }
            inbox.repair();
        }
    })
}
