//! This node's users: which connections each user has here, so that what the application's
//! backend decides about a user (close every connection, remove them from a room) reaches
//! every connection of that user on this node, whichever rooms they are in.
//!
//! A connection registers when it starts and leaves when it ends. Closing goes straight to its
//! outbox. Removal from a room waits here, and the connection is told through its outbox
//! ([`Outbox::notify`]) to come and take it: membership belongs to the connection core, which
//! leaves the room itself between two broker calls, so the rooms it believes it is in and the
//! rooms fan-out delivers to never disagree. An idle connection costs one entry in one map.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use crate::protocol::close::Disconnect;
use crate::protocol::{RoomName, ServerFrame, to_json};
use crate::rooms::fanout::ConnId;
use crate::transport::outbox::Outbox;
use crate::transport::wire::WireFrame;

/// One connection of a user.
struct Session {
    conn: ConnId,
    outbox: Outbox,
}

/// Every user with a connection on this node.
#[derive(Default)]
pub struct LocalUsers {
    users: Mutex<HashMap<String, Vec<Session>>>,
    /// Rooms the application removed a connection from, oldest first, until it takes them.
    kicks: Mutex<HashMap<ConnId, VecDeque<RoomName>>>,
}

impl LocalUsers {
    /// Registers a connection of `user_id`.
    pub fn register(&self, user_id: &str, conn: ConnId, outbox: Outbox) {
        self.users
            .lock()
            .entry(user_id.to_owned())
            // Most users hold one connection per node: room for one, not the default four.
            .or_insert_with(|| Vec::with_capacity(1))
            .push(Session { conn, outbox });
    }

    /// Forgets a connection that ended, and whatever still waited for it.
    pub fn unregister(&self, user_id: &str, conn: ConnId) {
        let mut users = self.users.lock();
        if let Some(sessions) = users.get_mut(user_id) {
            sessions.retain(|session| session.conn != conn);
            if sessions.is_empty() {
                users.remove(user_id);
            }
        }
        drop(users);
        self.kicks.lock().remove(&conn);
    }

    /// Closes every connection of `user_id` here with [`Disconnect::ByApplication`], after a
    /// `disconnect` frame carrying `reason` when there is one. Returns how many it closed.
    pub fn disconnect(&self, user_id: &str, reason: Option<&str>) -> usize {
        let notice = reason.map(|reason| {
            WireFrame::text(to_json(&ServerFrame::Disconnect {
                code: Disconnect::ByApplication.code(),
                reason,
                message: reason,
            }))
        });
        let users = self.users.lock();
        let Some(sessions) = users.get(user_id) else {
            return 0;
        };
        for session in sessions {
            if let Some(notice) = &notice {
                // A connection too far behind to take it is closed as a slow consumer instead.
                let _ = session.outbox.push(notice);
            }
            session.outbox.close_with(Disconnect::ByApplication);
        }
        sessions.len()
    }

    /// Asks every connection of `user_id` here to leave `room`. Returns how many were asked
    /// (whether each is in the room is the connection's to know).
    pub fn kick(&self, room: &RoomName, user_id: &str) -> usize {
        let users = self.users.lock();
        let Some(sessions) = users.get(user_id) else {
            return 0;
        };
        let mut kicks = self.kicks.lock();
        for session in sessions {
            kicks
                .entry(session.conn)
                .or_default()
                .push_back(room.clone());
            session.outbox.notify();
        }
        sessions.len()
    }

    /// The next room connection `conn` must leave, oldest first, once its outbox was notified
    /// (see [`Outbox::take_notice`]); the outbox is notified again while more wait.
    pub fn take_kick(&self, conn: ConnId, outbox: &Outbox) -> Option<RoomName> {
        let mut kicks = self.kicks.lock();
        let waiting = kicks.get_mut(&conn)?;
        let room = waiting.pop_front();
        if waiting.is_empty() {
            kicks.remove(&conn);
        } else {
            outbox.notify();
        }
        room
    }

    /// How many connections `user_id` has on this node.
    pub fn connections(&self, user_id: &str) -> usize {
        self.users.lock().get(user_id).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::outbox::in_memory;

    #[test]
    fn a_disconnect_closes_every_connection_of_the_user_and_no_other() {
        let users = LocalUsers::default();
        let (a1, a1_socket) = in_memory(4);
        let (a2, a2_socket) = in_memory(4);
        let (b, b_socket) = in_memory(4);
        users.register("alice", 1, a1);
        users.register("alice", 2, a2);
        users.register("bob", 3, b);
        assert_eq!(users.disconnect("alice", Some("spam")), 2);
        for socket in [&a1_socket, &a2_socket] {
            assert_eq!(socket.close_requested(), Some(Disconnect::ByApplication));
        }
        assert_eq!(b_socket.close_requested(), None);
        users.unregister("alice", 1);
        users.unregister("alice", 2);
        assert_eq!(users.connections("alice"), 0);
        assert_eq!(users.disconnect("alice", None), 0);
    }

    #[test]
    fn kicks_wait_for_each_connection_of_the_user_in_order() {
        let users = LocalUsers::default();
        let (outbox, _socket) = in_memory(4);
        users.register("alice", 1, outbox.clone());
        let [lobby, news] = ["lobby", "news"].map(|room| RoomName::parse(room).unwrap());
        assert_eq!(users.kick(&lobby, "alice"), 1);
        assert_eq!(users.kick(&news, "alice"), 1);
        assert_eq!(users.kick(&news, "nobody"), 0);
        assert!(outbox.take_notice());
        assert_eq!(users.take_kick(1, &outbox), Some(lobby));
        assert!(outbox.take_notice(), "told again while one still waits");
        assert_eq!(users.take_kick(1, &outbox), Some(news));
        assert!(!outbox.take_notice());
        assert_eq!(users.take_kick(1, &outbox), None);

        users.kick(&RoomName::parse("a").unwrap(), "alice");
        users.unregister("alice", 1);
        assert_eq!(
            users.take_kick(1, &outbox),
            None,
            "gone with the connection"
        );
    }
}
