//! The server API (`/api/`): how the application's backend publishes system messages and bot
//! replies, reads a room's history and presence, and closes or removes a user, over plain HTTP
//! and JSON, through any node. Owns the routes under `/api/`, the key check, reading and
//! checking requests, the answers and the API's metrics; knows nothing of sockets or of which
//! broker is used.
//!
//! Everything goes through the hub as a member's frames do: a publish is stored and delivered
//! in the room's one order on every node, a history or presence read sees the whole cluster.
//! Closing a user's connections and removing a user from a room are commands every node
//! receives through the broker and carries out on its own connections.
//!
//! Without an API key the API is off: every path under `/api/` answers 404.

mod error;
mod input;
mod key;
mod openapi;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::join_all;
use serde::Serialize;

pub use self::error::{ApiError, ErrorBody, error_response};
use self::input::JsonObject;
pub use self::input::read_object;
pub use self::key::ApiKey;
use crate::broker::{Command, Outgoing};
use crate::connection::NodeContext;
use crate::metrics;
use crate::protocol::{
    ClientId, Epoch, ErrorCode, MAX_REPLAY_LAST, Offset, Refusal, Replay, RoomName, to_json,
};

/// The user id a message published through the API carries when the call names none.
pub const SYSTEM_USER_ID: &str = "system";

/// How many messages a history read returns when the call does not say.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

/// The server API's settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The key callers must present; `None`: the API is off.
    pub key: Option<ApiKey>,
    /// Largest request body read, in bytes.
    pub max_body_bytes: usize,
    /// Most rooms one broadcast may name.
    pub max_broadcast_rooms: usize,
    /// Longest chat message text, in bytes (the node's, as for clients).
    pub max_chat_bytes: usize,
}

/// The server API of a node.
pub struct Api {
    settings: ApiSettings,
    node: Arc<NodeContext>,
    /// The OpenAPI document, rendered once with this node's limits.
    openapi: axum::body::Bytes,
}

/// What every API handler is given.
type ApiState = Arc<Api>;

impl Api {
    /// The API of the node `node`.
    pub fn new(settings: ApiSettings, node: Arc<NodeContext>) -> Arc<Api> {
        let openapi = openapi::render(&settings);
        Arc::new(Api {
            settings,
            node,
            openapi,
        })
    }

    /// Says at start-up whether the API is on.
    pub fn log_settings(&self) {
        if self.settings.key.is_some() {
            tracing::info!(
                max_body_bytes = self.settings.max_body_bytes,
                max_broadcast_rooms = self.settings.max_broadcast_rooms,
                "server API on at /api/ (bearer key required)"
            );
        } else {
            tracing::info!("server API off: no --api-key or --api-key-file; /api/ answers 404");
        }
    }
}

/// Every route under `/api/` (method, path after `/api`): the OpenAPI document describes
/// exactly these and the router serves each (tests check both).
pub const ROUTES: [(&str, &str); 7] = [
    ("POST", "/publish"),
    ("POST", "/broadcast"),
    ("GET", "/rooms/{room}/history"),
    ("GET", "/rooms/{room}/presence"),
    ("POST", "/rooms/{room}/kick"),
    ("POST", "/disconnect"),
    ("GET", "/openapi.json"),
];

/// The routes under `/api/`, to be nested there (in a router of any state).
pub fn router<S: Clone + Send + Sync + 'static>(api: Arc<Api>) -> Router<S> {
    let protected = Router::new()
        .route("/publish", post(publish))
        .route("/broadcast", post(broadcast))
        .route("/rooms/{room}/history", get(history))
        .route("/rooms/{room}/presence", get(presence))
        .route("/rooms/{room}/kick", post(kick))
        .route("/disconnect", post(disconnect))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_key));
    Router::new()
        .route("/openapi.json", get(openapi_document))
        .merge(protected)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(api.clone(), only_when_on))
        .layer(DefaultBodyLimit::max(api.settings.max_body_bytes))
        .layer(middleware::from_fn(record))
        .with_state(api)
}

/// Counts and times every call by route template and status, and logs it without its body.
async fn record(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status();
    metrics::api_request(&route, status.as_u16(), elapsed);
    if status.is_server_error() {
        tracing::warn!(%method, %route, status = status.as_u16(), ?elapsed, "api call failed");
    } else {
        tracing::debug!(%method, %route, status = status.as_u16(), ?elapsed, "api call");
    }
    response
}

/// Answers 404 for everything while the API is off.
async fn only_when_on(State(api): State<ApiState>, request: Request, next: Next) -> Response {
    if api.settings.key.is_none() {
        return ApiError::Off.into_response();
    }
    next.run(request).await
}

/// Lets through only calls that present the key.
async fn require_key(State(api): State<ApiState>, request: Request, next: Next) -> Response {
    match &api.settings.key {
        Some(key) if key.admits(request.headers()) => next.run(request).await,
        Some(_) => ApiError::Unauthorized.into_response(),
        None => ApiError::Off.into_response(),
    }
}

