//! Node configuration: every flag, with its environment variable and default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::broker::{HistorySettings, RedisSettings};
use crate::connection::ConnectionLimits;
use crate::http::api::{ApiKey, ApiSettings};
use crate::rooms::hub::HubSettings;
use crate::security::tokens::{Secret, Signer, TokenError};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A chat gateway node: WebSocket clients in, rooms shared through Redis pub/sub.
#[derive(Debug, Clone, Parser)]
// A flag given twice takes its last value (a wrapper script's defaults, then the caller's).
#[command(name = "chat-gateway", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// Address to listen on for WebSocket, the demo page, health, readiness, and (without
    /// --internal-listen) metrics.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// A second address for what only operators and the application's backend may reach:
    /// /metrics (and the server API under /api/), which --listen then no longer serves.
    /// Health and readiness are served on both.
    #[arg(long, env = "GATEWAY_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,

    /// Redis URL. Without it the node runs alone with an in-process broker. One server:
    /// redis://[user:password@]host:port[/db]; a Redis Cluster:
    /// redis-cluster://host:port?node=host:port&node=...; a Sentinel-managed primary:
    /// redis-sentinel://host:port?node=host:port&sentinelServiceName=NAME; rediss... for TLS.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// A file holding the Redis password (replaces the URL's; keeps it off the command line).
    #[arg(long, env = "GATEWAY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,

    /// A PEM file of certificate authorities to trust for a rediss URL, besides the system's.
    #[arg(long, env = "GATEWAY_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<std::path::PathBuf>,

    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    #[arg(long, env = "GATEWAY_REDIS_PREFIX", default_value = "chat:")]
    pub redis_prefix: String,

    /// Replicas that must have a message before it is acknowledged (Redis WAIT after the
    /// append): with 1, a failover loses nothing acknowledged, at the cost of a replication
    /// round trip per publish call. 0: acknowledged once the primary has it.
    #[arg(long, env = "GATEWAY_ACK_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub ack_replicas: u32,

    /// While the node publishes more than one message per Redis call (it is busy), how long a
    /// message may wait for more to share its call (up to a full batch of 128). Larger calls cost
    /// Redis less per message (docs/benchmarks.md), at most this long in latency; an idle node
    /// sends each message at once. 0: never wait.
    #[arg(long, env = "GATEWAY_PUBLISH_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub publish_linger: Duration,

    /// Receive loops the node's rooms are split over (all reading one Redis subscriber
    /// connection), so fan-out uses that many cores [default: the cores available, at most 8].
    #[arg(long, env = "GATEWAY_FANOUT_PARTITIONS",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub fanout_partitions: Option<u32>,

    /// This node's id in logs, metrics and welcome frames [default: random]
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest WebSocket frame or message a client may send, in bytes; larger closes with 1009.
    #[arg(long, env = "GATEWAY_MAX_FRAME_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(128..=16 * 1024 * 1024))]
    pub max_frame_bytes: u32,

    /// Longest chat message text, in bytes; longer gets a `message_too_large` error.
    #[arg(long, env = "GATEWAY_MAX_CHAT_BYTES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=16 * 1024 * 1024))]
    pub max_chat_bytes: u32,

    /// Most rooms one connection may be in at once.
    #[arg(long, env = "GATEWAY_MAX_ROOMS_PER_CONNECTION", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_rooms_per_connection: u32,

    /// Frames queued for one connection before it is closed as a slow consumer (4000).
    #[arg(long, env = "GATEWAY_OUTBOX_CAPACITY", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub outbox_capacity: u32,

    /// Bytes queued for one connection before it is closed as a slow consumer (4000), however
    /// few frames they are.
    #[arg(long, env = "GATEWAY_OUTBOX_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024 * 1024))]
    pub outbox_bytes: u32,

    /// Interval between server pings.
    #[arg(long, env = "GATEWAY_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Close a connection (4001) after this long without a pong or any frame.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// At shutdown, how long to wait for connections to flush and close.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Initial read buffer per connection, in bytes (grows for larger frames, up to the frame limit).
    #[arg(long, env = "GATEWAY_READ_BUFFER_BYTES", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(256..=1024 * 1024))]
    pub read_buffer_bytes: u32,

    /// Pub/sub messages the Redis subscriber may hold before it counts as lagging.
    #[arg(long, env = "GATEWAY_REDIS_SUBSCRIBER_CAPACITY", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(32..=10_000_000))]
    pub redis_subscriber_capacity: u32,

    /// How long a Redis command may take before it counts as failed.
    #[arg(long, env = "GATEWAY_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Messages of history kept per room (approximately), for resume and `last`.
    #[arg(long, env = "GATEWAY_HISTORY_MAX_LEN", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub history_max_len: u32,

    /// How long a room's messages are kept for resume.
    #[arg(long, env = "GATEWAY_HISTORY_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub history_max_age: Duration,

    /// How long a message's client id (`cid`) is remembered, at least: a retry within it is
    /// not stored or delivered again (it may be remembered up to twice as long).
    #[arg(long, env = "GATEWAY_DEDUP_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// How long a node may keep failing to repair a gap from history (after its Redis
    /// subscriber lost messages) before it closes the room's members with 4002 so they resume
    /// elsewhere. Live messages of the room wait meanwhile.
    #[arg(long, env = "GATEWAY_REPAIR_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub repair_timeout: Duration,

    /// How long a presence entry outlives its node's last heartbeat (heartbeats come every third
    /// of it): a crashed node's users are gone from presence within this time.
    #[arg(long, env = "GATEWAY_PRESENCE_TTL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub presence_ttl: Duration,

    /// The secret that signs SSE session tokens and anonymous reconnect tokens (at least 32
    /// bytes), the same on every node of a deployment so that any node honours a reconnect
    /// token. Without it each node signs with a random secret of its own: SSE works as ever,
    /// but a reconnect token keeps its `userId` only on the node that issued it.
    #[arg(
        long,
        env = "GATEWAY_SESSION_SECRET",
        conflicts_with = "session_secret_file",
        hide_env_values = true
    )]
    pub session_secret: Option<Secret>,

    /// The same, read from a file (surrounding whitespace ignored).
    #[arg(long, env = "GATEWAY_SESSION_SECRET_FILE")]
    pub session_secret_file: Option<std::path::PathBuf>,

    /// Authentication, allowed origins and abuse limits (see docs/security.md).
    #[command(flatten)]
    pub security: crate::security::gate::SecurityArgs,

    /// The server API (see docs/api.md).
    #[command(flatten)]
    pub api: ApiArgs,
}

