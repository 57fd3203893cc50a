//! A minimal client side of RFC 6455 over a `TcpStream`, built for receiving many small frames
//! cheaply: the HTTP upgrade, frames parsed straight out of one reusable read buffer (every frame
//! a read returned is handed out before the socket is read again, and text is lent out without
//! copying), and masked client frames written from one reusable output buffer.
//!
//! tokio-tungstenite cost several microseconds per received message here (waker proxies, a
//! zeroed 8 KiB chunk per read, a `Bytes` per message, a separate poll per frame), about as
//! much CPU as the servers under test spent delivering it. Only what a load-generating client
//! needs is implemented: no extensions, no subprotocols, no TLS. Pings are answered, close
//! frames are acknowledged, fragmented messages are reassembled, and protocol violations end
//! the connection with an error.
//!
//! Every method is cancel safe (`tokio::select!` drops the losing futures): read and write
//! progress lives in the struct, never in a future, so a dropped call loses nothing.

use std::io;
use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tungstenite::handshake::{client::generate_key, derive_accept_key};
use url::Url;

/// Spare room made in the read buffer before every read: many small frames fit in one read.
const READ_CHUNK: usize = 8 * 1024;
/// Largest upgrade response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest frame and message accepted (tungstenite's defaults).
const MAX_FRAME: u64 = 16 << 20;
const MAX_MESSAGE: usize = 64 << 20;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Why the connection cannot be used any more.
#[derive(Debug)]
pub enum WsError {
    Io(io::Error),
    /// The upgrade was answered with another status than 101.
    Http(u16),
    /// The peer sent a close frame, with its status code if any.
    Closed(Option<u16>),
    /// The TCP connection ended without a closing handshake.
    Reset,
    /// Something else than RFC 6455 (or a broken upgrade response); the reason is only for
    /// reading in a debugger, reports label all of these alike.
    Protocol(#[allow(dead_code)] &'static str),
    /// A frame or message above the size limits.
    TooLarge,
    /// A text message that is not UTF-8.
    Utf8,
}

impl From<io::Error> for WsError {
    fn from(e: io::Error) -> Self {
        WsError::Io(e)
    }
}

/// Where the payload of a received text message is.
enum TextAt {
    /// In the read buffer (a single unfragmented frame).
    Read(Range<usize>),
    /// In the reassembly buffer.
    Fragments,
}

/// What parsing one buffered frame produced.
enum Parsed {
    /// No complete frame is buffered.
    NeedMore,
    /// A frame that does not surface (ping, pong, binary, a non-final fragment).
    Consumed,
    Text(TextAt),
}

/// An open client WebSocket connection.
pub struct WsStream {
    tcp: TcpStream,
    /// Bytes read; `rbuf[rpos..]` is not parsed yet.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Payload of the fragmented message being reassembled, and whether it is text.
    frag: Vec<u8>,
    frag_text: Option<bool>,
    /// The previous call returned a reassembled message: clear it before going on.
    frag_lent: bool,
    /// Frames to write; `out[out_pos..]` is not written yet.
    out: Vec<u8>,
    out_pos: usize,
    /// Masking-key generator (xorshift64*, seeded from the random handshake key).
    mask_state: u64,
    /// We sent a close frame; nothing else may be sent.
    close_sent: bool,
}

impl WsStream {
    /// Upgrade `tcp` to a WebSocket connection to `url` (a `ws://` URL).
    pub async fn connect(mut tcp: TcpStream, url: &Url) -> Result<WsStream, WsError> {
        let key = generate_key();
        let host = url
            .host_str()
            .ok_or(WsError::Protocol("URL without host"))?;
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;

        let mut rbuf = Vec::with_capacity(READ_CHUNK);
        let head_end = loop {
            // Search again from a little before the new bytes: the terminator may straddle reads.
            let from = rbuf.len().saturating_sub(3);
            if tcp.read_buf(&mut rbuf).await? == 0 {
                return Err(WsError::Protocol("connection closed during the upgrade"));
            }
            if let Some(i) = find(&rbuf[from..], b"\r\n\r\n") {
                break from + i + 4;
            }
            if rbuf.len() > MAX_RESPONSE_HEAD {
                return Err(WsError::Protocol("upgrade response too long"));
            }
            rbuf.reserve(READ_CHUNK);
        };
        check_upgrade_response(&rbuf[..head_end], &derive_accept_key(key.as_bytes()))?;

        let seed = key.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ b as u64).rotate_left(9) ^ 0xA5
        });
        Ok(WsStream {
            tcp,
            // Whatever followed the response head already belongs to the WebSocket stream.
            rbuf,
            rpos: head_end,
            frag: Vec::new(),
            frag_text: None,
            frag_lent: false,
            out: Vec::new(),
            out_pos: 0,
            mask_state: seed | 1,
            close_sent: false,
        })
    }

    /// The next text message. Pings are answered, pongs and binary messages skipped; a close
    /// frame is acknowledged and returned as [`WsError::Closed`].
    pub async fn recv_text(&mut self) -> Result<&str, WsError> {
        let at = loop {
            if let Some(at) = self.next_buffered()? {
                break at;
            }
            // Pongs and close replies go out before blocking on the next read.
            self.flush().await?;
            self.fill().await?;
        };
        self.lend(at)
    }

    /// The next text message if the buffer already holds it; `None` when only the network can
    /// tell. Never waits: callers drain everything one read brought in before they go back to
    /// waiting on other things too. Pongs this queues go out with the next `recv_text`.
    pub fn try_recv_text(&mut self) -> Option<Result<&str, WsError>> {
        match self.next_buffered() {
            Ok(Some(at)) => Some(self.lend(at)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Parse buffered frames up to the next text message.
    fn next_buffered(&mut self) -> Result<Option<TextAt>, WsError> {
        if self.frag_lent {
            self.frag_lent = false;
            self.frag.clear();
        }
        loop {
            match self.parse_frame()? {
                Parsed::Text(at) => return Ok(Some(at)),
                Parsed::Consumed => continue,
                Parsed::NeedMore => return Ok(None),
            }
        }
    }

    fn lend(&mut self, at: TextAt) -> Result<&str, WsError> {
        let bytes = match at {
            TextAt::Read(r) => &self.rbuf[r],
            TextAt::Fragments => {
                self.frag_lent = true;
                &self.frag[..]
            }
        };
        std::str::from_utf8(bytes).map_err(|_| WsError::Utf8)
    }

    /// Send one text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        if self.close_sent {
            return Err(WsError::Protocol("send after close"));
        }
        self.queue_frame(OP_TEXT, text.as_bytes());
        self.flush().await
    }

    /// Start the closing handshake: send a close frame without status code.
    pub async fn send_close(&mut self) -> Result<(), WsError> {
        if !self.close_sent {
            self.queue_frame(OP_CLOSE, &[]);
            self.close_sent = true;
        }
        self.flush().await
    }

    /// Read and discard until the peer's close frame or the end of the connection.
    pub async fn drain_until_closed(&mut self) {
        loop {
            match self.recv_text().await {
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Read more bytes into the buffer, first moving the unparsed tail to its front.
    async fn fill(&mut self) -> Result<(), WsError> {
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        // A partial large frame asks for exactly what it still lacks.
        let wanted = match frame_header(&self.rbuf) {
            Ok(Some(h)) => (h.total() as usize).saturating_sub(self.rbuf.len()),
            _ => 0,
        };
        self.rbuf.reserve(wanted.max(READ_CHUNK));
        // read_buf reads into spare capacity without zeroing it first.
        match self.tcp.read_buf(&mut self.rbuf).await? {
            0 => Err(WsError::Reset),
            _ => Ok(()),
        }
    }

    /// Write out everything queued.
    async fn flush(&mut self) -> Result<(), WsError> {
        while self.out_pos < self.out.len() {
            // One `write` per loop turn: if this future is dropped, out_pos is still right.
            let n = self.tcp.write(&self.out[self.out_pos..]).await?;
            if n == 0 {
                return Err(WsError::Io(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Append one masked frame to the output buffer.
    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.out.push(0x80 | opcode);
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let key = self.next_mask();
        self.out.extend_from_slice(&key);
        let start = self.out.len();
        self.out.extend_from_slice(payload);
        apply_mask(&mut self.out[start..], key);
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.mask_state = x;
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32).to_ne_bytes()
    }

    /// Parse the next buffered frame, if complete, and act on it.
    fn parse_frame(&mut self) -> Result<Parsed, WsError> {
        let avail = &self.rbuf[self.rpos..];
        let Some(h) = frame_header(avail)? else {
            return Ok(Parsed::NeedMore);
        };
        if h.total() > avail.len() as u64 {
            return Ok(Parsed::NeedMore);
        }
        let payload = self.rpos + h.header_len..self.rpos + h.total() as usize;
        self.rpos = payload.end;

        match h.opcode {
            OP_TEXT | OP_BINARY => {
                if self.frag_text.is_some() {
                    return Err(WsError::Protocol("new message inside a fragmented one"));
                }
                let text = h.opcode == OP_TEXT;
                if !h.fin {
                    self.frag_text = Some(text);
                    self.frag.extend_from_slice(&self.rbuf[payload]);
                    return Ok(Parsed::Consumed);
                }
                Ok(if text {
                    Parsed::Text(TextAt::Read(payload))
                } else {
                    Parsed::Consumed
                })
            }
            OP_CONTINUATION => {
                let Some(text) = self.frag_text else {
                    return Err(WsError::Protocol("continuation without a message"));
                };
                if self.frag.len() + payload.len() > MAX_MESSAGE {
                    return Err(WsError::TooLarge);
                }
                self.frag.extend_from_slice(&self.rbuf[payload]);
                if !h.fin {
                    return Ok(Parsed::Consumed);
                }
                self.frag_text = None;
                if text {
                    Ok(Parsed::Text(TextAt::Fragments))
                } else {
                    self.frag.clear();
                    Ok(Parsed::Consumed)
                }
            }
            OP_PING => {
                if !self.close_sent {
                    let data = self.rbuf[payload].to_vec();
                    self.queue_frame(OP_PONG, &data);
                }
                Ok(Parsed::Consumed)
            }
            OP_PONG => Ok(Parsed::Consumed),
            OP_CLOSE => {
                let body = &self.rbuf[payload];
                let code = match body.len() {
                    0 => None,
                    1 => return Err(WsError::Protocol("close frame with a one-byte body")),
                    _ => Some(u16::from_be_bytes([body[0], body[1]])),
                };
                if !self.close_sent {
                    // Acknowledge with the same code; written best effort by the caller's next
                    // flush or not at all, as the connection is over either way.
                    let echo = code.map(u16::to_be_bytes);
                    self.queue_frame(OP_CLOSE, echo.as_ref().map_or(&[][..], |c| &c[..]));
                    self.close_sent = true;
                    if let Ok(n) = self.tcp.try_write(&self.out[self.out_pos..]) {
                        self.out_pos += n;
                    }
                }
                Err(WsError::Closed(code))
            }
            _ => Err(WsError::Protocol("unknown opcode")),
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: u64,
}

impl Header {
    fn total(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// The header at the start of `buf`, `None` if it is not all there yet. Rejects what a server
/// must not send: reserved bits, masked frames, oversized or fragmented control frames.
fn frame_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(WsError::Protocol("masked frame from the server"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (header_len, payload_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (4, u16::from_be_bytes([b[0], b[1]]) as u64),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (10, u64::from_be_bytes(b)),
            None => return Ok(None),
        },
        n => (2, n as u64),
    };
    if payload_len > MAX_FRAME {
        return Err(WsError::TooLarge);
    }
    if opcode & 0x8 != 0 && (!fin || payload_len > 125) {
        return Err(WsError::Protocol("fragmented or oversized control frame"));
    }
    Ok(Some(Header {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (b, k) in payload.iter_mut().zip(key.iter().cycle()) {
        *b ^= k;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Check an upgrade response head (status line and headers, through the blank line).
fn check_upgrade_response(head: &[u8], accept_key: &str) -> Result<(), WsError> {
    let head =
        std::str::from_utf8(head).map_err(|_| WsError::Protocol("upgrade response not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(WsError::Protocol("malformed status line"))?;
    if !version.starts_with("HTTP/1.") {
        return Err(WsError::Protocol("malformed status line"));
    }
    if status != 101 {
        return Err(WsError::Http(status));
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(WsError::Protocol("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == accept_key;
        }
    }
    match (upgrade, connection, accept) {
        (false, _, _) => Err(WsError::Protocol("missing Upgrade: websocket")),
        (_, false, _) => Err(WsError::Protocol("missing Connection: Upgrade")),
        (_, _, false) => Err(WsError::Protocol("wrong Sec-WebSocket-Accept")),
        _ => Ok(()),
    }
}