async fn openapi_document(State(api): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        api.openapi.clone(),
    )
        .into_response()
}

/// Who a published message is from.
struct Sender {
    user_id: String,
    name: Option<String>,
    cid: Option<ClientId>,
}

impl Sender {
    fn read(body: &JsonObject) -> Result<Sender, Refusal> {
        Ok(Sender {
            user_id: body.user_id()?.unwrap_or_else(|| SYSTEM_USER_ID.to_owned()),
            name: body.name()?,
            cid: body.cid()?,
        })
    }
}

/// A stored message: the answer to a publish, as an `ack` tells a client.
#[derive(Debug, Serialize)]
struct Ack {
    room: RoomName,
    id: uuid::Uuid,
    offset: String,
    epoch: Epoch,
    #[serde(skip_serializing_if = "Option::is_none")]
    cid: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl Api {
    /// Stores and publishes one message in `room` as a member's would be.
    async fn publish_one(
        &self,
        room: &RoomName,
        text: &str,
        sender: &Sender,
    ) -> Result<Ack, ApiError> {
        let message = Outgoing::chat(
            room,
            &sender.user_id,
            sender.name.as_deref(),
            text,
            sender.cid.as_ref(),
        );
        let published = self
            .node
            .hub
            .publish(room, message)
            .await
            .map_err(ApiError::publish)?;
        Ok(Ack {
            room: room.clone(),
            id: published.id,
            offset: published.position.offset.to_string(),
            epoch: published.position.epoch,
            cid: sender.cid.as_ref().map(|cid| cid.as_str().to_owned()),
            duplicate: published.duplicate,
        })
    }
}

async fn publish(State(api): State<ApiState>, mut body: JsonObject) -> Result<Response, ApiError> {
    let room = body.room()?;
    let text = body.message(api.settings.max_chat_bytes)?;
    let sender = Sender::read(&body)?;
    let ack = api.publish_one(&room, &text, &sender).await?;
    Ok(json(StatusCode::OK, &ack))
}

/// One room's outcome in a broadcast.
#[derive(Serialize)]
#[serde(untagged)]
enum RoomResult {
    Published(Ack),
    Failed { room: RoomName, error: ErrorBody },
}

#[derive(Serialize)]
struct BroadcastReply {
    results: Vec<RoomResult>,
}

async fn broadcast(
    State(api): State<ApiState>,
    mut body: JsonObject,
) -> Result<Response, ApiError> {
    let rooms = body.rooms(api.settings.max_broadcast_rooms)?;
    let text = body.message(api.settings.max_chat_bytes)?;
    let sender = Sender::read(&body)?;
    // All at once: the publisher batches them into few Redis calls.
    let outcomes = join_all(
        rooms
            .iter()
            .map(|room| api.publish_one(room, &text, &sender)),
    )
    .await;
    if let Some(Err(first)) = outcomes.first()
        && outcomes.iter().all(Result::is_err)
    {
        // Nothing was published anywhere: say why as a whole.
        return Err(first.clone());
    }
    let results = rooms
        .into_iter()
        .zip(outcomes)
        .map(|(room, outcome)| match outcome {
            Ok(ack) => RoomResult::Published(ack),
            Err(error) => RoomResult::Failed {
                room,
                error: error.body(),
            },
        })
        .collect();
    Ok(json(StatusCode::OK, &BroadcastReply { results }))
}

/// The room named in the path.
fn path_room(
    room: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<RoomName, ApiError> {
    let Path(room) = room.map_err(|_| {
        Refusal::new(
            ErrorCode::InvalidRoom,
            "the room in the path must be a room name",
        )
    })?;
    Ok(RoomName::parse(&room)?)
}

/// The query of a history read.
struct HistoryQuery {
    since: Option<Offset>,
    epoch: Option<String>,
    limit: usize,
}

impl HistoryQuery {
    fn parse(query: Option<&str>) -> Result<HistoryQuery, Refusal> {
        let mut since = None;
        let mut epoch = None;
        let mut limit = None;
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*name {
                "since" if since.is_none() => since = Some(parse_offset(&value)?),
                "epoch" if epoch.is_none() => epoch = Some(value.into_owned()),
                "limit" if limit.is_none() => {
                    limit = Some(
                        value
                            .parse::<usize>()
                            .ok()
                            .filter(|limit| (1..=MAX_REPLAY_LAST).contains(limit))
                            .ok_or_else(|| {
                                Refusal::new(
                                    ErrorCode::InvalidFrame,
                                    format!(
                                        "`limit` must be an integer from 1 to {MAX_REPLAY_LAST}"
                                    ),
                                )
                            })?,
                    );
                }
                _ => {}
            }
        }
        Ok(HistoryQuery {
            since,
            epoch,
            limit: limit.unwrap_or(DEFAULT_HISTORY_LIMIT),
        })
    }
}

/// An offset as `since` takes it: `<ms>-<seq>` or `<ms>`, each 1 to 19 digits.
fn parse_offset(text: &str) -> Result<Offset, Refusal> {
    let digits =
        |part: &str| (1..=19).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    let valid = match text.split_once('-') {
        Some((ms, seq)) => digits(ms) && digits(seq),
        None => digits(text),
    };
    valid.then(|| Offset::parse(text)).flatten().ok_or_else(|| {
        Refusal::new(
            ErrorCode::InvalidFrame,
            "`since` must be an offset such as 1732532000123-0",
        )
    })
}

/// The head of a history answer; the messages follow as the stored frames themselves.
#[derive(Serialize)]
struct HistoryHead<'a> {
    room: &'a RoomName,
    epoch: Option<Epoch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    more: bool,
}

