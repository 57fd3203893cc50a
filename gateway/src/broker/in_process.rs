//! The single-node broker: publishing is delivering to this node's own inbox, history is an
//! in-memory ring per room, presence a map. Same contract as Redis, without the network.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;

use super::{
    Command, CommandHandler, Delivery, DeliveryKind, History, HistorySettings, Outgoing, Published,
    Retained, SharedInbox,
};
use crate::clock::now_micros;
use crate::protocol::{
    Epoch, FrameText, Offset, Position, PresenceEvent, PresentUser, Replay, RoomName, to_json,
    with_offset,
};

/// Delivers every publish straight to the local inbox. No Redis, no other nodes.
pub struct InProcessBroker {
    inbox: SharedInbox,
    settings: HistorySettings,
    /// Identifies this process's history: a restart loses it, and clients can tell.
    epoch: Epoch,
    rooms: Mutex<HashMap<RoomName, RoomLog>>,
    presence: Mutex<HashMap<RoomName, BTreeMap<String, Option<String>>>>,
    /// Carries out the commands sent to every node: here, only this one.
    commands: CommandHandler,
}

/// One room's history.
#[derive(Default)]
struct RoomLog {
    entries: VecDeque<(Offset, String, Instant)>,
    last: Option<Offset>,
    trimmed: bool,
    /// Client message ids seen recently, in two generations as in Redis.
    dedup: [HashMap<String, (Offset, uuid::Uuid)>; 2],
    /// When the current generation started.
    dedup_born: Option<Instant>,
}

impl RoomLog {
    /// The next offset: the clock's milliseconds, or one more in the sequence when the clock
    /// has not moved on (or went back), as Redis streams do.
    fn next_offset(&self) -> Offset {
        let ms = now_micros() / 1000;
        match self.last {
            Some(last) if last.ms >= ms => Offset {
                ms: last.ms,
                seq: last.seq + 1,
            },
            _ => Offset { ms, seq: 0 },
        }
    }

    /// The stored message with this dedup key, if it is remembered.
    fn seen(&self, key: &str) -> Option<(Offset, uuid::Uuid)> {
        self.dedup
            .iter()
            .find_map(|generation| generation.get(key).copied())
    }

    /// Remembers a dedup key for at least `window`: a generation older than that becomes the
    /// previous one, and the one before is forgotten.
    fn remember(&mut self, key: String, stored: (Offset, uuid::Uuid), window: std::time::Duration) {
        let now = Instant::now();
        if self
            .dedup_born
            .is_none_or(|born| now.duration_since(born) >= window)
        {
            self.dedup.swap(0, 1);
            self.dedup[0].clear();
            self.dedup_born = Some(now);
        }
        self.dedup[0].insert(key, stored);
    }

    fn trim(&mut self, settings: &HistorySettings) {
        let now = Instant::now();
        while let Some((_, _, at)) = self.entries.front() {
            if self.entries.len() <= settings.max_len && now.duration_since(*at) <= settings.max_age
            {
                break;
            }
            self.trimmed = true;
            self.entries.pop_front();
        }
    }
}

impl InProcessBroker {
    /// A broker delivering into `inbox` and handing commands to `commands`.
    pub fn new(inbox: SharedInbox, settings: HistorySettings, commands: CommandHandler) -> Self {
        InProcessBroker {
            inbox,
            settings,
            epoch: Epoch::random(),
            rooms: Mutex::default(),
            presence: Mutex::default(),
            commands,
        }
    }

    /// Carries out a command at once: this node is every node. Returns how many nodes got it.
    pub(super) fn send_command(&self, command: &Command) -> usize {
        (self.commands)(command.clone());
        1
    }

