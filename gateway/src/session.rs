//! One WebSocket connection, served by one task: it reads and handles client frames, drains
//! the connection's backlog when the socket falls behind, pings, and performs every close.
//!
//! Frames to the client do not pass through this task: whoever produces one (the fan-out, or
//! this task answering a request) writes it straight to the socket through the connection's
//! [`Outbox`]. So a connection that only receives costs no wake-up per message, and an idle one
//! holds only this task's state.

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::broker::now_micros;
use crate::broker::{BrokerError, History};
use crate::fanout::{ConnId, next_conn_id};
use crate::gate::{ConnectionGuard, Throttle};
use crate::hub::{Hub, Joiner};
use crate::metrics;
use crate::outbox::{CloseReason, Outbox};
use crate::protocol::{
    ChatMessage, ClientFrame, ErrorCode, JoinOptions, PROTOCOL_VERSION, Refusal, Replay, RoomName,
    ServerFrame, close_code, parse_client_frame, to_json,
};
use crate::wire::WireFrame;

/// Per-connection limits and timings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Longest chat message text, in bytes.
    pub max_chat_bytes: usize,
    /// Most rooms one connection may be in at once.
    pub max_rooms: usize,
    /// Frames the outbox holds before the connection counts as a slow consumer.
    pub outbox_capacity: usize,
    /// How often the server pings.
    pub ping_interval: Duration,
    /// How long a connection may stay silent (no pong, no frame) before it is closed.
    pub idle_timeout: Duration,
    /// How long a closing connection may take to flush what is queued.
    pub flush_deadline: Duration,
}

/// Everything a session needs from the node.
#[derive(Clone)]
pub struct SessionContext {
    /// The node's rooms and broker.
    pub hub: Arc<Hub>,
    /// This node's id, announced in the welcome frame.
    pub node_id: Arc<str>,
    /// Limits and timings.
    pub limits: SessionLimits,
    /// Frame and message size limits and the read buffer, for the WebSocket reader.
    pub socket: WebSocketConfig,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The close sent to clients at shutdown, set before `shutdown` is cancelled: 1012 for a
    /// restart (SIGTERM), 1001 otherwise.
    pub shutdown_reason: Arc<OnceLock<CloseReason>>,
}

/// Who is connecting, settled during the handshake.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user id messages are sent as.
    pub user_id: String,
    /// Optional display name.
    pub name: Option<String>,
    /// The room joined on connect and used by seed-style messages.
    pub default_room: RoomName,
    /// Replay and presence asked for the default room in the handshake.
    pub default_options: JoinOptions,
}

/// The server closes with this after failing to join the default room: try again later.
const TRY_AGAIN_LATER: CloseReason = CloseReason {
    code: 1013,
    reason: "broker unavailable, try again later",
};
/// The server closes with this when a frame or message exceeds the size limit.
const TOO_BIG: CloseReason = CloseReason {
    code: close_code::MESSAGE_TOO_BIG,
    reason: "frame or message too big",
};
/// The server closes with this when the node restarts (SIGTERM): reconnect and resume elsewhere.
pub const SERVICE_RESTART: CloseReason = CloseReason {
    code: close_code::SERVICE_RESTART,
    reason: "node restarting",
};
/// The server closes with this at shutdown, unless told it is a restart.
pub const GOING_AWAY: CloseReason = CloseReason {
    code: close_code::GOING_AWAY,
    reason: "node shutting down",
};
/// The server closes with this when nothing was heard within the idle timeout.
const IDLE: CloseReason = CloseReason {
    code: close_code::IDLE_TIMEOUT,
    reason: "idle timeout",
};
/// The server closes with this when the client breaks the WebSocket protocol.
const PROTOCOL_ERROR: CloseReason = CloseReason {
    code: close_code::PROTOCOL_ERROR,
    reason: "websocket protocol error",
};
/// The server closes with this when a text frame is not valid UTF-8.
const INVALID_TEXT: CloseReason = CloseReason {
    code: close_code::INVALID_PAYLOAD,
    reason: "text frame is not valid UTF-8",
};
/// Marks a close the client started: only the protocol's reply is sent.
const PEER_CLOSED: CloseReason = CloseReason {
    code: 1000,
    reason: "",
};

