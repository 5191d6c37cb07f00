//! The child process of keytally's power-loss tests (`tests/it/power_loss.rs`).
//! It runs the store over a VFS that simulates a power cut (see `vfs.rs`),
//! cuts the power at the chosen operation, rewrites the files as the cut
//! left them, reports what was acknowledged before it, and exits without
//! closing anything. The test then opens the files with the real store.
//!
//! ```text
//! power_cut SCENARIO FOLDER SYNCHRONOUS AT SEED GARBAGE
//! ```
//!
//! - SCENARIO: `records` (single records and batches, a checkpoint every 25
//!   commits, then close; every file operation counts), `checkpoint` (the
//!   same, counting only operations on the database file itself, which only
//!   checkpoints write), `backup` (a backup of a store holding 300 events;
//!   operations on the backup's files count), `after-backup` (the power is cut
//!   right after the backup returns), `restore` (a restore over a database
//!   with more events than the backup; every operation counts), `paced`
//!   (one event every 2 ms for 2.5 s, checkpointed only by the store's own
//!   maintenance thread, as in a gateway; every operation counts).
//! - FOLDER holds `keytally.db`, already migrated and holding one key, and
//!   for the backup scenarios receives `backup.db`.
//! - SYNCHRONOUS: `full` or `normal`.
//! - AT: the counted operation the power is cut instead of (1-based); 0 for
//!   no cut, to count the operations of a whole run.
//! - SEED: of the torn writes. GARBAGE: `1` to also fill lost sectors with
//!   random bytes.
//!
//! Reports on stdout, one per line: `ack N EVENTS MICROS` for each commit
//! that returned (events with request ids `cN-0` .. `cN-<EVENTS-1>`, MICROS
//! after the cut was armed), `synced K` (the first K acknowledged commits
//! were in the log before its last completed sync), `backup done`, `restore done`, `counted N` (operations
//! counted), `cut MICROS`, and `damage ...`.

mod vfs;

use std::io::Write;
use std::sync::atomic::Ordering;

use keytally::{KeyFilter, KeyId, NewEvent, Store, StoreOptions, Synchronous, Timestamp};

/// Commits of the `records` and `checkpoint` scenarios.
const COMMITS: u64 = 200;

/// How long the `paced` scenario writes.
const PACED: std::time::Duration = std::time::Duration::from_millis(2500);

fn main() {
    if let Err(error) = run() {
        eprintln!("power_cut: {error}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [scenario, folder, synchronous, at, seed, garbage] = args.as_slice() else {
        return Err("usage: power_cut SCENARIO FOLDER SYNCHRONOUS AT SEED GARBAGE".into());
    };
    let folder = std::fs::canonicalize(folder)?;
    let synchronous = match synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => return Err(format!("unknown synchronous setting {other}").into()),
    };
    let at: u64 = at.parse()?;
    let plan = |file_contains: &str, except_suffixes: &[&str]| vfs::CutPlan {
        at: if at == 0 { u64::MAX } else { at },
        file_contains: file_contains.to_owned(),
        except_suffixes: except_suffixes.iter().map(|s| (*s).to_owned()).collect(),
        garbage: garbage == "1",
        seed: seed.parse().unwrap_or(1),
    };
    vfs::install()?;
    let database = folder.join("keytally.db");
    let options = StoreOptions::new(&database).synchronous(synchronous);
    let mut out = std::io::stdout().lock();
    match scenario.as_str() {
        "records" => records(&options, plan("", &[]), &mut out)?,
        "paced" => paced(&options, plan("", &[]), &mut out)?,
        "checkpoint" => records(
            &options,
            plan("/keytally.db", &["-wal", "-shm", "-journal"]),
            &mut out,
        )?,
        "backup" | "after-backup" => {
            let store = Store::open_with(&options)?;
            for n in 0..15 {
                commit(&store, n, 20)?;
            }
            // Made durable first: this scenario is about the backup.
            store.checkpoint()?;
            let destination = folder.join("backup.db");
            if scenario == "backup" {
                // The backup's temporary file is named after it.
                vfs::arm(plan("backup.db", &[]));
            }
            if store.backup_to(&destination, false).is_ok() {
                writeln!(out, "backup done")?;
                if scenario == "after-backup" {
                    vfs::cut_now();
                }
            }
            if !vfs::is_cut() {
                // A cut during the close is reported below.
                let _ = store.close();
            }
        }
        "restore" => {
            let store = Store::open_with(&options)?;
            for n in 0..5 {
                commit(&store, n, 20)?;
            }
            let source = folder.join("backup.db");
            store.backup_to(&source, false)?;
            for n in 5..10 {
                commit(&store, n, 20)?;
            }
            let _ = store.close()?;
            vfs::arm(plan("", &[]));
            if keytally::restore(&database, &source, &options).is_ok() {
                writeln!(out, "restore done")?;
            }
        }
        other => return Err(format!("unknown scenario {other}").into()),
    }
    writeln!(out, "counted {}", vfs::counted())?;
    if vfs::is_cut() {
        let damage = vfs::settle()?;
        writeln!(out, "cut {}", vfs::cut_micros())?;
        writeln!(
            out,
            "damage writes={} kept={} lost={} garbage={} renames_undone={}",
            damage.writes,
            damage.sectors_kept,
            damage.sectors_lost,
            damage.sectors_garbage,
            damage.renames_undone
        )?;
    }
    out.flush()?;
    // Nothing is closed: after a power cut there is no one left to close.
    std::process::exit(0);
}

