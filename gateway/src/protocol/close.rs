//! Every way the server ends a connection, in one catalog: the close code, the reason sent with
//! it, and the class a client must act on (reconnect and resume, or stop). No close code is
//! written anywhere else; `docs/protocol.md` lists the same table.

use std::fmt;

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reconnect (with backoff and jitter) and resume every room from its last offset.
    Reconnect,
    /// Do not reconnect by itself: it would only do again what ended the connection, or the
    /// application ended the session.
    Terminal,
}

impl Class {
    /// The class as `docs/protocol.md` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Reconnect => "reconnect",
            Class::Terminal => "terminal",
        }
    }
}

/// Why the server ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disconnect {
    /// The answer to the client's own close.
    Normal,
    /// The node is shutting down (SIGINT).
    GoingAway,
    /// The client broke RFC 6455 (an unmasked frame, a reserved opcode or bit, ...).
    ProtocolError,
    /// A text frame (or a close reason) was not valid UTF-8.
    InvalidPayload,
    /// The client kept sending over the rate limits.
    PolicyViolation,
    /// A frame or message exceeded the size limit.
    TooBig,
    /// The node is draining for a restart (SIGTERM): reconnect and resume elsewhere.
    ServiceRestart,
    /// The broker was unavailable when the connection joined its default room.
    TryAgainLater,
    /// The client stopped reading and its backlog filled.
    SlowConsumer,
    /// Nothing was heard from the client within the idle timeout.
    IdleTimeout,
    /// The node missed messages of one of the connection's rooms and could not repair them.
    Resync,
    /// The connection's token expired without being refreshed.
    TokenExpired,
    /// The application closed every connection of the user (`POST /api/disconnect`).
    ByApplication,
    /// The connection broke: nothing more can be sent, not even a close frame. 1006 is
    /// reserved for exactly this and never appears on the wire.
    ConnectionLost,
}

impl Disconnect {
    /// Every entry of the catalog.
    pub const ALL: [Disconnect; 14] = [
        Disconnect::Normal,
        Disconnect::GoingAway,
        Disconnect::ProtocolError,
        Disconnect::InvalidPayload,
        Disconnect::PolicyViolation,
        Disconnect::TooBig,
        Disconnect::ServiceRestart,
        Disconnect::TryAgainLater,
        Disconnect::SlowConsumer,
        Disconnect::IdleTimeout,
        Disconnect::Resync,
        Disconnect::TokenExpired,
        Disconnect::ByApplication,
        Disconnect::ConnectionLost,
    ];

    /// The WebSocket close code.
    pub const fn code(self) -> u16 {
        match self {
            Disconnect::Normal => 1000,
            Disconnect::GoingAway => 1001,
            Disconnect::ProtocolError => 1002,
            Disconnect::ConnectionLost => 1006,
            Disconnect::InvalidPayload => 1007,
            Disconnect::PolicyViolation => 1008,
            Disconnect::TooBig => 1009,
            Disconnect::ServiceRestart => 1012,
            Disconnect::TryAgainLater => 1013,
            Disconnect::SlowConsumer => 4000,
            Disconnect::IdleTimeout => 4001,
            Disconnect::Resync => 4002,
            Disconnect::TokenExpired => 4003,
            Disconnect::ByApplication => 4004,
        }
    }

    /// The short reason sent in the close frame.
    pub const fn reason(self) -> &'static str {
        match self {
            Disconnect::Normal => "",
            Disconnect::GoingAway => "node shutting down",
            Disconnect::ProtocolError => "websocket protocol error",
            Disconnect::ConnectionLost => "connection lost",
            Disconnect::InvalidPayload => "text frame is not valid UTF-8",
            Disconnect::PolicyViolation => "rate limit exceeded",
            Disconnect::TooBig => "frame or message too big",
            Disconnect::ServiceRestart => "node restarting",
            Disconnect::TryAgainLater => "broker unavailable, try again later",
            Disconnect::SlowConsumer => "slow consumer: outgoing queue full",
            Disconnect::IdleTimeout => "idle timeout",
            Disconnect::Resync => "missed messages could not be repaired; resume",
            Disconnect::TokenExpired => "token expired",
            Disconnect::ByApplication => "disconnected by the application",
        }
    }

    /// What the client should do next.
    pub const fn class(self) -> Class {
        match self {
            Disconnect::Normal
            | Disconnect::ProtocolError
            | Disconnect::InvalidPayload
            | Disconnect::TooBig
            | Disconnect::ByApplication => Class::Terminal,
            Disconnect::GoingAway
            | Disconnect::PolicyViolation
            | Disconnect::ServiceRestart
            | Disconnect::TryAgainLater
            | Disconnect::SlowConsumer
            | Disconnect::IdleTimeout
            | Disconnect::Resync
            | Disconnect::TokenExpired
            | Disconnect::ConnectionLost => Class::Reconnect,
        }
    }

    /// Whether the client's reader broke, so no close reply from it can be read.
    pub const fn reader_failed(self) -> bool {
        matches!(
            self,
            Disconnect::TooBig | Disconnect::ProtocolError | Disconnect::InvalidPayload
        )
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_reasons_fit_a_close_frame() {
        let mut codes: Vec<u16> = Disconnect::ALL.iter().map(|d| d.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Disconnect::ALL.len());
        for disconnect in Disconnect::ALL {
            assert!(disconnect.reason().len() <= 123, "{disconnect:?}");
        }
    }

    /// The table in docs/protocol.md is what client libraries are written from: it must list
    /// every code with the class the server means.
    #[test]
    fn the_protocol_document_lists_every_code_with_its_class() {
        let doc = include_str!("../../../docs/protocol.md");
        let section = doc
            .split("## Close codes")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/protocol.md has a Close codes section");
        for disconnect in Disconnect::ALL {
            let row = section
                .lines()
                .find(|line| line.starts_with(&format!("| {} |", disconnect.code())))
                .unwrap_or_else(|| panic!("no row for {}", disconnect.code()));
            let class = row.rsplit('|').nth(1).unwrap_or_default().trim();
            assert!(
                class.starts_with(disconnect.class().as_str()),
                "{}: the document says `{class}`, the server means {}",
                disconnect.code(),
                disconnect.class().as_str()
            );
        }
    }
}
