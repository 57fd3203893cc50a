//! Idle connections: open N connections (optionally ramped with `--connect-rate`), let the
//! servers settle, hold them while only heartbeats flow, and report memory per connection of
//! every `--pid` process (RSS after settling minus RSS before connecting, divided by the
//! connections that succeeded) plus the CPU spent connecting and holding.
//!
//! One process can hold only as many sockets as its open-file limit allows, and that limit
//! cannot always be raised. When N does not fit, the connections are split over worker
//! processes (this same binary with the hidden `--worker` flag): each opens its slice of the
//! client layout, reports one JSON line on stdout when connected, holds until its stdin closes,
//! then reports a second line and exits. The coordinating process reads memory and CPU and
//! merges the workers' reports into one.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::{Held, connect_clients, connect_report, target_from};
use crate::cli::IdleArgs;
use crate::progress;
use crate::report::{self, ConnectReport, IdleReport, RssPerConnection};
use crate::stats::new_histogram;
use crate::sys::{self, ProcUsage, Snapshot, round3};

/// Descriptors each process keeps free for everything besides client sockets (`/proc` reads,
/// the runtime, stdio).
const FD_RESERVE: u64 = 256;

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

/// Slice `w` of `n` clients over `workers`: (first index, count).
fn share(n: usize, workers: usize, w: usize) -> (usize, usize) {
    let base = n / workers;
    let extra = n % workers;
    (w * base + w.min(extra), base + usize::from(w < extra))
}

pub async fn run(args: IdleArgs) -> Result<()> {
    if args.layout.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.worker {
        return run_worker(args).await;
    }
    let per_process = sys::nofile_limit().saturating_sub(FD_RESERVE).max(1) as usize;
    let workers = match args.workers {
        0 => args.layout.connections.div_ceil(per_process),
        w => w,
    };
    if workers <= 1 {
        run_local(args).await
    } else {
        run_workers(args, workers).await
    }
}

/// Everything measured, ready to become the report.
struct Measured {
    connect: ConnectReport,
    open_at_end: u64,
    disconnects: BTreeMap<String, u64>,
    before: Snapshot,
    settled: Snapshot,
    held: Snapshot,
    loadgen_cpu_s: f64,
    loadgen_rss_kib: u64,
}

fn emit_report(
    args: &IdleArgs,
    protocol: crate::protocol::Protocol,
    urls: Vec<String>,
    m: Measured,
) {
    let connected = m.connect.connected;
    let connect_usage = m.before.usage_until(&m.settled, &args.output.pids);
    let rss_per_connection = per_connection(&connect_usage, connected, &m.connect.nodes);
    let report = IdleReport {
        scenario: "idle",
        protocol,
        urls,
        connections: args.layout.connections as u64,
        rooms: args.layout.rooms as u64,
        connect: m.connect,
        settle_s: args.settle.as_secs_f64(),
        hold_s: args.hold.as_secs_f64(),
        open_at_end: m.open_at_end,
        disconnects: m.disconnects,
        rss_per_connection,
        processes_connect: connect_usage,
        processes_hold: m.settled.usage_until(&m.held, &args.output.pids),
        loadgen_cpu_s: round3(m.loadgen_cpu_s),
        loadgen_rss_kib: m.loadgen_rss_kib,
        loadgen_bytes_per_connection: if connected == 0 {
            0.0
        } else {
            (m.loadgen_rss_kib.saturating_sub(m.before.self_rss_kib()) as f64 * 1024.0
                / connected as f64)
                .round()
        },
    };
    report::emit(&report, args.output.json, IdleReport::human);
}

/// Waits `--settle`, reads the watched processes, holds for `--hold` and reads them again:
/// the readings memory and idle CPU are measured between.
async fn settle_and_hold(args: &IdleArgs) -> (Snapshot, Snapshot) {
    tokio::time::sleep(args.settle).await;
    let settled = sys::snapshot(&args.output.pids);
    tokio::time::sleep(args.hold).await;
    (settled, sys::snapshot(&args.output.pids))
}

/// All connections in this process.
async fn run_local(args: IdleArgs) -> Result<()> {
    let target = target_from(&args.target).await?;
    let before = sys::snapshot(&args.output.pids);

    let (sessions, connect, _) = connect_clients(
        &target,
        &args.target,
        0..args.layout.connections,
        args.layout.rooms,
        "idle connect".into(),
        args.output.quiet,
    )
    .await;
    let connected = sessions.len() as u64;

    let held = Held::start(sessions);
    let disconnects = held.disconnects.clone();

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
    let (settled, held_snapshot) = settle_and_hold(&args).await;
    drop(guard);

    let open_at_end = connected - disconnects.total().min(connected);
    let disconnects = held.release().await;

    let measured = Measured {
        connect,
        open_at_end,
        disconnects,
        loadgen_cpu_s: before.self_cpu_until(&held_snapshot),
        loadgen_rss_kib: settled.self_rss_kib(),
        before,
        settled,
        held: held_snapshot,
    };
    emit_report(
        &args,
        target.protocol,
        target.urls.iter().map(|u| u.to_string()).collect(),
        measured,
    );
    Ok(())
}

