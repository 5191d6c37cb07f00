//! Every operator command through the real binary: success and failure
//! paths, exit codes, and what they leave on disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keytally::testing::{folder, postgres};
use keytally::Backend;
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::{json_of, keytally, path_arg, run, stderr_json, BIN};
use crate::TestResult;

fn database(folder: &TempDir) -> PathBuf {
    folder.path().join("keytally.db")
}

/// Where a test's database goes on `backend`: a file in `folder` that does
/// not exist yet, or the URL of a fresh, empty PostgreSQL database.
fn database_on(backend: Backend, folder: &TempDir) -> Result<PathBuf, Box<dyn std::error::Error>> {
    Ok(match backend {
        Backend::Sqlite => database(folder),
        Backend::Postgres => PathBuf::from(postgres::server()?.fresh_database()?),
    })
}

fn create_key(db: &Path, extra: &[&str]) -> Result<(String, String), Box<dyn std::error::Error>> {
    let mut args = vec!["keys", "create", "--label", "test key"];
    args.extend_from_slice(extra);
    let output = run(db, &args, "")?;
    assert!(output.status.success(), "{output:?}");
    let created = json_of(&output)?;
    let id = created["key"]["id"].as_str().ok_or("no id")?.to_owned();
    let secret = created["secret"].as_str().ok_or("no secret")?.to_owned();
    Ok((id, secret))
}

#[rstest]
fn keys_lifecycle_and_resolve_outcomes(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let (id, secret) = create_key(&db, &["--models", "gpt-4o,o3", "--rate-limit", "60"])?;
    assert!(secret.starts_with("kt_"));

    let resolved = run(&db, &["keys", "resolve"], &format!("{secret}\n"))?;
    assert!(resolved.status.success(), "{resolved:?}");
    let key = json_of(&resolved)?;
    assert_eq!(key["id"], id.as_str());
    assert_eq!(key["tier"], "client");
    assert_eq!(key["allowed_models"], serde_json::json!(["gpt-4o", "o3"]));

    let malformed = run(&db, &["keys", "resolve"], "kt_not-a-secret\n")?;
    assert_eq!(malformed.status.code(), Some(1));
    assert_eq!(stderr_json(&malformed)?["error"], "malformed");

    let other_folder = tempfile::tempdir()?;
    let (_, foreign_secret) = create_key(&database(&other_folder), &[])?;
    let unknown = run(&db, &["keys", "resolve"], &foreign_secret)?;
    assert_eq!(stderr_json(&unknown)?["error"], "unknown");

    let shown = run(&db, &["keys", "show", &id], "")?;
    assert_eq!(json_of(&shown)?["label"], "test key");
    assert!(!String::from_utf8(shown.stdout.clone())?.contains(&secret[7..]));

    let updated = run(
        &db,
        &["keys", "update", &id, "--label", "renamed", "--models", "*"],
        "",
    )?;
    assert!(updated.status.success(), "{updated:?}");
    assert_eq!(
        json_of(&updated)?["allowed_models"],
        serde_json::json!(["*"])
    );

    let rotated = run(&db, &["keys", "rotate", &id, "--grace", "0"], "")?;
    assert!(rotated.status.success(), "{rotated:?}");
    let new_secret = json_of(&rotated)?["secret"]
        .as_str()
        .ok_or("no secret")?
        .to_owned();
    assert_eq!(
        stderr_json(&run(&db, &["keys", "resolve"], &secret)?)?["error"],
        "expired"
    );
    assert!(run(&db, &["keys", "resolve"], &new_secret)?
        .status
        .success());

    let revoked = run(&db, &["keys", "revoke", &id], "")?;
    assert!(revoked.status.success());
    assert_eq!(
        stderr_json(&run(&db, &["keys", "resolve"], &new_secret)?)?["error"],
        "revoked"
    );

    let active = json_of(&run(&db, &["keys", "list"], "")?)?;
    assert_eq!(active.as_array().map(Vec::len), Some(0));
    let all = json_of(&run(&db, &["keys", "list", "--all"], "")?)?;
    assert_eq!(all.as_array().map(Vec::len), Some(1));

    let missing = run(
        &db,
        &["keys", "show", "0190f0f0-0000-7000-8000-000000000000"],
        "",
    )?;
    assert_eq!(missing.status.code(), Some(1));
    let bad_tier = run(
        &db,
        &["keys", "create", "--label", "x", "--tier", "root"],
        "",
    )?;
    // A usage error, as the README promises: 2, with the valid tiers.
    assert_eq!(bad_tier.status.code(), Some(2));
    assert!(String::from_utf8(bad_tier.stderr)?.contains("tier"));
    Ok(())
}

