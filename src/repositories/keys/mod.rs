//! The keys repository: the `keys` and `key_secrets` tables, their insert
//! and change sets, and [`Keys`] (create, resolve, revoke, rotate, update,
//! get, list). Resolving is answered from memory while no key has changed
//! ([`cache`]); `last_used_at` is noted in memory and written in batches
//! ([`last_used`]).

pub(crate) mod cache;
pub(crate) mod last_used;
mod look_up;

use crate::repositories::budgets::SpendMemory;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use diesel::prelude::*;

use crate::db::database::{on_backend, Conn, Database};
use crate::db::key_changes::KeyChangeWatch;
use crate::db::schema::{key_secrets, keys};
use crate::error::{Error, Result};
use crate::model::budget::BudgetStatus;
use crate::model::key::{
    page_size, validate_expiry, validate_label, ActiveKey, AllowedModels, CreatedKey, Key,
    KeyFilter, KeyId, KeyState, KeyUpdate, NewKey, Rejection, Tier,
};
use crate::model::secret;
use crate::model::time::Timestamp;
use crate::repositories::budgets;
use crate::repositories::fast_hash::BuildFastHasher;
use crate::repositories::keys::cache::KeyCache;
use crate::repositories::keys::last_used::LastUsed;
use crate::repositories::keys::look_up::{key_changes, look_up, KeyOfSecret};

#[derive(Insertable)]
#[diesel(table_name = keys)]
struct NewKeyRow<'a> {
    id: KeyId,
    display_prefix: &'a str,
    tier: Tier,
    label: &'a str,
    allowed_models: &'a AllowedModels,
    rate_limit_override: Option<i64>,
    created_at: Timestamp,
    expires_at: Option<Timestamp>,
}

#[derive(Insertable)]
#[diesel(table_name = key_secrets)]
struct NewSecretRow<'a> {
    secret_hash: &'a [u8],
    key_row_id: i64,
    created_at: Timestamp,
}

impl NewSecretRow<'_> {
    /// Stores the secret's hash for its key.
    fn insert(&self, conn: &mut Conn<'_>) -> Result<()> {
        on_backend!(conn, |c| diesel::insert_into(key_secrets::table)
            .values(self)
            .execute(c))?;
        Ok(())
    }
}

#[derive(AsChangeset)]
#[diesel(table_name = keys)]
struct KeyChanges<'a> {
    label: Option<&'a str>,
    allowed_models: Option<&'a AllowedModels>,
    expires_at: Option<Option<Timestamp>>,
    rate_limit_override: Option<Option<i64>>,
}

/// What the keys repository keeps in memory between calls, for one store.
#[derive(Debug)]
pub(crate) struct KeyMemory {
    /// The prefix of the store's secrets.
    secret_prefix: String,
    /// Recently resolved secrets; see [`cache`].
    cache: KeyCache<KeyOfSecret>,
    /// `last_used_at` times not written yet; see [`last_used`].
    pub(crate) last_used: LastUsed,
    /// Key ids to their row ids. Keys are never deleted (a trigger refuses
    /// it), so entries never go stale.
    row_ids: RwLock<HashMap<KeyId, i64, BuildFastHasher>>,
    /// In notified mode, the count of key changes the store's watcher
    /// keeps (see [`crate::db::key_changes`]).
    pub(crate) watch: std::sync::OnceLock<Arc<KeyChangeWatch>>,
    /// Budget rows and spends as SQLite's recording transactions left them;
    /// see [`SpendMemory`].
    pub(crate) spends: SpendMemory,
}

impl KeyMemory {
    /// Memory for a store whose secrets start with `secret_prefix`, keeping
    /// up to `cache_size` resolved secrets.
    pub(crate) fn new(secret_prefix: &str, cache_size: usize) -> Result<KeyMemory> {
        secret::validate_prefix(secret_prefix)?;
        Ok(KeyMemory {
            secret_prefix: secret_prefix.to_owned(),
            cache: KeyCache::new(cache_size),
            last_used: LastUsed::default(),
            row_ids: RwLock::default(),
            watch: std::sync::OnceLock::new(),
            spends: SpendMemory::default(),
        })
    }

    /// The count of key changes as the watcher knows it, in notified mode
    /// while it is fresh; `None` means ask the database.
    fn known_key_changes(&self) -> Option<i64> {
        self.watch.get().and_then(|watch| watch.fresh_count())
    }

    /// Whether resolves are answered from the watcher's count (notified
    /// mode, while it is fresh) rather than by asking the database.
    pub(crate) fn resolves_from_notifications(&self) -> bool {
        self.known_key_changes().is_some()
    }