/// A worker's first line: its connections are open.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerConnected {
    connect: ConnectReport,
    /// Setup latency histogram as (value µs, count) pairs, to merge exactly.
    setup_histogram: Vec<(u64, u64)>,
    rss_kib: u64,
}

/// A worker's last line: its connections are closed.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerDone {
    open_at_end: u64,
    disconnects: BTreeMap<String, u64>,
    cpu_s: f64,
}

fn print_line<T: Serialize>(value: &T) -> Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(value)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// One worker: connect a slice, report, hold until stdin closes, close, report.
async fn run_worker(args: IdleArgs) -> Result<()> {
    let target = target_from(&args.target).await?;
    let first = args.index_offset;
    let (sessions, connect, setup) = connect_clients(
        &target,
        &args.target,
        first..first + args.layout.connections,
        args.layout.rooms,
        format!("idle connect worker@{first}"),
        args.output.quiet,
    )
    .await;
    let connected = sessions.len() as u64;
    print_line(&WorkerConnected {
        connect,
        setup_histogram: setup
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
        rss_kib: sys::snapshot(&[]).self_rss_kib(),
    })?;

    let held = Held::start(sessions);

    // Hold until the coordinator closes our stdin (or goes away).
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }

    let open_at_end = connected - held.disconnects.total().min(connected);
    let disconnects = held.release().await;
    print_line(&WorkerDone {
        open_at_end,
        disconnects,
        cpu_s: sys::self_cpu_seconds(),
    })
}

/// Command line of worker `w`: the same target with its share of connections, concurrency and
/// rate.
fn worker_args(args: &IdleArgs, workers: usize, w: usize) -> Vec<String> {
    let t = &args.target;
    let (first, count) = share(args.layout.connections, workers, w);
    let mut a: Vec<String> = vec![
        "idle".into(),
        "--worker".into(),
        format!("--index-offset={first}"),
        format!("--connections={count}"),
        format!("--rooms={}", args.layout.rooms),
        format!("--url={}", t.urls.join(",")),
        format!("--protocol={}", t.protocol),
        format!("--source-ips={}", t.source_ips),
        format!("--connect-timeout={}ms", t.connect_timeout.as_millis()),
        format!(
            "--connect-concurrency={}",
            t.connect_concurrency.div_ceil(workers)
        ),
        format!("--connect-rate={}", t.connect_rate / workers as f64),
        format!("--room-prefix={}", t.room_prefix),
    ];
    if let Some(p) = &t.name_prefix {
        a.push(format!("--name-prefix={p}"));
    }
    if args.output.quiet {
        a.push("--quiet".into());
    }
    a
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn next<T: for<'de> Deserialize<'de>>(&mut self, limit: Duration) -> Result<T> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .context("worker did not report in time")??
            .context("worker exited without reporting")?;
        serde_json::from_str(&line).with_context(|| format!("bad worker report {line:?}"))
    }
}

