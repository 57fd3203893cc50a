//! End to end through the native cluster exactly as `deploy/local/cluster.sh` runs it:
//! redis-server, three `chat-gateway` nodes, nginx in front of them and Prometheus scraping
//! them, every component on its own free loopback port with its own state dir, so these tests
//! run in parallel with each other and with the other integration tests. Also checks that the
//! shipped deployment files pass `deploy/validate.sh`.
//!
//! Each test owns a [`Cluster`] whose `Drop` runs `cluster.sh down`, so a failing test leaves
//! nothing running (and prints the end of every component's log).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Ended, connect_from, http_exchange, http_get};
use common::{TempDir, temp_dir};
use serde_json::Value;

/// Gateway nodes per cluster.
const NODES: usize = 3;
/// How long clients of a killed node may take to get through nginx to a live node again.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(30);
/// How long Prometheus may take to scrape (every 5s) what a test expects to see.
const SCRAPE_PATIENCE: Duration = Duration::from_secs(60);
/// Per-component start-up budget handed to cluster.sh (`CLUSTER_TIMEOUT`, seconds); generous
/// because CI machines are small and run other test binaries at the same time.
const COMPONENT_TIMEOUT_SECS: &str = "60";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the gateway crate lives in the workspace root")
        .to_path_buf()
}

/// `PATH` plus the sbin directories: Debian installs nginx in /usr/sbin, which a non-root
/// user's `PATH` often lacks.
fn search_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin")
}

/// `count` distinct loopback ports nobody listens on right now.
fn distinct_free_ports(count: usize) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    while ports.len() < count {
        ports.insert(common::free_port());
    }
    ports.into_iter().collect()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A native cluster started by `deploy/local/cluster.sh up` in a private state dir; stopped
/// with `cluster.sh down` when dropped, whether the test passed or not.
struct Cluster {
    dir: TempDir,
    http_port: u16,
    node_ports: Vec<u16>,
    redis_port: u16,
    prometheus_port: u16,
    prometheus: bool,
    /// `GATEWAY_*` and `CLUSTER_*` settings of this test, for the script and the nodes.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts redis, [`NODES`] gateway nodes and nginx, plus Prometheus if asked. A port taken
    /// by someone else between choosing it and binding it is retried with fresh ports.
    fn up(prometheus: bool) -> Cluster {
        Self::up_with(prometheus, &[])
    }

