//! The embedded schema migrations and the runner that applies them safely.
//!
//! Each pending migration runs in its own `BEGIN IMMEDIATE` transaction that
//! first re-reads what is applied, so two processes opening a fresh database
//! at once apply every migration exactly once. `PRAGMA user_version` mirrors
//! the number of applied migrations in the same transaction.

use std::path::Path;

use diesel::migration::{Migration, MigrationSource};
use diesel::sql_types::Text;
use diesel::sqlite::Sqlite;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::db::sqlite::connection::{
    pragma_integer, Access, ConnectionSetup, Synchronous, DEFAULT_BUSY_TIMEOUT,
};
use crate::db::sqlite::files::{self, HeaderVerdict, APPLICATION_ID};
use crate::db::versions;
use crate::error::{Error, Result};

/// The migrations compiled into this binary, from `migrations/sqlite/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Diesel's bookkeeping table.
const MIGRATIONS_TABLE: &str = "__diesel_schema_migrations";

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = Text)]
    version: String,
}

/// The versions (folder timestamps) of the migrations this binary carries, in
/// the order they apply.
///
/// # Errors
///
/// [`Error::Migration`] if the embedded migrations cannot be listed, which
/// only happens when the binary itself was built from a broken folder.
pub fn known_versions() -> Result<Vec<String>> {
    Ok(known_migrations()?
        .iter()
        .map(|migration| migration.name().version().to_string())
        .collect())
}

fn known_migrations() -> Result<Vec<Box<dyn Migration<Sqlite>>>> {
    let mut migrations =
        MigrationSource::<Sqlite>::migrations(&MIGRATIONS).map_err(|e| Error::Migration {
            version: "(embedded)".to_owned(),
            message: e.to_string(),
        })?;
    migrations.sort_by_key(|migration| migration.name().version().to_string());
    Ok(migrations)
}

/// What the database says about itself, read without writing anything.
#[derive(Debug)]
pub(crate) struct SchemaState {
    /// The database carries keytally's application id.
    pub(crate) marked: bool,
    /// Versions of the applied migrations, oldest first.
    pub(crate) applied: Vec<String>,
    /// Versions of the known migrations not applied yet, oldest first.
    pub(crate) pending: Vec<String>,
}

/// Reads the application id and the applied migrations, and refuses a
/// database that belongs to someone else or to a newer keytally.
pub(crate) fn inspect(conn: &mut SqliteConnection, path: &Path) -> Result<SchemaState> {
    let application_id = pragma_integer(conn, "application_id")?;
    let marked = application_id == i64::from(APPLICATION_ID);
    if !marked {
        if application_id != 0 {
            return Err(Error::Foreign {
                path: path.to_path_buf(),
                detail: format!(
                    "application id {:#010x}, keytally's is {APPLICATION_ID:#010x}",
                    application_id as u32
                ),
            });
        }
        let objects = user_object_count(conn)?;
        if objects > 0 {
            return Err(Error::Foreign {
                path: path.to_path_buf(),
                detail: format!("it has {objects} schema objects but no keytally application id"),
            });
        }
    }
    let applied = applied_versions(conn)?;
    let pending = versions::pending(&applied, known_versions()?, path)?;
    Ok(SchemaState {
        marked,
        applied,
        pending,
    })
}

