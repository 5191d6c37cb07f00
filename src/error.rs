//! The one error type of keytally.
//!
//! A variant's message says what happened and what to do; the error that
//! caused it, when there is one, is its [`std::error::Error::source`], not
//! repeated in the message. Print the chain to show both.

use std::io;
use std::path::PathBuf;

use crate::model::invalid::Invalid;
use crate::model::key::KeyId;

/// An underlying error of any kind, kept as a variant's source.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A `Result` whose error defaults to keytally's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in keytally.
///
/// Each variant says when it happens. Messages are meant for an operator: they
/// say what is wrong and, where there is something to do, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database stayed busy or locked by another connection for longer than
    /// the busy timeout.
    #[error("database is busy (locked by another connection for longer than the busy timeout)")]
    Busy {
        /// The database's own error.
        source: BoxedError,
    },

    /// The file exists but is not an SQLite database at all (garbage, a zeroed
    /// header, or something else entirely).
    #[error("{} is not an SQLite database; point keytally at its own database file or restore one from a backup, see docs/operations.md", path.display())]
    NotADatabase {
        /// The file that was refused.
        path: PathBuf,
    },

    /// The file is an SQLite database but it is damaged or truncated.
    #[error("database {} is damaged ({detail}); restore it from a backup, see docs/operations.md", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },

    /// The file is an SQLite database that belongs to another application: it
    /// carries another `application_id`, or it has tables but no keytally mark.
    #[error("{} is a database of another application ({detail}); keytally will not touch it, point it at its own database", path.display())]
    Foreign {
        /// The file that was refused.
        path: PathBuf,
        /// Why it is not ours.
        detail: String,
    },

    /// The database has applied migrations this binary does not know: it was
    /// written by a newer keytally.
    #[error("database {} was migrated by a newer keytally (unknown migrations: {}); upgrade keytally, or restore a backup taken before the upgrade", path.display(), unknown.join(", "))]
    SchemaTooNew {
        /// The database that was refused.
        path: PathBuf,
        /// The versions of the applied migrations this binary does not know.
        unknown: Vec<String>,
    },

    /// The database path is a symbolic link. keytally refuses links so that the
    /// permissions it checks and sets are those of the real file.
    #[error("database path {} is a symbolic link; pass the real path instead", path.display())]
    Symlink {
        /// The link that was refused.
        path: PathBuf,
    },

    /// The operating system refused access to a file or folder.
    #[error("permission denied on {}; check the owner and mode of the file and its folder", path.display())]
    Permission {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// The filesystem does not support SQLite's write-ahead log (for example
    /// some network filesystems), so the database cannot be opened safely.
    #[error("database {} cannot use write-ahead logging (journal_mode came back as {journal_mode:?}); put the database on a local filesystem", path.display())]
    WalUnsupported {
        /// The database.
        path: PathBuf,
        /// The journal mode SQLite reported instead of `wal`.
        journal_mode: String,
    },

    /// The disk (or the filesystem quota) is full: the write was not committed.
    #[error("disk full{}: the write was not committed; free space and retry", writing(path.as_deref()))]
    DiskFull {
        /// The file being written, when it is not the database (a backup's
        /// destination).
        path: Option<PathBuf>,
        /// The database's or the system's error.
        source: BoxedError,
    },

    /// Any other input/output error on a file or folder.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// A migration failed; it was rolled back and the database is as before it.
    #[error("migration {version} failed and was rolled back: {message}")]
    Migration {
        /// The version of the migration that failed.
        version: String,
        /// What went wrong.
        message: String,
    },

    /// An argument was rejected before anything was written: an empty or
    /// oversized label, an invalid model list, a time out of range, and so on.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The argument or field that was rejected.
        field: &'static str,
        /// Why.
        reason: String,
    },

    /// One event of a batch was rejected; nothing of the batch was written.
    #[error(
        "event {index} (counting from 0) is invalid, nothing of the batch was written: {reason}"
    )]
    InvalidEvent {
        /// The position of the bad event in the batch.
        index: usize,
        /// Why it was rejected.
        reason: String,
    },

    /// A batch of an [`crate::EventSink`] could not be committed; its events
    /// were not recorded.
    #[error("event batch not committed: {message}")]
    BatchFailed {
        /// Why, or which events.
        message: String,
    },

    /// [`crate::EventSink::try_submit`] found the sink's queue full: the
    /// event was not queued. The writer is behind (the database is slow or
    /// locked); a gateway answers 503 and the client retries.
    #[error("the event queue is full ({capacity} events waiting); the event was not queued")]
    SinkFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// [`crate::EventSink::flush_within`] ran out of time: the events
    /// submitted before it are not all settled yet. They are still queued and
    /// will be committed or reported failed; nothing was dropped.
    #[error("{unsettled} submitted events were not settled within {waited_ms} ms; they are still queued")]
    FlushTimedOut {
        /// Events submitted and not yet committed or failed.
        unsettled: u64,
        /// How long the flush waited, in milliseconds.
        waited_ms: u128,
    },

    /// A backup destination exists and replacing it was not asked for.
    #[error("{} exists; choose another destination, or pass --force to replace it", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },

    /// Another process has the database open, so it cannot be replaced.
    #[error("database {} is open in another process; stop it (the gateway) first, then restore", path.display())]
    InUse {
        /// The database.
        path: PathBuf,
    },

    /// No key has this id.
    #[error("no key with id {id}")]
    KeyNotFound {
        /// The id that was looked up.
        id: KeyId,
    },

    /// The operation needs an active key, but this one is revoked.
    #[error("key {id} is revoked")]
    KeyRevoked {
        /// The revoked key.
        id: KeyId,
    },

    /// The operating system's random source failed, so no secret could be made.
    #[error("cannot generate a secret: the system random source failed")]
    Random {
        /// The system's error.
        source: BoxedError,
    },

    /// A value read from the database does not decode (written by something
    /// other than keytally, or damaged).
    #[error("unexpected value in the database (changed outside keytally?): {message}")]
    BadStoredValue {
        /// What did not decode.
        message: String,
    },

    /// The store was closed; it hands out no more connections.
    #[error("store is closed")]
    Closed,

    /// A write was started inside another write of the same store, on the
    /// same thread: it would wait for itself forever. Do both in one write.
    #[error("a write was started inside another write of the same store; do both in one write")]
    NestedWrite,

    /// No pooled connection became free within the pool's timeout.
    #[error("no database connection became available")]
    Pool {
        /// The pool's error.
        source: BoxedError,
    },

    /// A connection to the database could not be established.
    #[error("cannot open database {}", path.display())]
    Open {
        /// The database.
        path: PathBuf,
        /// Why, as the database or the system said.
        source: BoxedError,
    },

    /// A read-only store was asked of a database whose schema is not
    /// current (or that has none yet): it applies no migration.
    #[error("{} needs {pending} migrations, which a read-only store does not apply; run `keytally migrate` where the database can be written", path.display())]
    NeedsMigration {
        /// The database.
        path: PathBuf,
        /// How many migrations are pending.
        pending: usize,
    },

    /// An operation only the SQLite backend has (a backup, a restore, a
    /// checkpoint, raw SQLite access) was asked of a store on PostgreSQL.
    #[error("{operation} works only on an SQLite store; on PostgreSQL use the server's own tools (pg_dump, continuous archiving), see docs/operations.md")]
    SqliteOnly {
        /// What was asked.
        operation: &'static str,
    },

    /// PostgreSQL support was asked for (a `postgres://` URL) by a build of
    /// keytally without its `postgres` feature.
    #[error(
        "this build of keytally has no PostgreSQL support; build it with the `postgres` feature"
    )]
    PostgresNotBuilt,

    /// A PostgreSQL transaction kept failing on serialization failures or
    /// deadlocks with other writers, and was given up after several tries.
    /// Nothing of it was written; the call can be made again.
    #[error("the transaction kept conflicting with other writers and was rolled back")]
    Conflict {
        /// The database's last error.
        source: BoxedError,
    },

    /// The connection to the PostgreSQL server was lost, or none could be
    /// made: the server is down, restarting, or terminated the connection.
    /// Nothing of the call was committed. The store reconnects by itself
    /// once the server is back; the call can then be made again.
    #[error("the database server is unavailable (connection lost); nothing was committed")]
    Unavailable {
        /// The connection's error.
        source: BoxedError,
    },

    /// The connection to the PostgreSQL server was lost while a write was
    /// committing, so whether it was committed is unknown. An
    /// [`crate::EventSink`] never reports this for its events unless the
    /// server stayed away: it asks the server once it is back.
    #[error("the connection to the database server was lost while the write was committing; it may or may not have been committed")]
    CommitUnknown {
        /// The connection's error.
        source: BoxedError,
    },

    /// Any other database error.
    #[error("database error")]
    Database(#[source] diesel::result::Error),
}

