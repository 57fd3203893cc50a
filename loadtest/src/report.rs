//! Final reports of each scenario: serialisable structs, printed either as one JSON object per
//! line on stdout (`--json`, for scripts) or as a short human-readable block.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::progress::fmt_us;
use crate::protocol::Protocol;
use crate::stats::{LatencySummary, LossSummary};
use crate::sys::ProcUsage;

/// How connecting went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    /// Failure causes (`timeout`, `refused`, `http_503`, …) and their counts.
    pub failures: BTreeMap<String, u64>,
    /// From the first attempt to the last outcome.
    pub elapsed_s: f64,
    /// Connected / elapsed.
    pub connected_per_s: f64,
    /// TCP connect to `userId` frame, per successful connection.
    pub setup_latency_us: LatencySummary,
    /// Connections per node, by the node name in the `userId` frame.
    pub nodes: BTreeMap<String, u64>,
}

/// One rate step of the fan-out scenario.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutStep {
    pub scenario: &'static str,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub step: u32,
    pub rate_per_sender: f64,
    pub senders: u64,
    pub rooms: u64,
    pub clients: u64,
    /// Connected members of all rooms when the step started.
    pub members: u64,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub drain_s: f64,
    /// Messages the connected senders were to send (rate × duration each).
    pub planned: u64,
    pub sent: u64,
    pub send_failures: u64,
    #[serde(flatten)]
    pub loss: LossSummary,
    /// Probes of an earlier step that arrived during this one.
    pub stale: u64,
    /// Chat messages without a valid probe.
    pub foreign: u64,
    /// Frames that could not be decoded.
    pub bad_frames: u64,
    pub acks: u64,
    pub server_errors: u64,
    /// Error frames by code (`rate_limited`, `not_in_room`, …).
    pub server_error_codes: BTreeMap<String, u64>,
    /// Distinct deliveries per second of sending time.
    pub delivered_per_s: f64,
    pub latency_us: LatencySummary,
    pub latency_same_node_us: LatencySummary,
    pub latency_cross_node_us: LatencySummary,
    /// Connections that ended during the step, by cause.
    pub disconnects: BTreeMap<String, u64>,
    pub loadgen_cpu_s: f64,
    pub loadgen_rss_kib: u64,
    pub processes: Vec<ProcUsage>,
    pub connect: ConnectReport,
}

/// Memory cost of one idle connection on a watched process.
#[derive(Debug, Clone, Serialize)]
pub struct RssPerConnection {
    pub label: String,
    /// Connections the growth is divided by (the node's own when the label names a node).
    pub connections: u64,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    pub bytes_per_connection: f64,
}

/// The idle scenario.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub connections: u64,
    pub rooms: u64,
    pub connect: ConnectReport,
    pub settle_s: f64,
    pub hold_s: f64,
    /// Connections still open at the end of the hold.
    pub open_at_end: u64,
    pub disconnects: BTreeMap<String, u64>,
    /// Before connecting → after settling, per watched process (the `all` entry sums them).
    pub rss_per_connection: Vec<RssPerConnection>,
    /// CPU while connecting and settling.
    pub processes_connect: Vec<ProcUsage>,
    /// CPU while holding idle connections (heartbeats only).
    pub processes_hold: Vec<ProcUsage>,
    pub loadgen_cpu_s: f64,
    pub loadgen_rss_kib: u64,
    pub loadgen_bytes_per_connection: f64,
}

/// The storm scenario.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub protocol: Protocol,
    pub urls: Vec<String>,
    pub connections: u64,
    pub concurrency: u64,
    pub connect: ConnectReport,
    /// Same as connect.connected_per_s: accepted (ready) connections per second.
    pub accepted_per_s: f64,
    pub disconnects: BTreeMap<String, u64>,
    pub processes: Vec<ProcUsage>,
    pub loadgen_cpu_s: f64,
}

/// The API scenario (`chat-loadgen api`).
#[derive(Debug, Clone, Serialize)]
pub struct ApiReport {
    pub scenario: &'static str,
    pub api_url: String,
    pub urls: Vec<String>,
    pub room: String,
    pub members: u64,
    pub callers: u64,
    /// Publishes per second asked for; `None`: as fast as answers come.
    pub rate: Option<f64>,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub published: u64,
    /// Calls that did not publish, by cause (`http_503`, `reset`, ...).
    pub failed: BTreeMap<String, u64>,
    pub published_per_s: f64,
    /// From writing a call to reading its whole answer.
    pub call_latency_us: LatencySummary,
    #[serde(flatten)]
    pub loss: LossSummary,
    /// From writing a call to a member reading the message, per member.
    pub delivery_latency_us: LatencySummary,
    pub disconnects: BTreeMap<String, u64>,
    pub processes: Vec<ProcUsage>,
    pub loadgen_cpu_s: f64,
    pub connect: ConnectReport,
}

