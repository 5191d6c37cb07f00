//! Reading a database that cannot be written: on a full disk and on a
//! read-only filesystem every command that only reads answers (opening the
//! store read-only by itself, with a note), `backup` copies to another
//! filesystem, and after space is freed the next write succeeds. Also
//! `--read-only` and `StoreOptions::read_only` directly.

use std::path::Path;

use keytally::testing::folder;
use keytally::{Error, NewKey, Store, StoreOptions};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::{json_of, run};
use crate::support::tmpfs::Tmpfs;
use crate::{sidecar, TestResult};

const EVENT: &str =
    r#"{"ts":"2026-11-20T10:00:00Z","model":"gpt-4o","status":200,"prompt_tokens":7}"#;

/// A database with one key ("reader") and one event, written through the
/// binary, closed cleanly.
fn seed(db: &Path) -> TestResult {
    let created = run(db, &["keys", "create", "--label", "reader"], "")?;
    assert!(created.status.success(), "{created:?}");
    let ingested = run(db, &["events", "ingest"], &format!("{EVENT}\n"))?;
    assert!(ingested.status.success(), "{ingested:?}");
    Ok(())
}

/// Every command that only reads, run on `db`: each exits 0 with its
/// answer; returns their stderr, joined.
fn every_reading_command_answers(
    db: &Path,
    backup_to: &Path,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut notes = String::new();
    let mut answer = |args: &[&str]| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let output = run(db, args, "")?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{args:?}: {stderr}");
        notes.push_str(&stderr);
        json_of(&output)
    };
    let status = answer(&["status"])?;
    assert_eq!(status["pending_migrations"], serde_json::json!([]));
    let check = answer(&["check"])?;
    assert_eq!(check["integrity"], serde_json::json!(["ok"]), "{check}");
    let keys = answer(&["keys", "list"])?;
    assert_eq!(keys[0]["label"], "reader", "{keys}");
    let shown = answer(&["keys", "show", keys[0]["id"].as_str().ok_or("no id")?])?;
    assert_eq!(shown["label"], "reader");
    let events = answer(&["events", "list"])?;
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    let usage = answer(&[
        "events",
        "usage",
        "--since",
        "2026-11-20T00:00:00Z",
        "--until",
        "2026-11-21T00:00:00Z",
    ])?;
    assert_eq!(usage["rows"][0]["requests"], 1, "{usage}");
    let backup = answer(&["backup", backup_to.to_str().ok_or("path is not UTF-8")?])?;
    assert!(backup_to.exists(), "{backup}");
    let copy = Store::open(backup_to)?;
    assert_eq!(copy.keys().list(&keytally::KeyFilter::default())?.len(), 1);
    let _ = copy.close()?;
    Ok(notes)
}

#[rstest]
fn a_full_disk_still_answers_every_reading_command(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("full");
    let _tmpfs = Tmpfs::mount(&mount_point, "6m")?;
    let db = mount_point.join("keytally.db");
    seed(&db)?;
    // Fill what is left, to the last block.
    let ballast = mount_point.join("ballast");
    let mut file = std::fs::File::create(&ballast)?;
    let block = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    drop(file);
    let notes = every_reading_command_answers(&db, &folder.path().join("backup.db"))?;
    assert!(notes.contains("opened read-only"), "{notes}");
    // A write fails while the disk is full, and works once space is freed,
    // with no restart of anything.
    let refused = run(&db, &["keys", "create", "--label", "while full"], "")?;
    assert!(!refused.status.success(), "{refused:?}");
    std::fs::remove_file(&ballast)?;
    let created = run(&db, &["keys", "create", "--label", "after"], "")?;
    assert!(created.status.success(), "{created:?}");
    for suffix in ["-wal", "-shm"] {
        assert!(!sidecar(&db, suffix).exists(), "{suffix} left behind");
    }
    Ok(())
}

#[rstest]
fn a_read_only_filesystem_still_answers_every_reading_command(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("ro");
    let tmpfs = Tmpfs::mount(&mount_point, "6m")?;
    let db = mount_point.join("keytally.db");
    seed(&db)?;
    let before = std::fs::read(&db)?;
    tmpfs.make_read_only()?;
    let notes = every_reading_command_answers(&db, &folder.path().join("backup.db"))?;
    assert!(notes.contains("opened read-only"), "{notes}");
    // `--read-only` says so from the start: no note, the same answer.
    let listed = run(&db, &["--read-only", "keys", "list"], "")?;
    assert!(listed.status.success(), "{listed:?}");
    assert!(!String::from_utf8_lossy(&listed.stderr).contains("note"));
    // A write is refused; `--read-only` with a write is a usage error.
    assert_eq!(
        run(&db, &["keys", "create", "--label", "x"], "")?
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        run(&db, &["--read-only", "keys", "create", "--label", "x"], "")?
            .status
            .code(),
        Some(2)
    );
    assert_eq!(std::fs::read(&db)?, before, "the database changed");
    Ok(())
}

#[rstest]
fn a_read_only_store_reads_creates_nothing_and_writes_nothing(folder: TempDir) -> TestResult {
    let missing = folder.path().join("missing.db");
    let refused = StoreOptions::new(&missing).read_only(true).open();
    assert!(refused.is_err(), "a read-only store opened a missing file");
    assert!(!missing.exists(), "a read-only open created the file");

    let db = folder.path().join("keytally.db");
    let store = Store::open(&db)?;
    let key = store.keys().create(&NewKey::client("kept"))?;
    let _ = store.close()?;
    let before = std::fs::read(&db)?;
    let reader = StoreOptions::new(&db).read_only(true).open()?;
    assert!(reader.is_read_only());
    assert!(reader.keys().resolve(key.secret.expose())?.is_ok());
    assert_eq!(reader.keys().get(key.key.id)?.label, "kept");
    let write = reader.keys().create(&NewKey::client("refused"));
    assert!(write.is_err(), "a read-only store wrote: {write:?}");
    let report = reader.close()?;
    assert!(report.sidecars_gone, "{report:?}");
    assert_eq!(
        std::fs::read(&db)?,
        before,
        "a read-only store changed the file"
    );
    Ok(())
}

#[rstest]
fn a_read_only_store_refuses_a_schema_that_needs_migrating(folder: TempDir) -> TestResult {
    // An SQLite file with no schema at all: a read-only store applies
    // nothing and says what to run.
    let db = folder.path().join("empty.db");
    std::fs::write(&db, b"")?;
    let refused = StoreOptions::new(&db).read_only(true).open();
    assert!(
        matches!(refused, Err(Error::NeedsMigration { .. })),
        "{refused:?}"
    );
    assert_eq!(std::fs::read(&db)?, b"", "the file changed");
    Ok(())
}
