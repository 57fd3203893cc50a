//! Security and abuse limits against real gateway processes: tokens, room claims, origins,
//! rate limits, the connection cap and the handshake timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Client, Ended, Gateway, PATIENCE, local::LocalNode, temp_dir, wait_until, ws_handshake,
};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

const SECRET: &str = "security-tests-shared-secret-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(algorithm), claims, key).expect("sign a token")
}

/// An HS256 token with the test secret.
fn token(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims,
    )
}

/// A valid token for `sub` for the next hour.
fn token_for(sub: &str) -> String {
    token(json!({"sub": sub, "exp": now() + 3600}))
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_file("rs256-private.pem")).unwrap()).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(key_file("es256-private.pem")).unwrap()).unwrap()
}

/// A node that requires HS256 tokens signed with [`SECRET`].
fn hs256_node(extra: &[&str]) -> LocalNode {
    let mut args = vec!["--jwt-hs256-secret", SECRET];
    args.extend_from_slice(extra);
    LocalNode::start(&args)
}

fn subprotocol(token: &str) -> String {
    format!("chat.v1, token.{token}")
}

/// The status of a WebSocket handshake offering `token` as a subprotocol.
fn status_with_token(node: &LocalNode, token: &str) -> u16 {
    ws_handshake(
        node.port,
        "/ws",
        &[("Sec-WebSocket-Protocol", &subprotocol(token))],
    )
    .expect("the node answered")
    .status
}

/// Connects with a token in the subprotocol.
async fn connect_as(node: &LocalNode, path: &str, token: &str) -> Client {
    let (client, _) = Client::connect_with_headers(
        &node.ws_url(path),
        &[("Sec-WebSocket-Protocol", &subprotocol(token))],
    )
    .await
    .expect("the handshake was accepted");
    client
}

#[tokio::test]
async fn forged_expired_and_wrong_algorithm_tokens_are_refused_with_401() {
    let node = hs256_node(&["--jwt-leeway", "0s"]);
    let good = token_for("alice");
    assert_eq!(
        status_with_token(&node, &good),
        101,
        "a valid token upgrades"
    );

    let missing = ws_handshake(node.port, "/ws", &[]).unwrap();
    assert_eq!(missing.status, 401, "no token: {missing:?}");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert!(missing.header("upgrade").is_none(), "nothing was upgraded");

    let other_secret = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
        &json!({"sub":"alice","exp":now()+3600}),
    );
    let (body, signature) = good.rsplit_once('.').unwrap();
    let tampered_claims = {
        // Same header and signature, claims swapped for mallory's.
        let mallory = token_for("mallory");
        let parts: Vec<&str> = mallory.split('.').collect();
        let header = body.split('.').next().unwrap();
        format!("{header}.{}.{signature}", parts[1])
    };
    let expired = token(json!({"sub":"alice","exp":now()-60}));
    let hs384 = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &json!({"sub":"alice","exp":now()+3600}),
    );
    // {"alg":"none"} with no signature.
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );
    let rs256 = sign(
        Algorithm::RS256,
        &rsa_key(),
        &json!({"sub":"alice","exp":now()+3600}),
    );
    for (what, bad) in [
        ("signed with another secret", other_secret.as_str()),
        ("claims tampered with", tampered_claims.as_str()),
        ("expired", expired.as_str()),
        ("HS384 instead of HS256", hs384.as_str()),
        ("alg none", unsigned.as_str()),
        ("RS256 instead of HS256", rs256.as_str()),
        ("garbage", "not-a-token"),
    ] {
        let reply = ws_handshake(
            node.port,
            "/ws",
            &[("Sec-WebSocket-Protocol", &subprotocol(bad))],
        )
        .unwrap();
        assert_eq!(reply.status, 401, "{what}: {reply:?}");
        // The same token in the query string is refused the same way.
        let reply = ws_handshake(node.port, &format!("/ws?token={bad}"), &[]).unwrap();
        assert_eq!(reply.status, 401, "{what} (query): {reply:?}");
    }
    let reply = ws_handshake(
        node.port,
        "/ws",
        &[("Sec-WebSocket-Protocol", &subprotocol(&expired))],
    )
    .unwrap();
    assert!(
        reply.body.contains("expired"),
        "the reason is given: {reply:?}"
    );

    // Refusals are counted.
    assert!(node.metric("chat_handshakes_refused_total") >= 15.0);
    assert_eq!(
        node.metric("chat_connections_accepted_total"),
        1.0,
        "only the valid one got in"
    );
}

