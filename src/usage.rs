//! Usage totals and time series, read from the hourly rollups for whole
//! hours and from raw events only for the partial hours at a window's edges.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::events::{model_names, Events};
use crate::keys::{self, KeyId};
use crate::sql::{sql_text, CachedSql, FixedSql, Value};
use crate::time::{Timestamp, HOUR_MS};

const DAY_MS: i64 = 24 * HOUR_MS;

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

/// Usage totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Totals {
    /// Requests.
    pub requests: i64,
    /// Requests with a status of 400 or more, or an error tag.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Cache-read tokens.
    pub cache_read_tokens: i64,
    /// Cache-creation tokens.
    pub cache_creation_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Sum of latencies, in milliseconds.
    pub latency_ms_sum: i64,
    /// Largest latency, in milliseconds (0 without requests).
    pub latency_ms_max: i64,
}

impl Totals {
    /// Mean latency in milliseconds, if there were requests.
    pub fn latency_ms_mean(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.latency_ms_sum as f64 / self.requests as f64)
    }

    fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_creation_tokens += other.cache_creation_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.latency_ms_sum += other.latency_ms_sum;
        self.latency_ms_max = self.latency_ms_max.max(other.latency_ms_max);
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

/// What usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grouping {
    Nothing,
    Model,
    Key,
    Time(Bucket),
}

/// Usage of one group: a model, a key, or a time bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupUsage<G> {
    /// The group.
    pub group: G,
    /// Its totals.
    pub totals: Totals,
}

#[derive(QueryableByName)]
struct GroupRow {
    #[diesel(sql_type = BigInt)]
    grp: i64,
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    prompt_tokens: i64,
    #[diesel(sql_type = BigInt)]
    completion_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cache_read_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cache_creation_tokens: i64,
    #[diesel(sql_type = BigInt)]
    reasoning_tokens: i64,
    #[diesel(sql_type = BigInt)]
    latency_ms_sum: i64,
    #[diesel(sql_type = BigInt)]
    latency_ms_max: i64,
}

impl GroupRow {
    fn totals(&self) -> Totals {
        Totals {
            requests: self.requests,
            errors: self.errors,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
            reasoning_tokens: self.reasoning_tokens,
            latency_ms_sum: self.latency_ms_sum,
            latency_ms_max: self.latency_ms_max,
        }
    }
}

/// A filter with its key and model resolved to row ids.
struct Resolved {
    key_row: Option<i64>,
    model_id: Option<i64>,
    since: i64,
    until: i64,
}

impl<'a> Events<'a> {
    /// Usage totals for the filter's window.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `until` is before `since`,
    /// [`Error::KeyNotFound`] for an unknown key, or the store's errors.
    pub fn usage(&self, filter: &UsageFilter) -> Result<Totals> {
        Ok(self
            .grouped(filter, Grouping::Nothing)?
            .into_values()
            .next()
            .unwrap_or_default())
    }

    /// Usage per model over the window, largest request count first.
    ///
    /// # Errors
    ///
    /// As [`Events::usage`].
    pub fn usage_by_model(&self, filter: &UsageFilter) -> Result<Vec<GroupUsage<String>>> {
        let grouped = self.grouped(filter, Grouping::Model)?;
        let names = self.store_read(model_names)?;
        let mut usage: Vec<GroupUsage<String>> = grouped
            .into_iter()
            .map(|(model_id, totals)| GroupUsage {
                group: names
                    .get(&model_id)
                    .cloned()
                    .unwrap_or_else(|| format!("(model {model_id})")),
                totals,
            })
            .collect();
        sort_largest_first(&mut usage);
        Ok(usage)
    }

