//! Test harness: real `redis-server` and `chat-gateway` processes on free loopback ports, and a
//! small WebSocket client. Every process is killed when its handle drops, so a failing test
//! leaves nothing behind.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream as AsyncTcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod edge;
pub mod local;
pub mod redis_cluster;
pub mod relay;
pub mod scenarios;
pub mod sse;

pub use tempfile::TempDir;

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}
pub mod traffic;

/// How long any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Polls `condition` until it holds or [`PATIENCE`] runs out.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    fn spawn(name: &str, command: &mut Command) -> Process {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Process {
            child,
            name: name.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a program can be found on PATH.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed: run ./scripts/test.sh, which installs it"
    );
}

/// What the cluster tests need of a Redis deployment, whatever its topology.
pub trait SharedRedis {
    /// The URL a gateway node is given (`--redis-url`).
    fn url(&self) -> String;
    /// The rooms whose shard channel has subscribers anywhere, sorted.
    fn subscribed_rooms(&self) -> Vec<String>;
    /// How many subscribers a room's shard channel has.
    fn subscribers(&self, room: &str) -> u64;
}

/// Runs `redis-cli` against the server (or sentinel) on `port` with `options` before the
/// command; returns its raw output, one reply item per line.
pub fn redis_cli(port: u16, options: &[String], args: &[&str]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(options)
        .args(args)
        .output()
        .map_err(|error| error.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A private `redis-server` on a free loopback port.
pub struct Redis {
    pub port: u16,
    process: Process,
    dir: TempDir,
    persistence: Persistence,
    /// Further `redis-server` arguments, kept for a restart.
    args: Vec<String>,
    /// Not killed.
    running: bool,
}

/// Whether a test's Redis keeps its data across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing survives a restart.
    None,
    /// An append-only file written before each reply (`appendfsync always`): every write Redis
    /// acknowledged survives a SIGKILL.
    Aof,
}

impl Redis {
    /// Starts a Redis server without persistence and waits until it answers PING.
    pub fn start() -> Redis {
        Self::start_with(Persistence::None)
    }

    /// Starts a Redis server that keeps its data as `persistence` says.
    pub fn start_with(persistence: Persistence) -> Redis {
        Self::start_with_args(persistence, &[])
    }

    /// Starts a Redis server with further `redis-server` arguments (`--requirepass`, TLS…).
    pub fn start_with_args(persistence: Persistence, args: &[&str]) -> Redis {
        let args = args.iter().map(|arg| arg.to_string()).collect();
        Self::launch(free_port(), temp_dir("redis"), persistence, args)
    }

    fn launch(port: u16, dir: TempDir, persistence: Persistence, args: Vec<String>) -> Redis {
        require("redis-server");
        let aof: &[&str] = match persistence {
            Persistence::None => &["--appendonly", "no"],
            Persistence::Aof => &["--appendonly", "yes", "--appendfsync", "always"],
        };
        let port_text = port.to_string();
        // A server with a certificate listens with TLS only.
        let listen = if args.iter().any(|arg| arg == "--tls-cert-file") {
            ["--port", "0", "--tls-port", &port_text]
        } else {
            ["--port", &port_text, "--tls-port", "0"]
        };
        let process = Process::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(listen)
                .args(["--bind", "127.0.0.1", "--save", ""])
                .args(aof)
                .arg("--dir")
                .arg(dir.path())
                .args(&args)
                .stdout(Stdio::null()),
        );
        let redis = Redis {
            port,
            process,
            dir,
            persistence,
            args,
            running: true,
        };
        redis.wait_answering();
        redis
    }

    /// Waits until the server answers PING (a server with TLS only is asked through TLS).
    fn wait_answering(&self) {
        wait_until("redis to answer PING", || {
            self.command(&["PING"]).is_ok_and(|reply| reply == "PONG")
        });
    }

    /// The data directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the server at once (SIGKILL), keeping its port and data for [`Redis::restart`].
    pub fn kill(&mut self) {
        self.process.signal("KILL");
        let _ = self.process.wait_exit(PATIENCE);
        self.running = false;
    }

    /// Whether the server was not killed.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts a killed server again on the same port and data directory.
    pub fn restart(&mut self) {
        let dir = std::mem::replace(&mut self.dir, temp_dir("redis-unused"));
        let args = std::mem::take(&mut self.args);
        *self = Self::launch(self.port, dir, self.persistence, args);
    }

    /// The URL a gateway node uses.
    pub fn url(&self) -> String {
        let scheme = if self.tls() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn tls(&self) -> bool {
        self.args.iter().any(|arg| arg == "--tls-cert-file")
    }

    /// Runs a command with `redis-cli` and returns its raw output, one reply item per line.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        redis_cli(self.port, &self.cli_args(), args)
    }

    /// How `redis-cli` must talk to this server: its password, and TLS with its CA.
    fn cli_args(&self) -> Vec<String> {
        let mut cli = Vec::new();
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--requirepass" => {
                    cli.extend(["--no-auth-warning".into(), "-a".into()]);
                    cli.extend(args.next().cloned());
                }
                "--tls-ca-cert-file" => {
                    cli.extend(["--tls".into(), "--cacert".into()]);
                    cli.extend(args.next().cloned());
                }
                _ => {}
            }
        }
        cli
    }

    /// The rooms whose shard channel Redis has subscribers for, sorted.
    pub fn subscribed_rooms(&self) -> Vec<String> {
        let reply = self
            .command(&["PUBSUB", "SHARDCHANNELS", "chat:*"])
            .unwrap_or_default();
        let mut rooms: Vec<String> = reply.lines().filter_map(room_of_channel).collect();
        rooms.sort();
        rooms
    }

    /// How many subscribers a room's shard channel has.
    pub fn subscribers(&self, room: &str) -> u64 {
        let channel = format!("chat:{{{room}}}:messages");
        let reply = self
            .command(&["PUBSUB", "SHARDNUMSUB", &channel])
            .unwrap_or_default();
        reply
            .lines()
            .nth(1)
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl SharedRedis for Redis {
    fn url(&self) -> String {
        Redis::url(self)
    }

    fn subscribed_rooms(&self) -> Vec<String> {
        Redis::subscribed_rooms(self)
    }

    fn subscribers(&self, room: &str) -> u64 {
        Redis::subscribers(self, room)
    }
}

/// The room a gateway shard channel (`chat:{room}:messages`) belongs to.
pub fn room_of_channel(channel: &str) -> Option<String> {
    Some(
        channel
            .strip_prefix("chat:{")?
            .strip_suffix("}:messages")?
            .to_owned(),
    )
}

/// A `chat-gateway` process. Its log goes to a file, printed when the test fails.
pub struct Node {
    pub port: u16,
    /// Where it serves `/metrics`: its `--internal-listen` port when given, else `port`.
    pub metrics_port: u16,
    pub id: String,
    pub process: Process,
    log: TempDir,
}

impl Node {
    /// Starts a node with the in-process broker.
    pub fn single(extra: &[&str]) -> Node {
        Self::start("solo", None, extra)
    }

    /// Starts a node on `redis`, waiting until it is ready.
    pub fn clustered(id: &str, redis: &impl SharedRedis, extra: &[&str]) -> Node {
        Self::start(id, Some(&redis.url()), extra)
    }

    /// Starts a node and waits until `/readyz` answers 200.
    pub fn start(id: &str, redis_url: Option<&str>, extra: &[&str]) -> Node {
        let node = Self::spawn(id, redis_url, extra);
        wait_until("the node to be ready", || {
            node.get("/readyz").is_some_and(|(status, _)| status == 200)
        });
        node
    }

    /// Starts a node without waiting for readiness (it may never be ready).
    pub fn spawn(id: &str, redis_url: Option<&str>, extra: &[&str]) -> Node {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_chat-gateway"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", id])
            .args(extra)
            .env_remove("REDIS_URL")
            // Abuse limits are off unless a test turns them on with flags (which win over
            // these): the functional tests send in bursts and from one address on purpose.
            .env("GATEWAY_CONN_MESSAGE_RATE", "0")
            .env("GATEWAY_USER_MESSAGE_RATE", "0")
            .env("GATEWAY_IP_CONNECT_RATE", "0")
            .env(
                "RUST_LOG",
                std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            );
        if let Some(url) = redis_url {
            command.args(["--redis-url", url]);
        }
        let log = temp_dir("node-log");
        let file = std::fs::File::create(log.path().join("log")).expect("create the node's log");
        command.stderr(file.try_clone().expect("clone the log file"));
        command.stdout(file);
        let process = Process::spawn("chat-gateway", &mut command);
        let metrics_port = extra
            .iter()
            .position(|arg| *arg == "--internal-listen")
            .and_then(|flag| extra.get(flag + 1)?.rsplit(':').next()?.parse().ok())
            .unwrap_or(port);
        let node = Node {
            port,
            metrics_port,
            id: id.to_owned(),
            process,
            log,
        };
        wait_until("the node to listen", || node.get("/healthz").is_some());
        node
    }
}

