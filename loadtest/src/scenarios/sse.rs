//! The SSE fallback next to WebSockets, on one gateway node: memory per idle connection of
//! either transport (`--idle N --transport sse|websocket`: RSS growth of `--pid` divided by N;
//! run once per transport on a fresh node, so neither reuses what the other freed), then the
//! latency of the same messages to a WebSocket member and to an SSE member of one room
//! (`--rate R --duration D`, one WebSocket sender). Bounded: N connections, R × D messages.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

use crate::cli::{SseArgs, SseTransport};
use crate::stats::{LatencySummary, new_histogram};
use crate::sys::Watched;
use crate::ws::WsStream;

/// The room of the latency run.
const ROOM: &str = "sse-latency";

#[derive(Serialize)]
struct IdleReport {
    transport: &'static str,
    connections: usize,
    rss_kib_before: u64,
    rss_kib_after: u64,
    bytes_per_connection: f64,
}

#[derive(Serialize)]
struct MemberReport {
    received: u64,
    latency_us: LatencySummary,
}

#[derive(Serialize)]
struct LatencyReport {
    rate: u32,
    seconds: f64,
    sent: u64,
    websocket: MemberReport,
    sse: MemberReport,
}

pub async fn run(args: SseArgs) -> Result<()> {
    let base = Url::parse(&args.url).context("--url")?;
    if args.idle > 0 {
        let Some(pid) = args.pid else {
            bail!("--idle needs --pid: the node whose memory is measured");
        };
        let report = idle(&base, pid, args.idle, args.transport, args.settle).await?;
        println!("{}", serde_json::to_string(&report)?);
    }
    if args.rate > 0 {
        let report = latency(&base, args.rate, args.duration).await?;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let watched = Watched {
        label: "node".into(),
        pid,
    };
    Ok(watched.sample()?.rss_kib)
}

/// Opens `n` idle connections of one transport and reports the node's RSS growth per connection.
async fn idle(
    base: &Url,
    pid: u32,
    n: usize,
    transport: SseTransport,
    settle: Duration,
) -> Result<IdleReport> {
    tokio::time::sleep(settle).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let room = format!("idle-{}", i % 100);
        let held_one = match transport {
            SseTransport::Websocket => Held::Ws(Box::new(open_ws(base, &room).await?)),
            SseTransport::Sse => Held::Sse(open_sse(base, &room).await?.0),
        };
        held.push(held_one);
    }
    tokio::time::sleep(settle).await;
    let after = rss_kib(pid)?;
    drop(held);
    Ok(IdleReport {
        transport: match transport {
            SseTransport::Websocket => "websocket",
            SseTransport::Sse => "sse",
        },
        connections: n,
        rss_kib_before: before,
        rss_kib_after: after,
        bytes_per_connection: ((after as f64 - before as f64) * 1024.0 / n as f64).round(),
    })
}

