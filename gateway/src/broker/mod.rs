//! The broker boundary: how a node hands a chat message to every node with members in its room,
//! keeps the room's recent history, and tracks who is online.
//!
//! Two implementations sit behind one small enum: [`InProcessBroker`] for a single node, and
//! [`RedisBroker`] for a cluster sharing rooms through Redis (pub/sub for delivery, a stream per
//! room for history, sorted sets for presence). Either way, messages come back to the node
//! through its [`Inbox`], so fan-out never knows which broker is in use.
//!
//! The broker also carries [`Command`]s, what the application's backend decides about a user, to
//! every node; each hands them to the [`CommandHandler`] it was started with. And it carries
//! messages for one node to that node's inbox ([`direct`]), handed to its [`DirectHandler`].

mod control;
mod direct;
mod in_process;
mod redis;

use std::sync::Arc;
use std::time::Duration;

pub use control::{Command, CommandHandler};
pub use direct::DirectHandler;
pub use in_process::InProcessBroker;
pub use redis::{KeySpace, RedisBroker, RedisSettings};

use crate::clock::now_micros;
use crate::protocol::{
    ChatMessage, ClientId, Epoch, FrameText, Offset, Position, PresentUser, Replay, RoomName,
    to_json, with_offset,
};
pub use crate::protocol::{Delivery, DeliveryKind};

/// Where a broker hands what it receives.
pub trait Inbox: Send + Sync + 'static {
    /// One delivery for `room`. It may wait to be written until [`Inbox::flush`].
    fn deliver(&self, room: &str, delivery: Delivery);
    /// The broker has handed over everything it has for now: write it out.
    fn flush(&self);
    /// Messages may be missing from here on (the subscriber lagged, lost its connection, or a
    /// room's slot moved): hold the live traffic of every room `which` says, where it is, until
    /// [`Inbox::repair`] has filled the gap. Called before anything that arrives after the gap
    /// is delivered.
    fn hold(&self, which: &dyn Fn(&str) -> bool);
    /// The subscriptions are in effect again: repair every held room from history.
    fn repair(&self);
}

/// A shared handle to the inbox a broker delivers into.
pub type SharedInbox = Arc<dyn Inbox>;

/// A broker operation that failed; the caller tells the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected right now; nothing was sent.
    #[error("broker unavailable: {0}")]
    Unavailable(&'static str),
    /// Redis refused or failed the command.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis answered something this node cannot read.
    #[error("unexpected reply from redis: {0}")]
    Reply(&'static str),
    /// A script failed part way: what it did before the error stays done.
    #[error("redis script failed part way: {0}")]
    Partial(fred::error::Error),
    /// The Redis server cannot serve this gateway.
    #[error("{0}")]
    Incompatible(String),
}

impl BrokerError {
    /// Whether the command may have taken effect although this call failed: it was sent and
    /// then timed out or lost its connection, or it ran and its reply made no sense. Redis
    /// still runs a command it received after the caller stopped waiting, so such a publish
    /// must not be reported as "not sent".
    pub fn outcome_unknown(&self) -> bool {
        use fred::error::ErrorKind;
        match self {
            BrokerError::Unavailable(_) | BrokerError::Incompatible(_) => false,
            BrokerError::Reply(_) | BrokerError::Partial(_) => true,
            BrokerError::Redis(error) => matches!(
                error.kind(),
                ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Protocol
            ),
        }
    }
}

/// Bounds of each room's history, and how long a client message id is remembered.
#[derive(Debug, Clone, Copy)]
pub struct HistorySettings {
    /// Messages kept per room (approximately: trimming works in blocks).
    pub max_len: usize,
    /// How long a message is kept.
    pub max_age: Duration,
    /// A message's `cid` is remembered at least this long (and at most twice as long).
    pub dedup_window: Duration,
}

/// A chat message to store and publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The `message` frame as members receive it, without offset and epoch.
    pub frame: String,
    /// Its id.
    pub id: uuid::Uuid,
    /// The sender's user id and the client's message id: a second message with the same pair
    /// in the same room, within the dedup window, is not stored again.
    pub dedup: Option<(String, String)>,
}

