//! One WebSocket connection, served by one task: it reads client frames and hands them to the
//! connection core (`connection`), drains the connection's backlog when the socket falls
//! behind, pings, and performs every close.
//!
//! Frames to the client do not pass through this task: whoever produces one (the fan-out, or
//! this task answering a request) writes it straight to the socket through the connection's
//! [`Outbox`]. So a connection that only receives costs no wake-up per message, and an idle one
//! holds only this task's state.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::connection::{Connection, Identity, NodeContext};
use crate::metrics::{self, TransportMeters};
use crate::protocol::close::Disconnect;
use crate::protocol::{ErrorCode, Refusal};
use crate::security::gate::{ConnectionGuard, Inbound};
use crate::transport::outbox::{Outbox, QueueError};
use crate::transport::wire::WireFrame;

/// Frames read in a row before the session lets other tasks run.
const READ_BATCH: usize = 64;

/// How long a slow consumer's close frame may wait behind its stalled socket.
const SLOW_CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Runs one connection to the end: `socket` is the upgraded TCP stream and `pipelined` what
/// the client sent right behind its handshake; bytes in and out are counted in `meters`.
///
/// The connection's state is built before the returned future, not inside it: an async fn
/// would keep its arguments and the state made from them side by side for the connection's
/// whole life, and idle connections are what a node holds most of.
pub fn serve(
    socket: TcpStream,
    pipelined: Vec<u8>,
    config: WebSocketConfig,
    identity: Identity,
    context: Arc<NodeContext>,
    guard: ConnectionGuard,
    meters: Arc<TransportMeters>,
) -> impl Future<Output = ()> + Send {
    let socket = Arc::new(socket);
    let limits = &context.limits;
    meters.received(pipelined.len());
    let outbox = Outbox::new(
        socket.clone(),
        meters,
        limits.outbox_capacity,
        limits.outbox_bytes,
    );
    let io = SocketIo {
        socket: socket.clone(),
        outbox: outbox.clone(),
    };
    let websocket = WebSocket::from_partially_read(io, pipelined, Role::Server, Some(config));
    let session = Session {
        core: Connection::new(identity, outbox.clone(), context.clone(), guard),
        outbox,
        context,
    };
    session.serve(websocket, socket)
}

/// The WebSocket library's view of the socket: it reads from the socket, and whatever it
/// writes itself (pong and close replies) goes through the outbox, in order with the rest.
struct SocketIo {
    socket: Arc<TcpStream>,
    outbox: Outbox,
}

impl std::io::Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.socket.try_read(buf)?;
        self.outbox.meters().received(read);
        Ok(read)
    }
}

