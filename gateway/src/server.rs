//! A node's lifecycle: start the hub and the gate, serve the HTTP surface on bound listeners
//! (the public one, and the internal one when there is one) until told to stop, then drain: stop accepting, report not ready, close every connection
//! with the close it was told to send, wait for them within the grace period, close the
//! broker. Signals are the binary's business: tests drive the same `run` in-process.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::BrokerError;
use crate::config::Config;
use crate::connection::NodeContext;
use crate::http::AppState;
use crate::http::api::Api;
use crate::protocol::close::Disconnect;
use crate::rooms::hub::Hub;
use crate::security::gate::{Gate, SecurityError};
use crate::transport::sse::Relay;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The broker could not be set up (for example an invalid Redis URL).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The configuration cannot work (for example an unreadable password file).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Authentication or limits are misconfigured (for example an unreadable key file).
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Serve(std::io::Error),
}

/// The sockets a node serves, bound by the caller.
pub struct Listeners {
    /// Clients: the WebSocket endpoint, the demo page, health and readiness.
    pub public: TcpListener,
    /// Metrics and the server API, apart from clients (`--internal-listen`); without it they
    /// are served on `public`.
    pub internal: Option<TcpListener>,
}

/// Runs a node on `listeners` until `stop` resolves with the close to send every client (1012
/// for a restart, 1001 for going away), then shuts it down gracefully.
pub async fn run(
    config: Config,
    node_id: String,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    stop: impl Future<Output = Disconnect>,
) -> Result<(), ServerError> {
    let api_settings = config.api()?;
    let signer = config.signer()?;
    let hub = Hub::start(config.hub_settings(), config.redis(&node_id)?.as_ref())?;
    let shutdown = CancellationToken::new();
    let shutdown_reason = Arc::new(OnceLock::new());
    let gate = Arc::new(Gate::new(&config.security)?);
    gate.log_settings(&config.security);
    gate.spawn_upkeep(shutdown.clone());
    let node_id: Arc<str> = node_id.into();
    let relay = Relay::start(node_id.clone(), signer.clone(), hub.clone());
    let node = Arc::new(NodeContext {
        hub: hub.clone(),
        node_id,
        limits: config.connection_limits(),
        shutdown: shutdown.clone(),
        shutdown_reason: shutdown_reason.clone(),
    });
    let api = Api::new(api_settings, node.clone());
    api.log_settings();
    let state = Arc::new(AppState {
        node,
        websocket: config.websocket(),
        sessions: TaskTracker::new(),
        metrics: metrics.clone(),
        gate,
        meters: Arc::new(crate::metrics::TransportMeters::new()),
        api,
        signer,
        relay,
        // A POST carries frames a WebSocket would send one by one, each up to this size.
        max_post_bytes: config.max_frame_bytes as usize * 2,
    });
    if let Some(handle) = metrics {
        tokio::spawn(upkeep(handle, shutdown.clone()));
    }
    let address = listeners.public.local_addr().map_err(ServerError::Serve)?;
    let internal = match &listeners.internal {
        Some(listener) => Some(listener.local_addr().map_err(ServerError::Serve)?),
        None => None,
    };
    tracing::info!(
        listen = %address,
        internal = internal.map_or_else(|| "same as listen".to_owned(), |a| a.to_string()),
        broker = hub.broker_kind(),
        "chat gateway listening"
    );

    let handshake_timeout = config.security.limits.handshake_timeout;
    let public = crate::transport::listener::serve(
        listeners.public,
        crate::http::router(state.clone(), listeners.internal.is_some()),
        handshake_timeout,
        shutdown.clone(),
    );
    let internal = listeners.internal.map(|listener| {
        crate::transport::listener::serve(
            listener,
            crate::http::internal_router(state.clone()),
            handshake_timeout,
            shutdown.clone(),
        )
    });
    let server = tokio::spawn(
        async move {
            match internal {
                Some(internal) => tokio::try_join!(public, internal).map(|_| ()),
                None => public.await,
            }
        }
        .in_current_span(),
    );

    let reason = stop.await;
    tracing::info!(close = %reason, "shutting down: closing connections");
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
