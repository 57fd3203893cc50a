//! Counting and latency bookkeeping: per-receiver duplicate detection, per-step delivery
//! counters shared by all client tasks, sharded HdrHistograms for latency, and the loss
//! arithmetic (expected = messages sent into a room × members of that room).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest sequence number a receiver tracks per sender and step (bounds memory on bad input).
const MAX_TRACKED_SEQ: u64 = 1 << 26;

/// The set of sequence numbers one receiver has seen from one sender, as a bitmap.
#[derive(Debug, Default)]
struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    /// Insert `seq`; true when it was not there yet.
    fn insert(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }
}

/// How a received probe counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// First time this receiver sees this (step, sender, seq).
    First,
    /// Seen before: the server delivered it twice.
    Duplicate,
    /// Sequence number beyond anything a sender produces: not counted.
    OutOfRange,
}

/// Duplicate detection for one receiving connection. Only the current step is remembered: a
/// probe from a newer step resets the tracker.
#[derive(Debug, Default)]
pub struct ReceiverTracker {
    step: Option<u32>,
    /// Sorted by sender. A room has few senders, so a binary search beats hashing every
    /// delivery.
    senders: Vec<(u32, SeqSet)>,
}

impl ReceiverTracker {
    pub fn record(&mut self, step: u32, sender: u32, seq: u64) -> Delivery {
        if seq >= MAX_TRACKED_SEQ {
            return Delivery::OutOfRange;
        }
        if self.step != Some(step) {
            self.step = Some(step);
            self.senders.clear();
        }
        let i = match self.senders.binary_search_by_key(&sender, |(s, _)| *s) {
            Ok(i) => i,
            Err(i) => {
                self.senders.insert(i, (sender, SeqSet::default()));
                i
            }
        };
        if self.senders[i].1.insert(seq) {
            Delivery::First
        } else {
            Delivery::Duplicate
        }
    }
}

/// Counters of one fan-out step, updated by every client task.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub send_failures: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// Probes from another step (late arrivals from the previous one).
    pub stale: AtomicU64,
    /// Chat messages that carry no probe, or one with an impossible sequence number.
    pub foreign: AtomicU64,
    /// Frames that could not be decoded at all.
    pub bad_frames: AtomicU64,
    pub acks: AtomicU64,
    pub server_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Latency histograms (µs) split into shards so that client tasks on different threads rarely
/// contend for the same lock.
#[derive(Debug)]
pub struct LatencyRecorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

/// Highest latency a histogram records exactly (larger values are clamped): 10 minutes.
const MAX_LATENCY_US: u64 = 600_000_000;

/// An empty latency histogram (1 µs to 10 minutes, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // Bounds and precision are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

