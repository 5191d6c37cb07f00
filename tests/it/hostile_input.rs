//! Hostile input: arbitrary bytes for the secret parser and the JSON Lines
//! event parser never panic and never reach the database half-parsed;
//! oversized fields are rejected with a clear error.

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::TestStore;
use keytally::{Error, EventFilter, Rejection};
use proptest::prelude::*;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn event_count(store: &TestStore) -> Result<i64, Box<dyn std::error::Error>> {
    let mut conn = store.sqlite_connection()?;
    Ok(diesel::sql_query("SELECT count(*) AS n FROM events")
        .get_result::<Count>(&mut *conn)?
        .n)
}

/// A JSON value for a field: any of the types JSON has, in awkward sizes.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-5i64..5000).prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,40}".prop_map(serde_json::Value::from),
        "[a-z0-9_-]{1,300}".prop_map(serde_json::Value::from),
        Just(serde_json::json!("2026-11-21T10:00:00Z")),
        Just(serde_json::json!("0190f0f0-0000-7000-8000-000000000000")),
        Just(serde_json::json!([1, 2])),
    ]
}

const FIELDS: [&str; 17] = [
    "ts",
    "key_id",
    "model",
    "upstream_model",
    "request_id",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "status",
    "latency_ms",
    "error",
    "usage_unknown",
    "thinking_level",
    "surprise",
    "ts ",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_presented_secret_gets_a_verdict_without_panicking(
        text in ".{0,120}",
        near in "kt_[A-Za-z0-9]{49}",
    ) {
        let store = TestStore::new().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for presented in [text.as_str(), near.as_str()] {
            let verdict = store.keys().resolve(presented)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                matches!(verdict, Err(Rejection::Malformed | Rejection::Unknown)),
                "{presented:?} resolved to {verdict:?}"
            );
        }
    }

    #[test]
    fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let line = String::from_utf8_lossy(&bytes);
        let _ = keytally::parse_json_line(&line);
    }

    #[test]
    fn an_event_line_is_recorded_whole_or_not_at_all(
        fields in proptest::collection::btree_map(
            proptest::sample::select(&FIELDS[..]),
            json_value(),
            0..12,
        ),
        base_ok in any::<bool>(),
    ) {
        let store = TestStore::new().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut object = serde_json::Map::new();
        if base_ok {
            object.insert("ts".into(), serde_json::json!(1_790_000_000_000i64));
            object.insert("model".into(), serde_json::json!("m"));
            object.insert("status".into(), serde_json::json!(200));
        }
        for (field, value) in fields {
            object.insert(field.to_owned(), value);
        }
        let line = serde_json::Value::Object(object).to_string();
        let before = event_count(&store).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let recorded = keytally::parse_json_line(&line)
            .and_then(|event| store.events().record(&event).map(|id| (id, event)));
        let after = event_count(&store).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match recorded {
            Ok((id, event)) => {
                prop_assert_eq!(after, before + 1);
                let stored = store.events().list(&EventFilter::default())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let stored = stored.iter().find(|e| e.id == id).ok_or_else(|| TestCaseError::fail("missing"))?;
                prop_assert_eq!(stored.ts, event.ts);
                prop_assert_eq!(&stored.model, &event.model);
                prop_assert_eq!(stored.prompt_tokens, event.prompt_tokens);
                prop_assert_eq!(stored.status, event.status);
                prop_assert_eq!(&stored.request_id, &event.request_id);
                prop_assert_eq!(&stored.error, &event.error);
            }
            Err(error) => {
                prop_assert_eq!(after, before, "a rejected line wrote something: {}", error);
                prop_assert!(
                    matches!(error, Error::InvalidInput { .. } | Error::InvalidEvent { .. }),
                    "unexpected error {:?}", error
                );
            }
        }
    }
}

#[test]
fn oversized_fields_are_named_in_the_error() -> Result<(), Box<dyn std::error::Error>> {
    let store = TestStore::new()?;
    let cases = [
        ("model", format!("\"{}\"", "m".repeat(201))),
        ("request_id", format!("\"{}\"", "r".repeat(129))),
        ("error", format!("\"{}\"", "e".repeat(65))),
        ("thinking_level", format!("\"{}\"", "t".repeat(33))),
        ("prompt_tokens", "3000000000".to_owned()),
    ];
    for (field, value) in cases {
        let line =
            format!("{{\"ts\":1790000000000,\"model\":\"m\",\"status\":200,\"{field}\":{value}}}");
        let line = line.replacen("\"model\":\"m\",", "", usize::from(field == "model"));
        let event = keytally::parse_json_line(&line)?;
        match store.events().record(&event) {
            Err(Error::InvalidEvent { reason, .. }) => {
                assert!(reason.starts_with(field), "{field}: {reason}");
            }
            other => return Err(format!("{field}: {other:?}").into()),
        }
    }
    let huge = format!(
        "{{\"ts\":1790000000000,\"model\":\"m\",\"status\":200,\"request_id\":\"{}\"}}",
        "x".repeat(20_000)
    );
    assert!(matches!(
        keytally::parse_json_line(&huge),
        Err(Error::InvalidInput { field: "line", .. })
    ));
    assert_eq!(event_count(&store)?, 0);
    Ok(())
}
