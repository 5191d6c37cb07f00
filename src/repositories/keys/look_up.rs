//! What resolving a secret reads from the database: the key, its secret,
//! its budget's standing ([`look_up`]), and the count of key changes that
//! the cache is trusted under ([`key_changes`]).

use diesel::prelude::*;

use crate::db::database::{on_backend, Conn};
use crate::db::schema::{key_budgets, key_secrets, keys, sequences};
use crate::db::sql::{sql_text, FixedSql};
use crate::error::{Error, Result};
use crate::model::key::{AllowedModels, KeyId, Tier};
use crate::model::time::Timestamp;
use crate::repositories::budgets::BudgetRow;
use crate::repositories::keys::cache::KeyCache;

/// The name of the count of key changes in `sequences`; see
/// [`crate::repositories::keys::cache`].
const KEY_CHANGES: &str = "key_changes";

sql_text!(
    /// The database's count of key changes. A constant statement kept
    /// prepared by type: no value to bind on the hot path of a resolve.
    KeyChangeCount = "SELECT next AS value FROM sequences WHERE name = 'key_changes'"
);

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    value: i64,
}

/// The database's count of key changes, read in its own read transaction.
pub(crate) fn key_changes(conn: &mut Conn<'_>) -> Result<i64> {
    Ok(
        on_backend!(conn, |c| FixedSql::<KeyChangeCount>::new(Vec::new())
            .get_result::<CountRow>(c)
            .optional())?
        .ok_or_else(|| Error::BadStoredValue {
            message: "the count of key changes is missing from the sequences table".to_owned(),
        })?
        .value,
    )
}

/// What resolving a secret reads: the key's row id, id, tier, allowed
/// models, rate limit, expiry and revocation, the secret's end of grace,
/// and until when the key is over its budget.
pub(crate) type Resolved = (
    i64,
    KeyId,
    Tier,
    AllowedModels,
    Option<i64>,
    Option<Timestamp>,
    Option<Timestamp>,
    Option<Timestamp>,
    Option<Timestamp>,
);

/// Reads what resolving the secret with this hash returns, with the count
/// of key changes in the same statement, and keeps it in `cache`.
pub(crate) fn look_up(
    conn: &mut Conn<'_>,
    cache: &KeyCache<Resolved>,
    hash: &[u8; 32],
) -> Result<Option<Resolved>> {
    type Found = (
        Option<i64>,
        (
            i64,
            KeyId,
            Tier,
            AllowedModels,
            Option<i64>,
            Option<Timestamp>,
            Option<Timestamp>,
            Option<Timestamp>,
        ),
        Option<BudgetRow>,
    );
    let found: Option<Found> = on_backend!(conn, |c| key_secrets::table
        .inner_join(keys::table.left_join(key_budgets::table))
        .left_join(sequences::table.on(sequences::name.eq(KEY_CHANGES)))
        .filter(key_secrets::secret_hash.eq(&hash[..]))
        .select((
            sequences::next.nullable(),
            (
                keys::row_id,
                keys::id,
                keys::tier,
                keys::allowed_models,
                keys::rate_limit_override,
                keys::expires_at,
                keys::revoked_at,
                key_secrets::valid_until,
            ),
            key_budgets::all_columns.nullable(),
        ))
        // `get_result`, not `first`: `first` binds LIMIT as a parameter,
        // which makes SQLite re-prepare the statement on every call.
        .get_result(c)
        .optional())?;
    let Some((changes, (row_id, id, tier, models, rate, expires, revoked, until), budget)) = found
    else {
        return Ok(None);
    };
    let over_budget_until = budget.and_then(|budget| budget.refused_until());
    let row = (
        row_id,
        id,
        tier,
        models,
        rate,
        expires,
        revoked,
        until,
        over_budget_until,
    );
    if let Some(changes) = changes {
        cache.put(changes, *hash, row.clone());
    }
    Ok(Some(row))
}
