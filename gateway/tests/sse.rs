//! The SSE + POST fallback against real nodes: a stream chats with WebSocket members, a POST
//! landing on any node reaches its session, `Last-Event-ID` resumes on another node, bad POSTs
//! get clear answers (429 while a session's frames wait on a stalled Redis), a stalled reader
//! is closed without growing the node. Also the protocol additions every transport has:
//! `message` on every refusal (seed clients), reconnect tokens, the `history` frame.

mod common;

use std::time::{Duration, Instant};

use common::sse::{Next, SseClient, SseEvent, post};
use common::{Client, Gateway, Node, PATIENCE, Redis, wait_until};
use serde_json::{Value, json};

/// Shared by the nodes of a test so reconnect tokens hold on each of them.
const SECRET: &str = "a-test-session-secret-of-32-bytes-or-more";

async fn open(node: &Node, path: &str) -> SseClient {
    SseClient::open(node.port, path, &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("GET {path}: {status} {body}"))
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON answer: {body}"))
}

#[tokio::test]
async fn an_sse_session_chats_with_a_websocket_member_on_one_node() {
    let node = Node::single(&["--ping-interval", "300ms", "--idle-timeout", "2s"]);
    let mut ws = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    let mut sse = open(&node, "/sse?room=lobby&name=sam").await;
    let welcome = &sse.welcome;
    assert_eq!(welcome["transport"], "sse");
    assert_eq!(welcome["room"], "lobby");
    assert!(
        welcome["reconnectToken"].is_string(),
        "anonymous: {welcome}"
    );

    let reply = sse
        .post(json!([{"type":"message","message":"hello from sse","cid":"c-1","ref":1}]))
        .await;
    assert_eq!(
        (reply.status, json_of(&reply.body)),
        (202, json!({"accepted":1}))
    );
    let heard = ws.recv_type("message").await;
    assert_eq!(
        (heard["message"].as_str(), heard["name"].as_str()),
        (Some("hello from sse"), Some("sam"))
    );
    // The sender gets its own message (with its place as the event id) and the ack.
    let mut ack = None;
    let mut echo = None;
    while ack.is_none() || echo.is_none() {
        let (id, frame) = sse.recv_event().await;
        match frame["type"].as_str() {
            Some("ack") => ack = Some(frame),
            Some("message") => echo = Some((id, frame)),
            _ => {}
        }
    }
    let (ack, (id, echo)) = (ack.unwrap(), echo.unwrap());
    assert_eq!(
        (ack["ref"].clone(), ack["cid"].clone()),
        (json!(1), json!("c-1"))
    );
    assert_eq!(
        id.as_deref(),
        Some(
            format!(
                "{}:{}",
                echo["epoch"].as_str().unwrap(),
                echo["offset"].as_str().unwrap()
            )
            .as_str()
        )
    );

    ws.say("lobby", "hello from ws").await;
    let frame = sse.recv_type("message").await;
    assert_eq!(frame["message"], "hello from ws");

    // Heartbeats are comments, about one per ping interval.
    let started = Instant::now();
    loop {
        match sse.next(PATIENCE).await {
            Next::Event(SseEvent::Comment(comment)) => {
                assert_eq!(comment, "ping");
                break;
            }
            Next::Event(_) => continue,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // And a silent client is not taken for a dead one: heartbeats go on past the idle timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = sse.post(json!([{"type":"ping","ref":"still"}])).await;
    assert_eq!(reply.status, 202);
    assert_eq!(sse.recv_type("pong").await["ref"], "still");
}

#[tokio::test]
async fn a_post_on_another_node_reaches_the_stream_and_is_acked_there() {
    let redis = Redis::start();
    let a = Node::clustered("node-a", &redis, &[]);
    let b = Node::clustered("node-b", &redis, &[]);
    let mut sse = open(&a, "/sse?room=team").await;
    assert_eq!(sse.welcome["node"], "node-a");
    let mut ws = Client::connect(&b.ws_url("/ws?room=team")).await;

    for (i, node) in [&b, &b, &a, &b].into_iter().enumerate() {
        let reply = sse
            .post_to(
                node.port,
                json!([{"type":"message","message":format!("m{i}"),"ref":i}]),
            )
            .await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        assert_eq!(sse.recv_type("ack").await["ref"], i);
    }
    let heard: Vec<Value> = common::messages(&mut ws, 4).await;
    assert_eq!(common::texts(&heard), ["m0", "m1", "m2", "m3"], "in order");

    // A batch keeps its order too, and a refused frame in it is answered on the stream.
    let reply = sse
        .post_to(
            b.port,
            json!([
                {"type":"message","message":"x1","ref":"x1"},
                {"type":"message","message":"   ","ref":"blank"},
                {"type":"leave","room":"elsewhere","ref":"nope"},
                {"type":"message","message":"x2","ref":"x2"}
            ]),
        )
        .await;
    assert_eq!(json_of(&reply.body), json!({"accepted":4}));
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = sse.recv().await;
        if frame["type"] != "message" {
            answers.push((frame["type"].clone(), frame["ref"].clone()));
        }
    }
    answers.sort_by_key(|(_, reference)| reference.to_string());
    assert_eq!(
        answers,
        [
            (json!("error"), json!("blank")),
            (json!("error"), json!("nope")),
            (json!("ack"), json!("x1")),
            (json!("ack"), json!("x2")),
        ]
    );
    assert_eq!(
        common::texts(&common::messages(&mut ws, 2).await),
        ["x1", "x2"]
    );
}

#[tokio::test]
async fn last_event_id_resumes_on_another_node_with_no_gap_and_no_duplicate() {
    let redis = Redis::start();
    let a = Node::clustered("node-a", &redis, &[]);
    let b = Node::clustered("node-b", &redis, &[]);
    let mut ws = Client::connect(&b.ws_url("/ws?room=r")).await;
    let mut sse = open(&a, "/sse?room=r").await;
    for i in 0..3 {
        ws.say("r", &format!("before-{i}")).await;
    }
    let mut last_id = None;
    for i in 0..3 {
        let (id, frame) = sse.recv_event().await;
        assert_eq!(frame["message"], format!("before-{i}"));
        last_id = id;
    }
    let last_id = last_id.expect("default room messages carry an id");
    drop(sse);
    for i in 0..3 {
        ws.say("r", &format!("missed-{i}")).await;
    }
    // What an EventSource does on its own: the same URL, with the last id it saw.
    let mut resumed = SseClient::open(b.port, "/sse?room=r", &[("Last-Event-ID", &last_id)])
        .await
        .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    assert_eq!(resumed.welcome["node"], "node-b");
    let joined = resumed.recv().await;
    assert_eq!(
        (joined["type"].clone(), joined["recovered"].clone()),
        (json!("joined"), json!(true))
    );
    ws.say("r", "live").await;
    let mut texts = Vec::new();
    while texts.len() < 4 {
        let frame = resumed.recv_type("message").await;
        texts.push(frame["message"].as_str().unwrap().to_owned());
    }
    assert_eq!(texts, ["missed-0", "missed-1", "missed-2", "live"]);

    let bad = SseClient::open(b.port, "/sse?room=r", &[("Last-Event-ID", "garbage")]).await;
    assert_eq!(bad.err().map(|(status, _)| status), Some(400));
}

#[tokio::test]
async fn posts_are_refused_with_a_status_and_a_json_reason() {
    let redis = Redis::start();
    let a = Node::clustered("node-a", &redis, &["--max-frame-bytes", "1024"]);
    let b = Node::clustered("node-b", &redis, &["--max-frame-bytes", "1024"]);
    let sse = open(&a, "/sse").await;
    let json = [("Content-Type", "application/json")];
    let answer = |reply: common::HttpReply| {
        let body = json_of(&reply.body);
        (
            reply.status,
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body,
        )
    };

    // A token another secret signed, or one changed in any part, is forged: 403, from
    // whichever node the POST lands on.
    let session = sse.session.clone();
    let mut parts: Vec<String> = session.split('.').map(str::to_owned).collect();
    parts[1] = if parts[1].starts_with('A') {
        "B".to_owned() + &parts[1][1..]
    } else {
        "A".to_owned() + &parts[1][1..]
    };
    let tampered = parts.join(".");
    for (port, token) in [
        (a.port, tampered.as_str()),
        (b.port, tampered.as_str()),
        (b.port, "s1.not-a-token"),
    ] {
        let body = json!({"session": token, "frames":[{"type":"ping"}]}).to_string();
        let (status, code, _) = answer(post(port, &body, &json).await);
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{token}");
    }

    // Malformed bodies: 400 with the reason; not JSON: 415; too big: 413.
    for body in [
        "not json".to_owned(),
        json!({"frames":[{"type":"ping"}]}).to_string(),
        json!({"session": session, "frames": []}).to_string(),
        json!({"session": session, "frames": ["ping"]}).to_string(),
    ] {
        let (status, _, reply) = answer(post(b.port, &body, &json).await);
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(
            reply["error"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
    }
    let body = json!({"session": session, "frames":[{"type":"ping"}]}).to_string();
    let (status, code, _) = answer(post(b.port, &body, &[("Content-Type", "text/plain")]).await);
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));
    let big = json!({"session": session, "frames":[{"message": "x".repeat(3000)}]}).to_string();
    let (status, _, _) = answer(post(b.port, &big, &json).await);
    assert_eq!(status, 413);

    // The stream ends: its session is unknown from then on, on every node.
    drop(sse);
    for node in [&a, &b] {
        wait_until("the session to be gone", || {
            let reply =
                common::http_request(node.port, "POST", "/sse/send", &json, body.as_bytes())
                    .expect("an answer");
            reply.status == 404 && reply.body.contains("unknown_session")
        });
    }
    // So is one whose node is gone.
    let c = Node::clustered("node-c", &redis, &[]);
    let orphan = open(&c, "/sse").await;
    drop(c);
    let body = json!({"session": orphan.session, "frames":[{"type":"ping"}]}).to_string();
    wait_until("the node's inbox to be gone", || {
        common::http_request(b.port, "POST", "/sse/send", &json, body.as_bytes())
            .is_some_and(|reply| reply.status == 404)
    });
}

#[tokio::test]
async fn posts_queue_behind_a_stalled_redis_until_the_session_is_full_then_get_429() {
    let redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &["--redis-timeout", "20s"]);
    let mut sse = open(&node, "/sse?room=slow").await;
    // Writes stall: the session's first publish waits, the frames after it queue up.
    redis
        .command(&["CLIENT", "PAUSE", "4000", "WRITE"])
        .expect("pause writes");
    let batch = |first: usize| {
        json!(
            (first..first + 32)
                .map(|i| json!({"type":"message","message":format!("m{i}"),"ref":i}))
                .collect::<Vec<_>>()
        )
    };
    let mut accepted = 0;
    let refused = loop {
        let reply = sse.post(batch(accepted)).await;
        if reply.status != 202 {
            break reply;
        }
        assert_eq!(json_of(&reply.body), json!({"accepted":32}));
        accepted += 32;
        assert!(accepted <= 32 * 8, "a stalled session keeps taking frames");
    };
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(json_of(&refused.body)["error"]["code"], "rate_limited");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // Nothing taken is lost: once Redis takes writes again every frame is acked, in order, and
    // the refused POST goes through when retried.
    for i in 0..accepted {
        assert_eq!(sse.recv_type("ack").await["ref"], i);
    }
    let retried = sse.post(batch(accepted)).await;
    assert_eq!(retried.status, 202, "{}", retried.body);
    for i in accepted..accepted + 32 {
        assert_eq!(sse.recv_type("ack").await["ref"], i);
    }
}

