//! A node's lifecycle: start the hub and the gate, serve the HTTP surface on a bound listener
//! until told to stop, then drain: stop accepting, report not ready, close every connection
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

/// Runs a node on `listener` until `stop` resolves with the close to send every client (1012
/// for a restart, 1001 for going away), then shuts it down gracefully.
pub async fn run(
    config: Config,
    node_id: String,
    listener: TcpListener,
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
        api,
        signer,
        relay,
        // A POST carries frames a WebSocket would send one by one, each up to this size.
        max_post_bytes: config.max_frame_bytes as usize * 2,
    });
    if let Some(handle) = metrics {
        tokio::spawn(upkeep(handle, shutdown.clone()));
    }
    let address = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(listen = %address, broker = hub.broker_kind(), "chat gateway listening");

    let server = crate::transport::listener::serve(
        listener,
        crate::http::router(state.clone()),
        config.security.limits.handshake_timeout,
        shutdown.clone(),
    );
    let server = tokio::spawn(server.in_current_span());

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