/// What tests ask of any gateway node, in this process or not.
pub trait Gateway {
    /// The port it listens on (loopback).
    fn port(&self) -> u16;

    /// Its metrics in Prometheus text format.
    fn metrics_text(&self) -> String;

    /// Its `ws://host:port` base, as a load balancer's list of nodes holds it.
    fn ws_base(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port())
    }

    /// The WebSocket URL for `path_and_query` (e.g. "/ws?room=a").
    fn ws_url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.ws_base())
    }

    /// A plain HTTP GET; returns status and body, or `None` if nothing answered.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port(), path, &[])
    }

    /// The value of a metric (summed over label sets; 0 when it is not exported).
    fn metric(&self, name: &str) -> f64 {
        self.series_where(name, "").unwrap_or(0.0)
    }

    /// The value of a metric summed over the label sets that contain `label` (e.g.
    /// `code="1000"`); fails the test if no such series is exported.
    fn metric_where(&self, name: &str, label: &str) -> f64 {
        self.series_where(name, label)
            .unwrap_or_else(|| panic!("no series {name} with {label:?}"))
    }

    /// Like [`Gateway::metric_where`], `None` when no such series is exported.
    fn series_where(&self, name: &str, label: &str) -> Option<f64> {
        let values: Vec<f64> = self
            .metrics_text()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter(|line| line.contains(label))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The value of a metric summed over the label sets that have every one of `labels`
    /// (0 when none has).
    fn metric_labelled(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics_text()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter(|line| {
                labels
                    .iter()
                    .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Gateway for Node {
    fn port(&self) -> u16 {
        self.port
    }

    fn metrics_text(&self) -> String {
        http_get(self.metrics_port, "/metrics", &[])
            .expect("metrics answer")
            .1
    }
}

/// Lines of a node's log shown when its test fails.
const LOG_TAIL_LINES: usize = 60;

impl Node {
    /// Everything the node logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path().join("log")).unwrap_or_default()
    }

    /// Prints the end of the node's log to the test's output.
    fn show_log(&self) {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        eprintln!(
            "--- node {} (port {}): last lines of its log ---",
            self.id, self.port
        );
        for line in tail {
            eprintln!("{line}");
        }
    }
}

/// Every test that ran a node also checks the node never panicked: the runtime contains a
/// panicking task, so a bug in a connection would otherwise pass as a dropped client. When the
/// test failed, the node's log is shown.
impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.show_log();
            return;
        }
        // A node the test stopped or killed has nothing to say.
        if let Some((200, body)) = http_get(self.metrics_port, "/metrics", &[]) {
            let panics = body
                .lines()
                .find_map(|line| line.strip_prefix("chat_panics_total"))
                .and_then(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok());
            if panics != Some(0.0) {
                self.show_log();
                panic!("node {} panicked (its log is above)", self.id);
            }
        }
    }
}

