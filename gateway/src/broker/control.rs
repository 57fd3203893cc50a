//! Commands for every node: what the application's backend decides about a user (close their
//! connections, remove them from a room), sent once through the broker and carried out by each
//! node on its own connections. With Redis they travel on one shard channel every node
//! subscribes to; with the in-process broker the one node carries them out at once.
//!
//! Delivery is pub/sub's: a node that is cut off from Redis when a command is sent never
//! sees it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::protocol::RoomName;

/// A command every node carries out on its own connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Close every connection of the user.
    Disconnect {
        /// Whose connections.
        #[serde(rename = "userId")]
        user_id: String,
        /// The application's words, shown to the user before the close.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Remove the user from a room.
    Kick {
        /// The room.
        room: String,
        /// Whom.
        #[serde(rename = "userId")]
        user_id: String,
    },
}

/// Where a broker hands the commands it receives.
pub type CommandHandler = Arc<dyn Fn(Command) + Send + Sync>;

/// The version tag of the wire form, so a node never acts on a form it does not know.
const VERSION: &str = "1";

impl Command {
    /// The command's wire form: `1\n<JSON>`.
    pub fn encode(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{VERSION}\n{json}")
    }

    /// Reads a wire form; `None` for anything else (another version, a foreign publisher).
    pub fn decode(payload: &[u8]) -> Option<Command> {
        let payload = std::str::from_utf8(payload).ok()?;
        let (version, json) = payload.split_once('\n')?;
        if version != VERSION {
            return None;
        }
        let command: Command = serde_json::from_str(json).ok()?;
        match &command {
            Command::Kick { room, .. } if RoomName::parse(room).is_err() => None,
            _ => Some(command),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_anything_else_is_ignored() {
        for command in [
            Command::Disconnect {
                user_id: "alice".into(),
                reason: Some("spam\nmore".into()),
            },
            Command::Disconnect {
                user_id: "bob".into(),
                reason: None,
            },
            Command::Kick {
                room: "lobby".into(),
                user_id: "carol".into(),
            },
        ] {
            assert_eq!(
                Command::decode(command.encode().as_bytes()),
                Some(command.clone())
            );
        }
        for foreign in [
            &b"2\n{\"command\":\"disconnect\",\"userId\":\"a\"}"[..],
            b"{\"command\":\"disconnect\",\"userId\":\"a\"}",
            b"1\n{\"command\":\"explode\"}",
            b"1\n{\"command\":\"kick\",\"room\":\"no spaces\",\"userId\":\"a\"}",
            b"\xff\n",
        ] {
            assert_eq!(Command::decode(foreign), None);
        }
    }
}
