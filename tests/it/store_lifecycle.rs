//! Opening, pragmas, permissions, concurrency and closing of a real store.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::{folder, store, TestStore};
use keytally::{Store, StoreOptions, Synchronous};
use rstest::rstest;
use tempfile::TempDir;

use crate::{mode_of, sidecar, TestResult};

#[derive(QueryableByName)]
struct IntValue {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct TextValue {
    #[diesel(sql_type = Text)]
    value: String,
}

fn pragma_int(conn: &mut diesel::SqliteConnection, name: &str) -> diesel::QueryResult<i64> {
    // Each pragma names its result column after itself, but for busy_timeout.
    let column = if name == "busy_timeout" {
        "timeout"
    } else {
        name
    };
    let row: IntValue = diesel::sql_query(format!("SELECT {column} AS value FROM pragma_{name}"))
        .get_result(conn)?;
    Ok(row.value)
}

#[rstest]
fn fresh_folder_is_created_migrated_and_private(folder: TempDir) -> TestResult {
    let path = folder
        .path()
        .join("nested")
        .join("data")
        .join("keytally.db");
    let store = Store::open(&path)?;
    assert_eq!(
        store.applied_at_open().len(),
        keytally::known_versions()?.len()
    );
    let status = store.status()?;
    assert_eq!(status.journal_mode, "wal");
    assert_eq!(status.application_id, keytally::APPLICATION_ID);
    assert_eq!(
        status.user_version,
        keytally::known_versions()?.len() as i64
    );
    assert!(status.pending_migrations.is_empty());
    assert_eq!(mode_of(&path)?, 0o600);
    assert_eq!(mode_of(&folder.path().join("nested"))?, 0o700);
    assert_eq!(mode_of(&folder.path().join("nested").join("data"))?, 0o700);
    for file in &status.files {
        assert_eq!(file.mode, "0600", "{} has mode {}", file.name, file.mode);
    }
    assert!(status.files.iter().any(|f| f.name == "keytally.db-wal"));
    store
        .close()?
        .checkpoint_complete
        .then_some(())
        .ok_or("checkpoint incomplete")?;
    Ok(())
}

#[rstest]
fn second_open_applies_nothing_and_changes_nothing(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let report = Store::open(&path)?.close()?;
    assert!(report.checkpoint_complete);
    let before = std::fs::read(&path)?;
    let store = Store::open(&path)?;
    assert!(store.applied_at_open().is_empty());
    assert!(store.tightened_at_open().is_empty());
    let report = store.close()?;
    assert!(report.checkpoint_complete);
    assert_eq!(std::fs::read(&path)?, before, "database bytes changed");
    Ok(())
}

#[rstest]
fn every_pooled_connection_has_the_pragmas(folder: TempDir) -> TestResult {
    let store = StoreOptions::new(folder.path().join("keytally.db"))
        .pool_size(4)
        .busy_timeout(std::time::Duration::from_millis(1234))
        .synchronous(Synchronous::Full)
        .open()?;
    // Hold every connection at once so each one is a distinct connection.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(store.sqlite_connection()?);
    }
    for conn in &mut held {
        let conn = &mut **conn;
        assert_eq!(pragma_int(conn, "busy_timeout")?, 1234);
        assert_eq!(pragma_int(conn, "synchronous")?, 2, "FULL is 2");
        assert_eq!(pragma_int(conn, "foreign_keys")?, 1);
        let mode: TextValue =
            diesel::sql_query("SELECT journal_mode AS value FROM pragma_journal_mode")
                .get_result(conn)?;
        assert_eq!(mode.value, "wal");
    }
    drop(held);
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[rstest]
fn default_synchronous_is_normal(store: TestStore) -> TestResult {
    let mut conn = store.sqlite_connection()?;
    assert_eq!(pragma_int(&mut conn, "synchronous")?, 1, "NORMAL is 1");
    assert_eq!(store.status()?.synchronous, "normal");
    Ok(())
}

#[rstest]
fn wider_modes_are_tightened_and_reported(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    assert!(Store::open(&path)?.close()?.checkpoint_complete);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    let store = Store::open(&path)?;
    let tightened = store.tightened_at_open();
    assert_eq!(tightened.len(), 1);
    assert_eq!(tightened[0].path, path);
    assert_eq!(tightened[0].found_mode, 0o644);
    assert_eq!(mode_of(&path)?, 0o600);
    // The sidecars SQLite created after the repair carry the repaired mode.
    assert_eq!(mode_of(&sidecar(&path, "-shm"))?, 0o600);
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[rstest]
fn concurrent_first_opens_all_succeed_and_migrate_once(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let openers = 6;
    let barrier = Arc::new(Barrier::new(openers));
    let handles: Vec<_> = (0..openers)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let path = path.clone();
            std::thread::spawn(move || {
                barrier.wait();
                Store::open(&path)
            })
        })
        .collect();
    let mut applied = 0;
    let mut stores = Vec::new();
    for handle in handles {
        let store = handle.join().map_err(|_| "opener thread panicked")??;
        applied += store.applied_at_open().len();
        stores.push(store);
    }
    assert_eq!(applied, keytally::known_versions()?.len());
    for store in stores {
        let status = store.status()?;
        assert!(status.pending_migrations.is_empty());
        let _ = store.close()?;
    }
    Ok(())
}

