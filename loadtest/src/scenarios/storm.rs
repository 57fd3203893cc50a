//! Connection storm: open N connections as fast as `--connect-concurrency` handshakes in flight
//! allow and report accepted (ready) connections per second, failures by cause and setup
//! latency; then optionally hold them, and close them all.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::watch;

use super::{ConnectProgress, connect_all, hold_all, join_held, layout, target_from};
use crate::cli::StormArgs;
use crate::progress;
use crate::report::{self, StormReport};
use crate::stats::Tally;
use crate::sys;

pub async fn run(args: StormArgs) -> Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let target = target_from(&args.target).await?;
    let specs = layout(
        0..args.connections,
        args.rooms,
        target.urls.len(),
        &args.target.room_prefix,
    );
    let before = sys::snapshot(&args.output.pids);
    let connect_progress = Arc::new(ConnectProgress::default());
    let guard = {
        let p = connect_progress.clone();
        progress::spawn(args.output.quiet, move |t| Some(p.line("storm", t)))
    };
    let (sessions, connect, _) = connect_all(
        target.clone(),
        specs,
        args.target.connect_concurrency,
        args.target.connect_rate,
        connect_progress,
    )
    .await;
    drop(guard);
    let after = sys::snapshot(&args.output.pids);

    let disconnects = Arc::new(Tally::default());
    let (stop, stop_rx) = watch::channel(false);
    let held = hold_all(sessions, stop_rx, disconnects.clone());
    tokio::time::sleep(args.hold).await;
    let _ = stop.send(true);
    join_held(held, Duration::from_secs(10)).await;

    let report = StormReport {
        scenario: "storm",
        protocol: target.protocol,
        urls: target.urls.iter().map(|u| u.to_string()).collect(),
        connections: args.connections as u64,
        concurrency: args.target.connect_concurrency as u64,
        accepted_per_s: connect.connected_per_s,
        connect,
        disconnects: disconnects.snapshot(),
        processes: before.usage_until(&after, &args.output.pids),
        loadgen_cpu_s: before.self_cpu_until(&after),
    };
    report::emit(&report, args.output.json, StormReport::human);
    Ok(())
}
