//! Rooms on this node: who is in which room, and getting each delivery to them.
//!
//! Owns the local registry and fan-out ([`fanout`]: members, replay holds, gap-repair holds)
//! and the hub ([`hub`]) that keeps the node subscribed to exactly the rooms with a local
//! member, routes what the broker delivers into fan-out, repairs gaps and keeps presence
//! alive. Fan-out knows nothing of brokers or sockets; the hub is where rooms meet the broker.
//! [`users`] knows each user's connections on this node, for the commands of the
//! application's backend (close them, remove them from a room).

pub mod fanout;
pub mod hub;
pub mod users;
