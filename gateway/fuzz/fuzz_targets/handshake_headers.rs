//! The handshake headers an attacker controls before any check has passed: `Origin`, `Host`,
//! `X-Forwarded-For` and `Sec-WebSocket-Protocol` (which may carry a token), plus the
//! allowlist and proxy range parsers. None of it may panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use axum::http::{HeaderMap, HeaderValue, header};
use gateway::security::auth::handshake_token;
use gateway::security::limits::{TrustedProxies, parse_net};
use gateway::security::origin::{AllowedOrigin, OriginPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Four header values separated by NUL bytes (which headers cannot contain).
    let mut parts = data.split(|b| *b == 0);
    let mut next = || parts.next().unwrap_or_default();
    let (origin, host, forwarded, protocol) = (next(), next(), next(), next());

    let mut headers = HeaderMap::new();
    for (name, value) in [
        (header::ORIGIN, origin),
        (header::HOST, host),
        (
            header::HeaderName::from_static("x-forwarded-for"),
            forwarded,
        ),
        (header::SEC_WEBSOCKET_PROTOCOL, protocol),
    ] {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }

    let text = String::from_utf8_lossy(origin);
    let allowed: Vec<AllowedOrigin> = text
        .split(',')
        .filter_map(|entry| entry.parse().ok())
        .collect();
    for authenticated in [false, true] {
        for scheme in ["http", "https"] {
            let _ = OriginPolicy::new(&allowed, authenticated).allows(&headers, scheme);
        }
    }
    let _ = OriginPolicy::new(&[], true).allows(&headers, "http");

    let ranges = String::from_utf8_lossy(host)
        .split(',')
        .filter_map(|range| parse_net(range).ok())
        .collect();
    let everyone = TrustedProxies::new(vec![
        parse_net("0.0.0.0/0").unwrap(),
        parse_net("::/0").unwrap(),
    ]);
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let _ = everyone.client_ip(peer, &headers);
    let _ = TrustedProxies::new(ranges).client_ip(peer, &headers);

    if let Some(token) = handshake_token(&headers, None) {
        assert!(!token.is_empty());
    }
});
