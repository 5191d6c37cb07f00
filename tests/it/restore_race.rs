//! A restore that races processes opening the same database: the binary's
//! `restore` against `events ingest` processes started while it runs.
//!
//! The database being replaced has a large write-ahead log, so the restore
//! spends a while folding it in; openers that start meanwhile wait on
//! SQLite's lock. Whatever interleaving happens, the kept-aside copy is the
//! whole old database, the restored one is healthy, and every event an
//! ingest acknowledged is in one of the two.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::folder;
use keytally::{NewEvent, NewKey, Store, Timestamp};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::BIN;
use crate::TestResult;

/// Tries of the race; each starts from the same old database.
const TRIES: usize = 4;
/// Openers started during one restore.
const OPENERS: usize = 24;
/// Keys and events of the old database.
const OLD_KEYS: i64 = 40;
const OLD_EVENTS: i64 = 60_000;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

fn count(path: &Path, sql: &str) -> Result<i64, Box<dyn std::error::Error>> {
    let mut conn = crate::raw_connection(path)?;
    Ok(diesel::sql_query(sql).get_result::<Count>(&mut conn)?.n)
}

fn integrity(path: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut conn = crate::raw_connection(path)?;
    let lines: Vec<Line> =
        diesel::sql_query("SELECT integrity_check AS line FROM pragma_integrity_check")
            .load(&mut conn)?;
    Ok(lines.into_iter().map(|line| line.line).collect())
}

/// Builds the old database in `template/`: keys and events in the file, and
/// one committed transaction that rewrites every event still in the `-wal`
/// (copied while the writing connection is open, so it is not folded in).
fn old_database(template: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let built = template.join("built.db");
    let store = Store::open(&built)?;
    for n in 0..OLD_KEYS {
        store.keys().create(&NewKey::client(format!("old {n}")))?;
    }
    let events: Vec<NewEvent> = (0..OLD_EVENTS)
        .map(|n| -> keytally::Result<NewEvent> {
            let mut event = NewEvent::new(Timestamp::from_millis(1_700_000_000_000 + n)?, "old");
            event.prompt_tokens = n;
            Ok(event)
        })
        .collect::<keytally::Result<_>>()?;
    for chunk in events.chunks(10_000) {
        store.events().record_batch(chunk)?;
    }
    let _ = store.close()?;
    let mut conn = crate::raw_connection(&built)?;
    conn.batch_execute(
        "PRAGMA wal_autocheckpoint = 0;
         UPDATE events SET latency_ms = latency_ms + 1;",
    )?;
    let old = template.join("old.db");
    std::fs::copy(&built, &old)?;
    std::fs::copy(crate::sidecar(&built, "-wal"), crate::sidecar(&old, "-wal"))?;
    drop(conn);
    Ok(old)
}

fn ingest(db: &Path, request_id: &str) -> std::io::Result<Child> {
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(["events", "ingest"])
        .env_remove("KEYTALLY_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let line = format!(
        "{{\"ts\": 1800000000000, \"model\": \"racer\", \"status\": 200, \"request_id\": \"{request_id}\"}}\n"
    );
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(line.as_bytes())?;
    }
    Ok(child)
}

fn events_with_request_id(
    path: &Path,
    request_id: &str,
) -> Result<i64, Box<dyn std::error::Error>> {
    count(
        path,
        &format!("SELECT count(*) AS n FROM events WHERE request_id = '{request_id}'"),
    )
}