    /// [`Cluster::up`] with `GATEWAY_*` and `CLUSTER_*` settings of the test's own.
    fn up_with(prometheus: bool, env: &[(&str, &str)]) -> Cluster {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let ports = distinct_free_ports(NODES + 3);
            let cluster = Cluster {
                dir: temp_dir("e2e-cluster"),
                http_port: ports[0],
                redis_port: ports[1],
                prometheus_port: ports[2],
                node_ports: ports[3..].to_vec(),
                prometheus,
                env: env
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                    .collect(),
            };
            // The guard exists before `up` runs: whatever `up` leaves behind is stopped.
            let output = cluster.script(&["up"]);
            if output.status.success() {
                return cluster;
            }
            let report = describe(&output);
            if attempt < ATTEMPTS && report.to_lowercase().contains("in use") {
                eprintln!("cluster.sh up hit a port in use, retrying with other ports:\n{report}");
                continue;
            }
            panic!("cluster.sh up failed: {report}");
        }
        unreachable!()
    }

    /// Runs `cluster.sh ARGS` against this cluster's state dir and ports.
    fn script(&self, args: &[&str]) -> Output {
        let node_ports: Vec<String> = self.node_ports.iter().map(u16::to_string).collect();
        let mut command = Command::new("bash");
        command
            .arg(repo_root().join("deploy/local/cluster.sh"))
            .args(args)
            .current_dir(repo_root())
            .stdin(Stdio::null());
        // Only what this test sets reaches the script and, through it, the nodes.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CLUSTER_") || name.starts_with("GATEWAY_") {
                command.env_remove(name.as_ref());
            }
        }
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        command
            .env_remove("REDIS_URL")
            .env("PATH", search_path())
            .env("CLUSTER_DIR", self.dir.path())
            .env("GATEWAY_BIN", env!("CARGO_BIN_EXE_chat-gateway"))
            .env("CLUSTER_HTTP_PORT", self.http_port.to_string())
            .env("CLUSTER_NODE_PORTS", node_ports.join(" "))
            .env("CLUSTER_REDIS_PORT", self.redis_port.to_string())
            .env("CLUSTER_PROMETHEUS_PORT", self.prometheus_port.to_string())
            .env(
                "CLUSTER_PROMETHEUS",
                if self.prometheus { "1" } else { "0" },
            )
            .env("CLUSTER_TIMEOUT", COMPONENT_TIMEOUT_SECS)
            .env(
                "RUST_LOG",
                std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .output()
            .expect("run deploy/local/cluster.sh")
    }

    /// The WebSocket URL of the cluster's entry point (nginx) for a default room.
    fn ws_url(&self, room: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?room={room}", self.http_port)
    }

    /// The node ids cluster.sh gives its nodes: node-1 .. node-N.
    fn node_ids(&self) -> BTreeSet<String> {
        (1..=self.node_ports.len())
            .map(|i| format!("node-{i}"))
            .collect()
    }

    /// The 1-based index of a node id ("node-2" -> 2).
    fn node_index(&self, id: &str) -> usize {
        let index: usize = id
            .strip_prefix("node-")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("unexpected node id {id:?}"));
        assert!((1..=self.node_ports.len()).contains(&index), "no node {id}");
        index
    }

    /// `cluster.sh kill-node I`: SIGKILL, as in a crash.
    fn kill_node(&self, index: usize) {
        let output = self.script(&["kill-node", &index.to_string()]);
        assert!(
            output.status.success(),
            "cluster.sh kill-node {index} failed: {}",
            describe(&output)
        );
    }

    /// The end of every component's log, for the report of a failed test.
    fn log_tails(&self) -> String {
        let mut report = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) else {
            return report;
        };
        let mut logs: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            report.push_str(&format!("--- {} ---\n", log.display()));
            for line in &lines[lines.len().saturating_sub(25)..] {
                report.push_str(line);
                report.push('\n');
            }
        }
        report
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster logs:\n{}", self.log_tails());
        }
        let output = self.script(&["down"]);
        if !output.status.success() {
            eprintln!("cluster.sh down failed: {}", describe(&output));
        }
    }
}