#[tokio::test]
async fn rs256_and_es256_public_keys_verify_and_algorithm_confusion_is_refused() {
    let claims = json!({"sub":"carol","exp":now()+3600});
    let rsa_public = key_file("rs256-public.pem");
    let rs_node = LocalNode::start(&["--jwt-rs256-public-key", &rsa_public]);
    assert_eq!(
        status_with_token(&rs_node, &sign(Algorithm::RS256, &rsa_key(), &claims)),
        101
    );
    // The classic confusion: an HS256 token whose "secret" is the public key file.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(&rsa_public).unwrap()),
        &claims,
    );
    assert_eq!(status_with_token(&rs_node, &confused), 401);
    assert_eq!(
        status_with_token(&rs_node, &sign(Algorithm::ES256, &ec_key(), &claims)),
        401
    );
    assert_eq!(
        status_with_token(&rs_node, &sign(Algorithm::PS256, &rsa_key(), &claims)),
        401
    );

    let es_node = LocalNode::start(&["--jwt-es256-public-key", &key_file("es256-public.pem")]);
    let mut client = connect_as(&es_node, "/ws", &sign(Algorithm::ES256, &ec_key(), &claims)).await;
    assert_eq!(client.user_id, "carol");
    client.say("lobby", "signed with P-256").await;
    assert_eq!(
        status_with_token(&es_node, &sign(Algorithm::RS256, &rsa_key(), &claims)),
        401
    );
}

#[tokio::test]
async fn the_tokens_sub_is_the_senders_user_id() {
    let dir = temp_dir("secret");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let node = LocalNode::start(&["--jwt-hs256-secret-file", secret_file.to_str().unwrap()]);

    let (mut alice, response) = Client::connect_with_headers(
        &node.ws_url("/ws?room=lobby"),
        &[("Sec-WebSocket-Protocol", &subprotocol(&token_for("alice")))],
    )
    .await
    .expect("alice connects");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|value| value.to_str().ok()),
        Some("chat.v1"),
        "only chat.v1 is echoed, never the token"
    );
    assert_eq!(alice.user_id, "alice");
    // A token in the query string works too.
    let mut bob = Client::connect(&node.ws_url(&format!("/ws?token={}", token_for("bob")))).await;
    assert_eq!(bob.user_id, "bob");

    // A client cannot choose another id: the seed-style userId field is ignored.
    alice
        .send_text(r#"{"userId":"bob","message":"it's me, bob"}"#)
        .await;
    for client in [&mut alice, &mut bob] {
        let frame = client.recv_type("message").await;
        assert_eq!(frame["userId"], "alice", "{frame}");
        assert_eq!(frame["message"], "it's me, bob");
    }
}

