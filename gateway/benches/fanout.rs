//! The fan-out hot path: one message to N local members of a room. Measures the per-recipient
//! cost of `Members::deliver` (a shared frame pushed onto each member's bounded outbox), with
//! the outboxes drained between iterations so none fills up.

use std::hint::black_box;

use axum::extract::ws::Utf8Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::broker::{Delivery, DeliveryKind};
use gateway::fanout::{Members, Outbox, OutboxReceiver};
use gateway::protocol::Offset;

fn fan_out(c: &mut Criterion) {
    let frame = Utf8Bytes::from(format!(
        r#"{{"type":"message","room":"bench","id":"0192f1c4-5d7a-7c3e-9a51-2f0c5b0e7d11","userId":"u-1","message":"{}","ts":1,"offset":"1-0","epoch":"e"}}"#,
        "x".repeat(64)
    ));
    let mut group = c.benchmark_group("fanout_one_message");
    for members in [1usize, 100, 1_000, 10_000] {
        let room = Members::default();
        let mut receivers: Vec<OutboxReceiver> = Vec::with_capacity(members);
        for conn in 0..members as u64 {
            let (outbox, receiver) = Outbox::channel(64);
            room.insert(conn, outbox, false, false);
            receivers.push(receiver);
        }
        let mut ms = 0;
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| {
                ms += 1;
                let delivery = Delivery {
                    kind: DeliveryKind::Chat(Offset { ms, seq: 0 }),
                    frame: frame.clone(),
                    published_at_micros: 0,
                };
                let delivered = room.deliver(black_box(&delivery));
                for receiver in &mut receivers {
                    receiver.try_recv();
                }
                delivered
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