#[rstest]
fn expired_key_resolves_as_expired(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let (_, secret) = create_key(&db, &["--expires-in", "1s"])?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let output = run(&db, &["keys", "resolve"], &secret)?;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr_json(&output)?["error"], "expired");
    Ok(())
}

fn event_line(i: usize, key: &str) -> String {
    format!(
        "{{\"ts\":{},\"key_id\":\"{key}\",\"model\":\"m{}\",\"status\":200,\"prompt_tokens\":{i},\"latency_ms\":10}}\n",
        1_790_000_000_000u64 + i as u64 * 1000,
        i % 3
    )
}

#[rstest]
fn events_ingest_list_usage_prune(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let (key, _) = create_key(&db, &[])?;
    let input: String = (0..250).map(|i| event_line(i, &key)).collect();
    let ingested = run(&db, &["events", "ingest", "--batch", "100"], &input)?;
    assert!(ingested.status.success(), "{ingested:?}");
    assert_eq!(json_of(&ingested)?["ingested"], 250);

    let listed = json_of(&run(
        &db,
        &["events", "list", "--key", &key, "--limit", "7"],
        "",
    )?)?;
    let listed = listed.as_array().ok_or("not an array")?;
    assert_eq!(listed.len(), 7);
    assert_eq!(listed[0]["prompt_tokens"], 249, "newest first");

    let usage = json_of(&run(
        &db,
        &[
            "events",
            "usage",
            "--since",
            "1790000000000",
            "--until",
            "1790001000000",
            "--by",
            "model",
        ],
        "",
    )?)?;
    let rows = usage["rows"].as_array().ok_or("no rows")?;
    let requests: i64 = rows.iter().filter_map(|r| r["requests"].as_i64()).sum();
    assert_eq!(requests, 250);
    assert_eq!(rows.len(), 3);

    let pruned = json_of(&run(&db, &["events", "prune", "--older-than", "1d"], "")?)?;
    assert_eq!(
        pruned["deleted"], 250,
        "2026-09 events are older than a day"
    );
    let kept = json_of(&run(&db, &["events", "prune", "--older-than", "0"], "")?)?;
    assert_eq!(kept["deleted"], 0);
    let bad = run(&db, &["events", "prune", "--older-than", "soon"], "")?;
    assert_eq!(bad.status.code(), Some(1));
    Ok(())
}

#[rstest]
fn ingest_stops_at_a_bad_line_and_keeps_earlier_batches(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let (key, _) = create_key(&db, &[])?;
    let mut input: String = (0..25).map(|i| event_line(i, &key)).collect();
    input.push_str("{\"ts\":1790000000000,\"model\":\"m\",\"status\":200,\"prompt_tokens\":-4}\n");
    input.extend((0..5).map(|i| event_line(100 + i, &key)));
    let output = run(&db, &["events", "ingest", "--batch", "10"], &input)?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = stderr_json(&output)?;
    assert_eq!(error["line"], 26);
    assert_eq!(
        error["ingested"], 20,
        "two whole batches before the bad line"
    );
    // The five good lines after the first 20 were in the batch with the bad
    // one: all or nothing.
    let listed = json_of(&run(&db, &["events", "list", "--limit", "1000"], "")?)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(20));

    let garbage = run(&db, &["events", "ingest"], "not json\n")?;
    assert_eq!(garbage.status.code(), Some(1));
    assert_eq!(stderr_json(&garbage)?["line"], 1);
    Ok(())
}

