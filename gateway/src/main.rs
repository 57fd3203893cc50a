//! `chat-gateway`: runs one gateway node. Configuration errors and start-up failures end here.

use anyhow::Context;
use clap::Parser;
use gateway::config::{Config, LogFormat};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate()?;
    let node_id = config.node_id();
    init_tracing(config.log_format);
    let metrics = gateway::metrics::install(&node_id).context("installing the metrics recorder")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let span = tracing::info_span!("node", id = %node_id);
    runtime.block_on(gateway::server::run(config, node_id, Some(metrics)).instrument(span))?;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