/// The server API (`/api/`), through which the application's backend publishes, reads and
/// moderates.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The key the application's backend sends as `Authorization: Bearer <key>` (at least 16
    /// bytes). Without a key (or key file) the server API is off. Prefer the environment
    /// variable or the file: command lines are visible to other local users.
    #[arg(long, env = "GATEWAY_API_KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<ApiKey>,

    /// The same, read from a file (surrounding whitespace ignored).
    #[arg(long, env = "GATEWAY_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,

    /// Largest request body the server API reads, in bytes; a larger one is refused (413).
    #[arg(long, env = "GATEWAY_API_MAX_BODY_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub api_max_body_bytes: u32,

    /// Most rooms one `POST /api/broadcast` may name.
    #[arg(long, env = "GATEWAY_API_MAX_BROADCAST_ROOMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub api_max_broadcast_rooms: u32,
}

/// A configuration that parses but cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The idle timeout would close healthy connections between pings.
    #[error("--idle-timeout ({idle:?}) must be longer than --ping-interval ({ping:?})")]
    IdleShorterThanPing {
        /// The idle timeout.
        idle: Duration,
        /// The ping interval.
        ping: Duration,
    },
    /// A duration of zero makes no sense here.
    #[error("--{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A file named by a flag cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The Redis key prefix would break the keys' hash tags.
    #[error("--redis-prefix must not contain braces")]
    PrefixWithBraces,
    /// The session secret is unusable (too short), or no random one could be made.
    #[error(transparent)]
    Secret(#[from] TokenError),
    /// The server API key is too easy to guess.
    #[error("the server API key must be at least {} bytes", ApiKey::MIN_BYTES)]
    ApiKeyTooShort,
}

