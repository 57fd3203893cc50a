//! The HTTP surface of a node: the WebSocket endpoint (`/`, `/ws`), the demo page with the
//! client library it runs on and its icon, health, readiness and metrics. Owns routing and handshake validation up to the upgrade; knows
//! nothing of frame formats. The server API (`/api/`) is a router of its own, [`api`].

pub mod api;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::connection::{Identity, NodeContext};
use crate::protocol::{JoinOptions, Offset, Replay, RoomName, validate_display_name};
use crate::security::gate::{Gate, Handshake};
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
}

/// The router of a node.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", any(index))
        .route("/ws", any(websocket_endpoint))
        .route("/chat-client.js", get(client_library))
        .route("/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .nest("/api", api::router(state.api.clone()))
        .with_state(state)
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
    if state.node.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "node is shutting down",
        )
            .into_response();
    }
    let admission = match state.gate.admit(handshake) {
        Ok(admission) => admission,
        Err(refusal) => return refusal.into_response(),
    };
    let identity = match identity(params, admission.user_id()) {
        Ok(identity) => identity,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let guard = match state
        .gate
        .guard(admission, &identity.user_id, &identity.default_room)
    {
        Ok(guard) => guard,
        Err(refusal) => return refusal.into_response(),
    };
    let node = state.node.clone();
    let config = state.websocket;
    let sessions = state.sessions.clone();
    let protocol = upgrade.offers_protocol(SUBPROTOCOL).then_some(SUBPROTOCOL);
    upgrade.accept(protocol, move |socket, pipelined| {
        sessions.track_future(
            websocket::serve(socket, pipelined, config, identity, node, guard).in_current_span(),
        )
    })
}

/// The connection's identity: the token's subject when authenticated, else a fresh id.
fn identity(params: ConnectParams, user_id: Option<&str>) -> Result<Identity, String> {
    let default_room = RoomName::parse(params.room.as_deref().unwrap_or(DEFAULT_ROOM))
        .map_err(|refusal| format!("invalid room: {}", refusal.reason))?;
    if let Some(name) = &params.name {
        validate_display_name(name)
            .map_err(|refusal| format!("invalid name: {}", refusal.reason))?;
    }
    let user_id = user_id.map(str::to_owned).unwrap_or_else(|| {
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("u-{}", &random[..12])
    });
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
        user_id,
        name: params.name,
        default_room,
        default_options: JoinOptions {
            replay,
            presence: params.presence.unwrap_or(false),
        },
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
