//! Command line: one subcommand per scenario (`fanout`, `idle`, `storm`, `api`), shared target and
//! output options. Every option can also come from a `LOADGEN_*` environment variable.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::protocol::{Protocol, SendStyle};
use crate::sys::Watched;

#[derive(Debug, Parser)]
#[command(
    name = "chat-loadgen",
    version,
    about = "Load generator for the chat gateway and its reference peers",
    long_about = "Load generator for the chat gateway (and the ws+ioredis and Socket.IO reference \
                  peers): room fan-out with end-to-end latency and loss counting, idle connections \
                  for memory per connection, and connection storms."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,

    /// Runtime threads. One thread is the cheapest per message (no cross-thread wake-ups, no
    /// contended counters); add threads only when a single core cannot keep up.
    #[arg(long, global = true, env = "LOADGEN_THREADS", default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// C clients in R rooms (each room spread over every URL); S senders per room send probes
    /// at each rate in turn; receivers measure latency, loss and duplicates.
    Fanout(FanoutArgs),
    /// Open N connections, hold them, and report (with --pid: server RSS per connection).
    Idle(IdleArgs),
    /// Open N connections as fast as a concurrency limit allows; report accepted/s.
    Storm(StormArgs),
    /// Publish through the gateway's server API (`POST /api/publish`) into one room whose
    /// WebSocket members receive; report publishes/s and the latency to the members.
    Api(ApiArgs),
    /// The SSE fallback next to WebSockets on one node: memory per idle connection of one
    /// transport, and the latency of one room's messages to a WebSocket and an SSE member.
    Sse(SseArgs),
}

/// Which transport an `sse --idle` run opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SseTransport {
    /// `GET /ws` WebSockets.
    Websocket,
    /// `GET /sse` event streams.
    Sse,
}

#[derive(Debug, Args)]
pub struct SseArgs {
    /// The node, as `http://host:port`.
    #[arg(long, env = "LOADGEN_URL")]
    pub url: String,

    /// Idle connections to open and hold (0: none), for memory per connection.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,

    /// The transport of the idle connections.
    #[arg(long, value_enum, default_value_t = SseTransport::Sse)]
    pub transport: SseTransport,

    /// The node's pid, whose RSS the idle connections are measured by.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Wait before each memory reading.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Messages per second for the latency run (0: none).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,

    /// How long the latency run sends.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
}

/// Where to connect and how.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// WebSocket URL of a node (repeat or comma-separate; clients are spread round-robin).
    #[arg(
        long = "url",
        env = "LOADGEN_URL",
        value_delimiter = ',',
        required = true
    )]
    pub urls: Vec<String>,

    /// Server family and frame format.
    #[arg(long, env = "LOADGEN_PROTOCOL", value_enum, default_value_t = Protocol::Gateway)]
    pub protocol: Protocol,

    /// Spread client sockets over this many source addresses 127.0.0.2 … (0: kernel's choice).
    /// Needed beyond ~28,000 connections to one host:port from one machine.
    #[arg(long, env = "LOADGEN_SOURCE_IPS", default_value_t = 0)]
    pub source_ips: u8,

    /// Limit for TCP connect + WebSocket handshake + `userId` frame.
    #[arg(long, env = "LOADGEN_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Handshakes in flight at once while connecting.
    #[arg(long, env = "LOADGEN_CONNECT_CONCURRENCY", default_value_t = 200)]
    pub connect_concurrency: usize,

    /// New connections per second while connecting (0: as fast as the concurrency allows).
    #[arg(long, env = "LOADGEN_CONNECT_RATE", default_value_t = 0.0)]
    pub connect_rate: f64,

    /// Send `name=<prefix><index>` with each connection.
    #[arg(long, env = "LOADGEN_NAME_PREFIX")]
    pub name_prefix: Option<String>,

    /// Room names are `<prefix>-<n>`.
    #[arg(long, env = "LOADGEN_ROOM_PREFIX", default_value = "lt")]
    pub room_prefix: String,
}

/// What to report and about which processes.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print the final report as JSON on stdout (one object per line, one per step).
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: bool,

    /// Server process to account CPU and RSS for, as LABEL=PID (repeat or comma-separate).
    #[arg(long = "pid", env = "LOADGEN_PIDS", value_delimiter = ',')]
    pub pids: Vec<Watched>,

    /// No progress line on stderr.
    #[arg(long, short, env = "LOADGEN_QUIET")]
    pub quiet: bool,
}

/// How many connections and over how many rooms (idle and storm).
#[derive(Debug, Args)]
pub struct LayoutArgs {
    /// Connections to open.
    #[arg(
        long,
        short = 'n',
        env = "LOADGEN_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub connections: usize,

    /// Rooms to spread the connections over.
    #[arg(long, short = 'r', env = "LOADGEN_ROOMS", default_value_t = 100)]
    pub rooms: usize,
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// Clients in total (senders included).
    #[arg(long, short = 'c', env = "LOADGEN_CLIENTS", default_value_t = 1000)]
    pub clients: usize,

