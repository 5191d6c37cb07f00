//! Usage events as values: one proxied request ([`NewEvent`]), the same
//! with its id once recorded ([`Event`]), listing filters, and the rules an
//! event's fields follow.

use std::fmt;
use std::ops::Deref;

use diesel::deserialize::FromSqlRow;
use diesel::expression::AsExpression;
use diesel::sql_types::BigInt;
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::invalid::Invalid;
use crate::model::key::{validate_model_name, KeyId};
use crate::model::time::Timestamp;

/// The default number of events deleted per transaction by a prune.
pub const DEFAULT_PRUNE_BATCH: u32 = 1_000;
/// The default retention of raw events: 60 days.
pub const DEFAULT_RAW_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(60 * 24 * 3600);
/// The longest error tag accepted, in bytes.
pub const MAX_ERROR_TAG_LEN: usize = 64;
/// The longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// The longest thinking level accepted, in bytes.
pub const MAX_THINKING_LEVEL_LEN: usize = 32;
/// The most events one batch may hold.
pub const MAX_BATCH_LEN: usize = 100_000;

/// An event's id. Ids grow with every event recorded.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow, Serialize,
)]
#[diesel(sql_type = BigInt)]
#[serde(transparent)]
pub struct EventId(pub(crate) i64);

impl EventId {
    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One proxied request, to record. This is the one shape of an event's
/// fields: a recorded [`Event`] is this with an id, and a line of
/// `keytally events ingest` is this as JSON (`ts` as RFC 3339 or Unix
/// milliseconds; `ts`, `model` and `status` required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object of event fields")]
pub struct NewEvent {
    /// When the request happened.
    #[serde(deserialize_with = "time_or_millis")]
    pub ts: Timestamp,
    /// The key that made it; `None` for an unauthenticated request.
    #[serde(default)]
    pub key_id: Option<KeyId>,
    /// The model as requested.
    pub model: String,
    /// The model after aliasing, when it differs.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// The gateway's request id, to match traces to events.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: i64,
    /// Completion tokens.
    #[serde(default)]
    pub completion_tokens: i64,
    /// Prompt tokens read from cache.
    #[serde(default)]
    pub cache_read_tokens: i64,
    /// Prompt tokens written to cache.
    #[serde(default)]
    pub cache_creation_tokens: i64,
    /// Reasoning tokens.
    #[serde(default)]
    pub reasoning_tokens: i64,
    /// The HTTP status returned.
    pub status: i64,
    /// Time to the full response, in milliseconds.
    #[serde(default)]
    pub latency_ms: i64,
    /// A short error tag such as `rate_limited`; never a body.
    #[serde(default)]
    pub error: Option<String>,
    /// The upstream did not report usage; the token counts are estimates.
    #[serde(default)]
    pub usage_unknown: bool,
    /// The reasoning effort asked for, such as `high`.
    #[serde(default)]
    pub thinking_level: Option<String>,
}

impl NewEvent {
    /// The five token counts in the order prices list them: prompt,
    /// completion, cache read, cache creation, reasoning.
    pub fn token_counts(&self) -> [i64; 5] {
        [
            self.prompt_tokens,
            self.completion_tokens,
            self.cache_read_tokens,
            self.cache_creation_tokens,
            self.reasoning_tokens,
        ]
    }

    /// A successful (status 200) event for `model` at `ts`, with zero tokens
    /// and latency; set the other fields as needed.
    pub fn new(ts: Timestamp, model: impl Into<String>) -> NewEvent {
        NewEvent {
            ts,
            key_id: None,
            model: model.into(),
            upstream_model: None,
            request_id: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cache_read_tokens: 0,
            cache_creation_tokens: 0,
            reasoning_tokens: 0,
            status: 200,
            latency_ms: 0,
            error: None,
            usage_unknown: false,
            thinking_level: None,
        }
    }

    /// Whether the event counts as an error in usage totals: a status of 400
    /// or more, or an error tag.
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error.is_some()
    }

