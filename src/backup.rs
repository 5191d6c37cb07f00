//! Online backup, verified restore, and the integrity check.
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

use crate::connection::pragma_integer;
use crate::error::{Error, Result};
use crate::files::{self, HeaderVerdict, APPLICATION_ID, FILE_MODE};
use crate::migrations;
use crate::online_backup::RawConnection;
use crate::store::{Store, StoreOptions};

/// What [`Store::backup_to`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The newest migration it holds.
    pub schema_version: Option<String>,
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// The restored database.
    pub path: PathBuf,
    /// Where the database that was replaced now is, if there was one.
    pub previous: Option<PathBuf>,
    /// Migrations applied to the restored database after installing it.
    pub applied: Vec<String>,
}

/// What [`Store::check`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Every problem found; empty when the database is healthy.
    pub problems: Vec<String>,
    /// `PRAGMA integrity_check`'s answer (`ok` when healthy).
    pub integrity: Vec<String>,
    /// Rows `PRAGMA foreign_key_check` reported.
    pub foreign_key_violations: i64,
    /// The application id found.
    pub application_id: u32,
    /// The newest applied migration.
    pub schema_version: Option<String>,
    /// Known migrations not applied.
    pub pending_migrations: Vec<String>,
    /// The database files with their modes.
    pub files: Vec<files::FileInfo>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(QueryableByName)]
struct CheckLine {
    #[diesel(sql_type = Text)]
    line: String,
}

fn integrity_lines(conn: &mut SqliteConnection) -> Result<Vec<String>> {
    let lines: Vec<CheckLine> =
        diesel::sql_query("SELECT integrity_check AS line FROM pragma_integrity_check")
            .load(conn)?;
    Ok(lines.into_iter().map(|line| line.line).collect())
}

/// Deletes a temporary file when dropped, unless it was kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Creates an empty file with mode 0600 beside `target`.
    fn beside(target: &Path) -> Result<TempFile> {
        let folder = parent_of(target);
        let name = target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keytally".to_owned());
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
            for path in files::database_files(&self.path) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
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

fn fsync_folder(path: &Path) -> Result<()> {
    let folder = parent_of(path);
    File::open(&folder)
        .and_then(|file| file.sync_all())
        .map_err(|e| Error::io(&folder, e))
}

fn plain_connection(path: &Path) -> Result<SqliteConnection> {
    let text = path.to_str().ok_or_else(|| Error::Open {
        path: path.to_path_buf(),
        message: "the path is not valid UTF-8".to_owned(),
    })?;
    let mut conn = SqliteConnection::establish(text).map_err(|e| Error::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    conn.batch_execute("PRAGMA busy_timeout = 5000")?;
    Ok(conn)
}

/// Checks that the database file at `path` is a healthy keytally database
/// this binary can open: its header, its application id, `integrity_check`
/// and its migrations. Returns the newest applied migration.
fn verify_copy(path: &Path) -> Result<Option<String>> {
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
    let integrity = integrity_lines(&mut conn).map_err(|e| corrupt_or(e, path))?;
    if integrity != ["ok"] {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!("integrity_check: {}", integrity.join("; ")),
        });
    }
    let state = migrations::inspect_read_only(&mut conn, path)?;
    Ok(state.applied.last().cloned())
}

