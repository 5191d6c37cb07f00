//! The integrity check an operator runs: SQLite's own checks, keytally's
//! mark, the schema version and the files' modes.

use std::path::Path;

use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use serde::Serialize;

use crate::db::sqlite::backup::integrity_lines;
use crate::db::sqlite::connection::pragma_integer;
use crate::db::sqlite::files::{self, APPLICATION_ID, FILE_MODE};
use crate::db::sqlite::migrations;
use crate::error::Result;

/// What `Store::check` found.
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

/// Runs `integrity_check` and `foreign_key_check` and checks the
/// application id, the schema version and the files' modes. Problems are
/// reported, not returned as errors.
pub(crate) fn check(conn: &mut SqliteConnection, database: &Path) -> Result<CheckReport> {
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
    let schema = migrations::inspect_read_only(conn, database)?;
    if !schema.pending.is_empty() {
        problems.push(format!("pending migrations: {}", schema.pending.join(", ")));
    }
    let files = files::file_infos(database)?;
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