    /// Checks every field against its rules (the key and model names are
    /// resolved by the repository): the counts fit a 32-bit column and are
    /// not negative, the status is 0 to 999, the names and tags are short and
    /// printable.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        for (field, value) in [
            ("prompt_tokens", self.prompt_tokens),
            ("completion_tokens", self.completion_tokens),
            ("cache_read_tokens", self.cache_read_tokens),
            ("cache_creation_tokens", self.cache_creation_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
            ("latency_ms", self.latency_ms),
        ] {
            if !(0..=i64::from(i32::MAX)).contains(&value) {
                return Err(Invalid::new(
                    field,
                    format!("{value} is not between 0 and 2147483647"),
                ));
            }
        }
        if !(0..=999).contains(&self.status) {
            return Err(Invalid::new(
                "status",
                format!("{} is not between 0 and 999", self.status),
            ));
        }
        validate_model_name(&self.model).map_err(|reason| Invalid::new("model", reason))?;
        if let Some(upstream) = &self.upstream_model {
            validate_model_name(upstream)
                .map_err(|reason| Invalid::new("upstream_model", reason))?;
        }
        validate_tag("error", self.error.as_deref(), MAX_ERROR_TAG_LEN)?;
        validate_tag(
            "thinking_level",
            self.thinking_level.as_deref(),
            MAX_THINKING_LEVEL_LEN,
        )?;
        if let Some(request_id) = &self.request_id {
            if request_id.is_empty()
                || request_id.len() > MAX_REQUEST_ID_LEN
                || request_id.chars().any(char::is_control)
            {
                return Err(Invalid::new(
                    "request_id",
                    format!("must be 1 to {MAX_REQUEST_ID_LEN} bytes without control characters"),
                ));
            }
        }
        Ok(())
    }
}

/// A recorded event: its id and its fields. It dereferences to the
/// [`NewEvent`] it was recorded from, so `event.model` reads as before, and
/// serializes as one flat object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Its id.
    pub id: EventId,
    /// What it cost, fixed when it was recorded with the price of its
    /// model in force at its time; `None` if there was none.
    #[serde(rename = "cost")]
    pub cost: Option<crate::model::price::Cost>,
    /// What was recorded.
    #[serde(flatten)]
    pub event: NewEvent,
}

impl Deref for Event {
    type Target = NewEvent;

    fn deref(&self) -> &NewEvent {
        &self.event
    }
}

impl Event {
    /// The cursor that continues a listing after this event.
    pub fn cursor(&self) -> EventCursor {
        EventCursor {
            ts: self.event.ts,
            id: self.id,
        }
    }
}

/// Filters and page for `Events::list`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this key's events.
    pub key: Option<KeyId>,
    /// Only events for this (requested) model.
    pub model: Option<String>,
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events with this status.
    pub status: Option<i64>,
    /// Keyset pagination: only events older than this one (the last of the
    /// previous page), in the newest-first order.
    pub before: Option<EventCursor>,
    /// Page size; default 100, at most 10,000.
    pub limit: Option<u32>,
}

/// A position in the newest-first order of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventCursor {
    /// The event's time.
    pub ts: Timestamp,
    /// The event's id.
    pub id: EventId,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PruneReport {
    /// Raw events deleted.
    pub events_deleted: u64,
    /// Transactions used (each held the write lock for one batch only).
    pub batches: u64,
}

fn validate_tag(field: &'static str, value: Option<&str>, max_len: usize) -> Result<(), Invalid> {
    match value {
        Some(tag)
            if tag.is_empty()
                || tag.len() > max_len
                || !tag.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(Invalid::new(
                field,
                format!("must be a short tag: 1 to {max_len} visible ASCII characters, no spaces"),
            ))
        }
        _ => Ok(()),
    }
}

/// Reads `ts` as integer Unix milliseconds or RFC 3339 text.
fn time_or_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TimeField {
        Millis(i64),
        Text(String),
    }
    match TimeField::deserialize(deserializer)? {
        TimeField::Millis(millis) => Timestamp::from_millis(millis),
        TimeField::Text(text) => Timestamp::parse(&text),
    }
    .map_err(serde::de::Error::custom)
}
