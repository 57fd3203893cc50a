//! The cluster broker: rooms shared through Redis.
//!
//! Two connections, as Redis requires: a regular client publishes and runs scripts, a
//! `SubscriberClient` receives. A chat message is appended to its room's stream (the history)
//! and published to the room's channel by one Lua script, atomically, so every delivered message
//! has an offset. Every message, also one for members on the publishing node, comes back through
//! Redis, so all members of a room see its messages in the order Redis published them.
//!
//! The subscriber's messages are read straight from `message_rx()` rather than through fred's
//! `on_message` helper, which stops for good on the first lag. A lag (the node fell behind and
//! the broadcast channel dropped messages) is counted and logged, reading goes on, and the inbox
//! is told to repair the gap from history; so is a reconnect.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use fred::types::config::{PerformanceConfig, ReconnectPolicy};
use fred::types::scripts::Script;
use parking_lot::Mutex;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::task::JoinHandle;

use super::{
    BrokerError, History, HistorySettings, Outgoing, Published, Retained, SharedInbox,
    decode_envelope,
};
use crate::clock::now_micros;
use crate::metrics;
use crate::protocol::{
    Epoch, FrameText, Offset, Position, PresentUser, Replay, RoomName, with_offset,
};

/// Prefix of every room's pub/sub channel: room `lobby` is channel `chat:room:lobby`.
pub const CHANNEL_PREFIX: &str = "chat:room:";

const APPEND: &str = include_str!("lua/append.lua");
const HEAD: &str = include_str!("lua/head.lua");
const HISTORY: &str = include_str!("lua/history.lua");
const PRESENCE_UPSERT: &str = include_str!("lua/presence_upsert.lua");
const PRESENCE_REMOVE: &str = include_str!("lua/presence_remove.lua");

/// How to reach Redis and how much slack the subscriber gets.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` URL.
    pub url: String,
    /// This node's id, which scopes its presence entries.
    pub node_id: String,
    /// Messages the subscriber may hold before it counts as lagging (fred's default is 32).
    pub subscriber_capacity: usize,
    /// How long a command may take before it is reported as failed.
    pub command_timeout: Duration,
    /// Bounds of each room's history.
    pub history: HistorySettings,
    /// How long a presence entry lives without a heartbeat.
    pub presence_ttl: Duration,
}

/// The Lua scripts, loaded once and run with EVALSHA (reloaded if Redis restarted).
struct Scripts {
    append: Script,
    head: Script,
    history: Script,
    presence_upsert: Script,
    presence_remove: Script,
}

/// Redis broker.
pub struct RedisBroker {
    publisher: Client,
    subscriptions: Arc<Subscriptions>,
    settings: RedisSettings,
    scripts: Scripts,
    tasks: Vec<JoinHandle<()>>,
}

/// The keys of one room.
struct RoomKeys {
    channel: String,
    history: String,
    epoch: String,
    /// Recent client message ids: current and previous generation.
    dedup: [String; 2],
    presence: [String; 3],
}

impl RoomKeys {
    fn of(room: &RoomName) -> Self {
        RoomKeys {
            channel: format!("{CHANNEL_PREFIX}{room}"),
            history: format!("chat:history:{room}"),
            epoch: format!("chat:epoch:{room}"),
            dedup: [format!("chat:cids:{room}"), format!("chat:cids-old:{room}")],
            presence: [
                format!("chat:presence:{room}"),
                format!("chat:presence-users:{room}"),
                format!("chat:presence-names:{room}"),
            ],
        }
    }
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