#[tokio::test]
async fn room_claims_and_publish_permission_are_enforced() {
    let node = hs256_node(&[]);
    let scoped = token(json!({
        "sub": "dave", "exp": now() + 3600,
        "rooms": ["lobby", "news"], "room_prefix": "team-"
    }));
    let mut dave = connect_as(&node, "/ws", &scoped).await;
    dave.join("news").await;
    dave.join("team-red").await;
    dave.send(json!({"type":"join","room":"secret","ref":"s"}))
        .await;
    let refused = dave.recv_type("error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["ref"], "s");
    dave.say("team-red", "allowed").await;

    // A default room outside the claims is refused at the handshake.
    let reply = ws_handshake(
        node.port,
        "/ws?room=secret",
        &[("Sec-WebSocket-Protocol", &subprotocol(&scoped))],
    )
    .unwrap();
    assert_eq!(reply.status, 403, "{reply:?}");

    // A read-only token may join and listen, but not publish.
    let reader = token(json!({"sub":"erin","exp":now()+3600,"can_publish":false}));
    let mut erin = connect_as(&node, "/ws?room=news", &reader).await;
    erin.send(json!({"type":"message","room":"news","message":"hi","ref":1}))
        .await;
    let refused = erin.recv_type("error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["ref"], 1);
    erin.send_text(r#"{"message":"seed style"}"#).await;
    assert_eq!(erin.recv_type("error").await["code"], "forbidden");
    // ...and still receives what others send.
    dave.say("news", "read this").await;
    assert_eq!(erin.recv_type("message").await["message"], "read this");
}

#[tokio::test]
async fn an_expiring_token_closes_with_4003_unless_refreshed_in_time() {
    let node = hs256_node(&["--jwt-leeway", "0s"]);
    let short = token(json!({"sub":"frank","exp":now()+2}));

    let mut lapsing = connect_as(&node, "/ws", &short).await;
    let mut refreshing = connect_as(&node, "/ws", &short).await;

    // A token for someone else, or a bad one, is refused and changes nothing.
    refreshing
        .send(json!({"type":"auth","token":token_for("grace"),"ref":"x"}))
        .await;
    let refused = refreshing.recv_type("error").await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    assert_eq!(refused["ref"], "x");
    refreshing
        .send(json!({"type":"auth","token":"garbage","ref":"y"}))
        .await;
    assert_eq!(refreshing.recv_type("error").await["code"], "unauthorized");

    let fresh_exp = now() + 3600;
    refreshing
        .send(
            json!({"type":"auth","token":token(json!({"sub":"frank","exp":fresh_exp})),"ref":"r"}),
        )
        .await;
    let reply = refreshing.recv_type("authenticated").await;
    assert_eq!(reply["userId"], "frank");
    assert_eq!(reply["exp"], fresh_exp);
    assert_eq!(reply["ref"], "r");

    let started = Instant::now();
    let (_, ended) = lapsing.recv_until_end().await;
    assert_eq!(
        ended,
        Ended::Closed(4003),
        "the lapsed connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The refreshed one outlives the first token.
    refreshing.say("lobby", "still here").await;
}

#[tokio::test]
async fn an_auth_frame_in_anonymous_mode_is_refused() {
    let node = LocalNode::start(&[]);
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client
        .send(json!({"type":"auth","token":token_for("x"),"ref":1}))
        .await;
    let refused = client.recv_type("error").await;
    assert_eq!(refused["code"], "unauthorized");
    client.send(json!({"type":"auth","ref":2})).await;
    assert_eq!(client.recv_type("error").await["code"], "invalid_frame");
}

#[tokio::test]
async fn a_foreign_origin_is_refused_with_403() {
    let node = LocalNode::start(&[
        "--allowed-origins",
        "https://chat.example.com,https://*.example.org",
    ]);
    let status = |origin: Option<&str>| {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        ws_handshake(node.port, "/ws", &headers).unwrap().status
    };
    assert_eq!(status(Some("https://evil.example.net")), 403);
    assert_eq!(status(Some("https://chat.example.com.evil.net")), 403);
    assert_eq!(
        status(Some("http://chat.example.com")),
        403,
        "the scheme counts"
    );
    assert_eq!(
        status(Some("https://example.org")),
        403,
        "wildcards need a subdomain"
    );
    assert_eq!(status(Some("https://chat.example.com")), 101);
    assert_eq!(status(Some("https://eu.chat.example.org")), 101);
    assert_eq!(
        status(None),
        101,
        "clients that are not browsers send no Origin"
    );

    // With authentication and no list, only the gateway's own origin is allowed.
    let node = hs256_node(&[]);
    let own = format!("http://127.0.0.1:{}", node.port);
    let offered = subprotocol(&token_for("ivy"));
    let status = |origin: &str| {
        ws_handshake(
            node.port,
            "/ws",
            &[("Origin", origin), ("Sec-WebSocket-Protocol", &offered)],
        )
        .unwrap()
        .status
    };
    assert_eq!(status("https://evil.example.net"), 403);
    assert_eq!(status(&own), 101);
    // Same host and port but another scheme is another origin: this node speaks plain HTTP.
    let https_twin = format!("https://127.0.0.1:{}", node.port);
    assert_eq!(status(&https_twin), 403);
}

/// Sends `count` chat messages from a fresh connection in bursts of 50 every `pause` (none:
/// as fast as the socket takes them), while reading whatever comes back; returns the
/// `rate_limited` errors seen and how the connection ended (`None`: still open).
async fn flood(url: String, count: usize, pause: Option<Duration>) -> (usize, Option<u16>) {
    let client = Client::connect(&url).await;
    let (mut write, mut read) = client.into_socket().split();
    let reader = tokio::spawn(async move {
        let mut limited = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), read.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["code"] == "rate_limited" {
                        limited += 1;
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (limited, Some(frame.map_or(1005, |f| u16::from(f.code))));
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return (limited, Some(1006)),
                Err(_) => return (limited, None),
            }
        }
    });
    for i in 0..count {
        let frame = json!({"type":"message","message":format!("flood {i}"),"ref":i});
        if write.send(Message::text(frame.to_string())).await.is_err() {
            break;
        }
        if i % 50 == 49 {
            match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => tokio::task::yield_now().await,
            }
        }
    }
    reader.await.expect("flood reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_throttled_while_its_room_keeps_its_latency() {
    let node = LocalNode::start(&[
        "--conn-message-rate",
        "10",
        "--conn-message-burst",
        "10",
        // Keep the flooder connected for the whole test: this one is about throttling.
        "--rate-limit-strikes",
        "1000000",
    ]);
    let mut listener = Client::connect(&node.ws_url("/ws?room=busy")).await;
    let mut sender = Client::connect(&node.ws_url("/ws?room=busy")).await;
    // 2,000 messages a second for about three seconds: 200 times the limit.
    let flooder = tokio::spawn(flood(
        node.ws_url("/ws?room=busy"),
        6_000,
        Some(Duration::from_millis(25)),
    ));

    // A well-behaved sender: 8 messages per second, under its own limit of 10.
    const MESSAGES: usize = 12;
    let mut worst = Duration::ZERO;
    for i in 0..MESSAGES {
        let sent = Instant::now();
        sender
            .send(json!({"type":"message","room":"busy","message":format!("calm {i}")}))
            .await;
        loop {
            let frame = listener.recv_type("message").await;
            if frame["message"] == format!("calm {i}") {
                break;
            }
            assert!(
                frame["message"].as_str().unwrap().starts_with("flood"),
                "calm messages arrive in order: {frame}"
            );
        }
        worst = worst.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    assert!(
        worst < Duration::from_millis(500),
        "the room kept its latency during the flood (worst {worst:?})"
    );

    let (limited, ended) = flooder.await.expect("flooder");
    assert!(
        limited > 5_000,
        "the flooder was told it is rate limited ({limited} times)"
    );
    assert_eq!(
        ended, None,
        "with strikes to spare, throttling does not disconnect"
    );
    assert!(node.metric("chat_rate_limited_messages_total") > 5_000.0);
    // The flooder's throttled messages never reached the room: at most the burst plus the
    // sustained rate over the test's few seconds.
    let mut flood_seen = 0;
    while let Some(frame) = listener.recv_within(Duration::from_millis(300)).await {
        if frame["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("flood"))
        {
            flood_seen += 1;
        }
    }
    assert!(flood_seen < 200, "{flood_seen} flood messages got through");
}

#[tokio::test]
async fn sustained_abuse_is_closed_with_1008() {
    let node = LocalNode::start(&[
        "--conn-message-rate",
        "5",
        "--conn-message-burst",
        "5",
        "--rate-limit-strikes",
        "20",
    ]);
    // Errors still queued when the strikes run out are not waited for: the close comes first.
    let (_, ended) = flood(node.ws_url("/ws"), 5_000, None).await;
    assert_eq!(ended, Some(1008), "policy violation");
    assert_eq!(node.metric("chat_policy_closes_total"), 1.0);

    // A client that stays under the limit is never bothered.
    let mut calm = Client::connect(&node.ws_url("/ws")).await;
    for i in 0..5 {
        calm.say("lobby", &format!("calm {i}")).await;
    }
}

#[tokio::test]
async fn the_per_user_limit_spans_all_of_a_users_connections() {
    let node = hs256_node(&[
        "--user-message-rate",
        "1",
        "--user-message-burst",
        "4",
        "--conn-message-rate",
        "100",
    ]);
    let token = token_for("heidi");
    let mut first = connect_as(&node, "/ws", &token).await;
    let mut second = connect_as(&node, "/ws", &token).await;
    first.say("lobby", "1").await;
    second.say("lobby", "2").await;
    first.say("lobby", "3").await;
    second.say("lobby", "4").await;
    first
        .send(json!({"type":"message","message":"5","ref":"five"}))
        .await;
    let refused = first.recv_type("error").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(
        refused["ref"], "five",
        "the dropped message's ref is echoed"
    );
    assert!(refused["reason"].as_str().unwrap().contains("user"));
    // Another user is unaffected.
    let mut other = connect_as(&node, "/ws", &token_for("ivan")).await;
    other.say("lobby", "mine").await;
}

#[tokio::test]
async fn the_connection_cap_answers_503_with_retry_after() {
    let node = LocalNode::start(&["--max-connections", "2"]);
    let first = Client::connect(&node.ws_url("/ws")).await;
    let _second = Client::connect(&node.ws_url("/ws")).await;
    let reply = ws_handshake(node.port, "/ws", &[]).unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(
        reply
            .header("retry-after")
            .is_some_and(|s| s.parse::<u64>().is_ok()),
        "{reply:?}"
    );
    // Health and metrics are not connections: they still answer.
    assert_eq!(node.get("/healthz").unwrap().0, 200);

    first.close().await;
    wait_until("the slot to be given back", || {
        node.metric("chat_connections_open") == 1.0
    });
    wait_until("a new connection to fit", || {
        ws_handshake(node.port, "/ws", &[]).is_some_and(|reply| reply.status == 101)
    });
}

#[tokio::test]
async fn new_connections_per_address_are_limited_with_429() {
    let node = LocalNode::start(&["--ip-connect-rate", "1", "--ip-connect-burst", "2"]);
    assert_eq!(ws_handshake(node.port, "/ws", &[]).unwrap().status, 101);
    assert_eq!(ws_handshake(node.port, "/ws", &[]).unwrap().status, 101);
    let reply = ws_handshake(node.port, "/ws", &[]).unwrap();
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // X-Forwarded-For from an untrusted peer changes nothing.
    let reply = ws_handshake(node.port, "/ws", &[("X-Forwarded-For", "203.0.113.7")]).unwrap();
    assert_eq!(reply.status, 429, "an untrusted X-Forwarded-For is ignored");

    // Behind a trusted proxy, each forwarded client has its own budget.
    let node = LocalNode::start(&[
        "--ip-connect-rate",
        "1",
        "--ip-connect-burst",
        "2",
        "--trusted-proxies",
        "127.0.0.1/32,10.0.0.0/8",
    ]);
    let from = |client: &'static str| {
        ws_handshake(node.port, "/ws", &[("X-Forwarded-For", client)])
            .unwrap()
            .status
    };
    assert_eq!(from("203.0.113.7"), 101);
    assert_eq!(from("203.0.113.7"), 101);
    assert_eq!(from("203.0.113.7"), 429);
    assert_eq!(from("198.51.100.8"), 101, "another client is not held up");
    // A spoofed entry to the left of what the proxy appended does not help.
    assert_eq!(from("198.51.100.99, 203.0.113.7"), 429);
}

/// Reads until the server closes the socket; returns how long that took.
fn time_until_dropped(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buffer = [0u8; 256];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return started.elapsed(),
            // Whatever the server says (e.g. a 408) before it closes.
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server kept a stalled handshake open for {PATIENCE:?}")
            }
            Err(_) => return started.elapsed(),
        }
    }
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_within_the_handshake_timeout() {
    let node = LocalNode::start(&["--handshake-timeout", "1s"]);

    // Connects and says nothing at all.
    let mut silent = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    let waited = time_until_dropped(&mut silent);
    assert!(waited < Duration::from_secs(3), "dropped after {waited:?}");

    // Trickles a request head, one header line every 300 ms, never finishing it.
    let mut slow = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    let trickle = std::thread::spawn(move || {
        for i in 0.. {
            std::thread::sleep(Duration::from_millis(300));
            if slow
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .is_err()
            {
                return;
            }
            if i > 40 {
                panic!("a trickling client was kept for over 12 s");
            }
        }
    });
    trickle.join().expect("the trickling client was cut off");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "the trickling client was dropped after {waited:?}"
    );

    // Honest clients are not affected by the short timeout.
    let mut client = Client::connect(&node.ws_url("/ws")).await;
    client.say("lobby", "fine").await;
}

