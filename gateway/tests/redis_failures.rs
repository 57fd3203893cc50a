//! Redis failing under traffic, against real processes: killed pub/sub connections, write
//! pauses longer than the command timeout, a publisher slow to come back after a reconnect,
//! SIGKILL and restart with and without persistence. No acknowledged message may be lost
//! without the member being told, and none may arrive twice; a retry with the same `cid` is
//! recognised for the documented window.

mod common;

use std::time::Duration;

use common::relay::{Delay, Relay};
use common::traffic::{Live, Traffic};
use common::{Client, Gateway, Node, Persistence, Redis, upgrade_request, wait_until};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn three_nodes(redis: &Redis, extra: &[&str]) -> [Node; 3] {
    ["node-a", "node-b", "node-c"].map(|id| Node::clustered(id, redis, extra))
}

/// The value of `chat_broker_repairs_total{outcome=…}` on a node.
fn repairs(node: &Node, outcome: &str) -> f64 {
    let (_, body) = node.get("/metrics").expect("metrics answer");
    let label = format!("outcome=\"{outcome}\"");
    body.lines()
        .filter(|line| line.starts_with("chat_broker_repairs_total{") && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_ready(nodes: &[&Node]) {
    for node in nodes {
        wait_until("the node to be ready", || {
            node.get("/readyz").is_some_and(|(status, _)| status == 200)
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pubsub_connection_and_a_write_pause_lose_no_acked_message() {
    let redis = Redis::start_with(Persistence::Aof);
    let nodes = three_nodes(&redis, &["--redis-timeout", "1s"]);
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let traffic = Traffic::start(&live, "pause", 9, 3, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every node's subscriber loses its connection; while they resubscribe and repair, writes
    // (every publish) stall for longer than the nodes wait for Redis.
    redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .expect("kill the subscribers");
    redis
        .command(&["CLIENT", "PAUSE", "3000", "WRITE"])
        .expect("pause writes");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();
    assert!(
        report
            .sent
            .retried
            .get("publish_unknown")
            .copied()
            .unwrap_or(0)
            > 0,
        "publishes outlived the timeout: {:?}",
        report.sent.retried
    );
    for node in &nodes {
        assert!(
            repairs(node, "repaired") > 0.0,
            "{} repaired its room",
            node.id
        );
    }
}

/// Runs traffic over node a (whose link to Redis makes its publisher, once reconnected, reach
/// Redis 1.5 s late for `slow_for`) and node b, cuts node a's connections after a second, and
/// reports after `after` more; node a is returned for its metrics.
async fn traffic_while_a_publisher_comes_back_late(
    room: &str,
    slow_for: Duration,
    extra: &[&str],
    after: Duration,
) -> (common::traffic::Report, Node) {
    let redis = Redis::start_with(Persistence::Aof);
    let delay = Delay::YoungPublisher {
        delay: Duration::from_millis(1500),
        window: slow_for,
    };
    let relay = Relay::start(redis.port, delay);
    let a = Node::start("node-a", Some(&relay.url()), extra);
    let b = Node::clustered("node-b", &redis, extra);
    let live = Live::of([a.ws_base(), b.ws_base()]);
    let traffic = Traffic::start(&live, room, 6, 2, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.cut();
    tokio::time::sleep(after).await;
    (traffic.finish().await, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_back_before_its_publisher_repairs_once_the_publisher_answers() {
    // Node a's subscriber is back long before its publisher can read history.
    let (report, a) = traffic_while_a_publisher_comes_back_late(
        "late",
        Duration::from_secs(3),
        &["--redis-timeout", "1s"],
        Duration::from_secs(6),
    )
    .await;
    report.assert_exactly_once();
    assert!(
        repairs(&a, "failed") > 0.0,
        "node a's first history reads failed"
    );
    assert!(
        repairs(&a, "repaired") > 0.0,
        "and a later one repaired the gap"
    );
    assert_eq!(repairs(&a, "resync"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_cannot_repair_in_time_sends_its_members_to_resume_elsewhere() {
    // The load balancer keeps sending clients to node a: some resume there again and wait.
    let (report, a) = traffic_while_a_publisher_comes_back_late(
        "stuck",
        Duration::from_secs(6),
        &["--redis-timeout", "1s", "--repair-timeout", "1s"],
        Duration::from_secs(8),
    )
    .await;
    report.assert_exactly_once();
    assert!(
        repairs(&a, "resync") > 0.0,
        "node a gave up and resynced its members"
    );
    let resynced = report
        .seen
        .iter()
        .filter(|seen| seen.closes.contains(&4002))
        .count();
    assert!(resynced > 0, "members were closed with 4002");
}

/// Kills and restarts Redis ten times under traffic, each time down for a little longer.
async fn restart_ten_times(redis: &mut Redis, nodes: &[Node]) {
    for round in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(200 + 100 * round)).await;
        redis.restart();
        wait_ready(&nodes.iter().collect::<Vec<_>>());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_ten_times_with_aof_loses_no_acked_message() {
    let mut redis = Redis::start_with(Persistence::Aof);
    let nodes = three_nodes(&redis, &["--redis-timeout", "1s"]);
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let traffic = Traffic::start(&live, "aof", 6, 2, Duration::from_millis(20)).await;
    restart_ten_times(&mut redis, &nodes).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_ten_times_without_persistence_never_loses_silently() {
    let mut redis = Redis::start();
    let nodes = three_nodes(&redis, &["--redis-timeout", "1s"]);
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let traffic = Traffic::start(&live, "volatile", 6, 2, Duration::from_millis(20)).await;
    restart_ten_times(&mut redis, &nodes).await;
    let report = traffic.finish().await;
    report.assert_no_silent_loss();
    let told: usize = report.seen.iter().map(|seen| seen.not_recovered).sum();
    assert!(told > 0, "history was lost ten times: members were told");
}

#[tokio::test]
async fn a_stall_past_the_timeout_is_reported_as_unknown_and_a_cid_retry_is_stored_once() {
    let redis = Redis::start_with(Persistence::Aof);
    let a = Node::clustered("node-a", &redis, &["--redis-timeout", "500ms"]);
    let b = Node::clustered("node-b", &redis, &[]);
    let mut sender = Client::connect(&a.ws_url("/ws?room=stall")).await;
    let mut member = Client::connect(&b.ws_url("/ws?room=stall")).await;
    sender.say("stall", "warm-up").await;
    for client in [&mut sender, &mut member] {
        assert_eq!(client.recv_type("message").await["message"], "warm-up");
    }

    redis
        .command(&["CLIENT", "PAUSE", "1500", "WRITE"])
        .expect("pause writes");
    sender
        .send(json!({"type":"message","message":"stalled","cid":"c-1","ref":"m"}))
        .await;
    // While the publish waits on Redis (500 ms), the connection still answers pings of both
    // kinds, at once.
    sender.send(json!({"type":"ping","ref":"p"})).await;
    sender
        .send_raw(Message::Ping(b"still there?".to_vec().into()))
        .await;
    assert!(
        sender.recv_pong(Duration::from_millis(300)).await,
        "a pong at once"
    );
    let pong = sender
        .recv_within(Duration::from_millis(100))
        .await
        .expect("a typed pong");
    assert_eq!(
        (pong["type"].as_str(), pong["ref"].as_str()),
        (Some("pong"), Some("p"))
    );
    let refused = sender.recv_type("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("publish_unknown"), Some("m")),
        "the outcome is unknown, not failed: {refused}"
    );

    // Redis runs the publish once the pause ends: the member gets it.
    let delivered = member.recv_type("message").await;
    assert_eq!(delivered["message"], "stalled");
    // The client does as told and sends it again with the same cid: the original's ack.
    sender
        .send(json!({"type":"message","message":"stalled","cid":"c-1","ref":"again"}))
        .await;
    let ack = sender.recv_type("ack").await;
    assert_eq!(ack["ref"], "again");
    assert_eq!(ack["duplicate"], true, "{ack}");
    assert_eq!(ack["id"], delivered["id"]);
    assert_eq!(ack["offset"], delivered["offset"]);
    assert_eq!(
        member.recv_within(Duration::from_millis(500)).await,
        None,
        "the retry was not delivered again"
    );
}

#[tokio::test]
async fn a_cid_is_known_for_at_least_its_window_and_new_again_after_two() {
    let redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &["--dedup-window", "2s"]);
    let mut client = Client::connect(&node.ws_url("/ws?room=window")).await;
    let message = |cid: &str, reference: &str| json!({"type":"message","message":format!("text {cid}"),"cid":cid,"ref":reference});
    client.send(message("a", "a1")).await;
    let first = client.recv_type("ack").await;
    let sent = tokio::time::Instant::now();

    // Past one window, another cid starts a new generation; `a` stays known in the old one.
    tokio::time::sleep_until(sent + Duration::from_millis(2400)).await;
    client.send(message("b", "b1")).await;
    assert_eq!(client.recv_type("ack").await["ref"], "b1");
    client.send(message("a", "a2")).await;
    let again = client.recv_type("ack").await;
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "the retry came within two windows"
    );
    assert_eq!(
        (&again["duplicate"], &again["id"], &again["offset"]),
        (&json!(true), &first["id"], &first["offset"]),
        "a retry within the window is the original: {again}"
    );

    // Two windows after `a` was stored, it is forgotten: the same cid is a new message.
    tokio::time::sleep_until(sent + Duration::from_millis(4600)).await;
    client.send(message("a", "a3")).await;
    let later = client.recv_type("ack").await;
    assert_ne!(later["duplicate"], true, "{later}");
    assert_ne!(later["id"], first["id"]);
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

/// A client that sends `frame` over and over, as fast as the socket takes it, and never reads;
/// its receive buffer is small, so the server's replies pile up on the server. Returns once its
/// writes fail (the server closed the connection) or after `within`.
async fn flood_without_reading(port: u16, frame: Vec<u8>, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let request = upgrade_request(port, "/ws?room=flood", &[]);
    stream
        .write_all(request.as_bytes())
        .await
        .expect("handshake");
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .expect("the handshake answer");
    assert_eq!(&head, b"HTTP/1.1 101", "upgraded");
    // Whole frames only: a write cut off mid-frame and started again would send the node a
    // broken frame instead of a flood.
    let burst = frame.repeat(64);
    let mut written = 0;
    let flood = async {
        loop {
            stream.write_all(&burst).await?;
            written += burst.len();
        }
    };
    match tokio::time::timeout(within, flood).await {
        Ok(Err::<(), std::io::Error>(_)) => true,
        _ => {
            eprintln!("a flooding client was still connected after {written} bytes");
            false
        }
    }
}

/// A masked client frame (for floods; any payload under 126 bytes or up to 64 KiB).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..126 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    frame
}

/// Floods `node` from `clients` clients sending `frame` without reading, samples the node's
/// resident memory meanwhile, waits until the node has closed them all, and returns how much
/// its memory grew at the peak.
async fn peak_growth_while_flooded(node: &Node, clients: usize, frame: &[u8]) -> u64 {
    let pid = node.process.pid();
    let before = rss_bytes(pid);
    let floods: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(flood_without_reading(
                node.port,
                frame.to_vec(),
                Duration::from_secs(20),
            ))
        })
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    for flood in floods {
        assert!(
            flood.await.expect("a flood"),
            "the node closed the flooding client"
        );
    }
    wait_until("every flooding connection to be closed", || {
        node.metric("chat_connections_open") == 0.0
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.await.expect("the sampler").saturating_sub(before)
}

/// docs/operations.md: what one connection may hold at most with the default limits (outbox
/// bytes, frames waiting for the broker, the reader, the fixed part), about 1.3 MiB.
const BOUND_PER_CONNECTION: u64 = 1_363_148;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_flood_pings_without_reading_are_closed_within_the_memory_bound() {
    // Rate limits off (the harness's default): only the per-connection bounds hold them.
    let node = Node::single(&[]);
    let ping = masked(0x9, &[b'p'; 125]);
    let grown = peak_growth_while_flooded(&node, 10, &ping).await;
    let echoed_ref = format!(r#"{{"type":"ping","ref":"{}"}}"#, "r".repeat(126));
    let echoed = masked(0x1, echoed_ref.as_bytes());
    let grown = grown.max(peak_growth_while_flooded(&node, 10, &echoed).await);
    eprintln!(
        "10 flooding clients grew the node by at most {} KiB",
        grown / 1024
    );
    assert!(grown < 10 * BOUND_PER_CONNECTION, "grew by {grown} bytes");
    assert_eq!(node.metric("chat_slow_consumer_disconnects_total"), 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_flood_large_refs_are_refused_without_echo_and_closed_by_the_rate_limit() {
    // The default limits: 20 frames a second, then 50 strikes.
    let node = Node::single(&["--conn-message-rate", "20", "--rate-limit-strikes", "50"]);
    let large_ref = format!(r#"{{"type":"ping","ref":"{}"}}"#, "r".repeat(60_000));
    let typed = masked(0x1, large_ref.as_bytes());
    let grown = peak_growth_while_flooded(&node, 10, &typed).await;
    eprintln!(
        "10 clients sending 60 KB refs grew the node by at most {} KiB",
        grown / 1024
    );
    assert!(grown < 10 * BOUND_PER_CONNECTION, "grew by {grown} bytes");
    let (_, metrics) = node.get("/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"chat_policy_closes_total{node="solo",reason="rate_limit"} 10"#),
        "every flooder was closed with 1008"
    );
}
