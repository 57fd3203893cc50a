//! Local fan-out: which connections on this node are in which room, and handing a frame to
//! every one of them.
//!
//! A frame is serialized and framed once per node and the same bytes are written to every
//! recipient's [`Outbox`]. A recipient whose outbox is full is told to close (slow consumer)
//! and dropped from the room, so one stalled client never grows memory or holds up the rest of
//! its room.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::clock::now_micros;
use crate::metrics;
use crate::protocol::close::Disconnect;
use crate::protocol::{Delivery, DeliveryKind, Epoch, FrameText, Offset, Position, RoomName};
use crate::transport::outbox::{Batch, Outbox};
use crate::transport::wire::WireFrame;

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
    held: Option<Held>,
    /// Chat messages at or before this position were already sent to it by a replay.
    floor: Option<Position>,
    /// It joined while the room held traffic for a repair: everything published since its
    /// join is in the hold, so it missed nothing even if the repair fails.
    late: bool,
}

/// Deliveries waiting while history is read, bounded in count and bytes.
#[derive(Debug, Default)]
struct Held {
    deliveries: Vec<Delivery>,
    bytes: usize,
}

impl Held {
    /// Holds one more delivery; `false` (and nothing held) once that would pass the bounds.
    fn push(&mut self, delivery: &Delivery, max_bytes: usize) -> bool {
        let bytes = self.bytes + delivery.frame.len();
        if self.deliveries.len() >= MAX_HELD || bytes > max_bytes {
            return false;
        }
        self.bytes = bytes;
        self.deliveries.push(delivery.clone());
        true
    }
}

/// Most deliveries held for one member while its replay is read, or for a room while it
/// repairs a gap.
const MAX_HELD: usize = 10_000;

/// Most bytes a room holds while it repairs a gap; past that it resyncs its members.
const MAX_REPAIR_HOLD_BYTES: usize = 16 << 20;

/// A gap the room is repairing: live traffic waits until history has filled it.
#[derive(Debug, Default)]
struct Repair {
    held: Held,
    /// When the first attempt to read history began: the repair bound counts from there, not
    /// from the gap, so an outage of Redis itself does not count against it.
    first_attempt: Option<Instant>,
}

/// A room's members on this node and what has been delivered to them.
#[derive(Debug, Default)]
struct RoomState {
    members: HashMap<ConnId, Member>,
    /// The newest chat message delivered here (or, before any, where the history ended when
    /// the node subscribed). A message at or before it in the same epoch is a duplicate.
    last: Option<Position>,
    /// While the room repairs a gap from history, live traffic waits here.
    repair: Option<Repair>,
}

/// Whether `position` was already passed by `mark` (same history, not later).
fn already_passed(mark: Option<Position>, position: Position) -> bool {
    mark.is_some_and(|mark| mark.epoch == position.epoch && position.offset <= mark.offset)
}

impl RoomState {
    /// Hands one delivery to every member that wants it; returns how many took it.
    fn deliver_now(&mut self, delivery: &Delivery, batch: &mut Batch) -> usize {
        if let DeliveryKind::Chat(position) = delivery.kind {
            if already_passed(self.last, position) {
                return 0;
            }
            // A new epoch on a live subscription means the history expired and started
            // again; nothing was missed, so its offsets simply start a new sequence.
            self.last = Some(position);
        }
        let frame = WireFrame::text(&delivery.frame);
        let mut delivered = 0;
        self.members.retain(|_, member| {
            if delivery.kind == DeliveryKind::Presence && !member.presence {
                return true;
            }
            if let Some(held) = &mut member.held {
                if !held.push(delivery, member.outbox.max_bytes()) {
                    member.outbox.close_slow();
                    return false;
                }
                return true;
            }
            if let DeliveryKind::Chat(position) = delivery.kind
                && already_passed(member.floor, position)
            {
                return true;
            }
            let queued = member.outbox.defer(&frame, batch).is_ok();
            delivered += usize::from(queued);
            queued
        });
        delivered
    }

