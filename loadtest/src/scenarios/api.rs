//! The server API under load: callers publish through `POST /api/publish`, each on its own
//! keep-alive HTTP/1.1 connection, into one room whose WebSocket members receive every
//! message. Reports publishes per second, the time a call takes, and the time from a
//! publish's send to each member's receipt, with loss and duplicates. Bounded by a sending
//! time and by a count of publishes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use url::Url;

use super::{connect_clients, target_from};
use crate::cli::ApiArgs;
use crate::client::{ClientSpec, Session};
use crate::payload::{Probe, now_us};
use crate::progress;
use crate::protocol::{Incoming, Protocol};
use crate::report::{self, ApiReport};
use crate::stats::{
    Delivery, LatencyRecorder, LatencySummary, ReceiverTracker, Tally, summarize_loss,
};
use crate::sys;

/// Counters every caller and member task shares.
#[derive(Default)]
struct Shared {
    /// Calls started, for the bound on the count.
    started: AtomicU64,
    published: AtomicU64,
    failed: Tally,
    delivered: AtomicU64,
    duplicates: AtomicU64,
}

/// Where the API is and how to call it.
struct Endpoint {
    addr: SocketAddr,
    /// The `Host` header and the start of every request.
    head: String,
}

/// Run the API scenario and print its report.
pub async fn run(args: ApiArgs) -> Result<()> {
    if args.callers == 0 || args.members == 0 {
        bail!("--callers and --members must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a finite number ≥ 0");
    }
    let target = target_from(&args.target).await?;
    if target.protocol != Protocol::Gateway {
        bail!("the server API is the gateway's: use --protocol gateway");
    }
    let api_url = match &args.api_url {
        Some(url) => Url::parse(url).context("--api-url")?,
        None => {
            let mut url = target.urls[0].clone();
            let scheme = if url.scheme() == "wss" {
                "https"
            } else {
                "http"
            };
            url.set_scheme(scheme)
                .map_err(|()| anyhow::anyhow!("cannot derive the API's URL"))?;
            url.set_path("/");
            url.set_query(None);
            url
        }
    };
    if api_url.scheme() != "http" {
        bail!("--api-url must be http:// (this loader speaks plain HTTP/1.1)");
    }
    let endpoint = Arc::new(endpoint(&api_url, &args.api_key).await?);

    let (sessions, connect, _) = connect_clients(
        &target,
        &args.target,
        0..args.members,
        1,
        "members".into(),
        args.output.quiet,
    )
    .await;
    let Some(room) = sessions.first().map(|(spec, _)| spec.room.clone()) else {
        bail!("no member connected: {:?}", connect.failures);
    };
    let members = sessions.len() as u64;
    let shared = Arc::new(Shared::default());
    let latency = Arc::new(LatencyRecorder::new(4));
    let disconnects = Arc::new(Tally::default());
    let (stop, stopped) = watch::channel(false);
    let listeners: Vec<_> = sessions
        .into_iter()
        .map(|(spec, session)| {
            let (shared, latency, disconnects) =
                (shared.clone(), latency.clone(), disconnects.clone());
            let stopped = stopped.clone();
            tokio::spawn(listen(spec, session, shared, latency, disconnects, stopped))
        })
        .collect();
    tokio::time::sleep(args.settle).await;

    let before = sys::snapshot(&args.output.pids);
    let started = Instant::now();
    let deadline = started + args.duration;
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.callers as f64 / args.rate));
    let calls = Arc::new(LatencyRecorder::new(args.callers));
    let progress = {
        let shared = shared.clone();
        progress::spawn(args.output.quiet, move |t| {
            Some(format!(
                "[api {:>5.1}s] published={} delivered={}",
                t.as_secs_f64(),
                shared.published.load(Ordering::Relaxed),
                shared.delivered.load(Ordering::Relaxed)
            ))
        })
    };
    let callers: Vec<_> = (0..args.callers)
        .map(|index| {
            let caller = Caller {
                index,
                endpoint: endpoint.clone(),
                room: room.clone(),
                size: args.size,
                cid: args.cid,
                max: args.max_publishes,
                shared: shared.clone(),
                calls: calls.clone(),
            };
            tokio::spawn(caller.run(deadline, pace))
        })
        .collect();
    for caller in callers {
        let _ = caller.await;
    }
    let sending = started.elapsed();
    let after = sys::snapshot(&args.output.pids);

    // Wait for what is owed, at most the drain time.
    let published = shared.published.load(Ordering::Relaxed);
    let expected = published * members;
    let drain_until = Instant::now() + args.drain;
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(progress);
    let _ = stop.send(true);
    for listener in listeners {
        let _ = tokio::time::timeout(Duration::from_secs(5), listener).await;
    }

    let report = ApiReport {
        scenario: "api",
        api_url: api_url.to_string(),
        urls: target.urls.iter().map(Url::to_string).collect(),
        room,
        members,
        callers: args.callers as u64,
        rate: (args.rate > 0.0).then_some(args.rate),
        payload_bytes: args.size,
        duration_s: round3(sending.as_secs_f64()),
        published,
        failed: shared.failed.snapshot(),
        published_per_s: (published as f64 / sending.as_secs_f64().max(1e-9)).round(),
        call_latency_us: LatencySummary::of(&calls.merged()),
        loss: summarize_loss(
            expected,
            shared.delivered.load(Ordering::Relaxed),
            shared.duplicates.load(Ordering::Relaxed),
        ),
        delivery_latency_us: LatencySummary::of(&latency.merged()),
        disconnects: disconnects.snapshot(),
        processes: before.usage_until(&after, &args.output.pids),
        loadgen_cpu_s: before.self_cpu_until(&after),
        connect,
    };
    report::emit(&report, args.output.json, ApiReport::human);
    Ok(())
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

