//! One node with the in-process broker: the protocol as a client sees it, bad input, liveness
//! and shutdown.

mod common;

use std::time::Duration;

use common::{
    Client, Ended, Gateway, Node, RawWebSocket, http_get, http_request, local::LocalNode,
    ws_handshake,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn the_seed_client_works_unchanged() {
    let node = LocalNode::start(&[]);
    // Exactly what the seed React client does: connect to the bare URL, wait for userId, send
    // {userId, message}, and show `data.message` of every other frame.
    let mut seed = Client::connect(&node.ws_url("")).await;
    let mut other = Client::connect(&node.ws_url("/")).await;
    assert!(seed.user_id.starts_with("u-"));
    assert_ne!(
        seed.user_id, other.user_id,
        "each connection gets its own id"
    );

    let sender = seed.user_id.clone();
    seed.send_text(&format!(
        r#"{{"userId":"{sender}","message":"안녕하세요"}}"#
    ))
    .await;
    for client in [&mut seed, &mut other] {
        let frame = client.recv().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["message"], "안녕하세요");
        assert_eq!(frame["room"], "lobby");
        assert_eq!(frame["userId"], sender.as_str());
        assert!(
            frame["ts"]
                .as_u64()
                .is_some_and(|ts| ts > 1_600_000_000_000),
            "ts is unix ms: {frame}"
        );
        let id = uuid::Uuid::parse_str(frame["id"].as_str().unwrap()).expect("id is a uuid");
        assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
        let keys: Vec<&str> = frame
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "epoch", "id", "message", "offset", "room", "ts", "type", "userId"
            ],
            "nothing beyond the documented fields"
        );
    }
    // A plain {"message": ...} works too, and the seed client gets no ack it would display.
    seed.send_text(r#"{"message":"plain"}"#).await;
    assert_eq!(seed.recv().await["message"], "plain");
    assert_eq!(
        seed.recv_within(Duration::from_millis(300)).await,
        None,
        "no extra frames for a seed client"
    );
}

#[tokio::test]
async fn the_welcome_frame_names_user_node_room_and_protocol() {
    let node = LocalNode::start(&[]);
    let (mut socket, _) = tokio_tungstenite::connect_async(node.ws_url("/ws?room=news&name=alice"))
        .await
        .unwrap();
    use futures_util::StreamExt;
    let Some(Ok(Message::Text(text))) = socket.next().await else {
        panic!("no welcome")
    };
    let welcome: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(welcome["type"], "userId");
    assert_eq!(welcome["node"], "solo");
    assert_eq!(welcome["room"], "news");
    assert_eq!(welcome["protocol"], 1);
}

#[tokio::test]
async fn typed_clients_join_several_rooms_and_get_acks_echoing_ref() {
    let node = LocalNode::start(&[]);
    let mut alice = Client::connect(&node.ws_url("/ws?room=a&name=alice")).await;
    let mut bob = Client::connect(&node.ws_url("/ws?room=b")).await;

    bob.send(json!({"type":"join","room":"a","ref":{"n":1}}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type":"joined","room":"a","ref":{"n":1}})
    );

    let id = alice.say("a", "hello a").await;
    let got = bob.recv_type("message").await;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["name"], "alice");
    assert_eq!(got["room"], "a");

    // Rooms are isolated: a message to b reaches bob but never alice.
    bob.say("b", "only b").await;
    let echo = bob.recv_type("message").await;
    assert_eq!(echo["message"], "only b");
    assert_eq!(alice.recv_type("message").await["message"], "hello a");
    assert_eq!(alice.recv_within(Duration::from_millis(300)).await, None);

    bob.send(json!({"type":"leave","room":"a","ref":2})).await;
    assert_eq!(bob.recv().await, json!({"type":"left","room":"a","ref":2}));
    alice.say("a", "after leave").await;
    assert_eq!(
        bob.recv_within(Duration::from_millis(300)).await,
        None,
        "no delivery after leave"
    );

    bob.send(json!({"type":"ping","ref":"p"})).await;
    assert_eq!(bob.recv().await, json!({"type":"pong","ref":"p"}));
}

