//! The keys repository on a real store: create, resolve in every outcome,
//! revoke, rotate, update, list, and `last_used_at` batching.

use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::{store_on, TestStore};
use keytally::Backend;
use keytally::{
    AllowedModels, Error, KeyFilter, KeyId, KeyState, KeyUpdate, NewKey, Rejection, StoreOptions,
    Tier, Timestamp,
};
use rstest::rstest;

use crate::support::sql::raw;
use crate::TestResult;

#[derive(QueryableByName)]
struct DataVersion {
    #[diesel(sql_type = BigInt)]
    data_version: i64,
}

fn data_version(conn: &mut diesel::SqliteConnection) -> diesel::QueryResult<i64> {
    Ok(diesel::sql_query("PRAGMA data_version")
        .get_result::<DataVersion>(conn)?
        .data_version)
}

/// A number that changes whenever anything is written to the keys: SQLite's
/// `data_version` seen from a connection of its own, or the sum of the
/// transaction ids that wrote the PostgreSQL rows.
fn row_versions(
    store: &TestStore,
    observer: &mut Option<diesel::SqliteConnection>,
) -> Result<i64, Box<dyn std::error::Error>> {
    if store.database_url().is_none() {
        let observer = match observer {
            Some(observer) => observer,
            None => observer.insert(crate::raw_connection(store.path())?),
        };
        return Ok(data_version(observer)?);
    }
    Ok(raw(store)?.number(
        "SELECT CAST(coalesce(sum(xmin::text::bigint), 0) AS BIGINT) AS n FROM \
         (SELECT xmin FROM keys UNION ALL SELECT xmin FROM key_secrets \
          UNION ALL SELECT xmin FROM sequences) AS versions",
    )?)
}

#[rstest]
fn created_key_resolves_and_stores_no_secret(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let new = NewKey {
        label: "ci runner".to_owned(),
        tier: Tier::Admin,
        allowed_models: AllowedModels::from_names(&["gpt-4o", "o3"])?,
        expires_at: Some(Timestamp::now().plus_millis(3_600_000)),
        rate_limit_override: Some(120),
        budget: None,
    };
    let created = store.keys().create(&new)?;
    let secret = created.secret.expose().to_owned();
    assert!(secret.starts_with("kt_"));
    assert!(secret.starts_with(&created.key.display_prefix));
    assert!(!format!("{created:?}").contains(&secret[3..]));

    let active = store
        .keys()
        .resolve(&secret)?
        .map_err(|r| format!("rejected: {r}"))?;
    assert_eq!(active.id, created.key.id);
    assert_eq!(active.tier, Tier::Admin);
    assert_eq!(active.rate_limit_override, Some(120));
    assert!(active.may_use("o3"));
    assert!(!active.may_use("gpt-4.1"));

    let key = store.keys().get(created.key.id)?;
    assert_eq!(key.label, "ci runner");
    assert_eq!(key.state_at(Timestamp::now()), KeyState::Active);
    // The database holds the hash, never the secret.
    if backend == Backend::Sqlite {
        let bytes = std::fs::read(store.path())?;
        let wal = std::fs::read(crate::sidecar(store.path(), "-wal")).unwrap_or_default();
        for haystack in [&bytes, &wal] {
            assert!(!haystack
                .windows(secret.len())
                .any(|window| window == secret.as_bytes()));
        }
    } else {
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let mut raw = raw(&store)?;
        for table in ["keys", "key_secrets"] {
            let found = raw.number(&format!(
                "SELECT count(*) AS n FROM {table} AS t \
                 WHERE position('{}' IN t::text) > 0 OR position('{hex}' IN t::text) > 0",
                &secret[3..]
            ))?;
            assert_eq!(found, 0, "the secret is in {table}");
        }
    }
    Ok(())
}

#[rstest]
fn malformed_and_mistyped_secrets_are_rejected_without_a_lookup() -> TestResult {
    let store = TestStore::with_options(|options| options.pool_size(1))?;
    let created = store.keys().create(&NewKey::client("a"))?;
    let secret = created.secret.expose();
    let mut typo = secret.as_bytes().to_vec();
    typo[10] = if typo[10] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo)?;
    // Hold the pool's only connection: a resolve that looked anything up
    // would fail with a pool timeout instead of returning a verdict.
    let held = store.sqlite_connection()?;
    for presented in ["", "Bearer abc", &secret[..secret.len() - 1], &typo] {
        assert_eq!(store.keys().resolve(presented)?, Err(Rejection::Malformed));
    }
    drop(held);
    assert!(store.keys().resolve(secret)?.is_ok());
    Ok(())
}

