//! API keys: the `keys` and `key_secrets` tables, their row types, and the
//! [`Keys`] repository (create, resolve, revoke, rotate, update, get, list).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::prelude::*;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Binary, Text};
use diesel::sqlite::{Sqlite, SqliteValue};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::schema::{key_secrets, keys, sequences};
use crate::secret::{self, Secret};
use crate::sql::{sql_text, CachedSql, FixedSql};
use crate::store::Store;
use crate::time::Timestamp;

/// The longest label accepted, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// The longest model name accepted, in characters.
pub const MAX_MODEL_NAME_CHARS: usize = 200;
/// The most model names one key may list.
pub const MAX_ALLOWED_MODELS: usize = 256;
/// How "any model" is stored.
const ANY_MODEL_JSON: &str = r#"["*"]"#;
/// The default grace period of a rotated-out secret.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The default page size of [`Keys::list`].
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page size of [`Keys::list`].
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// A key's public id: a time-ordered UUID (v7), stored as 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
pub struct KeyId(Uuid);

impl KeyId {
    fn new() -> KeyId {
        KeyId(Uuid::now_v7())
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for KeyId {
    fn from(uuid: Uuid) -> KeyId {
        KeyId(uuid)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for KeyId {
    type Err = Error;

    fn from_str(text: &str) -> Result<KeyId> {
        Uuid::parse_str(text.trim())
            .map(KeyId)
            .map_err(|e| Error::InvalidInput {
                field: "key id",
                reason: format!("{text:?} is not a UUID: {e}"),
            })
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl ToSql<Binary, Sqlite> for KeyId {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.0.as_bytes().as_slice());
        Ok(IsNull::No)
    }
}

impl FromSql<Binary, Sqlite> for KeyId {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        // Read in place: this runs on every resolve.
        Ok(KeyId(Uuid::from_slice(value.read_blob())?))
    }
}

/// What a key may do. Fixed when the key is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, AsExpression, FromSqlRow, Serialize)]
#[diesel(sql_type = Text)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// May administer the gateway.
    Admin,
    /// May call models.
    Client,
}

impl Tier {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "admin",
            Tier::Client => "client",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = Error;

    fn from_str(text: &str) -> Result<Tier> {
        match text {
            "admin" => Ok(Tier::Admin),
            "client" => Ok(Tier::Client),
            other => Err(Error::InvalidInput {
                field: "tier",
                reason: format!("{other:?} is not a tier; use admin or client"),
            }),
        }
    }
}

impl ToSql<Text, Sqlite> for Tier {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.as_str());
        Ok(IsNull::No)
    }
}

impl FromSql<Text, Sqlite> for Tier {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(value.read_text().parse::<Tier>()?)
    }
}

/// The models a key may use.
#[derive(Debug, Clone, PartialEq, Eq, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
pub enum AllowedModels {
    /// Any model (stored as `["*"]`).
    Any,
    /// Only these models.
    Only(Vec<String>),
}

impl AllowedModels {
    /// A model list from names; `*` alone means any model.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an empty list, an empty, oversized or
    /// duplicate name, `*` mixed with names, or more than 256 names.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<AllowedModels> {
        let invalid = |reason: String| Error::InvalidInput {
            field: "allowed_models",
            reason,
        };
        if names.is_empty() {
            return Err(invalid(
                "the list is empty; use \"*\" to allow any model".to_owned(),
            ));
        }
        if names.iter().any(|name| name.as_ref() == "*") {
            if names.len() > 1 {
                return Err(invalid("\"*\" must stand alone".to_owned()));
            }
            return Ok(AllowedModels::Any);
        }
        if names.len() > MAX_ALLOWED_MODELS {
            return Err(invalid(format!(
                "{} names, at most {MAX_ALLOWED_MODELS}",
                names.len()
            )));
        }
        let mut list: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref();
            validate_model_name(name).map_err(invalid)?;
            if list.iter().any(|seen| seen == name) {
                return Err(invalid(format!("{name:?} is listed twice")));
            }
            list.push(name.to_owned());
        }
        Ok(AllowedModels::Only(list))
    }

    /// Whether a key with this list may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            AllowedModels::Any => true,
            AllowedModels::Only(names) => names.iter().any(|name| name == model),
        }
    }

    /// The names, with `*` for any.
    pub fn names(&self) -> Vec<&str> {
        match self {
            AllowedModels::Any => vec!["*"],
            AllowedModels::Only(names) => names.iter().map(String::as_str).collect(),
        }
    }

    fn to_json(&self) -> String {
        // Serializing a list of strings cannot fail.
        serde_json::to_string(&self.names()).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// Checks one model name: 1 to 200 characters, no control characters.
pub(crate) fn validate_model_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("a model name is empty".to_owned());
    }
    if name.chars().count() > MAX_MODEL_NAME_CHARS {
        return Err(format!(
            "a model name is longer than {MAX_MODEL_NAME_CHARS} characters"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("model name {name:?} has control characters"));
    }
    Ok(())
}

