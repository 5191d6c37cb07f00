//! The one place that reads meaning into the database's errors: busy or
//! locked, disk full, damaged, not a database. Diesel keeps SQLite's
//! messages but not its result codes, so Diesel's errors are told apart by
//! SQLite's fixed messages; a bare connection's by its result codes.

use std::path::Path;

use crate::error::Error;

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        match message_class(&error) {
            Some(Class::Conflict) => Error::Conflict {
                source: Box::new(error),
            },
            Some(Class::Busy) => Error::Busy {
                source: Box::new(error),
            },
            Some(Class::Full) => Error::DiskFull {
                path: None,
                source: Box::new(error),
            },
            Some(Class::Unavailable) => Error::Unavailable {
                source: Box::new(error),
            },
            _ => Error::Database(error),
        }
    }
}

impl From<diesel::r2d2::PoolError> for Error {
    fn from(error: diesel::r2d2::PoolError) -> Self {
        Error::Pool {
            source: Box::new(error),
        }
    }
}

/// `error`, naming `path` when it says the file is damaged or is not a
/// database at all: what opening a file found about the file.
pub(crate) fn about_file(error: Error, path: &Path) -> Error {
    match file_class(&error) {
        Some(Class::NotADatabase(_)) => Error::NotADatabase {
            path: path.to_path_buf(),
        },
        Some(Class::Corrupt(detail)) => Error::Corrupt {
            path: path.to_path_buf(),
            detail,
        },
        _ => error,
    }
}

/// `error`, as damage to `path` when it says the file is damaged or not a
/// database: what reading a file whose header was checked found.
pub(crate) fn damage_in(error: Error, path: &Path) -> Error {
    match file_class(&error) {
        Some(Class::NotADatabase(detail) | Class::Corrupt(detail)) => Error::Corrupt {
            path: path.to_path_buf(),
            detail,
        },
        _ => error,
    }
}

fn file_class(error: &Error) -> Option<Class> {
    match error {
        Error::Database(inner) => message_class(inner),
        Error::Open { source, .. } => class_of_message(&source.to_string()),
        _ => None,
    }
}

/// The error for an SQLite result `code` with `message`, from a bare
/// connection to `path`.
pub(crate) fn from_result_code(code: i32, message: String, path: &Path) -> Error {
    use libsqlite3_sys as ffi;
    match code & 0xff {
        // PROTOCOL: a WAL lock kept changing hands; another connection is at work.
        ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED | ffi::SQLITE_PROTOCOL => Error::Busy {
            source: message.into(),
        },
        ffi::SQLITE_FULL => Error::DiskFull {
            path: None,
            source: message.into(),
        },
        ffi::SQLITE_NOTADB => Error::NotADatabase {
            path: path.to_path_buf(),
        },
        ffi::SQLITE_CORRUPT => Error::Corrupt {
            path: path.to_path_buf(),
            detail: message,
        },
        ffi::SQLITE_IOERR => Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(message),
        },
        ffi::SQLITE_PERM | ffi::SQLITE_READONLY | ffi::SQLITE_AUTH => Error::Permission {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, message),
        },
        _ => Error::Open {
            path: path.to_path_buf(),
            source: message.into(),
        },
    }
}

enum Class {
    /// A PostgreSQL serialization failure or deadlock: the transaction can
    /// run again.
    Conflict,
    Busy,
    Full,
    /// The connection to the server is gone.
    Unavailable,
    NotADatabase(String),
    Corrupt(String),
}

fn message_class(error: &diesel::result::Error) -> Option<Class> {
    use diesel::result::DatabaseErrorKind;
    match error {
        diesel::result::Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
            Some(Class::Conflict)
        }
        diesel::result::Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => Some(Class::Unavailable),
        diesel::result::Error::DatabaseError(_, info) => class_of_message(info.message()),
        _ => None,
    }
}

fn class_of_message(message: &str) -> Option<Class> {
    if message.starts_with("database is locked")
        || message.starts_with("database table is locked")
        || message.starts_with("database is busy")
    {
        Some(Class::Busy)
    } else if message.starts_with("deadlock detected") {
        // PostgreSQL's message for SQLSTATE 40P01, which Diesel does not
        // name.
        Some(Class::Conflict)
    } else if message.starts_with("canceling statement due to lock timeout") {
        Some(Class::Busy)
    } else if message.starts_with("database or disk is full")
        || message.contains("No space left on device")
    {
        Some(Class::Full)
    } else if message.contains("not a database") {
        Some(Class::NotADatabase(message.to_owned()))
    } else if message.contains("malformed") {
        Some(Class::Corrupt(message.to_owned()))
    } else {
        None
    }
}