/// A minimal HTTP/1.1 GET over loopback, so tests need no HTTP client crate.
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    http_request(port, "GET", path, headers, b"").map(|reply| (reply.status, reply.body))
}

/// A minimal HTTP/1.1 request over loopback (`Connection: close`, a `Content-Length` whenever
/// there is a body or the method usually has one); `None` if nothing answered.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpReply> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    http_exchange(stream, method, path, headers, body)
}

/// A loopback connection to `port` from the source address `from` (any 127.x.y.z: Linux
/// routes the whole block to loopback), for what a server decides by the client's address.
pub fn connect_from(from: std::net::Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::from((from, 0)).into())?;
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(socket.into())
}

/// [`http_request`] over a connection already open.
pub fn http_exchange(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpReply> {
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).ok()?;
    // Read until the server closes. A server that answers before reading the whole body (413)
    // may reset the connection after its answer: what arrived before the reset still counts.
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => raw.extend_from_slice(&buffer[..read]),
        }
    }
    parse_reply(&raw)
}

/// A whole HTTP/1.1 response as read off the wire: status, headers, body.
pub fn parse_reply(raw: &[u8]) -> Option<HttpReply> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (status, headers) = parse_head(&raw[..head_end])?;
    Some(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw[head_end + 4..]).into_owned(),
    })
}