impl std::io::Write for SocketIo {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let frame = WireFrame::preformatted(bytes);
        // The library writes only pongs and the reply to a client's close. A pong counts
        // against the backlog like any frame, so a client that pings without reading is
        // closed as a slow consumer instead of growing it; the close reply always goes.
        let queued = if bytes.first() == Some(&(0x80 | 0x8)) {
            self.outbox.push_close(&frame)
        } else {
            self.outbox.push(&frame)
        };
        match queued {
            Ok(()) => Ok(bytes.len()),
            Err(QueueError::Full | QueueError::Closed) => {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What woke a waiting session.
enum Wake {
    /// The client sent something.
    Readable,
    /// A broker call for the connection finished.
    Answered,
    /// The socket can take more of the backlog.
    Writable,
    /// The outbox has a backlog or a close request.
    Outbox,
    /// Time to ping (or to give up on a silent client).
    Tick,
    /// The node is shutting down.
    Shutdown,
    /// The connection must end: its token expired, or its client went away.
    Ended(Disconnect),
}

/// One WebSocket connection: the connection core and the ways to its socket.
struct Session {
    core: Connection,
    outbox: Outbox,
    context: Arc<NodeContext>,
}

impl Session {
    /// The connection's life. A plain async block rather than an async fn: an async fn keeps
    /// a second copy of its arguments for as long as it runs.
    #[allow(clippy::manual_async_fn)]
    fn serve(
        mut self,
        mut websocket: WebSocket<SocketIo>,
        socket: Arc<TcpStream>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            metrics::connection_opened();
            self.core.start();
            let reason = self.run(&mut websocket, &socket).await;
            // Boxed, as the calls below: closing happens once, and its state should not
            // count in what every idle connection's task holds.
            Box::pin(self.close(&mut websocket, &socket, reason)).await;
            // Broker calls build large futures; boxing keeps them out of an idle connection's
            // task (they exist only while they run).
            Box::pin(self.core.finish()).await;
            metrics::connection_closed(reason);
        }
    }

    /// Reads and hands client frames to the core, drains the backlog when one forms, pings,
    /// and watches for anything that ends the connection; returns why it ends.
    async fn run(&mut self, websocket: &mut WebSocket<SocketIo>, socket: &TcpStream) -> Disconnect {
        let context = self.context.clone();
        let limits = &context.limits;
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + limits.ping_interval,
            limits.ping_interval,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutting_down = context.shutdown.cancelled();
        tokio::pin!(shutting_down);
        let mut last_heard = Instant::now();
        let mut wake = Wake::Readable;
        loop {
            match wake {
                // A finished broker call may have made room for frames the library has read
                // already, which no socket readiness would announce.
                Wake::Readable | Wake::Answered => {
                    let mut read = 0;
                    while !self.core.is_full() && self.outbox.close_requested().is_none() {
                        let message = match websocket.read() {
                            Ok(message) => message,
                            Err(error) if would_block(&error) => break,
                            Err(error) => return read_failed(&error),
                        };
                        last_heard = Instant::now();
                        if let ControlFlow::Break(reason) = self.on_message(message) {
                            return reason;
                        }
                        read += 1;
                        if read == READ_BATCH {
                            // A client that never stops sending must not keep this worker
                            // thread from every other connection.
                            tokio::task::yield_now().await;
                            read = 0;
                        }
                    }
                }
                Wake::Outbox => {}
                Wake::Writable => {
                    if self.outbox.write_backlog().is_err() {
                        return Disconnect::ConnectionLost;
                    }
                }
                Wake::Shutdown => return context.shutdown_close(),
                Wake::Ended(reason) => return reason,
                Wake::Tick => {
                    // A client whose frames wait unread is not idle, whatever the clock says.
                    if last_heard.elapsed() > limits.idle_timeout && !self.core.is_full() {
                        return Disconnect::IdleTimeout;
                    }
                    if self.outbox.push(&WireFrame::ping()).is_err() {
                        // A full backlog has asked for a slow-consumer close; a failed
                        // write, for a lost connection. Either way the check below ends it.
                        if self.outbox.close_requested().is_none() {
                            return Disconnect::ConnectionLost;
                        }
                    }
                }
            }
            if let Some(reason) = self.outbox.close_requested() {
                return reason;
            }
            let backlog = self.outbox.has_backlog();
            // One hand-written poll instead of `select!`: it keeps no future per event source,
            // so a waiting connection (nearly every connection, nearly always) stays small.
            wake = std::future::poll_fn(|cx| {
                if shutting_down.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Shutdown);
                }
                if let Poll::Ready(reason) = self.core.poll_expired(cx) {
                    return Poll::Ready(Wake::Ended(reason));
                }
                if self.outbox.poll_woken(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                if self.core.poll(cx).is_ready() {
                    return Poll::Ready(Wake::Answered);
                }
                if backlog && let Poll::Ready(ready) = socket.poll_write_ready(cx) {
                    return Poll::Ready(
                        ready.map_or(Wake::Ended(Disconnect::ConnectionLost), |()| Wake::Writable),
                    );
                }
                if !self.core.is_full()
                    && let Poll::Ready(ready) = socket.poll_read_ready(cx)
                {
                    return Poll::Ready(
                        ready.map_or(Wake::Ended(Disconnect::ConnectionLost), |()| Wake::Readable),
                    );
                }
                ping.poll_tick(cx).map(|_| Wake::Tick)
            })
            .await;
        }
    }

    /// Handles one message from the client; `Break` ends the connection.
    fn on_message(&mut self, message: Message) -> ControlFlow<Disconnect> {
        let inbound = match &message {
            Message::Text(text) => {
                return match self.core.receive_text(text.as_str()) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(reason) => ControlFlow::Break(reason),
                };
            }
            Message::Binary(_) => Inbound::Binary,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Inbound::Control,
            Message::Close(_) => return ControlFlow::Break(Disconnect::Normal),
        };
        match self.core.throttle(inbound) {
            Ok(true) => {}
            Ok(false) => return ControlFlow::Continue(()),
            Err(reason) => return ControlFlow::Break(reason),
        }
        if let Message::Binary(_) = message {
            self.core.refuse(Refusal::new(
                ErrorCode::BinaryUnsupported,
                "binary frames are not supported; send JSON text frames",
            ));
        }
        // Pings and pongs: the library has already queued the pong.
        ControlFlow::Continue(())
    }

