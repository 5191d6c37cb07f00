//! Online backups and the checks a copy must pass.
//!
//! A backup is taken with `VACUUM INTO` inside a read transaction, so it is a
//! consistent snapshot while other connections and processes keep writing.
//! It is written to a temporary file (mode 0600) beside the destination,
//! fsynced, checked, and only then renamed into place: the destination is
//! either absent or a complete, verified backup.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::db::classify;
use crate::db::sqlite::files::{self, HeaderVerdict, FILE_MODE};
use crate::db::sqlite::migrations;
use crate::error::{Error, Result};

/// What `Store::backup_to` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The newest migration it holds.
    pub schema_version: Option<String>,
}

#[derive(QueryableByName)]
pub(crate) struct CheckLine {
    #[diesel(sql_type = Text)]
    line: String,
}

/// `PRAGMA quick_check`'s lines (`ok` alone when healthy).
pub(crate) fn quick_check_lines(conn: &mut SqliteConnection) -> Result<Vec<String>> {
    let lines: Vec<CheckLine> =
        diesel::sql_query("SELECT quick_check AS line FROM pragma_quick_check").load(conn)?;
    Ok(lines.into_iter().map(|line| line.line).collect())
}

/// `PRAGMA integrity_check`'s lines (`ok` alone when healthy).
pub(crate) fn integrity_lines(conn: &mut SqliteConnection) -> Result<Vec<String>> {
    let lines: Vec<CheckLine> =
        diesel::sql_query("SELECT integrity_check AS line FROM pragma_integrity_check")
            .load(conn)?;
    Ok(lines.into_iter().map(|line| line.line).collect())
}

