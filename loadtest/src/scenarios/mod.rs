//! The scenarios and what they share: laying clients out over URLs and rooms, opening many
//! connections with a concurrency limit and an optional rate, and holding idle connections
//! open (answering heartbeats) until told to stop.

pub mod api;
pub mod fanout;
pub mod idle;
pub mod sse;
pub mod storm;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::cli::TargetArgs;
use crate::client::{ClientSpec, Session, Target};
use crate::progress;
use crate::protocol::Incoming;
use crate::report::ConnectReport;
use crate::stats::{LatencyRecorder, LatencySummary, Tally};
use crate::sys::round3;

/// Resolve the target described by the command line.
pub async fn target_from(args: &TargetArgs) -> Result<Arc<Target>> {
    if args.connect_concurrency == 0 {
        bail!("--connect-concurrency must be at least 1");
    }
    if !(args.connect_rate >= 0.0 && args.connect_rate.is_finite()) {
        bail!("--connect-rate must be a finite number ≥ 0");
    }
    Ok(Arc::new(
        Target::resolve(
            args.protocol,
            &args.urls,
            args.source_ips,
            args.connect_timeout,
            args.name_prefix.clone(),
        )
        .await?,
    ))
}

/// Client `i` joins room `i mod rooms`; within a room, members alternate over the URLs, so
/// with two nodes every room has members on both. `clients` is the range of client indexes to
/// lay out (a worker process takes a slice of the whole).
pub fn layout(
    clients: Range<usize>,
    rooms: usize,
    urls: usize,
    room_prefix: &str,
) -> Vec<ClientSpec> {
    let rooms = rooms.max(1);
    let urls = urls.max(1);
    clients
        .map(|i| ClientSpec {
            index: i,
            url_index: (i / rooms) % urls,
            room: format!("{room_prefix}-{}", i % rooms),
        })
        .collect()
}

/// Live counters of a connect phase, for the progress line.
#[derive(Debug, Default)]
pub struct ConnectProgress {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
}

