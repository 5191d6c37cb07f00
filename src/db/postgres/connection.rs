//! Opening one PostgreSQL connection the keytally way: the URL kept out of
//! sight, the lock timeout and the application name set on every
//! connection the pool opens.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::CustomizeConnection;
use diesel::{Connection, PgConnection};

use crate::error::{Error, Result};

/// Everything needed to open and prepare one connection to the database.
///
/// The URL may hold a password: it is used to connect and never shown;
/// [`PgSetup::redacted`] is what messages and logs name.
#[derive(Clone)]
pub(crate) struct PgSetup {
    url: String,
    redacted: String,
    pub(crate) busy_timeout: Duration,
}

impl std::fmt::Debug for PgSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSetup")
            .field("url", &self.redacted)
            .field("busy_timeout", &self.busy_timeout)
            .finish()
    }
}

impl PgSetup {
    /// The setup for the database at `url`.
    pub(crate) fn new(url: &str, busy_timeout: Duration) -> PgSetup {
        PgSetup {
            url: url.to_owned(),
            redacted: crate::model::location::redact_url(url),
            busy_timeout,
        }
    }

    /// The URL to connect with, password included.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The URL with its password left out.
    pub(crate) fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Opens a new connection and prepares it (see [`PgSetup::prepare`]).
    pub(crate) fn establish(&self) -> Result<PgConnection> {
        let mut conn = PgConnection::establish(&self.url).map_err(|error| Error::Open {
            path: self.redacted.clone().into(),
            // libpq's messages name the host and user, never the password.
            source: Box::new(error),
        })?;
        self.prepare(&mut conn)?;
        Ok(conn)
    }

    /// Sets how long a statement waits for a lock (the busy timeout, after
    /// which it fails as [`Error::Busy`]) and names the connection
    /// `keytally` in `pg_stat_activity`.
    pub(crate) fn prepare(&self, conn: &mut PgConnection) -> Result<()> {
        let lock_ms = self.busy_timeout.as_millis().clamp(1, i32::MAX as u128);
        conn.batch_execute(&format!(
            "SET lock_timeout = {lock_ms}; SET application_name = 'keytally'"
        ))?;
        Ok(())
    }
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for PgSetup {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        self.prepare(conn).map_err(|error| match error {
            Error::Database(inner) => diesel::r2d2::Error::QueryError(inner),
            other => diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
                other.to_string(),
            )),
        })
    }
}
