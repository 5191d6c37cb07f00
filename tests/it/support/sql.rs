//! Hand-written SQL on a test store's database, whichever backend it is on:
//! its SQLite pool's connection, or a connection of its own to its
//! PostgreSQL database. For looking under the repositories, and for the
//! writes they refuse to make.

use diesel::pg::Pg;
use diesel::sql_types::BigInt;
use diesel::sqlite::Sqlite;
use diesel::{Connection, PgConnection, QueryResult, QueryableByName, RunQueryDsl};
use keytally::testing::TestStore;
use keytally::SqlitePooledConnection;

/// A connection to a test store's database.
pub enum Raw {
    /// One of the store's own SQLite connections.
    Sqlite(SqlitePooledConnection),
    /// A connection of its own to the store's PostgreSQL database.
    Postgres(PgConnection),
}

#[derive(QueryableByName)]
struct Number {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A connection to `store`'s database.
pub fn raw(store: &TestStore) -> Result<Raw, Box<dyn std::error::Error>> {
    Ok(match store.database_url() {
        Some(url) => Raw::Postgres(PgConnection::establish(url)?),
        None => Raw::Sqlite(store.sqlite_connection()?),
    })
}

impl Raw {
    /// Runs a statement; returns the rows it changed.
    pub fn execute(&mut self, sql: &str) -> QueryResult<usize> {
        match self {
            Raw::Sqlite(conn) => diesel::sql_query(sql).execute(&mut **conn),
            Raw::Postgres(conn) => diesel::sql_query(sql).execute(conn),
        }
    }

    /// Runs a query whose one row has one integer column named `n`.
    pub fn number(&mut self, sql: &str) -> QueryResult<i64> {
        Ok(self.load::<Number>(sql)?.first().map_or(0, |row| row.n))
    }

    /// Loads a query's rows.
    pub fn load<T>(&mut self, sql: &str) -> QueryResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static,
    {
        match self {
            Raw::Sqlite(conn) => diesel::sql_query(sql).load(&mut **conn),
            Raw::Postgres(conn) => diesel::sql_query(sql).load(conn),
        }
    }

    /// Rows that differ between the hourly rollups and a recount of the raw
    /// events, per model and per key, their cost and unpriced requests
    /// included (0 when they agree).
    pub fn rollups_against_recount(&mut self) -> QueryResult<i64> {
        self.rollups_against_recount_from(0)
    }

    /// The same for the hours from `hour` on (hours since the epoch): the
    /// raw events before it may have been pruned, which leaves rollups
    /// alone.
    pub fn rollups_against_recount_from(&mut self, hour: i64) -> QueryResult<i64> {
        let cost = "coalesce(sum(cost_nanos), 0), \
                    sum(CASE WHEN cost_nanos IS NULL THEN 1 ELSE 0 END)";
        let since = hour * 3_600_000;
        let by_model = self.difference(
            &format!(
                "SELECT hour, model_id, requests, errors, prompt_tokens, latency_ms_sum, \
                 latency_ms_max, cost_nanos, unpriced_requests FROM usage_model_hourly \
                 WHERE hour >= {hour}"
            ),
            &format!(
                "SELECT ts / 3600000, model_id, count(*), \
                 sum(CASE WHEN status >= 400 OR error IS NOT NULL THEN 1 ELSE 0 END), \
                 sum(prompt_tokens), sum(latency_ms), max(latency_ms), {cost} \
                 FROM events WHERE ts >= {since} GROUP BY 1, 2"
            ),
        )?;
        let by_key = self.difference(
            &format!(
                "SELECT key_row_id, hour, model_id, requests, prompt_tokens, cost_nanos, \
                 unpriced_requests FROM usage_key_hourly WHERE hour >= {hour}"
            ),
            &format!(
                "SELECT coalesce(key_row_id, 0), ts / 3600000, model_id, count(*), \
                 sum(prompt_tokens), {cost} FROM events WHERE ts >= {since} GROUP BY 1, 2, 3"
            ),
        )?;
        Ok(by_model + by_key)
    }

    /// Rows in one query's result and not the other's, both ways.
    fn difference(&mut self, a: &str, b: &str) -> QueryResult<i64> {
        let except = match self {
            Raw::Sqlite(_) => "EXCEPT",
            Raw::Postgres(_) => "EXCEPT ALL",
        };
        Ok(self.number(&format!(
            "SELECT count(*) AS n FROM ({a} {except} {b}) AS d"
        ))? + self.number(&format!(
            "SELECT count(*) AS n FROM ({b} {except} {a}) AS d"
        ))?)
    }

    /// `bytes` as an SQL literal of this backend.
    pub fn blob(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match self {
            Raw::Sqlite(_) => format!("X'{hex}'"),
            Raw::Postgres(_) => format!("'\\x{hex}'::bytea"),
        }
    }
}

/// The tables in the current schema of a PostgreSQL database.
pub fn count_tables(conn: &mut PgConnection) -> QueryResult<i64> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS n FROM information_schema.tables \
         WHERE table_schema = current_schema()",
    )
    .get_result::<Number>(conn)?
    .n)
}

/// The rows of a PostgreSQL table.
pub fn count(conn: &mut PgConnection, table: &str) -> QueryResult<i64> {
    Ok(
        diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .get_result::<Number>(conn)?
            .n,
    )
}
