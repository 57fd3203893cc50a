//! Nodes on a real Redis Cluster (`redis-server --cluster-enabled yes` and `redis-cli
//! --cluster create`): the cluster suite, rooms spread over the primaries on sharded pub/sub,
//! a busy room's slot moving to another primary, and a primary failing over to its replica.

mod common;

use std::time::Duration;

use common::redis_cluster::RedisCluster;
use common::traffic::{Live, Traffic, measure_failover};
use common::{Client, Gateway, Node, SharedRedis, scenarios, wait_until};

fn three_nodes(cluster: &RedisCluster, extra: &[&str]) -> [Node; 3] {
    ["node-a", "node-b", "node-c"].map(|id| Node::clustered(id, cluster, extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_suite_passes_on_three_masters() {
    let cluster = RedisCluster::start(3, 0);
    scenarios::exactly_once_on_every_node(&cluster).await;
    scenarios::one_order_for_concurrent_senders(&cluster).await;
    scenarios::rooms_are_isolated(&cluster).await;
    scenarios::subscribed_once_per_node_and_unsubscribed_after_the_last_member(&cluster).await;
    scenarios::a_client_resumes_on_another_node_with_exactly_what_it_missed(&cluster).await;
    scenarios::presence_spans_nodes_and_a_killed_nodes_users_leave_within_the_ttl(&cluster).await;
    scenarios::posts_and_commands_reach_the_node_holding_their_target(&cluster).await;
}

#[tokio::test]
async fn rooms_spread_over_every_master_on_sharded_pub_sub_only() {
    let cluster = RedisCluster::start(3, 0);
    let node = Node::clustered("node-a", &cluster, &["--max-rooms-per-connection", "32"]);
    let rooms: Vec<String> = (0..24).map(|i| format!("spread-{i}")).collect();
    let mut member = Client::connect(&node.ws_url(&format!("/ws?room={}", rooms[0]))).await;
    for room in &rooms[1..] {
        member.join(room).await;
    }
    let by_master = cluster.rooms_by_master();
    assert_eq!(by_master.len(), 3, "three primaries serve slots");
    for (master, subscribed) in &by_master {
        assert!(
            !subscribed.is_empty(),
            "no room is subscribed on the primary at {master}: {by_master:?}"
        );
        for room in subscribed {
            assert_eq!(
                cluster.owner(room),
                *master,
                "{room} is subscribed where its slot is served"
            );
        }
    }
    assert_eq!(cluster.subscribed_rooms(), {
        let mut sorted = rooms.clone();
        sorted.sort();
        sorted
    });
    assert_eq!(
        cluster.classic_channels(),
        Vec::<String>::new(),
        "nothing uses classic pub/sub"
    );

    // And every room works, wherever it is.
    let mut other = Client::connect(&node.ws_url("/ws?room=elsewhere")).await;
    for room in &rooms {
        other.join(room).await;
        other.say(room, "hello").await;
        let got = member.recv_type("message").await;
        assert_eq!(
            (got["room"].as_str(), got["message"].as_str()),
            (Some(room.as_str()), Some("hello"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_rooms_slot_moving_to_another_master_loses_no_acked_message() {
    let cluster = RedisCluster::start(3, 0);
    let nodes = three_nodes(&cluster, &[]);
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let room = "busy";
    let traffic = Traffic::start(&live, room, 6, 2, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let from = cluster.owner(room);
    let to = cluster
        .masters()
        .into_iter()
        .find(|&master| master != from)
        .expect("another primary");
    cluster.move_slot(room, to);
    assert_eq!(cluster.owner(room), to);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();

    // The nodes followed the room: it is subscribed on its new primary only, and works.
    let mut late = Client::connect(&nodes[0].ws_url(&format!("/ws?room={room}"))).await;
    let mut sender = Client::connect(&nodes[1].ws_url(&format!("/ws?room={room}"))).await;
    let by_master = cluster.rooms_by_master();
    assert!(by_master[&to].contains(&room.to_owned()), "{by_master:?}");
    assert!(
        !by_master[&from].contains(&room.to_owned()),
        "{by_master:?}"
    );
    sender.say(room, "after the move").await;
    assert_eq!(late.recv_type("message").await["message"], "after the move");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_failing_over_to_its_replica_loses_no_acked_message_when_acks_wait_for_it() {
    let mut cluster = RedisCluster::start(3, 2);
    let nodes = three_nodes(&cluster, &["--ack-replicas", "1"]);
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let room = "failover";
    let traffic = Traffic::start(&live, room, 6, 2, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let failed = cluster.owner(room);
    cluster.kill_master(failed);
    let promoted = cluster.owner(room);
    assert_ne!(promoted, failed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();

    // The nodes need no restart: they find the promoted replica by themselves, and a new member
    // on any node then chats through it (a message refused meanwhile is sent again with its cid).
    let mut late = Client::connect(&nodes[2].ws_url(&format!("/ws?room={room}"))).await;
    wait_until("the room subscribed on the promoted replica", || {
        cluster
            .rooms_by_master()
            .get(&promoted)
            .is_some_and(|rooms| rooms.contains(&room.to_owned()))
    });
    late.say_until_acked("after the failover", "late").await;
    assert_eq!(
        late.recv_type("message").await["message"],
        "after the failover"
    );
}

/// Measures, for `--ack-replicas` 0 and 1 (of two replicas per primary), how long after its
/// primary is killed a room's first message is acknowledged, and how many acknowledged messages
/// the failover loses. Run by hand: `cargo test -p gateway --test redis_cluster -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, printed for docs/benchmarks.md"]
async fn measure_master_failover_losses_and_recovery() {
    for replicas in ["0", "1"] {
        for run in 0..3 {
            let mut cluster = RedisCluster::start(3, 2);
            let nodes = three_nodes(&cluster, &["--ack-replicas", replicas]);
            let failed = cluster.owner("measured");
            let label = format!("ack-replicas {replicas} run {run}");
            measure_failover(&nodes, &label, || cluster.kill_master_now(failed)).await;
        }
    }
}