fn corrupt_or(error: Error, path: &Path) -> Error {
    match &error {
        Error::Database(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("malformed")
                || info.message().contains("not a database") =>
        {
            Error::Corrupt {
                path: path.to_path_buf(),
                detail: info.message().to_owned(),
            }
        }
        _ => error,
    }
}

impl Store {
    /// Writes a consistent snapshot of the database to `destination`, while
    /// other connections keep writing; see the module docs. An existing
    /// destination is replaced only with `replace`.
    ///
    /// # Errors
    ///
    /// [`Error::DestinationExists`], [`Error::InvalidInput`] for the
    /// database's own path or a link, [`Error::Corrupt`] if the copy fails
    /// its check, [`Error::DiskFull`], [`Error::Io`] or the store's errors.
    /// On error nothing is left at `destination` that was not there before.
    pub fn backup_to(&self, destination: &Path, replace: bool) -> Result<BackupReport> {
        check_destination(self.path(), destination, replace)?;
        let mut temp = TempFile::beside(destination)?;
        let target = temp.path.to_str().ok_or_else(|| Error::InvalidInput {
            field: "destination",
            reason: "the path is not valid UTF-8".to_owned(),
        })?;
        {
            let mut conn = self.connection()?;
            diesel::sql_query("VACUUM INTO ?")
                .bind::<Text, _>(target)
                .execute(&mut *conn)?;
        }
        fsync_file(&temp.path)?;
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

    /// Runs `integrity_check` and `foreign_key_check` and checks the
    /// application id, the schema version and the files' modes. Problems are
    /// reported, not returned as errors.
    ///
    /// # Errors
    ///
    /// The store's errors if the checks themselves cannot run.
    pub fn check(&self) -> Result<CheckReport> {
        let mut conn = self.connection()?;
        let conn = &mut *conn;
        let mut problems = Vec::new();
        let integrity = integrity_lines(conn)?;
        if integrity != ["ok"] {
            problems.push(format!("integrity_check: {}", integrity.join("; ")));
        }
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let foreign_key_violations =
            diesel::sql_query("SELECT count(*) AS n FROM pragma_foreign_key_check")
                .get_result::<Count>(conn)?
                .n;
        if foreign_key_violations > 0 {
            problems.push(format!(
                "foreign_key_check: {foreign_key_violations} rows refer to missing rows"
            ));
        }
        let application_id = pragma_integer(conn, "application_id")? as u32;
        if application_id != APPLICATION_ID {
            problems.push(format!("application_id is {application_id:#010x}"));
        }
        let schema = migrations::inspect_read_only(conn, self.path())?;
        if !schema.pending.is_empty() {
            problems.push(format!("pending migrations: {}", schema.pending.join(", ")));
        }
        let files = files::file_infos(self.path())?;
        for file in &files {
            if file.mode != format!("{FILE_MODE:04o}") {
                problems.push(format!(
                    "{} has mode {}, expected 0600",
                    file.name, file.mode
                ));
            }
        }
        Ok(CheckReport {
            problems,
            integrity,
            foreign_key_violations,
            application_id,
            schema_version: schema.applied.last().cloned(),
            pending_migrations: schema.pending,
            files,
        })
    }
}

fn check_destination(database: &Path, destination: &Path, replace: bool) -> Result<()> {
    let same = match (fs::canonicalize(database), fs::canonicalize(destination)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::InvalidInput {
            field: "destination",
            reason: "it is the database itself".to_owned(),
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

/// Replaces the database at `database` with the backup `source`.
///
/// `source` is copied beside the database (mode 0600) and the copy is
/// verified (keytally's application id, `integrity_check`, no migration
/// this binary does not know) before anything else is touched. The current
/// database is then locked exclusively, which is refused while another
/// process has it open; under that one lock its pages are copied to
/// `<name>.pre-restore-<time>` and the backup's pages are written into the
/// database file itself, in one SQLite transaction. A process that opened
/// the file meanwhile waits on the lock and then reads the restored
/// database: the file is never swapped under it. Last, the restored
/// database is migrated.
///
/// # Errors
///
/// [`Error::NotADatabase`], [`Error::Corrupt`], [`Error::Foreign`] or
/// [`Error::SchemaTooNew`] for a bad source (nothing is changed),
/// [`Error::InUse`] if another process has the database open, or file
/// system errors.
pub fn restore(database: &Path, source: &Path, options: &StoreOptions) -> Result<RestoreReport> {
    if fs::symlink_metadata(database).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::Symlink {
            path: database.to_path_buf(),
        });
    }
    if files::is_open_here(database) {
        return Err(Error::InUse {
            path: database.to_path_buf(),
        });
    }
    let folder = parent_of(database);
    if !folder.is_dir() {
        files::prepare_database_path(database)?;
        fs::remove_file(database).map_err(|e| Error::io(database, e))?;
    }
    let copy = TempFile::beside(database)?;
    {
        let mut from = File::open(source).map_err(|e| Error::io(source, e))?;
        let mut to = OpenOptions::new()
            .write(true)
            .open(&copy.path)
            .map_err(|e| Error::io(&copy.path, e))?;
        io::copy(&mut from, &mut to).map_err(|e| Error::io(&copy.path, e))?;
        to.sync_all().map_err(|e| Error::io(&copy.path, e))?;
    }
    verify_copy(&copy.path).map_err(|error| rename_paths(error, &copy.path, source))?;
    for suffix in files::SIDECAR_SUFFIXES {
        let _ = fs::remove_file(files::sidecar(&copy.path, suffix));
    }
    let previous = install(database, &copy.path)?;
    drop(copy);
    let store = options.clone().with_path(database).open()?;
    let applied = store.applied_at_open().to_vec();
    let _ = store.close()?;
    tracing::info!(database = %database.display(), source = %source.display(), "restored");
    Ok(RestoreReport {
        path: database.to_path_buf(),
        previous,
        applied,
    })
}

/// Errors about the temporary copy name the source instead.
fn rename_paths(error: Error, copy: &Path, source: &Path) -> Error {
    let fix = |path: PathBuf| {
        if path == copy {
            source.to_path_buf()
        } else {
            path
        }
    };
    match error {
        Error::NotADatabase { path } => Error::NotADatabase { path: fix(path) },
        Error::Corrupt { path, detail } => Error::Corrupt {
            path: fix(path),
            detail,
        },
        Error::Foreign { path, detail } => Error::Foreign {
            path: fix(path),
            detail,
        },
        Error::SchemaTooNew { path, unknown } => Error::SchemaTooNew {
            path: fix(path),
            unknown,
        },
        other => other,
    }
}

/// Writes the verified `copy` into the database file, keeping the current
/// database aside first; returns where it was kept, if there was one.
fn install(database: &Path, copy: &Path) -> Result<Option<PathBuf>> {
    files::prepare_database_path(database)?;
    let had_content = fs::metadata(database)
        .map_err(|e| Error::io(database, e))?
        .len()
        > 0;
    let mut live = match lock_exclusively(database) {
        Ok(live) => live,
        Err(Error::Busy { .. }) => {
            return Err(Error::InUse {
                path: database.to_path_buf(),
            })
        }
        // A file SQLite cannot read is exactly what a restore replaces; no
        // process can have it open as a database.
        Err(error @ (Error::Corrupt { .. } | Error::Io { .. })) => {
            tracing::warn!(error = %error, "current database is unreadable; moving it aside");
            return install_by_rename(database, copy);
        }
        Err(other) => return Err(other),
    };
    let previous = if had_content {
        Some(keep_aside(&mut live, database)?)
    } else {
        None
    };
    let written = RawConnection::open(copy).and_then(|mut from| from.copy_into(&mut live));
    if let Err(error) = written {
        // The database is as it was: the copy kept aside is not needed.
        if let Some(previous) = &previous {
            let _ = fs::remove_file(previous);
        }
        return Err(error);
    }
    drop(live);
    Ok(previous)
}

/// Opens `database` and takes SQLite's exclusive lock on it, held until the
/// connection is dropped. Leaving WAL mode first folds the log into the
/// file; SQLite refuses it while any other connection has the database
/// open, which is how another process is told apart.
fn lock_exclusively(database: &Path) -> Result<RawConnection> {
    let mut live = RawConnection::open(database)?;
    live.execute("PRAGMA busy_timeout = 0; PRAGMA locking_mode = EXCLUSIVE")?;
    let mode = live.query_text("PRAGMA journal_mode = DELETE")?;
    if !mode.is_some_and(|mode| mode.eq_ignore_ascii_case("delete")) {
        return Err(Error::Busy {
            message: "the database stayed in WAL mode".to_owned(),
        });
    }
    // In exclusive locking mode the lock a write transaction takes is kept
    // after it ends.
    live.execute("BEGIN EXCLUSIVE; COMMIT")?;
    Ok(live)
}

/// Copies the locked database's pages to a new `<name>.pre-restore-<time>`.
fn keep_aside(live: &mut RawConnection, database: &Path) -> Result<PathBuf> {
    let previous = pre_restore_path(database);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&previous)
        .and_then(|file| file.set_permissions(fs::Permissions::from_mode(FILE_MODE)))
        .map_err(|e| Error::io(&previous, e))?;
    let copied = RawConnection::open(&previous).and_then(|mut kept| live.copy_into(&mut kept));
    if let Err(error) = copied {
        for path in files::database_files(&previous) {
            let _ = fs::remove_file(path);
        }
        return Err(error);
    }
    Ok(previous)
}

/// Moves a database SQLite cannot read (and any sidecars) aside and renames
/// `copy` into its place.
fn install_by_rename(database: &Path, copy: &Path) -> Result<Option<PathBuf>> {
    let previous = pre_restore_path(database);
    for suffix in files::SIDECAR_SUFFIXES {
        let from = files::sidecar(database, suffix);
        if from.exists() {
            let to = files::sidecar(&previous, suffix);
            fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    fs::rename(database, &previous).map_err(|e| Error::io(database, e))?;
    fs::rename(copy, database).map_err(|e| Error::io(database, e))?;
    fsync_folder(database)?;
    Ok(Some(previous))
}

/// A free name `<name>.pre-restore-<time>[-<n>]` beside `database`.
fn pre_restore_path(database: &Path) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let name = database
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keytally.db".to_owned());
    let mut previous = parent_of(database).join(format!("{name}.pre-restore-{stamp}"));
    let mut counter = 1;
    while previous.exists() {
        previous = parent_of(database).join(format!("{name}.pre-restore-{stamp}-{counter}"));
        counter += 1;
    }
    previous
}
