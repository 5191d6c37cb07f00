//! Files that are not a keytally database this binary can use: each is
//! refused with its own typed error, and left byte-for-byte unchanged.

use std::path::{Path, PathBuf};

use diesel::connection::SimpleConnection;
use keytally::testing::folder;
use keytally::{Error, KeyId, KeyUpdate, NewEvent, NewKey, Store, Timestamp};
use rstest::rstest;
use tempfile::TempDir;

use crate::{raw_connection, sidecar, TestResult};

/// Opens `path`, expects an error, and checks that the file's bytes did not
/// change and that no sidecar file was left behind.
fn open_refused(path: &Path) -> Result<Error, Box<dyn std::error::Error>> {
    let before = std::fs::read(path)?;
    let error = match Store::open(path) {
        Ok(store) => {
            let _ = store.close();
            return Err("the file was opened".into());
        }
        Err(error) => error,
    };
    assert_eq!(std::fs::read(path)?, before, "the refused file changed");
    assert!(!sidecar(path, "-wal").exists(), "a -wal was left behind");
    assert!(!sidecar(path, "-shm").exists(), "a -shm was left behind");
    Ok(error)
}

fn keytally_database(folder: &TempDir) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = folder.path().join("keytally.db");
    let store = Store::open(&path)?;
    store.sqlite_write(|conn| {
        diesel::RunQueryDsl::execute(
            diesel::sql_query("INSERT INTO models (name) VALUES ('gpt-4o'), ('o3')"),
            conn,
        )?;
        Ok(())
    })?;
    assert!(store.close()?.checkpoint_complete);
    Ok(path)
}

#[rstest]
fn garbage_file_is_not_a_database(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, garbage)?;
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::NotADatabase { .. }), "{error:?}");
    assert!(error.to_string().contains("not an SQLite database"));
    Ok(())
}

#[rstest]
fn zero_filled_header_is_not_a_database(folder: TempDir) -> TestResult {
    let path = keytally_database(&folder)?;
    let mut bytes = std::fs::read(&path)?;
    bytes[..100].fill(0);
    std::fs::write(&path, bytes)?;
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::NotADatabase { .. }), "{error:?}");
    Ok(())
}

#[rstest]
#[case::to_half(2)]
#[case::to_a_page_and_a_bit(0)]
#[case::inside_the_header(1)]
fn truncated_database_is_corrupt(folder: TempDir, #[case] how: u8) -> TestResult {
    let path = keytally_database(&folder)?;
    let length = std::fs::metadata(&path)?.len();
    let new_length = match how {
        2 => length / 2,
        1 => 60,
        _ => 4096 + 100,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(new_length)?;
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::Corrupt { .. }), "{error:?}");
    assert!(error.to_string().contains("restore it from a backup"));
    Ok(())
}

#[rstest]
fn foreign_sqlite_database_is_refused(folder: TempDir) -> TestResult {
    let path = folder.path().join("other.db");
    {
        let mut conn = raw_connection(&path)?;
        conn.batch_execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hello');")?;
    }
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::Foreign { .. }), "{error:?}");
    Ok(())
}

#[rstest]
fn database_with_another_application_id_is_refused(folder: TempDir) -> TestResult {
    let path = folder.path().join("other.db");
    {
        let mut conn = raw_connection(&path)?;
        conn.batch_execute("PRAGMA application_id = 1234;")?;
    }
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::Foreign { .. }), "{error:?}");
    assert!(error.to_string().contains("0x000004d2"), "{error}");
    Ok(())
}

#[rstest]
fn database_from_a_newer_keytally_is_refused(folder: TempDir) -> TestResult {
    let path = keytally_database(&folder)?;
    {
        let mut conn = raw_connection(&path)?;
        conn.batch_execute(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('29991231235959');",
        )?;
    }
    let error = open_refused(&path)?;
    let Error::SchemaTooNew { unknown, .. } = &error else {
        return Err(format!("unexpected error {error:?}").into());
    };
    assert_eq!(unknown, &vec!["29991231235959".to_owned()]);
    assert!(error.to_string().contains("upgrade keytally"));
    Ok(())
}

#[rstest]
fn symlinked_path_is_refused(folder: TempDir) -> TestResult {
    let real = keytally_database(&folder)?;
    let link = folder.path().join("link.db");
    std::os::unix::fs::symlink(&real, &link)?;
    let before = std::fs::read(&real)?;
    let error = match Store::open(&link) {
        Ok(_) => return Err("a symlinked database was opened".into()),
        Err(error) => error,
    };
    assert!(matches!(error, Error::Symlink { .. }), "{error:?}");
    assert_eq!(std::fs::read(&real)?, before);
    Ok(())
}