impl Serialize for AllowedModels {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.names().serialize(serializer)
    }
}

impl ToSql<Text, Sqlite> for AllowedModels {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.to_json());
        Ok(IsNull::No)
    }
}

impl FromSql<Text, Sqlite> for AllowedModels {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        let text = value.read_text();
        // Most keys allow any model; this runs on every resolve.
        if text == ANY_MODEL_JSON {
            return Ok(AllowedModels::Any);
        }
        let names: Vec<String> = serde_json::from_str(text)?;
        Ok(AllowedModels::from_names(&names)?)
    }
}

/// A key as stored (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize)]
#[diesel(table_name = keys, check_for_backend(Sqlite))]
pub struct Key {
    #[serde(skip)]
    pub(crate) row_id: i64,
    /// The public id.
    pub id: KeyId,
    /// The first characters of the current secret.
    pub display_prefix: String,
    /// Admin or client; never changes.
    pub tier: Tier,
    /// Free text.
    pub label: String,
    /// The models the key may use.
    pub allowed_models: AllowedModels,
    /// Requests per minute for this key; `None` means the gateway's default.
    pub rate_limit_override: Option<i64>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it stops working, if ever.
    pub expires_at: Option<Timestamp>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// When it was last resolved, to within the flush interval.
    pub last_used_at: Option<Timestamp>,
}

impl Key {
    /// The key's state at `now`.
    pub fn state_at(&self, now: Timestamp) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|expiry| expiry <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }
}

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

/// What [`Keys::create`] needs.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Free text, 1 to 200 characters.
    pub label: String,
    /// Admin or client.
    pub tier: Tier,
    /// The models the key may use.
    pub allowed_models: AllowedModels,
    /// When it stops working; must be in the future.
    pub expires_at: Option<Timestamp>,
    /// Requests per minute; `None` for the gateway's default.
    pub rate_limit_override: Option<u32>,
}

impl NewKey {
    /// A client key usable with any model, without expiry.
    pub fn client(label: impl Into<String>) -> NewKey {
        NewKey {
            label: label.into(),
            tier: Tier::Client,
            allowed_models: AllowedModels::Any,
            expires_at: None,
            rate_limit_override: None,
        }
    }
}

/// Changes for [`Keys::update`]; `None` leaves a field as it is. The tier
/// cannot change.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    /// A new label.
    pub label: Option<String>,
    /// A new model list.
    pub allowed_models: Option<AllowedModels>,
    /// A new expiry; `Some(None)` removes it.
    pub expires_at: Option<Option<Timestamp>>,
    /// A new rate limit; `Some(None)` returns to the gateway's default.
    pub rate_limit_override: Option<Option<u32>>,
}

#[derive(AsChangeset)]
#[diesel(table_name = keys)]
struct KeyChanges<'a> {
    label: Option<&'a str>,
    allowed_models: Option<&'a AllowedModels>,
    expires_at: Option<Option<Timestamp>>,
    rate_limit_override: Option<Option<i64>>,
}

/// A new key (or a rotated one) with its secret, which is shown this once.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The key.
    pub key: Key,
    /// The secret: hand it over now, it cannot be recovered.
    pub secret: Secret,
}

/// What a gateway needs of a resolved, active key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveKey {
    /// The key's id, to record events against.
    pub id: KeyId,
    /// Admin or client.
    pub tier: Tier,
    /// The models it may use.
    pub allowed_models: AllowedModels,
    /// Requests per minute; `None` for the gateway's default.
    pub rate_limit_override: Option<i64>,
}

impl ActiveKey {
    /// Whether this key may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.allows(model)
    }
}

/// Why a presented secret does not let its bearer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rejection {
    /// Not a keytally secret: wrong shape, or a checksum mismatch (a typo).
    /// The database was not consulted.
    Malformed,
    /// Well-formed, but no key has this secret.
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key has expired, or this secret was rotated out and its grace
    /// period has ended.
    Expired,
}

impl Rejection {
    /// The name used in logs and by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unknown => "unknown",
            Rejection::Revoked => "revoked",
            Rejection::Expired => "expired",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Neither revoked nor expired.
    Active,
    /// Revoked.
    Revoked,
    /// Past its expiry, not revoked.
    Expired,
}

