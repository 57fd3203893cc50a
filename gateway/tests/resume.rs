//! Nothing lost: history and resume on any node, presence across the cluster and after a node
//! dies, Redis outages, node kills and rolling restarts — all against real processes.

mod common;

use std::time::{Duration, Instant};

use common::traffic::{Live, Traffic};
use common::{
    Client, Ended, Gateway, Node, PATIENCE, Persistence, Redis, messages, texts, wait_until,
};
use serde_json::json;

#[tokio::test]
async fn a_join_can_ask_for_the_last_messages() {
    let redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &[]);
    let mut sender = Client::connect(&node.ws_url("/ws?room=r")).await;
    for i in 0..5 {
        sender.say("r", &format!("n{i}")).await;
    }
    let mut late = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    late.send(json!({"type":"join","room":"r","last":3})).await;
    let joined = late.recv().await;
    assert_eq!(joined["type"], "joined");
    assert!(joined["epoch"].is_string());
    assert_eq!(texts(&messages(&mut late, 3).await), ["n2", "n3", "n4"]);
}

#[tokio::test]
async fn a_busy_room_keeps_about_its_history_length_and_no_less() {
    let redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &["--history-max-len", "200"]);
    let mut sender = Client::connect(&node.ws_url("/ws?room=r")).await;
    for i in 0..1000 {
        sender.say("r", &format!("m{i}")).await;
    }
    let kept: u64 = redis
        .command(&["XLEN", "chat:{r}:history"])
        .expect("XLEN")
        .trim()
        .parse()
        .expect("a length");
    // Trimmed once every 20 messages (a tenth of the length), in whole stream nodes of up to
    // 100 entries.
    assert!(
        (200..=200 + 20 + 100).contains(&kept),
        "{kept} of 1000 messages kept"
    );
    let mut late = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    late.send(json!({"type":"join","room":"r","last":200}))
        .await;
    assert_eq!(late.recv_type("joined").await["type"], "joined");
    let replayed = messages(&mut late, 200).await;
    assert_eq!(texts(&replayed).first(), Some(&"m800"));
    assert_eq!(texts(&replayed).last(), Some(&"m999"));
}

#[tokio::test]
async fn a_resume_from_beyond_retained_history_or_a_lost_epoch_says_not_recovered() {
    let mut redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &["--history-max-len", "5"]);
    let mut sender = Client::connect(&node.ws_url("/ws?room=r")).await;
    sender.say("r", "first").await;
    let first = messages(&mut sender, 1).await.remove(0);
    // Enough that Redis's approximate trimming must have dropped the first message.
    for i in 0..300 {
        sender.say("r", &format!("x{i}")).await;
    }
    let since = first["offset"].as_str().unwrap();
    let mut late = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    late.send(json!({"type":"join","room":"r","since":since}))
        .await;
    assert_eq!(
        late.recv_type("joined").await["recovered"],
        false,
        "trimmed history is not recovered"
    );

    // Redis restarts without persistence: the history and its epoch are gone.
    let last = messages(&mut sender, 300).await.pop().unwrap();
    redis.kill();
    // Until the node has seen Redis go, "ready" would only describe the old connection.
    wait_until("the node to notice", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    redis.restart();
    // The node cannot know what its members of `r` missed: it sends them to resume.
    let (_, ended) = sender.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4002), "resync");
    // The resync may come before every subscriber connection is back; a client retries its
    // handshake until the node is ready, as the 503's Retry-After asks.
    wait_until("the node to be ready again", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    let mut again = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    again
        .send(json!({"type":"join","room":"r","since":last["offset"],"epoch":last["epoch"]}))
        .await;
    assert_eq!(
        again.recv_type("joined").await["recovered"],
        false,
        "a lost epoch is detected"
    );
}

#[tokio::test]
async fn after_a_redis_restart_delivery_and_presence_recover() {
    let mut redis = Redis::start_with(Persistence::Aof);
    let extra = ["--redis-timeout", "500ms", "--presence-ttl", "1500ms"];
    let a = Node::clustered("node-a", &redis, &extra);
    let b = Node::clustered("node-b", &redis, &extra);
    let mut sender = Client::connect(&a.ws_url("/ws?room=o")).await;
    let mut reader = Client::connect(&b.ws_url("/ws?room=o")).await;
    sender.say("o", "before").await;
    assert_eq!(messages(&mut reader, 1).await[0]["message"], "before");

    redis.kill();
    wait_until("node a to notice", || {
        a.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    let restarted = Instant::now();
    redis.restart();
    for node in [&a, &b] {
        wait_until("the nodes to be ready again", || {
            node.get("/readyz").is_some_and(|(status, _)| status == 200)
        });
    }
    // Both nodes resubscribed: a message goes round again. Retry while subscriptions settle.
    let deadline = Instant::now() + PATIENCE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        sender
            .send(json!({"type":"message","message":format!("after-{attempt}"),"ref":attempt}))
            .await;
        if let Some(frame) = reader.recv_within(Duration::from_millis(300)).await
            && frame["type"] == "message"
        {
            break;
        }
        assert!(Instant::now() < deadline, "delivery did not recover");
    }
    eprintln!(
        "delivery recovered {:?} after redis restarted",
        restarted.elapsed()
    );
    // Presence is rebuilt by the heartbeat.
    wait_until("presence to be rebuilt", || {
        let (_, body) = a.get("/metrics").unwrap_or_default();
        body.contains("chat_redis_connected")
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        reader.send(json!({"type":"presence","room":"o"})).await;
        let listed = reader.recv_type("presence").await;
        if listed["users"]
            .as_array()
            .is_some_and(|users| users.len() == 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence did not recover: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn bases(nodes: &[Node]) -> Live {
    Live::of(nodes.iter().map(Gateway::ws_base))
}

/// Runs members and senders while `churn` disrupts the cluster, then checks that every member
/// received every acknowledged message exactly once, in order.
async fn assert_nothing_lost_during(live: &Live, churn: impl std::future::Future<Output = ()>) {
    let traffic = Traffic::start(live, "churn", 6, 1, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    churn.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();
    assert!(report.reconnects() > 0, "the churn disconnected someone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_traffic_loses_no_message_for_clients_that_resume_elsewhere() {
    let redis = Redis::start();
    let nodes = ["node-a", "node-b", "node-c"].map(|id| Node::clustered(id, &redis, &[]));
    let live = bases(&nodes);
    let [a, b, mut c] = nodes;
    let killed = c.ws_base();
    let churn = async {
        live.remove(&killed);
        c.process.signal("KILL");
    };
    assert_nothing_lost_during(&live, churn).await;
    c.process.wait_exit(Duration::from_secs(5));
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_node_under_load_loses_no_message() {
    let redis = Redis::start();
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| Node::clustered(id, &redis, &[]))
        .collect();
    let live = bases(&nodes);
    let churn = async {
        for node in nodes.iter_mut() {
            // The load balancer stops sending new clients to a draining node.
            live.remove(&node.ws_base());
            node.process.signal("TERM");
            assert_eq!(node.process.wait_exit(Duration::from_secs(10)), Some(0));
            let id = node.id.clone();
            *node = Node::clustered(&id, &redis, &[]);
            live.add(node.ws_base());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    assert_nothing_lost_during(&live, churn).await;
}