#[tokio::test]
async fn every_kind_of_bad_input_gets_a_clear_error_and_the_connection_survives() {
    let node = LocalNode::start(&["--max-chat-bytes", "10", "--max-rooms-per-connection", "2"]);
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    let cases = [
        ("{not json", "invalid_json"),
        ("[1,2,3]", "invalid_json"),
        (r#"{"type":"teleport","ref":1}"#, "unknown_type"),
        (r#"{"type":"join","ref":1}"#, "invalid_frame"),
        (r#"{"type":"message","ref":1}"#, "invalid_frame"),
        (
            r#"{"type":"join","room":"no spaces","ref":1}"#,
            "invalid_room",
        ),
        (r#"{"type":"join","room":"x/y","ref":1}"#, "invalid_room"),
        (
            &format!(r#"{{"type":"join","room":"{}","ref":1}}"#, "r".repeat(65)),
            "invalid_room",
        ),
        (
            r#"{"type":"message","message":"eleven bytes","ref":1}"#,
            "message_too_large",
        ),
        (
            r#"{"type":"message","message":"","ref":1}"#,
            "empty_message",
        ),
        (
            r#"{"type":"message","room":"elsewhere","message":"hi","ref":1}"#,
            "not_in_room",
        ),
        (
            r#"{"type":"leave","room":"elsewhere","ref":1}"#,
            "not_in_room",
        ),
    ];
    for (input, code) in cases {
        client.send_text(input).await;
        let reply = client.recv().await;
        assert_eq!(reply["type"], "error", "{input}");
        assert_eq!(reply["code"], code, "{input}: {reply}");
        assert!(
            reply["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty()),
            "{input}"
        );
        if input.contains("\"ref\"") {
            assert_eq!(reply["ref"], 1, "{input}");
        }
    }

    client.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(client.recv().await["code"], "binary_unsupported");

    // The room limit counts the default room: one more is fine, the next is refused.
    client.join("second").await;
    client
        .send(json!({"type":"join","room":"third","ref":9}))
        .await;
    let refused = client.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_i64()),
        (Some("too_many_rooms"), Some(9))
    );

    // After all that, the connection still works.
    client.say("lobby", "still ok").await;
    assert!(node.metric("chat_client_errors_total") >= 14.0);
}

#[tokio::test]
async fn an_oversize_frame_closes_with_1009() {
    let node = LocalNode::start(&["--max-frame-bytes", "1024"]);
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client
        .send_text(&format!(r#"{{"message":"{}"}}"#, "x".repeat(2000)))
        .await;
    let (_, ended) = client.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1009));
}

#[tokio::test]
async fn a_client_still_sending_an_oversize_frame_reads_the_1009_close_not_a_reset() {
    let node = LocalNode::start(&["--max-frame-bytes", "1024"]);
    let mut raw = RawWebSocket::open(node.port, "/ws", &[]);
    let (_, welcome) = raw.next_frame().expect("the welcome frame");
    assert!(String::from_utf8_lossy(&welcome).contains("userId"));
    // A 4 MiB frame: the node refuses it on its header, while most of it is still on its way.
    let len: u64 = 4 << 20;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + len as usize, b'x');
    let mut writer = raw.try_clone();
    let sending = std::thread::spawn(move || writer.try_send(&frame));
    // A client busy writing reads a little later: the close must still be there to read.
    std::thread::sleep(Duration::from_millis(300));
    let (_, close) = raw.texts_until_close();
    assert_eq!(close, Some(1009), "the close frame arrived intact");
    let sent = sending.join().expect("the writer");
    assert!(sent.is_ok(), "the node read and dropped the rest: {sent:?}");
    // The client answers the close and closes; the node had closed its side already.
    raw.send(&RawWebSocket::frame(0x8, &1009u16.to_be_bytes(), true));
    assert!(
        raw.read_to_end().is_ok(),
        "the connection ended cleanly, not reset"
    );
}

#[tokio::test]
async fn handshakes_with_a_bad_room_or_name_are_refused_before_upgrading() {
    let node = LocalNode::start(&[]);
    for query in [
        "room=has%20space",
        "room=",
        "name=",
        &format!("name={}", "n".repeat(65)),
    ] {
        let path = format!("/ws?{query}");
        let upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        let (status, body) = http_get(node.port, &path, &upgrade).expect("answer");
        assert_eq!(status, 400, "{query}: {body}");
    }
    // Without an upgrade, / serves the demo page and /ws says an upgrade is needed.
    let (status, page) = node.get("/").unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") || page.contains("<!doctype html"),
        "demo page served"
    );
    assert_ne!(node.get("/ws").unwrap().0, 200);
}

/// The demo page imports the client library from the node: what the node serves must be the
/// committed build in clients/js/dist byte for byte (a binary built from an older checkout
/// would fail here), and the page's icon must exist so browsers log no 404.
#[test]
fn the_node_serves_the_client_library_build_and_an_icon() {
    let node = LocalNode::start(&[]);
    let library = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../clients/js/dist/chat-client.js"
    );
    let expected = std::fs::read_to_string(library).expect("clients/js/dist/chat-client.js");
    let served = http_request(node.port, "GET", "/chat-client.js", &[], b"").expect("answer");
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(served.body == expected, "served library differs from dist");
    let page = http_get(node.port, "/", &[]).expect("answer").1;
    assert!(page.contains("\"/chat-client.js\""), "the page imports it");
    for path in ["/favicon.svg", "/favicon.ico"] {
        let icon = http_request(node.port, "GET", path, &[], b"").expect("answer");
        assert_eq!(icon.status, 200, "{path}");
        assert_eq!(icon.header("content-type"), Some("image/svg+xml"), "{path}");
        assert!(icon.body.starts_with("<svg"), "{path}");
    }
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_for_idleness() {
    let node = LocalNode::start(&["--ping-interval", "200ms", "--idle-timeout", "600ms"]);
    let mut silent = Client::connect(&node.ws_url("/ws")).await;
    // While we do not read, our client library cannot answer the server's pings.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, ended) = silent.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4001));
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let node = LocalNode::start(&["--ping-interval", "200ms", "--idle-timeout", "600ms"]);
    let mut lively = Client::connect(&node.ws_url("/ws")).await;
    // Reading answers pings; stay well past the idle timeout.
    assert_eq!(lively.recv_within(Duration::from_millis(1500)).await, None);
    lively.say("lobby", "still here").await;
}

async fn shutdown_closes_every_client_with(signal: &str, code: u16) {
    // A real process: the signal handling is the binary's.
    let mut node = Node::start("solo", None, &[]);
    let mut a = Client::connect(&node.ws_url("/ws")).await;
    let mut b = Client::connect(&node.ws_url("/ws?room=other")).await;
    node.process.signal(signal);
    for client in [&mut a, &mut b] {
        let (_, ended) = client.recv_until_end().await;
        assert_eq!(ended, Ended::Closed(code), "after SIG{signal}");
    }
    assert_eq!(node.process.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn sigint_closes_every_client_with_1001_and_exits_zero() {
    shutdown_closes_every_client_with("INT", 1001).await;
}

#[tokio::test]
async fn sigterm_drains_with_1012_so_clients_resume_elsewhere() {
    shutdown_closes_every_client_with("TERM", 1012).await;
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let node = LocalNode::start(&[]);
    assert_eq!(node.get("/healthz").unwrap(), (200, "ok".to_owned()));
    assert_eq!(node.get("/readyz").unwrap().0, 200);
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client.say("lobby", "count me").await;
    client.recv_type("message").await;
    assert_eq!(node.metric("chat_connections_open"), 1.0);
    assert_eq!(node.metric("chat_connections_accepted_total"), 1.0);
    assert_eq!(node.metric("chat_messages_received_total"), 1.0);
    assert_eq!(node.metric("chat_messages_delivered_total"), 1.0);
    assert_eq!(node.metric("chat_rooms_local"), 1.0);
    let (_, body) = node.get("/metrics").unwrap();
    assert!(
        body.contains(r#"node="solo""#),
        "series carry the node label"
    );
    assert!(
        body.contains("chat_fanout_latency_seconds_bucket"),
        "fan-out latency is a histogram"
    );
}

#[tokio::test]
async fn metrics_show_the_process_bytes_and_closes_and_move_with_traffic() {
    // A process of its own: the process metrics are the node's, not the test runner's.
    let node = Node::single(&[]);
    // Counters exist from the start, so `rate()` and `increase()` see their first event.
    for (name, label) in [
        ("chat_bytes_received_total", ""),
        ("chat_bytes_sent_total", ""),
        ("chat_closes_total", r#"code="1000""#),
        ("chat_closes_total", r#"code="1006""#),
        ("chat_closes_total", r#"code="4000""#),
        ("chat_handshakes_refused_total", r#"reason="not_ready""#),
        ("chat_outbox_backlog_bytes", ""),
    ] {
        assert_eq!(node.metric_where(name, label), 0.0, "{name} {label}");
    }
    let rss = node.metric("process_resident_memory_bytes");
    assert!(
        rss > 1e6,
        "a node's resident memory is megabytes, not {rss}"
    );
    let (open, max) = (
        node.metric("process_open_fds"),
        node.metric("process_max_fds"),
    );
    assert!(0.0 < open && open < max, "{open} open of at most {max} fds");
    assert!(node.metric("process_threads") >= 2.0, "runtime threads");
    assert!(
        node.series_where("process_cpu_seconds_total", "").is_some(),
        "CPU time is exported"
    );

    let mut client = Client::connect(&node.ws_url("/ws?room=bytes")).await;
    // Counted once the node's write returns, which may be just after the client read it.
    common::wait_until("the welcome frame to be counted", || {
        node.metric("chat_bytes_sent_total") > 0.0
    });
    let sent_before = node.metric("chat_bytes_sent_total");
    let text = "x".repeat(100);
    client.say("bytes", &text).await;
    client.recv_type("message").await;
    // What the client sent is at least the message in a masked frame (a 8-byte header at this
    // length, the mask included); what it got back holds the ack and the message itself.
    common::wait_until("the bytes both ways to be counted", || {
        node.metric("chat_bytes_received_total") >= (text.len() + 8) as f64
            && node.metric("chat_bytes_sent_total") >= sent_before + 2.0 * text.len() as f64
    });

    client.close().await;
    common::wait_until("the close to be counted by its code", || {
        node.metric_where("chat_closes_total", r#"code="1000""#) == 1.0
    });
    assert_eq!(node.metric("chat_connections_open"), 0.0);
}

#[tokio::test]
async fn with_an_internal_listener_metrics_are_served_there_only() {
    let internal = common::free_port();
    let node = Node::single(&["--internal-listen", &format!("127.0.0.1:{internal}")]);
    assert_eq!(node.get("/metrics").map(|(status, _)| status), Some(404));
    assert_eq!(node.get("/api/").map(|(status, _)| status), Some(404));
    let (status, body) = http_get(internal, "/metrics", &[]).expect("the internal listener");
    assert_eq!(status, 200);
    assert!(body.contains("chat_connections_open"), "{body}");
    // Probes work on either; clients only on the public one.
    for port in [node.port, internal] {
        assert_eq!(http_get(port, "/healthz", &[]).map(|(s, _)| s), Some(200));
        assert_eq!(http_get(port, "/readyz", &[]).map(|(s, _)| s), Some(200));
    }
    assert_eq!(http_get(internal, "/", &[]).map(|(s, _)| s), Some(404));
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client.say("lobby", "public as before").await;
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_without_stalling_its_room() {
    const MESSAGES: usize = 1000;
    // The sender sends as fast as acks come back: far over the default message rate limits.
    let node = LocalNode::start(&[
        "--outbox-capacity",
        "64",
        "--max-chat-bytes",
        "16384",
        "--conn-message-rate",
        "0",
        "--user-message-rate",
        "0",
    ]);
    // Connected and then never read from, until the end.
    let mut slow = Client::connect(&node.ws_url("/ws?room=busy")).await;
    let mut fast = Client::connect(&node.ws_url("/ws?room=busy")).await;
    let mut sender = Client::connect(&node.ws_url("/ws?room=busy")).await;
    // 16 MB in all: more than the slow client's socket buffers can absorb.
    let body = "x".repeat(16_000);
    let fast_reader = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let frame = fast.recv_type("message").await;
            let text = frame["message"].as_str().unwrap();
            assert!(
                text.starts_with(&format!("{i}:")),
                "fast member got every message in order"
            );
        }
        fast
    });
    // Each send waits for its ack: a steady sender, not a burst that would overrun anyone.
    for i in 0..MESSAGES {
        sender.say("busy", &format!("{i}:{body}")).await;
        sender.recv_type("message").await;
    }
    let _fast = fast_reader.await.expect("the fast member kept up");

    common::wait_until("the slow consumer to be counted", || {
        node.metric("chat_slow_consumer_disconnects_total") == 1.0
    });
    let (frames, ended) = slow.recv_until_end().await;

    assert!(
        frames.len() < MESSAGES,
        "the slow consumer was cut off, not fed everything"
    );
    assert!(
        matches!(ended, Ended::Closed(4000) | Ended::Dropped),
        "slow consumer ended with {ended:?}"
    );
    // The node ends the session once the client answered the close (or within a second).
    common::wait_until("only the slow consumer to be disconnected", || {
        node.metric("chat_connections_open") == 2.0
    });
}

#[tokio::test]
async fn the_handshake_follows_rfc_6455_and_refuses_what_it_cannot_serve() {
    let node = LocalNode::start(&[]);
    // The RFC's own example key and the accept value it must produce.
    let accepted =
        ws_handshake(node.port, "/ws", &[("Sec-WebSocket-Protocol", "chat.v1")]).expect("answer");
    assert_eq!(accepted.status, 101);
    assert_eq!(
        accepted.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(accepted.header("sec-websocket-protocol"), Some("chat.v1"));
    let unnamed = ws_handshake(node.port, "/ws", &[]).expect("answer");
    assert_eq!(unnamed.status, 101);
    assert_eq!(
        unnamed.header("sec-websocket-protocol"),
        None,
        "no subprotocol is chosen when none was offered"
    );

    let old_version = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "8"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let (status, body) = http_get(node.port, "/ws", &old_version).expect("answer");
    assert_eq!(status, 426, "only version 13 exists: {body}");

    let keyless = &old_version[..2];
    let (status, body) = http_get(
        node.port,
        "/ws",
        &[keyless, &[("Sec-WebSocket-Version", "13")]].concat(),
    )
    .expect("answer");
    assert_eq!(status, 400, "no key: {body}");
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    let (status, _) = http_get(node.port, "/ws", &[("Upgrade", "websocket")]).expect("answer");
    assert_eq!(status, 400, "not an upgrade");

    // The key must be the base64 of 16 bytes (RFC 6455 §4.2.1), and given once.
    let version = [keyless, &[("Sec-WebSocket-Version", "13")]].concat();
    for key in [
        "abc",
        "not base64 at all!",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "",
    ] {
        let with_key = [&version[..], &[("Sec-WebSocket-Key", key)]].concat();
        let (status, body) = http_get(node.port, "/ws", &with_key).expect("answer");
        assert_eq!(status, 400, "key {key:?}: {body}");
    }
    let twice = [
        &version[..],
        &[
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Key", "AQIDBAUGBwgJCgsMDQ4PEA=="),
        ],
    ]
    .concat();
    let (status, body) = http_get(node.port, "/ws", &twice).expect("answer");
    assert_eq!(status, 400, "two keys: {body}");
}

#[tokio::test]
async fn frames_sent_in_the_same_packet_as_the_handshake_are_read() {
    let node = LocalNode::start(&[]);
    let ping = RawWebSocket::frame(0x1, br#"{"type":"ping","ref":7}"#, true);
    let mut socket = RawWebSocket::open(node.port, "/ws", &ping);
    let (_, welcome) = socket.next_frame().expect("welcome");
    let welcome: serde_json::Value = serde_json::from_slice(&welcome).unwrap();
    assert_eq!(welcome["type"], "userId");
    let (_, pong) = socket.next_frame().expect("pong");
    let pong: serde_json::Value = serde_json::from_slice(&pong).unwrap();
    assert_eq!(
        (pong["type"].as_str(), pong["ref"].as_i64()),
        (Some("pong"), Some(7))
    );
}

#[tokio::test]
async fn broken_frames_close_with_the_rfc_codes() {
    let node = LocalNode::start(&[]);
    // An unmasked frame from a client is a protocol error (RFC 6455 §5.1).
    let mut unmasked = RawWebSocket::open(node.port, "/ws", &[]);
    unmasked.send(&RawWebSocket::frame(0x1, br#"{"message":"hi"}"#, false));
    assert_eq!(unmasked.texts_until_close().1, Some(1002));
    // A text frame that is not UTF-8.
    let mut garbled = RawWebSocket::open(node.port, "/ws", &[]);
    garbled.send(&RawWebSocket::frame(0x1, &[0xff, 0xfe, 0x41], true));
    assert_eq!(garbled.texts_until_close().1, Some(1007));
    // A reserved opcode.
    let mut reserved = RawWebSocket::open(node.port, "/ws", &[]);
    reserved.send(&RawWebSocket::frame(0x3, b"?", true));
    assert_eq!(reserved.texts_until_close().1, Some(1002));
    // The node is fine afterwards.
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client.say("lobby", "still here").await;
}

/// The largest send plus receive buffer the kernel gives one loopback connection.
fn socket_buffers_max() -> usize {
    ["/proc/sys/net/ipv4/tcp_wmem", "/proc/sys/net/ipv4/tcp_rmem"]
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|values| values.split_whitespace().last()?.parse::<usize>().ok())
                .unwrap_or(8 << 20)
        })
        .sum()
}

#[tokio::test]
async fn a_client_that_pauses_reading_gets_every_frame_in_order_when_it_resumes() {
    let node = LocalNode::start(&[
        "--outbox-capacity",
        "4096",
        "--outbox-bytes",
        "134217728",
        "--max-chat-bytes",
        "16384",
    ]);
    let mut paused = Client::connect(&node.ws_url("/ws?room=burst")).await;
    let mut sender = Client::connect(&node.ws_url("/ws?room=burst")).await;
    // More than the kernel's socket buffers can hold for the paused client, so the rest waits
    // in the node's backlog and is written out as the client reads again.
    let body = "y".repeat(16_000);
    let messages = (socket_buffers_max() / body.len() + 200).min(3000);
    for i in 0..messages {
        sender.say("burst", &format!("{i}:{body}")).await;
    }
    let waiting = node.metric("chat_outbox_backlog_bytes");
    assert!(
        waiting > body.len() as f64,
        "the backlog shows in the gauge: {waiting}"
    );
    for i in 0..messages {
        let frame = paused.recv_type("message").await;
        let text = frame["message"].as_str().expect("message text");
        assert!(
            text.starts_with(&format!("{i}:")),
            "frame {i} arrived in order"
        );
    }
    assert_eq!(
        node.metric("chat_slow_consumer_disconnects_total"),
        0.0,
        "a backlog within capacity is not a slow consumer"
    );
    common::wait_until("the backlog gauge to drain to zero", || {
        node.metric("chat_outbox_backlog_bytes") == 0.0
    });
}