#[rstest]
fn ingest_commits_and_closes_cleanly_on_sigterm(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let (key, _) = create_key(&db, &[])?;
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["--json", "events", "ingest", "--batch", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input: String = (0..37).map(|i| event_line(i, &key)).collect();
    stdin.write_all(input.as_bytes())?;
    stdin.flush()?;
    // Three whole batches show that the child is reading; the last 7 lines
    // wait in its batch for more input.
    let count = || -> Result<usize, Box<dyn std::error::Error>> {
        let store = keytally::Store::open(&db)?;
        let n = store
            .events()
            .list(&keytally::EventFilter::default())?
            .len();
        let _ = store.close()?;
        Ok(n)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count()? < 30 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never committed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) with a child's pid and a valid signal number.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let output = child.wait_with_output()?;
    drop(stdin);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = stderr_json(&output)?;
    assert_eq!(error["error"], "interrupted");
    // Everything it had read is committed, and it said how much.
    let ingested = error["ingested"].as_u64().ok_or("no count")?;
    assert!((30..=37).contains(&ingested), "{ingested}");
    if backend == Backend::Sqlite {
        assert!(!crate::sidecar(&db, "-wal").exists(), "not closed cleanly");
    }
    let listed = json_of(&run(&db, &["events", "list", "--limit", "1000"], "")?)?;
    assert_eq!(listed.as_array().map(|a| a.len() as u64), Some(ingested));
    Ok(())
}

#[rstest]
fn check_checkpoint_and_dry_run(folder: TempDir) -> TestResult {
    let db = database(&folder);
    let dry = run(&db, &["migrate", "--dry-run"], "")?;
    assert!(dry.status.success(), "{dry:?}");
    assert_eq!(
        json_of(&dry)?["pending"].as_array().map(Vec::len),
        Some(keytally::known_versions()?.len())
    );
    assert!(!db.exists(), "a dry run created the database");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let check = run(&db, &["check"], "")?;
    assert!(check.status.success(), "{check:?}");
    assert!(json_of(&check)?["problems"]
        .as_array()
        .is_some_and(Vec::is_empty));
    let dry = run(&db, &["migrate", "--dry-run"], "")?;
    assert_eq!(json_of(&dry)?["pending"], serde_json::json!([]));
    let checkpoint = run(&db, &["checkpoint"], "")?;
    assert!(checkpoint.status.success(), "{checkpoint:?}");
    assert_eq!(json_of(&checkpoint)?["complete"], true);
    Ok(())
}

/// A database of 3,000 events whose middle page (far from the schema page)
/// is overwritten, as a bad disk sector or a stray write would; returns the
/// key's id and the damaged file's bytes.
fn damaged_database(db: &Path) -> Result<(String, Vec<u8>), Box<dyn std::error::Error>> {
    let (key, _) = create_key(db, &[])?;
    let input: String = (0..3000).map(|i| event_line(i, &key)).collect();
    assert!(run(db, &["events", "ingest"], &input)?.status.success());
    let mut bytes = std::fs::read(db)?;
    let page = bytes.len() / 4096 / 2;
    for byte in &mut bytes[page * 4096 + 100..page * 4096 + 3000] {
        *byte = 0x5a;
    }
    std::fs::write(db, &bytes)?;
    Ok((key, bytes))
}

#[rstest]
fn check_fails_on_a_damaged_page(folder: TempDir) -> TestResult {
    let db = database(&folder);
    damaged_database(&db)?;
    let check = run(&db, &["check"], "")?;
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let error = stderr_json(&check)?;
    assert_eq!(error["error"], "check failed");
    assert!(error["problems"][0]
        .as_str()
        .is_some_and(|p| p.starts_with("integrity_check")));
    Ok(())
}

#[rstest]
fn ingest_refuses_a_damaged_database_before_writing(folder: TempDir) -> TestResult {
    let db = database(&folder);
    let (key, bytes) = damaged_database(&db)?;
    let more: String = (3000..3010).map(|i| event_line(i, &key)).collect();
    let ingest = run(&db, &["events", "ingest"], &more)?;
    assert_eq!(ingest.status.code(), Some(1), "{ingest:?}");
    let error = stderr_json(&ingest)?;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("is damaged") && e.contains("quick_check")),
        "{error}"
    );
    // Nothing was written: the file is as the damage left it, with no log.
    assert_eq!(std::fs::read(&db)?, bytes);
    assert!(
        !crate::sidecar(&db, "-wal").exists()
            || std::fs::metadata(crate::sidecar(&db, "-wal"))?.len() == 0
    );
    Ok(())
}