#[rstest]
fn close_leaves_no_sidecars(store: TestStore) -> TestResult {
    store.sqlite_write(|conn| {
        diesel::sql_query("INSERT INTO models (name) VALUES ('gpt-4o'), ('o3')").execute(conn)?;
        Ok(())
    })?;
    let (report, _folder, path) = store.close()?;
    assert!(report.checkpoint_complete);
    assert!(report.sidecars_gone);
    assert_eq!(report.connections_still_out, 0);
    assert!(!sidecar(&path, "-wal").exists());
    assert!(!sidecar(&path, "-shm").exists());
    // The committed rows are in the main file itself.
    let mut conn = crate::raw_connection(&path)?;
    let row: IntValue =
        diesel::sql_query("SELECT count(*) AS value FROM models").get_result(&mut conn)?;
    assert_eq!(row.value, 2);
    Ok(())
}

#[rstest]
fn close_reports_an_incomplete_checkpoint(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let store = StoreOptions::new(&path)
        .busy_timeout(std::time::Duration::from_millis(200))
        .open()?;
    store.sqlite_write(|conn| {
        diesel::sql_query("INSERT INTO models (name) VALUES ('gpt-4o')").execute(conn)?;
        Ok(())
    })?;
    // Another connection holds a read snapshot, so TRUNCATE cannot finish.
    let mut reader = crate::raw_connection(&path)?;
    diesel::connection::SimpleConnection::batch_execute(&mut reader, "BEGIN")?;
    let row: IntValue =
        diesel::sql_query("SELECT count(*) AS value FROM models").get_result(&mut reader)?;
    assert_eq!(row.value, 1);
    diesel::sql_query("INSERT INTO models (name) VALUES ('o3')")
        .execute(&mut *store.sqlite_connection()?)?;
    let report = store.close()?;
    assert!(!report.checkpoint_complete, "{report:?}");
    assert!(!report.sidecars_gone);
    diesel::connection::SimpleConnection::batch_execute(&mut reader, "COMMIT")?;
    Ok(())
}

#[rstest]
fn writes_take_the_lock_up_front(store: TestStore) -> TestResult {
    // A write transaction holds the write lock from BEGIN: a second
    // connection cannot start one while it is open.
    let mut other = crate::raw_connection(store.path())?;
    diesel::connection::SimpleConnection::batch_execute(&mut other, "PRAGMA busy_timeout = 0")?;
    store.sqlite_write(|_conn| {
        let attempt =
            diesel::connection::SimpleConnection::batch_execute(&mut other, "BEGIN IMMEDIATE");
        assert!(attempt.is_err(), "the write lock was not held");
        Ok(())
    })?;
    Ok(())
}

