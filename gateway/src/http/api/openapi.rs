//! The OpenAPI 3.1 description of the server API (`openapi.json` beside this file), served at
//! `/api/openapi.json` with this node's own limits written in, so a client generated from it,
//! or a contract test run against it, expects what this node enforces.

use axum::body::Bytes;
use serde_json::Value;

use super::ApiSettings;

/// The document as shipped, with the default limits.
const DOCUMENT: &str = include_str!("openapi.json");

/// The document with `settings`' limits.
pub(super) fn render(settings: &ApiSettings) -> Bytes {
    let Ok(mut document) = serde_json::from_str::<Value>(DOCUMENT) else {
        // A test checks it parses; should it not, the shipped text is still the best answer.
        return Bytes::from_static(DOCUMENT.as_bytes());
    };
    let schemas = &mut document["components"]["schemas"];
    schemas["ChatText"]["maxLength"] = settings.max_chat_bytes.into();
    schemas["BroadcastRequest"]["properties"]["rooms"]["maxItems"] =
        settings.max_broadcast_rooms.into();
    match serde_json::to_vec(&document) {
        Ok(bytes) => Bytes::from(bytes),
        Err(_) => Bytes::from_static(DOCUMENT.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ApiSettings {
        ApiSettings {
            key: None,
            max_body_bytes: 1024,
            max_broadcast_rooms: 7,
            max_chat_bytes: 99,
        }
    }

    #[test]
    fn the_document_parses_and_carries_the_nodes_limits() {
        let document: Value = serde_json::from_slice(&render(&settings())).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let schemas = &document["components"]["schemas"];
        assert_eq!(schemas["ChatText"]["maxLength"], 99);
        assert_eq!(
            schemas["BroadcastRequest"]["properties"]["rooms"]["maxItems"],
            7
        );
    }

    /// Every route the router serves is described, and nothing else.
    #[test]
    fn the_document_describes_every_route() {
        let document: Value = serde_json::from_str(DOCUMENT).unwrap();
        let mut described: Vec<String> = Vec::new();
        for (path, methods) in document["paths"].as_object().unwrap() {
            for method in methods.as_object().unwrap().keys() {
                described.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        described.sort();
        let mut served = super::super::ROUTES
            .iter()
            .map(|(method, path)| format!("{method} /api{path}"))
            .collect::<Vec<_>>();
        served.sort();
        assert_eq!(described, served);
    }
}
