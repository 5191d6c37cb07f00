//! Resolving in notified mode on PostgreSQL: a revoke committed by one
//! replica reaches the others' caches through `LISTEN`/`NOTIFY`, and a
//! replica whose listener is cut off resolves strictly instead of trusting
//! what it last heard.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use keytally::testing::postgres;
use keytally::{NewKey, Rejection, ResolveMode, Store, StoreOptions};

use crate::TestResult;

fn notified(url: &str) -> keytally::Result<Store> {
    StoreOptions::new(url)
        .resolve_mode(ResolveMode::Notified)
        .open()
}

#[test]
fn a_revoke_on_one_replica_reaches_a_notified_replica() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let replica = notified(&url)?;
    let other = Store::open(&url)?;
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