/// The status and headers (names lower-cased) of a response head.
fn parse_head(head: &[u8]) -> Option<(u16, Vec<(String, String)>)> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Some((status, headers))
}

/// A message frame's offset as `(ms, seq)`, for ordering checks.
pub fn offset_of(frame: &Value) -> (u64, u64) {
    let text = frame["offset"]
        .as_str()
        .expect("message frames carry an offset");
    let (ms, seq) = text.split_once('-').expect("offset is ms-seq");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Reads message frames until `count` arrived.
pub async fn messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = client.recv().await;
        if frame["type"] == "message" {
            got.push(frame);
        }
    }
    got
}

pub fn texts(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|frame| frame["message"].as_str().unwrap())
        .collect()
}

/// A WebSocket test client.
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<AsyncTcpStream>>,
    /// Frames read while waiting for something else (an ack), handed out first by `recv`.
    pending: std::collections::VecDeque<Value>,
    /// The id from the `userId` frame.
    pub user_id: String,
    /// The node from the `userId` frame.
    pub node: String,
    /// Messages sent with [`Client::say`], numbering their `ref`s.
    said: u64,
}

/// What [`Client::next_event`] saw.
#[derive(Debug)]
pub enum Event {
    /// A text frame.
    Frame(Value),
    /// The connection ended.
    Ended(Ended),
    /// Nothing within the wait.
    Quiet,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

impl Client {
    /// Connects and reads the `userId` welcome frame.
    pub async fn connect(url: &str) -> Client {
        match Self::try_connect(url, PATIENCE).await {
            Ok(client) => client,
            Err(error) => panic!("connect to {url}: {error}"),
        }
    }