impl Outgoing {
    /// A chat message from `user_id` (shown as `name`) to `room`, with a fresh UUIDv7 and this
    /// node's clock; a `cid` makes a repeat from the same user in the room a duplicate. Every
    /// way a message comes in (a member's frame, the server API) builds it here, so each
    /// carries the same frame.
    pub fn chat(
        room: &RoomName,
        user_id: &str,
        name: Option<&str>,
        text: &str,
        cid: Option<&ClientId>,
    ) -> Outgoing {
        let id = uuid::Uuid::now_v7();
        let frame = to_json(&ChatMessage {
            room,
            id,
            user_id,
            name,
            message: text,
            ts: now_micros() / 1000,
        });
        Outgoing {
            frame,
            id,
            dedup: cid.map(|cid| (user_id.to_owned(), cid.as_str().to_owned())),
        }
    }

    /// The dedup key as stored: user and cid, joined by a unit separator (neither contains it).
    fn dedup_field(&self) -> String {
        match &self.dedup {
            Some((user, cid)) => format!("{user}\x1f{cid}"),
            None => String::new(),
        }
    }
}

/// A stored message accepted by the broker.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Its place in the room's history.
    pub position: Position,
    /// Its id: the one sent, or for a duplicate the original message's.
    pub id: uuid::Uuid,
    /// The message's `cid` was stored before: nothing was published this time.
    pub duplicate: bool,
}

/// What a replay found in a room's history.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The history's epoch; `None` when the room has no history at all.
    pub epoch: Option<Epoch>,
    /// Messages, oldest first, as clients receive them (with offset and epoch).
    pub entries: Vec<(Offset, FrameText)>,
    /// For a `Since` replay: every message after the offset is in `entries`.
    pub complete: bool,
}

impl History {
    /// Applies [`Self::judge_since`] when the replay is a `Since`.
    fn judge_since_if(self, replay: &Replay, retained: Retained) -> Self {
        match replay {
            Replay::Since { offset, epoch } => {
                self.judge_since(*offset, epoch.as_deref(), retained)
            }
            _ => self,
        }
    }

    /// Judges a `since` replay: nothing may be missing between `since` and the entries. Only
    /// the oldest messages are ever trimmed, so a `since` still in the history (or nothing ever
    /// trimmed) means nothing after it is gone.
    fn judge_since(
        mut self,
        since: Offset,
        client_epoch: Option<&str>,
        retained: Retained,
    ) -> Self {
        let same_epoch = match (&self.epoch, client_epoch) {
            (Some(current), Some(client)) => current.as_str() == client,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let nothing_missing = !retained.trimmed
            || since == retained.last
            || retained.first.is_some_and(|first| since >= first);
        self.complete = same_epoch && since <= retained.last && nothing_missing;
        self
    }
}

/// What a room's history still holds, for judging a replay.
#[derive(Debug, Clone, Copy)]
struct Retained {
    /// The oldest offset kept, if any message is.
    first: Option<Offset>,
    /// The newest offset ever given out.
    last: Offset,
    /// Whether any message was ever trimmed away.
    trimmed: bool,
}

/// Which of `count` fan-out partitions `room` belongs to: one subscriber connection and one
/// receive loop each, so a room's traffic always takes the same path and keeps its order.
pub fn partition_of(room: &str, count: usize) -> usize {
    usize::from(fred::util::redis_keyslot(room.as_bytes())) % count.max(1)
}

/// The node's broker: in-process or Redis.
pub enum Broker {
    /// Single node, no Redis (boxed, as is the other: there is one per node).
    InProcess(Box<InProcessBroker>),
    /// Cluster through Redis.
    Redis(Box<RedisBroker>),
}

impl Broker {
    /// Stores a chat message in the room's history and publishes it to every node subscribed
    /// to `room`, this one included; a repeated `cid` is answered with the original message.
    pub async fn publish(
        &self,
        room: &RoomName,
        message: Outgoing,
    ) -> Result<Published, BrokerError> {
        match self {
            Broker::InProcess(broker) => Ok(broker.publish(room, message)),
            Broker::Redis(broker) => broker.publish(room, message).await,
        }
    }

