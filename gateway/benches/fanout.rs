//! The fan-out hot path: one message to N local members of a room. Measures the per-recipient
//! cost of `Members::deliver_into` (the frame encoded once, then written to each member's outbox):
//!
//! * `fanout_memory`: outboxes that write into memory, so only the fan-out's own work shows;
//! * `fanout_tcp`: outboxes on real loopback TCP sockets, the cost a node actually pays per
//!   recipient, kernel included.
//!
//! Only the delivery (and the batch's write) is timed; the receiving ends are emptied between iterations.
//! The Prometheus recorder is installed as in the binary, so the outboxes' byte counters and
//! backlog gauge cost what they cost in a node.

use std::hint::black_box;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::protocol::{Delivery, DeliveryKind, Epoch, FrameText, Offset, Position};
use gateway::rooms::fanout::Members;
use gateway::transport::outbox::{Batch, Outbox, Transport, in_memory};

fn frame() -> FrameText {
    FrameText::from(format!(
        r#"{{"type":"message","room":"bench","id":"0192f1c4-5d7a-7c3e-9a51-2f0c5b0e7d11","userId":"u-1","message":"{}","ts":1,"offset":"1-0","epoch":"e"}}"#,
        "x".repeat(64)
    ))
}

/// The next message offset: the room drops an offset it has delivered before, so every
/// delivery of a run needs a fresh one.
static NEXT_OFFSET: AtomicU64 = AtomicU64::new(1);

/// Times `iters` deliveries to `room`, calling `drain` (untimed) after each.
fn time_deliveries(room: &Members, iters: u64, mut drain: impl FnMut()) -> Duration {
    let frame = frame();
    let epoch = Epoch::parse("e").expect("a valid epoch");
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let ms = NEXT_OFFSET.fetch_add(1, Ordering::Relaxed);
        let delivery = Delivery {
            kind: DeliveryKind::Chat(Position {
                offset: Offset { ms, seq: 0 },
                epoch,
            }),
            frame: frame.clone(),
            published_at_micros: 0,
        };
        let start = Instant::now();
        // The batch writes when it drops: inside the timed part, as a node's receive loop does.
        let delivered = room.deliver_into(black_box(&delivery), &mut Batch::default());
        total += start.elapsed();
        assert_eq!(delivered, room.len(), "every member took the message");
        drain();
    }
    total
}

/// Installs the node's metrics recorder, once.
fn install_metrics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        gateway::metrics::install("bench").expect("install the metrics recorder");
    });
}

fn fan_out_in_memory(c: &mut Criterion) {
    install_metrics();
    let mut group = c.benchmark_group("fanout_memory");
    for members in [1usize, 100, 1_000, 10_000] {
        let room = Members::default();
        let sockets: Vec<_> = (0..members as u64)
            .map(|conn| {
                let (outbox, socket) = in_memory(64);
                room.insert(conn, outbox, false, false);
                socket
            })
            .collect();
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter_custom(|iters| {
                time_deliveries(&room, iters, || {
                    for socket in &sockets {
                        socket.take_bytes();
                    }
                })
            });
        });
    }
    group.finish();
}

fn fan_out_tcp(c: &mut Criterion) {
    install_metrics();
    let mut group = c.benchmark_group("fanout_tcp");
    group.sample_size(20);
    for members in [1usize, 100, 1_000] {
        let (room, clients) = tcp_room(members);
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            let mut sink = vec![0u8; 64 * 1024];
            b.iter_custom(|iters| {
                time_deliveries(&room, iters, || {
                    for mut client in &clients {
                        while client.read(&mut sink).is_ok_and(|n| n > 0) {}
                    }
                })
            });
        });
    }
    group.finish();
}

/// A non-blocking loopback socket as an outbox transport, outside any async runtime.
struct Socket(TcpStream);

impl Transport for Socket {
    fn try_write_vectored(&self, frames: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.0).write_vectored(frames)
    }
}

/// A room of `members` outboxes on loopback sockets, and the client ends of those sockets.
fn tcp_room(members: usize) -> (Members, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let room = Members::default();
    let meters = Arc::new(gateway::metrics::TransportMeters::new());
    let mut clients = Vec::with_capacity(members);
    for conn in 0..members as u64 {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nodelay(true).expect("nodelay");
        server.set_nonblocking(true).expect("non-blocking");
        client.set_nonblocking(true).expect("non-blocking");
        let outbox = Outbox::new(Arc::new(Socket(server)), meters.clone(), 1024, usize::MAX);
        outbox.uncork();
        room.insert(conn, outbox, false, false);
        clients.push(client);
    }
    (room, clients)
}

criterion_group!(benches, fan_out_in_memory, fan_out_tcp);
criterion_main!(benches);
