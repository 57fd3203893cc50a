//! The publish path: chat messages are appended and published in batches.
//!
//! Every publish joins a queue; one task sends what is queued as one script call (in a Redis
//! Cluster, one call per hash slot, sent together), waits for it, and sends what queued up
//! meanwhile. An idle node sends each message at once; a busy one sends many per call, which
//! is what keeps Redis's cost per message down: the cost of a call (reading it, starting the
//! script, answering, writing the shard messages out) is shared by its messages. fred never
//! pipelines `EVALSHA`, so one call in flight per connection is what a connection does anyway.
//! While the node is busy (its last call carried more than one message), a message waits up to
//! `--publish-linger` from when it was queued for more to share its call (up to a full batch):
//! fewer, larger calls cost Redis less per message, at the price of that wait in latency.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::Client;
use fred::interfaces::{ClientLike, FunctionInterface, ServerInterface};
use fred::types::ClusterHash;
use fred::types::config::Options;
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use super::functions;
use super::keys::KeySpace;
use crate::broker::{BrokerError, HistorySettings, Outgoing, Published};
use crate::clock::now_micros;
use crate::metrics;
use crate::protocol::{Epoch, Offset, Position, RoomName};

/// Most messages in one script call: calls of up to about a hundred kept lowering Redis's cost
/// per message (docs/benchmarks.md (e)).
const MAX_BATCH: usize = 128;

/// A message waiting to be sent, and who waits for its outcome.
struct Pending {
    room: RoomName,
    message: Outgoing,
    queued: tokio::time::Instant,
    reply: oneshot::Sender<Result<Published, BrokerError>>,
}

/// The queue and the client that drains it.
pub(super) struct Publisher {
    client: Client,
    keys: KeySpace,
    history: HistorySettings,
    /// A message is acknowledged only once this many replicas have it (`WAIT`); 0: at once.
    ack_replicas: u32,
    ack_timeout: Duration,
    /// Whether Redis is a cluster: calls are then grouped by hash slot.
    cluster: bool,
    /// While busy, how long to wait for more messages before the next call (0: never).
    linger: Duration,
    queue: Mutex<VecDeque<Pending>>,
    wake: Notify,
    /// When this node last refreshed each room's expiry: refreshed every tenth of the
    /// history's lifetime, not on every message.
    refreshed: Mutex<HashMap<RoomName, Instant>>,
}

