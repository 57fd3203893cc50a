//! A TCP relay in front of a test's Redis that delays some of a node's traffic: it plays a node
//! whose link to Redis is slow for one of its two connections only (a busy host, a congested
//! path), and can cut every connection through it at once (a network blip).
//!
//! A node has subscriber connections (they send `SSUBSCRIBE`) and command connections (they
//! call the gateway's functions: `FCALL`, to publish and to read history). The relay tells them
//! apart by what they send.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Which requests reach Redis late, and by how much. Replies always pass straight back.
#[derive(Debug, Clone, Copy)]
pub enum Delay {
    /// Everything a connection sends once it has sent `SSUBSCRIBE`: a subscriber.
    Subscriptions(Duration),
    /// Everything a connection opened after [`Relay::cut`] sends once it has sent `FCALL` (a
    /// command connection: publishing, reading history), while the connection is younger than
    /// `window`: command connections slow to come back after a reconnect.
    YoungPublisher { delay: Duration, window: Duration },
}

impl Delay {
    /// How late a chunk is due, given what the connection has sent so far, its age, and
    /// whether it was opened after a cut.
    fn of(&self, chunk: &[u8], seen: &mut Seen, age: Duration, reconnected: bool) -> Duration {
        let has = |word: &[u8]| chunk.windows(word.len()).any(|window| window == word);
        seen.subscribe |= has(b"SUBSCRIBE");
        seen.eval |= has(b"FCALL");
        match *self {
            Delay::Subscriptions(delay) if seen.subscribe => delay,
            Delay::YoungPublisher { delay, window } if reconnected && seen.eval && age < window => {
                delay
            }
            _ => Duration::ZERO,
        }
    }
}

/// What one connection has sent so far.
#[derive(Default)]
struct Seen {
    subscribe: bool,
    eval: bool,
}

/// The relay; it stops, closing every connection through it, when dropped.
pub struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Set by the first cut: connections opened from then on are reconnections.
    cut: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays a free loopback port to the Redis on `redis_port`.
    pub fn start(redis_port: u16, delay: Delay) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().expect("relay address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, cut, sockets) = (stop.clone(), cut.clone(), sockets.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let reconnected = cut.load(Ordering::SeqCst);
                            relay(client, redis_port, delay, reconnected, &sockets)
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Relay {
            port,
            stop,
            cut,
            sockets,
            acceptor: Some(acceptor),
        }
    }

    /// The URL a node uses to reach Redis through the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection through the relay; the node reconnects through it.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut sockets = self.sockets.lock();
        for socket in sockets.drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Connects `client` to Redis: replies pass straight back, requests pass through a queue that
/// holds each one until its due time (never before an earlier one).
fn relay(
    client: TcpStream,
    redis_port: u16,
    delay: Delay,
    reconnected: bool,
    sockets: &Mutex<Vec<TcpStream>>,
) {
    let _ = client.set_nonblocking(false);
    let Ok(redis) = TcpStream::connect(("127.0.0.1", redis_port)) else {
        return;
    };
    let handles = [&client, &redis].map(|socket| socket.try_clone().expect("clone socket"));
    sockets.lock().extend(handles);
    let (due, queue) = mpsc::channel::<(Instant, Vec<u8>)>();

    let mut from_client = client.try_clone().expect("clone socket");
    std::thread::spawn(move || {
        let opened = Instant::now();
        let mut seen = Seen::default();
        let mut last_due = Instant::now();
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read @ 1..) = from_client.read(&mut buffer) {
            let chunk = buffer[..read].to_vec();
            let late = delay.of(&chunk, &mut seen, opened.elapsed(), reconnected);
            let at = (Instant::now() + late).max(last_due);
            last_due = at;
            if due.send((at, chunk)).is_err() {
                break;
            }
        }
    });

    let mut to_redis = redis.try_clone().expect("clone socket");
    std::thread::spawn(move || {
        for (at, chunk) in queue {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if to_redis.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to_redis.shutdown(Shutdown::Write);
    });

    let (mut from_redis, mut to_client) = (redis, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_redis, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
    });
}
