//! A full disk while recording: the caller gets `Error::DiskFull`, nothing
//! acknowledged is lost, the file stays healthy, and once space is freed the
//! same store works again.

use keytally::testing::folder;
use keytally::{
    Budget, BudgetPeriod, Cost, Error, EventFilter, KeyId, NewEvent, NewKey, Store, Timestamp,
};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::spend::{all_events, budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

/// What an event of 1,000 prompt tokens costs, at 1.00 a million.
const EVENT: i64 = 1_000_000;

#[rstest]
fn recording_on_a_full_disk_fails_cleanly_and_recovers(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("small");
    let _tmpfs = crate::support::tmpfs::Tmpfs::mount(&mount_point, "6m")?;
    let path = mount_point.join("keytally.db");
    let store = Store::open(&path)?;
    // Events are priced, and the key has a budget of 1,000 of its events
    // of 1,000 tokens: a batch that fails for want of room, costing as much
    // again, must count nothing toward it, in the database or in the spend
    // the store keeps in memory between its transactions.
    price_model(&store, "big-model")?;
    let key = store
        .keys()
        .create(&NewKey {
            budget: Some(Budget::new(Cost(1_000 * EVENT), BudgetPeriod::Day)),
            ..NewKey::client("filler")
        })?
        .key
        .id;
    let event = |key_id: Option<KeyId>, tokens: i64| {
        let mut event = NewEvent::new(Timestamp::now(), "big-model");
        event.key_id = key_id;
        event.prompt_tokens = tokens;
        event
    };
    store.events().record(&event(Some(key), 1_000))?;
    let (mut acknowledged, mut of_key) = (1u64, 1i64);
    // Room to free later.
    let ballast = mount_point.join("ballast");
    std::fs::write(&ballast, vec![0u8; 3 * 1024 * 1024])?;
    let batch = |number: u64, key_id: Option<KeyId>, tokens: i64| -> Vec<NewEvent> {
        (0..100)
            .map(|i| {
                let mut event = event(key_id, tokens);
                event.request_id = Some(format!("{number:08}-{i:03}-{}", "x".repeat(100)));
                event
            })
            .collect()
    };
    let mut batch_number = 0u64;
    let disk_full = loop {
        match store
            .events()
            .record_batch(&batch(batch_number, None, 1_000))
        {
            Ok(ids) => acknowledged += ids.len() as u64,
            Err(error) => break error,
        }
        batch_number += 1;
        assert!(batch_number < 100_000, "the disk never filled");
    };
    assert!(matches!(disk_full, Error::DiskFull { .. }), "{disk_full:?}");
    assert!(acknowledged > 1);
    // A batch as large, of the key, that would reach its budget.
    let refused = store
        .events()
        .record_batch(&batch(batch_number, Some(key), 10_000));
    assert!(
        matches!(refused, Err(Error::DiskFull { .. })),
        "{refused:?}"
    );
    // Single events of the key, until one fails too.
    let mut single_failed = false;
    for _ in 0..10_000 {
        match store.events().record(&event(Some(key), 1_000)) {
            Ok(_) => (acknowledged, of_key) = (acknowledged + 1, of_key + 1),
            Err(error) => {
                assert!(matches!(error, Error::DiskFull { .. }), "{error:?}");
                single_failed = true;
                break;
            }
        }
    }
    assert!(single_failed, "every single event found room");
    let count = |store: &Store| -> keytally::Result<u64> {
        Ok(all_events(store, &EventFilter::default())?.len() as u64)
    };
    assert_eq!(count(&store)?, acknowledged, "acknowledged events lost");
    std::fs::remove_file(&ballast)?;
    // The same store, without a restart, records again, and the key's
    // spend is what its committed events cost, in the store that saw the
    // failures and in a new one.
    store.events().record(&event(Some(key), 1_000))?;
    store
        .events()
        .record_batch(&[event(Some(key), 1_000), event(None, 1_000)])?;
    store.events().record(&event(Some(key), 1_000))?;
    (acknowledged, of_key) = (acknowledged + 4, of_key + 3);
    assert_eq!(count(&store)?, acknowledged);
    let check = store.check()?;
    assert!(check.healthy(), "{:?}", check.problems);
    let spend = |store: &Store| -> Result<Cost, Box<dyn std::error::Error>> {
        Ok(store.keys().budget(key)?.ok_or("no budget")?.spend)
    };
    assert_eq!(spend(&store)?, Cost(of_key * EVENT));
    let mut raw = Raw::Sqlite(store.sqlite_connection()?);
    let checked = budgets_hold(&store, &mut raw, 0, "after the full disk")?;
    assert_eq!((checked.budgets, checked.reached), (1, 0));
    // An event that takes the spend exactly to the budget reaches it: had
    // the failed batch counted, it would have been reached already.
    let rest = (1_000 - of_key) * 1_000;
    store.events().record(&event(Some(key), rest))?;
    assert_eq!(spend(&store)?, Cost(1_000 * EVENT));
    let checked = budgets_hold(&store, &mut raw, 0, "the budget reached")?;
    assert_eq!((checked.budgets, checked.reached), (1, 1));
    drop(raw);
    let _ = store.close()?;
    let store = Store::open(&path)?;
    assert_eq!(spend(&store)?, Cost(1_000 * EVENT));
    let _ = store.close()?;
    eprintln!("full disk: {acknowledged} events acknowledged before DiskFull, all present");
    Ok(())
}

#[rstest]
fn a_backup_to_a_full_disk_names_its_destination_and_leaves_nothing(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("tiny");
    let _tmpfs = crate::support::tmpfs::Tmpfs::mount(&mount_point, "64k")?;
    let db = folder.path().join("keytally.db");
    let store = Store::open(&db)?;
    let key = store.keys().create(&NewKey::client("big"))?.key.id;
    let batch: Vec<NewEvent> = (0..2_000)
        .map(|i| -> Result<NewEvent, Error> {
            let mut event = NewEvent::new(Timestamp::now(), "big-model");
            event.key_id = Some(key);
            event.request_id = Some(format!("{i:06}-{}", "x".repeat(100)));
            Ok(event)
        })
        .collect::<Result<_, _>>()?;
    store.events().record_batch(&batch)?;
    let _ = store.close()?;
    let destination = mount_point.join("nightly.db");
    for attempt in 0..2 {
        let output = std::process::Command::new(crate::support::binary::BIN)
            .arg("--db")
            .arg(&db)
            .arg("backup")
            .arg(&destination)
            .env_remove("KEYTALLY_LOG")
            .output()?;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8(output.stderr)?;
        assert!(
            stderr.contains(&format!("disk full writing {}", destination.display())),
            "attempt {attempt}: {stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(&mount_point)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()?;
        assert!(left.is_empty(), "attempt {attempt} left {left:?}");
    }
    Ok(())
}
