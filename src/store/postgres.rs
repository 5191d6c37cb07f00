//! What a store reports only on PostgreSQL: its status and its check.

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde::Serialize;

use crate::db::database::PooledConn;
use crate::db::postgres::connection::PgSetup;
use crate::db::postgres::migrations;
use crate::db::sqlite::check::CheckReport;
use crate::error::{Error, Result};
use crate::store::Store;

/// What `keytally status` shows about a store on PostgreSQL.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresStatus {
    /// The database's URL, its password left out.
    pub url: String,
    /// The server's version (`server_version`).
    pub server_version: String,
    /// The database's name.
    pub database: String,
    /// The role keytally connects as.
    pub user: String,
    /// The schema keytally's tables are in.
    pub schema: String,
    /// The version of the newest applied migration.
    pub schema_version: Option<String>,
    /// Known migrations not applied yet (empty for an open store).
    pub pending_migrations: Vec<String>,
    /// The size of the whole database on disk, in bytes.
    pub database_bytes: i64,
    /// The size of keytally's tables with their indexes, in bytes.
    pub tables_bytes: i64,
}

#[derive(QueryableByName)]
struct ServerRow {
    #[diesel(sql_type = Text)]
    server_version: String,
    #[diesel(sql_type = Text)]
    database: String,
    #[diesel(sql_type = Text)]
    user: String,
    #[diesel(sql_type = Text)]
    schema: String,
    #[diesel(sql_type = BigInt)]
    database_bytes: i64,
    #[diesel(sql_type = BigInt)]
    tables_bytes: i64,
}

/// The migrations applied to a PostgreSQL database and those pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostgresSchema {
    /// Versions of the applied migrations, oldest first.
    pub applied: Vec<String>,
    /// Versions of this build's migrations not applied yet, oldest first.
    pub pending: Vec<String>,
}

/// Reads what migrations the PostgreSQL database at `url` has and lacks,
/// without changing anything (no table is created).
///
/// # Errors
///
/// [`Error::Open`] if no connection can be made, [`Error::Foreign`] or
/// [`Error::SchemaTooNew`] for a database keytally must not touch, or
/// [`Error::Database`].
pub fn postgres_schema(url: &str) -> Result<PostgresSchema> {
    let setup = PgSetup::new(url, crate::DEFAULT_BUSY_TIMEOUT);
    let mut conn = setup.establish()?;
    let state = migrations::inspect(&mut conn, setup.redacted())?;
    Ok(PostgresSchema {
        applied: state.applied,
        pending: state.pending,
    })
}

impl Store {
    /// A PostgreSQL connection of the store's pool.
    fn postgres_connection(
        &self,
    ) -> Result<diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<diesel::PgConnection>>>
    {
        match self.db.connection()? {
            PooledConn::Postgres(conn) => Ok(conn),
            PooledConn::Sqlite(_) => Err(Error::InvalidInput {
                field: "backend",
                reason: "the store is on SQLite; use Store::status".to_owned(),
            }),
        }
    }

    /// Reports the PostgreSQL server, the database and its schema version.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] on SQLite, or the store's errors.
    pub fn postgres_status(&self) -> Result<PostgresStatus> {
        let mut conn = self.postgres_connection()?;
        let server: ServerRow = diesel::sql_query(
            "SELECT current_setting('server_version') AS server_version, \
             current_database()::text AS database, current_user::text AS user, \
             current_schema()::text AS schema, \
             pg_database_size(current_database()) AS database_bytes, \
             (SELECT CAST(coalesce(sum(pg_total_relation_size(c.oid)), 0) AS BIGINT) \
              FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace \
              AND c.relkind = 'r') AS tables_bytes",
        )
        .get_result(&mut *conn)?;
        let schema = migrations::inspect(&mut conn, self.db.path().to_str().unwrap_or(""))?;
        Ok(PostgresStatus {
            url: self.db.path().display().to_string(),
            server_version: server.server_version,
            database: server.database,
            user: server.user,
            schema: server.schema,
            schema_version: schema.applied.last().cloned(),
            pending_migrations: schema.pending,
            database_bytes: server.database_bytes,
            tables_bytes: server.tables_bytes,
        })
    }

    /// The check on PostgreSQL: keytally's mark and schema version, the
    /// counters the store relies on, and every foreign key and check
    /// constraint still validated. The server checks its own pages.
    pub(crate) fn postgres_check(&self) -> Result<CheckReport> {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            count: i64,
        }
        let mut conn = self.postgres_connection()?;
        let shown_as = self.db.path().display().to_string();
        let mut problems = Vec::new();
        let schema = match migrations::inspect(&mut conn, &shown_as) {
            Ok(schema) => Some(schema),
            Err(error) => {
                problems.push(error.report());
                None
            }
        };
        if let Some(schema) = &schema {
            if !schema.pending.is_empty() {
                problems.push(format!(
                    "migrations not applied: {}",
                    schema.pending.join(", ")
                ));
            }
        }
        let counters: Count =
            diesel::sql_query("SELECT count(*) AS count FROM sequences WHERE name = 'key_changes'")
                .get_result(&mut *conn)?;
        if counters.count != 1 {
            problems
                .push("the count of key changes is missing from the sequences table".to_owned());
        }
        let sequence: Count = diesel::sql_query(
            "SELECT count(*) AS count FROM pg_class \
             WHERE relname = 'event_ids' AND relkind = 'S' \
             AND relnamespace = current_schema()::regnamespace",
        )
        .get_result(&mut *conn)?;
        if sequence.count != 1 {
            problems.push("the event id sequence event_ids is missing".to_owned());
        }
        let unvalidated: Count = diesel::sql_query(
            "SELECT count(*) AS count FROM pg_constraint \
             WHERE connamespace = current_schema()::regnamespace AND NOT convalidated",
        )
        .get_result(&mut *conn)?;
        if unvalidated.count > 0 {
            problems.push(format!(
                "{} constraints are not validated",
                unvalidated.count
            ));
        }
        let orphans: Count = diesel::sql_query(
            "SELECT count(*) AS count FROM key_secrets s \
             WHERE NOT EXISTS (SELECT 1 FROM keys k WHERE k.row_id = s.key_row_id)",
        )
        .get_result(&mut *conn)?;
        if orphans.count > 0 {
            problems.push(format!(
                "{} secrets refer to keys that do not exist",
                orphans.count
            ));
        }
        Ok(CheckReport {
            integrity: vec![if problems.is_empty() {
                "ok"
            } else {
                "problems"
            }
            .to_owned()],
            foreign_key_violations: orphans.count,
            application_id: 0,
            schema_version: schema.as_ref().and_then(|s| s.applied.last().cloned()),
            pending_migrations: schema.map(|s| s.pending).unwrap_or_default(),
            files: Vec::new(),
            problems,
        })
    }
}