impl Publisher {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        client: Client,
        keys: KeySpace,
        history: HistorySettings,
        ack_replicas: u32,
        ack_timeout: Duration,
        cluster: bool,
        linger: Duration,
    ) -> (Arc<Publisher>, tokio::task::JoinHandle<()>) {
        let publisher = Arc::new(Publisher {
            client,
            keys,
            history,
            ack_replicas,
            ack_timeout,
            cluster,
            linger,
            queue: Mutex::default(),
            wake: Notify::new(),
            refreshed: Mutex::default(),
        });
        let task = tokio::spawn(run(publisher.clone()));
        (publisher, task)
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    /// Stores and publishes `message` in `room` with whatever else is ready.
    pub(super) async fn publish(
        &self,
        room: &RoomName,
        message: Outgoing,
    ) -> Result<Published, BrokerError> {
        if !self.client.is_connected() {
            return Err(BrokerError::Unavailable("redis is not connected"));
        }
        let (reply, outcome) = oneshot::channel();
        self.queue.lock().push_back(Pending {
            room: room.clone(),
            message,
            queued: tokio::time::Instant::now(),
            reply,
        });
        self.wake.notify_one();
        outcome
            .await
            .unwrap_or(Err(BrokerError::Unavailable("the publisher stopped")))
    }

    /// Whether the room's expiry is due for a refresh (and records that it is being done).
    fn refresh_due(&self, room: &RoomName, now: Instant) -> bool {
        let every = self.history.max_age / 10;
        let mut refreshed = self.refreshed.lock();
        let due = refreshed
            .get(room)
            .is_none_or(|last| now.duration_since(*last) >= every);
        if due {
            if refreshed.len() >= 4096 && !refreshed.contains_key(room) {
                // Rooms refreshed long ago would be refreshed again anyway: forget them.
                refreshed.retain(|_, last| now.duration_since(*last) < every);
            }
            refreshed.insert(room.clone(), now);
        }
        due
    }

    /// Sends one batch: one function call per hash slot (one in all, outside a cluster), all
    /// in one pipeline.
    async fn send(&self, batch: Vec<Pending>) {
        let groups =
            self.keys
                .group_by_slot(self.cluster, batch, |pending| &pending.room, MAX_BATCH);
        let started = Instant::now();
        let calls: Vec<(Vec<String>, Vec<String>)> = groups
            .iter()
            .map(|(_, group)| self.call_for(group, started))
            .collect();
        let outcomes = self.call(&calls).await;
        for ((slot, group), outcome) in groups.into_iter().zip(outcomes) {
            let outcome = match (outcome, self.ack_replicas) {
                (Ok(results), replicas) if replicas > 0 => self
                    .wait_for_replicas(slot, replicas)
                    .await
                    .map(|()| results),
                (outcome, _) => outcome,
            };
            self.answer(group, outcome, started);
        }
    }

    /// The keys and arguments of one call appending `group`.
    fn call_for(&self, group: &[Pending], now: Instant) -> (Vec<String>, Vec<String>) {
        let history = &self.history;
        // Per message: 1 to refresh its room's expiry, plus 2 when it carries a cid.
        let flags: String = group
            .iter()
            .map(|pending| {
                let refresh = u8::from(self.refresh_due(&pending.room, now));
                let cid = if pending.message.dedup.is_some() {
                    2
                } else {
                    0
                };
                char::from(b'0' + refresh + cid)
            })
            .collect();
        let mut args = Vec::with_capacity(6 + group.len() * 2);
        args.extend([
            history.max_len.to_string(),
            history.max_age.as_millis().to_string(),
            history.dedup_window.as_millis().to_string(),
            now_micros().to_string(),
            Epoch::random().to_string(),
            flags,
        ]);
        let mut keys = Vec::with_capacity(group.len());
        for Pending { room, message, .. } in group {
            keys.push(self.keys.history(room));
            args.push(message.frame.clone());
        }
        args.extend(
            group
                .iter()
                .filter(|pending| pending.message.dedup.is_some())
                .map(|Pending { message, .. }| {
                    format!("{}\x1f{}", message.dedup_field(), message.id)
                }),
        );
        (keys, args)
    }

    /// Tells every sender in `group` how its message fared.
    fn answer(&self, group: Vec<Pending>, outcome: Result<Results, BrokerError>, started: Instant) {
        let results = outcome
            .as_deref()
            .map(|results| results.split(',').collect::<Vec<&str>>());
        match results {
            Ok(results) if results.len() == group.len() => {
                metrics::messages_published(group.len(), started.elapsed());
                for (pending, result) in group.into_iter().zip(results) {
                    let _ = pending.reply.send(parse(pending.message.id, result));
                }
            }
            Ok(_) => {
                for pending in group {
                    let _ = pending
                        .reply
                        .send(Err(BrokerError::Reply("append results")));
                }
            }
            Err(error) => {
                for pending in group {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Runs the append calls in one pipeline (in a cluster, fred sends each to its slot's
    /// primary), loading the library first if Redis does not have it.
    async fn call(
        &self,
        calls: &[(Vec<String>, Vec<String>)],
    ) -> Vec<Result<Results, BrokerError>> {
        let mut outcomes = self.pipeline(calls).await;
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, Err(error) if functions::missing(error)))
        {
            if let Err(error) = functions::load(&self.client).await {
                return calls.iter().map(|_| Err(error.clone())).collect();
            }
            outcomes = self.pipeline(calls).await;
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map_err(|error| {
                    // A function stopped by an error keeps what it did before it: some of the
                    // batch may be stored and published.
                    if error.details().contains("script") {
                        BrokerError::Partial(error)
                    } else {
                        BrokerError::Redis(error)
                    }
                })
            })
            .collect()
    }

    async fn pipeline(
        &self,
        calls: &[(Vec<String>, Vec<String>)],
    ) -> Vec<Result<Results, fred::error::Error>> {
        if let [(keys, args)] = calls {
            return vec![
                self.client
                    .fcall(functions::APPEND, keys.clone(), args.clone())
                    .await,
            ];
        }
        let pipeline = self.client.pipeline();
        for (keys, args) in calls {
            let queued: Result<(), _> = pipeline
                .fcall(functions::APPEND, keys.clone(), args.clone())
                .await;
            if let Err(error) = queued {
                return calls.iter().map(|_| Err(error.clone())).collect();
            }
        }
        pipeline.try_all().await
    }

    /// Waits until `replicas` replicas of the slot's primary have everything written so far.
    async fn wait_for_replicas(&self, slot: u16, replicas: u32) -> Result<(), BrokerError> {
        let timeout = i64::try_from(self.ack_timeout.as_millis()).unwrap_or(i64::MAX);
        let acknowledged: i64 = self.routed(slot).wait(i64::from(replicas), timeout).await?;
        if acknowledged >= i64::from(replicas) {
            Ok(())
        } else {
            Err(BrokerError::Reply("not confirmed by enough replicas"))
        }
    }

    /// The client, with commands routed to the primary of `slot` in a cluster.
    fn routed(&self, slot: u16) -> fred::clients::WithOptions<Client> {
        self.client.with_options(&Options {
            cluster_hash: Some(ClusterHash::Custom(slot)),
            ..Options::default()
        })
    }
}

/// What one append call returns: per message "offset epoch", or for a duplicate
/// "offset epoch id" of the original, separated by commas.
type Results = String;

/// One message's result; `sent` is the id it was sent with.
fn parse(sent: uuid::Uuid, result: &str) -> Result<Published, BrokerError> {
    let mut parts = result.split(' ');
    let (Some(offset), Some(epoch), original, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BrokerError::Reply("append result"));
    };
    Ok(Published {
        position: Position {
            offset: Offset::parse(offset).ok_or(BrokerError::Reply("stream id"))?,
            epoch: Epoch::parse(epoch).ok_or(BrokerError::Reply("epoch"))?,
        },
        id: match original {
            None => sent,
            Some(original) => original
                .parse()
                .map_err(|_| BrokerError::Reply("message id"))?,
        },
        duplicate: original.is_some(),
    })
}

/// Sends what is queued, one batch at a time, for as long as the publisher lives.
async fn run(publisher: Arc<Publisher>) {
    // Whether the last call carried more than one message: only then is it worth lingering.
    let mut busy = false;
    loop {
        if busy && !publisher.linger.is_zero() {
            publisher.linger_for_more().await;
        }
        let batch: Vec<Pending> = {
            let mut queue = publisher.queue.lock();
            let take = queue.len().min(MAX_BATCH);
            queue.drain(..take).collect()
        };
        if batch.is_empty() {
            busy = false;
            publisher.wake.notified().await;
            continue;
        }
        busy = batch.len() > 1;
        publisher.send(batch).await;
    }
}

impl Publisher {
    /// Waits until the oldest queued message has waited the linger, or a batch is full.
    async fn linger_for_more(&self) {
        let Some(deadline) = self
            .queue
            .lock()
            .front()
            .map(|oldest| oldest.queued + self.linger)
        else {
            return;
        };
        while self.queue.lock().len() < MAX_BATCH {
            if tokio::time::timeout_at(deadline, self.wake.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