#[rstest]
fn backup_refuses_an_existing_destination_unless_forced(folder: TempDir) -> TestResult {
    let db = database(&folder);
    create_key(&db, &[])?;
    let dest = folder.path().join("backup.db");
    let first = run(&db, &["backup", path_arg(&dest)?], "")?;
    assert!(first.status.success(), "{first:?}");
    assert_eq!(crate::mode_of(&dest)?, 0o600);
    let before = std::fs::read(&dest)?;
    let again = run(&db, &["backup", path_arg(&dest)?], "")?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8(again.stderr)?.contains("--force"));
    assert_eq!(std::fs::read(&dest)?, before);
    let forced = run(&db, &["backup", "--force", path_arg(&dest)?], "")?;
    assert!(forced.status.success(), "{forced:?}");
    let missing_folder = folder.path().join("nope").join("b.db");
    assert_eq!(
        run(&db, &["backup", path_arg(&missing_folder)?], "")?
            .status
            .code(),
        Some(1)
    );
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(folder.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|name| !name.contains(".tmp-")),
        "{names:?}"
    );
    Ok(())
}

#[rstest]
fn restore_installs_a_backup_and_keeps_the_previous_database(folder: TempDir) -> TestResult {
    let db = database(&folder);
    let (kept_id, _) = create_key(&db, &[])?;
    let backup = folder.path().join("backup.db");
    assert!(run(&db, &["backup", path_arg(&backup)?], "")?
        .status
        .success());
    let (later_id, _) = create_key(&db, &[])?;
    let restored = run(&db, &["restore", path_arg(&backup)?], "")?;
    assert!(restored.status.success(), "{restored:?}");
    let report = json_of(&restored)?;
    let previous = PathBuf::from(report["previous"].as_str().ok_or("no previous")?);
    assert!(previous.exists());
    assert!(run(&db, &["keys", "show", &kept_id], "")?.status.success());
    assert_eq!(
        run(&db, &["keys", "show", &later_id], "")?.status.code(),
        Some(1)
    );
    assert_eq!(crate::mode_of(&db)?, 0o600);
    assert!(!crate::sidecar(&db, "-wal").exists());
    // The kept database still has the later key.
    let old = run(&previous, &["keys", "show", &later_id], "")?;
    assert!(old.status.success(), "{old:?}");
    Ok(())
}

