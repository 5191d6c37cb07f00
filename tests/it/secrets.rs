//! Secrets never leave keytally except once, at creation or rotation.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keytally::testing::{store, TestStore};
use keytally::{KeyUpdate, NewKey};
use rstest::rstest;

use crate::TestResult;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at trace level: a global subscriber,
/// set once (per-thread subscribers miss events when tests run in parallel).
fn captured_logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer({
                let captured = captured.clone();
                move || captured.clone()
            })
            .finish();
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            eprintln!("a global subscriber was already set; logs are not captured");
        }
        captured
    })
}

#[rstest]
fn no_log_line_or_debug_output_contains_a_secret(store: TestStore) -> TestResult {
    let captured = captured_logs();
    let mut secrets = Vec::new();
    let mut debug_output = String::new();
    let created = store.keys().create(&NewKey::client("logged"))?;
    debug_output.push_str(&format!("{created:?} {created:#?}"));
    secrets.push(created.secret.expose().to_owned());
    let active = store.keys().resolve(created.secret.expose())?;
    debug_output.push_str(&format!("{active:?}"));
    let rotated = store
        .keys()
        .rotate(created.key.id, Duration::from_secs(60))?;
    debug_output.push_str(&format!("{rotated:?} {}", rotated.secret));
    secrets.push(rotated.secret.expose().to_owned());
    store.keys().update(
        created.key.id,
        &KeyUpdate {
            label: Some("relabelled".to_owned()),
            ..KeyUpdate::default()
        },
    )?;
    store
        .keys()
        .resolve(&secrets[0])?
        .map_err(|r| r.to_string())?;
    store.keys().flush_last_used()?;
    store.keys().revoke(created.key.id)?;
    store
        .keys()
        .resolve(&secrets[1])?
        .err()
        .ok_or("revoked key resolved")?;
    let logs = String::from_utf8(captured.0.lock().map_err(|_| "poisoned")?.clone())?;
    let id = created.key.id.to_string();
    assert!(
        logs.lines()
            .any(|line| line.contains("created key") && line.contains(&id)),
        "the key's creation was not logged"
    );
    for secret in &secrets {
        // The part after the display prefix is what must stay secret.
        let hidden = &secret[7..];
        assert!(!logs.contains(hidden), "a log line holds a secret");
        assert!(
            !debug_output.contains(hidden),
            "Debug output holds a secret"
        );
    }
    Ok(())
}

/// Whether `haystack` holds the secret part (after the display prefix) of
/// any of `secrets`.
fn leaks(haystack: &[u8], secrets: &[String]) -> Option<String> {
    secrets.iter().find_map(|secret| {
        let hidden = &secret.as_bytes()[7..];
        haystack
            .windows(hidden.len())
            .any(|window| window == hidden)
            .then(|| secret[..7].to_owned())
    })
}

#[rstest]
fn nothing_keytally_writes_holds_a_secret(
    #[from(keytally::testing::folder)] folder: tempfile::TempDir,
) -> TestResult {
    use std::process::{Command, Stdio};
    let db = folder.path().join("keytally.db");
    let bin = crate::support::binary::BIN;
    // Every run at trace level; `shown` collects what may hold a secret (the
    // one-time creation output), `scanned` everything else.
    let mut scanned: Vec<(String, Vec<u8>)> = Vec::new();
    let mut run = |args: &[&str],
                   stdin: &str,
                   creation: bool|
     -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let mut child = Command::new(bin)
            .arg("--db")
            .arg(&db)
            .args(args)
            .env("KEYTALLY_LOG", "trace")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(stdin.as_bytes())?;
        let output = child.wait_with_output()?;
        assert!(output.status.success(), "{args:?}: {output:?}");
        scanned.push((format!("stderr of {args:?}"), output.stderr.clone()));
        if !creation {
            scanned.push((format!("stdout of {args:?}"), output.stdout.clone()));
        }
        Ok(output.stdout)
    };
    let mut secrets = Vec::new();
    let created: serde_json::Value = serde_json::from_slice(&run(
        &["--json", "keys", "create", "--label", "a"],
        "",
        true,
    )?)?;
    let id = created["key"]["id"].as_str().ok_or("no id")?.to_owned();
    secrets.push(created["secret"].as_str().ok_or("no secret")?.to_owned());
    run(&["keys", "resolve"], &secrets[0], false)?;
    let rotated: serde_json::Value = serde_json::from_slice(&run(
        &["--json", "keys", "rotate", &id, "--grace", "1h"],
        "",
        true,
    )?)?;
    let new_secret = rotated["secret"].as_str().ok_or("no secret")?.to_owned();
    // The rotation output shows the new secret, never the old one.
    assert!(leaks(&serde_json::to_vec(&rotated)?, &secrets).is_none());
    secrets.push(new_secret);
    run(&["keys", "resolve"], &secrets[1], false)?;
    run(&["keys", "resolve"], &secrets[0], false)?;
    run(&["keys", "list", "--all"], "", false)?;
    run(&["keys", "show", &id], "", false)?;
    run(
        &["events", "ingest"],
        &format!("{{\"ts\":1790000000000,\"key_id\":\"{id}\",\"model\":\"m\",\"status\":200}}\n"),
        false,
    )?;
    run(&["status"], "", false)?;
    run(&["check"], "", false)?;
    let backup = folder.path().join("backup.db");
    run(&["backup", backup.to_str().ok_or("path")?], "", false)?;
    run(&["keys", "revoke", &id], "", false)?;

    // A store held open in this process, so that the log and its index exist.
    let store = keytally::Store::open(&db)?;
    let live = store.keys().create(&NewKey::client("live"))?;
    secrets.push(live.secret.expose().to_owned());
    store
        .keys()
        .resolve(&secrets[2])?
        .map_err(|r| r.to_string())?;
    store.keys().flush_last_used()?;
    for suffix in ["", "-wal", "-shm"] {
        let path = crate::sidecar(&db, suffix);
        scanned.push((path.display().to_string(), std::fs::read(&path)?));
    }
    let _ = store.close()?;
    scanned.push(("database after close".to_owned(), std::fs::read(&db)?));
    scanned.push(("backup".to_owned(), std::fs::read(&backup)?));
    let traced: usize = scanned
        .iter()
        .filter(|(name, _)| name.starts_with("stderr"))
        .map(|(_, b)| b.len())
        .sum();
    assert!(traced > 0, "trace logging produced nothing to scan");
    for (name, bytes) in &scanned {
        if let Some(prefix) = leaks(bytes, &secrets) {
            return Err(format!("{name} holds the secret starting {prefix}").into());
        }
    }
    Ok(())
}