    /// Says goodbye: the close frame after what is queued (or the reply to the client's close),
    /// then, for a close the server started, the client's reply. All within one deadline;
    /// nothing is sent after the close frame.
    async fn close(
        &mut self,
        websocket: &mut WebSocket<SocketIo>,
        socket: &TcpStream,
        reason: Disconnect,
    ) {
        if reason == Disconnect::ConnectionLost {
            self.outbox.seal();
            return;
        }
        if reason == Disconnect::Normal {
            // The library queued its reply to the client's close; this writes it out.
            let _ = websocket.flush();
        } else {
            let _ = self
                .outbox
                .push_close(&WireFrame::close(reason.code(), reason.reason()));
        }
        let deadline = if reason == Disconnect::SlowConsumer {
            SLOW_CLOSE_DEADLINE
        } else {
            self.context.limits.flush_deadline
        };
        let _ = tokio::time::timeout(deadline, async {
            drain(&self.outbox, socket).await?;
            // Closing the socket before the client has read our close and answered would reset
            // the connection if it sends meanwhile (a pong, a message, the rest of an oversized
            // frame), and a reset can discard the close frame still waiting in the client's
            // receive buffer. After the client's own close there is nothing to wait for. After a
            // broken frame the reader cannot be trusted to find the client's close, so the
            // connection is half-closed and what still comes is read and dropped until the
            // client closes too (a lingering close).
            if reason.reader_failed() {
                let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
                discard_until_closed(socket).await;
            } else if reason != Disconnect::Normal {
                await_close_reply(websocket, socket).await;
            }
            std::io::Result::Ok(())
        })
        .await;
        self.outbox.seal();
    }
}

/// Reads and drops whatever the client still sends until it closes its side (or fails).
async fn discard_until_closed(socket: &TcpStream) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        // The buffer lives only between awaits, so it is not part of the task's state: every
        // connection's task is as large as its largest state, idle or not.
        let read = {
            let mut sink = [0u8; 4096];
            socket.try_read(&mut sink)
        };
        match read {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Writes the backlog out, waiting for the socket as needed.
async fn drain(outbox: &Outbox, socket: &TcpStream) -> std::io::Result<()> {
    while !outbox.write_backlog()? {
        socket.writable().await?;
    }
    Ok(())
}

/// Reads and discards until the client's close frame, the end of the stream, or an error.
async fn await_close_reply(websocket: &mut WebSocket<SocketIo>, socket: &TcpStream) {
    let mut read = 0;
    loop {
        match websocket.read() {
            Ok(Message::Close(_)) => return,
            Ok(_) => {
                read += 1;
                if read % READ_BATCH == 0 {
                    // Lets the caller's deadline fire for a client that never stops sending.
                    tokio::task::yield_now().await;
                }
            }
            Err(error) if would_block(&error) => {
                if socket.readable().await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Whether a read only found no complete frame yet (the socket has nothing more for now).
fn would_block(error: &tungstenite::Error) -> bool {
    matches!(error, tungstenite::Error::Io(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// Why a failed read ends the connection.
fn read_failed(error: &tungstenite::Error) -> Disconnect {
    match error {
        tungstenite::Error::Capacity(_) => Disconnect::TooBig,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            Disconnect::Normal
        }
        tungstenite::Error::Protocol(error) => {
            tracing::debug!(%error, "websocket protocol error");
            Disconnect::ProtocolError
        }
        tungstenite::Error::Utf8(_) => Disconnect::InvalidPayload,
        error => {
            tracing::debug!(%error, "connection read failed");
            Disconnect::ConnectionLost
        }
    }
}
