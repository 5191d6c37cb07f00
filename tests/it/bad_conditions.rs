//! The operator's tool under bad conditions: a typo in the database path,
//! a reader that goes away, an older schema.

use std::path::Path;
use std::process::Command;

use diesel::Connection;
use diesel_migrations::MigrationHarness;
use keytally::testing::folder;
use keytally::{NewEvent, Store, Timestamp};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::{json_of, path_arg, run, stderr_json, BIN};
use crate::TestResult;

#[rstest]
fn commands_that_only_read_refuse_a_missing_database_and_create_nothing(
    folder: TempDir,
) -> TestResult {
    let typo = folder.path().join("srv").join("keytaly.db");
    let backup = folder.path().join("nightly.db");
    let key = "0190f0f0-0000-7000-8000-000000000000";
    let commands: [&[&str]; 8] = [
        &["status"],
        &["check"],
        &["keys", "list"],
        &["keys", "show", key],
        &["keys", "resolve"],
        &["events", "list"],
        &["events", "usage", "--since", "1d"],
        &["backup", path_arg(&backup)?],
    ];
    for args in commands {
        let output = run(&typo, args, "kt_whatever\n")?;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let error = stderr_json(&output)?;
        assert_eq!(error["error"], "no database", "{args:?}: {error}");
        assert_eq!(error["path"], path_arg(&typo)?);
        assert!(!typo.exists(), "{args:?} created the database");
        assert!(
            !typo.parent().is_some_and(Path::exists),
            "{args:?} created the folder"
        );
        assert!(!backup.exists(), "{args:?} wrote a backup");
    }
    // migrate creates it, and then they work.
    assert!(run(&typo, &["migrate"], "")?.status.success());
    for args in commands {
        if args[0] == "keys" && args.len() > 1 && (args[1] == "show" || args[1] == "resolve") {
            continue;
        }
        let output = run(&typo, args, "")?;
        assert!(output.status.success(), "{args:?}: {output:?}");
    }
    assert!(backup.exists());
    Ok(())
}

#[rstest]
fn a_reader_that_goes_away_ends_the_output_quietly(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    {
        let store = Store::open(&db)?;
        let events: Vec<NewEvent> = (0..5_000)
            .map(|n| -> keytally::Result<NewEvent> {
                let mut event =
                    NewEvent::new(Timestamp::from_millis(1_790_000_000_000 + n)?, "gpt-4o");
                event.request_id = Some(format!("request-{n}"));
                Ok(event)
            })
            .collect::<keytally::Result<_>>()?;
        store.events().record_batch(&events)?;
        let _ = store.close()?;
    }
    // More output than a pipe holds, so the writer meets the closed pipe.
    for format in ["--json", "--db"] {
        let json = format == "--json";
        let script = format!(
            "\"$0\" --db \"$1\" {} events list --limit 5000 2>\"$2\" | head -c 10 >/dev/null; \
             echo \"${{PIPESTATUS[0]}}\"",
            if json { "--json" } else { "" }
        );
        let stderr_file = folder.path().join("stderr.txt");
        let output = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .arg(BIN)
            .arg(&db)
            .arg(&stderr_file)
            .env_remove("KEYTALLY_LOG")
            .output()?;
        let status = String::from_utf8(output.stdout)?;
        let stderr = std::fs::read_to_string(&stderr_file)?;
        assert_eq!(
            status.trim(),
            "0",
            "json {json}: exit {status}, stderr {stderr}"
        );
        assert!(stderr.is_empty(), "json {json}: {stderr}");
    }
    // The database was closed properly: no log left behind.
    assert!(!crate::sidecar(&db, "-wal").exists());
    Ok(())
}