/// A connection held open (and not read: an idle client's heartbeats wait in its socket).
enum Held {
    Ws(#[allow(dead_code)] Box<WsStream>),
    Sse(#[allow(dead_code)] TcpStream),
}

fn ws_error(error: crate::ws::WsError) -> anyhow::Error {
    anyhow::anyhow!("websocket: {error:?}")
}

fn addr(base: &Url) -> Result<String> {
    let host = base.host_str().context("URL without host")?;
    let port = base.port_or_known_default().context("URL without port")?;
    Ok(format!("{host}:{port}"))
}

async fn open_ws(base: &Url, room: &str) -> Result<WsStream> {
    let mut url = base.clone();
    url.set_scheme("ws").ok();
    url.set_path("/ws");
    url.set_query(Some(&format!("room={room}")));
    let tcp = TcpStream::connect(addr(base)?).await?;
    let mut ws = WsStream::connect(tcp, &url).await.map_err(ws_error)?;
    ws.recv_text().await.map_err(ws_error)?;
    Ok(ws)
}

/// Opens an SSE stream and reads up to its welcome frame; returns the stream, what was read
/// after the welcome, and the session token.
async fn open_sse(base: &Url, room: &str) -> Result<(TcpStream, Vec<u8>, String)> {
    let mut tcp = TcpStream::connect(addr(base)?).await?;
    let request = format!(
        "GET /sse?room={room} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        addr(base)?
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::with_capacity(1024);
    loop {
        if tcp.read_buf(&mut buffer).await? == 0 {
            bail!("the node closed the stream before its welcome");
        }
        if !buffer.starts_with(b"HTTP/1.1 200") && buffer.len() >= 12 {
            bail!("GET /sse refused: {}", String::from_utf8_lossy(&buffer));
        }
        let mut lines = Lines::default();
        lines.push(&buffer);
        while let Some(frame) = lines.next_data() {
            if frame["type"] == "userId" {
                let session = frame["session"].as_str().unwrap_or_default().to_owned();
                return Ok((tcp, lines.rest(), session));
            }
        }
    }
}

/// The `data:` lines of an event stream, whatever the chunked framing around them: the node
/// writes whole events per chunk, so chunk-size lines only ever fall between events.
#[derive(Default)]
struct Lines {
    buffer: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    fn next_data(&mut self) -> Option<serde_json::Value> {
        loop {
            let end = self.buffer.iter().position(|&b| b == b'\n')?;
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            if let Some(data) = line.strip_prefix(b"data: ")
                && let Ok(frame) = serde_json::from_slice(data)
            {
                return Some(frame);
            }
        }
    }

    fn rest(self) -> Vec<u8> {
        self.buffer
    }
}

/// Microseconds since `start` carried in the message text, `t=<µs>`.
fn sent_at(frame: &serde_json::Value) -> Option<u64> {
    frame["message"].as_str()?.strip_prefix("t=")?.parse().ok()
}

async fn latency(base: &Url, rate: u32, duration: Duration) -> Result<LatencyReport> {
    let start = Instant::now();
    let mut ws_member = open_ws(base, ROOM).await?;
    let (mut sse_member, rest, _) = open_sse(base, ROOM).await?;
    let mut sender = open_ws(base, ROOM).await?;
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;

    let ws_task = tokio::spawn(async move {
        let mut histogram = new_histogram();
        let mut received = 0;
        while received < total {
            let Ok(Ok(text)) =
                tokio::time::timeout(Duration::from_secs(5), ws_member.recv_text()).await
            else {
                break;
            };
            let now = start.elapsed().as_micros() as u64;
            if let Ok(frame) = serde_json::from_str::<serde_json::Value>(text)
                && let Some(at) = sent_at(&frame)
            {
                histogram.record(now.saturating_sub(at).max(1)).ok();
                received += 1;
            }
        }
        (received, histogram)
    });
    let sse_task = tokio::spawn(async move {
        let mut histogram = new_histogram();
        let mut received = 0;
        let mut lines = Lines::default();
        lines.push(&rest);
        let mut chunk = vec![0u8; 16 * 1024];
        'reading: while received < total {
            while let Some(frame) = lines.next_data() {
                let now = start.elapsed().as_micros() as u64;
                if let Some(at) = sent_at(&frame) {
                    histogram.record(now.saturating_sub(at).max(1)).ok();
                    received += 1;
                }
            }
            match tokio::time::timeout(Duration::from_secs(5), sse_member.read(&mut chunk)).await {
                Ok(Ok(read)) if read > 0 => lines.push(&chunk[..read]),
                _ => break 'reading,
            }
        }
        (received, histogram)
    });

    // Seed-style frames: no ack to wait for; the sender's own copies are read and dropped.
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while sent < total {
        tick.tick().await;
        let at = start.elapsed().as_micros();
        sender
            .send_text(&format!(r#"{{"message":"t={at}"}}"#))
            .await
            .map_err(ws_error)?;
        sent += 1;
        // Its own copies: read what has arrived (a zero timeout still polls once), so its
        // socket never fills.
        while let Ok(echo) = tokio::time::timeout(Duration::ZERO, sender.recv_text()).await {
            echo.map_err(ws_error)?;
        }
    }
    let (ws_received, ws_histogram) = ws_task.await?;
    let (sse_received, sse_histogram) = sse_task.await?;
    Ok(LatencyReport {
        rate,
        seconds: duration.as_secs_f64(),
        sent,
        websocket: MemberReport {
            received: ws_received,
            latency_us: LatencySummary::of(&ws_histogram),
        },
        sse: MemberReport {
            received: sse_received,
            latency_us: LatencySummary::of(&sse_histogram),
        },
    })
}
