//! Online backups while another process keeps writing: every backup is a
//! consistent snapshot that restores and passes `integrity_check`, and whose
//! budget spend matches its own events.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keytally::testing::folder;
use keytally::{
    Budget, BudgetPeriod, Cost, EventCursor, EventFilter, NewKey, Store, StoreOptions, Timestamp,
};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::binary::BIN;
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

const BATCH: usize = 50;

/// Request ids `b<batch>-<i>` per batch, from every event in the store.
fn batches_in(store: &Store) -> Result<BTreeMap<u64, usize>, Box<dyn std::error::Error>> {
    let mut counts = BTreeMap::new();
    let mut before: Option<EventCursor> = None;
    loop {
        let page = store.events().list(&EventFilter {
            before,
            limit: Some(10_000),
            ..EventFilter::default()
        })?;
        let Some(last) = page.last() else {
            return Ok(counts);
        };
        before = Some(last.cursor());
        for event in &page {
            let id = event
                .request_id
                .as_deref()
                .ok_or("event without request id")?;
            let batch: u64 = id
                .strip_prefix('b')
                .and_then(|rest| rest.split('-').next())
                .ok_or("bad request id")?
                .parse()?;
            *counts.entry(batch).or_insert(0) += 1;
        }
    }
}

#[rstest]
fn backups_taken_during_writes_are_whole_snapshots(folder: TempDir) -> TestResult {
    let db = folder.path().join("live.db");
    // The events are priced and of a key whose budget the writer reaches
    // about half way through the backups (at batch 150): each backup's
    // spend must match its own events, and its refusal its spend.
    let store = Store::open(&db)?;
    price_model(&store, "m")?;
    let key = store
        .keys()
        .create(&NewKey {
            budget: Some(Budget::new(
                Cost(150 * BATCH as i64 * 1_000_000),
                BudgetPeriod::Days {
                    days: 3_650,
                    from: Timestamp::parse("2026-01-01T00:00:00Z")?,
                },
            )),
            ..NewKey::client("backed up")
        })?
        .key
        .id;
    let _ = store.close()?;
    // The writer is another process: `keytally events ingest`, committing
    // every BATCH lines.
    let mut writer = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["events", "ingest", "--batch", &BATCH.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = writer.stdin.take().ok_or("no stdin")?;
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut batch = 0u64;
            while !stop.load(Ordering::Relaxed) && batch < 2_000 {
                let mut lines = String::new();
                for i in 0..BATCH {
                    lines.push_str(&format!(
                        "{{\"ts\":{},\"model\":\"m\",\"status\":200,\"request_id\":\"b{batch}-{i}\",\
                         \"key_id\":\"{key}\",\"prompt_tokens\":1000}}\n",
                        1_790_000_000_000u64 + batch * 1000 + i as u64
                    ));
                }
                stdin.write_all(lines.as_bytes())?;
                batch += 1;
            }
            Ok(batch)
        })
    };
    let store = Store::open(&db)?;
    // The newest committed event, to take each backup only after the writer
    // has moved on since the previous one.
    let newest = |store: &Store| -> Result<Option<keytally::EventId>, keytally::Error> {
        Ok(store
            .events()
            .list(&EventFilter {
                limit: Some(1),
                ..EventFilter::default()
            })?
            .first()
            .map(|event| event.id))
    };
    let mut backups = Vec::new();
    let mut previous = None;
    for n in 0..6 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while newest(&store)? <= previous {
            assert!(std::time::Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        let path = folder.path().join(format!("backup-{n}.db"));
        store.backup_to(&path, false)?;
        // Everything in this backup is at or before the newest event now.
        previous = newest(&store)?;
        backups.push(path);
    }
    stop.store(true, Ordering::Relaxed);
    let fed = feeder.join().map_err(|_| "feeder panicked")??;
    let output = writer.wait_with_output()?;
    assert!(output.status.success(), "{output:?}");
    let _ = store.close()?;

    let (mut newest_seen, mut reached) = (Vec::new(), Vec::new());
    for (n, backup) in backups.iter().enumerate() {
        let restored = folder.path().join(format!("restored-{n}.db"));
        keytally::restore(&restored, backup, &StoreOptions::new(&restored))?;
        let store = Store::open(&restored)?;
        let check = store.check()?;
        assert!(check.healthy(), "{:?}", check.problems);
        let batches = batches_in(&store)?;
        // Whole batches only, and every batch before the newest one present.
        for (batch, count) in &batches {
            assert_eq!(*count, BATCH, "backup {n}: batch {batch} is torn");
        }
        let expected: Vec<u64> = (0..batches.len() as u64).collect();
        assert_eq!(
            batches.keys().copied().collect::<Vec<_>>(),
            expected,
            "backup {n} misses a batch"
        );
        newest_seen.push(batches.len());
        let mut raw = Raw::Sqlite(store.sqlite_connection()?);
        let checked = budgets_hold(&store, &mut raw, 0, &format!("backup {n}"))?;
        drop(raw);
        assert_eq!(checked.budgets, 1);
        reached.push(checked.reached == 1);
        let _ = store.close()?;
    }
    // The backups were taken while writing went on: each holds more.
    assert!(
        newest_seen.windows(2).all(|pair| pair[0] < pair[1]),
        "{newest_seen:?}"
    );
    assert!(fed > 0);
    eprintln!("backups during writes: batches {newest_seen:?}, budget reached {reached:?}");
    Ok(())
}