/// Filters and page for [`Keys::list`].
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    /// Only keys in this state.
    pub state: Option<KeyState>,
    /// Only keys of this tier.
    pub tier: Option<Tier>,
    /// Keyset pagination: only keys after this id (the last of the previous
    /// page).
    pub after: Option<KeyId>,
    /// Page size; default 100, at most 10,000.
    pub limit: Option<u32>,
}

/// The name of the count of key changes in `sequences`; see
/// [`crate::key_cache`].
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
fn key_changes(conn: &mut SqliteConnection) -> Result<i64> {
    Ok(FixedSql::<KeyChangeCount>::new(Vec::new())
        .get_result::<CountRow>(conn)
        .optional()?
        .ok_or_else(|| Error::BadStoredValue {
            message: "the count of key changes is missing from the sequences table".to_owned(),
        })?
        .value)
}

/// The keys repository of a [`Store`]; see [`Store::keys`].
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    store: &'a Store,
}

/// What resolving a secret reads: the key's row id, id, tier, allowed
/// models, rate limit, expiry and revocation, and the secret's end of grace.
pub(crate) type Resolved = (
    i64,
    KeyId,
    Tier,
    AllowedModels,
    Option<i64>,
    Option<Timestamp>,
    Option<Timestamp>,
    Option<Timestamp>,
);

impl<'a> Keys<'a> {
    pub(crate) fn new(store: &'a Store) -> Keys<'a> {
        Keys { store }
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
            if expiry <= now {
                return Err(Error::InvalidInput {
                    field: "expires_at",
                    reason: format!("{expiry} is not in the future"),
                });
            }
        }
        let secret = secret::generate(self.store.secret_prefix())?;
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
        let key = self.store.write(|conn| {
            let key: Key = diesel::insert_into(keys::table)
                .values(&row)
                .returning(Key::as_returning())
                .get_result(conn)?;
            diesel::insert_into(key_secrets::table)
                .values(NewSecretRow {
                    secret_hash: &hash.0,
                    key_row_id: key.row_id,
                    created_at: now,
                })
                .execute(conn)?;
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
        let Ok(hash) = secret::parse(self.store.secret_prefix(), presented) else {
            return Ok(Err(Rejection::Malformed));
        };
        let row = {
            let mut conn = self.store.connection()?;
            let cache = self.store.key_cache();
            match cache.get(&hash.0) {
                Some((changes, row)) if key_changes(&mut conn)? == changes => Some(row),
                _ => {
                    let found: Option<(Option<i64>, Resolved)> = key_secrets::table
                        .inner_join(keys::table)
                        .left_join(sequences::table.on(sequences::name.eq(KEY_CHANGES)))
                        .filter(key_secrets::secret_hash.eq(&hash.0[..]))
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
                        ))
                        // `get_result`, not `first`: `first` binds LIMIT as a
                        // parameter, which makes SQLite re-prepare the
                        // statement on every call.
                        .get_result(&mut *conn)
                        .optional()?;
                    if let Some((Some(changes), row)) = &found {
                        cache.put(*changes, hash.0, row.clone());
                    }
                    found.map(|(_, row)| row)
                }
            }
        };
        let Some((
            row_id,
            id,
            tier,
            allowed_models,
            rate_limit,
            expires_at,
            revoked_at,
            valid_until,
        )) = row
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
        self.store.note_key_used(row_id, now);
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
        let mut conn = self.store.connection()?;
        find(&mut conn, id)
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
        let mut query = keys::table
            .select(Key::as_select())
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
        let mut conn = self.store.connection()?;
        Ok(query.load(&mut *conn)?)
    }

