//! Where a POST goes: to the session it names, on whichever node holds that session's stream.
//!
//! A session token names its node. A POST for a session of this node is checked (its
//! signature) and handed to the session's [`PostBox`] here; one for another node travels
//! through the broker to that node's inbox, which does the same and sends the outcome back to
//! this node's inbox, where the waiting POST is answered. No node calls another over HTTP and
//! no client needs to reach the same node twice: any node takes any POST.
//!
//! The wire form between nodes is `1\n<JSON>`: a version, then a [`Message`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::session::{Offer, PostBox};
use crate::rooms::hub::Hub;
use crate::security::tokens::{SessionId, SessionToken, Signer, TokenError};

/// How long a POST waits for the node holding its session to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The version tag of the wire form.
const VERSION: &str = "1";

/// What became of a POST's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Handed to the session, in order; its replies come on its stream.
    Accepted(usize),
    /// The token is not one this deployment signed (or not for that node).
    Forbidden,
    /// No such session: its stream ended, or its node is gone.
    UnknownSession,
    /// The session has too many frames waiting already: retry shortly.
    Busy,
    /// The broker could not carry the POST, or its node did not answer in time.
    Unavailable,
}

/// What nodes send each other about POSTs.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    /// Frames for a session of the receiving node.
    Post {
        id: u64,
        /// The node waiting for the outcome.
        from: String,
        session: String,
        frames: Vec<String>,
    },
    /// The outcome of the sender's POST `id`.
    Answer { id: u64, outcome: Outcome },
}

impl Message {
    fn encode(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{VERSION}\n{json}")
    }

    fn decode(payload: &[u8]) -> Option<Message> {
        let payload = std::str::from_utf8(payload).ok()?;
        let (version, json) = payload.split_once('\n')?;
        if version != VERSION {
            return None;
        }
        serde_json::from_str(json).ok()
    }
}

/// This node's SSE sessions, and the POSTs it waits on other nodes for.
pub struct Relay {
    node_id: Arc<str>,
    signer: Signer,
    hub: Arc<Hub>,
    sessions: Mutex<HashMap<SessionId, Arc<PostBox>>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    next_id: AtomicU64,
}

/// A session's place in the relay; dropping it forgets the session, so later POSTs for it are
/// answered `unknown_session`.
pub struct Registration {
    relay: Weak<Relay>,
    id: SessionId,
    posts: Arc<PostBox>,
}

impl Registration {
    /// Where the session's POSTed frames arrive.
    pub fn posts(&self) -> &Arc<PostBox> {
        &self.posts
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.posts.close();
        if let Some(relay) = self.relay.upgrade() {
            relay.sessions.lock().remove(&self.id);
        }
    }
}

impl Relay {
    /// The relay of node `node_id`, taking what other nodes send this one through `hub`.
    pub fn start(node_id: Arc<str>, signer: Signer, hub: Arc<Hub>) -> Arc<Relay> {
        let relay = Arc::new(Relay {
            node_id,
            signer,
            hub: hub.clone(),
            sessions: Mutex::default(),
            waiting: Mutex::default(),
            next_id: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&relay);
        hub.on_direct(Arc::new(move |payload| {
            if let Some(relay) = weak.upgrade() {
                relay.received(payload);
            }
        }));
        relay
    }

    /// A new session on this node: its token and its registration.
    pub fn open(self: &Arc<Self>) -> Result<(String, Registration), TokenError> {
        let id = SessionId::random()?;
        let posts = Arc::new(PostBox::default());
        self.sessions.lock().insert(id, posts.clone());
        let token = self.signer.session_token(&self.node_id, id);
        let registration = Registration {
            relay: Arc::downgrade(self),
            id,
            posts,
        };
        Ok((token, registration))
    }

    /// Hands `frames` to the session `token` names, wherever it is.
    pub async fn post(&self, token: &str, frames: Vec<String>) -> Outcome {
        let Some(parsed) = SessionToken::parse(token) else {
            return Outcome::Forbidden;
        };
        if *parsed.node == *self.node_id {
            return self.deliver(&parsed, frames);
        }
        self.forward(&parsed.node, token, frames).await
    }

    /// Hands frames to a session of this node, if the token is genuine and the session lives.
    fn deliver(&self, token: &SessionToken, frames: Vec<String>) -> Outcome {
        if !self.signer.verify_session(token) {
            return Outcome::Forbidden;
        }
        let Some(posts) = self.sessions.lock().get(&token.session).cloned() else {
            return Outcome::UnknownSession;
        };
        match posts.offer(frames) {
            Offer::Accepted(count) => Outcome::Accepted(count),
            Offer::Busy => Outcome::Busy,
            Offer::Closed => Outcome::UnknownSession,
        }
    }

    /// Sends frames to the node holding their session and waits for its answer.
    async fn forward(&self, node: &str, token: &str, frames: Vec<String>) -> Outcome {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.waiting.lock().insert(id, answer);
        let message = Message::Post {
            id,
            from: self.node_id.to_string(),
            session: token.to_owned(),
            frames,
        };
        let outcome = match self.hub.send_to_node(node, message.encode()).await {
            // Nobody listens on that node's inbox: the node is gone, and its sessions with it.
            Ok(0) => Outcome::UnknownSession,
            Ok(_) => match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
                Ok(Ok(outcome)) => outcome,
                _ => {
                    tracing::warn!(node, "no answer from the node holding an SSE session");
                    Outcome::Unavailable
                }
            },
            Err(error) => {
                tracing::warn!(node, %error, "could not route a POST to its session's node");
                Outcome::Unavailable
            }
        };
        self.waiting.lock().remove(&id);
        outcome
    }

    /// What another node sent this one.
    fn received(self: Arc<Self>, payload: &[u8]) {
        match Message::decode(payload) {
            Some(Message::Post {
                id,
                from,
                session,
                frames,
            }) => {
                let outcome = match SessionToken::parse(&session) {
                    Some(token) if *token.node == *self.node_id => self.deliver(&token, frames),
                    _ => Outcome::Forbidden,
                };
                let answer = Message::Answer { id, outcome }.encode();
                tokio::spawn(async move {
                    if let Err(error) = self.hub.send_to_node(&from, answer).await {
                        tracing::warn!(node = from, %error, "could not answer a routed POST");
                    }
                });
            }
            Some(Message::Answer { id, outcome }) => {
                if let Some(waiting) = self.waiting.lock().remove(&id) {
                    // The POST may have timed out meanwhile: then nobody listens.
                    let _ = waiting.send(outcome);
                }
            }
            None => tracing::warn!("ignored a malformed message in this node's inbox"),
        }
    }

    /// How many SSE sessions this node holds.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_anything_else_is_ignored() {
        let post = Message::Post {
            id: 7,
            from: "node-b".into(),
            session: "s1.x.y.z".into(),
            frames: vec![r#"{"type":"ping"}"#.into()],
        };
        let Some(Message::Post { id, frames, .. }) = Message::decode(post.encode().as_bytes())
        else {
            panic!("a post reads back");
        };
        assert_eq!((id, frames.len()), (7, 1));
        let answer = Message::Answer {
            id: 7,
            outcome: Outcome::Accepted(3),
        };
        assert!(matches!(
            Message::decode(answer.encode().as_bytes()),
            Some(Message::Answer {
                id: 7,
                outcome: Outcome::Accepted(3)
            })
        ));
        for foreign in [&b"2\n{}"[..], b"1\n{\"kind\":\"explode\"}", b"\xff"] {
            assert!(Message::decode(foreign).is_none());
        }
    }
}
