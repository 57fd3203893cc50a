//! Fan-out: C clients in R rooms, each room spread over every URL. The first S members of each
//! room also send: at each rate in `--rates` in turn, every sender sends `rate × duration`
//! probes (step, sender, seq, send time) padded to `--size`. Every member, the sender included,
//! should receive each probe of its room exactly once. After a drain period the step is
//! counted: expected = Σ rooms (probes sent into the room × members at step start), delivered =
//! distinct probes received, lost = expected − delivered, duplicates = repeats, and latency from
//! send time to receipt (split by whether sender and receiver sit on the same node).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::{connect_clients, target_from};
use crate::cli::FanoutArgs;
use crate::client::{ClientSpec, Session};
use crate::payload::{Probe, now_us};
use crate::progress::{self, fmt_us};
use crate::protocol::{Incoming, Protocol, SendStyle};
use crate::report::{self, FanoutStep};
use crate::stats::{
    Counters, Delivery, LatencySummary, ReceiverTracker, StepLatency, Tally, expected_deliveries,
    summarize_loss, tally_delta,
};
use crate::sys;

/// Lock shards per latency histogram.
const SHARDS: usize = 8;
/// Node index of a client that never connected.
const NO_NODE: u16 = u16::MAX;

/// Counters and latency of one step.
struct Step {
    counters: Counters,
    room_sent: Vec<AtomicU64>,
    latency: StepLatency,
}

/// State every client task shares.
struct Shared {
    steps: Vec<Step>,
    current: AtomicU32,
    /// Node (interned name) of each client, by client index: same-node vs cross-node latency.
    client_node: Vec<u16>,
    alive_per_room: Vec<AtomicU64>,
    disconnects: Tally,
    /// Error frames from the servers, by code.
    error_codes: Tally,
}

impl Shared {
    fn step(&self) -> &Step {
        let i = self.current.load(Ordering::Relaxed) as usize;
        &self.steps[i.min(self.steps.len() - 1)]
    }
}

/// What the coordinator tells client tasks.
#[derive(Debug, Clone, Copy)]
enum Command {
    Wait,
    Run {
        step: u32,
        rate: f64,
        start: Instant,
        count: u64,
    },
    Stop,
}

/// Fixed per-client facts.
struct ClientRole {
    index: usize,
    room_index: usize,
    room: String,
    /// Rank among all senders (for staggering), if this client sends.
    sender_rank: Option<usize>,
    total_senders: usize,
    size: usize,
    style: SendStyle,
    protocol: Protocol,
}

struct SendPlan {
    step: u32,
    next_seq: u64,
    count: u64,
    tick: tokio::time::Interval,
}