#[rstest]
fn status_on_an_older_schema_says_what_it_migrated(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    let _ = Store::open(&db)?.close()?;
    let newest = {
        let mut conn = diesel::SqliteConnection::establish(path_arg(&db)?)?;
        conn.revert_last_migration(keytally::MIGRATIONS)
            .map_err(|e| e.to_string())?
            .to_string()
    };
    let status = run(&db, &["status"], "")?;
    assert!(status.status.success(), "{status:?}");
    let report = json_of(&status)?;
    let migrated = report["migrated_now"].as_array().ok_or("no migrated_now")?;
    assert_eq!(migrated.len(), 1, "{report}");
    assert!(
        // The name is the folder's ("2026-11-24-014526-0000_…"), the
        // version its digits.
        migrated[0]
            .as_str()
            .is_some_and(|name| name.replace('-', "").starts_with(&newest)),
        "{report}"
    );
    // A second look has nothing left to migrate.
    let again = json_of(&run(&db, &["status"], "")?)?;
    assert_eq!(again["migrated_now"], serde_json::json!([]));
    Ok(())
}

#[rstest]
fn a_backup_or_restore_refuses_the_databases_own_files(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    {
        let store = Store::open(&db)?;
        store.keys().create(&keytally::NewKey::client("kept"))?;
        let _ = store.close()?;
    }
    let before = std::fs::read(&db)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let own = crate::sidecar(&db, suffix);
        let backup = run(&db, &["backup", "--force", path_arg(&own)?], "")?;
        assert_eq!(backup.status.code(), Some(1), "{suffix}: {backup:?}");
        let message = stderr_json(&backup)?["error"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            message.contains("it is the database"),
            "{suffix}: {message}"
        );
        let restore = run(&db, &["restore", path_arg(&own)?], "")?;
        assert_eq!(restore.status.code(), Some(1), "{suffix}: {restore:?}");
    }
    assert_eq!(std::fs::read(&db)?, before, "the database changed");
    let listed = json_of(&run(&db, &["keys", "list"], "")?)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    Ok(())
}

#[rstest]
fn a_backup_removes_what_a_killed_backup_left_and_nothing_of_a_live_one(
    folder: TempDir,
) -> TestResult {
    let db = folder.path().join("keytally.db");
    let _ = Store::open(&db)?.close()?;
    // A process that has ended: its id is free.
    let mut ended = Command::new("true").spawn()?;
    let dead_pid = ended.id();
    ended.wait()?;
    let dead = folder
        .path()
        .join(format!(".nightly.db.tmp-{dead_pid}-1-0"));
    std::fs::write(&dead, vec![0u8; 4096])?;
    std::fs::write(crate::sidecar(&dead, "-journal"), b"left over")?;
    let live = folder
        .path()
        .join(format!(".nightly.db.tmp-{}-1-0", std::process::id()));
    std::fs::write(&live, b"in use")?;
    let dest = folder.path().join("nightly.db");
    let backup = run(&db, &["backup", path_arg(&dest)?], "")?;
    assert!(backup.status.success(), "{backup:?}");
    assert!(!dead.exists(), "the killed backup's file is still there");
    assert!(!crate::sidecar(&dead, "-journal").exists());
    assert!(live.exists(), "a live process's file was removed");
    assert!(dest.exists());
    Ok(())
}

#[rstest]
fn a_secret_given_as_an_argument_is_refused_without_being_shown(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let created = json_of(&run(&db, &["keys", "create", "--label", "x"], "")?)?;
    let secret = created["secret"].as_str().ok_or("no secret")?.to_owned();
    for json in [false, true] {
        let mut command = Command::new(BIN);
        command.arg("--db").arg(&db);
        if json {
            command.arg("--json");
        }
        let output = command
            .args(["keys", "resolve", &secret])
            .env_remove("KEYTALLY_LOG")
            .output()?;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8(output.stderr)?;
        let stdout = String::from_utf8(output.stdout)?;
        assert!(!stderr.contains(&secret[3..]), "json {json}: {stderr}");
        assert!(!stdout.contains(&secret[3..]), "json {json}: {stdout}");
        assert!(stderr.contains("stdin"), "json {json}: {stderr}");
        if json {
            let error: serde_json::Value = serde_json::from_str(stderr.trim())?;
            assert_eq!(error["usage"], true);
        }
    }
    Ok(())
}