    pub(super) fn publish(&self, room: &RoomName, message: Outgoing) -> Published {
        // Holding the lock while delivering keeps offsets and delivery order the same.
        let mut rooms = self.rooms.lock();
        let log = rooms.entry(room.clone()).or_default();
        let key = message.dedup.is_some().then(|| message.dedup_field());
        if let Some((offset, id)) = key.as_deref().and_then(|key| log.seen(key)) {
            return Published {
                position: Position {
                    offset,
                    epoch: self.epoch,
                },
                id,
                duplicate: true,
            };
        }
        let offset = log.next_offset();
        let position = Position {
            offset,
            epoch: self.epoch,
        };
        let delivered = with_offset(&message.frame, offset, self.epoch);
        log.entries
            .push_back((offset, message.frame, Instant::now()));
        log.last = Some(offset);
        log.trim(&self.settings);
        if let Some(key) = key {
            log.remember(key, (offset, message.id), self.settings.dedup_window);
        }
        self.inbox.deliver(
            room.as_str(),
            Delivery {
                kind: DeliveryKind::Chat(position),
                frame: FrameText::from(delivered),
                published_at_micros: now_micros(),
            },
        );
        self.inbox.flush();
        Published {
            position,
            id: message.id,
            duplicate: false,
        }
    }

    pub(super) fn history(&self, room: &RoomName, replay: &Replay) -> History {
        let mut rooms = self.rooms.lock();
        let Some(log) = rooms.get_mut(room) else {
            return History::default();
        };
        log.trim(&self.settings);
        let stamp = |(offset, frame, _): &(Offset, String, Instant)| {
            (
                *offset,
                FrameText::from(with_offset(frame, *offset, self.epoch)),
            )
        };
        let history = History {
            epoch: Some(self.epoch),
            ..History::default()
        };
        match replay {
            Replay::None => history,
            Replay::Last(count) => {
                let skip = log.entries.len().saturating_sub(*count);
                History {
                    entries: log.entries.iter().skip(skip).map(stamp).collect(),
                    ..history
                }
            }
            Replay::Since { offset, epoch } => {
                let entries = log
                    .entries
                    .iter()
                    .filter(|(at, _, _)| at > offset)
                    .map(stamp)
                    .collect();
                let retained = Retained {
                    first: log.entries.front().map(|(first, _, _)| *first),
                    last: log.last.unwrap_or(Offset::ZERO),
                    trimmed: log.trimmed,
                };
                History { entries, ..history }.judge_since(*offset, epoch.as_deref(), retained)
            }
        }
    }

    pub(super) fn presence_upsert(&self, room: &RoomName, users: &[PresentUser]) {
        let mut presence = self.presence.lock();
        let online = presence.entry(room.clone()).or_default();
        for user in users {
            if online
                .insert(user.user_id.clone(), user.name.clone())
                .is_none()
            {
                self.announce(room, "join", &user.user_id, user.name.as_deref());
            }
        }
    }

    pub(super) fn presence_remove(&self, room: &RoomName, users: &[&str]) {
        let mut presence = self.presence.lock();
        let Some(online) = presence.get_mut(room) else {
            return;
        };
        for user in users {
            if let Some(name) = online.remove(*user) {
                self.announce(room, "leave", user, name.as_deref());
            }
        }
        if online.is_empty() {
            presence.remove(room);
        }
    }

    pub(super) fn presence_list(&self, room: &RoomName) -> Vec<PresentUser> {
        self.presence
            .lock()
            .get(room)
            .map(|online| {
                online
                    .iter()
                    .map(|(user_id, name)| PresentUser {
                        user_id: user_id.clone(),
                        name: name.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn announce(&self, room: &RoomName, event: &str, user_id: &str, name: Option<&str>) {
        let frame = to_json(&PresenceEvent {
            room: room.as_str(),
            event,
            user_id,
            name,
        });
        let delivery = Delivery {
            kind: DeliveryKind::Presence,
            frame: FrameText::from(frame),
            published_at_micros: now_micros(),
        };
        self.inbox.deliver(room.as_str(), delivery);
        self.inbox.flush();
    }
}
