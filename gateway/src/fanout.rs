//! Local fan-out: which connections on this node are in which room, and handing a frame to
//! every one of them.
//!
//! A frame is serialized and framed once per node and the same bytes are written to every
//! recipient's [`Outbox`]. A recipient whose outbox is full is told to close (slow consumer)
//! and dropped from the room, so one stalled client never grows memory or holds up the rest of
//! its room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tungstenite::Utf8Bytes;

use crate::broker::{Delivery, DeliveryKind, now_micros};
use crate::lock;
use crate::metrics;
use crate::outbox::{Batch, Outbox};
use crate::protocol::{Offset, RoomName};
use crate::wire::WireFrame;

/// Identifies one connection on this node.
pub type ConnId = u64;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id, unique on this node.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// One connection's membership in a room.
#[derive(Debug)]
struct Member {
    outbox: Outbox,
    /// Receives `presence_event` frames.
    presence: bool,
    /// While its replay is read from history, live traffic waits here.
    held: Option<Vec<Delivery>>,
    /// Chat messages at or below this offset were already sent to it by a replay.
    floor: Option<Offset>,
}

/// Most deliveries held for one member while its replay is read; past this it is a slow consumer.
const MAX_HELD: usize = 10_000;

/// A room's members on this node and what has been delivered to them.
#[derive(Debug, Default)]
struct RoomState {
    members: HashMap<ConnId, Member>,
    /// The newest chat offset delivered here; anything at or below it is a duplicate.
    last_offset: Option<Offset>,
    /// While the room repairs a gap from history, live traffic waits here.
    repair_hold: Option<Vec<Delivery>>,
}

impl RoomState {
    /// Hands one delivery to every member that wants it; returns how many took it.
    fn deliver_now(&mut self, delivery: &Delivery, batch: &mut Batch) -> usize {
        if let DeliveryKind::Chat(offset) = delivery.kind {
            if self.last_offset.is_some_and(|last| last >= offset) {
                return 0;
            }
            self.last_offset = Some(offset);
        }
        let frame = WireFrame::text(&delivery.frame);
        let mut delivered = 0;
        self.members.retain(|_, member| {
            if delivery.kind == DeliveryKind::Presence && !member.presence {
                return true;
            }
            if let Some(held) = &mut member.held {
                held.push(delivery.clone());
                if held.len() > MAX_HELD {
                    member.outbox.close_slow();
                    return false;
                }
                return true;
            }
            if let (DeliveryKind::Chat(offset), Some(floor)) = (delivery.kind, member.floor)
                && offset <= floor
            {
                return true;
            }
            let queued = member.outbox.defer(&frame, batch).is_ok();
            delivered += usize::from(queued);
            queued
        });
        delivered
    }
}

/// The members of one room on this node.
#[derive(Debug, Default)]
pub struct Members {
    state: Mutex<RoomState>,
}

impl Members {
    /// Adds a member. With `hold`, its live traffic waits until [`Members::release`].
    pub fn insert(&self, conn: ConnId, outbox: Outbox, presence: bool, hold: bool) {
        let member = Member {
            outbox,
            presence,
            held: hold.then(Vec::new),
            floor: None,
        };
        lock(&self.state).members.insert(conn, member);
    }

    /// Sends a member its replay, then what was held for it meanwhile, without a gap or a
    /// duplicate at the seam; from then on it gets live traffic directly.
    pub fn release(&self, conn: ConnId, replay: Vec<(Offset, Utf8Bytes)>) {
        let mut state = lock(&self.state);
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        let held = member.held.take().unwrap_or_default();
        let mut floor = member.floor;
        let replayed = replay
            .into_iter()
            .map(|(offset, frame)| (DeliveryKind::Chat(offset), frame));
        let live = held
            .into_iter()
            .map(|delivery| (delivery.kind, delivery.frame));
        for (kind, frame) in replayed.chain(live) {
            if let DeliveryKind::Chat(offset) = kind {
                if floor.is_some_and(|floor| offset <= floor) {
                    continue;
                }
                floor = Some(offset);
            }
            if member.outbox.push(&WireFrame::text(&frame)).is_err() {
                state.members.remove(&conn);
                return;
            }
        }
        member.floor = floor;
    }

    /// Removes a member and says whether the room is now empty on this node.
    pub fn remove(&self, conn: ConnId) -> bool {
        let mut state = lock(&self.state);
        state.members.remove(&conn);
        state.members.is_empty()
    }

