//! The PostgreSQL migrations on a real server: they apply, every `down.sql`
//! reverts its `up.sql`, and the tables they make have the columns of
//! `schema.rs` (SQLite's `diesel print-schema`), in the same order, with the
//! same types and nullability, so one schema serves both backends.

use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use diesel_migrations::MigrationHarness;

use crate::TestResult;
use keytally::testing::postgres;

#[derive(QueryableByName, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    data_type: String,
    #[diesel(sql_type = Text)]
    is_nullable: String,
}

fn columns(conn: &mut PgConnection) -> Result<Vec<Column>, diesel::result::Error> {
    diesel::sql_query(
        "SELECT table_name::text AS table_name, column_name::text AS column_name, \
         data_type::text AS data_type, is_nullable::text AS is_nullable \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations' \
         ORDER BY table_name, ordinal_position",
    )
    .load(conn)
}

/// The columns `schema.rs` declares, as PostgreSQL would report them.
fn schema_rs_columns() -> Result<Vec<Column>, String> {
    let mut found = Vec::new();
    let mut table = None;
    for line in include_str!("../../schema.rs").lines().map(str::trim) {
        if let Some((name, _)) = line.split_once(" (") {
            if !line.contains("->") && line.ends_with('{') {
                table = Some(name.to_owned());
                continue;
            }
        }
        // Column lines only, not `diesel::joinable!(a -> b (c));`.
        if line.starts_with("diesel::") {
            continue;
        }
        let Some((column, sql_type)) = line.split_once(" -> ") else {
            continue;
        };
        let table = table.clone().ok_or("a column outside any table")?;
        let sql_type = sql_type.trim_end_matches(',');
        let (inner, nullable) = match sql_type.strip_prefix("Nullable<") {
            Some(inner) => (inner.trim_end_matches('>'), "YES"),
            None => (sql_type, "NO"),
        };
        let data_type = match inner {
            "BigInt" => "bigint",
            "Integer" => "integer",
            "Text" => "text",
            "Binary" => "bytea",
            "Bool" => "boolean",
            other => {
                return Err(format!(
                    "schema.rs type {other} has no PostgreSQL name here"
                ))
            }
        };
        found.push(Column {
            table_name: table,
            column_name: column.to_owned(),
            data_type: data_type.to_owned(),
            is_nullable: nullable.to_owned(),
        });
    }
    // information_schema lists tables by name; schema.rs does too.
    found.sort_by(|a, b| a.table_name.cmp(&b.table_name));
    Ok(found)
}

#[test]
fn the_postgres_migrations_make_the_tables_and_columns_of_schema_rs() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let mut conn = PgConnection::establish(&url)?;
    let applied = conn
        .run_pending_migrations(keytally::POSTGRES_MIGRATIONS)
        .map_err(|e| e.to_string())?;
    assert!(!applied.is_empty());
    let made = columns(&mut conn)?;
    assert_eq!(made, schema_rs_columns()?);

    // Every down.sql reverts its up.sql, and the migrations apply again.
    conn.revert_all_migrations(keytally::POSTGRES_MIGRATIONS)
        .map_err(|e| e.to_string())?;
    assert_eq!(columns(&mut conn)?, Vec::new());
    conn.run_pending_migrations(keytally::POSTGRES_MIGRATIONS)
        .map_err(|e| e.to_string())?;
    assert_eq!(columns(&mut conn)?, made);
    Ok(())
}

#[test]
fn the_postgres_triggers_keep_keys_as_the_sqlite_ones_do() -> TestResult {
    let url = postgres::server()?.fresh_database()?;
    let mut conn = PgConnection::establish(&url)?;
    conn.run_pending_migrations(keytally::POSTGRES_MIGRATIONS)
        .map_err(|e| e.to_string())?;
    diesel::sql_query(
        "INSERT INTO keys (id, display_prefix, tier, label, allowed_models, created_at) \
         VALUES (decode('000102030405060708090a0b0c0d0e0f', 'hex'), 'kt_abcd', 'client', 'k', \
         '[\"*\"]', 1)",
    )
    .execute(&mut conn)?;
    let changes = |conn: &mut PgConnection| -> Result<i64, diesel::result::Error> {
        #[derive(QueryableByName)]
        struct Next {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            next: i64,
        }
        Ok(
            diesel::sql_query("SELECT next FROM sequences WHERE name = 'key_changes'")
                .get_result::<Next>(conn)?
                .next,
        )
    };
    let start = changes(&mut conn)?;
    // A label change counts; last_used_at does not.
    diesel::sql_query("UPDATE keys SET label = 'renamed'").execute(&mut conn)?;
    assert_eq!(changes(&mut conn)?, start + 1);
    diesel::sql_query("UPDATE keys SET last_used_at = 5").execute(&mut conn)?;
    assert_eq!(changes(&mut conn)?, start + 1);
    // The tier, the row id and the row itself stay.
    for refused in [
        "UPDATE keys SET tier = 'admin'",
        "UPDATE keys SET row_id = row_id + 1000 OVERRIDING SYSTEM VALUE",
        "DELETE FROM keys",
    ] {
        let outcome = diesel::sql_query(refused).execute(&mut conn);
        assert!(outcome.is_err(), "{refused} was allowed");
    }
    assert_eq!(changes(&mut conn)?, start + 1);
    Ok(())
}