fn merge_connect(parts: &[WorkerConnected], elapsed: f64) -> ConnectReport {
    let mut setup = new_histogram();
    for p in parts {
        for &(value, count) in &p.setup_histogram {
            setup.saturating_record_n(value.max(1), count);
        }
    }
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
    for p in parts {
        for (k, v) in &p.connect.failures {
            *failures.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &p.connect.nodes {
            *nodes.entry(k.clone()).or_insert(0) += v;
        }
    }
    let attempted = parts.iter().map(|p| p.connect.attempted).sum();
    let connected = parts.iter().map(|p| p.connect.connected).sum();
    connect_report(attempted, connected, failures, elapsed, &setup, nodes)
}

/// Connections spread over `workers` child processes.
async fn run_workers(args: IdleArgs, workers: usize) -> Result<()> {
    let target = target_from(&args.target).await?;
    let exe = std::env::current_exe().context("locating the chat-loadgen binary")?;
    if !args.output.quiet {
        eprintln!(
            "idle: {} connections exceed one process's open-file limit ({}); using {workers} worker processes",
            args.layout.connections,
            sys::nofile_limit()
        );
    }
    let before = sys::snapshot(&args.output.pids);
    let started = Instant::now();

    let mut pool = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut child = tokio::process::Command::new(&exe)
            .args(worker_args(&args, workers, w))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("worker without stdout")?;
        pool.push(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
    }

    // Generous bound for connecting: every handshake may take the full timeout, in waves of the
    // concurrency limit, plus the time a rate limit imposes.
    let per_worker = args.layout.connections.div_ceil(workers);
    let waves = per_worker.div_ceil(args.target.connect_concurrency.div_ceil(workers).max(1));
    let mut limit = args.target.connect_timeout * (waves as u32 + 1) + Duration::from_secs(30);
    if args.target.connect_rate > 0.0 {
        limit += Duration::from_secs_f64(args.layout.connections as f64 / args.target.connect_rate);
    }
    let mut connected_parts = Vec::with_capacity(workers);
    for w in &mut pool {
        connected_parts.push(w.next::<WorkerConnected>(limit).await?);
    }
    let connect = merge_connect(&connected_parts, started.elapsed().as_secs_f64());
    let workers_rss: u64 = connected_parts.iter().map(|p| p.rss_kib).sum();

    let guard = progress::spawn(args.output.quiet, move |t| {
        Some(format!(
            "[idle hold {:>5.1}s] workers={workers}",
            t.as_secs_f64()
        ))
    });
    let (settled, held) = settle_and_hold(&args).await;
    drop(guard);

    for w in &mut pool {
        w.stdin.take(); // closing stdin tells the worker to finish
    }
    let mut open_at_end = 0;
    let mut disconnects: BTreeMap<String, u64> = BTreeMap::new();
    let mut workers_cpu = 0.0;
    for w in &mut pool {
        let done: WorkerDone = w.next(Duration::from_secs(30)).await?;
        open_at_end += done.open_at_end;
        workers_cpu += done.cpu_s;
        for (k, v) in done.disconnects {
            *disconnects.entry(k).or_insert(0) += v;
        }
        let _ = w.child.wait().await;
    }

    let measured = Measured {
        connect,
        open_at_end,
        disconnects,
        loadgen_cpu_s: before.self_cpu_until(&held) + workers_cpu,
        loadgen_rss_kib: settled.self_rss_kib() + workers_rss,
        before,
        settled,
        held,
    };
    emit_report(
        &args,
        target.protocol,
        target.urls.iter().map(|u| u.to_string()).collect(),
        measured,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;

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

    #[test]
    fn shares_cover_every_client_once() {
        for (n, k) in [(20_000, 2), (10, 3), (7, 7), (5, 1)] {
            let mut next = 0;
            for w in 0..k {
                let (first, count) = share(n, k, w);
                assert_eq!(first, next, "n={n} k={k} w={w}");
                next += count;
            }
            assert_eq!(next, n);
        }
        assert_eq!(share(10, 3, 0), (0, 4));
        assert_eq!(share(10, 3, 2), (7, 3));
    }

    #[test]
    fn worker_reports_merge() {
        let mut h = new_histogram();
        h.record_n(1000, 3).unwrap();
        let part = |connected, node: &str| WorkerConnected {
            connect: ConnectReport {
                attempted: 10,
                connected,
                failed: 10 - connected,
                failures: BTreeMap::from([("timeout".to_string(), 10 - connected)]),
                elapsed_s: 1.0,
                connected_per_s: 0.0,
                setup_latency_us: LatencySummary::default(),
                nodes: BTreeMap::from([(node.to_string(), connected)]),
            },
            setup_histogram: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            rss_kib: 100,
        };
        let m = merge_connect(&[part(8, "a"), part(10, "a")], 2.0);
        assert_eq!((m.attempted, m.connected, m.failed), (20, 18, 2));
        assert_eq!(m.failures.get("timeout"), Some(&2));
        assert_eq!(m.nodes.get("a"), Some(&18));
        assert_eq!(m.connected_per_s, 9.0);
        assert_eq!(m.setup_latency_us.count, 6);
        assert!(m.setup_latency_us.p50_us >= 1000 && m.setup_latency_us.p50_us < 1001);
    }

    #[test]
    fn worker_command_lines_parse() {
        use crate::cli::{Cli, Scenario};
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "chat-loadgen",
            "idle",
            "--url",
            "ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws",
            "-n",
            "10",
            "--connect-concurrency",
            "5",
        ])
        .unwrap();
        let Scenario::Idle(args) = cli.scenario else {
            panic!("not idle")
        };
        let argv = worker_args(&args, 3, 2);
        let cli =
            Cli::try_parse_from(std::iter::once("chat-loadgen".to_string()).chain(argv)).unwrap();
        let Scenario::Idle(w) = cli.scenario else {
            panic!("not idle")
        };
        assert!(w.worker);
        assert_eq!((w.index_offset, w.layout.connections), (7, 3));
        assert_eq!(w.target.urls.len(), 2);
        assert_eq!(w.target.connect_concurrency, 2);
        assert_eq!(w.target.connect_timeout, args.target.connect_timeout);
    }
}
