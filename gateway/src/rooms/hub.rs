//! The hub ties local fan-out to the broker: it keeps this node subscribed to exactly the rooms
//! that have a local member, routes what the broker delivers to those members, replays history
//! to members that resume, repairs gaps after the broker missed messages, keeps this node's
//! presence entries alive, and carries out on this node's connections the commands every node
//! receives from the application's backend (through [`LocalUsers`]).
//!
//! Subscriptions are reference-counted by room membership: the first local member subscribes
//! the node to the room's channel, the last one to leave unsubscribes it. Changes for one room
//! are serialized by that room's subscription lock, so a leave racing a join can never leave
//! the node unsubscribed from a room that has members.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::{
    Broker, BrokerError, Command, CommandHandler, Delivery, DirectHandler, History,
    HistorySettings, InProcessBroker, Inbox, Outgoing, Published, RedisBroker, RedisSettings,
    SharedInbox,
};
use crate::clock::now_micros;
use crate::metrics;
use crate::protocol::{JoinOptions, PresentUser, Replay, RoomName};
use crate::rooms::fanout::{ConnId, Registry, RepairFrom, Room};
use crate::rooms::users::LocalUsers;
use crate::transport::outbox::{Batch, Outbox};

/// Hands broker deliveries to the local registry and records fan-out metrics.
struct FanoutInbox {
    registry: Arc<Registry>,
    /// Wakes the repair task.
    repairs: Arc<Notify>,
    /// Set when rooms are held, so the repair task watches how long they wait.
    held: Arc<AtomicBool>,
    /// What the broker delivered since its last flush.
    batch: Mutex<Batch>,
}

impl Inbox for FanoutInbox {
    fn deliver(&self, room: &str, delivery: Delivery) {
        let recipients = self
            .registry
            .deliver_into(room, &delivery, &mut self.batch.lock());
        let latency =
            Duration::from_micros(now_micros().saturating_sub(delivery.published_at_micros));
        metrics::fanned_out(recipients, latency);
    }

    fn flush(&self) {
        // Flushed in place so the batch keeps its allocation from one batch to the next.
        self.batch.lock().flush();
    }

    fn hold(&self, which: &dyn Fn(&str) -> bool) {
        // What was batched arrived before the gap: out it goes first.
        self.batch.lock().flush();
        let rooms = self.registry.rooms_where(which);
        tracing::debug!(rooms = rooms.len(), "holding room traffic for a repair");
        self.held.store(true, Ordering::SeqCst);
        for room in rooms {
            room.members.hold();
        }
    }

    fn repair(&self) {
        self.repairs.notify_one();
    }
}

/// Who is joining a room.
pub struct Joiner<'a> {
    /// The connection.
    pub conn: ConnId,
    /// Where its frames go.
    pub outbox: Outbox,
    /// The user it sends as.
    pub user_id: &'a str,
    /// The user's display name.
    pub name: Option<&'a str>,
}

/// What a join found: for a join with replay, the history to release to the member.
#[derive(Debug, Default)]
pub struct Joined {
    /// History read for the replay, if one was asked for.
    pub history: Option<History>,
}

/// The node's rooms and broker, shared by every session.
pub struct Hub {
    registry: Arc<Registry>,
    broker: Broker,
    /// How long a repair may keep failing before the room's members are resynced.
    repair_timeout: Duration,
    /// Local connections per (room, user): presence is per user, not per connection.
    presence: Mutex<HashMap<(RoomName, String), LocalPresence>>,
    /// Local connections per user, for the commands of the application's backend.
    users: Arc<LocalUsers>,
    /// Who takes what other nodes send to this one; set once, after the hub started.
    direct: Arc<OnceLock<DirectHandler>>,
}

/// How many local connections a user has in a room, and their display name.
type LocalPresence = (usize, Option<String>);

/// Settings the hub needs besides the broker's.
#[derive(Debug, Clone, Copy)]
pub struct HubSettings {
    /// Bounds of each room's history.
    pub history: HistorySettings,
    /// How long a presence entry lives without a heartbeat; heartbeats come every third of it.
    pub presence_ttl: Duration,
    /// How long a room may try to repair a gap from history before its members are closed to
    /// resume elsewhere.
    pub repair_timeout: Duration,
}