#[rstest]
fn secret_of_another_store_is_unknown(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let other = keytally::testing::TestStore::new()?;
    let foreign = other.keys().create(&NewKey::client("elsewhere"))?;
    assert_eq!(
        store.keys().resolve(foreign.secret.expose())?,
        Err(Rejection::Unknown)
    );
    Ok(())
}

#[rstest]
fn revoked_key_is_rejected_and_revoke_is_idempotent(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let created = store.keys().create(&NewKey::client("to revoke"))?;
    let first = store.keys().revoke(created.key.id)?;
    let revoked_at = first.revoked_at.ok_or("revoked_at not set")?;
    std::thread::sleep(Duration::from_millis(5));
    let second = store.keys().revoke(created.key.id)?;
    assert_eq!(second.revoked_at, Some(revoked_at));
    assert_eq!(
        store.keys().resolve(created.secret.expose())?,
        Err(Rejection::Revoked)
    );
    assert!(matches!(
        store.keys().rotate(created.key.id, Duration::ZERO),
        Err(Error::KeyRevoked { .. })
    ));
    Ok(())
}

#[rstest]
fn expired_key_is_rejected(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let created = store.keys().create(&NewKey::client("short-lived"))?;
    expire_now(&store, created.key.id)?;
    assert_eq!(
        store.keys().resolve(created.secret.expose())?,
        Err(Rejection::Expired)
    );
    Ok(())
}

/// Moves a key's expiry into the past, as time passing would: the API
/// refuses to set an expiry that is not in the future.
fn expire_now(store: &TestStore, id: KeyId) -> TestResult {
    let mut raw = raw(store)?;
    let id = raw.blob(id.as_uuid().as_bytes());
    raw.execute(&format!(
        "UPDATE keys SET expires_at = {} WHERE id = {id}",
        Timestamp::now().plus_millis(-1).as_millis()
    ))?;
    Ok(())
}

#[rstest]
fn an_update_refuses_an_expiry_that_is_not_in_the_future(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let created = store.keys().create(&NewKey::client("later"))?;
    for expiry in [Timestamp::now().plus_millis(-1), Timestamp::now()] {
        let update = store.keys().update(
            created.key.id,
            &KeyUpdate {
                expires_at: Some(Some(expiry)),
                ..KeyUpdate::default()
            },
        );
        assert!(
            matches!(
                update,
                Err(Error::InvalidInput {
                    field: "expires_at",
                    ..
                })
            ),
            "{update:?}"
        );
    }
    assert_eq!(store.keys().get(created.key.id)?.expires_at, None);
    // A future expiry, and removing it, still work.
    let later = Timestamp::now().plus_millis(3_600_000);
    let update = KeyUpdate {
        expires_at: Some(Some(later)),
        ..KeyUpdate::default()
    };
    assert_eq!(
        store.keys().update(created.key.id, &update)?.expires_at,
        Some(later)
    );
    Ok(())
}

#[rstest]
fn expiry_in_the_past_is_refused_at_creation(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let mut new = NewKey::client("late");
    new.expires_at = Some(Timestamp::now().plus_millis(-1000));
    assert!(matches!(
        store.keys().create(&new),
        Err(Error::InvalidInput {
            field: "expires_at",
            ..
        })
    ));
    assert!(store.keys().list(&KeyFilter::default())?.is_empty());
    Ok(())
}

#[rstest]
fn rotated_secret_works_within_grace_then_stops(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let mut new = NewKey::client("rotating");
    let expiry = Timestamp::now().plus_millis(86_400_000);
    new.expires_at = Some(expiry);
    let original = store.keys().create(&new)?;
    let rotated = store
        .keys()
        .rotate(original.key.id, Duration::from_secs(3600))?;
    assert_eq!(rotated.key.id, original.key.id);
    assert_eq!(
        rotated.key.expires_at,
        Some(expiry),
        "expiry must not change"
    );
    assert_ne!(rotated.key.display_prefix, original.key.display_prefix);
    for secret in [&original.secret, &rotated.secret] {
        let active = store.keys().resolve(secret.expose())?;
        assert_eq!(active.map(|a| a.id), Ok(original.key.id));
    }
    // A rotation without grace ends every older secret at once.
    let third = store.keys().rotate(original.key.id, Duration::ZERO)?;
    assert_eq!(
        store.keys().resolve(original.secret.expose())?,
        Err(Rejection::Expired)
    );
    assert_eq!(
        store.keys().resolve(rotated.secret.expose())?,
        Err(Rejection::Expired)
    );
    assert!(store.keys().resolve(third.secret.expose())?.is_ok());
    Ok(())
}

