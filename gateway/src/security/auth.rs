//! Authentication: JSON Web Tokens that name the user and what they may do.
//!
//! Off by default (anonymous demo mode). Exactly one key flag turns it on: an HS256 shared
//! secret, or an RS256 or ES256 public key. A token comes with the handshake, either as the
//! `token.<jwt>` WebSocket subprotocol (kept out of access logs) or as the `token` query
//! parameter, and may be replaced on an open connection with an `auth` frame.
//!
//! Claims: `sub` (required) becomes the user id; `exp` (required) ends the connection unless a
//! fresh token arrives first; `rooms` (a list of room names) and `room_prefix` (a string)
//! restrict which rooms may be joined (neither: every room); `can_publish` (default true) says
//! whether the user may send chat messages. `iss` and `aud` are checked when configured.
//!
//! Tokens are never logged, and nothing here puts one in an error message.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::headers::header_list;
use crate::protocol::RoomName;
use axum::http::HeaderMap;
use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest token accepted, in bytes; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Longest `sub` accepted as a user id, in characters.
pub const MAX_SUBJECT_CHARS: usize = 128;

/// The subprotocol prefix that carries a token: `Sec-WebSocket-Protocol: chat.v1, token.<jwt>`.
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "token.";

/// A secret given on the command line or in the environment; never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