#[rstest]
fn restore_refuses_bad_sources_and_a_database_in_use(folder: TempDir) -> TestResult {
    let db = database(&folder);
    create_key(&db, &[])?;
    let before = std::fs::read(&db)?;
    let garbage = folder.path().join("garbage.db");
    std::fs::write(&garbage, vec![7u8; 8192])?;
    let foreign = folder.path().join("foreign.db");
    {
        use diesel::connection::SimpleConnection;
        crate::raw_connection(&foreign)?
            .batch_execute("CREATE TABLE t (x); INSERT INTO t VALUES (1);")?;
    }
    let too_new = folder.path().join("too-new.db");
    assert!(run(&db, &["backup", path_arg(&too_new)?], "")?
        .status
        .success());
    {
        use diesel::connection::SimpleConnection;
        crate::raw_connection(&too_new)?.batch_execute(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('29990101000000');",
        )?;
    }
    let truncated = folder.path().join("truncated.db");
    assert!(run(&db, &["backup", path_arg(&truncated)?], "")?
        .status
        .success());
    let length = std::fs::metadata(&truncated)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)?
        .set_len(length / 2)?;
    for (source, expected) in [
        (&garbage, "not an SQLite database"),
        (&foreign, "another application"),
        (&too_new, "newer keytally"),
        (&truncated, "damaged"),
    ] {
        let output = run(&db, &["restore", path_arg(source)?], "")?;
        assert_eq!(output.status.code(), Some(1), "{source:?} was restored");
        let message = stderr_json(&output)?["error"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(message.contains(expected), "{source:?}: {message}");
        assert!(message.contains(path_arg(source)?), "{message}");
        assert_eq!(std::fs::read(&db)?, before, "the database changed");
    }
    // A database another process has open is not replaced.
    let good = folder.path().join("good.db");
    assert!(run(&db, &["backup", path_arg(&good)?], "")?
        .status
        .success());
    let mut holder = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["events", "ingest"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // The holder has the database open once its -shm exists.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !crate::sidecar(&db, "-shm").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never opened it"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let in_use = run(&db, &["restore", path_arg(&good)?], "")?;
    drop(holder.stdin.take());
    holder.wait()?;
    assert_eq!(in_use.status.code(), Some(1), "{in_use:?}");
    assert!(String::from_utf8(in_use.stderr)?.contains("open in another process"));
    let leftovers: Vec<String> = std::fs::read_dir(folder.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("pre-restore") || name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[rstest]
fn demo_runs_on_a_fresh_database(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let output = keytally(&["--db", path_arg(&db)?, "demo"])?;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout)?;
    assert!(text.contains("recorded 5000 events"), "{text}");
    assert!(text.contains("usage by model"));
    assert!(text.contains("usage by hour"));
    Ok(())
}

#[rstest]
fn demo_without_db_on_the_command_line_leaves_the_configured_database_alone(
    folder: TempDir,
) -> TestResult {
    let db = database(&folder);
    let scratch = folder.path().join("tmp");
    std::fs::create_dir(&scratch)?;
    let output = Command::new(BIN)
        .args(["--json", "demo"])
        .env("KEYTALLY_DB", &db)
        .env("TMPDIR", &scratch)
        .env_remove("KEYTALLY_LOG")
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let report = json_of(&output)?;
    assert_eq!(report["temporary"], true);
    assert_eq!(report["events"], 5000);
    let used = report["database"].as_str().ok_or("no database")?;
    assert!(used.starts_with(path_arg(&scratch)?), "{used}");
    assert!(!db.exists(), "the demo wrote into the configured database");
    assert_eq!(
        std::fs::read_dir(&scratch)?.count(),
        0,
        "the temporary database was left behind"
    );
    // Named on the command line, the database is the one used.
    let explicit = run(&db, &["demo"], "")?;
    assert!(explicit.status.success(), "{explicit:?}");
    let report = json_of(&explicit)?;
    assert_eq!(report["temporary"], false);
    assert_eq!(report["database"], path_arg(&db)?);
    Ok(())
}

#[rstest]
fn closed_choices_are_usage_errors_that_list_the_valid_values(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    let bad_tier = run(
        &db,
        &["keys", "create", "--label", "x", "--tier", "bogus"],
        "",
    )?;
    assert_eq!(bad_tier.status.code(), Some(2), "{bad_tier:?}");
    let message = String::from_utf8(bad_tier.stderr)?;
    assert!(
        message.contains("admin") && message.contains("client"),
        "{message}"
    );
    assert!(!db.exists(), "a usage error opened the database");
    let admin = run(
        &db,
        &["keys", "create", "--label", "x", "--tier", "admin"],
        "",
    )?;
    assert!(admin.status.success(), "{admin:?}");
    assert_eq!(json_of(&admin)?["key"]["tier"], "admin");

    let bad_grouping = run(
        &db,
        &["events", "usage", "--since", "1d", "--by", "week"],
        "",
    )?;
    assert_eq!(bad_grouping.status.code(), Some(2), "{bad_grouping:?}");
    let message = String::from_utf8(bad_grouping.stderr)?;
    for valid in ["hour", "day", "model", "key"] {
        assert!(message.contains(valid), "{message}");
    }
    // Two events six hours apart on one day: two hours, one day.
    let events = "{\"ts\": \"2026-11-20T03:10:00Z\", \"model\": \"m\", \"status\": 200}\n\
                  {\"ts\": \"2026-11-20T09:10:00Z\", \"model\": \"m\", \"status\": 200}\n";
    assert!(run(&db, &["events", "ingest"], events)?.status.success());
    for (grouping, rows) in [("hour", 2), ("day", 1)] {
        let usage = run(
            &db,
            &[
                "events",
                "usage",
                "--since",
                "2026-11-20T00:00:00Z",
                "--until",
                "2026-11-21T00:00:00Z",
                "--by",
                grouping,
            ],
            "",
        )?;
        assert!(usage.status.success(), "{usage:?}");
        let report = json_of(&usage)?;
        assert_eq!(report["by"], grouping);
        assert_eq!(
            report["rows"].as_array().map(Vec::len),
            Some(rows),
            "{grouping}: {report}"
        );
    }
    Ok(())
}

#[rstest]
fn event_queries_refuse_bad_arguments(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    let db = database_on(backend, &folder)?;
    assert!(run(&db, &["migrate"], "")?.status.success());
    let bad_key = run(&db, &["events", "list", "--key", "not-a-uuid"], "")?;
    assert_eq!(bad_key.status.code(), Some(1));
    assert!(String::from_utf8(bad_key.stderr)?.contains("not a UUID"));
    let unknown_key = run(
        &db,
        &[
            "events",
            "usage",
            "--since",
            "1d",
            "--key",
            "0190f0f0-0000-7000-8000-000000000000",
        ],
        "",
    )?;
    assert_eq!(unknown_key.status.code(), Some(1));
    let inverted = run(
        &db,
        &["events", "usage", "--since", "1d", "--until", "2d"],
        "",
    )?;
    assert_eq!(inverted.status.code(), Some(1));
    assert!(String::from_utf8(inverted.stderr)?.contains("before since"));
    let missing_since = run(&db, &["events", "usage"], "")?;
    assert_eq!(missing_since.status.code(), Some(2), "usage error");
    let bad_group = run(
        &db,
        &["events", "usage", "--since", "1d", "--by", "week"],
        "",
    )?;
    assert_eq!(bad_group.status.code(), Some(2));
    Ok(())
}

#[rstest]
fn checkpoint_reports_a_reader_that_blocks_it(folder: TempDir) -> TestResult {
    use diesel::connection::SimpleConnection;
    let db = database(&folder);
    create_key(&db, &[])?;
    // Another connection holds an old snapshot while a write lands after it.
    let mut reader = crate::raw_connection(&db)?;
    reader.batch_execute("PRAGMA journal_mode = WAL; BEGIN; SELECT count(*) FROM keys;")?;
    create_key(&db, &[])?;
    let output = run(&db, &["checkpoint"], "")?;
    reader.batch_execute("COMMIT")?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stderr_json(&output)?["error"], "checkpoint incomplete");
    Ok(())
}

/// This process's POSIX locks on `path`'s inode, as Linux lists them.
fn posix_locks_held(path: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(path)?.ino();
    let me = format!(" {} ", std::process::id());
    let inode = format!(":{inode} ");
    Ok(std::fs::read_to_string("/proc/locks")?
        .lines()
        .filter(|line| line.contains("POSIX") && line.contains(&me) && line.contains(&inode))
        .count())
}

#[rstest]
fn two_stores_in_one_process_keep_the_database_locked(folder: TempDir) -> TestResult {
    // Closing any descriptor of a file drops every POSIX lock the process
    // holds on it, SQLite's included, and SQLite does not notice: opening a
    // second store on the same database must not read the file with a
    // descriptor of its own.
    let db = database(&folder);
    let good = folder.path().join("good.db");
    let first = keytally::Store::open(&db)?;
    first.backup_to(&good, false)?;
    first.checkpoint()?;
    assert!(posix_locks_held(&db)? > 0, "SQLite holds no lock at all");
    let second = keytally::Store::open(&db)?;
    assert!(
        posix_locks_held(&db)? > 0,
        "opening a second store dropped the first one's lock"
    );
    let restore = run(&db, &["restore", path_arg(&good)?], "")?;
    assert_eq!(restore.status.code(), Some(1), "{restore:?}");
    assert!(String::from_utf8(restore.stderr)?.contains("open in another process"));
    drop(second);
    assert!(
        posix_locks_held(&db)? > 0,
        "closing the second store dropped it"
    );
    drop(first);
    Ok(())
}

#[rstest]
fn restore_refuses_a_live_database_whose_header_is_still_in_its_log(folder: TempDir) -> TestResult {
    use diesel::connection::SimpleConnection;
    let db = database(&folder);
    let good = folder.path().join("good.db");
    {
        let store = keytally::Store::open(folder.path().join("other.db"))?;
        store.backup_to(&good, false)?;
    }
    // A connection of this process (another process to the binary) keeps
    // the database open, in WAL mode, with its first commit only in the log.
    let mut holder = crate::raw_connection(&db)?;
    holder.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x);",
    )?;
    let restore = run(&db, &["restore", path_arg(&good)?], "")?;
    assert_eq!(restore.status.code(), Some(1), "{restore:?}");
    assert!(String::from_utf8(restore.stderr)?.contains("open in another process"));
    holder.batch_execute("INSERT INTO t VALUES (1);")?;
    drop(holder);
    Ok(())
}