#[rstest]
fn rotation_never_extends_an_earlier_grace(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let original = store.keys().create(&NewKey::client("k"))?;
    store.keys().rotate(original.key.id, Duration::ZERO)?;
    // A later rotation with a long grace does not revive the first secret.
    store
        .keys()
        .rotate(original.key.id, Duration::from_secs(3600))?;
    assert_eq!(
        store.keys().resolve(original.secret.expose())?,
        Err(Rejection::Expired)
    );
    Ok(())
}

#[rstest]
fn update_changes_fields_but_never_the_tier(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let created = store.keys().create(&NewKey::client("old label"))?;
    let updated = store.keys().update(
        created.key.id,
        &KeyUpdate {
            label: Some("new label".to_owned()),
            allowed_models: Some(AllowedModels::from_names(&["o3"])?),
            rate_limit_override: Some(Some(7)),
            expires_at: None,
            budget: None,
        },
    )?;
    assert_eq!(updated.label, "new label");
    assert_eq!(
        updated.allowed_models,
        AllowedModels::Only(vec!["o3".to_owned()])
    );
    assert_eq!(updated.rate_limit_override, Some(7));
    assert_eq!(updated.tier, Tier::Client);
    let cleared = store.keys().update(
        created.key.id,
        &KeyUpdate {
            rate_limit_override: Some(None),
            ..KeyUpdate::default()
        },
    )?;
    assert_eq!(cleared.rate_limit_override, None);
    // Even SQL written by hand cannot change the tier.
    let attempt = raw(&store)?.execute("UPDATE keys SET tier = 'admin'");
    assert!(attempt.is_err());
    Ok(())
}

#[rstest]
#[case::empty("")]
#[case::blank("   ")]
#[case::control("line\nbreak")]
#[case::too_long(&"x".repeat(201))]
fn bad_labels_are_refused_and_nothing_is_written(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
    #[case] label: &str,
) -> TestResult {
    let store = store_on(backend);
    let result = store.keys().create(&NewKey::client(label));
    assert!(
        matches!(result, Err(Error::InvalidInput { field: "label", .. })),
        "{result:?}"
    );
    let existing = store.keys().create(&NewKey::client("fine"))?;
    let update = store.keys().update(
        existing.key.id,
        &KeyUpdate {
            label: Some(label.to_owned()),
            rate_limit_override: Some(Some(1)),
            ..KeyUpdate::default()
        },
    );
    assert!(matches!(update, Err(Error::InvalidInput { .. })));
    let unchanged = store.keys().get(existing.key.id)?;
    assert_eq!(unchanged.label, "fine");
    assert_eq!(unchanged.rate_limit_override, None);
    assert_eq!(store.keys().list(&KeyFilter::default())?.len(), 1);
    Ok(())
}

#[rstest]
fn bad_model_lists_and_tiers_are_refused() {
    assert!(AllowedModels::from_names::<&str>(&[]).is_err());
    assert!(AllowedModels::from_names(&["*", "o3"]).is_err());
    assert!(AllowedModels::from_names(&["o3", "o3"]).is_err());
    assert!(AllowedModels::from_names(&[""]).is_err());
    assert!(AllowedModels::from_names(&["x".repeat(201)]).is_err());
    assert_eq!(
        AllowedModels::from_names(&["*"]).ok(),
        Some(AllowedModels::Any)
    );
    assert!("root".parse::<Tier>().is_err());
    assert!("not-a-uuid".parse::<KeyId>().is_err());
}

