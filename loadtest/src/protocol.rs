//! Protocol adapters: how each server under test is addressed, how a chat message is sent and
//! how received frames are read. `gateway` and `ws-peer` share the gateway's JSON frames
//! (docs/protocol.md); `socketio` carries the same JSON objects as Socket.IO events.

use std::borrow::Cow;
use std::fmt;

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::fastjson;
use crate::socketio::{self, EnginePacket, EventArgs, SocketKind};

/// Which server family the clients talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The chat gateway: JSON frames over a plain WebSocket (`/ws?room=R`).
    Gateway,
    /// The ws + ioredis reference peer: the same JSON frames.
    WsPeer,
    /// The Socket.IO 4 reference peer, over the WebSocket transport only.
    Socketio,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Gateway => "gateway",
            Protocol::WsPeer => "ws-peer",
            Protocol::Socketio => "socketio",
        })
    }
}

/// How chat messages are sent by JSON-frame protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SendStyle {
    /// `{"type":"message","room":R,"message":TEXT}`, acknowledged by the server.
    Typed,
    /// `{"message":TEXT}` to the default room, not acknowledged.
    Seed,
    /// Like `typed`, with a fresh client message id (`cid`) in every message: what a client that
    /// retries safely sends, and what the server deduplicates.
    TypedCid,
}

/// Numbers the cids of one load generator run.
static NEXT_CID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The fields of server frames the load generator looks at; the rest is skipped.
#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    node: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// What a received text frame means to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// The server assigned an identity: the connection is ready (`userId` frame).
    Ready { node: Option<String> },
    /// A chat message delivered in a room; the text is the sender's message.
    Chat(Cow<'a, str>),
    /// The server accepted a message this client sent.
    Ack,
    /// The server refused something (error frame or Socket.IO connect error).
    Error { code: String },
    /// The client must answer with this text frame (Socket.IO handshake and heartbeat).
    Reply(String),
    /// The server ended the session at the protocol level.
    Closed,
    /// Anything else (replies the load generator does not use, unknown frame types).
    Other,
}

impl Protocol {
    /// The WebSocket URL for one client: `base` plus the room (and name) in the query. For
    /// Socket.IO an empty path becomes `/socket.io/` and the transport parameters are added.
    pub fn client_url(self, base: &Url, room: &str, name: Option<&str>) -> Url {
        let mut url = base.clone();
        if self == Protocol::Socketio {
            if url.path().is_empty() || url.path() == "/" {
                url.set_path("/socket.io/");
            }
            url.query_pairs_mut()
                .append_pair("EIO", "4")
                .append_pair("transport", "websocket");
        }
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("room", room);
            if let Some(n) = name {
                q.append_pair("name", n);
            }
        }
        url
    }

    /// Append the frame that sends `text` to `room` to `out` (cleared first).
    pub fn encode_chat(self, style: SendStyle, room: &str, text: &str, out: &mut String) {
        out.clear();
        let body = match style {
            SendStyle::Typed => {
                serde_json::json!({"type": "message", "room": room, "message": text})
            }
            SendStyle::TypedCid => {
                let n = NEXT_CID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let cid = format!("lg-{}-{n}", std::process::id());
                serde_json::json!({"type": "message", "room": room, "message": text, "cid": cid})
            }
            SendStyle::Seed => serde_json::json!({"message": text}),
        };
        match self {
            Protocol::Gateway | Protocol::WsPeer => out.push_str(&body.to_string()),
            Protocol::Socketio => socketio::encode_event_into("message", &body.to_string(), out),
        }
    }

    /// Interpret one received text frame. Malformed input is an error, never a panic.
    pub fn decode(self, text: &str) -> Result<Incoming<'_>> {
        match self {
            Protocol::Gateway | Protocol::WsPeer => decode_json_frame(text),
            Protocol::Socketio => decode_socketio(text),
        }
    }
}

fn classify(frame: Frame<'_>) -> Incoming<'_> {
    match frame.kind.as_deref() {
        Some("message") => match frame.message {
            Some(m) => Incoming::Chat(m),
            None => Incoming::Other,
        },
        Some("userId") => Incoming::Ready {
            node: frame.node.map(Cow::into_owned),
        },
        Some("ack") => Incoming::Ack,
        Some("error") => Incoming::Error {
            code: frame
                .code
                .map(Cow::into_owned)
                .unwrap_or_else(|| "unknown".into()),
        },
        _ => Incoming::Other,
    }
}

fn decode_json_frame(text: &str) -> Result<Incoming<'_>> {
    let frame = match scan_frame(text) {
        Some(frame) => frame,
        None => serde_json::from_str(text)?,
    };
    Ok(classify(frame))
}

