//! Nodes on the other Redis topologies: a Sentinel-managed primary that fails over under
//! traffic (its nodes' SSE routing and server API commands keep working on the promoted replica),
//! and a Redis that takes TLS connections and passwords only.

mod common;

use std::process::Command;
use std::time::Duration;

use common::redis_cluster::Sentinels;
use common::traffic::{Live, Traffic, measure_failover};
use common::{
    Client, Gateway, Node, Persistence, Redis, SharedRedis, scenarios, temp_dir, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_loses_no_acked_message_when_acks_wait_for_a_replica() {
    // Every replica must hold a message before it is acknowledged (here the only one), so
    // whichever replica Sentinel promotes holds everything acknowledged. Until the old primary
    // is back as its replica nothing more can be acknowledged: senders retry with their cids.
    let mut sentinels = Sentinels::start(1);
    let flags = ["--ack-replicas", "1", "--api-key", scenarios::API_KEY];
    let nodes = ["node-a", "node-b", "node-c"].map(|id| Node::clustered(id, &sentinels, &flags));
    let live = Live::of(nodes.iter().map(Gateway::ws_base));
    let room = "sentinel";
    let traffic = Traffic::start(&live, room, 6, 2, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let promoted = sentinels.kill_primary();
    sentinels.restart_killed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = traffic.finish().await;
    report.assert_exactly_once();

    // No node was restarted: the nodes find the promoted replica by themselves, each within
    // its reconnect backoff, and a new member then chats through it. Until its node has found
    // it, a message is refused with an error the client retries (with its cid).
    let mut late = Client::connect(&nodes[1].ws_url(&format!("/ws?room={room}"))).await;
    wait_until(
        &format!("the room subscribed on the promoted replica (port {promoted})"),
        || sentinels.subscribed_rooms().contains(&room.to_owned()),
    );
    late.say_until_acked("after the failover", "late").await;
    assert_eq!(
        late.recv_type("message").await["message"],
        "after the failover"
    );
    // The nodes' inbox and control channels followed the promotion too.
    scenarios::posts_and_commands_reach_their_target_among(&nodes, "routed-after-failover").await;
}

/// Measures, for `--ack-replicas` 0 and 1, how many acknowledged messages a Sentinel failover
/// loses and how long the first message after the kill waits for its ack. Run by hand:
/// `cargo test -p gateway --test redis_topologies -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, printed for docs/benchmarks.md"]
async fn measure_sentinel_failover_losses_with_and_without_replica_acks() {
    for replicas in ["0", "1"] {
        for run in 0..3 {
            let mut sentinels = Sentinels::start(2);
            let nodes = ["node-a", "node-b", "node-c"]
                .map(|id| Node::clustered(id, &sentinels, &["--ack-replicas", replicas]));
            let label = format!("ack-replicas {replicas} run {run}");
            measure_failover(&nodes, &label, || {
                sentinels.kill_primary_now();
            })
            .await;
        }
    }
}

/// A certificate authority and a server certificate for 127.0.0.1, made with `openssl`.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Certificates {
        common::require("openssl");
        let dir = temp_dir("tls");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run openssl");
            assert!(status.success(), "openssl {args:?}");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=chat test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(path("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        Certificates { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test]
async fn nodes_chat_over_tls_with_passwords_from_the_url_or_a_file_and_refuse_bad_ones() {
    let certificates = Certificates::make();
    let (cert, key, ca) = (
        certificates.path("server.crt"),
        certificates.path("server.key"),
        certificates.path("ca.crt"),
    );
    let redis = Redis::start_with_args(
        Persistence::None,
        &[
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "default-secret",
            "--user",
            "gateway",
            "on",
            ">gateway-secret",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let port = redis.port;
    assert!(redis.url().starts_with("rediss://"));

    // An ACL user named in the URL, and the default user with its password in a file.
    let a = Node::start(
        "node-a",
        Some(&format!("rediss://gateway:gateway-secret@127.0.0.1:{port}")),
        &["--redis-tls-ca", &ca],
    );
    let secrets = temp_dir("secrets");
    let password_file = secrets.path().join("redis-password");
    std::fs::write(&password_file, "default-secret\n").expect("write the password file");
    let b = Node::start(
        "node-b",
        Some(&format!("rediss://127.0.0.1:{port}")),
        &[
            "--redis-tls-ca",
            &ca,
            "--redis-password-file",
            &password_file.display().to_string(),
        ],
    );
    let mut on_a = Client::connect(&a.ws_url("/ws?room=secure")).await;
    let mut on_b = Client::connect(&b.ws_url("/ws?room=secure")).await;
    on_a.say("secure", "over tls").await;
    assert_eq!(on_b.recv_type("message").await["message"], "over tls");

    // A wrong password, or a certificate the node cannot verify: never ready, and the log
    // says why.
    for (id, url, extra, why) in [
        (
            "wrong-password",
            format!("rediss://gateway:nope@127.0.0.1:{port}"),
            vec!["--redis-tls-ca", ca.as_str()],
            "WRONGPASS",
        ),
        (
            "unknown-ca",
            format!("rediss://gateway:gateway-secret@127.0.0.1:{port}"),
            vec![],
            "InvalidCertificate",
        ),
    ] {
        let node = Node::spawn(id, Some(&url), &extra);
        wait_until(&format!("{id}: the node to log {why}"), || {
            node.log_text().contains(why)
        });
        assert_eq!(
            node.get("/readyz").map(|(status, _)| status),
            Some(503),
            "{id}: not ready"
        );
    }
}
