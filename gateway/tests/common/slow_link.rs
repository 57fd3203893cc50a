//! A TCP relay in front of a test's Redis that holds back subscriptions: once a connection sends
//! `SUBSCRIBE`, everything it sends from then on reaches Redis `delay` late, in order. It plays
//! a node whose subscriber connection is slow (a busy host, a congested link) while its other
//! connection is not.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The relay; it stops, closing every connection through it, when dropped.
pub struct SlowSubscriptions {
    port: u16,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl SlowSubscriptions {
    /// Relays a free loopback port to the Redis on `redis_port`.
    pub fn start(redis_port: u16, delay: Duration) -> SlowSubscriptions {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().expect("relay address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, sockets) = (stop.clone(), sockets.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => relay(client, redis_port, delay, &sockets),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        SlowSubscriptions {
            port,
            stop,
            sockets,
            acceptor: Some(acceptor),
        }
    }

    /// The URL a node uses to reach Redis through the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowSubscriptions {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for socket in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Connects `client` to Redis: replies pass straight back, requests pass through a queue that
/// holds each one until its due time.
fn relay(client: TcpStream, redis_port: u16, delay: Duration, sockets: &Mutex<Vec<TcpStream>>) {
    let _ = client.set_nonblocking(false);
    let Ok(redis) = TcpStream::connect(("127.0.0.1", redis_port)) else {
        return;
    };
    let handles = [&client, &redis].map(|socket| socket.try_clone().expect("clone socket"));
    sockets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(handles);
    let (due, queue) = mpsc::channel::<(Instant, Vec<u8>)>();

    let mut from_client = client.try_clone().expect("clone socket");
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        let mut delayed = false;
        while let Ok(read @ 1..) = from_client.read(&mut buffer) {
            let chunk = buffer[..read].to_vec();
            delayed |= chunk.windows(9).any(|window| window == b"SUBSCRIBE");
            let at = if delayed {
                Instant::now() + delay
            } else {
                Instant::now()
            };
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
