//! HTTP surface of a node: the WebSocket endpoint, the demo page, health, readiness and
//! metrics, and the node's lifecycle from bind to graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::BrokerError;
use crate::config::Config;
use crate::connection::{Identity, SessionContext};
use crate::gate::{Gate, Handshake, SecurityError};
use crate::hub::Hub;
use crate::protocol::{JoinOptions, Offset, Replay, RoomName, validate_display_name};
use crate::session::{self, GOING_AWAY, SERVICE_RESTART};
use crate::upgrade::{UpgradeRejection, WebSocketRequest};

/// The demo chat page, embedded in the binary.
const DEMO_PAGE: &str = include_str!("../static/index.html");

/// The subprotocol a client may ask for; echoed when offered.
const SUBPROTOCOL: &str = "chat.v1";

/// The room a connection joins when it names none.
const DEFAULT_ROOM: &str = "lobby";

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// What every session needs.
    pub session: Arc<SessionContext>,
    /// Every running session, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Renders `/metrics`; absent when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
    /// Authentication, origin and limit checks for handshakes.
    pub gate: Arc<Gate>,
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The broker could not be set up (for example an invalid Redis URL).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Authentication or limits are misconfigured (for example an unreadable key file).
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Serve(std::io::Error),
}

/// The router of a node.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", any(index))
        .route("/ws", any(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
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

async fn websocket(
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
    if state.session.shutdown.is_cancelled() {
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
    let context = state.session.clone();
    let sessions = state.sessions.clone();
    let protocol = upgrade.offers_protocol(SUBPROTOCOL).then_some(SUBPROTOCOL);
    upgrade.accept(protocol, move |socket, pipelined| {
        sessions.track_future(
            session::serve(socket, pipelined, identity, context, guard).in_current_span(),
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
    if state.session.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.session.hub.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable").into_response()
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    // Refreshes the Redis gauge at scrape time.
    state.session.hub.is_ready();
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down gracefully.
pub async fn run(
    config: Config,
    node_id: String,
    metrics: Option<PrometheusHandle>,
) -> Result<(), ServerError> {
    let hub = Hub::start(config.hub_settings(), config.redis(&node_id).as_ref())?;
    let listener = crate::listener::bind(config.listen).map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let shutdown = CancellationToken::new();
    let shutdown_reason = Arc::new(OnceLock::new());
    let gate = Arc::new(Gate::new(&config.security)?);
    gate.log_settings(&config.security);
    gate.spawn_upkeep(shutdown.clone());
    let state = Arc::new(AppState {
        session: Arc::new(SessionContext {
            hub: hub.clone(),
            node_id: node_id.into(),
            limits: config.session_limits(),
            shutdown: shutdown.clone(),
            shutdown_reason: shutdown_reason.clone(),
            socket: config.websocket(),
        }),
        sessions: TaskTracker::new(),
        metrics: metrics.clone(),
        gate,
    });
    if let Some(handle) = metrics {
        tokio::spawn(upkeep(handle, shutdown.clone()));
    }
    tracing::info!(listen = %config.listen, broker = hub.broker_kind(), "chat gateway listening");

    let server = crate::listener::serve(
        listener,
        router(state.clone()),
        config.security.limits.handshake_timeout,
        shutdown.clone(),
    );
    let server = tokio::spawn(server.in_current_span());

    let signal = wait_for_signal().await;
    tracing::info!(signal, "shutting down: closing connections");
    // SIGTERM is what orchestrators send in a rolling restart: tell clients to reconnect and
    // resume elsewhere (1012). Anything else is a plain going away (1001).
    let reason = if signal == "SIGTERM" {
        SERVICE_RESTART
    } else {
        GOING_AWAY
    };
    let _ = shutdown_reason.set(reason);
    shutdown.cancel();
    state.sessions.close();
    let grace = config.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = state.sessions.len(),
            "connections still open after the shutdown grace period"
        );
    }
    hub.close().await;
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(Ok(Err(error))) => Err(ServerError::Serve(error)),
        _ => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Keeps histogram buckets from growing without bound, as the exporter requires.
async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Resolves on SIGTERM or SIGINT, with the signal's name.
async fn wait_for_signal() -> &'static str {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => "SIGTERM",
        result = tokio::signal::ctrl_c() => {
            if let Err(error) = result {
                tracing::error!(%error, "cannot listen for SIGINT");
            }
            "SIGINT"
        }
    }
}