    /// Gives up a repair: closes every member that may have missed messages so it resumes
    /// elsewhere, and hands the held traffic to those that joined during the repair (when
    /// `keep_late`), who missed nothing. Returns how many members were closed.
    fn resync(&mut self, keep_late: bool) -> usize {
        let mut closed = 0;
        self.members.retain(|_, member| {
            if keep_late && member.late {
                member.late = false;
                return true;
            }
            member.outbox.close_with(Disconnect::Resync);
            closed += 1;
            false
        });
        self.last = None;
        if let Some(repair) = self.repair.take() {
            let mut batch = Batch::default();
            for delivery in repair.held.deliveries {
                self.deliver_now(&delivery, &mut batch);
            }
        }
        closed
    }
}

/// Where a room's repair reads history from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairFrom {
    /// Everything after this offset is wanted.
    pub since: Offset,
    /// The history that offset belongs to; `None` when the room had no history yet.
    pub epoch: Option<Epoch>,
    /// When the first attempt of this repair began.
    pub first_attempt: Instant,
}

/// The members of one room on this node.
#[derive(Debug, Default)]
pub struct Members {
    state: Mutex<RoomState>,
}

impl Members {
    /// Adds a member. With `hold`, its live traffic waits until [`Members::release`].
    pub fn insert(&self, conn: ConnId, outbox: Outbox, presence: bool, hold: bool) {
        let mut state = self.state.lock();
        let member = Member {
            outbox,
            presence,
            held: hold.then(Held::default),
            floor: None,
            late: state.repair.is_some(),
        };
        state.members.insert(conn, member);
    }

    /// Sets where the room's history ended before this node subscribed to it: a repair before
    /// any delivery starts there.
    pub fn set_head(&self, head: Option<Position>) {
        self.state.lock().last = head;
    }

