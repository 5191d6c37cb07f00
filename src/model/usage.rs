//! Usage as values: what to total over which window, the totals, and their
//! groups.

use diesel::sql_types::BigInt;
use diesel::QueryableByName;
use serde::Serialize;

use crate::model::event::NewEvent;
use crate::model::key::KeyId;
use crate::model::price::Cost;
use crate::model::time::Timestamp;

/// Which usage to total, over which window (`since` included, `until` not).
#[derive(Debug, Clone)]
pub struct UsageFilter {
    /// Only this key's usage.
    pub key: Option<KeyId>,
    /// Only this (requested) model's usage.
    pub model: Option<String>,
    /// The window's start, included.
    pub since: Timestamp,
    /// The window's end, excluded.
    pub until: Timestamp,
}

impl UsageFilter {
    /// All usage in `[since, until)`.
    pub fn between(since: Timestamp, until: Timestamp) -> UsageFilter {
        UsageFilter {
            key: None,
            model: None,
            since,
            until,
        }
    }
}

/// Usage totals: what an hourly rollup row holds, and what a usage query
/// adds up. The fields are the rollup tables' columns, in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, QueryableByName)]
pub struct Totals {
    /// Requests.
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    /// Requests with a status of 400 or more, or an error tag.
    #[diesel(sql_type = BigInt)]
    pub errors: i64,
    /// Prompt tokens.
    #[diesel(sql_type = BigInt)]
    pub prompt_tokens: i64,
    /// Completion tokens.
    #[diesel(sql_type = BigInt)]
    pub completion_tokens: i64,
    /// Cache-read tokens.
    #[diesel(sql_type = BigInt)]
    pub cache_read_tokens: i64,
    /// Cache-creation tokens.
    #[diesel(sql_type = BigInt)]
    pub cache_creation_tokens: i64,
    /// Reasoning tokens.
    #[diesel(sql_type = BigInt)]
    pub reasoning_tokens: i64,
    /// Sum of latencies, in milliseconds.
    #[diesel(sql_type = BigInt)]
    pub latency_ms_sum: i64,
    /// Largest latency, in milliseconds (0 without requests).
    #[diesel(sql_type = BigInt)]
    pub latency_ms_max: i64,
    /// What the priced requests cost, in nano-units of the operator's
    /// currency ([`Totals::cost`]).
    #[diesel(sql_type = BigInt)]
    pub cost_nanos: i64,
    /// Requests whose model had no price at their time: counted, not free.
    #[diesel(sql_type = BigInt)]
    pub unpriced_requests: i64,
}

impl Totals {
    /// Mean latency in milliseconds, if there were requests.
    pub fn latency_ms_mean(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.latency_ms_sum as f64 / self.requests as f64)
    }

    /// What the priced requests cost.
    pub fn cost(&self) -> Cost {
        Cost(self.cost_nanos)
    }

    /// Adds one event, as a rollup row counts it, with its cost (`None`
    /// when its model had no price).
    pub(crate) fn add_event(&mut self, event: &NewEvent, cost: Option<Cost>) {
        self.merge(&Totals {
            requests: 1,
            errors: i64::from(event.is_error()),
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            cache_read_tokens: event.cache_read_tokens,
            cache_creation_tokens: event.cache_creation_tokens,
            reasoning_tokens: event.reasoning_tokens,
            latency_ms_sum: event.latency_ms,
            latency_ms_max: event.latency_ms,
            cost_nanos: cost.map_or(0, Cost::nanos),
            unpriced_requests: i64::from(cost.is_none()),
        });
    }

    /// Adds `other`: sums, stopping at the largest integer as the rollup
    /// tables do (one event's cost may be near it), and the larger maximum.
    pub(crate) fn merge(&mut self, other: &Totals) {
        let sum = i64::saturating_add;
        self.requests = sum(self.requests, other.requests);
        self.errors = sum(self.errors, other.errors);
        self.prompt_tokens = sum(self.prompt_tokens, other.prompt_tokens);
        self.completion_tokens = sum(self.completion_tokens, other.completion_tokens);
        self.cache_read_tokens = sum(self.cache_read_tokens, other.cache_read_tokens);
        self.cache_creation_tokens = sum(self.cache_creation_tokens, other.cache_creation_tokens);
        self.reasoning_tokens = sum(self.reasoning_tokens, other.reasoning_tokens);
        self.latency_ms_sum = sum(self.latency_ms_sum, other.latency_ms_sum);
        self.latency_ms_max = self.latency_ms_max.max(other.latency_ms_max);
        self.cost_nanos = sum(self.cost_nanos, other.cost_nanos);
        self.unpriced_requests = sum(self.unpriced_requests, other.unpriced_requests);
    }

    /// The values in the rollup tables' column order.
    pub(crate) fn values(&self) -> [i64; 11] {
        [
            self.requests,
            self.errors,
            self.prompt_tokens,
            self.completion_tokens,
            self.cache_read_tokens,
            self.cache_creation_tokens,
            self.reasoning_tokens,
            self.latency_ms_sum,
            self.latency_ms_max,
            self.cost_nanos,
            self.unpriced_requests,
        ]
    }
}

/// The size of a time-series bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
}

/// Usage of one group: a model, a key, or a time bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupUsage<G> {
    /// The group.
    pub group: G,
    /// Its totals.
    pub totals: Totals,
}