impl LatencyRecorder {
    pub fn new(shards: usize) -> Self {
        LatencyRecorder {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }

    pub fn record(&self, shard_hint: usize, micros: u64) {
        let shard = &self.shards[shard_hint % self.shards.len()];
        let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.max(1));
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds on both sides: adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Latency of one step, overall and split by whether sender and receiver sat on the same node.
#[derive(Debug)]
pub struct StepLatency {
    pub all: LatencyRecorder,
    pub same_node: LatencyRecorder,
    pub cross_node: LatencyRecorder,
}

impl StepLatency {
    pub fn new(shards: usize) -> Self {
        StepLatency {
            all: LatencyRecorder::new(shards),
            same_node: LatencyRecorder::new(shards),
            cross_node: LatencyRecorder::new(shards),
        }
    }

    pub fn record(&self, shard_hint: usize, micros: u64, same_node: bool) {
        self.all.record(shard_hint, micros);
        if same_node {
            self.same_node.record(shard_hint, micros);
        } else {
            self.cross_node.record(shard_hint, micros);
        }
    }
}

/// Deliveries the servers owe: every message sent into a room reaches every member of the room
/// (the sender included). `room_sent[r]` messages went into room `r`, which had `members[r]`
/// connected members.
pub fn expected_deliveries(room_sent: &[u64], members: &[u64]) -> u64 {
    room_sent
        .iter()
        .zip(members)
        .map(|(sent, m)| sent.saturating_mul(*m))
        .sum()
}

/// Delivery outcome of a step.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LossSummary {
    pub expected: u64,
    /// Distinct (receiver, sender, seq) deliveries.
    pub delivered: u64,
    /// Expected deliveries that did not arrive before the drain period ended.
    pub lost: u64,
    pub duplicates: u64,
    /// delivered / expected (1.0 when nothing was expected).
    pub delivery_ratio: f64,
}

pub fn summarize_loss(expected: u64, delivered: u64, duplicates: u64) -> LossSummary {
    LossSummary {
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicates,
        delivery_ratio: if expected == 0 {
            1.0
        } else {
            ((delivered as f64 / expected as f64) * 1e6).round() / 1e6
        },
    }
}

/// Counts of labelled events (connect failures by cause, disconnects by close code).
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    pub fn add(&self, label: &str) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(label.to_string()).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// `later - earlier` for each label (labels absent earlier count from zero).
pub fn tally_delta(
    earlier: &BTreeMap<String, u64>,
    later: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    later
        .iter()
        .filter_map(|(k, v)| {
            let d = v - earlier.get(k).copied().unwrap_or(0).min(*v);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_first_and_duplicate_deliveries() {
        let mut t = ReceiverTracker::default();
        assert_eq!(t.record(0, 1, 0), Delivery::First);
        assert_eq!(t.record(0, 1, 1), Delivery::First);
        assert_eq!(t.record(0, 2, 0), Delivery::First, "other sender, same seq");
        assert_eq!(t.record(0, 1, 0), Delivery::Duplicate);
        assert_eq!(t.record(0, 1, 1000), Delivery::First, "gaps are fine");
        assert_eq!(t.record(0, 1, 1000), Delivery::Duplicate);
        assert_eq!(t.record(0, 1, MAX_TRACKED_SEQ), Delivery::OutOfRange);
    }

    #[test]
    fn tracker_forgets_the_previous_step() {
        let mut t = ReceiverTracker::default();
        assert_eq!(t.record(0, 1, 5), Delivery::First);
        assert_eq!(t.record(1, 1, 5), Delivery::First);
        assert_eq!(t.record(1, 1, 5), Delivery::Duplicate);
    }

    #[test]
    fn loss_is_expected_minus_distinct_deliveries() {
        // Room 0: 100 messages to 50 members; room 1: 90 messages to 40 members.
        let expected = expected_deliveries(&[100, 90], &[50, 40]);
        assert_eq!(expected, 8600);
        let s = summarize_loss(expected, 8500, 7);
        assert_eq!(s.lost, 100);
        assert_eq!(s.duplicates, 7);
        assert!((s.delivery_ratio - 8500.0 / 8600.0).abs() < 1e-6);

        let none = summarize_loss(0, 0, 0);
        assert_eq!((none.lost, none.delivery_ratio), (0, 1.0));
        // More distinct deliveries than expected (a member counted late) never underflows.
        assert_eq!(summarize_loss(10, 12, 0).lost, 0);
    }

    #[test]
    fn sharded_latency_merges() {
        let l = LatencyRecorder::new(4);
        for (i, v) in [100u64, 200, 300, 400, 10_000].iter().enumerate() {
            l.record(i, *v);
        }
        l.record(0, 0); // clamped to 1 µs
        let s = LatencySummary::of(&l.merged());
        assert_eq!(s.count, 6);
        assert!(s.max_us >= 10_000 && s.max_us < 10_010);
        assert!(s.p50_us >= 200 && s.p50_us <= 201);
        assert_eq!(
            LatencySummary::of(&LatencyRecorder::new(1).merged()).count,
            0
        );
    }

    #[test]
    fn step_latency_splits_by_node() {
        let s = StepLatency::new(2);
        s.record(0, 100, true);
        s.record(1, 900, false);
        s.record(1, 950, false);
        assert_eq!(s.all.merged().len(), 3);
        assert_eq!(s.same_node.merged().len(), 1);
        assert_eq!(s.cross_node.merged().len(), 2);
    }

    #[test]
    fn tallies_and_deltas() {
        let t = Tally::default();
        t.add("close_4000");
        t.add("close_4000");
        let before = t.snapshot();
        t.add("close_4000");
        t.add("eof");
        assert_eq!(t.total(), 4);
        let d = tally_delta(&before, &t.snapshot());
        assert_eq!(d.get("close_4000"), Some(&1));
        assert_eq!(d.get("eof"), Some(&1));
    }
}
