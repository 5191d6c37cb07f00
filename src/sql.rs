//! [`CachedSql`]: hand-written SQL that Diesel keeps prepared.
//!
//! Diesel never caches the prepared statement of `sql_query`, of an
//! `UPDATE`, or of an `INSERT .. ON CONFLICT DO UPDATE`, so each call would
//! parse and plan its SQL again. On the write path and the usage queries
//! that cost dominates. A `CachedSql` is cached by its text instead, like any
//! other Diesel query without a static type id.

use std::borrow::Cow;

use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Untyped};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::{QueryResult, RunQueryDsl};

/// SQL text with `?` placeholders, each bound to an integer.
#[derive(Debug, Clone)]
pub(crate) struct CachedSql {
    sql: Cow<'static, str>,
    binds: Vec<i64>,
}

impl CachedSql {
    /// SQL whose `?` placeholders take `binds`, in order. The text must not
    /// hold a `?` anywhere else (in a string literal, say).
    pub(crate) fn new(sql: impl Into<Cow<'static, str>>, binds: Vec<i64>) -> CachedSql {
        CachedSql {
            sql: sql.into(),
            binds,
        }
    }
}

impl QueryFragment<Sqlite> for CachedSql {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        let mut pieces = self.sql.split('?');
        let mut binds = self.binds.iter();
        if let Some(first) = pieces.next() {
            out.push_sql(first);
        }
        for piece in pieces {
            let bind = binds.next().ok_or_else(|| {
                DieselError::QueryBuilderError("more placeholders than values".into())
            })?;
            out.push_bind_param::<BigInt, i64>(bind)?;
            out.push_sql(piece);
        }
        if binds.next().is_some() {
            return Err(DieselError::QueryBuilderError(
                "more values than placeholders".into(),
            ));
        }
        Ok(())
    }
}

impl QueryId for CachedSql {
    type QueryId = ();
    // No static id: Diesel then caches the statement by its SQL text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for CachedSql {
    type SqlType = Untyped;
}

impl RunQueryDsl<SqliteConnection> for CachedSql {}
