//! The cluster suite: what several nodes sharing rooms must do, whatever Redis topology they
//! share them through (one server, a Redis Cluster, Sentinel). Each scenario starts its own
//! nodes and uses rooms no other scenario does, so scenarios may share one Redis deployment.

use std::time::{Duration, Instant};

use serde_json::json;

use super::sse::SseClient;
use super::{
    Client, Gateway, Node, SharedRedis, http_request, messages, offset_of, texts, wait_until,
};

fn three_nodes(redis: &impl SharedRedis, extra: &[&str]) -> [Node; 3] {
    ["node-a", "node-b", "node-c"].map(|id| Node::clustered(id, redis, extra))
}

/// A message sent on one node reaches members on every node, exactly once.
pub async fn exactly_once_on_every_node(redis: &impl SharedRedis) {
    let nodes = three_nodes(redis, &[]);
    let mut clients = Vec::new();
    for node in &nodes {
        let client = Client::connect(&node.ws_url("/ws?room=everywhere")).await;
        assert_eq!(client.node, node.id, "the welcome frame names the node");
        clients.push(client);
    }
    let id = clients[0].say("everywhere", "hello cluster").await;
    clients[0].say("everywhere", "sentinel").await;
    for client in &mut clients {
        let first = client.recv_type("message").await;
        assert_eq!(
            (first["id"].as_str(), first["message"].as_str()),
            (Some(id.as_str()), Some("hello cluster"))
        );
        // The very next message is the sentinel: the first one came exactly once.
        assert_eq!(client.recv_type("message").await["message"], "sentinel");
        assert_eq!(client.recv_within(Duration::from_millis(200)).await, None);
    }
}

/// Senders on different nodes, all at once: every member sees one order.
pub async fn one_order_for_concurrent_senders(redis: &impl SharedRedis) {
    let nodes = three_nodes(redis, &[]);
    const PER_SENDER: usize = 40;
    // Every member is in the room (its welcome frame says so) before anyone sends.
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(Client::connect(&node.ws_url("/ws?room=race")).await);
    }
    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                client
                    .send(json!({"type":"message","message":format!("{}-{i}", client.node)}))
                    .await;
            }
            let mut order = Vec::new();
            while order.len() < PER_SENDER * 3 {
                let frame = client.recv().await;
                if frame["type"] == "message" {
                    order.push(frame["id"].as_str().unwrap_or_default().to_owned());
                }
            }
            order
        }));
    }
    let mut orders = Vec::new();
    for task in tasks {
        orders.push(task.await.expect("client task"));
    }
    assert_eq!(orders[0].len(), PER_SENDER * 3);
    assert_eq!(
        orders[0], orders[1],
        "node-a and node-b members saw different orders"
    );
    assert_eq!(
        orders[0], orders[2],
        "node-a and node-c members saw different orders"
    );
}

/// A room's messages reach its members only.
pub async fn rooms_are_isolated(redis: &impl SharedRedis) {
    let [a, b, _c] = three_nodes(redis, &[]);
    let mut red = Client::connect(&a.ws_url("/ws?room=red")).await;
    let mut blue = Client::connect(&b.ws_url("/ws?room=blue")).await;
    let mut red_too = Client::connect(&b.ws_url("/ws?room=red")).await;
    red.say("red", "for red").await;
    assert_eq!(red_too.recv_type("message").await["message"], "for red");
    assert_eq!(blue.recv_within(Duration::from_millis(300)).await, None);
}