#[rstest]
fn ctrl_c_at_the_secret_prompt_gives_the_terminal_its_echo_back(folder: TempDir) -> TestResult {
    use std::io::Read;
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    // On a pseudo-terminal (script), the prompt waits in the foreground with
    // echo off; SIGINT (what Ctrl-C sends) ends it; then `stty` shows the
    // terminal's state.
    let steps = folder.path().join("steps.sh");
    std::fs::write(
        &steps,
        format!(
            "'{BIN}' --db '{}' keys resolve\necho \"exit=$?\"\nstty -a\n",
            path_arg(&db)?
        ),
    )?;
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("sh '{}'", path_arg(&steps)?))
        .arg("/dev/null")
        .env_remove("KEYTALLY_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Kept open, so the terminal sees no end of input while the prompt waits.
    let _keyboard = child.stdin.take();
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut screen = String::new();
        let _ = stdout.read_to_string(&mut screen);
        screen
    });
    // The prompt's process, found by its command line; then Ctrl-C's signal.
    let needle = format!("{}\0keys\0resolve", path_arg(&db)?);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let pid = loop {
        let found = std::fs::read_dir("/proc")?.find_map(|entry| {
            let entry = entry.ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&needle)
                .then(|| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
                .flatten()
        });
        if let Some(pid) = found {
            break pid;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("keytally keys resolve never started".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Let it reach the prompt (echo off) before the signal.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill(2) on the process found above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("the prompt did not end on SIGINT".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let screen = reader.join().map_err(|_| "reader panicked")?;
    assert!(screen.contains("secret (not shown)"), "no prompt: {screen}");
    // Ended by the signal (128 + 2), as a Ctrl-C ends any program.
    assert!(screen.contains("exit=130"), "{screen}");
    let echo_on = screen.split_whitespace().any(|setting| setting == "echo");
    assert!(echo_on, "the terminal was left without echo: {screen}");
    Ok(())
}

#[rstest]
fn resolve_on_a_terminal_prompts_without_echoing_the_secret(folder: TempDir) -> TestResult {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let created = json_of(&run(&db, &["keys", "create", "--label", "x"], "")?)?;
    let secret = created["secret"].as_str().ok_or("no secret")?.to_owned();
    let id = created["key"]["id"].as_str().ok_or("no id")?.to_owned();
    // `script` runs the command on a pseudo-terminal and copies what the
    // terminal shows (echoed input included) to its stdout.
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("'{BIN}' --db '{}' keys resolve", path_arg(&db)?))
        .arg("/dev/null")
        .env_remove("KEYTALLY_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut terminal = child.stdout.take().ok_or("no stdout")?;
    let (shown, seen) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = terminal.read(&mut buffer) {
            if n == 0 || shown.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Type the secret once the prompt is on the screen, so that echo (if it
    // were on) would show it.
    let mut screen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !String::from_utf8_lossy(&screen).contains("secret") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(bytes) => screen.extend(bytes),
            Err(_) => break,
        }
    }
    assert!(
        String::from_utf8_lossy(&screen).contains("secret"),
        "no prompt: {}",
        String::from_utf8_lossy(&screen)
    );
    let mut input = child.stdin.take().ok_or("no stdin")?;
    input.write_all(format!("{secret}\n").as_bytes())?;
    input.flush()?;
    // A bounded wait: a resolve that waits for more input fails the test
    // instead of hanging it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(input);
    reader.join().map_err(|_| "the reader panicked")?;
    while let Ok(bytes) = seen.try_recv() {
        screen.extend(bytes);
    }
    let screen = String::from_utf8_lossy(&screen);
    let status = status.ok_or_else(|| format!("resolve did not finish: {screen}"))?;
    assert!(status.success(), "{screen}");
    assert!(screen.contains(&id), "{screen}");
    assert!(
        !screen.contains(&secret[3..]),
        "the secret was echoed: {screen}"
    );
    Ok(())
}

#[rstest]
fn times_need_a_unit_windows_an_order_and_counts_their_grammar(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let bare = run(&db, &["events", "list", "--since", "5"], "")?;
    assert_eq!(bare.status.code(), Some(1), "{bare:?}");
    let message = stderr_json(&bare)?["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("needs a unit or a date"), "{message}");
    assert!(
        message.contains("7d") && message.contains("RFC 3339"),
        "{message}"
    );
    assert!(run(&db, &["events", "list", "--since", "5m"], "")?
        .status
        .success());
    assert!(
        run(&db, &["events", "list", "--since", "1790000000000"], "")?
            .status
            .success()
    );
    let inverted = run(
        &db,
        &["events", "list", "--since", "1d", "--until", "2d"],
        "",
    )?;
    assert_eq!(inverted.status.code(), Some(1), "{inverted:?}");
    assert!(stderr_json(&inverted)?["error"]
        .as_str()
        .is_some_and(|error| error.contains("before since")));
    // One event is "1 event".
    let one = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["events", "ingest"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"{\"ts\": 1790000000000, \"model\": \"m\", \"status\": 200}\n")?;
            }
            child.wait_with_output()
        })?;
    assert!(one.status.success(), "{one:?}");
    let text = String::from_utf8(one.stdout)?;
    assert!(
        text.contains("ingested 1 event") && !text.contains("1 events"),
        "{text}"
    );
    Ok(())
}

#[rstest]
fn check_reports_a_mode_it_found_too_wide(folder: TempDir) -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    assert!(run(&db, &["check"], "")?.status.success());
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644))?;
    let check = run(&db, &["check"], "")?;
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let problems = stderr_json(&check)?["problems"].to_string();
    assert!(problems.contains("0644"), "{problems}");
    // It was tightened, so the next check is clean.
    assert_eq!(crate::mode_of(&db)?, 0o600);
    assert!(run(&db, &["check"], "")?.status.success());
    Ok(())
}

