//! Power loss, simulated the way SQLite tests itself: a child process
//! (`examples/power_cut`) runs the store over a VFS that remembers every
//! write not yet synced, cuts the power at a random operation, and rewrites
//! the files as the cut left them, each unsynced write kept, lost or torn
//! sector by sector. The real store then opens the files here and checks
//! them.
//!
//! Cuts per test: 12 by default; `KEYTALLY_POWER_CUTS=1000` for the
//! figures in `docs/reliability.md` (run with `--nocapture` to see them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use diesel::sql_types::{Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};
use keytally::testing::folder;
use keytally::{Budget, BudgetPeriod, Cost, NewKey, Store};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::crash_writer::example;
use crate::support::random::Rng;
use crate::support::spend::{budgets_hold, price_model};
use crate::support::sql::Raw;
use crate::TestResult;

fn cuts() -> u64 {
    std::env::var("KEYTALLY_POWER_CUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(12)
}

fn seed() -> Result<u64, Box<dyn std::error::Error>> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64)
}

/// A migrated database with one key, copied into each run's folder. The
/// child's model costs 1.00 a million prompt tokens, and the key has a
/// budget of 0.10 a day with a soft limit of 0.05: the `records` and
/// `paced` scenarios reach both a fraction of the way in, so cuts land
/// before, at and after the key's refusal.
fn template(folder: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = folder.join("template.db");
    let store = Store::open(&path)?;
    price_model(&store, "power-model")?;
    store.keys().create(&NewKey {
        budget: Some(Budget {
            limit: Cost(100_000_000),
            soft_limit: Some(Cost(50_000_000)),
            period: BudgetPeriod::Day,
        }),
        ..NewKey::client("power")
    })?;
    assert!(store.close()?.checkpoint_complete);
    Ok(path)
}

/// What one child run reported.
#[derive(Debug, Default)]
struct Run {
    /// Acknowledged commits in order: (commit number, events).
    acked: Vec<(u64, u64)>,
    /// When each was acknowledged, in microseconds after the cut was armed.
    acked_at: Vec<u64>,
    /// When the power went, in microseconds after the cut was armed.
    cut_at: u64,
    /// The first this many acknowledged commits were in the log before its
    /// last completed sync.
    synced: usize,
    counted: u64,
    cut: bool,
    backup_done: bool,
    restore_done: bool,
    damage: String,
}

/// Runs the child in a fresh folder holding a copy of `template`.
fn run(
    template: &Path,
    parent: &Path,
    scenario: &str,
    synchronous: &str,
    at: u64,
    rng: &mut Rng,
) -> Result<(TempDir, Run), Box<dyn std::error::Error>> {
    let folder = tempfile::tempdir_in(parent)?;
    std::fs::copy(template, folder.path().join("keytally.db"))?;
    let garbage = if rng.below(4) == 0 { "1" } else { "0" };
    let output = Command::new(example("power_cut")?)
        .args([scenario, &folder.path().to_string_lossy(), synchronous])
        .arg(at.to_string())
        .arg(rng.next_u64().to_string())
        .arg(garbage)
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        output.status.success(),
        "power_cut {scenario} {synchronous} {at} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut report = Run::default();
    for line in stdout.lines() {
        let mut words = line.split(' ');
        match words.next() {
            Some("ack") => {
                let n = words.next().ok_or("ack without number")?.parse()?;
                let events = words.next().ok_or("ack without events")?.parse()?;
                report.acked.push((n, events));
                report
                    .acked_at
                    .push(words.next().ok_or("ack without time")?.parse()?);
            }
            Some("synced") => report.synced = words.next().ok_or("synced")?.parse()?,
            Some("counted") => report.counted = words.next().ok_or("counted")?.parse()?,
            Some("cut") => {
                report.cut = true;
                report.cut_at = words.next().ok_or("cut without time")?.parse()?;
            }
            Some("backup") => report.backup_done = true,
            Some("restore") => report.restore_done = true,
            Some("damage") => report.damage = line.to_owned(),
            _ => return Err(format!("unexpected report {line}").into()),
        }
    }
    Ok((folder, report))
}

#[derive(QueryableByName)]
struct RequestId {
    #[diesel(sql_type = Nullable<Text>)]
    request_id: Option<String>,
}

/// Events present per commit number (request ids `c<n>-<j>`).
fn commits(store: &Store) -> Result<BTreeMap<u64, u64>, Box<dyn std::error::Error>> {
    let mut conn = store.sqlite_connection()?;
    let rows: Vec<RequestId> =
        diesel::sql_query("SELECT request_id FROM events").load(&mut *conn)?;
    let mut present = BTreeMap::new();
    for row in rows {
        let id = row.request_id.ok_or("an event without request id")?;
        let number = id
            .strip_prefix('c')
            .and_then(|rest| rest.split('-').next())
            .ok_or_else(|| format!("unexpected request id {id}"))?;
        *present.entry(number.parse()?).or_insert(0) += 1;
    }
    Ok(present)
}