/// [`Frame`] by the fast path, when it applies (see [`fastjson`]).
fn scan_frame(text: &str) -> Option<Frame<'_>> {
    let mut frame = Frame {
        kind: None,
        message: None,
        node: None,
        code: None,
    };
    fastjson::scan_fields(text, &["type", "message", "node", "code"], |k, v| {
        let v = v.map(Cow::Borrowed);
        match k {
            0 => frame.kind = v,
            1 => frame.message = v,
            2 => frame.node = v,
            _ => frame.code = v,
        }
    })?;
    Some(frame)
}

fn decode_socketio(text: &str) -> Result<Incoming<'_>> {
    let packet = match socketio::decode_engine(text)? {
        EnginePacket::Open(_) => return Ok(Incoming::Reply(socketio::encode_connect(None))),
        EnginePacket::Ping(data) => return Ok(Incoming::Reply(socketio::encode_pong(data))),
        EnginePacket::Close => return Ok(Incoming::Closed),
        EnginePacket::Message(m) => m,
        EnginePacket::Pong(_) | EnginePacket::Upgrade | EnginePacket::Noop => {
            return Ok(Incoming::Other);
        }
    };
    let packet = socketio::decode_socket(packet)?;
    if packet.namespace != "/" {
        return Ok(Incoming::Other);
    }
    match packet.kind {
        SocketKind::Event => {
            let args: EventArgs<Frame> = serde_json::from_str(packet.data)?;
            match args.payload {
                // The payload's `type` names the frame; the event name stands in when absent.
                Some(mut frame) => {
                    if frame.kind.is_none() {
                        frame.kind = Some(args.name);
                    }
                    Ok(classify(frame))
                }
                None => Ok(Incoming::Other),
            }
        }
        SocketKind::ConnectError => {
            #[derive(Deserialize)]
            struct ConnectError {
                #[serde(default)]
                message: String,
            }
            let e: ConnectError = serde_json::from_str(packet.data).unwrap_or(ConnectError {
                message: packet.data.to_string(),
            });
            let code = e.message.split(':').next().unwrap_or_default().to_string();
            Ok(Incoming::Error { code })
        }
        SocketKind::Disconnect => Ok(Incoming::Closed),
        SocketKind::Connect | SocketKind::Ack => Ok(Incoming::Other),
        SocketKind::BinaryEvent | SocketKind::BinaryAck => {
            bail!("binary Socket.IO packets are not supported")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_url_carries_room_and_name() {
        let base = Url::parse("ws://127.0.0.1:8081/ws").unwrap();
        let u = Protocol::Gateway.client_url(&base, "lt-3", Some("c 1"));
        assert_eq!(u.as_str(), "ws://127.0.0.1:8081/ws?room=lt-3&name=c+1");
        let u = Protocol::WsPeer.client_url(&base, "r", None);
        assert_eq!(u.as_str(), "ws://127.0.0.1:8081/ws?room=r");
    }

    #[test]
    fn socketio_url_gets_engine_parameters() {
        let base = Url::parse("ws://127.0.0.1:3001").unwrap();
        let u = Protocol::Socketio.client_url(&base, "r1", None);
        assert_eq!(
            u.as_str(),
            "ws://127.0.0.1:3001/socket.io/?EIO=4&transport=websocket&room=r1"
        );
        let base = Url::parse("ws://h/custom/socket.io/").unwrap();
        let u = Protocol::Socketio.client_url(&base, "r1", None);
        assert_eq!(u.path(), "/custom/socket.io/");
    }

    #[test]
    fn gateway_frames() {
        let p = Protocol::Gateway;
        assert_eq!(
            p.decode(
                r#"{"type":"userId","userId":"u-1","node":"node-a","room":"lobby","protocol":1}"#
            )
            .unwrap(),
            Incoming::Ready {
                node: Some("node-a".into())
            }
        );
        let m = r#"{"type":"message","room":"r","id":"x","userId":"u","message":"lg1 0 1 2 3 ..","ts":1}"#;
        assert_eq!(
            p.decode(m).unwrap(),
            Incoming::Chat("lg1 0 1 2 3 ..".into())
        );
        assert_eq!(
            p.decode(r#"{"type":"ack","room":"r","id":"x","ref":1}"#)
                .unwrap(),
            Incoming::Ack
        );
        assert_eq!(
            p.decode(r#"{"type":"error","code":"not_in_room","reason":"no"}"#)
                .unwrap(),
            Incoming::Error {
                code: "not_in_room".into()
            }
        );
        assert_eq!(p.decode(r#"{"type":"future"}"#).unwrap(), Incoming::Other);
        assert!(p.decode("not json").is_err());
        assert!(p.decode(r#"{"type":5}"#).is_err());
    }

    #[test]
    fn fast_path_and_serde_agree() {
        for t in [
            r#"{"type":"message","room":"r","id":"x","userId":"u","name":"a","message":"lg1 0 1 2 3 ..","ts":1,"offset":"1-0","epoch":"e"}"#,
            r#"{"type":"message","message":"tab\there"}"#,
            r#"{"type":"userId","userId":"u","node":"node-a","room":"lobby","protocol":1}"#,
            r#"{"type":"error","code":"invalid_room","reason":"r","ref":7}"#,
            r#"{"type":"presence","users":[{"userId":"u","name":"a"}],"ref":5}"#,
            r#"{"message":"no type"}"#,
            r#"{"type":null,"message":null}"#,
        ] {
            let fast = scan_frame(t).map(classify);
            let serde = serde_json::from_str::<Frame>(t).map(classify).ok();
            if fast.is_some() {
                assert_eq!(fast, serde, "{t}");
            }
            assert_eq!(Protocol::Gateway.decode(t).ok(), serde, "{t}");
        }
        assert!(scan_frame(r#"{"type":"message","message":"hi"}"#).is_some());
    }

    #[test]
    fn socketio_handshake_heartbeat_and_events() {
        let p = Protocol::Socketio;
        assert_eq!(
            p.decode(r#"0{"sid":"s","pingInterval":25000,"pingTimeout":20000}"#)
                .unwrap(),
            Incoming::Reply("40".into())
        );
        assert_eq!(p.decode("2").unwrap(), Incoming::Reply("3".into()));
        assert_eq!(p.decode(r#"40{"sid":"abc"}"#).unwrap(), Incoming::Other);
        assert_eq!(
            p.decode(r#"42["userId",{"type":"userId","userId":"u","node":"sio-a","room":"r"}]"#)
                .unwrap(),
            Incoming::Ready {
                node: Some("sio-a".into())
            }
        );
        assert_eq!(
            p.decode(r#"42["message",{"type":"message","room":"r","message":"hi","ts":1}]"#)
                .unwrap(),
            Incoming::Chat("hi".into())
        );
        assert_eq!(
            p.decode(r#"44{"message":"invalid_room: room name must be"}"#)
                .unwrap(),
            Incoming::Error {
                code: "invalid_room".into()
            }
        );
        assert_eq!(
            p.decode(r#"42["userId",{"node":"sio-b"}]"#).unwrap(),
            Incoming::Ready {
                node: Some("sio-b".into())
            },
            "event name stands in for a missing type"
        );
        assert_eq!(p.decode("41").unwrap(), Incoming::Closed);
        assert_eq!(p.decode("1").unwrap(), Incoming::Closed);
        assert!(p.decode("42not json").is_err());
        assert!(p.decode("x").is_err());
    }

    #[test]
    fn chat_encodings() {
        let mut s = String::new();
        Protocol::Gateway.encode_chat(SendStyle::Typed, "r1", "hi \"x\"", &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "r1");
        assert_eq!(v["message"], "hi \"x\"");
        Protocol::WsPeer.encode_chat(SendStyle::Seed, "r1", "hi", &mut s);
        assert_eq!(s, r#"{"message":"hi"}"#);
        Protocol::Socketio.encode_chat(SendStyle::Typed, "r1", "hi", &mut s);
        assert!(s.starts_with(r#"42["message",{"#));
        assert_eq!(
            Protocol::Socketio.decode(&s).unwrap(),
            Incoming::Chat("hi".into())
        );
    }
}