#[tokio::test]
async fn tokens_never_show_up_in_the_log() {
    // Run with debug logging, where refusals are logged, and check the secret parts of tokens
    // never appear in it.
    let dir = temp_dir("log");
    let log = dir.path().join("gateway.log");
    let file = std::fs::File::create(&log).unwrap();
    let port = common::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chat-gateway"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--node-id",
            "logged",
        ])
        .args(["--jwt-hs256-secret", SECRET, "--jwt-leeway", "0s"])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start the gateway");
    let _guard = KillOnDrop(&mut child);
    wait_until("the node to listen", || {
        common::http_get(port, "/healthz", &[]).is_some()
    });
    let good = token_for("judy");
    let expired = token(json!({"sub":"judy","exp":now()-60}));
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (mut judy, _) =
        Client::connect_with_headers(&url, &[("Sec-WebSocket-Protocol", &subprotocol(&good))])
            .await
            .unwrap();
    judy.say("lobby", "a private message body").await;
    let refused = tokio_tungstenite::connect_async(format!("{url}?token={expired}")).await;
    assert!(matches!(refused, Err(tungstenite::Error::Http(ref r)) if r.status() == 401));
    judy.send(json!({"type":"auth","token":expired})).await;
    judy.recv_type("error").await;
    judy.close().await;
    std::thread::sleep(Duration::from_millis(300));

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("security settings"), "the log was written");
    for secret in [good.as_str(), expired.as_str(), SECRET] {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(
            !text.contains(signature),
            "a token or secret leaked into the log"
        );
    }
    assert!(
        !text.contains("a private message body"),
        "a message body leaked into the log"
    );
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