    /// Revokes a key. Idempotent: revoking again keeps the first time. The
    /// row is kept; every secret of the key stops working at once.
    ///
    /// # Errors
    ///
    /// [`Error::KeyNotFound`], or the store's errors.
    pub fn revoke(&self, id: KeyId) -> Result<Key> {
        let now = Timestamp::now();
        let key = self.store.write(|conn| {
            diesel::update(
                keys::table
                    .filter(keys::id.eq(id))
                    .filter(keys::revoked_at.is_null()),
            )
            .set(keys::revoked_at.eq(now))
            .execute(conn)?;
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
        let secret = secret::generate(self.store.secret_prefix())?;
        let hash = secret.hash();
        let display_prefix = secret.display_prefix();
        let key = self.store.write(|conn| {
            let key = find(conn, id)?;
            if key.revoked_at.is_some() {
                return Err(Error::KeyRevoked { id });
            }
            // Every secret still valid past the new deadline now ends there;
            // one already ending sooner keeps its earlier end.
            diesel::update(
                key_secrets::table
                    .filter(key_secrets::key_row_id.eq(key.row_id))
                    .filter(
                        key_secrets::valid_until
                            .is_null()
                            .or(key_secrets::valid_until.gt(old_until)),
                    ),
            )
            .set(key_secrets::valid_until.eq(old_until))
            .execute(conn)?;
            diesel::insert_into(key_secrets::table)
                .values(NewSecretRow {
                    secret_hash: &hash.0,
                    key_row_id: key.row_id,
                    created_at: now,
                })
                .execute(conn)?;
            diesel::update(keys::table.filter(keys::row_id.eq(key.row_id)))
                .set(keys::display_prefix.eq(&display_prefix))
                .execute(conn)?;
            find(conn, id)
        })?;
        tracing::info!(key = %id, grace_ms, "rotated key");
        Ok(CreatedKey { key, secret })
    }

    /// Changes the label, models, expiry or rate limit of a key. The tier
    /// cannot change.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad label, [`Error::KeyNotFound`], or
    /// the store's errors.
    pub fn update(&self, id: KeyId, update: &KeyUpdate) -> Result<Key> {
        let label = update.label.as_deref().map(validate_label).transpose()?;
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
        self.store.write(|conn| {
            if !nothing_to_change {
                diesel::update(keys::table.filter(keys::id.eq(id)))
                    .set(&changes)
                    .execute(conn)?;
            }
            find(conn, id)
        })
    }

    /// Writes the `last_used_at` times noted by [`Keys::resolve`] now rather
    /// than at the next flush interval. Returns how many keys it updated.
    ///
    /// # Errors
    ///
    /// The store's errors; the noted times are kept for the next try.
    pub fn flush_last_used(&self) -> Result<usize> {
        self.store.flush_last_used()
    }
}

/// The key with this id.
fn find(conn: &mut SqliteConnection, id: KeyId) -> Result<Key> {
    keys::table
        .filter(keys::id.eq(id))
        .select(Key::as_select())
        .get_result(conn)
        .optional()?
        .ok_or(Error::KeyNotFound { id })
}

/// The internal row id of a key, for events.
pub(crate) fn row_id_of(conn: &mut SqliteConnection, id: KeyId) -> Result<Option<i64>> {
    Ok(keys::table
        .filter(keys::id.eq(id))
        .select(keys::row_id)
        .get_result(conn)
        .optional()?)
}

/// The public ids of keys by their internal row ids.
pub(crate) fn ids_of(conn: &mut SqliteConnection, row_ids: &[i64]) -> Result<HashMap<i64, KeyId>> {
    let mut ids = HashMap::with_capacity(row_ids.len());
    for chunk in row_ids.chunks(500) {
        let rows: Vec<(i64, KeyId)> = keys::table
            .filter(keys::row_id.eq_any(chunk))
            .select((keys::row_id, keys::id))
            .load(conn)?;
        ids.extend(rows);
    }
    Ok(ids)
}

/// Writes noted `last_used_at` times, never moving one backwards.
pub(crate) fn write_last_used(conn: &mut SqliteConnection, noted: &[(i64, i64)]) -> Result<()> {
    for &(row_id, millis) in noted {
        // Diesel does not keep an UPDATE prepared; this runs once per key.
        CachedSql::new(
            "UPDATE keys SET last_used_at = ? WHERE row_id = ? \
             AND (last_used_at IS NULL OR last_used_at < ?)",
            vec![millis, row_id, millis],
        )
        .execute(conn)?;
    }
    Ok(())
}

fn validate_label(label: &str) -> Result<&str> {
    let invalid = |reason: &str| Error::InvalidInput {
        field: "label",
        reason: reason.to_owned(),
    };
    if label.trim().is_empty() {
        return Err(invalid("it is empty"));
    }
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(invalid("it is longer than 200 characters"));
    }
    if label.chars().any(char::is_control) {
        return Err(invalid("it has control characters"));
    }
    Ok(label)
}

pub(crate) fn page_size(limit: Option<u32>) -> Result<u32> {
    match limit {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(0) => Err(Error::InvalidInput {
            field: "limit",
            reason: "must be at least 1".to_owned(),
        }),
        Some(limit) if limit > MAX_PAGE_SIZE => Err(Error::InvalidInput {
            field: "limit",
            reason: format!("{limit} is over the maximum of {MAX_PAGE_SIZE}"),
        }),
        Some(limit) => Ok(limit),
    }
}
