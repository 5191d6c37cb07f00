//! Resolving in notified mode: a revoke committed by one store reaches the
//! others' caches (on PostgreSQL through `LISTEN`/`NOTIFY`, on SQLite
//! through the watcher's reads), a change made through a store is seen by
//! its own next resolve, and a PostgreSQL replica whose listener is cut off
//! resolves strictly instead of trusting what it last heard.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use keytally::testing::postgres;
use keytally::{
    AllowedModels, Backend, KeyUpdate, NewKey, Rejection, ResolveMode, Store, StoreOptions,
};
use rstest::rstest;

use crate::TestResult;

fn notified(location: &str) -> keytally::Result<Store> {
    StoreOptions::new(location)
        .resolve_mode(ResolveMode::Notified)
        .open()
}

/// A database for several stores: a fresh PostgreSQL database, or an SQLite
/// file in a folder that lives as long as the returned guard.
fn shared_database(
    backend: Backend,
) -> Result<(String, Option<tempfile::TempDir>), Box<dyn std::error::Error>> {
    Ok(match backend {
        Backend::Postgres => (postgres::server()?.fresh_database()?, None),
        Backend::Sqlite => {
            let folder = tempfile::tempdir()?;
            let path = folder.path().join("keytally.db");
            let path = path.to_str().ok_or("path is not UTF-8")?.to_owned();
            (path, Some(folder))
        }
    })
}

#[rstest]
fn a_revoke_in_another_store_reaches_a_notified_store(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (location, _folder) = shared_database(backend)?;
    let replica = notified(&location)?;
    let other = Store::open(&location)?;
    for _ in 0..3 {
        let created = other.keys().create(&NewKey::client("revoked elsewhere"))?;
        let secret = created.secret.expose().to_owned();
        // Read once, then answered from memory.
        assert!(replica.keys().resolve(&secret)?.is_ok());
        assert!(replica.keys().resolve(&secret)?.is_ok());
        other.keys().revoke(created.key.id)?;
        let revoked_at = Instant::now();
        loop {
            match replica.keys().resolve(&secret)? {
                Err(Rejection::Revoked) => break,
                Ok(_) => assert!(
                    revoked_at.elapsed() < Duration::from_secs(2),
                    "still accepted 2 s after the revoke"
                ),
                Err(other) => return Err(format!("{other:?}").into()),
            }
        }
    }
    assert!(replica.close()?.checkpoint_complete);
    assert!(other.close()?.checkpoint_complete);
    Ok(())
}

#[rstest]
fn a_change_through_a_notified_store_is_seen_by_its_next_resolve(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let (location, _folder) = shared_database(backend)?;
    let store = notified(&location)?;
    let keys = store.keys();
    for round in 0..20 {
        let revoked = keys.create(&NewKey::client(format!("revoked {round}")))?;
        let rotated = keys.create(&NewKey::client(format!("rotated {round}")))?;
        let narrowed = keys.create(&NewKey::client(format!("narrowed {round}")))?;
        for created in [&revoked, &rotated, &narrowed] {
            // Read once, then answered from memory.
            assert!(keys.resolve(created.secret.expose())?.is_ok());
            assert!(keys.resolve(created.secret.expose())?.is_ok());
        }
        keys.revoke(revoked.key.id)?;
        assert_eq!(
            keys.resolve(revoked.secret.expose())?,
            Err(Rejection::Revoked),
            "round {round}"
        );
        keys.rotate(rotated.key.id, Duration::ZERO)?;
        assert_eq!(
            keys.resolve(rotated.secret.expose())?,
            Err(Rejection::Expired),
            "round {round}"
        );
        keys.update(
            narrowed.key.id,
            &KeyUpdate {
                allowed_models: Some(AllowedModels::from_names(&["gpt-4o"])?),
                ..KeyUpdate::default()
            },
        )?;
        let active = keys
            .resolve(narrowed.secret.expose())?
            .map_err(|rejection| format!("{rejection:?}"))?;
        assert!(!active.may_use("gpt-4o-mini"), "round {round}");
    }
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[test]
fn a_replica_whose_listener_is_cut_off_resolves_strictly() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let name = url
        .split_once("@/")
        .and_then(|(_, rest)| rest.split('?').next())
        .ok_or("no database name")?
        .to_owned();
    let role = format!("{name}_gateway");
    let mut admin = PgConnection::establish(&url)?;
    admin.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; ALTER DATABASE {name} OWNER TO {role}; \
         ALTER SCHEMA public OWNER TO {role}"
    ))?;
    let gateway_url = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let replica = notified(&gateway_url)?;
    let created = replica.keys().create(&NewKey::client("cut off"))?;
    let secret = created.secret.expose().to_owned();
    assert!(replica.keys().resolve(&secret)?.is_ok());
    // No new connection for the gateway's role: the listener, once cut
    // off, cannot come back. The pool's open connections stay.
    admin.batch_execute(&format!(
        "ALTER ROLE {role} CONNECTION LIMIT 0; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE usename = '{role}' AND application_name = 'keytally-listener'"
    ))?;
    std::thread::sleep(Duration::from_millis(300));
    // Revoked by hand, as another replica would: no notification can reach
    // the cut-off listener.
    admin.batch_execute(
        "UPDATE keys SET revoked_at = 1 WHERE row_id = (SELECT min(row_id) FROM keys)",
    )?;
    assert_eq!(
        replica.keys().resolve(&secret)?,
        Err(Rejection::Revoked),
        "a resolve after the revoke trusted a listener that is gone"
    );
    admin.batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))?;
    assert!(replica.close()?.checkpoint_complete);
    Ok(())
}