    /// The next thing that happens on the connection, without panicking on a close.
    pub async fn next_event(&mut self, wait: Duration) -> Event {
        if let Some(frame) = self.pending.pop_front() {
            return Event::Frame(frame);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, self.socket.next()).await else {
                return Event::Quiet;
            };
            return match next {
                Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                    Ok(frame) => Event::Frame(frame),
                    Err(_) => continue,
                },
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    Event::Ended(Ended::Closed(code.into()))
                }
                Some(Ok(Message::Close(None))) => Event::Ended(Ended::Closed(1005)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Event::Ended(Ended::Dropped),
            };
        }
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    /// Sends a JSON value.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a raw message (binary, oversize, ...).
    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// The next text frame as JSON, failing the test after [`PATIENCE`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(PATIENCE)
            .await
            .expect("a frame arrived in time")
    }

    /// The next text frame as JSON, or `None` if none came within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(frame);
        }
        self.read_within(wait).await
    }

    async fn read_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => panic!("unexpected close: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => panic!("read failed: {error}"),
                None => panic!("connection ended"),
            }
        }
    }

    /// Waits for a WebSocket pong (the answer to a ping frame); text frames that arrive first
    /// stay queued for `recv`. `false` if none came within `wait`.
    pub async fn recv_pong(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, self.socket.next()).await else {
                return false;
            };
            match next {
                Some(Ok(Message::Pong(_))) => return true,
                Some(Ok(Message::Text(text))) => self
                    .pending
                    .push_back(serde_json::from_str(&text).expect("server frames are JSON")),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Reads until the connection ends, returning how it ended; text frames in between are
    /// returned too.
    pub async fn recv_until_end(&mut self) -> (Vec<Value>, Ended) {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        loop {
            let next = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("connection ended in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str(&text).expect("JSON"))
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    return (frames, Ended::Closed(code.into()));
                }
                Some(Ok(Message::Close(None))) => return (frames, Ended::Closed(1005)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (frames, Ended::Dropped),
            }
        }
    }

    /// Joins a room and waits for the acknowledgement.
    pub async fn join(&mut self, room: &str) {
        self.send(serde_json::json!({"type": "join", "room": room, "ref": room}))
            .await;
        let reply = loop {
            let frame = self.recv().await;
            if frame["type"] == "joined" || (frame["type"] == "error" && frame["ref"] == room) {
                break frame;
            }
        };
        assert_eq!(reply["type"], "joined", "joining {room}: {reply}");
        assert_eq!(reply["room"], room);
    }

    /// Sends a chat message to a room and waits for its ack; returns the message id. Frames
    /// that arrive meanwhile stay queued for `recv`.
    pub async fn say(&mut self, room: &str, text: &str) -> String {
        self.said += 1;
        let reference = format!("say-{}", self.said);
        self.send(
            serde_json::json!({"type": "message", "room": room, "message": text, "ref": reference}),
        )
        .await;
        loop {
            let frame = self
                .read_within(PATIENCE)
                .await
                .expect("an ack arrived in time");
            if frame["type"] == "ack" && frame["ref"] == reference.as_str() {
                return frame["id"].as_str().expect("ack carries the id").to_owned();
            }
            assert_ne!(frame["type"], "error", "message refused: {frame}");
            self.pending.push_back(frame);
        }
    }

    /// Says `text` in the connection's room with `cid`, sent again every 50 ms (for up to 30 s)
    /// while it is refused with a publish error, as a client retries; returns the acknowledged
    /// message's id. Other frames stay for `recv`.
    pub async fn say_until_acked(&mut self, text: &str, cid: &str) -> String {
        for _ in 0..600 {
            self.said += 1;
            let reference = format!("say-{}", self.said);
            self.send(serde_json::json!({"type": "message", "message": text, "cid": cid, "ref": reference}))
                .await;
            let answer = loop {
                let frame = self
                    .read_within(PATIENCE)
                    .await
                    .expect("an answer arrived in time");
                if frame["ref"] == reference.as_str() {
                    break frame;
                }
                self.pending.push_back(frame);
            };
            if answer["type"] == "ack" {
                return answer["id"]
                    .as_str()
                    .expect("ack carries the id")
                    .to_owned();
            }
            // Only a publish that failed (or may have) is worth sending again with its cid.
            assert!(
                answer["type"] == "error"
                    && ["publish_failed", "publish_unknown"]
                        .contains(&answer["code"].as_str().unwrap_or_default()),
                "an ack or a publish error: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{text:?} was never acknowledged");
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

impl Client {
    /// Like [`Client::connect`], but a refused or failed handshake (or a connection that ends
    /// before the welcome frame) is returned as an error instead of failing the test, so a
    /// caller can retry, e.g. while a load balancer has not yet noticed a dead node.
    pub async fn try_connect(url: &str, within: Duration) -> Result<Client, String> {
        Self::try_connect_with(url, within, None).await
    }

    /// Connects to a `wss://` URL, trusting what `tls` trusts, and reads the welcome frame.
    pub async fn connect_tls(url: &str, tls: &std::sync::Arc<rustls::ClientConfig>) -> Client {
        match Self::try_connect_tls(url, PATIENCE, tls).await {
            Ok(client) => client,
            Err(error) => panic!("connect to {url}: {error}"),
        }
    }

    /// [`Client::try_connect`] for a `wss://` URL, trusting what `tls` trusts.
    pub async fn try_connect_tls(
        url: &str,
        within: Duration,
        tls: &std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Client, String> {
        let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
        Self::try_connect_with(url, within, Some(connector)).await
    }

    async fn try_connect_with(
        url: &str,
        within: Duration,
        connector: Option<tokio_tungstenite::Connector>,
    ) -> Result<Client, String> {
        let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector);
        let (socket, _) = tokio::time::timeout(within, connect)
            .await
            .map_err(|_| format!("no handshake with {url} within {within:?}"))?
            .map_err(|error| format!("connect to {url}: {error}"))?;
        let mut client = Client {
            socket,
            pending: Default::default(),
            user_id: String::new(),
            node: String::new(),
            said: 0,
        };
        let deadline = tokio::time::Instant::now() + within;
        let welcome: Value = loop {
            match tokio::time::timeout_at(deadline, client.socket.next()).await {
                Err(_) => return Err(format!("no welcome frame from {url} within {within:?}")),
                Ok(Some(Ok(Message::Text(text)))) => {
                    break serde_json::from_str(&text)
                        .map_err(|error| format!("welcome frame is not JSON ({error}): {text}"))?;
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Err(format!("closed before the welcome frame: {frame:?}"));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(error))) => return Err(format!("read failed: {error}")),
                Ok(None) => return Err("connection ended before the welcome frame".into()),
            }
        };
        if welcome["type"] != "userId" {
            return Err(format!("first frame is not userId: {welcome}"));
        }
        client.user_id = welcome["userId"]
            .as_str()
            .ok_or_else(|| format!("userId is not a string: {welcome}"))?
            .to_owned();
        client.node = welcome["node"].as_str().unwrap_or_default().to_owned();
        Ok(client)
    }
}

/// The answer to a raw HTTP request: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The first value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends a WebSocket upgrade request for `path` with extra `headers` over a raw socket and
/// reads the reply head (and body, if the server refused). `None` if nothing answered.
pub fn ws_handshake(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<HttpReply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    stream
        .write_all(upgrade_request(port, path, headers).as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    // Read the head; a refusal also carries a short body, read until the server closes or the
    // announced length arrived. A 101 is left open: nothing more is read.
    let head_end = read_head(&mut stream, &mut raw)?;
    let (status, headers) = parse_head(&raw[..head_end])?;
    let mut body = raw[head_end + 4..].to_vec();
    if status != 101 {
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse::<usize>().ok());
        while length.is_none_or(|length| body.len() < length) {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => body.extend_from_slice(&buffer[..read]),
            }
        }
    }
    Some(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A WebSocket upgrade request for `path` with extra `headers` (and the RFC 6455 example key).
pub fn upgrade_request(port: u16, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Reads from `stream` into `raw` until it holds a whole HTTP response head, and returns where
/// the head ends (before its blank line); `None` if the stream ends or fails first.
fn read_head(stream: &mut TcpStream, raw: &mut Vec<u8>) -> Option<usize> {
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer).ok()?;
        if read == 0 {
            return None;
        }
        raw.extend_from_slice(&buffer[..read]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
    }
}

impl Client {
    /// Connects with extra handshake headers (`Sec-WebSocket-Protocol`, `Origin`, ...) and
    /// reads the welcome frame; returns the client and the server's handshake response, or
    /// the handshake error (e.g. `Http(response)` with a 401).
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<
        (
            Client,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let (socket, response) =
            tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
                .await
                .expect("handshake in time")?;
        let mut client = Client {
            socket,
            pending: Default::default(),
            user_id: String::new(),
            node: String::new(),
            said: 0,
        };
        let welcome = client.recv().await;
        assert_eq!(
            welcome["type"], "userId",
            "first frame is userId: {welcome}"
        );
        client.user_id = welcome["userId"].as_str().expect("userId").to_owned();
        client.node = welcome["node"].as_str().unwrap_or_default().to_owned();
        Ok((client, response))
    }

    /// Splits off the raw socket, for tests that read and write at once.
    pub fn into_socket(self) -> WebSocketStream<MaybeTlsStream<AsyncTcpStream>> {
        self.socket
    }
}

/// A WebSocket client that writes raw bytes: for what a well-behaved client library will not
/// send (unmasked or malformed frames, frames in the same packet as the handshake).
pub struct RawWebSocket {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl RawWebSocket {
    /// Upgrades `path` on `port`, sending `first_frames` in the same write as the request.
    /// Panics unless the server answers 101.
    pub fn open(port: u16, path: &str, first_frames: &[u8]) -> RawWebSocket {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut request = upgrade_request(port, path, &[]).into_bytes();
        request.extend_from_slice(first_frames);
        stream.write_all(&request).expect("send handshake");
        let mut raw = Vec::new();
        let head_end = read_head(&mut stream, &mut raw).expect("the server answered the handshake");
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        RawWebSocket {
            stream,
            buffered: raw[head_end + 4..].to_vec(),
        }
    }

    /// A client frame: FIN set, the given opcode, masked with a fixed key unless `masked` is false.
    pub fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        assert!(payload.len() < 126, "short frames only");
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![
            0x80 | opcode,
            payload.len() as u8 | if masked { 0x80 } else { 0 },
        ];
        if masked {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        } else {
            frame.extend_from_slice(payload);
        }
        frame
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Writes raw bytes; `Err` if the server reset the connection (or stopped taking them
    /// within [`PATIENCE`]).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(PATIENCE))?;
        self.stream.write_all(bytes)
    }

    /// A second handle on the same connection (for writing while another thread reads).
    pub fn try_clone(&self) -> RawWebSocket {
        RawWebSocket {
            stream: self.stream.try_clone().expect("clone the socket"),
            buffered: Vec::new(),
        }
    }

    /// The next frame from the server as (opcode, payload); `None` once the connection ends.
    pub fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, rest)) = gateway::transport::wire::decode(&self.buffered)
            {
                let (opcode, payload, used) =
                    (opcode, payload.to_vec(), self.buffered.len() - rest.len());
                self.buffered.drain(..used);
                return Some((opcode, payload));
            }
            let mut buffer = [0u8; 4096];
            match self.stream.read(&mut buffer) {
                Ok(0) | Err(_) => return None,
                Ok(read) => self.buffered.extend_from_slice(&buffer[..read]),
            }
        }
    }

    /// What follows the server's close frame: `Ok` once the server closed its side cleanly
    /// (end of stream), `Err` if the connection was reset.
    pub fn read_to_end(&mut self) -> std::io::Result<()> {
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).map(|_| ())
    }

    /// Text frames until the server's close frame: the texts and the close code, if any came.
    pub fn texts_until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut texts = Vec::new();
        while let Some((opcode, payload)) = self.next_frame() {
            match opcode {
                0x1 => texts.push(String::from_utf8_lossy(&payload).into_owned()),
                0x8 => {
                    return (
                        texts,
                        payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                    );
                }
                _ => {}
            }
        }
        (texts, None)
    }
}
