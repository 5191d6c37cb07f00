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
    ($backend:ty, $connection:ty, $mark:literal) => {
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
                let cut = S::cut();
                out.push_sql(cut.first);
                let mut bound = 0;
                for piece in &cut.pieces {
                    match piece.number {
                        // The placeholder of a value bound already.
                        Some(number) if number <= bound => {
                            out.push_sql($mark);
                            out.push_sql(piece.digits);
                            out.push_sql(piece.text);
                            continue;
                        }
                        Some(number) if number != bound + 1 => {
                            return Err(DieselError::QueryBuilderError(
                                "numbered placeholders out of order".into(),
                            ));
                        }
                        _ => {}
                    }
                    let value = self.binds.get(bound).ok_or_else(|| {
                        DieselError::QueryBuilderError("more placeholders than values".into())
                    })?;
                    bound += 1;
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
                    out.push_sql(piece.text);
                }
                if bound != self.binds.len() {
                    return Err(DieselError::QueryBuilderError(
                        format!("{bound} placeholders and {} values", self.binds.len()).into(),
                    ));
                }
                Ok(())
            }
        }

        impl<S: SqlText> diesel::RunQueryDsl<$connection> for FixedSql<'_, S> {}
    };
}

for_backend!(diesel::sqlite::Sqlite, diesel::SqliteConnection, "?");
#[cfg(feature = "postgres")]
for_backend!(diesel::pg::Pg, diesel::PgConnection, "$");

impl QueryId for CachedSql {
    type QueryId = ();
    // No static id: Diesel then caches the statement by its SQL text.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for CachedSql {
    type SqlType = Untyped;
}

/// A statement's SQL cut at its placeholders, once per process: Diesel
/// walks a query for its values on every call.
pub(crate) struct CutSql {
    /// The text before the first placeholder.
    first: &'static str,
    pieces: Vec<Piece>,
}

/// A placeholder and the text after it, up to the next one.
struct Piece {
    /// `Some(n)`: `?n`, the n-th value (its digits: `digits`); `None`: `?`,
    /// the next value.
    number: Option<usize>,
    digits: &'static str,
    text: &'static str,
}

impl CutSql {
    /// Cuts `sql` at each `?`.
    pub(crate) fn new(sql: &'static str) -> CutSql {
        let mut pieces = sql.split('?');
        let first = pieces.next().unwrap_or("");
        let pieces = pieces
            .map(|piece| {
                let end = piece.bytes().take_while(u8::is_ascii_digit).count();
                let (digits, text) = piece.split_at(end);
                Piece {
                    number: digits.parse().ok(),
                    digits,
                    text,
                }
            })
            .collect();
        CutSql { first, pieces }
    }
}

/// A statement known at compile time: one type per statement text.
pub(crate) trait SqlText: 'static {
    /// The SQL, with `?` placeholders and no `?` anywhere else, cut at its
    /// placeholders. A placeholder is `?`, the next value, or numbered:
    /// `?N`, the N-th value, each number first used in order (`?1` before
    /// `?2`), so that a value used in several places is bound once.
    fn cut() -> &'static CutSql;
}

/// Declares a [`SqlText`] type for a statement fixed for the process: `$sql`
/// (a `&'static str`, or a `String` built once from constant parts) is
/// evaluated and cut at its placeholders the first time it is used.
macro_rules! sql_text {
    ($(#[$doc:meta])* $name:ident = $sql:expr) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl $crate::db::sql::SqlText for $name {
            fn cut() -> &'static $crate::db::sql::CutSql {
                static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                static CUT: std::sync::OnceLock<$crate::db::sql::CutSql> =
                    std::sync::OnceLock::new();
                CUT.get_or_init(|| {
                    $crate::db::sql::CutSql::new(SQL.get_or_init(|| String::from($sql)))
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

#[cfg(test)]
mod tests {
    use diesel::sql_types::BigInt;
    use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

    use super::{FixedSql, Value};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    sql_text!(
        /// A value used twice, then a plain placeholder after the numbered ones.
        Repeated = "SELECT ?1 * 100 + ?2 * 10 + ?1 AS n, ? AS m"
    );

    sql_text!(
        /// Numbers first used out of order.
        OutOfOrder = "SELECT ?2 + ?1 AS n"
    );

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = BigInt)]
        m: i64,
    }

    #[test]
    fn a_numbered_placeholder_binds_its_value_once() -> TestResult {
        let query = FixedSql::<Repeated>::new(vec![Value::Int(3), Value::Int(4), Value::Int(9)]);
        let text = diesel::debug_query::<diesel::sqlite::Sqlite, _>(&query).to_string();
        assert_eq!(
            text,
            "SELECT ? * 100 + ? * 10 + ?1 AS n, ? AS m -- binds: [3, 4, 9]"
        );
        let mut conn = SqliteConnection::establish(":memory:")?;
        let row: Row = query.get_result(&mut conn)?;
        assert_eq!(row, Row { n: 343, m: 9 });
        Ok(())
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_numbers_the_repeated_placeholder_alike() {
        let query = FixedSql::<Repeated>::new(vec![Value::Int(3), Value::Int(4), Value::Int(9)]);
        let text = diesel::debug_query::<diesel::pg::Pg, _>(&query).to_string();
        assert_eq!(
            text,
            "SELECT $1 * 100 + $2 * 10 + $1 AS n, $3 AS m -- binds: [3, 4, 9]"
        );
    }

    #[test]
    fn numbered_placeholders_out_of_order_and_missing_values_are_refused() -> TestResult {
        let mut conn = SqliteConnection::establish(":memory:")?;
        let out_of_order = FixedSql::<OutOfOrder>::new(vec![Value::Int(1), Value::Int(2)]);
        assert!(out_of_order.execute(&mut conn).is_err());
        let missing = FixedSql::<Repeated>::new(vec![Value::Int(1), Value::Int(2)]);
        assert!(missing.execute(&mut conn).is_err());
        let extra = FixedSql::<Repeated>::new(vec![Value::Int(1); 4]);
        assert!(extra.execute(&mut conn).is_err());
        Ok(())
    }
}
