//! A full disk while recording: the caller gets `Error::DiskFull`, nothing
//! acknowledged is lost, the file stays healthy, and once space is freed the
//! same store works again.

use keytally::testing::folder;
use keytally::{Error, EventFilter, NewEvent, NewKey, Store, Timestamp};
use rstest::rstest;
use tempfile::TempDir;

use crate::TestResult;

#[rstest]
fn recording_on_a_full_disk_fails_cleanly_and_recovers(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("small");
    let _tmpfs = match crate::support::tmpfs::Tmpfs::mount(&mount_point, "6m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!("skipped recording_on_a_full_disk_fails_cleanly_and_recovers: {why}");
            return Ok(());
        }
    };
    let path = mount_point.join("keytally.db");
    let store = Store::open(&path)?;
    let key = store.keys().create(&NewKey::client("filler"))?.key.id;
    // Room to free later.
    let ballast = mount_point.join("ballast");
    std::fs::write(&ballast, vec![0u8; 3 * 1024 * 1024])?;
    let mut acknowledged = 0u64;
    let mut batch_number = 0u64;
    let disk_full = loop {
        let batch: Vec<NewEvent> = (0..100)
            .map(|i| -> Result<NewEvent, Error> {
                let mut event = NewEvent::new(Timestamp::now(), "big-model");
                event.key_id = Some(key);
                event.request_id = Some(format!("{batch_number:08}-{i:03}-{}", "x".repeat(100)));
                Ok(event)
            })
            .collect::<Result<_, _>>()?;
        match store.events().record_batch(&batch) {
            Ok(ids) => acknowledged += ids.len() as u64,
            Err(error) => break error,
        }
        batch_number += 1;
        assert!(batch_number < 100_000, "the disk never filled");
    };
    assert!(matches!(disk_full, Error::DiskFull { .. }), "{disk_full:?}");
    assert!(acknowledged > 0);
    let count = |store: &Store| -> Result<u64, Error> {
        let mut total = 0;
        let mut filter = EventFilter {
            limit: Some(10_000),
            ..EventFilter::default()
        };
        loop {
            let page = store.events().list(&filter)?;
            let Some(last) = page.last() else {
                return Ok(total);
            };
            filter.before = Some(last.cursor());
            total += page.len() as u64;
        }
    };
    assert_eq!(count(&store)?, acknowledged, "acknowledged events lost");
    std::fs::remove_file(&ballast)?;
    // The same store, without a restart, records again.
    let again = NewEvent::new(Timestamp::now(), "big-model");
    store.events().record(&again)?;
    assert_eq!(count(&store)?, acknowledged + 1);
    let check = store.check()?;
    assert!(check.healthy(), "{:?}", check.problems);
    let _ = store.close()?;
    eprintln!("full disk: {acknowledged} events acknowledged before DiskFull, all present");
    Ok(())
}

#[rstest]
fn a_backup_to_a_full_disk_names_its_destination_and_leaves_nothing(folder: TempDir) -> TestResult {
    let mount_point = folder.path().join("tiny");
    let _tmpfs = match crate::support::tmpfs::Tmpfs::mount(&mount_point, "64k") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!(
                "skipped a_backup_to_a_full_disk_names_its_destination_and_leaves_nothing: {why}"
            );
            return Ok(());
        }
    };
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
