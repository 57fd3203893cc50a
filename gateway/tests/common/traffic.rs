//! Chat traffic checked the way docs/protocol.md promises it: members that resume on another
//! node (with their last `offset` and `epoch`) whenever their connection ends, and senders that
//! give every message a `cid` and send it again, with the same `cid`, until it is acknowledged.
//! At the end every member must hold every acknowledged message exactly once, unless it was
//! told (`recovered: false`) that history was lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use serde_json::{Value, json};

use super::{Client, Event, Gateway, Node};

/// The nodes clients may connect to, as `ws://host:port` bases; tests change it as nodes die
/// and come back (a load balancer's view).
#[derive(Clone, Default)]
pub struct Live(Arc<Mutex<Vec<String>>>);

impl Live {
    /// The given node bases.
    pub fn of(bases: impl IntoIterator<Item = String>) -> Live {
        Live(Arc::new(Mutex::new(bases.into_iter().collect())))
    }

    /// Stops sending clients to `base`.
    pub fn remove(&self, base: &str) {
        self.lock().retain(|known| known != base);
    }

    /// Starts sending clients to `base`.
    pub fn add(&self, base: String) {
        self.lock().push(base);
    }

    /// The `n`-th live node, round robin.
    fn pick(&self, n: usize) -> String {
        let bases = self.lock();
        bases[n % bases.len()].clone()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<String>> {
        self.0.lock()
    }
}

/// A chat message's place in history, as carried by frames.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Place {
    pub epoch: String,
    pub offset: (u64, u64),
}

impl Place {
    fn of(frame: &Value) -> Option<Place> {
        let (ms, seq) = frame["offset"].as_str()?.split_once('-')?;
        Some(Place {
            epoch: frame["epoch"].as_str()?.to_owned(),
            offset: (ms.parse().ok()?, seq.parse().ok()?),
        })
    }
}

/// A message the cluster acknowledged.
#[derive(Debug, Clone)]
pub struct Acked {
    pub id: String,
    pub cid: String,
    pub place: Place,
}

/// What one member saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Message ids in the order they arrived (repeats included).
    pub ids: Vec<String>,
    /// Their places.
    pub places: Vec<Place>,
    /// Times its connection ended and it resumed.
    pub reconnects: usize,
    /// Close codes it was given.
    pub closes: Vec<u16>,
    /// Resumes answered with `recovered: false`.
    pub not_recovered: usize,
}

/// What the senders went through.
#[derive(Debug, Default)]
pub struct Sent {
    pub acked: Vec<Acked>,
    /// Error codes that made a sender send a message again (same cid).
    pub retried: HashMap<String, usize>,
}

/// How long senders and members may take to finish once asked to.
const FINISH_WITHIN: Duration = Duration::from_secs(30);

/// Members and senders at work in one room until [`Traffic::finish`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    members: Vec<tokio::task::JoinHandle<Seen>>,
    senders: Vec<tokio::task::JoinHandle<Sent>>,
}

impl Traffic {
    /// Starts `members` members, then `senders` senders each sending one message every `pace`,
    /// in `room`, spread over the live nodes.
    pub async fn start(
        live: &Live,
        room: &str,
        members: usize,
        senders: usize,
        pace: Duration,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let members = (0..members)
            .map(|index| tokio::spawn(member(index, live.clone(), room.to_owned(), stop.clone())))
            .collect();
        // Every member is in the room before the first message.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let senders = (0..senders)
            .map(|index| {
                tokio::spawn(sender(
                    index,
                    live.clone(),
                    room.to_owned(),
                    pace,
                    stop.clone(),
                ))
            })
            .collect();
        Traffic {
            stop,
            members,
            senders,
        }
    }

    /// Stops sending, lets members receive what is still on its way (until they have been
    /// quiet for a moment), and reports.
    pub async fn finish(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut sent = Sent::default();
        for sender in self.senders {
            let one = tokio::time::timeout(FINISH_WITHIN, sender)
                .await
                .expect("a sender still waits for its last message's ack")
                .expect("a sender task");
            sent.acked.extend(one.acked);
            for (code, count) in one.retried {
                *sent.retried.entry(code).or_default() += count;
            }
        }
        let mut seen = Vec::new();
        for member in self.members {
            let one = tokio::time::timeout(FINISH_WITHIN, member)
                .await
                .expect("a member never went quiet")
                .expect("a member task");
            seen.push(one);
        }
        Report { sent, seen }
    }
}

/// What happened, to check.
#[derive(Debug)]
pub struct Report {
    pub sent: Sent,
    pub seen: Vec<Seen>,
}

