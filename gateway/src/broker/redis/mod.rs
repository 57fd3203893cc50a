//! The cluster broker: rooms shared through Redis, as one server, a Sentinel-managed primary
//! with replicas, or a Redis Cluster, chosen by the URL (fred's forms: `redis://`,
//! `redis-sentinel://…?sentinelServiceName=…`, `redis-cluster://…`, and `rediss…` for TLS).
//!
//! Four kinds of connection: commands (history, heads, presence), the publisher (messages,
//! appended and published in batches by one Lua script per call, see [`publisher`]), one
//! subscriber for the rooms, read by every fan-out partition (see [`subscriber`]), and one for
//! the command channel through which the application's backend reaches every node (see
//! [`control`]). Every key and the shard channel of a room share one hash slot ([`keys`]);
//! messages are published with `SPUBLISH` and received with `SSUBSCRIBE` in every topology, so
//! in a cluster a room's traffic stays within its shard.
//! Every message, also one for members on the publishing node, comes back through Redis, so all
//! members of a room see its messages in the order Redis published them.

mod control;
mod functions;
mod keys;
mod publisher;
mod subscriber;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{
    ClientLike, ClusterInterface, EventInterface, FunctionInterface, HashesInterface,
    PubsubInterface,
};
use fred::types::config::{Config, Options, PerformanceConfig, ReconnectPolicy, ServerConfig};
use fred::types::{Builder, InfoKind};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::keys::KeySpace;
use super::{
    BrokerError, Command, CommandHandler, DirectHandler, History, HistorySettings, Outgoing,
    Published, Retained, SharedInbox,
};
use crate::clock::now_micros;
use crate::protocol::{
    Epoch, FrameText, Offset, Position, PresentUser, Replay, RoomName, with_offset,
};

/// The oldest Redis this gateway runs on: sharded pub/sub, script flags and the `XINFO STREAM`
/// fields it reads arrived in 7.0.
const MINIMUM_VERSION: (u32, u32) = (7, 0);

/// Most rooms in one presence heartbeat call: enough to share a call's cost, few enough that
/// one call does not hold Redis up (about 20 µs of Redis time per room).
const HEARTBEAT_BATCH: usize = 64;

/// How many times a command for every node is sent before its call fails.
const COMMAND_ATTEMPTS: u32 = 3;

/// How to reach Redis and how the node uses it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// A fred URL: `redis://`, `rediss://`, `redis-cluster://…`, `redis-sentinel://…`.
    pub url: String,
    /// A password that replaces the URL's (read from a file, so it stays off command lines).
    pub password: Option<String>,
    /// A PEM file of certificate authorities to trust for `rediss` (besides the system's).
    pub tls_ca: Option<PathBuf>,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// This node's id, which scopes its presence entries.
    pub node_id: String,
    /// Messages a subscriber may hold before it counts as lagging (fred's default is 32).
    pub subscriber_capacity: usize,
    /// How long a command may take before it is reported as failed.
    pub command_timeout: Duration,
    /// Bounds of each room's history.
    pub history: HistorySettings,
    /// How long a presence entry lives without a heartbeat.
    pub presence_ttl: Duration,
    /// Replicas that must have a message before it is acknowledged (`WAIT`); 0: none.
    pub ack_replicas: u32,
    /// Subscriber connections the node's rooms are split over, each read by its own task.
    pub partitions: usize,
    /// While busy, how long the publisher waits for more messages before its next call.
    pub publish_linger: Duration,
}

/// Redis broker.
pub struct RedisBroker {
    commands: Client,
    publisher: Arc<publisher::Publisher>,
    /// The rooms' subscriber connection, read by every partition.
    subscriber: SubscriberClient,
    partitions: Vec<subscriber::Partition>,
    keys: KeySpace,
    /// Whether Redis is a cluster: calls over several rooms are then grouped by hash slot.
    cluster: bool,
    settings: RedisSettings,
    /// Set when the server turned out to be too old: the node is never ready on it.
    incompatible: Arc<OnceLock<BrokerError>>,
    tasks: Vec<JoinHandle<()>>,
    /// The node's subscription to the command channel.
    control: control::Listener,
    /// The node's subscription to its own inbox.
    inbox: control::Listener,
}

