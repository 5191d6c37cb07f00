//! Hand-written SQL that Diesel keeps prepared.
//!
//! Diesel never caches the prepared statement of `sql_query`, of an
//! `UPDATE`, or of an `INSERT .. ON CONFLICT DO UPDATE`, so each call would
//! parse and plan its SQL again. On the write path and the usage queries
//! that cost dominates.
//!
//! - [`CachedSql`] holds SQL built at run time; Diesel caches it by its text
//!   (building and hashing the text on every call).
//! - [`FixedSql`] runs a statement named by a [`SqlText`] type; Diesel caches
//!   it by that type, so a call only binds its values. The hot paths use it.
//!   Each statement is bound in one place, with the same [`Value`] variant
//!   (so the same SQL type) at each placeholder on every call.

use std::borrow::Cow;
use std::marker::PhantomData;

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Untyped};
use diesel::QueryResult;

/// A value bound to a placeholder, with its SQL type: a nullable
/// column is bound as nullable whether or not this value is null, so a
/// statement's placeholders keep one type from call to call (its prepared
/// form is reused, and a backend that types parameters at prepare time
/// would reject a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// `BigInt`.
    Int(i64),
    /// `Nullable<BigInt>`.
    NullableInt(Option<i64>),
    /// `Nullable<Text>`.
    NullableText(Option<&'a str>),
    /// `Bool` (an integer 0 or 1 on SQLite).
    Bool(bool),
    /// `Array<BigInt>`: PostgreSQL only.
    #[cfg(feature = "postgres")]
    IntArray(&'a [i64]),
    /// `Array<Nullable<BigInt>>`: PostgreSQL only.
    #[cfg(feature = "postgres")]
    NullableIntArray(&'a [Option<i64>]),
    /// `Array<Nullable<Text>>`: PostgreSQL only.
    #[cfg(feature = "postgres")]
    NullableTextArray(&'a [Option<&'a str>]),
    /// `Array<Bool>`: PostgreSQL only.
    #[cfg(feature = "postgres")]
    BoolArray(&'a [bool]),
}

/// Binding arrays, which only PostgreSQL has.
#[cfg(feature = "postgres")]
trait ArrayBinds: diesel::backend::Backend + Sized {
    fn push_array<'b>(out: &mut AstPass<'_, 'b, Self>, value: &'b Value<'b>) -> QueryResult<()>;
}

#[cfg(feature = "postgres")]
impl ArrayBinds for diesel::sqlite::Sqlite {
    fn push_array<'b>(_out: &mut AstPass<'_, 'b, Self>, _value: &'b Value<'b>) -> QueryResult<()> {
        Err(DieselError::QueryBuilderError(
            "SQLite has no array parameters".into(),
        ))
    }
}

#[cfg(feature = "postgres")]
impl ArrayBinds for diesel::pg::Pg {
    fn push_array<'b>(out: &mut AstPass<'_, 'b, Self>, value: &'b Value<'b>) -> QueryResult<()> {
        use diesel::sql_types::Array;
        match value {
            Value::IntArray(values) => out.push_bind_param::<Array<BigInt>, [i64]>(values),
            Value::NullableIntArray(values) => {
                out.push_bind_param::<Array<Nullable<BigInt>>, [Option<i64>]>(values)
            }
            Value::NullableTextArray(values) => {
                out.push_bind_param::<Array<Nullable<Text>>, [Option<&str>]>(values)
            }
            Value::BoolArray(values) => out.push_bind_param::<Array<Bool>, [bool]>(values),
            _ => Err(DieselError::QueryBuilderError("not an array".into())),
        }
    }
}

impl From<i64> for Value<'_> {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(value: Option<i64>) -> Self {
        Value::NullableInt(value)
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Value::NullableText(value)
    }
}

/// Pushes `sql` with each `?` bound to the next of `binds`: the backend
/// writes its own placeholder (`?` on SQLite, `$1`, `$2`, … on PostgreSQL).
fn walk_placeholders<'b, V, DB: Backend>(
    sql: &'b str,
    binds: &'b [V],
    out: &mut AstPass<'_, 'b, DB>,
    bind: impl Fn(&'b V, &mut AstPass<'_, 'b, DB>) -> QueryResult<()>,
) -> QueryResult<()> {
    let mut pieces = sql.split('?');
    let mut binds = binds.iter();
    if let Some(first) = pieces.next() {
        out.push_sql(first);
    }
    for piece in pieces {
        let value = binds.next().ok_or_else(|| {
            DieselError::QueryBuilderError("more placeholders than values".into())
        })?;
        bind(value, out)?;
        out.push_sql(piece);
    }
    if binds.next().is_some() {
        return Err(DieselError::QueryBuilderError(
            "more values than placeholders".into(),
        ));
    }
    Ok(())
}

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

