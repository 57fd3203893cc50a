//! One WebSocket connection: a reader that turns client frames into hub operations, and a
//! writer that drains the connection's bounded outbox onto the socket, joined by that outbox.
//!
//! The writer also owns liveness (server pings, idle timeout) and every close the server
//! initiates, so exactly one task ever writes to the socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::broker::now_micros;
use crate::broker::{BrokerError, History};
use crate::fanout::{CloseReason, CloseWatch, ConnId, Outbox, OutboxReceiver, next_conn_id};
use crate::gate::{ConnectionGuard, Throttle};
use crate::hub::{Hub, Joiner};
use crate::metrics;
use crate::protocol::{
    ChatMessage, ClientFrame, ErrorCode, JoinOptions, PROTOCOL_VERSION, Refusal, Replay, RoomName,
    ServerFrame, close_code, parse_client_frame, to_json,
};
use serde_json::Value;

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
/// The server closes with this after an unexpected internal failure.
const INTERNAL: CloseReason = CloseReason {
    code: close_code::INTERNAL_ERROR,
    reason: "internal error",
};
/// Marks a close the client started: the writer only flushes the protocol's reply.
const PEER_CLOSED: CloseReason = CloseReason {
    code: 1000,
    reason: "",
};

/// How long a slow consumer's close frame may wait behind its stalled socket.
const SLOW_CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Most queued frames written before one flush: batching turns a burst into one syscall.
const MAX_BATCH: usize = 64;

/// Runs one connection to the end.
pub async fn serve(
    socket: WebSocket,
    identity: Identity,
    context: SessionContext,
    guard: ConnectionGuard,
) {
    metrics::connection_opened();
    let (sink, stream) = socket.split();
    let (outbox, receiver) = Outbox::channel(context.limits.outbox_capacity);
    let liveness = Arc::new(Liveness::new());
    let close = receiver.close_watch();

    let limits = context.limits.clone();
    let shutdown = (context.shutdown.clone(), context.shutdown_reason.clone());
    let mut session = Session {
        conn: next_conn_id(),
        identity,
        rooms: Vec::new(),
        outbox,
        context,
        guard,
    };
    // The writer starts only once the default room is joined, so the welcome frame (queued
    // first) tells the client it will now receive the room's messages.
    // Joining, handling a frame and leaving await broker calls whose futures are large; boxing
    // them keeps an idle connection's task small (they exist only while they run).
    Box::pin(session.start()).await;
    let writer = tokio::spawn(write_loop(
        sink,
        receiver,
        liveness.clone(),
        limits,
        shutdown,
    ));
    session.read_loop(stream, &liveness, &close).await;
    Box::pin(session.leave_all()).await;
    if let Err(error) = writer.await {
        tracing::error!(%error, "connection writer failed");
    }
    metrics::connection_closed();
}

/// When the client was last heard from, in milliseconds since the session started.
struct Liveness {
    started: Instant,
    last_heard_ms: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            started: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
        }
    }

    fn heard(&self) {
        self.last_heard_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// The reader side's state: which rooms this connection is in and how to reach the hub.
struct Session {
    conn: ConnId,
    identity: Identity,
    rooms: Vec<RoomName>,
    outbox: Outbox,
    context: SessionContext,
    /// What the token allows, when it expires, and the message budget.
    guard: ConnectionGuard,
}

impl Session {
    /// Queues the welcome frame, then joins the default room.
    async fn start(&mut self) {
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

    async fn read_loop(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        liveness: &Liveness,
        close: &CloseWatch,
    ) {
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = close.requested() => return,
                _ = self.context.shutdown.cancelled() => return,
                _ = self.guard.expired() => {
                    metrics::policy_close("token_expired");
                    self.outbox.close_with(crate::gate::TOKEN_EXPIRED);
                    return;
                }
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    if is_capacity_error(&error) {
                        self.outbox.close_with(TOO_BIG);
                    } else {
                        tracing::debug!(%error, "connection read failed");
                        self.outbox.close_with(PEER_CLOSED);
                    }
                    return;
                }
                None => {
                    self.outbox.close_with(PEER_CLOSED);
                    return;
                }
            };
            liveness.heard();
            match self.guard.throttle(&message) {
                Throttle::Pass => {}
                Throttle::Refuse(refusal) => {
                    self.refuse(refusal);
                    continue;
                }
                Throttle::Close(reason) => {
                    self.outbox.close_with(reason);
                    return;
                }
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
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => {
                    self.outbox.close_with(PEER_CLOSED);
                    return;
                }
            }
        }
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
        let _ = self.outbox.push(Utf8Bytes::from(frame));
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

type Sink = SplitSink<WebSocket, Message>;

/// Drains the outbox onto the socket, pings, and performs every server-side close.
async fn write_loop(
    mut sink: Sink,
    mut outbox: OutboxReceiver,
    liveness: Arc<Liveness>,
    limits: SessionLimits,
    (shutdown, shutdown_reason): (CancellationToken, Arc<OnceLock<CloseReason>>),
) {
    let close = outbox.close_watch();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + limits.ping_interval,
        limits.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Created once, not per loop turn: re-registering these waiters for every frame was the
    // largest user-space cost of fan-out in a callgrind profile.
    let close_requested = close.requested();
    tokio::pin!(close_requested);
    let shutting_down = shutdown.cancelled();
    tokio::pin!(shutting_down);
    let reason = loop {
        tokio::select! {
            biased;
            reason = &mut close_requested => break reason,
            _ = &mut shutting_down => {
                // Hand over what is already queued before saying goodbye, within the deadline.
                let flushed = tokio::time::timeout(limits.flush_deadline, async {
                    while let Some(frame) = outbox.try_recv() {
                        sink.feed(Message::Text(frame)).await?;
                    }
                    sink.flush().await
                }).await;
                if matches!(flushed, Ok(Ok(()))) {
                    break shutdown_reason.get().copied().unwrap_or(GOING_AWAY);
                }
                return;
            }
            frame = outbox.recv() => {
                let Some(frame) = frame else { break INTERNAL };
                let written = tokio::select! {
                    written = write_batch(&mut sink, frame, &mut outbox) => written,
                    // A stalled socket must not hold up the close; the close frame below gets
                    // a bounded chance to go out after what is already buffered.
                    reason = &mut close_requested => break reason,
                };
                if written.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if liveness.silent_for() > limits.idle_timeout {
                    break IDLE;
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    if reason == PEER_CLOSED {
        let _ = tokio::time::timeout(limits.flush_deadline, sink.close()).await;
        return;
    }
    let frame = CloseFrame {
        code: reason.code,
        reason: Utf8Bytes::from_static(reason.reason),
    };
    let deadline = if reason == CloseReason::SLOW_CONSUMER {
        SLOW_CLOSE_DEADLINE
    } else {
        limits.flush_deadline
    };
    let _ = tokio::time::timeout(deadline, sink.send(Message::Close(Some(frame)))).await;
}

/// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]) with one flush.
async fn write_batch(
    sink: &mut Sink,
    first: Utf8Bytes,
    outbox: &mut OutboxReceiver,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    for _ in 1..MAX_BATCH {
        match outbox.try_recv() {
            Some(frame) => sink.feed(Message::Text(frame)).await?,
            None => break,
        }
    }
    sink.flush().await
}

/// Whether a read failed because a frame or message was over the configured size.
fn is_capacity_error(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(tungstenite::Error::Capacity(_)) = current.downcast_ref::<tungstenite::Error>()
        {
            return true;
        }
        source = current.source();
    }
    false
}