impl Report {
    /// Every member got every acknowledged message exactly once, in history order, and was
    /// never told history was lost.
    pub fn assert_exactly_once(&self) {
        self.assert_some_traffic();
        for (index, seen) in self.seen.iter().enumerate() {
            assert_eq!(
                seen.not_recovered, 0,
                "member {index} was told history was lost"
            );
            self.assert_no_repeats(index, seen);
            let missing = self.missing(seen, |_| true);
            assert!(
                missing.is_empty(),
                "member {index} lost {} of {} acked messages (closes {:?}, {} reconnects, last \
                 place seen {:?}): {:?}",
                missing.len(),
                self.sent.acked.len(),
                seen.closes,
                seen.reconnects,
                seen.places.last(),
                self.sent
                    .acked
                    .iter()
                    .filter(|acked| missing.contains(&acked.id))
                    .take(5)
                    .map(|acked| (&acked.id, &acked.place))
                    .collect::<Vec<_>>()
            );
        }
        self.summary();
    }

    /// No member got a message twice; a member missing an acknowledged message was told
    /// history was lost; and every message acknowledged in the last epoch (after Redis last
    /// came back) reached every member.
    pub fn assert_no_silent_loss(&self) {
        self.assert_some_traffic();
        let last_epoch = self
            .sent
            .acked
            .iter()
            .max_by_key(|acked| acked.place.offset)
            .map(|acked| acked.place.epoch.clone());
        for (index, seen) in self.seen.iter().enumerate() {
            self.assert_no_repeats(index, seen);
            let missing = self.missing(seen, |_| true);
            assert!(
                missing.is_empty() || seen.not_recovered > 0,
                "member {index} lost {} acked messages and was never told",
                missing.len()
            );
            let missing_now = self.missing(seen, |acked| {
                Some(&acked.place.epoch) == last_epoch.as_ref()
            });
            assert!(
                missing_now.is_empty(),
                "member {index} lost {} messages acked after Redis came back",
                missing_now.len()
            );
        }
        self.summary();
    }

    fn assert_some_traffic(&self) {
        assert!(
            self.sent.acked.len() >= 20,
            "the senders kept going: only {} acked",
            self.sent.acked.len()
        );
        let cids: HashSet<&str> = self
            .sent
            .acked
            .iter()
            .map(|acked| acked.cid.as_str())
            .collect();
        assert_eq!(
            cids.len(),
            self.sent.acked.len(),
            "a cid was acknowledged twice"
        );
    }

    fn assert_no_repeats(&self, index: usize, seen: &Seen) {
        let unique: HashSet<&String> = seen.ids.iter().collect();
        assert_eq!(
            unique.len(),
            seen.ids.len(),
            "member {index} got a message twice"
        );
        for pair in seen.places.windows(2) {
            if pair[0].epoch == pair[1].epoch {
                assert!(
                    pair[0].offset < pair[1].offset,
                    "member {index}: out of order: {pair:?}"
                );
            }
        }
    }

    fn missing(&self, seen: &Seen, counted: impl Fn(&Acked) -> bool) -> Vec<String> {
        let got: HashSet<&String> = seen.ids.iter().collect();
        self.sent
            .acked
            .iter()
            .filter(|acked| counted(acked) && !got.contains(&acked.id))
            .map(|acked| acked.id.clone())
            .collect()
    }

    fn summary(&self) {
        let reconnects: usize = self.seen.iter().map(|seen| seen.reconnects).sum();
        let not_recovered: usize = self.seen.iter().map(|seen| seen.not_recovered).sum();
        eprintln!(
            "{} acked messages, {} members, {reconnects} member reconnects, {not_recovered} told \
             not recovered, retries by code {:?}",
            self.sent.acked.len(),
            self.seen.len(),
            self.sent.retried
        );
    }

    /// Acknowledged messages at least one member never got.
    pub fn acked_lost(&self) -> usize {
        let lost: HashSet<String> = self
            .seen
            .iter()
            .flat_map(|seen| self.missing(seen, |_| true))
            .collect();
        lost.len()
    }

    /// Reconnects of all members together.
    pub fn reconnects(&self) -> usize {
        self.seen.iter().map(|seen| seen.reconnects).sum()
    }
}

