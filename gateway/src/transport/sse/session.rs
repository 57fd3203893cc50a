//! One SSE session, served by one task: it hands the frames its client POSTed (wherever they
//! landed: see `relay`) to the connection core, drains the connection's backlog into the event
//! stream when one forms, sends heartbeats, and ends the stream with a `close` event.
//!
//! As for a WebSocket, frames to the client do not pass through this task: the fan-out and
//! the core write them through the connection's outbox straight into the event stream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use super::relay::Registration;
use super::stream::{EventStream, StreamEvent};
use crate::connection::{Connection, Identity, NodeContext};
use crate::metrics::{self, TransportMeters};
use crate::protocol::close::Disconnect;
use crate::security::gate::ConnectionGuard;
use crate::transport::outbox::Outbox;
use crate::transport::wire::WireFrame;

/// How long a slow consumer's close event may wait behind its stalled reader.
const SLOW_CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Most frames a session holds from its POSTs before it answers 429: as many as a WebSocket
/// lets wait behind a broker call, plus one POST's worth.
pub const MAX_POSTED_FRAMES: usize = crate::connection::MAX_WAITING + super::MAX_FRAMES_PER_POST;

/// Frames POSTed for one session, waiting for its task.
#[derive(Default)]
pub struct PostBox {
    state: Mutex<Posted>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Posted {
    frames: VecDeque<String>,
    /// The session ended: nothing more is taken.
    closed: bool,
}

/// What became of the frames offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued, in order, for the session.
    Accepted(usize),
    /// Too many frames wait already; none of these was taken.
    Busy,
    /// The session has ended.
    Closed,
}

impl PostBox {
    /// Queues `frames` (each a client frame's JSON text) for the session, all or none.
    pub fn offer(&self, frames: Vec<String>) -> Offer {
        let count = frames.len();
        {
            let mut posted = self.state.lock();
            if posted.closed {
                return Offer::Closed;
            }
            if posted.frames.len() + count > MAX_POSTED_FRAMES {
                return Offer::Busy;
            }
            posted.frames.extend(frames);
        }
        self.waker.wake();
        Offer::Accepted(count)
    }

    /// The next frame, oldest first; otherwise `Pending`, waking the session when one comes.
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<String> {
        let mut posted = self.state.lock();
        self.waker.register(cx.waker());
        match posted.frames.pop_front() {
            Some(frame) => Poll::Ready(frame),
            None => Poll::Pending,
        }
    }

    /// Takes the next frame if one waits.
    fn next(&self) -> Option<String> {
        self.state.lock().frames.pop_front()
    }

    /// Takes nothing more and drops what waits.
    pub fn close(&self) {
        let mut posted = self.state.lock();
        posted.closed = true;
        posted.frames.clear();
    }
}

/// What woke a waiting session.
enum Wake {
    /// A POST brought this frame.
    Posted(String),
    /// A broker call for the connection finished.
    Answered,
    /// The stream has room for more of the backlog.
    Writable,
    /// The outbox has a backlog or a close request.
    Outbox,
    /// Time for a heartbeat.
    Tick,
    /// The node is shutting down.
    Shutdown,
    /// The connection must end: its token expired, or its client went away.
    Ended(Disconnect),
}

