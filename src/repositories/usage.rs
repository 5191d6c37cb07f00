//! Usage totals and time series on [`Events`], read from the hourly rollups
//! for whole hours and from raw events only for the partial hours at a
//! window's edges.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::db::database::on_backend;
use crate::db::sql::CachedSql;
use crate::error::{Error, Result};
use crate::model::key::KeyId;
use crate::model::time::{Timestamp, DAY_MS, HOUR_MS};
use crate::model::usage::{Bucket, GroupUsage, Totals, UsageFilter};
use crate::repositories::events::Events;
use crate::repositories::keys;
use crate::repositories::models;
use crate::repositories::rollups;

/// What usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grouping {
    Nothing,
    Model,
    Key,
    Time(Bucket),
}

/// Totals of one group, as the usage statements return them.
#[derive(QueryableByName)]
struct GroupRow {
    #[diesel(sql_type = BigInt)]
    grp: i64,
    #[diesel(embed)]
    totals: Totals,
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
        let names = self.db.read(models::names)?;
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
        let ids = self.db.read(|conn| keys::ids_of(conn, &rows))?;
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

    fn resolve_filter(&self, filter: &UsageFilter) -> Result<Option<Resolved>> {
        if filter.until < filter.since {
            return Err(Error::InvalidInput {
                field: "until",
                reason: format!("{} is before since ({})", filter.until, filter.since),
            });
        }
        // A model never seen has no usage.
        let Some((key_row, model_id)) = self.filter_ids(filter.key, filter.model.as_deref())?
        else {
            return Ok(None);
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
            let totals = {
                let mut pooled = self.db.connection()?;
                rollups::key_totals(&mut pooled.conn(), key_row, resolved.since, resolved.until)?
            };
            let mut grouped = BTreeMap::new();
            if totals.requests > 0 {
                grouped.insert(0, totals);
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
            let mut pooled = self.db.connection()?;
            on_backend!(&mut pooled.conn(), |c| query.load(c))?
        };
        let mut grouped: BTreeMap<i64, Totals> = BTreeMap::new();
        for row in rows {
            grouped.entry(row.grp).or_default().merge(&row.totals);
        }
        grouped.retain(|_, totals| totals.requests > 0);
        Ok(grouped)
    }
}

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
        // Without a grouping every row is one group, 0.
        let (group, group_by) = if grouping == Grouping::Nothing {
            ("0", "")
        } else {
            ("coalesce(grp, 0)", " GROUP BY grp")
        };
        let sql = format!(
            "SELECT CAST({group} AS BIGINT) AS grp, {} FROM ({}) AS parts{group_by}",
            rollups::totals_of_rows(),
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
        "SELECT {group} AS grp, {} FROM {table} WHERE hour >= ? AND hour < ?",
        rollups::column_list()
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
        "SELECT {group} AS grp, {} FROM events WHERE ts >= ? AND ts < ?",
        rollups::event_as_rollup_row()
    );
    Some(filtered_part(sql, resolved, since, until))
}
