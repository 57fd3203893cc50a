//! Where a room lives in Redis: every key and the shard channel of one room share its name as a
//! hash tag (`chat:{lobby}:history`, `chat:{lobby}:messages`, ...), so in a Redis Cluster they
//! all sit in one hash slot, each script touches one slot, and a room's messages travel only
//! within the shard that owns it. The prefix lets several deployments share one Redis.

use std::collections::HashMap;

use crate::protocol::RoomName;

/// The key space of one deployment.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

/// The keys of one room.
#[derive(Debug, Clone)]
pub struct RoomKeys {
    /// The shard channel its messages and presence events are published on.
    pub channel: String,
    /// Its history stream.
    pub history: String,
    /// The epoch of that history.
    pub epoch: String,
    /// Recent client message ids: current and previous generation.
    pub cids: [String; 2],
    /// Presence: the entries (`node\x1fuser` → expiry), entries per user, display names.
    pub presence: [String; 3],
}

impl KeySpace {
    /// Keys under `prefix` (for example `chat:`).
    pub fn new(prefix: &str) -> KeySpace {
        KeySpace {
            prefix: prefix.to_owned(),
        }
    }

    /// Every key of `room`.
    pub fn room(&self, room: &RoomName) -> RoomKeys {
        let key = |name: &str| self.key(room, name);
        RoomKeys {
            channel: key("messages"),
            history: key("history"),
            epoch: key("epoch"),
            cids: [key("cids"), key("cids-old")],
            presence: [
                key("presence"),
                key("presence-users"),
                key("presence-names"),
            ],
        }
    }

    /// `room`'s history stream alone: what a publish names, per message.
    pub fn history(&self, room: &RoomName) -> String {
        self.key(room, "history")
    }

    /// `room`'s shard channel alone.
    pub fn channel(&self, room: &RoomName) -> String {
        self.key(room, "messages")
    }

    fn key(&self, room: &RoomName, name: &str) -> String {
        format!("{}{{{room}}}:{name}", self.prefix)
    }

    /// The room a message channel belongs to, if it is one of this key space's.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix("}:messages")
    }

    /// The hash slot of `room`'s keys in a Redis Cluster.
    pub fn slot(&self, room: &RoomName) -> u16 {
        fred::util::redis_keyslot(room.as_str().as_bytes())
    }

    /// `items` grouped for script calls, in order: each group's rooms share one hash slot in a
    /// cluster (`cluster`; outside one, every group is slot 0), and a group holds at most `most`.
    pub fn group_by_slot<T>(
        &self,
        cluster: bool,
        items: impl IntoIterator<Item = T>,
        room: impl Fn(&T) -> &RoomName,
        most: usize,
    ) -> Vec<(u16, Vec<T>)> {
        let mut groups: Vec<(u16, Vec<T>)> = Vec::new();
        // Each slot's group still taking items: a heartbeat groups every room of a node, so
        // scanning all groups for each room would grow with the square of the rooms.
        let mut open: HashMap<u16, usize> = HashMap::new();
        for item in items {
            let slot = if cluster { self.slot(room(&item)) } else { 0 };
            match open.get(&slot) {
                Some(&index) if groups[index].1.len() < most => groups[index].1.push(item),
                _ => {
                    open.insert(slot, groups.len());
                    groups.push((slot, vec![item]));
                }
            }
        }
        groups
    }

    /// The shard channel every node receives commands on. Its hash tag holds a character no
    /// room name has, so it never shares a room's slot by name nor reads as a room's channel;
    /// and it puts the channel in one slot, whose shard every node subscribes to.
    pub fn control_channel(&self) -> String {
        format!("{}{{{CONTROL_TAG}}}:commands", self.prefix)
    }

    /// The hash slot of the command channel.
    pub fn control_slot(&self) -> u16 {
        fred::util::redis_keyslot(CONTROL_TAG.as_bytes())
    }

    /// The shard channel of node `node`'s inbox: what other nodes send to it alone. Tagged
    /// with `#` like the command channel, so it is never a room's.
    pub fn node_channel(&self, node: &str) -> String {
        format!("{}{{#node:{node}}}:inbox", self.prefix)
    }
}

/// The hash tag of the command channel: `#` is in no room name.
const CONTROL_TAG: &str = "#control";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_room_shares_its_hash_slot_and_channels_map_back() {
        let keys = KeySpace::new("chat:");
        let room = RoomName::parse("team:eng-1").unwrap();
        let room_keys = keys.room(&room);
        let slot = keys.slot(&room);
        for key in [&room_keys.channel, &room_keys.history, &room_keys.epoch]
            .into_iter()
            .chain(&room_keys.cids)
            .chain(&room_keys.presence)
        {
            assert!(key.starts_with("chat:{team:eng-1}:"), "{key}");
            assert_eq!(fred::util::redis_keyslot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(keys.room_of_channel(&room_keys.channel), Some("team:eng-1"));
        assert_eq!(keys.room_of_channel("other:{team:eng-1}:messages"), None);
        assert_eq!(keys.room_of_channel(&room_keys.history), None);
        let other = KeySpace::new("staging:");
        assert_eq!(other.room_of_channel(&room_keys.channel), None);
    }

    #[test]
    fn rooms_are_grouped_by_slot_in_order_and_no_group_exceeds_the_limit() {
        let keys = KeySpace::new("chat:");
        let rooms: Vec<RoomName> = (0..40)
            .map(|i| RoomName::parse(&format!("room-{}", i % 4)).unwrap())
            .collect();
        let groups = keys.group_by_slot(true, &rooms, |room| room, 3);
        let mut regrouped: Vec<&RoomName> = Vec::new();
        for (slot, group) in &groups {
            assert!(!group.is_empty() && group.len() <= 3);
            assert!(group.iter().all(|room| keys.slot(room) == *slot));
            regrouped.extend(group.iter().copied());
        }
        // Four rooms of ten items each, three a group: four groups of each room's slot.
        assert_eq!(groups.len(), 16);
        for room in rooms.iter().take(4) {
            let of_room: Vec<&RoomName> =
                regrouped.iter().copied().filter(|r| *r == room).collect();
            assert_eq!(of_room.len(), 10, "nothing lost or repeated");
        }
        // Outside a cluster everything is slot 0, filled in order.
        let flat = keys.group_by_slot(
            false,
            rooms.iter().enumerate().take(10),
            |(_, room)| room,
            4,
        );
        let order: Vec<(u16, Vec<usize>)> = flat
            .into_iter()
            .map(|(slot, group)| (slot, group.into_iter().map(|(i, _)| i).collect()))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, vec![0, 1, 2, 3]),
                (0, vec![4, 5, 6, 7]),
                (0, vec![8, 9])
            ]
        );
    }

    #[test]
    fn the_command_channel_is_prefixed_hash_tagged_and_no_rooms() {
        let keys = KeySpace::new("chat:");
        let channel = keys.control_channel();
        assert_eq!(channel, "chat:{#control}:commands");
        assert_eq!(
            fred::util::redis_keyslot(channel.as_bytes()),
            keys.control_slot()
        );
        assert_eq!(keys.room_of_channel(&channel), None);
        assert!(RoomName::parse("#control").is_err());
        let inbox = keys.node_channel("node-a");
        assert_eq!(inbox, "chat:{#node:node-a}:inbox");
        assert_eq!(keys.room_of_channel(&inbox), None);
    }
}
