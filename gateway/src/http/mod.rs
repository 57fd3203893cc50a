//! The HTTP surface of a node: the WebSocket endpoint (`/`, `/ws`), the SSE fallback (`/sse`,
//! `/sse/send`, see [`sse`]), the demo page with the client library it runs on and its icon,
//! health, readiness and metrics. Owns routing, which routes are public and which internal, and handshake validation up to the upgrade (or the
//! event stream; a node that is not ready refuses before either); knows nothing of frame
//! formats.
//!
//! Internal routes (`/metrics`, and the server API under `/api/`, a router of its own:
//! [`api`]) are for operators and the application's backend, never for the public: with
//! `--internal-listen` they are served only on that listener, otherwise on the one listener
//! with everything else, and the load balancer keeps them private.

pub mod api;
pub mod sse;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::connection::{Identity, NodeContext, TransportKind};
use crate::metrics::TransportMeters;
use crate::protocol::{JoinOptions, Offset, Replay, RoomName, validate_display_name};
use crate::security::gate::{Admission, ConnectionGuard, Gate, Handshake, Refused};
use crate::security::tokens::Signer;
use crate::transport::sse::Relay;
use crate::transport::upgrade::{UpgradeRejection, WebSocketRequest};
use crate::transport::websocket;

/// The demo chat page, embedded in the binary.
const DEMO_PAGE: &str = include_str!("../../static/index.html");

/// The browser build of the client library (`clients/js`), which the demo page imports. Embedded
/// from the committed build itself, so the page always runs the library as published: there is
/// no second copy to drift.
const CLIENT_LIBRARY: &str = include_str!("../../../clients/js/dist/chat-client.js");

/// The demo page's icon. Served for `/favicon.ico` too, which browsers ask for on their own:
/// they go by the content type, not the name.
const FAVICON: &str = include_str!("../../static/favicon.svg");

/// The subprotocol a client may ask for; echoed when offered.
const SUBPROTOCOL: &str = "chat.v1";

/// The room a connection joins when it names none.
const DEFAULT_ROOM: &str = "lobby";

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// What every connection needs from the node.
    pub node: Arc<NodeContext>,
    /// The WebSocket reader's limits and read buffer.
    pub websocket: tungstenite::protocol::WebSocketConfig,
    /// Every running session, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Renders `/metrics`; absent when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// Authentication, origin and limit checks for handshakes.
    pub gate: Arc<Gate>,
    /// The server API (`/api/`).
    pub api: Arc<api::Api>,
    /// Signs reconnect tokens and SSE session tokens.
    pub signer: Signer,
    /// This node's SSE sessions, and the way to every other node's.
    pub relay: Arc<Relay>,
    /// Largest body a `POST /sse/send` may have.
    pub max_post_bytes: usize,
    /// The node's byte counters and backlog gauge, shared by every connection.
    pub meters: Arc<TransportMeters>,
}

/// The router of a node's public listener: the chat endpoints, the demo page, health and
/// readiness, and the internal routes too unless `internal_apart` (they have a listener of
/// their own).
pub fn router(state: Arc<AppState>, internal_apart: bool) -> Router {
    let public = Router::new()
        .route("/", any(index))
        .route("/ws", any(websocket_endpoint))
        .route("/chat-client.js", get(client_library))
        .route("/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
        .route("/sse", get(sse::open))
        .route(
            "/sse/send",
            post(sse::send).layer(DefaultBodyLimit::max(state.max_post_bytes)),
        )
        .merge(probes());
    let public = if internal_apart {
        public
    } else {
        public.merge(internal_routes(&state))
    };
    public.with_state(state)
}

/// The router of a node's internal listener: the internal routes, health and readiness.
pub fn internal_router(state: Arc<AppState>) -> Router {
    internal_routes(&state).merge(probes()).with_state(state)
}

/// What operators and the application's backend use, never the public.
fn internal_routes(state: &AppState) -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(render_metrics))
        .nest("/api", api::router(state.api.clone()))
}

/// Liveness and readiness, on every listener: probes may use either.
fn probes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

/// Query parameters of the WebSocket handshake.
#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    room: Option<String>,
    name: Option<String>,
    /// Resume the default room after this offset.
    since: Option<String>,
    /// The epoch `since` belongs to.
    epoch: Option<String>,
    /// Receive presence events for the default room.
    presence: Option<bool>,
    /// Anonymous mode: a reconnect token from an earlier welcome, to keep its `userId`.
    reconnect: Option<String>,
}

async fn index(
    state: State<Arc<AppState>>,
    method: Method,
    params: Query<ConnectParams>,
    handshake: Handshake,
    upgrade: Result<WebSocketRequest, UpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(upgrade) => accept(&state, params.0, &handshake, upgrade),
        Err(_) if method == Method::GET || method == Method::HEAD => {
            Html(DEMO_PAGE).into_response()
        }
        Err(_) => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

async fn client_library() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Revalidated on every load: a page must never pair with the library of an older build.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_LIBRARY,
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        FAVICON,
    )
        .into_response()
}

async fn websocket_endpoint(
    state: State<Arc<AppState>>,
    params: Query<ConnectParams>,
    handshake: Handshake,
    upgrade: Result<WebSocketRequest, UpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(upgrade) => accept(&state, params.0, &handshake, upgrade),
        Err(rejection) => rejection.into_response(),
    }
}

