//! Connection storm: open N connections as fast as `--connect-concurrency` handshakes in flight
//! allow and report accepted (ready) connections per second, failures by cause and setup
//! latency; then optionally hold them, and close them all.

use anyhow::{Result, bail};

use super::{Held, connect_clients, target_from};
use crate::cli::StormArgs;
use crate::report::{self, StormReport};
use crate::sys;

/// Run the storm scenario and print its report.
pub async fn run(args: StormArgs) -> Result<()> {
    if args.layout.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let target = target_from(&args.target).await?;
    let before = sys::snapshot(&args.output.pids);
    let (sessions, connect, _) = connect_clients(
        &target,
        &args.target,
        0..args.layout.connections,
        args.layout.rooms,
        "storm".into(),
        args.output.quiet,
    )
    .await;
    let after = sys::snapshot(&args.output.pids);

    let held = Held::start(sessions);
    tokio::time::sleep(args.hold).await;
    let disconnects = held.release().await;

    let report = StormReport {
        scenario: "storm",
        protocol: target.protocol,
        urls: target.urls.iter().map(|u| u.to_string()).collect(),
        connections: args.layout.connections as u64,
        concurrency: args.target.connect_concurrency as u64,
        accepted_per_s: connect.connected_per_s,
        connect,
        disconnects,
        processes: before.usage_until(&after, &args.output.pids),
        loadgen_cpu_s: before.self_cpu_until(&after),
    };
    report::emit(&report, args.output.json, StormReport::human);
    Ok(())
}