#[rstest]
fn dangling_symlink_is_refused_and_nothing_is_created(folder: TempDir) -> TestResult {
    let target = folder.path().join("target.db");
    let link = folder.path().join("link.db");
    std::os::unix::fs::symlink(&target, &link)?;
    let error = match Store::open(&link) {
        Ok(_) => return Err("a dangling symlink was followed".into()),
        Err(error) => error,
    };
    assert!(matches!(error, Error::Symlink { .. }), "{error:?}");
    assert!(!target.exists());
    Ok(())
}

/// Writes a write-ahead log of another database (with `setup` run first)
/// next to `database`.
fn plant_foreign_wal(
    folder: &TempDir,
    database: &Path,
    setup: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let other = folder.path().join("other.db");
    let mut conn = raw_connection(&other)?;
    conn.batch_execute(setup)?;
    conn.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
         CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('not yours');",
    )?;
    // Copy the log while its connection is open, as a crash would leave it.
    let wal = std::fs::read(sidecar(&other, "-wal"))?;
    assert!(!wal.is_empty());
    std::fs::write(sidecar(database, "-wal"), &wal)?;
    drop(conn);
    Ok(wal)
}

#[rstest]
#[case::another_application("PRAGMA application_id = 42;")]
#[case::another_page_size("PRAGMA page_size = 1024;")]
fn a_wal_of_another_database_is_refused(folder: TempDir, #[case] setup: &str) -> TestResult {
    let path = keytally_database(&folder)?;
    let before = std::fs::read(&path)?;
    let wal = plant_foreign_wal(&folder, &path, setup)?;
    let error = match Store::open(&path) {
        Ok(_) => return Err("a foreign -wal was replayed".into()),
        Err(error) => error,
    };
    let Error::Foreign { path: refused, .. } = &error else {
        return Err(format!("unexpected error {error:?}").into());
    };
    assert_eq!(refused, &sidecar(&path, "-wal"));
    assert!(
        error.to_string().contains("belongs to another database"),
        "{error}"
    );
    assert_eq!(std::fs::read(&path)?, before);
    assert_eq!(std::fs::read(sidecar(&path, "-wal"))?, wal);
    Ok(())
}

#[rstest]
fn a_read_only_folder_is_a_clear_error_at_open(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("ro");
    let tmpfs = crate::support::tmpfs::Tmpfs::mount(&mount_point, "4m")?;
    let path = mount_point.join("keytally.db");
    assert!(Store::open(&path)?.close()?.checkpoint_complete);
    let before = std::fs::read(&path)?;
    tmpfs.make_read_only()?;
    let error = match Store::open(&path) {
        Ok(_) => return Err("a database on a read-only filesystem was opened".into()),
        Err(error) => error,
    };
    assert!(matches!(error, Error::Permission { .. }), "{error:?}");
    // The system's reason is the error's source, not repeated in its message.
    let reason = std::error::Error::source(&error).map(ToString::to_string);
    assert!(
        reason
            .as_deref()
            .is_some_and(|reason| reason.contains("Read-only file system")),
        "{error}: {reason:?}"
    );
    assert_eq!(std::fs::read(&path)?, before);
    Ok(())
}