/// How long a slow consumer's close frame may wait behind its stalled socket.
const SLOW_CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Runs one connection to the end: `socket` is the upgraded TCP stream and `pipelined` what
/// the client sent right behind its handshake.
///
/// The connection's state is built before the returned future, not inside it: an async fn
/// would keep its arguments and the state made from them side by side for the connection's
/// whole life, and idle connections are what a node holds most of.
pub fn serve(
    socket: TcpStream,
    pipelined: Vec<u8>,
    identity: Identity,
    context: Arc<SessionContext>,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + Send {
    let socket = Arc::new(socket);
    let outbox = Outbox::new(socket.clone(), context.limits.outbox_capacity);
    let io = SocketIo {
        socket: socket.clone(),
        outbox: outbox.clone(),
    };
    let websocket =
        WebSocket::from_partially_read(io, pipelined, Role::Server, Some(context.socket));
    let session = Session {
        conn: next_conn_id(),
        identity,
        rooms: Vec::new(),
        outbox,
        context,
        guard,
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
        self.socket.try_read(buf)
    }
}

impl std::io::Write for SocketIo {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self.outbox.push_control(&WireFrame::preformatted(bytes)) {
            Ok(()) => Ok(bytes.len()),
            Err(_) => Err(std::io::ErrorKind::BrokenPipe.into()),
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
    /// The socket can take more of the backlog.
    Writable,
    /// The outbox has a backlog or a close request.
    Outbox,
    /// Time to ping (or to give up on a silent client).
    Tick,
    /// The node is shutting down.
    Shutdown,
    /// The client's token expired.
    Expired,
    /// The socket failed.
    Lost,
}

/// One connection's state: who it is, its rooms, and the ways to the hub and to its socket.
struct Session {
    conn: ConnId,
    identity: Identity,
    rooms: Vec<RoomName>,
    outbox: Outbox,
    context: Arc<SessionContext>,
    /// What the token allows, when it expires, and the message budget.
    guard: ConnectionGuard,
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
            // Joining, handling a frame and leaving await broker calls whose futures are large;
            // boxing them keeps an idle connection's task small (they exist only while they run).
            Box::pin(self.start()).await;
            let reason = self.run(&mut websocket, &socket).await;
            self.close(&mut websocket, &socket, reason).await;
            Box::pin(self.leave_all()).await;
            metrics::connection_closed();
        }
    }

    /// Queues the welcome frame, joins the default room, then lets frames flow. The outbox
    /// stays corked until the default room is joined, so the welcome frame (queued
    /// first) tells the client it will now receive the room's messages.
    async fn start(&mut self) {
        self.join_default_room().await;
        self.outbox.uncork();
    }

    /// Queues the welcome frame, then joins the default room.
    async fn join_default_room(&mut self) {
        let welcome = ServerFrame::Welcome {
            user_id: &self.identity.user_id,
            node: &self.context.node_id,
            room: &self.identity.default_room,
            protocol: PROTOCOL_VERSION,
        };
        self.send(to_json(&welcome));
        let room = self.identity.default_room.clone();
        let options = self.identity.default_options.clone();
        match self.enter(&room, &options).await {
            // Only a client that asked for a replay knows what to do with `joined`; a plain
            // (seed) client would show it as a chat line.
            Ok(Some(history)) => self.replay(&room, None, &options.replay, history),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%room, %error, "could not join the default room");
                self.refuse(Refusal::new(
                    ErrorCode::Unavailable,
                    "the broker is unavailable; reconnect later",
                ));
                self.outbox.close_with(TRY_AGAIN_LATER);
                return;
            }
        }
        self.rooms.push(room);
    }

    /// Joins the hub's room; returns the history to replay when one was asked for.
    async fn enter(
        &self,
        room: &RoomName,
        options: &JoinOptions,
    ) -> Result<Option<History>, BrokerError> {
        let joiner = Joiner {
            conn: self.conn,
            outbox: self.outbox.clone(),
            user_id: &self.identity.user_id,
            name: self.identity.name.as_deref(),
        };
        Ok(self.context.hub.join(room, joiner, options).await?.history)
    }

    /// Answers a join that asked for a replay, then sends the replay and what arrived meanwhile.
    fn replay(
        &self,
        room: &RoomName,
        reference: Option<&Value>,
        replay: &Replay,
        history: History,
    ) {
        let recovered = matches!(replay, Replay::Since { .. }).then_some(history.complete);
        self.send(to_json(&ServerFrame::Joined {
            room,
            recovered,
            epoch: history.epoch.as_deref(),
            reference,
        }));
        self.context.hub.release(room, self.conn, history);
    }

    /// Reads and handles client frames, drains the backlog when one forms, pings, and watches
    /// for anything that ends the connection; returns why it ends.
    async fn run(
        &mut self,
        websocket: &mut WebSocket<SocketIo>,
        socket: &TcpStream,
    ) -> CloseReason {
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
                Wake::Readable => loop {
                    let message = match websocket.read() {
                        Ok(message) => message,
                        Err(error) if would_block(&error) => break,
                        Err(error) => return read_failed(&error),
                    };
                    last_heard = Instant::now();
                    if let ControlFlow::Break(reason) = self.on_message(message).await {
                        return reason;
                    }
                },
                Wake::Writable => {
                    if self.outbox.write_backlog().is_err() {
                        return CloseReason::CONNECTION_LOST;
                    }
                }
                Wake::Outbox => {}
                Wake::Shutdown => {
                    return context.shutdown_reason.get().copied().unwrap_or(GOING_AWAY);
                }
                Wake::Expired => {
                    metrics::policy_close("token_expired");
                    return crate::gate::TOKEN_EXPIRED;
                }
                Wake::Lost => return CloseReason::CONNECTION_LOST,
                Wake::Tick => {
                    if last_heard.elapsed() > limits.idle_timeout {
                        return IDLE;
                    }
                    if self.outbox.push_control(&WireFrame::ping()).is_err() {
                        return CloseReason::CONNECTION_LOST;
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
                if self.guard.poll_expired(cx).is_ready() {
                    return Poll::Ready(Wake::Expired);
                }
                if self.outbox.poll_woken(cx).is_ready() {
                    return Poll::Ready(Wake::Outbox);
                }
                if backlog && let Poll::Ready(ready) = socket.poll_write_ready(cx) {
                    return Poll::Ready(ready.map_or(Wake::Lost, |()| Wake::Writable));
                }
                if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
                    return Poll::Ready(ready.map_or(Wake::Lost, |()| Wake::Readable));
                }
                ping.poll_tick(cx).map(|_| Wake::Tick)
            })
            .await;
        }
    }

    /// Handles one message from the client; `Break` ends the connection.
    async fn on_message(&mut self, message: Message) -> ControlFlow<CloseReason> {
        match self.guard.throttle(&message) {
            Throttle::Pass => {}
            Throttle::Refuse(refusal) => {
                self.refuse(refusal);
                return ControlFlow::Continue(());
            }
            Throttle::Close(reason) => return ControlFlow::Break(reason),
        }
        match message {
            Message::Text(text) => {
                match parse_client_frame(&text, self.context.limits.max_chat_bytes) {
                    Ok(frame) => Box::pin(self.handle(frame)).await,
                    Err(refusal) => self.refuse(refusal),
                }
            }
            Message::Binary(_) => self.refuse(Refusal::new(
                ErrorCode::BinaryUnsupported,
                "binary frames are not supported; send JSON text frames",
            )),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Close(_) => return ControlFlow::Break(PEER_CLOSED),
        }
        ControlFlow::Continue(())
    }

    /// Says goodbye: the close frame after what is queued (or the reply to the client's close),
    /// then, for a close the server started, the client's reply. All within one deadline;
    /// nothing is sent after the close frame.
    async fn close(
        &mut self,
        websocket: &mut WebSocket<SocketIo>,
        socket: &TcpStream,
        reason: CloseReason,
    ) {
        if reason == CloseReason::CONNECTION_LOST {
            self.outbox.seal();
            return;
        }
        if reason == PEER_CLOSED {
            // The library queued its reply to the client's close; this writes it out.
            let _ = websocket.flush();
        } else {
            let _ = self
                .outbox
                .push_close(&WireFrame::close(reason.code, reason.reason));
        }
        let deadline = if reason == CloseReason::SLOW_CONSUMER {
            SLOW_CLOSE_DEADLINE
        } else {
            self.context.limits.flush_deadline
        };
        let _ = tokio::time::timeout(deadline, async {
            drain(&self.outbox, socket).await?;
            // Closing the socket before the client has read our close and answered would reset
            // the connection if it sends meanwhile (a pong, a message), and a reset discards the
            // close frame still waiting in the client's receive buffer. After the client's own
            // close there is nothing to wait for, and after a broken frame the reader cannot
            // be trusted to find one.
            let reader_failed = [TOO_BIG, PROTOCOL_ERROR, INVALID_TEXT].contains(&reason);
            if reason != PEER_CLOSED && !reader_failed {
                await_close_reply(websocket, socket).await;
            }
            std::io::Result::Ok(())
        })
        .await;
        self.outbox.seal();
    }

    async fn handle(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Seed { message } => {
                let room = self.identity.default_room.clone();
                if let Err(refusal) = self.publish(&room, &message).await {
                    self.refuse(refusal);
                }
            }
            ClientFrame::Message {
                room,
                message,
                reference,
            } => {
                let room = room.unwrap_or_else(|| self.identity.default_room.clone());
                match self.publish(&room, &message).await {
                    Ok(id) => self.send(to_json(&ServerFrame::Ack {
                        room: &room,
                        id,
                        reference: reference.as_ref(),
                    })),
                    Err(refusal) => self.refuse(refusal.with_ref(reference)),
                }
            }
            ClientFrame::Join {
                room,
                options,
                reference,
            } => match self.join(&room, &options).await {
                Ok(Some(history)) => {
                    self.replay(&room, reference.as_ref(), &options.replay, history)
                }
                Ok(None) => self.send(to_json(&ServerFrame::Joined {
                    room: &room,
                    recovered: None,
                    epoch: None,
                    reference: reference.as_ref(),
                })),
                Err(refusal) => self.refuse(refusal.with_ref(reference)),
            },
            ClientFrame::Presence { room, reference } => {
                match self.context.hub.presence(&room).await {
                    Ok(users) => self.send(to_json(&ServerFrame::Presence {
                        room: &room,
                        users: &users,
                        reference: reference.as_ref(),
                    })),
                    Err(error) => {
                        tracing::warn!(%room, %error, "presence query failed");
                        self.refuse(
                            Refusal::new(
                                ErrorCode::Unavailable,
                                "presence is unavailable; try again",
                            )
                            .with_ref(reference),
                        );
                    }
                }
            }
            ClientFrame::Leave { room, reference } => {
                if let Some(index) = self.rooms.iter().position(|joined| *joined == room) {
                    self.rooms.swap_remove(index);
                    self.context
                        .hub
                        .leave(&room, self.conn, &self.identity.user_id)
                        .await;
                    self.send(to_json(&ServerFrame::Left {
                        room: &room,
                        reference: reference.as_ref(),
                    }));
                } else {
                    self.refuse(
                        Refusal::new(ErrorCode::NotInRoom, format!("not in room `{room}`"))
                            .with_ref(reference),
                    );
                }
            }
            ClientFrame::Auth { token, reference } => {
                match self.guard.refresh(&token, reference.as_ref()) {
                    Ok(reply) => self.send(reply),
                    Err(refusal) => self.refuse(refusal.with_ref(reference)),
                }
            }
            ClientFrame::Ping { reference } => self.send(to_json(&ServerFrame::Pong {
                reference: reference.as_ref(),
            })),
        }
    }

    /// Joins a room; returns the history to replay when the join asked for one.
    async fn join(
        &mut self,
        room: &RoomName,
        options: &JoinOptions,
    ) -> Result<Option<History>, Refusal> {
        if self.rooms.contains(room) {
            return Ok(None);
        }
        self.guard.may_join(room)?;
        if self.rooms.len() >= self.context.limits.max_rooms {
            return Err(Refusal::new(
                ErrorCode::TooManyRooms,
                format!(
                    "a connection may be in at most {} rooms",
                    self.context.limits.max_rooms
                ),
            ));
        }
        let history = self.enter(room, options).await.map_err(|error| {
            tracing::warn!(%room, %error, "join failed");
            Refusal::new(
                ErrorCode::Unavailable,
                "the broker is unavailable; try again",
            )
        })?;
        self.rooms.push(room.clone());
        Ok(history)
    }

    /// Publishes a chat message to a room this connection is in; returns the message id.
    async fn publish(&self, room: &RoomName, text: &str) -> Result<uuid::Uuid, Refusal> {
        metrics::message_received();
        self.guard.may_publish(room)?;
        if !self.rooms.contains(room) {
            return Err(Refusal::new(
                ErrorCode::NotInRoom,
                format!("join `{room}` before sending to it"),
            ));
        }
        let id = uuid::Uuid::now_v7();
        let frame = to_json(&ChatMessage {
            room,
            id,
            user_id: &self.identity.user_id,
            name: self.identity.name.as_deref(),
            message: text,
            ts: now_micros() / 1000,
        });
        self.context
            .hub
            .publish(room, frame)
            .await
            .map_err(|error| {
                tracing::warn!(%room, %error, "publish failed");
                Refusal::new(
                    ErrorCode::PublishFailed,
                    "the message was not sent: the broker is unavailable",
                )
            })?;
        Ok(id)
    }

    fn refuse(&self, refusal: Refusal) {
        metrics::client_error(refusal.code.as_str());
        self.send(to_json(&ServerFrame::from(&refusal)));
    }

    fn send(&self, frame: String) {
        // A full outbox closes the connection as a slow consumer; nothing more to do here.
        let _ = self.outbox.push(&WireFrame::text(&frame));
    }

    async fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.context
                .hub
                .leave(&room, self.conn, &self.identity.user_id)
                .await;
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
    loop {
        match websocket.read() {
            Ok(Message::Close(_)) => return,
            Ok(_) => {}
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
fn read_failed(error: &tungstenite::Error) -> CloseReason {
    match error {
        tungstenite::Error::Capacity(_) => TOO_BIG,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => PEER_CLOSED,
        tungstenite::Error::Protocol(error) => {
            tracing::debug!(%error, "websocket protocol error");
            PROTOCOL_ERROR
        }
        tungstenite::Error::Utf8(_) => INVALID_TEXT,
        error => {
            tracing::debug!(%error, "connection read failed");
            CloseReason::CONNECTION_LOST
        }
    }
}
