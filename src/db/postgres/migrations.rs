//! The embedded PostgreSQL migrations and the runner that applies them
//! once, however many replicas start at the same moment.
//!
//! Diesel's harness takes no lock, so the runner holds a session-level
//! advisory lock from its first look at the schema to its last migration:
//! a second process waits, then finds nothing pending. A database is
//! keytally's when its `keys` table carries keytally's comment (the mark
//! that SQLite's application id is); one that has other tables and no mark
//! is refused untouched, and so is one migrated by a newer keytally.

use diesel::migration::{Migration, MigrationSource};
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::db::versions;
use crate::error::{Error, Result};

/// The PostgreSQL migrations compiled into this binary, from
/// `migrations/postgres/` (`diesel-postgres.toml` points the diesel CLI
/// there).
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The advisory lock keytally's migration runners take: "keytally" in
/// ASCII, as a number, so no other application is likely to use it.
const MIGRATION_LOCK: i64 = 0x6b65_7974_616c_6c79;

/// The comment on the `keys` table that marks a database as keytally's.
pub(crate) const MARK: &str = "keytally";

/// Diesel's bookkeeping table.
const MIGRATIONS_TABLE: &str = "__diesel_schema_migrations";

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// What the database says about its schema.
#[derive(Debug)]
pub(crate) struct SchemaState {
    /// Versions of the applied migrations, oldest first.
    pub(crate) applied: Vec<String>,
    /// Versions of the known migrations not applied yet, oldest first.
    pub(crate) pending: Vec<String>,
}

fn known_migrations() -> Result<Vec<Box<dyn Migration<Pg>>>> {
    let mut migrations =
        MigrationSource::<Pg>::migrations(&POSTGRES_MIGRATIONS).map_err(|e| Error::Migration {
            version: "(embedded)".to_owned(),
            message: e.to_string(),
        })?;
    migrations.sort_by_key(|migration| migration.name().version().to_string());
    Ok(migrations)
}

/// Reads the mark and the applied migrations, and refuses a database that
/// belongs to someone else or to a newer keytally. Writes nothing.
pub(crate) fn inspect(conn: &mut PgConnection, shown_as: &str) -> Result<SchemaState> {
    // Tables and views of the schema, but those an extension made
    // (`pg_stat_statements`' views, PostGIS's tables): an extension
    // installed in the schema does not make it another application's.
    let tables: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_class c \
         WHERE c.relnamespace = current_schema()::regnamespace \
         AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relname <> $1 \
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
           AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 1",
    )
    .bind::<Text, _>(MIGRATIONS_TABLE)
    .load(conn)?;
    if !tables.is_empty() {
        let mark: Vec<Name> = diesel::sql_query(
            "SELECT coalesce(obj_description(to_regclass('keys'), 'pg_class'), '') AS name",
        )
        .load(conn)?;
        if !mark.iter().any(|row| row.name == MARK) {
            let names: Vec<&str> = tables.iter().take(5).map(|t| t.name.as_str()).collect();
            return Err(Error::Foreign {
                path: shown_as.into(),
                detail: format!(
                    "its schema has {} tables ({}{}) but no keytally mark",
                    tables.len(),
                    names.join(", "),
                    if tables.len() > names.len() {
                        ", …"
                    } else {
                        ""
                    }
                ),
            });
        }
    }
    let applied = applied_versions(conn)?;
    let known: Vec<String> = known_migrations()?
        .iter()
        .map(|migration| migration.name().version().to_string())
        .collect();
    let pending = versions::pending(&applied, known, std::path::Path::new(shown_as))?;
    Ok(SchemaState { applied, pending })
}

/// The applied migrations' versions, oldest first, without creating
/// Diesel's table when it does not exist.
fn applied_versions(conn: &mut PgConnection) -> Result<Vec<String>> {
    let exists: Vec<Name> = diesel::sql_query(
        "SELECT table_name::text AS name FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = $1",
    )
    .bind::<Text, _>(MIGRATIONS_TABLE)
    .load(conn)?;
    if exists.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Name> = diesel::sql_query(format!(
        "SELECT version::text AS name FROM {MIGRATIONS_TABLE} ORDER BY version"
    ))
    .load(conn)?;
    Ok(rows.into_iter().map(|row| row.name).collect())
}

/// Applies every pending migration, each in its own transaction, under
/// keytally's advisory lock. Returns the full names of those applied.
pub(crate) fn run_pending(conn: &mut PgConnection, shown_as: &str) -> Result<Vec<String>> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        #[expect(dead_code, reason = "read only to run the statement")]
        locked: bool,
    }
    // Waits for another runner, which holds it while it migrates; waits
    // for the lock timeout at most.
    diesel::sql_query("SELECT pg_advisory_lock($1) IS NULL AS locked")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .get_result::<Locked>(conn)?;
    let outcome = apply_pending(conn, shown_as);
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1) AS locked")
        .bind::<BigInt, _>(MIGRATION_LOCK)
        .get_result::<Locked>(conn);
    let applied = outcome?;
    unlocked?;
    Ok(applied)
}

fn apply_pending(conn: &mut PgConnection, shown_as: &str) -> Result<Vec<String>> {
    let state = inspect(conn, shown_as)?;
    let mut applied = Vec::new();
    if state.pending.is_empty() {
        return Ok(applied);
    }
    // Creates Diesel's bookkeeping table if it is not there yet.
    conn.applied_migrations()
        .map_err(|error| Error::Migration {
            version: "(bookkeeping)".to_owned(),
            message: error.to_string(),
        })?;
    for migration in known_migrations()? {
        let version = migration.name().version().to_string();
        if !state.pending.contains(&version) {
            continue;
        }
        conn.run_migration(migration.as_ref())
            .map_err(|error| Error::Migration {
                version: version.clone(),
                message: error.to_string(),
            })?;
        tracing::info!(migration = %migration.name(), "applied migration");
        applied.push(migration.name().to_string());
    }
    Ok(applied)
}
