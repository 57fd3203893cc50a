//! One SSE response: the events a session writes and the HTTP body that reads them out.
//!
//! The connection core writes WebSocket frames into its [`Outbox`](crate::transport::outbox)
//! as for any connection, and the fan-out writes the same shared frame bytes it writes to every
//! WebSocket. This stream is the outbox's [`Transport`]: it reads each frame and writes its
//! event (`data: <the same JSON>`; a ping becomes a `: ping` comment, the close frame the
//! closing `close` event) into a buffer of at most [`BUFFER_BYTES`], from which the response
//! body takes whole chunks. While the buffer is full the stream takes nothing (`WouldBlock`),
//! the outbox's bounded backlog forms behind it and, full, closes the session as a slow
//! consumer, exactly as a full socket does for a WebSocket: a stalled reader never grows
//! memory.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::protocol::{RoomName, ServerFrame, to_json};
use crate::transport::outbox::Transport;
use crate::transport::wire;

/// Bytes of events a stream holds for its reader before it takes no more. Large enough for a
/// burst of chat, small next to the outbox's own bound.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// The first bytes of every stream: how long a browser's EventSource waits before it
/// reconnects by itself.
const PREAMBLE: &[u8] = b"retry: 1000\n\n";

/// A chat message frame starts so: its `type` is serialized first.
const MESSAGE_PREFIX: &[u8] = br#"{"type":"message""#;

/// The events of one session, between the session's outbox and the response body.
pub struct EventStream {
    state: Mutex<State>,
    /// The body, waiting for events.
    reader: AtomicWaker,
    /// The session, waiting for room in the buffer or for the reader to go.
    writer: AtomicWaker,
    /// Chat messages of this room carry an event id, so an EventSource resumes it.
    default_room: RoomName,
}

#[derive(Default)]
struct State {
    buffer: BytesMut,
    /// The close event is written: nothing more goes in, and the body ends once it is read.
    ended: bool,
    /// The body will give nothing more: it ended, or the client went away (hyper dropped it).
    finished: bool,
}

/// What the session waits on its stream for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// The reader took events: there is room again.
    Writable,
    /// The response is over: the client went away (or the body ended).
    Finished,
}

impl EventStream {
    /// A stream whose first bytes tell an EventSource to reconnect after a second.
    pub fn new(default_room: RoomName) -> Arc<EventStream> {
        let mut buffer = BytesMut::new();
        buffer.put_slice(PREAMBLE);
        Arc::new(EventStream {
            state: Mutex::new(State {
                buffer,
                ..State::default()
            }),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
            default_room,
        })
    }

    /// The response body reading this stream.
    pub fn body(self: &Arc<Self>) -> EventBody {
        EventBody(self.clone())
    }

    /// Ready when the reader took events (if `writable` is asked for and the buffer has room)
    /// or the response is over.
    pub fn poll_event(&self, cx: &mut Context<'_>, writable: bool) -> Poll<StreamEvent> {
        let state = self.state.lock();
        // Registered under the lock: the reader wakes after it, never between check and wait.
        self.writer.register(cx.waker());
        if state.finished {
            Poll::Ready(StreamEvent::Finished)
        } else if writable && state.buffer.len() < BUFFER_BYTES {
            Poll::Ready(StreamEvent::Writable)
        } else {
            Poll::Pending
        }
    }