/// Validates the handshake and hands the upgraded socket to a new session.
fn accept(
    state: &Arc<AppState>,
    params: ConnectParams,
    handshake: &Handshake,
    upgrade: WebSocketRequest,
) -> Response {
    let (identity, guard) = match admit(state, handshake)
        .and_then(|admission| connect(state, params, admission, TransportKind::WebSocket))
    {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let node = state.node.clone();
    let config = state.websocket;
    let sessions = state.sessions.clone();
    let meters = state.meters.clone();
    let protocol = upgrade.offers_protocol(SUBPROTOCOL).then_some(SUBPROTOCOL);
    upgrade.accept(protocol, move |socket, pipelined| {
        sessions.track_future(
            websocket::serve(socket, pipelined, config, identity, node, guard, meters)
                .in_current_span(),
        )
    })
}

/// Why a new connection was turned away, whatever its transport.
enum NotAdmitted {
    /// The node is shutting down (503).
    ShuttingDown,
    /// The node's broker is unavailable (503).
    NotReady,
    /// The gate said no (429, 503, 403, 401).
    Gate(Refused),
    /// A parameter is invalid (400).
    Invalid(String),
}

impl IntoResponse for NotAdmitted {
    fn into_response(self) -> Response {
        match self {
            NotAdmitted::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "node is shutting down",
            )
                .into_response(),
            // fred's reconnect backoff tops out at 5s.
            NotAdmitted::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "node is not ready: the broker is unavailable",
            )
                .into_response(),
            NotAdmitted::Gate(refused) => refused.into_response(),
            NotAdmitted::Invalid(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
        }
    }
}

/// The gate's checks every new connection passes first, whatever its transport: the node is
/// not shutting down, and the client's address, the node's capacity, the origin and the token
/// allow it.
///
/// A node that is not ready refuses before upgrading (or opening the stream), so a load
/// balancer can still pass the request to another node (nginx: `proxy_next_upstream
/// http_503`); once upgraded, the client's only way to another node is to reconnect.
fn admit(state: &AppState, handshake: &Handshake) -> Result<Admission, NotAdmitted> {
    let shutting_down = state.node.shutdown.is_cancelled();
    if shutting_down || !state.node.hub.is_ready() {
        crate::metrics::handshake_unavailable(shutting_down);
        return Err(if shutting_down {
            NotAdmitted::ShuttingDown
        } else {
            NotAdmitted::NotReady
        });
    }
    state.gate.admit(handshake).map_err(NotAdmitted::Gate)
}

/// An admitted connection's identity (from its parameters) and its guard (from its token).
fn connect(
    state: &AppState,
    params: ConnectParams,
    admission: Admission,
    transport: TransportKind,
) -> Result<(Identity, ConnectionGuard), NotAdmitted> {
    let identity = identity(params, admission.user_id(), &state.signer, transport)
        .map_err(NotAdmitted::Invalid)?;
    let guard = state
        .gate
        .guard(admission, &identity.user_id, &identity.default_room)
        .map_err(NotAdmitted::Gate)?;
    Ok((identity, guard))
}

/// The connection's identity: the token's subject when authenticated; in anonymous mode the
/// `userId` a valid reconnect token names, else a fresh id.
fn identity(
    params: ConnectParams,
    user_id: Option<&str>,
    signer: &Signer,
    transport: TransportKind,
) -> Result<Identity, String> {
    let default_room = RoomName::parse(params.room.as_deref().unwrap_or(DEFAULT_ROOM))
        .map_err(|refusal| format!("invalid room: {}", refusal.reason))?;
    if let Some(name) = &params.name {
        validate_display_name(name)
            .map_err(|refusal| format!("invalid name: {}", refusal.reason))?;
    }
    let anonymous = user_id.is_none();
    let user_id = match user_id {
        Some(user_id) => user_id.to_owned(),
        // A token this deployment did not sign (another deployment's, an old secret's) is no
        // reason to refuse a client that may connect anyway: it gets a fresh id.
        None => params
            .reconnect
            .as_deref()
            .and_then(|token| signer.verify_reconnect(token))
            .unwrap_or_else(|| {
                let random = uuid::Uuid::new_v4().simple().to_string();
                format!("u-{}", &random[..12])
            }),
    };
    let replay = match params.since.as_deref().map(Offset::parse) {
        None => Replay::None,
        Some(Some(offset)) => Replay::Since {
            offset,
            epoch: params.epoch,
        },
        Some(None) => {
            return Err("invalid since: expected an offset such as 1732532000123-0".into());
        }
    };
    Ok(Identity {
        reconnect_token: anonymous.then(|| signer.reconnect_token(&user_id)),
        user_id,
        name: params.name,
        default_room,
        default_options: JoinOptions {
            replay,
            presence: params.presence.unwrap_or(false),
        },
        transport,
    })
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.node.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.node.hub.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable").into_response()
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    crate::metrics::collect_process();
    // Read at scrape time, so the gauges never disagree with `/readyz`.
    let broker_ready = state.node.hub.is_ready();
    crate::metrics::set_ready(broker_ready && !state.node.shutdown.is_cancelled());
    if state.node.hub.broker_kind() == "redis" {
        crate::metrics::set_redis_connected(broker_ready);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