fn user_object_count(conn: &mut SqliteConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let row: Count = diesel::sql_query(
        "SELECT count(*) AS count FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )
    .get_result(conn)?;
    Ok(row.count)
}

/// The applied migrations' versions, oldest first, without creating Diesel's
/// table when it does not exist (that would be a write).
fn applied_versions(conn: &mut SqliteConnection) -> Result<Vec<String>> {
    let exists: Vec<Version> = diesel::sql_query(
        "SELECT name AS version FROM sqlite_schema WHERE type = 'table' AND name = ?",
    )
    .bind::<Text, _>(MIGRATIONS_TABLE)
    .load(conn)?;
    if exists.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Version> = diesel::sql_query(format!(
        "SELECT version FROM {MIGRATIONS_TABLE} ORDER BY version"
    ))
    .load(conn)?;
    Ok(rows.into_iter().map(|row| row.version).collect())
}

/// Reads the schema state in a read transaction, without writing.
pub(crate) fn inspect_read_only(conn: &mut SqliteConnection, path: &Path) -> Result<SchemaState> {
    conn.transaction(|conn| inspect(conn, path))
}

/// Marks the database as keytally's if it is new, then applies every pending
/// migration, each in its own immediate transaction. Returns the versions it
/// applied (empty when the schema was already current).
pub(crate) fn run_pending(conn: &mut SqliteConnection, path: &Path) -> Result<Vec<String>> {
    let state = inspect_read_only(conn, path)?;
    if state.marked && state.pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut applied_now = Vec::new();
    if state.pending.is_empty() {
        // Only the mark is missing (a database whose migrations all applied
        // but whose mark was lost cannot happen, but is harmless to repair).
        conn.immediate_transaction(|conn| mark_if_new(conn, path).map(|_| ()))?;
        return Ok(applied_now);
    }
    for migration in known_migrations()? {
        let version = migration.name().version().to_string();
        let applied = conn.immediate_transaction(|conn| -> Result<bool> {
            // Re-read under the write lock: another process may have applied
            // it since the read above.
            let state = mark_if_new(conn, path)?;
            if !state.pending.contains(&version) {
                return Ok(false);
            }
            let migration_error = |e: Box<dyn std::error::Error + Send + Sync>| Error::Migration {
                version: version.clone(),
                message: e.to_string(),
            };
            // Creates Diesel's bookkeeping table if this is the first one.
            conn.applied_migrations().map_err(migration_error)?;
            conn.run_migration(migration.as_ref())
                .map_err(migration_error)?;
            let applied_count = state.applied.len() + 1;
            diesel::sql_query(format!("PRAGMA user_version = {applied_count}")).execute(conn)?;
            Ok(true)
        })?;
        if applied {
            tracing::info!(migration = %migration.name(), "applied migration");
            applied_now.push(migration.name().to_string());
        }
    }
    Ok(applied_now)
}

/// Inside a write transaction: inspects the database and sets keytally's
/// application id if it has none yet.
fn mark_if_new(conn: &mut SqliteConnection, path: &Path) -> Result<SchemaState> {
    let state = inspect(conn, path)?;
    if !state.marked {
        diesel::sql_query(format!("PRAGMA application_id = {APPLICATION_ID}")).execute(conn)?;
    }
    Ok(state)
}

/// The migrations that opening the database at `path` would apply, without
/// applying them (or creating the file). Refuses what opening a store
/// refuses.
///
/// # Errors
///
/// As opening a store: [`Error::Symlink`], [`Error::NotADatabase`],
/// [`Error::Foreign`], [`Error::SchemaTooNew`] and file system errors.
pub fn pending_for(path: &Path) -> Result<Vec<String>> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => {
            return Err(Error::Symlink {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return known_versions(),
        Err(e) => return Err(Error::io(path, e)),
    }
    if files::inspect_header(path)? == HeaderVerdict::Empty {
        return known_versions();
    }
    let setup = ConnectionSetup {
        path: path.to_path_buf(),
        synchronous: Synchronous::Normal,
        busy_timeout: DEFAULT_BUSY_TIMEOUT,
        access: Access::ReadOnly {
            tidy: !files::SIDECAR_SUFFIXES
                .iter()
                .any(|suffix| files::sidecar(path, suffix).exists()),
        },
    };
    let mut conn = setup.establish()?;
    let pending = inspect_read_only(&mut conn, path)?.pending;
    drop(conn);
    if setup.access == (Access::ReadOnly { tidy: true }) {
        setup.tidy_after_read_only();
    }
    Ok(pending)
}
