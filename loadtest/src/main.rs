//! `chat-loadgen`: load generator for the chat gateway and its reference peers. See
//! `loadtest/README.md` for how the scenarios are run against a cluster.

mod cli;
mod client;
mod fastjson;
mod payload;
mod progress;
mod protocol;
mod report;
mod scenarios;
mod socketio;
mod stats;
mod sys;
mod ws;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Scenario};

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Idle runs split themselves over worker processes when they do not fit.
    let wanted = match &cli.scenario {
        Scenario::Fanout(a) => a.clients,
        Scenario::Idle(_) => 0,
        Scenario::Storm(a) => a.layout.connections,
        Scenario::Api(a) => a.members + a.callers,
        Scenario::Sse(a) => a.idle + 3,
    } as u64;
    match sys::raise_nofile_limit() {
        Ok(limit) if limit < wanted + 64 => eprintln!(
            "warning: open-file limit {limit} is below the {wanted} connections asked for"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot raise the open-file limit: {e:#}"),
    }

    let runtime = match cli.threads {
        0 => anyhow::bail!("--threads must be at least 1"),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(async {
        let scenario = async {
            match cli.scenario {
                Scenario::Fanout(a) => scenarios::fanout::run(a).await,
                Scenario::Idle(a) => scenarios::idle::run(a).await,
                Scenario::Storm(a) => scenarios::storm::run(a).await,
                Scenario::Api(a) => scenarios::api::run(a).await,
                Scenario::Sse(a) => scenarios::sse::run(a).await,
            }
        };
        tokio::select! {
            r = scenario => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted");
                std::process::exit(130);
            }
        }
    })
}