    /// Usage per key over the window (`None` for unauthenticated requests),
    /// largest request count first.
    ///
    /// # Errors
    ///
    /// As [`Events::usage`].
    pub fn usage_by_key(&self, filter: &UsageFilter) -> Result<Vec<GroupUsage<Option<KeyId>>>> {
        let grouped = self.grouped(filter, Grouping::Key)?;
        let rows: Vec<i64> = grouped.keys().copied().filter(|row| *row != 0).collect();
        let ids = self.store_read(|conn| keys::ids_of(conn, &rows))?;
        let mut usage: Vec<GroupUsage<Option<KeyId>>> = grouped
            .into_iter()
            .map(|(row, totals)| GroupUsage {
                group: ids.get(&row).copied(),
                totals,
            })
            .collect();
        sort_largest_first(&mut usage);
        Ok(usage)
    }

    /// Usage as a time series: one entry per bucket that has requests,
    /// oldest first, each named by its start.
    ///
    /// # Errors
    ///
    /// As [`Events::usage`].
    pub fn usage_series(
        &self,
        filter: &UsageFilter,
        bucket: Bucket,
    ) -> Result<Vec<GroupUsage<Timestamp>>> {
        Ok(self
            .grouped(filter, Grouping::Time(bucket))?
            .into_iter()
            .map(|(start, totals)| GroupUsage {
                group: Timestamp::from_stored(start),
                totals,
            })
            .collect())
    }

    fn store_read<T>(&self, f: impl FnOnce(&mut SqliteConnection) -> Result<T>) -> Result<T> {
        self.store().read(f)
    }

    fn resolve_filter(&self, filter: &UsageFilter) -> Result<Option<Resolved>> {
        if filter.until < filter.since {
            return Err(Error::InvalidInput {
                field: "until",
                reason: format!("{} is before since ({})", filter.until, filter.since),
            });
        }
        let key_row = filter
            .key
            .map(|key| self.key_row_for_query(key))
            .transpose()?;
        let model_id = match &filter.model {
            None => None,
            Some(model) => match self.existing_model_id(model)? {
                Some(id) => Some(id),
                // A model never seen has no usage.
                None => return Ok(None),
            },
        };
        Ok(Some(Resolved {
            key_row,
            model_id,
            since: filter.since.as_millis(),
            until: filter.until.as_millis(),
        }))
    }

    /// Totals per group: whole hours from the rollups, the partial hours at
    /// either edge from raw events. One compound statement reads all the
    /// parts, so they come from one snapshot without a transaction around
    /// them.
    fn grouped(&self, filter: &UsageFilter, grouping: Grouping) -> Result<BTreeMap<i64, Totals>> {
        let Some(resolved) = self.resolve_filter(filter)? else {
            return Ok(BTreeMap::new());
        };
        let first_whole_hour =
            resolved.since.div_euclid(HOUR_MS) + i64::from(resolved.since.rem_euclid(HOUR_MS) != 0);
        let end_whole_hour = resolved.until.div_euclid(HOUR_MS);
        if let (Grouping::Nothing, Some(key_row), None) =
            (grouping, resolved.key_row, resolved.model_id)
        {
            // One key's totals: the dashboard's question, asked most often.
            let (rollup, left, right) = if first_whole_hour < end_whole_hour {
                (
                    (first_whole_hour, end_whole_hour),
                    (resolved.since, first_whole_hour * HOUR_MS),
                    (end_whole_hour * HOUR_MS, resolved.until),
                )
            } else {
                ((0, 0), (resolved.since, resolved.until), (0, 0))
            };
            let values = [
                key_row, rollup.0, rollup.1, key_row, left.0, left.1, key_row, right.0, right.1,
            ]
            .map(Value::Int)
            .to_vec();
            let row: GroupRow = {
                let mut conn = self.store().connection()?;
                FixedSql::<KeyWindowTotals>::new(values).get_result(&mut *conn)?
            };
            let mut grouped = BTreeMap::new();
            if row.requests > 0 {
                grouped.insert(0, row.totals());
            }
            return Ok(grouped);
        }
        let mut query = Compound::default();
        if first_whole_hour < end_whole_hour {
            query.add(rollup_part(
                &resolved,
                grouping,
                first_whole_hour,
                end_whole_hour,
            ));
            query.add(raw_part(
                &resolved,
                grouping,
                resolved.since,
                first_whole_hour * HOUR_MS,
            ));
            query.add(raw_part(
                &resolved,
                grouping,
                end_whole_hour * HOUR_MS,
                resolved.until,
            ));
        } else {
            query.add(raw_part(
                &resolved,
                grouping,
                resolved.since,
                resolved.until,
            ));
        }
        let Some(query) = query.finish(grouping) else {
            return Ok(BTreeMap::new());
        };
        let rows: Vec<GroupRow> = {
            let mut conn = self.store().connection()?;
            query.load(&mut *conn)?
        };
        let mut grouped: BTreeMap<i64, Totals> = BTreeMap::new();
        for row in rows {
            grouped.entry(row.grp).or_default().merge(&row.totals());
        }
        grouped.retain(|_, totals| totals.requests > 0);
        Ok(grouped)
    }
}