#[test]
fn ingest_errors_name_no_internal_types() -> TestResult {
    for line in [
        "5",
        "[1, 2, 3]",
        "\"text\"",
        "{\"ts\": 1790000000000, \"model\": 5, \"status\": 200}",
        "{\"ts\": 1790000000000, \"model\": \"m\"}",
    ] {
        let error = match keytally::parse_json_line(line) {
            Ok(event) => return Err(format!("{line} parsed as {event:?}").into()),
            Err(error) => error.to_string(),
        };
        for internal in ["struct", "NewEvent", "EventLine", "elements"] {
            assert!(!error.contains(internal), "{line}: {error}");
        }
    }
    Ok(())
}

#[rstest]
fn an_incomplete_final_checkpoint_is_one_note_that_nothing_is_lost(folder: TempDir) -> TestResult {
    use diesel::connection::SimpleConnection;
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    assert!(run(&db, &["keys", "create", "--label", "x"], "")?
        .status
        .success());
    // A reader holding a snapshot keeps the log from being emptied.
    let mut reader = crate::raw_connection(&db)?;
    reader.batch_execute("BEGIN; SELECT count(*) FROM keys;")?;
    let output = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["keys", "create", "--label", "y"])
        .env_remove("KEYTALLY_LOG")
        .output()?;
    reader.batch_execute("COMMIT")?;
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8(output.stderr)?;
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("write-ahead log") || line.contains("checkpoint"))
        .collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(
        notes[0].starts_with("keytally: note: another process has the database open")
            && notes[0].contains("nothing is lost"),
        "{stderr}"
    );
    Ok(())
}

/// Runs `events ingest --json --batch 100` on `input`.
fn ingest(db: &Path, input: &[u8]) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(["--json", "events", "ingest", "--batch", "100"])
        .env_remove("KEYTALLY_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // The command stops reading at a bad line.
        match stdin.write_all(input) {
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
    }
    Ok(child.wait_with_output()?)
}

fn event_line(n: usize) -> String {
    format!(
        "{{\"ts\": {}, \"model\": \"m\", \"status\": 200, \"request_id\": \"r{n}\"}}\n",
        1_790_000_000_000u64 + n as u64
    )
}

