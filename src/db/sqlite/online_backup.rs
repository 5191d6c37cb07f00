//! SQLite's online backup API, which Diesel does not expose: a bare
//! connection through `libsqlite3-sys` and a page-by-page copy from one
//! database into another under SQLite's own locks.
//!
//! `restore` uses it to write a backup into the live database file rather
//! than renaming another file over it: a process that opened the database a
//! moment earlier keeps the same file, waits on SQLite's lock, and then sees
//! the restored pages. A renamed file would leave it writing into the old
//! one through the new one's `-wal`.

use std::ffi::{c_int, CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;

use crate::db::classify;
use crate::error::{Error, Result};

/// One SQLite connection of its own, closed when dropped.
pub(crate) struct RawConnection {
    handle: NonNull<ffi::sqlite3>,
    path: PathBuf,
}

impl RawConnection {
    /// Opens the existing database at `path` for reading and writing,
    /// without following a symbolic link.
    pub(crate) fn open(path: &Path) -> Result<RawConnection> {
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"),
        })?;
        let mut handle = ptr::null_mut();
        let flags = ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_NOFOLLOW;
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call,
        // `handle` is a valid out-pointer and no VFS name is passed.
        let code =
            unsafe { ffi::sqlite3_open_v2(c_path.as_ptr(), &mut handle, flags, ptr::null()) };
        let Some(handle) = NonNull::new(handle) else {
            return Err(Error::Open {
                path: path.to_path_buf(),
                source: "out of memory".into(),
            });
        };
        let connection = RawConnection {
            handle,
            path: path.to_path_buf(),
        };
        if code != ffi::SQLITE_OK {
            return Err(Error::Open {
                path: path.to_path_buf(),
                source: connection.message().into(),
            });
        }
        Ok(connection)
    }

    /// Runs `sql` (one or more statements), discarding any rows.
    pub(crate) fn execute(&mut self, sql: &str) -> Result<()> {
        let c_sql = self.c_string(sql)?;
        // SAFETY: the handle is open, `c_sql` is NUL-terminated and outlives
        // the call; no callback and no error out-pointer are passed.
        let code = unsafe {
            ffi::sqlite3_exec(
                self.handle.as_ptr(),
                c_sql.as_ptr(),
                None,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        self.check(code)
    }

    /// Runs one statement and returns the first column of its first row as
    /// text, such as what `PRAGMA journal_mode = …` answers.
    pub(crate) fn query_text(&mut self, sql: &str) -> Result<Option<String>> {
        let c_sql = self.c_string(sql)?;
        let mut statement = ptr::null_mut();
        // SAFETY: the handle is open, `c_sql` is NUL-terminated (length -1),
        // and `statement` is a valid out-pointer.
        let code = unsafe {
            ffi::sqlite3_prepare_v2(
                self.handle.as_ptr(),
                c_sql.as_ptr(),
                -1,
                &mut statement,
                ptr::null_mut(),
            )
        };
        self.check(code)?;
        if statement.is_null() {
            return Ok(None);
        }
        // SAFETY: `statement` was prepared on this handle and is finalized
        // below, after its text was copied out.
        let result = unsafe {
            match ffi::sqlite3_step(statement) {
                ffi::SQLITE_ROW => {
                    let text = ffi::sqlite3_column_text(statement, 0);
                    Ok((!text.is_null())
                        .then(|| CStr::from_ptr(text.cast()).to_string_lossy().into_owned()))
                }
                ffi::SQLITE_DONE => Ok(None),
                code => Err(code),
            }
        };
        // SAFETY: finalized once; the error, if any, is read before.
        let outcome = match result {
            Ok(text) => Ok(text),
            Err(code) => Err(self.error(code)),
        };
        unsafe { ffi::sqlite3_finalize(statement) };
        outcome
    }

    /// Copies every page of this database into `destination`'s, in one
    /// write transaction of the destination: readers of `destination` see
    /// either all of its old pages or all of the copied ones.
    pub(crate) fn copy_into(&mut self, destination: &mut RawConnection) -> Result<()> {
        let main = c"main";
        // SAFETY: both handles are open and distinct; the names are
        // NUL-terminated constants.
        let backup = unsafe {
            ffi::sqlite3_backup_init(
                destination.handle.as_ptr(),
                main.as_ptr(),
                self.handle.as_ptr(),
                main.as_ptr(),
            )
        };
        if backup.is_null() {
            // SAFETY: the destination handle is open.
            let code = unsafe { ffi::sqlite3_errcode(destination.handle.as_ptr()) };
            return Err(destination.error(code));
        }
        // SAFETY: `backup` is live until `sqlite3_backup_finish`, called
        // exactly once; -1 copies every remaining page in one step.
        let step = unsafe { ffi::sqlite3_backup_step(backup, -1) };
        let finish = unsafe { ffi::sqlite3_backup_finish(backup) };
        match step {
            ffi::SQLITE_DONE => destination.check(finish),
            code => Err(destination.error(code)),
        }
    }

    fn c_string(&self, text: &str) -> Result<CString> {
        CString::new(text).map_err(|_| Error::InvalidInput {
            field: "sql",
            reason: "the statement holds a NUL byte".to_owned(),
        })
    }

    fn check(&self, code: c_int) -> Result<()> {
        if code == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(self.error(code))
        }
    }

    /// The error for result `code`, classified as keytally's other errors are.
    fn error(&self, code: c_int) -> Error {
        classify::from_result_code(code, self.message(), &self.path)
    }

    fn message(&self) -> String {
        // SAFETY: the handle is open; SQLite returns a NUL-terminated string
        // it owns, copied before any other call on the handle.
        unsafe {
            let text = ffi::sqlite3_errmsg(self.handle.as_ptr());
            if text.is_null() {
                "unknown error".to_owned()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            }
        }
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        // SAFETY: the handle is open and closed exactly once; every statement
        // and backup made on it was finalized before.
        unsafe { ffi::sqlite3_close(self.handle.as_ptr()) };
    }
}