impl Hub {
    /// Starts a hub: with the in-process broker when `redis` is `None`, else on Redis (returning
    /// at once; see [`RedisBroker::start`]). Spawns the gap-repair and presence-heartbeat tasks.
    pub fn start(
        settings: HubSettings,
        redis: Option<&RedisSettings>,
    ) -> Result<Arc<Hub>, BrokerError> {
        let registry = Arc::new(Registry::default());
        let repairs = Arc::new(Notify::new());
        let held = Arc::new(AtomicBool::new(false));
        // One inbox per fan-out partition: each receive loop batches into its own.
        let inbox = || -> SharedInbox {
            Arc::new(FanoutInbox {
                registry: registry.clone(),
                repairs: repairs.clone(),
                held: held.clone(),
                batch: Mutex::new(Batch::default()),
            })
        };
        let users = Arc::new(LocalUsers::default());
        let on_command = command_handler(users.clone());
        let direct: Arc<OnceLock<DirectHandler>> = Arc::default();
        let on_direct: DirectHandler = {
            let direct = direct.clone();
            // Before a handler is set the node has no sessions another node could name.
            Arc::new(move |payload| {
                if let Some(handler) = direct.get() {
                    handler(payload);
                }
            })
        };
        let broker = match redis {
            Some(redis) => {
                let inboxes = (0..redis.partitions.max(1)).map(|_| inbox()).collect();
                Broker::Redis(Box::new(RedisBroker::start(
                    redis, inboxes, on_command, on_direct,
                )?))
            }
            None => Broker::InProcess(Box::new(InProcessBroker::new(
                inbox(),
                settings.history,
                on_command,
            ))),
        };
        let hub = Arc::new(Hub {
            registry,
            broker,
            repair_timeout: settings.repair_timeout,
            presence: Mutex::default(),
            users,
            direct,
        });
        tokio::spawn(repair_gaps(Arc::downgrade(&hub), repairs, held));
        tokio::spawn(heartbeat(Arc::downgrade(&hub), settings.presence_ttl / 3));
        Ok(hub)
    }

    /// Adds a connection to a room, subscribing this node to it first if needed, and marks the
    /// user present. When this returns `Ok`, the connection receives every message published to
    /// the room from now on; with a replay, those wait until [`Hub::release`] sends the history
    /// first.
    pub async fn join(
        &self,
        room: &RoomName,
        joiner: Joiner<'_>,
        options: &JoinOptions,
    ) -> Result<Joined, BrokerError> {
        let replay = options.replay != Replay::None;
        loop {
            let entry = self.registry.entry(room);
            let mut subscription = entry.subscription.lock().await;
            if subscription.retired {
                // A leave removed this entry while we waited; the registry holds a newer one.
                continue;
            }
            if !subscription.subscribed {
                // Where the history ends before the subscription: should the node miss
                // messages before it delivers any, it repairs from there.
                let subscribed = match self.broker.head(room).await {
                    Ok(head) => {
                        entry.members.set_head(head);
                        self.broker.subscribe(room).await
                    }
                    Err(error) => Err(error),
                };
                if let Err(error) = subscribed {
                    if entry.members.is_empty() {
                        subscription.retired = true;
                        self.registry.remove(room, &entry);
                    }
                    return Err(error);
                }
                subscription.subscribed = true;
            }
            entry
                .members
                .insert(joiner.conn, joiner.outbox, options.presence, replay);
            break;
        }
        self.mark_present(room, joiner.user_id, joiner.name).await;
        if !replay {
            return Ok(Joined::default());
        }
        match self.broker.history(room, &options.replay).await {
            Ok(history) => Ok(Joined {
                history: Some(history),
            }),
            Err(error) => {
                self.leave(room, joiner.conn, joiner.user_id).await;
                Err(error)
            }
        }
    }

