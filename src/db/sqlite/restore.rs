//! Restoring a backup into the database file, under SQLite's exclusive lock.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::db::sqlite::backup::{fsync_folder, own_file, parent_of, verify_copy, TempFile};
use crate::db::sqlite::files::{self, FILE_MODE};
use crate::db::sqlite::online_backup::RawConnection;
use crate::error::{Error, Result};

/// What `restore` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// The restored database.
    pub path: PathBuf,
    /// Where the database that was replaced now is, if there was one.
    pub previous: Option<PathBuf>,
    /// Migrations applied to the restored database after installing it.
    pub applied: Vec<String>,
}

/// Replaces the database at `database` with the backup `source`, and
/// returns where the database it replaced was kept, if there was one.
///
/// `source` is copied beside the database (mode 0600) and the copy is
/// verified (keytally's application id, `integrity_check`, no migration
/// this binary does not know) before anything else is touched. The current
/// database is then locked exclusively, which is refused while another
/// process has it open; under that one lock its pages are copied to
/// `<name>.pre-restore-<time>` and the backup's pages are written into the
/// database file itself, in one SQLite transaction. A process that opened
/// the file meanwhile waits on the lock and then reads the restored
/// database: the file is never swapped under it.
pub(crate) fn install_backup(database: &Path, source: &Path) -> Result<Option<PathBuf>> {
    if let Some(which) = own_file(database, source) {
        return Err(Error::InvalidInput {
            field: "source",
            reason: format!("it is {which}; restore from a backup"),
        });
    }
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
    Ok(previous)
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
///
/// Another application's database is refused, untouched. A file that is not
/// an SQLite database at all, or one SQLite finds damaged, is what a restore
/// replaces: it is renamed aside as it is, since no process can be using
/// it as a database.
fn install(database: &Path, copy: &Path) -> Result<Option<PathBuf>> {
    files::prepare_database_path(database)?;
    match files::inspect_header(database) {
        Ok(_) => {}
        Err(error @ (Error::NotADatabase { .. } | Error::Corrupt { .. })) => {
            tracing::warn!(error = %error.report(), "current database is unreadable; moving it aside");
            return install_by_rename(database, copy);
        }
        Err(other) => return Err(other),
    }
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
        Err(error @ (Error::Corrupt { .. } | Error::NotADatabase { .. })) => {
            tracing::warn!(error = %error.report(), "current database is damaged; moving it aside");
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
    remove_spent_journal(database);
    Ok(previous)
}

/// Removes the rollback journal a completed restore leaves: in exclusive
/// locking mode SQLite may keep the file, emptied or with a zeroed header,
/// rather than delete it. A journal with a live header (a restore that did
/// not complete) is left for SQLite to play back.
fn remove_spent_journal(database: &Path) {
    let journal = files::sidecar(database, files::JOURNAL_SUFFIX);
    let Ok(mut file) = File::open(&journal) else {
        return;
    };
    let mut header = [0u8; 8];
    let spent = match io::Read::read(&mut file, &mut header) {
        Ok(0) => true,
        Ok(_) => header.iter().all(|byte| *byte == 0),
        Err(_) => false,
    };
    drop(file);
    if spent {
        let _ = fs::remove_file(&journal);
    }
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
            source: "the database stayed in WAL mode".into(),
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
    for suffix in files::SIDECAR_SUFFIXES
        .iter()
        .chain([&files::JOURNAL_SUFFIX])
    {
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
