//! Property tests: the client frame parser and the name validators never panic, whatever
//! they are given, and what they accept obeys the documented rules. (The `cargo fuzz` target
//! in `gateway/fuzz` explores the same functions with coverage guidance.)

mod rules;

use gateway::protocol::{RoomName, parse_client_frame, validate_display_name};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-z:._-]{0,70}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map("[a-z]{0,8}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Objects shaped like client frames: the known keys with plausible or hostile values.
fn frame_object() -> impl Strategy<Value = Map<String, Value>> {
    let kind = prop_oneof![
        Just("join"),
        Just("leave"),
        Just("message"),
        Just("ping"),
        Just("auth"),
        Just("presence"),
        Just("dance"),
    ]
    .prop_map(|kind| Value::String(kind.to_owned()));
    let field = |name: &'static str, value: BoxedStrategy<Value>| {
        proptest::option::of(value).prop_map(move |value| (name, value))
    };
    (
        field("type", prop_oneof![kind, json_value()].boxed()),
        field("room", json_value().boxed()),
        field("message", json_value().boxed()),
        field("ref", json_value().boxed()),
        field("token", json_value().boxed()),
        field("since", json_value().boxed()),
        field("last", json_value().boxed()),
        field("epoch", json_value().boxed()),
        field("presence", json_value().boxed()),
        field("userId", json_value().boxed()),
    )
        .prop_map(|fields| {
            let (a, b, c, d, e, f, g, h, i, j) = fields;
            [a, b, c, d, e, f, g, h, i, j]
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_owned(), value?)))
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_text_is_parsed_or_refused_without_panicking(text in any::<String>(), limit in 0usize..64) {
        if let Ok(frame) = parse_client_frame(&text, limit) {
            rules::check_accepted(&frame, limit);
        }
    }

    #[test]
    fn any_bytes_are_parsed_or_refused_without_panicking(bytes in vec(any::<u8>(), 0..256)) {
        let _ = parse_client_frame(&String::from_utf8_lossy(&bytes), 16);
    }

    #[test]
    fn any_json_is_parsed_or_refused_without_panicking(value in json_value(), limit in 0usize..64) {
        if let Ok(frame) = parse_client_frame(&value.to_string(), limit) {
            rules::check_accepted(&frame, limit);
        }
    }

    #[test]
    fn frame_shaped_objects_obey_the_rules_and_refusals_echo_ref(
        object in frame_object(),
        limit in 0usize..64,
    ) {
        let text = Value::Object(object).to_string();
        // What the server sees after the text round trip (floats may not survive it exactly).
        let reference = serde_json::from_str::<Value>(&text).unwrap().get("ref").cloned();
        let echoed = rules::echoed_ref(reference.clone());
        match parse_client_frame(&text, limit) {
            Ok(frame) => {
                prop_assert_eq!(&reference, &echoed, "a frame with an oversized ref was accepted");
                rules::check_accepted(&frame, limit)
            }
            Err(refusal) => {
                prop_assert_eq!(refusal.reference, echoed);
                prop_assert!(!refusal.reason.is_empty());
                prop_assert!(refusal.reason.len() < 512, "reasons stay short");
            }
        }
    }

    #[test]
    fn truncated_and_nested_input_never_panics(value in json_value(), cut in 0usize..200, depth in 0usize..300) {
        let text = value.to_string();
        let cut = text.char_indices().map(|(i, _)| i).find(|&i| i >= cut).unwrap_or(text.len());
        let _ = parse_client_frame(&text[..cut], 16);
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let _ = parse_client_frame(&nested, 16);
    }

    #[test]
    fn room_names_follow_the_documented_rule(name in prop_oneof![any::<String>(), "[A-Za-z0-9_.:-]{0,70}"]) {
        prop_assert_eq!(RoomName::parse(&name).is_ok(), rules::room_name_ok(&name));
    }

    #[test]
    fn display_names_follow_the_documented_rule(name in prop_oneof![any::<String>(), "\\PC{0,70}"]) {
        prop_assert_eq!(validate_display_name(&name).is_ok(), rules::display_name_ok(&name));
    }
}

#[test]
fn deeply_nested_json_is_refused_not_overflowed() {
    // serde_json stops at 128 levels; the parser must turn that into a refusal.
    for depth in [127, 128, 129, 10_000, 1_000_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_client_frame(&text, 16).is_err());
        let text = format!(
            r#"{{"type":"message","message":"x","ref":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let _ = parse_client_frame(&text, 16);
    }
}
