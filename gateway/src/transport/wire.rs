//! Server-to-client WebSocket frames as the bytes that go on the wire.
//!
//! A chat message is framed once per node and the same bytes are written to every member's
//! socket, so fan-out costs one reference-count increment and one write per recipient. Frames
//! from the server are never masked (RFC 6455 §5.1), which makes the encoding a two-to-ten
//! byte header in front of the payload.

use bytes::{BufMut, Bytes, BytesMut};

/// Opcodes the server sends.
pub const TEXT: u8 = 0x1;
/// The close frame's opcode.
pub const CLOSE: u8 = 0x8;
/// The ping's opcode.
pub const PING: u8 = 0x9;
/// The FIN bit: every frame the server sends is a whole message.
const FIN: u8 = 0x80;

/// One complete, encoded server frame. Cheap to clone: clones share the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireFrame(Bytes);

impl WireFrame {
    /// A text frame carrying `payload` (UTF-8 text: a `str`, a `String`, a `FrameText`).
    pub fn text(payload: impl AsRef<[u8]>) -> WireFrame {
        WireFrame::encode(TEXT, &[payload.as_ref()])
    }

    /// A ping with no payload.
    pub fn ping() -> WireFrame {
        WireFrame(Bytes::from_static(&[FIN | PING, 0]))
    }

    /// A close frame with a status code and a reason (truncated to fit a control frame).
    pub fn close(code: u16, reason: &str) -> WireFrame {
        // Control frame payloads are at most 125 bytes, two of which are the code.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        WireFrame::encode(CLOSE, &[&code.to_be_bytes(), &reason.as_bytes()[..end]])
    }

    /// Bytes already framed elsewhere (the WebSocket library's own control replies).
    pub fn preformatted(bytes: &[u8]) -> WireFrame {
        WireFrame(Bytes::copy_from_slice(bytes))
    }

    /// The encoded frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn encode(opcode: u8, parts: &[&[u8]]) -> WireFrame {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let mut out = BytesMut::with_capacity(len + 10);
        out.put_u8(FIN | opcode);
        if len < 126 {
            out.put_u8(len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            out.put_u8(126);
            out.put_u16(len);
        } else {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
        for part in parts {
            out.put_slice(part);
        }
        WireFrame(out.freeze())
    }
}

/// Splits one server frame off the front of `bytes`: its opcode, its payload and what follows;
/// `None` until a whole frame is there. The one decoder of server frames: the SSE transport
/// reads what the outbox hands it with it, and so do the tests.
pub fn decode(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    let (&len_byte, rest) = rest.split_first()?;
    let (len, rest) = match len_byte & 0x7f {
        126 => {
            let (len, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([len[0], len[1]])), rest)
        }
        127 => {
            let (len, rest) = rest.split_at_checked(8)?;
            (
                usize::try_from(u64::from_be_bytes(len.try_into().ok()?)).ok()?,
                rest,
            )
        }
        short => (usize::from(short), rest),
    };
    let (payload, rest) = rest.split_at_checked(len)?;
    Some((first & 0x0f, payload, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use tungstenite::protocol::frame::FrameHeader;
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

    /// Parses a frame with the WebSocket library the clients use, as a client would.
    fn parse(frame: &WireFrame) -> (FrameHeader, Vec<u8>) {
        let mut cursor = Cursor::new(frame.as_bytes());
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("valid header")
            .expect("complete header");
        let start = cursor.position() as usize;
        let payload = frame.as_bytes()[start..].to_vec();
        assert_eq!(
            payload.len() as u64,
            len,
            "length field matches the payload"
        );
        (header, payload)
    }

    #[test]
    fn text_frames_of_every_length_class_parse_back() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let text = "x".repeat(len);
            let (header, payload) = parse(&WireFrame::text(&text));
            assert!(header.is_final);
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert!(header.mask.is_none(), "server frames are not masked");
            assert_eq!(payload, text.as_bytes(), "length {len}");
        }
    }

    #[test]
    fn close_frames_carry_the_code_and_a_reason_that_fits() {
        let (header, payload) = parse(&WireFrame::close(4000, "slow consumer"));
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert_eq!(&payload[..2], &4000u16.to_be_bytes());
        assert_eq!(&payload[2..], b"slow consumer");

        let long = "é".repeat(100);
        let (_, payload) = parse(&WireFrame::close(1000, &long));
        assert!(payload.len() <= 125, "a control frame fits in 125 bytes");
        assert!(
            std::str::from_utf8(&payload[2..]).is_ok(),
            "cut on a char boundary"
        );
    }

    #[test]
    fn the_test_decoder_reads_what_the_encoder_wrote() {
        let mut bytes = WireFrame::text("x".repeat(70_000)).as_bytes().to_vec();
        bytes.extend_from_slice(WireFrame::close(4000, "bye").as_bytes());
        let (opcode, payload, rest) = decode(&bytes).unwrap();
        assert_eq!((opcode, payload.len()), (TEXT, 70_000));
        let (opcode, payload, rest) = decode(rest).unwrap();
        assert_eq!(
            (opcode, &payload[2..], rest),
            (CLOSE, &b"bye"[..], &b""[..])
        );
        assert!(decode(&bytes[..100]).is_none(), "half a frame is no frame");
    }

    #[test]
    fn ping_is_an_empty_control_frame() {
        let (header, payload) = parse(&WireFrame::ping());
        assert_eq!(header.opcode, OpCode::Control(Control::Ping));
        assert!(payload.is_empty());
    }
}