    /// Sends a joined member its replay, then the live messages held meanwhile.
    pub fn release(&self, room: &RoomName, conn: ConnId, history: History) {
        if let Some(entry) = self.registry.get(room.as_str()) {
            entry.members.release(conn, history.epoch, history.entries);
        }
    }

    /// Removes a connection from a room, unsubscribing this node when it was the last local member.
    pub async fn leave(&self, room: &RoomName, conn: ConnId, user_id: &str) {
        self.mark_absent(room, user_id).await;
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

    /// Stores and publishes a chat message to the room on every node.
    pub async fn publish(
        &self,
        room: &RoomName,
        message: Outgoing,
    ) -> Result<Published, BrokerError> {
        self.broker.publish(room, message).await
    }

    /// Reads the room's history (the newest messages, or those after an offset).
    pub async fn history(&self, room: &RoomName, replay: &Replay) -> Result<History, BrokerError> {
        self.broker.history(room, replay).await
    }

    /// Everyone online in the room across the cluster.
    pub async fn presence(&self, room: &RoomName) -> Result<Vec<PresentUser>, BrokerError> {
        self.broker.presence_list(room).await
    }

    /// Sends a command to every node (this one included), each of which carries it out on
    /// its own connections; returns how many nodes received it.
    pub async fn command(&self, command: &Command) -> Result<usize, BrokerError> {
        self.broker.send_command(command).await
    }

    /// Sends `payload` to node `node` alone; returns how many nodes received it (0: it is gone).
    pub async fn send_to_node(&self, node: &str, payload: String) -> Result<usize, BrokerError> {
        self.broker.send_to_node(node, payload).await
    }

    /// Hands what other nodes send to this one to `handler` from now on (set once; a second
    /// handler is ignored).
    pub fn on_direct(&self, handler: DirectHandler) {
        if self.direct.set(handler).is_err() {
            tracing::warn!("a handler for this node's inbox was already set");
        }
    }

    /// This node's users and their connections.
    pub fn users(&self) -> &LocalUsers {
        &self.users
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

    async fn mark_present(&self, room: &RoomName, user_id: &str, name: Option<&str>) {
        let first = {
            let mut presence = self.presence.lock();
            let (count, _) = presence
                .entry((room.clone(), user_id.to_owned()))
                .or_insert((0, name.map(str::to_owned)));
            *count += 1;
            *count == 1
        };
        if first {
            let user = PresentUser {
                user_id: user_id.to_owned(),
                name: name.map(str::to_owned),
            };
            if let Err(error) = self.broker.presence_upsert(room, &[user]).await {
                // The heartbeat adds the entry once the broker is back.
                tracing::warn!(%room, %error, "presence update failed");
            }
        }
    }

    async fn mark_absent(&self, room: &RoomName, user_id: &str) {
        let last = {
            let mut presence = self.presence.lock();
            let key = (room.clone(), user_id.to_owned());
            match presence.get_mut(&key) {
                Some((count, _)) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    presence.remove(&key);
                    true
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        if let Err(error) = self.broker.presence_remove(room, &[user_id]).await {
            // The entry expires on its own after the presence TTL.
            tracing::warn!(%room, %error, "presence removal failed");
        }
    }

    /// This node's present users, grouped by room.
    fn present_by_room(&self) -> HashMap<RoomName, Vec<PresentUser>> {
        let mut by_room: HashMap<RoomName, Vec<PresentUser>> = HashMap::new();
        for ((room, user_id), (_, name)) in self.presence.lock().iter() {
            by_room.entry(room.clone()).or_default().push(PresentUser {
                user_id: user_id.clone(),
                name: name.clone(),
            });
        }
        by_room
    }

    /// The rooms holding their traffic for a repair, with where each repair starts.
    fn held_rooms(&self) -> Vec<(RoomName, Arc<Room>, RepairFrom)> {
        self.registry
            .room_names()
            .into_iter()
            .filter_map(|room| {
                let entry = self.registry.get(room.as_str())?;
                let from = entry.members.repair_from()?;
                Some((room, entry, from))
            })
            .collect()
    }

    /// Closes a room's members to resume elsewhere: its gap could not be repaired in time.
    fn resync_late(&self, room: &RoomName, entry: &Room, why: &'static str) {
        let closed = entry.members.resync();
        metrics::repair("resync");
        tracing::warn!(%room, closed, timeout = ?self.repair_timeout, "{why}; members resync");
    }

    /// Resyncs the members of rooms held for the repair timeout without a repair; returns
    /// whether rooms are still held.
    fn resync_overdue(&self) -> bool {
        let mut still_held = false;
        for (room, entry, from) in self.held_rooms() {
            if from.overdue(self.repair_timeout) {
                self.resync_late(
                    &room,
                    &entry,
                    "the room's subscription was not restored in time",
                );
            } else {
                still_held = true;
            }
        }
        still_held
    }

    /// Repairs every room that holds traffic after a gap: reads what it missed from history
    /// and delivers it, then what was held. A room whose history no longer covers the gap
    /// (trimmed, or lost with Redis's data), or whose repair kept failing for the repair
    /// timeout, resyncs its members instead. Returns whether some repair failed and must be
    /// tried again.
    async fn repair(&self) -> bool {
        let mut failed = 0;
        let mut first_error = None;
        for (room, entry, from) in self.held_rooms() {
            tracing::debug!(%room, ?from, "repairing");
            let replay = Replay::Since {
                offset: from.since,
                epoch: from.epoch.map(|epoch| epoch.to_string()),
            };
            match self.broker.history(&room, &replay).await {
                Ok(history) if history.complete => {
                    let recovered = entry.members.finish_repair(history.epoch, history.entries);
                    metrics::repair("repaired");
                    if recovered > 0 {
                        tracing::info!(%room, recovered, "repaired missed messages from history");
                    }
                }
                Ok(_) => {
                    let closed = entry.members.resync();
                    metrics::repair("resync");
                    tracing::warn!(
                        %room,
                        closed,
                        "history no longer covers what this node missed; members resync"
                    );
                }
                Err(_) if from.overdue(self.repair_timeout) => {
                    self.resync_late(&room, &entry, "could not repair a gap in time");
                }
                Err(error) => {
                    metrics::repair("failed");
                    failed += 1;
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            tracing::warn!(rooms = failed, %error, "could not read history to repair a gap; retrying");
        }
        failed > 0
    }
}

/// Carries out on this node's connections the commands every node receives.
fn command_handler(users: Arc<LocalUsers>) -> CommandHandler {
    Arc::new(move |command| match command {
        Command::Disconnect { user_id, reason } => {
            let closed = users.disconnect(&user_id, reason.as_deref());
            tracing::debug!(closed, "closed a user's connections for the application");
        }
        Command::Kick { room, user_id } => {
            if let Ok(room) = RoomName::parse(&room) {
                let asked = users.kick(&room, &user_id);
                tracing::debug!(%room, asked, "removing a user from a room for the application");
            }
        }
    })
}

/// How often held rooms are checked for having waited too long for their repair.
const HELD_CHECK: Duration = Duration::from_secs(1);

/// Shortest and longest wait before a failed repair is tried again.
const REPAIR_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// Repairs held rooms whenever the broker says its subscriptions are back, retrying failed
/// repairs with backoff until none is left, for as long as the hub lives.
///
/// Rooms held while the broker is still resubscribing (its repair not yet asked for) are
/// watched too: one held for the repair timeout resyncs its members, so no room waits
/// without bound on a subscription that does not come back.
async fn repair_gaps(hub: Weak<Hub>, repairs: Arc<Notify>, held: Arc<AtomicBool>) {
    loop {
        tokio::select! {
            () = repairs.notified() => {}
            () = tokio::time::sleep(HELD_CHECK), if held.load(Ordering::SeqCst) => {
                let Some(strong) = hub.upgrade() else { return };
                // Cleared first: a room held during the check sets it again.
                held.store(false, Ordering::SeqCst);
                if strong.resync_overdue() {
                    held.store(true, Ordering::SeqCst);
                }
                continue;
            }
        }
        let mut retry = REPAIR_RETRY.0;
        loop {
            let Some(strong) = hub.upgrade() else { return };
            let pending = strong.repair().await;
            drop(strong);
            if !pending {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = repairs.notified() => {}
            }
            retry = (retry * 2).min(REPAIR_RETRY.1);
        }
    }
}

/// Refreshes this node's presence entries and drops those of dead nodes, for as long as the
/// hub lives.
async fn heartbeat(hub: Weak<Hub>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        if !hub.is_ready() {
            continue;
        }
        let rooms: Vec<(RoomName, Vec<PresentUser>)> = hub.present_by_room().into_iter().collect();
        if let Err(error) = hub.broker.presence_heartbeat(&rooms).await {
            tracing::warn!(rooms = rooms.len(), %error, "presence heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Offset;
    use crate::transport::outbox::{MemorySocket, in_memory};

    fn hub() -> Arc<Hub> {
        let history = HistorySettings {
            max_len: 3,
            max_age: Duration::from_secs(60),
            dedup_window: Duration::from_secs(60),
        };
        Hub::start(
            HubSettings {
                history,
                presence_ttl: Duration::from_secs(30),
                repair_timeout: Duration::from_secs(5),
            },
            None,
        )
        .unwrap()
    }

    /// Joins `room` as connection `conn` of user `u-1`, with no replay; returns its socket.
    async fn plain_member(hub: &Hub, room: &RoomName, conn: ConnId) -> MemorySocket {
        let (outbox, socket) = in_memory(8);
        hub.join(room, joiner(conn, &outbox), &JoinOptions::PLAIN)
            .await
            .unwrap();
        socket
    }

    fn joiner(conn: ConnId, outbox: &Outbox) -> Joiner<'static> {
        Joiner {
            conn,
            outbox: outbox.clone(),
            user_id: "u-1",
            name: None,
        }
    }

    /// Joins `room` as connection `conn` asking for `replay`; returns what the replay found.
    async fn replay_for(hub: &Hub, room: &RoomName, conn: ConnId, replay: Replay) -> History {
        let (outbox, _receiver) = in_memory(8);
        let options = JoinOptions {
            replay,
            presence: false,
        };
        let joined = hub.join(room, joiner(conn, &outbox), &options).await;
        joined.unwrap().history.unwrap()
    }

    fn message(text: &str) -> Outgoing {
        Outgoing {
            frame: format!(r#"{{"type":"message","message":"{text}"}}"#),
            id: uuid::Uuid::now_v7(),
            dedup: None,
        }
    }

    fn text_of(frame: &str) -> String {
        let value: serde_json::Value = serde_json::from_str(frame).unwrap();
        value["message"].as_str().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn in_process_publish_reaches_every_member_including_the_sender() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let a_rx = plain_member(&hub, &room, 1).await;
        let b_rx = plain_member(&hub, &room, 2).await;
        hub.publish(&room, message("hi")).await.unwrap();
        assert_eq!(text_of(&a_rx.next_text().unwrap()), "hi");
        assert_eq!(text_of(&b_rx.next_text().unwrap()), "hi");
    }

    #[tokio::test]
    async fn leaving_stops_delivery_and_forgets_empty_rooms() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let a_rx = plain_member(&hub, &room, 1).await;
        hub.leave(&room, 1, "u-1").await;
        assert!(hub.registry.get("lobby").is_none());
        hub.publish(&room, message("x")).await.unwrap();
        assert_eq!(a_rx.next_text(), None);
    }

    #[tokio::test]
    async fn a_resume_gets_what_it_missed_then_live_without_gap_or_duplicate() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let first = hub
            .publish(&room, message("one"))
            .await
            .unwrap()
            .position
            .offset;
        hub.publish(&room, message("two")).await.unwrap();
        let (a, a_rx) = in_memory(8);
        let since = JoinOptions {
            replay: Replay::Since {
                offset: first,
                epoch: None,
            },
            presence: false,
        };
        let joined = hub.join(&room, joiner(1, &a), &since).await.unwrap();
        // Published while the replay is pending: held, then sent after the history.
        hub.publish(&room, message("three")).await.unwrap();
        assert_eq!(a_rx.next_text(), None, "live traffic waits for the replay");
        let history = joined.history.unwrap();
        assert!(history.complete);
        hub.release(&room, 1, history);
        let texts: Vec<String> = std::iter::from_fn(|| a_rx.next_text())
            .map(|frame| text_of(&frame))
            .collect();
        assert_eq!(texts, ["two", "three"]);
    }

    #[tokio::test]
    async fn a_resume_from_before_the_retained_history_is_not_recovered() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let first = hub
            .publish(&room, message("0"))
            .await
            .unwrap()
            .position
            .offset;
        for i in 1..6 {
            hub.publish(&room, message(&i.to_string())).await.unwrap();
        }
        let since = Replay::Since {
            offset: first,
            epoch: None,
        };
        let history = replay_for(&hub, &room, 1, since).await;
        assert!(
            !history.complete,
            "messages 1 and 2 were trimmed (max_len 3)"
        );
        assert_eq!(history.entries.len(), 3);
        let wrong_epoch = Replay::Since {
            offset: Offset::ZERO,
            epoch: Some("other".into()),
        };
        let history = replay_for(&hub, &room, 2, wrong_epoch).await;
        assert!(
            !history.complete,
            "another epoch's offsets cannot be replayed"
        );
    }

    #[tokio::test]
    async fn a_repeated_cid_is_stored_once_and_answered_with_the_original() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let a_rx = plain_member(&hub, &room, 1).await;
        let with_cid = |text: &str, user: &str| Outgoing {
            dedup: Some((user.to_owned(), "c-1".to_owned())),
            ..message(text)
        };
        let first = hub.publish(&room, with_cid("once", "u-1")).await.unwrap();
        let retry = hub.publish(&room, with_cid("once", "u-1")).await.unwrap();
        assert!(!first.duplicate && retry.duplicate);
        assert_eq!((retry.id, retry.position), (first.id, first.position));
        let other_user = hub.publish(&room, with_cid("mine", "u-2")).await.unwrap();
        assert!(!other_user.duplicate, "a cid is scoped to its user");
        let texts: Vec<String> = std::iter::from_fn(|| a_rx.next_text())
            .map(|frame| text_of(&frame))
            .collect();
        assert_eq!(texts, ["once", "mine"]);
    }

    #[tokio::test]
    async fn presence_counts_users_not_connections() {
        let hub = hub();
        let room = RoomName::parse("lobby").unwrap();
        let (watcher, events) = in_memory(8);
        let options = JoinOptions {
            replay: Replay::None,
            presence: true,
        };
        let watch = Joiner {
            conn: 9,
            outbox: watcher,
            user_id: "u-w",
            name: None,
        };
        hub.join(&room, watch, &options).await.unwrap();
        events.next_text();
        let (tab, _rx) = in_memory(8);
        for conn in [1, 2] {
            let tab = Joiner {
                conn,
                outbox: tab.clone(),
                user_id: "u-2",
                name: Some("bo"),
            };
            hub.join(&room, tab, &JoinOptions::PLAIN).await.unwrap();
        }
        let joined: serde_json::Value = serde_json::from_str(&events.next_text().unwrap()).unwrap();
        assert_eq!(
            (joined["event"].as_str(), joined["userId"].as_str()),
            (Some("join"), Some("u-2"))
        );
        assert_eq!(
            events.next_text(),
            None,
            "a second tab is not a second join"
        );
        assert_eq!(hub.presence(&room).await.unwrap().len(), 2);
        hub.leave(&room, 1, "u-2").await;
        assert_eq!(
            events.next_text(),
            None,
            "one tab left, the user is still here"
        );
        hub.leave(&room, 2, "u-2").await;
        let left: serde_json::Value = serde_json::from_str(&events.next_text().unwrap()).unwrap();
        assert_eq!(left["event"], "leave");
    }
}