#[rstest]
fn a_checkpoint_blocked_by_a_reader_gives_way_to_writers(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let store = Arc::new(
        StoreOptions::new(&path)
            .busy_timeout(std::time::Duration::from_millis(400))
            .open()?,
    );
    store.sqlite_write(|conn| {
        diesel::sql_query("INSERT INTO models (name) VALUES ('a')").execute(conn)?;
        Ok(())
    })?;
    // A reader holds an old snapshot, so TRUNCATE has to wait for it; while
    // it waits it blocks writers.
    let mut reader = crate::raw_connection(&path)?;
    diesel::connection::SimpleConnection::batch_execute(&mut reader, "BEGIN")?;
    let row: IntValue =
        diesel::sql_query("SELECT count(*) AS value FROM models").get_result(&mut reader)?;
    assert_eq!(row.value, 1);
    store.sqlite_write(|conn| {
        diesel::sql_query("INSERT INTO models (name) VALUES ('b')").execute(conn)?;
        Ok(())
    })?;
    let checkpointer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.checkpoint())
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A writer queued behind the checkpoint must get through.
    let written = store.sqlite_write(|conn| {
        diesel::sql_query("INSERT INTO models (name) VALUES ('c')").execute(conn)?;
        Ok(())
    });
    let report = checkpointer.join().map_err(|_| "checkpoint panicked")??;
    diesel::connection::SimpleConnection::batch_execute(&mut reader, "COMMIT")?;
    assert!(written.is_ok(), "the writer got {written:?}");
    assert!(
        !report.complete,
        "the reader should have kept it from completing"
    );
    Ok(())
}

#[rstest]
fn upgrade_to_time_ordered_events_keeps_every_event_and_id(folder: TempDir) -> TestResult {
    use diesel::Connection;
    use diesel_migrations::MigrationHarness;
    use keytally::{EventFilter, NewEvent, Timestamp};

    let path = folder.path().join("keytally.db");
    let store = Store::open(&path)?;
    let key = store
        .keys()
        .create(&keytally::NewKey::client("upgrade"))?
        .key
        .id;
    // Times out of order, so that id order and time order differ.
    let batch: Vec<NewEvent> = (0..300i64)
        .map(|i| {
            let mut event = NewEvent::new(
                Timestamp::from_millis(1_793_491_200_000 + (i * 7919 % 300) * 1000)?,
                if i % 2 == 0 { "o3" } else { "gpt-4.1" },
            );
            event.key_id = (i % 3 == 0).then_some(key);
            event.prompt_tokens = i;
            event.request_id = Some(format!("req-{i}"));
            Ok(event)
        })
        .collect::<Result<_, keytally::Error>>()?;
    let ids = store.events().record_batch(&batch)?;
    let all = EventFilter {
        limit: Some(1000),
        ..EventFilter::default()
    };
    let before = store.events().list(&all)?;
    assert_eq!(before.len(), 300);
    assert!(store.close()?.checkpoint_complete);

    // Back to the layout before time-ordered events: a rowid table with its
    // own index on time.
    {
        let mut conn = diesel::SqliteConnection::establish(path.to_str().ok_or("not UTF-8")?)?;
        // The migrations after it first, newest first.
        let known = keytally::known_versions()?;
        let position = known
            .iter()
            .position(|version| version == "202611220312050000")
            .ok_or("no time-ordered events migration")?;
        for expected in known[position..].iter().rev() {
            let reverted = conn
                .revert_last_migration(keytally::MIGRATIONS)
                .map_err(|e| e.to_string())?;
            assert_eq!(&reverted.to_string(), expected);
        }
        let old_index: IntValue = diesel::sql_query(
            "SELECT count(*) AS value FROM sqlite_schema WHERE name = 'events_by_ts'",
        )
        .get_result(&mut conn)?;
        assert_eq!(old_index.value, 1);
    }

    let store = Store::open(&path)?;
    assert_eq!(
        store.applied_at_open().len(),
        keytally::known_versions()?.len() - 3
    );
    assert_eq!(store.events().list(&all)?, before);
    let next = store.events().record(&NewEvent::new(
        Timestamp::from_millis(1_793_491_200_000)?,
        "o3",
    ))?;
    let last = ids.last().ok_or("no ids")?;
    assert_eq!(next.get(), last.get() + 1);
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[rstest]
fn errors_keep_their_cause_as_the_source_and_say_it_once(folder: TempDir) -> TestResult {
    use keytally::Error;
    use std::error::Error as _;
    // A database error keeps Diesel's error, with SQLite's message.
    let store = Store::open(folder.path().join("keytally.db"))?;
    let failed = store.sqlite_write(|conn| {
        diesel::sql_query("SELECT * FROM no_such_table").execute(conn)?;
        Ok(())
    });
    let Err(error) = failed else {
        return Err("a query on a missing table succeeded".into());
    };
    assert!(matches!(error, Error::Database(_)), "{error:?}");
    let cause = error.source().ok_or("the database error has no source")?;
    assert!(cause.to_string().contains("no such table"), "{cause}");
    assert!(!error.to_string().contains("no such table"), "{error}");

    // Busy keeps SQLite's "database is locked".
    let other = StoreOptions::new(store.path())
        .busy_timeout(std::time::Duration::from_millis(50))
        .open()?;
    let mut holder = store.sqlite_connection()?;
    diesel::connection::SimpleConnection::batch_execute(&mut *holder, "BEGIN IMMEDIATE")?;
    let blocked = other.keys().create(&keytally::NewKey::client("blocked"));
    diesel::connection::SimpleConnection::batch_execute(&mut *holder, "ROLLBACK")?;
    drop(holder);
    let Err(busy) = blocked else {
        return Err("a write behind a held lock succeeded".into());
    };
    assert!(matches!(busy, Error::Busy { .. }), "{busy:?}");
    let cause = busy.source().ok_or("busy has no source")?;
    assert!(cause.to_string().contains("locked"), "{cause}");
    let _ = other.close()?;

    // An I/O error names the path once and keeps the system's reason.
    let blocker = folder.path().join("a-file");
    std::fs::write(&blocker, b"not a folder")?;
    let error = match Store::open(blocker.join("keytally.db")) {
        Ok(_) => return Err("a database under a file was opened".into()),
        Err(error) => error,
    };
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    let cause = error
        .source()
        .ok_or("the i/o error has no source")?
        .to_string();
    assert!(
        !error.to_string().contains(&cause),
        "{error} repeats {cause}"
    );
    let _ = store.close()?;
    Ok(())
}

#[rstest]
fn a_write_inside_a_write_of_the_same_store_is_an_error_not_a_deadlock(
    folder: TempDir,
) -> TestResult {
    let store = Arc::new(Store::open(folder.path().join("keytally.db"))?);
    let (done, outcome) = std::sync::mpsc::channel();
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let nested = store.sqlite_write(|_outer| {
                // The repositories write through the same gate.
                Ok(store.keys().create(&keytally::NewKey::client("nested")))
            });
            let _ = done.send(nested.map(|inner| inner.map(|_| ())));
        })
    };
    // A bound on the wait, so that a deadlock fails the test instead of
    // hanging it.
    let outcome = outcome
        .recv_timeout(std::time::Duration::from_secs(30))
        .map_err(|_| "the nested write never returned")?;
    assert!(
        matches!(outcome, Ok(Err(keytally::Error::NestedWrite))),
        "{outcome:?}"
    );
    writer.join().map_err(|_| "the writer panicked")?;
    // The outer write committed nothing it should not have, and the store
    // still writes.
    assert!(store
        .keys()
        .list(&keytally::KeyFilter::default())?
        .is_empty());
    store
        .keys()
        .create(&keytally::NewKey::client("afterwards"))?;
    let store = Arc::into_inner(store).ok_or("the store is still shared")?;
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}

