//! Local fan-out: which connections on this node are in which room, and handing a frame to
//! every one of them.
//!
//! A frame is serialized once per node and shared: each recipient gets a reference-counted
//! clone of the same bytes pushed onto its bounded [`Outbox`]. A recipient whose outbox is full
//! is told to close (slow consumer) and dropped from the room, so one stalled client never
//! grows memory or holds up the rest of its room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

use crate::metrics;
use crate::protocol::{RoomName, close_code};

/// Identifies one connection on this node.
pub type ConnId = u64;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id, unique on this node.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// Why the server is closing a connection: a WebSocket close code and a short reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Human-readable reason sent in the close frame.
    pub reason: &'static str,
}

impl CloseReason {
    /// The outbox overflowed.
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: close_code::SLOW_CONSUMER,
        reason: "slow consumer: outgoing queue full",
    };
}

/// Shared between an [`Outbox`] and its [`OutboxReceiver`]: a request to close, set once.
#[derive(Debug, Default)]
struct CloseSignal {
    reason: OnceLock<CloseReason>,
    notify: Notify,
}

/// The sending side of one connection's bounded outgoing queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    frames: mpsc::Sender<Utf8Bytes>,
    close: Arc<CloseSignal>,
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue was full; the connection has been told to close as a slow consumer.
    #[error("outgoing queue full")]
    Full,
    /// The connection is already gone.
    #[error("connection closed")]
    Closed,
}

impl Outbox {
    /// A new outbox holding at most `capacity` frames, and the receiver its writer drains.
    pub fn channel(capacity: usize) -> (Outbox, OutboxReceiver) {
        let (frames, receiver) = mpsc::channel(capacity.max(1));
        let close = Arc::new(CloseSignal::default());
        (
            Outbox {
                frames,
                close: close.clone(),
            },
            OutboxReceiver {
                frames: receiver,
                close,
            },
        )
    }

    /// Queues a frame without waiting. A full queue closes the connection as a slow consumer.
    pub fn push(&self, frame: Utf8Bytes) -> Result<(), QueueError> {
        match self.frames.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.close_with(CloseReason::SLOW_CONSUMER) {
                    metrics::slow_consumer_disconnect();
                }
                Err(QueueError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
        }
    }

    /// Asks the connection to close. Only the first request counts; returns whether it was this one.
    pub fn close_with(&self, reason: CloseReason) -> bool {
        let first = self.close.reason.set(reason).is_ok();
        if first {
            self.close.notify.notify_waiters();
        }
        first
    }
}

/// The receiving side of an outbox, owned by the connection's writer.
#[derive(Debug)]
pub struct OutboxReceiver {
    frames: mpsc::Receiver<Utf8Bytes>,
    close: Arc<CloseSignal>,
}

/// Watches for a close request on one connection; held apart from the receiver so a writer
/// can wait for it while it is busy writing.
#[derive(Debug, Clone)]
pub struct CloseWatch(Arc<CloseSignal>);

impl CloseWatch {
    /// Resolves when someone asked this connection to close, with the reason.
    pub async fn requested(&self) -> CloseReason {
        loop {
            // Register interest before checking, so a close between the check and the wait
            // still wakes us.
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.0.reason.get() {
                return *reason;
            }
            notified.await;
        }
    }
}

impl OutboxReceiver {
    /// A watch on this connection's close requests.
    pub fn close_watch(&self) -> CloseWatch {
        CloseWatch(self.close.clone())
    }

    /// The next queued frame; `None` once every [`Outbox`] is dropped.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        self.frames.recv().await
    }

    /// A queued frame if one is ready now.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        self.frames.try_recv().ok()
    }
}

/// The members of one room on this node.
#[derive(Debug, Default)]
pub struct Members {
    by_conn: Mutex<HashMap<ConnId, Outbox>>,
}

impl Members {
    /// Adds a member; a connection already present is replaced.
    pub fn insert(&self, conn: ConnId, outbox: Outbox) {
        lock(&self.by_conn).insert(conn, outbox);
    }

    /// Removes a member and says whether the room is now empty on this node.
    pub fn remove(&self, conn: ConnId) -> bool {
        let mut members = lock(&self.by_conn);
        members.remove(&conn);
        members.is_empty()
    }

    /// Whether nobody on this node is in the room.
    pub fn is_empty(&self) -> bool {
        lock(&self.by_conn).is_empty()
    }

    /// How many connections on this node are in the room.
    pub fn len(&self) -> usize {
        lock(&self.by_conn).len()
    }

    /// Queues `frame` for every member and returns how many took it. Members that are gone
    /// or too slow are dropped from the room.
    ///
    /// The lock is held for the whole pass on purpose: deliveries to one room never interleave,
    /// so every member sees the room's frames in the same order.
    pub fn deliver(&self, frame: &Utf8Bytes) -> usize {
        let mut members = lock(&self.by_conn);
        members.retain(|_, outbox| outbox.push(frame.clone()).is_ok());
        members.len()
    }
}