#[rstest]
fn unknown_key_ids_are_not_found(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let id: KeyId = "0190f0f0-0000-7000-8000-000000000000".parse()?;
    assert!(matches!(
        store.keys().get(id),
        Err(Error::KeyNotFound { .. })
    ));
    assert!(matches!(
        store.keys().revoke(id),
        Err(Error::KeyNotFound { .. })
    ));
    assert!(matches!(
        store.keys().rotate(id, Duration::ZERO),
        Err(Error::KeyNotFound { .. })
    ));
    assert!(matches!(
        store.keys().update(id, &KeyUpdate::default()),
        Err(Error::KeyNotFound { .. })
    ));
    Ok(())
}

#[rstest]
fn list_pages_return_every_key_once_and_filters_apply(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let mut created = Vec::new();
    for i in 0..23 {
        let mut new = NewKey::client(format!("key {i}"));
        if i % 5 == 0 {
            new.tier = Tier::Admin;
        }
        created.push(store.keys().create(&new)?.key.id);
    }
    for id in created.iter().step_by(4) {
        store.keys().revoke(*id)?;
    }
    expire_now(&store, created[1])?;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.keys().list(&KeyFilter {
            after,
            limit: Some(7),
            ..KeyFilter::default()
        })?;
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        after = page.last().map(|key| key.id);
        seen.extend(page.into_iter().map(|key| key.id));
    }
    assert_eq!(seen, created, "every key once, in creation order");

    let count = |filter: KeyFilter| store.keys().list(&filter).map(|keys| keys.len());
    assert_eq!(
        count(KeyFilter {
            state: Some(KeyState::Revoked),
            ..KeyFilter::default()
        })?,
        6
    );
    assert_eq!(
        count(KeyFilter {
            state: Some(KeyState::Expired),
            ..KeyFilter::default()
        })?,
        1
    );
    assert_eq!(
        count(KeyFilter {
            state: Some(KeyState::Active),
            ..KeyFilter::default()
        })?,
        16
    );
    assert_eq!(
        count(KeyFilter {
            tier: Some(Tier::Admin),
            ..KeyFilter::default()
        })?,
        5
    );
    assert!(matches!(
        store.keys().list(&KeyFilter {
            limit: Some(0),
            ..KeyFilter::default()
        }),
        Err(Error::InvalidInput { field: "limit", .. })
    ));
    Ok(())
}

#[rstest]
fn resolve_writes_nothing_and_last_used_is_flushed_in_batches(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let a = store.keys().create(&NewKey::client("a"))?;
    let b = store.keys().create(&NewKey::client("b"))?;
    let mut observer = None;
    let before = row_versions(&store, &mut observer)?;
    for _ in 0..200 {
        assert!(store.keys().resolve(a.secret.expose())?.is_ok());
        assert!(store.keys().resolve(b.secret.expose())?.is_ok());
    }
    assert_eq!(
        row_versions(&store, &mut observer)?,
        before,
        "a resolve wrote"
    );
    assert_eq!(store.keys().get(a.key.id)?.last_used_at, None);
    assert_eq!(store.keys().flush_last_used()?, 2);
    assert_ne!(row_versions(&store, &mut observer)?, before);
    let used = store
        .keys()
        .get(a.key.id)?
        .last_used_at
        .ok_or("not written")?;
    assert!(used >= a.key.created_at);
    assert!(store.keys().get(b.key.id)?.last_used_at.is_some());
    assert_eq!(store.keys().flush_last_used()?, 0, "nothing left to write");
    Ok(())
}

#[rstest]
fn flusher_writes_last_used_on_its_own_and_on_close() -> TestResult {
    let store = TestStore::with_options(|options: StoreOptions| {
        options.last_used_flush_interval(Duration::from_millis(20))
    })?;
    let key = store.keys().create(&NewKey::client("a"))?;
    assert!(store.keys().resolve(key.secret.expose())?.is_ok());
    // The flusher runs every 20 ms; wait (boundedly) for its write.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.keys().get(key.key.id)?.last_used_at.is_none() {
        assert!(std::time::Instant::now() < deadline, "never flushed");
        std::thread::sleep(Duration::from_millis(5));
    }

    let slow = TestStore::new()?;
    let key = slow.keys().create(&NewKey::client("b"))?;
    assert!(slow.keys().resolve(key.secret.expose())?.is_ok());
    let (report, _folder, path) = slow.close()?;
    assert!(report.checkpoint_complete);
    let reopened = keytally::Store::open(&path)?;
    assert!(reopened.keys().get(key.key.id)?.last_used_at.is_some());
    Ok(())
}