    /// Whether nobody on this node is in the room.
    pub fn is_empty(&self) -> bool {
        lock(&self.state).members.is_empty()
    }

    /// How many connections on this node are in the room.
    pub fn len(&self) -> usize {
        lock(&self.state).members.len()
    }

    /// Writes a delivery to every member now and returns how many took it.
    pub fn deliver(&self, delivery: &Delivery) -> usize {
        self.deliver_into(delivery, &mut Batch::default())
    }

    /// Queues a delivery for every member, to be written when `batch` is flushed, and returns
    /// how many took it. Members that are gone or too slow are dropped from the room.
    ///
    /// The lock is held for the whole pass on purpose: deliveries to one room never interleave,
    /// so every member sees the room's frames in the same order.
    pub fn deliver_into(&self, delivery: &Delivery, batch: &mut Batch) -> usize {
        let mut state = lock(&self.state);
        match &mut state.repair_hold {
            Some(held) => {
                held.push(delivery.clone());
                0
            }
            None => state.deliver_now(delivery, batch),
        }
    }

    /// Starts repairing a gap: holds live traffic and returns the offset to repair from, or
    /// `None` when there is nothing to repair from (or a repair is already running).
    pub fn begin_repair(&self) -> Option<Offset> {
        let mut state = lock(&self.state);
        if state.repair_hold.is_some() {
            return None;
        }
        let since = state.last_offset?;
        state.repair_hold = Some(Vec::new());
        Some(since)
    }

