//! Several nodes sharing rooms through a real `redis-server`.

mod common;

use std::time::Duration;

use common::relay::{Delay, Relay};
use common::{Client, Gateway, Node, Persistence, Redis, wait_until, ws_handshake};
use serde_json::json;

/// The cluster suite on one Redis server (`redis_cluster.rs` runs it on a Redis Cluster).
mod one_redis {
    use super::common::{Redis, scenarios};

    #[tokio::test]
    async fn a_message_sent_on_one_node_reaches_members_on_every_node_exactly_once() {
        scenarios::exactly_once_on_every_node(&Redis::start()).await;
    }

    #[tokio::test]
    async fn concurrent_senders_on_different_nodes_see_one_order_everywhere() {
        scenarios::one_order_for_concurrent_senders(&Redis::start()).await;
    }

    #[tokio::test]
    async fn rooms_are_isolated_across_nodes() {
        scenarios::rooms_are_isolated(&Redis::start()).await;
    }

    #[tokio::test]
    async fn a_node_subscribes_once_per_room_and_unsubscribes_when_its_last_member_leaves() {
        scenarios::subscribed_once_per_node_and_unsubscribed_after_the_last_member(&Redis::start())
            .await;
    }

    #[tokio::test]
    async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
        scenarios::a_client_resumes_on_another_node_with_exactly_what_it_missed(&Redis::start())
            .await;
    }

    #[tokio::test]
    async fn posts_and_commands_reach_the_node_holding_their_target() {
        scenarios::posts_and_commands_reach_the_node_holding_their_target(&Redis::start()).await;
    }

    #[tokio::test]
    async fn presence_spans_nodes_and_a_killed_nodes_users_leave_within_the_ttl() {
        scenarios::presence_spans_nodes_and_a_killed_nodes_users_leave_within_the_ttl(
            &Redis::start(),
        )
        .await;
    }
}

#[tokio::test]
async fn a_welcomed_member_gets_what_is_sent_next_even_when_its_node_subscribes_slowly() {
    let redis = Redis::start();
    // The member's node reaches Redis through a link that holds its subscriptions back, so
    // the member would be welcomed long before Redis knew the node is in the room.
    let slow_link = Relay::start(redis.port, Delay::Subscriptions(Duration::from_millis(400)));
    let slow = Node::start("slow", Some(&slow_link.url()), &[]);
    let fast = Node::clustered("fast", &redis, &[]);
    let mut sender = Client::connect(&fast.ws_url("/ws?room=general")).await;
    let mut member = Client::connect(&slow.ws_url("/ws?room=general")).await;
    sender.say("general", "sent right after the welcome").await;
    assert_eq!(
        member.recv_type("message").await["message"],
        "sent right after the welcome"
    );
}

