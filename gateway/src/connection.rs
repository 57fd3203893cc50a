//! The connection core: one client's state and the handling of its frames (join, leave,
//! message, presence, ping, auth), whatever transport carries them.
//!
//! A transport hands the core each parsed client frame ([`Connection::receive`]), polls it
//! while a broker call is under way ([`Connection::poll`]) and finally closes it
//! ([`Connection::finish`]). The core answers through the connection's [`Outbox`] and asks
//! for a close through it too. Broker calls run one at a time, in the order the frames came,
//! while the transport goes on reading: a publish waiting on a stalled Redis holds up the
//! frames behind it (so a client's messages keep their order) but never the reading of the
//! socket, so pings are still answered.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, History, Outgoing, Published};
use crate::metrics;
use crate::protocol::close::Disconnect;
use crate::protocol::{
    ClientFrame, ClientId, ErrorCode, JoinOptions, PROTOCOL_VERSION, PresentUser, Refusal, Replay,
    RoomName, ServerFrame, parse_client_frame, to_json,
};
use crate::rooms::fanout::{ConnId, next_conn_id};
use crate::rooms::hub::{Hub, Joiner};
use crate::security::gate::{ConnectionGuard, Inbound, Throttle};
use crate::transport::outbox::Outbox;
use crate::transport::wire::WireFrame;

/// Per-connection limits and timings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Longest chat message text, in bytes.
    pub max_chat_bytes: usize,
    /// Most rooms one connection may be in at once.
    pub max_rooms: usize,
    /// Frames the outbox holds before the connection counts as a slow consumer.
    pub outbox_capacity: usize,
    /// Bytes the outbox holds before the connection counts as a slow consumer.
    pub outbox_bytes: usize,
    /// How often the server pings.
    pub ping_interval: Duration,
    /// How long a connection may stay silent (no pong, no frame) before it is closed.
    pub idle_timeout: Duration,
    /// How long a closing connection may take to flush what is queued.
    pub flush_deadline: Duration,
}

/// Everything a connection needs from the node, whatever its transport.
pub struct NodeContext {
    /// The node's rooms and broker.
    pub hub: Arc<Hub>,
    /// This node's id, announced in the welcome frame.
    pub node_id: Arc<str>,
    /// Limits and timings.
    pub limits: ConnectionLimits,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The close sent to clients at shutdown, set before `shutdown` is cancelled: 1012 for a
    /// restart (SIGTERM), 1001 otherwise.
    pub shutdown_reason: Arc<OnceLock<Disconnect>>,
}

impl NodeContext {
    /// The close every connection gets when the node shuts down.
    pub fn shutdown_close(&self) -> Disconnect {
        self.shutdown_reason
            .get()
            .copied()
            .unwrap_or(Disconnect::GoingAway)
    }
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
    /// How the client is connected, as the welcome frame tells it.
    pub transport: TransportKind,
    /// Anonymous mode: the signed token that gives this `userId` back on a reconnect.
    pub reconnect_token: Option<String>,
}

/// How a client is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportKind {
    /// One WebSocket.
    WebSocket,
    /// An SSE stream, with client frames in POSTs that carry this session token.
    Sse {
        /// The session token handed out in the welcome frame.
        session: String,
    },
}

impl TransportKind {
    /// The name the welcome frame uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Sse { .. } => "sse",
        }
    }
}

/// Most frames that may wait behind a broker call; while this many wait, the transport stops
/// reading (the client's further frames wait in its socket), so a burst is slowed, not refused.
pub const MAX_WAITING: usize = 32;

/// A broker call under way, and what to do when it ends.
type Running = Pin<Box<dyn Future<Output = Done> + Send>>;