#[rstest]
fn a_half_written_frame_in_a_live_log_is_not_taken_for_a_stranger(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    // A real log of this database, copied while a store holds it open.
    let store = Store::open(&path)?;
    store.sqlite_write(|conn| {
        diesel::RunQueryDsl::execute(
            diesel::sql_query("INSERT INTO models (name) VALUES ('gpt-4o')"),
            conn,
        )?;
        Ok(())
    })?;
    let mut wal = std::fs::read(sidecar(&path, "-wal"))?;
    let main = std::fs::read(&path)?;
    drop(store);
    assert!(wal.len() > 32, "no log to copy");
    // Another writer has written the header of a page-1 frame but not yet its
    // page: salts that match, a zeroed page, a checksum that does not hold.
    let mut frame = vec![0u8; 24 + 4096];
    frame[..4].copy_from_slice(&1u32.to_be_bytes());
    frame[8..16].copy_from_slice(&wal[16..24]);
    wal.extend_from_slice(&frame);
    std::fs::write(&path, &main)?;
    std::fs::write(sidecar(&path, "-wal"), &wal)?;
    let _ = std::fs::remove_file(sidecar(&path, "-shm"));
    let store = Store::open(&path)?;
    let mut conn = store.sqlite_connection()?;
    let names: i64 = diesel::RunQueryDsl::get_result::<Count>(
        diesel::sql_query("SELECT count(*) AS n FROM models"),
        &mut *conn,
    )?
    .n;
    assert_eq!(names, 1, "the committed part of the log was replayed");
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Writes a file with keytally's mode, 0600.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// Opens `path`, checks it, and returns how many models it holds.
fn opens_whole(path: &Path) -> Result<i64, Box<dyn std::error::Error>> {
    let store = Store::open(path)?;
    let check = store.check()?;
    assert!(check.healthy(), "{:?}", check.problems);
    let mut conn = store.sqlite_connection()?;
    Ok(diesel::RunQueryDsl::get_result::<Count>(
        diesel::sql_query("SELECT count(*) AS n FROM models"),
        &mut *conn,
    )?
    .n)
}

/// A database and its log as a crash left them.
struct Crashed {
    path: PathBuf,
    main: Vec<u8>,
    wal: Vec<u8>,
}

/// Copies `database` and its log as a crash would leave them, after
/// `write` ran on a store that is still open.
fn crashed_copy(folder: &TempDir, write: &str) -> Result<Crashed, Box<dyn std::error::Error>> {
    let path = folder.path().join("keytally.db");
    let store = Store::open(&path)?;
    store.sqlite_write(|conn| {
        conn.batch_execute(write)?;
        Ok(())
    })?;
    let wal = std::fs::read(sidecar(&path, "-wal"))?;
    let main = std::fs::read(&path)?;
    drop(store);
    Ok(Crashed { path, main, wal })
}

#[rstest]
fn a_page_one_torn_by_a_power_loss_is_read_from_the_log(folder: TempDir) -> TestResult {
    // Enough rows to grow the file, so that page 1 (which records the
    // database's size) is in the log.
    let Crashed {
        path,
        mut main,
        wal,
    } = crashed_copy(
        &folder,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
         INSERT INTO models (name) SELECT 'model-' || i FROM n",
    )?;
    // A checkpoint was writing page 1 back when the power went: its first
    // sector holds garbage.
    for (i, byte) in main[..512].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    std::fs::write(&path, &main)?;
    write_private(&sidecar(&path, "-wal"), &wal)?;
    let _ = std::fs::remove_file(sidecar(&path, "-shm"));
    assert_eq!(opens_whole(&path)?, 2000);
    Ok(())
}

#[rstest]
fn a_torn_page_one_without_a_whole_copy_in_the_log_is_still_refused(folder: TempDir) -> TestResult {
    let Crashed { path, mut main, .. } =
        crashed_copy(&folder, "INSERT INTO models (name) VALUES ('a')")?;
    for byte in &mut main[..512] {
        *byte = 0x5a;
    }
    std::fs::write(&path, &main)?;
    let _ = std::fs::remove_file(sidecar(&path, "-wal"));
    let _ = std::fs::remove_file(sidecar(&path, "-shm"));
    let error = open_refused(&path)?;
    assert!(matches!(error, Error::NotADatabase { .. }), "{error:?}");
    Ok(())
}

#[rstest]
fn a_page_one_torn_during_a_restore_is_read_from_its_journal(folder: TempDir) -> TestResult {
    let path = keytally_database(&folder)?;
    // A transaction in rollback-journal mode, as a restore writes, with a
    // cache too small to hold it: pages reach the file before the commit,
    // page 1 among them, and the journal holds their old content.
    let mut conn = raw_connection(&path)?;
    conn.batch_execute(
        "PRAGMA journal_mode = DELETE; PRAGMA cache_size = 2; BEGIN; \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
         INSERT INTO models (name) SELECT 'model-' || i FROM n;",
    )?;
    let journal = std::fs::read(sidecar(&path, "-journal"))?;
    let mut main = std::fs::read(&path)?;
    drop(conn);
    for byte in &mut main[..512] {
        *byte = 0xa5;
    }
    std::fs::write(&path, &main)?;
    write_private(&sidecar(&path, "-journal"), &journal)?;
    assert_eq!(opens_whole(&path)?, 2, "the journal was played back");
    Ok(())
}

/// The log `write` leaves beside the keytally database at `path`, copied
/// while its store is still open (as a crash leaves it).
fn log_left_by(
    path: &Path,
    write: impl FnOnce(&Store) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let store = Store::open(path)?;
    write(&store)?;
    let wal = std::fs::read(sidecar(path, "-wal"))?;
    assert!(wal.len() > 32, "no log to copy");
    drop(store);
    Ok(wal)
}

/// A closed keytally database at `path` with one key labelled `label`.
fn database_with_a_key(path: &Path, label: &str) -> Result<KeyId, Box<dyn std::error::Error>> {
    let store = Store::open(path)?;
    let id = store.keys().create(&NewKey::client(label))?.key.id;
    assert!(store.close()?.checkpoint_complete);
    Ok(id)
}

/// Opens `path` with `wal` beside it and expects the log to be refused as
/// another database's, with the database and the log left as they were.
fn refused_as_anothers(path: &Path, wal: &[u8]) -> TestResult {
    let before = std::fs::read(path)?;
    write_private(&sidecar(path, "-wal"), wal)?;
    let error = match Store::open(path) {
        Ok(_) => return Err("another keytally database's -wal was replayed".into()),
        Err(error) => error,
    };
    let Error::Foreign { path: refused, .. } = &error else {
        return Err(format!("unexpected error {error:?}").into());
    };
    assert_eq!(refused, &sidecar(path, "-wal"));
    assert!(error.to_string().contains("identity differs"), "{error}");
    assert_eq!(std::fs::read(path)?, before);
    assert_eq!(std::fs::read(sidecar(path, "-wal"))?, wal);
    Ok(())
}

#[rstest]
fn a_log_of_another_keytally_database_is_refused(folder: TempDir) -> TestResult {
    // Two databases made the same way: the same schema, the same page size,
    // the same application id, a key with the same row in each.
    let path = folder.path().join("keytally.db");
    let id = database_with_a_key(&path, "ours")?;
    let other = folder.path().join("other.db");
    let their_id = database_with_a_key(&other, "theirs")?;
    let relabelled = log_left_by(&other, |store| {
        let update = KeyUpdate {
            label: Some("changed by a stranger".to_owned()),
            ..KeyUpdate::default()
        };
        store.keys().update(their_id, &update)?;
        Ok(())
    })?;
    refused_as_anothers(&path, &relabelled)?;
    let recorded = log_left_by(&other, |store| {
        for n in 0..50 {
            store.events().record(&NewEvent::new(
                Timestamp::from_millis(1_790_000_000_000 + n)?,
                "gpt-4o",
            ))?;
        }
        Ok(())
    })?;
    refused_as_anothers(&path, &recorded)?;
    // Without the stranger's log the database is as it was.
    std::fs::remove_file(sidecar(&path, "-wal"))?;
    let store = Store::open(&path)?;
    assert_eq!(store.keys().get(id)?.label, "ours");
    assert!(store.check()?.healthy());
    Ok(())
}

#[rstest]
fn a_log_of_a_database_opened_from_a_backup_is_refused(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let _ = database_with_a_key(&path, "ours")?;
    let backup = folder.path().join("nightly.db");
    {
        let store = Store::open(&path)?;
        let _ = store.backup_to(&backup, false)?;
        let _ = store.close()?;
    }
    // The backup, put to use elsewhere, writes a log of its own.
    let wal = log_left_by(&backup, |store| {
        store
            .events()
            .record(&NewEvent::new(Timestamp::now(), "gpt-4o"))?;
        Ok(())
    })?;
    refused_as_anothers(&path, &wal)
}

#[rstest]
fn a_log_of_this_database_is_replayed(folder: TempDir) -> TestResult {
    let path = folder.path().join("keytally.db");
    let id = database_with_a_key(&path, "before")?;
    let main = std::fs::read(&path)?;
    let wal = log_left_by(&path, |store| {
        let update = KeyUpdate {
            label: Some("after".to_owned()),
            ..KeyUpdate::default()
        };
        store.keys().update(id, &update)?;
        Ok(())
    })?;
    // The database as the crash left it: the file before any checkpoint,
    // the change only in the log.
    std::fs::write(&path, &main)?;
    write_private(&sidecar(&path, "-wal"), &wal)?;
    let _ = std::fs::remove_file(sidecar(&path, "-shm"));
    let store = Store::open(&path)?;
    assert_eq!(store.keys().get(id)?.label, "after");
    Ok(())
}
