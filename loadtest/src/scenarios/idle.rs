//! Idle connections: open N connections (optionally ramped with `--connect-rate`), let the
//! servers settle, hold them while only heartbeats flow, and report memory per connection of
//! every `--pid` process (RSS after settling minus RSS before connecting, divided by the
//! connections that succeeded) plus the CPU spent connecting and holding.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, bail};
use tokio::sync::watch;

use super::{ConnectProgress, connect_all, hold_all, join_held, layout, target_from};
use crate::cli::IdleArgs;
use crate::progress;
use crate::report::{self, IdleReport, RssPerConnection};
use crate::stats::Tally;
use crate::sys::{self, ProcUsage};

/// RSS growth per connection of each watched process. A process labelled with a node name
/// from the `userId` frames is divided by that node's connections, any other by all of them;
/// with several processes an `all` entry divides their summed growth by all connections.
fn per_connection(
    usage: &[ProcUsage],
    connected: u64,
    nodes: &BTreeMap<String, u64>,
) -> Vec<RssPerConnection> {
    let per = |before: u64, after: u64, n: u64| {
        if n == 0 {
            0.0
        } else {
            ((after as f64 - before as f64) * 1024.0 / n as f64).round()
        }
    };
    let mut out: Vec<RssPerConnection> = usage
        .iter()
        .map(|u| {
            let n = nodes.get(&u.label).copied().unwrap_or(connected);
            RssPerConnection {
                label: u.label.clone(),
                connections: n,
                rss_kib_before: u.rss_kib_before,
                rss_kib_after: u.rss_kib_after,
                bytes_per_connection: per(u.rss_kib_before, u.rss_kib_after, n),
            }
        })
        .collect();
    if usage.len() > 1 {
        let before = usage.iter().map(|u| u.rss_kib_before).sum();
        let after = usage.iter().map(|u| u.rss_kib_after).sum();
        out.push(RssPerConnection {
            label: "all".into(),
            connections: connected,
            rss_kib_before: before,
            rss_kib_after: after,
            bytes_per_connection: per(before, after, connected),
        });
    }
    out
}

pub async fn run(args: IdleArgs) -> Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let target = target_from(&args.target).await?;
    let specs = layout(
        args.connections,
        args.rooms,
        target.urls.len(),
        &args.target.room_prefix,
    );
    let before = sys::snapshot(&args.output.pids);

    let connect_progress = Arc::new(ConnectProgress::default());
    let guard = {
        let p = connect_progress.clone();
        progress::spawn(args.output.quiet, move |t| Some(p.line("idle connect", t)))
    };
    let (sessions, connect) = connect_all(
        target.clone(),
        specs,
        args.target.connect_concurrency,
        args.target.connect_rate,
        connect_progress,
    )
    .await;
    drop(guard);
    let connected = sessions.len() as u64;

    let disconnects = Arc::new(Tally::default());
    let (stop, stop_rx) = watch::channel(false);
    let held = hold_all(sessions, stop_rx, disconnects.clone());

    let guard = {
        let d = disconnects.clone();
        progress::spawn(args.output.quiet, move |t| {
            Some(format!(
                "[idle hold {:>5.1}s] open={} closed={}",
                t.as_secs_f64(),
                connected - d.total().min(connected),
                d.total()
            ))
        })
    };
    tokio::time::sleep(args.settle).await;
    let settled = sys::snapshot(&args.output.pids);
    tokio::time::sleep(args.hold).await;
    let held_snapshot = sys::snapshot(&args.output.pids);
    drop(guard);

    let open_at_end = connected - disconnects.total().min(connected);
    let _ = stop.send(true);
    join_held(held, std::time::Duration::from_secs(10)).await;

    let connect_usage = before.usage_until(&settled, &args.output.pids);
    let self_rss = settled.self_rss_kib();
    let rss_per_connection = per_connection(&connect_usage, connected, &connect.nodes);
    let report = IdleReport {
        scenario: "idle",
        protocol: target.protocol,
        urls: target.urls.iter().map(|u| u.to_string()).collect(),
        connections: args.connections as u64,
        rooms: args.rooms as u64,
        connect,
        settle_s: args.settle.as_secs_f64(),
        hold_s: args.hold.as_secs_f64(),
        open_at_end,
        disconnects: disconnects.snapshot(),
        rss_per_connection,
        processes_connect: connect_usage,
        processes_hold: settled.usage_until(&held_snapshot, &args.output.pids),
        loadgen_cpu_s: before.self_cpu_until(&held_snapshot),
        loadgen_rss_kib: self_rss,
        loadgen_bytes_per_connection: if connected == 0 {
            0.0
        } else {
            ((self_rss.saturating_sub(before.self_rss_kib())) as f64 * 1024.0 / connected as f64)
                .round()
        },
    };
    report::emit(&report, args.output.json, IdleReport::human);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_per_connection_includes_a_sum_over_processes() {
        let usage = vec![
            ProcUsage {
                label: "a".into(),
                pid: 1,
                cpu_seconds: 0.0,
                rss_kib_before: 10_000,
                rss_kib_after: 30_000,
            },
            ProcUsage {
                label: "b".into(),
                pid: 2,
                cpu_seconds: 0.0,
                rss_kib_before: 10_000,
                rss_kib_after: 10_000,
            },
        ];
        let nodes = BTreeMap::new();
        let r = per_connection(&usage, 1024, &nodes);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].bytes_per_connection, 20_000.0);
        assert_eq!(r[1].bytes_per_connection, 0.0);
        assert_eq!(r[2].label, "all");
        assert_eq!(r[2].bytes_per_connection, 20_000.0);
        assert_eq!(
            per_connection(&usage[..1], 0, &nodes)[0].bytes_per_connection,
            0.0
        );
        // Labels that name a node are divided by that node's connections.
        let nodes = BTreeMap::from([("a".to_string(), 512), ("b".to_string(), 512)]);
        let r = per_connection(&usage, 1024, &nodes);
        assert_eq!(
            (r[0].connections, r[0].bytes_per_connection),
            (512, 40_000.0)
        );
        assert_eq!(
            (r[2].connections, r[2].bytes_per_connection),
            (1024, 20_000.0)
        );
    }
}
