//! A small SSE + POST client, as a browser's EventSource and `fetch` would use the fallback
//! transport: it reads the stream's chunked body and its events itself, so a test sees every
//! byte the node sent (ids, comments, the closing event) and can stop reading at will.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HttpReply, PATIENCE, http_request};

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// A `data:` event, with its `id:` when it had one.
    Data { id: Option<String>, frame: Value },
    /// A comment line (`: ping`).
    Comment(String),
    /// A `retry:` field.
    Retry(u64),
}

/// What [`SseClient::next`] saw.
#[derive(Debug, PartialEq)]
pub enum Next {
    Event(SseEvent),
    /// The response ended (its last chunk) or the connection closed.
    Ended,
    /// Nothing within the wait.
    Quiet,
}

/// An open SSE stream.
pub struct SseClient {
    socket: TcpStream,
    /// Bytes read and not yet parsed (chunked framing still on).
    raw: Vec<u8>,
    /// Body bytes (chunk framing removed) not yet parsed into events.
    body: Vec<u8>,
    ended: bool,
    /// The welcome frame.
    pub welcome: Value,
    /// Its session token.
    pub session: String,
    /// The node's port, for POSTs.
    pub port: u16,
}

impl SseClient {
    /// Opens `GET path` (e.g. `/sse?room=a`) and reads up to the welcome frame; the status and
    /// body of a refusal otherwise.
    pub async fn open(
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, (u16, String)> {
        Self::open_with(port, path, headers, None).await
    }

    /// [`SseClient::open`] with the socket's receive buffer set to `receive_buffer` bytes.
    pub async fn open_with(
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
        receive_buffer: Option<u32>,
    ) -> Result<SseClient, (u16, String)> {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        if let Some(size) = receive_buffer {
            socket
                .set_recv_buffer_size(size)
                .expect("set the receive buffer");
        }
        let mut socket = socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("connect to the node");
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        socket
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut buffer = [0u8; 4096];
            let read = tokio::time::timeout(PATIENCE, socket.read(&mut buffer))
                .await
                .expect("a response in time")
                .expect("read the response");
            assert!(read > 0, "the node closed before answering");
            raw.extend_from_slice(&buffer[..read]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        raw.drain(..head_end + 4);
        let mut client = SseClient {
            socket,
            raw,
            body: Vec::new(),
            ended: false,
            welcome: Value::Null,
            session: String::new(),
            port,
        };
        if status != 200 {
            // Refusals are short plain bodies; read what came.
            let body = client.read_rest().await;
            return Err((status, body));
        }
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/event-stream"), "{head}");
        assert!(lower.contains("transfer-encoding: chunked"), "{head}");
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "userId", "the welcome comes first");
        client.session = welcome["session"]
            .as_str()
            .expect("a session token")
            .to_owned();
        client.welcome = welcome;
        Ok(client)
    }

    async fn read_rest(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.raw);
        let _ = tokio::time::timeout(PATIENCE, self.socket.read_to_end(&mut rest)).await;
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// The next event, the end, or nothing within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.take_event() {
                return Next::Event(event);
            }
            if self.ended {
                return Next::Ended;
            }
            self.unchunk();
            if self.ended || self.take_event_ready() {
                continue;
            }
            let mut buffer = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buffer)).await {
                Err(_) => return Next::Quiet,
                Ok(Ok(0)) | Ok(Err(_)) => self.ended = true,
                Ok(Ok(read)) => self.raw.extend_from_slice(&buffer[..read]),
            }
        }
    }

    fn take_event_ready(&self) -> bool {
        self.body.windows(2).any(|w| w == b"\n\n")
    }

    /// Moves whole chunks from `raw` to `body`.
    fn unchunk(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.trim(), 16).expect("a chunk size");
            if size == 0 {
                self.ended = true;
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// Parses one complete event off the front of the body.
    fn take_event(&mut self) -> Option<SseEvent> {
        let end = self.body.windows(2).position(|w| w == b"\n\n")?;
        let text = String::from_utf8(self.body[..end].to_vec()).expect("events are UTF-8");
        self.body.drain(..end + 2);
        let (mut id, mut data, mut comment, mut retry) = (None, Vec::new(), None, None);
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.to_owned());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push(value.to_owned());
            } else if let Some(value) = line.strip_prefix(':') {
                comment = Some(value.trim().to_owned());
            } else if let Some(value) = line.strip_prefix("retry: ") {
                retry = value.parse().ok();
            } else {
                panic!("unexpected line in the stream: {line:?}");
            }
        }
        Some(if !data.is_empty() {
            let frame = serde_json::from_str(&data.join("\n")).expect("data is JSON");
            SseEvent::Data { id, frame }
        } else if let Some(retry) = retry {
            SseEvent::Retry(retry)
        } else {
            SseEvent::Comment(comment.unwrap_or_default())
        })
    }

    /// The next data event with its id, failing the test after [`PATIENCE`] or at the end.
    pub async fn recv_event(&mut self) -> (Option<String>, Value) {
        loop {
            match self.next(PATIENCE).await {
                Next::Event(SseEvent::Data { id, frame }) => return (id, frame),
                Next::Event(_) => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// The next data event's frame.
    pub async fn recv(&mut self) -> Value {
        self.recv_event().await.1
    }

    /// The next frame of type `kind`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// POSTs `frames` for this session to the node on `port` (any node).
    pub async fn post_to(&self, port: u16, frames: Value) -> HttpReply {
        let body = serde_json::json!({"session": self.session, "frames": frames});
        post(
            port,
            &body.to_string(),
            &[("Content-Type", "application/json")],
        )
        .await
    }

    /// POSTs `frames` to the node holding the stream.
    pub async fn post(&self, frames: Value) -> HttpReply {
        self.post_to(self.port, frames).await
    }
}

/// A raw `POST /sse/send` (run off the test's runtime: the helper is blocking).
pub async fn post(port: u16, body: &str, headers: &[(&str, &str)]) -> HttpReply {
    let body = body.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_request(port, "POST", "/sse/send", &headers, body.as_bytes())
    })
    .await
    .expect("the request task")
    .expect("the node answered")
}