/// Implements the statements' traits for each backend, with one body:
/// the backend's query builder writes its own placeholders.
macro_rules! for_backend {
    ($backend:ty, $connection:ty) => {
        impl QueryFragment<$backend> for CachedSql {
            fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, $backend>) -> QueryResult<()> {
                walk_placeholders(&self.sql, &self.binds, &mut out, |value, out| {
                    out.push_bind_param::<BigInt, i64>(value)
                })
            }
        }

        impl diesel::RunQueryDsl<$connection> for CachedSql {}

        impl<S: SqlText> QueryFragment<$backend> for FixedSql<'_, S> {
            fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, $backend>) -> QueryResult<()> {
                let (first, rest) = S::pieces().split_first().unwrap_or((&"", &[]));
                if rest.len() != self.binds.len() {
                    return Err(DieselError::QueryBuilderError(
                        format!(
                            "{} placeholders and {} values",
                            rest.len(),
                            self.binds.len()
                        )
                        .into(),
                    ));
                }
                out.push_sql(first);
                for (value, piece) in self.binds.iter().zip(rest) {
                    match value {
                        Value::Int(int) => out.push_bind_param::<BigInt, i64>(int)?,
                        Value::NullableInt(int) => {
                            out.push_bind_param::<Nullable<BigInt>, Option<i64>>(int)?;
                        }
                        Value::NullableText(text) => {
                            out.push_bind_param::<Nullable<Text>, Option<&str>>(text)?;
                        }
                        Value::Bool(flag) => out.push_bind_param::<Bool, bool>(flag)?,
                        #[cfg(feature = "postgres")]
                        Value::IntArray(_)
                        | Value::NullableIntArray(_)
                        | Value::NullableTextArray(_)
                        | Value::BoolArray(_) => {
                            <$backend as ArrayBinds>::push_array(&mut out, value)?;
                        }
                    }
                    out.push_sql(piece);
                }
                Ok(())
            }
        }

        impl<S: SqlText> diesel::RunQueryDsl<$connection> for FixedSql<'_, S> {}
    };
}

for_backend!(diesel::sqlite::Sqlite, diesel::SqliteConnection);
#[cfg(feature = "postgres")]
for_backend!(diesel::pg::Pg, diesel::PgConnection);

impl QueryId for CachedSql {
    type QueryId = ();
    // No static id: Diesel then caches the statement by its SQL text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for CachedSql {
    type SqlType = Untyped;
}

/// A statement known at compile time: one type per statement text.
pub(crate) trait SqlText: 'static {
    /// The SQL (with `?` placeholders and no `?` anywhere else) cut at its
    /// placeholders, once per process: Diesel walks a query for its values
    /// on every call.
    fn pieces() -> &'static [&'static str];
}

/// Declares a [`SqlText`] type for a statement fixed for the process: `$sql`
/// (a `&'static str`, or a `String` built once from constant parts) is
/// evaluated and cut at its placeholders the first time it is used.
macro_rules! sql_text {
    ($(#[$doc:meta])* $name:ident = $sql:expr) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl $crate::db::sql::SqlText for $name {
            fn pieces() -> &'static [&'static str] {
                static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                static PIECES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
                PIECES.get_or_init(|| {
                    SQL.get_or_init(|| String::from($sql)).split('?').collect()
                })
            }
        }
    };
}
pub(crate) use sql_text;

/// The statement `S` with its values: prepared once per connection.
pub(crate) struct FixedSql<'a, S> {
    binds: Vec<Value<'a>>,
    statement: PhantomData<S>,
}

impl<'a, S: SqlText> FixedSql<'a, S> {
    /// `S`'s statement with its `?` placeholders bound to `binds`, in order.
    pub(crate) fn new(binds: Vec<Value<'a>>) -> FixedSql<'a, S> {
        FixedSql {
            binds,
            statement: PhantomData,
        }
    }
}

impl<S: SqlText> QueryId for FixedSql<'_, S> {
    type QueryId = S;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: SqlText> Query for FixedSql<'_, S> {
    type SqlType = Untyped;
}