    /// Delivers what the repair found in history, then the held live traffic, skipping
    /// anything already delivered. Returns how many messages the repair recovered.
    pub fn finish_repair(&self, found: Vec<(Offset, Utf8Bytes)>) -> usize {
        let mut state = lock(&self.state);
        let held = state.repair_hold.take().unwrap_or_default();
        let mut batch = Batch::default();
        let mut recovered = 0;
        for (offset, frame) in found {
            let delivery = Delivery {
                kind: DeliveryKind::Chat(offset),
                frame,
                published_at_micros: now_micros(),
            };
            if state.deliver_now(&delivery, &mut batch) > 0 {
                recovered += 1;
            }
        }
        for delivery in held {
            state.deliver_now(&delivery, &mut batch);
        }
        recovered
    }
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
        let mut rooms = self.write();
        let entry = rooms.entry(room.clone()).or_default().clone();
        metrics::set_local_rooms(rooms.len());
        entry
    }

    /// The room's entry if it exists.
    pub fn get(&self, room: &str) -> Option<Arc<Room>> {
        self.read().get(room).cloned()
    }

    /// Removes the room's entry if it is still `entry` (and not a newer one).
    pub fn remove(&self, room: &RoomName, entry: &Arc<Room>) {
        let mut rooms = self.write();
        if rooms
            .get(room)
            .is_some_and(|current| Arc::ptr_eq(current, entry))
        {
            rooms.remove(room);
        }
        metrics::set_local_rooms(rooms.len());
    }

    /// Writes a delivery to every local member of `room`; returns how many took it. (The node
    /// itself always delivers in batches, through [`Registry::deliver_into`].)
    #[cfg(test)]
    pub fn deliver(&self, room: &str, delivery: &Delivery) -> usize {
        self.deliver_into(room, delivery, &mut Batch::default())
    }

    /// Queues a delivery for every local member of `room`, written when `batch` is flushed;
    /// returns how many took it.
    pub fn deliver_into(&self, room: &str, delivery: &Delivery, batch: &mut Batch) -> usize {
        match self.get(room) {
            Some(entry) => entry.members.deliver_into(delivery, batch),
            None => 0,
        }
    }

    /// The names of every room with a local member.
    pub fn room_names(&self) -> Vec<RoomName> {
        self.read().keys().cloned().collect()
    }

    // The map stays consistent after any single insert or remove, so a poisoned lock (a panic
    // elsewhere while it was held) carries no information: recover the data, as `lock` does.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<RoomName, Arc<Room>>> {
        self.rooms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<RoomName, Arc<Room>>> {
        self.rooms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{CloseReason, in_memory};

    fn frame(text: &str) -> Delivery {
        Delivery {
            kind: DeliveryKind::Presence,
            frame: Utf8Bytes::from(text),
            published_at_micros: 0,
        }
    }

    fn chat(ms: u64) -> Delivery {
        Delivery {
            kind: DeliveryKind::Chat(Offset { ms, seq: 0 }),
            frame: Utf8Bytes::from(ms.to_string()),
            published_at_micros: 0,
        }
    }

    #[test]
    fn every_member_gets_the_frame() {
        let registry = Registry::default();
        let room = RoomName::parse("lobby").unwrap();
        let entry = registry.entry(&room);
        let mut sockets = Vec::new();
        for conn in 0..3 {
            let (outbox, socket) = in_memory(4);
            entry.members.insert(conn, outbox, true, false);
            sockets.push(socket);
        }
        assert_eq!(registry.deliver("lobby", &frame("one")), 3);
        for socket in &sockets {
            assert_eq!(socket.take_texts(), ["one"]);
        }
    }

    #[test]
    fn rooms_are_isolated() {
        let registry = Registry::default();
        let (outbox, socket) = in_memory(4);
        registry
            .entry(&RoomName::parse("a").unwrap())
            .members
            .insert(1, outbox, true, false);
        registry.entry(&RoomName::parse("b").unwrap());
        assert_eq!(registry.deliver("b", &frame("for b")), 0);
        assert_eq!(registry.deliver("nobody", &frame("x")), 0);
        assert!(socket.take_texts().is_empty());
    }

    #[test]
    fn a_full_outbox_is_closed_as_slow_consumer_and_dropped_without_stalling_others() {
        let members = Members::default();
        let (slow, slow_socket) = in_memory(2);
        let (fast, fast_socket) = in_memory(2);
        slow_socket.stall(true);
        members.insert(1, slow, true, false);
        members.insert(2, fast, true, false);
        for i in 0..5 {
            members.deliver(&frame(&i.to_string()));
            assert_eq!(
                fast_socket.take_texts(),
                [i.to_string()],
                "fast member got frame {i}"
            );
        }
        assert_eq!(members.len(), 1, "the slow member was dropped");
        assert_eq!(
            slow_socket.close_requested(),
            Some(CloseReason::SLOW_CONSUMER)
        );
    }

    #[test]
    fn duplicates_are_dropped_and_a_repair_fills_the_gap_in_order() {
        let members = Members::default();
        let (outbox, socket) = in_memory(16);
        members.insert(1, outbox, false, false);
        members.deliver(&chat(1));
        members.deliver(&chat(1));
        assert_eq!(
            socket.take_texts(),
            ["1"],
            "a redelivered offset is not sent twice"
        );
        // Messages 2 and 3 were missed; 4 arrives live while the repair reads history.
        assert_eq!(members.begin_repair(), Some(Offset { ms: 1, seq: 0 }));
        members.deliver(&chat(4));
        assert!(
            socket.take_texts().is_empty(),
            "live traffic waits during a repair"
        );
        let found = [2, 3, 4].map(|ms| (Offset { ms, seq: 0 }, Utf8Bytes::from(ms.to_string())));
        assert_eq!(members.finish_repair(found.to_vec()), 3);
        assert_eq!(socket.take_texts(), ["2", "3", "4"]);
    }

    #[test]
    fn a_held_member_gets_its_replay_then_live_traffic_without_duplicates() {
        let members = Members::default();
        let (outbox, socket) = in_memory(16);
        members.insert(1, outbox, false, true);
        members.deliver(&chat(5));
        members.deliver(&chat(6));
        assert!(socket.take_texts().is_empty());
        // The replay read history up to 5; 5 arrived live too and must not repeat.
        let replay = [4, 5].map(|ms| (Offset { ms, seq: 0 }, Utf8Bytes::from(ms.to_string())));
        members.release(1, replay.to_vec());
        assert_eq!(socket.take_texts(), ["4", "5", "6"]);
        members.deliver(&chat(7));
        assert_eq!(socket.take_texts(), ["7"]);
    }

    #[test]
    fn presence_events_reach_only_members_who_asked_for_them() {
        let members = Members::default();
        let (watcher, watcher_socket) = in_memory(4);
        let (plain, plain_socket) = in_memory(4);
        members.insert(1, watcher, true, false);
        members.insert(2, plain, false, false);
        assert_eq!(members.deliver(&frame("presence")), 1);
        assert_eq!(watcher_socket.take_texts(), ["presence"]);
        assert!(plain_socket.take_texts().is_empty());
    }

    #[test]
    fn a_closed_connection_is_dropped_from_its_rooms() {
        let members = Members::default();
        let (outbox, _socket) = in_memory(2);
        members.insert(1, outbox.clone(), true, false);
        outbox.seal();
        assert_eq!(members.deliver(&frame("x")), 0);
        assert!(members.is_empty());
    }
}