    /// Rooms; client i joins room i mod R.
    #[arg(long, short = 'r', env = "LOADGEN_ROOMS", default_value_t = 10)]
    pub rooms: usize,

    /// Senders per room (they are members of the room too).
    #[arg(long, short = 's', env = "LOADGEN_SENDERS", default_value_t = 1)]
    pub senders: usize,

    /// Messages per second per sender; several values run successive steps.
    #[arg(
        long,
        alias = "rate",
        env = "LOADGEN_RATES",
        value_delimiter = ',',
        default_value = "10"
    )]
    pub rates: Vec<f64>,

    /// Chat message size in bytes (the probe is padded to it).
    #[arg(long, env = "LOADGEN_SIZE", default_value_t = 64)]
    pub size: usize,

    /// Sending time of each step.
    #[arg(long, short = 'd', env = "LOADGEN_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Wait after the last send of a step before counting what arrived.
    #[arg(long, env = "LOADGEN_DRAIN", default_value = "3s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Pause after all clients are connected, before the first step.
    #[arg(long, env = "LOADGEN_SETTLE", default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Frame style for sending (JSON-frame protocols; Socket.IO sends the same object).
    #[arg(long, env = "LOADGEN_SEND_STYLE", value_enum, default_value_t = SendStyle::Typed)]
    pub send_style: SendStyle,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub layout: LayoutArgs,

    /// Wait after connecting before the "after" memory reading.
    #[arg(long, env = "LOADGEN_SETTLE", default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,

    /// How long to hold the connections open (after settling).
    #[arg(long, env = "LOADGEN_HOLD", default_value = "30s", value_parser = parse_duration)]
    pub hold: Duration,

    /// Processes holding the connections (0: as many as the open-file limit requires).
    #[arg(long, env = "LOADGEN_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Run as one worker of a multi-process idle run (started by the coordinating process).
    #[arg(long, hide = true)]
    pub worker: bool,

    /// First client index of this worker.
    #[arg(long, hide = true, default_value_t = 0)]
    pub index_offset: usize,
}

#[derive(Debug, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    #[command(flatten)]
    pub layout: LayoutArgs,

    /// How long to keep the connections after the storm, before closing them.
    #[arg(long, env = "LOADGEN_HOLD", default_value = "0s", value_parser = parse_duration)]
    pub hold: Duration,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Where the members connect (and, unless --api-url says otherwise, the API).
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub output: OutputArgs,

    /// The server API key (sent as `Authorization: Bearer`).
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: String,

    /// The node whose API is called, e.g. http://127.0.0.1:8080 (default: the first --url's
    /// host and port).
    #[arg(long, env = "LOADGEN_API_URL")]
    pub api_url: Option<String>,

    /// WebSocket members of the room (spread over the URLs); each receives every publish.
    #[arg(long, short = 'm', env = "LOADGEN_MEMBERS", default_value_t = 10)]
    pub members: usize,

    /// Callers publishing at once, each on its own keep-alive connection.
    #[arg(long, short = 'c', env = "LOADGEN_CALLERS", default_value_t = 8)]
    pub callers: usize,

    /// Publishes per second across all callers (0: each caller as fast as it is answered).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 0.0)]
    pub rate: f64,

    /// Sending time.
    #[arg(long, short = 'd', env = "LOADGEN_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Most publishes in all, whatever the time.
    #[arg(long, env = "LOADGEN_MAX_PUBLISHES", default_value_t = 200_000)]
    pub max_publishes: u64,

    /// Chat message size in bytes (the probe is padded to it).
    #[arg(long, env = "LOADGEN_SIZE", default_value_t = 64)]
    pub size: usize,

    /// Give every publish a `cid` (the server then checks it against recent ones).
    #[arg(long, env = "LOADGEN_CID")]
    pub cid: bool,

    /// Wait after the last publish for what is owed to the members, at most this long.
    #[arg(long, env = "LOADGEN_DRAIN", default_value = "3s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Pause after the members are connected, before publishing.
    #[arg(long, env = "LOADGEN_SETTLE", default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
}

/// Parse `10`, `10s`, `500ms`, `2m`, `1.5s` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown duration unit {unit:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fanout_rates_and_urls_split_on_commas() {
        let cli = Cli::try_parse_from([
            "chat-loadgen",
            "fanout",
            "--url",
            "ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws",
            "--rates",
            "10,50,100",
            "--pid",
            "a=1,b=2",
        ])
        .unwrap();
        let Scenario::Fanout(f) = cli.scenario else {
            panic!("not fanout")
        };
        assert_eq!(f.target.urls.len(), 2);
        assert_eq!(f.rates, vec![10.0, 50.0, 100.0]);
        assert_eq!(f.output.pids.len(), 2);
        assert_eq!(f.senders, 1);
    }
}