/// Deletes a temporary file when dropped, unless it was kept.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl TempFile {
    /// Creates an empty file with mode 0600 beside `target`, after removing
    /// what earlier runs that died (killed, or out of power) left there.
    pub(crate) fn beside(target: &Path) -> Result<TempFile> {
        let folder = parent_of(target);
        let name = target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keytally".to_owned());
        remove_left_by_dead_runs(&folder, &name);
        for attempt in 0..100u32 {
            let path = folder.join(format!(
                ".{name}.tmp-{}-{}-{attempt}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0)
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(file) => {
                    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(TempFile { path, keep: false });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Io {
            path: folder,
            source: io::Error::other("could not pick a temporary file name"),
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            remove_with_sidecars(&self.path);
        }
    }
}

/// Removes a temporary database and whatever SQLite made beside it.
fn remove_with_sidecars(path: &Path) {
    for file in files::database_files(path) {
        let _ = fs::remove_file(file);
    }
    let _ = fs::remove_file(files::sidecar(path, files::JOURNAL_SUFFIX));
}

/// Removes the temporary files `.NAME.tmp-PID-…` in `folder` whose process
/// no longer runs: a backup or restore that was killed cannot clean up after
/// itself, so the next one does. Files of a process that still runs are
/// left alone.
fn remove_left_by_dead_runs(folder: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // Only the temporary database itself; its sidecars go with it.
        if rest.ends_with("-wal") || rest.ends_with("-shm") || rest.ends_with("-journal") {
            continue;
        }
        if pid > 0 && !process_runs(pid) {
            tracing::info!(file = %entry.path().display(), "removing what a dead backup left");
            remove_with_sidecars(&entry.path());
        }
    }
}

/// Whether a process with this id runs (or exists but is not ours).
fn process_runs(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks the pid.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

pub(crate) fn fsync_folder(path: &Path) -> Result<()> {
    let folder = parent_of(path);
    File::open(&folder)
        .and_then(|file| file.sync_all())
        .map_err(|e| Error::io(&folder, e))
}

fn plain_connection(path: &Path) -> Result<SqliteConnection> {
    let text = path.to_str().ok_or_else(|| Error::Open {
        path: path.to_path_buf(),
        source: "the path is not valid UTF-8".into(),
    })?;
    let mut conn = SqliteConnection::establish(text).map_err(|e| Error::Open {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    conn.batch_execute("PRAGMA busy_timeout = 5000")?;
    Ok(conn)
}

/// Checks that the database file at `path` is a healthy keytally database
/// this binary can open: its header, its application id, `integrity_check`
/// and its migrations. Returns the newest applied migration.
pub(crate) fn verify_copy(path: &Path) -> Result<Option<String>> {
    match files::inspect_header(path)? {
        HeaderVerdict::Ours => {}
        HeaderVerdict::Empty => {
            return Err(Error::NotADatabase {
                path: path.to_path_buf(),
            })
        }
        HeaderVerdict::Unmarked => {
            return Err(Error::Foreign {
                path: path.to_path_buf(),
                detail: "it carries no keytally application id".to_owned(),
            })
        }
    }
    let mut conn = plain_connection(path)?;
    let integrity = integrity_lines(&mut conn).map_err(|e| classify::damage_in(e, path))?;
    if integrity != ["ok"] {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!("integrity_check: {}", integrity.join("; ")),
        });
    }
    let state = migrations::inspect_read_only(&mut conn, path)?;
    Ok(state.applied.last().cloned())
}

/// Writes a consistent snapshot of the database at `database` (read through
/// `conn`) to `destination`; see the module docs. An existing destination is
/// replaced only with `replace`. On error nothing is left at `destination`
/// that was not there before.
pub(crate) fn write_backup(
    conn: &mut SqliteConnection,
    database: &Path,
    destination: &Path,
    replace: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BackupReport> {
    check_destination(database, destination, replace)?;
    let mut temp = TempFile::beside(destination)?;
    let target = temp.path.to_str().ok_or_else(|| Error::InvalidInput {
        field: "destination",
        reason: "the path is not valid UTF-8".to_owned(),
    })?;
    // The copy's size, watched while SQLite writes it.
    let copying = std::sync::atomic::AtomicBool::new(true);
    let copied = std::thread::scope(|scope| {
        scope.spawn(|| {
            while copying.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(metadata) = fs::metadata(&temp.path) {
                    progress(metadata.len());
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let copied = diesel::sql_query("VACUUM INTO ?")
            .bind::<Text, _>(target)
            .execute(conn);
        copying.store(false, std::sync::atomic::Ordering::Release);
        copied
    });
    copied.map_err(|e| Error::from(e).writing(destination))?;
    renew_identity(&temp.path).map_err(|e| e.writing(destination))?;
    fsync_file(&temp.path).map_err(|e| e.writing(destination))?;
    let schema_version = verify_copy(&temp.path)?;
    // The check's connection may have left sidecars of the copy.
    for sidecar in files::SIDECAR_SUFFIXES {
        let _ = fs::remove_file(files::sidecar(&temp.path, sidecar));
    }
    fs::rename(&temp.path, destination).map_err(|e| Error::io(destination, e))?;
    temp.keep = true;
    fsync_folder(destination)?;
    let bytes = fs::metadata(destination)
        .map_err(|e| Error::io(destination, e))?
        .len();
    tracing::info!(backup = %destination.display(), bytes, "backup written");
    Ok(BackupReport {
        path: destination.to_path_buf(),
        bytes,
        schema_version,
    })
}

/// Gives the copy at `path` an identity of its own (see
/// [`pages`](super::pages)), so that the log of a database opened from the
/// backup is never taken for the original's. The copy is written in rollback
/// mode, straight into its file.
fn renew_identity(path: &Path) -> Result<()> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let mut conn = plain_connection(path)?;
    conn.batch_execute("PRAGMA journal_mode = DELETE")?;
    // A database older than the identity has none to renew.
    let found: Found = diesel::sql_query(
        "SELECT count(*) AS count FROM sqlite_schema WHERE type = 'table' AND name = 'sequences'",
    )
    .get_result(&mut conn)?;
    if found.count > 0 {
        conn.batch_execute(
            "UPDATE sequences SET next = (random() & 4611686018427387903) | 4294967296 \
             WHERE name = 'identity'",
        )?;
    }
    Ok(())
}

fn check_destination(database: &Path, destination: &Path, replace: bool) -> Result<()> {
    if let Some(which) = own_file(database, destination) {
        return Err(Error::InvalidInput {
            field: "destination",
            reason: format!("it is {which}"),
        });
    }
    match fs::symlink_metadata(destination) {
        Ok(metadata) if metadata.file_type().is_symlink() => Err(Error::Symlink {
            path: destination.to_path_buf(),
        }),
        Ok(metadata) if !metadata.is_file() => Err(Error::InvalidInput {
            field: "destination",
            reason: format!("{} is not a regular file", destination.display()),
        }),
        Ok(_) if !replace => Err(Error::DestinationExists {
            path: destination.to_path_buf(),
        }),
        Ok(_) => {
            for suffix in files::SIDECAR_SUFFIXES {
                if files::sidecar(destination, suffix).exists() {
                    return Err(Error::InvalidInput {
                        field: "destination",
                        reason: format!(
                            "{} has a {suffix} file: it looks like a database in use",
                            destination.display()
                        ),
                    });
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let folder = parent_of(destination);
            if folder.is_dir() {
                Ok(())
            } else {
                Err(Error::Io {
                    path: folder,
                    source: io::Error::new(io::ErrorKind::NotFound, "the folder does not exist"),
                })
            }
        }
        Err(e) => Err(Error::io(destination, e)),
    }
}

/// Whether `path` is the database at `database` or one of SQLite's files
/// beside it (`-wal`, `-shm`, `-journal`), whether or not that file exists
/// now: which one, if so.
pub(crate) fn own_file(database: &Path, path: &Path) -> Option<&'static str> {
    let canonical = |path: &Path| -> Option<PathBuf> {
        let folder = fs::canonicalize(parent_of(path)).ok()?;
        Some(folder.join(path.file_name()?))
    };
    let (database, path) = (canonical(database)?, canonical(path)?);
    if path == database {
        return Some("the database itself");
    }
    for (suffix, which) in [
        (files::SIDECAR_SUFFIXES[0], "the database's write-ahead log"),
        (
            files::SIDECAR_SUFFIXES[1],
            "the database's shared-memory file",
        ),
        (files::JOURNAL_SUFFIX, "the database's rollback journal"),
    ] {
        if path == files::sidecar(&database, suffix) {
            return Some(which);
        }
    }
    None
}