impl ConnectProgress {
    pub fn line(&self, label: &str, elapsed: Duration) -> String {
        format!(
            "[{label} {:>5.1}s] connected={} failed={}",
            elapsed.as_secs_f64(),
            self.connected.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// Open every client in `specs`, at most `concurrency` handshakes at once and, when `rate` is
/// positive, no more than `rate` new attempts per second. Returns the open sessions (in spec
/// order), a report of the phase and the setup latency histogram behind it.
pub async fn connect_all(
    target: Arc<Target>,
    specs: Vec<ClientSpec>,
    concurrency: usize,
    rate: f64,
    progress: Arc<ConnectProgress>,
) -> (Vec<(ClientSpec, Session)>, ConnectReport, Histogram<u64>) {
    let attempted = specs.len() as u64;
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let failures = Arc::new(Tally::default());
    let started = Instant::now();
    let mut pace = (rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });

    let mut handles: Vec<JoinHandle<(ClientSpec, Result<Session, String>)>> =
        Vec::with_capacity(specs.len());
    for spec in specs {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        // The semaphore is never closed, so acquiring only waits.
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let target = target.clone();
        let progress = progress.clone();
        let failures = failures.clone();
        handles.push(tokio::spawn(async move {
            let result = Session::open(&target, &spec).await;
            drop(permit);
            match &result {
                Ok(_) => {
                    progress.connected.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    failures.add(&e.0);
                }
            }
            (spec, result.map_err(|e| e.0))
        }));
    }

    let setup = LatencyRecorder::new(1);
    let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
    let mut sessions = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok((spec, Ok(session))) => {
                setup.record(0, session.setup.as_micros() as u64);
                let node = session.node.clone().unwrap_or_else(|| "unknown".into());
                *nodes.entry(node).or_insert(0) += 1;
                sessions.push((spec, session));
            }
            Ok((_, Err(_))) => {}
            Err(_) => failures.add("task_failed"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let connected = sessions.len() as u64;
    let setup = setup.merged();
    let report = connect_report(
        attempted,
        connected,
        failures.snapshot(),
        elapsed,
        &setup,
        nodes,
    );
    (sessions, report, setup)
}

/// Summarize a connect phase that opened `connected` of `attempted` clients in `elapsed`
/// seconds.
pub fn connect_report(
    attempted: u64,
    connected: u64,
    failures: BTreeMap<String, u64>,
    elapsed: f64,
    setup: &Histogram<u64>,
    nodes: BTreeMap<String, u64>,
) -> ConnectReport {
    ConnectReport {
        attempted,
        connected,
        failed: attempted - connected,
        failures,
        elapsed_s: round3(elapsed),
        connected_per_s: if elapsed > 0.0 {
            (connected as f64 / elapsed).round()
        } else {
            0.0
        },
        setup_latency_us: LatencySummary::of(setup),
        nodes,
    }
}

/// Lay out `clients` over the target's URLs and rooms and open them all with the target's
/// concurrency and rate, showing a progress line labelled `label` unless `quiet`.
pub async fn connect_clients(
    target: &Arc<Target>,
    args: &TargetArgs,
    clients: Range<usize>,
    rooms: usize,
    label: String,
    quiet: bool,
) -> (Vec<(ClientSpec, Session)>, ConnectReport, Histogram<u64>) {
    let specs = layout(clients, rooms, target.urls.len(), &args.room_prefix);
    let connect_progress = Arc::new(ConnectProgress::default());
    let guard = {
        let p = connect_progress.clone();
        progress::spawn(quiet, move |t| Some(p.line(&label, t)))
    };
    let connected = connect_all(
        target.clone(),
        specs,
        args.connect_concurrency,
        args.connect_rate,
        connect_progress,
    )
    .await;
    drop(guard);
    connected
}

/// Sessions held open (answering heartbeats) until released.
pub struct Held {
    /// Sessions the server ended, by cause.
    pub disconnects: Arc<Tally>,
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<bool>>,
}

impl Held {
    /// Start holding `sessions`.
    pub fn start(sessions: Vec<(ClientSpec, Session)>) -> Self {
        let disconnects = Arc::new(Tally::default());
        let (stop, stop_rx) = watch::channel(false);
        let handles = hold_all(sessions, stop_rx, disconnects.clone());
        Held {
            disconnects,
            stop,
            handles,
        }
    }

    /// Close every held session (waiting at most 10 s) and return the disconnects by cause.
    pub async fn release(self) -> BTreeMap<String, u64> {
        let _ = self.stop.send(true);
        join_held(self.handles, Duration::from_secs(10)).await;
        self.disconnects.snapshot()
    }
}

/// Keep sessions open, answering protocol heartbeats, until `stop` changes; then close them.
/// Sessions the server ends are tallied in `disconnects`. Each task yields true if its session
/// was still open when stopped.
fn hold_all(
    sessions: Vec<(ClientSpec, Session)>,
    stop: watch::Receiver<bool>,
    disconnects: Arc<Tally>,
) -> Vec<JoinHandle<bool>> {
    sessions
        .into_iter()
        .map(|(_, session)| {
            let mut stop = stop.clone();
            let disconnects = disconnects.clone();
            tokio::spawn(async move { hold_one(session, &mut stop, &disconnects).await })
        })
        .collect()
}

async fn hold_one(mut session: Session, stop: &mut watch::Receiver<bool>, tally: &Tally) -> bool {
    let protocol = session.protocol();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                session.close(Duration::from_secs(1)).await;
                return true;
            }
            r = session.recv_text() => match r {
                Ok(text) => {
                    let reply = match protocol.decode(text) {
                        Ok(Incoming::Reply(reply)) => reply,
                        Ok(Incoming::Closed) => {
                            tally.add("server_closed");
                            return false;
                        }
                        _ => continue,
                    };
                    if let Err(e) = session.send_text(&reply).await {
                        tally.add(&e.0);
                        return false;
                    }
                }
                Err(e) => {
                    tally.add(&e.0);
                    return false;
                }
            }
        }
    }
}

/// Wait for held sessions to close, at most `limit`; returns how many were open when stopped.
async fn join_held(handles: Vec<JoinHandle<bool>>, limit: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + limit;
    let mut open = 0;
    for h in handles {
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(true)) => open += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_is_split_over_both_urls() {
        let specs = layout(0..1000, 10, 2, "lt");
        for room in 0..10 {
            let name = format!("lt-{room}");
            let members: Vec<_> = specs.iter().filter(|s| s.room == name).collect();
            assert_eq!(members.len(), 100);
            let on_first = members.iter().filter(|s| s.url_index == 0).count();
            assert_eq!(on_first, 50, "room {room}");
        }
        // The first client of each room (its sender by default) sits on the first URL.
        assert!(specs[..10].iter().all(|s| s.url_index == 0));
    }

    #[test]
    fn single_room_alternates_nodes() {
        let specs = layout(0..4, 1, 2, "big");
        let urls: Vec<_> = specs.iter().map(|s| s.url_index).collect();
        assert_eq!(urls, vec![0, 1, 0, 1]);
        assert!(specs.iter().all(|s| s.room == "big-0"));
    }
}