    /// Waits until the response is over: read to its end (after the close event), or its
    /// client gone.
    pub async fn finished(&self) {
        std::future::poll_fn(|cx| {
            let state = self.state.lock();
            self.writer.register(cx.waker());
            if state.finished {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Waits until the buffer has room again (or the response is over).
    pub async fn writable(&self) {
        std::future::poll_fn(|cx| self.poll_event(cx, true).map(|_| ())).await;
    }

    /// Ends the stream: the body gives what is buffered, then ends. Whether the response was
    /// over already (read to the end, or its client gone).
    pub fn end(&self) -> bool {
        let finished = {
            let mut state = self.state.lock();
            state.ended = true;
            state.finished
        };
        self.reader.wake();
        finished
    }

    /// Writes one server frame's event; `false` for bytes that are no whole frame.
    fn write_frame(&self, state: &mut State, frame: &[u8]) -> bool {
        let Some((opcode, payload, rest)) = wire::decode(frame) else {
            return false;
        };
        if !rest.is_empty() {
            return false;
        }
        let buffer = &mut state.buffer;
        match opcode {
            wire::TEXT => {
                if let Some((epoch, offset)) = self.event_id(payload) {
                    buffer.put_slice(b"id: ");
                    buffer.put_slice(epoch.as_bytes());
                    buffer.put_u8(b':');
                    buffer.put_slice(offset.as_bytes());
                    buffer.put_u8(b'\n');
                }
                // A frame is one line of JSON; should one ever hold a line break, each line
                // gets its own `data:` field and the reader joins them back.
                for line in payload.split(|&byte| byte == b'\n') {
                    buffer.put_slice(b"data: ");
                    buffer.put_slice(line);
                    buffer.put_u8(b'\n');
                }
                buffer.put_u8(b'\n');
            }
            wire::PING => buffer.put_slice(b": ping\n\n"),
            wire::CLOSE => {
                let (code, reason) = match payload.split_first_chunk::<2>() {
                    Some((code, reason)) => {
                        (u16::from_be_bytes(*code), String::from_utf8_lossy(reason))
                    }
                    None => (1000, "".into()),
                };
                let event = to_json(&ServerFrame::Close {
                    code,
                    reason: &reason,
                });
                buffer.put_slice(b"data: ");
                buffer.put_slice(event.as_bytes());
                buffer.put_slice(b"\n\n");
                state.ended = true;
            }
            // Nothing else is ever written to a client (pongs answer WebSocket pings).
            _ => {}
        }
        true
    }

    /// The event id of a chat message of the default room: `<epoch>:<offset>`, which an
    /// EventSource sends back as `Last-Event-ID` when it reconnects.
    fn event_id<'a>(&self, payload: &'a [u8]) -> Option<(&'a str, &'a str)> {
        #[derive(Deserialize)]
        struct Place<'a> {
            room: &'a str,
            offset: &'a str,
            epoch: &'a str,
        }
        if !payload.starts_with(MESSAGE_PREFIX) {
            return None;
        }
        // Room names, offsets and epochs never need escaping, so they borrow from the frame.
        let place: Place<'a> = serde_json::from_slice(payload).ok()?;
        (place.room == self.default_room.as_str()).then_some((place.epoch, place.offset))
    }
}

impl Transport for EventStream {
    fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut state = self.state.lock();
        if state.finished || state.ended {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut taken = 0;
        for frame in frames {
            // A frame always fits an empty buffer, however large; then only while there is room.
            if !state.buffer.is_empty() && state.buffer.len() >= BUFFER_BYTES {
                break;
            }
            // The outbox hands whole frames, and a part of one only after a partial write,
            // which this transport never makes.
            if !self.write_frame(&mut state, frame) {
                return Err(io::ErrorKind::InvalidData.into());
            }
            taken += frame.len();
            if state.ended {
                break;
            }
        }
        drop(state);
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.reader.wake();
        Ok(taken)
    }
}

/// The response body of an SSE stream: whatever events are buffered, as one chunk each time
/// hyper asks. Dropped by hyper when the client goes away, which ends the session.
pub struct EventBody(Arc<EventStream>);

impl futures_util::Stream for EventBody {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let stream = &self.0;
        let mut state = stream.state.lock();
        if !state.buffer.is_empty() {
            let chunk = state.buffer.split().freeze();
            drop(state);
            stream.writer.wake();
            return Poll::Ready(Some(Ok(chunk)));
        }
        if state.ended {
            state.finished = true;
            drop(state);
            stream.writer.wake();
            return Poll::Ready(None);
        }
        stream.reader.register(cx.waker());
        Poll::Pending
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        self.0.state.lock().finished = true;
        self.0.writer.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::WireFrame;
    use futures_util::StreamExt;

    fn write(stream: &EventStream, frames: &[WireFrame]) -> io::Result<usize> {
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f.as_bytes())).collect();
        stream.try_write_vectored(&slices)
    }

    async fn read(body: &mut EventBody) -> String {
        let chunk = body.next().await.unwrap().unwrap();
        String::from_utf8(chunk.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn frames_become_events_and_default_room_messages_carry_their_place() {
        let stream = EventStream::new(RoomName::parse("lobby").unwrap());
        let mut body = stream.body();
        let lobby = r#"{"type":"message","room":"lobby","id":"x","message":"hi","offset":"5-1","epoch":"ep"}"#;
        let news = r#"{"type":"message","room":"news","id":"y","message":"yo","offset":"6-0","epoch":"ep"}"#;
        let frames = [
            WireFrame::text(r#"{"type":"userId"}"#),
            WireFrame::text(lobby),
            WireFrame::text(news),
            WireFrame::ping(),
        ];
        let all: usize = frames.iter().map(|f| f.as_bytes().len()).sum();
        assert_eq!(write(&stream, &frames).unwrap(), all);
        assert_eq!(
            read(&mut body).await,
            format!(
                "retry: 1000\n\ndata: {{\"type\":\"userId\"}}\n\nid: ep:5-1\ndata: {lobby}\n\n\
                 data: {news}\n\n: ping\n\n"
            )
        );

        write(&stream, &[WireFrame::close(4000, "slow consumer")]).unwrap();
        assert_eq!(
            read(&mut body).await,
            "data: {\"type\":\"close\",\"code\":4000,\"reason\":\"slow consumer\"}\n\n"
        );
        assert!(body.next().await.is_none(), "the close event ends the body");
        assert!(write(&stream, &[WireFrame::text("{}")]).is_err());
    }

    #[tokio::test]
    async fn a_full_buffer_takes_nothing_until_the_reader_catches_up() {
        let stream = EventStream::new(RoomName::parse("lobby").unwrap());
        let mut body = stream.body();
        let big = WireFrame::text(format!("{{\"x\":\"{}\"}}", "a".repeat(BUFFER_BYTES)));
        assert!(
            write(&stream, std::slice::from_ref(&big)).is_ok(),
            "fits the empty buffer"
        );
        let refused = write(&stream, std::slice::from_ref(&big)).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        read(&mut body).await;
        assert!(write(&stream, &[big]).is_ok());
        drop(body);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(
            stream.poll_event(&mut cx, false),
            Poll::Ready(StreamEvent::Finished),
            "a dropped body means the client is gone"
        );
    }
}