async fn history(
    State(api): State<ApiState>,
    room: Result<Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let room = path_room(room)?;
    let query = HistoryQuery::parse(query.as_deref())?;
    let replay = match query.since {
        Some(offset) => Replay::Since {
            offset,
            epoch: query.epoch,
        },
        None => Replay::Last(query.limit),
    };
    let history = api
        .node
        .hub
        .history(&room, &replay)
        .await
        .map_err(ApiError::unavailable)?;
    let since = matches!(replay, Replay::Since { .. });
    let more = since && history.entries.len() > query.limit;
    let head = to_json(&HistoryHead {
        room: &room,
        epoch: history.epoch,
        recovered: since.then_some(history.complete),
        more,
    });
    Ok(json_with_messages(
        &head,
        history
            .entries
            .iter()
            .take(query.limit)
            .map(|(_, frame)| frame.as_bytes()),
    ))
}

/// A JSON object answer: `head` (an object) with a `messages` array of stored frames, which are
/// JSON objects already and go in as they are, not parsed again.
fn json_with_messages<'a>(head: &str, frames: impl Iterator<Item = &'a [u8]>) -> Response {
    let open = head.strip_suffix('}').unwrap_or(head);
    let mut body = Vec::with_capacity(open.len() + 1024);
    body.extend_from_slice(open.as_bytes());
    body.extend_from_slice(if open.ends_with('{') {
        b"\"messages\":["
    } else {
        b",\"messages\":["
    });
    for (index, frame) in frames.enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(frame);
    }
    body.extend_from_slice(b"]}");
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

#[derive(Serialize)]
struct PresenceReply<'a> {
    room: &'a RoomName,
    users: Vec<crate::protocol::PresentUser>,
}

async fn presence(
    State(api): State<ApiState>,
    room: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let room = path_room(room)?;
    let users = api
        .node
        .hub
        .presence(&room)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(json(StatusCode::OK, &PresenceReply { room: &room, users }))
}

/// The answer to a command: how many nodes received it, each of which acts on its own
/// connections.
#[derive(Serialize)]
struct CommandReply {
    nodes: usize,
}

async fn disconnect(State(api): State<ApiState>, body: JsonObject) -> Result<Response, ApiError> {
    let command = Command::Disconnect {
        user_id: body.required_user_id()?,
        reason: body.reason()?,
    };
    api.send(&command).await
}

async fn kick(
    State(api): State<ApiState>,
    room: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let room = path_room(room)?;
    let command = Command::Kick {
        room: room.to_string(),
        user_id: body.required_user_id()?,
    };
    api.send(&command).await
}

impl Api {
    /// Sends a command to every node; 202: each carries it out on its own connections.
    async fn send(&self, command: &Command) -> Result<Response, ApiError> {
        let nodes = self
            .node
            .hub
            .command(command)
            .await
            .map_err(ApiError::unavailable)?;
        tracing::info!(
            command = match command {
                Command::Disconnect { .. } => "disconnect",
                Command::Kick { .. } => "kick",
            },
            nodes,
            "application command sent"
        );
        Ok(json(StatusCode::ACCEPTED, &CommandReply { nodes }))
    }
}

/// A JSON answer.
fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        to_json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn the_router_serves_every_route_and_only_those() {
        let settings = ApiSettings {
            key: Some(ApiKey::from("0123456789abcdef")),
            max_body_bytes: 1024,
            max_broadcast_rooms: 2,
            max_chat_bytes: 100,
        };
        let router: Router = router(Api::new(settings, crate::connection::tests::node()));
        let status = |method: &str, path: &str| {
            let request = Request::builder()
                .method(Method::from_bytes(method.as_bytes()).unwrap())
                .uri(format!("/{}", path.trim_start_matches('/')))
                .body(Body::empty())
                .unwrap();
            let router = router.clone();
            async move { router.oneshot(request).await.unwrap().status() }
        };
        for (method, path) in ROUTES {
            let path = path.replace("{room}", "lobby");
            let expected = if path == "/openapi.json" {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status(method, &path).await, expected, "{method} {path}");
        }
        assert_eq!(status("GET", "/rooms/lobby").await, StatusCode::NOT_FOUND);
        assert_eq!(
            status("DELETE", "/publish").await,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