#[rstest]
fn a_failed_ingest_says_where_and_how_much_and_resumes_without_duplicates(
    folder: TempDir,
) -> TestResult {
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    // Lines 1..=1499 are events, line 1500 is not UTF-8, 1501..=1600 events.
    let mut input = Vec::new();
    for n in 1..=1499 {
        input.extend(event_line(n).into_bytes());
    }
    input.extend(b"{\"ts\": 1, \"model\": \"\xff\", \"status\": 200}\n");
    for n in 1501..=1600 {
        input.extend(event_line(n).into_bytes());
    }
    let failed = ingest(&db, &input)?;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let error = stderr_json(&failed)?;
    assert_eq!(error["line"], 1500, "{error}");
    assert_eq!(error["ingested"], 1499, "{error}");
    assert_eq!(error["resume_from_line"], 1500, "{error}");
    assert!(
        error["error"].as_str().is_some_and(|e| e.contains("UTF-8")),
        "{error}"
    );
    // Resume: the lines from the bad one on, the bad one fixed.
    let resumed: Vec<u8> = std::iter::once(event_line(1500))
        .chain((1501..=1600).map(event_line))
        .flat_map(String::into_bytes)
        .collect();
    let resumed = ingest(&db, &resumed)?;
    assert!(resumed.status.success(), "{resumed:?}");
    let listed = json_of(&run(&db, &["events", "list", "--limit", "10000"], "")?)?;
    let ids: std::collections::BTreeSet<String> = listed
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|event| event["request_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1600),
        "duplicates or gaps"
    );
    assert_eq!(ids.len(), 1600);

    // A database error names the batch's first line, and nothing of that
    // batch counts as committed.
    let other = folder.path().join("other.db");
    assert!(run(&other, &["migrate"], "")?.status.success());
    let unknown_key = "{\"ts\": 1790000000000, \"model\": \"m\", \"status\": 200, \
                       \"key_id\": \"0190f0f0-0000-7000-8000-000000000000\"}\n";
    let mut input = event_line(1).into_bytes();
    input.extend(unknown_key.as_bytes());
    let failed = ingest(&other, &input)?;
    let error = stderr_json(&failed)?;
    assert_eq!(error["line"], 2, "{error}");
    assert_eq!(error["ingested"], 0, "{error}");
    assert_eq!(error["resume_from_line"], 1, "{error}");
    Ok(())
}

#[rstest]
fn a_line_over_the_limit_is_refused_while_it_is_read(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let mut input = event_line(1).into_bytes();
    input.extend(vec![b'x'; 4 * 1024 * 1024]);
    input.push(b'\n');
    let failed = ingest(&db, &input)?;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let error = stderr_json(&failed)?;
    assert_eq!(error["line"], 2, "{error}");
    assert_eq!(error["ingested"], 1, "{error}");
    assert!(error["error"]
        .as_str()
        .is_some_and(|e| e.contains("longer than 16384 bytes")));
    Ok(())
}

#[rstest]
fn events_list_pages_past_ten_thousand(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    {
        let store = Store::open(&db)?;
        for chunk in 0..3 {
            let events: Vec<NewEvent> = (0..10_000)
                .map(|n| -> keytally::Result<NewEvent> {
                    let n = chunk * 10_000 + n;
                    // Pairs of events share a millisecond, so pages meet
                    // inside one.
                    let mut event =
                        NewEvent::new(Timestamp::from_millis(1_790_000_000_000 + n / 2)?, "m");
                    event.request_id = Some(format!("r{n}"));
                    Ok(event)
                })
                .collect::<keytally::Result<_>>()?;
            store.events().record_batch(&events)?;
        }
        let _ = store.close()?;
    }
    let listed = json_of(&run(&db, &["events", "list", "--limit", "25000"], "")?)?;
    let listed = listed.as_array().ok_or("not a list")?;
    assert_eq!(listed.len(), 25_000);
    let ids: std::collections::BTreeSet<i64> = listed
        .iter()
        .filter_map(|event| event["id"].as_i64())
        .collect();
    assert_eq!(ids.len(), 25_000, "an event was listed twice");
    let times: Vec<String> = listed
        .iter()
        .filter_map(|event| event["ts"].as_str().map(str::to_owned))
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] >= pair[1]),
        "not newest first"
    );
    // Asking for more than there are gives them all; zero is a usage error.
    let all = json_of(&run(&db, &["events", "list", "--limit", "40000"], "")?)?;
    assert_eq!(all.as_array().map(Vec::len), Some(30_000));
    assert_eq!(
        run(&db, &["events", "list", "--limit", "0"], "")?
            .status
            .code(),
        Some(2)
    );
    Ok(())
}