/// How a broker call ended.
enum Done {
    Joined {
        room: RoomName,
        options: JoinOptions,
        reference: Option<Value>,
        /// The connection's default room, joined at connect.
        default: bool,
        result: Result<Option<History>, BrokerError>,
    },
    Left {
        room: RoomName,
        reference: Option<Value>,
        /// The application removed the connection from the room.
        kicked: bool,
    },
    Published {
        room: RoomName,
        cid: Option<ClientId>,
        reference: Option<Value>,
        /// Seed-style messages are not acknowledged.
        seed: bool,
        result: Result<Published, BrokerError>,
    },
    Presence {
        room: RoomName,
        reference: Option<Value>,
        result: Result<Vec<PresentUser>, BrokerError>,
    },
    History {
        room: RoomName,
        since: bool,
        limit: usize,
        reference: Option<Value>,
        result: Result<History, BrokerError>,
    },
}

/// One client's state: who it is, its rooms, its security guard, and the frames waiting for
/// their turn.
pub struct Connection {
    conn: ConnId,
    identity: Identity,
    rooms: Vec<RoomName>,
    outbox: Outbox,
    context: Arc<NodeContext>,
    /// What the token allows, when it expires, and the message budget.
    guard: ConnectionGuard,
    running: Option<Running>,
    waiting: VecDeque<ClientFrame>,
    /// Whether the node's user index knows this connection (from its start to its finish).
    registered: bool,
}

impl Connection {
    /// A connection answering through `outbox`.
    pub fn new(
        identity: Identity,
        outbox: Outbox,
        context: Arc<NodeContext>,
        guard: ConnectionGuard,
    ) -> Connection {
        Connection {
            conn: next_conn_id(),
            identity,
            rooms: Vec::new(),
            outbox,
            context,
            guard,
            running: None,
            waiting: VecDeque::new(),
            registered: false,
        }
    }

    /// Queues the welcome frame and starts joining the default room. The outbox stays corked
    /// until that join ends, so the welcome frame (queued first) tells the client it will now
    /// receive the room's messages.
    pub fn start(&mut self) {
        let welcome = ServerFrame::Welcome {
            user_id: &self.identity.user_id,
            node: &self.context.node_id,
            room: &self.identity.default_room,
            protocol: PROTOCOL_VERSION,
            transport: self.identity.transport.as_str(),
            session: match &self.identity.transport {
                TransportKind::Sse { session } => Some(session),
                TransportKind::WebSocket => None,
            },
            reconnect_token: self.identity.reconnect_token.as_deref(),
        };
        self.send(to_json(&welcome));
        self.context
            .hub
            .users()
            .register(&self.identity.user_id, self.conn, self.outbox.clone());
        self.registered = true;
        let room = self.identity.default_room.clone();
        let options = self.identity.default_options.clone();
        self.running = Some(self.join_call(room, options, None, true));
    }

    /// Spends one frame of the rate limits; `false` when the frame must be dropped (its
    /// refusal, if any, is already sent). A `Throttle::Close` is returned as the reason.
    pub fn throttle(&self, frame: Inbound<'_>) -> Result<bool, Disconnect> {
        match self.guard.throttle(frame) {
            Throttle::Pass => Ok(true),
            Throttle::Refuse(refusal) => {
                if let Some(refusal) = refusal {
                    self.refuse(refusal);
                }
                Ok(false)
            }
            Throttle::Close(reason) => Err(reason),
        }
    }

    /// Handles one text frame as the client sent it: spends the rate limits, parses it, then
    /// handles it or answers its refusal. `Err` when the limits close the connection.
    pub fn receive_text(&mut self, text: &str) -> Result<(), Disconnect> {
        if !self.throttle(Inbound::Text(text))? {
            return Ok(());
        }
        match parse_client_frame(text, self.context.limits.max_chat_bytes) {
            Ok(frame) => self.receive(frame),
            Err(refusal) => self.refuse(refusal),
        }
        Ok(())
    }

    /// Handles one client frame now, or queues it behind the broker call under way.
    pub fn receive(&mut self, frame: ClientFrame) {
        // A ping is answered at once, even while earlier frames wait: it asks whether the
        // connection is alive, not whether the broker is.
        if let ClientFrame::Ping { reference } = &frame {
            self.send(to_json(&ServerFrame::Pong {
                reference: reference.as_ref(),
            }));
            return;
        }
        if self.running.is_none() && self.waiting.is_empty() {
            self.begin(frame);
        } else {
            self.waiting.push_back(frame);
        }
    }