/// Records single events and batches until the power is cut or `COMMITS`
/// were made, with a checkpoint every 25 commits, then closes the store.
fn records(
    options: &StoreOptions,
    plan: vfs::CutPlan,
    out: &mut impl Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open_with(options)?;
    vfs::arm(plan);
    for n in 0..COMMITS {
        let events = if n % 3 == 0 { 5 } else { 1 };
        if commit(&store, n, events).is_err() {
            break;
        }
        writeln!(out, "ack {n} {events} {}", vfs::armed_micros())?;
        if n % 25 == 24 && store.checkpoint().is_err() {
            break;
        }
    }
    writeln!(out, "synced {}", vfs::synced_acknowledged())?;
    if !vfs::is_cut() {
        // A cut during the close is reported by the caller.
        let _ = store.close();
    }
    Ok(())
}

/// The key the folder's database was made with.
fn first_key(store: &Store) -> keytally::Result<Option<KeyId>> {
    Ok(store
        .keys()
        .list(&KeyFilter::default())?
        .first()
        .map(|key| key.id))
}

/// Records one event every 2 ms for `PACED` with no checkpoint of its own:
/// only the store's maintenance thread checkpoints (every second), as in a
/// gateway. Then closes the store.
fn paced(
    options: &StoreOptions,
    plan: vfs::CutPlan,
    out: &mut impl Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open_with(options)?;
    vfs::arm(plan);
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < PACED {
        if commit(&store, n, 1).is_err() {
            break;
        }
        writeln!(out, "ack {n} 1 {}", vfs::armed_micros())?;
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    writeln!(out, "synced {}", vfs::synced_acknowledged())?;
    if !vfs::is_cut() {
        let _ = store.close();
    }
    Ok(())
}

/// Records commit `n`: one event, or a batch of `events`, acknowledged in
/// the VFS's count once it returns.
fn commit(store: &Store, n: u64, events: u64) -> keytally::Result<()> {
    let key = if n % 2 == 0 { first_key(store)? } else { None };
    let batch: Vec<NewEvent> = (0..events)
        .map(|j| {
            let mut event = NewEvent::new(Timestamp::now(), "power-model");
            event.request_id = Some(format!("c{n}-{j}"));
            event.prompt_tokens = (n * 10 + j) as i64;
            event.latency_ms = j as i64;
            event.key_id = key;
            event
        })
        .collect();
    if let [event] = batch.as_slice() {
        store.events().record(event)?;
    } else {
        store.events().record_batch(&batch)?;
    }
    vfs::ACKNOWLEDGED.fetch_add(1, Ordering::SeqCst);
    Ok(())
}