async fn next_tick(plan: &mut Option<SendPlan>) {
    match plan {
        Some(p) => {
            p.tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub async fn run(args: FanoutArgs) -> Result<()> {
    if args.rooms == 0 || args.clients < args.rooms {
        bail!("need at least one client per room (--clients ≥ --rooms ≥ 1)");
    }
    if args.senders == 0 || args.senders * args.rooms > args.clients {
        bail!("--senders must be between 1 and clients/rooms");
    }
    if args.rates.is_empty() || args.rates.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        bail!("--rates must be positive numbers");
    }
    if args.clients > u32::MAX as usize {
        bail!("too many clients");
    }
    let target = target_from(&args.target).await?;
    let url_strings: Vec<String> = target.urls.iter().map(|u| u.to_string()).collect();

    // Connect everybody.
    let (sessions, connect_report, _) = connect_clients(
        &target,
        &args.target,
        0..args.clients,
        args.rooms,
        "fanout connect".into(),
        args.output.quiet,
    )
    .await;
    if sessions.is_empty() {
        bail!("no client could connect: {:?}", connect_report.failures);
    }
    if !args.output.quiet {
        eprintln!(
            "connected {}/{} in {:.2}s; failures {:?}; nodes {:?}",
            connect_report.connected,
            connect_report.attempted,
            connect_report.elapsed_s,
            connect_report.failures,
            connect_report.nodes
        );
    }

    // Shared state: node of each client, members per room, one Step per rate.
    let mut node_ids: HashMap<String, u16> = HashMap::new();
    let mut client_node = vec![NO_NODE; args.clients];
    let alive_per_room: Vec<AtomicU64> = (0..args.rooms).map(|_| AtomicU64::new(0)).collect();
    for (spec, session) in &sessions {
        let name = session.node.clone().unwrap_or_default();
        let next = node_ids.len() as u16;
        client_node[spec.index] = *node_ids.entry(name).or_insert(next);
        alive_per_room[spec.index % args.rooms].fetch_add(1, Ordering::Relaxed);
    }
    let shared = Arc::new(Shared {
        steps: args
            .rates
            .iter()
            .map(|_| Step {
                counters: Counters::default(),
                room_sent: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
                latency: StepLatency::new(SHARDS),
            })
            .collect(),
        current: AtomicU32::new(0),
        client_node,
        alive_per_room,
        disconnects: Tally::default(),
        error_codes: Tally::default(),
    });

    let senders_connected = sessions
        .iter()
        .filter(|(s, _)| s.index / args.rooms < args.senders)
        .count();
    let total_senders = args.senders * args.rooms;
    if senders_connected < total_senders && !args.output.quiet {
        eprintln!("warning: only {senders_connected} of {total_senders} senders connected");
    }

    let (control, control_rx) = watch::channel(Command::Wait);
    let mut tasks = Vec::with_capacity(sessions.len());
    for (spec, session) in sessions {
        let role = role_of(&spec, &args, target.protocol, total_senders);
        tasks.push(tokio::spawn(client_task(
            session,
            role,
            shared.clone(),
            control_rx.clone(),
        )));
    }
    drop(control_rx);

    tokio::time::sleep(args.settle).await;

    for (k, &rate) in args.rates.iter().enumerate() {
        let k32 = k as u32;
        let count = (rate * args.duration.as_secs_f64()).round().max(1.0) as u64;
        let before = sys::snapshot(&args.output.pids);
        let closed_before = shared.disconnects.snapshot();
        let errors_before = shared.error_codes.snapshot();
        let members: Vec<u64> = shared
            .alive_per_room
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        shared.current.store(k32, Ordering::Relaxed);
        let started = Instant::now();
        let _ = control.send(Command::Run {
            step: k32,
            rate,
            start: started + Duration::from_millis(20),
            count,
        });

        let guard = step_progress(&args, &shared, k, rate);
        tokio::time::sleep(args.duration + Duration::from_millis(20)).await;
        tokio::time::sleep(args.drain).await;
        drop(guard);
        let _ = control.send(Command::Wait);

        let after = sys::snapshot(&args.output.pids);
        let step = &shared.steps[k];
        let c = &step.counters;
        let room_sent: Vec<u64> = step
            .room_sent
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let loss = summarize_loss(
            expected_deliveries(&room_sent, &members),
            Counters::get(&c.delivered),
            Counters::get(&c.duplicates),
        );
        let report = FanoutStep {
            scenario: "fanout",
            protocol: target.protocol,
            urls: url_strings.clone(),
            step: k32,
            rate_per_sender: rate,
            senders: total_senders as u64,
            rooms: args.rooms as u64,
            clients: args.clients as u64,
            members: members.iter().sum(),
            payload_bytes: args.size,
            duration_s: args.duration.as_secs_f64(),
            drain_s: args.drain.as_secs_f64(),
            planned: count * senders_connected as u64,
            sent: Counters::get(&c.sent),
            send_failures: Counters::get(&c.send_failures),
            loss,
            stale: Counters::get(&c.stale),
            foreign: Counters::get(&c.foreign),
            bad_frames: Counters::get(&c.bad_frames),
            acks: Counters::get(&c.acks),
            server_errors: Counters::get(&c.server_errors),
            server_error_codes: tally_delta(&errors_before, &shared.error_codes.snapshot()),
            delivered_per_s: (loss.delivered as f64 / args.duration.as_secs_f64()).round(),
            latency_us: LatencySummary::of(&step.latency.all.merged()),
            latency_same_node_us: LatencySummary::of(&step.latency.same_node.merged()),
            latency_cross_node_us: LatencySummary::of(&step.latency.cross_node.merged()),
            disconnects: tally_delta(&closed_before, &shared.disconnects.snapshot()),
            loadgen_cpu_s: before.self_cpu_until(&after),
            loadgen_rss_kib: after.self_rss_kib(),
            processes: before.usage_until(&after, &args.output.pids),
            connect: connect_report.clone(),
        };
        report::emit(&report, args.output.json, FanoutStep::human);
    }

    let _ = control.send(Command::Stop);
    let deadline = Instant::now() + Duration::from_secs(5);
    for t in tasks {
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn role_of(spec: &ClientSpec, args: &FanoutArgs, protocol: Protocol, total: usize) -> ClientRole {
    let rank = spec.index; // senders are clients 0 .. senders × rooms
    ClientRole {
        index: spec.index,
        room_index: spec.index % args.rooms,
        room: spec.room.clone(),
        sender_rank: (spec.index / args.rooms < args.senders).then_some(rank),
        total_senders: total,
        size: args.size,
        style: args.send_style,
        protocol,
    }
}

fn step_progress(
    args: &FanoutArgs,
    shared: &Arc<Shared>,
    k: usize,
    rate: f64,
) -> progress::ProgressGuard {
    let shared = shared.clone();
    let steps = args.rates.len();
    let mut last_delivered = 0u64;
    let mut last_t = Duration::ZERO;
    progress::spawn(args.output.quiet, move |t| {
        let step = &shared.steps[k];
        let c = &step.counters;
        let delivered = Counters::get(&c.delivered);
        let dt = (t - last_t).as_secs_f64().max(1e-3);
        let per_s = (delivered - last_delivered) as f64 / dt;
        last_delivered = delivered;
        last_t = t;
        let p99 = LatencySummary::of(&step.latency.all.merged()).p99_us;
        Some(format!(
            "[fanout step {}/{} rate={}/s {:>4.0}s] connected={} sent={} delivered/s={:.0} dup={} p99={} closed={}",
            k + 1,
            steps,
            rate,
            t.as_secs_f64(),
            shared
                .alive_per_room
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum::<u64>(),
            Counters::get(&c.sent),
            per_s,
            Counters::get(&c.duplicates),
            fmt_us(p99),
            shared.disconnects.total()
        ))
    })
}

async fn client_task(
    mut session: Session,
    role: ClientRole,
    shared: Arc<Shared>,
    mut control: watch::Receiver<Command>,
) {
    let mut tracker = ReceiverTracker::default();
    let mut plan: Option<SendPlan> = None;
    let mut text = String::with_capacity(role.size + 64);
    let mut frame = String::with_capacity(role.size + 128);
    let my_node = shared.client_node[role.index];

    let ended = 'session: loop {
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    break None;
                }
                let cmd = *control.borrow_and_update();
                match cmd {
                    Command::Run { step, rate, start, count } => {
                        if let Some(rank) = role.sender_rank {
                            let period = Duration::from_secs_f64(1.0 / rate);
                            // Spread senders over the period so they do not fire together.
                            let offset = period.mul_f64(rank as f64 / role.total_senders.max(1) as f64);
                            let mut tick = tokio::time::interval_at(start + offset, period);
                            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                            plan = Some(SendPlan { step, next_seq: 0, count, tick });
                        }
                    }
                    Command::Wait => plan = None,
                    Command::Stop => break None,
                }
            }
            _ = next_tick(&mut plan) => {
                let Some(p) = plan.as_mut() else { continue };
                let probe = Probe { step: p.step, sender: role.index as u32, seq: p.next_seq, sent_us: now_us() };
                probe.encode_into(role.size, &mut text);
                role.protocol.encode_chat(role.style, &role.room, &text, &mut frame);
                p.next_seq += 1;
                let done = p.next_seq >= p.count;
                let step = &shared.steps[p.step as usize];
                if done {
                    plan = None;
                }
                match session.send_text(&frame).await {
                    Ok(()) => {
                        Counters::add(&step.counters.sent, 1);
                        Counters::add(&step.room_sent[role.room_index], 1);
                    }
                    Err(e) => {
                        Counters::add(&step.counters.send_failures, 1);
                        break Some(e.0);
                    }
                }
            }
            r = session.recv_text() => {
                let mut next = Some(r);
                // Handle every frame the same read brought in before going back to select!,
                // which costs a control-channel registration per turn.
                while let Some(r) = next {
                    let text_in = match r {
                        Ok(t) => t,
                        Err(e) => break 'session Some(e.0),
                    };
                    match on_frame(&role, &shared, &mut tracker, my_node, text_in) {
                        FrameAction::None => {}
                        FrameAction::Reply(reply) => {
                            if let Err(e) = session.send_text(&reply).await {
                                break 'session Some(e.0);
                            }
                        }
                        FrameAction::Closed => break 'session Some("server_closed".into()),
                    }
                    next = session.try_recv_text();
                }
            }
        }
    };

    match ended {
        Some(label) => {
            shared.disconnects.add(&label);
            shared.alive_per_room[role.room_index].fetch_sub(1, Ordering::Relaxed);
        }
        None => session.close(Duration::from_secs(1)).await,
    }
}