/// The sums over the rows of a `UNION ALL` of rollup rows and events.
macro_rules! totals_over {
    ($parts:expr) => {
        concat!(
            "SELECT 0 AS grp, coalesce(sum(requests), 0) AS requests, ",
            "coalesce(sum(errors), 0) AS errors, ",
            "coalesce(sum(prompt_tokens), 0) AS prompt_tokens, ",
            "coalesce(sum(completion_tokens), 0) AS completion_tokens, ",
            "coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens, ",
            "coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens, ",
            "coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, ",
            "coalesce(sum(latency_ms_sum), 0) AS latency_ms_sum, ",
            "coalesce(max(latency_ms_max), 0) AS latency_ms_max FROM (",
            $parts,
            ")"
        )
    };
}

/// One event as a rollup row, for the `UNION ALL` parts.
macro_rules! event_as_rollup_row {
    () => {
        concat!(
            "SELECT 1 AS requests, (status >= 400 OR error IS NOT NULL) AS errors, ",
            "prompt_tokens, completion_tokens, cache_read_tokens, cache_creation_tokens, ",
            "reasoning_tokens, latency_ms AS latency_ms_sum, latency_ms AS latency_ms_max ",
            "FROM events"
        )
    };
}

sql_text!(
    /// One key's totals: whole hours `[?, ?)` from its rollups, and the two
    /// edges from its raw events (an edge not needed is an empty window).
    /// Written out once so Diesel keeps it prepared by type.
    KeyWindowTotals = totals_over!(concat!(
        "SELECT requests, errors, prompt_tokens, completion_tokens, cache_read_tokens, ",
        "cache_creation_tokens, reasoning_tokens, latency_ms_sum, latency_ms_max ",
        "FROM usage_key_hourly WHERE key_row_id = ? AND hour >= ? AND hour < ? UNION ALL ",
        event_as_rollup_row!(),
        " WHERE key_row_id = ? AND ts >= ? AND ts < ? UNION ALL ",
        event_as_rollup_row!(),
        " WHERE key_row_id = ? AND ts >= ? AND ts < ?"
    ))
);

/// The parts of a `UNION ALL`, each a `SELECT` of rollup-shaped rows with
/// its values.
#[derive(Default)]
struct Compound {
    sql: String,
    binds: Vec<i64>,
}

impl Compound {
    fn add(&mut self, part: Option<(String, Vec<i64>)>) {
        let Some((sql, binds)) = part else {
            return;
        };
        if !self.sql.is_empty() {
            self.sql.push_str(" UNION ALL ");
        }
        self.sql.push_str(&sql);
        self.binds.extend(binds);
    }

