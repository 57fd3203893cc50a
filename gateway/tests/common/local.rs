//! A gateway node run inside the test process: no process to spawn, no port to guess (it binds
//! port 0 itself). Each node has its own thread and single-threaded runtime, so its metrics
//! recorder and its log, both set for that thread alone, are its own even with several nodes
//! in one test binary. For what needs no Redis, nginx or signals.

use std::io::Write;
use std::sync::Arc;
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Parser;
use gateway::config::Config;
use gateway::protocol::close::Disconnect;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Gateway, PATIENCE};

/// A node in this process; stopped (as if by SIGINT) when dropped.
pub struct LocalNode {
    pub port: u16,
    pub id: String,
    stop: Option<oneshot::Sender<Disconnect>>,
    thread: Option<JoinHandle<()>>,
    metrics: PrometheusHandle,
    log: Arc<Mutex<Vec<u8>>>,
}

/// Flags every local node starts with, before the test's own (which win): abuse limits off,
/// since the functional tests send in bursts and from one address on purpose, and a short
/// grace so a test's end does not wait on clients it left open.
const DEFAULTS: [&str; 8] = [
    "--conn-message-rate",
    "0",
    "--user-message-rate",
    "0",
    "--ip-connect-rate",
    "0",
    "--shutdown-grace",
    "1s",
];

impl LocalNode {
    /// Starts a node with the in-process broker and the given extra flags; returns once it
    /// listens.
    pub fn start(extra: &[&str]) -> LocalNode {
        count_panics();
        for (name, _) in std::env::vars() {
            assert!(
                !(name.starts_with("GATEWAY_") || name == "REDIS_URL"),
                "{name} is set in the test's environment: it would configure in-process nodes"
            );
        }
        let id = "solo".to_owned();
        let args = ["chat-gateway", "--node-id", &id]
            .into_iter()
            .chain(DEFAULTS)
            .chain(extra.iter().copied());
        let config = Config::try_parse_from(args).expect("valid flags");
        config.validate().expect("a valid configuration");
        let recorder = gateway::metrics::recorder(&id).expect("a metrics recorder");
        let metrics = recorder.handle();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel();
        let (bound, port) = std::sync::mpsc::channel();
        let thread = {
            let (id, log, handle) = (id.clone(), log.clone(), metrics.clone());
            std::thread::spawn(move || {
                let _metrics = metrics::set_default_local_recorder(&recorder);
                let _log = tracing::subscriber::set_default(subscriber(log));
                gateway::metrics::register();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let listener =
                        gateway::transport::listener::bind("127.0.0.1:0".parse().unwrap())
                            .expect("bind a port");
                    let _ = bound.send(listener.local_addr().expect("the bound address").port());
                    let stop = async move { stopped.await.unwrap_or(Disconnect::GoingAway) };
                    let listeners = gateway::server::Listeners {
                        public: listener,
                        internal: None,
                    };
                    gateway::server::run(config, id, listeners, Some(handle), stop)
                        .await
                        .expect("the node ran");
                });
            })
        };
        let port = port
            .recv_timeout(PATIENCE)
            .expect("the node bound its port");
        LocalNode {
            port,
            id,
            stop: Some(stop),
            thread: Some(thread),
            metrics,
            log,
        }
    }

    /// Stops the node as the binary does on a signal, closing its clients with `close`, and
    /// waits until it has.
    pub fn stop(&mut self, close: Disconnect) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(close);
        }
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + PATIENCE;
            while !thread.is_finished() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the node stopped in time"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = thread.join();
        }
    }

    /// Everything the node logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock()).into_owned()
    }
}

impl Gateway for LocalNode {
    fn port(&self) -> u16 {
        self.port
    }

    fn metrics_text(&self) -> String {
        // Straight from the recorder: still readable once the node stopped.
        self.metrics.render()
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- node {} (in process, port {}): its log ---",
                self.id, self.port
            );
            eprintln!("{}", self.log());
            self.stop(Disconnect::GoingAway);
            return;
        }
        self.stop(Disconnect::GoingAway);
        if self.metric("chat_panics_total") != 0.0 {
            eprintln!("{}", self.log());
            panic!("node {} panicked (its log is above)", self.id);
        }
    }
}

/// A subscriber writing the node's log lines into `log`, at `TEST_GATEWAY_LOG` (default info).
fn subscriber(log: Arc<Mutex<Vec<u8>>>) -> impl tracing::Subscriber + Send + Sync {
    let filter = tracing_subscriber::EnvFilter::new(
        std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || LogWriter(log.clone()))
        .finish()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts panics as the binary does: on a node's thread they land in its own recorder.
fn count_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            gateway::metrics::panicked();
            default_hook(info);
        }));
    });
}