impl Error {
    /// The message followed by each of its sources, after colons: what to
    /// show a person or put in a log line.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// Whether the call failed because the database server could not be
    /// reached ([`Error::Unavailable`], or [`Error::Pool`]: no connection
    /// within the timeout) or the write's fate is unknown
    /// ([`Error::CommitUnknown`]): what a gateway answers with 503 and a
    /// retry later.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Pool { .. } | Error::CommitUnknown { .. }
        )
    }

    /// Whether the call failed only because it met another writer
    /// (PostgreSQL's serialization failures and deadlocks): running it
    /// again can succeed.
    #[cfg(feature = "postgres")]
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::PermissionDenied => Error::Permission { path, source },
            io::ErrorKind::StorageFull => Error::DiskFull {
                path: Some(path),
                source: Box::new(source),
            },
            _ => Error::Io { path, source },
        }
    }
}

/// " writing PATH", for the messages that name the file being written.
fn writing(path: Option<&std::path::Path>) -> String {
    path.map(|path| format!(" writing {}", path.display()))
        .unwrap_or_default()
}

impl Error {
    /// The same error, naming `destination` as the file being written if
    /// it is a full disk: for writes of another file than the database.
    pub(crate) fn writing(self, destination: &std::path::Path) -> Self {
        match self {
            Error::DiskFull { path: None, source } => Error::DiskFull {
                path: Some(destination.to_path_buf()),
                source,
            },
            other => other,
        }
    }
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Self {
        Error::InvalidInput {
            field: invalid.field,
            reason: invalid.reason,
        }
    }
}

impl From<crate::model::secret::GenerateError> for Error {
    fn from(error: crate::model::secret::GenerateError) -> Self {
        use crate::model::secret::GenerateError;
        match error {
            GenerateError::Prefix(invalid) => invalid.into(),
            GenerateError::Random(source) => Error::Random {
                source: Box::new(source),
            },
        }
    }
}