impl RedisBroker {
    /// Starts every connection and task. Returns without waiting for Redis: a node whose Redis
    /// is down starts anyway, reports not ready, and keeps retrying with backoff. `inboxes`
    /// has one inbox per partition; `on_command` gets every command sent to the nodes, and
    /// `on_direct` what is sent to this node alone.
    pub fn start(
        settings: &RedisSettings,
        inboxes: Vec<SharedInbox>,
        on_command: CommandHandler,
        on_direct: DirectHandler,
    ) -> Result<Self, BrokerError> {
        let builder = builder(settings)?;
        let cluster = matches!(
            builder.get_config().map(|c| &c.server),
            Some(ServerConfig::Clustered { .. })
        );
        let keys = KeySpace::new(&settings.prefix);
        let commands = builder.build()?;
        let incompatible = Arc::new(OnceLock::new());
        let mut tasks = vec![
            watch_connection("commands", &commands),
            check_and_load(commands.clone(), incompatible.clone()),
        ];
        let (publisher, task) = publisher::Publisher::start(
            builder.build()?,
            keys.clone(),
            settings.history,
            settings.ack_replicas,
            settings.command_timeout,
            cluster,
            settings.publish_linger,
        );
        tasks.push(task);
        tasks.push(watch_connection("publisher", publisher.client()));
        let topology = cluster.then(|| {
            let (changes, topology) = watch::channel(0);
            tasks.push(watch_topology(commands.clone(), changes));
            topology
        });
        let count = inboxes.len();
        let subscriber: SubscriberClient = builder.build_subscriber_client()?;
        tasks.push(watch_connection("subscriber", &subscriber));
        tasks.push(keep_connected("subscriber", &subscriber));
        let partitions = inboxes
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| {
                subscriber::Partition::start(
                    index,
                    count,
                    subscriber.clone(),
                    keys.clone(),
                    topology.clone(),
                    inbox,
                )
            })
            .collect();
        let control = control::Listener::start(
            "command channel",
            builder.build_subscriber_client()?,
            keys.control_channel(),
            cluster,
            Arc::new(move |payload| match Command::decode(payload) {
                Some(command) => on_command(command),
                None => tracing::warn!("ignored a malformed message on the command channel"),
            }),
        );
        tasks.push(watch_connection("command channel", control.client()));
        let inbox = control::Listener::start(
            "node inbox",
            builder.build_subscriber_client()?,
            keys.node_channel(&settings.node_id),
            cluster,
            on_direct,
        );
        tasks.push(watch_connection("node inbox", inbox.client()));
        tasks.push(keep_connected("commands", &commands));
        tasks.push(keep_connected("publisher", publisher.client()));
        Ok(RedisBroker {
            commands,
            publisher,
            subscriber,
            partitions,
            keys,
            cluster,
            settings: settings.clone(),
            incompatible,
            tasks,
            control,
            inbox,
        })
    }

    /// Publishes `payload` on node `node`'s inbox channel; returns how many received it.
    pub(super) async fn send_to_node(
        &self,
        node: &str,
        payload: String,
    ) -> Result<usize, BrokerError> {
        self.ensure_connected()?;
        // Sent once: unlike a command, what a node is sent need not be idempotent.
        let receivers: i64 = self
            .commands
            .spublish(self.keys.node_channel(node), payload)
            .await?;
        Ok(usize::try_from(receivers).unwrap_or(0))
    }

    /// Publishes a command on the command channel; returns how many nodes received it (in a
    /// cluster: subscribed on the shard that owns the channel, which is every node).
    pub(super) async fn send_command(&self, command: &Command) -> Result<usize, BrokerError> {
        self.ensure_connected()?;
        let channel = self.keys.control_channel();
        // A command is idempotent: unlike a publish, which the node never sends twice, it may be
        // sent again after a redirect (its slot moved) or a connection that dropped under it.
        let client = self.commands.with_options(&Options {
            max_attempts: Some(COMMAND_ATTEMPTS),
            ..Options::default()
        });
        let receivers: i64 = client.spublish(channel, command.encode()).await?;
        Ok(usize::try_from(receivers).unwrap_or(0))
    }

    fn ensure_connected(&self) -> Result<(), BrokerError> {
        if let Some(error) = self.incompatible.get() {
            return Err(error.clone());
        }
        if self.commands.is_connected() {
            Ok(())
        } else {
            Err(BrokerError::Unavailable("redis is not connected"))
        }
    }

    /// The partition `room` is routed to.
    fn partition(&self, room: &RoomName) -> &subscriber::Partition {
        &self.partitions[super::partition_of(room.as_str(), self.partitions.len())]
    }

    pub(super) async fn publish(
        &self,
        room: &RoomName,
        message: Outgoing,
    ) -> Result<Published, BrokerError> {
        if let Some(error) = self.incompatible.get() {
            return Err(error.clone());
        }
        self.publisher.publish(room, message).await
    }

    /// Calls one of the gateway's functions on the commands connection.
    async fn run<R: fred::types::FromValue>(
        &self,
        function: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, BrokerError> {
        functions::call(&self.commands, &self.commands, function, keys, args).await
    }

    pub(super) async fn head(&self, room: &RoomName) -> Result<Option<Position>, BrokerError> {
        self.ensure_connected()?;
        let keys = self.keys.room(room);
        let args = vec![
            Epoch::random().to_string(),
            self.settings.history.max_age.as_millis().to_string(),
        ];
        let (epoch, newest): (String, String) = self
            .run(functions::HEAD, vec![keys.history, keys.epoch], args)
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
        let keys = self.keys.room(room);
        let mut args = match replay {
            Replay::None => return Ok(History::default()),
            Replay::Since { offset, .. } => vec!["since".to_owned(), offset.to_string()],
            Replay::Last(count) => vec!["last".to_owned(), count.to_string()],
        };
        // The oldest offset still within the age limit, by this node's clock.
        let max_age = self.settings.history.max_age.as_millis() as u64;
        args.push(format!(
            "{}-0",
            (now_micros() / 1000).saturating_sub(max_age)
        ));
        type Reply = (String, String, String, i64, Vec<(String, Vec<String>)>);
        let (epoch, first, last, trimmed, raw): Reply = self
            .run(functions::HISTORY, vec![keys.history, keys.epoch], args)
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

    /// Subscribes to the room's shard channel and returns once Redis has processed it, so
    /// every message published from then on reaches this node.
    pub(super) async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        if let Some(error) = self.incompatible.get() {
            return Err(error.clone());
        }
        self.partition(room).subscribe(room).await
    }

    pub(super) async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        self.partition(room).unsubscribe(room).await
    }

    /// The keys and arguments of one presence upsert for this node's users in each of `rooms`.
    fn upsert_call(&self, rooms: &[(&RoomName, &[PresentUser])]) -> (Vec<String>, Vec<String>) {
        let ttl = self.settings.presence_ttl.as_millis() as u64;
        let now_ms = now_micros() / 1000;
        let mut args = vec![
            (now_ms + ttl).to_string(),
            (ttl * 2).to_string(),
            now_micros().to_string(),
            self.settings.node_id.clone(),
            now_ms.to_string(),
        ];
        let mut keys = Vec::with_capacity(rooms.len() * 4);
        for (room, users) in rooms {
            let room_keys = self.keys.room(room);
            let [entries, counts, names] = room_keys.presence;
            keys.extend([entries, counts, names, room_keys.channel]);
            args.extend([room.to_string(), users.len().to_string()]);
            for user in *users {
                args.push(user.user_id.clone());
                args.push(user.name.clone().unwrap_or_default());
            }
        }
        (keys, args)
    }

    pub(super) async fn presence_upsert(
        &self,
        room: &RoomName,
        users: &[PresentUser],
    ) -> Result<(), BrokerError> {
        self.ensure_connected()?;
        let (keys, args) = self.upsert_call(&[(room, users)]);
        let _: i64 = self.run(functions::PRESENCE_UPSERT, keys, args).await?;
        Ok(())
    }

    /// Refreshes this node's presence entries in many rooms (and drops expired ones): up to
    /// [`HEARTBEAT_BATCH`] rooms per call (in a cluster, per hash slot), the calls sent together.
    /// One call per room cost Redis more for the call than for the room's work.
    pub(super) async fn presence_heartbeat(
        &self,
        rooms: &[(RoomName, Vec<PresentUser>)],
    ) -> Result<(), BrokerError> {
        self.ensure_connected()?;
        let groups = self.keys.group_by_slot(
            self.cluster,
            rooms.iter().map(|(room, users)| (room, users.as_slice())),
            |(room, _)| room,
            HEARTBEAT_BATCH,
        );
        let pipeline = self.commands.pipeline();
        for (_, group) in &groups {
            let (keys, args) = self.upsert_call(group);
            let _: () = pipeline
                .fcall(functions::PRESENCE_UPSERT, keys, args)
                .await?;
        }
        let results: Vec<Result<i64, fred::error::Error>> = pipeline.try_all().await;
        if results
            .iter()
            .any(|result| matches!(result, Err(error) if functions::missing(error)))
        {
            // A Redis without the library (a fresh one): load it and go again, one by one.
            functions::load(&self.commands).await?;
            for (_, group) in &groups {
                let (keys, args) = self.upsert_call(group);
                let _: i64 = self.run(functions::PRESENCE_UPSERT, keys, args).await?;
            }
            return Ok(());
        }
        match results.into_iter().find_map(Result::err) {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
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
        let keys = self.keys.room(room);
        let mut args = vec![
            (now_micros() / 1000).to_string(),
            now_micros().to_string(),
            room.to_string(),
            node.to_owned(),
        ];
        args.extend(users.iter().map(|user| (*user).to_owned()));
        let [entries, counts, names] = keys.presence;
        let _: i64 = self
            .run(
                functions::PRESENCE_REMOVE,
                vec![entries, counts, names, keys.channel],
                args,
            )
            .await?;
        Ok(())
    }

    pub(super) async fn presence_list(
        &self,
        room: &RoomName,
    ) -> Result<Vec<PresentUser>, BrokerError> {
        self.presence_reap(room).await?;
        let [_, users, names] = self.keys.room(room).presence;
        let users: Vec<String> = self.commands.hkeys(users).await?;
        let names: std::collections::HashMap<String, String> = self.commands.hgetall(names).await?;
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
        self.incompatible.get().is_none()
            && self.commands.is_connected()
            && self.publisher.client().is_connected()
            && self.subscriber.is_connected()
            && self.control.is_listening()
            && self.inbox.is_listening()
    }

    /// Why the node can never be ready on this Redis, if it cannot.
    pub(super) fn incompatible(&self) -> Option<&BrokerError> {
        self.incompatible.get()
    }

    pub(super) async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        for partition in &self.partitions {
            partition.close();
        }
        self.control.close().await;
        self.inbox.close().await;
        // Best effort: the process is exiting either way.
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.client().quit().await;
        let _ = self.commands.quit().await;
    }
}