#[tokio::test]
async fn a_room_left_while_redis_was_down_is_not_resubscribed_when_redis_returns() {
    // With its data kept, Redis comes back with the room's history, so the room that stays
    // needs no resync: it is simply subscribed again.
    let mut redis = Redis::start_with(Persistence::Aof);
    let node = Node::clustered("node-a", &redis, &["--redis-timeout", "500ms"]);
    let stays = Client::connect(&node.ws_url("/ws?room=stays")).await;
    let leaves = Client::connect(&node.ws_url("/ws?room=gone")).await;

    redis.kill();
    wait_until("the node to notice", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    leaves.close().await;
    wait_until("the node to drop the room", || {
        node.metric("chat_rooms_local") == 1.0
    });

    redis.restart();
    // The node resubscribes all its rooms with one command: once one is back, all are.
    wait_until("the node to resubscribe", || {
        !redis.subscribed_rooms().is_empty()
    });
    assert_eq!(redis.subscribed_rooms(), ["stays"]);
    drop(stays);
}

#[tokio::test]
async fn readiness_follows_redis_and_failed_publishes_are_reported() {
    let mut redis = Redis::start_with(Persistence::Aof);
    let node = Node::clustered("node-a", &redis, &["--redis-timeout", "500ms"]);
    let mut client = Client::connect(&node.ws_url("/ws?room=ops")).await;
    client.say("ops", "before").await;

    redis.kill();
    wait_until("the node to report not ready", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    assert_eq!(node.metric("chat_redis_connected"), 0.0);
    // A publish already on its way when the connection broke may have reached Redis: its
    // outcome is unknown. Once the node knows Redis is gone, publishes fail at once.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        client
            .send(json!({"type":"message","message":"during","ref":"lost?"}))
            .await;
        let refused = client.recv_type("error").await;
        assert_eq!(
            refused["ref"], "lost?",
            "the sender learns which message failed"
        );
        if refused["code"] == "publish_failed" {
            break;
        }
        assert_eq!(refused["code"], "publish_unknown");
        assert!(std::time::Instant::now() < deadline, "publishes fail fast");
    }

    redis.restart();
    wait_until("the node to be ready again", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    // The subscription came back with the connection: a message goes round again.
    let mut delivered = false;
    for attempt in 0..50 {
        client
            .send(json!({"type":"message","message":format!("after-{attempt}"),"ref":attempt}))
            .await;
        let reply = client.recv().await;
        if reply["type"] == "ack" {
            let echoed = client.recv_within(Duration::from_millis(200)).await;
            if echoed.is_some_and(|frame| frame["type"] == "message") {
                delivered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "messages flow again after Redis returns");
}

#[tokio::test]
async fn a_node_without_redis_starts_but_is_not_ready() {
    let closed_port = common::free_port();
    let node = Node::spawn(
        "node-x",
        Some(&format!("redis://127.0.0.1:{closed_port}")),
        &[],
    );
    assert_eq!(node.get("/healthz").map(|(status, _)| status), Some(200));
    assert_eq!(node.get("/readyz").map(|(status, _)| status), Some(503));
    // A handshake is refused before the upgrade, so a load balancer can try another node.
    let reply = ws_handshake(node.port, "/ws", &[]).expect("an answer");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("5"), "{reply:?}");
    assert_eq!(
        node.metric_where("chat_handshakes_refused_total", r#"reason="not_ready""#),
        1.0
    );
    assert_eq!(node.metric("chat_connections_accepted_total"), 0.0);
}

#[tokio::test]
async fn a_node_that_loses_redis_refuses_handshakes_until_it_is_back() {
    let mut redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &[]);
    redis.kill();
    wait_until("the node to report not ready", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    let reply = ws_handshake(node.port, "/ws", &[]).expect("an answer");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.header("retry-after").is_some(), "{reply:?}");

    redis.restart();
    wait_until("the node to be ready again", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    let mut client = Client::connect(&node.ws_url("/ws?room=back")).await;
    client.say("back", "in again").await;
}

#[tokio::test]
async fn a_nodes_rooms_stay_present_while_it_lives_and_their_keys_expire_after_it_dies() {
    let redis = Redis::start();
    // Entries live 1.5 s, presence keys twice that, history as long as its age limit (3 s).
    // Heartbeats come every half second, all of the node's rooms in one call, and refresh the
    // keys' expiry only now and then: a room the heartbeat missed, a refresh that never came,
    // or a key left without expiry shows.
    let node = Node::clustered(
        "node-a",
        &redis,
        &["--presence-ttl", "1500ms", "--history-max-age", "3s"],
    );
    let rooms = ["fading", "second", "third", "fourth"];
    let mut members = Vec::new();
    for room in rooms {
        let url = node.ws_url(&format!("/ws?room={room}&presence=true"));
        members.push(Client::connect(&url).await);
    }
    members[0].say("fading", "kept while someone is here").await;
    let exists = |key: &str| {
        redis
            .command(&["EXISTS", key])
            .is_ok_and(|n| n.trim() == "1")
    };
    let redis_now_ms = || -> u64 {
        let time = redis.command(&["TIME"]).expect("TIME");
        let mut parts = time
            .split_whitespace()
            .map(|part| part.parse::<u64>().expect("a number"));
        let (seconds, micros) = (parts.next().expect("s"), parts.next().expect("µs"));
        seconds * 1000 + micros / 1000
    };
    // Longer than the keys' lifetime: only the heartbeats keep the rooms' presence.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        for room in rooms {
            let entries = format!("chat:{{{room}}}:presence");
            assert!(exists(&entries), "{room}'s presence stays");
            assert!(exists(&format!("chat:{{{room}}}:presence-users")));
            let expiry: u64 = redis
                .command(&["ZRANGE", &entries, "0", "0", "WITHSCORES"])
                .expect("ZRANGE")
                .lines()
                .nth(1)
                .and_then(|score| score.trim().parse().ok())
                .expect("an entry with its expiry");
            assert!(expiry > redis_now_ms(), "{room}'s entry is kept alive");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut node = node;
    node.process.signal("KILL");
    let _ = node.process.wait_exit(Duration::from_secs(5));
    let mut keys: Vec<String> = ["history", "epoch"]
        .map(|name| format!("chat:{{fading}}:{name}"))
        .into();
    for room in rooms {
        keys.push(format!("chat:{{{room}}}:presence"));
        keys.push(format!("chat:{{{room}}}:presence-users"));
    }
    wait_until("the dead node's room keys to expire", || {
        !keys.iter().any(|key| exists(key))
    });
    drop(members);
}

#[tokio::test]
async fn a_node_reads_every_room_on_one_connection_and_each_partition_delivers_only_its_own() {
    let redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &["--fanout-partitions", "4"]);
    let rooms: Vec<String> = (0..12).map(|i| format!("part-{i}")).collect();
    let mut watcher =
        Client::connect(&node.ws_url(&format!("/ws?room={}&presence=true", rooms[0]))).await;
    for room in &rooms[1..] {
        watcher
            .send(json!({"type":"join","room":room,"presence":true,"ref":room}))
            .await;
        watcher.recv_type("joined").await;
    }
    // Redis writes each connection with pending messages once per event-loop turn: one
    // connection per partition would cost it up to four writes where one does.
    let most_on_one_connection = redis
        .command(&["CLIENT", "LIST"])
        .expect("CLIENT LIST")
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("ssub="))
        .filter_map(|count| count.parse::<usize>().ok())
        .max();
    assert_eq!(
        most_on_one_connection,
        Some(rooms.len()),
        "the node's rooms share one subscriber connection"
    );
    // Every partition reads the connection and must hand on only its own rooms' traffic.
    // Presence events carry no offset that would let a room drop a second copy.
    let mut visitor = Client::connect(&node.ws_url("/ws?room=elsewhere")).await;
    for room in &rooms {
        visitor.join(room).await;
        visitor.say(room, &format!("to {room}")).await;
    }
    let mut seen: Vec<String> = Vec::new();
    while let Some(frame) = watcher.recv_within(Duration::from_millis(500)).await {
        let kind = frame["type"].as_str().unwrap_or_default();
        let about_visitor = frame["userId"].as_str() == Some(visitor.user_id.as_str());
        if (kind == "message" || kind == "presence_event") && about_visitor {
            seen.push(format!(
                "{kind} {}",
                frame["room"].as_str().unwrap_or_default()
            ));
        }
    }
    seen.sort();
    let mut expected: Vec<String> = rooms
        .iter()
        .flat_map(|room| [format!("message {room}"), format!("presence_event {room}")])
        .collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "each room's message and join arrived exactly once"
    );
}