#[rstest]
fn a_restore_racing_openers_keeps_the_old_database_whole_and_loses_no_acknowledged_event(
    folder: TempDir,
) -> TestResult {
    let template = folder.path().join("template");
    std::fs::create_dir(&template)?;
    let old = old_database(&template)?;
    let backup = template.join("backup.db");
    {
        let source = Store::open(template.join("source.db"))?;
        source.keys().create(&NewKey::client("from the backup"))?;
        source.backup_to(&backup, false)?;
        let _ = source.close()?;
    }

    let mut restored_tries = 0;
    for attempt in 0..TRIES {
        let run = folder.path().join(format!("try-{attempt}"));
        std::fs::create_dir(&run)?;
        let db = run.join("r.db");
        std::fs::copy(&old, &db)?;
        std::fs::copy(crate::sidecar(&old, "-wal"), crate::sidecar(&db, "-wal"))?;

        let restore = Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(["restore"])
            .arg(&backup)
            .env_remove("KEYTALLY_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Openers start over the restore's first half second, a few
        // milliseconds apart.
        std::thread::sleep(Duration::from_millis(30 * attempt as u64));
        let mut openers = Vec::new();
        let started = Instant::now();
        for n in 0..OPENERS {
            let request_id = format!("t{attempt}-o{n}");
            openers.push((request_id.clone(), ingest(&db, &request_id)?));
            std::thread::sleep(Duration::from_millis(15));
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        let restore: Output = restore.wait_with_output()?;
        let mut outcomes = Vec::new();
        for (request_id, child) in openers {
            outcomes.push((request_id, child.wait_with_output()?));
        }

        let previous: Option<PathBuf> = std::fs::read_dir(&run)?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.path())
            .find(|path| {
                let name = path.to_string_lossy();
                name.contains(".pre-restore-") && !name.ends_with("-wal") && !name.ends_with("-shm")
            });
        if restore.status.success() {
            restored_tries += 1;
            let previous = previous
                .as_deref()
                .ok_or("the restore kept no old database")?;
            assert_eq!(
                integrity(previous)?,
                ["ok"],
                "try {attempt}: kept copy damaged"
            );
            assert_eq!(
                count(
                    previous,
                    "SELECT count(*) AS n FROM keys WHERE label LIKE 'old %'"
                )?,
                OLD_KEYS,
                "try {attempt}: kept copy lost keys"
            );
            assert_eq!(
                count(
                    previous,
                    "SELECT count(*) AS n FROM events WHERE latency_ms = 1"
                )?,
                OLD_EVENTS,
                "try {attempt}: kept copy lost the logged transaction"
            );
            assert_eq!(
                count(
                    &db,
                    "SELECT count(*) AS n FROM keys WHERE label = 'from the backup'"
                )?,
                1,
                "try {attempt}: the backup was not installed"
            );
        } else {
            let message = String::from_utf8_lossy(&restore.stderr);
            assert!(
                message.contains("open in another process"),
                "try {attempt}: {message}"
            );
            assert!(
                previous.is_none(),
                "try {attempt}: a refused restore kept a copy"
            );
        }
        assert_eq!(integrity(&db)?, ["ok"], "try {attempt}: database damaged");
        for (request_id, output) in &outcomes {
            let stderr = String::from_utf8_lossy(&output.stderr);
            for bad in ["disk I/O", "readonly", "malformed", "damaged"] {
                assert!(
                    !stderr.contains(bad),
                    "try {attempt}, {request_id}: {stderr}"
                );
            }
            if output.status.success() {
                let here = events_with_request_id(&db, request_id)?;
                let kept = match &previous {
                    Some(previous) => events_with_request_id(previous, request_id)?,
                    None => 0,
                };
                assert_eq!(
                    here + kept,
                    1,
                    "try {attempt}: acknowledged event {request_id} is in {here} + {kept} places"
                );
            }
        }
    }
    assert!(restored_tries > 0, "no restore ran: every try was refused");
    Ok(())
}

/// The racing opener of the tries above, stopped at the worst moment: it
/// has the database file open (as every SQLite connection has from its
/// first moment) but holds no lock yet, so nothing tells the restore it is
/// there. Its next write must reach the restored database, not the copy
/// kept aside.
#[rstest]
fn a_connection_opened_before_a_restore_writes_to_the_restored_database(
    folder: TempDir,
) -> TestResult {
    let db = folder.path().join("r.db");
    let backup = folder.path().join("backup.db");
    {
        let store = Store::open(&db)?;
        store.keys().create(&NewKey::client("old"))?;
        store.backup_to(&backup, false)?;
        store
            .keys()
            .create(&NewKey::client("only in the old database"))?;
        let _ = store.close()?;
    }
    let mut stale = crate::raw_connection(&db)?;
    let restore = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .arg("restore")
        .arg(&backup)
        .env_remove("KEYTALLY_LOG")
        .output()?;
    assert!(restore.status.success(), "{restore:?}");
    stale
        .batch_execute("UPDATE keys SET label = 'written after the restore' WHERE label = 'old'")?;
    drop(stale);

    let previous = std::fs::read_dir(folder.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().contains(".pre-restore-"))
        .ok_or("the restore kept no old database")?;
    assert_eq!(integrity(&previous)?, ["ok"]);
    assert_eq!(
        count(
            &previous,
            "SELECT count(*) AS n FROM keys WHERE label = 'old'"
        )?,
        1,
        "the kept copy was written to after the restore"
    );
    assert_eq!(
        count(
            &previous,
            "SELECT count(*) AS n FROM keys WHERE label = 'only in the old database'"
        )?,
        1
    );
    assert_eq!(integrity(&db)?, ["ok"]);
    // The rollback journal the restore wrote through is gone.
    assert!(!crate::sidecar(&db, "-journal").exists());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM keys WHERE label = 'written after the restore'"
        )?,
        1,
        "the write after the restore did not reach the restored database"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) AS n FROM keys WHERE label = 'only in the old database'"
        )?,
        0
    );
    Ok(())
}

#[rstest]
fn a_restore_onto_another_applications_database_is_refused_and_leaves_it_alone(
    folder: TempDir,
) -> TestResult {
    let db = folder.path().join("r.db");
    crate::raw_connection(&db)?
        .batch_execute("CREATE TABLE theirs (x); INSERT INTO theirs VALUES (42);")?;
    let before = std::fs::read(&db)?;
    let backup = folder.path().join("backup.db");
    {
        let source = Store::open(folder.path().join("source.db"))?;
        source.backup_to(&backup, false)?;
        let _ = source.close()?;
    }
    let restore = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .arg("restore")
        .arg(&backup)
        .env_remove("KEYTALLY_LOG")
        .output()?;
    assert_eq!(restore.status.code(), Some(1), "{restore:?}");
    let message = String::from_utf8(restore.stderr)?;
    assert!(message.contains("another application"), "{message}");
    assert_eq!(std::fs::read(&db)?, before, "the other database changed");
    let kept: Vec<String> = std::fs::read_dir(folder.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("pre-restore") || name.contains(".tmp-"))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    Ok(())
}