/// The fred builder every connection of a node is made from.
fn builder(settings: &RedisSettings) -> Result<Builder, BrokerError> {
    let mut config = Config::from_url(&settings.url)?;
    let cluster = matches!(config.server, ServerConfig::Clustered { .. });
    if let Some(password) = &settings.password {
        config.password = Some(password.clone());
    }
    if let Some(ca) = &settings.tls_ca {
        if config.tls.is_none() {
            return Err(BrokerError::Incompatible(format!(
                "--redis-tls-ca {} needs a TLS URL (rediss://, rediss-cluster://, rediss-sentinel://)",
                ca.display()
            )));
        }
        config.tls = Some(tls_with_ca(ca)?.into());
    }
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
            // replayed later, so its sender hears about it now. A cluster needs a second
            // attempt: a command answered `ASK` during a slot migration is sent again, after
            // `ASKING`, to the primary importing the slot.
            connection.max_command_attempts = if cluster { 2 } else { 1 };
        });
    Ok(builder)
}

/// A rustls connector trusting the system's roots and the authorities in `ca` (a PEM file).
fn tls_with_ca(ca: &std::path::Path) -> Result<fred::types::config::TlsConnector, BrokerError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let unreadable = |reason: String| {
        BrokerError::Incompatible(format!("--redis-tls-ca {}: {reason}", ca.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is no reason to refuse the rest.
        let _ = roots.add(certificate);
    }
    let mut added = 0;
    for certificate in
        CertificateDer::pem_file_iter(ca).map_err(|error| unreadable(error.to_string()))?
    {
        let certificate = certificate.map_err(|error| unreadable(error.to_string()))?;
        roots
            .add(certificate)
            .map_err(|error| unreadable(error.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(unreadable("no certificate in it".to_owned()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| unreadable(error.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config.into())
}

/// On every connect, checks the server's version (a Redis older than 7.0 lacks what the gateway
/// relies on: the node says so and stays not ready rather than failing in odd ways) and loads
/// the gateway's functions.
fn check_and_load(client: Client, incompatible: Arc<OnceLock<BrokerError>>) -> JoinHandle<()> {
    let mut connects = client.reconnect_rx();
    tokio::spawn(async move {
        while !matches!(connects.recv().await, Err(RecvError::Closed)) {
            let info: Result<String, _> = client.info(Some(InfoKind::Server)).await;
            let Ok(info) = info else { continue };
            let version = info
                .lines()
                .find_map(|line| line.strip_prefix("redis_version:"))
                .unwrap_or("unknown")
                .trim()
                .to_owned();
            if !supported(&version) {
                let error = BrokerError::Incompatible(format!(
                    "Redis {version} is too old: the gateway needs Redis {}.{} or newer (sharded \
                     pub/sub, script flags, XINFO STREAM fields)",
                    MINIMUM_VERSION.0, MINIMUM_VERSION.1
                ));
                tracing::error!(%error, "incompatible redis");
                let _ = incompatible.set(error);
                continue;
            }
            if let Err(error) = functions::load(&client).await {
                tracing::warn!(%error, "could not load the gateway's functions; calls load them");
            }
        }
    })
}

/// Whether a `redis_version` is at least [`MINIMUM_VERSION`].
fn supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= MINIMUM_VERSION,
        _ => false,
    }
}

/// How often the cluster's slot map is read, and for how long after a change it keeps being
/// announced (members of a cluster learn of a change one after the other).
const TOPOLOGY_CHECK: Duration = Duration::from_secs(1);
const TOPOLOGY_SETTLE: u32 = 5;

/// Reads `CLUSTER SLOTS` every second on an existing connection and announces every change
/// (a fingerprint of the reply) to the subscriber partitions, for a few more seconds after
/// each change: one cheap command per node, where asking fred to resynchronise each
/// partition every second would open a connection each time.
fn watch_topology(commands: Client, changes: watch::Sender<u64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TOPOLOGY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        let mut settling = 0;
        loop {
            tick.tick().await;
            if !commands.is_connected() {
                continue;
            }
            let Ok(slots) = commands.cluster_slots::<fred::types::Value>().await else {
                continue;
            };
            let fingerprint = slot_map_fingerprint(slots);
            if last.is_some_and(|last| last != fingerprint) {
                settling = TOPOLOGY_SETTLE;
            }
            last = Some(fingerprint);
            if settling > 0 {
                settling -= 1;
                changes.send_modify(|version| *version += 1);
            }
        }
    })
}

/// A fingerprint of which primary serves which slots in a `CLUSTER SLOTS` reply, the same
/// whichever member answered (replicas and the order of ranges left out).
fn slot_map_fingerprint(reply: fred::types::Value) -> u64 {
    use fred::types::Value;
    use std::hash::{Hash, Hasher};
    let mut ranges: Vec<(i64, i64, String, i64)> = reply
        .into_array()
        .into_iter()
        .filter_map(|range| {
            let Value::Array(range) = range else {
                return None;
            };
            let Value::Array(primary) = range.get(2)? else {
                return None;
            };
            Some((
                range.first()?.as_i64()?,
                range.get(1)?.as_i64()?,
                primary.first()?.as_string()?,
                primary.get(1)?.as_i64()?,
            ))
        })
        .collect();
    ranges.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ranges.hash(&mut hasher);
    hasher.finish()
}

/// Shortest and longest pause before a stopped connection task is started again.
const RESTART_PAUSE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Starts the client's connection task, and starts it again whenever it ends with an error
/// rather than a `quit`: fred's task stops for good on some routing failures (an `ASKING` it
/// cannot send during a slot migration), and a client without its task never answers again.
fn keep_connected<C: ClientLike + 'static>(role: &'static str, client: &C) -> JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut pause = RESTART_PAUSE.0;
        loop {
            let started = tokio::time::Instant::now();
            // Ended by `quit` (the node is stopping), or the runtime is going away: done.
            let Ok(Err(error)) = client.connect().await else {
                break;
            };
            // A task that never connects (a refused password, an unknown certificate) is
            // started again less and less often; one that ran a while starts over quickly.
            if started.elapsed() > RESTART_PAUSE.1 * 2 {
                pause = RESTART_PAUSE.0;
            }
            tracing::warn!(role, %error, ?pause, "redis connection task stopped; starting it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESTART_PAUSE.1);
        }
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_map_fingerprint_ignores_order_and_replicas_but_not_owners() {
        use fred::types::Value;
        let node = |port: i64| Value::Array(vec!["127.0.0.1".into(), port.into(), "id".into()]);
        let range = |first: i64, last: i64, ports: &[i64]| {
            let mut range = vec![first.into(), last.into()];
            range.extend(ports.iter().map(|&port| node(port)));
            Value::Array(range)
        };
        let map = |ranges: Vec<Value>| slot_map_fingerprint(Value::Array(ranges));
        let before = map(vec![
            range(0, 8191, &[7000, 7003]),
            range(8192, 16383, &[7001]),
        ]);
        assert_eq!(
            before,
            map(vec![
                range(8192, 16383, &[7001, 7004]),
                range(0, 8191, &[7000])
            ])
        );
        assert_ne!(
            before,
            map(vec![range(0, 8191, &[7003]), range(8192, 16383, &[7001])]),
            "a failover changes it"
        );
        assert_ne!(
            before,
            map(vec![
                range(0, 8190, &[7000]),
                range(8191, 8191, &[7001]),
                range(8192, 16383, &[7001])
            ]),
            "a moved slot changes it"
        );
    }

    #[test]
    fn versions_from_7_0_are_supported() {
        assert!(supported("7.0.15") && supported("7.2.4") && supported("8.0.0"));
        assert!(
            !supported("6.2.14") && !supported("5.0") && !supported("unknown") && !supported("")
        );
    }
}
