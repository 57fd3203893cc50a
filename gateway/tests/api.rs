//! The server API (`/api/`) as the application's backend uses it: publishing, reading and
//! moderating through any node, on two nodes sharing one Redis and on one node without Redis,
//! and how it refuses what it must not do.

mod common;

use common::local::LocalNode;
use common::{
    Client, Ended, Gateway, HttpReply, Node, Redis, http_request, messages, offset_of, texts,
    wait_until,
};
use serde_json::{Value, json};

/// The key every node in these tests is started with.
const KEY: &str = "test-api-key-0123456789";

/// The flags that turn the API on with [`KEY`].
const WITH_KEY: [&str; 2] = ["--api-key", KEY];

/// Request headers, as name and value.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// The backend's view of one node's API.
struct Api {
    port: u16,
}

/// An answer: status, body as JSON (`Null` when it is not JSON) and the raw reply.
struct Answer {
    status: u16,
    json: Value,
    reply: HttpReply,
}

impl Api {
    fn of(node: &impl Gateway) -> Api {
        Api { port: node.port() }
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let reply =
            http_request(self.port, method, path, headers, body).expect("the node answered");
        assert!(
            reply.status < 500 || matches!(reply.status, 503 | 504),
            "{method} {path}: {} {}",
            reply.status,
            reply.body
        );
        Answer {
            status: reply.status,
            json: serde_json::from_str(&reply.body).unwrap_or(Value::Null),
            reply,
        }
    }