/// Connects through the load balancer, retrying failed attempts (a handshake nginx could not
/// pass to any node yet) until `within` has passed.
async fn connect_with_retry(url: &str, within: Duration) -> Client {
    let deadline = Instant::now() + within;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match Client::try_connect(url, Duration::from_secs(5)).await {
            Ok(client) => return client,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "could not connect to {url} within {within:?} ({attempts} attempts); last error: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads `message` frames until the one with id `last`; returns (id, text) of those before it.
async fn messages_until(client: &mut Client, last: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let frame = client.recv_type("message").await;
        let id = frame["id"].as_str().expect("message id").to_owned();
        if id == last {
            return seen;
        }
        let text = frame["message"].as_str().expect("message text").to_owned();
        seen.push((id, text));
    }
}

/// Asserts that every client receives each of `sent` exactly once, followed by the message
/// `sentinel` (sent last) and then nothing more.
async fn assert_each_received_once(
    clients: &mut [Client],
    sent: &[(String, String)],
    sentinel: &str,
) {
    let mut expected = sent.to_vec();
    expected.sort();
    for client in clients.iter_mut() {
        let mut seen = messages_until(client, sentinel).await;
        seen.sort();
        assert_eq!(
            seen, expected,
            "client {} on {} did not get every message exactly once",
            client.user_id, client.node
        );
    }
    // One quiet period shared by all clients: a late duplicate would arrive within it.
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(300);
    for client in clients.iter_mut() {
        let wait = quiet_until.saturating_duration_since(tokio::time::Instant::now());
        assert_eq!(
            client.recv_within(wait).await,
            None,
            "client {} on {} got something after the last message",
            client.user_id,
            client.node
        );
    }
}

fn count_by_node(clients: &[Client]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for client in clients {
        *counts.entry(client.node.clone()).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Prometheus over plain HTTP

/// Percent-encodes a query-string value.
fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// GET `path` from Prometheus and parse the JSON body. HTTP/1.0, so the body is never chunked;
/// `None` if nothing answered or the answer was not a 200 with JSON.
fn prometheus_get(port: u16, path: &str) -> Option<Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if head.split(' ').nth(1) != Some("200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The result vector of an instant query, or an explanation of why there is none.
fn prometheus_query(port: u16, query: &str) -> Result<Vec<Value>, String> {
    let path = format!("/api/v1/query?query={}", url_encode(query));
    let reply = prometheus_get(port, &path).ok_or_else(|| format!("no answer to {path}"))?;
    if reply["status"] != "success" {
        return Err(format!("query {query} failed: {reply}"));
    }
    reply["data"]["result"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("query {query}: no result vector: {reply}"))
}

/// The value of a single-series sample (`"value": [ts, "12"]`).
fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("sample without a numeric value: {sample}"))
}

/// Polls `probe` until it returns `Ok` or `within` has passed; the last error explains a failure.
async fn poll<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(why) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; last seen: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// tests

#[tokio::test]
async fn clients_through_nginx_are_spread_over_all_nodes_and_share_a_room_exactly_once() {
    let cluster = Cluster::up(false);
    let url = cluster.ws_url("e2e");
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(Client::connect(&url).await);
    }
    let per_node = count_by_node(&clients);
    assert_eq!(
        per_node.keys().cloned().collect::<BTreeSet<_>>(),
        cluster.node_ids(),
        "nginx (least_conn) puts 12 connections on every one of the {NODES} nodes: {per_node:?}"
    );

    // One sender on each node; every member, whichever node holds it, gets every message once.
    let mut sent = Vec::new();
    for node in per_node.keys() {
        let sender = clients
            .iter_mut()
            .find(|client| &client.node == node)
            .expect("a client on this node");
        let text = format!("hello from a client on {node}");
        let id = sender.say("e2e", &text).await;
        sent.push((id, text));
    }
    let sentinel = clients[0].say("e2e", "that is all").await;
    assert_each_received_once(&mut clients, &sent, &sentinel).await;
}

#[tokio::test]
async fn an_sse_stream_and_its_posts_pass_nginx_unbuffered_whichever_node_they_reach() {
    let cluster = Cluster::up_with(
        false,
        &[
            ("GATEWAY_PING_INTERVAL", "500ms"),
            ("GATEWAY_IDLE_TIMEOUT", "5s"),
        ],
    );
    let port = cluster.http_port;
    let mut sse = common::sse::SseClient::open(port, "/sse?room=fallback", &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("GET /sse through nginx: {status} {body}"));
    let mut ws = connect_with_retry(&cluster.ws_url("fallback"), FAILOVER_PATIENCE).await;
    // nginx spreads the POSTs (least_conn): each reaches the stream's node whichever it lands
    // on, and each answer reaches the stream at once (nothing waits in a proxy buffer).
    for i in 0..6 {
        let reply = sse
            .post(serde_json::json!([{"type":"message","message":format!("p{i}"),"ref":i}]))
            .await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let ack = tokio::time::timeout(Duration::from_secs(5), sse.recv_type("ack"))
            .await
            .expect("the ack came through nginx in time");
        assert_eq!(ack["ref"], i);
    }
    let heard = common::messages(&mut ws, 6).await;
    assert_eq!(common::texts(&heard), ["p0", "p1", "p2", "p3", "p4", "p5"]);
    // Heartbeats come through as they are written.
    let started = Instant::now();
    loop {
        match sse.next(Duration::from_secs(5)).await {
            common::sse::Next::Event(common::sse::SseEvent::Comment(_)) => break,
            common::sse::Next::Event(_) => continue,
            other => panic!("no heartbeat through nginx: {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));

    // The nodes share a secret: an anonymous reconnect keeps its userId on whichever node.
    let token = sse.welcome["reconnectToken"].as_str().unwrap().to_owned();
    let user = sse.welcome["userId"].as_str().unwrap().to_owned();
    // Each kept open, so least_conn sends the next one elsewhere.
    let mut again = Vec::new();
    for _ in 0..6 {
        let url = format!("ws://127.0.0.1:{port}/ws?reconnect={token}");
        again.push(connect_with_retry(&url, FAILOVER_PATIENCE).await);
    }
    assert!(again.iter().all(|client| client.user_id == user));
    let nodes: BTreeSet<&str> = again.iter().map(|client| client.node.as_str()).collect();
    assert!(nodes.len() > 1, "reconnected on one node only: {nodes:?}");
}

#[tokio::test]
async fn clients_of_a_killed_node_reconnect_through_nginx_to_the_survivors_and_chat_again() {
    let cluster = Cluster::up(false);
    let url = cluster.ws_url("failover");
    let mut clients = Vec::new();
    for _ in 0..9 {
        clients.push(Client::connect(&url).await);
    }
    let victim = clients[0].node.clone();
    let victim_index = cluster.node_index(&victim);
    let (mut cut_off, mut survivors): (Vec<Client>, Vec<Client>) = clients
        .into_iter()
        .partition(|client| client.node == victim);
    assert!(
        !survivors.is_empty(),
        "the clients are spread over more than one node"
    );
    let live: BTreeSet<String> = cluster
        .node_ids()
        .into_iter()
        .filter(|id| id != &victim)
        .collect();

    cluster.kill_node(victim_index);
    assert_eq!(
        http_get(cluster.node_ports[victim_index - 1], "/healthz", &[]),
        None,
        "{victim} no longer answers"
    );
    let status = cluster.script(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(3),
        "cluster.sh status reports a component down: {}",
        describe(&status)
    );

    // The killed node's clients see the connection end (no close frame: the node crashed).
    for client in &mut cut_off {
        let (_, ended) = client.recv_until_end().await;
        assert_eq!(
            ended,
            Ended::Dropped,
            "client {} on the killed {victim}",
            client.user_id
        );
    }

    // They reconnect through nginx and land on live nodes.
    let mut reconnected = Vec::new();
    for _ in &cut_off {
        let client = connect_with_retry(&url, FAILOVER_PATIENCE).await;
        assert!(
            live.contains(&client.node),
            "reconnected to {:?}, not one of the live nodes {live:?}",
            client.node
        );
        reconnected.push(client);
    }
    drop(cut_off);

    // The room works again for everyone: a message from a reconnected client and one from a
    // client that never lost its connection reach all of them exactly once.
    let mut sent = Vec::new();
    let text = "back after the crash".to_owned();
    sent.push((reconnected[0].say("failover", &text).await, text));
    let text = "never left".to_owned();
    sent.push((survivors[0].say("failover", &text).await, text));
    let sentinel = survivors[0].say("failover", "that is all").await;
    let mut everyone: Vec<Client> = reconnected.into_iter().chain(survivors).collect();
    assert_each_received_once(&mut everyone, &sent, &sentinel).await;
}

#[tokio::test]
async fn prometheus_scrapes_every_node_and_counts_the_chat_traffic() {
    let cluster = Cluster::up(true);
    let prometheus = cluster.prometheus_port;
    let job = "chat-gateway"; // deploy/prometheus/prometheus.yml
    let instances: BTreeSet<String> = cluster
        .node_ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();

    poll(
        "Prometheus to report every gateway target up",
        SCRAPE_PATIENCE,
        || {
            let targets = prometheus_get(prometheus, "/api/v1/targets?state=active")
                .ok_or("no answer from /api/v1/targets")?;
            let health: BTreeMap<String, String> = targets["data"]["activeTargets"]
                .as_array()
                .ok_or_else(|| format!("no activeTargets: {targets}"))?
                .iter()
                .filter(|target| target["labels"]["job"] == job)
                .map(|target| {
                    (
                        target["labels"]["instance"]
                            .as_str()
                            .unwrap_or("?")
                            .to_owned(),
                        target["health"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect();
            let all_up = health.keys().cloned().collect::<BTreeSet<_>>() == instances
                && health.values().all(|health| health == "up");
            if all_up {
                Ok(())
            } else {
                Err(format!(
                    "{job} targets {health:?}, expected {instances:?} up"
                ))
            }
        },
    )
    .await;
    let up = prometheus_query(prometheus, &format!("up{{job=\"{job}\"}}")).expect("query up");
    let up: BTreeMap<String, f64> = up
        .iter()
        .map(|sample| {
            (
                sample["metric"]["instance"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                sample_value(sample),
            )
        })
        .collect();
    assert_eq!(
        up,
        instances
            .iter()
            .map(|instance| (instance.clone(), 1.0))
            .collect(),
        "up{{job=\"{job}\"}} is 1 for every node"
    );

    let delivered = "sum(chat_messages_delivered_total)";
    let delivered_now = || -> Result<f64, String> {
        // No series yet (nothing delivered so far) reads as zero.
        Ok(prometheus_query(prometheus, delivered)?
            .first()
            .map(sample_value)
            .unwrap_or(0.0))
    };
    let before = delivered_now().expect("query the delivered counter");

    // Chat traffic through nginx: six members spread over the nodes, five messages.
    let url = cluster.ws_url("metrics");
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Client::connect(&url).await);
    }
    let mut sent = Vec::new();
    for i in 0..4 {
        let text = format!("counted {i}");
        let sender = i % clients.len();
        sent.push((clients[sender].say("metrics", &text).await, text));
    }
    let sentinel = clients[0].say("metrics", "that is all").await;
    assert_each_received_once(&mut clients, &sent, &sentinel).await;
    let deliveries = (clients.len() * (sent.len() + 1)) as f64;

    let after = poll("Prometheus to see the deliveries", SCRAPE_PATIENCE, || {
        let now = delivered_now()?;
        if now >= before + deliveries {
            Ok(now)
        } else {
            Err(format!("{delivered} = {now}, before the traffic {before}"))
        }
    })
    .await;
    assert_eq!(
        after,
        before + deliveries,
        "{delivered} rose by exactly the {deliveries} deliveries the clients received"
    );
}

#[tokio::test]
async fn the_server_api_passes_nginx_only_from_the_network_the_operator_names() {
    const KEY: &str = "e2e-api-key-0123456789";
    // 127.0.0.2 stands for the backend's network; 127.0.0.1 for everyone else.
    let backend = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let public = std::net::Ipv4Addr::LOCALHOST;
    let cluster = Cluster::up_with(
        false,
        &[
            ("GATEWAY_API_KEY", KEY),
            ("CLUSTER_API_ALLOW", "127.0.0.2/32"),
        ],
    );
    let mut member = connect_with_retry(&cluster.ws_url("ops"), FAILOVER_PATIENCE).await;
    let auth = format!("Bearer {KEY}");
    let publish = |from, text: &str| {
        let body = serde_json::json!({"room": "ops", "message": text}).to_string();
        let stream = connect_from(from, cluster.http_port).expect("connect to nginx");
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        http_exchange(stream, "POST", "/api/publish", &headers, body.as_bytes())
            .expect("nginx answered")
    };

    // The public side is refused before any node sees the call, key or not.
    assert_eq!(publish(public, "from outside").status, 403);
    let stream = connect_from(public, cluster.http_port).expect("connect to nginx");
    let description = http_exchange(stream, "GET", "/api/openapi.json", &[], b"").unwrap();
    assert_eq!(description.status, 403);
    // The chat itself is public as ever.
    let (status, _) = http_get(cluster.http_port, "/healthz", &[]).expect("nginx answered");
    assert_eq!(status, 200);

    let reply = publish(backend, "from the backend");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ack: Value = serde_json::from_str(&reply.body).expect("JSON");
    let message = member.recv_type("message").await;
    assert_eq!(
        (&message["message"], &message["id"]),
        (&Value::from("from the backend"), &ack["id"]),
        "only the backend's message arrived"
    );
}

#[test]
fn the_shipped_deploy_files_pass_validate_sh() {
    let output = Command::new("bash")
        .arg(repo_root().join("deploy/validate.sh"))
        .current_dir(repo_root())
        .env("PATH", search_path())
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/validate.sh");
    assert!(
        output.status.success(),
        "deploy/validate.sh failed: {}",
        describe(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("validate: all checks passed"),
        "validate.sh reports success: {}",
        describe(&output)
    );
    // Every check ran: none was skipped for a missing tool (scripts/test.sh installs them).
    let skipped: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("skip"))
        .collect();
    assert!(
        skipped.is_empty(),
        "validate.sh skipped checks: {skipped:?}"
    );
}