enum FrameAction {
    None,
    Reply(String),
    Closed,
}

fn on_frame(
    role: &ClientRole,
    shared: &Shared,
    tracker: &mut ReceiverTracker,
    my_node: u16,
    text: &str,
) -> FrameAction {
    let step = shared.step();
    let c = &step.counters;
    match role.protocol.decode(text) {
        Ok(Incoming::Chat(message)) => {
            let Some(probe) = Probe::decode(&message) else {
                Counters::add(&c.foreign, 1);
                return FrameAction::None;
            };
            let current = shared.current.load(Ordering::Relaxed);
            if probe.step < current {
                Counters::add(&c.stale, 1);
                return FrameAction::None;
            }
            let sender_node = shared.client_node.get(probe.sender as usize).copied();
            if probe.step > current || sender_node.is_none() {
                Counters::add(&c.foreign, 1);
                return FrameAction::None;
            }
            match tracker.record(probe.step, probe.sender, probe.seq) {
                Delivery::First => {
                    Counters::add(&c.delivered, 1);
                    let latency = now_us().saturating_sub(probe.sent_us);
                    step.latency
                        .record(role.index, latency, sender_node == Some(my_node));
                }
                Delivery::Duplicate => Counters::add(&c.duplicates, 1),
                Delivery::OutOfRange => Counters::add(&c.foreign, 1),
            }
            FrameAction::None
        }
        Ok(Incoming::Ack) => {
            Counters::add(&c.acks, 1);
            FrameAction::None
        }
        Ok(Incoming::Error { code }) => {
            Counters::add(&c.server_errors, 1);
            shared.error_codes.add(&code);
            FrameAction::None
        }
        Ok(Incoming::Reply(r)) => FrameAction::Reply(r),
        Ok(Incoming::Closed) => FrameAction::Closed,
        Ok(Incoming::Ready { .. } | Incoming::Other) => FrameAction::None,
        Err(_) => {
            Counters::add(&c.bad_frames, 1);
            FrameAction::None
        }
    }
}
