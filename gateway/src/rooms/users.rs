//! This node's users: which connections each user has here, so that what the application's
//! backend decides about a user (close every connection, remove them from a room) reaches
//! every connection of that user on this node, whichever rooms they are in.
//!
//! A connection registers when it starts and leaves when it ends. Closing goes straight to its
//! outbox. Removal from a room goes to the connection's [`Mailbox`]: membership belongs to the
//! connection core, which leaves the room itself between two broker calls, so the room it
//! believes it is in and the rooms fan-out delivers to never disagree.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::protocol::close::Disconnect;
use crate::protocol::{RoomName, ServerFrame, to_json};
use crate::rooms::fanout::ConnId;
use crate::transport::outbox::Outbox;
use crate::transport::wire::WireFrame;

/// Rooms the application removed a connection from, waiting for the connection core.
#[derive(Default)]
pub struct Mailbox {
    kicks: Mutex<Vec<RoomName>>,
    waker: AtomicWaker,
}

impl Mailbox {
    /// Asks the connection to leave `room`, and wakes it.
    fn kick(&self, room: RoomName) {
        self.kicks.lock().push(room);
        self.waker.wake();
    }

    /// The next room to leave, oldest first; otherwise `Pending`, waking the caller's task
    /// when one arrives.
    pub fn poll_kick(&self, cx: &mut Context<'_>) -> Poll<RoomName> {
        self.waker.register(cx.waker());
        let mut kicks = self.kicks.lock();
        if kicks.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(kicks.remove(0))
        }
    }
}

/// One connection of a user.
struct Session {
    conn: ConnId,
    outbox: Outbox,
    mailbox: Arc<Mailbox>,
}

/// Every user with a connection on this node.
#[derive(Default)]
pub struct LocalUsers {
    users: Mutex<HashMap<String, Vec<Session>>>,
}

impl LocalUsers {
    /// Registers a connection of `user_id`; returns the mailbox it must poll.
    pub fn register(&self, user_id: &str, conn: ConnId, outbox: Outbox) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox::default());
        let session = Session {
            conn,
            outbox,
            mailbox: mailbox.clone(),
        };
        self.users
            .lock()
            .entry(user_id.to_owned())
            // Most users hold one connection per node: room for one, not the default four.
            .or_insert_with(|| Vec::with_capacity(1))
            .push(session);
        mailbox
    }

    /// Forgets a connection that ended.
    pub fn unregister(&self, user_id: &str, conn: ConnId) {
        let mut users = self.users.lock();
        if let Some(sessions) = users.get_mut(user_id) {
            sessions.retain(|session| session.conn != conn);
            if sessions.is_empty() {
                users.remove(user_id);
            }
        }
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
        for session in sessions {
            session.mailbox.kick(room.clone());
        }
        sessions.len()
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
    fn a_kick_lands_in_the_mailbox_of_each_connection_of_the_user() {
        let users = LocalUsers::default();
        let (outbox, _socket) = in_memory(4);
        let mailbox = users.register("alice", 1, outbox);
        let room = RoomName::parse("lobby").unwrap();
        assert_eq!(users.kick(&room, "alice"), 1);
        assert_eq!(users.kick(&room, "nobody"), 0);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(mailbox.poll_kick(&mut cx), Poll::Ready(room));
        assert!(mailbox.poll_kick(&mut cx).is_pending());
    }
}