    /// Whether nothing is under way or waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_none() && self.waiting.is_empty()
    }

    /// Whether the transport should stop reading until a broker call finishes.
    pub fn is_full(&self) -> bool {
        self.waiting.len() >= MAX_WAITING
    }

    /// Drives the broker call under way, and starts what comes next once none is: a room the
    /// application removed the connection from, then the frames that waited. Ready when a
    /// call (or more) finished and was answered.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut finished = false;
        loop {
            while self.running.is_none() {
                if let Some(room) = self.next_kick() {
                    self.begin_kick(room);
                } else if let Some(next) = self.waiting.pop_front() {
                    self.begin(next);
                } else {
                    break;
                }
            }
            let Some(running) = &mut self.running else {
                break;
            };
            let Poll::Ready(done) = running.as_mut().poll(cx) else {
                break;
            };
            self.running = None;
            finished = true;
            self.apply(done);
        }
        if finished {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// A room the application removed this connection from, if one waits. The node's user
    /// index holds them and notifies the outbox, whose waker is this connection's task.
    fn next_kick(&self) -> Option<RoomName> {
        if !self.outbox.take_notice() {
            return None;
        }
        self.context.hub.users().take_kick(self.conn, &self.outbox)
    }

    /// Leaves a room because the application said so; the client is told with a `left` frame
    /// marked `kicked`, after which nothing more of the room reaches it.
    fn begin_kick(&mut self, room: RoomName) {
        // Not in it (any more): nothing to do. A join of it still waiting comes after this.
        if let Some(index) = self.rooms.iter().position(|joined| *joined == room) {
            self.begin_leave(index, None, true);
        }
    }

    /// Starts leaving the `index`th of the connection's rooms.
    fn begin_leave(&mut self, index: usize, reference: Option<Value>, kicked: bool) {
        let room = self.rooms.swap_remove(index);
        let hub = self.context.hub.clone();
        let (conn, user_id) = (self.conn, self.identity.user_id.clone());
        self.running = Some(Box::pin(async move {
            hub.leave(&room, conn, &user_id).await;
            Done::Left {
                room,
                reference,
                kicked,
            }
        }));
    }

    /// Ready, with the close to send, once the connection's token has expired (never in
    /// anonymous mode).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Disconnect> {
        self.guard.poll_expired(cx).map(|()| {
            metrics::policy_close(metrics::PolicyClose::TokenExpired);
            Disconnect::TokenExpired
        })
    }

    /// Ends the connection: lets a broker call under way finish (a join half done would
    /// otherwise leave a member, or a presence entry, behind), drops what waits, and leaves
    /// every room.
    pub async fn finish(&mut self) {
        if std::mem::take(&mut self.registered) {
            self.context
                .hub
                .users()
                .unregister(&self.identity.user_id, self.conn);
        }
        self.waiting.clear();
        if let Some(running) = self.running.take() {
            let done = running.await;
            self.apply(done);
        }
        for room in std::mem::take(&mut self.rooms) {
            self.context
                .hub
                .leave(&room, self.conn, &self.identity.user_id)
                .await;
        }
    }

    /// Sends an `error` frame.
    pub fn refuse(&self, refusal: Refusal) {
        metrics::client_error(refusal.code.as_str());
        self.send(to_json(&ServerFrame::from(&refusal)));
    }

    fn send(&self, frame: String) {
        // A full outbox closes the connection as a slow consumer; nothing more to do here.
        let _ = self.outbox.push(&WireFrame::text(&frame));
    }

    /// Starts handling a frame: checks what needs no broker, answers what needs nothing
    /// more, and starts the broker call for the rest.
    fn begin(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Seed { message } => {
                let room = self.identity.default_room.clone();
                self.begin_publish(room, message, None, None, true);
            }
            ClientFrame::Message {
                room,
                message,
                cid,
                reference,
            } => {
                let room = room.unwrap_or_else(|| self.identity.default_room.clone());
                self.begin_publish(room, message, cid, reference, false);
            }
            ClientFrame::Join {
                room,
                options,
                reference,
            } => {
                if self.rooms.contains(&room) {
                    self.send_joined(&room, reference.as_ref());
                    return;
                }
                let allowed = self.guard.may_join(&room).and_then(|()| {
                    if self.rooms.len() < self.context.limits.max_rooms {
                        Ok(())
                    } else {
                        Err(Refusal::new(
                            ErrorCode::TooManyRooms,
                            format!(
                                "a connection may be in at most {} rooms",
                                self.context.limits.max_rooms
                            ),
                        ))
                    }
                });
                match allowed {
                    Ok(()) => self.running = Some(self.join_call(room, options, reference, false)),
                    Err(refusal) => self.refuse(refusal.with_ref(reference)),
                }
            }
            ClientFrame::Leave { room, reference } => {
                let Some(index) = self.rooms.iter().position(|joined| *joined == room) else {
                    self.refuse(
                        Refusal::new(ErrorCode::NotInRoom, format!("not in room `{room}`"))
                            .with_ref(reference),
                    );
                    return;
                };
                self.begin_leave(index, reference, false);
            }
            ClientFrame::Presence { room, reference } => {
                let hub = self.context.hub.clone();
                self.running = Some(Box::pin(async move {
                    let result = hub.presence(&room).await;
                    Done::Presence {
                        room,
                        reference,
                        result,
                    }
                }));
            }
            ClientFrame::History {
                room,
                replay,
                limit,
                reference,
            } => {
                // Reading a room's history is as much as being in it: the token's room
                // claims apply.
                if let Err(refusal) = self.guard.may_join(&room) {
                    self.refuse(refusal.with_ref(reference));
                    return;
                }
                let hub = self.context.hub.clone();
                let since = matches!(replay, Replay::Since { .. });
                self.running = Some(Box::pin(async move {
                    let result = hub.history(&room, &replay).await;
                    Done::History {
                        room,
                        since,
                        limit,
                        reference,
                        result,
                    }
                }));
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

    /// The broker call that adds this connection to `room`.
    fn join_call(
        &self,
        room: RoomName,
        options: JoinOptions,
        reference: Option<Value>,
        default: bool,
    ) -> Running {
        let hub = self.context.hub.clone();
        let outbox = self.outbox.clone();
        let conn = self.conn;
        let (user_id, name) = (self.identity.user_id.clone(), self.identity.name.clone());
        Box::pin(async move {
            let joiner = Joiner {
                conn,
                outbox,
                user_id: &user_id,
                name: name.as_deref(),
            };
            let result = hub
                .join(&room, joiner, &options)
                .await
                .map(|joined| joined.history);
            Done::Joined {
                room,
                options,
                reference,
                default,
                result,
            }
        })
    }

    /// Checks a chat message and starts storing and publishing it.
    fn begin_publish(
        &mut self,
        room: RoomName,
        text: String,
        cid: Option<ClientId>,
        reference: Option<Value>,
        seed: bool,
    ) {
        metrics::message_received();
        let allowed = self.guard.may_publish(&room).and_then(|()| {
            if self.rooms.contains(&room) {
                Ok(())
            } else {
                Err(Refusal::new(
                    ErrorCode::NotInRoom,
                    format!("join `{room}` before sending to it"),
                ))
            }
        });
        if let Err(refusal) = allowed {
            self.refuse(refusal.with_ref(reference));
            return;
        }
        let message = Outgoing::chat(
            &room,
            &self.identity.user_id,
            self.identity.name.as_deref(),
            &text,
            cid.as_ref(),
        );
        let hub = self.context.hub.clone();
        self.running = Some(Box::pin(async move {
            let result = hub.publish(&room, message).await;
            Done::Published {
                room,
                cid,
                reference,
                seed,
                result,
            }
        }));
    }

    /// Answers a finished broker call.
    fn apply(&mut self, done: Done) {
        match done {
            Done::Joined {
                room,
                options,
                reference,
                default,
                result,
            } => {
                match result {
                    Ok(history) => {
                        self.rooms.push(room.clone());
                        match history {
                            Some(history) => {
                                self.replay(&room, reference.as_ref(), &options.replay, history)
                            }
                            // Only a client that asked for a replay knows what to do with
                            // `joined` for its default room; a plain (seed) client would show
                            // it as a chat line.
                            None if default => {}
                            None => self.send_joined(&room, reference.as_ref()),
                        }
                    }
                    Err(error) if default => {
                        tracing::warn!(%room, %error, "could not join the default room");
                        self.refuse(Refusal::new(
                            ErrorCode::Unavailable,
                            "the broker is unavailable; reconnect later",
                        ));
                        self.outbox.close_with(Disconnect::TryAgainLater);
                    }
                    Err(error) => {
                        tracing::warn!(%room, %error, "join failed");
                        self.refuse(
                            Refusal::new(
                                ErrorCode::Unavailable,
                                "the broker is unavailable; try again",
                            )
                            .with_ref(reference),
                        );
                    }
                }
                if default {
                    self.outbox.uncork();
                }
            }
            Done::Left {
                room,
                reference,
                kicked,
            } => {
                let notice =
                    kicked.then(|| format!("removed from room `{room}` by the application"));
                self.send(to_json(&ServerFrame::Left {
                    room: &room,
                    kicked,
                    message: notice.as_deref(),
                    reference: reference.as_ref(),
                }))
            }
            Done::Published {
                room,
                cid,
                reference,
                seed,
                result,
            } => match result {
                Ok(_) if seed => {}
                Ok(published) => self.send(to_json(&ServerFrame::Ack {
                    room: &room,
                    id: published.id,
                    offset: published.position.offset,
                    epoch: published.position.epoch,
                    cid: cid.as_ref().map(ClientId::as_str),
                    duplicate: published.duplicate,
                    reference: reference.as_ref(),
                })),
                Err(error) => {
                    tracing::warn!(%room, %error, "publish failed");
                    let refusal = if error.outcome_unknown() {
                        Refusal::new(
                            ErrorCode::PublishUnknown,
                            "the broker did not confirm the message in time: it may or may not \
                             have been sent; retry with the same cid",
                        )
                    } else {
                        Refusal::new(
                            ErrorCode::PublishFailed,
                            "the message was not sent: the broker is unavailable",
                        )
                    };
                    self.refuse(refusal.with_ref(reference));
                }
            },
            Done::Presence {
                room,
                reference,
                result,
            } => match result {
                Ok(users) => self.send(to_json(&ServerFrame::Presence {
                    room: &room,
                    users: &users,
                    reference: reference.as_ref(),
                })),
                Err(error) => {
                    tracing::warn!(%room, %error, "presence query failed");
                    self.refuse(
                        Refusal::new(ErrorCode::Unavailable, "presence is unavailable; try again")
                            .with_ref(reference),
                    );
                }
            },
            Done::History {
                room,
                since,
                limit,
                reference,
                result,
            } => match result {
                Ok(history) => self.send_history(&room, since, limit, reference.as_ref(), history),
                Err(error) => {
                    tracing::warn!(%room, %error, "history query failed");
                    self.refuse(
                        Refusal::new(ErrorCode::Unavailable, "history is unavailable; try again")
                            .with_ref(reference),
                    );
                }
            },
        }
    }

    /// Answers a `history` frame: at most `limit` messages, the oldest first (for `since`, the
    /// first ones after it: the client asks again from the last for more).
    fn send_history(
        &self,
        room: &RoomName,
        since: bool,
        limit: usize,
        reference: Option<&Value>,
        history: History,
    ) {
        let entries = &history.entries[..history.entries.len().min(limit)];
        // Every stored frame is the JSON object members received; one that is not (a foreign
        // writer) is left out rather than breaking the answer.
        let messages: Vec<&RawValue> = entries
            .iter()
            .filter_map(|(_, frame)| {
                std::str::from_utf8(frame.as_bytes())
                    .ok()
                    .and_then(|text| serde_json::from_str(text).ok())
            })
            .collect();
        self.send(to_json(&ServerFrame::History {
            room,
            epoch: history.epoch,
            recovered: since.then_some(history.complete),
            messages: &messages,
            reference,
        }));
    }

    fn send_joined(&self, room: &RoomName, reference: Option<&Value>) {
        self.send(to_json(&ServerFrame::Joined {
            room,
            recovered: None,
            epoch: None,
            reference,
        }));
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
            epoch: history.epoch,
            reference,
        }));
        self.context.hub.release(room, self.conn, history);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::task::Poll;

    use serde_json::{Value, json};

    use super::*;
    use crate::broker::HistorySettings;
    use crate::rooms::hub::HubSettings;
    use crate::transport::outbox::{MemorySocket, in_memory};

    /// A node with the in-process broker and small limits, for tests of what runs on one.
    pub(crate) fn node() -> Arc<NodeContext> {
        let settings = HubSettings {
            history: HistorySettings {
                max_len: 100,
                max_age: Duration::from_secs(60),
                dedup_window: Duration::from_secs(60),
            },
            presence_ttl: Duration::from_secs(30),
            repair_timeout: Duration::from_secs(5),
        };
        Arc::new(NodeContext {
            hub: Hub::start(settings, None).unwrap(),
            node_id: "n1".into(),
            limits: ConnectionLimits {
                max_chat_bytes: 100,
                max_rooms: 2,
                outbox_capacity: 64,
                outbox_bytes: 1 << 20,
                ping_interval: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(60),
                flush_deadline: Duration::from_secs(1),
            },
            shutdown: CancellationToken::new(),
            shutdown_reason: Arc::new(OnceLock::new()),
        })
    }

    /// A connection whose outbox writes into memory: the transport a test plays.
    fn connect(node: &Arc<NodeContext>, user: &str) -> (Connection, MemorySocket) {
        let (outbox, socket) = in_memory(64);
        let identity = Identity {
            user_id: user.to_owned(),
            name: None,
            default_room: RoomName::parse("lobby").unwrap(),
            default_options: JoinOptions::PLAIN,
            transport: TransportKind::WebSocket,
            reconnect_token: None,
        };
        let guard = ConnectionGuard::unrestricted(user);
        let core = Connection::new(identity, outbox, node.clone(), guard);
        (core, socket)
    }

    /// Polls the core until no broker call is under way or waiting.
    async fn settle(core: &mut Connection) {
        std::future::poll_fn(|cx| {
            let _ = core.poll(cx);
            if core.is_idle() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// What the client reads: every frame written so far, parsed.
    fn frames(socket: &MemorySocket) -> Vec<Value> {
        socket
            .take_texts()
            .iter()
            .map(|text| serde_json::from_str(text).unwrap())
            .collect()
    }

    async fn send(core: &mut Connection, frame: Value) {
        match parse_client_frame(&frame.to_string(), 100) {
            Ok(frame) => core.receive(frame),
            Err(refusal) => core.refuse(refusal),
        }
        settle(core).await;
    }

    #[tokio::test]
    async fn the_core_answers_every_kind_of_frame_through_its_outbox() {
        let node = node();
        let (mut core, socket) = connect(&node, "u-1");
        core.start();
        settle(&mut core).await;
        let welcome = frames(&socket);
        assert_eq!(welcome[0]["type"], "userId", "the welcome comes first");

        send(
            &mut core,
            json!({"type":"message","message":"hi","cid":"c1","ref":1}),
        )
        .await;
        // The in-process broker delivers before the call returns: the echo comes first.
        let [echo, ack] = <[Value; 2]>::try_from(frames(&socket)).unwrap();
        assert_eq!(
            (ack["type"].as_str(), ack["ref"].as_i64()),
            (Some("ack"), Some(1))
        );
        assert_eq!(
            (ack["cid"].as_str(), ack["offset"].clone()),
            (Some("c1"), echo["offset"].clone())
        );
        assert_eq!(echo["message"], "hi");

        send(
            &mut core,
            json!({"type":"message","message":"hi","cid":"c1","ref":2}),
        )
        .await;
        let retry = frames(&socket);
        assert_eq!(retry.len(), 1, "the retry is answered, not delivered again");
        assert_eq!(
            (retry[0]["duplicate"].as_bool(), retry[0]["id"].clone()),
            (Some(true), ack["id"].clone())
        );

        send(&mut core, json!({"type":"join","room":"news","ref":3})).await;
        send(&mut core, json!({"type":"presence","room":"news","ref":4})).await;
        send(&mut core, json!({"type":"ping","ref":5})).await;
        send(&mut core, json!({"type":"leave","room":"news","ref":6})).await;
        send(
            &mut core,
            json!({"type":"message","room":"news","message":"x","ref":7}),
        )
        .await;
        send(&mut core, json!({"type":"join","room":"a","ref":8})).await;
        send(&mut core, json!({"type":"join","room":"b","ref":9})).await;
        let kinds: Vec<(String, Value)> = frames(&socket)
            .iter()
            .map(|frame| {
                let kind = frame["code"].as_str().or(frame["type"].as_str()).unwrap();
                (kind.to_owned(), frame["ref"].clone())
            })
            .collect();
        let expected = [
            ("joined", 3),
            ("presence", 4),
            ("pong", 5),
            ("left", 6),
            ("not_in_room", 7),
            ("joined", 8),
            ("too_many_rooms", 9),
        ]
        .map(|(kind, reference)| (kind.to_owned(), json!(reference)));
        assert_eq!(kinds, expected);

        core.finish().await;
        assert!(
            node.hub
                .presence(&RoomName::parse("lobby").unwrap())
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn the_applications_commands_remove_a_user_from_a_room_and_close_them() {
        use crate::broker::Command;
        let node = node();
        let news = RoomName::parse("news").unwrap();
        let (mut alice, alice_socket) = connect(&node, "alice");
        let (mut bob, bob_socket) = connect(&node, "bob");
        for core in [&mut alice, &mut bob] {
            core.start();
            settle(core).await;
            send(core, json!({"type":"join","room":"news","ref":1})).await;
        }
        frames(&alice_socket);
        frames(&bob_socket);

        let kick = Command::Kick {
            room: news.to_string(),
            user_id: "alice".into(),
        };
        assert_eq!(
            node.hub.command(&kick).await.unwrap(),
            1,
            "this node is all"
        );
        settle(&mut alice).await;
        assert_eq!(
            frames(&alice_socket),
            [json!({"type":"left","room":"news","kicked":true,
                    "message":"removed from room `news` by the application"})]
        );
        let present = node.hub.presence(&news).await.unwrap();
        assert_eq!(
            present
                .iter()
                .map(|u| u.user_id.as_str())
                .collect::<Vec<_>>(),
            ["bob"]
        );
        send(
            &mut bob,
            json!({"type":"message","room":"news","message":"after","ref":2}),
        )
        .await;
        settle(&mut alice).await;
        assert!(frames(&alice_socket).is_empty(), "nothing more of the room");
        assert!(bob_socket.close_requested().is_none());

        let disconnect = Command::Disconnect {
            user_id: "alice".into(),
            reason: Some("banned".into()),
        };
        node.hub.command(&disconnect).await.unwrap();
        assert_eq!(
            frames(&alice_socket),
            [json!({"type":"disconnect","code":4004,"reason":"banned","message":"banned"})]
        );
        assert_eq!(
            alice_socket.close_requested(),
            Some(Disconnect::ByApplication)
        );
        assert!(bob_socket.close_requested().is_none(), "only that user");
        alice.finish().await;
        assert_eq!(node.hub.users().connections("alice"), 0);
        bob.finish().await;
    }
}
