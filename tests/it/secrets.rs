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

#[rstest]
fn no_log_line_or_debug_output_contains_a_secret(store: TestStore) -> TestResult {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    let mut secrets = Vec::new();
    let mut debug_output = String::new();
    tracing::subscriber::with_default(subscriber, || -> TestResult {
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
        Ok(())
    })?;
    let logs = String::from_utf8(captured.0.lock().map_err(|_| "poisoned")?.clone())?;
    assert!(logs.contains("created key"), "nothing was logged: {logs}");
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
