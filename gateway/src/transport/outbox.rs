//! One connection's outgoing side: frames are written straight to its socket by whoever sends
//! them, in order, and wait in a bounded backlog only while the socket cannot take more.
//!
//! Writing directly from the fan-out (instead of queueing every frame for a per-connection
//! writer task) means a delivery costs one write call and no task wake-up, and an idle
//! connection owns no writer task at all. The connection's own task is woken only when a
//! backlog forms, and then drains it with vectored writes, many frames per call. A backlog
//! that reaches its capacity marks the connection as a slow consumer, so a stalled client never
//! grows memory or holds up its rooms.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, MutexGuard};

use crate::metrics::{self, TransportMeters};
use crate::protocol::close::Disconnect;
use crate::transport::wire::WireFrame;

/// Where an outbox's bytes go: the connection's socket (or memory, in tests).
pub trait Transport: Send + Sync + 'static {
    /// Writes what it can without blocking, like `writev`; `WouldBlock` when it can take nothing.
    fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl Transport for tokio::net::TcpStream {
    fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::TcpStream::try_write_vectored(self, frames)
    }
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The backlog was full; the connection has been told to close as a slow consumer.
    #[error("outgoing queue full")]
    Full,
    /// The connection is gone or closing.
    #[error("connection closed")]
    Closed,
}

/// Whether a frame counts against the backlog's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Data, ping and pong frames: a full backlog refuses them and closes the connection as
    /// slow. Pongs count too: a client that pings without reading must not grow the backlog.
    Bounded,
    /// The close frame: always admitted while the connection is open.
    Always,
}

/// Most frames written by one vectored write.
const MAX_BATCH: usize = 64;

