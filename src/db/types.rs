//! How the model's values are stored: the Diesel conversions of ids, times,
//! tiers and model lists to and from SQLite's column types.

use diesel::deserialize::{self, FromSql};
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{BigInt, Binary, Text};
use diesel::sqlite::{Sqlite, SqliteValue};
use uuid::Uuid;

use crate::model::event::EventId;
use crate::model::key::{AllowedModels, KeyId, Tier};
use crate::model::time::Timestamp;

impl ToSql<Binary, Sqlite> for KeyId {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.as_uuid_bytes().as_slice());
        Ok(IsNull::No)
    }
}

impl FromSql<Binary, Sqlite> for KeyId {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        // Read in place: this runs on every resolve.
        Ok(KeyId::from(Uuid::from_slice(value.read_blob())?))
    }
}

impl ToSql<Text, Sqlite> for Tier {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.as_str());
        Ok(IsNull::No)
    }
}

impl FromSql<Text, Sqlite> for Tier {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(value.read_text().parse::<Tier>()?)
    }
}

impl ToSql<Text, Sqlite> for AllowedModels {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.to_json());
        Ok(IsNull::No)
    }
}

impl FromSql<Text, Sqlite> for AllowedModels {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(AllowedModels::from_json(value.read_text())?)
    }
}

impl ToSql<BigInt, Sqlite> for Timestamp {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.as_millis());
        Ok(IsNull::No)
    }
}

impl FromSql<BigInt, Sqlite> for Timestamp {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(Timestamp::from_stored(
            <i64 as FromSql<BigInt, Sqlite>>::from_sql(value)?,
        ))
    }
}

impl ToSql<BigInt, Sqlite> for EventId {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Sqlite>) -> serialize::Result {
        out.set_value(self.get());
        Ok(IsNull::No)
    }
}

impl FromSql<BigInt, Sqlite> for EventId {
    fn from_sql(value: SqliteValue<'_, '_, '_>) -> deserialize::Result<Self> {
        Ok(EventId(<i64 as FromSql<BigInt, Sqlite>>::from_sql(value)?))
    }
}

/// The same conversions on PostgreSQL, where ids are `BYTEA`, times
/// `BIGINT` and tiers and model lists `TEXT`.
#[cfg(feature = "postgres")]
mod postgres {
    use std::io::Write;

    use diesel::deserialize::{self, FromSql};
    use diesel::pg::{Pg, PgValue};
    use diesel::serialize::{self, IsNull, Output, ToSql};
    use diesel::sql_types::{BigInt, Binary, Text};
    use uuid::Uuid;

    use crate::model::event::EventId;
    use crate::model::key::{AllowedModels, KeyId, Tier};
    use crate::model::time::Timestamp;

    impl ToSql<Binary, Pg> for KeyId {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            out.write_all(self.as_uuid_bytes().as_slice())?;
            Ok(IsNull::No)
        }
    }

    impl FromSql<Binary, Pg> for KeyId {
        fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
            Ok(KeyId::from(Uuid::from_slice(value.as_bytes())?))
        }
    }

    impl ToSql<Text, Pg> for Tier {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            out.write_all(self.as_str().as_bytes())?;
            Ok(IsNull::No)
        }
    }

    impl FromSql<Text, Pg> for Tier {
        fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
            Ok(std::str::from_utf8(value.as_bytes())?.parse::<Tier>()?)
        }
    }

    impl ToSql<Text, Pg> for AllowedModels {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            out.write_all(self.to_json().as_bytes())?;
            Ok(IsNull::No)
        }
    }

    impl FromSql<Text, Pg> for AllowedModels {
        fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
            Ok(AllowedModels::from_json(std::str::from_utf8(
                value.as_bytes(),
            )?)?)
        }
    }

    impl ToSql<BigInt, Pg> for Timestamp {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            out.write_all(&self.as_millis().to_be_bytes())?;
            Ok(IsNull::No)
        }
    }

    impl FromSql<BigInt, Pg> for Timestamp {
        fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
            Ok(Timestamp::from_stored(
                <i64 as FromSql<BigInt, Pg>>::from_sql(value)?,
            ))
        }
    }

    impl ToSql<BigInt, Pg> for EventId {
        fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
            out.write_all(&self.get().to_be_bytes())?;
            Ok(IsNull::No)
        }
    }

    impl FromSql<BigInt, Pg> for EventId {
        fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
            Ok(EventId(<i64 as FromSql<BigInt, Pg>>::from_sql(value)?))
        }
    }
}