        let subscriptions = Arc::new(Subscriptions {
            client: subscriber.clone(),
            wanted: Mutex::default(),
        });
        let tasks = vec![
            receive_loop(subscriber.message_rx(), inbox.clone()),
            resubscribe_after_reconnects(subscriptions.clone(), inbox),
            watch_connection("publisher", &publisher),
            watch_connection("subscriber", &subscriber),
        ];
        drop(publisher.connect());
        drop(subscriber.connect());
        let scripts = Scripts {
            append: Script::from_lua(APPEND),
            head: Script::from_lua(HEAD),
            history: Script::from_lua(HISTORY),
            presence_upsert: Script::from_lua(PRESENCE_UPSERT),
            presence_remove: Script::from_lua(PRESENCE_REMOVE),
        };
        Ok(RedisBroker {
            publisher,
            subscriptions,
            settings: settings.clone(),
            scripts,
            tasks,
        })
    }

    fn ensure_connected(&self) -> Result<(), BrokerError> {
        if self.publisher.is_connected() {
            Ok(())
        } else {
            Err(BrokerError::Unavailable("redis is not connected"))
        }
    }

    pub(super) async fn publish(
        &self,
        room: &RoomName,
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        self.ensure_connected()?;
        let started = Instant::now();
        let RoomKeys {
            channel,
            history: stream,
            epoch,
            dedup: [cids, old_cids],
            ..
        } = RoomKeys::of(room);
        let history = &self.settings.history;
        let args = vec![
            channel,
            message.frame.clone(),
            history.max_len.to_string(),
            history.max_age.as_millis().to_string(),
            Epoch::random().to_string(),
            now_micros().to_string(),
            message.id.to_string(),
            message.dedup_field(),
            history.dedup_window.as_millis().to_string(),
        ];
        let (offset, epoch, id, duplicate): (String, String, String, i64) = self
            .scripts
            .append
            .evalsha_with_reload(&self.publisher, vec![stream, epoch, cids, old_cids], args)
            .await?;
        metrics::message_published(started.elapsed());
        Ok(Published {
            position: Position {
                offset: Offset::parse(&offset).ok_or(BrokerError::Reply("stream id"))?,
                epoch: Epoch::parse(&epoch).ok_or(BrokerError::Reply("epoch"))?,
            },
            id: id.parse().map_err(|_| BrokerError::Reply("message id"))?,
            duplicate: duplicate != 0,
        })
    }

    pub(super) async fn head(&self, room: &RoomName) -> Result<Option<Position>, BrokerError> {
        self.ensure_connected()?;
        let keys = RoomKeys::of(room);
        let args = vec![
            Epoch::random().to_string(),
            self.settings.history.max_age.as_millis().to_string(),
        ];
        let (epoch, newest): (String, String) = self
            .scripts
            .head
            .evalsha_with_reload(&self.publisher, vec![keys.history, keys.epoch], args)
            .await?;
        Ok(Some(Position {
            epoch: Epoch::parse(&epoch).ok_or(BrokerError::Reply("epoch"))?,
            // A history whose entries all expired: whatever it holds later is new.
            offset: if newest.is_empty() {
                Offset::ZERO
            } else {
                Offset::parse(&newest).ok_or(BrokerError::Reply("stream id"))?
            },
        }))
    }

    pub(super) async fn history(
        &self,
        room: &RoomName,
        replay: &Replay,
    ) -> Result<History, BrokerError> {
        self.ensure_connected()?;
        let keys = RoomKeys::of(room);
        let args = match replay {
            Replay::None => return Ok(History::default()),
            Replay::Since { offset, .. } => vec!["since".to_owned(), offset.to_string()],
            Replay::Last(count) => vec!["last".to_owned(), count.to_string()],
        };
        type Reply = (String, String, String, i64, Vec<(String, Vec<String>)>);
        let (epoch, first, last, trimmed, raw): Reply = self
            .scripts
            .history
            .evalsha_with_reload(&self.publisher, vec![keys.history, keys.epoch], args)
            .await?;
        let parse = |id: &str| Offset::parse(id).ok_or(BrokerError::Reply("stream id"));
        if epoch.is_empty() {
            let nothing = Retained {
                first: None,
                last: Offset::ZERO,
                trimmed: true,
            };
            return Ok(History::default().judge_since_if(replay, nothing));
        }
        let epoch = Epoch::parse(&epoch).ok_or(BrokerError::Reply("epoch"))?;
        let mut entries = Vec::with_capacity(raw.len());
        for (id, fields) in raw {
            let offset = parse(&id)?;
            let frame = fields.get(1).ok_or(BrokerError::Reply("stream entry"))?;
            entries.push((offset, FrameText::from(with_offset(frame, offset, epoch))));
        }
        if matches!(replay, Replay::Last(_)) {
            entries.reverse();
        }
        let retained = Retained {
            first: if first.is_empty() {
                None
            } else {
                Some(parse(&first)?)
            },
            last: parse(&last)?,
            trimmed: trimmed != 0,
        };
        Ok(History {
            epoch: Some(epoch),
            entries,
            complete: false,
        }
        .judge_since_if(replay, retained))
    }

    /// Subscribes to the room's channel and returns once Redis has processed the subscription,
    /// so every message published from then on reaches this node.
    pub(super) async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.subscriptions.add(RoomKeys::of(room).channel).await
    }

    pub(super) async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.subscriptions.remove(RoomKeys::of(room).channel).await
    }

    pub(super) async fn presence_upsert(
        &self,
        room: &RoomName,
        users: &[PresentUser],
    ) -> Result<(), BrokerError> {
        self.ensure_connected()?;
        let keys = RoomKeys::of(room);
        let ttl = self.settings.presence_ttl.as_millis() as u64;
        let mut args = vec![
            (now_micros() / 1000 + ttl).to_string(),
            (ttl * 2).to_string(),
            keys.channel,
            now_micros().to_string(),
            room.to_string(),
            self.settings.node_id.clone(),
        ];
        for user in users {
            args.push(user.user_id.clone());
            args.push(user.name.clone().unwrap_or_default());
        }
        let _: i64 = self
            .scripts
            .presence_upsert
            .evalsha_with_reload(&self.publisher, keys.presence.to_vec(), args)
            .await?;
        Ok(())
    }

    pub(super) async fn presence_remove(
        &self,
        room: &RoomName,
        users: &[&str],
    ) -> Result<(), BrokerError> {
        self.remove_presence(room, &self.settings.node_id, users)
            .await
    }

    pub(super) async fn presence_reap(&self, room: &RoomName) -> Result<(), BrokerError> {
        // An empty node id asks the script for every entry whose expiry passed.
        self.remove_presence(room, "", &[]).await
    }

    async fn remove_presence(
        &self,
        room: &RoomName,
        node: &str,
        users: &[&str],
    ) -> Result<(), BrokerError> {
        self.ensure_connected()?;
        let keys = RoomKeys::of(room);
        let mut args = vec![
            (now_micros() / 1000).to_string(),
            keys.channel,
            now_micros().to_string(),
            room.to_string(),
            node.to_owned(),
        ];
        args.extend(users.iter().map(|user| (*user).to_owned()));
        let _: i64 = self
            .scripts
            .presence_remove
            .evalsha_with_reload(&self.publisher, keys.presence.to_vec(), args)
            .await?;
        Ok(())
    }

    pub(super) async fn presence_list(
        &self,
        room: &RoomName,
    ) -> Result<Vec<PresentUser>, BrokerError> {
        self.presence_reap(room).await?;
        let [_, users, names] = RoomKeys::of(room).presence;
        let users: Vec<String> = self.publisher.hkeys(users).await?;
        let names: std::collections::HashMap<String, String> =
            self.publisher.hgetall(names).await?;
        let mut present: Vec<PresentUser> = users
            .into_iter()
            .map(|user_id| PresentUser {
                name: names.get(&user_id).cloned(),
                user_id,
            })
            .collect();
        present.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(present)
    }

    pub(super) fn is_ready(&self) -> bool {
        self.publisher.is_connected() && self.subscriptions.client.is_connected()
    }

    pub(super) async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        // Best effort: the process is exiting either way.
        let _ = self.subscriptions.client.quit().await;
        let _ = self.publisher.quit().await;
    }
}