/// A node subscribes to a room once however many members it has there, and unsubscribes when
/// its last member leaves.
pub async fn subscribed_once_per_node_and_unsubscribed_after_the_last_member(
    redis: &impl SharedRedis,
) {
    let [a, b, _c] = three_nodes(redis, &[]);
    let room = "topic";
    let subscribers = |count: u64| move || redis.subscribers(room) == count;

    let mut first = Client::connect(&a.ws_url("/ws?room=foyer")).await;
    first.join(room).await;
    assert_eq!(
        redis.subscribers(room),
        1,
        "subscribed by the time join is acknowledged"
    );
    let mut second = Client::connect(&a.ws_url("/ws?room=foyer")).await;
    second.join(room).await;
    assert_eq!(
        redis.subscribers(room),
        1,
        "one subscription per node, not per member"
    );
    let mut remote = Client::connect(&b.ws_url(&format!("/ws?room={room}"))).await;
    wait_until("node b to subscribe", subscribers(2));

    first
        .send(json!({"type":"leave","room":room,"ref":1}))
        .await;
    first.recv_type("left").await;
    assert_eq!(redis.subscribers(room), 2, "node a still has a member");
    second.close().await;
    wait_until("node a to unsubscribe", subscribers(1));
    remote.say(room, "still flowing").await;
    drop(remote);
    wait_until("the channel to disappear", || {
        !redis.subscribed_rooms().contains(&room.to_owned())
    });
    assert!(
        redis.subscribed_rooms().contains(&"foyer".to_owned()),
        "foyer still has a member"
    );
    drop(first);
}

/// A client that comes back on another node gets exactly what it missed, in order, then live
/// traffic.
pub async fn a_client_resumes_on_another_node_with_exactly_what_it_missed(
    redis: &impl SharedRedis,
) {
    let [a, b, _c] = three_nodes(redis, &[]);
    let room = "resumable";
    let mut sender = Client::connect(&b.ws_url(&format!("/ws?room={room}"))).await;
    let mut reader = Client::connect(&a.ws_url(&format!("/ws?room={room}"))).await;

    for text in ["m1", "m2"] {
        sender.say(room, text).await;
    }
    let seen = messages(&mut reader, 2).await;
    assert!(
        offset_of(&seen[0]) < offset_of(&seen[1]),
        "offsets increase"
    );
    let last = seen[1]["offset"].as_str().unwrap_or_default().to_owned();
    let epoch = seen[1]["epoch"].as_str().unwrap_or_default().to_owned();
    drop(reader);

    for text in ["m3", "m4", "m5"] {
        sender.say(room, text).await;
    }
    // Back on the other node, in another room first, then resuming with a typed join.
    let mut back = Client::connect(&b.ws_url("/ws?room=elsewhere")).await;
    back.send(json!({"type":"join","room":room,"since":last,"epoch":epoch,"ref":1}))
        .await;
    let joined = back.recv().await;
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["ref"], 1);
    sender.say(room, "m6").await;
    let resumed = messages(&mut back, 4).await;
    assert_eq!(
        texts(&resumed),
        ["m3", "m4", "m5", "m6"],
        "missed messages, in order, then live"
    );
    assert_eq!(
        back.recv_within(Duration::from_millis(300)).await,
        None,
        "no duplicates"
    );

    // The seed-style form: `since` in the query replays into the default room.
    let mut seedish = Client::connect(&a.ws_url(&format!("/ws?room={room}&since={last}"))).await;
    assert_eq!(seedish.recv().await["recovered"], true);
    assert_eq!(
        texts(&messages(&mut seedish, 4).await),
        ["m3", "m4", "m5", "m6"]
    );
}