    /// Totals the parts' rows per group, in SQL: one row per group (one
    /// row in all without a grouping) comes back.
    fn finish(self, grouping: Grouping) -> Option<CachedSql> {
        if self.sql.is_empty() {
            return None;
        }
        let group_by = if grouping == Grouping::Nothing {
            ""
        } else {
            " GROUP BY grp"
        };
        let sql = format!(
            "SELECT coalesce(grp, 0) AS grp, coalesce(sum(requests), 0) AS requests, \
             coalesce(sum(errors), 0) AS errors, \
             coalesce(sum(prompt_tokens), 0) AS prompt_tokens, \
             coalesce(sum(completion_tokens), 0) AS completion_tokens, \
             coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens, \
             coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens, \
             coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens, \
             coalesce(sum(latency_ms_sum), 0) AS latency_ms_sum, \
             coalesce(max(latency_ms_max), 0) AS latency_ms_max \
             FROM ({}){group_by}",
            self.sql
        );
        Some(CachedSql::new(sql, self.binds))
    }
}

/// Largest request count first; ties in the groups' own order.
fn sort_largest_first<G: Ord>(usage: &mut [GroupUsage<G>]) {
    usage.sort_by(|a, b| {
        b.totals
            .requests
            .cmp(&a.totals.requests)
            .then(a.group.cmp(&b.group))
    });
}

fn rollup_part(
    resolved: &Resolved,
    grouping: Grouping,
    from_hour: i64,
    to_hour: i64,
) -> Option<(String, Vec<i64>)> {
    let by_key = resolved.key_row.is_some() || grouping == Grouping::Key;
    let table = if by_key {
        "usage_key_hourly"
    } else {
        "usage_model_hourly"
    };
    let group = match grouping {
        Grouping::Nothing => "0".to_owned(),
        Grouping::Model => "model_id".to_owned(),
        Grouping::Key => "key_row_id".to_owned(),
        Grouping::Time(Bucket::Hour) => format!("hour * {HOUR_MS}"),
        Grouping::Time(Bucket::Day) => format!("(hour / 24) * {DAY_MS}"),
    };
    let sql = format!(
        "SELECT {group} AS grp, requests, errors, prompt_tokens, completion_tokens, \
         cache_read_tokens, cache_creation_tokens, reasoning_tokens, latency_ms_sum, \
         latency_ms_max \
         FROM {table} WHERE hour >= ? AND hour < ?"
    );
    Some(filtered_part(sql, resolved, from_hour, to_hour))
}

/// Adds the key and model filters to `sql` (which ends in a WHERE clause
/// with the window's two placeholders), with its values.
fn filtered_part(mut sql: String, resolved: &Resolved, from: i64, to: i64) -> (String, Vec<i64>) {
    if resolved.key_row.is_some() {
        sql.push_str(" AND key_row_id = ?");
    }
    if resolved.model_id.is_some() {
        sql.push_str(" AND model_id = ?");
    }
    let mut binds = vec![from, to];
    binds.extend(resolved.key_row);
    binds.extend(resolved.model_id);
    (sql, binds)
}

fn raw_part(
    resolved: &Resolved,
    grouping: Grouping,
    since: i64,
    until: i64,
) -> Option<(String, Vec<i64>)> {
    if since >= until {
        return None;
    }
    let group = match grouping {
        Grouping::Nothing => "0".to_owned(),
        Grouping::Model => "model_id".to_owned(),
        Grouping::Key => "coalesce(key_row_id, 0)".to_owned(),
        Grouping::Time(Bucket::Hour) => format!("(ts / {HOUR_MS}) * {HOUR_MS}"),
        Grouping::Time(Bucket::Day) => format!("(ts / {DAY_MS}) * {DAY_MS}"),
    };
    let sql = format!(
        "SELECT {group} AS grp, 1 AS requests, \
         (status >= 400 OR error IS NOT NULL) AS errors, prompt_tokens, completion_tokens, \
         cache_read_tokens, cache_creation_tokens, reasoning_tokens, \
         latency_ms AS latency_ms_sum, latency_ms AS latency_ms_max \
         FROM events WHERE ts >= ? AND ts < ?"
    );
    Some(filtered_part(sql, resolved, since, until))
}
