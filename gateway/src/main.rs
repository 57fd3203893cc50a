//! `chat-gateway`: runs one gateway node. Configuration errors and start-up failures end here.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use gateway::config::{Config, LogFormat};
use gateway::protocol::close::Disconnect;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate()?;
    let node_id = config.node_id();
    init_tracing(config.log_format);
    let metrics = gateway::metrics::install(&node_id).context("installing the metrics recorder")?;
    count_panics();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let span = tracing::info_span!("node", id = %node_id);
    runtime.block_on(
        async {
            let bind = |address| {
                gateway::transport::listener::bind(address)
                    .with_context(|| format!("cannot listen on {address}"))
            };
            let listeners = gateway::server::Listeners {
                public: bind(config.listen)?,
                internal: config.internal_listen.map(bind).transpose()?,
            };
            gateway::server::run(config, node_id, listeners, Some(metrics), signal()).await?;
            anyhow::Ok(())
        }
        .instrument(span),
    )
}

/// Resolves on SIGTERM or SIGINT with the close clients get. SIGTERM is what orchestrators
/// send in a rolling restart: clients reconnect and resume elsewhere (1012). SIGINT (Ctrl-C)
/// is a plain going away (1001).
async fn signal() -> Disconnect {
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
        () = terminate => Disconnect::ServiceRestart,
        result = tokio::signal::ctrl_c() => {
            if let Err(error) = result {
                tracing::error!(%error, "cannot listen for SIGINT");
            }
            Disconnect::GoingAway
        }
    }
}

/// Logs and counts every panic. The runtime contains a panicking task (for a connection, that
/// connection ends), so without this a bug would show only as a client that was dropped.
fn count_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        gateway::metrics::panicked();
        tracing::error!(%info, "panic");
        default_hook(info);
    }));
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in files or log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