#[rstest]
fn progress_is_drawn_when_stderr_is_a_terminal_and_only_then(folder: TempDir) -> TestResult {
    let db = folder.path().join("keytally.db");
    assert!(run(&db, &["migrate"], "")?.status.success());
    let events = folder.path().join("events.jsonl");
    let lines: String = (0..60_000).map(event_line).collect();
    std::fs::write(&events, lines)?;
    let on_terminal = |redirect: &str| -> Result<String, Box<dyn std::error::Error>> {
        // script(1) puts the command on a pseudo-terminal and copies what it
        // shows to its stdout.
        let output = Command::new("script")
            .args(["-q", "-e", "-c"])
            .arg(format!(
                "'{BIN}' --db '{}' events ingest --batch 500 < '{}' {redirect}",
                path_arg(&db)?,
                path_arg(&events)?
            ))
            .arg("/dev/null")
            .env_remove("KEYTALLY_LOG")
            .output()?;
        assert!(output.status.success(), "{output:?}");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    // Output to a file, stderr on the terminal: progress is drawn, a bar
    // over the file's bytes (its size is known), with the rate, the time
    // left and the events committed.
    let out_file = folder.path().join("out.txt");
    let screen = on_terminal(&format!("> '{}'", path_arg(&out_file)?))?;
    let size = std::fs::metadata(&events)?.len();
    assert!(
        screen.contains("events") && screen.contains("left)") && screen.contains("MiB"),
        "no progress over the file's {size} bytes on the terminal: {screen:?}"
    );
    assert!(std::fs::read_to_string(&out_file)?.contains("ingested 60000 events"));
    // From a pipe the size is unknown: a count of events and their rate.
    let piped = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "cat '{}' | '{BIN}' --db '{}' events ingest --batch 500 > /dev/null",
            path_arg(&events)?,
            path_arg(&db)?
        ))
        .arg("/dev/null")
        .env_remove("KEYTALLY_LOG")
        .output()?;
    assert!(piped.status.success(), "{piped:?}");
    let screen = String::from_utf8_lossy(&piped.stdout);
    assert!(
        screen.contains(" events (") && screen.contains("/s, "),
        "no count and rate on the terminal: {screen:?}"
    );
    // A backup: a bar over the database's bytes.
    let backup = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "'{BIN}' --db '{}' backup '{}' > /dev/null",
            path_arg(&db)?,
            path_arg(&folder.path().join("copy.db"))?
        ))
        .arg("/dev/null")
        .env_remove("KEYTALLY_LOG")
        .output()?;
    assert!(backup.status.success(), "{backup:?}");
    let screen = String::from_utf8_lossy(&backup.stdout);
    assert!(
        screen.contains("MiB") && screen.contains("left) backing up to"),
        "no bar over the database's bytes: {screen:?}"
    );
    // stderr to a file: nothing is drawn there.
    let err_file = folder.path().join("err.txt");
    let screen = on_terminal(&format!("2> '{}'", path_arg(&err_file)?))?;
    assert_eq!(
        std::fs::read_to_string(&err_file)?,
        "",
        "progress went to a file"
    );
    assert!(screen.contains("ingested 60000 events"), "{screen:?}");
    Ok(())
}