#[rstest]
fn custom_secret_prefix_is_used_and_checked() -> TestResult {
    let store = TestStore::with_options(|options| options.secret_prefix("acme_"))?;
    let created = store.keys().create(&NewKey::client("a"))?;
    assert!(created.secret.expose().starts_with("acme_"));
    assert!(store.keys().resolve(created.secret.expose())?.is_ok());
    let default_prefixed = format!("kt_{}", &created.secret.expose()[5..]);
    assert_eq!(
        store.keys().resolve(&default_prefixed)?,
        Err(Rejection::Malformed)
    );
    assert!(matches!(
        TestStore::with_options(|options| options.secret_prefix("bad prefix")),
        Err(Error::InvalidInput {
            field: "secret_prefix",
            ..
        })
    ));
    Ok(())
}

/// The database's count of changes to existing keys and secrets.
fn key_changes(store: &TestStore) -> Result<i64, Box<dyn std::error::Error>> {
    Ok(raw(store)?.number("SELECT next AS n FROM sequences WHERE name = 'key_changes'")?)
}

#[rstest]
fn only_changes_to_existing_keys_move_the_key_change_count(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let start = key_changes(&store)?;
    // Adding keys and using them (last_used_at) leaves every resolved
    // answer as it was.
    let created = store.keys().create(&NewKey::client("counted"))?;
    store.keys().create(&NewKey::client("other"))?;
    assert!(store.keys().resolve(created.secret.expose())?.is_ok());
    assert_eq!(store.keys().flush_last_used()?, 1);
    assert!(store.keys().get(created.key.id)?.last_used_at.is_some());
    assert_eq!(key_changes(&store)?, start);
    // Every change to a key that exists counts.
    let update = KeyUpdate {
        label: Some("renamed".to_owned()),
        ..KeyUpdate::default()
    };
    store.keys().update(created.key.id, &update)?;
    assert_eq!(key_changes(&store)?, start + 1);
    store
        .keys()
        .rotate(created.key.id, Duration::from_secs(60))?;
    assert!(key_changes(&store)? > start + 1);
    let before_revoke = key_changes(&store)?;
    store.keys().revoke(created.key.id)?;
    assert_eq!(key_changes(&store)?, before_revoke + 1);
    // Revoking again changes nothing, and counts nothing.
    store.keys().revoke(created.key.id)?;
    assert_eq!(key_changes(&store)?, before_revoke + 1);
    Ok(())
}

#[rstest]
fn keys_are_never_deleted_so_their_row_ids_are_never_reused(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let first = store.keys().create(&NewKey::client("first"))?;
    let mut event = keytally::NewEvent::new(Timestamp::now(), "gpt-4o");
    event.key_id = Some(first.key.id);
    event.prompt_tokens = 100;
    store.events().record(&event)?;
    let deleted = raw(&store)?.execute("DELETE FROM keys");
    assert!(deleted.is_err(), "a key was deleted: {deleted:?}");
    let moved = raw(&store)?.execute("UPDATE keys SET row_id = row_id + 1000");
    assert!(moved.is_err(), "{moved:?}");
    // The first key and its usage are still there, and a new key's usage
    // starts at zero.
    assert_eq!(store.keys().get(first.key.id)?.label, "first");
    let second = store.keys().create(&NewKey::client("second"))?;
    let window = |key: KeyId| keytally::UsageFilter {
        key: Some(key),
        ..keytally::UsageFilter::between(
            Timestamp::now().plus_millis(-3_600_000),
            Timestamp::now().plus_millis(1),
        )
    };
    assert_eq!(
        store.events().usage(&window(first.key.id))?.prompt_tokens,
        100
    );
    assert_eq!(store.events().usage(&window(second.key.id))?.requests, 0);
    Ok(())
}

#[rstest]
fn a_revoked_key_cannot_be_updated(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let store = store_on(backend);
    let created = store.keys().create(&NewKey::client("revoked"))?;
    store.keys().revoke(created.key.id)?;
    let update = store.keys().update(
        created.key.id,
        &KeyUpdate {
            label: Some("renamed".to_owned()),
            ..KeyUpdate::default()
        },
    );
    assert!(
        matches!(update, Err(Error::KeyRevoked { .. })),
        "{update:?}"
    );
    assert_eq!(store.keys().get(created.key.id)?.label, "revoked");
    Ok(())
}
