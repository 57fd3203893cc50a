//! The broker boundary: how a node hands a chat message to every node with members in its room.
//!
//! Two implementations sit behind one small enum: [`InProcessBroker`] for a single node, and
//! [`RedisBroker`] for a cluster sharing rooms through Redis pub/sub. Either way, messages come
//! back to the node through its [`Inbox`], so fan-out never knows which broker is in use.

mod in_process;
mod redis;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use bytes::{BufMut, Bytes, BytesMut};

pub use in_process::InProcessBroker;
pub use redis::{RedisBroker, RedisSettings};

use crate::protocol::RoomName;

/// Where a broker hands messages published to rooms this node subscribed to.
pub trait Inbox: Send + Sync + 'static {
    /// One message for `room`: `frame` is the JSON sent to clients, `published_at_micros` the
    /// publishing node's clock when it published.
    fn deliver(&self, room: &str, frame: Utf8Bytes, published_at_micros: u64);
}

/// A broker operation that failed; the caller tells the client.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected right now.
    #[error("broker unavailable: {0}")]
    Unavailable(&'static str),
    /// Redis refused or failed the command.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// The node's broker: in-process or Redis.
pub enum Broker {
    /// Single node, no Redis.
    InProcess(InProcessBroker),
    /// Cluster through Redis pub/sub.
    Redis(RedisBroker),
}

impl Broker {
    /// Publishes a chat message frame to every node subscribed to `room`, this one included.
    pub async fn publish(&self, room: &RoomName, frame: String) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(broker) => {
                broker.publish(room, frame);
                Ok(())
            }
            Broker::Redis(broker) => broker.publish(room, &frame).await,
        }
    }

    /// Starts receiving `room`'s messages on this node.
    pub async fn subscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(()),
            Broker::Redis(broker) => broker.subscribe(room).await,
        }
    }

    /// Stops receiving `room`'s messages on this node.
    pub async fn unsubscribe(&self, room: &RoomName) -> Result<(), BrokerError> {
        match self {
            Broker::InProcess(_) => Ok(()),
            Broker::Redis(broker) => broker.unsubscribe(room).await,
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

/// A shared handle to the inbox a broker delivers into.
pub type SharedInbox = Arc<dyn Inbox>;

/// Microseconds since the Unix epoch on this node's clock.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

/// Wraps a frame for the wire between nodes: `<publish time in µs>\n<frame JSON>`. The time
/// rides outside the JSON so a receiving node measures fan-out latency without parsing it.
fn encode_envelope(published_at_micros: u64, frame: &str) -> Bytes {
    let stamp = published_at_micros.to_string();
    let mut envelope = BytesMut::with_capacity(stamp.len() + 1 + frame.len());
    envelope.put_slice(stamp.as_bytes());
    envelope.put_u8(b'\n');
    envelope.put_slice(frame.as_bytes());
    envelope.freeze()
}

/// Unwraps [`encode_envelope`]; `None` for anything else (a foreign publisher on our channel).
fn decode_envelope(mut envelope: Bytes) -> Option<(u64, Utf8Bytes)> {
    let newline = envelope.iter().position(|&b| b == b'\n')?;
    let stamp = std::str::from_utf8(&envelope[..newline])
        .ok()?
        .parse()
        .ok()?;
    let frame = envelope.split_off(newline + 1);
    Some((stamp, Utf8Bytes::try_from(frame).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_foreign_payloads_are_rejected() {
        let envelope = encode_envelope(1234, r#"{"type":"message"}"#);
        let (stamp, frame) = decode_envelope(envelope).unwrap();
        assert_eq!(stamp, 1234);
        assert_eq!(frame.as_str(), r#"{"type":"message"}"#);
        for foreign in [&b"no newline"[..], b"abc\n{}", b"12\n\xff\xfe"] {
            assert!(decode_envelope(Bytes::copy_from_slice(foreign)).is_none());
        }
    }
}
