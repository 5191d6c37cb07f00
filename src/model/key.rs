//! API keys as values: ids, tiers, model lists, the key as stored, what a
//! gateway gets back from a resolve, and the rules a key's fields follow.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use diesel::deserialize::FromSqlRow;
use diesel::expression::AsExpression;
use diesel::sql_types::{Binary, Text};
use diesel::Queryable;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::model::budget::Budget;
use crate::model::invalid::Invalid;
use crate::model::secret::Secret;
use crate::model::time::Timestamp;

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
/// The default page size of a listing.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page size of a listing.
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// A key's public id: a time-ordered UUID (v7), stored as 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
pub struct KeyId(Uuid);

impl KeyId {
    pub(crate) fn new() -> KeyId {
        KeyId(Uuid::now_v7())
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The UUID's 16 bytes, as stored.
    pub(crate) fn as_uuid_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
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
    type Err = Invalid;

    fn from_str(text: &str) -> Result<KeyId, Invalid> {
        Uuid::parse_str(text.trim())
            .map(KeyId)
            .map_err(|e| Invalid::new("key id", format!("{text:?} is not a UUID: {e}")))
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyId, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Tier, Invalid> {
        match text {
            "admin" => Ok(Tier::Admin),
            "client" => Ok(Tier::Client),
            other => Err(Invalid::new(
                "tier",
                format!("{other:?} is not a tier; use admin or client"),
            )),
        }
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
    /// [`Invalid`] for an empty list, an empty, oversized or
    /// duplicate name, `*` mixed with names, or more than 256 names.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<AllowedModels, Invalid> {
        let invalid = |reason: String| Invalid::new("allowed_models", reason);
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

    /// The stored form: a JSON array of the names.
    pub(crate) fn to_json(&self) -> String {
        if *self == AllowedModels::Any {
            return ANY_MODEL_JSON.to_owned();
        }
        // Serializing a list of strings cannot fail.
        serde_json::to_string(&self.names()).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Reads the stored form back, checking it as [`AllowedModels::from_names`] does.
    pub(crate) fn from_json(text: &str) -> Result<AllowedModels, Invalid> {
        // Most keys allow any model; this runs on every resolve.
        if text == ANY_MODEL_JSON {
            return Ok(AllowedModels::Any);
        }
        let names: Vec<String> = serde_json::from_str(text).map_err(|e| {
            Invalid::new("allowed_models", format!("not a JSON list of names: {e}"))
        })?;
        AllowedModels::from_names(&names)
    }
}

impl Serialize for AllowedModels {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.names().serialize(serializer)
    }
}

/// A key as stored (never with its secret): the `keys` table's columns, in
/// their order.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Serialize)]
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
    /// The end of the budget period in which its spend reached its budget
    /// (see [`crate::Keys::budget`] for the budget's standing).
    #[serde(skip)]
    pub(crate) over_budget_until: Option<Timestamp>,
}

impl Key {
    /// Whether the key is refused at `now` because its spend reached its
    /// budget: until when (the end of that budget period), or `None`.
    pub fn over_budget_until(&self, now: Timestamp) -> Option<Timestamp> {
        self.over_budget_until.filter(|until| now < *until)
    }

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

/// What `Keys::create` needs.
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
    /// What the key may spend per period; `None` for no limit.
    pub budget: Option<Budget>,
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
            budget: None,
        }
    }
}

/// Changes for `Keys::update`; `None` leaves a field as it is. The tier
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
    /// A new budget; `Some(None)` removes it. The spend of the current
    /// period is counted from the events already recorded in it.
    pub budget: Option<Option<Budget>>,
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
#[serde(rename_all = "snake_case")]
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
    /// The key's spend in its budget's current period has reached the
    /// budget; it resolves again when the next period starts.
    OverBudget,
}

impl Rejection {
    /// The name used in logs and by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unknown => "unknown",
            Rejection::Revoked => "revoked",
            Rejection::Expired => "expired",
            Rejection::OverBudget => "over_budget",
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

/// Filters and page for `Keys::list`.
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

/// Checks one model name: 1 to 200 characters, no control characters.
pub(crate) fn validate_model_name(name: &str) -> Result<(), String> {
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

/// Checks a label: not blank, at most 200 characters, no control characters.
pub(crate) fn validate_label(label: &str) -> Result<&str, Invalid> {
    let invalid = |reason: &str| Invalid::new("label", reason);
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

/// Checks an expiry: it must lie after `now`.
pub(crate) fn validate_expiry(expiry: Timestamp, now: Timestamp) -> Result<(), Invalid> {
    if expiry <= now {
        return Err(Invalid::new(
            "expires_at",
            format!("{expiry} is not in the future"),
        ));
    }
    Ok(())
}

/// A listing's page size: the default for `None`, 1 to 10,000 otherwise.
pub(crate) fn page_size(limit: Option<u32>) -> Result<u32, Invalid> {
    match limit {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(0) => Err(Invalid::new("limit", "must be at least 1")),
        Some(limit) if limit > MAX_PAGE_SIZE => Err(Invalid::new(
            "limit",
            format!("{limit} is over the maximum of {MAX_PAGE_SIZE}"),
        )),
        Some(limit) => Ok(limit),
    }
}