#[tokio::test]
async fn a_stream_and_its_posts_pass_the_same_gate_as_a_websocket() {
    let node = Node::single(&["--allowed-origins", "https://chat.example"]);
    let refused = SseClient::open(node.port, "/sse?room=a%20b", &[]).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(400));
    let refused = SseClient::open(node.port, "/sse", &[("Origin", "https://evil.example")]).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(403));
    let sse = SseClient::open(node.port, "/sse", &[("Origin", "https://chat.example")])
        .await
        .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    let body = json!({"session": sse.session, "frames":[{"type":"ping"}]}).to_string();
    let reply = post(
        node.port,
        &body,
        &[
            ("Content-Type", "application/json"),
            ("Origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(
        (reply.status, json_of(&reply.body)["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    let reply = post(
        node.port,
        &body,
        &[
            ("Content-Type", "application/json"),
            ("Origin", "https://chat.example"),
        ],
    )
    .await;
    assert_eq!(reply.status, 202);
}

/// The node's resident memory, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the node's status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS")
        * 1024
}

#[tokio::test]
async fn a_reader_that_stalls_is_closed_as_a_slow_consumer_and_memory_stays_bounded() {
    let node = Node::single(&[
        "--outbox-capacity",
        "64",
        "--max-chat-bytes",
        "16000",
        "--history-max-len",
        "10",
    ]);
    // A small receive buffer, so the client's side of the pipe fills fast.
    let mut sse = SseClient::open_with(node.port, "/sse?room=flood", &[], Some(8 * 1024))
        .await
        .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    let mut ws = Client::connect(&node.ws_url("/ws?room=flood")).await;
    let before = rss_bytes(node.process.pid());
    // The reader takes nothing more while 48 MB of chat goes to its room.
    let text = "x".repeat(15_000);
    for i in 0..3000 {
        ws.say("flood", &format!("{i}{text}")).await;
        if node.metric("chat_slow_consumer_disconnects_total") >= 1.0 {
            break;
        }
    }
    assert!(
        node.metric("chat_slow_consumer_disconnects_total") >= 1.0,
        "closed as slow"
    );
    // Its session is gone for POSTs at once, and the node did not keep what it could not send.
    let reply = sse.post(json!([{"type":"ping"}])).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let grown = rss_bytes(node.process.pid()).saturating_sub(before);
    assert!(grown < 24 << 20, "the node grew by {grown} bytes");
    // The WebSocket member, which reads, is fine.
    ws.say("flood", "still here").await;
    // Reading again, the client finds what fitted in the pipes, then the end of the stream
    // (the close event when it got through, or the connection cut under a reader that never
    // came back in time).
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the stream did not end");
        match sse.next(PATIENCE).await {
            Next::Event(SseEvent::Data { frame, .. }) if frame["type"] == "close" => {
                assert_eq!(frame["code"], 4000, "{frame}");
            }
            Next::Event(_) => {}
            Next::Ended => break,
            Next::Quiet => panic!("the stream neither ended nor sent anything"),
        }
    }
}

#[tokio::test]
async fn a_seed_client_never_gets_a_frame_without_a_message_to_show() {
    let node = Node::single(&[
        "--conn-message-rate",
        "2",
        "--conn-message-burst",
        "2",
        "--rate-limit-strikes",
        "1000",
        "--max-chat-bytes",
        "50",
    ]);
    let mut seed = Client::connect(&node.ws_url("/")).await;
    let mut other = Client::connect(&node.ws_url("/ws")).await;
    // A blank line, one too long, a burst: what a person typing into the seed's page may send.
    seed.send(json!({"userId": seed.user_id, "message": "   \t "}))
        .await;
    let blank = seed.recv().await;
    assert_eq!(blank["code"], "empty_message");
    seed.send(json!({"userId": seed.user_id, "message": "y".repeat(60)}))
        .await;
    let long = seed.recv().await;
    assert_eq!(long["code"], "message_too_large");
    for i in 0..10 {
        seed.send(json!({"userId": seed.user_id, "message": format!("burst {i}")}))
            .await;
    }
    let mut frames = vec![blank, long];
    while let Some(frame) = seed.recv_within(Duration::from_millis(1500)).await {
        frames.push(frame);
    }
    let codes: Vec<&str> = frames.iter().filter_map(|f| f["code"].as_str()).collect();
    assert!(codes.contains(&"rate_limited"), "{frames:?}");
    // Every frame after the welcome has words to show.
    for frame in &frames {
        let shown = frame["message"].as_str().unwrap_or_default();
        assert!(!shown.trim().is_empty(), "a blank line for {frame}");
    }
    // The blank message was refused, not broadcast.
    while let Some(frame) = other.recv_within(Duration::from_millis(300)).await {
        assert!(
            frame["message"]
                .as_str()
                .is_some_and(|m| !m.trim().is_empty()),
            "{frame}"
        );
    }
}

#[tokio::test]
async fn a_reconnect_token_keeps_the_user_id_on_any_node_and_cannot_be_forged() {
    let redis = Redis::start();
    let a = Node::clustered("node-a", &redis, &["--session-secret", SECRET]);
    let b = Node::clustered("node-b", &redis, &["--session-secret", SECRET]);
    let first = open(&a, "/sse").await;
    let token = first.welcome["reconnectToken"].as_str().unwrap().to_owned();
    let user = first.welcome["userId"].as_str().unwrap().to_owned();
    drop(first);
    let again = Client::connect(&b.ws_url(&format!("/ws?reconnect={token}"))).await;
    assert_eq!(again.user_id, user, "the same person after a reconnect");
    let forged = token.replacen("r1.", "r1.x", 1);
    let stranger = Client::connect(&b.ws_url(&format!("/ws?reconnect={forged}"))).await;
    assert_ne!(stranger.user_id, user);
    // A node with another secret does not honour it either.
    let other = Node::clustered("node-x", &redis, &[]);
    let elsewhere = Client::connect(&other.ws_url(&format!("/ws?reconnect={token}"))).await;
    assert_ne!(elsewhere.user_id, user);
}

#[tokio::test]
async fn a_history_frame_reads_the_newest_messages_or_those_after_an_offset() {
    let node = Node::single(&[]);
    let mut client = Client::connect(&node.ws_url("/ws?room=h")).await;
    for i in 0..5 {
        client.say("h", &format!("h{i}")).await;
    }
    let said = common::messages(&mut client, 5).await;
    client
        .send(json!({"type":"history","room":"h","limit":3,"ref":"page"}))
        .await;
    let page = client.recv_type("history").await;
    assert_eq!(page["ref"], "page");
    assert!(page.get("recovered").is_none(), "only with since: {page}");
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["h2", "h3", "h4"]);

    let since = said[1]["offset"].as_str().unwrap();
    let epoch = said[1]["epoch"].as_str().unwrap();
    client
        .send(json!({"type":"history","room":"h","since":since,"epoch":epoch,"limit":2,"ref":2}))
        .await;
    let page = client.recv_type("history").await;
    assert_eq!(
        (page["recovered"].clone(), page["epoch"].clone()),
        (json!(true), json!(epoch))
    );
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["h2", "h3"]);

    client
        .send(json!({"type":"history","room":"nobody-here","ref":3}))
        .await;
    let empty = client.recv_type("history").await;
    assert_eq!(
        (empty["epoch"].clone(), empty["messages"].clone()),
        (Value::Null, json!([]))
    );
}