#[rstest]
fn a_write_nested_through_another_store_back_into_the_first_is_refused(
    folder: TempDir,
) -> TestResult {
    let first = Arc::new(Store::open(folder.path().join("first.db"))?);
    let second = Arc::new(Store::open(folder.path().join("second.db"))?);
    let (done, outcome) = std::sync::mpsc::channel();
    let writer = {
        let (first, second) = (Arc::clone(&first), Arc::clone(&second));
        std::thread::spawn(move || {
            let nested = first.sqlite_write(|_| {
                // A write of another store inside is fine...
                second.sqlite_write(|_| {
                    // ...but not one of the first store again.
                    Ok(first.keys().create(&keytally::NewKey::client("nested")))
                })
            });
            let _ = done.send(nested.map(|inner| inner.map(|_| ())));
        })
    };
    let outcome = outcome
        .recv_timeout(std::time::Duration::from_secs(30))
        .map_err(|_| "the nested write never returned")?;
    assert!(
        matches!(outcome, Ok(Err(keytally::Error::NestedWrite))),
        "{outcome:?}"
    );
    writer.join().map_err(|_| "the writer panicked")?;
    for store in [first, second] {
        let store = Arc::into_inner(store).ok_or("the store is still shared")?;
        assert!(store.close()?.checkpoint_complete);
    }
    Ok(())
}