/// Resolves a secret twice through `store`: the second answer comes from the
/// store's memory of the first.
fn resolve_twice(
    store: &keytally::Store,
    secret: &str,
) -> Result<Result<keytally::ActiveKey, keytally::Rejection>, keytally::Error> {
    let first = store.keys().resolve(secret)?;
    let second = store.keys().resolve(secret)?;
    assert_eq!(first, second);
    Ok(second)
}

#[rstest]
fn key_changes_by_another_process_reach_the_next_resolve(
    folder: TempDir,
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) -> TestResult {
    use keytally::{AllowedModels, NewKey, Rejection, Store};

    let db = database_on(backend, &folder)?;
    let store = Store::open(&db)?;
    let restricted = store.keys().create(&NewKey::client("restricted"))?;
    let revoked = store.keys().create(&NewKey::client("revoked"))?;
    let rotated = store.keys().create(&NewKey::client("rotated"))?;
    let untouched = store.keys().create(&NewKey::client("untouched"))?;
    let secret = |created: &keytally::CreatedKey| created.secret.expose().to_owned();
    for key in [&restricted, &revoked, &rotated, &untouched] {
        let active = resolve_twice(&store, &secret(key))?.map_err(|r| format!("{r:?}"))?;
        assert_eq!(active.allowed_models, AllowedModels::Any);
    }

    let id = restricted.key.id.to_string();
    let output = run(
        &db,
        &["keys", "update", &id, "--models", "o3", "--rate-limit", "7"],
        "",
    )?;
    assert!(output.status.success(), "{output:?}");
    let active = resolve_twice(&store, &secret(&restricted))?.map_err(|r| format!("{r:?}"))?;
    assert_eq!(active.allowed_models, AllowedModels::from_names(&["o3"])?);
    assert_eq!(active.rate_limit_override, Some(7));

    let output = run(&db, &["keys", "revoke", &revoked.key.id.to_string()], "")?;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        resolve_twice(&store, &secret(&revoked))?,
        Err(Rejection::Revoked)
    );

    let output = run(
        &db,
        &[
            "keys",
            "rotate",
            &rotated.key.id.to_string(),
            "--grace",
            "0",
        ],
        "",
    )?;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        resolve_twice(&store, &secret(&rotated))?,
        Err(Rejection::Expired)
    );
    let new_secret = json_of(&output)?["secret"]
        .as_str()
        .ok_or("no new secret")?
        .to_owned();
    let active = resolve_twice(&store, &new_secret)?.map_err(|r| format!("{r:?}"))?;
    assert_eq!(active.id, rotated.key.id);

    let active = resolve_twice(&store, &secret(&untouched))?.map_err(|r| format!("{r:?}"))?;
    assert_eq!(active.id, untouched.key.id);
    assert!(store.close()?.checkpoint_complete);
    Ok(())
}