/// Runs one session to the end: `registration` is its place in the relay (POSTs for it are
/// refused once it ends), `abort` closes the HTTP connection of a response that could not end
/// by itself (its reader stalled). Built before the returned future, as a WebSocket session
/// is, so the future does not hold its arguments twice.
pub fn serve(
    stream: Arc<EventStream>,
    registration: Registration,
    identity: Identity,
    context: Arc<NodeContext>,
    guard: ConnectionGuard,
    meters: Arc<TransportMeters>,
    abort: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send {
    let limits = &context.limits;
    let outbox = Outbox::new(
        stream.clone(),
        meters,
        limits.outbox_capacity,
        limits.outbox_bytes,
    );
    let session = Session {
        core: Connection::new(identity, outbox.clone(), context.clone(), guard),
        outbox,
        stream,
        posts: registration.posts().clone(),
        _registration: registration,
        context,
    };
    session.serve(abort)
}

struct Session {
    core: Connection,
    outbox: Outbox,
    stream: Arc<EventStream>,
    posts: Arc<PostBox>,
    _registration: Registration,
    context: Arc<NodeContext>,
}

impl Session {
    #[allow(clippy::manual_async_fn)]
    fn serve(mut self, abort: impl FnOnce() + Send + 'static) -> impl Future<Output = ()> + Send {
        async move {
            metrics::connection_opened();
            self.core.start();
            let reason = self.run().await;
            self.posts.close();
            if !Box::pin(self.close(reason)).await {
                abort();
            }
            Box::pin(self.core.finish()).await;
            metrics::connection_closed(reason);
        }
    }

    /// Hands POSTed frames to the core, drains the backlog, sends heartbeats, and watches for
    /// anything that ends the session; returns why it ends.
    async fn run(&mut self) -> Disconnect {
        let context = self.context.clone();
        let limits = &context.limits;
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + limits.ping_interval,
            limits.ping_interval,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutting_down = context.shutdown.cancelled();
        tokio::pin!(shutting_down);
        let mut wake = Wake::Answered;
        loop {
            match wake {
                Wake::Posted(frame) => {
                    if let Err(reason) = self.core.receive_text(&frame) {
                        return reason;
                    }
                    // A POST brings up to 32 frames at once: take what the core has room for.
                    while !self.core.is_full() && self.outbox.close_requested().is_none() {
                        let Some(frame) = self.posts.next() else {
                            break;
                        };
                        if let Err(reason) = self.core.receive_text(&frame) {
                            return reason;
                        }
                    }
                }
                Wake::Answered | Wake::Outbox => {}
                Wake::Writable => {
                    if self.outbox.write_backlog().is_err() {
                        return Disconnect::ConnectionLost;
                    }
                }
                Wake::Shutdown => return context.shutdown_close(),
                Wake::Ended(reason) => return reason,
                // A heartbeat that cannot go out (a full backlog) has asked for a slow-consumer
                // close, checked below. The client sends no heartbeats of its own: a client that
                // is gone shows as its response's end, not as silence.
                Wake::Tick => {
                    let _ = self.outbox.push(&WireFrame::ping());
                }
            }
            if let Some(reason) = self.outbox.close_requested() {
                return reason;
            }
            let backlog = self.outbox.has_backlog();
            let (core, outbox, stream, posts) =
                (&mut self.core, &self.outbox, &self.stream, &self.posts);
            // One hand-written poll, as for a WebSocket: no future kept per event source.
            wake = std::future::poll_fn(|cx| {
                if shutting_down.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Shutdown);
                }
                if let Poll::Ready(reason) = core.poll_expired(cx) {
                    return Poll::Ready(Wake::Ended(reason));
                }
                if outbox.poll_woken(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                if core.poll(cx).is_ready() {
                    return Poll::Ready(Wake::Answered);
                }
                if let Poll::Ready(event) = stream.poll_event(cx, backlog) {
                    return Poll::Ready(match event {
                        StreamEvent::Writable => Wake::Writable,
                        StreamEvent::Finished => Wake::Ended(Disconnect::ConnectionLost),
                    });
                }
                // While the core is full, POSTed frames wait (and further POSTs get 429).
                if !core.is_full()
                    && let Poll::Ready(frame) = posts.poll_next(cx)
                {
                    return Poll::Ready(Wake::Posted(frame));
                }
                ping.poll_tick(cx).map(|_| Wake::Tick)
            })
            .await;
        }
    }

    /// Says goodbye: the `close` event after what is queued, read by the client within the
    /// deadline. Returns whether the response ended by itself; if not, its reader stalled and
    /// the caller closes the HTTP connection under it.
    async fn close(&mut self, reason: Disconnect) -> bool {
        if reason == Disconnect::ConnectionLost {
            self.outbox.seal();
            return self.stream.end();
        }
        let _ = self
            .outbox
            .push_close(&WireFrame::close(reason.code(), reason.reason()));
        let deadline = if reason == Disconnect::SlowConsumer {
            SLOW_CLOSE_DEADLINE
        } else {
            self.context.limits.flush_deadline
        };
        let (outbox, stream) = (&self.outbox, &self.stream);
        let flushed = tokio::time::timeout(deadline, async {
            while !outbox.write_backlog()? {
                stream.writable().await;
            }
            stream.finished().await;
            std::io::Result::Ok(())
        })
        .await;
        self.outbox.seal();
        let ended = self.stream.end();
        matches!(flushed, Ok(Ok(()))) || ended
    }
}