/// The authentication flags. Setting any one of the four key flags turns authentication on.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Require JWTs signed with HS256 and this shared secret (at least 32 bytes). Prefer the
    /// environment variable or --jwt-hs256-secret-file: command lines are visible to local users.
    #[arg(long, env = "GATEWAY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<Secret>,

    /// Require JWTs signed with HS256 and the secret in this file (surrounding whitespace is
    /// ignored).
    #[arg(long, env = "GATEWAY_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,

    /// Require JWTs signed with RS256, verified with this PEM public key.
    #[arg(long, env = "GATEWAY_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,

    /// Require JWTs signed with ES256 (P-256), verified with this PEM public key.
    #[arg(long, env = "GATEWAY_JWT_ES256_PUBLIC_KEY")]
    pub jwt_es256_public_key: Option<PathBuf>,

    /// Accept only tokens whose `iss` is this issuer.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Accept only tokens whose `aud` names this audience (without it, tokens that carry an
    /// `aud` are refused).
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf`; a connection is closed (4003) this
    /// long after its token's `exp`.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// More than one key flag was given.
    #[error(
        "give only one of --jwt-hs256-secret, --jwt-hs256-secret-file, --jwt-rs256-public-key, --jwt-es256-public-key"
    )]
    SeveralKeys,
    /// The HS256 secret is too short to resist guessing.
    #[error("the HS256 secret must be at least 32 bytes long")]
    WeakSecret,
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A public key file is not a PEM key of the right kind.
    #[error("{path} is not a PEM {kind} public key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// RSA or EC.
        kind: &'static str,
        /// What the parser said.
        reason: String,
    },
}

/// Verifies tokens against the configured key and rules.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
    leeway: Duration,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// The authenticator the flags ask for, or `None` in anonymous mode.
    pub fn from_args(args: &AuthArgs) -> Result<Option<Authenticator>, AuthSetupError> {
        let given = [
            args.jwt_hs256_secret.is_some(),
            args.jwt_hs256_secret_file.is_some(),
            args.jwt_rs256_public_key.is_some(),
            args.jwt_es256_public_key.is_some(),
        ];
        match given.iter().filter(|given| **given).count() {
            0 => return Ok(None),
            1 => {}
            _ => return Err(AuthSetupError::SeveralKeys),
        }
        let (algorithm, key) = if let Some(secret) = &args.jwt_hs256_secret {
            (Algorithm::HS256, hs256_key(secret.expose())?)
        } else if let Some(path) = &args.jwt_hs256_secret_file {
            let secret = read(path)?;
            (Algorithm::HS256, hs256_key(secret.trim_ascii())?)
        } else if let Some(path) = &args.jwt_rs256_public_key {
            let key = DecodingKey::from_rsa_pem(&read(path)?).map_err(|error| {
                AuthSetupError::BadKey {
                    path: path.clone(),
                    kind: "RSA",
                    reason: error.to_string(),
                }
            })?;
            (Algorithm::RS256, key)
        } else if let Some(path) = &args.jwt_es256_public_key {
            let key =
                DecodingKey::from_ec_pem(&read(path)?).map_err(|error| AuthSetupError::BadKey {
                    path: path.clone(),
                    kind: "EC",
                    reason: error.to_string(),
                })?;
            (Algorithm::ES256, key)
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = args.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &args.jwt_issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        if let Some(audience) = &args.jwt_audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        Ok(Some(Authenticator {
            key,
            validation,
            algorithm,
            leeway: args.jwt_leeway,
        }))
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Checks a token's signature and claims.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("token too long"));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| TokenError::from_kind(error.kind()))?;
        let claims = data.claims;
        let subject = claims.sub;
        if !crate::protocol::is_label(&subject, MAX_SUBJECT_CHARS) {
            return Err(TokenError::Invalid(
                "`sub` must be 1-128 characters without control characters",
            ));
        }
        let expires_at = claims
            .exp
            .as_f64()
            .filter(|exp| exp.is_finite() && *exp >= 0.0)
            .ok_or(TokenError::Invalid("`exp` must be a number"))? as u64;
        let rooms = claims
            .rooms
            .map(|rooms| rooms.into_iter().collect::<HashSet<String>>());
        Ok(Principal {
            user_id: subject,
            expires_at,
            grants: Grants {
                rooms,
                room_prefix: claims.room_prefix,
                can_publish: claims.can_publish,
            },
        })
    }

    /// When a connection holding a token that expires at `expires_at` (Unix seconds) must
    /// close, as a duration from now.
    pub fn time_left(&self, expires_at: u64) -> Duration {
        let now = jsonwebtoken::get_current_timestamp();
        Duration::from_secs(expires_at.saturating_sub(now)) + self.leeway
    }
}

fn hs256_key(secret: &[u8]) -> Result<DecodingKey, AuthSetupError> {
    if secret.len() < 32 {
        return Err(AuthSetupError::WeakSecret);
    }
    Ok(DecodingKey::from_secret(secret))
}

fn read(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn yes() -> bool {
    true
}

/// The claims the gateway reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: serde_json::Number,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    room_prefix: Option<String>,
    #[serde(default = "yes")]
    can_publish: bool,
}

/// Why a token was refused. The texts are safe to send to the client and to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was offered.
    #[error("a token is required")]
    Missing,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
    /// Signed with another algorithm than the configured one.
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("invalid token signature")]
    BadSignature,
    /// Anything else: malformed, a claim missing or wrong.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

impl TokenError {
    fn from_kind(kind: &ErrorKind) -> TokenError {
        match kind {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm => TokenError::WrongAlgorithm,
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::MissingRequiredClaim(_) => {
                TokenError::Invalid("a required claim is missing")
            }
            ErrorKind::InvalidIssuer => TokenError::Invalid("wrong issuer"),
            ErrorKind::InvalidAudience => TokenError::Invalid("wrong audience"),
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                TokenError::Invalid("malformed claims")
            }
            _ => TokenError::Invalid("malformed token"),
        }
    }

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAlgorithm => "wrong_algorithm",
            TokenError::BadSignature => "bad_signature",
            TokenError::Invalid(_) => "invalid",
        }
    }
}

/// Who a verified token says the user is, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// From `sub`.
    pub user_id: String,
    /// From `exp`, Unix seconds.
    pub expires_at: u64,
    /// From `rooms`, `room_prefix` and `can_publish`.
    pub grants: Grants,
}

/// What a connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Rooms that may be joined by name; with `room_prefix`, either one allows a room.
    rooms: Option<HashSet<String>>,
    /// Rooms whose name starts with this may be joined.
    room_prefix: Option<String>,
    /// Whether chat messages may be sent.
    can_publish: bool,
}

impl Grants {
    /// Everything: anonymous connections, and tokens without restricting claims.
    pub fn all() -> Grants {
        Grants {
            rooms: None,
            room_prefix: None,
            can_publish: true,
        }
    }

    /// Whether `room` may be joined.
    pub fn may_join(&self, room: &RoomName) -> bool {
        if self.rooms.is_none() && self.room_prefix.is_none() {
            return true;
        }
        let listed = self
            .rooms
            .as_ref()
            .is_some_and(|rooms| rooms.contains(room.as_str()));
        let prefixed = self
            .room_prefix
            .as_deref()
            .is_some_and(|prefix| room.as_str().starts_with(prefix));
        listed || prefixed
    }

    /// Whether chat messages may be sent.
    pub fn may_publish(&self) -> bool {
        self.can_publish
    }
}

/// The token a handshake offers: the `token.<jwt>` subprotocol first, else `token` from the
/// query string.
pub fn handshake_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    header_list(headers.get_all(SEC_WEBSOCKET_PROTOCOL))
        .find_map(|protocol| protocol.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .or(query_token)
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator(leeway: &str) -> Authenticator {
        let args = AuthArgs {
            jwt_hs256_secret: Some(SECRET.parse().unwrap()),
            jwt_hs256_secret_file: None,
            jwt_rs256_public_key: None,
            jwt_es256_public_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: humantime::parse_duration(leeway).unwrap(),
        };
        Authenticator::from_args(&args).unwrap().unwrap()
    }

    fn token(alg: Algorithm, claims: Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_valid_token_names_the_user_and_grants() {
        let auth = authenticator("0s");
        let principal = auth
            .verify(&token(
                Algorithm::HS256,
                json!({"sub":"alice","exp":now()+60,"rooms":["a","b"],"room_prefix":"team-","can_publish":false}),
            ))
            .unwrap();
        assert_eq!(principal.user_id, "alice");
        let room = |name| RoomName::parse(name).unwrap();
        assert!(principal.grants.may_join(&room("a")));
        assert!(principal.grants.may_join(&room("team-x")));
        assert!(!principal.grants.may_join(&room("c")));
        assert!(!principal.grants.may_publish());
        let open = auth
            .verify(&token(
                Algorithm::HS256,
                json!({"sub":"bob","exp":now()+60}),
            ))
            .unwrap();
        assert!(open.grants.may_join(&room("anything")));
        assert!(open.grants.may_publish());
        let none = auth
            .verify(&token(
                Algorithm::HS256,
                json!({"sub":"c","exp":now()+60,"rooms":[]}),
            ))
            .unwrap();
        assert!(!none.grants.may_join(&room("lobby")));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let auth = authenticator("0s");
        let expired = token(Algorithm::HS256, json!({"sub":"a","exp":now()-10}));
        assert_eq!(auth.verify(&expired), Err(TokenError::Expired));
        let hs384 = token(Algorithm::HS384, json!({"sub":"a","exp":now()+60}));
        assert_eq!(auth.verify(&hs384), Err(TokenError::WrongAlgorithm));
        let good = token(Algorithm::HS256, json!({"sub":"a","exp":now()+60}));
        let forged = format!("{}x", &good[..good.len() - 1]);
        assert!(auth.verify(&forged).is_err());
        let no_exp = token(Algorithm::HS256, json!({"sub":"a"}));
        assert!(matches!(auth.verify(&no_exp), Err(TokenError::Invalid(_))));
        let no_sub = token(Algorithm::HS256, json!({"exp":now()+60}));
        assert!(matches!(auth.verify(&no_sub), Err(TokenError::Invalid(_))));
        let empty_sub = token(Algorithm::HS256, json!({"sub":"","exp":now()+60}));
        assert!(matches!(
            auth.verify(&empty_sub),
            Err(TokenError::Invalid(_))
        ));
        let later = token(
            Algorithm::HS256,
            json!({"sub":"a","exp":now()+600,"nbf":now()+300}),
        );
        assert_eq!(auth.verify(&later), Err(TokenError::NotYetValid));
        for garbage in ["", "a.b.c", "x", &"a".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(auth.verify(garbage).is_err());
        }
        // An unsigned token (alg "none") is never accepted.
        let unsigned = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ"
        );
        assert!(auth.verify(&unsigned).is_err());
    }

    #[test]
    fn leeway_tolerates_a_little_clock_skew() {
        let auth = authenticator("30s");
        let just_expired = token(Algorithm::HS256, json!({"sub":"a","exp":now()-5}));
        assert!(auth.verify(&just_expired).is_ok());
        assert!(auth.time_left(now()) >= Duration::from_secs(29));
    }

    #[test]
    fn short_secrets_and_several_keys_are_refused() {
        let mut args = AuthArgs {
            jwt_hs256_secret: Some("short".parse().unwrap()),
            jwt_hs256_secret_file: None,
            jwt_rs256_public_key: None,
            jwt_es256_public_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::ZERO,
        };
        assert!(matches!(
            Authenticator::from_args(&args),
            Err(AuthSetupError::WeakSecret)
        ));
        args.jwt_rs256_public_key = Some("/nonexistent".into());
        assert!(matches!(
            Authenticator::from_args(&args),
            Err(AuthSetupError::SeveralKeys)
        ));
        args.jwt_hs256_secret = None;
        assert!(matches!(
            Authenticator::from_args(&args),
            Err(AuthSetupError::Read { .. })
        ));
        assert_eq!(
            format!("{:?}", Secret("hunter2".into())),
            "Secret(<redacted>)"
        );
    }

    #[test]
    fn the_subprotocol_token_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(handshake_token(&headers, Some("q")), Some("q"));
        assert_eq!(handshake_token(&headers, Some("")), None);
        headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat.v1, token.abc.def.ghi"),
        );
        assert_eq!(handshake_token(&headers, Some("q")), Some("abc.def.ghi"));
    }
}
