//! Engine.IO v4 and Socket.IO v5 packet framing, enough to be a Socket.IO 4 client over the
//! WebSocket transport only (no polling, no binary attachments).
//!
//! Engine.IO packets are text frames whose first character is the packet type
//! (`0` open, `1` close, `2` ping, `3` pong, `4` message, `5` upgrade, `6` noop). A `4` carries
//! a Socket.IO packet: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, types `0`
//! connect, `1` disconnect, `2` event, `3` ack, `4` connect error, `5`/`6` binary event/ack.
//! So `42["message",{...}]` is an event in the main namespace and `40` connects to it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};

/// One Engine.IO packet received as a text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// Handshake data (JSON with `sid`, `pingInterval`, `pingTimeout`, `maxPayload`).
    Open(&'a str),
    Close,
    /// Heartbeat from the server (Engine.IO v4: the server pings, the client answers `3`).
    Ping(&'a str),
    Pong(&'a str),
    /// A Socket.IO packet.
    Message(&'a str),
    Upgrade,
    Noop,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownEngineType(char),
    UnknownSocketType(char),
    BadAttachments,
    BadAckId,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty packet"),
            DecodeError::UnknownEngineType(c) => write!(f, "unknown Engine.IO packet type {c:?}"),
            DecodeError::UnknownSocketType(c) => write!(f, "unknown Socket.IO packet type {c:?}"),
            DecodeError::BadAttachments => write!(f, "malformed attachment count"),
            DecodeError::BadAckId => write!(f, "malformed ack id"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Split a text frame into its Engine.IO packet.
pub fn decode_engine(frame: &str) -> Result<EnginePacket<'_>, DecodeError> {
    let mut chars = frame.chars();
    let kind = chars.next().ok_or(DecodeError::Empty)?;
    let data = chars.as_str();
    Ok(match kind {
        '0' => EnginePacket::Open(data),
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(data),
        '3' => EnginePacket::Pong(data),
        '4' => EnginePacket::Message(data),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        other => return Err(DecodeError::UnknownEngineType(other)),
    })
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// One Socket.IO packet; `data` is the raw JSON (empty when absent).
#[derive(Debug, PartialEq, Eq)]
pub struct SocketPacket<'a> {
    pub kind: SocketKind,
    pub namespace: &'a str,
    pub ack_id: Option<u64>,
    pub attachments: u32,
    pub data: &'a str,
}

/// Decode the Socket.IO packet inside an Engine.IO message.
pub fn decode_socket(packet: &str) -> Result<SocketPacket<'_>, DecodeError> {
    let mut chars = packet.chars();
    let kind = match chars.next().ok_or(DecodeError::Empty)? {
        '0' => SocketKind::Connect,
        '1' => SocketKind::Disconnect,
        '2' => SocketKind::Event,
        '3' => SocketKind::Ack,
        '4' => SocketKind::ConnectError,
        '5' => SocketKind::BinaryEvent,
        '6' => SocketKind::BinaryAck,
        other => return Err(DecodeError::UnknownSocketType(other)),
    };
    let mut rest = chars.as_str();

    let mut attachments = 0;
    if matches!(kind, SocketKind::BinaryEvent | SocketKind::BinaryAck) {
        let (count, after) = rest.split_once('-').ok_or(DecodeError::BadAttachments)?;
        attachments = count.parse().map_err(|_| DecodeError::BadAttachments)?;
        rest = after;
    }

    let mut namespace = "/";
    if rest.starts_with('/') {
        match rest.find(',') {
            Some(i) => {
                namespace = &rest[..i];
                rest = &rest[i + 1..];
            }
            None => {
                namespace = rest;
                rest = "";
            }
        }
    }

    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack_id = if digits > 0 {
        Some(rest[..digits].parse().map_err(|_| DecodeError::BadAckId)?)
    } else {
        None
    };
    rest = &rest[digits..];

    Ok(SocketPacket {
        kind,
        namespace,
        ack_id,
        attachments,
        data: rest,
    })
}

/// The Engine.IO message that connects to the main namespace, with an optional auth payload.
pub fn encode_connect(auth_json: Option<&str>) -> String {
    match auth_json {
        Some(a) => format!("40{a}"),
        None => "40".to_string(),
    }
}

/// The Engine.IO answer to a server ping carrying `data`.
pub fn encode_pong(data: &str) -> String {
    format!("3{data}")
}

/// Append an event in the main namespace (`42["<name>",<payload>]`) to `out`; `payload_json`
/// must already be valid JSON.
pub fn encode_event_into(name: &str, payload_json: &str, out: &mut String) {
    out.push_str("42[");
    // Serialising a &str cannot fail.
    out.push_str(&serde_json::to_string(name).unwrap_or_default());
    out.push(',');
    out.push_str(payload_json);
    out.push(']');
}

/// An event's arguments, `["name", payload, ...]`: the name and the first argument, decoded
/// into `T`; further arguments are skipped.
#[derive(Debug)]
pub struct EventArgs<'a, T> {
    pub name: Cow<'a, str>,
    pub payload: Option<T>,
}

impl<'de: 'a, 'a, T: Deserialize<'de>> Deserialize<'de> for EventArgs<'a, T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArgsVisitor<'a, T>(std::marker::PhantomData<(&'a (), T)>);

        impl<'de: 'a, 'a, T: Deserialize<'de>> Visitor<'de> for ArgsVisitor<'a, T> {
            type Value = EventArgs<'a, T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Socket.IO event array [name, ...args]")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let name: Cow<'a, str> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let payload = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(EventArgs { name, payload })
            }
        }

        deserializer.deserialize_seq(ArgsVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn engine_packets() {
        assert_eq!(
            decode_engine(r#"0{"sid":"abc","pingInterval":25000}"#),
            Ok(EnginePacket::Open(r#"{"sid":"abc","pingInterval":25000}"#))
        );
        assert_eq!(decode_engine("2"), Ok(EnginePacket::Ping("")));
        assert_eq!(decode_engine("3probe"), Ok(EnginePacket::Pong("probe")));
        assert_eq!(decode_engine("40"), Ok(EnginePacket::Message("0")));
        assert_eq!(decode_engine("1"), Ok(EnginePacket::Close));
        assert_eq!(decode_engine("6"), Ok(EnginePacket::Noop));
        assert_eq!(decode_engine(""), Err(DecodeError::Empty));
        assert_eq!(decode_engine("9"), Err(DecodeError::UnknownEngineType('9')));
    }

    #[test]
    fn socket_connect_and_connect_error() {
        let p = decode_socket(r#"0{"sid":"xyz"}"#).unwrap();
        assert_eq!(p.kind, SocketKind::Connect);
        assert_eq!(p.namespace, "/");
        assert_eq!(p.ack_id, None);
        assert_eq!(p.data, r#"{"sid":"xyz"}"#);

        let p = decode_socket(r#"4{"message":"invalid_room: bad"}"#).unwrap();
        assert_eq!(p.kind, SocketKind::ConnectError);
        assert_eq!(p.data, r#"{"message":"invalid_room: bad"}"#);
    }

    #[test]
    fn socket_event_with_namespace_and_ack_id() {
        let p = decode_socket(r#"2/chat,12["message",{"a":1}]"#).unwrap();
        assert_eq!(p.kind, SocketKind::Event);
        assert_eq!(p.namespace, "/chat");
        assert_eq!(p.ack_id, Some(12));
        assert_eq!(p.data, r#"["message",{"a":1}]"#);

        let p = decode_socket(r#"2["userId",{"node":"n"}]"#).unwrap();
        assert_eq!((p.namespace, p.ack_id), ("/", None));

        let p = decode_socket("1/admin").unwrap();
        assert_eq!(
            (p.kind, p.namespace, p.data),
            (SocketKind::Disconnect, "/admin", "")
        );

        let p = decode_socket(r#"31[{"type":"ack"}]"#).unwrap();
        assert_eq!((p.kind, p.ack_id), (SocketKind::Ack, Some(1)));
    }

    #[test]
    fn binary_packets_carry_an_attachment_count() {
        let p = decode_socket(r#"51-["upload",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((p.kind, p.attachments), (SocketKind::BinaryEvent, 1));
        assert_eq!(decode_socket("5x["), Err(DecodeError::BadAttachments));
        assert_eq!(decode_socket("7"), Err(DecodeError::UnknownSocketType('7')));
    }

    #[test]
    fn encoders() {
        assert_eq!(encode_connect(None), "40");
        assert_eq!(
            encode_connect(Some(r#"{"room":"r1"}"#)),
            r#"40{"room":"r1"}"#
        );
        assert_eq!(encode_pong(""), "3");
        let mut s = String::new();
        encode_event_into("message", r#"{"message":"hi"}"#, &mut s);
        assert_eq!(s, r#"42["message",{"message":"hi"}]"#);
        // Round trip through both decoders.
        let EnginePacket::Message(inner) = decode_engine(&s).unwrap() else {
            panic!("not a message")
        };
        let p = decode_socket(inner).unwrap();
        assert_eq!(p.kind, SocketKind::Event);
        let args: EventArgs<Value> = serde_json::from_str(p.data).unwrap();
        assert_eq!(args.name, "message");
        assert_eq!(args.payload.unwrap()["message"], "hi");
    }

    #[test]
    fn event_args_tolerate_missing_and_extra_arguments() {
        let a: EventArgs<Value> = serde_json::from_str(r#"["ping"]"#).unwrap();
        assert_eq!((a.name.as_ref(), a.payload), ("ping", None));
        let a: EventArgs<Value> = serde_json::from_str(r#"["m",1,2,{"x":[3]}]"#).unwrap();
        assert_eq!(a.payload, Some(Value::from(1)));
        assert!(serde_json::from_str::<EventArgs<Value>>("[]").is_err());
        assert!(serde_json::from_str::<EventArgs<Value>>(r#"{"a":1}"#).is_err());
    }
}