/// The sending side of one connection. Cheap to clone; every clone writes to the same socket.
#[derive(Clone)]
pub struct Outbox(Arc<Link>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

struct Link {
    transport: Arc<dyn Transport>,
    /// The node's byte counters and backlog gauge.
    meters: Arc<TransportMeters>,
    /// Most frames the backlog may hold.
    capacity: usize,
    /// Most bytes the backlog may hold (frames shared with other connections count in full).
    max_bytes: usize,
    backlog: Mutex<Backlog>,
    /// Set, and the connection's task woken, when a backlog formed or a close was requested.
    /// A flag and a waker rather than a `Notify`: an idle connection's task then waits without
    /// holding a waiter of its own.
    wake: AtomicBool,
    waker: AtomicWaker,
    /// Set by [`Outbox::notify`]: something outside the outbox waits for the connection.
    notice: AtomicBool,
    /// The first close request, if any.
    close: OnceLock<Disconnect>,
}

#[derive(Default)]
struct Backlog {
    frames: VecDeque<WireFrame>,
    /// Bytes of every queued frame, the part of the front one already written included.
    bytes: usize,
    /// Bytes of the front frame already written.
    written: usize,
    /// `bytes` as last added to the node's backlog gauge.
    reported: usize,
    /// Frames wait without being written until [`Outbox::uncork`].
    corked: bool,
    /// Nothing more may be sent: the close frame is queued, or the socket failed.
    sealed: bool,
    /// Frames were deferred and a [`Batch`] will write them.
    scheduled: bool,
}

impl Outbox {
    /// An outbox writing to `transport`, holding at most `capacity` frames and `max_bytes`
    /// bytes while it cannot, counting what it writes and holds in `meters`. It starts corked:
    /// frames wait until [`Outbox::uncork`], so a connection can queue its greeting ahead of
    /// the traffic of the rooms it is joining.
    pub fn new(
        transport: Arc<dyn Transport>,
        meters: Arc<TransportMeters>,
        capacity: usize,
        max_bytes: usize,
    ) -> Outbox {
        Outbox(Arc::new(Link {
            transport,
            meters,
            capacity: capacity.max(1),
            max_bytes,
            backlog: Mutex::new(Backlog {
                corked: true,
                ..Backlog::default()
            }),
            wake: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            notice: AtomicBool::new(false),
            close: OnceLock::new(),
        }))
    }

    /// Sends a frame (data, ping or pong) now, or queues it behind what is waiting. A full
    /// backlog closes the connection as a slow consumer.
    pub fn push(&self, frame: &WireFrame) -> Result<(), QueueError> {
        let mut backlog = self.admit(Admission::Bounded, frame)?;
        self.send(&mut backlog, frame)
    }

    /// Queues the close frame after everything already waiting; nothing is sent after it.
    pub fn push_close(&self, frame: &WireFrame) -> Result<(), QueueError> {
        let mut backlog = self.admit(Admission::Always, frame)?;
        let sent = self.send(&mut backlog, frame);
        backlog.sealed = true;
        sent
    }

    /// Queues a frame for `batch` to write when it is flushed, so several frames for this
    /// connection in one batch leave in one write. A full backlog closes the connection as a
    /// slow consumer.
    pub fn defer(&self, frame: &WireFrame, batch: &mut Batch) -> Result<(), QueueError> {
        let mut backlog = self.admit(Admission::Bounded, frame)?;
        let idle = backlog.frames.is_empty();
        backlog.enqueue(frame);
        // A corked outbox, or one whose backlog its task is draining, needs no flush; one
        // already scheduled is in the batch.
        if idle && !backlog.corked {
            backlog.scheduled = true;
            batch.pending.push(self.clone());
        }
        Ok(())
    }

    /// Writes what was deferred; what the socket cannot take is left to the connection's task.
    fn flush_deferred(&self) {
        let mut backlog = self.backlog();
        backlog.scheduled = false;
        // A failed write has already asked the connection to close.
        let _ = self.write_or_hand_over(&mut backlog);
        self.report(&mut backlog);
    }

    /// Lets queued and future frames go out.
    pub fn uncork(&self) {
        let mut backlog = self.backlog();
        backlog.corked = false;
        // A failed write has already asked the connection to close.
        let _ = self.write_or_hand_over(&mut backlog);
        self.report(&mut backlog);
    }

    /// Whether frames are waiting for the socket to take them (and no batch will write them).
    pub fn has_backlog(&self) -> bool {
        let backlog = self.backlog();
        !backlog.corked && !backlog.scheduled && !backlog.frames.is_empty()
    }

    /// Writes as much of the backlog as the socket takes now; `Ok(true)` once it is empty.
    pub fn write_backlog(&self) -> io::Result<bool> {
        let mut backlog = self.backlog();
        let written = self.write_out(&mut backlog);
        self.report(&mut backlog);
        written
    }

    /// Refuses everything from now on and drops what is waiting.
    pub fn seal(&self) {
        let mut backlog = self.backlog();
        backlog.clear_sealed();
        self.report(&mut backlog);
    }

    /// The node's transport meters.
    pub fn meters(&self) -> &TransportMeters {
        &self.0.meters
    }

    /// Brings the node's backlog gauge up to date with this backlog. A frame written at once
    /// leaves nothing behind, so only connections whose sockets fall behind touch the shared
    /// gauge.
    fn report(&self, backlog: &mut Backlog) {
        if backlog.bytes != backlog.reported {
            self.0
                .meters
                .backlog_changed(backlog.reported, backlog.bytes);
            backlog.reported = backlog.bytes;
        }
    }

    /// Most bytes the backlog may hold.
    pub fn max_bytes(&self) -> usize {
        self.0.max_bytes
    }

    /// Bytes waiting in the backlog now.
    pub fn backlog_bytes(&self) -> usize {
        self.backlog().bytes
    }

    /// Ready when the connection's task has something to do: a backlog to drain or a close.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.waker.register(cx.waker());
        if self.0.wake.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn wake(&self) {
        self.0.wake.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    /// Tells the connection that something outside the outbox waits for it (a command of the
    /// application's), waking its task. Borrowing the outbox's waker costs an idle connection
    /// nothing: a waker of its own would cost an allocation per connection.
    pub fn notify(&self) {
        self.0.notice.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether [`Outbox::notify`] was called since the last look; looking clears it.
    pub fn take_notice(&self) -> bool {
        self.0.notice.swap(false, Ordering::AcqRel)
    }

    /// The close requested for this connection, if any.
    pub fn close_requested(&self) -> Option<Disconnect> {
        self.0.close.get().copied()
    }

    /// Closes the connection as a slow consumer; returns whether this was the first close request.
    pub fn close_slow(&self) -> bool {
        let first = self.close_with(Disconnect::SlowConsumer);
        if first {
            metrics::slow_consumer_disconnect();
        }
        first
    }

    /// Asks the connection to close. Only the first request counts; returns whether it was this one.
    pub fn close_with(&self, reason: Disconnect) -> bool {
        let first = self.0.close.set(reason).is_ok();
        if first {
            self.wake();
        }
        first
    }

    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        self.0.backlog.lock()
    }

    /// The backlog, if `frame` may join it: not after the close frame, and (for
    /// [`Admission::Bounded`] frames) not past the frame or byte capacity, which closes the
    /// connection as slow. A frame always fits an empty backlog, however large.
    fn admit(
        &self,
        admission: Admission,
        frame: &WireFrame,
    ) -> Result<MutexGuard<'_, Backlog>, QueueError> {
        let backlog = self.backlog();
        if backlog.sealed {
            return Err(QueueError::Closed);
        }
        let full = backlog.frames.len() >= self.0.capacity
            || (!backlog.frames.is_empty()
                && backlog.bytes + frame.as_bytes().len() > self.0.max_bytes);
        if admission == Admission::Bounded && full {
            drop(backlog);
            self.close_slow();
            return Err(QueueError::Full);
        }
        Ok(backlog)
    }

    /// Writes `frame` directly when nothing is waiting, otherwise queues it.
    fn send(&self, backlog: &mut Backlog, frame: &WireFrame) -> Result<(), QueueError> {
        let idle = backlog.frames.is_empty();
        backlog.enqueue(frame);
        // Corked, or not idle: whoever queued the first waiting frame writes this one after it
        // (the connection's task, woken when the backlog formed, or a batch).
        let sent = if backlog.corked || !idle {
            Ok(())
        } else {
            self.write_or_hand_over(backlog)
        };
        self.report(backlog);
        sent
    }

    /// Writes what the socket takes now and leaves the rest to the connection's task, woken to
    /// drain it once the socket is writable again.
    fn write_or_hand_over(&self, backlog: &mut Backlog) -> Result<(), QueueError> {
        match self.write_out(backlog) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.wake();
                Ok(())
            }
            Err(_) => Err(QueueError::Closed),
        }
    }

    /// Writes queued frames until the socket would block; `Ok(true)` when all are written.
    /// A failed write seals the outbox and asks the connection to close as lost.
    fn write_out(&self, backlog: &mut Backlog) -> io::Result<bool> {
        while let Some(front) = backlog.frames.front() {
            let front = IoSlice::new(&front.as_bytes()[backlog.written..]);
            let result = if backlog.frames.len() == 1 {
                // The common case: one frame straight out.
                self.0.transport.try_write_vectored(&[front])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_BATCH];
                slices[0] = front;
                let mut count = 1;
                for (slot, frame) in slices[1..].iter_mut().zip(backlog.frames.iter().skip(1)) {
                    *slot = IoSlice::new(frame.as_bytes());
                    count += 1;
                }
                self.0.transport.try_write_vectored(&slices[..count])
            };
            match result {
                Ok(written) => {
                    self.0.meters.sent(written);
                    backlog.consume(written);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    backlog.clear_sealed();
                    self.close_with(Disconnect::ConnectionLost);
                    return Err(error);
                }
            }
        }
        if backlog.frames.capacity() > MAX_BATCH {
            // A drained burst should not keep its high-water mark per connection.
            backlog.frames.shrink_to(MAX_BATCH);
        }
        Ok(true)
    }
}