/// Presence lists users across nodes; a killed node's users leave within the TTL.
pub async fn presence_spans_nodes_and_a_killed_nodes_users_leave_within_the_ttl(
    redis: &impl SharedRedis,
) {
    let ttl = ["--presence-ttl", "1500ms"];
    let a = Node::clustered("node-a", redis, &ttl);
    let mut b = Node::clustered("node-b", redis, &ttl);
    let mut watcher =
        Client::connect(&a.ws_url("/ws?room=present&name=watcher&presence=true")).await;
    let doomed = Client::connect(&b.ws_url("/ws?room=present&name=doomed")).await;

    let joined = watcher.recv_type("presence_event").await;
    let joined = if joined["userId"] == watcher.user_id.as_str() {
        watcher.recv_type("presence_event").await
    } else {
        joined
    };
    assert_eq!(
        (joined["event"].as_str(), joined["userId"].as_str()),
        (Some("join"), Some(doomed.user_id.as_str()))
    );
    assert_eq!(joined["name"], "doomed");

    watcher
        .send(json!({"type":"presence","room":"present","ref":"who"}))
        .await;
    let listed = watcher.recv_type("presence").await;
    assert_eq!(listed["ref"], "who");
    let mut ids: Vec<&str> = listed["users"]
        .as_array()
        .map(|users| {
            users
                .iter()
                .filter_map(|user| user["userId"].as_str())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    let mut expected = vec![watcher.user_id.as_str(), doomed.user_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "both users, across both nodes");

    let killed_at = Instant::now();
    b.process.signal("KILL");
    b.process.wait_exit(Duration::from_secs(5));
    let left = watcher.recv_type("presence_event").await;
    let expired_after = killed_at.elapsed();
    assert_eq!(
        (left["event"].as_str(), left["userId"].as_str()),
        (Some("leave"), Some(doomed.user_id.as_str()))
    );
    // TTL plus one heartbeat period (a third of it) is the documented bound.
    assert!(
        expired_after < Duration::from_millis(1500 + 500 + 1000),
        "left after {expired_after:?}"
    );
    watcher
        .send(json!({"type":"presence","room":"present"}))
        .await;
    let listed = watcher.recv_type("presence").await;
    assert_eq!(
        listed["users"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    drop(doomed);
}

/// The server API key of nodes that take part in [`posts_and_commands_reach_their_target_among`].
pub const API_KEY: &str = "scenario-api-key-0123456789";

/// What crosses nodes besides room traffic reaches the node that holds its target: an SSE
/// session's POSTs made through any node (that node's inbox channel), and a server API command
/// given to one node (the control channel every node listens on).
pub async fn posts_and_commands_reach_the_node_holding_their_target(redis: &impl SharedRedis) {
    let nodes = three_nodes(redis, &["--api-key", API_KEY]);
    posts_and_commands_reach_their_target_among(&nodes, "routed").await;
}

/// [`posts_and_commands_reach_the_node_holding_their_target`] on running nodes (started with
/// `--api-key` [`API_KEY`]), in `room`.
pub async fn posts_and_commands_reach_their_target_among(nodes: &[Node; 3], room: &str) {
    let mut sse = SseClient::open(nodes[0].port, &format!("/sse?room={room}"), &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("GET /sse: {status} {body}"));
    let mut member = Client::connect(&nodes[2].ws_url(&format!("/ws?room={room}"))).await;
    for (i, node) in nodes.iter().enumerate() {
        let reply = sse
            .post_to(
                node.port,
                json!([{"type":"message","message":format!("via-{}", node.id),"ref":i}]),
            )
            .await;
        assert_eq!(
            reply.status, 202,
            "POST through {}: {}",
            node.id, reply.body
        );
        assert_eq!(sse.recv_type("ack").await["ref"], i);
    }
    let expected: Vec<String> = nodes
        .iter()
        .map(|node| format!("via-{}", node.id))
        .collect();
    assert_eq!(texts(&messages(&mut member, 3).await), expected);

    let auth = format!("Bearer {API_KEY}");
    let body = json!({"userId": member.user_id.clone()}).to_string();
    let kicked = http_request(
        nodes[1].port,
        "POST",
        &format!("/api/rooms/{room}/kick"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .expect("node b answered");
    assert_eq!(
        (kicked.status, kicked.body.as_str()),
        (202, r#"{"nodes":3}"#),
        "every node got the command"
    );
    let left = member.recv_type("left").await;
    assert_eq!(
        (&left["room"], &left["kicked"]),
        (&json!(room), &json!(true))
    );
}