impl Config {
    /// Checks relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("ping-interval", self.ping_interval),
            ("idle-timeout", self.idle_timeout),
            ("redis-timeout", self.redis_timeout),
            ("history-max-age", self.history_max_age),
            ("presence-ttl", self.presence_ttl),
            ("dedup-window", self.dedup_window),
            ("repair-timeout", self.repair_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.redis_prefix.contains(['{', '}']) {
            return Err(ConfigError::PrefixWithBraces);
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError::IdleShorterThanPing {
                idle: self.idle_timeout,
                ping: self.ping_interval,
            });
        }
        Ok(())
    }

    /// The node id, or a random one.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let random = uuid::Uuid::new_v4().simple().to_string();
            format!("node-{}", &random[..6])
        })
    }

    /// Limits and timings for each connection.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_chat_bytes: self.max_chat_bytes as usize,
            max_rooms: self.max_rooms_per_connection as usize,
            outbox_capacity: self.outbox_capacity as usize,
            outbox_bytes: self.outbox_bytes as usize,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            flush_deadline: self.shutdown_grace,
        }
    }

    /// The WebSocket reader's limits and read buffer.
    pub fn websocket(&self) -> tungstenite::protocol::WebSocketConfig {
        let max_frame = self.max_frame_bytes as usize;
        tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes as usize)
            .max_message_size(Some(max_frame))
            .max_frame_size(Some(max_frame))
    }

    /// History and presence settings of the hub.
    pub fn hub_settings(&self) -> HubSettings {
        HubSettings {
            history: self.history(),
            presence_ttl: self.presence_ttl,
            repair_timeout: self.repair_timeout,
        }
    }

    fn history(&self) -> HistorySettings {
        HistorySettings {
            max_len: self.history_max_len as usize,
            max_age: self.history_max_age,
            dedup_window: self.dedup_window,
        }
    }

    /// The server API's settings: its key (none: the API is off) and its limits.
    pub fn api(&self) -> Result<ApiSettings, ConfigError> {
        let key = match (&self.api.api_key, &self.api.api_key_file) {
            (Some(key), _) => Some(key.clone()),
            (None, Some(path)) => Some(ApiKey::from(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Unreadable {
                        path: path.clone(),
                        source,
                    })?
                    .trim(),
            )),
            (None, None) => None,
        };
        if key.as_ref().is_some_and(ApiKey::too_short) {
            return Err(ConfigError::ApiKeyTooShort);
        }
        Ok(ApiSettings {
            key,
            max_body_bytes: self.api.api_max_body_bytes as usize,
            max_broadcast_rooms: self.api.api_max_broadcast_rooms as usize,
            max_chat_bytes: self.max_chat_bytes as usize,
        })
    }

    /// The signer of session and reconnect tokens: under the configured secret, else a random
    /// one of this node's.
    pub fn signer(&self) -> Result<Signer, ConfigError> {
        let secret = match (&self.session_secret, &self.session_secret_file) {
            (Some(secret), _) => {
                return Signer::new(secret.as_bytes()).map_err(ConfigError::Secret);
            }
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Unreadable {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                if self.redis_url.is_some() {
                    tracing::warn!(
                        "no --session-secret: reconnect tokens keep a userId only on the node \
                         that issued them; give every node the same secret"
                    );
                }
                return Signer::random().map_err(ConfigError::Secret);
            }
        };
        Signer::new(secret.as_bytes()).map_err(ConfigError::Secret)
    }

    /// Redis settings for node `node_id`, when a Redis URL is configured.
    pub fn redis(&self, node_id: &str) -> Result<Option<RedisSettings>, ConfigError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let password = match &self.redis_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Unreadable {
                        path: path.clone(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        let partitions = self.fanout_partitions.map_or_else(
            || std::thread::available_parallelism().map_or(1, |cores| cores.get().min(8)),
            |partitions| partitions as usize,
        );
        Ok(Some(RedisSettings {
            url: url.clone(),
            password,
            tls_ca: self.redis_tls_ca.clone(),
            prefix: self.redis_prefix.clone(),
            node_id: node_id.to_owned(),
            history: self.history(),
            presence_ttl: self.presence_ttl,
            subscriber_capacity: self.redis_subscriber_capacity as usize,
            command_timeout: self.redis_timeout,
            ack_replicas: self.ack_replicas,
            partitions,
            publish_linger: self.publish_linger,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::try_parse_from(["chat-gateway"]).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.max_frame_bytes, 65536);
        assert_eq!(config.ping_interval, Duration::from_secs(20));
        assert!(config.redis_url.is_none() || std::env::var_os("REDIS_URL").is_some());
        config.validate().unwrap();
    }

    #[test]
    fn an_idle_timeout_shorter_than_the_ping_interval_is_refused() {
        let config = Config::try_parse_from([
            "chat-gateway",
            "--ping-interval",
            "30s",
            "--idle-timeout",
            "10s",
        ])
        .unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::IdleShorterThanPing { .. })
        ));
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value() {
        let config = Config::try_parse_from([
            "chat-gateway",
            "--max-frame-bytes",
            "1000",
            "--max-frame-bytes",
            "2000",
        ])
        .unwrap();
        assert_eq!(config.max_frame_bytes, 2000);
    }

    #[test]
    fn the_api_is_off_without_a_key_and_a_short_key_is_refused() {
        let config = Config::try_parse_from(["chat-gateway"]).unwrap();
        assert!(config.api().unwrap().key.is_none());
        let short = Config::try_parse_from(["chat-gateway", "--api-key", "short"]).unwrap();
        assert!(matches!(short.api(), Err(ConfigError::ApiKeyTooShort)));
        let key = "0123456789abcdef-key";
        let config = Config::try_parse_from(["chat-gateway", "--api-key", key]).unwrap();
        assert!(config.api().unwrap().key.is_some());
        assert!(
            !format!("{config:?}").contains(key),
            "the key never shows in debug output"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), format!("{key}\n")).unwrap();
        let path = file.path().to_str().unwrap();
        let config = Config::try_parse_from(["chat-gateway", "--api-key-file", path]).unwrap();
        assert!(config.api().unwrap().key.unwrap().matches(key.as_bytes()));
    }

    #[test]
    fn nonsense_values_are_rejected_by_the_parser() {
        assert!(Config::try_parse_from(["chat-gateway", "--max-frame-bytes", "0"]).is_err());
        assert!(Config::try_parse_from(["chat-gateway", "--ping-interval", "soon"]).is_err());
        assert!(Config::try_parse_from(["chat-gateway", "--listen", "nowhere"]).is_err());
    }
}