    fn post(&self, path: &str, body: Value) -> Answer {
        let auth = format!("Bearer {KEY}");
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        self.call("POST", path, &headers, body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> Answer {
        let auth = format!("Bearer {KEY}");
        self.call("GET", path, &[("Authorization", auth.as_str())], b"")
    }

    /// Publishes and returns the stored message's acknowledgement.
    fn publish(&self, body: Value) -> Value {
        let answer = self.post("/api/publish", body);
        assert_eq!(answer.status, 200, "{}", answer.reply.body);
        answer.json
    }
}

fn two_nodes(redis: &Redis) -> (Node, Node) {
    (
        Node::clustered("node-a", redis, &WITH_KEY),
        Node::clustered("node-b", redis, &WITH_KEY),
    )
}

#[tokio::test]
async fn a_backend_publish_through_one_node_reaches_members_on_another_once_in_the_rooms_order() {
    let redis = Redis::start();
    let (node_a, node_b) = two_nodes(&redis);
    let (api_a, api_b) = (Api::of(&node_a), Api::of(&node_b));
    let mut sender = Client::connect(&node_a.ws_url("/ws?room=ops")).await;
    let mut member = Client::connect(&node_b.ws_url("/ws?room=ops")).await;

    sender.say("ops", "one").await;
    let ack = api_a.publish(json!({
        "room": "ops", "message": "two", "userId": "deploy-bot", "name": "Deploy bot", "cid": "d-1"
    }));
    sender.say("ops", "three").await;

    let received = messages(&mut member, 3).await;
    assert_eq!(texts(&received), ["one", "two", "three"]);
    assert!(
        offset_of(&received[0]) < offset_of(&received[1])
            && offset_of(&received[1]) < offset_of(&received[2])
    );
    let backend = &received[1];
    assert_eq!(
        (&backend["userId"], &backend["name"], &backend["room"]),
        (&json!("deploy-bot"), &json!("Deploy bot"), &json!("ops"))
    );
    assert_eq!(
        (&ack["id"], &ack["offset"], &ack["epoch"], &ack["cid"]),
        (
            &backend["id"],
            &backend["offset"],
            &backend["epoch"],
            &json!("d-1")
        ),
        "the answer is the stored message's place"
    );
    assert_eq!(
        texts(&messages(&mut sender, 3).await),
        ["one", "two", "three"]
    );

    // The backend retries (its first call timed out, say): the same cid is not sent again.
    let retry = api_a.publish(json!({
        "room": "ops", "message": "two", "userId": "deploy-bot", "name": "Deploy bot", "cid": "d-1"
    }));
    assert_eq!(retry["duplicate"], true);
    assert_eq!(
        (&retry["id"], &retry["offset"]),
        (&ack["id"], &ack["offset"])
    );
    // Without a user id the message is the system's.
    api_b.publish(json!({"room": "ops", "message": "four"}));
    let next = member.recv_type("message").await;
    assert_eq!(
        (next["message"].as_str(), next["userId"].as_str()),
        (Some("four"), Some("system")),
        "the retry was not delivered: the next message is the one after it"
    );

    // History, read through the other node.
    let history = api_b.get("/api/rooms/ops/history");
    assert_eq!(history.status, 200);
    assert_eq!(history.json["epoch"], ack["epoch"]);
    assert_eq!(
        history.json.get("recovered"),
        None,
        "only a read with since says"
    );
    let stored = history.json["messages"].as_array().expect("messages");
    assert_eq!(texts(stored), ["one", "two", "three", "four"]);
    assert_eq!(stored[1], received[1], "members' frames exactly");

    let after = format!(
        "/api/rooms/ops/history?since={}&epoch={}",
        received[0]["offset"].as_str().unwrap(),
        ack["epoch"].as_str().unwrap()
    );
    let since = api_b.get(&after);
    assert_eq!(since.json["recovered"], true);
    assert_eq!(
        texts(since.json["messages"].as_array().unwrap()),
        ["two", "three", "four"]
    );
    let limited = api_b.get(&format!("{after}&limit=2"));
    assert_eq!(
        texts(limited.json["messages"].as_array().unwrap()),
        ["two", "three"]
    );
    assert_eq!(limited.json["more"], true);
    let newest = api_b.get("/api/rooms/ops/history?limit=2");
    assert_eq!(
        texts(newest.json["messages"].as_array().unwrap()),
        ["three", "four"]
    );
    let other_epoch = api_b.get(&format!(
        "/api/rooms/ops/history?since={}&epoch=gone",
        received[0]["offset"].as_str().unwrap()
    ));
    assert_eq!(other_epoch.json["recovered"], false);

    // Presence, read through either node: both members, whichever node holds them.
    for api in [&api_a, &api_b] {
        let presence = api.get("/api/rooms/ops/presence");
        assert_eq!(presence.status, 200);
        let mut users: Vec<&str> = presence.json["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|user| user["userId"].as_str().unwrap())
            .collect();
        users.sort_unstable();
        let mut expected = [sender.user_id.as_str(), member.user_id.as_str()];
        expected.sort_unstable();
        assert_eq!(users, expected);
    }

    // A broadcast: each room gets its own message.
    let mut news = Client::connect(&node_b.ws_url("/ws?room=news")).await;
    let broadcast = api_a.post(
        "/api/broadcast",
        json!({"rooms": ["ops", "news"], "message": "maintenance at 22:00"}),
    );
    assert_eq!(broadcast.status, 200, "{}", broadcast.reply.body);
    let results = broadcast.json["results"].as_array().unwrap();
    assert_eq!(
        results
            .iter()
            .map(|r| r["room"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ops", "news"]
    );
    for (client, result) in [(&mut member, &results[0]), (&mut news, &results[1])] {
        let frame = client.recv_type("message").await;
        assert_eq!(
            (&frame["message"], &frame["id"], &frame["userId"]),
            (
                &json!("maintenance at 22:00"),
                &result["id"],
                &json!("system")
            )
        );
    }
    let counted = |route, status| {
        node_a.metric_labelled(
            "chat_api_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(
        counted("/api/publish", "200"),
        2.0,
        "calls are counted by route and status"
    );
    assert_eq!(counted("/api/broadcast", "200"), 1.0);
}

#[tokio::test]
async fn disconnect_and_kick_through_one_node_act_on_a_user_held_by_another() {
    let redis = Redis::start();
    let (node_a, node_b) = two_nodes(&redis);
    let api_a = Api::of(&node_a);
    let mut victim = Client::connect(&node_b.ws_url("/ws?room=lobby")).await;
    let mut bystander = Client::connect(&node_b.ws_url("/ws?room=lobby")).await;
    let mut watcher = Client::connect(&node_a.ws_url("/ws?room=news")).await;
    victim.join("news").await;

    let kicked = api_a.post(
        "/api/rooms/news/kick",
        json!({"userId": victim.user_id.clone()}),
    );
    assert_eq!(
        (kicked.status, &kicked.json),
        (202, &json!({"nodes": 2})),
        "both nodes got the command"
    );
    assert_eq!(
        victim.recv_type("left").await,
        json!({"type": "left", "room": "news", "kicked": true,
               "message": "removed from room `news` by the application"})
    );
    // Nothing more of the room reaches the user; the rest of their connection is untouched.
    watcher.say("news", "after the kick").await;
    bystander.say("lobby", "still here").await;
    let next = victim.recv_type("message").await;
    assert_eq!(
        (next["room"].as_str(), next["message"].as_str()),
        (Some("lobby"), Some("still here"))
    );
    let presence = api_a.get("/api/rooms/news/presence");
    let users: Vec<&str> = presence.json["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|user| user["userId"].as_str().unwrap())
        .collect();
    assert_eq!(users, [watcher.user_id.as_str()]);

    let disconnected = api_a.post(
        "/api/disconnect",
        json!({"userId": victim.user_id.clone(), "reason": "banned for spam"}),
    );
    assert_eq!(
        (disconnected.status, &disconnected.json),
        (202, &json!({"nodes": 2}))
    );
    let (frames, ended) = victim.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4004), "the documented terminal code");
    assert_eq!(
        frames.last(),
        Some(
            &json!({"type": "disconnect", "code": 4004, "reason": "banned for spam",
                     "message": "banned for spam"})
        )
    );
    // Only that user.
    bystander.say("lobby", "carry on").await;
    watcher.say("news", "carry on").await;
}

#[tokio::test]
async fn the_api_answers_503_while_redis_is_down_and_works_again_after() {
    let mut redis = Redis::start();
    let node = Node::clustered("node-a", &redis, &WITH_KEY);
    let api = Api::of(&node);
    api.publish(json!({"room": "ops", "message": "before"}));

    redis.kill();
    wait_until("the node to report not ready", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 503)
    });
    // A publish already on its way when the connection broke may have reached Redis: its
    // outcome is unknown (504). Once the node knows Redis is gone, publishes fail at once.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let answer = api.post("/api/publish", json!({"room": "ops", "message": "during"}));
        if answer.status == 503 {
            break;
        }
        assert_eq!(answer.json["error"]["code"], "publish_unknown");
        assert!(std::time::Instant::now() < deadline, "publishes fail fast");
    }
    let calls = [
        (
            "POST",
            "/api/publish",
            json!({"room": "ops", "message": "during"}),
            "publish_failed",
        ),
        (
            "POST",
            "/api/broadcast",
            json!({"rooms": ["ops"], "message": "during"}),
            "publish_failed",
        ),
        ("GET", "/api/rooms/ops/history", Value::Null, "unavailable"),
        ("GET", "/api/rooms/ops/presence", Value::Null, "unavailable"),
        (
            "POST",
            "/api/disconnect",
            json!({"userId": "u-1"}),
            "unavailable",
        ),
        (
            "POST",
            "/api/rooms/ops/kick",
            json!({"userId": "u-1"}),
            "unavailable",
        ),
    ];
    for (method, path, body, code) in calls {
        let answer = match method {
            "GET" => api.get(path),
            _ => api.post(path, body),
        };
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (503, Some(code)),
            "{method} {path}: {}",
            answer.reply.body
        );
        assert_eq!(answer.reply.header("retry-after"), Some("1"));
    }

    redis.restart();
    wait_until("the node to be ready again", || {
        node.get("/readyz").is_some_and(|(status, _)| status == 200)
    });
    let ack = api.publish(json!({"room": "ops", "message": "after"}));
    assert!(ack["offset"].is_string());
}

#[tokio::test]
async fn without_a_key_the_api_is_off() {
    let node = LocalNode::start(&[]);
    let api = Api::of(&node);
    for path in ["/api/openapi.json", "/api/rooms/lobby/presence"] {
        let answer = api.get(path);
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
    }
    assert_eq!(
        api.post("/api/publish", json!({"room":"a","message":"b"}))
            .status,
        404
    );
    assert!(
        node.log().contains("server API off"),
        "the start-up log says so"
    );
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_and_the_description_needs_none() {
    let node = LocalNode::start(&WITH_KEY);
    let api = Api::of(&node);
    let body = br#"{"room":"lobby","message":"hi"}"#;
    let json = ("Content-Type", "application/json");
    let wrong = format!("Bearer {KEY}x");
    for auth in [
        None,
        Some(wrong.as_str()),
        Some("Basic dGVzdA=="),
        Some(KEY),
    ] {
        let mut headers = vec![json];
        headers.extend(auth.map(|auth| ("Authorization", auth)));
        let answer = api.call("POST", "/api/publish", &headers, body);
        assert_eq!(answer.status, 401, "{auth:?}");
        assert_eq!(answer.json["error"]["code"], "unauthorized");
        assert_eq!(answer.reply.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(
        api.call("GET", "/api/rooms/lobby/history", &[], b"").status,
        401
    );
    assert!(
        node.log().contains("server API on"),
        "the start-up log says so"
    );

    let description = api.call("GET", "/api/openapi.json", &[], b"");
    assert_eq!(description.status, 200);
    assert_eq!(description.json["openapi"], "3.1.0");
    let paths = description.json["paths"].as_object().unwrap();
    for path in [
        "/api/publish",
        "/api/broadcast",
        "/api/rooms/{room}/history",
        "/api/rooms/{room}/presence",
        "/api/rooms/{room}/kick",
        "/api/disconnect",
    ] {
        assert!(paths.contains_key(path), "{path} is described");
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_the_protocols_error_codes_never_a_500() {
    let node = LocalNode::start(&[
        "--api-key",
        KEY,
        "--api-max-broadcast-rooms",
        "2",
        "--api-max-body-bytes",
        "1024",
        "--max-chat-bytes",
        "100",
    ]);
    let api = Api::of(&node);
    let refused = [
        (
            "/api/publish",
            json!({"room": "no spaces", "message": "hi"}),
            "invalid_room",
        ),
        ("/api/publish", json!({"message": "hi"}), "invalid_frame"),
        (
            "/api/publish",
            json!({"room": "a", "message": "   "}),
            "empty_message",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": "x".repeat(101)}),
            "message_too_large",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": 7}),
            "invalid_frame",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": "hi", "userId": "bad\nid"}),
            "invalid_frame",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": "hi", "userId": ""}),
            "invalid_frame",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": "hi", "cid": "no spaces"}),
            "invalid_frame",
        ),
        (
            "/api/publish",
            json!({"room": "a", "message": "hi", "name": 5}),
            "invalid_frame",
        ),
        (
            "/api/publish",
            json!(["not", "an", "object"]),
            "invalid_json",
        ),
        (
            "/api/broadcast",
            json!({"rooms": ["a", "b", "c"], "message": "hi"}),
            "too_many_rooms",
        ),
        (
            "/api/broadcast",
            json!({"rooms": ["a", "a"], "message": "hi"}),
            "invalid_frame",
        ),
        (
            "/api/broadcast",
            json!({"rooms": [], "message": "hi"}),
            "invalid_frame",
        ),
        ("/api/disconnect", json!({}), "invalid_frame"),
        (
            "/api/disconnect",
            json!({"userId": "u", "reason": "x".repeat(129)}),
            "invalid_frame",
        ),
        (
            "/api/rooms/a%20b/kick",
            json!({"userId": "u"}),
            "invalid_room",
        ),
    ];
    for (path, body, code) in refused {
        let answer = api.post(path, body.clone());
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (400, Some(code)),
            "{path} {body}"
        );
        assert!(answer.json["error"]["reason"].is_string());
    }
    for path in [
        "/api/rooms/no%20spaces/history",
        "/api/rooms/a/history?limit=0",
        "/api/rooms/a/history?limit=1001",
        "/api/rooms/a/history?limit=ten",
        "/api/rooms/a/history?since=yesterday",
        "/api/rooms/a/history?since=%2B1-0",
    ] {
        assert_eq!(api.get(path).status, 400, "{path}");
    }

    let auth = format!("Bearer {KEY}");
    let auth = ("Authorization", auth.as_str());
    let json = ("Content-Type", "application/json");
    let large = format!(r#"{{"room":"a","message":"{}"}}"#, "x".repeat(2000));
    let raw: [(Headers, &[u8], u16, &str); 4] = [
        (&[auth, json], b"{oops", 400, "invalid_json"),
        (
            &[auth, ("Content-Type", "text/plain")],
            b"{}",
            415,
            "unsupported_media_type",
        ),
        (&[auth], b"{}", 415, "unsupported_media_type"),
        (&[auth, json], large.as_bytes(), 413, "body_too_large"),
    ];
    for (headers, body, status, code) in raw {
        let answer = api.call("POST", "/api/publish", headers, body);
        assert_eq!(
            (answer.status, answer.json["error"]["code"].as_str()),
            (status, Some(code)),
            "{headers:?}"
        );
    }
    assert_eq!(api.get("/api/nothing-here").status, 404);
    assert_eq!(api.get("/api/publish").status, 405);

    for status in ["400", "413", "415"] {
        assert!(
            node.metric_labelled(
                "chat_api_requests_total",
                &[("route", "/api/publish"), ("status", status)]
            ) > 0.0,
            "refusals are counted too: {status}"
        );
    }
    assert!(
        !node.log().contains("xxxxxxxxxx"),
        "no message body is logged"
    );
}

#[tokio::test]
async fn disconnect_and_kick_work_with_the_in_process_broker() {
    let node = LocalNode::start(&WITH_KEY);
    let api = Api::of(&node);
    let mut victim = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    let mut other = Client::connect(&node.ws_url("/ws?room=lobby")).await;
    victim.join("news").await;

    let kicked = api.post(
        "/api/rooms/news/kick",
        json!({"userId": victim.user_id.clone()}),
    );
    assert_eq!((kicked.status, &kicked.json), (202, &json!({"nodes": 1})));
    assert_eq!(
        victim.recv_type("left").await,
        json!({"type": "left", "room": "news", "kicked": true,
               "message": "removed from room `news` by the application"})
    );
    // Kicking a user who is not in the room (or not online) is not an error: nothing to do.
    assert_eq!(
        api.post("/api/rooms/news/kick", json!({"userId": "nobody"}))
            .status,
        202
    );

    let disconnected = api.post("/api/disconnect", json!({"userId": victim.user_id.clone()}));
    assert_eq!(disconnected.status, 202);
    let (frames, ended) = victim.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4004));
    assert!(
        frames.iter().all(|frame| frame["type"] != "disconnect"),
        "no reason given, no disconnect frame: {frames:?}"
    );
    other.say("lobby", "still connected").await;
}