/// Outboxes with deferred frames, written together when the batch is flushed (or dropped).
///
/// A node delivers everything its broker has ready as one batch: under load several messages
/// for the same connection then leave in one write, which is what keeps the cost per delivery
/// from growing with the rate. An idle node's batches hold one message, so nothing waits.
#[derive(Default)]
pub struct Batch {
    pending: Vec<Outbox>,
}

impl Batch {
    /// Writes every deferred frame.
    pub fn flush(&mut self) {
        for outbox in self.pending.drain(..) {
            outbox.flush_deferred();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Backlog {
    fn enqueue(&mut self, frame: &WireFrame) {
        self.bytes += frame.as_bytes().len();
        self.frames.push_back(frame.clone());
    }

    /// Drops `written` bytes from the front of the queue.
    fn consume(&mut self, mut written: usize) {
        while let Some(front) = self.frames.front() {
            let len = front.as_bytes().len();
            let left = len - self.written;
            if written < left {
                self.written += written;
                return;
            }
            written -= left;
            self.written = 0;
            self.bytes -= len;
            self.frames.pop_front();
        }
    }

    fn clear_sealed(&mut self) {
        self.sealed = true;
        self.frames.clear();
        self.bytes = 0;
        self.written = 0;
    }
}

/// An outbox that writes into memory: for tests and benchmarks of the fan-out.
#[cfg(any(test, feature = "test-util"))]
pub fn in_memory(capacity: usize) -> (Outbox, MemorySocket) {
    in_memory_bounded(capacity, usize::MAX)
}

/// [`in_memory`] with a byte bound on the backlog too.
#[cfg(any(test, feature = "test-util"))]
pub fn in_memory_bounded(capacity: usize, max_bytes: usize) -> (Outbox, MemorySocket) {
    let socket = Arc::new(MemoryTransport::default());
    let outbox = Outbox::new(socket.clone(), Default::default(), capacity, max_bytes);
    outbox.uncork();
    (
        outbox.clone(),
        MemorySocket {
            transport: socket,
            outbox,
        },
    )
}

/// The far end of an [`in_memory`] outbox.
#[cfg(any(test, feature = "test-util"))]
pub struct MemorySocket {
    transport: Arc<MemoryTransport>,
    outbox: Outbox,
}

#[cfg(any(test, feature = "test-util"))]
#[derive(Default)]
struct MemoryTransport {
    bytes: Mutex<Vec<u8>>,
    stalled: std::sync::atomic::AtomicBool,
}

#[cfg(any(test, feature = "test-util"))]
impl Transport for MemoryTransport {
    fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.stalled.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut bytes = self.bytes.lock();
        let before = bytes.len();
        for frame in frames {
            bytes.extend_from_slice(frame);
        }
        Ok(bytes.len() - before)
    }
}

#[cfg(any(test, feature = "test-util"))]
impl MemorySocket {
    /// The payloads of the text frames written so far, oldest first, removing them.
    pub fn take_texts(&self) -> Vec<String> {
        std::iter::from_fn(|| self.next_text()).collect()
    }

    /// The payload of the oldest text frame not taken yet, removing it.
    pub fn next_text(&self) -> Option<String> {
        let mut bytes = self.transport.bytes.lock();
        let (_, payload, rest) = crate::transport::wire::decode(&bytes)?;
        let text = String::from_utf8_lossy(payload).into_owned();
        let taken = bytes.len() - rest.len();
        bytes.drain(..taken);
        Some(text)
    }

    /// Bytes written so far, removing them.
    pub fn take_bytes(&self) -> Vec<u8> {
        std::mem::take(&mut *self.transport.bytes.lock())
    }

    /// Makes the socket take nothing (like a client that stopped reading), or take again.
    pub fn stall(&self, stalled: bool) {
        self.transport
            .stalled
            .store(stalled, std::sync::atomic::Ordering::Relaxed);
    }

    /// The close requested for the connection, if any.
    pub fn close_requested(&self) -> Option<Disconnect> {
        self.outbox.close_requested()
    }

    /// Pretends the connection's task drained its backlog.
    pub fn drain_backlog(&self) -> bool {
        self.outbox.write_backlog().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's payload and what follows it.
    fn split_frame(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
        let (_, payload, rest) = crate::transport::wire::decode(bytes)?;
        Some((payload, rest))
    }

    fn text(s: &str) -> WireFrame {
        WireFrame::text(s)
    }

    #[test]
    fn frames_go_straight_out_in_order() {
        let (outbox, socket) = in_memory(4);
        for word in ["one", "two", "three"] {
            outbox.push(&text(word)).unwrap();
        }
        assert!(!outbox.has_backlog());
        assert_eq!(socket.take_texts(), ["one", "two", "three"]);
    }

    #[test]
    fn a_corked_outbox_holds_frames_until_uncorked() {
        let transport = Arc::new(MemoryTransport::default());
        let outbox = Outbox::new(transport.clone(), Default::default(), 4, usize::MAX);
        let socket = MemorySocket {
            transport,
            outbox: outbox.clone(),
        };
        outbox.push(&text("welcome")).unwrap();
        assert!(socket.take_bytes().is_empty());
        outbox.uncork();
        outbox.push(&text("live")).unwrap();
        assert_eq!(socket.take_texts(), ["welcome", "live"]);
    }

    #[test]
    fn a_stalled_socket_builds_a_backlog_drained_in_order_then_overflows_as_slow() {
        let (outbox, socket) = in_memory(3);
        socket.stall(true);
        for word in ["a", "b", "c"] {
            outbox.push(&text(word)).unwrap();
        }
        assert!(outbox.has_backlog());
        socket.stall(false);
        assert!(socket.drain_backlog());
        assert_eq!(socket.take_texts(), ["a", "b", "c"]);

        socket.stall(true);
        for word in ["d", "e", "f"] {
            outbox.push(&text(word)).unwrap();
        }
        assert_eq!(outbox.push(&text("g")), Err(QueueError::Full));
        assert_eq!(socket.close_requested(), Some(Disconnect::SlowConsumer));
    }

    #[test]
    fn a_batch_writes_each_connection_once_in_order() {
        /// Counts write calls.
        #[derive(Default)]
        struct Counting(Mutex<(usize, Vec<u8>)>);
        impl Transport for Counting {
            fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
                let mut state = self.0.lock();
                state.0 += 1;
                let before = state.1.len();
                for frame in frames {
                    state.1.extend_from_slice(frame);
                }
                Ok(state.1.len() - before)
            }
        }
        let socket = Arc::new(Counting::default());
        let outbox = Outbox::new(socket.clone(), Default::default(), 8, usize::MAX);
        outbox.uncork();
        let mut batch = Batch::default();
        for word in ["a", "b", "c"] {
            outbox.defer(&text(word), &mut batch).unwrap();
        }
        outbox.push(&text("reply")).unwrap();
        assert_eq!(socket.0.lock().0, 0, "nothing is written before the flush");
        assert!(
            !outbox.has_backlog(),
            "the batch, not the task, owes the write"
        );
        batch.flush();
        let (writes, bytes) = socket.0.lock().clone();
        assert_eq!(writes, 1, "one write for the whole batch");
        let mut rest = bytes.as_slice();
        for expected in ["a", "b", "c", "reply"] {
            let (payload, next) = split_frame(rest).unwrap();
            assert_eq!(payload, expected.as_bytes());
            rest = next;
        }
    }

    #[test]
    fn the_backlog_is_bounded_in_bytes_and_pongs_count() {
        let (outbox, socket) = in_memory_bounded(1000, 100);
        socket.stall(true);
        // One frame always fits, however large; then the byte bound applies.
        outbox.push(&text(&"x".repeat(150))).unwrap();
        assert_eq!(outbox.push(&WireFrame::ping()), Err(QueueError::Full));
        assert_eq!(socket.close_requested(), Some(Disconnect::SlowConsumer));

        let (outbox, socket) = in_memory_bounded(1000, 100);
        socket.stall(true);
        let mut pongs = 0;
        while outbox.push(&WireFrame::preformatted(&[0x8a, 0])).is_ok() {
            pongs += 1;
        }
        assert_eq!(pongs, 50, "two-byte pongs until 100 bytes wait");
        assert_eq!(outbox.backlog_bytes(), 100);
        assert!(
            outbox.push_close(&WireFrame::close(4000, "")).is_ok(),
            "close always fits"
        );
        socket.stall(false);
        assert!(socket.drain_backlog());
        assert_eq!(outbox.backlog_bytes(), 0);
    }

    #[test]
    fn nothing_follows_the_close_frame() {
        let (outbox, socket) = in_memory(4);
        outbox.push(&text("last words")).unwrap();
        outbox.push_close(&WireFrame::close(1000, "bye")).unwrap();
        assert_eq!(outbox.push(&text("too late")), Err(QueueError::Closed));
        let bytes = socket.take_bytes();
        let (first, rest) = split_frame(&bytes).unwrap();
        assert_eq!(first, b"last words");
        assert_eq!(rest[0], 0x88, "then the close frame, and nothing after it");
        assert_eq!(split_frame(rest).unwrap().1, b"");
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        /// Takes at most three bytes per call.
        struct Trickle(Mutex<Vec<u8>>);
        impl Transport for Trickle {
            fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
                let first = frames
                    .iter()
                    .find(|f| !f.is_empty())
                    .expect("something to write");
                let n = first.len().min(3);
                self.0.lock().extend_from_slice(&first[..n]);
                Ok(n)
            }
        }
        let trickle = Arc::new(Trickle(Mutex::new(Vec::new())));
        let outbox = Outbox::new(trickle.clone(), Default::default(), 4, usize::MAX);
        outbox.uncork();
        outbox.push(&text("hello")).unwrap();
        outbox.push(&text("world")).unwrap();
        let bytes = trickle.0.lock().clone();
        let (first, rest) = split_frame(&bytes).unwrap();
        assert_eq!(
            (first, split_frame(rest).unwrap().0),
            (&b"hello"[..], &b"world"[..])
        );
    }

    #[test]
    fn a_failed_write_seals_the_outbox_and_reports_the_connection_lost() {
        struct Broken;
        impl Transport for Broken {
            fn try_write_vectored(&self, _: &[IoSlice<'_>]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let outbox = Outbox::new(Arc::new(Broken), Default::default(), 4, usize::MAX);
        outbox.uncork();
        assert_eq!(outbox.push(&text("x")), Err(QueueError::Closed));
        assert_eq!(outbox.push(&text("y")), Err(QueueError::Closed));
        assert_eq!(outbox.close_requested(), Some(Disconnect::ConnectionLost));
    }

    #[test]
    fn the_first_close_reason_wins() {
        let (outbox, socket) = in_memory(1);
        let other = Disconnect::GoingAway;
        assert!(outbox.close_with(other));
        assert!(!outbox.close_slow());
        assert_eq!(socket.close_requested(), Some(other));
    }
}
