//! Crash loop: a real child process writes keys and event batches and is
//! killed with SIGKILL at random moments. After every kill the store opens,
//! passes `integrity_check`, holds every write the child acknowledged, and
//! holds no batch in part, and each key's budget spend equals a recount
//! of its events.
//!
//! 50 kills by default; `KEYTALLY_CRASH_KILLS=5000` for a long run.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::folder;
use keytally::{KeyId, Store};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::crash_writer::{crash_writer, whole_lines};
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

/// Events per batch, as the child writes them.
const BATCH: usize = 20;

/// Every batch number present, with how many of its events are present.
pub(crate) fn batches(store: &Store) -> Result<BTreeMap<u64, usize>, Box<dyn std::error::Error>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        batch: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = store.sqlite_connection()?;
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT substr(request_id, 2, instr(request_id, '-') - 2) AS batch, count(*) AS n \
         FROM events GROUP BY batch",
    )
    .load(&mut *conn)?;
    let mut counts = BTreeMap::new();
    for row in rows {
        counts.insert(row.batch.parse()?, usize::try_from(row.n)?);
    }
    Ok(counts)
}

/// Reports of one crash-loop run, for `docs/reliability.md`.
#[derive(Debug, Default)]
pub struct CrashFigures {
    /// Child processes killed.
    pub kills: u64,
    /// Batches the children acknowledged (all found after the kills).
    pub acknowledged_batches: u64,
    /// Keys the children acknowledged (all found after the kills).
    pub acknowledged_keys: u64,
    /// Budgets checked (one per key, after the kill that ended its writer).
    pub budgets: u64,
    /// Those of them reached.
    pub budgets_reached: u64,
}

#[rstest]
fn acknowledged_writes_survive_sigkill(folder: TempDir) -> TestResult {
    let kills: u64 = std::env::var("KEYTALLY_CRASH_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let writer = crash_writer()?;
    let db = folder.path().join("crash.db");
    let mut acked_batches: BTreeSet<u64> = BTreeSet::new();
    let mut acked_keys: BTreeSet<KeyId> = BTreeSet::new();
    let mut rng = crate::support::random::Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    );
    let mut figures = CrashFigures::default();
    let store = Store::open(&db)?;
    price_model(&store, "crash-model")?;
    let _ = store.close()?;
    let mut checked_up_to = 0;
    for round in 0..kills {
        let first_batch = round * 1_000_000;
        let mut child = Command::new(&writer)
            .arg(&db)
            .arg(first_batch.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let reader = whole_lines(stdout);
        std::thread::sleep(Duration::from_millis(10 + rng.below(150)));
        child.kill()?;
        let status = child.wait()?;
        assert!(!status.success(), "the child ended by itself: {status:?}");
        let lines = reader.join().map_err(|_| "reader panicked")?;
        for line in lines {
            if let Some(number) = line.strip_prefix("batch ") {
                acked_batches.insert(number.parse()?);
            } else if let Some(id) = line.strip_prefix("key ") {
                acked_keys.insert(id.parse()?);
            }
        }
        figures.kills += 1;

        let store = Store::open(&db)?;
        let check = store.check()?;
        assert!(check.healthy(), "after kill {round}: {:?}", check.problems);
        let present = batches(&store)?;
        for (number, count) in &present {
            assert_eq!(*count, BATCH, "after kill {round}: batch {number} is torn");
        }
        for number in &acked_batches {
            assert!(
                present.contains_key(number),
                "after kill {round}: acknowledged batch {number} is lost"
            );
        }
        for id in &acked_keys {
            store.keys().get(*id)?;
        }
        // The keys of earlier rounds were checked after their kill and are
        // not written to again.
        let mut raw = Raw::Sqlite(store.sqlite_connection()?);
        let checked = budgets_hold(
            &store,
            &mut raw,
            checked_up_to,
            &format!("after kill {round}"),
        )?;
        drop(raw);
        checked_up_to = checked.last_row_id;
        figures.budgets += checked.budgets as u64;
        figures.budgets_reached += checked.reached as u64;
        let _ = store.close()?;
    }
    figures.acknowledged_batches = acked_batches.len() as u64;
    figures.acknowledged_keys = acked_keys.len() as u64;
    assert!(
        figures.acknowledged_batches > 0 && figures.budgets_reached > 0,
        "the child never got to write, or to reach a budget: {figures:?}"
    );
    eprintln!("crash loop: {figures:?}");
    Ok(())
}