    /// Where the room's history ends now, giving it an epoch if it has none; `None` for a broker
    /// that cannot lose messages. Read before subscribing, it is where the node would repair
    /// from if it missed messages before delivering any.
    pub async fn head(&self, room: &RoomName) -> Result<Option<Position>, BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(None),
            Broker::Redis(broker) => broker.head(room).await,
        }
    }

    /// Reads a room's history for a replay.
    pub async fn history(&self, room: &RoomName, replay: &Replay) -> Result<History, BrokerError> {
        match self {
            Broker::InProcess(broker) => Ok(broker.history(room, replay)),
            Broker::Redis(broker) => broker.history(room, replay).await,
        }
    }

    /// Starts receiving `room`'s traffic on this node.
    pub async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(()),
            Broker::Redis(broker) => broker.subscribe(room).await,
        }
    }

    /// Stops receiving `room`'s traffic on this node.
    pub async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(()),
            Broker::Redis(broker) => broker.unsubscribe(room).await,
        }
    }

    /// Marks users online in `room` through this node (also refreshes them on heartbeats).
    pub async fn presence_upsert(
        &self,
        room: &RoomName,
        users: &[PresentUser],
    ) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(broker) => {
                broker.presence_upsert(room, users);
                Ok(())
            }
            Broker::Redis(broker) => broker.presence_upsert(room, users).await,
        }
    }

    /// Takes users offline in `room` on this node.
    pub async fn presence_remove(
        &self,
        room: &RoomName,
        users: &[&str],
    ) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(broker) => {
                broker.presence_remove(room, users);
                Ok(())
            }
            Broker::Redis(broker) => broker.presence_remove(room, users).await,
        }
    }

    /// Everyone online in `room` across the cluster, after dropping entries of dead nodes.
    pub async fn presence_list(&self, room: &RoomName) -> Result<Vec<PresentUser>, BrokerError> {
        match self {
            Broker::InProcess(broker) => Ok(broker.presence_list(room)),
            Broker::Redis(broker) => broker.presence_list(room).await,
        }
    }

    /// Refreshes this node's presence entries in every room it has users in, and drops those
    /// of dead nodes, announcing who left.
    pub async fn presence_heartbeat(
        &self,
        rooms: &[(RoomName, Vec<PresentUser>)],
    ) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(broker) => {
                for (room, users) in rooms {
                    broker.presence_upsert(room, users);
                }
                Ok(())
            }
            Broker::Redis(broker) => broker.presence_heartbeat(rooms).await,
        }
    }

    /// Sends a command to every node, this one included, each of which hands it to the
    /// [`CommandHandler`] it was started with; returns how many nodes received it.
    pub async fn send_command(&self, command: &Command) -> Result<usize, BrokerError> {
        match self {
            Broker::InProcess(broker) => Ok(broker.send_command(command)),
            Broker::Redis(broker) => broker.send_command(command).await,
        }
    }

    /// Sends `payload` to node `node`'s inbox; returns how many nodes received it (0: no such
    /// node is listening). The in-process broker is the only node: nothing to send to.
    pub async fn send_to_node(&self, node: &str, payload: String) -> Result<usize, BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(0),
            Broker::Redis(broker) => broker.send_to_node(node, payload).await,
        }
    }

    /// Why the node can never be ready on this broker, if it cannot (a Redis too old).
    pub fn incompatible(&self) -> Option<&BrokerError> {
        match self {
            Broker::InProcess(_) => None,
            Broker::Redis(broker) => broker.incompatible(),
        }
    }

    /// Whether publishing and receiving work right now.
    pub fn is_ready(&self) -> bool {
        match self {
            Broker::InProcess(_) => true,
            Broker::Redis(broker) => broker.is_ready(),
        }
    }

    /// Which implementation this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::InProcess(_) => "in-process",
            Broker::Redis(_) => "redis",
        }
    }

    /// Closes broker connections at shutdown.
    pub async fn close(&self) {
        if let Broker::Redis(broker) = self {
            broker.close().await;
        }
    }
}