impl ApiReport {
    pub fn human(&self) -> String {
        let rate = self
            .rate
            .map_or_else(|| "as fast as answered".to_owned(), |r| format!("{r}/s"));
        let mut s = String::new();
        let lines = [
            format!(
                "== api: {} callers publishing into {} ({} members), {rate}, {} B, {:.1}s",
                self.callers, self.room, self.members, self.payload_bytes, self.duration_s
            ),
            format!(
                "published {} ({:.0}/s), failed {}",
                self.published,
                self.published_per_s,
                fmt_map(&self.failed)
            ),
            format!("call      {}", fmt_latency(&self.call_latency_us)),
            format!(
                "delivered {} of {} ({:.4}), lost {}, duplicates {}",
                self.loss.delivered,
                self.loss.expected,
                self.loss.delivery_ratio,
                self.loss.lost,
                self.loss.duplicates
            ),
            format!("delivery  {}", fmt_latency(&self.delivery_latency_us)),
            format!("closed    {}", fmt_map(&self.disconnects)),
            format!("loadgen   cpu {:.3}s", self.loadgen_cpu_s),
        ];
        for line in lines {
            let _ = writeln!(s, "{line}");
        }
        fmt_procs(&mut s, &self.processes);
        s
    }
}

/// Print a report: JSON on one line, or the human rendering.
pub fn emit<T: Serialize>(report: &T, json: bool, human: impl FnOnce(&T) -> String) {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot serialise report: {e}"),
        }
    } else {
        println!("{}", human(report));
    }
}

fn fmt_latency(l: &LatencySummary) -> String {
    if l.count == 0 {
        return "n/a".into();
    }
    format!(
        "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.max_us),
        l.count
    )
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_procs(out: &mut String, procs: &[ProcUsage]) {
    for p in procs {
        let _ = writeln!(
            out,
            "  {:<12} cpu {:>8.3}s  rss {} → {} KiB",
            p.label, p.cpu_seconds, p.rss_kib_before, p.rss_kib_after
        );
    }
}

fn fmt_connect(out: &mut String, c: &ConnectReport) {
    let _ = writeln!(
        out,
        "connect   {}/{} in {:.2}s ({:.0}/s), failures: {}; setup {}",
        c.connected,
        c.attempted,
        c.elapsed_s,
        c.connected_per_s,
        fmt_map(&c.failures),
        fmt_latency(&c.setup_latency_us)
    );
    let _ = writeln!(out, "nodes     {}", fmt_map(&c.nodes));
}

impl FanoutStep {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== fanout step {} [{}]: {} senders × {}/s, {} rooms, {} members, {} B, {:.0}s (+{:.0}s drain)",
            self.step,
            self.protocol,
            self.senders,
            self.rate_per_sender,
            self.rooms,
            self.members,
            self.payload_bytes,
            self.duration_s,
            self.drain_s
        );
        let _ = writeln!(
            s,
            "sent      {}/{} (failed {}), expected {}, delivered {} ({:.4}), lost {}, duplicates {}",
            self.sent,
            self.planned,
            self.send_failures,
            self.loss.expected,
            self.loss.delivered,
            self.loss.delivery_ratio,
            self.loss.lost,
            self.loss.duplicates
        );
        let _ = writeln!(
            s,
            "rate      {:.0} deliveries/s; stale {} foreign {} bad frames {} acks {} errors {}",
            self.delivered_per_s,
            self.stale,
            self.foreign,
            self.bad_frames,
            self.acks,
            self.server_errors
        );
        if !self.server_error_codes.is_empty() {
            let _ = writeln!(s, "errors    {}", fmt_map(&self.server_error_codes));
        }
        let _ = writeln!(s, "latency   {}", fmt_latency(&self.latency_us));
        let _ = writeln!(s, "  same    {}", fmt_latency(&self.latency_same_node_us));
        let _ = writeln!(s, "  cross   {}", fmt_latency(&self.latency_cross_node_us));
        let _ = writeln!(s, "closed    {}", fmt_map(&self.disconnects));
        let _ = writeln!(
            s,
            "loadgen   cpu {:.3}s rss {} KiB",
            self.loadgen_cpu_s, self.loadgen_rss_kib
        );
        fmt_procs(&mut s, &self.processes);
        if self.step == 0 {
            fmt_connect(&mut s, &self.connect);
        }
        s
    }
}

impl IdleReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== idle [{}]: {} connections over {} rooms, settle {:.0}s, hold {:.0}s",
            self.protocol, self.connections, self.rooms, self.settle_s, self.hold_s
        );
        fmt_connect(&mut s, &self.connect);
        let _ = writeln!(
            s,
            "open      {} at end; closed during hold: {}",
            self.open_at_end,
            fmt_map(&self.disconnects)
        );
        for r in &self.rss_per_connection {
            let _ = writeln!(
                s,
                "rss/conn  {:<12} {:>8.0} B   ({} → {} KiB over {} connections)",
                r.label, r.bytes_per_connection, r.rss_kib_before, r.rss_kib_after, r.connections
            );
        }
        let _ = writeln!(s, "cpu while connecting:");
        fmt_procs(&mut s, &self.processes_connect);
        let _ = writeln!(s, "cpu while holding:");
        fmt_procs(&mut s, &self.processes_hold);
        let _ = writeln!(
            s,
            "loadgen   cpu {:.3}s rss {} KiB ({:.0} B/conn)",
            self.loadgen_cpu_s, self.loadgen_rss_kib, self.loadgen_bytes_per_connection
        );
        s
    }
}

impl StormReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== storm [{}]: {} connections, concurrency {}",
            self.protocol, self.connections, self.concurrency
        );
        fmt_connect(&mut s, &self.connect);
        let _ = writeln!(s, "accepted  {:.0}/s", self.accepted_per_s);
        let _ = writeln!(s, "closed    {}", fmt_map(&self.disconnects));
        fmt_procs(&mut s, &self.processes);
        let _ = writeln!(s, "loadgen   cpu {:.3}s", self.loadgen_cpu_s);
        s
    }
}