/// A member that resumes on another live node whenever its connection ends, from the last
/// place it saw, until `stop` is set and it has been quiet for a moment.
async fn member(index: usize, live: Live, room: String, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut resume: Option<Place> = None;
    let mut attempt = index;
    'connect: loop {
        attempt += 1;
        let base = live.pick(attempt);
        let url = match &resume {
            Some(place) => format!(
                "{base}/ws?room={room}&since={}-{}&epoch={}",
                place.offset.0, place.offset.1, place.epoch
            ),
            None => format!("{base}/ws?room={room}"),
        };
        let Ok(mut client) = Client::try_connect(&url, Duration::from_secs(2)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            match client.next_event(Duration::from_millis(1500)).await {
                Event::Frame(frame) if frame["type"] == "message" => {
                    let place = Place::of(&frame).expect("a message carries offset and epoch");
                    seen.ids
                        .push(frame["id"].as_str().expect("an id").to_owned());
                    seen.places.push(place.clone());
                    resume = Some(place);
                }
                Event::Frame(frame) if frame["type"] == "joined" && frame["recovered"] == false => {
                    seen.not_recovered += 1;
                }
                Event::Frame(_) => {}
                Event::Ended(ended) => {
                    if let super::Ended::Closed(code) = ended {
                        seen.closes.push(code);
                    }
                    seen.reconnects += 1;
                    continue 'connect;
                }
                Event::Quiet if stop.load(Ordering::SeqCst) => return seen,
                Event::Quiet => {}
            }
        }
    }
}

/// Error codes after which a message is sent again with the same cid: its outcome is unknown,
/// or it was not sent and may be.
const RETRIED: [&str; 3] = ["publish_unknown", "publish_failed", "unavailable"];

/// Sends numbered messages, each with a cid, one every `pace`, moving to another live node
/// when its connection ends; a message is sent again with its cid until acknowledged.
async fn sender(
    index: usize,
    live: Live,
    room: String,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> Sent {
    let mut sent = Sent::default();
    let mut attempt = index;
    let mut seq = 0;
    // The message waiting for its ack, sent again after any doubt.
    let mut pending: Option<String> = None;
    'connect: while !stop.load(Ordering::SeqCst) || pending.is_some() {
        attempt += 1;
        let url = format!("{}/ws?room={room}", live.pick(attempt));
        let Ok(mut client) = Client::try_connect(&url, Duration::from_secs(2)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let cid = match &pending {
                Some(cid) => cid.clone(),
                None if stop.load(Ordering::SeqCst) => break 'connect,
                None => {
                    seq += 1;
                    let cid = format!("s{index}-{seq}");
                    pending = Some(cid.clone());
                    cid
                }
            };
            client
                .send(json!({"type":"message","message":cid,"cid":cid,"ref":cid}))
                .await;
            loop {
                match client.next_event(Duration::from_secs(10)).await {
                    Event::Frame(frame)
                        if frame["type"] == "ack" && frame["ref"] == cid.as_str() =>
                    {
                        sent.acked.push(Acked {
                            id: frame["id"].as_str().expect("an id").to_owned(),
                            cid: cid.clone(),
                            place: Place::of(&frame).expect("an ack carries offset and epoch"),
                        });
                        pending = None;
                        break;
                    }
                    Event::Frame(frame)
                        if frame["type"] == "error" && frame["ref"] == cid.as_str() =>
                    {
                        let code = frame["code"].as_str().unwrap_or_default().to_owned();
                        assert!(RETRIED.contains(&code.as_str()), "message refused: {frame}");
                        *sent.retried.entry(code).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    Event::Frame(_) => {}
                    Event::Ended(_) | Event::Quiet => continue 'connect,
                }
            }
            tokio::time::sleep(pace).await;
        }
    }
    sent
}

/// Measures one failover for docs/benchmarks.md: traffic in a room of `nodes` (6 members, 4
/// senders at 200 messages/s each), then `kill` while a probe member on the first node sends one
/// message with a cid until it is acknowledged. Prints the acknowledged messages, how many of
/// them a member lost, how long after the kill the probe's ack came, and member reconnects.
pub async fn measure_failover(nodes: &[Node], label: &str, kill: impl FnOnce()) {
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let room = "measured";
    let traffic = Traffic::start(&live, room, 6, 4, Duration::from_millis(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut probe = Client::connect(&nodes[0].ws_url(&format!("/ws?room={room}"))).await;
    let killed = Instant::now();
    kill();
    probe.say_until_acked("probe", "probe").await;
    let recovered = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = traffic.finish().await;
    eprintln!(
        "{label}: {} acked, {} acked lost, first ack {recovered:?} after the kill, {} member \
         reconnects",
        report.sent.acked.len(),
        report.acked_lost(),
        report.reconnects()
    );
}