    /// This process committed a change to a key or a secret: resolves ask
    /// the database until the watcher has read the count again.
    fn changed_here(&self) {
        if let Some(watch) = self.watch.get() {
            watch.changed_here();
        }
    }
}

/// The keys repository of a store; see `Store::keys`.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    db: &'a Database,
    memory: &'a KeyMemory,
}

impl<'a> Keys<'a> {
    pub(crate) fn new(db: &'a Database, memory: &'a KeyMemory) -> Keys<'a> {
        Keys { db, memory }
    }

    /// Creates a key and returns it with its secret, which is shown this once.
    /// Only the secret's SHA-256 is stored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad label, an expiry in the past, or a
    /// bad secret prefix; [`Error::Random`], [`Error::Busy`], [`Error::Pool`]
    /// or [`Error::Database`] otherwise.
    pub fn create(&self, new: &NewKey) -> Result<CreatedKey> {
        let label = validate_label(&new.label)?;
        let now = Timestamp::now();
        if let Some(expiry) = new.expires_at {
            validate_expiry(expiry, now)?;
        }
        if let Some(budget) = &new.budget {
            budget.validate()?;
        }
        let secret = secret::generate(&self.memory.secret_prefix)?;
        let hash = secret.hash();
        let display_prefix = secret.display_prefix();
        let row = NewKeyRow {
            id: KeyId::new(),
            display_prefix: &display_prefix,
            tier: new.tier,
            label,
            allowed_models: &new.allowed_models,
            rate_limit_override: new.rate_limit_override.map(i64::from),
            created_at: now,
            expires_at: new.expires_at,
        };
        let key = self.db.write(|conn| {
            let key: Key = on_backend!(conn, |c| diesel::insert_into(keys::table)
                .values(&row)
                .returning(keys::all_columns)
                .get_result(c))?;
            NewSecretRow {
                secret_hash: &hash.0,
                key_row_id: key.row_id,
                created_at: now,
            }
            .insert(conn)?;
            if let Some(budget) = &new.budget {
                budgets::set_for_new_key(conn, key.row_id, budget, now)?;
            }
            Ok(key)
        })?;
        tracing::info!(key = %key.id, tier = %key.tier, "created key");
        Ok(CreatedKey { key, secret })
    }

    /// Resolves a presented secret to its active key: the gateway's hot path.
    ///
    /// The outer `Result` is the store's health; the inner one the verdict
    /// on the secret. A malformed secret is rejected without touching the
    /// database. Nothing is written: `last_used_at` is noted in memory and
    /// written in batches by the store's flusher (and on close).
    ///
    /// # Errors
    ///
    /// [`Error::Pool`], [`Error::Busy`] or [`Error::Database`] if the
    /// database cannot be read.
    pub fn resolve(&self, presented: &str) -> Result<Result<ActiveKey, Rejection>> {
        let Ok(hash) = secret::parse(&self.memory.secret_prefix, presented) else {
            return Ok(Err(Rejection::Malformed));
        };
        let cache = &self.memory.cache;
        // In notified mode, with the listener fresh, the count is known
        // without asking; otherwise (strict mode) the database is asked.
        let known = self.memory.known_key_changes();
        let mut looked_up = false;
        let row = match (cache.get(&hash.0), known) {
            (Some((changes, row)), Some(known)) if known == changes => Some(row),
            (cached, known) => {
                let mut pooled = self.db.connection()?;
                let conn = &mut pooled.conn();
                match cached {
                    Some((changes, row)) if known.is_none() && key_changes(conn)? == changes => {
                        Some(row)
                    }
                    _ => {
                        looked_up = true;
                        look_up(conn, cache, &hash.0)?
                    }
                }
            }
        };
        let Some(KeyOfSecret {
            row_id,
            id,
            tier,
            allowed_models,
            rate_limit_override: rate_limit,
            expires_at,
            revoked_at,
            valid_until,
            over_budget_until,
        }) = row
        else {
            return Ok(Err(Rejection::Unknown));
        };
        let now = Timestamp::now();
        if revoked_at.is_some() {
            return Ok(Err(Rejection::Revoked));
        }
        if expires_at.is_some_and(|t| t <= now) || valid_until.is_some_and(|t| t <= now) {
            return Ok(Err(Rejection::Expired));
        }
        // The period that the spend reached the budget in ends by time alone.
        if over_budget_until.is_some_and(|t| now < t) {
            return Ok(Err(Rejection::OverBudget));
        }
        self.memory.last_used.note(row_id, now.as_millis());
        if looked_up {
            // The events recorded for this key next find its row id here.
            self.remember_row_id(id, row_id);
        }
        Ok(Ok(ActiveKey {
            id,
            tier,
            allowed_models,
            rate_limit_override: rate_limit,
        }))
    }

    /// The key with this id, in any state.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`], or the store's errors.
    pub fn get(&self, id: KeyId) -> Result<Key> {
        let mut pooled = self.db.connection()?;
        find(&mut pooled.conn(), id)
    }

    /// Keys in id (creation) order, filtered, one page at a time.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a page size over 10,000, or the store's
    /// errors.
    pub fn list(&self, filter: &KeyFilter) -> Result<Vec<Key>> {
        let limit = page_size(filter.limit)?;
        let now = Timestamp::now();
        let mut pooled = self.db.connection()?;
        Ok(on_backend!(&mut pooled.conn(), |c| {
            let mut query = keys::table
                .select(keys::all_columns)
                .order(keys::id.asc())
                .limit(i64::from(limit))
                .into_boxed();
            if let Some(after) = filter.after {
                query = query.filter(keys::id.gt(after));
            }
            if let Some(tier) = filter.tier {
                query = query.filter(keys::tier.eq(tier));
            }
            match filter.state {
                None => {}
                Some(KeyState::Revoked) => query = query.filter(keys::revoked_at.is_not_null()),
                Some(KeyState::Expired) => {
                    query = query
                        .filter(keys::revoked_at.is_null())
                        .filter(keys::expires_at.le(now));
                }
                Some(KeyState::Active) => {
                    query = query
                        .filter(keys::revoked_at.is_null())
                        .filter(keys::expires_at.is_null().or(keys::expires_at.gt(now)));
                }
            }
            query.load(c)
        })?)
    }

    /// Revokes a key. Idempotent: revoking again keeps the first time. The
    /// row is kept; every secret of the key stops working at once.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`], or the store's errors.
    pub fn revoke(&self, id: KeyId) -> Result<Key> {
        let now = Timestamp::now();
        let key = self.write_key_change(|conn| {
            on_backend!(conn, |c| diesel::update(
                keys::table
                    .filter(keys::id.eq(id))
                    .filter(keys::revoked_at.is_null()),
            )
            .set(keys::revoked_at.eq(now))
            .execute(c))?;
            find(conn, id)
        })?;
        tracing::info!(key = %id, "revoked key");
        Ok(key)
    }

    /// Issues a new secret for the key. The old secret keeps working for
    /// `grace` (zero: it stops at once); the key's expiry does not change.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`], [`Error::KeyRevoked`], or the store's errors.
    pub fn rotate(&self, id: KeyId, grace: Duration) -> Result<CreatedKey> {
        let now = Timestamp::now();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let old_until = now.plus_millis(grace_ms);
        let secret = secret::generate(&self.memory.secret_prefix)?;
        let hash = secret.hash();
        let display_prefix = secret.display_prefix();
        let key = self.write_key_change(|conn| {
            let key = find_for_update(conn, id)?;
            if key.revoked_at.is_some() {
                return Err(Error::KeyRevoked { id });
            }
            // Every secret still valid past the new deadline now ends there;
            // one already ending sooner keeps its earlier end.
            on_backend!(conn, |c| diesel::update(
                key_secrets::table
                    .filter(key_secrets::key_row_id.eq(key.row_id))
                    .filter(
                        key_secrets::valid_until
                            .is_null()
                            .or(key_secrets::valid_until.gt(old_until)),
                    ),
            )
            .set(key_secrets::valid_until.eq(old_until))
            .execute(c))?;
            NewSecretRow {
                secret_hash: &hash.0,
                key_row_id: key.row_id,
                created_at: now,
            }
            .insert(conn)?;
            on_backend!(conn, |c| diesel::update(
                keys::table.filter(keys::row_id.eq(key.row_id))
            )
            .set(keys::display_prefix.eq(&display_prefix))
            .execute(c))?;
            find(conn, id)
        })?;
        tracing::info!(key = %id, grace_ms, "rotated key");
        Ok(CreatedKey { key, secret })
    }

    /// Changes the label, models, expiry, rate limit or budget of a key.
    /// The tier cannot change.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad label or an expiry that is not in
    /// the future (as [`Keys::create`]), [`Error::KeyNotFound`],
    /// [`Error::KeyRevoked`] for a revoked key (as [`Keys::rotate`]), or the
    /// store's errors.
    pub fn update(&self, id: KeyId, update: &KeyUpdate) -> Result<Key> {
        let label = update.label.as_deref().map(validate_label).transpose()?;
        if let Some(Some(expiry)) = update.expires_at {
            validate_expiry(expiry, Timestamp::now())?;
        }
        if let Some(Some(budget)) = &update.budget {
            budget.validate()?;
        }
        let changes = KeyChanges {
            label,
            allowed_models: update.allowed_models.as_ref(),
            expires_at: update.expires_at,
            rate_limit_override: update.rate_limit_override.map(|limit| limit.map(i64::from)),
        };
        let nothing_to_change = changes.label.is_none()
            && changes.allowed_models.is_none()
            && changes.expires_at.is_none()
            && changes.rate_limit_override.is_none();
        self.write_key_change(|conn| {
            let key = find_for_update(conn, id)?;
            if key.revoked_at.is_some() {
                return Err(Error::KeyRevoked { id });
            }
            if let Some(budget) = &update.budget {
                budgets::set(conn, key.row_id, budget.as_ref(), Timestamp::now())?;
            }
            if !nothing_to_change {
                on_backend!(conn, |c| diesel::update(
                    keys::table.filter(keys::id.eq(id))
                )
                .set(&changes)
                .execute(c))?;
            }
            find(conn, id)
        })
    }

    /// The key's budget and where it stands in the current period; `None`
    /// for a key without one.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`], or the store's errors.
    pub fn budget(&self, id: KeyId) -> Result<Option<BudgetStatus>> {
        // One transaction: the spend is read from the budget row and the
        // key's rollups (SQLite), which pruning changes together.
        self.db.read(|conn| {
            let key = find(conn, id)?;
            budgets::status(conn, key.row_id, Timestamp::now())
        })
    }

    /// A write that changes a key or a secret (and so moves the count of
    /// key changes): afterwards this process's resolves ask the database
    /// until the watcher has read the new count (notified mode).
    fn write_key_change<T>(&self, f: impl FnMut(&mut Conn<'_>) -> Result<T>) -> Result<T> {
        let written = self.db.write(f);
        self.memory.changed_here();
        written
    }

    /// Writes the `last_used_at` times noted by [`Keys::resolve`] now rather
    /// than at the next flush interval. Returns how many keys it updated.
    ///
    /// # Errors
    ///
    /// The store's errors; the noted times are kept for the next try.
    pub fn flush_last_used(&self) -> Result<usize> {
        self.memory.last_used.flush(self.db)
    }

    /// The internal row id of a key, for events, from memory or the
    /// database; `None` if no key has this id.
    pub(crate) fn row_id(&self, id: KeyId) -> Result<Option<i64>> {
        if let Some(row_id) = self.known_row_id(id) {
            return Ok(Some(row_id));
        }
        let mut pooled = self.db.connection()?;
        let row_id = on_backend!(&mut pooled.conn(), |c| keys::table
            .filter(keys::id.eq(id))
            .select(keys::row_id)
            .get_result(c)
            .optional())?;
        if let Some(row_id) = row_id {
            self.remember_row_id(id, row_id);
        }
        Ok(row_id)
    }

    /// The row id of a key seen before by this store, from memory.
    pub(crate) fn known_row_id(&self, id: KeyId) -> Option<i64> {
        self.memory
            .row_ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    fn remember_row_id(&self, id: KeyId, row_id: i64) {
        self.memory
            .row_ids
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, row_id);
    }
}