async fn endpoint(url: &Url, key: &str) -> Result<Endpoint> {
    let host = url.host_str().context("the API URL has no host")?;
    let port = url.port_or_known_default().unwrap_or(80);
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    Ok(Endpoint {
        addr,
        head: format!(
            "POST /api/publish HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\n"
        ),
    })
}

/// One caller: publishes one message after another on its own connection.
struct Caller {
    index: usize,
    endpoint: Arc<Endpoint>,
    room: String,
    size: usize,
    cid: bool,
    max: u64,
    shared: Arc<Shared>,
    calls: Arc<LatencyRecorder>,
}

impl Caller {
    async fn run(self, deadline: Instant, pace: Option<Duration>) {
        let mut connection: Option<Connection> = None;
        let mut tick = pace.map(|period| {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick
        });
        let mut text = String::new();
        for seq in 0.. {
            if let Some(tick) = &mut tick {
                tick.tick().await;
            }
            if Instant::now() >= deadline
                || self.shared.started.fetch_add(1, Ordering::Relaxed) >= self.max
            {
                return;
            }
            let probe = Probe {
                step: 0,
                sender: self.index as u32,
                seq,
                sent_us: now_us(),
            };
            probe.encode_into(self.size, &mut text);
            let mut body = serde_json::json!({"room": self.room, "message": text});
            if self.cid {
                body["cid"] = format!("api-{}-{seq}", self.index).into();
            }
            if connection.is_none() {
                match Connection::open(self.endpoint.addr).await {
                    Ok(open) => connection = Some(open),
                    Err(label) => {
                        self.fail(&label).await;
                        continue;
                    }
                }
            }
            let Some(open) = connection.as_mut() else {
                continue;
            };
            let sent = Instant::now();
            match open.call(&self.endpoint, &body.to_string()).await {
                Ok(200) => {
                    self.shared.published.fetch_add(1, Ordering::Relaxed);
                    let micros = sent.elapsed().as_micros() as u64;
                    self.calls.record(self.index, micros);
                }
                Ok(status) => self.shared.failed.add(&format!("http_{status}")),
                Err(label) => {
                    connection = None;
                    self.fail(&label).await;
                }
            }
        }
    }

    /// Counts a call that got no answer, and pauses: a refused or broken connection must not
    /// turn into a hot loop against a dead node.
    async fn fail(&self, label: &str) {
        self.shared.failed.add(label);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A keep-alive HTTP/1.1 connection to the API.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Connection, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect_{:?}", e.kind()).to_lowercase())?;
        stream.set_nodelay(true).map_err(|_| "nodelay".to_owned())?;
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(4096),
        })
    }

    /// Sends one publish and reads its answer; the status.
    async fn call(&mut self, endpoint: &Endpoint, body: &str) -> Result<u16, String> {
        let request = format!(
            "{}Content-Length: {}\r\n\r\n{body}",
            endpoint.head,
            body.len()
        );
        self.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write_{:?}", e.kind()).to_lowercase())?;
        self.buffer.clear();
        let head_end = loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            self.read_more().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..head_end]).map_err(|_| "bad_head")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|status| status.parse().ok())
            .ok_or("bad_status")?;
        let length: usize = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse().ok())
            .ok_or("no_content_length")?;
        while self.buffer.len() < head_end + length {
            self.read_more().await?;
        }
        Ok(status)
    }

    async fn read_more(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("eof".into()),
            Ok(read) => {
                self.buffer.extend_from_slice(&chunk[..read]);
                Ok(())
            }
            Err(e) => Err(format!("read_{:?}", e.kind()).to_lowercase()),
        }
    }
}

/// One member: counts and times every probe it receives until told to stop.
async fn listen(
    spec: ClientSpec,
    mut session: Session,
    shared: Arc<Shared>,
    latency: Arc<LatencyRecorder>,
    disconnects: Arc<Tally>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tracker = ReceiverTracker::default();
    loop {
        tokio::select! {
            _ = stopped.changed() => {
                session.close(Duration::from_secs(1)).await;
                return;
            }
            frame = session.recv_text() => {
                let text = match frame {
                    Ok(text) => text,
                    Err(ended) => {
                        disconnects.add(&ended.0);
                        return;
                    }
                };
                let Ok(Incoming::Chat(message)) = Protocol::Gateway.decode(text) else {
                    continue;
                };
                let Some(probe) = Probe::decode(&message) else {
                    continue;
                };
                match tracker.record(0, probe.sender, probe.seq) {
                    Delivery::First => {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        latency.record(spec.index, now_us().saturating_sub(probe.sent_us));
                    }
                    Delivery::Duplicate => {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    Delivery::OutOfRange => {}
                }
            }
        }
    }
}
