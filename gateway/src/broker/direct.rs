//! Messages for one node: each node has an inbox of its own, and any node can send to it
//! through the broker. The broker carries the bytes and knows nothing of what they mean (the
//! SSE transport routes a client's POST to the node holding its stream this way, and the
//! answer back). With Redis the inbox is a shard channel per node; the in-process broker is
//! the only node, and a node never sends to itself through the broker.
//!
//! Delivery is pub/sub's: at most once, and a node that is gone (or cut off from Redis)
//! receives nothing, which the sender learns from the count of receivers (0).

use std::sync::Arc;

/// Where a broker hands what arrives in this node's inbox.
pub type DirectHandler = Arc<dyn Fn(&[u8]) + Send + Sync>;