/// The key with this id.
fn find(conn: &mut Conn<'_>, id: KeyId) -> Result<Key> {
    on_backend!(conn, |c| keys::table
        .filter(keys::id.eq(id))
        .select(keys::all_columns)
        .get_result(c)
        .optional())?
    .ok_or(Error::KeyNotFound { id })
}

/// The key with this id, locked until the caller's transaction ends, so
/// that two changes of one key run one after the other. On SQLite the
/// write transaction already holds the database's one write lock; on
/// PostgreSQL the row is locked (`FOR UPDATE`), so a rotate that races a
/// revoke sees it committed and is refused, instead of both writing.
fn find_for_update(conn: &mut Conn<'_>, id: KeyId) -> Result<Key> {
    match conn {
        Conn::Sqlite(_) => find(conn, id),
        #[cfg(feature = "postgres")]
        Conn::Postgres(c) => keys::table
            .filter(keys::id.eq(id))
            .select(keys::all_columns)
            .for_update()
            .get_result(*c)
            .optional()?
            .ok_or(Error::KeyNotFound { id }),
    }
}

/// The public ids of keys by their internal row ids.
pub(crate) fn ids_of(conn: &mut Conn<'_>, row_ids: &[i64]) -> Result<HashMap<i64, KeyId>> {
    let mut ids = HashMap::with_capacity(row_ids.len());
    for chunk in row_ids.chunks(500) {
        let rows: Vec<(i64, KeyId)> = on_backend!(conn, |c| keys::table
            .filter(keys::row_id.eq_any(chunk))
            .select((keys::row_id, keys::id))
            .load(c))?;
        ids.extend(rows);
    }
    Ok(ids)
}