/// Opens the database the cut left and checks it: it opens, passes
/// `check`, its rollups equal a recount of its events, and so does the
/// key's budget spend, which refuses the key exactly when it reached the
/// budget. Returns the store, and whether the key had reached its budget.
fn open_and_check(
    database: &Path,
    what: &str,
) -> Result<(Store, bool), Box<dyn std::error::Error>> {
    let store =
        Store::open(database).map_err(|e| format!("{what}: the store does not open: {e}"))?;
    let check = store.check()?;
    assert!(check.healthy(), "{what}: {:?}", check.problems);
    let mut raw = Raw::Sqlite(store.sqlite_connection()?);
    assert_eq!(
        raw.rollups_against_recount()?,
        0,
        "{what}: rollups differ from a recount"
    );
    let checked = budgets_hold(&store, &mut raw, 0, what)?;
    assert_eq!(checked.budgets, 1, "{what}: the key's budget");
    drop(raw);
    Ok((store, checked.reached == 1))
}

/// Figures of one setting, for `docs/reliability.md`.
#[derive(Debug, Default)]
struct Figures {
    runs: u64,
    cuts: u64,
    acknowledged: u64,
    lost: u64,
    most_lost_in_one_cut: u64,
    /// The longest time from a lost commit's acknowledgement to the cut.
    longest_lost_ms: f64,
    /// Cuts that left the key at or over its budget.
    budget_reached: u64,
}

/// Events in commit `n` of the `records` and `checkpoint` scenarios.
fn records_events(n: u64) -> u64 {
    if n % 3 == 0 {
        5
    } else {
        1
    }
}

/// Cuts the power `cuts` times at random operations of `scenario` and
/// checks what each cut left: the database opens whole, no commit is there
/// in part, and the commits lost are the last acknowledged ones, none of
/// them in the log before its last sync (none at all with `full`).
fn power_cuts(
    scenario: &str,
    synchronous: &str,
    cuts: u64,
    events_of: fn(u64) -> u64,
) -> Result<Figures, Box<dyn std::error::Error>> {
    let folder = folder();
    let template = template(folder.path())?;
    let mut rng = Rng::new(seed()?);
    // A whole run without a cut, to know how many operations there are to
    // cut at.
    let (whole_folder, whole) = run(&template, folder.path(), scenario, synchronous, 0, &mut rng)?;
    assert!(!whole.cut && !whole.acked.is_empty(), "{whole:?}");
    let what = format!("{scenario} {synchronous} without a cut");
    let (store, reached) = open_and_check(&whole_folder.path().join("keytally.db"), &what)?;
    assert!(reached, "{what}: the run never reached the key's budget");
    let _ = store.close()?;
    assert!(whole.counted > 0);
    let mut figures = Figures::default();
    for _ in 0..cuts {
        let at = 1 + rng.below(whole.counted);
        let (run_folder, report) = run(
            &template,
            folder.path(),
            scenario,
            synchronous,
            at,
            &mut rng,
        )?;
        let what = format!("{scenario} {synchronous} cut at {at} ({})", report.damage);
        figures.runs += 1;
        figures.cuts += u64::from(report.cut);
        let (store, reached) = open_and_check(&run_folder.path().join("keytally.db"), &what)?;
        figures.budget_reached += u64::from(reached);
        let present = commits(&store)?;
        for (n, count) in &present {
            assert_eq!(*count, events_of(*n), "{what}: commit {n} is there in part");
        }
        let lost: Vec<usize> = (0..report.acked.len())
            .filter(|i| !present.contains_key(&report.acked[*i].0))
            .collect();
        if let Some(&first_lost) = lost.first() {
            assert!(
                first_lost >= report.synced,
                "{what}: commit {} was in the log before its last sync ({} commits) and is lost",
                report.acked[first_lost].0,
                report.synced
            );
            let later_present: Vec<u64> = report.acked[first_lost..]
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| present.contains_key(n))
                .collect();
            assert!(
                later_present.is_empty(),
                "{what}: commit {} is lost but later ones are there: {later_present:?}",
                report.acked[first_lost].0
            );
            let window = report.cut_at.saturating_sub(report.acked_at[first_lost]);
            figures.longest_lost_ms = figures.longest_lost_ms.max(window as f64 / 1000.0);
        }
        if synchronous == "full" {
            assert!(
                lost.is_empty(),
                "{what}: acknowledged commits lost: {lost:?}"
            );
        }
        figures.acknowledged += report.acked.len() as u64;
        figures.lost += lost.len() as u64;
        figures.most_lost_in_one_cut = figures.most_lost_in_one_cut.max(lost.len() as u64);
        let _ = store.close()?;
    }
    assert!(
        figures.cuts * 2 >= figures.runs,
        "most runs ended before their cut: {figures:?}"
    );
    eprintln!("power loss, {scenario}, synchronous {synchronous}: {figures:?}");
    Ok(figures)
}

#[rstest]
fn acknowledged_commits_and_a_whole_database_survive_power_cuts(
    #[values("full", "normal")] synchronous: &str,
    #[values("records", "checkpoint")] scenario: &str,
) -> TestResult {
    power_cuts(scenario, synchronous, cuts(), records_events)?;
    Ok(())
}