/// Most pub/sub messages delivered as one batch before their frames are written.
const MAX_BATCH: usize = 256;

/// Reads every pub/sub message and hands it to the inbox, surviving lag. Whatever has arrived
/// by the time one message is read is delivered with it as one batch (see `outbox::Batch`).
fn receive_loop(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    inbox: SharedInbox,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut received = Some(messages.recv().await);
            let mut taken = 0;
            while let Some(result) = received {
                match result {
                    Ok(message) => deliver(&message, &inbox),
                    Err(RecvError::Lagged(skipped)) => {
                        metrics::broker_lagged(skipped);
                        tracing::warn!(skipped, "redis subscriber lagged; repairing from history");
                        // Held before anything newer is delivered, so the repair starts from
                        // the last message delivered before the lost ones.
                        inbox.hold();
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

/// Hands one pub/sub message on a room channel to the inbox.
fn deliver(message: &Message, inbox: &SharedInbox) {
    let Some(room) = message.channel.strip_prefix(CHANNEL_PREFIX) else {
        return;
    };
    match message.value.as_bytes().and_then(decode_envelope) {
        Some(delivery) => inbox.deliver(room, delivery),
        None => tracing::warn!(room, "ignored a malformed message on a room channel"),
    }
}

/// This node's room subscriptions: the channels it wants, and the commands that make Redis's
/// subscriber connection agree.
///
/// The wanted set is kept here rather than taken from fred's tracking, which keeps a channel
/// whose `UNSUBSCRIBE` failed (during an outage, say) and would subscribe it again after every
/// reconnect.
struct Subscriptions {
    client: SubscriberClient,
    wanted: Mutex<BTreeSet<String>>,
}

impl Subscriptions {
    /// Subscribes to `channel`, returning once Redis has processed it.
    async fn add(&self, channel: String) -> Result<(), BrokerError> {
        if !self.client.is_connected() {
            return Err(BrokerError::Unavailable("redis is not connected"));
        }
        // Wanted before it is sent: a reconnect in between then subscribes it again.
        self.wanted.lock().insert(channel.clone());
        let subscribed = match self.client.subscribe(channel.clone()).await {
            Ok(()) => self.confirm().await,
            Err(error) => Err(error.into()),
        };
        if subscribed.is_err() {
            self.wanted.lock().remove(&channel);
        }
        subscribed
    }

    /// Unsubscribes from `channel`; a failure leaves nothing to retry, since a reconnect
    /// does not subscribe it again.
    async fn remove(&self, channel: String) -> Result<(), BrokerError> {
        self.wanted.lock().remove(&channel);
        Ok(self.client.unsubscribe(channel).await?)
    }

    /// Subscribes a new connection to every wanted channel.
    async fn restore(&self) -> Result<(), BrokerError> {
        let channels: Vec<String> = self.wanted.lock().iter().cloned().collect();
        if channels.is_empty() {
            return Ok(());
        }
        self.client.subscribe(channels).await?;
        self.confirm().await
    }

    /// Restores the subscriptions, retrying while the connection stays up; returns whether
    /// they were restored.
    async fn restore_while_connected(&self) -> bool {
        loop {
            match self.restore().await {
                Ok(()) => return true,
                Err(_) if !self.client.is_connected() => return false,
                Err(error) => {
                    tracing::warn!(%error, "could not resubscribe after a reconnect; retrying");
                    tokio::time::sleep(RESUBSCRIBE_RETRY).await;
                }
            }
        }
    }

    /// Waits until Redis has processed every subscription command sent so far.
    ///
    /// fred answers `SUBSCRIBE` as soon as the command is queued, before it is even written,
    /// since Redis confirms subscriptions out of band. A `PING` on the same connection is
    /// answered only after Redis has run every command sent before it, so its reply proves the
    /// subscription is in effect. Without this, a member could be told it joined while a
    /// message published at that moment still missed the node.
    async fn confirm(&self) -> Result<(), BrokerError> {
        // While subscribed, Redis answers PING with ["pong", ""] rather than PONG: take either.
        let _: fred::types::Value = self.client.ping(None).await?;
        Ok(())
    }
}

/// After every reconnect, subscribes the new connection to the rooms the node is in, then has
/// the inbox repair what was published meanwhile (in that order, so nothing falls between).
///
/// fred's own `manage_subscriptions` is not used: on every connect it sends `SUBSCRIBE` and
/// `PSUBSCRIBE` without arguments when nothing is tracked, which Redis rejects, and those error
/// replies would be taken as the answer to a confirming `PING` in flight.
fn resubscribe_after_reconnects(
    subscriptions: Arc<Subscriptions>,
    inbox: SharedInbox,
) -> JoinHandle<()> {
    let mut reconnects = subscriptions.client.reconnect_rx();
    tokio::spawn(async move {
        let mut connected_before = false;
        // A lagged receiver still means "reconnected": only a closed one ends the task.
        while !matches!(reconnects.recv().await, Err(RecvError::Closed)) {
            if connected_before {
                // Before the first subscription of the new connection: whatever it delivers
                // must wait until the messages published while it was away are in place.
                inbox.hold();
            }
            if !subscriptions.restore_while_connected().await {
                // Lost again: the next reconnect restores them and repairs the gap.
                continue;
            }
            if connected_before {
                inbox.repair();
            }
            connected_before = true;
        }
    })
}

/// How long to wait before trying a failed resubscription again.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(500);

/// Logs connection losses and reconnects.
fn watch_connection<C: EventInterface + ClientLike>(
    role: &'static str,
    client: &C,
) -> JoinHandle<()> {
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                error = errors.recv() => match error {
                    Ok((error, _)) => tracing::warn!(role, %error, "redis connection lost; retrying"),
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
