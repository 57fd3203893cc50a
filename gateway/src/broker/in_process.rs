//! The single-node broker: publishing is delivering to this node's own inbox.

use super::{SharedInbox, now_micros};
use crate::protocol::RoomName;

/// Delivers every publish straight to the local inbox. No Redis, no other nodes.
pub struct InProcessBroker {
    inbox: SharedInbox,
}

impl InProcessBroker {
    /// A broker delivering into `inbox`.
    pub fn new(inbox: SharedInbox) -> Self {
        InProcessBroker { inbox }
    }

    pub(super) fn publish(&self, room: &RoomName, frame: String) {
        self.inbox
            .deliver(room.as_str(), frame.into(), now_micros());
    }
}
