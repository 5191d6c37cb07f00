//! What resolving a secret reads from the database: the key and its secret
//! ([`look_up`]), and the count of key changes that the cache is trusted
//! under ([`key_changes`]).

use diesel::prelude::*;

use crate::db::database::{on_backend, Conn};
use crate::db::schema::{key_secrets, keys, sequences};
use crate::db::sql::{sql_text, FixedSql};
use crate::error::{Error, Result};
use crate::model::key::{AllowedModels, KeyId, Tier};
use crate::model::time::Timestamp;
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

/// What resolving a secret reads of its key, and the secret's end of
/// grace.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct KeyOfSecret {
    pub(crate) row_id: i64,
    pub(crate) id: KeyId,
    pub(crate) tier: Tier,
    pub(crate) allowed_models: AllowedModels,
    pub(crate) rate_limit_override: Option<i64>,
    pub(crate) expires_at: Option<Timestamp>,
    pub(crate) revoked_at: Option<Timestamp>,
    pub(crate) valid_until: Option<Timestamp>,
    /// The end of the budget period in which the key's spend reached its
    /// budget (see [`crate::repositories::budgets`]).
    pub(crate) over_budget_until: Option<Timestamp>,
}

/// Reads what resolving the secret with this hash returns, with the count
/// of key changes in the same statement, and keeps it in `cache`.
pub(crate) fn look_up(
    conn: &mut Conn<'_>,
    cache: &KeyCache<KeyOfSecret>,
    hash: &[u8; 32],
) -> Result<Option<KeyOfSecret>> {
    let found: Option<(Option<i64>, KeyOfSecret)> = on_backend!(conn, |c| key_secrets::table
        .inner_join(keys::table)
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
                keys::over_budget_until,
            ),
        ))
        // `get_result`, not `first`: `first` binds LIMIT as a parameter,
        // which makes SQLite re-prepare the statement on every call.
        .get_result(c)
        .optional())?;
    let Some((changes, key)) = found else {
        return Ok(None);
    };
    if let Some(changes) = changes {
        cache.put(changes, *hash, key.clone());
    }
    Ok(Some(key))
}
