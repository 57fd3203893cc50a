//! Tokens the gateway hands to clients and later takes back, signed so a client can neither
//! guess nor forge one: the SSE session token (which node holds a stream, and which session on
//! it; every POST carries it) and, in anonymous mode, the reconnect token (the `userId` a
//! reconnecting client gets back).
//!
//! Both are HMAC-SHA256 under one secret: the deployment's (`--session-secret`, the same on
//! every node) or, without one, a random secret of this node's. A session token is only ever
//! checked by the node that issued it (a POST is routed there first), so a per-node secret is
//! enough for SSE; a reconnect token is checked by whichever node the client reconnects to,
//! which needs the deployment's secret.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Random bytes in a session id.
const SESSION_ID_BYTES: usize = 16;

/// Version tags, and what each kind of token signs first, so that one kind can never be taken
/// for another.
const SESSION_TAG: &str = "s1";
const RECONNECT_TAG: &str = "r1";
const SESSION_CONTEXT: &[u8] = b"chat-gateway sse session\0";
const RECONNECT_CONTEXT: &[u8] = b"chat-gateway reconnect\0";

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The system's random source failed.
    #[error("no randomness available: {0}")]
    Random(getrandom::Error),
    /// A configured secret is too short to resist guessing.
    #[error("the session secret must be at least {MIN_SECRET_BYTES} bytes")]
    SecretTooShort,
}

/// A configured secret: never shown in debug output or logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One SSE session's id: random, so unguessable even before its signature is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; SESSION_ID_BYTES]);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Result<SessionId, TokenError> {
        let mut bytes = [0; SESSION_ID_BYTES];
        getrandom::fill(&mut bytes).map_err(TokenError::Random)?;
        Ok(SessionId(bytes))
    }

    fn to_text(self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    fn parse(text: &str) -> Option<SessionId> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        Some(SessionId(bytes.try_into().ok()?))
    }
}

/// A session token as read from a POST, not yet verified: only the node it names can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionToken {
    /// The node holding the stream.
    pub node: String,
    /// The session on that node.
    pub session: SessionId,
    mac: Vec<u8>,
}

impl SessionToken {
    /// Reads `s1.<session>.<node>.<signature>`; `None` for anything else (which is answered
    /// like a forged token).
    pub fn parse(token: &str) -> Option<SessionToken> {
        let mut parts = token.split('.');
        let (tag, session, node, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if tag != SESSION_TAG || parts.next().is_some() {
            return None;
        }
        let node = String::from_utf8(URL_SAFE_NO_PAD.decode(node).ok()?).ok()?;
        Some(SessionToken {
            node,
            session: SessionId::parse(session)?,
            mac: URL_SAFE_NO_PAD.decode(mac).ok()?,
        })
    }
}

/// Signs and checks tokens under one secret.
#[derive(Clone)]
pub struct Signer {
    key: HmacSha256,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer under the deployment's secret.
    pub fn new(secret: &[u8]) -> Result<Signer, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::SecretTooShort);
        }
        Ok(Signer::keyed(secret))
    }

    /// A signer under a random secret of this node's.
    pub fn random() -> Result<Signer, TokenError> {
        let mut secret = [0; 32];
        getrandom::fill(&mut secret).map_err(TokenError::Random)?;
        Ok(Signer::keyed(&secret))
    }

    fn keyed(secret: &[u8]) -> Signer {
        Signer {
            key: HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = self.key.clone();
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// The token of session `session` on node `node`.
    pub fn session_token(&self, node: &str, session: SessionId) -> String {
        let session = session.to_text();
        let signature = self
            .mac(&[SESSION_CONTEXT, node.as_bytes(), b"\0", session.as_bytes()])
            .finalize()
            .into_bytes();
        format!(
            "{SESSION_TAG}.{session}.{}.{}",
            URL_SAFE_NO_PAD.encode(node),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// Whether this signer issued `token` (compared in constant time).
    pub fn verify_session(&self, token: &SessionToken) -> bool {
        let session = token.session.to_text();
        self.mac(&[
            SESSION_CONTEXT,
            token.node.as_bytes(),
            b"\0",
            session.as_bytes(),
        ])
        .verify_slice(&token.mac)
        .is_ok()
    }

    /// The reconnect token of `user_id`.
    pub fn reconnect_token(&self, user_id: &str) -> String {
        let signature = self
            .mac(&[RECONNECT_CONTEXT, user_id.as_bytes()])
            .finalize()
            .into_bytes();
        format!(
            "{RECONNECT_TAG}.{}.{}",
            URL_SAFE_NO_PAD.encode(user_id),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The `userId` a reconnect token gives back, if this signer issued it.
    pub fn verify_reconnect(&self, token: &str) -> Option<String> {
        let mut parts = token.split('.');
        let (tag, user, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if tag != RECONNECT_TAG || parts.next().is_some() {
            return None;
        }
        let user = String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        self.mac(&[RECONNECT_CONTEXT, user.as_bytes()])
            .verify_slice(&mac)
            .ok()?;
        Some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(byte: u8) -> Signer {
        Signer::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_session_token_names_its_node_and_only_its_signer_accepts_it() {
        let session = SessionId::random().unwrap();
        let token = signer(1).session_token("node-a.1", session);
        let read = SessionToken::parse(&token).unwrap();
        assert_eq!((read.node.as_str(), read.session), ("node-a.1", session));
        assert!(signer(1).verify_session(&read));
        assert!(!signer(2).verify_session(&read), "another secret");

        // Any change to what is signed breaks the signature.
        let other = SessionId::random().unwrap();
        let swapped = token.replacen(&session.to_text(), &other.to_text(), 1);
        assert!(!signer(1).verify_session(&SessionToken::parse(&swapped).unwrap()));
        let moved = SessionToken {
            node: "node-b".into(),
            ..read.clone()
        };
        assert!(!signer(1).verify_session(&moved));
        for garbage in ["", "s1", "s1.a.b.c", "s2.x.y.z", &format!("{token}.x")] {
            assert!(SessionToken::parse(garbage).is_none(), "{garbage}");
        }
    }

    #[test]
    fn a_reconnect_token_gives_back_its_user_and_is_no_session_token() {
        let token = signer(1).reconnect_token("u-0123456789ab");
        assert_eq!(
            signer(1).verify_reconnect(&token).as_deref(),
            Some("u-0123456789ab")
        );
        assert_eq!(signer(2).verify_reconnect(&token), None);
        let forged = format!(
            "r1.{}.{}",
            URL_SAFE_NO_PAD.encode("system"),
            token.rsplit('.').next().unwrap()
        );
        assert_eq!(signer(1).verify_reconnect(&forged), None);
        assert!(SessionToken::parse(&token).is_none());
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(matches!(
            Signer::new(b"short"),
            Err(TokenError::SecretTooShort)
        ));
    }
}
