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
/// database, if any, is refused while another process has it open, and is
/// otherwise kept as `<name>.pre-restore-<time>` (with its sidecars, if it
/// has any). The copy is then renamed into place, and migrated.
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
    let folder = parent_of(database);
    if !folder.is_dir() {
        files::prepare_database_path(database)?;
        fs::remove_file(database).map_err(|e| Error::io(database, e))?;
    }
    let mut copy = TempFile::beside(database)?;
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
    let previous = set_aside_current(database)?;
    fs::rename(&copy.path, database).map_err(|e| Error::io(database, e))?;
    copy.keep = true;
    fsync_folder(database)?;
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

/// Moves the current database (and any sidecars) to
/// `<name>.pre-restore-<time>`, refusing if another process has it open.
fn set_aside_current(database: &Path) -> Result<Option<PathBuf>> {
    if !database.exists() {
        return Ok(None);
    }
    if files::is_open_here(database) {
        return Err(Error::InUse {
            path: database.to_path_buf(),
        });
    }
    // A live database's header can still say nothing of keytally: until the
    // first checkpoint, everything but the switch to WAL is in the log.
    if matches!(
        files::inspect_header(database),
        Ok(HeaderVerdict::Ours | HeaderVerdict::Unmarked)
    ) {
        // Leaving WAL mode needs every other connection gone: SQLite's own
        // way of telling whether another process has the database open. It
        // also folds the log into the file, so the kept copy stands alone.
        let mut conn = plain_connection(database)?;
        conn.batch_execute("PRAGMA busy_timeout = 0")?;
        #[derive(QueryableByName)]
        struct Mode {
            #[diesel(sql_type = Text)]
            journal_mode: String,
        }
        match diesel::sql_query("PRAGMA journal_mode = DELETE").get_result::<Mode>(&mut conn) {
            Ok(mode) if mode.journal_mode.eq_ignore_ascii_case("delete") => {}
            Ok(_) => {
                return Err(Error::InUse {
                    path: database.to_path_buf(),
                })
            }
            Err(error) => match Error::from(error) {
                Error::Busy { .. } => {
                    return Err(Error::InUse {
                        path: database.to_path_buf(),
                    })
                }
                // A damaged database is exactly what a restore replaces.
                other => {
                    tracing::warn!(error = %other, "current database could not be checkpointed")
                }
            },
        }
    }
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
    for suffix in files::SIDECAR_SUFFIXES {
        let from = files::sidecar(database, suffix);
        if from.exists() {
            let to = files::sidecar(&previous, suffix);
            fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    fs::rename(database, &previous).map_err(|e| Error::io(database, e))?;
    Ok(Some(previous))
}