/// Locks a mutex, recovering the data if a previous holder panicked: the maps guarded here
/// stay consistent after any single insert or remove, so poisoning carries no information.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A room with at least one member on this node.
#[derive(Debug, Default)]
pub struct Room {
    /// This node's members of the room.
    pub members: Members,
    /// Serializes this node's broker subscription changes for the room; see `hub`.
    pub subscription: tokio::sync::Mutex<SubscriptionState>,
}

/// Whether this node is subscribed to a room's broker channel.
#[derive(Debug, Default)]
pub struct SubscriptionState {
    /// The broker confirmed the subscription.
    pub subscribed: bool,
    /// The room was removed from the registry; whoever holds this entry must look it up again.
    pub retired: bool,
}

/// Every room with a member on this node.
#[derive(Debug, Default)]
pub struct Registry {
    rooms: RwLock<HashMap<RoomName, Arc<Room>>>,
}

impl Registry {
    /// The room's entry, created if it does not exist yet.
    pub fn entry(&self, room: &RoomName) -> Arc<Room> {
        if let Some(existing) = self.get(room.as_str()) {
            return existing;
        }
        let mut rooms = self
            .rooms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = rooms.entry(room.clone()).or_default().clone();
        metrics::set_local_rooms(rooms.len());
        entry
    }

    /// The room's entry if it exists.
    pub fn get(&self, room: &str) -> Option<Arc<Room>> {
        self.rooms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(room)
            .cloned()
    }

    /// Removes the room's entry if it is still `entry` (and not a newer one).
    pub fn remove(&self, room: &RoomName, entry: &Arc<Room>) {
        let mut rooms = self
            .rooms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if rooms
            .get(room)
            .is_some_and(|current| Arc::ptr_eq(current, entry))
        {
            rooms.remove(room);
        }
        metrics::set_local_rooms(rooms.len());
    }

    /// Queues `frame` for every local member of `room`; returns how many took it.
    pub fn deliver(&self, room: &str, frame: &Utf8Bytes) -> usize {
        match self.get(room) {
            Some(entry) => entry.members.deliver(frame),
            None => 0,
        }
    }

    /// The names of every room with a local member.
    pub fn room_names(&self) -> Vec<RoomName> {
        self.rooms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Utf8Bytes {
        Utf8Bytes::from(text)
    }

    #[tokio::test]
    async fn every_member_gets_the_same_shared_frame() {
        let registry = Registry::default();
        let room = RoomName::parse("lobby").unwrap();
        let entry = registry.entry(&room);
        let mut receivers = Vec::new();
        for conn in 0..3 {
            let (outbox, receiver) = Outbox::channel(4);
            entry.members.insert(conn, outbox);
            receivers.push(receiver);
        }
        assert_eq!(registry.deliver("lobby", &frame("one")), 3);
        for receiver in &mut receivers {
            assert_eq!(receiver.try_recv().as_deref(), Some("one"));
            assert_eq!(receiver.try_recv(), None);
        }
    }

    #[tokio::test]
    async fn rooms_are_isolated() {
        let registry = Registry::default();
        let (outbox, mut receiver) = Outbox::channel(4);
        registry
            .entry(&RoomName::parse("a").unwrap())
            .members
            .insert(1, outbox);
        registry.entry(&RoomName::parse("b").unwrap());
        assert_eq!(registry.deliver("b", &frame("for b")), 0);
        assert_eq!(registry.deliver("nobody", &frame("x")), 0);
        assert_eq!(receiver.try_recv(), None);
    }

    #[tokio::test]
    async fn a_full_outbox_is_closed_as_slow_consumer_and_dropped_without_stalling_others() {
        let members = Members::default();
        let (slow, slow_receiver) = Outbox::channel(2);
        let (fast, mut fast_receiver) = Outbox::channel(16);
        members.insert(1, slow);
        members.insert(2, fast);
        for i in 0..5 {
            members.deliver(&frame(&i.to_string()));
            assert!(
                fast_receiver.try_recv().is_some(),
                "fast member got frame {i}"
            );
        }
        assert_eq!(members.len(), 1, "the slow member was dropped");
        let reason = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            slow_receiver.close_watch().requested(),
        )
        .await
        .expect("close was requested");
        assert_eq!(reason, CloseReason::SLOW_CONSUMER);
    }

    #[tokio::test]
    async fn a_closed_connection_is_dropped_from_its_rooms() {
        let members = Members::default();
        let (outbox, receiver) = Outbox::channel(2);
        members.insert(1, outbox);
        drop(receiver);
        assert_eq!(members.deliver(&frame("x")), 0);
        assert!(members.is_empty());
    }

    #[tokio::test]
    async fn the_first_close_reason_wins() {
        let (outbox, receiver) = Outbox::channel(1);
        let other = CloseReason {
            code: 1001,
            reason: "going away",
        };
        assert!(outbox.close_with(other));
        assert!(!outbox.close_with(CloseReason::SLOW_CONSUMER));
        assert_eq!(receiver.close_watch().requested().await, other);
    }
}
