//! Folding the write-ahead log into the database file: the background
//! checkpoint, the one an operator asks for, and the last one on close.

use std::ops::DerefMut;
use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::db::gate::WriteGate;
use crate::db::sqlite::connection::ConnectionSetup;
use crate::db::sqlite::files;
use crate::error::Result;

/// What a `wal_checkpoint(TRUNCATE)` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// Whether the whole log was copied into the database and emptied.
    pub complete: bool,
    /// Frames in the log when it ran (-1 if it could not start).
    pub log_frames: i64,
    /// Frames copied into the database.
    pub checkpointed_frames: i64,
}

#[derive(QueryableByName)]
struct CheckpointRow {
    #[diesel(sql_type = BigInt)]
    busy: i64,
    #[diesel(sql_type = BigInt)]
    log: i64,
    #[diesel(sql_type = BigInt)]
    checkpointed: i64,
}

/// The log length (in pages) from which the background checkpoint makes
/// sure the log starts over.
const RESTART_LOG_FRAMES: i64 = 1_000;

/// Copies the log into the database without holding up anyone. SQLite
/// starts the log over only when a write transaction begins with all of it
/// copied; while writers keep committing, that moment hardly comes, and the
/// log would grow until a writer checkpointed it inside its own commit
/// (`wal_autocheckpoint`). So once the log is long, the rest is copied again
/// while this process's writers wait at the gate: the next one to begin then
/// starts the log over. A connection is never held while waiting at the gate
/// (writers wait at the gate before they take one), so the two cannot wait
/// for each other.
pub(crate) fn background_checkpoint<C: DerefMut<Target = SqliteConnection>>(
    connection: impl Fn() -> Result<C>,
    gate: &WriteGate,
) -> Result<()> {
    let passive = |conn: &mut SqliteConnection| {
        diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result::<CheckpointRow>(conn)
    };
    let first = passive(&mut *connection()?)?;
    if first.busy == 0 && first.log >= RESTART_LOG_FRAMES {
        let _turn = gate.enter(true)?;
        passive(&mut *connection()?)?;
    }
    Ok(())
}

/// Copies the log into the database with a passive checkpoint (which never
/// blocks anyone), then empties it with `wal_checkpoint(TRUNCATE)`. TRUNCATE
/// blocks every new writer while it waits for readers, so it waits at most
/// `truncate_wait`: far less than the writers' own busy timeout, so that a
/// writer queued behind it does not run out of patience.
pub(crate) fn checkpoint_truncate(
    conn: &mut SqliteConnection,
    busy_timeout: Duration,
    truncate_wait: Duration,
) -> Result<CheckpointReport> {
    let passive: CheckpointRow =
        diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result(conn)?;
    let full_ms = busy_timeout.as_millis().min(i32::MAX as u128);
    let wait_ms = truncate_wait.as_millis().min(full_ms / 4);
    conn.batch_execute(&format!("PRAGMA busy_timeout = {wait_ms}"))?;
    let row =
        diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)").get_result::<CheckpointRow>(conn);
    conn.batch_execute(&format!("PRAGMA busy_timeout = {full_ms}"))?;
    let row = row?;
    Ok(CheckpointReport {
        complete: row.busy == 0 && row.log == row.checkpointed,
        log_frames: passive.log.max(row.log),
        checkpointed_frames: passive.checkpointed.max(row.checkpointed),
    })
}

/// The last checkpoint, on a connection of its own once every other one of
/// this process is closed: it empties the log, so closing that connection
/// removes `-wal` and `-shm`. Returns what it did, whether the sidecars are
/// gone (or empty) afterwards, and whether Litestream replicates the
/// database (then the checkpoint does not wait: Litestream's read never
/// ends, and Litestream checkpoints the log itself).
pub(crate) fn final_checkpoint(setup: &ConnectionSetup) -> Result<(CheckpointReport, bool, bool)> {
    let mut conn = setup.establish()?;
    // Keeps the query planner's statistics current, as SQLite advises on
    // closing; before the checkpoint, so anything it writes is included.
    conn.batch_execute("PRAGMA optimize")?;
    let litestream = replicated_by_litestream(&mut conn)?;
    // Nothing else of this process uses the database any more; another
    // process may be between two statements, so wait a little for it.
    let wait = if litestream {
        Duration::ZERO
    } else {
        setup.busy_timeout
    };
    let checkpoint = checkpoint_truncate(&mut conn, setup.busy_timeout, wait)?;
    drop(conn);
    Ok((checkpoint, sidecars_gone(&setup.path), litestream))
}

/// Whether the database's `-wal` and `-shm` are gone (or empty).
pub(crate) fn sidecars_gone(path: &Path) -> bool {
    files::SIDECAR_SUFFIXES.iter().all(|suffix| {
        std::fs::metadata(files::sidecar(path, suffix))
            .map(|metadata| metadata.len() == 0)
            .unwrap_or(true)
    })
}

/// Whether Litestream has set itself up in this database: it adds the
/// tables `_litestream_seq` and `_litestream_lock` when it starts.
fn replicated_by_litestream(conn: &mut SqliteConnection) -> Result<bool> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let found: Found = diesel::sql_query(
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '_litestream_seq'",
    )
    .get_result(conn)?;
    Ok(found.n > 0)
}