/// Wraps a frame for the wire between nodes:
/// `<publish time µs>\n<kind m|p>\n<offset>\n<epoch>\n<frame JSON>`. The header rides outside
/// the JSON so a receiving node neither parses nor re-serializes the frame. The Lua scripts build
/// the same format; this is its reference, used by the tests.
#[cfg(test)]
fn encode_envelope(published_at_micros: u64, kind: DeliveryKind, frame: &str) -> bytes::Bytes {
    let header = match kind {
        DeliveryKind::Chat(Position { offset, epoch }) => {
            format!("{published_at_micros}\nm\n{offset}\n{epoch}\n")
        }
        DeliveryKind::Presence => format!("{published_at_micros}\np\n\n\n"),
    };
    bytes::Bytes::from(format!("{header}{frame}"))
}

/// Unwraps [`encode_envelope`] into a delivery; `None` for anything else (a foreign publisher).
fn decode_envelope(envelope: &[u8]) -> Option<Delivery> {
    let mut parts = envelope.splitn(5, |&b| b == b'\n');
    let mut text = || std::str::from_utf8(parts.next()?).ok();
    let published_at_micros = text()?.parse().ok()?;
    let kind = text()?;
    let offset = text()?;
    let epoch = text()?;
    let frame = text()?;
    let (kind, frame) = match kind {
        "m" => {
            let position = Position {
                offset: Offset::parse(offset)?,
                epoch: Epoch::parse(epoch)?,
            };
            (
                DeliveryKind::Chat(position),
                with_offset(frame, position.offset, position.epoch),
            )
        }
        "p" => (DeliveryKind::Presence, frame.to_owned()),
        _ => return None,
    };
    Some(Delivery {
        kind,
        frame: FrameText::from(frame),
        published_at_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_foreign_payloads_are_rejected() {
        let position = Position {
            offset: Offset { ms: 5, seq: 1 },
            epoch: Epoch::parse("ep1").unwrap(),
        };
        let envelope = encode_envelope(1234, DeliveryKind::Chat(position), r#"{"type":"message"}"#);
        let delivery = decode_envelope(&envelope).unwrap();
        assert_eq!(delivery.published_at_micros, 1234);
        assert_eq!(delivery.kind, DeliveryKind::Chat(position));
        assert_eq!(
            delivery.frame.to_text(),
            r#"{"type":"message","offset":"5-1","epoch":"ep1"}"#
        );

        let envelope = encode_envelope(9, DeliveryKind::Presence, r#"{"type":"presence_event"}"#);
        assert_eq!(
            decode_envelope(&envelope).unwrap().kind,
            DeliveryKind::Presence
        );

        for foreign in [
            &b"no newline"[..],
            b"abc\nm\n1-0\ne\n{}",
            b"12\nm\n1-0\nbad\"epoch\n{}",
            b"12\nx\n\n\n{}",
        ] {
            assert!(
                decode_envelope(foreign).is_none(),
                "{:?}",
                String::from_utf8_lossy(foreign)
            );
        }
    }

    #[test]
    fn a_since_replay_is_complete_only_when_nothing_was_trimmed_or_lost() {
        let history = |epoch: Option<&str>| History {
            epoch: epoch.and_then(Epoch::parse),
            ..History::default()
        };
        let offset = |ms| Offset { ms, seq: 0 };
        let trimmed = Retained {
            first: Some(offset(10)),
            last: offset(50),
            trimmed: true,
        };
        let judge = |epoch, since, client, retained| {
            history(epoch)
                .judge_since(offset(since), client, retained)
                .complete
        };
        assert!(judge(Some("e"), 20, Some("e"), trimmed));
        assert!(
            judge(Some("e"), 10, None, trimmed),
            "since is the oldest kept"
        );
        assert!(
            !judge(Some("e"), 9, None, trimmed),
            "something after 9 may be gone"
        );
        assert!(
            judge(
                Some("e"),
                0,
                None,
                Retained {
                    trimmed: false,
                    ..trimmed
                }
            ),
            "nothing ever trimmed"
        );
        assert!(!judge(Some("e"), 20, Some("old"), trimmed), "another epoch");
        assert!(
            !judge(Some("e"), 60, None, trimmed),
            "an offset from the future"
        );
        assert!(!judge(None, 20, None, trimmed), "no history");
        assert!(
            judge(
                Some("e"),
                50,
                None,
                Retained {
                    first: None,
                    ..trimmed
                }
            ),
            "all trimmed, but seen"
        );
    }
}
