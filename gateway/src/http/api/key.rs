//! The server API's key: the shared secret the application's backend presents as
//! `Authorization: Bearer <key>`. Compared in constant time, never printed.

use std::fmt;
use std::str::FromStr;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::{Choice, ConstantTimeEq};

/// The key the server API accepts.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Shortest key accepted: shorter ones could be guessed.
    pub const MIN_BYTES: usize = 16;

    /// Whether the key is shorter than [`Self::MIN_BYTES`].
    pub fn too_short(&self) -> bool {
        self.0.len() < Self::MIN_BYTES
    }

    /// Whether `presented` is the key. Takes the same time whatever `presented` holds, so the
    /// time of an answer tells nothing of how much of the key a guess got right (nor of how
    /// long the key is, beyond what it always takes).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let key = self.0.as_bytes();
        let mut same = Choice::from(u8::from(presented.len() == key.len()));
        for (index, byte) in key.iter().enumerate() {
            let guess = presented.get(index).copied().unwrap_or(0);
            same &= guess.ct_eq(byte);
        }
        same.into()
    }

    /// Whether the request's `Authorization` header carries the key as a bearer token.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let value = value.as_bytes();
        // `Bearer` is case-insensitive (RFC 9110 §11.1); one or more spaces follow it.
        let Some((scheme, token)) = value.split_at_checked(6) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") || token.first() != Some(&b' ') {
            return false;
        }
        let token = token.trim_ascii();
        self.matches(token)
    }
}

impl From<&str> for ApiKey {
    fn from(key: &str) -> Self {
        ApiKey(key.to_owned())
    }
}

impl FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        Ok(ApiKey::from(key))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn only_the_exact_key_as_a_bearer_token_is_admitted() {
        let key = ApiKey::from("0123456789abcdef");
        assert!(key.admits(&headers(&["Bearer 0123456789abcdef"])));
        assert!(key.admits(&headers(&["bearer  0123456789abcdef "])));
        for refused in [
            &[][..],
            &["Bearer 0123456789abcde"],
            &["Bearer 0123456789abcdef0"],
            &["Bearer 0123456789abcdeF"],
            &["Basic 0123456789abcdef"],
            &["Bearer"],
            &["Bearer0123456789abcdef"],
            &["0123456789abcdef"],
            &["Bearer 0123456789abcdef", "Bearer 0123456789abcdef"],
        ] {
            assert!(!key.admits(&headers(refused)), "{refused:?}");
        }
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
    }
}