    /// Sends a member its replay, then what was held for it meanwhile, without a gap or a
    /// duplicate at the seam; from then on it gets live traffic directly.
    pub fn release(&self, conn: ConnId, epoch: Option<Epoch>, replay: Vec<(Offset, FrameText)>) {
        let mut state = self.state.lock();
        let Some(member) = state.members.get_mut(&conn) else {
            return;
        };
        let held = member.held.take().unwrap_or_default();
        let mut floor = member.floor;
        let replayed = replay.into_iter().filter_map(|(offset, frame)| {
            let epoch = epoch?;
            Some((DeliveryKind::Chat(Position { offset, epoch }), frame))
        });
        let live = held
            .deliveries
            .into_iter()
            .map(|delivery| (delivery.kind, delivery.frame));
        for (kind, frame) in replayed.chain(live) {
            if let DeliveryKind::Chat(position) = kind {
                if already_passed(floor, position) {
                    continue;
                }
                floor = Some(position);
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
        let mut state = self.state.lock();
        state.members.remove(&conn);
        state.members.is_empty()
    }

    /// Whether nobody on this node is in the room.
    pub fn is_empty(&self) -> bool {
        self.state.lock().members.is_empty()
    }

    /// How many connections on this node are in the room.
    pub fn len(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Writes a delivery to every member now and returns how many took it.
    #[cfg(test)]
    pub fn deliver(&self, delivery: &Delivery) -> usize {
        self.deliver_into(delivery, &mut Batch::default())
    }

    /// Queues a delivery for every member, to be written when `batch` is flushed, and returns
    /// how many took it. Members that are gone or too slow are dropped from the room.
    ///
    /// The lock is held for the whole pass on purpose: deliveries to one room never interleave,
    /// so every member sees the room's frames in the same order.
    pub fn deliver_into(&self, delivery: &Delivery, batch: &mut Batch) -> usize {
        let mut state = self.state.lock();
        match &mut state.repair {
            Some(repair) => {
                if !repair.held.push(delivery, MAX_REPAIR_HOLD_BYTES) {
                    // The gap is not closing fast enough to keep holding: let the members
                    // resume elsewhere rather than grow without bound.
                    let closed = state.resync(false);
                    tracing::warn!(closed, "repair hold overflowed; members resync");
                    metrics::repair("resync");
                }
                0
            }
            None => state.deliver_now(delivery, batch),
        }
    }

    /// Starts holding live traffic because messages may be missing from here on (a repair
    /// already under way keeps its place).
    pub fn hold(&self) {
        let mut state = self.state.lock();
        if state.repair.is_none() {
            state.repair = Some(Repair::default());
            // Whoever is here now may miss what the gap swallows.
            for member in state.members.values_mut() {
                member.late = false;
            }
        }
    }

    /// Where to repair from, when the room holds traffic for a repair.
    pub fn repair_from(&self) -> Option<RepairFrom> {
        let mut state = self.state.lock();
        let last = state.last;
        let repair = state.repair.as_mut()?;
        let first_attempt = *repair.first_attempt.get_or_insert_with(Instant::now);
        Some(RepairFrom {
            since: last.map_or(Offset::ZERO, |last| last.offset),
            epoch: last.map(|last| last.epoch),
            first_attempt,
        })
    }

    /// Delivers what the repair found in history (all of `epoch`), then the held live
    /// traffic, skipping anything already delivered. Returns how many messages it recovered.
    pub fn finish_repair(&self, epoch: Option<Epoch>, found: Vec<(Offset, FrameText)>) -> usize {
        let mut state = self.state.lock();
        let Some(repair) = state.repair.take() else {
            return 0;
        };
        let mut batch = Batch::default();
        let mut recovered = 0;
        for (offset, frame) in found {
            let Some(epoch) = epoch else { break };
            let delivery = Delivery {
                kind: DeliveryKind::Chat(Position { offset, epoch }),
                frame,
                published_at_micros: now_micros(),
            };
            if state.deliver_now(&delivery, &mut batch) > 0 {
                recovered += 1;
            }
        }
        for delivery in repair.held.deliveries {
            state.deliver_now(&delivery, &mut batch);
        }
        recovered
    }

    /// Gives up a repair: closes every member that was here when the gap began with
    /// [`Disconnect::Resync`], so it resumes (from its own last offset, on any node) and
    /// learns whether history is complete; members that joined since get the held traffic.
    /// Returns how many members were closed.
    pub fn resync(&self) -> usize {
        self.state.lock().resync(true)
    }
}

impl RepairFrom {
    /// Whether the repair has been failing for `bound` or longer.
    pub fn overdue(&self, bound: Duration) -> bool {
        self.first_attempt.elapsed() >= bound
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
        let mut rooms = self.rooms.write();
        let entry = rooms.entry(room.clone()).or_default().clone();
        metrics::set_local_rooms(rooms.len());
        entry
    }

    /// The room's entry if it exists.
    pub fn get(&self, room: &str) -> Option<Arc<Room>> {
        self.rooms.read().get(room).cloned()
    }

    /// Removes the room's entry if it is still `entry` (and not a newer one).
    pub fn remove(&self, room: &RoomName, entry: &Arc<Room>) {
        let mut rooms = self.rooms.write();
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
        self.rooms.read().keys().cloned().collect()
    }

    /// Every room with a local member whose name `which` accepts.
    pub fn rooms_where(&self, which: &dyn Fn(&str) -> bool) -> Vec<Arc<Room>> {
        self.rooms
            .read()
            .iter()
            .filter(|(name, _)| which(name.as_str()))
            .map(|(_, room)| room.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::outbox::in_memory;

    fn frame(text: &str) -> Delivery {
        Delivery {
            kind: DeliveryKind::Presence,
            frame: FrameText::from(text.to_owned()),
            published_at_micros: 0,
        }
    }

    fn epoch(name: &str) -> Epoch {
        Epoch::parse(name).unwrap()
    }

    fn chat_in(epoch_name: &str, ms: u64) -> Delivery {
        Delivery {
            kind: DeliveryKind::Chat(Position {
                offset: Offset { ms, seq: 0 },
                epoch: epoch(epoch_name),
            }),
            frame: FrameText::from(ms.to_string()),
            published_at_micros: 0,
        }
    }

    fn chat(ms: u64) -> Delivery {
        chat_in("e1", ms)
    }

    fn stored(offsets: &[u64]) -> Vec<(Offset, FrameText)> {
        offsets
            .iter()
            .map(|&ms| (Offset { ms, seq: 0 }, FrameText::from(ms.to_string())))
            .collect()
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
            Some(Disconnect::SlowConsumer)
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
        members.hold();
        let from = members.repair_from().unwrap();
        assert_eq!(
            (from.since, from.epoch),
            (Offset { ms: 1, seq: 0 }, Some(epoch("e1")))
        );
        members.deliver(&chat(4));
        assert!(
            socket.take_texts().is_empty(),
            "live traffic waits during a repair"
        );
        assert_eq!(
            members.finish_repair(Some(epoch("e1")), stored(&[2, 3, 4])),
            3
        );
        assert_eq!(socket.take_texts(), ["2", "3", "4"]);
        assert_eq!(members.repair_from(), None, "the repair is over");
    }

    #[test]
    fn a_repair_that_fails_keeps_holding_until_it_succeeds() {
        let members = Members::default();
        let (outbox, socket) = in_memory(16);
        members.insert(1, outbox, false, false);
        members.set_head(Some(Position {
            offset: Offset { ms: 3, seq: 0 },
            epoch: epoch("e1"),
        }));
        members.hold();
        // The history read failed: nothing is finished, the hold stays, and the next attempt
        // asks for the same range, counted from the first attempt.
        let first = members.repair_from().unwrap();
        members.deliver(&chat(6));
        let second = members.repair_from().unwrap();
        assert_eq!(first, second);
        assert_eq!(
            second.since,
            Offset { ms: 3, seq: 0 },
            "from the head read at subscribe"
        );
        assert!(socket.take_texts().is_empty());
        members.finish_repair(Some(epoch("e1")), stored(&[4, 5, 6]));
        assert_eq!(socket.take_texts(), ["4", "5", "6"]);
    }

    #[test]
    fn a_resync_closes_every_member_to_resume_elsewhere() {
        let members = Members::default();
        let (a, a_socket) = in_memory(4);
        let (b, b_socket) = in_memory(4);
        members.insert(1, a, false, false);
        members.insert(2, b, false, false);
        members.hold();
        assert_eq!(members.resync(), 2);
        assert!(members.is_empty());
        for socket in [a_socket, b_socket] {
            assert_eq!(socket.close_requested(), Some(Disconnect::Resync));
        }
        assert_eq!(members.repair_from(), None, "nothing left to repair");
    }

    #[test]
    fn a_resync_keeps_members_that_joined_during_the_repair_and_gives_them_the_hold() {
        let members = Members::default();
        let (early, early_socket) = in_memory(4);
        members.insert(1, early, false, false);
        members.hold();
        let (late, late_socket) = in_memory(4);
        members.insert(2, late, false, false);
        members.deliver(&chat(7));
        assert_eq!(members.resync(), 1);
        assert_eq!(early_socket.close_requested(), Some(Disconnect::Resync));
        assert_eq!(late_socket.close_requested(), None);
        assert_eq!(
            late_socket.take_texts(),
            ["7"],
            "what arrived since it joined"
        );
        members.deliver(&chat(8));
        assert_eq!(late_socket.take_texts(), ["8"]);
        // A later gap puts it at risk like everyone else.
        members.hold();
        assert_eq!(members.resync(), 1);
        assert!(members.is_empty());
    }

    #[test]
    fn a_repair_hold_that_overflows_resyncs_instead_of_growing() {
        let members = Members::default();
        let (outbox, socket) = in_memory(4);
        members.insert(1, outbox, false, false);
        members.hold();
        let big = FrameText::from("x".repeat(1 << 20));
        for ms in 0..17 {
            let delivery = Delivery {
                frame: big.clone(),
                ..chat(ms)
            };
            members.deliver(&delivery);
        }
        assert!(
            members.is_empty(),
            "members resync once more than 16 MiB would be held"
        );
        assert_eq!(socket.close_requested(), Some(Disconnect::Resync));
    }

    #[test]
    fn a_new_epoch_on_a_live_subscription_is_delivered_from_its_first_offset() {
        let members = Members::default();
        let (outbox, socket) = in_memory(16);
        members.insert(1, outbox, false, false);
        members.deliver(&chat_in("e1", 50));
        // The history expired and began again: lower offsets of another epoch are new.
        members.deliver(&chat_in("e2", 10));
        members.deliver(&chat_in("e2", 10));
        assert_eq!(socket.take_texts(), ["50", "10"]);
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
        members.release(1, Some(epoch("e1")), stored(&[4, 5]));
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