/// As a gateway writes: a steady stream of single records, checkpointed only
/// by the store's maintenance thread. Each run takes 2.5 s, so a sixth of
/// the cuts.
#[rstest]
fn a_steady_writer_loses_at_most_what_came_after_the_last_checkpoint(
    #[values("full", "normal")] synchronous: &str,
) -> TestResult {
    power_cuts("paced", synchronous, (cuts() / 6).max(2), |_| 1)?;
    Ok(())
}

/// The 15 commits of 20 events the backup scenarios make, all there.
fn holds_the_backup_scenario(store: &Store, what: &str) -> TestResult {
    let present = commits(store)?;
    let expected: BTreeMap<u64, u64> = (0..15).map(|n| (n, 20)).collect();
    assert_eq!(present, expected, "{what}");
    Ok(())
}

#[rstest]
fn a_power_cut_during_a_backup_leaves_the_database_whole(
    #[values("full", "normal")] synchronous: &str,
    folder: TempDir,
) -> TestResult {
    let template = template(folder.path())?;
    let mut rng = Rng::new(seed()?);
    let (_, whole) = run(&template, folder.path(), "backup", synchronous, 0, &mut rng)?;
    assert!(whole.backup_done && whole.counted > 0, "{whole:?}");
    for _ in 0..cuts() {
        let at = 1 + rng.below(whole.counted);
        let (run_folder, report) = run(
            &template,
            folder.path(),
            "backup",
            synchronous,
            at,
            &mut rng,
        )?;
        assert!(report.cut && !report.backup_done, "{report:?}");
        let what = format!("backup {synchronous} cut at {at} ({})", report.damage);
        let (store, _) = open_and_check(&run_folder.path().join("keytally.db"), &what)?;
        holds_the_backup_scenario(&store, &what)?;
        // No backup was reported, and none is there: the copy never got its
        // name, or lost it with the folder entry.
        let destination = run_folder.path().join("backup.db");
        assert!(
            !destination.exists(),
            "{what}: a backup that was never reported done"
        );
        // The next backup clears what the cut left and succeeds.
        store.backup_to(&destination, false)?;
        let _ = store.close()?;
        let names: BTreeSet<String> = std::fs::read_dir(run_folder.path())?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        let expected: BTreeSet<String> = ["backup.db", "keytally.db"].map(String::from).into();
        assert_eq!(names, expected, "{what}");
    }
    Ok(())
}

#[rstest]
fn a_backup_reported_done_survives_a_power_cut_right_after(
    #[values("full", "normal")] synchronous: &str,
    folder: TempDir,
) -> TestResult {
    let template = template(folder.path())?;
    let mut rng = Rng::new(seed()?);
    for _ in 0..cuts().div_ceil(4) {
        let (run_folder, report) = run(
            &template,
            folder.path(),
            "after-backup",
            synchronous,
            0,
            &mut rng,
        )?;
        assert!(report.backup_done && report.cut, "{report:?}");
        let what = format!("backup {synchronous} then cut ({})", report.damage);
        let (backup, _) = open_and_check(&run_folder.path().join("backup.db"), &what)?;
        holds_the_backup_scenario(&backup, &what)?;
        let _ = backup.close()?;
    }
    Ok(())
}

#[rstest]
fn a_restore_cut_at_any_point_leaves_the_old_or_the_new_database(
    #[values("full", "normal")] synchronous: &str,
    folder: TempDir,
) -> TestResult {
    let template = template(folder.path())?;
    let mut rng = Rng::new(seed()?);
    let (_, whole) = run(
        &template,
        folder.path(),
        "restore",
        synchronous,
        0,
        &mut rng,
    )?;
    assert!(whole.restore_done && whole.counted > 0, "{whole:?}");
    let old: BTreeMap<u64, u64> = (0..10).map(|n| (n, 20)).collect();
    let new: BTreeMap<u64, u64> = (0..5).map(|n| (n, 20)).collect();
    let (mut olds, mut news) = (0, 0);
    for _ in 0..cuts() {
        let at = 1 + rng.below(whole.counted);
        let (run_folder, report) = run(
            &template,
            folder.path(),
            "restore",
            synchronous,
            at,
            &mut rng,
        )?;
        assert!(report.cut, "{report:?}");
        let what = format!("restore {synchronous} cut at {at} ({})", report.damage);
        let (store, _) = open_and_check(&run_folder.path().join("keytally.db"), &what)?;
        let present = commits(&store)?;
        // A restore reported done may still be closing its store when the
        // power goes: what it reported stands.
        if report.restore_done {
            assert_eq!(present, new, "{what}: a restore reported done was undone");
        }
        if present == old {
            olds += 1;
        } else if present == new {
            news += 1;
        } else {
            return Err(
                format!("{what}: neither the old nor the new database: {present:?}").into(),
            );
        }
        let _ = store.close()?;
    }
    eprintln!("restore {synchronous}: old database {olds} times, restored {news} times");
    Ok(())
}
